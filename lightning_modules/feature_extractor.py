"""Phase 1 per-image features (LaRE, DEU, aleatoric, MI, frozen CLIP maps) in one fused pass per batch.

Settings are captured by `save_hyperparameters`, so `provenance()` (settings + weight hashes +
posterior hash) is what the feature store records; a store opened with other settings is refused.
All maps are on the ε-prediction scale (see `uncertainty` for why DEUA's μ-scale is a constant factor).
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch

from lightning_modules.diffusion_pass import AutocastDtype, DiffusionPass, autocast_context, key_generator
from lightning_modules.laplace_fit import file_sha256, load_posterior
from lightning_modules.pretrained import load_clip_rn50, load_stable_diffusion, weights_hash
from lightning_modules.uncertainty import (aleatoric_variance, closed_form_deu, latent_reconstruction_error, mc_deu,
                                           mutual_information)

MAP_OUTPUTS = ("lare", "deu", "aleatoric", "mi")
CLIP_OUTPUTS = ("clip_layer3", "clip_pooled")
PASS_THROUGH = ("key", "row", "shard_index", "label", "generator", "error")


class FeatureExtractor(pl.LightningModule):
    """predict_step: VAE encode once, one UNet call on the B·N noised latents, every requested map from it.

    Noise (VAE latent sample, N diffusion noises, then MC weight samples) comes from a CPU generator
    seeded by (seed, key), so a row's features do not depend on its batch, rank, worker or restart.
    Rows with a decode `error` are computed on their zero image; the writer marks them.
    """

    def __init__(self, sd: str, posterior: str | None = None, clip: str | None = None,
                 outputs: list[str] = ["lare", "deu"], timestep: int = 200, num_noises: int = 4,  # noqa: B006
                 deu_mode: Literal["closed_form", "mc"] = "closed_form", num_weight_samples: int = 16,
                 prompt: str = "a photo", latent: Literal["sample", "mean"] = "sample", seed: int = 0,
                 autocast_dtype: AutocastDtype = "float32") -> None:
        super().__init__()
        self.save_hyperparameters()
        self.outputs = list(outputs)
        self._validate()
        parts = load_stable_diffusion(sd)
        self.vae, self.unet, self.text_encoder = parts.vae, parts.unet, parts.text_encoder
        self.sd_source = parts.source
        self.diffusion = DiffusionPass(parts, timestep, num_noises, prompt, latent, autocast_dtype)
        self._hashes: dict[str, str] = {}
        self.posterior_meta: dict[str, Any] | None = None
        if posterior is not None:
            self._load_posterior(posterior)
        self.clip_model = load_clip_rn50(clip) if clip is not None else None
        self.clip_visual = self.clip_model.visual if self.clip_model is not None else None  # moves with the module

    def _validate(self) -> None:
        """Refuse inconsistent settings with one clear line, before any weights are loaded."""
        hp, known = self.hparams, MAP_OUTPUTS + CLIP_OUTPUTS
        unknown = [o for o in self.outputs if o not in known]
        if unknown or not self.outputs or len(set(self.outputs)) != len(self.outputs):
            raise ValueError(f"outputs={self.outputs} must be a non-empty list of distinct names from {list(known)}")
        if {"deu", "mi"} & set(self.outputs) and hp.posterior is None:
            raise ValueError("outputs deu/mi need posterior=PATH (a file from `python -m cli laplace-fit`)")
        if set(CLIP_OUTPUTS) & set(self.outputs) and hp.clip is None:
            raise ValueError("outputs clip_layer3/clip_pooled need clip='openai', an RN50 checkpoint or a local dir")
        if {"aleatoric", "mi"} & set(self.outputs) and hp.num_noises < 2:
            raise ValueError(f"outputs aleatoric/mi need num_noises >= 2 (a variance over noises), got {hp.num_noises}")
        if hp.deu_mode not in ("closed_form", "mc"):
            raise ValueError(f"deu_mode must be 'closed_form' or 'mc', got {hp.deu_mode!r}")
        if hp.deu_mode == "mc" and hp.num_weight_samples < 2:
            raise ValueError(f"deu_mode='mc' needs num_weight_samples >= 2, got {hp.num_weight_samples}")
        if hp.autocast_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"autocast_dtype must be float32, bfloat16 or float16, got {hp.autocast_dtype!r}")

    def _load_posterior(self, path: str) -> None:
        """Load σ²_W, σ²_b and refuse a posterior fitted for another UNet, timestep, prompt or latent mode (resolution is
        checked on the first batch, since only the data knows it)."""
        posterior = load_posterior(path)
        meta = posterior["metadata"]
        mine = {"unet_hash": self.weight_hashes()["unet"], "timestep": self.hparams.timestep,
                "prompt": self.hparams.prompt, "latent": self.hparams.latent}
        diff = {k: (meta[k], v) for k, v in mine.items() if meta[k] != v}
        if diff:
            raise ValueError(f"posterior {path} was fitted with other settings (posterior, extractor): {diff}")
        if tuple(posterior["var_w"].shape) != tuple(self.unet.conv_out.weight.shape):
            raise ValueError(f"posterior {path} var_w shape {tuple(posterior['var_w'].shape)} does not match conv_out")
        self.register_buffer("var_w", posterior["var_w"].float(), persistent=False)
        self.register_buffer("var_b", posterior["var_b"].float(), persistent=False)
        self.posterior_meta = meta
        self._hashes["posterior_sha256"] = file_sha256(path)

    def weight_hashes(self) -> dict[str, str]:
        """Hashes of the weights in use (computed once; the models are frozen)."""
        for name, attr in (("vae", "vae"), ("unet", "unet"), ("text_encoder", "text_encoder"), ("clip", "clip_visual")):
            module = getattr(self, attr, None)
            if module is not None and name not in self._hashes:
                self._hashes[name] = weights_hash(module)
        return {k: v for k, v in self._hashes.items() if k != "posterior_sha256"}

    def provenance(self) -> dict[str, Any]:
        """Every setting plus weight and posterior hashes: what a feature store must match."""
        hashes = {f"{k}_hash": v for k, v in self.weight_hashes().items()}
        return {"extractor": type(self).__name__, **dict(self.hparams), "outputs": self.outputs,
                "sd_source": self.sd_source, "output_scale": "epsilon", **hashes,
                "posterior_sha256": self._hashes.get("posterior_sha256")}

    @torch.no_grad()
    def feature_shapes(self, resolution: int) -> dict[str, tuple[int, ...]]:
        """Per-row shape of each requested output at an input `resolution` (for preallocating the store)."""
        _, h, w = self.diffusion.latent_shape(resolution)
        shapes = {name: (self.unet.config.out_channels, h, w) for name in MAP_OUTPUTS}
        if self.clip_model is not None:
            size = self.clip_model.image_size
            probe = torch.zeros(1, 3, size, size, device=self.device, dtype=next(self.clip_visual.parameters()).dtype)
            layer3, pooled = self.clip_model.layer3_and_pooled(probe)
            shapes.update(clip_layer3=tuple(layer3.shape[1:]), clip_pooled=tuple(pooled.shape[1:]))
        return {name: shapes[name] for name in self.outputs}

    def _check_resolution(self, resolution: int) -> None:
        """The posterior's pixel counts depend on resolution, so it must match the data's."""
        if self.posterior_meta is not None and self.posterior_meta["resolution"] != resolution:
            raise ValueError(f"posterior was fitted at resolution {self.posterior_meta['resolution']} but images "
                             f"are {resolution}px: refit it at this resolution (laplace-fit) or resize the data")

    def epistemic(self, phi_bar: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """DEU from the noise-averaged φ̄: exact closed form, or MC over conv_out weight samples."""
        if self.hparams.deu_mode == "closed_form":
            return closed_form_deu(phi_bar, self.var_w, self.var_b)
        conv = self.unet.conv_out
        return mc_deu(phi_bar, conv.weight, conv.bias, self.var_w, self.var_b, self.hparams.num_weight_samples,
                      generators)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """One fused pass over the batch → pass-through fields + one fp32 tensor (B, ...) per requested output."""
        images = batch["image"]
        self._check_resolution(images.shape[-1])
        wanted = set(self.outputs)
        result: dict[str, Any] = {k: batch[k] for k in PASS_THROUGH}
        if wanted & set(MAP_OUTPUTS):
            generators = [key_generator(self.hparams.seed, key) for key in batch["key"]]
            out = self.diffusion(images, generators)
            if "lare" in wanted:
                result["lare"] = latent_reconstruction_error(out.eps_hat, out.noise)
            if wanted & {"deu", "mi"}:
                epistemic = self.epistemic(out.phi.mean(dim=1), generators)
            if wanted & {"aleatoric", "mi"}:
                aleatoric = aleatoric_variance(out.eps_hat)
            if "deu" in wanted:
                result["deu"] = epistemic
            if "aleatoric" in wanted:
                result["aleatoric"] = aleatoric
            if "mi" in wanted:
                result["mi"] = mutual_information(epistemic, aleatoric)
        if wanted & set(CLIP_OUTPUTS):
            with autocast_context(images.device, self.hparams.autocast_dtype):
                layer3, pooled = self.clip_model.layer3_and_pooled(self.clip_model.normalize(images))
            result.update({k: v.float() for k, v in (("clip_layer3", layer3), ("clip_pooled", pooled))
                           if k in wanted})
        return result
