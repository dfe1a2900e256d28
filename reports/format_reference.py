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

from feature_cache.store import FeatureStore


@dataclass
class ImageMetadata:
    """Per-image metadata as recorded in the manifest and the feature store, after the protocol."""

    format: np.ndarray  # e.g. "JPEG", "PNG"
    jpeg_quality: np.ndarray  # float, NaN where not JPEG
    width: np.ndarray
    height: np.ndarray

    def select(self, mask: np.ndarray) -> ImageMetadata:
        return ImageMetadata(self.format[mask], self.jpeg_quality[mask], self.width[mask], self.height[mask])

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


def store_metadata(store: FeatureStore, rows: np.ndarray) -> ImageMetadata:
    """The rows' metadata (the store's rows/ columns) as the read-time protocol left it."""
    quality = store.rows("jpeg_quality")[rows].astype(float)
    formats = np.array(store.rows("format")[rows].tolist(), dtype=object)  # zarr strings are StringDType
    return ImageMetadata(formats, np.where(quality < 0, np.nan, quality), store.rows("width")[rows],
                         store.rows("height")[rows])


def concat_metadata(parts: list[ImageMetadata]) -> ImageMetadata:
    """One ImageMetadata of several, in order."""
    return ImageMetadata(*(np.concatenate([getattr(p, f) for p in parts])
                           for f in ("format", "jpeg_quality", "width", "height")))


CONFOUND_AUROC = 0.75  # a reference this good means the benchmark's classes differ in something besides generation


def confound_note(references: dict[str, float | None]) -> str:
    """The note under a table: which reference (format-only, double-JPEG) separates the classes, if any.

    `references` maps a reference's name to its AUROC on the table's rows (None: not available, e.g. the
    store lacks metadata or its images).
    """
    available = {name: auroc for name, auroc in references.items() if auroc is not None}
    missing = [name for name, auroc in references.items() if auroc is None]
    lines = []
    separating = {name: auroc for name, auroc in available.items() if auroc >= CONFOUND_AUROC}
    if separating:
        named = " and ".join(f"the {name} reference (AUROC {auroc:.3f})" for name, auroc in separating.items())
        advice = []
        if "format-only" in separating:
            advice.append("File format, JPEG quality or size differ between the classes: re-run under "
                          "`protocol: jpeg_aligned` / `jpeg_size_aligned`.")
        if "double-JPEG" in separating:
            advice.append("The classes differ in JPEG compression history (e.g. reals compressed twice, fakes "
                          "once), which the format protocols do not remove: read the detector's numbers against "
                          "this reference's.")
        lines.append(f"**Confounded:** {named} {'separate' if len(separating) > 1 else 'separates'} real from fake "
                     f"without looking at generation traces; the numbers above may measure this, not generation. "
                     + " ".join(advice))
    elif available:
        named = ", ".join(f"{name} {auroc:.3f}" for name, auroc in available.items())
        lines.append(f"Reference AUROCs ({named}): below {CONFOUND_AUROC}, so what these references see (file "
                     "format and size; JPEG compression history) does not separate the classes here.")
    lines += [f"{name[:1].upper()}{name[1:]} reference: not available (no per-image metadata, or the images are "
              "not where the store says)." for name in missing]
    return "\n" + "\n\n".join(lines) + "\n"
