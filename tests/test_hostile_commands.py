"""Hostile inputs to the Trainer commands and the plain commands, through the real command line (issue 28).

Each case runs `python -m cli ...` with the user's arguments (in-process through the same entry point,
`tests/cli_runner.py`; a fresh process where the process boundary is the point: DDP ranks and a `sitecustomize`
they import) and asserts the one error line, a non-zero exit, that no planted code ran, and that nothing already
stored (a run's checkpoint, a store's files) was lost or changed.
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

from cli_runner import CliResult, cli_env, run_cli
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


def cli(*args: str, cwd: Path) -> CliResult:
    """`python -m cli ARGS` in `cwd` with one CPU thread, in-process."""
    return run_cli(list(args), cwd=cwd, env=cli_env(OMP_NUM_THREADS="1"))


def error_line(result: CliResult, command: str) -> str:
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
           cwd: Path | None = None) -> CliResult:
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


# ---- phase 1 on the tiny models: damaged tars, hostile posteriors and members files, a failed grow, a full disk ----

def precompute_args(phase1: dict[str, Path], store: Path | str, outputs: str, *extra: str,
                    shards: Path | None = None, members: str | None = None) -> list[str]:
    """configs/precompute.yaml on the tiny models (no CLIP, no posterior unless `extra` gives one)."""
    settings = ["--model.init_args.map_modules", "[lightning_modules.maps.builtin, lightning_modules.maps.ensemble]",
                "--model.init_args.map_settings", f"{{ensemble_members: {members}, ensemble_distance: bhattacharyya}}"] if members else []
    return ["--config", str(REPO / "configs/precompute.yaml"), "--model.init_args.sd", str(phase1["sd"]),
            "--model.init_args.clip", "null", "--model.init_args.posterior", "null", "--model.init_args.outputs",
            outputs, "--model.init_args.num_noises", "2", "--model.init_args.autocast_dtype", "float32", *settings,
            "--data.init_args.shards", str(shards or phase1["shards"]), "--data.init_args.resolution", "64",
            "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0", "--trainer.accelerator", "cpu",
            "--trainer.callbacks", "[]", "--store", str(store), *extra]


def precompute(phase1: dict[str, Path], store: Path | str, outputs: str, *extra: str, shards: Path | None = None,
               members: str | None = None, cwd: Path | None = None) -> CliResult:
    return cli("precompute", *precompute_args(phase1, store, outputs, *extra, shards=shards, members=members),
               cwd=cwd or phase1["root"])


def ok(result: CliResult) -> CliResult:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def phase1(tiny_model_paths: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Demo images in 2-image tars (4 tars), a conv_out members file from the real `ensemble-fit`, a store with lare."""
    from datamodules.demo_data import build_demo_images
    from datamodules.shards import convert

    root = tmp_path_factory.mktemp("hostile_phase1")
    images = build_demo_images(root / "images", {"val": 2}, tile_size=64)
    convert("genimage", images, "val", root / "shards", shard_size=2, workers=1)
    members = root / "members.pt"
    ok(cli("ensemble-fit", "--config", str(REPO / "configs/ensemble_fit.yaml"), "--model.init_args.sd",
           str(tiny_model_paths["sd"]), "--model.init_args.output", str(members), "--model.init_args.kind", "conv_out",
           "--model.init_args.num_members", "2", "--model.init_args.steps", "2", "--model.init_args.batch_size", "2",
           "--data.init_args.shards", str(root / "shards"), "--data.init_args.resolution", "64",
           "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0", "--trainer.accelerator", "cpu",
           "--trainer.default_root_dir", str(root / "ensemble_fit"), cwd=root))
    paths = {"root": root, "shards": root / "shards", "members": members, "store": root / "lare.zarr",
             **tiny_model_paths}
    ok(precompute(paths, paths["store"], "[lare]"))
    return paths


@pytest.mark.slow
def test_damaged_tars_fail_the_run_after_the_rest_is_written(phase1: dict[str, Path], tmp_path: Path) -> None:
    """Bug caught: precompute exited 0 when tars were truncated (their rows silently became rejected rows); now the
    good tars are written and the run ends non-zero with `K of M tars written; unreadable: NAMES`."""
    from feature_cache.store import FeatureStore

    shards = tmp_path / "shards"
    shutil.copytree(phase1["shards"], shards)
    damaged = shards / "shard-000001.tar"
    damaged.write_bytes(damaged.read_bytes()[:700])
    store = tmp_path / "damaged.zarr"
    line = error_line(precompute(phase1, store, "[lare]", shards=shards), "precompute")
    assert line.startswith(f"python -m cli precompute: {store}: 3 of 4 tars written; unreadable: shard-000001.tar "
                           "(truncated or damaged"), line
    written = FeatureStore.open(store)
    assert len(written.done_tars("g0")) == 4
    errors = written.errors("g0")
    assert all(str(e).startswith("lost: tar shard-000001.tar") for e in errors[2:4]), errors
    assert list(errors[:2]) + list(errors[4:]) == [""] * 6
    reference = FeatureStore.open(phase1["store"]).read("lare")  # the same tars, undamaged
    assert (written.read("lare")[[0, 1, 4, 5, 6, 7]] == reference[[0, 1, 4, 5, 6, 7]]).all()


