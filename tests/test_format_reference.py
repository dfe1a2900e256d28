"""The format-only reference finds format/size shortcuts and nothing else."""

from __future__ import annotations

import numpy as np
from torchmetrics.functional.classification import binary_auroc
import torch

from reports.format_reference import FormatOnlyClassifier, ImageMetadata


def _auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    return float(binary_auroc(torch.from_numpy(scores).float(), torch.from_numpy(labels).long()))


def _split(n: int, rng: np.random.Generator, confounded: bool) -> tuple[ImageMetadata, np.ndarray]:
    label = rng.integers(0, 2, n)
    if confounded:  # GenImage-like: real JPEG q~96 of varied sizes, fake PNG 512×512
        fmt = np.where(label == 1, "PNG", "JPEG")
        quality = np.where(label == 1, np.nan, rng.choice([92, 95, 96, 97], n))
        width = np.where(label == 1, 512, rng.integers(300, 800, n))
        height = np.where(label == 1, 512, rng.integers(300, 800, n))
    else:  # aligned: metadata drawn independently of the label
        fmt = np.full(n, "JPEG")
        quality = rng.choice([92, 95, 96, 97], n).astype(float)
        width = height = rng.choice([256, 512], n)
    return ImageMetadata(fmt, quality, width, height), label


def test_format_only_detects_the_confound_and_nothing_else():
    rng = np.random.default_rng(0)
    for confounded, low, high in ((True, 0.98, 1.0), (False, 0.4, 0.6)):
        train_meta, train_label = _split(400, rng, confounded)
        test_meta, test_label = _split(400, rng, confounded)
        model = FormatOnlyClassifier().fit(train_meta, train_label)
        assert low <= _auroc(model.predict_proba(test_meta), test_label) <= high


def test_unseen_metadata_backs_off_to_coarser_levels():
    meta = ImageMetadata(np.array(["PNG"] * 6 + ["JPEG"] * 6), np.array([np.nan] * 6 + [90.0] * 6),
                         np.array([512] * 12), np.array([512] * 12))
    label = np.array([1] * 6 + [0] * 6)
    model = FormatOnlyClassifier(min_count=3).fit(meta, label)
    unseen = ImageMetadata(np.array(["PNG", "JPEG", "WEBP"]), np.array([np.nan, 90.0, np.nan]),
                           np.array([1024, 100, 64]), np.array([1024, 100, 64]))
    scores = model.predict_proba(unseen)
    assert scores[0] > 0.8 and scores[1] < 0.2  # format level decides for unseen sizes
    assert scores[2] == 0.5  # unseen format: the training prior
