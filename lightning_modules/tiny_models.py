"""Tiny random-weight models of the real classes, written to disk in the real layouts.

No model hub is reachable here, so tests and the demo build these and load them back through
`pretrained.load_stable_diffusion` / `pretrained.load_clip_rn50`: the same code real weights use.
The structure matches SD v1.5 where it matters to phase 1 (×8 VAE, 4-channel latents,
conv_norm_out → SiLU → conv_out 3×3 at the UNet's end, scaling_factor 0.18215) and RN50 where it
matters to phase 2 (ModifiedResNet: layer3 map at /16, attention pooling).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

TINY_TEXT_DIM = 8
TINY_VOCAB_SIZE = 1000


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: every byte maps to a printable unicode character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def _write_tokenizer(directory: Path) -> None:
    """A byte-level BPE vocabulary small enough for the tiny text model (ids < TINY_VOCAB_SIZE)."""
    directory.mkdir(parents=True, exist_ok=True)
    alphabet = list(_bytes_to_unicode().values())
    tokens = ["<|startoftext|>", "<|endoftext|>"] + alphabet + [c + "</w>" for c in alphabet]
    merges = ["p h", "o t", "ph ot", "phot o</w>"]
    tokens += ["ph", "ot", "phot", "photo</w>"]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))


def build_tiny_stable_diffusion(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a diffusers-layout SD v1.5 look-alike with random weights to `out_dir`."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out = Path(out_dir)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(4, 8),
        norm_num_groups=2, cross_attention_dim=TINY_TEXT_DIM, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(4, 4, 4, 4), layers_per_block=1,
        norm_num_groups=2, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=64, scaling_factor=0.18215)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=TINY_VOCAB_SIZE, hidden_size=TINY_TEXT_DIM, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    # SD v1.5's scheduler settings (scaled_linear betas 0.00085..0.012, 1000 steps).
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False,
                              steps_offset=1)
    unet.save_pretrained(out / "unet")
    vae.save_pretrained(out / "vae")
    text_encoder.save_pretrained(out / "text_encoder")
    scheduler.save_pretrained(out / "scheduler")
    _write_tokenizer(out / "tokenizer")
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "vae": ["diffusers", "AutoencoderKL"],
        "unet": ["diffusers", "UNet2DConditionModel"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDPMScheduler"]}, indent=1))
    return out


def _unit_scale_layer3(visual: torch.nn.Module) -> None:
    """Rescale layer3's output BatchNorms so its map has unit std, keeping the random features' directions.

    open_clip's random init (default conv init, each block's bn3 zeroed) shrinks activations ~0.6× per
    layer: layer3 ends near 1e-3, below the detectors' LayerNorm eps (1e-5 on the variance), which then
    normalises the map's content away. A trained RN50's layer3 is O(1). ReLU is positively homogeneous,
    so scaling both BatchNorms that end the block scales its output exactly.
    """
    visual.eval()
    with torch.no_grad():
        std = _layer3(visual, torch.randn(8, 3, 224, 224)).std()
        block = visual.layer3[-1]
        norms = [block.bn3] + ([module for module in block.downsample.modules()
                                if isinstance(module, torch.nn.BatchNorm2d)] if block.downsample is not None else [])
        for norm in norms:
            norm.weight.div_(std)
            norm.bias.div_(std)


def _layer3(visual: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """ModifiedResNet's layer3 map (the stem and layers 1-3)."""
    x = visual.act1(visual.bn1(visual.conv1(x)))
    x = visual.act2(visual.bn2(visual.conv2(x)))
    x = visual.avgpool(visual.act3(visual.bn3(visual.conv3(x))))
    return visual.layer3(visual.layer2(visual.layer1(x)))


def build_tiny_clip(out_dir: str | Path, seed: int = 0) -> Path:
    """Write an open_clip local-dir (config + weights) of a small ModifiedResNet with RN50's structure."""
    import open_clip

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 224, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None},
        "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
    }
    config = {"model_cfg": model_cfg, "preprocess_cfg": {
        "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}}
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=1))
    torch.manual_seed(seed)
    logging.disable(logging.WARNING)  # open_clip warns that the directory has no weights yet: we are writing them
    try:
        model = open_clip.create_model(f"local-dir:{out}", pretrained=None, load_weights=False)
    finally:
        logging.disable(logging.NOTSET)
    _unit_scale_layer3(model.visual)
    torch.save(model.state_dict(), out / "open_clip_pytorch_model.bin")
    return out


def build_tiny_models(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Both tiny models under `out_dir/sd` and `out_dir/clip`; returns their paths."""
    out = Path(out_dir)
    return {"sd": build_tiny_stable_diffusion(out / "sd", seed), "clip": build_tiny_clip(out / "clip", seed)}
