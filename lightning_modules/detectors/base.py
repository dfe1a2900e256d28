"""What DEUA and LaRE² share: backbone modes, guidance-map gathering, overall metrics, optimiser.

A detector subclass states only its own `__init__` arguments (the base's pass through `**kwargs`), builds
its head in `configure_models` and says how it turns visual maps and guidance maps into logits and features
(`forward`) and how those are scored (`losses`), torchgeo's BaseTask shape. What a run reports the same way
for every detector (per-generator tables, the validation-chosen threshold, prediction CSVs, TensorBoard's
hparams tab) are callbacks in `reports/callbacks.py` that the CLI attaches: this module imports no `reports`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import lightning.pytorch as pl
import torch
from torch.nn import functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import (BinaryAccuracy, BinaryAUROC, BinaryAveragePrecision, BinaryRecall,
                                         BinarySpecificity)

from feature_cache.codecs import widen
from core.geometry import crop_to_boxes
from lightning_modules.detectors.guidance_norm import GuidanceNorm, GuidanceNormalizer
from lightning_modules.maps import map_channels
from lightning_modules.pretrained import ClipVisual, load_clip_rn50

GuidanceName = str  # any name in lightning_modules.maps.MAP_REGISTRY (checked at construction)
Backbone = Literal["frozen", "finetune"]
STAGES = ("train", "val", "test")
# Stored dtypes (feature_cache.codecs) of features that batches carry narrow; widened in the model's first op.
NARROW_DTYPES = {torch.float16: "float16", torch.int8: "int8_rowscale", torch.float8_e4m3fn: "float8_e4m3"}


@dataclass
class DetectorOutput:
    """Class logits (B, 2) and the feature vector the head saw (B, F), which DEUA's pair loss uses."""

    logits: torch.Tensor
    features: torch.Tensor


