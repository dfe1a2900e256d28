"""Session fixtures for artefacts several test files read: built once per session, shared by pytest-xdist workers.

`demo_run`: one `python -m cli demo` (both detectors, the size test_demo_learning's AUROC bounds need), read by
test_demo.py (stores, checkpoints, tables; `predict` and `robustness` on its checkpoints) and by
test_demo_learning.py (the unpermuted run its permuted control is set against). Tests only read it: a test that
writes into it must take a copy (`shutil.copytree`).
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from cli_runner import run_cli

DEMO_IMAGES_PER_CLASS = 16  # training images per class; the demo's val split (the test store) gets half


def build_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """`build(folder)` once per session, also across xdist workers (they share the session's temp root and wait on
    a lock while one builds); a build that failed is redone by the next fixture that asks."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    root = tmp_path_factory.getbasetemp().parent if worker else tmp_path_factory.getbasetemp()
    folder, built = root / name, root / f"{name}.built"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not built.is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            built.touch()
    return folder


def run_demo_cli(out: Path, *extra: str) -> str:
    """`python -m cli demo --out OUT` at the shared size with `extra` options, in-process (the demo starts each
    phase as its own subprocess); returns its stdout."""
    result = run_cli(["demo", "--out", str(out), "--images_per_class", str(DEMO_IMAGES_PER_CLASS), *extra],
                     cwd=out.parent)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(OUT, stdout) of `python -m cli demo --out OUT --images_per_class 16` with both detectors, default epochs."""
    def build(folder: Path) -> None:
        (folder / "stdout.txt").write_text(run_demo_cli(folder / "out"))

    folder = build_once(tmp_path_factory, "demo_run", build)
    return folder / "out", (folder / "stdout.txt").read_text()
