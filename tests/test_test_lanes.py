"""The test lanes' guards: pytest-timeout stops a hanging test and names it; slow tests get the longer limit.

Bugs caught: pytest-timeout not installed or not configured (a hang runs until CI's 90 minutes), the slow-test
limit not applied (a legitimate 3-minute DDP test killed at the default), or applied to every test (a hang in
the fast lane waits 40 minutes).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

TESTS = Path(__file__).resolve().parent

SLEEPERS = textwrap.dedent("""
    import time
    import pytest

    def test_hangs():
        time.sleep(30)

    @pytest.mark.slow
    def test_slow_but_fine():
        time.sleep(3)
""")


def test_a_hanging_test_is_stopped_and_named_and_slow_tests_get_longer(tmp_path: Path) -> None:
    (tmp_path / "test_sleepers.py").write_text(SLEEPERS)
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "timeouts", "-o", "timeout=2", "-q",
                             "-p", "no:cacheprovider", str(tmp_path / "test_sleepers.py")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "Timeout" in out and "test_hangs" in out, out
    assert "1 failed, 1 passed" in out, out


def test_the_longest_first_schedule_names_existing_test_files():
    """Bug caught: a renamed or removed test file left in the xdist schedule, so the file it meant drops to the end of
    the run again (a core idle for its minutes) without anything failing."""
    from schedule import LONGEST_FIRST

    missing = [name for name in LONGEST_FIRST if not (TESTS / name).is_file()]
    assert not missing, f"tests/schedule.py LONGEST_FIRST names files that do not exist: {missing}"
