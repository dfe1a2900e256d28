"""Fit the diagonal last-layer Laplace posterior of SD's `conv_out` over calibration images (`python -m cli laplace-fit`).

Forward passes only: each predict_step adds the GGN sums of one batch on its own rank; the sums
are all-reduced once at the end of the epoch (no collectives per step, so uneven ranks cannot hang)
and rank 0 writes the posterior file that `FeatureExtractor` loads for DEU/MI.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch

from core.checkpoint_io import safe_torch_load
from core.outputs import output_file
from core.seeding import image_generator
from lightning_modules.diffusion_pass import AutocastDtype, DiffusionPass, normalise_images
from lightning_modules.pretrained import load_stable_diffusion, weights_hash
from lightning_modules.uncertainty import (conv3x3_ggn_sums, diagonal_posterior, estimated_sigma,
                                           log_marginal_likelihood, tune_prior_precision)

POSTERIOR_FORMAT = "conv_out-diag-laplace-v2"  # v2: σ fixed or estimated, recorded in the file
POSTERIOR_FORMATS = (POSTERIOR_FORMAT, "conv_out-diag-laplace-v1")
SIGMA_MODES = ("fixed", "estimated")


def load_posterior(path: str | Path, conv_out_shape: tuple[int, ...] | None = None) -> dict[str, Any]:
    """Read and check a posterior file written by LaplaceFit; one clear error line if it is not a usable one.

    Loaded by `core.checkpoint_io.safe_torch_load` (tensors and plain containers only, no code). Checked: format, the
    variance tensors' shapes (against `conv_out_shape` when given), finite and positive variances, σ.
    Files of the first format (σ always fixed) read as `sigma: "fixed"`.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"posterior file {file} not found; fit one with `python -m cli laplace-fit`")
    posterior = safe_torch_load(file, "posterior file")
    if not isinstance(posterior, dict) or posterior.get("format") not in POSTERIOR_FORMATS:
        raise ValueError(f"{file} is not a {POSTERIOR_FORMAT} posterior file written by `python -m cli laplace-fit`")
    posterior.setdefault("sigma", "fixed")
    _check_posterior(file, posterior, conv_out_shape)
    return posterior


def _check_posterior(file: Path, posterior: dict[str, Any], conv_out_shape: tuple[int, ...] | None) -> None:
    """Shapes, finiteness and positivity of what DEU is computed from."""
    var_w, var_b = posterior.get("var_w"), posterior.get("var_b")
    if not (isinstance(var_w, torch.Tensor) and isinstance(var_b, torch.Tensor)) or var_w.dim() != 4 \
            or var_b.dim() != 1 or var_b.shape[0] != var_w.shape[0]:
        raise ValueError(f"posterior file {file}: var_w must be (O, C, 3, 3) and var_b (O,) tensors, got "
                         f"{getattr(var_w, 'shape', type(var_w))} and {getattr(var_b, 'shape', type(var_b))}")
    if conv_out_shape is not None and tuple(var_w.shape) != tuple(conv_out_shape):
        raise ValueError(f"posterior file {file}: var_w shape {tuple(var_w.shape)} does not match conv_out "
                         f"{tuple(conv_out_shape)} (fitted for another UNet)")
    for name, values in (("var_w", var_w), ("var_b", var_b)):
        bad = int((~torch.isfinite(values) | (values <= 0)).sum())
        if bad:
            raise ValueError(f"posterior file {file}: {bad} of {values.numel()} {name} values are not finite and "
                             "positive; refit it with `python -m cli laplace-fit`")
        if float(values.double().max()) > torch.finfo(torch.float32).max:
            raise ValueError(f"posterior file {file}: {name} exceeds float32 range")
    sigma = posterior.get("sigma_noise")
    if posterior["sigma"] not in SIGMA_MODES or not isinstance(sigma, (int, float)) or not 0 < sigma < math.inf:
        raise ValueError(f"posterior file {file}: sigma {posterior['sigma']!r} / sigma_noise {sigma!r} is not a mode "
                         f"in {SIGMA_MODES} with a finite positive value")
    if not isinstance(posterior.get("metadata"), dict):
        raise ValueError(f"posterior file {file}: no metadata dict")


