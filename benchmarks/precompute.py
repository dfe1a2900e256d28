"""Phase 1 throughput: the fused pass vs a naive MC implementation, on tiny models and SD v1.5's real architecture.

Run by hand (prints, asserts nothing):
    python benchmarks/precompute.py                         # CPU: batch 1, one timed iteration
    python benchmarks/precompute.py --device cuda --batch-size 16 --iters 5 --dtype bfloat16

fused: VAE encode once, one UNet call on B·N noised latents, φ hooked → LaRE, closed-form DEU
       (and MC DEU over M conv_out weight samples of φ̄, which costs M small convolutions).
ensemble: the fused closed-form pass plus DECU's maps: conv_out members = K heads on its φ̄ (one conv with
       K·4 output channels), embedding members = K more UNet calls on its B·N noised latents.
naive: VAE encode once, M×N full UNet passes with perturbed conv_out weights (DEU as DEUA Eq. 13
       spells it) plus a separate N-pass LaRE loop: (M+1)·N UNet forwards.
The real architecture is SD v1.5's published config with random weights (no download needed):
FLOPs and speed depend on shapes, not on weight values.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable

import torch

from lightning_modules.diffusion_pass import DiffusionPass, autocast_context, key_generator
from lightning_modules.ensemble_uncertainty import conv_out_member_means, ensemble_variance, paide_mutual_information
from lightning_modules.pretrained import StableDiffusionParts, load_stable_diffusion
from lightning_modules.tiny_models import build_tiny_models
from lightning_modules.uncertainty import closed_form_deu, latent_reconstruction_error, mc_deu


def sd15_random_parts(tiny: StableDiffusionParts) -> StableDiffusionParts:
    """SD v1.5's UNet/VAE/text-encoder configs (as published in its model repo) with random weights.

    The tokenizer and scheduler are the tiny model's (same scheduler settings; token ids < 1000 are valid
    in the 49408-token vocabulary), which changes no FLOP count.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, act_fn="silu", center_input_sample=False,
        downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1, norm_eps=1e-5)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
        act_fn="silu", sample_size=512, scaling_factor=0.18215)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768))
    for module in (unet, vae, text_encoder):
        module.eval().requires_grad_(False)
    return StableDiffusionParts(vae, unet, text_encoder, tiny.tokenizer, tiny.scheduler, "random SD v1.5 architecture")


class Methods:
    """The fused and naive computations of LaRE + DEU at the same (N, M), on one set of parts."""

    def __init__(self, parts: StableDiffusionParts, num_noises: int, num_samples: int, dtype: str,
                 num_members: int = 5) -> None:
        self.parts, self.n, self.m, self.dtype = parts, num_noises, num_samples, dtype
        self.diffusion = DiffusionPass(parts, 200, num_noises, "a photo", "sample", dtype)
        conv = parts.unet.conv_out
        self.var_w = 1e-4 * torch.rand_like(conv.weight, dtype=torch.float32)
        self.var_b = 1e-4 * torch.rand_like(conv.bias, dtype=torch.float32)
        # DECU members (random: speed depends on shapes only): K conv_out heads, or K conditioning embeddings.
        self.member_w = conv.weight.float() + 1e-2 * torch.randn(num_members, *conv.weight.shape, device=conv.weight.device)
        self.member_b = conv.bias.float() + 1e-2 * torch.randn(num_members, *conv.bias.shape, device=conv.bias.device)
        self.sigma2 = torch.ones(conv.out_channels, 1, 1, device=conv.weight.device)
        text = self.diffusion.text_embedding(conv.weight.device)
        self.embeddings = [text + 1e-2 * torch.randn_like(text) for _ in range(num_members)]

    @torch.no_grad()
    def fused(self, images: torch.Tensor, keys: list[str], mode: str) -> dict[str, torch.Tensor]:
        gens = [key_generator(0, k) for k in keys]
        out = self.diffusion(images, gens)
        phi_bar, conv = out.phi.mean(1), self.parts.unet.conv_out
        deu = (closed_form_deu(phi_bar, self.var_w, self.var_b) if mode == "closed_form"
               else mc_deu(phi_bar, conv.weight, conv.bias, self.var_w, self.var_b, self.m, gens))
        return {"lare": latent_reconstruction_error(out.eps_hat, out.noise), "deu": deu}

    @torch.no_grad()
    def ensemble_conv_out(self, images: torch.Tensor, keys: list[str]) -> dict[str, torch.Tensor]:
        """Fused closed-form pass + DECU maps from K conv_out heads on the same φ̄ (no extra UNet call)."""
        gens = [key_generator(0, k) for k in keys]
        out = self.diffusion(images, gens)
        phi_bar, conv = out.phi.mean(1), self.parts.unet.conv_out
        means = conv_out_member_means(phi_bar, self.member_w, self.member_b)
        return {"lare": latent_reconstruction_error(out.eps_hat, out.noise),
                "deu": closed_form_deu(phi_bar, self.var_w, self.var_b),
                "ensemble_mi": paide_mutual_information(means, self.sigma2), "ensemble_var": ensemble_variance(means)}

    @torch.no_grad()
    def ensemble_embedding(self, images: torch.Tensor, keys: list[str]) -> dict[str, torch.Tensor]:
        """Fused closed-form pass + K more UNet calls on its B·N noised latents, one per member's embedding."""
        gens = [key_generator(0, k) for k in keys]
        unet, captured = self.parts.unet, []
        hook = unet.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
        try:
            out = self.diffusion(images, gens)
        finally:
            hook.remove()
        x_t, rows = captured[0], captured[0].shape[0]
        t = torch.full((rows,), 200, device=images.device, dtype=torch.long)
        with autocast_context(images.device, self.dtype):
            means = torch.stack([unet(x_t, t, encoder_hidden_states=emb.to(images.device).expand(rows, -1, -1)).sample
                                 .float().unflatten(0, (images.shape[0], self.n)).mean(1) for emb in self.embeddings], 1)
        return {"lare": latent_reconstruction_error(out.eps_hat, out.noise),
                "deu": closed_form_deu(out.phi.mean(1), self.var_w, self.var_b),
                "ensemble_mi": paide_mutual_information(means, self.sigma2), "ensemble_var": ensemble_variance(means)}

    @torch.no_grad()
    def naive(self, images: torch.Tensor, keys: list[str]) -> dict[str, torch.Tensor]:
        gens = [key_generator(0, k) for k in keys]
        latent_eps, noise = (x.to(images.device) for x in self.diffusion.draw(gens, images.shape[-1]))
        vae, unet, sched = self.parts.vae, self.parts.unet, self.parts.scheduler
        text = self.diffusion.text_embedding(images.device).expand(images.shape[0], -1, -1)
        t = torch.full((images.shape[0],), 200, device=images.device, dtype=torch.long)
        conv, original = unet.conv_out, (unet.conv_out.weight.clone(), unet.conv_out.bias.clone())
        with autocast_context(images.device, self.dtype):
            dist = vae.encode(images).latent_dist
            x0 = (dist.mean.float() + dist.std.float() * latent_eps) * vae.config.scaling_factor
            x_t = [sched.add_noise(x0, noise[:, j], t) for j in range(self.n)]
            lare = sum((unet(x_t[j], t, encoder_hidden_states=text).sample.float() - noise[:, j]) ** 2
                       for j in range(self.n)) / self.n
            means = []
            for _ in range(self.m):
                conv.weight.copy_(original[0] + self.var_w.sqrt() * torch.randn_like(self.var_w))
                conv.bias.copy_(original[1] + self.var_b.sqrt() * torch.randn_like(self.var_b))
                means.append(sum(unet(x_t[j], t, encoder_hidden_states=text).sample.float()
                                 for j in range(self.n)) / self.n)
        conv.weight.copy_(original[0])
        conv.bias.copy_(original[1])
        return {"lare": lare, "deu": torch.stack(means).var(0)}


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


