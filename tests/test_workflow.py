"""The research workflow as a user types it: README lines run verbatim (the phase-1 block and the DDP fit in a fresh
process, the rest in-process through the same entry point, `tests/cli_runner.py`), results read back through
TensorBoard's own readers, pandas and the stores, and checked against independent computations."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator as PluginAccumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata

from datamodules.cached_features import FeatureCacheDataModule
from lightning_modules.detectors import DEUADetector
from reports.evaluation import Predictions, protocol_table

from cli_runner import CliResult, run_cli
from workflow_stores import build_store, local_config

REPO = Path(__file__).resolve().parents[1]
# The documented lines a user copies: the README's workflow, then the workflow guide's.
SOURCES = (REPO / "README.md", REPO / "docs/workflow.md")
SDV4, GLIDE = "imagenet_ai_0419_sdv4", "imagenet_glide"
PREDICTION_COLUMNS = ["store", "row", "key", "path", "generator", "label", "format", "jpeg_quality", "width",
                      "height", "p_fake", "threshold", "prediction", "generator_code"]


def readme_line(start: str) -> str:
    """The documented command line that starts with `start`, verbatim."""
    for source in SOURCES:
        if source.is_file():
            lines = [line.strip() for line in source.read_text().splitlines() if line.strip().startswith(start)]
            if lines:
                return lines[0]
    pytest.fail(f"no line starting with {start!r} in {[str(s) for s in SOURCES]}")


def run(line: str, cwd: Path, check: bool = True, fresh_process: bool = False) -> CliResult:
    """A documented line `python -m cli ...`, in-process or (`fresh_process`) in a new interpreter; stdout is not a
    terminal either way, as under SLURM."""
    words = shlex.split(line)
    assert words[:3] == ["python", "-m", "cli"], line
    result = run_cli(words[3:], cwd=cwd, subprocess_=fresh_process)
    if check and result.returncode:
        raise AssertionError(f"{line} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def hparams_of(run_dir: Path) -> dict[str, object]:
    """The hparams-tab settings of a run, decoded by TensorBoard's hparams plugin."""
    accumulator = PluginAccumulator(str(run_dir))
    accumulator.Reload()
    content = accumulator.PluginTagToContent(hparams_metadata.PLUGIN_NAME)
    start = hparams_metadata.parse_session_start_info_plugin_data(content[hparams_metadata.SESSION_START_INFO_TAG])
    return {name: value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind"))
            for name, value in start.hparams.items()}