class DetectorBase(pl.LightningModule):
    """Real/fake classifier over CLIP RN50 maps, optionally guided by cached diffusion-uncertainty maps.

    Subclasses take their own arguments and `**kwargs` (passed to this `__init__`, which jsonargparse follows, so
    configs and `--model.help` show both), build their modules in `configure_models` (and loss modules in
    `configure_losses`), reading `self.hparams` (every argument, the subclass's included: this `__init__` saves
    them) and `self.visual_channels` / `self.grid_size` / `self.pooled_dim` (derived by the CLI or the tower),
    and define `forward(batch) -> DetectorOutput` and, if they add loss terms, `losses`.

    Backbone `frozen` reads `clip_layer3` (B, C, g, g) and `clip_pooled` (B, D) from the batch (fast
    sweeps over a cache); `finetune` reads `image` (B, 3, R, R in [-1, 1]) and trains the CLIP tower
    loaded from `clip`. Guidance maps (channels from the stores via `guidance_channels`, which the CLI derives,
    else from the map registry, which refuses a feature of another kind) are concatenated in the order
    given, aligned to the visual grid by adaptive average pooling (area averaging; LaRE²'s alignment) and
    standardised per channel by a scale-free `GuidanceNormalizer` (`guidance_norm`, see its module),
    whose statistics are fitted once at the start of `fit` on up to `norm_rows` training rows and
    saved as buffers: DEU, LaRE, aleatoric and MI differ by orders of magnitude, and an absolute eps
    (BatchNorm's) would flatten the smallest of them.

    Metrics per stage (`configure_metrics`: `train_metrics`, `val_metrics`, `test_metrics`, torchgeo's names):
    acc, ap, auroc, real_acc (specificity), fake_acc (recall) overall, logged as `<stage>_<metric>`; test
    accuracy uses `val_threshold` (a buffer, so the checkpoint carries it to `test` and `predict`). Each step
    returns `{"loss", "p_fake"}`: `reports.callbacks.PredictionTables` turns those into the per-generator
    metrics, chooses `val_threshold` on validation and writes the prediction CSVs.

    Args:
        guidance: registered guidance maps the head is steered by, in order; [] = plain CLIP.
        backbone: frozen = read CLIP maps from the feature store (fast sweeps); finetune = train CLIP on images.
        clip: CLIP RN50 weights for finetune ('openai', a checkpoint file or an open_clip local-dir).
        visual_channels: channels of CLIP's layer3 map (1024 for RN50); `python -m cli` derives it from the
            stores' clip_layer3 shape (finetune: from the tower), replacing a configured value.
        grid_size: side of CLIP's layer3 grid (14 at 224 px); derived like visual_channels.
        pooled_dim: dimension of CLIP's attention-pooled vector (1024 for RN50), for detectors with `uses_pooled`;
            derived from the stored clip_pooled (finetune: from the tower).
        lr: Adam learning rate.
        guidance_norm: how guidance maps are standardised before the head (scale-free by default).
        norm_rows: training rows the guidance standardisation is fitted on, once, at the start of fit.
        guidance_channels: channels of each guidance map; `python -m cli` derives them from the stores (so phase 2
            imports no map module), replacing a configured value; None: from the map registry.
    """

    uses_pooled: bool = True  # whether forward needs CLIP's attention-pooled vector
    # The settings the paper's published numbers were obtained with (configs/<name>_paper.yaml); the one
    # definition: reports.evaluation.PUBLISHED rows name only what their ablation changes from it.
    paper_setting: dict[str, object] = {}

    def __init__(self, guidance: list[GuidanceName], backbone: Backbone = "frozen", clip: str | None = None,
                 visual_channels: int | None = 1024, grid_size: int | None = 14, pooled_dim: int | None = None,
                 lr: float = 1e-4, guidance_norm: GuidanceNorm = "log", norm_rows: int = 2048,
                 guidance_channels: dict[str, int] | None = None) -> None:
        super().__init__()
        # Lightning collects the arguments of every __init__ up the subclass chain (or takes LightningCLI's
        # resolved config), so hparams, and `load_from_checkpoint`, hold the subclass's arguments too.
        self.save_hyperparameters(ignore=[] if self.uses_pooled else ["pooled_dim"])
        if len(set(guidance)) != len(guidance):
            raise ValueError(f"guidance lists a map twice: {list(guidance)}")
        self.guidance = list(guidance)
        self.visual_channels = visual_channels
        self.pooled_dim = pooled_dim
        self.grid_size = grid_size
        self.lr = lr
        self.clip: ClipVisual | None = None
        if backbone == "finetune":
            self.clip = self._load_backbone(clip)
            self.backbone = self.clip.visual  # registered, so it trains and is checkpointed
        elif backbone != "frozen":
            raise ValueError(f"backbone must be 'frozen' or 'finetune', got {backbone!r}")
        elif visual_channels is None or grid_size is None or (self.uses_pooled and pooled_dim is None):
            raise ValueError(f"{type(self).__name__}: backbone='frozen' needs visual_channels, grid_size"
                             f"{' and pooled_dim' if self.uses_pooled else ''}; `python -m cli` derives them from the "
                             "stores' clip_layer3/clip_pooled shapes (add them to data.init_args.features)")
        self.norm_rows = norm_rows
        # The stores' channel counts (the CLI links `data.guidance_channels`: kind `guidance` and shape from each
        # store), else the registry's (a detector built in Python): phase 2 imports no user map module.
        self.map_channels = {name: (guidance_channels or {}).get(name) or map_channels(name) for name in self.guidance}
        self.guidance_norm = GuidanceNormalizer(self.guidance, list(self.map_channels.values()), guidance_norm)
        # Decision threshold on p_fake, chosen on validation predictions (never on test; reports.callbacks) and
        # saved with the checkpoint, so test accuracy and `predict` use the threshold the model was selected with.
        self.register_buffer("val_threshold", torch.tensor(0.5))
        self.feature_provenance: dict | None = None
        self.configure_models()
        self.configure_losses()
        self.configure_metrics()

    def configure_models(self) -> None:
        """Build the detector's own modules (its head); called once by `DetectorBase.__init__`."""
        raise NotImplementedError(f"{type(self).__name__} must build its head in configure_models()")

    def configure_losses(self) -> None:
        """Build loss modules beside the default cross-entropy (none by default)."""

    def configure_metrics(self) -> None:
        """Overall metrics per stage: acc, ap, auroc, real_acc (specificity), fake_acc (recall)."""
        for stage in STAGES:
            setattr(self, f"{stage}_metrics", MetricCollection({
                "acc": BinaryAccuracy(), "ap": BinaryAveragePrecision(), "auroc": BinaryAUROC(),
                "real_acc": BinarySpecificity(), "fake_acc": BinaryRecall()}, prefix=f"{stage}_"))

    def required_features(self) -> list[str]:
        """The store features a batch must carry: the guidance maps, and CLIP's maps when CLIP is not trained."""
        clip = [] if self.clip is not None else ["clip_layer3", *(["clip_pooled"] if self.uses_pooled else [])]
        return [*self.guidance, *clip]

    @property
    def guidance_channels(self) -> int:
        return sum(self.map_channels.values())

    def _load_backbone(self, clip: str | None) -> ClipVisual:
        """Load the trainable CLIP tower; dimensions not given are the tower's, given ones must match it."""
        if not clip:
            raise ValueError("backbone='finetune' needs the CLIP weights: set model.init_args.clip "
                             "('openai', an RN50 checkpoint file or an open_clip local-dir)")
        loaded = load_clip_rn50(clip)
        visual = loaded.visual
        channels = visual.layer3[-1].conv3.out_channels
        self.visual_channels = channels if self.visual_channels is None else self.visual_channels
        self.grid_size = loaded.image_size // 16 if self.grid_size is None else self.grid_size  # ResNet: stride 16
        if self.uses_pooled and self.pooled_dim is None:
            self.pooled_dim = visual.output_dim
        if channels != self.visual_channels or (self.pooled_dim is not None and visual.output_dim != self.pooled_dim):
            raise ValueError(f"CLIP at {clip} has layer3 channels {channels} and pooled dim {visual.output_dim}, "
                             f"but the model is set to visual_channels={self.visual_channels}, "
                             f"pooled_dim={self.pooled_dim}: set them to match")
        visual.train()  # the loader hands it out in eval mode; Lightning keeps submodule modes as found
        if not self.uses_pooled:  # this detector never reads layer4/attnpool: keep no untrained weights
            visual.layer4 = None
            visual.attnpool = None
        return loaded

    @staticmethod
    def batch_tensor(batch: dict, name: str) -> torch.Tensor:
        """batch[name] widened to float32 (batches come in the stored dtype), or one line saying which feature
        the datamodule must provide."""
        if name not in batch:
            raise KeyError(f"the batch has no {name!r} (it has {sorted(batch)}): request it from the datamodule")
        value = batch[name]
        stored = NARROW_DTYPES.get(value.dtype)
        return widen(stored, value, batch.get(f"{name}__scale")) if stored else value

    def visual_features(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """CLIP layer3 map (B, C, g, g) and, if the detector uses it, the pooled vector (B, D)."""
        pooled = None
        if self.clip is None:
            layer3 = self.batch_tensor(batch, "clip_layer3")
            if self.uses_pooled:
                pooled = self.batch_tensor(batch, "clip_pooled")
        else:
            x = self.clip.normalize(self.batch_tensor(batch, "image"))
            if self.uses_pooled:
                layer3, pooled = self.clip.layer3_and_pooled(x)
            else:
                layer3 = self.clip.layer3(x)
        if layer3.shape[1:] != (self.visual_channels, self.grid_size, self.grid_size):
            raise ValueError(f"CLIP layer3 map has shape {tuple(layer3.shape[1:])}, the model expects "
                             f"({self.visual_channels}, {self.grid_size}, {self.grid_size}): "
                             "set visual_channels/grid_size")
        if pooled is not None and pooled.shape[1] != self.pooled_dim:
            raise ValueError(f"CLIP pooled vector has {pooled.shape[1]} dims, the model expects "
                             f"pooled_dim={self.pooled_dim}")
        return layer3, pooled

    def pooled_guidance(self, batch: dict, size: tuple[int, int]) -> torch.Tensor:
        """Guidance maps concatenated on channels and pooled to `size`, not yet standardised: (B, G, *size).

        With `clip_box` (B, 4) in the batch (CLIP saw a native-resolution crop: `clip_input: native_crop`), the
        whole-image maps are first cropped to that window (resampled at their own resolution), so CLIP's grid
        and the guidance grid cover the same pixels."""
        maps = []
        for name in self.guidance:
            u = self.batch_tensor(batch, name)
            if u.ndim != 4 or u.shape[1] != self.map_channels[name]:
                raise ValueError(f"guidance map {name!r} has shape {tuple(u.shape)}, "
                                 f"expected (B, {self.map_channels[name]}, h, w)")
            maps.append(u)
        stacked = torch.cat(maps, dim=1).float()
        if "clip_box" in batch:
            stacked = crop_to_boxes(stacked, batch["clip_box"])
        return F.adaptive_avg_pool2d(stacked, size)

    def guidance_map(self, batch: dict, size: tuple[int, int]) -> torch.Tensor:
        """Guidance maps concatenated on channels, pooled to `size`, standardised: (B, G, *size)."""
        return self.guidance_norm(self.pooled_guidance(batch, size))

    def fit_guidance_norm(self, batches: Iterable[dict]) -> int:
        """Fit the normalisation on batches holding the guidance maps, up to `norm_rows` rows; returns rows used."""
        size = (self.grid_size, self.grid_size)
        return self.guidance_norm.fit((self.pooled_guidance(batch, size) for batch in batches), self.norm_rows)

    def _fit_guidance_norm_on_training_rows(self) -> None:
        """Statistics from the datamodule's training rows, once (a resumed or loaded model keeps its own);
        rank 0's are broadcast so every DDP rank standardises alike."""
        if not self.guidance or bool(self.guidance_norm.fitted):
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None:
            raise ValueError("fitting the guidance normalisation needs the training rows: pass a datamodule to "
                             "fit, or call model.fit_guidance_norm(batches) first")
        self.fit_guidance_norm(datamodule.train_dataloader())
        for name in ("floor", "mean", "std"):
            statistic = getattr(self.guidance_norm, name)
            statistic.copy_(self.trainer.strategy.broadcast(statistic))

    def losses(self, output: DetectorOutput, label: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss terms by name; `loss` is the one optimised."""
        return {"loss": F.cross_entropy(output.logits, label)}

    def _step(self, batch: dict, stage: str) -> dict[str, torch.Tensor]:
        """The loss, logged per term, and `p_fake` (B,): the output callbacks (reports.callbacks) tabulate."""
        output = self(batch)
        label = self.batch_tensor(batch, "label")
        losses = self.losses(output, label)
        p_fake = output.logits.detach().softmax(dim=-1)[:, 1]
        getattr(self, f"{stage}_metrics").update(p_fake, label)
        for name, value in losses.items():
            self.log(f"{stage}_{name}", value, on_step=stage == "train", on_epoch=True, batch_size=label.shape[0],
                     sync_dist=stage != "train", prog_bar=name == "loss")
        return {"loss": losses["loss"], "p_fake": p_fake}

    def training_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        outputs = self._step(batch, "train")
        loss = outputs["loss"]
        if not torch.isfinite(loss):  # a NaN step would silently poison every weight and the saved checkpoint
            raise ValueError(f"{type(self).__name__}: training loss is {loss.item()} at step {self.global_step} "
                             f"(epoch {self.current_epoch}); check the stores for non-finite rows "
                             "(python -m cli verify) and the learning rate")
        return outputs

    def validation_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        return self._step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        return self._step(batch, "test")

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def _log_overall(self, stage: str) -> None:
        """Log the stage's overall metrics (when it saw rows) and reset them for the next epoch."""
        collection = getattr(self, f"{stage}_metrics")
        if collection["acc"].update_called:
            self.log_dict(collection.compute())
        collection.reset()

    def on_fit_start(self) -> None:
        self._fit_guidance_norm_on_training_rows()
        provenance = getattr(getattr(self.trainer, "datamodule", None), "feature_provenance", None)
        recorded = provenance() if callable(provenance) else None  # a FeatureProvenance; the checkpoint keeps its attrs
        self.feature_provenance = None if recorded is None else recorded.to_attrs()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Record what `predict` needs to rebuild the inputs from raw images: the class and feature provenance."""
        checkpoint["detector_class"] = f"{type(self).__module__}.{type(self).__qualname__}"
        checkpoint["feature_provenance"] = self.feature_provenance

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.feature_provenance = checkpoint.get("feature_provenance")

    def on_test_start(self) -> None:
        for name in ("acc", "real_acc", "fake_acc"):
            self.test_metrics[name].threshold = float(self.val_threshold)

    def on_train_epoch_end(self) -> None:
        self._log_overall("train")

    def on_validation_epoch_end(self) -> None:
        self._log_overall("val")

    def on_test_epoch_end(self) -> None:
        self._log_overall("test")
