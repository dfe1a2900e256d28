"""Uncertainty-scored generation on the tiny models: the maths against independent computations, the CLI's
exactly-once/resume behaviour with real subprocesses, and its output read back by the shard converter."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from datamodules.shards import convert
from feature_cache.manifest import read_manifest_rows
from core.seeding import image_generator
from lightning_modules.generation import (ENTROPY_VAR_FLOOR, UncertaintyGenerator, diagonal_gaussian_entropy,
                                          per_row_conv3x3, perturbed_eps_variance)
from lightning_modules.generation_writer import finalize
from lightning_modules.laplace_fit import LaplaceFit
from cli_runner import cli_env, run_cli
from test_laplace_fit import TinyCalibrationData

REPO = Path(__file__).resolve().parents[1]
RES = 64


def fit_posterior(sd: Path, out: Path, prior_precision: float) -> Path:
    """A posterior file through the real `laplace-fit` module and Lightning's predict loop."""
    module = LaplaceFit(str(sd), output=str(out), num_noises=2, prior_precision=prior_precision)
    pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
               enable_model_summary=False).predict(module, TinyCalibrationData(), return_predictions=False)
    return out


@pytest.fixture(scope="module")
def posteriors(tiny_model_paths: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`spread`: an ordinary fit (λ = 1); `point`: λ = 1e30, so every weight sample equals the MAP in fp32."""
    folder = tmp_path_factory.mktemp("posteriors")
    sd = tiny_model_paths["sd"]
    return {"spread": fit_posterior(sd, folder / "spread.pt", 1.0), "point": fit_posterior(sd, folder / "point.pt", 1e30)}


def generator(tiny_model_paths: dict[str, Path], **settings: object) -> UncertaintyGenerator:
    defaults = {"resolution": RES, "num_inference_steps": 3, "guidance_scale": 3.0}
    return UncertaintyGenerator(str(tiny_model_paths["sd"]), **{**defaults, **settings}).eval()


def test_diagonal_gaussian_entropy_matches_torch_distributions() -> None:
    """Catches a wrong constant (ln 2πe per dimension, the ½) or a biased variance in the entropy."""
    embeddings = torch.randn(3, 6, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    expected = torch.distributions.Normal(torch.zeros(3, 5, dtype=torch.float64),
                                          embeddings.std(dim=1, correction=1)).entropy().sum(-1)
    torch.testing.assert_close(diagonal_gaussian_entropy(embeddings), expected)


def test_per_row_conv_equals_a_loop_of_convolutions() -> None:
    """Catches a grouped-conv reshape that mixes rows' weights (the posterior samples would be shuffled)."""
    gen = torch.Generator().manual_seed(1)
    phi, weights, biases = torch.randn(3, 4, 5, 5, generator=gen), torch.randn(3, 2, 4, 3, 3, generator=gen), \
        torch.randn(3, 2, generator=gen)
    expected = torch.cat([F.conv2d(phi[r:r + 1], weights[r], biases[r], padding=1) for r in range(3)])
    torch.testing.assert_close(per_row_conv3x3(phi, weights, biases), expected)


def test_identical_posterior_samples_give_the_entropy_floor(tiny_model_paths: dict[str, Path],
                                                            posteriors: dict[str, Path]) -> None:
    """Zero spread must give the stated finite floor ½·D·ln(2πe·floor), not −inf/NaN; catches a hook that
    leaves rows with different weights, and (with the spread posterior) a hook that ignores the samples."""
    kwargs = {"clip": str(tiny_model_paths["clip"]), "num_posterior_samples": 3, "posterior_steps": 2}
    point = generator(tiny_model_paths, posterior=str(posteriors["point"]), **kwargs)
    scores = point.generate(["p00000-i00000", "p00001-i00000"], ["a photo", "a cat"]).generative
    dim = point.clip_visual.attnpool.c_proj.out_features
    floor = 0.5 * dim * math.log(2 * math.pi * math.e * ENTROPY_VAR_FLOOR)
    assert torch.isfinite(scores).all()
    torch.testing.assert_close(scores, torch.full_like(scores, floor), rtol=0, atol=1e-9)
    spread = generator(tiny_model_paths, posterior=str(posteriors["spread"]), **kwargs)
    assert (spread.generate(["p00000-i00000"], ["a photo"]).generative > floor + 1).all()


def test_aleatoric_map_equals_a_per_perturbation_loop(tiny_model_paths: dict[str, Path]) -> None:
    """Batched K·B ε̂ call vs one UNet call per (image, perturbation), two different prompts: catches a
    prompt/perturbation row misorder and a wrong variance axis or divisor."""
    model = generator(tiny_model_paths)
    gen = torch.Generator().manual_seed(2)
    prompts, t = ["a photo", "a cat"], 501
    alpha_bar = float(model.parts.scheduler.alphas_cumprod[t])
    x0_hat, noise = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 3, 4, 8, 8, generator=gen)
    with torch.no_grad():
        batched = perturbed_eps_variance(model.eps_fn(prompts), x0_hat, alpha_bar, t, noise)
        looped = np.stack([
            torch.stack([model.eps_fn([prompts[b]])(math.sqrt(alpha_bar) * x0_hat[b:b + 1]
                                                    + math.sqrt(1 - alpha_bar) * noise[b, k:k + 1], t)[0]
                         for k in range(3)]).numpy().var(axis=0)
            for b in range(2)])
    np.testing.assert_allclose(batched.numpy(), looped, rtol=1e-4, atol=1e-7)