class LaplaceFit(pl.LightningModule):
    """Accumulate Σ unfold(φ)², pixel counts and the ε residual over calibration images; save the posterior.

    Rows whose `error` is non-empty (undecodable images) are skipped. The MAP is the pretrained
    conv_out; the likelihood is N(ε | ε̂, σ²) per latent element, as in the ε-MSE training loss, and each
    of an image's N noised copies is a separate observation (so the variances shrink like 1/(n_cal·N)).

    σ² is the residual noise of ε̂ (not the prior on ε, which is N(0, I)): `sigma="estimated"` (default)
    takes its maximum-likelihood value RSS / (number of latent elements), `sigma="fixed"` uses `sigma_noise`.
    DEU scales with σ², so this choice sets the scale of DEU and MI; it is recorded in the posterior file.
    """

    def __init__(self, sd: str, output: str = "posterior.pt", timestep: int = 200, num_noises: int = 4,
                 prompt: str = "a photo", latent: Literal["sample", "mean"] = "sample", seed: int = 0,
                 sigma: Literal["fixed", "estimated"] = "estimated", sigma_noise: float = 1.0,
                 prior_precision: float = 1.0, tune_prior_precision: bool = False,
                 autocast_dtype: AutocastDtype = "float32") -> None:
        super().__init__()
        self.save_hyperparameters()
        if sigma_noise <= 0 or prior_precision <= 0:
            raise ValueError(f"sigma_noise and prior_precision must be > 0, got {sigma_noise} and {prior_precision}")
        if sigma not in SIGMA_MODES:
            raise ValueError(f"sigma must be one of {SIGMA_MODES}, got {sigma!r}")
        output_file(output, "--model.init_args.output")  # before the pass: an unwritable output is one line now
        parts = load_stable_diffusion(sd)
        self.vae, self.unet, self.text_encoder = parts.vae, parts.unet, parts.text_encoder
        self.sd_source = parts.source
        self.diffusion = DiffusionPass(parts, timestep, num_noises, prompt, latent, autocast_dtype)
        channels = self.unet.conv_out.in_channels
        # float64 sums, registered so they follow the module's device (NCCL reduces device tensors).
        self.register_buffer("ggn_w", torch.zeros(channels, 3, 3, dtype=torch.float64), persistent=False)
        self.register_buffer("stats", torch.zeros(3, dtype=torch.float64), persistent=False)  # count, RSS, images
        self.register_buffer("resolution", torch.zeros((), dtype=torch.long), persistent=False)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Add one batch's GGN sums; nothing is returned (no predictions are kept)."""
        valid = [i for i, err in enumerate(batch["error"]) if not err]
        if not valid:
            return
        images = batch["image"][valid]
        res = images.shape[-1]
        if int(self.resolution) not in (0, res):
            raise ValueError(f"calibration images changed resolution from {int(self.resolution)} to {res} mid-run")
        self.resolution.fill_(res)
        if "sha256" not in batch:
            raise ValueError("batch has no 'sha256' (content hash per image): read the calibration images through "
                             "ImageShardDataModule")
        images = normalise_images(images)
        out = self.diffusion(images, [image_generator(self.hparams.seed, "diffusion_noise", batch["sha256"][i])
                                      for i in valid])
        phi = out.phi.flatten(0, 1)
        self.ggn_w += conv3x3_ggn_sums(phi)
        rss = (out.eps_hat - out.noise).double().square().sum()
        self.stats += torch.stack([rss.new_tensor(phi.shape[0] * phi.shape[-2] * phi.shape[-1]), rss,
                                   rss.new_tensor(len(valid))])

    def on_predict_epoch_end(self) -> None:
        """Sum the accumulators over ranks, then write the posterior file from rank 0."""
        strategy = self.trainer.strategy
        ggn_w = strategy.reduce(self.ggn_w.clone(), reduce_op="sum").cpu()
        count, rss, num_images = strategy.reduce(self.stats.clone(), reduce_op="sum").cpu().tolist()
        resolution = int(strategy.reduce(self.resolution.clone(), reduce_op="max"))
        if self.trainer.is_global_zero:
            if num_images == 0:
                raise RuntimeError("laplace-fit saw no decodable calibration image; check the datamodule's shards")
            self.save_posterior(ggn_w, count, rss, int(num_images), resolution)

    def save_posterior(self, ggn_w: torch.Tensor, count: float, rss: float, num_images: int, resolution: int) -> None:
        """Turn the summed GGN into variances (tuning λ if asked) and torch.save them with their provenance."""
        hp = self.hparams
        conv = self.unet.conv_out
        weight, bias = conv.weight.detach().cpu(), conv.bias.detach().cpu()
        sigma_noise = estimated_sigma(rss, count, conv.out_channels) if hp.sigma == "estimated" else hp.sigma_noise
        lam = (tune_prior_precision(ggn_w, count, weight, bias, sigma_noise, rss) if hp.tune_prior_precision
               else hp.prior_precision)
        post = diagonal_posterior(ggn_w, count, conv.out_channels, sigma_noise, lam)
        output = Path(hp.output).expanduser()
        output.parent.mkdir(parents=True, exist_ok=True)
        torch.save({
            "format": POSTERIOR_FORMAT, "var_w": post.var_w, "var_b": post.var_b,
            "prior_precision": lam, "sigma": hp.sigma, "sigma_noise": sigma_noise, "ggn_w": ggn_w, "count": count,
            "sum_sq_residual": rss, "log_marginal_likelihood": log_marginal_likelihood(
                lam, ggn_w, count, weight, bias, sigma_noise, rss),
            "metadata": {"unet_hash": weights_hash(self.unet), "timestep": hp.timestep, "num_noises": hp.num_noises,
                         "prompt": hp.prompt, "resolution": resolution, "num_images": num_images,
                         "latent": hp.latent, "seed": hp.seed, "sd": self.sd_source,
                         "prior_precision_tuned": hp.tune_prior_precision, "sigma": hp.sigma,
                         "sigma_noise": sigma_noise},
        }, output)
