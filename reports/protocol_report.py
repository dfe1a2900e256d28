"""ProtocolReport: at the end of `python -m cli test`, the papers' table, the format-only check and plots.

A Lightning Callback (listed in the detector configs) because it joins what only the run knows: the
detector's test predictions and validation-chosen threshold, the datamodule's stores (per-image
metadata for the format-only reference, maps for the histograms, shards for example images).
Files go to the run's log dir (protocol_table.{md,csv}, plots/*.png) and the same to TensorBoard.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.loggers import TensorBoardLogger

from feature_cache.store import FeatureStore
from reports.evaluation import (PUBLISHED_DRCT_MEAN_ACC, PUBLISHED_GENIMAGE_MEAN_ACC, Predictions,
                                          protocol_table, write_table)
from reports.format_reference import FormatOnlyClassifier, ImageMetadata
from reports.plots import map_histograms, overlay_figure, roc_pr_figure, save_figure

GENIMAGE_TRAIN = "imagenet_ai_0419_sdv4"


def _metadata(store: FeatureStore, rows: np.ndarray) -> ImageMetadata | None:
    columns = store.row_metadata()
    if not {"format", "jpeg_quality", "width", "height"} <= columns.keys():
        return None
    quality = columns["jpeg_quality"][rows].astype(float)
    formats = np.array(columns["format"][rows].tolist(), dtype=object)  # zarr strings are StringDType
    return ImageMetadata(formats, np.where(quality < 0, np.nan, quality),
                         columns["width"][rows], columns["height"][rows])


def _concat(parts: list[ImageMetadata]) -> ImageMetadata:
    return ImageMetadata(*(np.concatenate([getattr(p, f) for p in parts])
                           for f in ("format", "jpeg_quality", "width", "height")))


class ProtocolReport(pl.Callback):
    """Writes the evaluation table (per generator real/fake/mean ACC, AP, AUROC) after `test`.

    Args:
        plots: also write ROC/PR curves, real-vs-fake histograms of mean map values and DEU overlays.
        examples: number of example images with their guidance map overlaid.
    """

    def __init__(self, plots: bool = True, examples: int = 6) -> None:
        self.plots = plots
        self.examples = examples

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.log_dir is None:
            return
        table = getattr(pl_module, "test_predictions", None)
        datamodule = trainer.datamodule
        if not table or not len(table["row"]) or datamodule is None:
            return
        names = list(datamodule.generator_names)
        preds = Predictions(table["p_fake"].numpy(), table["label"].numpy(),
                            np.array([names[g] for g in table["generator"].tolist()]))
        threshold = float(getattr(pl_module, "val_threshold", 0.5))
        rows = protocol_table(preds, threshold)
        test_stores = [FeatureStore.open(p) for p in datamodule.stores["test"]]
        reference = self._format_only_row(datamodule, test_stores, table, preds)
        if reference is not None:
            rows.append(reference)
        out = Path(trainer.log_dir)
        provenance = test_stores[0].provenance
        title = (f"{type(pl_module).__name__}, protocol {provenance.get('protocol', 'raw')}, "
                 f"threshold {threshold:.3f} (chosen on validation)")
        departures = getattr(pl_module, "paper_departures", lambda: [])()
        published = None if departures else self._published(type(pl_module).__name__, datamodule, provenance)
        _, markdown_path = write_table(rows, out, "protocol_table", title, published, self._confound_note(reference))
        markdown = markdown_path.read_text()
        tensorboard = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if tensorboard is not None:
            tensorboard.experiment.add_text("protocol_table", markdown)
        if self.plots:
            self._plots(out / "plots", preds, test_stores, datamodule.features, table, pl_module, tensorboard)

    @staticmethod
    def _published(detector: str, datamodule: pl.LightningDataModule, provenance: dict) -> float | None:
        """The paper's mean ACC, only where the protocol matches (GenImage trained on SD v1.4, or DRCT-2M, raw)."""
        if provenance.get("protocol", "raw") != "raw":
            return None
        train = [FeatureStore.open(p) for p in datamodule.stores["train"]]
        if provenance.get("layout") == "genimage" and train and all(s.generator_names == [GENIMAGE_TRAIN]
                                                                    for s in train):
            return PUBLISHED_GENIMAGE_MEAN_ACC.get(detector)
        if provenance.get("layout") == "drct":
            return PUBLISHED_DRCT_MEAN_ACC.get(detector)
        return None

    @staticmethod
    def _format_only_row(datamodule: pl.LightningDataModule, test_stores: list[FeatureStore], table: dict,
                         preds: Predictions) -> dict | None:
        """The trivial detector that sees only (format, JPEG quality, width, height), fitted on the training rows
        the detector itself was trained on (the datamodule's filtered train split)."""
        train_meta, train_labels = [], []
        for part in datamodule.parts.get("train", []):
            meta = _metadata(FeatureStore.open(datamodule.stores["train"][part.store]), part.rows)
            if meta is None:
                return None
            train_meta.append(meta)
            train_labels.append(part.labels)
        if not train_meta:
            return None
        test_meta = []
        store_index, rows = table["store"].numpy(), table["row"].numpy()
        order = []
        for k, store in enumerate(test_stores):
            mine = np.flatnonzero(store_index == k)
            meta = _metadata(store, rows[mine])
            if meta is None:
                return None
            test_meta.append(meta)
            order.append(mine)
        classifier = FormatOnlyClassifier().fit(_concat(train_meta), np.concatenate(train_labels))
        scores = np.empty(len(rows))
        scores[np.concatenate(order)] = classifier.predict_proba(_concat(test_meta))
        reference = protocol_table(Predictions(scores, preds.label, preds.generator), 0.5)[-1]
        return {**reference, "generator": "format-only reference"}

    @staticmethod
    def _confound_note(reference: dict | None) -> str:
        if reference is None:
            return "\nFormat-only reference: not available (stores lack per-image format metadata).\n"
        if reference["auroc"] >= 0.75:
            return (f"\n**Confounded:** a classifier that sees only file format, JPEG quality and size reaches "
                    f"AUROC {reference['auroc']:.3f}; the numbers above may measure format, not generation. "
                    "Re-run under `protocol: jpeg_aligned` / `jpeg_size_aligned`.\n")
        return (f"\nFormat-only reference AUROC {reference['auroc']:.3f}: format and size alone do not "
                "separate the classes here.\n")

    def _plots(self, out: Path, preds: Predictions, stores: list[FeatureStore], features: list[str], table: dict,
               pl_module: pl.LightningModule, tensorboard: TensorBoardLogger | None) -> None:
        figures = {"roc_pr": roc_pr_figure(preds, type(pl_module).__name__)}
        store_index, rows = table["store"].numpy(), table["row"].numpy()
        maps = [name for name in ("deu", "lare") if name in features]
        if maps:
            means = {name: np.empty(len(rows)) for name in maps}
            for k, store in enumerate(stores):
                mine = np.flatnonzero(store_index == k)
                for name in maps:
                    values = store.array(name).oindex[np.sort(rows[mine])]
                    means[name][mine[np.argsort(rows[mine])]] = values.reshape(len(mine), -1).astype(float).mean(1)
            figures["map_histograms"] = map_histograms(means, preds.label, preds.generator)
            example = self._examples(stores[0], maps[0])
            if example is not None:
                figures[f"{maps[0]}_overlay"] = example
        for name, figure in figures.items():
            if tensorboard is not None:
                tensorboard.experiment.add_figure(f"report/{name}", figure, close=False)
            save_figure(figure, out / f"{name}.png")

    def _examples(self, store: FeatureStore, map_name: str):
        """A few real and fake images from the store's shards with their map (summed over channels) on top."""
        from datamodules.cached_features import ShardImages

        labels = store.labels()
        picks = np.sort(np.concatenate([np.flatnonzero(labels == 0)[: self.examples // 2],
                                        np.flatnonzero(labels == 1)[: self.examples // 2]]))
        if not len(picks) or not Path(store.provenance.get("shards", "")).is_dir():
            return None
        reader, keys, generators = ShardImages(store), store.keys(), store.generators()
        names = [store.generator_names[generators[r]] for r in picks]
        images = np.stack([reader.read(int(r), keys[r], int(labels[r]), name).numpy() for r, name in zip(picks, names)])
        heat = store.array(map_name).oindex[picks].astype(float).sum(axis=1)
        captions = [f"{'fake' if labels[r] else 'real'} · {name}" for r, name in zip(picks, names)]
        return overlay_figure(images, heat, captions)