def test_guided_update_changes_eps_only_above_the_percentile(tiny_model_paths: dict[str, Path]) -> None:
    """The guided step on the real UNet differs from the plain one exactly on the pixels whose uncertainty
    exceeds the per-image percentile; catches a mask applied to the wrong tensor or a global threshold."""
    model = generator(tiny_model_paths, aleatoric_steps=[0], guided=True, guidance_percentile=80.0,
                      guidance_strength=50.0)
    gen = torch.Generator().manual_seed(3)
    x, noise = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 3, 4, 8, 8, generator=gen)
    eps_fn = model.eps_fn(["a photo", "a cat"])
    guided, uncertainty, fraction = model._aleatoric_step(eps_fn, x, 501, noise)
    model.hparams.guided = False
    plain, plain_uncertainty, _ = model._aleatoric_step(eps_fn, x, 501, noise)
    torch.testing.assert_close(uncertainty, plain_uncertainty)
    threshold = torch.tensor([np.percentile(u.numpy(), 80.0) for u in uncertainty]).view(-1, 1, 1, 1)
    above = uncertainty > threshold
    changed = guided != plain
    assert changed.any()
    assert not (changed & ~above).any(), "guidance changed a pixel below the percentile"
    torch.testing.assert_close(fraction, above.flatten(1).float().mean(1))


