"""configs/deua.yaml and configs/lare2.yaml end to end: a tiny-model feature cache, `python -m cli fit/test`, grid."""

from __future__ import annotations

import csv
import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cli.__main__ import main
from cli.plain_commands import grid
from feature_cache.provenance import ExtractorProvenance
from feature_cache.store import FeatureStore
from lightning_modules.detectors import DEUADetector, LaRE2Detector
from core.seeding import image_generator
from lightning_modules.feature_extractor import FeatureExtractor
from lightning_modules.laplace_fit import LaplaceFit
from lightning_modules.uncertainty import conv3x3_ggn_sums
from reports.evaluation import paper_departures

from feature_cache_fakes import RAW_PROTOCOL, make_shard_dir, marker_image, write_store

REPO = Path(__file__).resolve().parents[1]
RES, T, N, SHARD = 64, 200, 2, 8
GENERATORS = ["adm", "sdv4"]


def images(rows: list[int]) -> torch.Tensor:
    """The shard directory's images of these rows, in [-1, 1]."""
    return torch.stack([torch.from_numpy(marker_image(r, RES)).permute(2, 0, 1).float() / 127.5 - 1 for r in rows])


def build_store(path: Path, extractor: FeatureExtractor, num_rows: int) -> str:
    """A feature store written the way phase 1 writes one: FeatureExtractor outputs over a shard dir, tar by tar."""
    make_shard_dir(path.parent / f"{path.stem}_shards", num_rows, SHARD, image_size=RES, generators=GENERATORS)
    keys = [f"img{r:05d}" for r in range(num_rows)]

    def features(rows: np.ndarray) -> dict[str, np.ndarray]:
        rows = rows.tolist()
        batch = {"image": images(rows), "key": [keys[r] for r in rows],
                 "sha256": [hashlib.sha256(keys[r].encode()).hexdigest() for r in rows],
                 "row": torch.tensor(rows), "label": torch.tensor(rows) % 2,
                 "generator": torch.zeros(len(rows), dtype=torch.long),
                 "shard_index": torch.zeros(len(rows), dtype=torch.long), "error": [""] * len(rows)}
        with torch.no_grad():
            out = extractor.predict_step(batch, 0)
        return {name: out[name].numpy() for name in extractor.outputs}

    specs = extractor.feature_specs(RES, {"guidance": ("float32", "zstd"), "clip": ("float32", "zstd")})
    write_store(path, features, specs, GENERATORS, num_rows=num_rows, shard_size=SHARD, keys=keys,
                labels=[r % 2 for r in range(num_rows)], generators=[(r // 2) % 2 for r in range(num_rows)],
                shards=f"{path.stem}_shards", pixels={"resolution": RES, **RAW_PROTOCOL}, identity=path.stem,
                extractor=ExtractorProvenance(**extractor.provenance()))
    return str(path)


@pytest.fixture(scope="module")
def tiny_cache(tiny_model_paths: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Train and test stores computed with the tiny SD and CLIP models (LaRE, DEU, CLIP layer3 + pooled)."""
    root = tmp_path_factory.mktemp("tiny_cache")
    fit = LaplaceFit(str(tiny_model_paths["sd"]), output=str(root / "posterior.pt"), timestep=T, num_noises=N)
    generators = [image_generator(0, "diffusion_noise", f"c{k}") for k in range(4)]
    phi = fit.diffusion(images([100, 101, 102, 103]), generators).phi.flatten(0, 1)
    fit.save_posterior(conv3x3_ggn_sums(phi), float(phi.shape[0] * 64), 1.0, 4, RES)
    extractor = FeatureExtractor(str(tiny_model_paths["sd"]), posterior=str(root / "posterior.pt"),
                                 clip=str(tiny_model_paths["clip"]), timestep=T, num_noises=N,
                                 outputs=["lare", "deu", "clip_layer3", "clip_pooled"])
    return {"train": build_store(root / "train.zarr", extractor, 24),
            "test": build_store(root / "test.zarr", extractor, 16)}


def local_config(path: Path, cache: dict[str, str], runs: Path) -> Path:
    """What a user's local.yaml holds: store paths, tiny-model dimensions, a short CPU schedule."""
    path.write_text(yaml.safe_dump({
        "trainer": {"accelerator": "cpu", "max_epochs": 2,
                    "logger": {"init_args": {"save_dir": str(runs)}}},
        "model": {"init_args": {"visual_channels": 128, "num_heads": 4}},
        "data": {"init_args": {"train": [cache["train"]], "test": [cache["test"]], "val_fraction": 0.25,
                               "batch_size": 6, "num_workers": 0}}}))
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_lare2_config_fits_and_tests_through_the_cli(tiny_cache, tmp_path):
    local = local_config(tmp_path / "local.yaml", tiny_cache, tmp_path / "runs")
    pooled = tmp_path / "pooled.yaml"
    pooled.write_text("model:\n  init_args:\n    pooled_dim: 32\n")
    configs = ["--config", str(REPO / "configs/lare2.yaml"), "--config", str(local), "--config", str(pooled)]
    main(["fit", *configs])
    run = tmp_path / "runs" / "lare2" / "both-seed0"
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "config.yaml").is_file()
    main(["test", *configs, "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    rows = read_csv(run / "test_predictions.csv")
    assert len(rows) == 16 and {r["generator"] for r in rows} == set(GENERATORS)
    assert all(0.0 <= float(r["p_fake"]) <= 1.0 for r in rows)


@pytest.mark.slow
def test_deua_finetunes_clip_on_the_stores_images(tiny_cache, tiny_model_paths, tmp_path):
    local = local_config(tmp_path / "local.yaml", tiny_cache, tmp_path / "runs")
    finetune = tmp_path / "finetune.yaml"
    finetune.write_text(yaml.safe_dump({
        "trainer": {"max_epochs": 1},
        "model": {"init_args": {"backbone": "finetune", "clip": str(tiny_model_paths["clip"])}},
        "data": {"init_args": {"features": ["deu"], "images": True}}}))
    configs = ["--config", str(REPO / "configs/deua.yaml"), "--config", str(local), "--config", str(finetune)]
    main(["fit", *configs])
    run = tmp_path / "runs" / "deua" / "both-seed0"
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert any(name.startswith("backbone.layer3") for name in checkpoint["state_dict"])
    main(["test", *configs, "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    assert len(read_csv(run / "test_predictions.csv")) == 16


@pytest.mark.slow
def test_deua_grid_runs_each_row_as_fit_then_test(tiny_cache, tmp_path):
    rows = tmp_path / "deua"
    rows.mkdir()
    for name in ("baseline", "both"):
        (rows / f"{name}.yaml").write_text((REPO / "configs/ablations/deua" / f"{name}.yaml").read_text())
    local = local_config(tmp_path / "local.yaml", tiny_cache, tmp_path / "runs")
    run_dirs = grid(rows, base=REPO / "configs/deua.yaml", extra=[local])
    assert run_dirs == [tmp_path / "runs" / "deua" / "baseline-seed0", tmp_path / "runs" / "deua" / "both-seed0"]
    for run in run_dirs:
        assert len(read_csv(run / "test_predictions.csv")) == 16
        assert len(read_csv(run / "val_predictions.csv")) == 6  # val_fraction 0.25 of 24 train rows
    saved = yaml.safe_load((run_dirs[0] / "config.yaml").read_text())["model"]["init_args"]
    assert saved["guidance"] == [] and saved["asym_weight"] == 0.0


def test_grid_dry_run_names_every_row_and_seed(capsys):
    grid(REPO / "configs/ablations/lare2", dry_run=True)
    printed = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("grid: ")]  # progress
    assert len(printed) == 8  # four rows, fit and test each
    assert printed[1].endswith("configs/ablations/lare2/baseline.yaml --seed_everything 0")
    assert printed[1].split()[3] == "test"  # test finds the row's fitted run itself
    assert all(line.startswith("python -m cli ") for line in printed)
    assert np.array_equal([line.split()[3] for line in printed[::2]], ["fit"] * 4)


def test_grid_names_a_row_that_does_not_resolve_in_one_line(tmp_path, capsys):
    """Bugs caught: a row's bad key surfacing as a traceback or a usage block (or only once the row's run starts,
    after other rows trained), and the error not naming which row's configs failed."""
    rows = tmp_path / "lare2"
    rows.mkdir()
    (rows / "a_good.yaml").write_text((REPO / "configs/ablations/lare2/baseline.yaml").read_text())
    (rows / "b_typo.yaml").write_text(yaml.safe_dump({"model": {"init_args": {"lrr": 0.1}}}))
    with pytest.raises(SystemExit) as exited:
        main(["grid", str(rows), "--base", str(REPO / "configs/lare2.yaml"), "--dry_run", "true"])
    message = str(exited.value.code)
    assert message.startswith("python -m cli grid: ") and "\n" not in message, message
    assert "b_typo.yaml does not resolve: " in message and "--model.init_args.lrr: not an option of" in message
    assert "python -m cli fit" not in capsys.readouterr().out  # no run was listed before the refusal


def _printed_model_settings(configs: list[str], capsys) -> dict:
    """The model's init_args as LightningCLI resolves the stacked configs (defaults included), without building it."""
    with pytest.raises(SystemExit):
        main(["fit", *[arg for name in configs for arg in ("--config", str(REPO / "configs" / name))],
              "--print_config"])
    return yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]


@pytest.mark.parametrize("name,detector", [("deua", DEUADetector), ("lare2", LaRE2Detector)])
def test_paper_configs_hold_the_papers_setting_and_the_fast_mode_does_not(name, detector, capsys):
    """configs/<name>_paper.yaml stacked on the fast config resolves to the detector's `paper_setting` (so its test
    table may print the published ACC), and the fast config alone departs from it at least in the backbone. Catches
    a paper config that no longer matches the code's defaults, or a fast config printed beside published numbers."""
    paper = _printed_model_settings([f"{name}.yaml", f"{name}_paper.yaml"], capsys)
    assert {key: paper[key] for key in detector.paper_setting} == detector.paper_setting
    fast = _printed_model_settings([f"{name}.yaml"], capsys)
    assert fast["backbone"] == "frozen"
    model = detector(**{**fast, "visual_channels": 16, "pooled_dim": 8} if name == "lare2" else
                     {**fast, "visual_channels": 16})
    departures = paper_departures(model.hparams, detector.paper_setting, clip_input=None)
    assert any(departure.startswith("backbone='frozen'") for departure in departures)


@pytest.mark.slow
def test_fit_and_test_open_each_store_once(tiny_cache, tmp_path, monkeypatch):
    """Catches a run that re-opens its stores (the CLI's links, setup, the readers, `test`'s checkpoint check and the
    protocol report each opening their own copy: 4-7 opens per store before)."""
    opens: Counter[str] = Counter()
    open_store = FeatureStore.open.__func__

    def counted(cls, path, writable=False):
        opens[str(path)] += 1
        return open_store(cls, path, writable)

    monkeypatch.setattr(FeatureStore, "open", classmethod(counted))
    configs = ["--config", str(REPO / "configs/deua.yaml"),
               "--config", str(local_config(tmp_path / "local.yaml", tiny_cache, tmp_path / "runs"))]
    main(["fit", *configs])
    assert dict(opens) == {tiny_cache["train"]: 1, tiny_cache["test"]: 1}
    opens.clear()
    main(["test", *configs])
    assert dict(opens) == {tiny_cache["train"]: 1, tiny_cache["test"]: 1}
