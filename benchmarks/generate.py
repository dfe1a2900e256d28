"""Cost of scoring generated images: plain sampling vs generative / aleatoric / guided scoring, in images/s.

Run by hand (prints, asserts nothing):
    python benchmarks/generate.py                                     # CPU, tiny models, 64 px
    python benchmarks/generate.py --arch sd15 --device cuda --resolution 512 --dtype float16

plain:      CFG sampling, `steps` DDIM steps (2 UNet rows per step), VAE decode.
aleatoric:  + De Vita's map at one step: K more CFG ε̂ calls (one batched call).
generative: + M regenerations from x_T with `posterior_steps` steps each (one batched trunk pass per step,
            M conv_out weight samples), M decodes and M CLIP RN50 embeddings (Jazbec et al.).
guided:     aleatoric + De Vita's guided update (a backward pass through the K+1 ε̂ calls).
`--arch sd15` writes SD v1.5's published architecture with random weights and open_clip's RN50 with random
weights to disk (no download; speed depends on shapes, not values); the posterior variances are random too.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.precompute import write_posterior, write_sd15_random
from lightning_modules.generation import UncertaintyGenerator
from lightning_modules.tiny_models import build_tiny_models

MODES = {"plain": {}, "aleatoric": {"aleatoric_steps": [5]}, "generative": {"posterior": "on"},
         "both": {"aleatoric_steps": [5], "posterior": "on"},
         "guided": {"aleatoric_steps": [5], "guided": True}}


def rn50_without_weights(out: Path) -> Path:
    """open_clip's RN50 with its random initial weights, saved as a checkpoint file `load_clip_rn50` reads."""
    import open_clip

    torch.save(open_clip.create_model("RN50", pretrained=None).state_dict(), out)
    return out


def build(args: argparse.Namespace, folder: Path) -> UncertaintyGenerator:
    """The generator with a posterior and CLIP loaded through the real loaders (tiny models or SD v1.5's shapes)."""
    paths = build_tiny_models(folder / "tiny")
    sd, clip = paths["sd"], paths["clip"]
    if args.arch == "sd15":
        sd, clip = write_sd15_random(sd, folder / "sd15"), rn50_without_weights(folder / "rn50.pt")
    model = UncertaintyGenerator(str(sd), posterior=str(write_posterior(sd, folder / "posterior.pt", args.resolution)),
                                 clip=str(clip), resolution=args.resolution, num_inference_steps=args.steps,
                                 num_posterior_samples=args.posterior_samples, posterior_steps=args.posterior_steps,
                                 num_perturbations=args.perturbations, autocast_dtype=args.dtype)
    return model.to(args.device).eval()


def images_per_second(model: UncertaintyGenerator, mode: dict, batch: int, iters: int, device: str) -> float:
    # The settings are read per call: the posterior and CLIP stay loaded, `posterior: None` skips the regenerations.
    model.hparams.update({"aleatoric_steps": [], "posterior": None, "guided": False, **mode})
    keys = [f"bench-{i}" for i in range(batch)]
    model.generate(keys, ["a photo"] * batch)  # warm-up (kernels, caches)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        model.generate(keys, ["a photo"] * batch)
    if device == "cuda":
        torch.cuda.synchronize()
    return batch * iters / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--posterior-steps", type=int, default=10)
    parser.add_argument("--posterior-samples", type=int, default=5)
    parser.add_argument("--perturbations", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--iters", type=int, default=1)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--modes", default=",".join(MODES))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        model = build(args, Path(folder))
        rates = {name: images_per_second(model, MODES[name], args.batch_size, args.iters, args.device)
                 for name in args.modes.split(",")}
    print(f"{args.arch} on {args.device}, {args.resolution}px, {args.steps} steps, M={args.posterior_samples} x "
          f"{args.posterior_steps} steps, K={args.perturbations} at one step, batch {args.batch_size}, {args.dtype}")
    print("| mode | images/s | time vs plain |\n| --- | ---: | ---: |")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.3f} | {rates.get('plain', rate) / rate:.2f}x |")


if __name__ == "__main__":
    main()
