"""Hostile inputs to the Trainer commands and the plain commands, through the real command line (issue 28).

Each case runs `python -m cli ...` in a fresh process the way a user does and asserts the one error line, a
non-zero exit, that no planted code ran, and that nothing already stored (a run's checkpoint, a store's files)
was lost or changed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from core.checkpoint_io import safe_torch_load

from workflow_stores import build_store, local_config

REPO = Path(__file__).resolve().parents[1]
SDV4, GLIDE = "imagenet_ai_0419_sdv4", "imagenet_glide"
HINT = "  (CLI_TRACEBACK=1 for the traceback)"


class RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint, posterior or members file carries."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(path: Path, marker: Path, content: object | None = None) -> Path:
    """A torch file at `path` that would create `marker` if loaded the unsafe way (beside `content`'s data)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**(content or {}), "hook": RunsCode(marker)}, path)
    return path


def cli(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def error_line(result: subprocess.CompletedProcess, command: str) -> str:
    """The command's one error line (exit non-zero, no traceback, exactly one `python -m cli COMMAND:` line)."""
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith(f"python -m cli {command}:")]
    assert len(lines) == 1, result.stderr[-4000:]
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes: what must be unchanged after a refused command."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A user's project: small real stores, configs/deua.yaml + local.yaml, one fitted run (one epoch)."""
    root = tmp_path_factory.mktemp("hostile_commands")
    strengths = {SDV4: 1.5, GLIDE: 0.4}
    train = build_store(root / "data/train.zarr", [SDV4], strengths, 16)
    test = build_store(root / "data/val.zarr", [SDV4, GLIDE], strengths, 8, seed=1)
    other = build_store(root / "data/t100.zarr", [SDV4, GLIDE], strengths, 8, seed=1, timestep=100)
    local = local_config(root / "local.yaml", [train], [test], Path("runs"), epochs=1)
    result = cli("fit", "--config", str(REPO / "configs/deua.yaml"), "--config", str(local), cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = root / "runs/deua/both-seed0/checkpoints/last.ckpt"
    assert checkpoint.is_file()
    return {"root": root, "local": local, "checkpoint": checkpoint, "train": Path(train), "test": Path(test),
            "other": Path(other)}


def scored(fitted: dict[str, Path], command: str, *extra: str, local: Path | None = None,
           cwd: Path | None = None) -> subprocess.CompletedProcess:
    return cli(command, "--config", str(REPO / "configs/deua.yaml"), "--config", str(local or fitted["local"]),
               *extra, cwd=cwd or fitted["root"])


def test_run_dir_checkpoint_with_code_is_refused_by_test(fitted: dict[str, Path], tmp_path: Path) -> None:
    """Bug caught: `run_checkpoint` read `runs/<name>/<row>-seed0/checkpoints/last.ckpt` with weights_only=False,
    so a planted pickle ran during `python -m cli test`. A copy of the project with the run's last.ckpt replaced."""
    project = tmp_path / "project"
    shutil.copy(fitted["local"], tmp_path / "local.yaml")
    marker = tmp_path / "code_ran"
    evil = plant(project / "runs/deua/both-seed0/checkpoints/last.ckpt", marker,
                 safe_torch_load(fitted["checkpoint"], "checkpoint"))
    result = scored(fitted, "test", local=tmp_path / "local.yaml", cwd=project)
    line = error_line(result, "test")
    assert not marker.exists()
    assert line.startswith(f"python -m cli test: checkpoint {evil.relative_to(project)}: refused, it holds "
                           "objects other than tensors and plain data, which could run code when loaded"), line
    assert not list(project.rglob("protocol_table.*"))


@pytest.mark.parametrize("command", ["test", "validate"])
def test_ckpt_path_with_code_is_one_line(fitted: dict[str, Path], tmp_path: Path, command: str) -> None:
    """Bug caught: `--ckpt_path evil.ckpt` reached Lightning's own load, refused with its raw traceback (test);
    validate had no check at all. The file is read safely first: one line naming it, no code run."""
    marker = tmp_path / "code_ran"
    evil = plant(tmp_path / "evil.ckpt", marker, safe_torch_load(fitted["checkpoint"], "checkpoint"))
    before = snapshot(fitted["root"] / "runs")
    line = error_line(scored(fitted, command, "--ckpt_path", str(evil)), command)
    assert not marker.exists()
    assert line.startswith(f"python -m cli {command}: checkpoint {evil}: refused, it holds objects other than "
                           "tensors"), line
    assert snapshot(fitted["root"] / "runs") == before


def test_validate_refuses_stores_computed_otherwise(fitted: dict[str, Path], tmp_path: Path) -> None:
    """Bug caught: `validate` scored a checkpoint trained on timestep-200 features on a timestep-100 store, rc=0
    (only `test` checked). The refusal names the differing field and the run directory is unchanged."""
    settings = yaml.safe_load(fitted["local"].read_text())
    settings["data"]["init_args"].update(val=[str(fitted["other"])], val_fraction=0.0)
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(settings))
    before = snapshot(fitted["root"] / "runs")
    line = error_line(scored(fitted, "validate", "--ckpt_path", str(fitted["checkpoint"]), local=other), "validate")
    assert f"feature store {fitted['other']} was computed otherwise" in line and "timestep 200 != 100" in line, line
    assert snapshot(fitted["root"] / "runs") == before
    assert scored(fitted, "validate", "--ckpt_path", str(fitted["checkpoint"])).returncode == 0
