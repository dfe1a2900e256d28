"""DECU: PaiDE against a Monte Carlo estimate of a Gaussian mixture's mutual information, the member heads,
and the members' fit through Lightning on the tiny models."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
import yaml
import torch.nn.functional as F

from cli.__main__ import main as cli_main
from cli.trainer import ForensicsTrainer
from datamodules.shards import convert
from lightning_modules.detectors import DEUADetector
from core.seeding import image_generator
from lightning_modules.diffusion_pass import DiffusionPass
from lightning_modules.feature_extractor import FeatureExtractor
from core.hashing import file_sha256
from lightning_modules.maps import available_maps, map_channels
from lightning_modules.pretrained import load_stable_diffusion
from lightning_modules.ensemble_fit import MATCHED_SETTINGS, EnsembleFit, check_members, load_members
from lightning_modules.ensemble_uncertainty import (conv_out_member_means, ensemble_variance, paide_mutual_information,
                                                    paide_mutual_information_per_pixel)
from cli_runner import cli_env, run_cli
from test_feature_extractor import as_float, make_batch
from test_laplace_fit import TinyCalibrationData

REPO = Path(__file__).resolve().parents[1]
# (member means, σ²): overlapping, well separated, nearly identical, two members, eight members.
MIXTURES = [([0.0, 0.5, 1.0, -0.3], 1.0), ([0.0, 3.0, 6.0, 9.0, 12.0], 1.0), ([0.0, 0.1, 0.05], 0.5),
            ([0.0, 1.5], 0.25), ([0.0, 2.0, 2.5, 4.0, -1.0, 0.3, 7.0, 1.0], 1.3)]


def monte_carlo_mixture_mi(means: list[float], sigma2: float, samples: int = 100_000) -> tuple[float, float]:
    """I(y; k) = E_k E_{y~p_k}[ln p_k(y) − ln (1/K)Σ_j p_j(y)] by sampling, with its standard error."""
    mu = torch.tensor(means, dtype=torch.float64)
    k = len(means)
    y = mu[:, None] + math.sqrt(sigma2) * torch.randn(k, samples, generator=torch.Generator().manual_seed(0),
                                                       dtype=torch.float64)
    log_p = -(y[:, :, None] - mu[None, None, :]).square() / (2 * sigma2)  # shared normaliser cancels
    terms = (log_p[torch.arange(k), :, torch.arange(k)] - (torch.logsumexp(log_p, dim=2) - math.log(k))).flatten()
    return terms.mean().item(), terms.std().item() / math.sqrt(terms.numel())


@pytest.mark.parametrize("means,sigma2", MIXTURES)
def test_paide_brackets_the_monte_carlo_mutual_information(means: list[float], sigma2: float) -> None:
    """Error bound stated: Kolchinsky & Tracey's Î_Bhattacharyya ≤ I ≤ Î_KL, checked against a Monte Carlo I
    with a tolerance of 5 standard errors (~1e-3 nats here). Catches a wrong distance constant (1/8 vs 1/2),
    a missing −ln K, or logsumexp over the wrong axis, each of which breaks one side of the bracket."""
    mi, stderr = monte_carlo_mixture_mi(means, sigma2)
    row = torch.tensor(means)[None, :]
    lower = paide_mutual_information(row, sigma2, "bhattacharyya").item()
    upper = paide_mutual_information(row, sigma2, "kl").item()
    assert lower - 5 * stderr <= mi <= upper + 5 * stderr
    assert 0 <= lower <= upper <= math.log(len(means)) + 1e-6


def test_paide_reaches_log_k_for_separated_members_and_zero_for_identical_ones() -> None:
    """Identical members carry no epistemic information (exactly 0, no NaN); members 40σ apart carry ln K.
    Catches a missing diagonal term or a per-pixel normalisation that leaks across pixels."""
    identical = torch.full((2, 5, 4, 3, 3), 0.7)
    assert torch.equal(paide_mutual_information(identical, torch.ones(4, 1, 1)), torch.zeros(2, 4, 3, 3))
    separated = (torch.arange(5.0) * 40).view(1, 5, 1).expand(1, 5, 6)
    for distance in ("bhattacharyya", "kl"):
        torch.testing.assert_close(paide_mutual_information(separated, 1.0, distance),
                                   torch.full((1, 6), math.log(5)))


def test_paide_is_per_element_and_batch_invariant() -> None:
    """Each latent element is its own mixture and σ² is per channel: a row alone equals the row in a batch,
    and one element equals a scalar computation. Catches broadcasting σ² over the wrong axis."""
    gen = torch.Generator().manual_seed(0)
    means, sigma2 = torch.randn(3, 4, 2, 5, 5, generator=gen), torch.tensor([0.5, 2.0]).view(2, 1, 1)
    batch = paide_mutual_information(means, sigma2)
    assert torch.equal(paide_mutual_information(means[1:2], sigma2), batch[1:2])
    element = paide_mutual_information(means[2:3, :, 1, 3, 4], 2.0)
    torch.testing.assert_close(batch[2, 1, 3, 4], element[0])


def brute_force_pixel_paide(mu: list[list[float]], sigma2: list[float], divisor: float) -> float:
    """Kolchinsky & Tracey's estimator for one pixel's mixture of K Gaussians N(mu[k], diag sigma2), plain Python."""
    k = len(mu)
    total = 0.0
    for i in range(k):
        inner = sum(math.exp(-sum((a - b) ** 2 / (divisor * v) for a, b, v in zip(mu[i], mu[j], sigma2)))
                    for j in range(k)) / k
        total -= math.log(inner)
    return total / k


def test_per_pixel_paide_equals_a_brute_force_mixture_and_stays_below_log_k() -> None:
    """DECU's per-pixel view: one mixture over the members of the pixel's channel vectors. Equals a plain-Python
    loop per pixel (both distances), stays within [0, ln K], and differs from the sum of the per-channel maps,
    which exceeds ln K when the members differ in every channel (K = 2, 4 channels 6σ apart: the sum is near
    4·ln 2, the per-pixel value ln 2). Catches the per-channel estimates summed (the wrong sentence the docs had),
    σ² broadcast over the wrong axis, or the channel sum taken outside the logsumexp."""
    gen = torch.Generator().manual_seed(3)
    means, sigma2 = torch.randn(2, 3, 4, 2, 3, generator=gen), torch.tensor([0.5, 2.0, 1.0, 0.25])
    for distance, divisor in (("bhattacharyya", 8.0), ("kl", 2.0)):
        got = paide_mutual_information_per_pixel(means, sigma2.view(-1, 1, 1), distance)
        assert got.shape == (2, 1, 2, 3)
        for b, y, x in itertools.product(range(2), range(2), range(3)):
            expected = brute_force_pixel_paide(means[b, :, :, y, x].tolist(), sigma2.tolist(), divisor)
            assert got[b, 0, y, x].item() == pytest.approx(expected, rel=1e-5, abs=1e-7)
        assert (got >= 0).all() and (got <= math.log(3) + 1e-6).all()
    apart = torch.zeros(1, 2, 4, 1, 1)
    apart[0, 1] = 6.0  # σ = 1: 6σ apart in every channel
    summed = paide_mutual_information(apart, 1.0).sum().item()
    pixel = paide_mutual_information_per_pixel(apart, 1.0).item()
    assert summed > 2.5 > math.log(2) and pixel == pytest.approx(math.log(2), abs=1e-3)


def test_per_pixel_paide_brackets_the_monte_carlo_mutual_information() -> None:
    """Î_Bhattacharyya ≤ I(y; k) ≤ Î_KL for a 3-channel mixture of 3 members, against Monte Carlo (5 standard
    errors): the per-pixel map is an estimate of the pixel's mutual information, not of a sum."""
    gen = torch.Generator().manual_seed(5)
    mu, sigma2 = torch.randn(3, 3, generator=gen, dtype=torch.float64) * 1.5, torch.tensor([0.5, 1.0, 2.0],
                                                                                         dtype=torch.float64)
    samples = 40_000
    y = mu[:, None] + sigma2.sqrt() * torch.randn(3, samples, 3, generator=gen, dtype=torch.float64)
    log_p = -((y[:, :, None, :] - mu[None, None]) ** 2 / (2 * sigma2)).sum(-1)  # (k, samples, j)
    terms = (log_p[torch.arange(3), :, torch.arange(3)] - (torch.logsumexp(log_p, dim=2) - math.log(3))).flatten()
    mi, stderr = terms.mean().item(), terms.std().item() / math.sqrt(terms.numel())
    means = mu.reshape(1, 3, 3, 1, 1)  # (B, K, C, h, w)
    lower = paide_mutual_information_per_pixel(means, sigma2.view(-1, 1, 1), "bhattacharyya").item()
    upper = paide_mutual_information_per_pixel(means, sigma2.view(-1, 1, 1), "kl").item()
    assert lower - 5 * stderr <= mi <= upper + 5 * stderr and upper <= math.log(3) + 1e-6


