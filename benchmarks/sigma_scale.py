"""How much the choice of σ² (fixed 1 vs estimated RSS/n) changes the scale of DEU and MI, on tiny models.

Run by hand (prints, asserts nothing):
    python benchmarks/sigma_scale.py [--images 16] [--resolution 64]

Fits both posteriors through LaplaceFit on the same calibration images, then computes DEU/MI of other images
with each and prints σ, the mean DEU ratio and the mean MI of each. With H ≫ λ the posterior variance is
≈ σ²/H, so DEU scales like σ²: the ratio shows how far a fixed σ = 1 is from the data's residual noise.
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
from pathlib import Path

import torch

from core.seeding import image_generator
from lightning_modules.feature_extractor import FeatureExtractor
from lightning_modules.laplace_fit import LaplaceFit, load_posterior
from lightning_modules.tiny_models import build_tiny_models
from lightning_modules.uncertainty import conv3x3_ggn_sums


def images(names: list[str], resolution: int) -> tuple[torch.Tensor, list[str]]:
    pixels = torch.stack([torch.randint(0, 256, (3, resolution, resolution), dtype=torch.uint8,
                                        generator=torch.Generator().manual_seed(i)) for i, _ in enumerate(names)])
    return pixels, [hashlib.sha256(n.encode()).hexdigest() for n in names]


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16, help="calibration images (and as many test images)")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--num-noises", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sd = str(build_tiny_models(Path(tmp))["sd"])
        calib, calib_sha = images([f"cal{i}" for i in range(args.images)], args.resolution)
        test, test_sha = images([f"test{i}" for i in range(args.images)], args.resolution)
        maps = {}
        for mode in ("fixed", "estimated"):
            out = str(Path(tmp) / f"{mode}.pt")
            fit = LaplaceFit(sd, output=out, num_noises=args.num_noises, sigma=mode)
            generators = [image_generator(0, "diffusion_noise", s) for s in calib_sha]
            result = fit.diffusion(calib.float() / 127.5 - 1, generators)
            phi = result.phi.flatten(0, 1)
            rss = float((result.eps_hat.double() - result.noise.double()).square().sum())
            fit.save_posterior(conv3x3_ggn_sums(phi), float(phi.shape[0] * phi.shape[-2] * phi.shape[-1]), rss,
                               args.images, args.resolution)
            sigma = load_posterior(out)["sigma_noise"]
            fe = FeatureExtractor(sd, posterior=out, outputs=["deu", "mi"], num_noises=args.num_noises)
            maps[mode] = fe.compute_maps(test.float() / 127.5 - 1, test_sha, ["deu", "mi"])
            print(f"sigma={mode:9s} σ = {sigma:.4f}  σ² = {sigma**2:.4f}  mean DEU {maps[mode]['deu'].mean():.4e}  "
                  f"mean MI {maps[mode]['mi'].mean():.4e}")
        ratio = (maps["estimated"]["deu"] / maps["fixed"]["deu"]).mean()
        print(f"DEU(estimated) / DEU(fixed σ=1), mean over pixels: {ratio:.4f}; "
              f"MI ratio {maps['estimated']['mi'].mean() / maps['fixed']['mi'].mean():.4f}")


if __name__ == "__main__":
    main()
