"""Uncertainty-scored generation with a local Stable Diffusion (`python -m cli generate`).

Two per-sample uncertainties, both from the model's own sampling:

- **Generative uncertainty** (Jazbec et al., arXiv 2502.20946): M conv_out weight sets drawn from the
  last-layer Laplace posterior of `laplace-fit`, each regenerating from the image's initial noise; the M
  decoded images are embedded by CLIP's image tower and the uncertainty is the entropy of the Gaussian
  fitted to the M embeddings. Adaptations: diagonal covariance (D ≫ M makes a full one singular), a
  variance floor `ENTROPY_VAR_FLOOR` so identical samples give a finite minimum instead of −inf, and the
  paper's cost reductions as settings (`num_posterior_samples`, `posterior_steps`). The posterior was
  fitted at one timestep; conv_out's weights are shared by all timesteps, so it is used at every step.
  The M regenerations are one batched trunk pass per step: a forward hook swaps conv_out's output for
  a per-row convolution with that row's weight sample (no M copies of the UNet).
- **Pixel-wise aleatoric uncertainty** (De Vita & Belagiannis, arXiv 2412.00205): at chosen steps t,
  x̂₀ = (x_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t is re-noised K times to t, x_t^k = √ᾱ_t·x̂₀ + √(1−ᾱ_t)·ε_k, and the
  map is Var_k ε̂(x_t^k) per latent pixel (population variance), averaged over the chosen steps.
  With `guided`, ε̂ ← ε̂ + λ·1[U > τ]⊙∇_{x_t} Σ 1[U > τ]·U at those steps, τ the per-image
  `guidance_percentile` of U: gradient ascent on the uncertainty of the most uncertain pixels only.

Every random draw (initial latent, posterior weights, perturbations) comes from its own CPU generator
seeded by (seed, image key, purpose), so an image is the same at any rank count, after a restart, and
whatever the other settings (changing M never changes the image). Classifier-free guidance is applied to
every ε̂ the methods use (the latent-space text-conditioned adaptation of both papers).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from core.seeding import image_generator
from lightning_modules.diffusion_pass import AutocastDtype, autocast_context
from core.hashing import file_sha256
from lightning_modules.laplace_fit import load_posterior
from lightning_modules.pretrained import load_clip_rn50, load_stable_diffusion, weights_hash

SchedulerName = Literal["ddim", "dpm_solver"]
# Floor on each embedding dimension's variance: identical posterior samples (zero spread) give the finite
# entropy ½·D·ln(2πe·1e-12) instead of −inf; far below the spread any real weight sample produces.
ENTROPY_VAR_FLOOR = 1e-12

EpsFn = Callable[[torch.Tensor, int], torch.Tensor]


def make_scheduler(name: SchedulerName, config: Any, steps: int) -> Any:
    """A fresh deterministic diffusers scheduler (multistep solvers keep state, so one per sampling run)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    classes = {"ddim": DDIMScheduler, "dpm_solver": DPMSolverMultistepScheduler}
    if name not in classes:
        raise ValueError(f"scheduler must be one of {sorted(classes)}, got {name!r}")
    scheduler = classes[name].from_config(config)
    scheduler.set_timesteps(steps)
    return scheduler


def diagonal_gaussian_entropy(embeddings: torch.Tensor, var_floor: float = ENTROPY_VAR_FLOOR) -> torch.Tensor:
    """Entropy ½·Σ_d ln(2πe·σ²_d) of the diagonal Gaussian fitted to (B, M, D) embeddings → (B,), fp64.

    σ²_d is the unbiased variance over the M samples, floored at `var_floor` (see ENTROPY_VAR_FLOOR).
    """
    if embeddings.dim() != 3 or embeddings.shape[1] < 2:
        raise ValueError(f"embeddings must be (B, M >= 2, D), got shape {tuple(embeddings.shape)}")
    var = embeddings.double().var(dim=1, correction=1).clamp_min(var_floor)
    return 0.5 * (var.shape[-1] * math.log(2 * math.pi * math.e) + var.log().sum(-1))


