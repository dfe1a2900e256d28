"""DEUA and LaRE² detectors: gradients reach every weight, guidance is what makes them learn, outputs are saved."""

from __future__ import annotations

import csv

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, Dataset

from lightning_modules.detectors import DEUADetector, LaRE2Detector
from reports.callbacks import PredictionTables, detector_callbacks
from reports.evaluation import Predictions

CHANNELS, POOLED, GRID, MAP = 16, 8, 14, 8
GENERATORS = ["sdv4", "glide"]


class SyntheticCache(Dataset):
    """Rows in the FeatureCacheDataModule batch format; fakes differ from reals only in the guidance maps.

    CLIP maps are label-independent noise (non-negative, like post-ReLU layer3); the DEU and LaRE maps
    of fakes have their mean shifted by `shift`. A detector can beat chance only through guidance.
    `map_scale` multiplies the guidance maps: 1e-3 puts them at DEU's level (mean ~7e-4, spatial
    variance ~1e-7), where an absolute eps would flatten them.
    """

    def __init__(self, n: int, seed: int, shift: float = 0.5, image_size: int | None = None,
                 map_scale: float = 1.0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.label = torch.arange(n) % 2
        self.generator = (torch.arange(n) // 2) % len(GENERATORS)
        shifted = self.label.view(n, 1, 1, 1).float() * shift
        self.tensors = {
            "clip_layer3": torch.rand(n, CHANNELS, GRID, GRID, generator=g),
            "clip_pooled": torch.randn(n, POOLED, generator=g),
            "deu": (torch.rand(n, 4, MAP, MAP, generator=g) + shifted) * map_scale,
            "lare": (torch.rand(n, 4, MAP, MAP, generator=g) + shifted) * map_scale,
        }
        if image_size is not None:
            self.tensors["image"] = torch.rand(n, 3, image_size, image_size, generator=g) * 2 - 1

    def __len__(self) -> int:
        return len(self.label)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**{k: v[i] for k, v in self.tensors.items()}, "label": self.label[i],
                "generator": self.generator[i], "row": torch.tensor(i)}


class SyntheticDataModule(pl.LightningDataModule):
    """Train/val/test splits of SyntheticCache, offering generator names like the real datamodule."""

    generator_names = GENERATORS

    def __init__(self, n_train: int = 384, n_eval: int = 128, batch_size: int = 32, image_size: int | None = None,
                 map_scale: float = 1.0):
        super().__init__()
        self.splits = {split: SyntheticCache(n, seed, image_size=image_size, map_scale=map_scale)
                       for seed, (split, n) in enumerate([("train", n_train), ("val", n_eval), ("test", n_eval)])}
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["train"], self.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(0))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["val"], self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["test"], self.batch_size)


def _trainer(tmp_path, callbacks: list[pl.Callback] = (), **kwargs) -> pl.Trainer:
    """A quiet CPU Trainer with the reports `python -m cli` attaches to every detector run."""
    settings = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0)
    return pl.Trainer(**{**settings, **kwargs}, callbacks=[*detector_callbacks(), *callbacks])


def _detector(name: str, guidance: list[str], backbone: str = "frozen", clip: str | None = None,
              channels: int = CHANNELS, pooled: int = POOLED, lr: float = 1e-4):
    if name == "deua":
        return DEUADetector(guidance=guidance, backbone=backbone, clip=clip, visual_channels=channels, lr=lr)
    return LaRE2Detector(guidance=guidance, backbone=backbone, clip=clip, visual_channels=channels, pooled_dim=pooled,
                         spatial=bool(guidance), channel=bool(guidance), lr=lr)


class GradientProbe(pl.Callback):
    """Records, before the first optimiser step, which parameters got no (or an all-zero) gradient."""

    def __init__(self) -> None:
        self.missing: list[str] | None = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.missing is None:
            self.missing = [n for n, p in pl_module.named_parameters()
                            if p.grad is None or not torch.count_nonzero(p.grad)]


@pytest.mark.parametrize("backbone", ["frozen", "finetune"])
@pytest.mark.parametrize("name,guidance", [("deua", ["deu"]), ("deua", []), ("deua", ["deu", "lare"]),
                                           ("lare2", ["lare"]), ("lare2", [])])