@pytest.mark.slow
@pytest.mark.parametrize("what", ["posterior", "members"])
def test_posterior_or_members_file_with_code_is_one_line(phase1: dict[str, Path], tmp_path: Path, what: str) -> None:
    """Bug caught: a posterior or members file read by its own torch.load (not the one safe loader); the planted
    pickle must not run, the refusal is one line naming the file, and no store is created."""
    marker, store = tmp_path / "code_ran", tmp_path / "evil.zarr"
    evil = plant(tmp_path / f"{what}.pt", marker, {"format": "decu-members-v1"})
    if what == "posterior":
        result = precompute(phase1, store, "[deu]", "--model.init_args.posterior", str(evil))
        kind = "posterior file"
    else:
        result = precompute(phase1, store, "[ensemble_mi]", members=str(evil))
        kind = "ensemble members file"
    line = error_line(result, "precompute")
    assert not marker.exists() and not store.exists()
    assert line.startswith(f"python -m cli precompute: {kind} {evil}: refused, it holds objects other than tensors"), line


@pytest.mark.slow
def test_failed_grow_leaves_no_group_and_paths_are_resolved(phase1: dict[str, Path], tmp_path: Path) -> None:
    """Bugs caught: growing a store with a corrupt DECU members file gave a traceback and left an incomplete group
    bound to that file, so the rerun with a good file was refused; the same file by a relative then an absolute
    path was refused as another config. Now: one line, the store byte-identical, then both paths grow/resume it."""
    from feature_cache.store import FeatureStore

    store = tmp_path / "grow.zarr"
    shutil.copytree(phase1["store"], store)
    before = snapshot(store)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(phase1["members"].read_bytes()[:300])
    line = error_line(precompute(phase1, store, "[ensemble_mi]", members=str(corrupt)), "precompute")
    assert line.startswith(f"python -m cli precompute: ensemble members file {corrupt}: not a readable PyTorch file"), line
    assert snapshot(store) == before
    ok(precompute(phase1, store, "[ensemble_mi]", members="members.pt", cwd=phase1["root"]))
    grown = FeatureStore.open(store)
    assert set(grown.feature_names) == {"lare", "ensemble_mi"} and not grown.incomplete_groups()
    assert grown.groups[grown.group_of("ensemble_mi")].extractor.maps["ensemble_mi"]["ensemble_members"] == \
        str(phase1["members"])
    after = snapshot(store)
    ok(precompute(phase1, store, "[ensemble_mi]", members=str(phase1["members"])))
    def data(files: dict[str, bytes]) -> dict[str, bytes]:  # without the run's saved config and the lock's pid
        return {k: v for k, v in files.items() if not k.startswith("configs/") and k != ".lock"}

    assert data(snapshot(store)) == data(after)  # the same config: nothing recomputed, nothing refused


# ---- outputs that cannot be written, inputs that are not what they are named: one line, before the work ----

@pytest.fixture(scope="module")
def read_only(tmp_path_factory: pytest.TempPathFactory):
    """A read-only filesystem (a tmpfs mounted ro; needs root, else the cases using it are skipped)."""
    folder = tmp_path_factory.mktemp("read_only")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def generate(paths: dict[str, Path], prompts: Path, out: Path) -> CliResult:
    return cli("generate", "--config", str(REPO / "configs/generate.yaml"), "--model.init_args.sd", str(paths["sd"]),
               "--model.init_args.resolution", "64", "--model.init_args.num_inference_steps", "2",
               "--model.init_args.aleatoric_steps", "[1]", "--prompts", str(prompts), "--num_images", "1", "--out", str(out), "--trainer.accelerator", "cpu",
               "--trainer.callbacks", "[]", "--trainer.default_root_dir", str(out.parent / "generate_run"),
               cwd=out.parent if out.parent.is_dir() else REPO)


@pytest.mark.slow
def test_generate_binary_prompts_and_unwritable_out(tiny_model_paths: dict[str, Path], tmp_path: Path,
                                                    read_only: Path) -> None:
    """Bugs caught: a binary prompts file raised UnicodeDecodeError's traceback; `--out` under a file or on a
    read-only filesystem failed with a traceback (NotADirectoryError / OSError). Each is one line, nothing written."""
    binary = tmp_path / "prompts.txt"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00binary")
    line = error_line(generate(tiny_model_paths, binary, tmp_path / "out"), "generate")
    assert line.startswith(f"python -m cli generate: prompts file {binary} is not UTF-8 text (byte "), line
    prompts = tmp_path / "ok.txt"
    prompts.write_text("a photo\n")
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    line = error_line(generate(tiny_model_paths, prompts, a_file / "out"), "generate")
    assert line.startswith(f"python -m cli generate: --out {a_file / 'out'}: cannot write there: a folder on its "
                           "path is a file"), line
    assert a_file.read_text() == "not a folder"
    line = error_line(generate(tiny_model_paths, prompts, read_only / "out"), "generate")
    assert line.startswith(f"python -m cli generate: --out {read_only / 'out'}: cannot write there: Read-only file "
                           "system"), line
    assert not (tmp_path / "out").exists()