def bench(name: str, parts: StableDiffusionParts, args: argparse.Namespace, device: torch.device, iters: int,
          warmup: int) -> None:
    for module in (parts.vae, parts.unet, parts.text_encoder):
        module.to(device)
    methods = Methods(parts, args.num_noises, args.num_weight_samples, args.dtype, args.num_members)
    images = torch.rand(args.batch_size, 3, args.resolution, args.resolution, device=device) * 2 - 1
    keys = [f"bench-{i}" for i in range(args.batch_size)]
    methods.diffusion.text_embedding(device)  # cached once per run by both methods: keep it out of the counts
    runs: dict[str, Callable[[torch.Tensor, list[str]], object]] = {
        "fused closed-form": lambda x, k: methods.fused(x, k, "closed_form"),
        f"fused MC (M={args.num_weight_samples})": lambda x, k: methods.fused(x, k, "mc"),
        f"naive MC ({(args.num_weight_samples + 1) * args.num_noises} UNet passes)": methods.naive,
        f"fused + ensemble conv_out (K={args.num_members})": methods.ensemble_conv_out,
        f"fused + ensemble embedding (K={args.num_members})": methods.ensemble_embedding}
    print(f"\n== {name}: {args.resolution}px, N={args.num_noises}, M={args.num_weight_samples}, batch {args.batch_size}, "
          f"{args.dtype}, {device}")
    results = {}
    for label, fn in runs.items():
        flops = flops_per_image(lambda: fn(images[:1], keys[:1]), 1)
        speed = images_per_second(lambda: fn(images, keys), args.batch_size, iters, warmup, device)
        results[label] = (speed, flops)
        line = f"{label:34s} {speed:10.3f} img/s   {flops / 1e9:10.2f} GFLOP/img"
        if device.type == "cuda":
            line += f"   {100 * speed * flops / args.peak_flops:5.1f}% of peak"
        print(line, flush=True)
    (fused_speed, fused_flops) = results["fused closed-form"]
    naive_speed, naive_flops = next(v for k, v in results.items() if k.startswith("naive"))
    print(f"fused/naive: throughput ×{fused_speed / naive_speed:.2f}, FLOPs {fused_flops / naive_flops:.3f}")
    for label in (k for k in results if "ensemble" in k):  # cost per image relative to LaRE + closed-form DEU
        print(f"{label}: time ×{fused_speed / results[label][0]:.2f}, FLOPs ×{results[label][1] / fused_flops:.2f} "
              "vs fused closed-form")
    for module in (parts.vae, parts.unet, parts.text_encoder):
        module.to("cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--iters", type=int, default=1, help="timed iterations, real architecture")
    parser.add_argument("--warmup", type=int, default=0, help="untimed iterations, real architecture")
    parser.add_argument("--tiny-iters", type=int, default=20, help="timed iterations, tiny models (2 untimed)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--num-noises", type=int, default=4)
    parser.add_argument("--num-weight-samples", type=int, default=4)
    parser.add_argument("--num-members", type=int, default=5, help="DECU ensemble size K")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--peak-flops", type=float, default=989e12, help="dense peak of --dtype (H100 SXM bf16)")
    parser.add_argument("--skip-real", action="store_true", help="tiny models only")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tiny = load_stable_diffusion(str(build_tiny_models(tmp)["sd"]))
    bench("tiny models", tiny, args, device, args.tiny_iters, 2)
    if not args.skip_real:
        bench("SD v1.5 architecture (random weights)", sd15_random_parts(tiny), args, device, args.iters, args.warmup)


if __name__ == "__main__":
    main()
