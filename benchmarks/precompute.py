"""Phase 1 throughput: the fused pass vs the naive MC baseline, per kernel setting, model-only and end to end.

Run by hand (prints, asserts nothing):
    python benchmarks/precompute.py                                   # CPU, tiny models
    python benchmarks/precompute.py --device cuda --arch sd15 --dtype bfloat16 --batch-size 32 \
        --kernels default channels_last bf16_weights cudnn_benchmark compile --end-to-end     # benchmarks/gpu.sh

Model-only (the extractor's own `compute_maps`, uint8 images already on the device):
  fused closed form: VAE encode once, one UNet call on B·N noised latents, φ hooked → LaRE + closed-form DEU.
  fused MC (M):      the same pass, DEU as the MC variance over M conv_out weight samples of φ̄.
  naive MC (M):      DEU as DEUA Eq. 13 spells it, with its N noises batched (the fair baseline): one UNet call
                     on the B·N latents per weight sample (conv_out perturbed), plus one for LaRE: (M+1) calls.
  ensemble conv_out (K): fused closed form + DECU's ensemble_mi/ensemble_var from K conv_out heads on its φ̄.
  ensemble embedding (K): fused closed form + DECU's maps from K embedding members: K more UNet calls on the
                     pass's B·N noised latents, one per member's conditioning embedding (DECU's design).
  The FLOP ratio naive/fused is the bound on the speed-up (×3.87 at M = N = 4, 256², ×12.5 at M = 16); the
  measured throughput ratio is printed beside it.
End to end (--end-to-end): `python -m cli precompute` on synthetic JPEG/PNG shards (decode → features → store),
  images/s from its second batch to its end (start-up and first-batch warm-up excluded, the store's last writes
  included); a gap to the model-only figure is host stall (decode, copies, writer).
`--arch sd15`: SD v1.5's published architecture with random weights, written to disk once (no download; FLOPs
and speed depend on shapes, not on values).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from PIL import Image

from core.seeding import image_generator
from lightning_modules.diffusion_pass import DiffusionPass, autocast_context, normalise_images
from lightning_modules.ensemble_fit import MEMBERS_FORMAT
from lightning_modules.feature_extractor import FeatureExtractor
from lightning_modules.laplace_fit import POSTERIOR_FORMAT
from lightning_modules.pretrained import load_stable_diffusion, weights_hash
from lightning_modules.tiny_models import build_tiny_models

KERNELS: dict[str, dict[str, object]] = {
    "default": {},
    "channels_last": {"channels_last": True},
    "bf16_weights": {"weights_dtype": "bfloat16"},
    "cudnn_benchmark": {"cudnn_benchmark": True},
    "compile": {"compile": True},
    "eager_all": {"channels_last": True, "weights_dtype": "bfloat16", "cudnn_benchmark": True},
    "all": {"channels_last": True, "weights_dtype": "bfloat16", "cudnn_benchmark": True, "compile": True},
}
PEAK_FLOPS = {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12}  # H100 SXM dense (fp32 without TF32)


def write_sd15_random(tiny_sd: Path, out: Path) -> Path:
    """SD v1.5's UNet/VAE/text-encoder configs (as published in its model repo) with random weights, in diffusers
    layout; tokenizer and scheduler are the tiny model's (same scheduler settings; token ids < 1000 are valid in the
    49408-token vocabulary), which changes no FLOP count."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, act_fn="silu", center_input_sample=False,
        downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1,
        norm_eps=1e-5).save_pretrained(out / "unet")
    AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
        act_fn="silu", sample_size=512, scaling_factor=0.18215).save_pretrained(out / "vae")
    CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)).save_pretrained(out / "text_encoder")
    for name in ("tokenizer", "scheduler", "model_index.json"):
        copy = shutil.copytree if (tiny_sd / name).is_dir() else shutil.copy
        copy(tiny_sd / name, out / name)
    return out


def write_posterior(sd: Path, out: Path, resolution: int) -> Path:
    """A posterior file with small random variances that the extractor accepts for `sd` (speed needs no real fit)."""
    unet = load_stable_diffusion(str(sd)).unet
    shape = tuple(unet.conv_out.weight.shape)
    torch.save({"format": POSTERIOR_FORMAT, "var_w": 1e-4 * torch.rand(shape) + 1e-6,
                "var_b": 1e-4 * torch.rand(shape[0]) + 1e-6, "prior_precision": 1.0, "sigma": "fixed",
                "sigma_noise": 1.0, "metadata": {"unet_hash": weights_hash(unet), "timestep": 200, "prompt": "a photo",
                                                 "latent": "sample", "resolution": resolution}}, out)
    return out


