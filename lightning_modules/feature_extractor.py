"""Phase 1 per-image features (registered guidance maps, frozen CLIP maps) in one fused pass per batch.

Noise is keyed by content: each row's CPU generator is seeded from (seed, sha256 of the image's original
bytes), so the same image gets bit-identical features in any store, row, batch, rank or dataset. The
draw order from that generator is part of the contract (tests/test_feature_extractor.py checks it):

1. the VAE latent's ε (C, h, w), always drawn, so the noises do not depend on `latent`;
2. the N diffusion noises (N, C, h, w), so N=4 is a prefix of N=8;
3. only when a map needs MC weight samples: one int64 from [0, 2^62) that seeds a generator on the compute
   device, from which conv_out's weight draws z_W (M, O, C, 3, 3) then z_b (M, O) are taken (DEU mc mode).

`provenance()` is {"common": settings every map shares (weights, noises, kernels), "maps": {name: the
settings only that map depends on}}: what a feature store records per feature group, so a store can grow
by new maps that see the same noises. All maps are on the ε-prediction scale (see `uncertainty`).
"""

from __future__ import annotations

import inspect
from functools import partial
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch

from lightning_modules.diffusion_pass import (AutocastDtype, DiffusionPass, autocast_context,
                                             normalise_images)
from core.hashing import file_sha256
from core.seeding import image_generator
from feature_cache.provenance import ExtractorProvenance, FeatureProvenance, config_differences
from lightning_modules.laplace_fit import load_posterior
from feature_cache.provenance import FeatureSpec
from lightning_modules.maps import (BUILTIN_MAP_MODULES, CLIP_OUTPUTS, MAP_REGISTRY, MapContext, feature_spec,
                                    import_map_modules)
from lightning_modules.pretrained import load_clip_rn50, load_stable_diffusion, weights_hash

PASS_THROUGH = ("key", "sha256", "row", "shard_index", "label", "generator", "error")
MODEL_PATHS = ("sd", "clip", "posterior")  # where the weights are: may move (`predict --sd`); their hashes may not
SOURCES = ("sd_source", "extractor")  # recorded for the reader: where SD was loaded from, the extractor's class


def derived(setting: str) -> bool:
    """A map setting the extractor derives (a file's or the weights' hash, the posterior's σ; see `setting`)."""
    return setting == "sigma" or setting.endswith(("_sha256", "_hash"))
WeightsDtype = Literal["float32", "bfloat16"]


def recorded_path(value: str | None) -> str | None:
    """A local weights path as an absolute path (a checkpoint or store used from another directory still finds
    it; `predict --sd/--clip/--posterior` override it, checked by hash); hub ids and tags stay as given."""
    if value is None or not Path(value).expanduser().exists():
        return value
    return str(Path(value).expanduser().resolve())