def perturbed_eps_variance(eps_fn: EpsFn, x0_hat: torch.Tensor, alpha_bar: float, timestep: int,
                           noise: torch.Tensor) -> torch.Tensor:
    """De Vita's map: Var_k ε̂(√ᾱ·x̂₀ + √(1−ᾱ)·ε_k) for noise (B, K, C, h, w), one batched ε̂ call → (B, C, h, w)."""
    batch, k = noise.shape[:2]
    x_k = math.sqrt(alpha_bar) * x0_hat.unsqueeze(1) + math.sqrt(1 - alpha_bar) * noise
    eps_k = eps_fn(x_k.flatten(0, 1), timestep).unflatten(0, (batch, k))
    return eps_k.float().var(dim=1, correction=0)


def above_percentile(uncertainty: torch.Tensor, percentile: float) -> torch.Tensor:
    """Mask of the elements above each image's `percentile` of its (B, ...) uncertainty (De Vita's threshold τ)."""
    threshold = torch.quantile(uncertainty.detach().flatten(1).float(), percentile / 100, dim=1)
    return uncertainty.detach() > threshold.view(-1, *[1] * (uncertainty.dim() - 1))


def per_row_conv3x3(phi: torch.Tensor, weights: torch.Tensor, biases: torch.Tensor) -> torch.Tensor:
    """Row r of φ (R, C, h, w) convolved with its own 3×3 weights (R, O, C, 3, 3) and biases (R, O): one grouped conv."""
    rows, channels, height, width = phi.shape
    out = F.conv2d(phi.reshape(1, rows * channels, height, width), weights.reshape(-1, channels, 3, 3).to(phi.dtype),
                   biases.reshape(-1).to(phi.dtype), padding=1, groups=rows)
    return out.view(rows, -1, height, width)


@dataclass
class GeneratedBatch:
    """What one batch of prompts gave: uint8 images and the scores that were asked for."""

    images: torch.Tensor  # (B, 3, R, R) uint8
    generative: torch.Tensor | None  # (B,) entropy in CLIP space (nats)
    aleatoric_map: torch.Tensor | None  # (B, 4, h, w) mean over the chosen steps of Var_k ε̂
    guided_pixels: torch.Tensor | None  # (B,) fraction of latent pixels that guidance updated (mean over steps)


