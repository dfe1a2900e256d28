"""ProtocolReport: at the end of `python -m cli test`, the papers' table, the format-only check and plots.

A Lightning Callback (listed in the detector configs) because it joins what only the run knows: the
test predictions (`reports.callbacks.PredictionTables`) and the detector's validation-chosen threshold,
the datamodule's stores (per-image metadata for the format-only reference, maps for the histograms,
shards for example images).
Files go to the run's log dir (protocol_table.{md,csv}, plots/*.png) and the same to TensorBoard.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pandas as pd
from lightning.pytorch.loggers import TensorBoardLogger

from feature_cache.store import FeatureStore
from reports.callbacks import PredictionTables
from reports.evaluation import Predictions, published_for, protocol_table, write_table
from reports.format_reference import FormatOnlyClassifier, concat_metadata, confound_note, store_metadata
from reports.jpeg_reference import fit_double_jpeg, has_images, store_jpeg_features
from reports.plots import map_histograms, overlay_figure, roc_pr_figure, save_figure
from reports.separability import guidance_maps


class ProtocolReport(pl.Callback):
    """Writes the evaluation table (per generator real/fake/mean ACC, AP, AUROC) after `test`.

    The table and its format-confound note are printed to the console too, and test_predictions.csv gets
    each row's per-image columns (key, path, format, JPEG quality, size) joined from its store.

    Args:
        plots: also write ROC/PR curves, real-vs-fake histograms of mean map values and DEU overlays.
        examples: number of example images with their guidance map overlaid.
        double_jpeg: add the double-JPEG reference row (reads every test image's bytes from the tars).
        double_jpeg_fit_rows: training rows (class-balanced sample) the double-JPEG reference is fitted on.
        paper_row: published configuration this run reproduces (set from the config's top-level `paper_row`).
    """

    def __init__(self, plots: bool = True, examples: int = 6, double_jpeg: bool = True,
                 double_jpeg_fit_rows: int = 4000, paper_row: str | None = None) -> None:
        self.plots = plots
        self.examples = examples
        self.double_jpeg = double_jpeg
        self.double_jpeg_fit_rows = double_jpeg_fit_rows
        self.paper_row = paper_row

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank must ask (rank 1 leaving early broke rank 0's)
        if not trainer.is_global_zero or log_dir is None:
            return
        tables = next((c for c in trainer.callbacks if isinstance(c, PredictionTables)), None)
        table = tables.test_predictions if tables is not None else None
        datamodule = trainer.datamodule
        if not table or not len(table["row"]) or datamodule is None:
            return
        names = list(datamodule.generator_names)
        preds = Predictions(table["p_fake"].numpy(), table["label"].numpy(),
                            np.array([names[g] for g in table["generator"].tolist()]))
        threshold = float(getattr(pl_module, "val_threshold", 0.5))
        rows = protocol_table(preds, threshold)
        opened = datamodule.opened_stores()  # the run's stores, opened once by the datamodule
        test_stores = [opened[p] for p in datamodule.stores["test"]]
        reference = self._format_only_row(datamodule, test_stores, table, preds)
        double_jpeg = self._double_jpeg_row(datamodule, test_stores, table, preds) if self.double_jpeg else None
        rows += [r for r in (reference, double_jpeg) if r is not None]
        note = confound_note({name: None if row is None else row["auroc"]
                              for name, row in (("format-only", reference), ("double-JPEG", double_jpeg))})
        out = Path(log_dir)
        pixels, dataset = test_stores[0].pixels, test_stores[0].dataset
        title = (f"{type(pl_module).__name__}, protocol {pixels.protocol}, "
                 f"threshold {threshold:.3f} (chosen on validation)")
        train_generators = sorted({name for path in datamodule.stores["train"]
                                   for name in opened[path].generator_names})
        published, why_not = published_for(self.paper_row, type(pl_module).__name__, dict(pl_module.hparams),
                                           getattr(pl_module, "paper_setting", {}), dataset.layout, pixels.protocol,
                                           train_generators, clip_input=pixels.clip_input)
        _, markdown_path = write_table(rows, out, "protocol_table", title, published, note + why_not)
        markdown = markdown_path.read_text()
        print(f"\n{markdown}\n(written to {markdown_path})", flush=True)
        self._join_row_columns(out / "test_predictions.csv", test_stores)
        tensorboard = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if tensorboard is not None:
            tensorboard.experiment.add_text("protocol_table", markdown, trainer.global_step)
            if reference is not None:
                tensorboard.experiment.add_scalar("hp/test_format_only_auroc", reference["auroc"], trainer.global_step)
            tensorboard.experiment.flush()
        if self.plots:
            self._plots(out / "plots", preds, test_stores, datamodule.features, table, pl_module, tensorboard)

    @staticmethod
    def _join_row_columns(path: Path, stores: list[FeatureStore]) -> None:
        """Add key, path, format, jpeg_quality, width, height of every scored row (pandas merge on store, row)."""
        if not path.is_file():
            return
        predictions = pd.read_csv(path)
        parts = []
        for index, store in enumerate(stores):
            columns = {"store": index, "row": np.arange(store.num_rows),
                       **{name: store.rows(name).tolist() for name in ("key", "format", "jpeg_quality", "width",
                                                                       "height")}}
            part = pd.DataFrame(columns)
            manifest = Path(store.dataset.shards) / "manifest.csv"
            if manifest.is_file():
                part = part.merge(pd.read_csv(manifest, usecols=["key", "path"], dtype=str), on="key", how="left")
            parts.append(part)
        joined = predictions.merge(pd.concat(parts, ignore_index=True), on=["store", "row"], how="left")
        if "jpeg_quality" in joined:
            joined["jpeg_quality"] = joined["jpeg_quality"].where(joined["jpeg_quality"] >= 0)  # -1: not a JPEG
        front = ["store", "row", "key", "path", "generator", "label", "format", "jpeg_quality", "width", "height",
                 "p_fake", "threshold", "prediction"]
        order = [c for c in front if c in joined] + [c for c in joined if c not in front]
        joined[order].to_csv(path, index=False, float_format="%.6g")

    @staticmethod
    def _format_only_row(datamodule: pl.LightningDataModule, test_stores: list[FeatureStore], table: dict,
                         preds: Predictions) -> dict | None:
        """The trivial detector that sees only (format, JPEG quality, width, height), fitted on the training rows
        the detector itself was trained on (the datamodule's filtered train split)."""
        train_meta, train_labels = [], []
        for part in datamodule.parts.get("train", []):
            train_meta.append(store_metadata(datamodule.opened_stores()[datamodule.stores["train"][part.store]],
                                             part.rows))
            train_labels.append(part.labels)
        if not train_meta:
            return None
        test_meta = []
        store_index, rows = table["store"].numpy(), table["row"].numpy()
        order = []
        for k, store in enumerate(test_stores):
            mine = np.flatnonzero(store_index == k)
            test_meta.append(store_metadata(store, rows[mine]))
            order.append(mine)
        classifier = FormatOnlyClassifier().fit(concat_metadata(train_meta), np.concatenate(train_labels))
        scores = np.empty(len(rows))
        scores[np.concatenate(order)] = classifier.predict_proba(concat_metadata(test_meta))
        reference = protocol_table(Predictions(scores, preds.label, preds.generator), 0.5)[-1]
        return {**reference, "generator": "format-only reference"}

    def _double_jpeg_row(self, datamodule: pl.LightningDataModule, test_stores: list[FeatureStore], table: dict,
                         preds: Predictions) -> dict | None:
        """The reference on JPEG-domain features (DCT-coefficient histograms), fitted like the format-only row on
        the detector's own training rows; None when a store's images (its shard directory) are gone."""
        train = [(datamodule.opened_stores()[datamodule.stores["train"][part.store]], part.rows, part.labels)
                 for part in datamodule.parts.get("train", [])]
        stores = [store for store, _, _ in train] + test_stores
        if not all(has_images(store) for store in stores) or len({int(v) for *_, labels in train for v in labels}) < 2:
            return None
        classifier = fit_double_jpeg(train, self.double_jpeg_fit_rows)
        store_index, rows = table["store"].numpy(), table["row"].numpy()
        scores = np.empty(len(rows))
        for k, store in enumerate(test_stores):
            mine = np.flatnonzero(store_index == k)
            scores[mine] = classifier.predict_proba(store_jpeg_features(store, rows[mine]))
        reference = protocol_table(Predictions(scores, preds.label, preds.generator), 0.5)[-1]
        return {**reference, "generator": "double-JPEG reference"}

    def _plots(self, out: Path, preds: Predictions, stores: list[FeatureStore], features: list[str], table: dict,
               pl_module: pl.LightningModule, tensorboard: TensorBoardLogger | None) -> None:
        figures = {"roc_pr": roc_pr_figure(preds, type(pl_module).__name__)}
        store_index, rows = table["store"].numpy(), table["row"].numpy()
        maps = [name for name in features if name in guidance_maps(stores[0])]
        if maps:
            means = {name: np.empty(len(rows)) for name in maps}
            for k, store in enumerate(stores):
                mine = np.flatnonzero(store_index == k)
                for name in maps:
                    values = store.read_rows(name, np.sort(rows[mine]))
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

        labels = store.rows("label")
        picks = np.sort(np.concatenate([np.flatnonzero(labels == 0)[: self.examples // 2],
                                        np.flatnonzero(labels == 1)[: self.examples // 2]]))
        if not len(picks) or not Path(store.dataset.shards).is_dir():
            return None
        reader, keys, generators = ShardImages(store), store.rows("key"), store.rows("generator")
        names = [store.generator_names[generators[r]] for r in picks]
        images = np.stack([reader.read(int(r), str(keys[r]), int(labels[r]), name).numpy()
                           for r, name in zip(picks, names)])
        heat = store.read_rows(map_name, picks).astype(float).sum(axis=1)
        captions = [f"{'fake' if labels[r] else 'real'} · {name}" for r, name in zip(picks, names)]
        return overlay_figure(images, heat, captions)
