"""Every Trainer the CLI runs shows Lightning's Rich bar on a terminal and a quiet one when piped."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

import core.trainer_progress
from cli.trainer import ForensicsTrainer
from test_grid_together import ENV, SPECS, _values, _write_configs
from test_feature_cache_datamodule import write_store


def bar_of(monkeypatch: pytest.MonkeyPatch, terminal: bool, **kwargs: object) -> object:
    monkeypatch.setattr(core.trainer_progress, "plain_output", lambda: not terminal)
    return ForensicsTrainer(accelerator="cpu", logger=False, **kwargs).progress_bar_callback


@pytest.mark.parametrize("terminal", [True, False])
def test_the_default_bar_is_rich_and_quiet_when_piped(monkeypatch: pytest.MonkeyPatch, terminal: bool) -> None:
    """Catches `fit`/`test` (and predict's and robustness's own Trainers) falling back to Lightning's tqdm bar
    (configs/deua.yaml names no bar), and a Rich bar that draws its stale final frame into a log file."""
    bar = bar_of(monkeypatch, terminal)
    assert type(bar) is RichProgressBar
    assert bar._console_kwargs.get("quiet", False) is not terminal
    # the Trainers predict and robustness build themselves: the same bar beside the plain lines
    plain, own = core.trainer_progress.progress_callbacks()
    assert type(plain) is core.trainer_progress.PlainLogProgress and type(own) is RichProgressBar
    assert own._console_kwargs.get("quiet", False) is not terminal


def test_a_configured_bar_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches the swap replacing a bar the user chose: their tqdm bar, their Rich bar's options on a terminal."""
    tqdm = TQDMProgressBar(refresh_rate=7)
    assert bar_of(monkeypatch, True, callbacks=[tqdm]) is tqdm
    rich = RichProgressBar(leave=True)
    assert bar_of(monkeypatch, True, callbacks=[rich]) is rich
    assert bar_of(monkeypatch, True, enable_progress_bar=False) is None


@pytest.mark.slow
def test_fit_on_a_terminal_draws_the_rich_bar(tmp_path: Path) -> None:
    """`python -m cli fit` as a user runs it in a terminal (script(1) gives it a pseudo-terminal). Catches the tqdm
    bar (`|` and `it/s]`) where the README promises Rich's."""
    store = write_store(tmp_path / "store", _values, SPECS, ["sdv4", "nature"], num_rows=16, shard_size=16)
    base, _ = _write_configs(tmp_path, store.path)
    command = [sys.executable, "-m", "cli", "fit", "--config", str(base)]
    done = subprocess.run(["script", "-qec", shlex.join(command), "/dev/null"], env={**ENV, "TERM": "xterm",
                          "COLUMNS": "120"}, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "━" in output and "Epoch 1/1" in output, output[-3000:]
    assert "it/s]" not in output, output[-3000:]
