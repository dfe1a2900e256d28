"""The double-JPEG reference: a trivial detector that sees only JPEG-domain statistics of the file.

Under `jpeg_aligned` every image is re-encoded at one final quality, so the format-only reference (format,
quality, size) is blind; but the real JPEGs are then compressed twice and the fakes (PNGs) once. Double
quantisation leaves periodic gaps and peaks in the histograms of the quantised DCT coefficients (Lukáš &
Fridrich 2003; Popescu & Farid 2004), which a linear classifier on those histograms picks up. If this
reference separates the classes, a detector's score under the protocol may still measure compression
history, not generation.

Features, in plain functions (each testable against a hand computation):
- `quantised_luminance_dct`: the file's luminance plane as libjpeg decodes it (no colour conversion:
  PIL's draft mode "L" returns the Y component), minus 128, cut into the 8×8 blocks of the JPEG grid,
  orthonormal 2-D DCT-II (JPEG's FDCT), divided by the file's own luminance quantisation table and
  rounded. This recovers the stored quantised coefficients up to the decoder's rounding (exact for table
  entries ≥ 2 in practice), without a JPEG-internals library.
- `dct_histograms`: for the first `DCT_FREQUENCIES` AC frequencies in zigzag order, the histogram of the
  quantised values -B..B (B = `HISTOGRAM_BOUND`) as fractions of the blocks; 9 × 21 = 189 numbers.
- `jpeg_features`: those histograms plus one indicator "not a JPEG" (all histograms zero then).

The classifier is standardisation + logistic regression (sklearn), fitted like the format-only row on the
detector's own training rows (at most `max_fit_rows`, a seeded class-balanced subsample, because every
row costs a JPEG decode).
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.fft import dctn
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from datamodules.image_io import decode_rgb
from datamodules.image_protocols import JPEG_PROTOCOLS, ImagePreprocessor
from datamodules.image_shards import preprocessor_from_provenance
from datamodules.perturbations import perturb
from core.hashing import bytes_sha256
from feature_cache.store import FeatureStore

# Natural (row-major) indices of the 8×8 DCT in JPEG zigzag order; index 0 is DC.
ZIGZAG = (0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20, 13,
          6, 7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59, 52, 45, 38,
          31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63)
DCT_FREQUENCIES = 9  # low AC frequencies: most blocks have non-zero values there even at low quality
HISTOGRAM_BOUND = 10
FEATURE_SIZE = DCT_FREQUENCIES * (2 * HISTOGRAM_BOUND + 1) + 1


def block_dct(plane: np.ndarray) -> np.ndarray:
    """(blocks, 8, 8) orthonormal 2-D DCT-II of the 8×8 blocks of a plane (rows, then columns of blocks).

    The plane's height and width must be multiples of 8; JPEG's level shift (-128) is the caller's.
    """
    height, width = plane.shape
    if height % 8 or width % 8:
        raise ValueError(f"block_dct: plane of {height}×{width} is not a whole number of 8×8 blocks")
    blocks = plane.reshape(height // 8, 8, width // 8, 8).transpose(0, 2, 1, 3).reshape(-1, 8, 8)
    return dctn(blocks, type=2, norm="ortho", axes=(1, 2))


def quantised_luminance_dct(data: bytes) -> np.ndarray | None:
    """(blocks, 64) quantised luminance DCT coefficients (natural order) of a JPEG file; None if not a JPEG.

    Partial blocks at the right and bottom edges are left out (their padding is the encoder's choice).
    """
    image = Image.open(io.BytesIO(data))
    if image.format != "JPEG" or not getattr(image, "quantization", None):
        return None
    table = np.asarray(image.quantization[0], dtype=np.float64).reshape(8, 8)  # natural order, as PIL gives it
    image.draft("L", image.size)  # decode only Y, without colour conversion
    luminance = np.asarray(image if image.mode == "L" else image.convert("L"), dtype=np.float64)
    height, width = (luminance.shape[0] // 8) * 8, (luminance.shape[1] // 8) * 8
    if not height or not width:
        return np.zeros((0, 64))
    coefficients = block_dct(luminance[:height, :width] - 128.0) / table
    return np.rint(coefficients).reshape(-1, 64)


def dct_histograms(coefficients: np.ndarray, frequencies: int = DCT_FREQUENCIES,
                   bound: int = HISTOGRAM_BOUND) -> np.ndarray:
    """Per zigzag AC frequency 1..`frequencies`, the fraction of blocks whose value is -bound..bound (flattened)."""
    edges = np.arange(-bound - 0.5, bound + 1.0)
    blocks = max(len(coefficients), 1)
    return np.concatenate([np.histogram(coefficients[:, ZIGZAG[f]], bins=edges)[0] / blocks
                           for f in range(1, frequencies + 1)])


def jpeg_features(data: bytes) -> np.ndarray:
    """`FEATURE_SIZE` numbers: the DCT histograms of a JPEG, or zeros and a final 1 for any other file."""
    coefficients = quantised_luminance_dct(data)
    features = np.zeros(FEATURE_SIZE)
    if coefficients is None:
        features[-1] = 1.0
    else:
        features[:-1] = dct_histograms(coefficients)
    return features


def protocol_file_bytes(data: bytes, preprocess: ImagePreprocessor) -> bytes:
    """The file as phase 1's pixel pipeline handled it before resizing: the original bytes, or, where a JPEG
    protocol or a JPEG perturbation re-encodes the image, the last JPEG it made (same PIL encoder, quality).

    Resizing, blurring and cropping change no compression history that the reference reads.
    """
    name, parameter = preprocess.perturbation
    if preprocess.protocol in JPEG_PROTOCOLS:
        image, quality = perturb(decode_rgb(data)[1], name, parameter), preprocess.quality_for(bytes_sha256(data))
    elif name == "jpeg":
        image, quality = decode_rgb(data)[1], int(parameter)
    else:
        return data
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def tar_images(path: str | Path) -> Iterator[tuple[str, bytes]]:
    """(key, image bytes) of every sample in a WebDataset tar, read sequentially (no random seeks)."""
    with tarfile.open(path, mode="r|") as tar:
        for member in tar:
            if member.isfile() and not member.name.endswith((".json", ".cls", ".txt")):
                handle = tar.extractfile(member)
                assert handle is not None
                yield member.name.split(".", 1)[0], handle.read()


@dataclass
class DoubleJpegClassifier:
    """P(fake | DCT-histogram features): standardisation + logistic regression."""

    seed: int = 0
    model: Pipeline | None = field(default=None, repr=False)

    def fit(self, features: np.ndarray, label: np.ndarray) -> DoubleJpegClassifier:
        if len(set(label.tolist())) < 2:
            raise ValueError("double-JPEG reference: the fitting rows hold only one class")
        self.model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=self.seed))
        self.model.fit(features, label)
        return self

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        if self.model is None:
            raise ValueError("double-JPEG reference: predict_proba before fit")
        return self.model.predict_proba(features)[:, 1]


def has_images(store: FeatureStore) -> bool:
    """Whether the store's shard directory (where its rows' images are) is still there."""
    return Path(store.dataset.shards).is_dir()


def store_jpeg_features(store: FeatureStore, rows: np.ndarray) -> np.ndarray:
    """(len(rows), FEATURE_SIZE) features of a store's rows (any order), from its tars' bytes as phase 1 saw them.

    Tars are read sequentially, only those holding wanted rows. A row whose image cannot be read gets the
    "not a JPEG" vector (such rows carry a phase-1 error and are normally filtered out before).
    """
    shard_dir = Path(store.dataset.shards)
    preprocess = preprocessor_from_provenance(store.pixels, store.dataset.stats)
    keys, order = store.rows("key"), np.argsort(rows, kind="stable")
    rows = np.asarray(rows)[order]
    features = np.zeros((len(rows), FEATURE_SIZE))
    features[:, -1] = 1.0
    for index, shard in enumerate(store.shard_table):
        start, stop = store.tar_rows(index)
        lo, hi = np.searchsorted(rows, [start, stop])
        if hi == lo:
            continue
        wanted = {str(keys[int(r)]): lo + i for i, r in enumerate(rows[lo:hi])}
        if not (shard_dir / shard["name"]).is_file():
            raise FileNotFoundError(f"double-JPEG reference: tar {shard_dir / shard['name']} of feature store "
                                    f"{store.path} is missing (the reference reads the images' bytes)")
        for key, data in tar_images(shard_dir / shard["name"]):
            if key in wanted:
                try:
                    features[wanted[key]] = jpeg_features(protocol_file_bytes(data, preprocess))
                except (OSError, ValueError, SyntaxError):
                    pass  # undecodable: keeps the "not a JPEG" vector
    restored = np.empty_like(features)
    restored[order] = features
    return restored


def fit_double_jpeg(parts: list[tuple[FeatureStore, np.ndarray, np.ndarray]], max_fit_rows: int,
                    seed: int = 0) -> DoubleJpegClassifier:
    """The reference fitted on (store, rows, labels) parts: a seeded class-balanced subsample of each part,
    at most `max_fit_rows` in all (every row costs a JPEG decode)."""
    features, labels = [], []
    for store, rows, label in parts:
        pick = balanced_subsample(label, max(2, max_fit_rows // max(1, len(parts))), seed)
        features.append(store_jpeg_features(store, rows[pick]))
        labels.append(label[pick])
    return DoubleJpegClassifier(seed).fit(np.concatenate(features), np.concatenate(labels))


def balanced_subsample(label: np.ndarray, limit: int, seed: int = 0) -> np.ndarray:
    """Sorted positions of at most `limit` rows, as many of each class as possible (seeded)."""
    rng = np.random.default_rng(seed)
    classes = [np.flatnonzero(label == c) for c in np.unique(label)]
    per_class = max(1, limit // max(1, len(classes)))
    picks = [rng.permutation(rows)[:per_class] for rows in classes]
    return np.sort(np.concatenate(picks)) if picks else np.zeros(0, dtype=np.int64)