def test_conv_out_member_means_and_variance_match_a_loop() -> None:
    """K heads in one convolution equal K separate conv_out calls; the variance is the population variance
    over members. Catches a reshape that pairs one member's weights with another's bias."""
    gen = torch.Generator().manual_seed(1)
    phi, weights, biases = torch.randn(2, 6, 5, 5, generator=gen), torch.randn(3, 4, 6, 3, 3, generator=gen), \
        torch.randn(3, 4, generator=gen)
    means = conv_out_member_means(phi, weights, biases)
    expected = torch.stack([F.conv2d(phi, weights[k], biases[k], padding=1) for k in range(3)], dim=1)
    torch.testing.assert_close(means, expected)
    torch.testing.assert_close(ensemble_variance(means), ((expected - expected.mean(1, keepdim=True)) ** 2).mean(1))


# ---- the members' fit (`python -m cli ensemble-fit`) ----

def fit_members(sd: Path, out: Path, kind: str, **settings: object) -> dict:
    """Members through the real Trainer subcommand method and Lightning's predict loop."""
    model = EnsembleFit(str(sd), output=str(out), kind=kind, num_members=3, steps=4, batch_size=2,
                        timestep=200, **settings)
    ForensicsTrainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False).ensemble_fit(model, TinyCalibrationData())
    return load_members(out)