def test_posterior_weight_samples_have_the_posterior_standard_deviation(tiny_model_paths: dict[str, Path],
                                                                       posteriors: dict[str, Path],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The conv_out weights and biases the M regenerations run with: their spread over M = 400 samples must be
    the posterior's variance (σ² from 0.01 to 0.09, so σ is 3 to 10 times σ²) around the MAP weights. Catches
    the noise scaled by σ² instead of σ (the sampled spread would be σ⁴), and a sample not centred on the MAP."""
    import lightning_modules.generation as generation

    model = generator(tiny_model_paths, posterior=str(posteriors["spread"]), clip=str(tiny_model_paths["clip"]),
                      num_posterior_samples=400, posterior_steps=1)
    conv = model.unet.conv_out
    model.var_w = torch.linspace(0.01, 0.09, conv.weight.numel()).reshape(conv.weight.shape)
    model.var_b = torch.linspace(0.09, 0.01, conv.out_channels)
    captured = {}

    class Captured(Exception):
        pass

    def capture(phi: torch.Tensor, weights: torch.Tensor, biases: torch.Tensor) -> torch.Tensor:
        captured["weights"], captured["biases"] = weights, biases
        raise Captured

    monkeypatch.setattr(generation, "per_row_conv3x3", capture)
    with torch.no_grad(), pytest.raises(Captured):
        model.generative_uncertainty(torch.randn(1, *model.latent_shape()), ["a photo"], [torch.Generator().manual_seed(0)])
    weights, biases = captured["weights"][:400], captured["biases"][:400]  # [uncond rows; cond rows] share samples
    torch.testing.assert_close(captured["weights"][400:], weights)
    for samples, mean, var in ((weights, conv.weight, model.var_w), (biases, conv.bias, model.var_b)):
        ratio = samples.var(dim=0, correction=1) / var
        assert abs(float(ratio.mean()) - 1) < 0.05 and float((ratio - 1).abs().max()) < 0.5
        assert float(((samples.mean(0) - mean).abs() / var.sqrt()).max()) < 0.3  # 6 standard errors


def test_aleatoric_perturbations_renoise_the_predicted_clean_latent(tiny_model_paths: dict[str, Path]) -> None:
    """De Vita's K inputs are √ᾱ·x̂₀ + √(1−ᾱ)·ε_k with x̂₀ = (x_t − √(1−ᾱ)·ε̂)/√ᾱ, i.e. x_t + √(1−ᾱ)·(ε_k − ε̂):
    re-noised with ε̂ itself they give x_t back. Checked on the inputs the ε̂ function receives (a non-linear
    stand-in for the UNet) at t = 801 (ᾱ ≈ 0.05). Catches x̂₀ not divided by √ᾱ_t, or re-noised with √ᾱ missing."""
    model = generator(tiny_model_paths)
    t = 801
    alpha_bar = float(model.parts.scheduler.alphas_cumprod[t])
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    calls = []

    def eps_fn(inputs: torch.Tensor, timestep: int) -> torch.Tensor:
        calls.append(inputs.detach().clone())
        return 0.3 * inputs + 0.1 * inputs ** 2

    eps_hat = 0.3 * x + 0.1 * x ** 2
    other = torch.randn(2, 4, 8, 8, generator=gen)
    noise = torch.stack([eps_hat, other], dim=1)  # (B, K=2, C, h, w): copy 0 re-noised with ε̂ itself
    _, uncertainty, _ = model._aleatoric_step(eps_fn, x, t, noise)
    perturbed = calls[1].unflatten(0, (2, 2))
    torch.testing.assert_close(perturbed[:, 0], x, atol=1e-5, rtol=0)
    torch.testing.assert_close(perturbed[:, 1], x + math.sqrt(1 - alpha_bar) * (other - eps_hat), atol=1e-5, rtol=0)
    expected = torch.stack([eps_hat, eps_fn(perturbed[:, 1], t)], 1).var(dim=1, correction=0)
    torch.testing.assert_close(uncertainty, expected, atol=1e-5, rtol=1e-5)


def test_each_aleatoric_step_gets_its_own_perturbation_noises(tiny_model_paths: dict[str, Path]) -> None:
    """generate() with aleatoric_steps [0, 2]: step s must be re-noised with the s-th block of K noises of the
    image's own draw (seed, key/aleatoric), (S, K, C, h, w), and the map is the mean of the two steps' maps.
    Catches the K perturbations of the first step reused at every step, and noises drawn per batch, not per key."""
    model = generator(tiny_model_paths, aleatoric_steps=[0, 2], num_perturbations=3)
    seen, maps = [], []
    original = model._aleatoric_step

    def record(eps_fn, x, t, noise):
        seen.append(noise.clone())
        out = original(eps_fn, x, t, noise)
        maps.append(out[1])
        return out

    model._aleatoric_step = record
    keys = ["p00000-i00000", "p00001-i00000"]
    result = model.generate(keys, ["a photo", "a cat"])
    expected = torch.stack([torch.randn((2, 3, *model.latent_shape()), generator=image_generator(0, "diffusion_noise", f"{k}/aleatoric"))
                            for k in keys])
    assert len(seen) == 2
    torch.testing.assert_close(seen[0], expected[:, 0])
    torch.testing.assert_close(seen[1], expected[:, 1])
    assert not torch.equal(seen[0], seen[1])
    torch.testing.assert_close(result.aleatoric_map, (maps[0] + maps[1]) / 2)


# ---- the command: exactly once over ranks, resume after kill -9, output read by the shard converter ----

# One thread per process in every run: Lightning gives each CPU DDP rank cores/ranks threads otherwise, and a
# different reduction order moves some pixel across a rounding boundary (on GPUs the kernels decide).
ENV = cli_env(OMP_NUM_THREADS="1")


def cli(*args: str, **popen: object) -> subprocess.Popen:
    """`python -m cli ARGS` as a process of its own: DDP ranks (which re-execute the command line) and kill -9."""
    return subprocess.Popen([sys.executable, "-m", "cli", *args], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)


def in_process(*args: str) -> tuple[int, str]:
    """`python -m cli ARGS` in this process (tests/cli_runner.py): exit status and stdout + stderr."""
    result = run_cli(list(args), cwd=REPO, env=ENV)
    return result.returncode, result.stdout + result.stderr


def generate_args(paths: dict[str, Path], prompts: Path, out: Path, num_images: int, *extra: str) -> list[str]:
    return ["generate", "--config", str(REPO / "configs/generate.yaml"), "--model.init_args.sd", str(paths["sd"]),
            "--model.init_args.resolution", str(RES), "--model.init_args.num_inference_steps", "3",
            "--model.init_args.aleatoric_steps", "[1]", "--model.init_args.num_perturbations", "2",
            "--prompts", str(prompts), "--num_images", str(num_images), "--out", str(out),
            "--trainer.accelerator", "cpu", "--trainer.callbacks", "[]",
            "--trainer.default_root_dir", str(out.parent / f"{out.name}_run"), *extra]  # its config.yaml


def finished(process: subprocess.Popen | tuple[int, str], timeout: float = 600) -> str:
    """The output of a run that must succeed (a process, or what `in_process` returned)."""
    if isinstance(process, subprocess.Popen):
        output, _ = process.communicate(timeout=timeout)
        process = process.returncode, output
    assert process[0] == 0, process[1][-3000:]
    return process[1]


def real_jpeg_shards(root: Path) -> Path:
    """A real set (three JPEG qualities) converted by the real shard converter: the quality source."""
    for quality in (70, 85, 95):
        path = root / "images" / "real" / f"q{quality}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((32, 32, 3), quality, np.uint8)).save(path, quality=quality)
    convert("folder", root / "images", "val", root / "shards", workers=1)
    return root / "shards"


@pytest.mark.slow
def test_generate_is_rank_count_and_restart_invariant_and_feeds_shards(tiny_model_paths: dict[str, Path],
                                                                        posteriors: dict[str, Path],
                                                                        tmp_path: Path) -> None:
    """One rank, two gloo ranks, and a run killed with -9 then resumed give the same image bytes and scores;
    the output folder converts with `--layout folder` and the JPEG qualities drawn from the real set are
    the ones the converter measures. Catches noise seeded by batch/rank, a resume that redoes or skips
    images, a done record written before its image, and an output layout the converter cannot read."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo\n\na cat\n")
    reals = real_jpeg_shards(tmp_path / "real")
    scored = ["--model.init_args.posterior", str(posteriors["spread"]), "--model.init_args.clip",
              str(tiny_model_paths["clip"]), "--model.init_args.num_posterior_samples", "2",
              "--model.init_args.posterior_steps", "2", "--image_format", "jpeg", "--jpeg_quality_from", str(reals)]
    one, two = tmp_path / "one", tmp_path / "two"
    finished(in_process(*generate_args(tiny_model_paths, prompts, one, 3, *scored)))
    finished(cli(*generate_args(tiny_model_paths, prompts, two, 3, *scored, "--trainer.devices", "2",
                                "--trainer.strategy", "ddp")))
    table_one, table_two = pd.read_csv(one / "generation.csv"), pd.read_csv(two / "generation.csv")
    pd.testing.assert_frame_equal(table_one, table_two)
    assert len(table_one) == 6 and table_one["generative_uncertainty"].notna().all()
    assert set(table_one["jpeg_quality"]) <= {70, 85, 95}

    summary = convert("folder", one, "val", tmp_path / "gen_shards", workers=1)
    rows = read_manifest_rows(tmp_path / "gen_shards")
    assert summary.num_samples == 6 and {r["label"] for r in rows} == {1}
    measured = {Path(r["path"]).stem: r["jpeg_quality"] for r in rows}
    assert measured == dict(zip(table_one["key"], table_one["jpeg_quality"]))

    # kill -9 after the first finished image, resume, compare with the uninterrupted run
    killed = tmp_path / "killed"
    many = generate_args(tiny_model_paths, prompts, killed, 8)
    finished(in_process(*generate_args(tiny_model_paths, prompts, tmp_path / "reference", 8)))
    process = cli(*many, start_new_session=True)
    while process.poll() is None and not any((killed / ".generation" / "done").glob("*.json")):
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done_before = len(list((killed / ".generation" / "done").glob("*.json")))
    assert 0 < done_before < 16, f"the kill came too late to test resuming ({done_before} done)"
    finished(in_process(*many))
    pd.testing.assert_frame_equal(pd.read_csv(killed / "generation.csv"),
                                  pd.read_csv(tmp_path / "reference" / "generation.csv"))

    returncode, output = in_process(*generate_args(tiny_model_paths, prompts, killed, 8,
                                                   "--model.init_args.guidance_scale", "1.0"))
    assert returncode != 0 and "was generated with other settings" in output and "guidance_scale" in output
    assert output.strip().count("\n") < 20, "bad input must be one line, not a traceback"


