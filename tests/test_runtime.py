"""`python -m cli` (and the reader benchmark) run with glibc's streaming copies for large buffers, set at start."""

from __future__ import annotations

import os
import subprocess
import sys

from cli_runner import REPO
from core.runtime import STREAMING_COPIES

PROBE = ("import os; from core.runtime import with_streaming_copies; print('before', os.getpid()); "
         "with_streaming_copies(); print('after', os.getpid(), os.environ.get('GLIBC_TUNABLES'))")


def _probe(**env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "CLI_NO_REEXEC")}
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60,
                          env={**clean, "PYTHONPATH": str(REPO), **env})
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_the_command_reexecutes_itself_once_with_the_tunable_kept_beside_the_users():
    """Bugs caught: the tunable set in os.environ only (glibc reads it at process start: no effect), a re-execution
    loop, a user's own GLIBC_TUNABLES replaced, and a re-execution that changes the pid (kill -9 of the launched
    process, SLURM's task tracking)."""
    lines = _probe(GLIBC_TUNABLES="glibc.malloc.check=0")
    pid = lines[0].split()[1]
    assert lines == [f"before {pid}", f"before {pid}", f"after {pid} glibc.malloc.check=0:{STREAMING_COPIES}"]
    assert _probe(CLI_NO_REEXEC="1")[-1].startswith("after") and len(_probe(CLI_NO_REEXEC="1")) == 2


def test_python_m_cli_starts_under_the_tunable(tmp_path):
    """Bug caught: `python -m cli` not calling `with_streaming_copies` (the function tested above, used by nothing):
    a sitecustomize prints GLIBC_TUNABLES at every interpreter start, so the re-executed start must show it."""
    (tmp_path / "sitecustomize.py").write_text(
        "import os, sys\nprint('start', os.environ.get('GLIBC_TUNABLES'), file=sys.stderr)\n")
    clean = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "CLI_NO_REEXEC")}
    done = subprocess.run([sys.executable, "-m", "cli", "--help"], capture_output=True, text=True, timeout=60,
                          env={**clean, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])})
    assert done.returncode == 0 and "toy-data" in done.stdout, done.stderr
    starts = [line for line in done.stderr.splitlines() if line.startswith("start ")]
    assert starts == ["start None", f"start {STREAMING_COPIES}"], done.stderr