@pytest.mark.parametrize("kind", ["conv_out", "embedding"])
def test_ensemble_fit_writes_distinct_members_with_their_metadata(kind: str, tiny_model_paths: dict[str, Path],
                                                                  tmp_path: Path) -> None:
    """K distinct trained members of the right shape, σ² > 0 per channel, the settings an extractor is checked
    against, and bit-identical files from two runs. Catches members that share one seed (MI would be 0),
    training that never moves a member from its start, and non-deterministic draws."""
    first = fit_members(tiny_model_paths["sd"], tmp_path / "a.pt", kind)
    second = fit_members(tiny_model_paths["sd"], tmp_path / "b.pt", kind)
    tensors = first["weights"] if kind == "conv_out" else first["embeddings"]
    assert tensors.shape[0] == 3 and len(set(first["seeds"])) == 3
    assert not torch.equal(tensors[0], tensors[1]) and not torch.equal(tensors[1], tensors[2])
    assert first["sigma2"].shape == (4,) and (first["sigma2"] > 0).all()
    meta = first["metadata"]
    assert (meta["timestep"], meta["prompt"], meta["resolution"], meta["num_images"]) == (200, "a photo", 64, 4)
    for name in ("weights", "biases", "embeddings", "sigma2"):
        assert (first[name] is None and second[name] is None) or torch.equal(first[name], second[name])
    assert meta["data_sha256"] == second["metadata"]["data_sha256"]


