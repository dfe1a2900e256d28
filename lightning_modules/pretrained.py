"""Load the pretrained models the framework runs on: Stable Diffusion v1.5 parts and CLIP RN50.

Real weights and the tiny test/demo weights go through these same functions (SPEC §2), so the
loading code that tests exercise is the code that runs on a cluster.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

SD_COMPONENTS = ("vae", "unet", "text_encoder", "tokenizer", "scheduler")


class ModelNotFoundError(FileNotFoundError):
    """A model path or hub id that cannot be loaded; the message says how to provide it."""


@dataclass
class StableDiffusionParts:
    """The SD v1.5 components phase 1 needs; the pipeline class itself is never built."""

    vae: nn.Module
    unet: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    scheduler: object
    source: str


@dataclass
class ClipVisual:
    """CLIP's image tower plus the preprocessing that matches it (open_clip's factory idea)."""

    visual: nn.Module
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str

    def layer3(self, images: torch.Tensor) -> torch.Tensor:
        """Map of layer3 (C×14×14 for RN50 at 224): the trunk up to where DEUA and LaRE² read it."""
        v = self.visual
        return v.layer3(v.layer2(v.layer1(v.stem(images))))

    def layer3_and_pooled(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map of layer3 and the attention-pooled vector."""
        layer3 = self.layer3(images)
        return layer3, self.visual.attnpool(self.visual.layer4(layer3))

    def normalize(self, images_minus1_1: torch.Tensor) -> torch.Tensor:
        """Resize [-1, 1] images to CLIP's input size and apply its mean/std."""
        x = (images_minus1_1 + 1) / 2
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = nn.functional.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                                          antialias=True, align_corners=False)
        mean = x.new_tensor(self.mean).view(1, 3, 1, 1)
        std = x.new_tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std


def _looks_like_path(path_or_id: str) -> bool:
    """Hub ids are `org/name`; anything else that does not exist locally is a missing path."""
    return path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") != 1


def load_stable_diffusion(path_or_id: str, dtype: torch.dtype = torch.float32,
                          device: str | torch.device = "cpu") -> StableDiffusionParts:
    """Load SD v1.5 parts from a diffusers-layout directory or a hub id (offline: cache only)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    local = Path(path_or_id).expanduser()
    if local.is_dir():
        missing = [c for c in SD_COMPONENTS if not (local / c).is_dir()]
        if missing:
            raise ModelNotFoundError(
                f"Stable Diffusion directory {local} lacks the subfolders {missing}; give a diffusers-layout "
                "directory (vae/, unet/, text_encoder/, tokenizer/, scheduler/) such as a local copy of "
                "stable-diffusion-v1-5/stable-diffusion-v1-5, or build tiny ones with `python -m cli tiny-models DIR`")
        source = str(local)
    elif _looks_like_path(path_or_id):
        raise ModelNotFoundError(
            f"Stable Diffusion weights not found at {path_or_id}: no such directory; download "
            "stable-diffusion-v1-5/stable-diffusion-v1-5 in diffusers layout and pass its path "
            "(--model.init_args.sd PATH), or build tiny ones with `python -m cli tiny-models DIR`")
    else:
        source = path_or_id
    try:
        kw = {"torch_dtype": dtype}
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", **kw)
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", **kw)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **kw)
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
        scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler")
    except OSError as err:
        raise ModelNotFoundError(
            f"Stable Diffusion weights {path_or_id!r}: no such local directory, and as a hub id it could not be "
            f"loaded ({str(err).splitlines()[0]}); no model hub is reachable here: pass a local diffusers-layout "
            "directory (or build tiny ones with `python -m cli tiny-models DIR`)") from err
    for module in (vae, unet, text_encoder):
        module.to(device).eval().requires_grad_(False)
    return StableDiffusionParts(vae, unet, text_encoder, tokenizer, scheduler, source)


def load_clip_rn50(weights: str = "openai", dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu") -> ClipVisual:
    """Load CLIP's RN50 image tower.

    `weights` is `openai` (open_clip's pretrained tag, needs the hub cache), a checkpoint file for the
    RN50 architecture, or a directory with `open_clip_config.json` and weights (open_clip's
    `local-dir:` layout, which the tiny model uses).
    """
    import open_clip

    path = Path(weights).expanduser()
    if path.is_dir():
        if not (path / "open_clip_config.json").is_file():
            raise ModelNotFoundError(
                f"CLIP directory {path} has no open_clip_config.json; give an open_clip local-dir "
                "(config + weights), an RN50 checkpoint file, or 'openai'")
        name, pretrained = f"local-dir:{path}", None
    elif path.is_file():
        name, pretrained = "RN50", str(path)
    elif weights == "openai":
        name, pretrained = "RN50", "openai"
    else:
        raise ModelNotFoundError(
            f"CLIP RN50 weights not found at {weights}: give 'openai' (with a populated hub cache), "
            "an RN50 checkpoint file, or an open_clip local-dir; tiny ones come from `python -m cli tiny-models DIR`")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
    except (OSError, RuntimeError) as err:
        raise ModelNotFoundError(
            f"CLIP RN50 weights {weights!r} could not be loaded ({str(err).splitlines()[0]}); "
            "no model hub is reachable here: pass a local checkpoint file instead") from err
    visual = model.visual.to(device=device, dtype=dtype).eval()
    normalize = next(t for t in preprocess.transforms if type(t).__name__ == "Normalize")
    return ClipVisual(visual, int(visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0]),
                      tuple(normalize.mean), tuple(normalize.std), str(weights))


def weights_hash(*modules: nn.Module) -> str:
    """SHA-256 over parameter and buffer bytes: identifies weights independent of where they came from."""
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
