"""The tests' in-process CLI runner returns what a fresh `python -m cli` process returns."""

from __future__ import annotations

import logging
import sys

import pytest

from cli_runner import REPO, run_cli

LINES = [["--help"], ["compare", "/nonexistent/runs"],
         ["fit", "--config", str(REPO / "configs/deua.yaml"), "--model.init_args.lrr", "1"]]


@pytest.mark.slow
@pytest.mark.parametrize("args", LINES, ids=["help", "missing-dir", "config-typo"])
def test_in_process_run_returns_what_a_process_returns(args, tmp_path):
    """Bugs caught: an in-process run that loses the exit status (a SystemExit message turned into 0, a parse error's
    2 into 1), drops stderr written by the parser or stdout printed before the exit, or leaves the working directory
    or environment of the command behind for the next test."""
    alone = run_cli(args, cwd=tmp_path, subprocess_=True)
    here = run_cli(args, cwd=tmp_path)
    assert (here.returncode, here.stdout, here.stderr) == (alone.returncode, alone.stdout, alone.stderr)
    assert here.returncode == (0 if args == ["--help"] else 2 if args[0] == "fit" else 1)


def test_console_logging_is_captured_and_restored(tmp_path):
    """Bug caught: a logging handler created before the run (Lightning's, at import) writing around the capture, or
    left pointing at the run's closed stream (the next log line raises 'I/O operation on closed file')."""
    logger = logging.getLogger("cli_runner_probe")
    handler = logging.StreamHandler()
    logger.addHandler(handler)
    try:
        before = handler.stream
        result = run_cli(["compare", str(tmp_path / "none")], cwd=tmp_path)
        assert result.returncode == 1 and handler.stream is before
        logger.warning("after the run")  # must not raise
    finally:
        logger.removeHandler(handler)


def test_a_handler_made_during_a_run_is_left_on_the_stream_it_would_have_had(tmp_path, monkeypatch):
    """Bug caught: a library's first import inside a run (transformers': `logging.StreamHandler()` on sys.stderr,
    its `flush` bound to `sys.stderr.flush`) left its handler on the run's closed stream, so every later run failed
    entering the capture ('I/O operation on closed file') and its log lines after the run were lost."""

    logger = logging.getLogger("cli_runner_probe_made_in_run")

    def main(args: list[str]) -> None:  # what transformers' first import does inside the command
        handler = logging.StreamHandler()
        handler.flush = sys.stderr.flush
        logger.addHandler(handler)
        logger.warning("made during the run")

    monkeypatch.setattr("cli.__main__.main", main)
    try:
        assert "made during the run" in run_cli(["anything"], cwd=tmp_path).stderr
        (handler,) = logger.handlers
        assert handler.stream is sys.stderr and handler.flush == sys.stderr.flush
        assert "made during the run" in run_cli(["anything"], cwd=tmp_path).stderr  # the next run still captures
        logger.warning("after the runs")  # must not raise
    finally:
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
