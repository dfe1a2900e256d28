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
from feature_cache.store import FeatureStore, ProvenanceMismatchError
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
    def create(protocol: str) -> FeatureStore:
        datamodule = ImageShardDataModule(str(confounded_shards), resolution=32, num_workers=0, protocol=protocol,
                                          jpeg_quality=90 if protocol == "jpeg_aligned" else None)
        keys = [f"{row:09d}" for row in range(160)]
        return FeatureStore.create(tmp_path / "store.zarr", shards=datamodule.shard_table(), keys=keys,
                                   labels=[0] * 160, generators=[0] * 160, generator_names=["g"],
                                   feature_shapes={"deu": (4, 4, 4)}, feature_dtype="float16",
                                   provenance=datamodule.provenance(), row_metadata=datamodule.row_metadata())

    store = create("raw")
    assert store.row_metadata()["format"][:2].tolist() == ["PNG", "PNG"] or "JPEG" in store.row_metadata()["format"]
    with pytest.raises(ProvenanceMismatchError, match=r"protocol raw != jpeg_aligned"):
        create("jpeg_aligned")
    with pytest.raises(ProvenanceMismatchError, match=r"protocol raw != size_aligned"):
        FeatureStore.open(tmp_path / "store.zarr", expected_provenance={
            **store.provenance, "protocol": "size_aligned"})
