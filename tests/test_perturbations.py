"""Robustness perturbations do what their names say, measurably."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from datamodules.perturbations import ROBUSTNESS_SWEEP, parse_sweep, perturb, perturbation_label


@pytest.fixture
def image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8))


def test_jpeg_error_grows_as_quality_drops(image):
    errors = [np.abs(np.asarray(perturb(image, "jpeg", q), float) - np.asarray(image, float)).mean()
              for q in (95, 75, 50)]
    assert 0 < errors[0] < errors[1] < errors[2]


def test_downscale_changes_size_and_blur_removes_high_frequencies(image):
    assert perturb(image, "downscale", 0.5).size == (48, 32)
    assert perturb(image, "downscale", 0.75).size == (72, 48)
    blurred = np.asarray(perturb(image, "blur", 2.0), float)
    assert blurred.std() < 0.5 * np.asarray(image, float).std()  # white noise loses most of its energy


def test_sweep_names_are_valid_and_unknown_names_fail(image):
    for name, parameter in ROBUSTNESS_SWEEP:
        assert perturb(image, name, parameter).mode == "RGB"
    with pytest.raises(ValueError, match=r"unknown perturbation 'sharpen'; choose from \['blur'"):
        perturb(image, "sharpen", 1)


def test_sweep_levels_parse_and_bad_levels_name_the_item():
    """Bugs caught: a level list that cannot be chosen, a typo or an impossible strength accepted silently."""
    assert parse_sweep("none, jpeg:75,blur:1.5") == (("none", 0.0), ("jpeg", 75.0), ("blur", 1.5))
    assert [perturbation_label(*level) for level in parse_sweep("none,jpeg:75,downscale:0.5")] == [
        "none", "jpeg 75", "downscale 0.5"]
    for text, message in (("jpg:75", "unknown perturbation 'jpg'"), ("jpeg", "give its strength as jpeg:VALUE"),
                          ("jpeg:abc", "'abc' is not a number"), ("jpeg:0", "jpeg strength must be within 1..100"),
                          ("downscale:2", "within 0.01..1"), (" , ", "no levels given")):
        with pytest.raises(ValueError, match=message):
            parse_sweep(text)
