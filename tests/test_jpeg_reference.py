"""The double-JPEG reference: its DCT features against hand computations, and the confound it exists to see."""

from __future__ import annotations

import io
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.functional.classification import binary_auroc

from datamodules.image_io import ijg_luminance_table
from datamodules.image_protocols import ImagePreprocessor
from datamodules.image_shards import ImageShardDataModule
from datamodules.shards import convert
from feature_cache.manifest import store_rows
from feature_cache.provenance import DatasetProvenance, PixelProvenance, StoreProvenance
from feature_cache.store import FeatureStore, store_lock
from reports.evaluation import Predictions
from reports.format_reference import FormatOnlyClassifier, confound_note, store_metadata
from reports.jpeg_reference import (FEATURE_SIZE, ZIGZAG, DoubleJpegClassifier, balanced_subsample, block_dct,
                                    dct_histograms, jpeg_features, protocol_file_bytes, quantised_luminance_dct,
                                    store_jpeg_features)
from reports.protocol_report import ProtocolReport
from image_trees import noise


def _encode(image: Image.Image, image_format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def test_block_dct_is_the_jpeg_fdct_of_each_block():
    """Catches blocks cut in the wrong order (columns before rows) or a DCT of the wrong type or scale:
    every coefficient of both blocks of an 8×16 plane is checked against JPEG's FDCT formula
    F(u,v) = ¼ C(u) C(v) Σ_xy f(x,y) cos((2x+1)uπ/16) cos((2y+1)vπ/16), C(0) = 1/√2, else 1."""
    plane = np.random.default_rng(0).normal(0, 50, (8, 16))
    got = block_dct(plane)
    c = [1 / math.sqrt(2)] + [1.0] * 7
    for block in range(2):
        f = plane[:, 8 * block: 8 * block + 8]
        for u in range(8):
            for v in range(8):
                expected = 0.25 * c[u] * c[v] * sum(f[x, y] * math.cos((2 * x + 1) * u * math.pi / 16)
                                                     * math.cos((2 * y + 1) * v * math.pi / 16)
                                                     for x in range(8) for y in range(8))
                assert got[block, u, v] == pytest.approx(expected, abs=1e-9)
    with pytest.raises(ValueError, match="not a whole number of 8×8 blocks"):
        block_dct(np.zeros((8, 12)))


@pytest.mark.parametrize("quality", [50, 90])
def test_quantised_dct_of_a_flat_grey_jpeg(quality: int):
    """Catches a missing level shift (-128), a wrong quantisation table (e.g. chroma, or zigzag order) or
    a colour conversion: a flat grey JPEG has, by hand, DC = round(8·(v−128)/Q[0,0]) and no AC energy."""
    value = 200
    data = _encode(Image.new("RGB", (24, 16), (value, value, value)), "JPEG", quality=quality)
    coefficients = quantised_luminance_dct(data)
    assert coefficients.shape == (6, 64)
    q00 = ijg_luminance_table(quality)[0]
    assert np.all(coefficients[:, 0] == round(8 * (value - 128) / q00))
    assert np.all(coefficients[:, 1:] == 0)
    assert quantised_luminance_dct(_encode(Image.new("RGB", (16, 16)), "PNG")) is None


def test_quantised_dct_recovers_a_single_cosine():
    """Catches coefficients divided by the wrong table entry: a block holding one DCT basis pattern of
    amplitude a·Q[u,v] comes back as exactly a at (u, v) and (almost) nothing elsewhere."""
    quality, (u, v), amplitude = 75, (0, 2), 3
    table = ijg_luminance_table(quality).reshape(8, 8)
    x = np.arange(8)
    basis = np.outer(np.cos((2 * x + 1) * u * np.pi / 16) / math.sqrt(2),
                     np.cos((2 * x + 1) * v * np.pi / 16)) / 4
    block = 128 + amplitude * table[u, v] * basis
    pixels = np.clip(np.round(np.tile(block, (2, 2))), 0, 255).astype(np.uint8)
    coefficients = quantised_luminance_dct(_encode(Image.fromarray(pixels).convert("RGB"), "JPEG", quality=quality))
    assert np.all(coefficients[:, 8 * u + v] == amplitude)
    assert np.abs(np.delete(coefficients, 8 * u + v, axis=1)).max() <= 1


def test_dct_histograms_count_by_hand():
    """Catches frequencies taken in natural instead of zigzag order or counts not normalised by blocks:
    zigzag 1 is natural index 1 and zigzag 2 natural index 8; values outside -bound..bound are not counted."""
    coefficients = np.zeros((4, 64))
    coefficients[:, ZIGZAG[1]] = [-1, 0, 0, 5]
    coefficients[:, ZIGZAG[2]] = [2, 2, 2, -3]
    histograms = dct_histograms(coefficients, frequencies=2, bound=2).reshape(2, 5)  # bins -2..2
    np.testing.assert_allclose(histograms[0], [0, 0.25, 0.5, 0, 0])
    np.testing.assert_allclose(histograms[1], [0, 0, 0, 0, 0.75])
    features = jpeg_features(_encode(Image.new("RGB", (8, 8)), "PNG"))
    assert features.shape == (FEATURE_SIZE,) and features[-1] == 1 and not features[:-1].any()


def test_protocol_file_bytes_is_the_jpeg_the_protocol_made():
    """Catches a reference that reads the original file under `jpeg_aligned` (it would see PNG fakes and
    score the format again) or re-encodes under `raw`."""
    png = _encode(Image.fromarray(noise(0, 32, 32)), "PNG")
    assert protocol_file_bytes(png, ImagePreprocessor(32)) == png
    jpeg = protocol_file_bytes(png, ImagePreprocessor(32, "jpeg_aligned", jpeg_quality=60))
    image = Image.open(io.BytesIO(jpeg))
    assert image.format == "JPEG"
    np.testing.assert_array_equal(image.quantization[0], ijg_luminance_table(60))


def test_balanced_subsample_keeps_both_classes():
    """Catches a subsample that takes the first rows (all one class in a sorted store)."""
    label = np.array([0] * 90 + [1] * 10)
    picks = balanced_subsample(label, 20)
    assert np.all(np.diff(picks) > 0) and (label[picks] == 1).sum() == 10 and (label[picks] == 0).sum() == 10


def test_confound_note_names_the_reference_that_separates():
    """Catches a note that only ever looks at the format-only reference."""
    note = confound_note({"format-only": 0.52, "double-JPEG": 0.93})
    assert "Confounded" in note and "double-JPEG reference (AUROC 0.930)" in note and "format-only reference" not in note
    assert "Confounded" not in confound_note({"format-only": 0.5, "double-JPEG": 0.55})
    assert "Double-JPEG reference: not available" in confound_note({"format-only": 0.5, "double-JPEG": None})


@pytest.fixture(scope="module")
def double_compressed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Reals saved as JPEG at quality 50..70 (coarser than the protocol's final 75), fakes as PNG; different
    contents, same size."""
    root = tmp_path_factory.mktemp("double_jpeg")
    rng = np.random.default_rng(1)
    for label in ("real", "fake"):
        (root / "images" / label).mkdir(parents=True)
    for i in range(60):
        Image.fromarray(noise(1000 + i, 96, 96)).save(root / "images" / "real" / f"{i:03d}.jpg",
                                                      quality=int(rng.integers(50, 71)))
        Image.fromarray(noise(2000 + i, 96, 96)).save(root / "images" / "fake" / f"{i:03d}.png")
    convert("folder", root / "images", "val", root / "shards", shard_size=40, workers=1)
    return root / "shards"


@pytest.fixture(scope="module")
def jpeg_aligned_store(double_compressed: Path, tmp_path_factory: pytest.TempPathFactory) -> FeatureStore:
    """A real format-2 store of those images under jpeg_aligned at quality 75 (rows/ only: the references
    read metadata and image bytes, not maps)."""
    datamodule = ImageShardDataModule(str(double_compressed), resolution=32, num_workers=0,
                                      protocol="jpeg_aligned", jpeg_quality=75)
    provenance = StoreProvenance(DatasetProvenance.from_shard_dir(double_compressed, "folder", "val",
                                                                  datamodule.shard_table()),
                                 PixelProvenance.from_datamodule(datamodule.provenance()))
    names, path = list(datamodule.generator_names), tmp_path_factory.mktemp("store") / "store.zarr"
    with store_lock(path):
        return FeatureStore.create(path, provenance=provenance, generator_names=names,
                                   rows=store_rows(double_compressed, names, datamodule.row_metadata()))


def test_double_jpeg_reference_sees_what_format_only_cannot(jpeg_aligned_store: FeatureStore):
    """Under jpeg_aligned at one final quality (75) the reals are JPEG-then-JPEG and the fakes PNG-then-JPEG.

    The format-only reference (read from a real store's metadata) must be near chance and the double-JPEG
    reference (features read from the store's tars through the protocol) far above it. Catches features
    computed on the original files (trivially separable by format) or on decoded pixels without the JPEG
    grid (blind to double quantisation)."""
    store = jpeg_aligned_store
    rows, labels = np.arange(store.num_rows), store.rows("label").astype(np.int64)
    train, test = rows % 2 == 0, rows % 2 == 1
    metadata = store_metadata(store, rows)
    format_scores = FormatOnlyClassifier().fit(metadata.select(train), labels[train]).predict_proba(metadata.select(test))
    features = store_jpeg_features(store, rows[::-1])[::-1]  # any row order comes back aligned
    assert features[:, -1].sum() == 0  # every image is a JPEG after the protocol
    jpeg_scores = DoubleJpegClassifier().fit(features[train], labels[train]).predict_proba(features[test])

    def auroc(scores: np.ndarray) -> float:
        return float(binary_auroc(torch.from_numpy(scores).float(), torch.from_numpy(labels[test]).long()))

    assert abs(auroc(format_scores) - 0.5) < 0.1
    assert auroc(jpeg_scores) > 0.85


def test_protocol_report_rows_and_note_name_the_double_jpeg_reference(jpeg_aligned_store: FeatureStore,
                                                                      tmp_path: Path):
    """The protocol report's reference rows, fitted on the detector's training rows (even rows here) and
    scored on its test rows (odd rows). Catches a double-JPEG row fitted on the test rows, rows misaligned
    between the test table and the store, or a confound note that names only the format-only reference."""
    store = jpeg_aligned_store
    rows, labels = np.arange(store.num_rows), store.rows("label").astype(np.int64)
    train, test = rows[rows % 2 == 0], rows[rows % 2 == 1]
    datamodule = SimpleNamespace(parts={"train": [SimpleNamespace(store=0, rows=train, labels=labels[train])]},
                                 stores={"train": [str(store.path)]}, opened_stores=lambda: {str(store.path): store})
    shuffled = np.random.default_rng(0).permutation(test)  # a test table is in loader order, not row order
    table = {"store": torch.zeros(len(shuffled), dtype=torch.int64), "row": torch.from_numpy(shuffled)}
    preds = Predictions(np.full(len(shuffled), 0.5), labels[shuffled], np.array(["g"] * len(shuffled)))
    report = ProtocolReport(plots=False)
    format_only = report._format_only_row(datamodule, [store], table, preds)
    double_jpeg = report._double_jpeg_row(datamodule, [store], table, preds)
    assert double_jpeg["generator"] == "double-JPEG reference" and double_jpeg["auroc"] > 0.85
    assert abs(format_only["auroc"] - 0.5) < 0.1
    note = confound_note({"format-only": format_only["auroc"], "double-JPEG": double_jpeg["auroc"]})
    assert "the double-JPEG reference (AUROC" in note and "the format-only reference" not in note
