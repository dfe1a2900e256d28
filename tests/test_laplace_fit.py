"""LaplaceFit through Lightning's predict loop and `python -m cli laplace-fit`, against direct GGN sums."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from lightning_modules.diffusion_pass import DiffusionPass, key_generator
from lightning_modules.laplace_fit import LaplaceFit, load_posterior
from lightning_modules.pretrained import load_stable_diffusion, weights_hash
from lightning_modules.uncertainty import conv3x3_ggn_sums

RES, N, NUM, BAD = 64, 2, 5, 3  # row BAD fails to decode and must be skipped


class CalibrationImages(torch.utils.data.Dataset):
    """Rows in ImageShardDataModule's batch format (docs/contracts.md), row BAD marked undecodable."""

    def __len__(self) -> int:
        return NUM

    def __getitem__(self, i: int) -> dict[str, Any]:
        image = torch.rand(3, RES, RES, generator=torch.Generator().manual_seed(i)) * 2 - 1
        return {"image": image * (i != BAD), "key": f"cal-{i}", "row": i, "label": 0, "generator": 0,
                "shard_index": 0, "error": "decode failed" if i == BAD else ""}


class TinyCalibrationData(pl.LightningDataModule):
    """Stands in for ImageShardDataModule: only its batch format matters to LaplaceFit."""

    def __init__(self, batch_size: int = 2) -> None:
        super().__init__()
        self.batch_size = batch_size

    def predict_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(CalibrationImages(), batch_size=self.batch_size)


def expected_sums(sd: Path) -> tuple[torch.Tensor, float]:
    """GGN sums and term count computed directly from the fused pass on the decodable images."""
    parts = load_stable_diffusion(str(sd))
    rows = [CalibrationImages()[i] for i in range(NUM) if i != BAD]
    with torch.no_grad():
        out = DiffusionPass(parts, 200, N, "a photo", "sample")(
            torch.stack([r["image"] for r in rows]), [key_generator(0, r["key"]) for r in rows])
    phi = out.phi.flatten(0, 1)
    return conv3x3_ggn_sums(phi), float(phi.shape[0] * phi.shape[-2] * phi.shape[-1])


def check_posterior(path: Path, sd: Path, sigma: float, prior: float) -> None:
    posterior = load_posterior(path)
    ggn_w, count = expected_sums(sd)
    torch.testing.assert_close(posterior["ggn_w"], ggn_w, rtol=1e-6, atol=0)
    assert posterior["count"] == count
    expected_var_w = 1 / (ggn_w / sigma**2 + prior)
    torch.testing.assert_close(posterior["var_w"], expected_var_w.float().expand(4, -1, -1, -1))
    torch.testing.assert_close(posterior["var_b"], torch.full((4,), 1 / (count / sigma**2 + prior)))
    meta = posterior["metadata"]
    assert meta["num_images"] == NUM - 1 and meta["resolution"] == RES and meta["num_noises"] == N
    assert meta["unet_hash"] == weights_hash(load_stable_diffusion(str(sd)).unet)


def test_predict_loop_accumulates_the_ggn(tiny_model_paths: dict[str, Path], tmp_path: Path) -> None:
    fit = LaplaceFit(str(tiny_model_paths["sd"]), output=str(tmp_path / "post.pt"), num_noises=N,
                     sigma_noise=0.5, prior_precision=3.0)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False)
    trainer.predict(fit, datamodule=TinyCalibrationData(), return_predictions=False)
    check_posterior(tmp_path / "post.pt", tiny_model_paths["sd"], 0.5, 3.0)


@pytest.mark.slow
def test_two_ranks_sum_to_the_single_process_posterior(tiny_model_paths: dict[str, Path], tmp_path: Path) -> None:
    """ddp_spawn on CPU/gloo, uneven shares (3 batches over 2 ranks): the all-reduce gives the same file."""
    fit = LaplaceFit(str(tiny_model_paths["sd"]), output=str(tmp_path / "post.pt"), num_noises=N)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
                         enable_progress_bar=False, enable_checkpointing=False)
    trainer.predict(fit, datamodule=TinyCalibrationData(), return_predictions=False)
    check_posterior(tmp_path / "post.pt", tiny_model_paths["sd"], 1.0, 1.0)


@pytest.mark.slow
def test_cli_laplace_fit_end_to_end(tiny_model_paths: dict[str, Path], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    from cli.__main__ import main

    out = tmp_path / "posterior.pt"
    main(["laplace-fit", "--model", "lightning_modules.laplace_fit.LaplaceFit",
          "--model.init_args.sd", str(tiny_model_paths["sd"]), "--model.init_args.output", str(out),
          "--model.init_args.num_noises", str(N), "--model.init_args.sigma_noise", "2.0",
          "--data", f"{__name__}.TinyCalibrationData", "--trainer.accelerator", "cpu",
          "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
          "--trainer.default_root_dir", str(tmp_path)])
    assert f"posterior written to {out}" in capsys.readouterr().out
    check_posterior(out, tiny_model_paths["sd"], 2.0, 1.0)
