"""Train DECU's partially frozen ensemble over calibration images (`python -m cli ensemble-fit`).

DECU (Berry, Brando, Meger, arXiv 2406.18580) trains only a compact part per member on a frozen pretrained
backbone. Two member kinds here:

- `embedding` (DECU's design adapted to a text-conditioned UNet: DECU learns one class embedding per
  member; SD is conditioned on a text embedding, so each member owns a learned copy of the prompt's text
  embedding (L×D), initialised from it, and gradients flow through the frozen UNet). Evaluating K members
  costs K UNet calls per noise.
- `conv_out` (cheap): each member owns a copy of the UNet's conv_out, trained on φ from the frozen trunk,
  so the phase-1 pass evaluates all K heads on its one φ (no extra UNet call).

Diversity comes from each member's seed: its initial perturbation (`init_noise` × the tensor's std, DECU
initialises members randomly), its noise and minibatch draws, and (`bootstrap`) its own bootstrap
resample of the calibration set. Loss: the ε-MSE at the extractor's timestep.

Run: a predict pass encodes the calibration images once (exactly once over ranks, rows with a decode
error skipped); at its end the latents are gathered on every rank, sorted by image sha256 (so the result does not
depend on rank count), each rank trains the members k ≡ rank (mod world), the members are gathered, and
rank 0 writes the members file. σ² (per latent channel) is the mean over members of their residual
ε-MSE on the calibration set, the Gaussian variance PaiDE needs.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F

from core.checkpoint_io import safe_torch_load
from core.outputs import output_file
from core.progress import tracked
from core.seeding import image_generator, image_seed
from lightning_modules.diffusion_pass import DiffusionPass, normalise_images
from lightning_modules.pretrained import load_stable_diffusion, weights_hash

MEMBERS_FORMAT = "decu-members-v1"
MemberKind = Literal["embedding", "conv_out"]
# What an extractor using the members must share with the fit (resolution is checked on the first batch).
MATCHED_SETTINGS = ("unet_hash", "timestep", "prompt", "latent")


def load_members(path: str | Path) -> dict[str, Any]:
    """Read a members file written by EnsembleFit (no code runs: `safe_torch_load`); one clear error if it is
    missing, unreadable or not one."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"ensemble members file {file} not found; train one with `python -m cli ensemble-fit`")
    members = safe_torch_load(file, "ensemble members file")
    if not isinstance(members, dict) or members.get("format") != MEMBERS_FORMAT:
        raise ValueError(f"{file} is not a {MEMBERS_FORMAT} file written by `python -m cli ensemble-fit`")
    return members


def check_members(members: dict[str, Any], path: str | Path, expected: dict[str, Any]) -> None:
    """Refuse members trained with other settings, naming every differing field (members, extractor)."""
    meta = members["metadata"]
    diff = {k: (meta[k], v) for k, v in expected.items() if meta[k] != v}
    if diff:
        raise ValueError(f"ensemble members {path} were trained with other settings (members, extractor): {diff}")


