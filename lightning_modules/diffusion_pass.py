"""The one fused Stable Diffusion pass that phase 1 and the Laplace fit share.

VAE encode once → N noised copies of each latent → one UNet call on B·N inputs, with conv_out's
input φ captured by a forward pre-hook. Every random draw comes from a per-image generator seeded
by (seed, key) (`core.seeding`; the key is the image's content hash in phase 1), drawn on CPU, so results never
depend on batch composition, rank, worker, device or restart. The draw order is documented in
`feature_extractor`.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import torch

from lightning_modules.pretrained import StableDiffusionParts

AutocastDtype = Literal["float32", "bfloat16", "float16"]


def normalise_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, R, R) → float32 in [-1, 1] where the images are (on the device: 4× less to copy than float32).

    Same arithmetic as the float path of `datamodules.image_protocols` (x / 127.5 − 1 in float32), so both
    give bit-identical inputs. Float input is taken as already normalised.
    """
    if images.dtype == torch.uint8:
        return images.float() / 127.5 - 1
    return images.float()


def autocast_context(device: torch.device, dtype: AutocastDtype):
    """Autocast for the big forwards when a reduced dtype is asked for; plain fp32 otherwise."""
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))


@dataclass
class PassOutput:
    """Per-noise results of the fused pass, all fp32, shaped (B, N, ...)."""

    eps_hat: torch.Tensor  # UNet ε-prediction (conv_out output), (B, N, 4, h, w)
    noise: torch.Tensor  # the ε_j that were added, (B, N, 4, h, w)
    phi: torch.Tensor  # conv_out's input φ_j, (B, N, C, h, w)
    # The UNet's input x_t exactly as the pass fed it ((B·N, C, h, w), UNet dtype and layout): kept, not copied, so
    # a map can ask for ε̂ under another conditioning on the very same noised latents (`conditioned_eps`).
    x_t: torch.Tensor


class DiffusionPass:
    """Fused VAE + UNet forward at one timestep; owns no weights, only the settings of the pass."""

    def __init__(self, parts: StableDiffusionParts, timestep: int, num_noises: int, prompt: str,
                 latent: Literal["sample", "mean"], autocast_dtype: AutocastDtype = "float32",
                 compile_unet: bool = False, channels_last: bool = False) -> None:
        num_steps = parts.scheduler.config.num_train_timesteps
        if not 0 <= timestep < num_steps:
            raise ValueError(f"timestep must be in [0, {num_steps}), got {timestep}")
        if num_noises < 1:
            raise ValueError(f"num_noises must be >= 1, got {num_noises}")
        if latent not in ("sample", "mean"):
            raise ValueError(f"latent must be 'sample' or 'mean', got {latent!r}")
        self.parts, self.timestep, self.num_noises, self.prompt = parts, timestep, num_noises, prompt
        self.latent, self.autocast_dtype = latent, autocast_dtype
        self._text: dict[torch.device, torch.Tensor] = {}
        # Kernel settings: a compiled UNet (the hook on conv_out is traced with it) and the inputs' memory layout.
        self._unet = torch.compile(parts.unet) if compile_unet else parts.unet
        self._layout = torch.channels_last if channels_last else torch.contiguous_format

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """(channels, h, w) of the VAE latent for a square image of side `resolution`."""
        factor = 2 ** (len(self.parts.vae.config.block_out_channels) - 1)
        return self.parts.vae.config.latent_channels, resolution // factor, resolution // factor

    def text_embedding(self, device: torch.device) -> torch.Tensor:
        """The prompt's CLIP text embedding (1, L, D), computed once per device and cached."""
        if device not in self._text:
            tok = self.parts.tokenizer
            ids = tok(self.prompt, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(device)
            with torch.no_grad():
                self._text[device] = self.parts.text_encoder(ids)[0]
        return self._text[device]

    def draw(self, generators: list[torch.Generator], resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image draws on CPU, in a fixed order: the VAE latent's ε (always drawn, so the N noises do
        not depend on `latent`), then the N diffusion noises (so N=4 is a prefix of N=8)."""
        shape = self.latent_shape(resolution)
        latent_eps = torch.stack([torch.randn(shape, generator=g) for g in generators])
        noise = torch.stack([torch.randn((self.num_noises, *shape), generator=g) for g in generators])
        return latent_eps, noise

    def __call__(self, images: torch.Tensor, generators: list[torch.Generator]) -> PassOutput:
        """Run the fused pass on images (B, 3, R, R) in [-1, 1], one generator per image."""
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[-1] != images.shape[-2]:
            raise ValueError(f"images must be (B, 3, R, R), got shape {tuple(images.shape)}")
        if len(generators) != images.shape[0]:
            raise ValueError(f"got {len(generators)} generators for {images.shape[0]} images")
        device, batch, n = images.device, images.shape[0], self.num_noises
        latent_eps, noise = (x.to(device) for x in self.draw(generators, images.shape[-1]))
        vae, unet, scheduler = self.parts.vae, self.parts.unet, self.parts.scheduler
        captured: list[torch.Tensor] = []
        hook = unet.conv_out.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
        layout, text = self._layout, self.text_embedding(device)  # the text encoder outside autocast
        try:
            with autocast_context(device, self.autocast_dtype):
                dist = vae.encode(images.to(vae.dtype).contiguous(memory_format=layout)).latent_dist
                x0 = dist.mean.float() + (dist.std.float() * latent_eps if self.latent == "sample" else 0.0)
                x0 = x0 * vae.config.scaling_factor
                timesteps = torch.full((batch * n,), self.timestep, device=device, dtype=torch.long)
                x_t = scheduler.add_noise(x0.repeat_interleave(n, dim=0), noise.flatten(0, 1), timesteps)
                x_t = x_t.to(unet.dtype).contiguous(memory_format=layout)
                eps_hat = self._eps(x_t, text)
        finally:
            hook.remove()
        (phi,) = captured
        return PassOutput(eps_hat.float().unflatten(0, (batch, n)), noise, phi.float().unflatten(0, (batch, n)), x_t)

    def _eps(self, x_t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The UNet's ε̂ for the pass's input x_t (B·N rows) at the pass's timestep under text (1, L, D)."""
        timesteps = torch.full((x_t.shape[0],), self.timestep, device=x_t.device, dtype=torch.long)
        return self._unet(x_t, timesteps, encoder_hidden_states=text.expand(x_t.shape[0], -1, -1).to(
            self.parts.unet.dtype)).sample

    def conditioned_eps(self, out: PassOutput, text: torch.Tensor) -> torch.Tensor:
        """ε̂ (B, N, C, h, w) fp32 of a pass's own x_t under another conditioning `text` (L, D): one UNet call on its
        B·N rows, same kernels, autocast and row grouping as the pass, so the prompt's own embedding gives ε̂ exactly."""
        with autocast_context(out.x_t.device, self.autocast_dtype):
            eps = self._eps(out.x_t, text.to(out.x_t.device).unsqueeze(0))
        return eps.float().unflatten(0, tuple(out.noise.shape[:2]))
