"""FeatureExtractor against a per-noise loop and the uncertainty functions, the draw-order contract, content-keyed
noise, batch invariance, bf16 bounds, the map registry (built-in and user maps), provenance, input errors."""

from __future__ import annotations

import hashlib
import math
import sys
import textwrap
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch

from core.seeding import image_generator
from lightning_modules.diffusion_pass import DiffusionPass
from lightning_modules.feature_extractor import FeatureExtractor, recorded_path
from lightning_modules.laplace_fit import LaplaceFit
from lightning_modules.maps import (FEATURES, MAP_REGISTRY, available_maps, feature_kind, feature_spec, map_channels,
                                    register_map)
from lightning_modules.pretrained import load_stable_diffusion
from lightning_modules.uncertainty import (aleatoric_variance, closed_form_deu, conv3x3_ggn_sums,
                                           latent_reconstruction_error, mc_deu, mutual_information)

RES, N, T = 64, 3, 200
BUILTIN = ["lare", "deu", "aleatoric", "mi"]


def content(name: str) -> str:
    """The sha256 a shard converter would record for an image whose bytes are `name`."""
    return hashlib.sha256(name.encode()).hexdigest()


def make_batch(names: list[str], errors: list[str] | None = None, seed: int = 0,
               keys: list[str] | None = None) -> dict[str, Any]:
    """A batch in ImageShardDataModule's format (docs/contracts.md): uint8 images that depend only on the name
    (the image's content), row keys that may differ from it."""
    images = torch.stack([torch.randint(0, 256, (3, RES, RES), dtype=torch.uint8,
                                        generator=torch.Generator().manual_seed(zlib.crc32(n.encode()) + seed))
                          for n in names])
    b = len(names)
    return {"image": images, "key": keys or [f"row-{i}" for i in range(b)], "sha256": [content(n) for n in names],
            "row": torch.arange(b), "label": torch.ones(b, dtype=torch.long),
            "generator": torch.zeros(b, dtype=torch.long), "shard_index": torch.zeros(b, dtype=torch.long),
            "error": errors or [""] * b}