class FeatureExtractor(pl.LightningModule):
    """predict_step: VAE encode once, one UNet call on the B·N noised latents, every requested map from it.

    Args (beyond the pass's own: sd, timestep, num_noises, prompt, latent, seed, autocast_dtype):
        posterior: file from `python -m cli laplace-fit`, needed by maps that use the Laplace posterior.
        clip: CLIP RN50 source, needed by `clip_layer3` / `clip_pooled`.
        outputs: registered map names (lightning_modules.maps) and/or CLIP outputs to compute.
        deu_mode / num_weight_samples: DEU in closed form or Monte Carlo over M conv_out weight samples.
        map_modules: modules imported to register maps (the built-ins, plus a user's own map file).
        map_settings: settings of maps from map_modules that are not extractor arguments (e.g.
            {ensemble_members: PATH}); a map declares the names it reads, and a file setting X also
            provides X_sha256 (its content hash) for the provenance.
        channels_last, weights_dtype, cudnn_benchmark, compile, compile_batch_size: kernel settings; each
            changes the numerics, so each is recorded in the provenance. With `compile`, every batch is
            padded to `compile_batch_size` rows so compiled kernels see one shape.
    Rows with a decode `error` are computed on their zero image; the writer marks them.
    """

    def __init__(self, sd: str, posterior: str | None = None, clip: str | None = None,
                 outputs: list[str] = ["lare", "deu"], timestep: int = 200, num_noises: int = 4,  # noqa: B006
                 deu_mode: Literal["closed_form", "mc"] = "closed_form", num_weight_samples: int = 16,
                 prompt: str = "a photo", latent: Literal["sample", "mean"] = "sample", seed: int = 0,
                 autocast_dtype: AutocastDtype = "float32",
                 map_modules: list[str] = list(BUILTIN_MAP_MODULES),  # noqa: B006
                 channels_last: bool = False, weights_dtype: WeightsDtype = "float32", cudnn_benchmark: bool = False,
                 compile: bool = False, compile_batch_size: int = 32,
                 map_settings: dict[str, Any] = {}) -> None:  # noqa: B006
        super().__init__()
        self.save_hyperparameters()
        import_map_modules(map_modules)
        self.outputs = self._validate_outputs(outputs)
        self._validate()
        parts = load_stable_diffusion(sd)
        self.vae, self.unet, self.text_encoder = parts.vae, parts.unet, parts.text_encoder
        self.sd_source = parts.source
        self._hashes: dict[str, str] = {}
        self._file_hashes: dict[str, str] = {}  # of files named in map_settings
        self.weight_hashes()  # of the weights as loaded, before any dtype cast
        self._apply_kernel_settings()
        self.diffusion = DiffusionPass(parts, timestep, num_noises, prompt, latent, autocast_dtype,
                                       compile_unet=compile, channels_last=channels_last)
        self.posterior_meta: dict[str, Any] | None = None
        if posterior is not None:
            self._load_posterior(posterior)
        self.clip_model = load_clip_rn50(clip) if clip is not None else None
        self.clip_visual = self.clip_model.visual if self.clip_model is not None else None  # moves with the module
        if self.clip_visual is not None:
            self._hashes["clip"] = weights_hash(self.clip_visual)
        for spec in (MAP_REGISTRY[o] for o in self.outputs if o in MAP_REGISTRY):
            if spec.check is not None:  # before the writer creates or grows a store with these settings
                spec.check({name: self.setting(name) for name in spec.settings})

    @classmethod
    def from_provenance(cls, provenance: FeatureProvenance, **runtime: str | None) -> FeatureExtractor:
        """The extractor a checkpoint's features were computed with, checked to compute the same features: the one
        rebuild `predict`, `robustness` and the on-the-fly detector use.

        `runtime` overrides where the weights are (`sd`, `clip`, `posterior`; None keeps the recorded path): the
        files are then identified by their hashes, which must equal the recorded ones. Every recorded setting the
        rebuilt extractor reports must be equal; the error names each that differs.
        """
        recorded = provenance.extractor()
        unknown = sorted(set(runtime) - set(MODEL_PATHS))
        if unknown:
            raise ValueError(f"FeatureExtractor.from_provenance: {unknown} are not model paths ({list(MODEL_PATHS)})")
        arguments = set(inspect.signature(cls).parameters)
        settings = {name: value for name, value in recorded.common.items() if name in arguments}
        if not recorded.common.get("compile"):
            settings.pop("compile_batch_size", None)  # recorded as None when unused
        own = {name: value for spec in recorded.maps.values() for name, value in spec.items()}
        settings.update({name: value for name, value in own.items() if name in arguments})
        settings["outputs"] = list(recorded.maps)
        settings["map_modules"] = list(dict.fromkeys([*BUILTIN_MAP_MODULES, *recorded.modules.values()]))
        map_settings = {name: value for name, value in own.items() if name not in arguments and not derived(name)}
        if map_settings:
            settings["map_settings"] = map_settings
        settings.update({name: path for name, path in runtime.items() if path is not None})
        for name in MODEL_PATHS:
            path = settings.get(name)
            if path and path != "openai" and not Path(path).expanduser().exists():
                raise FileNotFoundError(f"the checkpoint's {name} {path} does not exist here: pass --{name} PATH "
                                        "(the weights are checked against the hashes the checkpoint recorded)")
        extractor = cls(**settings)
        different = extractor.provenance_differences(recorded)
        if different:
            raise ValueError(f"the extractor rebuilt from {', '.join(f'{n}={settings.get(n)}' for n in MODEL_PATHS)} "
                             f"differs from the one the detector's features came from (checkpoint != here: "
                             f"{'; '.join(different)})")
        return extractor

    def provenance_differences(self, recorded: ExtractorProvenance) -> list[str]:
        """Settings this extractor reports otherwise than `recorded` (where the weights are and what the run adds,
        e.g. batch size, are not the extractor's to compare)."""
        now = ExtractorProvenance.from_attrs(self.provenance())

        def comparable(settings: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
            return {k: v for k, v in settings.items() if k in other and k not in MODEL_PATHS + SOURCES}

        names = list(recorded.maps)
        return config_differences(
            {"common": comparable(recorded.common, now.common),
             "maps": {n: comparable(recorded.maps[n], now.maps.get(n, {})) for n in names}},
            {"common": comparable(now.common, recorded.common),
             "maps": {n: comparable(now.maps.get(n, {}), recorded.maps[n]) for n in names}})

    def _validate_outputs(self, outputs: list[str]) -> list[str]:
        """Requested names must be registered maps or CLIP outputs, non-empty and distinct."""
        known = sorted(MAP_REGISTRY) + list(CLIP_OUTPUTS)
        unknown = [o for o in outputs if o not in known]
        if unknown or not outputs or len(set(outputs)) != len(outputs):
            raise ValueError(f"outputs={list(outputs)} must be a non-empty list of distinct names from {known}")
        return list(outputs)

    def _validate(self) -> None:
        """Refuse inconsistent settings with one clear line, before any weights are loaded."""
        hp = self.hparams
        if hp.deu_mode not in ("closed_form", "mc"):
            raise ValueError(f"deu_mode must be 'closed_form' or 'mc', got {hp.deu_mode!r}")
        if hp.deu_mode == "mc" and hp.num_weight_samples < 2:
            raise ValueError(f"deu_mode='mc' needs num_weight_samples >= 2, got {hp.num_weight_samples}")
        if hp.autocast_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"autocast_dtype must be float32, bfloat16 or float16, got {hp.autocast_dtype!r}")
        if hp.weights_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"weights_dtype must be float32 or bfloat16, got {hp.weights_dtype!r}")
        if hp.compile and hp.compile_batch_size < 1:
            raise ValueError(f"compile_batch_size must be >= 1, got {hp.compile_batch_size}")
        self._validate_requirements(self.outputs)

    def _validate_requirements(self, outputs: list[str]) -> None:
        hp = self.hparams
        maps = [MAP_REGISTRY[o] for o in outputs if o in MAP_REGISTRY]
        if any(spec.needs_posterior for spec in maps) and hp.posterior is None:
            names = [spec.name for spec in maps if spec.needs_posterior]
            raise ValueError(f"outputs {names} need posterior=PATH (a file from `python -m cli laplace-fit`)")
        if set(CLIP_OUTPUTS) & set(outputs) and hp.clip is None:
            raise ValueError("outputs clip_layer3/clip_pooled need clip='openai', an RN50 checkpoint or a local dir")
        short = [spec.name for spec in maps if hp.num_noises < spec.min_noises]
        if short:
            raise ValueError(f"outputs {short} need num_noises >= {max(MAP_REGISTRY[n].min_noises for n in short)} "
                             f"(a variance over noises), got {hp.num_noises}")

    def set_outputs(self, names: list[str]) -> None:
        """Compute only `names` from now on (a growing store asks for the maps it lacks); same checks as init."""
        names = self._validate_outputs(names)
        self._validate_requirements(names)
        self.outputs = names

    def _apply_kernel_settings(self) -> None:
        """bf16 weights and channels_last memory format for the SD parts (cudnn.benchmark is set per run)."""
        hp = self.hparams
        for module in (self.vae, self.unet, self.text_encoder):
            if hp.weights_dtype == "bfloat16":
                module.to(torch.bfloat16)
            if hp.channels_last and module is not self.text_encoder:
                module.to(memory_format=torch.channels_last)

    def on_predict_start(self) -> None:
        """cudnn.benchmark picks convolution algorithms by timing them (faster, numerics of the chosen kernel)."""
        torch.backends.cudnn.benchmark = bool(self.hparams.cudnn_benchmark)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Only the images (and CLIP's native crops) go to the device (uint8, non_blocking from pinned memory);
        metadata stays on the host."""
        if isinstance(batch, dict) and "image" in batch:
            return {**batch, **{name: super(FeatureExtractor, self).transfer_batch_to_device(batch[name], device,
                                                                                           dataloader_idx)
                                for name in ("image", "clip_image") if name in batch}}
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def _load_posterior(self, path: str) -> None:
        """Load σ²_W, σ²_b and refuse a posterior fitted for another UNet, timestep, prompt or latent mode (resolution is
        checked on the first batch, since only the data knows it)."""
        posterior = load_posterior(path, conv_out_shape=tuple(self.unet.conv_out.weight.shape))
        meta = posterior["metadata"]
        mine = {"unet_hash": self.weight_hashes()["unet"], "timestep": self.hparams.timestep,
                "prompt": self.hparams.prompt, "latent": self.hparams.latent}
        diff = {k: (meta[k], v) for k, v in mine.items() if meta[k] != v}
        if diff:
            raise ValueError(f"posterior {path} was fitted with other settings (posterior, extractor): {diff}")
        self.register_buffer("var_w", posterior["var_w"].float(), persistent=False)
        self.register_buffer("var_b", posterior["var_b"].float(), persistent=False)
        self.posterior_meta = meta
        self._hashes["posterior_sha256"] = file_sha256(path)
        self._posterior_sigma = {"mode": posterior["sigma"], "value": float(posterior["sigma_noise"])}

    def weight_hashes(self) -> dict[str, str]:
        """Hashes of the SD (and CLIP) weights as loaded (computed once; the models are frozen)."""
        for name in ("vae", "unet", "text_encoder"):
            if name not in self._hashes:
                self._hashes[name] = weights_hash(getattr(self, name))
        return {k: v for k, v in self._hashes.items() if k != "posterior_sha256"}

    def setting(self, name: str) -> Any:
        """One setting a map may depend on: an init argument (e.g. the posterior's path), its hash, or its σ; an entry
        of map_settings (and X_sha256 for a file entry X); a weight hash such as unet_hash."""
        if name == "posterior_sha256":
            return self._hashes.get("posterior_sha256")
        if name == "sigma":
            return getattr(self, "_posterior_sigma", None)
        extra = self.hparams.map_settings
        if name in extra:  # a file as its absolute path: relative then absolute paths to one file are one config
            value = extra[name]
            return recorded_path(value) if isinstance(value, str) and value and Path(value).expanduser().is_file() \
                else value
        if name.endswith("_sha256") and name.removesuffix("_sha256") in extra:
            path = extra[name.removesuffix("_sha256")]
            if path and name not in self._file_hashes:
                self._file_hashes[name] = file_sha256(path)  # once: files named in settings do not change in a run
            return self._file_hashes.get(name)
        if name.endswith("_hash") and name.removesuffix("_hash") in self.weight_hashes():
            return self.weight_hashes()[name.removesuffix("_hash")]
        if name not in self.hparams:
            raise KeyError(f"map setting {name!r} is neither an extractor argument nor in map_settings")
        return recorded_path(self.hparams[name]) if name == "posterior" else self.hparams[name]

    def provenance(self) -> dict[str, Any]:
        """{"common": what every output shares, "maps": {output: the settings only it depends on},
        "modules": {map: the module that registers it}}."""
        hp, hashes = self.hparams, self.weight_hashes()
        common = {"extractor": f"{type(self).__module__}.{type(self).__qualname__}", "sd": recorded_path(hp.sd),
                  "sd_source": self.sd_source, **{f"{k}_hash": hashes[k] for k in ("vae", "unet", "text_encoder")},
                  "seed": hp.seed, "timestep": hp.timestep, "num_noises": hp.num_noises, "prompt": hp.prompt,
                  "latent": hp.latent, "autocast_dtype": hp.autocast_dtype, "output_scale": "epsilon",
                  "noise_key": "sha256", "channels_last": hp.channels_last, "weights_dtype": hp.weights_dtype,
                  "cudnn_benchmark": hp.cudnn_benchmark, "compile": hp.compile,
                  "compile_batch_size": hp.compile_batch_size if hp.compile else None}
        maps: dict[str, dict[str, Any]] = {}
        for name in self.outputs:
            if name in MAP_REGISTRY:
                maps[name] = {s: self.setting(s) for s in MAP_REGISTRY[name].settings}
            else:
                maps[name] = {"clip": recorded_path(hp.clip), "clip_hash": self._hashes.get("clip")}
        modules = {name: MAP_REGISTRY[name].fn.__module__ for name in self.outputs if name in MAP_REGISTRY}
        return {"common": common, "maps": maps, "modules": modules}

    @torch.no_grad()
    def feature_shapes(self, resolution: int) -> dict[str, tuple[int, ...]]:
        """Per-row shape of each requested output at an input `resolution` (for preallocating the store)."""
        channels, h, w = self.diffusion.latent_shape(resolution)
        shapes = {name: (spec.channels(channels), h, w) for name, spec in MAP_REGISTRY.items()}
        if self.clip_model is not None:
            size = self.clip_model.image_size
            probe = torch.zeros(1, 3, size, size, device=self.device, dtype=next(self.clip_visual.parameters()).dtype)
            layer3, pooled = self.clip_model.layer3_and_pooled(probe)
            shapes.update(clip_layer3=tuple(layer3.shape[1:]), clip_pooled=tuple(pooled.shape[1:]))
        return {name: shapes[name] for name in self.outputs}

    def feature_specs(self, resolution: int, storage: Mapping[str, tuple[str, str]]) -> dict[str, FeatureSpec]:
        """How the writer stores each requested output: shape at `resolution`, the registry's kind (and units,
        description), and the (dtype, codec) the writer's `storage` gives that kind."""
        return {name: feature_spec(name, shape, storage) for name, shape in self.feature_shapes(resolution).items()}

    def _check_resolution(self, resolution: int) -> None:
        """The posterior's pixel counts depend on resolution, so it must match the data's."""
        if self.posterior_meta is not None and self.posterior_meta["resolution"] != resolution:
            raise ValueError(f"posterior was fitted at resolution {self.posterior_meta['resolution']} but images "
                             f"are {resolution}px: refit it at this resolution (laplace-fit) or resize the data")

    def _pad(self, images: torch.Tensor, generators: list[torch.Generator]
             ) -> tuple[torch.Tensor, list[torch.Generator]]:
        """Under `compile`, pad the batch with zero images (own generators) to `compile_batch_size` rows."""
        if not self.hparams.compile:
            return images, generators
        missing = self.hparams.compile_batch_size - images.shape[0]
        if missing < 0:
            raise ValueError(f"batch of {images.shape[0]} rows exceeds compile_batch_size "
                             f"{self.hparams.compile_batch_size}; set it to the data's batch_size")
        if missing == 0:
            return images, generators
        padding = images.new_zeros(missing, *images.shape[1:])
        return (torch.cat([images, padding]),
                generators + [image_generator(self.hparams.seed, "diffusion_noise", f"padding-{i}")
                              for i in range(missing)])

    def compute_maps(self, images: torch.Tensor, sha256: list[str], names: list[str]) -> dict[str, torch.Tensor]:
        """The fused pass on normalised images (B, 3, R, R) → each registered map in `names`, (B, C, h, w) fp32."""
        rows = images.shape[0]
        generators = [image_generator(self.hparams.seed, "diffusion_noise", digest) for digest in sha256]
        padded, padded_generators = self._pad(images, generators)
        out = self.diffusion(padded, padded_generators)
        conv = self.unet.conv_out
        wanted = {"deu_mode", "num_weight_samples"} | {s for name in names for s in MAP_REGISTRY[name].settings}
        ctx = MapContext(out, padded_generators, {k: self.setting(k) for k in sorted(wanted)},
                         conv.weight.float(), conv.bias.float(), getattr(self, "var_w", None),
                         getattr(self, "var_b", None), partial(self.diffusion.conditioned_eps, out))
        return {name: ctx.map(name)[:rows] for name in names}

    def clip_input(self, batch: dict[str, Any]) -> torch.Tensor:
        """What CLIP sees, in [-1, 1]: the datamodule's native-resolution crop (`clip_input: native_crop`, which must
        be CLIP's input size: it is not resized) or the resized image (`resize`; CLIP's preprocessing resizes it)."""
        if "clip_image" not in batch:
            return normalise_images(batch["image"])
        size = self.clip_model.image_size if self.clip_model is not None else None
        if size is not None and tuple(batch["clip_image"].shape[-2:]) != (size, size):
            raise ValueError(f"clip_image is {tuple(batch['clip_image'].shape[-2:])} but this CLIP takes "
                             f"{size}x{size}: set the datamodule's clip_size to {size}")
        return normalise_images(batch["clip_image"])

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """One fused pass over the batch → pass-through fields + one fp32 tensor (B, ...) per requested output."""
        if "sha256" not in batch:
            raise ValueError("batch has no 'sha256' (content hash per image): noise is keyed by content; read the "
                             "images through ImageShardDataModule or ImageFilesDataModule")
        images = normalise_images(batch["image"])
        self._check_resolution(images.shape[-1])
        result: dict[str, Any] = {k: batch[k] for k in PASS_THROUGH if k in batch}
        maps = [name for name in self.outputs if name in MAP_REGISTRY]
        if maps:
            result.update(self.compute_maps(images, list(batch["sha256"]), maps))
        clip_wanted = [name for name in self.outputs if name in CLIP_OUTPUTS]
        if clip_wanted:
            with autocast_context(images.device, self.hparams.autocast_dtype):
                layer3, pooled = self.clip_model.layer3_and_pooled(self.clip_model.normalize(self.clip_input(batch)))
            result.update({k: v.float() for k, v in (("clip_layer3", layer3), ("clip_pooled", pooled))
                           if k in clip_wanted})
        return result
