"""Format bias is visible under `raw` and gone under `jpeg_aligned`; protocols never mix in a store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.functional.classification import binary_auroc

from datamodules.image_shards import ImageShardDataModule
from datamodules.shards import convert
from feature_cache.provenance import DatasetProvenance, PixelProvenance, StoreProvenance
from feature_cache.store import FeatureStore, ProvenanceMismatchError, store_lock
from feature_cache.manifest import store_rows
from feature_cache.writer import ZarrFeatureWriter
from reports.format_reference import FormatOnlyClassifier, ImageMetadata


@pytest.fixture(scope="module")
def confounded_shards(tmp_path_factory) -> Path:
    """GenImage-like bias: reals are JPEGs (q 90..97, as ImageNet), fakes PNGs of the same content."""
    root = tmp_path_factory.mktemp("bias")
    rng = np.random.default_rng(0)
    for label in ("real", "fake"):
        (root / "images" / label).mkdir(parents=True)
    for i in range(80):
        pixels = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
        pixels.save(root / "images" / "real" / f"{i:03d}.jpg", quality=int(rng.choice([90, 93, 95, 97])))
        pixels.save(root / "images" / "fake" / f"{i:03d}.png")
    convert("folder", root / "images", "val", root / "shards", shard_size=40, workers=1)
    return root / "shards"


def _format_only_auroc(shards: Path, **protocol) -> float:
    """Fit the format-only reference on even rows, score it on odd rows."""
    datamodule = ImageShardDataModule(str(shards), resolution=32, num_workers=0, **protocol)
    columns = datamodule.row_metadata()
    labels = np.array([1 if Path(row).parent.name == "fake" else 0 for row in _paths(shards)])
    meta = ImageMetadata(np.array(columns["format"]),
                         np.where(np.array(columns["jpeg_quality"]) < 0, np.nan, columns["jpeg_quality"]).astype(float),
                         np.array(columns["width"]), np.array(columns["height"]))
    train, test = np.arange(len(labels)) % 2 == 0, np.arange(len(labels)) % 2 == 1
    select = lambda m: ImageMetadata(meta.format[m], meta.jpeg_quality[m], meta.width[m], meta.height[m])  # noqa: E731
    scores = FormatOnlyClassifier().fit(select(train), labels[train]).predict_proba(select(test))
    return float(binary_auroc(torch.from_numpy(scores).float(), torch.from_numpy(labels[test]).long()))


def _paths(shards: Path) -> list[str]:
    import csv

    with open(shards / "manifest.csv", newline="") as handle:
        return [row["path"] for row in csv.DictReader(handle)]


def test_format_only_reference_sees_the_confound_under_raw_only(confounded_shards):
    assert _format_only_auroc(confounded_shards) > 0.99
    assert abs(_format_only_auroc(confounded_shards, protocol="jpeg_aligned") - 0.5) < 0.15


def test_jpeg_aligned_metadata_draws_qualities_from_the_real_images(confounded_shards):
    columns = ImageShardDataModule(str(confounded_shards), resolution=32, num_workers=0,
                                   protocol="jpeg_aligned").row_metadata()
    assert set(columns["format"]) == {"JPEG"}
    assert set(columns["jpeg_quality"]) <= {90, 93, 95, 97} and len(set(columns["jpeg_quality"])) > 1


def test_a_store_of_one_protocol_refuses_another(confounded_shards, tmp_path):
    """Bug caught: a store computed under `raw` resumed under another protocol would mix pixels of two
    pipelines under one provenance; the writer's binding check names the differing pixel setting."""
    def settings(protocol: str) -> tuple[ImageShardDataModule, DatasetProvenance, PixelProvenance]:
        datamodule = ImageShardDataModule(str(confounded_shards), resolution=32, num_workers=0, protocol=protocol,
                                          jpeg_quality=90 if protocol == "jpeg_aligned" else None)
        data = datamodule.provenance()
        return (datamodule, DatasetProvenance.from_shard_dir(confounded_shards, data.get("layout", ""),
                                                             data.get("split", ""), datamodule.shard_table()),
                PixelProvenance.from_datamodule(data))

    datamodule, dataset, raw = settings("raw")
    names, path = list(datamodule.generator_names), tmp_path / "store.zarr"
    with store_lock(path):
        store = FeatureStore.create(path, provenance=StoreProvenance(dataset, raw), generator_names=names,
                                    rows=store_rows(confounded_shards, names, datamodule.row_metadata()))
    assert set(store.rows("format").tolist()) == {"PNG", "JPEG"}
    writer = ZarrFeatureWriter(str(path))
    for protocol in ("jpeg_aligned", "size_aligned"):
        with pytest.raises(ProvenanceMismatchError, match=rf"protocol raw != {protocol}"):
            writer._check_binding(store, dataset, settings(protocol)[2])
