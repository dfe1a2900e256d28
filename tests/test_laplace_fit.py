"""LaplaceFit through Lightning's predict loop and `python -m cli laplace-fit`, against direct GGN sums; σ fixed and
estimated; the evidence against laplace-torch; posterior files checked on load."""

from __future__ import annotations

from pathlib import Path
import hashlib
import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from core.seeding import image_generator
from lightning_modules.diffusion_pass import DiffusionPass
from lightning_modules.laplace_fit import LaplaceFit, load_posterior
from lightning_modules.pretrained import load_stable_diffusion, weights_hash
from lightning_modules.uncertainty import conv3x3_ggn_sums, log_marginal_likelihood

RES, N, NUM, BAD = 64, 2, 5, 3  # row BAD fails to decode and must be skipped


class CalibrationImages(torch.utils.data.Dataset):
    """Rows in ImageShardDataModule's batch format (docs/contracts.md), row BAD marked undecodable."""

    def __len__(self) -> int:
        return NUM

    def __getitem__(self, i: int) -> dict[str, Any]:
        image = torch.rand(3, RES, RES, generator=torch.Generator().manual_seed(i)) * 2 - 1
        return {"image": image * (i != BAD), "key": f"cal-{i}", "sha256": hashlib.sha256(b"cal-%d" % i).hexdigest(),
                "row": i, "label": 0, "generator": 0, "shard_index": 0, "error": "decode failed" if i == BAD else ""}


class TinyCalibrationData(pl.LightningDataModule):
    """Stands in for ImageShardDataModule: only its batch format matters to LaplaceFit."""

    def __init__(self, batch_size: int = 2) -> None:
        super().__init__()
        self.batch_size = batch_size

    def predict_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(CalibrationImages(), batch_size=self.batch_size)


def expected_sums(sd: Path) -> tuple[torch.Tensor, float, float]:
    """GGN sums, term count and residual sum of squares computed directly from the fused pass on the decodable
    images, each noise a separate observation."""
    parts = load_stable_diffusion(str(sd))
    rows = [CalibrationImages()[i] for i in range(NUM) if i != BAD]
    with torch.no_grad():
        out = DiffusionPass(parts, 200, N, "a photo", "sample")(
            torch.stack([r["image"] for r in rows]), [image_generator(0, "diffusion_noise", r["sha256"]) for r in rows])
    phi = out.phi.flatten(0, 1)
    rss = float((out.eps_hat.double() - out.noise.double()).square().sum())
    return conv3x3_ggn_sums(phi), float(phi.shape[0] * phi.shape[-2] * phi.shape[-1]), rss


def check_posterior(path: Path, sd: Path, sigma: float | None, prior: float) -> None:
    """sigma None: the estimated σ, √(RSS / (count · 4 latent channels)), recomputed here."""
    posterior = load_posterior(path)
    ggn_w, count, rss = expected_sums(sd)
    torch.testing.assert_close(posterior["ggn_w"], ggn_w, rtol=1e-6, atol=0)
    assert posterior["count"] == count
    assert posterior["sigma"] == ("estimated" if sigma is None else "fixed") == posterior["metadata"]["sigma"]
    if sigma is None:
        sigma = math.sqrt(rss / (count * 4))
    assert posterior["sigma_noise"] == pytest.approx(sigma, rel=1e-5)
    expected_var_w = 1 / (ggn_w / sigma**2 + prior)
    torch.testing.assert_close(posterior["var_w"], expected_var_w.float().expand(4, -1, -1, -1))
    torch.testing.assert_close(posterior["var_b"], torch.full((4,), 1 / (count / sigma**2 + prior)))
    meta = posterior["metadata"]
    assert meta["num_images"] == NUM - 1 and meta["resolution"] == RES and meta["num_noises"] == N
    assert meta["unet_hash"] == weights_hash(load_stable_diffusion(str(sd)).unet)


