"""Test order for pytest-xdist: the files that take minutes start first, so the last file a worker gets is a short one.

xdist (`--dist loadfile`) hands each worker whole files in collection order (`--no-loadscope-reorder`: its default
order, most tests first, starts the single two-minute README walk last and leaves a core idle at the end). The
list is from `--durations` (docs/testing.md); a stale list only costs minutes, never a result.
"""

from __future__ import annotations

import pytest

LONGEST_FIRST = ("test_workflow.py", "test_demo_learning.py", "test_readme_walk.py", "test_cluster.py", "test_demo.py",
                 "test_precompute.py", "test_extending.py", "test_hostile_commands.py", "test_detector_configs.py",
                 "test_detectors.py", "test_generation.py", "test_ensemble.py", "test_ensemble_workflow.py",
                 "test_grid_together.py", "test_predict_ddp.py", "test_feature_writer.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Stable sort: LONGEST_FIRST's files in its order, then every other file in pytest's order."""
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))