def as_float(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1


@pytest.fixture(scope="module")
def posterior(tiny_model_paths: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A posterior fitted on 4 tiny images through LaplaceFit's own save path."""
    fit = LaplaceFit(str(tiny_model_paths["sd"]), output=str(tmp_path_factory.mktemp("post") / "p.pt"),
                     timestep=T, num_noises=N, prior_precision=1.0, sigma="fixed")
    batch = make_batch(["c0", "c1", "c2", "c3"])
    out = fit.diffusion(as_float(batch["image"]), [image_generator(0, "diffusion_noise", k) for k in batch["sha256"]])
    phi = out.phi.flatten(0, 1)
    fit.save_posterior(conv3x3_ggn_sums(phi), float(phi.shape[0] * 64), 1.0, 4, RES)
    return Path(fit.hparams.output)


@pytest.fixture(scope="module")
def extractor(tiny_model_paths: dict[str, Path], posterior: Path) -> FeatureExtractor:
    return FeatureExtractor(str(tiny_model_paths["sd"]), posterior=str(posterior), clip=str(tiny_model_paths["clip"]),
                            outputs=BUILTIN + ["clip_layer3", "clip_pooled"], timestep=T, num_noises=N)


@torch.no_grad()
def test_maps_equal_a_per_noise_loop(extractor: FeatureExtractor, tiny_model_paths: dict[str, Path]) -> None:
    """Independent loop: one scheduler.add_noise and one UNet call per noise, φ captured per call, noise drawn in
    the documented order (VAE ε, then N noises) from the generator of (seed, sha256). Catches a wrong noise key,
    a changed draw order, or a map formula that differs from its definition."""
    batch = make_batch(["img-a", "img-b"])
    got = extractor.predict_step(batch, 0)
    parts = load_stable_diffusion(str(tiny_model_paths["sd"]))
    tok = parts.tokenizer
    ids = tok("a photo", padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    text = parts.text_encoder(ids)[0]
    for b, digest in enumerate(batch["sha256"]):
        gen = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(f"0:{digest}".encode()).digest()[:8],
                                                           "little"))
        latent_eps = torch.randn(4, RES // 8, RES // 8, generator=gen)
        noises = torch.randn(N, 4, RES // 8, RES // 8, generator=gen)
        dist = parts.vae.encode(as_float(batch["image"][b:b + 1])).latent_dist
        x0 = (dist.mean + dist.std * latent_eps) * parts.vae.config.scaling_factor
        eps_hats, phis = [], []
        for j in range(N):
            t = torch.tensor([T])
            x_t = parts.scheduler.add_noise(x0, noises[j:j + 1], t)
            hook = parts.unet.conv_out.register_forward_pre_hook(lambda _m, a: phis.append(a[0]))
            eps_hats.append(parts.unet(x_t, t, encoder_hidden_states=text).sample[0])
            hook.remove()
        eps_hat = torch.stack(eps_hats)
        lare = sum((eps_hats[j] - noises[j]) ** 2 for j in range(N)) / N
        torch.testing.assert_close(got["lare"][b], lare, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got["aleatoric"][b], eps_hat.var(0, correction=0), rtol=1e-4, atol=1e-6)
        deu = closed_form_deu(torch.cat(phis).mean(0, keepdim=True), extractor.var_w, extractor.var_b)[0]
        torch.testing.assert_close(got["deu"][b], deu, rtol=1e-4, atol=1e-8)
    assert got["key"] == batch["key"] and got["sha256"] == batch["sha256"] and got["error"] == batch["error"]
    assert {k: tuple(got[k].shape[1:]) for k in extractor.outputs} == extractor.feature_shapes(RES)


@pytest.mark.parametrize("deu_mode", ["closed_form", "mc"])
@torch.no_grad()
def test_registry_maps_are_bit_identical_to_the_uncertainty_functions(tiny_model_paths: dict[str, Path],
                                                                      posterior: Path, deu_mode: str) -> None:
    """The pre-registry code path, inline: one fused pass, then the `uncertainty` functions called directly
    (MC draws from the documented third draw of each row's generator). Catches a registry map that computes
    something else, MI fed swapped or doubled arguments, or MC samples drawn from another stream."""
    fe = FeatureExtractor(str(tiny_model_paths["sd"]), posterior=str(posterior), outputs=BUILTIN, timestep=T,
                          num_noises=N, deu_mode=deu_mode, num_weight_samples=5)
    batch = make_batch(["u", "v", "w"])
    got = fe.predict_step(batch, 0)
    generators = [image_generator(0, "diffusion_noise", digest) for digest in batch["sha256"]]
    out = fe.diffusion(as_float(batch["image"]), generators)
    phi_bar, conv = out.phi.mean(dim=1), fe.unet.conv_out
    if deu_mode == "closed_form":
        epistemic = closed_form_deu(phi_bar, fe.var_w, fe.var_b)
    else:
        mc = [torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=g))) for g in generators]
        epistemic = mc_deu(phi_bar, conv.weight, conv.bias, fe.var_w, fe.var_b, 5, mc)
    aleatoric = aleatoric_variance(out.eps_hat)
    expected = {"lare": latent_reconstruction_error(out.eps_hat, out.noise), "deu": epistemic,
                "aleatoric": aleatoric, "mi": mutual_information(epistemic, aleatoric)}
    for name in BUILTIN:
        assert torch.equal(got[name], expected[name]), name


