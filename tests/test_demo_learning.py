"""End to end, the demo learns from the images and only from them: features and labels stay aligned.

(First, one fast test of the tiny SD's training, which the demo runs before phase 1.)

Two `python -m cli demo` runs on the demo's data at a smaller size (each phase a real subprocess), scored by
LaRE²: the plain run (the session's `demo_run`, tests/shared_speedwf.py, which test_demo.py reads too), and the
control run with `--permute_labels true` (the same images, but the real and the
fake of a random half of the pairs swap folders before phase 1, so labels carry no information about
the images). The test store (the demo's val split, both generators) has N_REAL = N_FAKE rows per class.

Bounds, from the null distribution of AUROC with n = N_REAL = N_FAKE (Mann-Whitney, no ties):
std = sqrt((2n + 1) / (12 n²)); with n = 2 · IMAGES_PER_CLASS // 2 = 16 that is 0.104. The control
must lie within 0.5 ± 0.3 (± 2.9 std: a pipeline at chance leaves it with probability ≈ 0.4 %), and
the plain run must reach LEARNED_AUROC = 0.8 (also ≈ 2.9 std above chance, so chance cannot pass it).
Both runs are seeded, so the figures are the same on every run of the same code.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from lightning_modules.tiny_models import TRAINING_RECORD, build_tiny_stable_diffusion, train_tiny_stable_diffusion

from shared_speedwf import DEMO_IMAGES_PER_CLASS, run_demo_cli

IMAGES_PER_CLASS = DEMO_IMAGES_PER_CLASS  # training images per class; the test store gets half per class and generator
LEARNED_AUROC = 0.8
CHANCE_BAND = 0.3


def _test_scores(run: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(run / "test_predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return np.array([int(r["label"]) for r in rows]), np.array([float(r["p_fake"]) for r in rows])


def test_tiny_sd_training_is_seeded_saved_and_unit_scales_the_latents(tmp_path):
    """Bugs caught: an unseeded draw in the training (the demo's numbers would change from run to run), trained
    weights not written back (phase 1 would load the random ones), the latent rescaling not applied, a folder
    without images accepted."""
    from lightning_modules.pretrained import load_stable_diffusion

    images = tmp_path / "reals"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(images / f"{i}.png")
    trained = []
    for name in ("a", "b"):
        sd = build_tiny_stable_diffusion(tmp_path / name)
        record = train_tiny_stable_diffusion(sd, images, resolution=32, vae_steps=3, unet_steps=3, batch_size=4)
        assert record == json.loads((sd / TRAINING_RECORD).read_text())
        trained.append(load_stable_diffusion(str(sd)))
    assert record["num_images"] == 4 and record["images"] == str(images.resolve())
    untrained = load_stable_diffusion(str(build_tiny_stable_diffusion(tmp_path / "untrained")))
    for part in ("vae", "unet"):
        first, second, initial = (getattr(parts, part).state_dict() for parts in (*trained, untrained))
        assert all(torch.equal(first[key], second[key]) for key in first)
        assert not all(torch.equal(first[key], initial[key]) for key in first)
    vae = trained[0].vae
    pixels = torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("RGB").resize((32, 32)), dtype=np.float32)
                                        for p in sorted(images.iterdir())])).permute(0, 3, 1, 2) / 127.5 - 1
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.sample(generator=torch.Generator().manual_seed(1))
    assert 0.7 < float(latents.std() * vae.config.scaling_factor) < 1.4
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        train_tiny_stable_diffusion(tmp_path / "a", tmp_path / "empty")


@pytest.fixture(scope="module")
def runs(demo_run: tuple[Path, str], tmp_path_factory) -> dict[str, Path]:
    """The LaRE² runs: the shared demo's (DEUA beside it changes nothing: each phase is its own seeded process) and
    the permuted control's."""
    permuted = tmp_path_factory.mktemp("demo_learning") / "permuted"
    run_demo_cli(permuted, "--detectors", "lare2", "--permute_labels", "true")
    return {name: out / "runs" / "lare2" / "demo-seed0" for name, out in (("plain", demo_run[0]),
                                                                           ("permuted", permuted))}


@pytest.mark.slow
def test_bounds_are_beyond_chance_for_this_sample_size(runs):
    """Bug caught: a sample too small for the bounds (the test store shrinking), which would let a pipeline at
    chance pass the learning bound or a learning one fail the control by luck."""
    labels, _ = _test_scores(runs["plain"])
    n_real, n_fake = int((labels == 0).sum()), int((labels == 1).sum())
    null_std = math.sqrt((n_real + n_fake + 1) / (12 * n_real * n_fake))
    assert n_real == n_fake == IMAGES_PER_CLASS
    assert LEARNED_AUROC - 0.5 >= 2.5 * null_std and CHANCE_BAND >= 2.5 * null_std


@pytest.mark.slow
def test_the_pipeline_learns_from_the_images(runs):
    """Bugs caught: features and labels drifting apart between phase 1 and phase 2 (a row shifted within a
    tar, a shard read in another order than its labels, a generator code remapped wrongly, a store's rows
    shuffled by a worker): the detector then learns from noise and the test store sits at chance."""
    labels, scores = _test_scores(runs["plain"])
    assert roc_auc_score(labels, scores) >= LEARNED_AUROC


@pytest.mark.slow
def test_permuted_labels_give_chance(runs):
    """Bugs caught: a label reaching the detector other than through the image it belongs to (read from the
    file name or its folder, the row's position, a generator code that encodes the label): with labels
    swapped relative to the images the detector would still score far from chance."""
    labels, scores = _test_scores(runs["permuted"])
    assert abs(roc_auc_score(labels, scores) - 0.5) <= CHANCE_BAND
