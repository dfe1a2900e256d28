"""DEUA and LaRE² detectors: gradients reach every weight, guidance is what makes them learn, outputs are saved."""

from __future__ import annotations

import csv

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, Dataset

from lightning_modules.detectors import DEUADetector, LaRE2Detector
from reports.evaluation import Predictions

CHANNELS, POOLED, GRID, MAP = 16, 8, 14, 8
GENERATORS = ["sdv4", "glide"]


class SyntheticCache(Dataset):
    """Rows in the FeatureCacheDataModule batch format; fakes differ from reals only in the guidance maps.

    CLIP maps are label-independent noise (non-negative, like post-ReLU layer3); the DEU and LaRE maps
    of fakes have their mean shifted by `shift`. A detector can beat chance only through guidance.
    """

    def __init__(self, n: int, seed: int, shift: float = 0.5, image_size: int | None = None) -> None:
        g = torch.Generator().manual_seed(seed)
        self.label = torch.arange(n) % 2
        self.generator = (torch.arange(n) // 2) % len(GENERATORS)
        shifted = self.label.view(n, 1, 1, 1).float() * shift
        self.tensors = {
            "clip_layer3": torch.rand(n, CHANNELS, GRID, GRID, generator=g),
            "clip_pooled": torch.randn(n, POOLED, generator=g),
            "deu": torch.rand(n, 4, MAP, MAP, generator=g) + shifted,
            "lare": torch.rand(n, 4, MAP, MAP, generator=g) + shifted,
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

    def __init__(self, n_train: int = 384, n_eval: int = 128, batch_size: int = 32, image_size: int | None = None):
        super().__init__()
        self.splits = {"train": SyntheticCache(n_train, 0, image_size=image_size),
                       "val": SyntheticCache(n_eval, 1, image_size=image_size),
                       "test": SyntheticCache(n_eval, 2, image_size=image_size)}
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["train"], self.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(0))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["val"], self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["test"], self.batch_size)


def _trainer(tmp_path, **kwargs) -> pl.Trainer:
    settings = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0)
    return pl.Trainer(**{**settings, **kwargs})


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


@pytest.mark.parametrize("name,guidance", [("deua", ["deu"]), ("lare2", ["lare"])])
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


def test_test_predictions_are_kept_and_written_for_the_evaluation_step(tmp_path):
    model = _detector("deua", ["deu"], lr=3e-3)
    data = SyntheticDataModule()
    logger = TensorBoardLogger(tmp_path, name="deua", version="run", default_hp_metric=False)
    trainer = _trainer(tmp_path, max_epochs=1, logger=logger)
    trainer.fit(model, data)
    trainer.test(model, data)
    n = len(data.splits["test"])
    assert torch.equal(model.test_predictions["row"], torch.arange(n))
    assert torch.equal(model.test_predictions["label"], data.splits["test"].label)
    assert ((model.test_predictions["p_fake"] >= 0) & (model.test_predictions["p_fake"] <= 1)).all()
    saved = Predictions.from_csv(tmp_path / "deua" / "run" / "test_predictions.csv")
    assert len(saved.label) == n and set(saved.generator.tolist()) == set(GENERATORS)
    assert (tmp_path / "deua" / "run" / "val_predictions.csv").is_file()
    for key in ("hp/test_acc", "hp/test_mean_generator_acc", "test_real_acc", "test_fake_acc", "test_ap/glide"):
        assert key in trainer.callback_metrics, key


def test_lare2_head_bias_reaches_its_own_head():
    """The float attn_mask rows are (batch, head) batch-major: check against attention written out by hand."""
    torch.manual_seed(0)
    model = LaRE2Detector(guidance=["lare"], visual_channels=CHANNELS, pooled_dim=POOLED, num_heads=4).eval()
    batch = {k: v[:3] for k, v in SyntheticCache(3, 0).tensors.items()}
    captured = {}
    model.attention.register_forward_hook(lambda m, args, kwargs, out: captured.update(out=out[0], **kwargs),
                                          with_kwargs=True)
    model.attention.register_forward_pre_hook(lambda m, args: captured.update(q=args[0], k=args[1]))
    model(batch)
    heads, dim = 4, CHANNELS // 4
    w_q, w_k, w_v = model.attention.in_proj_weight.chunk(3)
    b_q, b_k, b_v = model.attention.in_proj_bias.chunk(3)
    split = lambda x: x.view(x.shape[0], x.shape[1], heads, dim).transpose(1, 2)  # noqa: E731
    q, k, v = split(captured["q"] @ w_q.T + b_q), split(captured["k"] @ w_k.T + b_k), split(captured["k"] @ w_v.T + b_v)
    u = model.guidance_map(batch, (GRID, GRID))
    bias = model.head_bias(u).flatten(2)  # (B, heads, N)
    logits = q @ k.transpose(-1, -2) / dim ** 0.5 + bias[:, :, None, :]
    by_hand = (logits.softmax(-1) @ v).transpose(1, 2).reshape(3, 1, CHANNELS)
    by_hand = model.attention.out_proj(by_hand)
    torch.testing.assert_close(captured["out"], by_hand, rtol=1e-5, atol=1e-5)


def test_configuration_errors_are_one_clear_line(tiny_model_paths):
    with pytest.raises(ValueError, match="visual_channels=1024"):
        DEUADetector(backbone="finetune", clip=str(tiny_model_paths["clip"]))
    with pytest.raises(ValueError, match="needs the CLIP weights"):
        LaRE2Detector(backbone="finetune")
    with pytest.raises(ValueError, match="refinement needs guidance"):
        LaRE2Detector(guidance=[])
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