class EnsembleFit(pl.LightningModule):
    """Encode calibration images in predict, then train K members at the end; see the module docstring."""

    def __init__(self, sd: str, output: str = "members.pt", kind: MemberKind = "conv_out", num_members: int = 5,
                 bootstrap: bool = True, init_noise: float = 0.1, steps: int = 500, batch_size: int = 8,
                 lr: float = 1e-3, timestep: int = 200, prompt: str = "a photo",
                 latent: Literal["sample", "mean"] = "sample", seed: int = 0) -> None:
        """Args:
            kind: `embedding` (DECU adapted) or `conv_out` (cheap heads on the frozen trunk's φ).
            num_members: K; member k is seeded by (seed, k).
            bootstrap: each member trains on its own bootstrap resample of the calibration images.
            init_noise: members start at the pretrained tensor + init_noise·std(tensor)·N(0, 1).
            steps, batch_size, lr: Adam steps per member on minibatches of calibration latents.
        """
        super().__init__()
        self.save_hyperparameters()
        if kind not in ("embedding", "conv_out"):
            raise ValueError(f"kind must be 'embedding' or 'conv_out', got {kind!r}")
        if num_members < 2 or steps < 1 or batch_size < 1 or lr <= 0 or init_noise < 0:
            raise ValueError(f"need num_members >= 2, steps >= 1, batch_size >= 1, lr > 0, init_noise >= 0; got "
                             f"{num_members}, {steps}, {batch_size}, {lr}, {init_noise}")
        output_file(output, "--model.init_args.output")  # before training: an unwritable output is one line now
        parts = load_stable_diffusion(sd)
        self.vae, self.unet, self.text_encoder = parts.vae, parts.unet, parts.text_encoder
        self.parts, self.sd_source = parts, parts.source
        self.diffusion = DiffusionPass(parts, timestep, 1, prompt, latent)
        self._keys: list[str] = []
        self._latents: list[torch.Tensor] = []
        self.resolution = 0

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Encode the decodable images of a batch to latents x₀ (the same draw as the extractor's pass)."""
        valid = [i for i, err in enumerate(batch["error"]) if not err]
        if not valid:
            return
        if "sha256" not in batch:
            raise ValueError("batch has no 'sha256' (content hash per image): read the calibration images through "
                             "ImageShardDataModule")
        images = normalise_images(batch["image"][valid])
        if self.resolution not in (0, images.shape[-1]):
            raise ValueError(f"calibration images changed resolution from {self.resolution} to {images.shape[-1]}")
        self.resolution = images.shape[-1]
        keys = [batch["sha256"][i] for i in valid]  # content keys: the draw and the order do not depend on rows
        generators = [image_generator(self.hparams.seed, "diffusion_noise", k) for k in keys]
        latent_eps, _ = self.diffusion.draw(generators, self.resolution)
        dist_ = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        x0 = dist_.mean.float() + (dist_.std.float() * latent_eps.to(self.device) if self.hparams.latent == "sample"
                                   else 0.0)
        self._keys += keys
        self._latents.append((x0 * self.vae.config.scaling_factor).cpu())

    def on_predict_epoch_end(self) -> None:
        """Gather the latents, train this rank's members, gather the members, write the file from rank 0."""
        world = self.trainer.world_size
        local = (self._keys, torch.cat(self._latents) if self._latents else torch.empty(0), self.resolution)
        shards = [local] if world == 1 else _all_gather(local, world)
        keys = [k for shard in shards for k in shard[0]]
        if not keys:
            raise RuntimeError("ensemble-fit saw no decodable calibration image; check the datamodule's shards")
        latents = torch.cat([s[1] for s in shards if s[0]])
        order = sorted(range(len(keys)), key=keys.__getitem__)
        keys, latents = [keys[i] for i in order], latents[order]
        self.resolution = max(s[2] for s in shards)
        self.latent_size = list(latents.shape[-2:])
        digest = hashlib.sha256("\n".join(keys).encode())
        digest.update(latents.numpy().tobytes())
        mine = {k: self.train_member(k, latents) for k in range(self.hparams.num_members) if k % world
                == self.trainer.global_rank}
        trained = mine if world == 1 else {k: m for part in _all_gather(mine, world) for k, m in part.items()}
        if self.trainer.is_global_zero:
            self.save_members([trained[k] for k in range(self.hparams.num_members)], len(keys), digest.hexdigest())

    def member_seed(self, member: int) -> int:
        """Member k's seed (`core.seeding`, key `member:{k}`): its initial perturbation and bootstrap draw."""
        return image_seed(self.hparams.seed, "member_init", f"member:{member}")

    def _initial(self, tensor: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        noise = torch.randn(tensor.shape, generator=gen).to(tensor.device)
        return (tensor.detach().float() + self.hparams.init_noise * tensor.detach().float().std() * noise)

    def _eps(self, params: list[torch.Tensor], x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """A member's ε̂: the frozen UNet with the member's text embedding, or the trunk + the member's conv_out."""
        if self.hparams.kind == "embedding":
            return self.unet(x_t, t, encoder_hidden_states=params[0].unsqueeze(0).expand(x_t.shape[0], -1, -1)).sample
        text = self.diffusion.text_embedding(self.device)
        captured: list[torch.Tensor] = []
        hook = self.unet.conv_out.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
        try:
            with torch.no_grad():
                self.unet(x_t, t, encoder_hidden_states=text.expand(x_t.shape[0], -1, -1))
        finally:
            hook.remove()
        return F.conv2d(captured[0], params[0], params[1], padding=1)

    def train_member(self, member: int, latents: torch.Tensor) -> dict[str, torch.Tensor]:
        """Adam on the ε-MSE for one member, all draws from its own generator; returns its tensors and σ²."""
        hp = self.hparams
        gen = torch.Generator().manual_seed(self.member_seed(member))
        n = latents.shape[0]
        pool = torch.randint(n, (n,), generator=gen) if hp.bootstrap else torch.arange(n)
        conv = self.unet.conv_out
        if hp.kind == "embedding":
            start = [self.diffusion.text_embedding(self.device)[0]]
        else:
            start = [conv.weight, conv.bias]
        params = [self._initial(p, gen).requires_grad_(True) for p in start]
        optimizer = torch.optim.Adam(params, lr=hp.lr)
        timestep = torch.full((hp.batch_size,), hp.timestep, dtype=torch.long, device=self.device)
        with torch.enable_grad():
            for _ in tracked(range(hp.steps), hp.steps, f"ensemble-fit member {member + 1}/{hp.num_members} "
                             f"(rank {self.trainer.global_rank})"):
                x0 = latents[pool[torch.randint(n, (hp.batch_size,), generator=gen)]].to(self.device)
                noise = torch.randn(x0.shape, generator=gen).to(self.device)
                x_t = self.parts.scheduler.add_noise(x0, noise, timestep)
                loss = F.mse_loss(self._eps(params, x_t, timestep).float(), noise)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        with torch.no_grad():  # residual variance per channel on the whole calibration set, the member's own noise
            squared = torch.zeros(latents.shape[1], dtype=torch.float64)
            for start_row in range(0, n, hp.batch_size):
                x0 = latents[start_row:start_row + hp.batch_size].to(self.device)
                noise = torch.randn(x0.shape, generator=gen).to(self.device)
                t = timestep[:1].expand(x0.shape[0])
                eps = self._eps(params, self.parts.scheduler.add_noise(x0, noise, t), t).float()
                squared += (eps - noise).double().square().sum((0, 2, 3)).cpu()
        sigma2 = squared / (n * latents.shape[2] * latents.shape[3])
        return {"params": [p.detach().cpu() for p in params], "sigma2": sigma2, "final_loss": float(loss)}

    def save_members(self, trained: list[dict[str, Any]], num_images: int, data_sha256: str) -> None:
        hp = self.hparams
        output = Path(hp.output).expanduser()
        output.parent.mkdir(parents=True, exist_ok=True)
        stacked = [torch.stack([m["params"][i] for m in trained]) for i in range(len(trained[0]["params"]))]
        torch.save({
            "format": MEMBERS_FORMAT, "kind": hp.kind, "num_members": hp.num_members,
            "seeds": [self.member_seed(k) for k in range(hp.num_members)],
            "embeddings": stacked[0] if hp.kind == "embedding" else None,
            "weights": stacked[0] if hp.kind == "conv_out" else None,
            "biases": stacked[1] if hp.kind == "conv_out" else None,
            "sigma2": torch.stack([m["sigma2"] for m in trained]).mean(0).float(),
            "final_losses": [m["final_loss"] for m in trained],
            "metadata": {"unet_hash": weights_hash(self.unet), "timestep": hp.timestep, "prompt": hp.prompt,
                         "latent": hp.latent, "resolution": self.resolution, "latent_size": self.latent_size,
                         "num_images": num_images,
                         "data_sha256": data_sha256, "sd": self.sd_source, "bootstrap": hp.bootstrap,
                         "steps": hp.steps, "batch_size": hp.batch_size, "lr": hp.lr, "init_noise": hp.init_noise,
                         "seed": hp.seed},
        }, output)


def _all_gather(value: Any, world: int) -> list[Any]:
    """Every rank's picklable `value` (CPU tensors inside), in rank order."""
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, value)
    return gathered