@pytest.fixture(scope="module")
def members_file(tiny_model_paths: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """conv_out members fitted once for the map tests."""
    path = tmp_path_factory.mktemp("members") / "members.pt"
    fit_members(tiny_model_paths["sd"], path, "conv_out")
    return path


def test_ensemble_members_refused_for_other_settings(members_file: Path, tmp_path: Path) -> None:
    """Catches members silently used at another timestep or prompt: the error names both fields and values."""
    members = load_members(members_file)
    expected = {name: members["metadata"][name] for name in MATCHED_SETTINGS} | {"timestep": 300, "prompt": "x"}
    with pytest.raises(ValueError, match=r"other settings.*'timestep': \(200, 300\).*'prompt': \('a photo', 'x'\)"):
        check_members(members, members_file, expected)
    with pytest.raises(ValueError, match="not a decu-members-v1 file"):
        torch.save({"format": "conv_out-diag-laplace-v1"}, tmp_path / "posterior.pt")
        load_members(tmp_path / "posterior.pt")


# ---- the registered maps, computed by the FeatureExtractor's fused pass ----

ENSEMBLE_MODULES = ["lightning_modules.maps.builtin", "lightning_modules.maps.ensemble"]


def ensemble_extractor(sd: Path, members: Path, **settings: object) -> FeatureExtractor:
    kwargs = {"timestep": 200, "num_noises": 3, "outputs": ["ensemble_mi", "ensemble_var"],
              "map_modules": ENSEMBLE_MODULES,
              "map_settings": {"ensemble_members": str(members), "ensemble_distance": "bhattacharyya"}} | settings
    return FeatureExtractor(str(sd), **kwargs)


@torch.no_grad()
def test_ensemble_maps_equal_each_member_run_as_the_unets_conv_out(tiny_model_paths: dict[str, Path],
                                                                   members_file: Path) -> None:
    """Independent computation: for each member, the real fused pass with that member's weights loaded into the
    UNet's conv_out, averaged over the same N noises. Catches a broken linearity shortcut (heads on φ̄), members
    paired with the wrong bias, σ² not per channel, and noises that differ from the extractor's; the per-pixel
    map against a plain-Python mixture loop on those means."""
    batch = make_batch(["e0", "e1"])
    maps = ensemble_extractor(tiny_model_paths["sd"], members_file,
                              outputs=["ensemble_mi", "ensemble_var", "ensemble_mi_pixel"]).predict_step(batch, 0)
    members = load_members(members_file)
    parts = load_stable_diffusion(str(tiny_model_paths["sd"]))
    means = []
    for k in range(members["num_members"]):
        parts.unet.conv_out.weight.copy_(members["weights"][k])
        parts.unet.conv_out.bias.copy_(members["biases"][k])
        generators = [image_generator(0, "diffusion_noise", s) for s in batch["sha256"]]
        out = DiffusionPass(parts, 200, 3, "a photo", "sample")(as_float(batch["image"]), generators)
        means.append(out.eps_hat.mean(dim=1))
    means = torch.stack(means, dim=1)
    torch.testing.assert_close(maps["ensemble_var"], means.var(dim=1, correction=0), rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(maps["ensemble_mi"],
                               paide_mutual_information(means, members["sigma2"].view(-1, 1, 1)), rtol=1e-4, atol=1e-7)
    assert (maps["ensemble_mi"] > 0).all() and (maps["ensemble_mi"] <= math.log(3)).all()
    sigma2 = members["sigma2"].tolist()
    assert maps["ensemble_mi_pixel"].shape == (2, 1, *means.shape[-2:])
    for b, y, x in itertools.product(range(2), range(means.shape[-2]), range(means.shape[-1])):
        expected = brute_force_pixel_paide(means[b, :, :, y, x].tolist(), sigma2, 8.0)
        assert maps["ensemble_mi_pixel"][b, 0, y, x].item() == pytest.approx(expected, rel=1e-4, abs=1e-7)


@torch.no_grad()
def test_ensemble_maps_are_batch_invariant_and_registered(tiny_model_paths: dict[str, Path],
                                                          members_file: Path) -> None:
    """A row's maps do not depend on its batch (so neither on rank nor on resume, since noise is keyed by the
    image's content), and the names are in the registry with the latent's channels. Catches members or draws
    indexed by batch position."""
    fe = ensemble_extractor(tiny_model_paths["sd"], members_file)
    assert {"ensemble_mi", "ensemble_var"} <= set(available_maps()) and map_channels("ensemble_mi") == 4
    names = ["b0", "b1", "b2"]
    together = fe.predict_step(make_batch(names), 0)
    for i, name_ in enumerate(names):
        single = fe.predict_step(make_batch([name_]), 0)
        for name in ("ensemble_mi", "ensemble_var"):
            torch.testing.assert_close(together[name][i], single[name][0], rtol=5e-5, atol=1e-7)
    maps = fe.provenance()["maps"]["ensemble_mi"]
    assert maps["ensemble_members_sha256"] == file_sha256(members_file) and maps["ensemble_distance"] == "bhattacharyya"


def test_ensemble_maps_refuse_members_of_other_settings(tiny_model_paths: dict[str, Path], members_file: Path) -> None:
    """An extractor at another timestep, or without the members setting, fails with one line naming why."""
    with pytest.raises(ValueError, match=r"trained with other settings.*'timestep': \(200, 300\)"):
        ensemble_extractor(tiny_model_paths["sd"], members_file, timestep=300).predict_step(make_batch(["r"]), 0)
    with pytest.raises(ValueError, match="need map_settings: {ensemble_members: PATH}"):
        ensemble_extractor(tiny_model_paths["sd"], members_file,
                           map_settings={"ensemble_members": "", "ensemble_distance": "kl"}).predict_step(
            make_batch(["r"]), 0)


# ---- maps from `embedding` members: K more UNet calls on the fused pass's own noised latents ----

@pytest.fixture(scope="module")
def embedding_members_file(tiny_model_paths: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """embedding members (one learned text embedding each) fitted once for the map tests."""
    path = tmp_path_factory.mktemp("members") / "embedding.pt"
    fit_members(tiny_model_paths["sd"], path, "embedding")
    return path


@torch.no_grad()
def per_member_means(sd: Path, batch: dict, embeddings: torch.Tensor, num_noises: int = 3) -> torch.Tensor:
    """Independent computation of μ_k: the extractor's content-keyed draws redone by hand (VAE ε, then the N noises),
    x_t = √ᾱ·x₀ + √(1−ᾱ)·ε, and one plain UNet call per member with its own embedding, averaged over the noises."""
    parts = load_stable_diffusion(str(sd))
    means = []
    for image, digest in zip(as_float(batch["image"]), batch["sha256"]):
        gen = image_generator(0, "diffusion_noise", digest)
        dist = parts.vae.encode(image[None]).latent_dist
        latent_eps = torch.randn(dist.mean.shape[1:], generator=gen)
        noise = torch.randn((num_noises, *dist.mean.shape[1:]), generator=gen)
        x0 = (dist.mean + dist.std * latent_eps) * parts.vae.config.scaling_factor
        alpha_bar = parts.scheduler.alphas_cumprod[200]
        x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
        t = torch.full((num_noises,), 200)
        means.append(torch.stack([parts.unet(x_t, t, encoder_hidden_states=e[None].expand(num_noises, -1, -1))
                                  .sample.mean(0) for e in embeddings]))
    return torch.stack(means)


def test_embedding_member_maps_equal_a_per_member_unet_loop(tiny_model_paths: dict[str, Path],
                                                            embedding_members_file: Path) -> None:
    """ensemble_mi/ensemble_var from embedding members equal PaiDE / Var_k of a loop that calls the UNet once per
    member on the same x_t. Catches members evaluated on other noises than the fused pass's (e.g. fresh draws), the
    prompt's embedding used instead of the member's, means taken over the wrong axis, and σ² not per channel."""
    batch = make_batch(["m0", "m1"])
    with torch.no_grad():
        maps = ensemble_extractor(tiny_model_paths["sd"], embedding_members_file,
                                  outputs=["ensemble_mi", "ensemble_var", "ensemble_mi_pixel"]).predict_step(batch, 0)
    members = load_members(embedding_members_file)
    means = per_member_means(tiny_model_paths["sd"], batch, members["embeddings"])
    torch.testing.assert_close(maps["ensemble_var"], means.var(dim=1, correction=0), rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(maps["ensemble_mi"], paide_mutual_information(means, members["sigma2"].view(-1, 1, 1)),
                               rtol=1e-4, atol=1e-7)
    assert (maps["ensemble_mi"] > 0).all() and (maps["ensemble_mi"] <= math.log(3)).all()
    sigma2 = members["sigma2"].tolist()
    assert maps["ensemble_mi_pixel"].shape == (2, 1, *means.shape[-2:])
    for b, y, x in itertools.product(range(2), range(means.shape[-2]), range(means.shape[-1])):
        expected = brute_force_pixel_paide(means[b, :, :, y, x].tolist(), sigma2, 8.0)
        assert maps["ensemble_mi_pixel"][b, 0, y, x].item() == pytest.approx(expected, rel=1e-4, abs=1e-7)


@torch.no_grad()
def test_conditioned_eps_under_the_prompt_is_the_fused_pass(tiny_model_paths: dict[str, Path]) -> None:
    """The extra UNet call a map asks for runs on the pass's own x_t: under the prompt's own embedding it returns the
    pass's ε̂ bit for bit, and another embedding changes it. Catches re-drawn noises, another timestep or
    another row grouping in the extra call, and a conditioning that is ignored."""
    diffusion = DiffusionPass(load_stable_diffusion(str(tiny_model_paths["sd"])), 200, 3, "a photo", "sample")
    batch = make_batch(["c0", "c1"])
    out = diffusion(as_float(batch["image"]), [image_generator(0, "diffusion_noise", s) for s in batch["sha256"]])
    prompt = diffusion.text_embedding(torch.device("cpu"))[0]
    assert torch.equal(diffusion.conditioned_eps(out, prompt), out.eps_hat)
    assert not torch.allclose(diffusion.conditioned_eps(out, prompt + 0.5), out.eps_hat)


def test_identical_embedding_members_give_zero(tiny_model_paths: dict[str, Path], embedding_members_file: Path,
                                               tmp_path: Path) -> None:
    """K copies of one embedding carry no epistemic information: both maps exactly 0 (bit-identical member calls).
    Catches member calls that differ by more than their embedding (other noises or row grouping per member)."""
    members = load_members(embedding_members_file)
    members["embeddings"] = members["embeddings"][:1].expand_as(members["embeddings"]).clone()
    torch.save(members, tmp_path / "identical.pt")
    with torch.no_grad():
        maps = ensemble_extractor(tiny_model_paths["sd"], tmp_path / "identical.pt").predict_step(
            make_batch(["z0", "z1"]), 0)
    assert torch.equal(maps["ensemble_mi"], torch.zeros_like(maps["ensemble_mi"]))
    assert torch.equal(maps["ensemble_var"], torch.zeros_like(maps["ensemble_var"]))


def test_embedding_member_maps_are_batch_invariant_and_refuse_other_settings(
        tiny_model_paths: dict[str, Path], embedding_members_file: Path) -> None:
    """A row's maps alone equal the row among others (so rank- and resume-invariant, the noises being keyed by
    content), and an extractor at another timestep refuses the members in one line naming the field. Catches member
    embeddings broadcast against the batch axis and embedding members used with settings they were not fitted at."""
    fe = ensemble_extractor(tiny_model_paths["sd"], embedding_members_file)
    names = ["i0", "i1", "i2"]
    with torch.no_grad():
        together = fe.predict_step(make_batch(names), 0)
        for i, name_ in enumerate(names):
            single = fe.predict_step(make_batch([name_]), 0)
            for name in ("ensemble_mi", "ensemble_var"):
                torch.testing.assert_close(together[name][i], single[name][0], rtol=5e-5, atol=1e-8)
    with pytest.raises(ValueError, match=r"trained with other settings.*'timestep': \(200, 300\)") as refused:
        ensemble_extractor(tiny_model_paths["sd"], embedding_members_file, timestep=300).predict_step(
            make_batch(["r"]), 0)
    assert "\n" not in str(refused.value)


# ---- the comparison configs ----

@pytest.mark.parametrize("override", ["deua_ensemble.yaml", *(f"ablations/ensemble/{row.name}" for row in
                                                               sorted((REPO / "configs/ablations/ensemble").glob("*.yaml")))])
def test_ensemble_configs_resolve_to_a_detector_reading_its_guidance(override: str, capsys) -> None:
    """Each comparison config stacked on configs/deua.yaml, as LightningCLI resolves it: its guidance maps are
    registered, read from the stores (data features), a DEUA head is built for them, and runs land in deua_ensemble.
    Catches a row whose guidance is missing from its features (fit would fail after phase 1) or names an
    unregistered map, and rows logged into DEU's own run directory."""
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(REPO / "configs/deua.yaml"), "--config", str(REPO / "configs" / override),
                  "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    model, features = config["model"]["init_args"], config["data"]["init_args"]["features"]
    assert set(model["guidance"]) <= set(features) and "clip_layer3" in features
    assert config["trainer"]["logger"]["init_args"]["name"] == "deua_ensemble"
    assert any(name.startswith("ensemble_") for name in model["guidance"]) or model["guidance"] == ["deu"]
    detector = DEUADetector(**{**model, "visual_channels": 16})
    assert detector.guidance_channels == 4 * len(model["guidance"])


@pytest.mark.slow
def test_ensemble_fit_cli_is_rank_count_invariant(tiny_model_paths: dict[str, Path], tmp_path: Path) -> None:
    """`python -m cli ensemble-fit` on real shards with 1 and 2 gloo ranks writes the same members (each image
    encoded once, latents ordered by content, member k trained from its own seed on whichever rank). Catches
    an image encoded twice or dropped across ranks, rank-ordered data, and members gathered in the wrong order."""
    from PIL import Image

    for i in range(5):
        path = tmp_path / "images" / "real" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(torch.randint(0, 256, (48, 40, 3), generator=torch.Generator().manual_seed(i),
                                      dtype=torch.uint8).numpy()).save(path)
    convert("folder", tmp_path / "images", "val", tmp_path / "shards", shard_size=2, workers=1)
    files = {}
    for devices in ("1", "2"):
        files[devices] = tmp_path / f"members_{devices}.pt"
        args = ["ensemble-fit", "--config", str(REPO / "configs/ensemble_fit.yaml"),
                "--model.init_args.sd", str(tiny_model_paths["sd"]), "--model.init_args.output", str(files[devices]),
                "--model.init_args.num_members", "3", "--model.init_args.steps", "3", "--model.init_args.batch_size",
                "2", "--data.init_args.shards", str(tmp_path / "shards"), "--data.init_args.resolution", "64",
                "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0",
                "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path / f"run_{devices}"),
                "--trainer.devices", devices, "--trainer.strategy", "ddp" if devices == "2" else "auto"]
        # Two ranks need a process of their own (Lightning re-executes the command line per rank); one thread each.
        result = run_cli(args, cwd=REPO, env=cli_env(OMP_NUM_THREADS="1"), subprocess_=devices == "2")
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    one, two = load_members(files["1"]), load_members(files["2"])
    assert one["metadata"]["num_images"] == 5 and one["metadata"] == two["metadata"]
    for name in ("weights", "biases", "sigma2"):
        assert torch.equal(one[name], two[name]), name
