"""pytest-timeout limits per lane: `pyproject.toml` sets the default (`timeout`), slow tests get `SLOW_TIMEOUT_S`.

A hanging test (a DDP rank waiting on a dead peer, a reader blocked on a FIFO) is stopped and named instead of
eating CI's 90 minutes; slow tests (real multi-process or end-to-end runs) legitimately take minutes.
"""

from __future__ import annotations

import pytest

SLOW_TIMEOUT_S = 2400


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow tests get the longer limit unless they set their own `@pytest.mark.timeout`."""
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))