def test_keep_quantile_keeps_the_least_uncertain(tmp_path: Path) -> None:
    """fake/ holds exactly the ⌈q·n⌉ lowest-scored images and a new q re-filters without resampling;
    catches keeping the most uncertain, an off-by-one in the count, and stale files left in fake/."""
    import json

    work = tmp_path / ".generation"
    for sub in ("done", "images"):
        (work / sub).mkdir(parents=True)
    settings = dict.fromkeys(("seed", "scheduler", "num_inference_steps", "guidance_scale", "resolution",
                              "num_posterior_samples", "posterior_steps", "num_perturbations", "guided",
                              "guidance_percentile", "guidance_strength", "sd_source", "unet_hash",
                              "posterior_sha256"), 0) | {"aleatoric_steps": [1]}
    (work / "settings.json").write_text(json.dumps(settings))
    scores = {"k0": 3.0, "k1": -1.0, "k2": 2.0, "k3": 0.5, "k4": 9.0}
    for key, score in scores.items():
        (work / "images" / f"{key}.png").write_bytes(key.encode())
        (work / "done" / f"{key}.json").write_text(json.dumps(
            {"key": key, "file": f"{key}.png", "generative_uncertainty": score, "aleatoric_uncertainty": -score}))
    table = finalize(tmp_path, list(scores), 0.5, "generative")
    assert sorted(p.name for p in (tmp_path / "fake").iterdir()) == ["k1.png", "k2.png", "k3.png"]
    assert list(table.loc[table["status"] == "kept", "key"]) == ["k1", "k2", "k3"]
    finalize(tmp_path, list(scores), 0.4, "aleatoric")
    assert sorted(p.name for p in (tmp_path / "fake").iterdir()) == ["k0.png", "k4.png"]