def write_members(sd: Path, out: Path, kind: str, num_members: int, resolution: int) -> Path:
    """A members file of `kind` (conv_out heads or text embeddings) with small random perturbations of the
    pretrained tensors that the ensemble maps accept for `sd` (speed needs no real fit)."""
    parts = load_stable_diffusion(str(sd))
    unet, conv = parts.unet, parts.unet.conv_out
    text = DiffusionPass(parts, 200, 1, "a photo", "sample").text_embedding(torch.device("cpu"))[0]
    conv_out = kind == "conv_out"
    torch.save({"format": MEMBERS_FORMAT, "kind": kind, "num_members": num_members,
                "weights": conv.weight.detach() + 1e-2 * torch.randn(num_members, *conv.weight.shape) if conv_out else None,
                "biases": conv.bias.detach() + 1e-2 * torch.randn(num_members, *conv.bias.shape) if conv_out else None,
                "embeddings": None if conv_out else text + 1e-2 * torch.randn(num_members, *text.shape),
                "sigma2": torch.ones(conv.out_channels),
                "metadata": {"unet_hash": weights_hash(unet), "timestep": 200, "prompt": "a photo", "latent": "sample",
                             "latent_size": [resolution // 8, resolution // 8]}}, out)
    return out


def naive_mc(fe: FeatureExtractor, images: torch.Tensor, sha256: list[str], num_samples: int) -> torch.Tensor:
    """LaRE + DEU with (M+1) UNet calls on the B·N batched latents, conv_out perturbed per weight sample."""
    diffusion, unet = fe.diffusion, fe.unet
    images = normalise_images(images)
    generators = [image_generator(0, "diffusion_noise", s) for s in sha256]
    latent_eps, noise = (x.to(images.device) for x in diffusion.draw(generators, images.shape[-1]))
    batch, n = images.shape[0], diffusion.num_noises
    text = diffusion.text_embedding(images.device).expand(batch * n, -1, -1).to(unet.dtype)
    t = torch.full((batch * n,), diffusion.timestep, device=images.device, dtype=torch.long)
    conv = unet.conv_out
    original = conv.weight.clone(), conv.bias.clone()
    with autocast_context(images.device, diffusion.autocast_dtype):
        dist = fe.vae.encode(images.to(fe.vae.dtype)).latent_dist
        x0 = (dist.mean.float() + dist.std.float() * latent_eps) * fe.vae.config.scaling_factor
        x_t = diffusion.parts.scheduler.add_noise(x0.repeat_interleave(n, 0), noise.flatten(0, 1), t).to(unet.dtype)
        eps_hat = unet(x_t, t, encoder_hidden_states=text).sample.float().unflatten(0, (batch, n))
        lare = (eps_hat - noise).square().mean(1)
        means = []
        for _ in range(num_samples):
            conv.weight.copy_(original[0] + fe.var_w.sqrt().to(conv.weight.dtype) * torch.randn_like(original[0]))
            conv.bias.copy_(original[1] + fe.var_b.sqrt().to(conv.bias.dtype) * torch.randn_like(original[1]))
            means.append(unet(x_t, t, encoder_hidden_states=text).sample.float().unflatten(0, (batch, n)).mean(1))
    conv.weight.copy_(original[0])
    conv.bias.copy_(original[1])
    return lare + torch.stack(means).var(0)


def flops_per_image(fn: Callable[[], object], batch: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops() / batch


def images_per_second(fn: Callable[[], object], batch: int, iters: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * iters / (time.perf_counter() - start)


def extractor_kwargs(args: argparse.Namespace, sd: Path, posterior: Path, kernel: str,
                     members: str = "conv_out") -> dict[str, object]:
    return dict(sd=str(sd), posterior=str(posterior), outputs=["lare", "deu", "aleatoric", "mi"],
                num_noises=args.num_noises, autocast_dtype=args.dtype, compile_batch_size=args.batch_size,
                map_settings={"ensemble_members": str(args.members[members]), "ensemble_distance": "bhattacharyya"},
                **KERNELS[kernel])


@torch.no_grad()
def model_only(args: argparse.Namespace, sd: Path, posterior: Path, device: torch.device) -> float:
    """Print one line per (kernel setting, method); return the best fused closed-form images/s."""
    images = torch.randint(0, 256, (args.batch_size, 3, args.resolution, args.resolution), dtype=torch.uint8,
                           device=device)
    sha256 = [f"{i:064x}" for i in range(args.batch_size)]
    peak = args.peak_flops or PEAK_FLOPS[args.dtype]
    print(f"\n== model only: {args.arch}, {args.resolution}px, N={args.num_noises}, batch {args.batch_size}, "
          f"autocast {args.dtype}, {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'})")
    best, flops_by_label = 0.0, {}
    for kernel in args.kernels:
        fe = FeatureExtractor(**extractor_kwargs(args, sd, posterior, kernel)).to(device).eval()
        fe.on_predict_start()
        fe.diffusion.text_embedding(device)  # cached once per run: not counted in the first method's FLOPs
        runs: dict[str, Callable[[torch.Tensor], object]] = {
            "fused closed form": lambda x: fe.compute_maps(x, sha256[:len(x)], ["lare", "deu"])}
        for m in args.num_weight_samples:
            runs[f"fused MC (M={m})"] = lambda x, m=m: _fused_mc(fe, x, sha256[:len(x)], m)
        if kernel == args.kernels[0]:
            for m in args.num_weight_samples:
                runs[f"naive MC (M={m}, N batched)"] = lambda x, m=m: naive_mc(fe, x, sha256[:len(x)], m)
            k, ensemble = args.num_members, ["lare", "deu", "ensemble_mi", "ensemble_var"]
            fe_embedding = FeatureExtractor(**extractor_kwargs(args, sd, posterior, kernel, "embedding")).to(device)
            fe_embedding.diffusion.text_embedding(device)
            runs[f"ensemble conv_out (K={k})"] = lambda x: fe.compute_maps(x, sha256[:len(x)], ensemble)
            runs[f"ensemble embedding (K={k})"] = lambda x: fe_embedding.compute_maps(x, sha256[:len(x)], ensemble)
        results: dict[str, tuple[float, float]] = {}
        for label, fn in runs.items():
            if label not in flops_by_label:  # counted once, uncompiled (FLOPs do not depend on kernel settings)
                flops_by_label[label] = (float("nan") if fe.hparams.compile else
                                         flops_per_image(lambda fn=fn: fn(normalise_images(images[:1])), 1))
            flops = flops_by_label[label]
            speed = images_per_second(lambda fn=fn: fn(normalise_images(images)), args.batch_size, args.iters,
                                      args.warmup, device)
            results[label] = (speed, flops)
            line = f"  [{kernel:15s}] {label:28s} {speed:9.2f} img/s  {flops / 1e9:9.4g} GFLOP/img"
            if device.type == "cuda":
                line += f"  {100 * speed * flops / peak:5.1f}% of {peak / 1e12:.0f} TFLOP/s"
            print(line, flush=True)
        best = max(best, results["fused closed form"][0])
        fused_speed, fused_flops = results["fused closed form"]
        for m in args.num_weight_samples:
            if f"naive MC (M={m}, N batched)" in results:
                speed, flops = results[f"naive MC (M={m}, N batched)"]
                print(f"  fused closed form vs naive MC at M={m}: throughput ×{fused_speed / speed:.2f}, "
                      f"FLOP bound ×{flops / fused_flops:.2f}")
        for label in (label for label in results if label.startswith("ensemble")):  # cost vs LaRE + closed-form DEU
            speed, flops = results[label]
            print(f"  {label} vs fused closed form: time ×{fused_speed / speed:.2f}, FLOPs ×{flops / fused_flops:.2f}")
        del fe
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return best


def _fused_mc(fe: FeatureExtractor, images: torch.Tensor, sha256: list[str], num_samples: int) -> object:
    """The extractor's MC mode at M = num_samples (the settings are read per batch)."""
    fe.hparams.deu_mode, fe.hparams.num_weight_samples = "mc", num_samples
    try:
        return fe.compute_maps(images, sha256, ["lare", "deu"])
    finally:
        fe.hparams.deu_mode = "closed_form"


def write_shards(root: Path, count: int, size: int) -> Path:
    """`count` smooth synthetic images (every other one JPEG, else PNG) of side `size`, converted to shards."""
    from datamodules.shards import convert

    rng = np.random.default_rng(0)
    for i in range(count):
        base = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
        image = Image.fromarray(base).resize((size, size), Image.BICUBIC)
        folder = root / "images" / ("real" if i % 2 else "fake")
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:05d}.{'jpg' if i % 2 else 'png'}", quality=90)
    convert("folder", root / "images", "val", root / "shards", shard_size=max(1, count // 4), workers=os.cpu_count())
    return root / "shards"


class SteadyThroughput(Callback):
    """Rows per second of a predict run from the second batch to the end (the writer's last flush included), so
    start-up, model loading and the first batch's warm-up (cudnn.benchmark, compile) do not count."""

    def on_predict_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                               batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch_idx == 1:
            self.start, self.rows = time.perf_counter(), 0
        if batch_idx >= 1:
            self.rows += len(batch["key"])

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if hasattr(self, "start"):
            print(f"STEADY_THROUGHPUT {self.rows} {time.perf_counter() - self.start:.6f}", flush=True)


def end_to_end(args: argparse.Namespace, sd: Path, posterior: Path, work: Path) -> None:
    """`python -m cli precompute` (decode → features → store) timed from its second batch to its end."""
    settings = extractor_kwargs(args, sd, posterior, args.e2e_kernel)
    shards = write_shards(work / "e2e", args.e2e_images, args.e2e_image_size)
    command = [sys.executable, "-m", "cli", "precompute", "--model",
               "lightning_modules.feature_extractor.FeatureExtractor", "--data",
               "datamodules.image_shards.ImageShardDataModule", "--data.shards", str(shards),
               "--data.resolution", str(args.resolution), "--data.batch_size", str(args.batch_size),
               "--data.num_workers", str(args.e2e_workers), "--store", str(work / "store.zarr"),
               "--trainer.accelerator", "gpu" if args.device.startswith("cuda") else "cpu",
               "--trainer.devices", "1", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
               "--trainer.default_root_dir", str(work), "--trainer.callbacks+=benchmarks.precompute.SteadyThroughput"]
    for key, value in settings.items():
        command += [f"--model.{key}", str(value).lower() if isinstance(value, bool) else
                    (f"[{','.join(value)}]" if isinstance(value, list) else str(value))]
    result = subprocess.run(command, capture_output=True, text=True)
    lines = [line.split() for line in result.stdout.splitlines() if line.startswith("STEADY_THROUGHPUT")]
    if result.returncode != 0 or not lines:
        print(f"  end to end: precompute failed (rc {result.returncode}):\n{result.stderr[-2000:]}")
        return
    rows, seconds = int(lines[0][1]), float(lines[0][2])
    print(f"\n== end to end ({args.e2e_kernel}): python -m cli precompute, {args.e2e_images} {args.e2e_image_size}px "
          f"JPEG/PNG → {args.resolution}px, {args.e2e_workers} decode workers: {rows / seconds:.2f} img/s "
          f"({rows} rows after the first batch in {seconds:.1f} s, store writes included)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--arch", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per method")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations per method")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--num-noises", type=int, default=4)
    parser.add_argument("--num-weight-samples", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="autocast dtype of the UNet/VAE forwards")
    parser.add_argument("--num-members", type=int, default=5, help="DECU ensemble size K")
    parser.add_argument("--kernels", nargs="+", choices=sorted(KERNELS), default=["default"])
    parser.add_argument("--peak-flops", type=float, default=None, help="dense peak of --dtype (default: H100 SXM)")
    parser.add_argument("--end-to-end", action="store_true", help="also time `python -m cli precompute`")
    parser.add_argument("--e2e-images", type=int, default=32)
    parser.add_argument("--e2e-image-size", type=int, default=512)
    parser.add_argument("--e2e-workers", type=int, default=2)
    parser.add_argument("--e2e-kernel", choices=sorted(KERNELS), default="default")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sd = build_tiny_models(work / "tiny")["sd"]
        if args.arch == "sd15":
            sd = write_sd15_random(sd, work / "sd15")
        posterior = write_posterior(sd, work / "posterior.pt", args.resolution)
        args.members = {kind: write_members(sd, work / f"members_{kind}.pt", kind, args.num_members, args.resolution)
                        for kind in ("conv_out", "embedding")}
        model_only(args, sd, posterior, device)
        if args.end_to_end:
            end_to_end(args, sd, posterior, work)


if __name__ == "__main__":
    main()
