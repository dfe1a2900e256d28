"""The format-only reference: a trivial detector that sees nothing but file metadata.

It looks at (format, JPEG quality, width, height) and nothing of the pixels. If it scores high on a
benchmark, the benchmark's real and fake images differ in format or size, and a detector's raw
numbers there are confounded (Grommelt et al., "Fake or JPEG?", arXiv 2403.17608).

The classifier is a frequency table: P(fake | exact metadata tuple) on the training images, backing
off to coarser tuples (format + quality, then format alone, then the prior) for tuples never seen.
Exact sizes matter (generators emit fixed sizes), so a table beats a smooth model here.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np


@dataclass
class ImageMetadata:
    """Per-image metadata as recorded in the manifest and the feature store, after the protocol."""

    format: np.ndarray  # e.g. "JPEG", "PNG"
    jpeg_quality: np.ndarray  # float, NaN where not JPEG
    width: np.ndarray
    height: np.ndarray

    def keys(self) -> list[tuple[tuple, ...]]:
        """Backoff levels for every image: exact tuple, format+quality, format."""
        quality = np.where(np.isnan(self.jpeg_quality), -1, np.round(self.jpeg_quality)).astype(int)
        return [((f, q, int(w), int(h)), (f, q), (f,)) for f, q, w, h in
                zip(self.format.tolist(), quality.tolist(), self.width.tolist(), self.height.tolist())]


@dataclass
class FormatOnlyClassifier:
    """P(fake | metadata) by counting, with backoff; `min_count` images make a table cell trustworthy."""

    min_count: int = 5
    tables: list[dict[tuple, tuple[int, int]]] = field(default_factory=list)
    prior: float = 0.5

    def fit(self, metadata: ImageMetadata, label: np.ndarray) -> FormatOnlyClassifier:
        keys = metadata.keys()
        self.prior = float(np.mean(label == 1))
        self.tables = []
        for level in range(3):
            fakes, totals = Counter(), Counter()
            for key, lab in zip(keys, label.tolist()):
                totals[key[level]] += 1
                fakes[key[level]] += int(lab == 1)
            self.tables.append({k: (fakes[k], totals[k]) for k in totals})
        return self

    def predict_proba(self, metadata: ImageMetadata) -> np.ndarray:
        """Probability of fake for each image; unseen metadata falls back to coarser levels."""
        scores = []
        for key in metadata.keys():
            for level, table in enumerate(self.tables):
                fakes, total = table.get(key[level], (0, 0))
                if total >= self.min_count:
                    scores.append((fakes + self.prior) / (total + 1))  # shrink towards the prior
                    break
            else:
                scores.append(self.prior)
        return np.asarray(scores)
