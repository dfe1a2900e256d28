"""CLIP's LaRE² input (`clip_input: native_crop`): native-resolution windows, their boxes, and the maps they crop."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from workflows.robustness import score_store
from datamodules.cached_features import FeatureCacheDataModule
from datamodules.image_shards import ImageShardDataModule, pixel_settings, preprocessor_from_provenance
from core.geometry import crop_to_boxes
from feature_cache.provenance import FeatureSpec, PixelProvenance
from feature_cache.store import FeatureStore
from feature_cache.writer import ZarrFeatureWriter
from lightning_modules.detectors import LaRE2Detector
from lightning_modules.feature_extractor import FeatureExtractor
from lightning_modules.on_the_fly import OnTheFlyDetector
from tests.feature_cache_fakes import RAW_PROTOCOL, make_shard_dir, write_store
from tests.test_feature_cache_datamodule import all_batches

NATIVE = {"resolution": 32, **RAW_PROTOCOL, "clip_input": "native_crop", "clip_size": 224}
# (height, width): larger than 224 both ways, the square case of the issue, and smaller than 224 on one side.
SIZES = [(512, 512), (100, 300), (260, 300)]


def noise_images(sizes: list[tuple[int, int]], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for height, width in sizes]


def reflect_101(index: np.ndarray, length: int) -> np.ndarray:
    """OpenCV's BORDER_REFLECT_101 index (…2 1 | 0 1 2 … n-1 | n-2 …), written independently of numpy's pad."""
    period = 2 * (length - 1)
    index = np.abs(index) % period
    return np.where(index < length, index, period - index)


def expected_centre_window(image: np.ndarray, size: int = 224) -> tuple[np.ndarray, list[float]]:
    """The centred size² window of `image` padded (centred, reflect-101) to at least size², and its box."""
    height, width = image.shape[:2]
    pad_top, pad_left = max(size - height, 0) // 2, max(size - width, 0) // 2
    top, left = (max(height, size) - size) // 2, (max(width, size) - size) // 2
    rows = reflect_101(np.arange(top, top + size) - pad_top, height)
    cols = reflect_101(np.arange(left, left + size) - pad_left, width)
    box = [(top - pad_top) / height, (left - pad_left) / width, size / height, size / width]
    return image[rows][:, cols], box


def as_chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)


@pytest.fixture(scope="module")
def native_shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[np.ndarray]]:
    images = noise_images(SIZES)
    return make_shard_dir(tmp_path_factory.mktemp("native") / "shards", num_rows=3, shard_size=3,
                          images=images, generators=["nature", "sdv4"]), images


def test_clip_sees_the_centre_224_window_of_the_original_pixels(native_shards, tiny_model_paths) -> None:
    """Bugs caught: CLIP still fed the resized image (or a resized crop); the window off-centre or padded with
    zeros/edge copies instead of the official reflect-101; a box that does not describe the window; the
    extractor ignoring `clip_image`."""
    shards, images = native_shards
    data = ImageShardDataModule(str(shards), resolution=64, batch_size=3, num_workers=0, clip_input="native_crop")
    batch = next(iter(data.predict_dataloader()))
    assert batch["image"].shape == (3, 3, 64, 64)  # the diffusion maps still see the whole resized image
    for row in range(3):
        window, box = expected_centre_window(images[row])
        assert torch.equal(batch["clip_image"][row], as_chw(window)), SIZES[row]
        torch.testing.assert_close(batch["clip_box"][row], torch.tensor(box, dtype=torch.float32))
    assert torch.equal(batch["clip_image"][0], as_chw(images[0][144:368, 144:368]))  # the 512² case

    extractor = FeatureExtractor(str(tiny_model_paths["sd"]), clip=str(tiny_model_paths["clip"]),
                                 outputs=["clip_layer3"], num_noises=2)
    layer3 = extractor.predict_step(batch, 0)["clip_layer3"]
    pixels = torch.stack([as_chw(expected_centre_window(image)[0]) for image in images]).float() / 127.5 - 1
    with torch.no_grad():
        expected = extractor.clip_model.layer3(extractor.clip_model.normalize(pixels))
    torch.testing.assert_close(layer3, expected, rtol=0, atol=1e-5)
    resized = ImageShardDataModule(str(shards), resolution=64, batch_size=3, num_workers=0)
    assert "clip_image" not in next(iter(resized.predict_dataloader()))  # `resize` keeps the former input


def test_maps_are_cropped_to_the_window_and_reflected_like_the_padding() -> None:
    """Bugs caught: the box read as (left, top) or (height, width) swapped; maps zero- or border-padded where the
    image was reflected; a detector that pools the whole map although CLIP saw a window."""
    size = 16
    centres = (torch.arange(size) + 0.5) / size  # a linear ramp is resampled exactly by bilinear interpolation
    maps = torch.stack([centres[:, None].expand(size, size), centres[None, :].expand(size, size)])[None]
    boxes = torch.tensor([[0.25, 0.5, 0.5, 0.25], [-0.5, 0.125, 2.0, 0.5]])
    out = crop_to_boxes(maps.expand(2, -1, -1, -1), boxes, (8, 8))
    steps = (torch.arange(8) + 0.5) / 8
    for row, (top, left, height, width) in enumerate(boxes.tolist()):
        ys, xs = top + steps * height, left + steps * width
        ys = torch.where(ys < 0, -ys, torch.where(ys > 1, 2 - ys, ys))  # the image was reflected there
        torch.testing.assert_close(out[row, 0], ys[:, None].expand(8, 8), atol=1e-5, rtol=0)
        torch.testing.assert_close(out[row, 1], xs[None, :].expand(8, 8), atol=1e-5, rtol=0)

    model = LaRE2Detector(guidance=["lare"], visual_channels=8, pooled_dim=8, guidance_norm="none")
    lare = torch.rand(2, 4, size, size)
    pooled = model.pooled_guidance({"lare": lare, "clip_box": boxes}, (4, 4))
    expected = torch.nn.functional.adaptive_avg_pool2d(crop_to_boxes(lare, boxes), (4, 4))
    torch.testing.assert_close(pooled, expected)
    assert not torch.allclose(pooled, model.pooled_guidance({"lare": lare}, (4, 4)))


def _native_store(root: Path, images: list[np.ndarray], pixels: dict) -> FeatureStore:
    make_shard_dir(root / "shards", num_rows=len(images), shard_size=len(images), images=images,
                   generators=["nature"])
    return write_store(root / "store", lambda rows: {"lare": np.random.default_rng(0).random((len(rows), 4, 8, 8))
                                                     .astype(np.float32)},
                       {"lare": FeatureSpec((4, 8, 8), "float32", "zstd", "guidance")}, ["nature"], num_rows=len(images),
                       shard_size=len(images), keys=[f"img{r:05d}" for r in range(len(images))],
                       shards="shards", pixels=pixels,
                       row_columns={"width": [i.shape[1] for i in images], "height": [i.shape[0] for i in images]})


def test_training_crops_are_random_and_paired_with_their_windows(tmp_path: Path) -> None:
    """Bugs caught: fine-tuning crops always centred (or resized); a `clip_box` that is not the window the image
    was cut from (maps cropped elsewhere than the image); evaluation crops not centred; frozen batches without
    the centred box, so the detector would pool the whole map beside a windowed CLIP."""
    images = noise_images([(300, 300)] * 4 + [(512, 400), (120, 500)], seed=1)
    store = _native_store(tmp_path, images, NATIVE)
    dm = FeatureCacheDataModule(features=["lare"], train=[str(store.path)], test=[str(store.path)], images=True,
                                batch_size=3, num_workers=0, allow_shared_images=True)
    dm.setup()
    torch.manual_seed(0)
    offsets = []
    for _ in range(2):
        train = all_batches(dm.train_dataloader())
        for row, image, box in zip(train["row"].tolist(), train["image"], train["clip_box"].tolist()):
            height, width = images[row].shape[:2]
            pad_top, pad_left = max(224 - height, 0) // 2, max(224 - width, 0) // 2
            top, left = round(box[0] * height) + pad_top, round(box[1] * width) + pad_left
            assert box[2:] == pytest.approx([224 / height, 224 / width])
            rows = reflect_101(np.arange(top, top + 224) - pad_top, height)
            cols = reflect_101(np.arange(left, left + 224) - pad_left, width)
            torch.testing.assert_close(image, as_chw(images[row][rows][:, cols]).float() / 127.5 - 1)
            offsets.append((row, top, left))
    assert len({o for o in offsets if o[0] < 4}) > 6  # 8 draws on the 300² rows: not all at one place (centre 38)

    test = all_batches(dm.test_dataloader())
    for row, image, box in zip(test["row"].tolist(), test["image"], test["clip_box"].tolist()):
        window, expected_box = expected_centre_window(images[row])
        torch.testing.assert_close(image, as_chw(window).float() / 127.5 - 1)
        assert box == pytest.approx(expected_box)
    frozen = FeatureCacheDataModule(features=["lare"], test=[str(store.path)], batch_size=3)
    frozen.setup("test")
    batch = all_batches(frozen.test_dataloader())
    for row, box in zip(batch["row"].tolist(), batch["clip_box"].tolist()):
        assert box == pytest.approx(expected_centre_window(images[row])[1])


def test_resize_and_native_crop_stores_are_never_mixed_and_provenance_round_trips(tmp_path: Path) -> None:
    """Bugs caught: a resize store trained beside a native_crop one; clip_input or clip_size lost on the way
    store → checkpoint → predict's rebuilt pipeline; resize provenance growing a clip_size that older stores and
    checkpoints lack (they would then be refused)."""
    images = noise_images([(300, 300)] * 2)
    native = _native_store(tmp_path / "native", images, NATIVE)
    resized = _native_store(tmp_path / "resized", images, {**NATIVE, "clip_input": "resize", "clip_size": None})
    with pytest.raises(ValueError, match=r"different settings \(pixels\.clip_input native_crop != resize"):
        FeatureCacheDataModule(features=["lare"], train=[str(native.path), str(resized.path)]).setup("fit")

    data = ImageShardDataModule(str(tmp_path / "native" / "shards"), resolution=32, num_workers=0,
                                clip_input="native_crop")
    attrs = PixelProvenance.from_datamodule(data.provenance()).to_attrs()
    assert attrs["clip_input"] == "native_crop" and attrs["clip_size"] == 224
    assert PixelProvenance.from_attrs(attrs).to_attrs() == attrs
    reopened = FeatureStore.open(native.path).pixels
    assert (reopened.clip_input, reopened.clip_size) == ("native_crop", 224)
    assert "clip_size" not in resized.pixels.to_attrs() and resized.pixels.clip_input == "resize"
    checkpoint = FeatureCacheDataModule(features=["lare"], train=[str(native.path)]).feature_provenance()
    rebuilt = preprocessor_from_provenance(checkpoint.store.pixels, checkpoint.store.dataset.stats)
    assert (rebuilt.clip_input, rebuilt.clip_size) == ("native_crop", 224)
    older = PixelProvenance.from_attrs({k: v for k, v in attrs.items() if k not in ("clip_input", "clip_size")})
    assert pixel_settings(older)["clip_input"] == "resize"  # provenance from before clip_input existed: resize


def test_precompute_refuses_to_grow_a_resize_store_and_predict_scores_like_the_cache(native_shards, tiny_model_paths,
                                                                                     tmp_path: Path) -> None:
    """Bugs caught: a native_crop run silently adding maps to a store computed with resize; `robustness`' cached
    scores computed without CLIP's window (whole maps) while `predict` crops them, or `predict` rebuilding the
    datamodule without the recorded clip_input (then CLIP would see the resized image)."""
    shards, _ = native_shards
    extractor = FeatureExtractor(str(tiny_model_paths["sd"]), clip=str(tiny_model_paths["clip"]),
                                 outputs=["lare", "clip_layer3", "clip_pooled"], num_noises=2)

    def precompute(store: Path, clip_input: str) -> None:
        data = ImageShardDataModule(str(shards), resolution=64, batch_size=3, num_workers=0, clip_input=clip_input)
        pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                   callbacks=[ZarrFeatureWriter(str(store))]).predict(extractor, datamodule=data,
                                                                      return_predictions=False)
    precompute(tmp_path / "resize.zarr", "resize")
    with pytest.raises(ValueError, match="clip_input"):
        precompute(tmp_path / "resize.zarr", "native_crop")
    precompute(tmp_path / "native.zarr", "native_crop")
    store = FeatureStore.open(tmp_path / "native.zarr")
    assert store.pixels.clip_input == "native_crop"

    torch.manual_seed(0)
    layer3_channels, pooled_dim = store.feature_info("clip_layer3").shape[0], store.feature_info("clip_pooled").shape[0]
    detector = LaRE2Detector(guidance=["lare"], visual_channels=layer3_channels, pooled_dim=pooled_dim,
                             grid_size=store.feature_info("clip_layer3").shape[1], num_heads=2, head_dim=4,
                             guidance_norm="log").eval()
    detector.fit_guidance_norm([{"lare": torch.from_numpy(store.read("lare"))}])  # standardised: the maps count
    cached = score_store(detector, store, ["lare", "clip_layer3", "clip_pooled"]).p_fake
    data = ImageShardDataModule(str(shards), batch_size=3, num_workers=0,
                                **pixel_settings(store.pixels))
    batch = next(iter(data.predict_dataloader()))  # rows in store order: one tar, read in order
    extractor.set_outputs(["lare", "clip_layer3", "clip_pooled"])
    on_the_fly = OnTheFlyDetector(detector, extractor).predict_step(batch, 0)["p_fake"]
    torch.testing.assert_close(torch.from_numpy(cached).float(), on_the_fly.float(), atol=1e-4, rtol=0)
    with torch.no_grad():
        whole_maps = detector(extractor.predict_step(batch, 0)).logits.softmax(dim=-1)[:, 1]
    # The window moves the scores by far more than the tolerance above (measured 1e-6 apart, 6e-3 moved), so the
    # agreement means both paths cropped the maps alike.
    assert (whole_maps - on_the_fly).abs().max() > 1e-3
