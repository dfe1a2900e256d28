"""Tiny random-weight models of the real classes, written to disk in the real layouts.

No model hub is reachable here, so tests and the demo build these and load them back through
`pretrained.load_stable_diffusion` / `pretrained.load_clip_rn50`: the same code real weights use.
The structure matches SD v1.5 where it matters to phase 1 (×8 VAE, 4-channel latents,
conv_norm_out → SiLU → conv_out 3×3 at the UNet's end, scaling_factor 0.18215) and RN50 where it
matters to phase 2 (ModifiedResNet: layer3 map at /16, attention pooling).

`train_tiny_stable_diffusion` then gives the random SD look-alike what phase 1's maps rely on: a VAE
whose latents encode the image (autoencoder training) and a UNet that denoises the latents of the
images it was trained on (ε-prediction), so that reconstruction error (LaRE) and uncertainty (DEU)
differ between images like the training set and images unlike it. A few hundred CPU steps on a
handful of images: enough for the demo, and deterministic for a given seed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

TINY_TEXT_DIM = 8
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
TRAINING_RECORD = "training.json"  # written into the SD directory: what the tiny models were trained on
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


def _training_images(images_dir: Path, resolution: int) -> torch.Tensor:
    """Every image under `images_dir` (recursively), centre square resized to `resolution`, in [-1, 1]."""
    import numpy as np
    from PIL import Image

    from core.geometry import center_square

    if not images_dir.is_dir():
        raise FileNotFoundError(f"--train_on {images_dir}: no such directory of training images")
    paths = sorted(p for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise FileNotFoundError(f"--train_on {images_dir}: no images ({', '.join(IMAGE_SUFFIXES)}) in it")
    arrays = []
    for path in paths:
        try:
            with Image.open(path) as image:
                square = center_square(image.convert("RGB")).resize((resolution, resolution),
                                                                    Image.Resampling.BICUBIC)
        except (OSError, ValueError) as error:  # PIL: UnidentifiedImageError, truncated data, bombs
            raise ValueError(f"--train_on {images_dir}: {path} is not a readable image "
                             f"({type(error).__name__}: {error})") from None
        arrays.append(np.asarray(square, dtype=np.float32))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1


def _random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return x.flip(-1) if torch.rand((), generator=generator) < 0.5 else x


def _train_vae(vae: torch.nn.Module, images: torch.Tensor, steps: int, batch_size: int, crop: int, lr: float,
               generator: torch.Generator) -> float:
    """Autoencoder training (reconstruction MSE + a small KL) on random crops; returns the last loss.

    The VAE is fully convolutional, so crops smaller than the images teach it the same encoding at a
    fraction of the cost; the reconstruction loss also shrinks the posterior's std, which at random
    init swamps the image's signal in a sampled latent.
    """
    from core.progress import tracked

    vae.train().requires_grad_(True)
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
    loss = torch.tensor(float("nan"))
    for _ in tracked(range(steps), steps, "tiny-models: training the VAE (autoencoder)"):
        rows = images[torch.randint(len(images), (batch_size,), generator=generator)]
        top, left = torch.randint(images.shape[-1] - crop + 1, (2,), generator=generator).tolist()
        x = _random_flip(rows[..., top:top + crop, left:left + crop], generator)
        posterior = vae.encode(x).latent_dist
        loss = F.mse_loss(vae.decode(posterior.sample(generator=generator)).sample, x) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    vae.eval().requires_grad_(False)
    return float(loss.detach())


def _unit_latent_scale(vae: torch.nn.Module, images: torch.Tensor, generator: torch.Generator) -> None:
    """Rescale the latent space so scaled latents have unit std on the training images.

    SD chose its scaling_factor (0.18215) as 1/std of its VAE's latents; the tiny VAE keeps that
    factor, so its latents are rescaled instead: quant_conv's mean rows ×c (its log-variance +2 ln c)
    and post_quant_conv's weights ÷c, an exact reparametrisation of the same autoencoder.
    """
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.sample(generator=generator)
        scale = 1 / (latents.std() * vae.config.scaling_factor)
        channels = vae.config.latent_channels
        vae.quant_conv.weight[:channels] *= scale
        vae.quant_conv.bias[:channels] *= scale
        vae.quant_conv.bias[channels:] += 2 * torch.log(scale)
        vae.post_quant_conv.weight /= scale


def _train_unet(parts, images: torch.Tensor, steps: int, batch_size: int, timesteps: tuple[int, int], lr: float,
                prompt: str, generator: torch.Generator) -> float:
    """ε-prediction training on the images' latents (sampled from the VAE posterior) at `timesteps`."""
    from core.progress import tracked

    from lightning_modules.diffusion_pass import DiffusionPass

    vae, unet, scheduler = parts.vae, parts.unet, parts.scheduler
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
        text = DiffusionPass(parts, timesteps[0], 1, prompt, "sample").text_embedding(torch.device("cpu"))
    mean, std = posterior.mean, posterior.std
    unet.train().requires_grad_(True)
    optimizer = torch.optim.Adam(unet.parameters(), lr=lr)
    loss = torch.tensor(float("nan"))
    for _ in tracked(range(steps), steps, "tiny-models: training the UNet (denoising)"):
        rows = torch.randint(len(images), (batch_size,), generator=generator)
        x0 = (mean[rows] + std[rows] * torch.randn(mean[rows].shape, generator=generator)) * vae.config.scaling_factor
        x0 = _random_flip(x0, generator)
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(timesteps[0], timesteps[1] + 1, (batch_size,), generator=generator)
        prediction = unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=text.expand(batch_size, -1, -1))
        loss = F.mse_loss(prediction.sample, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    unet.eval().requires_grad_(False)
    return float(loss.detach())


def trained_timesteps(sd_dir: str | Path) -> tuple[int, int] | None:
    """The timestep range a tiny SD's UNet was trained at (its training.json), None for any other model."""
    record = Path(sd_dir) / TRAINING_RECORD
    if not record.is_file():
        return None
    low, high = json.loads(record.read_text()).get("timesteps", (0, 999))
    return int(low), int(high)


def train_tiny_stable_diffusion(sd_dir: str | Path, images_dir: str | Path, resolution: int = 128,
                                vae_steps: int = 60, unet_steps: int = 100, batch_size: int = 16,
                                timesteps: tuple[int, int] = (100, 300), prompt: str = "a photo",
                                seed: int = 0) -> dict:
    """Train the tiny SD's VAE (autoencoder) then UNet (denoising) on the images in `images_dir`, in place.

    `timesteps` (inclusive) brackets phase 1's timestep (200 by default): a few hundred steps cannot teach a
    denoiser every noise level, so they teach it the one the maps are read at. A model for `generate`, which
    samples from t ≈ 999 down, needs (0, 999). Writes SD_DIR/training.json (what the models were trained on,
    the range included: `generate` warns when it samples outside it) and returns that record.
    """
    if not 0 <= timesteps[0] <= timesteps[1] <= 999:
        raise ValueError(f"timesteps {list(timesteps)}: need 0 <= low <= high <= 999")
    from lightning_modules.pretrained import load_stable_diffusion

    sd_dir, images_dir = Path(sd_dir), Path(images_dir)
    images = _training_images(images_dir, resolution)
    parts = load_stable_diffusion(str(sd_dir))
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    # The tiny models' tensors are too small to split across threads: on a shared CPU, threads waiting
    # for each other made these steps up to 7× slower (measured), and one thread is as fast on an idle one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        vae_loss = _train_vae(parts.vae, images, vae_steps, batch_size // 2, min(64, resolution), 1e-2, generator)
        _unit_latent_scale(parts.vae, images, generator)
        unet_loss = _train_unet(parts, images, unet_steps, batch_size, timesteps, 5e-3, prompt, generator)
    finally:
        torch.set_num_threads(threads)
    parts.vae.save_pretrained(sd_dir / "vae")
    parts.unet.save_pretrained(sd_dir / "unet")
    record = {"images": str(images_dir.resolve()), "num_images": len(images), "resolution": resolution,
              "vae_steps": vae_steps, "vae_final_loss": vae_loss, "unet_steps": unet_steps,
              "unet_final_loss": unet_loss, "timesteps": list(timesteps), "prompt": prompt, "seed": seed}
    (sd_dir / TRAINING_RECORD).write_text(json.dumps(record, indent=1))
    return record