def test_generate_warns_when_sampling_leaves_the_tiny_sd_training_range(tmp_path: Path) -> None:
    """Bug caught: `tiny-models --train_on` trained the UNet at t in [100, 300] and `generate` then sampled from
    t ≈ 999 with it without a word; the range is an option, recorded in training.json, and leaving it warns."""
    import json
    import warnings

    from cli.__main__ import main

    images = tmp_path / "images"
    images.mkdir()
    for index in range(2):
        Image.fromarray(np.full((RES, RES, 3), 60 * index, np.uint8)).save(images / f"{index}.png")
    for name, extra in (("narrow", []), ("full", ["--timesteps", "[0,999]"])):
        main(["tiny-models", str(tmp_path / name), "--train_on", str(images), "--resolution", str(RES),
              "--vae_steps", "1", "--unet_steps", "1", *extra])
    assert json.loads((tmp_path / "narrow/sd/training.json").read_text())["timesteps"] == [100, 300]
    assert json.loads((tmp_path / "full/sd/training.json").read_text())["timesteps"] == [0, 999]
    with pytest.warns(UserWarning, match=r"trained at timesteps 100-300 only .* sampling uses t=\d+\.\.\d+.*"
                                         r"--timesteps \[0,999\]"):
        UncertaintyGenerator(str(tmp_path / "narrow/sd"), resolution=RES, num_inference_steps=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        UncertaintyGenerator(str(tmp_path / "full/sd"), resolution=RES, num_inference_steps=3)
