"""`python -m cli ARGS` for the tests: in this process through the same entry point (`cli.__main__.main`), or in a
fresh interpreter where the process boundary is what a test checks (DDP ranks re-executing the command line, kill -9,
a piped or TTY stdout, exit by signal, what an import pulls in, a user's PYTHONPATH).

In-process runs skip the interpreter start (importing torch and Lightning: 5-11 s on the 2-core machine) and return
what a subprocess would: exit status, and stdout/stderr captured at the file-descriptor level (Rich, logging and
C code included). The process state a command changes is put back afterwards: environment, working directory,
torch threads and determinism, warning filters, logging streams.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
import tempfile
import traceback
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI run in a test: this one, the repository importable, the hub offline, plus `extra`."""
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **extra}


@dataclass
class CliResult:
    """What `subprocess.run(..., capture_output=True, text=True)` returns, for either way of running."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str


def run_cli(args: list[str], *, cwd: str | Path | None = None, env: Mapping[str, str] | None = None,
            subprocess_: bool = False, timeout: float = 900) -> CliResult:
    """`python -m cli ARGS` with `cwd` and `env` (default `cli_env()`); `subprocess_=True` for a fresh interpreter.

    In-process runs must stay single-process (no `--trainer.devices 2`: Lightning's DDP launcher re-executes
    `sys.argv`, which here is pytest's)."""
    env = dict(cli_env() if env is None else env)
    if subprocess_:
        done = subprocess.run([sys.executable, "-m", "cli", *args], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)
        return CliResult(list(args), done.returncode, done.stdout, done.stderr)
    with _captured() as (stdout, stderr), _process_state(cwd, env):
        returncode = _main(list(args))
    return CliResult(list(args), returncode, stdout.getvalue(), stderr.getvalue())


def _main(args: list[str]) -> int:
    """`python -m cli ARGS`'s exit status: what `sys.exit` was given, 1 with the traceback for an exception."""
    from cli.__main__ import main

    try:
        main(args)
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            return exit_.code or 0
        print(exit_.code, file=sys.stderr)
        return 1
    except Exception:  # noqa: BLE001  (what the interpreter does with an uncaught exception)
        traceback.print_exc()
        return 1
    return 0


@contextlib.contextmanager
def _captured() -> Iterator[tuple[io.StringIO, io.StringIO]]:
    """File descriptors 1 and 2, `sys.stdout`/`sys.stderr` and the logging handlers that write to a console (stderr,
    as in a fresh process: Lightning's holds the stream it found at import) go to two temp files for the duration;
    the texts are filled when it ends (pytest's own capture is nested outside and restored untouched)."""
    texts = io.StringIO(), io.StringIO()
    sys.stdout.flush()
    sys.stderr.flush()
    saved_fds = os.dup(1), os.dup(2)
    saved_streams = sys.stdout, sys.stderr
    files = [tempfile.TemporaryFile(mode="w+b") for _ in range(2)]
    handlers = _console_handlers()
    handler_streams = [h.stream for h in handlers]
    try:
        for fd, file in zip((1, 2), files):
            os.dup2(file.fileno(), fd)
        sys.stdout = io.TextIOWrapper(os.fdopen(os.dup(1), "wb"), encoding="utf-8", line_buffering=True)
        sys.stderr = io.TextIOWrapper(os.fdopen(os.dup(2), "wb"), encoding="utf-8", line_buffering=True)
        for handler in handlers:
            handler.setStream(sys.stderr)
        yield texts
    finally:
        for handler, stream in zip(handlers, handler_streams):
            handler.setStream(stream)
        for handler in _console_handlers():  # made during the run (a library's logger on first import): the console
            if handler.stream in (sys.stdout, sys.stderr):  # it would have had in a process, not the closed capture
                console = sys.__stdout__ if handler.stream is sys.stdout else sys.__stderr__
                if getattr(handler.__dict__.get("flush"), "__self__", None) is handler.stream:
                    handler.flush = console.flush  # diffusers' handler: `flush = sys.stderr.flush`, bound at creation
                handler.setStream(console)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
            stream.close()
        sys.stdout, sys.stderr = saved_streams
        for fd, saved in zip((1, 2), saved_fds):
            os.dup2(saved, fd)
            os.close(saved)
        for text, file in zip(texts, files):
            file.seek(0)
            text.write(file.read().decode("utf-8", errors="replace"))
            file.close()


def _console_handlers() -> list[logging.StreamHandler]:
    """Plain StreamHandlers (not FileHandler & co., whose stream is their file): this project adds none to stdout."""
    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in list(logging.Logger.manager.loggerDict))]
    return [h for logger in loggers if isinstance(logger, logging.Logger) for h in logger.handlers
            if type(h) is logging.StreamHandler]


@contextlib.contextmanager
def _process_state(cwd: str | Path | None, env: Mapping[str, str]) -> Iterator[None]:
    """Run with `env` as the whole environment (OMP_NUM_THREADS applied to torch) and `cwd`; restore everything after."""
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    saved_threads, saved_deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    saved_path = list(sys.path)
    try:
        with warnings.catch_warnings():
            os.environ.clear()
            os.environ.update(env)
            if "OMP_NUM_THREADS" in env:
                torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
            if cwd is not None:
                os.chdir(cwd)
            yield
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        torch.set_num_threads(saved_threads)
        torch.use_deterministic_algorithms(saved_deterministic)
        sys.path[:] = saved_path