def test_predict_loop_accumulates_the_ggn(tiny_model_paths: dict[str, Path], tmp_path: Path) -> None:
    fit = LaplaceFit(str(tiny_model_paths["sd"]), output=str(tmp_path / "post.pt"), num_noises=N,
                     sigma="fixed", sigma_noise=0.5, prior_precision=3.0)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False)
    trainer.predict(fit, datamodule=TinyCalibrationData(), return_predictions=False)
    check_posterior(tmp_path / "post.pt", tiny_model_paths["sd"], 0.5, 3.0)


def test_estimated_sigma_is_the_maximum_likelihood_value(tiny_model_paths: dict[str, Path], tmp_path: Path) -> None:
    """Default sigma="estimated": σ² = RSS / (latent elements over images × noises × pixels × channels), and the
    variances use it. Catches σ left at 1, the RSS not divided by the noises, or σ used instead of σ²."""
    fit = LaplaceFit(str(tiny_model_paths["sd"]), output=str(tmp_path / "post.pt"), num_noises=N, prior_precision=3.0)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False)
    trainer.predict(fit, datamodule=TinyCalibrationData(), return_predictions=False)
    check_posterior(tmp_path / "post.pt", tiny_model_paths["sd"], None, 3.0)


@pytest.mark.slow
def test_two_ranks_sum_to_the_single_process_posterior(tiny_model_paths: dict[str, Path], tmp_path: Path) -> None:
    """ddp_spawn on CPU/gloo, uneven shares (3 batches over 2 ranks): the all-reduce gives the same file."""
    fit = LaplaceFit(str(tiny_model_paths["sd"]), output=str(tmp_path / "post.pt"), num_noises=N)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
                         enable_progress_bar=False, enable_checkpointing=False)
    trainer.predict(fit, datamodule=TinyCalibrationData(), return_predictions=False)
    check_posterior(tmp_path / "post.pt", tiny_model_paths["sd"], None, 1.0)