def test_every_parameter_gets_a_gradient_in_one_step(name, guidance, backbone, tiny_model_paths, tmp_path):
    if backbone == "finetune":  # the tiny CLIP: layer3 128 channels, pooled 32, input 224
        model = _detector(name, guidance, "finetune", str(tiny_model_paths["clip"]), channels=128, pooled=32)
        # open_clip zero-initialises each residual branch's last BN, so a random tower's branches pass no
        # gradient at step one; give the BNs the non-zero scales a trained tower has.
        for module in model.backbone.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                torch.nn.init.uniform_(module.weight, 0.5, 1.5)
        data = SyntheticDataModule(n_train=4, n_eval=4, batch_size=4, image_size=64)
    else:
        model = _detector(name, guidance)
        data = SyntheticDataModule(n_train=8, n_eval=8, batch_size=8)
    probe = GradientProbe()
    _trainer(tmp_path, max_steps=1, limit_val_batches=1, callbacks=[probe]).fit(model, data)
    assert probe.missing == []
    if backbone == "finetune":
        assert any(n.startswith("backbone.layer1") for n, _ in model.named_parameters())


@pytest.mark.parametrize("name,guidance", [("deua", ["deu"]),  # LaRE²'s 4 epochs take 16-35 s: the slow lane's
                                           pytest.param("lare2", ["lare"], marks=pytest.mark.slow)])
def test_guidance_separates_what_the_clip_baseline_cannot(name, guidance, tmp_path):
    accuracy = {}
    for run_guidance in (guidance, []):
        pl.seed_everything(0, verbose=False)
        model = _detector(name, run_guidance, lr=3e-3)
        trainer = _trainer(tmp_path, max_epochs=4)
        trainer.fit(model, SyntheticDataModule(n_train=256))
        accuracy[bool(run_guidance)] = trainer.callback_metrics["val_acc"].item()
        if run_guidance:  # per-generator metrics named from the datamodule's generator_names
            assert {f"val_acc/{g}" for g in GENERATORS} <= set(trainer.callback_metrics)
    assert accuracy[True] > 0.95, accuracy
    assert accuracy[False] < 0.65, accuracy


_UNIT_SCALE_AUROC: dict[str, float] = {}


def _val_auroc(name: str, guidance: list[str], map_scale: float, tmp_path) -> float:
    pl.seed_everything(0, verbose=False)
    model = _detector(name, guidance, lr=3e-3)
    trainer = _trainer(tmp_path, max_epochs=3)
    trainer.fit(model, SyntheticDataModule(n_train=192, n_eval=96, map_scale=map_scale))
    return trainer.callback_metrics["val_auroc"].item()


@pytest.mark.parametrize("map_scale", [1e-9, 1e-6, 1e-3, 1e-1])
@pytest.mark.parametrize("name,guidance", [("deua", ["deu"]), ("lare2", ["lare"])])
def test_detectors_learn_the_same_at_every_map_magnitude(name, guidance, map_scale, tmp_path):
    """The same guidance signal at DEU/MI-like magnitudes (1e-9..1e-1) must give the validation AUROC it gives at
    unit scale. Catches an absolute eps in the map normalisation (BatchNorm's 1e-5 took DEUA from 1.00 to 0.58 and
    LaRE² from 1.00 to 0.47 at 1e-3) or any fixed constant that is large or small only relative to one scale."""
    if name not in _UNIT_SCALE_AUROC:
        _UNIT_SCALE_AUROC[name] = _val_auroc(name, guidance, 1.0, tmp_path / "unit")
    assert _UNIT_SCALE_AUROC[name] > 0.95
    assert _val_auroc(name, guidance, map_scale, tmp_path) == pytest.approx(_UNIT_SCALE_AUROC[name], abs=0.01)


