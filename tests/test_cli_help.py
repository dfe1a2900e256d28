"""Every subcommand's --help runs in a fresh process; unimplemented ones never pretend to work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cli.lightning_cli import TRAINER_SUBCOMMANDS
from cli.plain_commands import PLAIN_COMMANDS


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("subcommand", [*TRAINER_SUBCOMMANDS, *PLAIN_COMMANDS])
def test_subcommand_help_runs(subcommand):
    result = _run(subcommand, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout and subcommand.replace("-", "_") in result.stdout.replace("-", "_")


def test_top_level_help_lists_every_subcommand():
    result = _run("--help")
    assert result.returncode == 0
    for name in [*TRAINER_SUBCOMMANDS, *PLAIN_COMMANDS]:
        assert name in result.stdout


def test_unknown_subcommand_fails_with_one_line():
    result = _run("precomptue")
    assert result.returncode != 0 and "unknown subcommand 'precomptue'" in result.stderr


def test_tiny_models_command_writes_loadable_models(tmp_path):
    result = _run("tiny-models", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "sd" / "unet" / "config.json").is_file()
    assert (tmp_path / "clip" / "open_clip_config.json").is_file()


def test_bad_input_is_one_line_naming_it(tmp_path):
    result = _run("precompute", "--config", str(Path(__file__).resolve().parents[1] / "configs" / "precompute.yaml"), "--model.init_args.sd", str(tmp_path / "no-sd"),
                  "--store", str(tmp_path / "store.zarr"))
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("python -m cli")]
    assert len(errors) == 1 and "Stable Diffusion weights not found at" in errors[0] and "no-sd" in errors[0]
    assert "Traceback" not in result.stderr
    result = _run("predict", "--ckpt", str(tmp_path / "missing.ckpt"), "--data", str(tmp_path))
    assert result.returncode != 0 and "checkpoint" in result.stderr and "missing.ckpt: no such file" in result.stderr