def test_separability_without_stores_is_one_line(tmp_path: Path) -> None:
    """Bug caught: `separability --stores '[]'` ended in a pandas traceback (an empty table)."""
    line = error_line(cli("separability", "--stores", "[]", "--out", str(tmp_path / "sep"), cwd=tmp_path),
                      "separability")
    assert line.startswith("python -m cli separability: separability: --stores is empty"), line
    assert not (tmp_path / "sep").exists()


def test_tiny_models_non_image_and_output_under_a_file(tmp_path: Path) -> None:
    """Bugs caught: `tiny-models --train_on` with a text file named .png raised PIL's traceback; an output folder
    under a file raised FileExistsError's. One line each; the training folder and the file are untouched."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "not_an_image.png").write_text("hello")
    line = error_line(cli("tiny-models", str(tmp_path / "models"), "--train_on", str(images), cwd=tmp_path),
                      "tiny-models")
    assert line.startswith(f"python -m cli tiny-models: --train_on {images}: {images / 'not_an_image.png'} is not a "
                           "readable image (UnidentifiedImageError"), line
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    line = error_line(cli("tiny-models", str(a_file / "models"), cwd=tmp_path), "tiny-models")
    assert line.startswith(f"python -m cli tiny-models: out_dir {a_file / 'models'}: cannot write there: a folder on "
                           "its path is a file"), line
    assert a_file.read_text() == "keep me"


@pytest.mark.slow
def test_ensemble_fit_unwritable_output_is_one_line_before_training(phase1: dict[str, Path], tmp_path: Path,
                                                                    read_only: Path) -> None:
    """Bug caught: `ensemble-fit` trained every member, then died on torch.save with a traceback (read-only output);
    now the output is checked when the model is built, and an existing members file is left as it was."""
    kept = phase1["members"].read_bytes()
    output = read_only / "members.pt"
    line = error_line(cli("ensemble-fit", "--config", str(REPO / "configs/ensemble_fit.yaml"), "--model.init_args.sd",
                          str(phase1["sd"]), "--model.init_args.output", str(output), "--model.init_args.kind",
                          "conv_out", "--model.init_args.num_members", "2", "--model.init_args.steps", "2",
                          "--data.init_args.shards", str(phase1["shards"]), "--data.init_args.resolution", "64",
                          "--data.init_args.num_workers", "0", "--trainer.accelerator", "cpu", cwd=tmp_path),
                      "ensemble-fit")
    assert line.startswith(f"python -m cli ensemble-fit: --model.init_args.output {output}: cannot write there: "
                           "Read-only file system"), line
    assert phase1["members"].read_bytes() == kept


FULL_DISK = '''
import errno, os
from feature_cache.store import FeatureStore

_write_tar, _written = FeatureStore.write_tar, []


def write_tar(self, group, index, *args, **kwargs):
    """The second tar this process writes meets a full disk, as a real ENOSPC from the chunk write would."""
    if _written:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path / group / "lare" / "c" / str(index)))
    _written.append(index)
    return _write_tar(self, group, index, *args, **kwargs)


FeatureStore.write_tar = write_tar
'''


@pytest.mark.slow
@pytest.mark.parametrize("devices", ["1", "2"])
def test_full_disk_is_one_line_per_rank_and_keeps_written_tars(phase1: dict[str, Path], tmp_path: Path,
                                                               devices: str) -> None:
    """Bug caught: a disk-full error under DDP printed a 110-line traceback per rank. The full disk is simulated in
    the real command (a `sitecustomize` every rank imports makes each process's second tar write raise ENOSPC):
    each rank prints at most one line, the run fails, and the tars written before are kept (done markers)."""
    from feature_cache.store import FeatureStore

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FULL_DISK)
    store = tmp_path / "full.zarr"
    env_path = f"{hook}{os.pathsep}{REPO}"
    command = [sys.executable, "-m", "cli", "precompute", *precompute_args(phase1, store, "[lare]"),
               "--trainer.devices", devices, "--trainer.strategy", "ddp" if devices == "2" else "auto"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": env_path, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-4000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("python -m cli precompute:")]
    assert 1 <= len(lines) <= int(devices), result.stderr[-4000:]
    assert all("No space left on device" in line for line in lines), lines
    assert 1 <= len(FeatureStore.open(store).done_tars("g0")) <= int(devices)