@pytest.mark.parametrize("mode", ["log", "standard"])
def test_guidance_normalisation_is_scale_free_and_saved_with_the_checkpoint(mode, tmp_path):
    """Standardised maps are the same for maps × c, c in 1e-9..1e-1, and have unit spread on the fitting rows; the
    statistics survive a checkpoint round trip. Catches an absolute floor/eps, statistics not stored as buffers
    (predict would see another scale), or statistics that are recomputed per batch."""
    maps = SyntheticCache(64, 0).tensors["deu"]
    reference = None
    for scale in (1.0, 1e-9, 1e-6, 1e-3, 1e-1):
        model = DEUADetector(guidance=["deu"], visual_channels=CHANNELS, guidance_norm=mode)
        model.fit_guidance_norm([{"deu": maps[:40] * scale}])
        out = model.guidance_map({"deu": maps[40:] * scale}, (GRID, GRID))
        if reference is None:
            reference = out
            fitted = model.guidance_map({"deu": maps[:40]}, (GRID, GRID))
            torch.testing.assert_close(fitted.std(dim=(0, 2, 3)), torch.ones(4), atol=0.02, rtol=0)
        torch.testing.assert_close(out, reference, atol=1e-4, rtol=1e-4)
    trainer = _trainer(tmp_path, max_epochs=0)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    loaded = DEUADetector.load_from_checkpoint(tmp_path / "model.ckpt", visual_channels=CHANNELS)
    torch.testing.assert_close(loaded.guidance_map({"deu": maps[40:] * 1e-1}, (GRID, GRID)), reference,
                               atol=1e-4, rtol=1e-4)


def test_hparams_hold_the_subclass_and_the_base_arguments(tmp_path):
    """A detector built directly (no CLI) saves its own arguments and the base's it passed through **kwargs, and
    `load_from_checkpoint` rebuilds it from them alone. Catches a base that saves only its own frame (load would
    build the default head: num_heads 8), a subclass argument lost on the way, or `pooled_dim` kept for a detector
    that never reads it."""
    model = DEUADetector(guidance=["lare"], num_heads=2, asym_weight=0.0, visual_channels=CHANNELS, lr=3e-3)
    assert dict(model.hparams) == {
        "guidance": ["lare"], "backbone": "frozen", "clip": None, "visual_channels": CHANNELS, "grid_size": GRID,
        "lr": 3e-3, "guidance_norm": "log", "norm_rows": 2048, "guidance_channels": None,
        "num_heads": 2, "guidance_dim": 64, "asym_weight": 0.0, "margin_real": 0.6, "margin_fake": 1.0}
    trainer = _trainer(tmp_path, max_epochs=0)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    loaded = DEUADetector.load_from_checkpoint(tmp_path / "model.ckpt")
    assert dict(loaded.hparams) == dict(model.hparams) and loaded.visual_attention.num_heads == 2
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_guidance_normalisation_errors_name_the_problem():
    """A negative map under `log` names the map and the way out; an unfitted model says how to get statistics."""
    model = _detector("lare2", ["lare"])
    with pytest.raises(RuntimeError, match="no statistics: train the detector"):
        model.guidance_map(SyntheticCache(2, 0).tensors, (GRID, GRID))
    with pytest.raises(ValueError, match="guidance map 'lare' has negative values.*guidance_norm standard"):
        model.fit_guidance_norm([{"lare": torch.randn(4, 4, MAP, MAP)}])


def test_fit_stops_on_a_non_finite_loss(tmp_path):
    """Catches `fit` training on a NaN loss and saving a poisoned checkpoint with rc=0 (here: one NaN feature row;
    equally a diverging learning rate)."""
    data = SyntheticDataModule(n_train=64, n_eval=32)
    data.splits["train"].tensors["clip_layer3"][5] = float("nan")
    with pytest.raises(ValueError, match=r"DEUADetector: training loss is nan at step \d+"):
        _trainer(tmp_path, max_epochs=1).fit(_detector("deua", []), data)


def test_test_predictions_are_kept_and_written_for_the_evaluation_step(tmp_path):
    model = _detector("deua", ["deu"], lr=3e-3)
    data = SyntheticDataModule()
    logger = TensorBoardLogger(tmp_path, name="deua", version="run", default_hp_metric=False)
    trainer = _trainer(tmp_path, max_epochs=1, logger=logger)
    trainer.fit(model, data)
    trainer.test(model, data)
    n = len(data.splits["test"])
    kept = next(c for c in trainer.callbacks if isinstance(c, PredictionTables)).test_predictions
    assert torch.equal(kept["row"], torch.arange(n))
    assert torch.equal(kept["label"], data.splits["test"].label)
    assert ((kept["p_fake"] >= 0) & (kept["p_fake"] <= 1)).all()
    saved = Predictions.from_csv(tmp_path / "deua" / "run" / "test_predictions.csv")
    assert len(saved.label) == n and set(saved.generator.tolist()) == set(GENERATORS)
    assert (tmp_path / "deua" / "run" / "val_predictions.csv").is_file()
    for key in ("hp/test_acc", "hp/test_mean_generator_acc", "test_real_acc", "test_fake_acc", "test_ap/glide"):
        assert key in trainer.callback_metrics, key