@torch.no_grad()
def test_mi_is_half_log_one_plus_deu_over_aleatoric_of_the_same_row(extractor: FeatureExtractor) -> None:
    """MI from the row's own stored DEU and aleatoric maps, written out here. Catches swapped or doubled arguments
    at MI's call site, and MI computed from another row's maps."""
    got = extractor.predict_step(make_batch(["m0", "m1"]), 0)
    expected = 0.5 * torch.log1p(got["deu"].double() / (got["aleatoric"].double() + 1e-12))
    torch.testing.assert_close(got["mi"].double(), expected, rtol=1e-6, atol=0)
    assert not torch.allclose(got["deu"], got["aleatoric"])  # a swap would be visible


@torch.no_grad()
def test_noise_is_keyed_by_content_not_row(extractor: FeatureExtractor) -> None:
    """The same bytes under other row keys, rows and batches give bit-identical features; other bytes other noises.
    Catches a generator seeded from the row key (what stores used before) or one that ignores the key."""
    first = extractor.predict_step(make_batch(["same"], keys=["000000005"]), 0)
    moved = extractor.predict_step(make_batch(["same"], keys=["000000006"]), 0)
    for name in extractor.outputs:
        assert torch.equal(first[name], moved[name]), name
    parts = extractor.diffusion
    a = parts.draw([image_generator(0, "diffusion_noise", content("same"))], RES)
    b = parts.draw([image_generator(0, "diffusion_noise", content("other"))], RES)
    assert not torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])
    other = extractor.predict_step(make_batch(["other"]), 0)
    assert not torch.equal(first["lare"], other["lare"])


@torch.no_grad()
def test_one_inserted_image_leaves_every_other_row_unchanged(extractor: FeatureExtractor) -> None:
    """Tar-aligned batches of one row (as a resumed store computes them): rows matched by content before and after
    inserting a file are bit-identical. Catches noise that depends on the row number or on earlier rows' draws."""
    before = ["p0", "p1", "p2"]
    after = ["p0", "new", "p1", "p2"]
    compute = {tuple(names): [extractor.predict_step(make_batch([n], keys=[f"{i:09d}"]), 0)
                              for i, n in enumerate(names)] for names in (before, after)}
    by_name = {n: out for n, out in zip(after, compute[tuple(after)])}
    for n, out in zip(before, compute[tuple(before)]):
        for name in BUILTIN:
            assert torch.equal(out[name], by_name[n][name]), (n, name)