def scalars_of(run_dir: Path) -> dict[str, list[float]]:
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [event.value for event in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's project directory: the repository's DEUA config and two ablation rows, real stores, local.yaml."""
    root = tmp_path_factory.mktemp("workspace")
    data = root / "data"
    data.mkdir()
    strengths = {SDV4: 1.5, GLIDE: 0.4, "MSCOCO": None, "ldm": 1.5, "sdxl": 0.2}
    train = build_store(data / "sdv4-train.zarr", [SDV4], strengths, 64)
    glide_train = build_store(data / "glide-train.zarr", [GLIDE], strengths, 64, seed=2)
    test = build_store(data / "genimage-val.zarr", [SDV4, GLIDE], strengths, 32, seed=1)
    build_store(data / "drct-val.zarr", ["MSCOCO", "ldm", "sdxl"], strengths, 16, layout="drct", seed=3)
    (root / "configs/ablations/deua").mkdir(parents=True)
    shutil.copy(REPO / "configs/deua.yaml", root / "configs/deua.yaml")
    for row in ("baseline", "both"):
        shutil.copy(REPO / f"configs/ablations/deua/{row}.yaml", root / f"configs/ablations/deua/{row}.yaml")
    local = local_config(root / "local.yaml", [train], [test], Path("runs"))
    settings = yaml.safe_load(local.read_text())
    settings["model"]["init_args"]["lr"] = 3e-3
    local.write_text(yaml.safe_dump(settings))
    del settings["data"]["init_args"]["train"]
    (root / "local_matrix.yaml").write_text(yaml.safe_dump(settings))
    (root / "configs/matrix/genimage").mkdir(parents=True)
    for name, store in (("sdv4", train), ("glide", glide_train)):
        (root / f"configs/matrix/genimage/{name}.yaml").write_text(yaml.safe_dump({
            "trainer": {"logger": {"init_args": {"name": "deua_matrix", "version": name}}},
            "data": {"init_args": {"train": [store]}}}))
    (root / "drct.yaml").write_text(yaml.safe_dump({"data": {"init_args": {"test": [str(data / "drct-val.zarr")]}}}))
    return root


@pytest.fixture(scope="module")
def ablation_grid(workspace: Path) -> CliResult:
    return run(readme_line("python -m cli grid configs/ablations/deua"), workspace)


def test_test_refuses_without_a_fitted_run(workspace, tmp_path):
    """Bug caught: `test` without --ckpt_path scoring a freshly initialised model and writing its table."""
    shutil.copytree(workspace / "configs", tmp_path / "configs")
    shutil.copy(workspace / "local.yaml", tmp_path / "local.yaml")
    result = run(readme_line("python -m cli test"), tmp_path, check=False)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("python -m cli test:")]
    assert len(errors) == 1 and "no fitted run of both-seed0 under runs/deua" in errors[0], result.stderr
    assert not list(tmp_path.rglob("protocol_table.*")) and not list(tmp_path.rglob("events.out.tfevents.*"))


@pytest.mark.slow
def test_test_refuses_stores_computed_otherwise_than_the_checkpoint(ablation_grid, workspace, tmp_path):
    """Bug caught: a checkpoint trained on features of one extractor setting (weights, posterior, timestep) scored
    with rc=0 on stores computed with another; the refusal names the differing field and writes nothing."""
    strengths = {SDV4: 1.5, GLIDE: 0.4}
    train = build_store(tmp_path / "t100-train.zarr", [SDV4], strengths, 16, timestep=100)
    test = build_store(tmp_path / "t100-val.zarr", [SDV4, GLIDE], strengths, 8, seed=1, timestep=100)
    local = local_config(tmp_path / "other.yaml", [train], [test], tmp_path / "runs")
    run_dir = workspace / "runs/deua/both-seed0"
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    tables_before = sorted(p.stat().st_mtime_ns for p in run_dir.glob("protocol_table.*"))
    result = run(f"python -m cli test --config configs/deua.yaml --config {local} --ckpt_path {checkpoint}",
                 workspace, check=False)
    errors = [line for line in result.stderr.splitlines() if line.startswith("python -m cli test:")]
    assert result.returncode != 0 and len(errors) == 1 and "timestep 200 != 100" in errors[0], result.stderr[-2000:]
    assert sorted(p.stat().st_mtime_ns for p in run_dir.glob("protocol_table.*")) == tables_before


@pytest.mark.slow
def test_grid_runs_every_row_and_seed_and_prints_the_summary(ablation_grid, workspace):
    """Bugs caught: `--extra local.yaml` / `--seeds 0 1` rejected as non-lists; seeds sharing a directory; no
    summary at the end; compare's mean ± std not the mean and sample std of the runs' own TensorBoard values."""
    runs = workspace / "runs/deua"
    assert sorted(p.name for p in runs.iterdir() if p.is_dir()) == [
        "baseline-seed0", "baseline-seed1", "both-seed0", "both-seed1"]
    out = ablation_grid.stdout
    assert "grid: 4/4 runs (100%)" in out and "grid summary: python -m cli compare runs/deua" in out
    assert "test: " in out and " batches (100%)" in out  # plain progress lines: stdout is a pipe here
    # Bug caught: a silent start while every row's config is resolved (70 s for 8 rows)
    resolving = [line for line in out.splitlines() if line.startswith("grid: resolving row configs: ")]
    assert [line.split(",")[0] for line in resolving] == [f"grid: resolving row configs: {k}/2 rows ({50 * k}%)"
                                                          for k in (1, 2)] and "ETA" in resolving[0]
    summary = pd.read_csv(runs / "compare.csv")
    assert len(summary) == 4 and set(summary["seed"]) == {0, 1}
    for row in ("baseline", "both"):
        values = [scalars_of(runs / f"{row}-seed{seed}")["hp/test_auroc"][-1] for seed in (0, 1)]
        expected = f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"
        assert expected in (runs / "compare.md").read_text(), (expected, (runs / "compare.md").read_text())


@pytest.mark.slow
def test_compare_readme_line_and_unknown_metric(ablation_grid, workspace):
    """Bugs caught: `--metrics a b` rejected; a typo in --sort_by silently sorting by nothing; settings that
    differ taken from a test's config; the default table wider than a screen."""
    result = run(readme_line("python -m cli compare runs/deua"), workspace)
    header = next(line for line in result.stdout.splitlines() if line.startswith("| row"))
    columns = [cell.strip() for cell in header.strip("|").split("|")]
    assert columns == ["row", "seeds", "model.guidance", "model.asym_weight", "test_acc", "test_auroc"]
    table = pd.read_csv(workspace / "runs/deua/compare.csv")
    assert set(table["model.guidance"]) == {"none", "deu"}
    bad = run("python -m cli compare runs/deua --sort_by test_accuracy", workspace, check=False)
    assert bad.returncode != 0 and "unknown metric 'test_accuracy'" in bad.stderr and "test_acc" in bad.stderr


@pytest.mark.slow
def test_hparams_tab_shows_guidance_and_real_metrics(ablation_grid, workspace):
    """Bugs caught: `guidance: []` blank in the hparams tab; test's NaN placeholders hiding val metrics;
    jsonargparse clutter; hp/test_acc or the generator mean disagreeing with the saved predictions."""
    for row, guidance in (("baseline", "none"), ("both", "deu")):
        run_dir = workspace / f"runs/deua/{row}-seed0"
        settings = hparams_of(run_dir)
        assert settings["guidance"] == guidance and settings["seed"] == 0
        assert not any(name.startswith("_") for name in settings)
        scalars = scalars_of(run_dir)
        for tag in ("hp/val_acc", "hp/val_ap", "hp/val_auroc", "hp/test_acc", "hp/test_mean_generator_auroc",
                    "hp/test_format_only_auroc"):
            assert np.isfinite(scalars[tag][-1]), tag
        predictions = pd.read_csv(run_dir / "test_predictions.csv")
        assert list(predictions.columns) == PREDICTION_COLUMNS
        assert scalars["hp/test_acc"][-1] == pytest.approx((predictions["prediction"] == predictions["label"]).mean())
        threshold = torch.load(run_dir / "checkpoints/last.ckpt", weights_only=True)["state_dict"]["val_threshold"]
        assert predictions["threshold"].unique() == pytest.approx([float(threshold)], abs=1e-6)
        table = protocol_table(Predictions(predictions["p_fake"].to_numpy(), predictions["label"].to_numpy(),
                                           predictions["generator"].to_numpy(object)), float(threshold))
        assert scalars["hp/test_mean_generator_acc"][-1] == pytest.approx(table[-1]["acc"], abs=1e-5)
        assert set(predictions["format"]) == {"png", "jpeg"} and predictions["path"].str.endswith(".png").all()


@pytest.mark.slow
def test_fit_rerun_gets_a_new_directory_and_test_scores_its_best_checkpoint(ablation_grid, workspace):
    """Bugs caught: a rerun adding events to an old run; `test` scoring the wrong (or an untrained) model;
    a second `test` adding a second copy of the table to the text tab."""
    run(readme_line("python -m cli fit"), workspace)
    rerun = workspace / "runs/deua/both-seed0-r2"
    assert (rerun / "checkpoints/last.ckpt").is_file()
    assert len(list((workspace / "runs/deua/both-seed0").glob("events.out.tfevents.*"))) == 2  # its fit + test
    result = run(readme_line("python -m cli test"), workspace)
    assert "run directory runs/deua/both-seed0-r2, checkpoint runs/deua/both-seed0-r2/checkpoints/epoch=" in result.stdout
    assert "### DEUADetector, protocol raw" in result.stdout and "format-only reference" in result.stdout
    assert "Confounded" in result.stdout
    best = rerun / "checkpoints" / result.stdout.split("checkpoints/")[1].split()[0]
    model = DEUADetector.load_from_checkpoint(best).eval()
    local = yaml.safe_load((workspace / "local.yaml").read_text())["data"]["init_args"]
    data = FeatureCacheDataModule(features=["deu", "clip_layer3"], train=local["train"], test=local["test"],
                                  val_fraction=0.25, batch_size=64, num_workers=0)
    data.setup("test")
    with torch.no_grad():
        batches = list(data.test_dataloader())
        expected = torch.cat([model(batch).logits.softmax(-1)[:, 1] for batch in batches]).numpy()
        rows = torch.cat([batch["row"] for batch in batches]).numpy()
    written = pd.read_csv(rerun / "test_predictions.csv").set_index("row").loc[rows, "p_fake"].to_numpy()
    np.testing.assert_allclose(written, expected, rtol=1e-4, atol=1e-6)

    # A second test of the same run (on DRCT-style data, claiming the paper row): its events replace the first's.
    result = run(f"{readme_line('python -m cli test')} --config drct.yaml --paper_row deua", workspace)
    accumulator = PluginAccumulator(str(rerun))
    accumulator.Reload()
    assert len(accumulator.Tensors("protocol_table/text_summary")) == 1
    table = pd.read_csv(rerun / "protocol_table.csv")
    assert "MSCOCO" not in set(table["generator"])  # DRCT's reals are a class, not a generator
    predictions = pd.read_csv(rerun / "test_predictions.csv")
    real = predictions["generator"] == "MSCOCO"
    accuracies = []
    for generator in ("ldm", "sdxl"):
        mine = predictions[real | (predictions["generator"] == generator)]
        accuracies.append((mine["prediction"] == mine["label"]).mean())
    assert scalars_of(rerun)["hp/test_mean_generator_acc"][-1] == pytest.approx(np.mean(accuracies), abs=1e-5)
    assert not any(tag.endswith("/MSCOCO") for tag in scalars_of(rerun))
    markdown = (rerun / "protocol_table.md").read_text()
    assert "published" not in markdown.split("\n\n")[1]  # no published column in the table itself
    assert "Published deua (DEUA, GenImage mean ACC) not shown" in markdown
    assert "backbone='frozen' (paper: 'finetune')" in markdown and "layout drct (paper: genimage)" in markdown


@pytest.mark.slow
def test_cross_generator_matrix(workspace):
    """Bugs caught: matrix rows named by config file instead of the generator trained on; cells not the
    mean over seeds of each run's protocol-table numbers; a missing row mean."""
    grid = run(readme_line("python -m cli grid configs/matrix/genimage"), workspace)
    assert "grid: 4/4 runs (100%)" in grid.stdout
    result = run(readme_line("python -m cli compare runs/deua_matrix --matrix"), workspace)
    stats = pd.read_csv(workspace / "runs/deua_matrix/matrix.csv")
    assert set(stats["train"]) == {SDV4, GLIDE} and set(stats["test"]) == {SDV4, GLIDE, "mean"}
    for train, version in ((SDV4, "sdv4"), (GLIDE, "glide")):
        tables = [pd.read_csv(workspace / f"runs/deua_matrix/{version}-seed{seed}/protocol_table.csv")
                  .set_index("generator") for seed in (0, 1)]
        for test, key in ((SDV4, SDV4), (GLIDE, GLIDE), ("mean", "average")):
            cell = stats[(stats["train"] == train) & (stats["test"] == test)].iloc[0]
            assert cell["acc_mean"] == pytest.approx(np.mean([t.loc[key, "acc"] for t in tables]))
            assert cell["auroc_std"] == pytest.approx(np.std([t.loc[key, "auroc"] for t in tables], ddof=1))
            assert cell["seeds"] == 2
    printed = [[cell.strip() for cell in line.strip("|").split("|")] for line in result.stdout.splitlines()
               if line.startswith("|")]
    assert printed[0] == ["train \\ test", "seeds", *sorted([SDV4, GLIDE]), "mean"]
    assert sorted(cells[:2] for cells in printed[2:]) == [[SDV4, "2"], [GLIDE, "2"]]


@pytest.mark.slow
def test_ddp_fit_makes_one_run_directory(workspace, tmp_path):
    """Bug caught: a DDP rank re-executing `fit` after rank 0 created `both-seed0` choosing `both-seed0-r2`,
    splitting one run over two directories."""
    shutil.copytree(workspace / "configs", tmp_path / "configs")
    shutil.copy(workspace / "local.yaml", tmp_path / "local.yaml")
    run(f"{readme_line('python -m cli fit')} --trainer.devices 2 --trainer.strategy ddp --trainer.max_epochs 1",
        tmp_path, fresh_process=True)  # Lightning's DDP launcher re-executes the command line per rank
    runs = sorted(p.name for p in (tmp_path / "runs/deua").iterdir())
    assert runs == ["both-seed0"]
    assert (tmp_path / "runs/deua/both-seed0/checkpoints/last.ckpt").is_file()


def test_plain_progress_lines_are_rate_limited(capsys):
    """Bugs caught: a line per item (log spam) or none until the end (a silent SLURM log)."""
    from core.progress import report_progress

    assert list(report_progress(range(5), 5, "tars", "tars", every_s=3600, always=True)) == [0, 1, 2, 3, 4]
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(",")[0] for line in lines] == ["tars: 1/5 tars (20%)", "tars: 5/5 tars (100%)"]
    assert "ETA" in lines[0] and "tars/s" in lines[0]
    list(report_progress(range(3), None, "images", every_s=0, always=True))
    assert capsys.readouterr().out.splitlines()[-1].startswith("images: 3 items,")