class UncertaintyGenerator(pl.LightningModule):
    """Text-to-image sampling with generative and pixel-wise aleatoric uncertainty per image (predict only)."""

    def __init__(self, sd: str, posterior: str | None = None, clip: str | None = None,
                 scheduler: SchedulerName = "ddim", num_inference_steps: int = 50, guidance_scale: float = 7.5,
                 resolution: int = 512, seed: int = 0, num_posterior_samples: int = 5,
                 posterior_steps: int | None = None, aleatoric_steps: list[int] = [],  # noqa: B006
                 num_perturbations: int = 5, guided: bool = False, guidance_percentile: float = 95.0,
                 guidance_strength: float = 0.1, autocast_dtype: AutocastDtype = "float32") -> None:
        """Args:
            posterior: file from `laplace-fit` (with `clip`: generative uncertainty).
            clip: CLIP image tower for the semantic likelihood (as `load_clip_rn50`).
            posterior_steps: sampling steps of the M regenerations (fewer = the paper's cost reduction).
            aleatoric_steps: indices into the sampling loop (0 = first, most noisy) where De Vita's map is taken.
            num_perturbations: K re-noised copies per aleatoric step.
            guided: De Vita's uncertainty-guided update at the aleatoric steps.
        """
        super().__init__()
        self.save_hyperparameters()
        self._validate()
        parts = load_stable_diffusion(sd)
        self._warn_untrained_timesteps(sd, parts)
        self.vae, self.unet, self.text_encoder = parts.vae, parts.unet, parts.text_encoder
        self.parts, self.sd_source = parts, parts.source
        self._text: dict[tuple[str, torch.device], torch.Tensor] = {}
        self.posterior_sha256: str | None = None
        if posterior is not None:
            self._load_posterior(posterior)
        self.clip_model = load_clip_rn50(clip) if clip is not None else None
        self.clip_visual = self.clip_model.visual if self.clip_model is not None else None  # moves with the module

    def _validate(self) -> None:
        hp = self.hparams
        if (hp.posterior is None) != (hp.clip is None):
            raise ValueError("generative uncertainty needs both posterior=PATH (laplace-fit) and clip=...; "
                             f"got posterior={hp.posterior!r}, clip={hp.clip!r}")
        if hp.num_inference_steps < 1 or (hp.posterior_steps is not None and hp.posterior_steps < 1):
            raise ValueError(f"num_inference_steps and posterior_steps must be >= 1, got "
                             f"{hp.num_inference_steps} and {hp.posterior_steps}")
        if hp.posterior is not None and hp.num_posterior_samples < 2:
            raise ValueError(f"num_posterior_samples must be >= 2 (a spread), got {hp.num_posterior_samples}")
        bad = [s for s in hp.aleatoric_steps if not 0 <= s < hp.num_inference_steps]
        if bad or len(set(hp.aleatoric_steps)) != len(hp.aleatoric_steps):
            raise ValueError(f"aleatoric_steps={list(hp.aleatoric_steps)} must be distinct step indices in "
                             f"[0, {hp.num_inference_steps})")
        if hp.aleatoric_steps and hp.num_perturbations < 2:
            raise ValueError(f"num_perturbations must be >= 2 (a variance), got {hp.num_perturbations}")
        if not 0 <= hp.guidance_percentile < 100:
            raise ValueError(f"guidance_percentile must be in [0, 100), got {hp.guidance_percentile}")
        if hp.guided and not hp.aleatoric_steps:
            raise ValueError("guided=true needs aleatoric_steps (the steps whose uncertainty guides sampling)")
        if hp.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8, got {hp.resolution}")

    def _warn_untrained_timesteps(self, sd: str, parts: Any) -> None:
        """One warning when sampling visits timesteps a tiny SD's UNet was never trained at (its training.json)."""
        from lightning_modules.tiny_models import trained_timesteps

        trained = trained_timesteps(sd)
        if trained is None:
            return
        sampled = make_scheduler(self.hparams.scheduler, parts.scheduler.config, self.hparams.num_inference_steps)
        steps = sampled.timesteps.tolist()
        outside = [t for t in steps if not trained[0] <= t <= trained[1]]
        if outside:
            warnings.warn(f"generate: the SD at {sd} was trained at timesteps {trained[0]}-{trained[1]} only "
                          f"(training.json) but sampling uses t={max(steps)}..{min(steps)}; {len(outside)} of "
                          f"{len(steps)} steps are outside, so its images are not samples of the training data: "
                          "retrain with `python -m cli tiny-models DIR --train_on IMAGES --timesteps [0,999]`",
                          stacklevel=2)

    def _load_posterior(self, path: str) -> None:
        """σ²_W, σ²_b of conv_out; refused if fitted on another UNet (timestep and prompt do not matter here)."""
        posterior = load_posterior(path, conv_out_shape=tuple(self.unet.conv_out.weight.shape))
        fitted_on = posterior["metadata"]["unet_hash"]
        if fitted_on != weights_hash(self.unet):
            raise ValueError(f"posterior {path} was fitted on UNet {fitted_on}, not on the UNet of {self.sd_source}")
        self.register_buffer("var_w", posterior["var_w"].float(), persistent=False)
        self.register_buffer("var_b", posterior["var_b"].float(), persistent=False)
        self.posterior_sha256 = file_sha256(path)

    def settings(self) -> dict[str, Any]:
        """Everything that determines an image and its scores (recorded per run, compared on resume)."""
        return {**dict(self.hparams), "sd_source": self.sd_source, "unet_hash": weights_hash(self.unet),
                "posterior_sha256": self.posterior_sha256}

    # -- conditioning and one guided ε̂ ------------------------------------------------------------------

    def text_embedding(self, prompt: str) -> torch.Tensor:
        """CLIP text embedding (1, L, D) of a prompt, cached per device."""
        cache_key = (prompt, self.device)
        if cache_key not in self._text:
            tok = self.parts.tokenizer
            ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(self.device)
            with torch.no_grad():
                self._text[cache_key] = self.text_encoder(ids)[0]
        return self._text[cache_key]

    def eps_fn(self, prompts: list[str], repeats: int = 1) -> EpsFn:
        """ε̂(x, t) with classifier-free guidance for rows `prompts` each repeated `repeats` times (row-major).

        An x with a multiple of those rows (e.g. K perturbations per row) repeats each row's prompt in turn.
        """
        cond = torch.cat([self.text_embedding(p) for p in prompts]).repeat_interleave(repeats, dim=0)
        scale = self.hparams.guidance_scale

        def eps(x: torch.Tensor, timestep: int) -> torch.Tensor:
            rows = cond.repeat_interleave(x.shape[0] // cond.shape[0], dim=0)
            text = torch.cat([self.text_embedding("").expand_as(rows), rows])
            with autocast_context(x.device, self.hparams.autocast_dtype):
                t = torch.full((2 * x.shape[0],), timestep, device=x.device, dtype=torch.long)
                out = self.unet(torch.cat([x, x]).to(self.unet.dtype), t,
                                encoder_hidden_states=text.to(self.unet.dtype)).sample.float()
            uncond, conditional = out.chunk(2)
            return uncond + scale * (conditional - uncond)
        return eps

    # -- sampling ----------------------------------------------------------------------------------------

    def latent_shape(self) -> tuple[int, int, int]:
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        side = self.hparams.resolution // factor
        return self.vae.config.latent_channels, side, side

    def sample(self, x_t: torch.Tensor, eps_fn: EpsFn, steps: int,
               perturbation_noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                        torch.Tensor | None]:
        """Run the scheduler from x_T; at `aleatoric_steps` take De Vita's map (and guide if asked).

        perturbation_noise: (B, S, K, C, h, w), the K noises of each of the S aleatoric steps.
        Returns (x₀ latents, mean aleatoric map or None, mean guided-pixel fraction or None).
        """
        hp = self.hparams
        scheduler = make_scheduler(hp.scheduler, self.parts.scheduler.config, steps)
        x = x_t * scheduler.init_noise_sigma
        maps, fractions = [], []
        wanted = list(hp.aleatoric_steps) if perturbation_noise is not None else []
        for index, t in enumerate(scheduler.timesteps.tolist()):
            if index in wanted:
                noise = perturbation_noise[:, wanted.index(index)].to(x.device)
                eps, uncertainty, fraction = self._aleatoric_step(eps_fn, x, t, noise)
                maps.append(uncertainty)
                fractions.append(fraction)
            else:
                eps = eps_fn(x, t)  # both schedulers are VP ε-schedulers: their input scaling is the identity
            x = scheduler.step(eps, t, x).prev_sample
        if not maps:
            return x, None, None
        return x, torch.stack(maps).mean(0), (torch.stack(fractions).mean(0) if hp.guided else None)

    def _aleatoric_step(self, eps_fn: EpsFn, x: torch.Tensor, t: int,
                        noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ε̂ at x_t, De Vita's map U_t, and (if guided) ε̂ moved up ∇U on the pixels above the percentile."""
        hp = self.hparams
        alpha_bar = float(self.parts.scheduler.alphas_cumprod[t])
        with torch.enable_grad():
            x = x.detach().requires_grad_(hp.guided)
            eps = eps_fn(x, t)
            x0_hat = (x - math.sqrt(1 - alpha_bar) * eps) / math.sqrt(alpha_bar)
            uncertainty = perturbed_eps_variance(eps_fn, x0_hat, alpha_bar, t, noise)
            if not hp.guided:
                return eps.detach(), uncertainty.detach(), uncertainty.new_zeros(x.shape[0])
            above = above_percentile(uncertainty, hp.guidance_percentile)
            (gradient,) = torch.autograd.grad((uncertainty * above).sum(), x)
        guided = eps.detach() + hp.guidance_strength * above * gradient
        return guided, uncertainty.detach(), above.flatten(1).float().mean(1)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → images in [-1, 1] (fp32)."""
        with autocast_context(latents.device, self.hparams.autocast_dtype):
            images = self.vae.decode((latents / self.vae.config.scaling_factor).to(self.vae.dtype)).sample
        return images.float().clamp(-1, 1)

    def generative_uncertainty(self, x_t: torch.Tensor, prompts: list[str],
                               generators: list[torch.Generator]) -> torch.Tensor:
        """Entropy of CLIP embeddings of M regenerations from x_T, one conv_out posterior sample each."""
        hp = self.hparams
        m = hp.num_posterior_samples
        conv = self.unet.conv_out
        z_w = torch.stack([torch.randn((m, *conv.weight.shape), generator=g) for g in generators]).to(self.device)
        z_b = torch.stack([torch.randn((m, conv.out_channels), generator=g) for g in generators]).to(self.device)
        weights = (conv.weight.float() + self.var_w.sqrt() * z_w).flatten(0, 1)  # (B·M, O, C, 3, 3)
        biases = (conv.bias.float() + self.var_b.sqrt() * z_b).flatten(0, 1)
        # The ε̂ call stacks [uncond rows; cond rows], so both halves use the same per-row sample.
        row_weights, row_biases = torch.cat([weights, weights]), torch.cat([biases, biases])
        hook = conv.register_forward_hook(lambda _m, args, _out: per_row_conv3x3(args[0], row_weights, row_biases))
        try:
            latents, _, _ = self.sample(x_t.repeat_interleave(m, dim=0), self.eps_fn(prompts, repeats=m),
                                        hp.posterior_steps or hp.num_inference_steps)
        finally:
            hook.remove()
        images = self.decode(latents)
        with autocast_context(images.device, hp.autocast_dtype):
            _, embeddings = self.clip_model.layer3_and_pooled(self.clip_model.normalize(images))
        return diagonal_gaussian_entropy(embeddings.float().unflatten(0, (len(prompts), m)))

    @torch.no_grad()
    def generate(self, keys: list[str], prompts: list[str]) -> GeneratedBatch:
        """Images for (key, prompt) pairs; each key's draws are its own, so batching never changes a result."""
        hp = self.hparams
        shape = self.latent_shape()
        x_t = torch.stack([torch.randn(shape, generator=image_generator(hp.seed, "diffusion_noise", f"{k}/latent"))
                           for k in keys]).to(self.device)
        noise = None
        if hp.aleatoric_steps:
            sizes = (len(hp.aleatoric_steps), hp.num_perturbations, *shape)
            noise = torch.stack([torch.randn(sizes, generator=image_generator(hp.seed, "diffusion_noise",
                                                                              f"{k}/aleatoric")) for k in keys])
        latents, aleatoric, guided = self.sample(x_t, self.eps_fn(prompts), hp.num_inference_steps, noise)
        images = ((self.decode(latents) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        generative = None
        if hp.posterior is not None:
            generative = self.generative_uncertainty(
                x_t, prompts, [image_generator(hp.seed, "diffusion_noise", f"{k}/posterior") for k in keys])
        return GeneratedBatch(images, generative, aleatoric, guided)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """One batch of work items (key, prompt, indices) → images and scores on the host."""
        out = self.generate(list(batch["key"]), list(batch["prompt"]))
        return {"key": list(batch["key"]), "prompt": list(batch["prompt"]),
                "prompt_index": batch["prompt_index"].tolist(), "image_index": batch["image_index"].tolist(),
                "image": out.images.cpu(),
                "generative": None if out.generative is None else out.generative.cpu(),
                "aleatoric_map": None if out.aleatoric_map is None else out.aleatoric_map.cpu(),
                "guided_pixels": None if out.guided_pixels is None else out.guided_pixels.cpu()}