@pytest.mark.slow
def test_cli_laplace_fit_end_to_end(tiny_model_paths: dict[str, Path], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Also catches the run's resolved config overwriting a config.yaml the user keeps in the working directory
    (with `logger: false` Lightning's log dir is the cwd): it goes beside the posterior instead; and a second
    run replacing the posterior without `--overwrite true`."""
    from cli.__main__ import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").write_text("mine: true\n")
    out = tmp_path / "posterior.pt"
    main(["laplace-fit", "--model", "lightning_modules.laplace_fit.LaplaceFit",
          "--model.init_args.sd", str(tiny_model_paths["sd"]), "--model.init_args.output", str(out),
          "--model.init_args.num_noises", str(N), "--model.init_args.sigma", "fixed",
          "--model.init_args.sigma_noise", "2.0",
          "--data", f"{__name__}.TinyCalibrationData", "--trainer.accelerator", "cpu",
          "--trainer.logger", "false"])
    assert f"posterior written to {out}" in capsys.readouterr().out
    check_posterior(out, tiny_model_paths["sd"], 2.0, 1.0)
    assert (tmp_path / "config.yaml").read_text() == "mine: true\n"
    assert "sigma_noise: 2.0" in (tmp_path / "posterior.pt.config.yaml").read_text()

    # Bug caught: a second laplace-fit silently replacing the posterior that existing stores were computed with.
    written = out.read_bytes()
    with pytest.raises(SystemExit, match=f"{out} exists .* --overwrite true"):
        main(["laplace-fit", "--model", "lightning_modules.laplace_fit.LaplaceFit",
              "--model.init_args.sd", str(tiny_model_paths["sd"]), "--model.init_args.output", str(out),
              "--data", f"{__name__}.TinyCalibrationData", "--trainer.accelerator", "cpu", "--trainer.logger", "false"])
    assert out.read_bytes() == written


def test_log_evidence_equals_laplace_torch() -> None:
    """Our Laplace evidence (with its data term) against laplace-torch's `log_marginal_likelihood` on a 3×3 conv
    regression. Catches a dropped or mis-scaled data term (RSS/2σ², the Gaussian normaliser) or a wrong log-det."""
    from laplace import Laplace
    from torch import nn

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 2, 3, padding=1).double()
    phi = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    targets = torch.randn(5, 2 * 16, dtype=torch.float64)
    sigma, prior = 0.8, 2.0
    la = Laplace(nn.Sequential(conv, nn.Flatten()), "regression", subset_of_weights="all", hessian_structure="diag",
                 sigma_noise=sigma, prior_precision=prior)
    la.fit(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(phi, targets), batch_size=5))
    with torch.no_grad():
        rss = float((conv(phi).flatten(1) - targets).square().sum())
    ours = log_marginal_likelihood(prior, conv3x3_ggn_sums(phi), 5 * 16, conv.weight, conv.bias, sigma, rss)
    assert ours == pytest.approx(float(la.log_marginal_likelihood()), rel=1e-9)


def write_posterior(path: Path, **changes: Any) -> Path:
    """A well-formed posterior file, with some entries changed."""
    posterior = {"format": "conv_out-diag-laplace-v2", "var_w": torch.full((4, 8, 3, 3), 0.1),
                 "var_b": torch.full((4,), 0.1), "sigma": "estimated", "sigma_noise": 0.9, "metadata": {}}
    posterior.update(changes)
    torch.save(posterior, path)
    return path


@pytest.mark.parametrize(("changes", "message"), [
    ({"var_w": torch.full((4, 8, 3, 3), float("nan"))}, "288 of 288 var_w values are not finite and positive"),
    ({"var_b": torch.tensor([0.1, -0.1, 0.1, 0.1])}, "1 of 4 var_b values"),
    ({"var_b": torch.full((3,), 0.1)}, "var_w must be"),
    ({"var_w": torch.full((4, 8, 3, 3), 1e300, dtype=torch.float64)}, "exceeds float32 range"),
    ({"sigma": "guessed"}, "sigma 'guessed'"),
    ({"format": "other"}, "is not a conv_out-diag-laplace-v2 posterior"),
])
def test_bad_posteriors_are_refused_on_load(tmp_path: Path, changes: dict, message: str) -> None:
    """Catches a posterior with NaN, negative or overflowing variances, wrong shapes or an unknown σ mode being
    accepted (it would make every DEU value NaN or inf)."""
    path = write_posterior(tmp_path / "p.pt", **changes)
    with pytest.raises(ValueError, match=message):
        load_posterior(path)


def test_unreadable_posteriors_give_one_line(tmp_path: Path) -> None:
    """Truncated, empty, garbage, and pickled code (refused by weights_only=True): one ValueError naming the file."""
    good = write_posterior(tmp_path / "good.pt")
    assert load_posterior(good)["sigma"] == "estimated"
    with pytest.raises(ValueError, match="does not match conv_out"):
        load_posterior(good, conv_out_shape=(4, 16, 3, 3))
    data = good.read_bytes()

    class Exploit:
        def __reduce__(self) -> tuple:
            return (print, ("code ran",))

    torch.save({"format": "conv_out-diag-laplace-v2", "x": Exploit()}, tmp_path / "code.pt")
    for name, content in (("truncated.pt", data[: len(data) // 2]), ("empty.pt", b""), ("garbage.pt", b"\x00junk")):
        (tmp_path / name).write_bytes(content)
    for name in ("truncated.pt", "empty.pt", "garbage.pt", "code.pt"):
        reason = "refused, it holds objects other than tensors" if name == "code.pt" else "not a readable PyTorch file"
        with pytest.raises(ValueError, match=f"posterior file .*{name}: {reason}") as failure:
            load_posterior(tmp_path / name)
        assert "\n" not in str(failure.value)