def test_lare2_head_bias_reaches_its_own_head_and_the_mean_key():
    """With query/key projections zeroed the attention weights are softmax(bias) alone: each head's output must be
    softmax(its own bias over [mean; positions]) @ its values. Catches a bias routed to the wrong head (a
    head-major/batch-major mix-up), a missing mean key (196 keys) or a mean key without its own bias."""
    torch.manual_seed(0)
    heads, dim = 4, 3
    model = LaRE2Detector(guidance=["lare"], visual_channels=CHANNELS, pooled_dim=POOLED, num_heads=heads,
                          head_dim=dim).eval()
    batch = {k: v[:3] for k, v in SyntheticCache(3, 0).tensors.items()}
    model.fit_guidance_norm([batch])
    pool = model.attention
    with torch.no_grad():
        pool.query.weight.zero_()
        pool.key.weight.zero_()
    captured = {}
    pool.out.register_forward_pre_hook(lambda m, args: captured.update(attended=args[0]))
    model(batch)
    tokens = batch["clip_layer3"].flatten(2).transpose(1, 2)
    sequence = torch.cat([tokens.mean(1, keepdim=True), tokens], 1) + pool.position
    values = pool.value(sequence).view(3, GRID * GRID + 1, heads, dim)
    bias = model.head_bias(model.guidance_map(batch, (GRID, GRID))).flatten(2)  # (B, heads, N)
    bias = torch.cat([bias.mean(2, keepdim=True), bias], 2)
    for h in range(heads):
        expected = torch.einsum("bn,bnd->bd", bias[:, h].softmax(-1), values[:, :, h])
        torch.testing.assert_close(captured["attended"][:, 0, h * dim:(h + 1) * dim], expected,
                                   rtol=1e-5, atol=1e-6)


def test_configuration_errors_are_one_clear_line(tiny_model_paths):
    with pytest.raises(ValueError, match="visual_channels=1024"):
        DEUADetector(backbone="finetune", clip=str(tiny_model_paths["clip"]))
    with pytest.raises(ValueError, match="needs the CLIP weights"):
        LaRE2Detector(backbone="finetune")
    with pytest.raises(ValueError, match="refinement needs guidance"):
        LaRE2Detector(guidance=[])
    with pytest.raises(KeyError, match="unknown guidance map 'deux'; registered maps: .*'deu'"):
        DEUADetector(guidance=["deux"])
    with pytest.raises(KeyError, match="'deu'.*request it from the datamodule"):
        DEUADetector(visual_channels=CHANNELS)({"clip_layer3": torch.rand(2, CHANNELS, GRID, GRID)})


@pytest.mark.slow
def test_two_rank_ddp_gathers_every_prediction(tmp_path):
    """ddp_spawn on CPU/gloo: metric states are gathered, and rank 0 writes all test rows (no collective hangs)."""
    data = SyntheticDataModule(n_train=32, n_eval=30, batch_size=8)
    logger = TensorBoardLogger(tmp_path, name="lare2", version="ddp", default_hp_metric=False)
    trainer = _trainer(tmp_path, max_epochs=1, devices=2, strategy="ddp_spawn", logger=logger)
    model = _detector("lare2", ["lare"])
    trainer.fit(model, data)
    trainer.test(model, data)
    with open(tmp_path / "lare2" / "ddp" / "test_predictions.csv", newline="") as handle:
        saved = list(csv.DictReader(handle))
    assert sorted(int(r["row"]) for r in saved) == list(range(30))
    assert all(int(r["label"]) == int(r["row"]) % 2 for r in saved)
    assert (tmp_path / "lare2" / "ddp" / "val_predictions.csv").is_file()