def test_progress_lines_from_two_threads_stay_whole_lines_in_a_pipe():
    """precompute's writer thread prints a line per tar while the Trainer prints batch lines, into SLURM's pipe.
    Catches `print`'s two writes (text, then newline) merging the two threads' lines (`predict: 2/3 batches ...
    writing x.zarr: 4/6 rows ...` and an empty line): with `print` this script gave ~10,000 broken lines in 40,000."""
    script = ("import threading\n"
              "from core.progress import print_line\n"
              "def lines(name):\n"
              "    for k in range(10000):\n"
              "        print_line(f'{name}: line {k}')\n"
              "threads = [threading.Thread(target=lines, args=(name,)) for name in ('writer', 'trainer')]\n"
              "[thread.start() for thread in threads]\n"
              "[thread.join() for thread in threads]\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60).stdout
    lines = out.splitlines()
    for name in ("writer", "trainer"):
        assert [line for line in lines if line.startswith(f"{name}: ")] == [f"{name}: line {k}" for k in range(10000)]
    assert len(lines) == 20000, [line for line in lines if not line.endswith(tuple("0123456789"))][:3]


def test_bad_config_key_and_feature_name_give_their_line_first(workspace):
    """Bugs caught: a config-key typo printing ~50 lines of usage before the line naming it; a `features` typo
    (`clip_layer4`) reported as a missing visual_channels/grid_size instead of the unknown feature and the
    stored choices."""
    fit = readme_line("python -m cli fit")
    result = run(f"{fit} --model.init_args.lrr 0.1", workspace, check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) <= 2, result.stderr
    assert lines[0].startswith("python -m cli fit: --model.init_args.lrr: not an option of DEUADetector "
                               "(did you mean 'lr'?); its options: guidance,"), lines[0]
    result = run(f"{fit} --data.init_args.features [deu,clip_layer4]", workspace, check=False)
    errors = [line for line in result.stderr.splitlines() if line.startswith("python -m cli fit:")]
    assert result.returncode != 0 and len(errors) == 1, result.stderr[-2000:]
    assert "features: 'clip_layer4' (did you mean 'clip_layer3'?) not in feature store" in errors[0]
    assert "choose from ['" in errors[0] and "visual_channels" not in result.stderr
