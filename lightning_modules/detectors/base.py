"""What DEUA and LaRE² share: backbone modes, guidance-map gathering, metrics, logging, optimiser.

A detector subclass only builds its head and says how it turns visual maps and guidance maps into
logits and features (`forward`) and how those are scored (`losses`). Everything a run must report
the same way for every detector (per-stage and per-generator metrics, TensorBoard hparams, the
prediction tables the evaluation step reads) lives here once.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.nn import functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import (BinaryAccuracy, BinaryAUROC, BinaryAveragePrecision, BinaryRecall,
                                         BinarySpecificity)

from feature_cache.codecs import widen
from core.geometry import crop_to_boxes
from reports.evaluation import (HP_METRICS, Predictions, choose_threshold, hparams_settings, protocol_table,
                                setting_departures)
from lightning_modules.detectors.guidance_norm import GuidanceNorm, GuidanceNormalizer
from lightning_modules.detectors.predictions import PredictionLog, generator_names_of, write_predictions_csv
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

    Subclasses define `forward(batch) -> DetectorOutput` and, if they add loss terms, `losses`.

    Backbone `frozen` reads `clip_layer3` (B, C, g, g) and `clip_pooled` (B, D) from the batch (fast
    sweeps over a cache); `finetune` reads `image` (B, 3, R, R in [-1, 1]) and trains the CLIP tower
    loaded from `clip`. Guidance maps (channels from the stores via `guidance_channels`, which the CLI derives,
    else from the map registry, which refuses a feature of another kind) are concatenated in the order
    given, aligned to the visual grid by adaptive average pooling (area averaging; LaRE²'s alignment) and
    standardised per channel by a scale-free `GuidanceNormalizer` (`guidance_norm`, see its module),
    whose statistics are fitted once at the start of `fit` on up to `norm_rows` training rows and
    saved as buffers: DEU, LaRE, aleatoric and MI differ by orders of magnitude, and an absolute eps
    (BatchNorm's) would flatten the smallest of them.

    Metrics per stage (`train_`, `val_`, `test_` prefixes): acc, ap, auroc, real_acc (specificity),
    fake_acc (recall) overall, and the same per generator as `<stage>_<metric>/<generator name>`.
    The last validation epoch's and the test predictions are written as CSV to the run's log dir
    (`val_predictions.csv`, `test_predictions.csv`); the test table also stays in `test_predictions`.
    """

    uses_pooled: bool = True  # whether forward needs CLIP's attention-pooled vector
    # The settings the paper's published numbers were obtained with (configs/<name>_paper.yaml); the one
    # definition: reports.evaluation.PUBLISHED rows name only what their ablation changes from it.
    paper_setting: dict[str, object] = {}

    def __init__(self, guidance: list[GuidanceName], backbone: Backbone, clip: str | None,
                 visual_channels: int | None, pooled_dim: int | None, grid_size: int | None, lr: float,
                 guidance_norm: GuidanceNorm = "log", norm_rows: int = 2048,
                 guidance_channels: dict[str, int] | None = None) -> None:
        super().__init__()
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
        for stage in STAGES:
            setattr(self, f"{stage}_metrics", MetricCollection({
                "acc": BinaryAccuracy(), "ap": BinaryAveragePrecision(), "auroc": BinaryAUROC(),
                "real_acc": BinarySpecificity(), "fake_acc": BinaryRecall()}, prefix=f"{stage}_"))
            setattr(self, f"{stage}_prediction_log", PredictionLog())
        self.test_predictions: dict[str, torch.Tensor] = {}
        # Decision threshold on p_fake, chosen on validation predictions (never on test) and saved with the
        # checkpoint, so test accuracy and `predict` use the threshold the model was selected with.
        self.register_buffer("val_threshold", torch.tensor(0.5))
        self.feature_provenance: dict | None = None
        self._hparams_registered = False

    def paper_departures(self) -> list[str]:
        """`name=ours (paper: theirs)` for every setting that differs from `paper_setting`; the published
        accuracy is printed only beside runs with none (`reports.evaluation.published_for`, same comparison)."""
        departures = setting_departures(self.hparams, self.paper_setting)
        clip_input = ((self.feature_provenance or {}).get("pixels") or {}).get("clip_input")  # known once fitted
        if self.paper_setting and clip_input != "native_crop":  # both papers: LaRE²'s native 224 crops
            departures.append(f"clip_input={clip_input!r} (paper: 'native_crop')")
        return departures

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

    def _step(self, batch: dict, stage: str) -> torch.Tensor:
        output = self(batch)
        label = self.batch_tensor(batch, "label")
        losses = self.losses(output, label)
        p_fake = output.logits.detach().softmax(dim=-1)[:, 1]
        getattr(self, f"{stage}_metrics").update(p_fake, label)
        getattr(self, f"{stage}_prediction_log").update(p_fake, label, self.batch_tensor(batch, "generator"),
                                                        self.batch_tensor(batch, "row"), batch.get("store"))
        for name, value in losses.items():
            self.log(f"{stage}_{name}", value, on_step=stage == "train", on_epoch=True, batch_size=label.shape[0],
                     sync_dist=stage != "train", prog_bar=name == "loss")
        return losses["loss"]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self._step(batch, "train")
        if not torch.isfinite(loss):  # a NaN step would silently poison every weight and the saved checkpoint
            raise ValueError(f"{type(self).__name__}: training loss is {loss.item()} at step {self.global_step} "
                             f"(epoch {self.current_epoch}); check the stores for non-finite rows "
                             "(python -m cli verify) and the learning rate")
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "test")

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def _generator_names(self) -> list[str] | None:
        """Names of generator codes from the datamodule, if it offers `generator_names` (duck-typed)."""
        names = getattr(getattr(self.trainer, "datamodule", None), "generator_names", None)
        return list(names) if names is not None else None

    def _epoch_end(self, stage: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[dict]]:
        """Log the stage's overall and per-generator metrics and reset them; return (overall, table, protocol rows).

        Per-generator numbers are `reports.evaluation.protocol_table`'s rows (the one definition: real-only
        groups such as DRCT's MSCOCO are pooled with every fake generator, not counted as generators).
        """
        collection, log = getattr(self, f"{stage}_metrics"), getattr(self, f"{stage}_prediction_log")
        table = log.compute()
        overall, rows = {}, []
        if table["row"].numel():
            overall = collection.compute()
            self.log_dict(overall)
            threshold = float(self.val_threshold) if stage == "test" else 0.5
            rows = protocol_table(self._predictions(table), threshold)
            for row in rows[:-1]:  # the last row is the average, logged as hp/*_mean_generator_*
                self.log_dict({f"{stage}_{metric}/{row['generator']}": row[metric]
                               for metric in ("acc", "ap", "auroc", "real_acc", "fake_acc") if row[metric] == row[metric]})
        collection.reset()
        log.reset()
        return overall, table, rows

    def _predictions(self, table: dict[str, torch.Tensor]) -> Predictions:
        names = generator_names_of(table["generator"].cpu(), self._generator_names())
        return Predictions(table["p_fake"].cpu().numpy(), table["label"].cpu().numpy(), names)

    def _register_hparams_metrics(self) -> None:
        """Put this run's settings and HP_METRICS into TensorBoard's hparams tab, once per run directory.

        Only `fit` registers (with NaN placeholders at step 0, overwritten by the real values later); a `test`
        of a fitted run adds its values to the fit's session instead of writing a second set of placeholders.
        """
        if self._hparams_registered:
            return
        data = getattr(getattr(self.trainer, "datamodule", None), "hparams", {})
        settings = hparams_settings(type(self).__name__, dict(self.hparams), dict(data),
                                    int(os.environ.get("PL_GLOBAL_SEED", -1)))
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.log_hyperparams(settings, {name: float("nan") for name in HP_METRICS})
        self._hparams_registered = True

    def _write_predictions(self, table: dict[str, torch.Tensor], file_name: str, threshold: float) -> None:
        log_dir = self.trainer.log_dir  # a broadcast under DDP: every rank must ask, rank 0 writes
        if self.trainer.is_global_zero and log_dir is not None:
            write_predictions_csv(table, self._generator_names(), threshold, Path(log_dir) / file_name)

    def on_fit_start(self) -> None:
        self._fit_guidance_norm_on_training_rows()
        self._register_hparams_metrics()
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
        log_dir = self.trainer.log_dir
        if log_dir is None or not any(Path(log_dir).glob("events.out.tfevents.*")):
            self._register_hparams_metrics()  # a checkpoint scored outside its fit's directory
        for name in ("acc", "real_acc", "fake_acc"):
            self.test_metrics[name].threshold = float(self.val_threshold)

    def on_train_epoch_end(self) -> None:
        self._epoch_end("train")

    def on_validation_epoch_end(self) -> None:
        overall, table, _ = self._epoch_end("val")
        if self.trainer.sanity_checking or not overall:
            return
        self.log_dict({f"hp/val_{m}": overall[f"val_{m}"] for m in ("acc", "ap", "auroc")})
        self.val_threshold.fill_(choose_threshold(self._predictions(table)))
        self._write_predictions(table, "val_predictions.csv", float(self.val_threshold))
        self.log("val_threshold", self.val_threshold)

    def on_test_epoch_end(self) -> None:
        overall, table, rows = self._epoch_end("test")
        self.test_predictions = {name: values.cpu() for name, values in table.items()}
        if not overall:
            return
        average = rows[-1]
        self.log_dict({**{f"hp/test_{m}": overall[f"test_{m}"] for m in ("acc", "ap", "auroc", "real_acc", "fake_acc")},
                       "hp/test_mean_generator_acc": average["acc"], "hp/test_mean_generator_auroc": average["auroc"]})
        self._write_predictions(table, "test_predictions.csv", float(self.val_threshold))