def test_draw_order_contract(tiny_model_paths: dict[str, Path]) -> None:
    """VAE ε, then the N noises (N=2 a prefix of N=4, and `latent=mean` draws ε too). Catches a reordering."""
    parts = load_stable_diffusion(str(tiny_model_paths["sd"]))
    g = image_generator(0, "diffusion_noise", content("x"))
    eps, noises = torch.randn(4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    for latent in ("sample", "mean"):
        got_eps, got_noise = DiffusionPass(parts, T, 2, "a photo", latent).draw(
            [image_generator(0, "diffusion_noise", content("x"))], RES)
        assert torch.equal(got_eps[0], eps) and torch.equal(got_noise[0], noises[:2])


@pytest.mark.parametrize("deu_mode", ["closed_form", "mc"])
@torch.no_grad()
def test_batch_of_b_equals_b_single_batches(tiny_model_paths: dict[str, Path], posterior: Path, deu_mode: str) -> None:
    """Catches noise or MC samples shared across a batch (or drawn in batch order)."""
    fe = FeatureExtractor(str(tiny_model_paths["sd"]), posterior=str(posterior), outputs=["lare", "deu", "mi"],
                          timestep=T, num_noises=N, deu_mode=deu_mode, num_weight_samples=4)
    names = ["x0", "x1", "x2"]
    together = fe.predict_step(make_batch(names), 0)
    for i, name_ in enumerate(names):
        single = fe.predict_step(make_batch([name_]), 0)
        for name in ("lare", "deu", "mi"):
            # Same noise and weights per image, so only float32 round-off may differ: CPU kernels are not
            # batch-invariant to the last bit (worst seen 1.2e-5 relative, through the UNet); 5e-5 bounds it.
            torch.testing.assert_close(together[name][i], single[name][0], rtol=5e-5, atol=1e-7,
                                       msg=lambda m, name=name: f"{name}: {m}")


@torch.no_grad()
def test_mc_deu_mean_over_rows_matches_the_closed_form(tiny_model_paths: dict[str, Path], posterior: Path) -> None:
    """MC-mode DEU (M=4, each row its own draws) over 96 rows: the mean of the per-row ratio MC/closed form is 1
    within 4 standard errors (measured from the rows). Catches a biased MC mode (e.g. divisor M instead of M−1, a
    −25 % bias here, or samples shared by all rows, which correlate the rows)."""
    kwargs = dict(sd=str(tiny_model_paths["sd"]), posterior=str(posterior), outputs=["deu"], timestep=T, num_noises=N)
    names = [f"mc-{i}" for i in range(96)]
    batch = make_batch(names)
    exact = FeatureExtractor(**kwargs).predict_step(batch, 0)["deu"].double()
    estimate = FeatureExtractor(**kwargs, deu_mode="mc", num_weight_samples=4).predict_step(batch, 0)["deu"].double()
    ratio = (estimate / exact).mean(dim=(1, 2, 3))
    standard_error = float(ratio.std() / math.sqrt(len(names)))
    assert abs(float(ratio.mean()) - 1) < 4 * standard_error, (float(ratio.mean()), standard_error)
    assert standard_error < 0.05  # the test can see a bias of a few percent


@torch.no_grad()
def test_bf16_changes_the_output_within_bounds(tiny_model_paths: dict[str, Path], posterior: Path) -> None:
    """bf16 autocast (8-bit mantissa) vs fp32 on the same inputs: each map's relative L2 error is above 1e-4 (bf16
    really ran: fp32 round-off is ~1e-6) and below 5 % (measured on the tiny models: lare/deu 0.3 %, aleatoric
    1.7 %, MI ~2 %, CLIP maps < 0.6 %). Catches an autocast that silently does nothing, and one that breaks a map."""
    kwargs = dict(sd=str(tiny_model_paths["sd"]), posterior=str(posterior), clip=str(tiny_model_paths["clip"]),
                  outputs=BUILTIN + ["clip_layer3", "clip_pooled"], timestep=T, num_noises=N)
    batch = make_batch(["p", "q"])
    ref = FeatureExtractor(**kwargs).predict_step(batch, 0)
    low = FeatureExtractor(**kwargs, autocast_dtype="bfloat16").predict_step(batch, 0)
    for name in kwargs["outputs"]:
        assert low[name].dtype == torch.float32
        rel = float((low[name] - ref[name]).norm() / ref[name].norm())
        assert 1e-4 < rel < 0.05, f"{name}: bf16 relative error {rel:.3g}"


@torch.no_grad()
def test_bf16_weights_change_the_output_within_bounds(tiny_model_paths: dict[str, Path], posterior: Path) -> None:
    """weights_dtype=bfloat16 (weights cast, not only autocast): maps stay fp32, differ from fp32 weights by more
    than round-off and less than 5 %; the weight hashes are those of the weights as loaded. Catches a cast that is
    not applied, or one that changes the recorded hashes (the store would refuse the same weights)."""
    kwargs = dict(sd=str(tiny_model_paths["sd"]), posterior=str(posterior), outputs=BUILTIN, timestep=T, num_noises=N)
    batch = make_batch(["p", "q"])
    plain = FeatureExtractor(**kwargs)
    cast = FeatureExtractor(**kwargs, weights_dtype="bfloat16", channels_last=True)
    assert cast.unet.conv_out.weight.dtype == torch.bfloat16
    ref, low = plain.predict_step(batch, 0), cast.predict_step(batch, 0)
    for name in BUILTIN:
        rel = float((low[name] - ref[name]).norm() / ref[name].norm())
        assert low[name].dtype == torch.float32 and 1e-4 < rel < 0.05, f"{name}: {rel:.3g}"
    assert cast.weight_hashes() == plain.weight_hashes()
    common = cast.provenance()["common"]
    assert (common["weights_dtype"], common["channels_last"]) == ("bfloat16", True)


@torch.no_grad()
def test_uint8_and_float_images_give_the_same_maps(extractor: FeatureExtractor) -> None:
    """Images normalised on the device equal the float pipeline's. Catches a wrong scale (e.g. /255)."""
    batch = make_batch(["f0"])
    floated = {**batch, "image": as_float(batch["image"])}
    a, b = extractor.predict_step(batch, 0), extractor.predict_step(floated, 0)
    for name in BUILTIN:
        assert torch.equal(a[name], b[name])


@torch.no_grad()
def test_error_rows_are_computed_on_zeros(extractor: FeatureExtractor) -> None:
    batch = make_batch(["ok", "broken"], errors=["", "cannot identify image file"])
    batch["image"][1] = 127
    out = extractor.predict_step(batch, 0)
    assert out["error"] == ["", "cannot identify image file"]
    assert all(torch.isfinite(out[name]).all() for name in ("lare", "deu", "mi"))


@torch.no_grad()
def test_a_map_computed_alone_equals_it_computed_with_others(extractor: FeatureExtractor) -> None:
    """set_outputs(["mi"]) (a store growing by one map) gives MI bit-identical to the full run's and nothing else.
    Catches a map whose value depends on which other maps were asked for (e.g. a shared draw)."""
    batch = make_batch(["g0", "g1"])
    full = extractor.predict_step(batch, 0)
    extractor.set_outputs(["mi"])
    try:
        alone = extractor.predict_step(batch, 0)
        assert torch.equal(alone["mi"], full["mi"]) and not {"lare", "deu", "clip_pooled"} & alone.keys()
        assert list(extractor.provenance()["maps"]) == ["mi"]
        with pytest.raises(ValueError, match="outputs="):
            extractor.set_outputs(["nope"])
    finally:
        extractor.set_outputs(BUILTIN + ["clip_layer3", "clip_pooled"])


def test_registry_lists_the_builtin_maps() -> None:
    """Names, channels per latent channel count, descriptions: what detectors, reports and predict read."""
    assert set(BUILTIN) <= set(available_maps())
    assert all(map_channels(name) == 4 and map_channels(name, latent=16) == 16 for name in BUILTIN)
    assert all(MAP_REGISTRY[name].description for name in BUILTIN)
    assert MAP_REGISTRY["deu"].needs_posterior and not MAP_REGISTRY["lare"].needs_posterior
    with pytest.raises(KeyError, match="registered maps"):
        map_channels("entropy")


STORAGE = {"guidance": ("float32", "zstd"), "clip": ("float16", "lz4")}


def test_every_output_has_one_registered_kind_that_decides_how_it_is_stored() -> None:
    """Catches a kind decided outside the registry (a CLIP name list in the writer, a dtype guess in separability):
    the CLIP outputs are registered as `clip`, the maps as `guidance`, the writer's storage follows the kind, a map
    registered with another kind is stored as that kind and refused as guidance, and a CLIP output is no map."""
    assert {name: feature_kind(name) for name in (*BUILTIN, "clip_layer3", "clip_pooled")} == \
        {**dict.fromkeys(BUILTIN, "guidance"), "clip_layer3": "clip", "clip_pooled": "clip"}
    assert (feature_spec("clip_layer3", (8, 2, 2), STORAGE).dtype, feature_spec("deu", (4, 2, 2), STORAGE).dtype) == \
        ("float16", "float32")
    assert feature_spec("mi", (4, 2, 2), STORAGE).units == "nats" and feature_spec("deu", (4, 2, 2), STORAGE).description
    with pytest.raises(KeyError, match="'clip_pooled' is a clip feature, not a guidance map"):
        map_channels("clip_pooled")
    with pytest.raises(ValueError, match="already registered"):
        register_map("clip_layer3", channels=1, description="a map shadowing a CLIP output")(lambda ctx: ctx)
    try:
        register_map("toy_embedding", channels=2, description="stored like a CLIP feature", kind="clip")(lambda ctx: ctx)
        assert feature_spec("toy_embedding", (2, 2, 2), STORAGE).dtype == "float16"
        with pytest.raises(KeyError, match="not a guidance map"):
            map_channels("toy_embedding")
        with pytest.raises(ValueError, match="kind 'colour' is not one of"):
            register_map("toy_colour", channels=1, description="", kind="colour")(lambda ctx: ctx)
    finally:
        for name in ("toy_embedding", "toy_colour"):
            MAP_REGISTRY.pop(name, None)
            FEATURES.pop(name, None)


@torch.no_grad()
def test_a_user_map_module_registers_a_new_map(tiny_model_paths: dict[str, Path], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """One file registering a 1-channel map, named in map_modules: computed, shaped from the registry, with its
    settings in the provenance. Catches hard-coded map lists or a hard-coded channel count of 4."""
    (tmp_path / "my_entropy_map.py").write_text(textwrap.dedent('''
        import torch
        from lightning_modules.maps import register_map

        @register_map("toy_spread", channels=1, description="max over channels of the aleatoric variance",
                      settings=("num_noises",), min_noises=2)
        def toy_spread(ctx):
            return ctx.map("aleatoric").amax(dim=1, keepdim=True)
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        fe = FeatureExtractor(str(tiny_model_paths["sd"]), outputs=["toy_spread", "aleatoric"], timestep=T,
                              num_noises=N, map_modules=["lightning_modules.maps.builtin", "my_entropy_map"])
        out = fe.predict_step(make_batch(["t0", "t1"]), 0)
        torch.testing.assert_close(out["toy_spread"], out["aleatoric"].amax(dim=1, keepdim=True), rtol=0, atol=0)
        assert fe.feature_shapes(RES) == {"toy_spread": (1, 8, 8), "aleatoric": (4, 8, 8)}
        assert fe.provenance()["maps"]["toy_spread"] == {"num_noises": N}
        assert map_channels("toy_spread") == 1
        assert {n: s.kind for n, s in fe.feature_specs(RES, STORAGE).items()} == {"toy_spread": "guidance",
                                                                                  "aleatoric": "guidance"}
    finally:
        MAP_REGISTRY.pop("toy_spread", None)
        FEATURES.pop("toy_spread", None)
        sys.modules.pop("my_entropy_map", None)
    with pytest.raises(ValueError, match="map_modules: cannot import 'no_such_maps'"):
        FeatureExtractor(str(tiny_model_paths["sd"]), outputs=["lare"], map_modules=["no_such_maps"])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"outputs": ["lare", "dew"]}, "outputs="),
    ({"outputs": ["deu"]}, "need posterior"),
    ({"outputs": ["clip_pooled"]}, "need clip"),
    ({"outputs": ["aleatoric"], "num_noises": 1}, "num_noises >= 2"),
    ({"outputs": ["lare"], "weights_dtype": "int8"}, "weights_dtype"),
])
def test_invalid_settings_fail_with_one_clear_line(tiny_model_paths: dict[str, Path], kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FeatureExtractor(str(tiny_model_paths["sd"]), **kwargs)


def test_batch_without_content_hashes_is_refused(extractor: FeatureExtractor) -> None:
    """Catches a silent fallback to row keys (the old, row-dependent noise)."""
    batch = make_batch(["h"])
    del batch["sha256"]
    with pytest.raises(ValueError, match="sha256"):
        extractor.predict_step(batch, 0)


def test_posterior_mismatch_is_refused(tiny_model_paths: dict[str, Path], posterior: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="prompt"):
        FeatureExtractor(str(tiny_model_paths["sd"]), posterior=str(posterior), timestep=T, prompt="a cat")
    with pytest.raises(ValueError, match="timestep"):
        FeatureExtractor(str(tiny_model_paths["sd"]), posterior=str(posterior), timestep=T + 1)
    with pytest.raises(FileNotFoundError, match="laplace-fit"):
        FeatureExtractor(str(tiny_model_paths["sd"]), posterior=str(tmp_path / "none.pt"))
    fe = FeatureExtractor(str(tiny_model_paths["sd"]), posterior=str(posterior), timestep=T, num_noises=N)
    wrong_res = make_batch(["r"])
    wrong_res["image"] = torch.zeros(1, 3, 2 * RES, 2 * RES, dtype=torch.uint8)
    with pytest.raises(ValueError, match="resolution"):
        fe.predict_step(wrong_res, 0)


def test_provenance_splits_common_and_per_map_settings(extractor: FeatureExtractor, posterior: Path) -> None:
    """Catches a per-map setting (posterior, σ mode, MC M) in `common` (a store could not grow by DEU) or missing."""
    prov = extractor.provenance()
    common, maps = prov["common"], prov["maps"]
    assert common["extractor"] == "lightning_modules.feature_extractor.FeatureExtractor"
    assert {"vae_hash", "unet_hash", "text_encoder_hash"} <= common.keys()
    assert common["timestep"] == T and common["num_noises"] == N and common["noise_key"] == "sha256"
    assert not {"deu_mode", "posterior_sha256", "num_weight_samples"} & common.keys()
    assert list(maps) == extractor.outputs
    assert maps["lare"] == {} and maps["aleatoric"] == {}
    assert maps["deu"]["posterior_sha256"] == hashlib.sha256(posterior.read_bytes()).hexdigest()
    assert maps["deu"]["deu_mode"] == "closed_form" and maps["deu"]["sigma"] == {"mode": "fixed", "value": 1.0}
    assert maps["mi"] == maps["deu"]
    assert maps["clip_pooled"]["clip_hash"] == extractor.weight_hashes()["clip"]


@pytest.mark.slow
@torch.no_grad()
def test_compiled_padded_batches_match_eager(tiny_model_paths: dict[str, Path], posterior: Path) -> None:
    """compile=True pads a 2-row batch to compile_batch_size=3 and compiles the UNet (~3 min on 2 CPU cores): maps
    equal eager ones to float32 round-off and have the batch's rows only. Catches padding rows leaking into the
    output, or a compiled UNet whose conv_out hook no longer captures φ."""
    kwargs = dict(sd=str(tiny_model_paths["sd"]), posterior=str(posterior), outputs=BUILTIN, timestep=T, num_noises=N)
    batch = make_batch(["c0", "c1"])
    eager = FeatureExtractor(**kwargs).predict_step(batch, 0)
    compiled_fe = FeatureExtractor(**kwargs, compile=True, compile_batch_size=3)
    compiled = compiled_fe.predict_step(batch, 0)
    for name in BUILTIN:
        assert compiled[name].shape == eager[name].shape
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-4, atol=1e-6)
    assert compiled_fe.provenance()["common"]["compile_batch_size"] == 3
    with pytest.raises(ValueError, match="exceeds compile_batch_size"):
        compiled_fe.predict_step(make_batch(["a", "b", "c", "d"]), 0)


def test_provenance_records_local_weights_by_absolute_path(tiny_model_paths, monkeypatch):
    """Catches stores and checkpoints that record `sd` as typed (a relative path), so `predict` and `robustness`
    would work only from the directory phase 1 ran in; a hub id or tag is kept as given."""
    monkeypatch.chdir(tiny_model_paths["sd"].parent)
    extractor = FeatureExtractor(tiny_model_paths["sd"].name, outputs=["lare"])
    assert extractor.provenance()["common"]["sd"] == str(tiny_model_paths["sd"].resolve())
    assert recorded_path("openai") == "openai"
