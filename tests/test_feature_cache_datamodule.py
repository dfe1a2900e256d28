"""FeatureCacheDataModule: batch contract, multi-store generator codes, filters, splits, images + paired crops."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from datamodules.cached_features import FeatureCacheDataModule, available_ram
from lightning_modules.detectors.base import DetectorBase
from datamodules.row_batches import READ_ROWS, RING_SLOTS, contiguous_runs, epoch_order, read_calls
from core.geometry import FlipCrop, apply_flip_crop, sample_flip_crop
from feature_cache.provenance import FeatureSpec
from feature_cache.raw_chunks import RawChunks
from feature_cache.store import FeatureStore
from feature_cache_fakes import RAW_PROTOCOL, make_shard_dir, marker_image, write_store

SPECS = {"deu": FeatureSpec((4, 4, 4), "float32", "zstd", "guidance"), "clip_pooled": FeatureSpec((6,), "float16", "lz4", "clip")}


def make_store(path: Path, offset: float, names: list[str], num_rows: int = 10, **kwargs: Any) -> FeatureStore:
    """A store whose features are exact functions of (offset, row)."""
    def values(rows: np.ndarray) -> dict[str, np.ndarray]:
        return {name: np.broadcast_to((offset + rows).reshape(-1, *[1] * len(spec.shape)),
                                      (len(rows), *spec.shape)).astype(np.float32) for name, spec in SPECS.items()}
    return write_store(path, values, SPECS, names, num_rows, identity=kwargs.pop("identity", str(offset)), **kwargs)


@pytest.fixture
def stores(tmp_path: Path) -> tuple[str, str]:
    a = make_store(tmp_path / "a", 0.0, ["adm", "sdv4"], error_rows=(3,))
    b = make_store(tmp_path / "b", 100.0, ["glide", "sdv4"], num_rows=7)
    return str(a.path), str(b.path)


def all_batches(loader: torch.utils.data.DataLoader) -> dict[str, torch.Tensor]:
    batches = [{k: v.clone() for k, v in b.items()} for b in loader]  # host batches live in reused buffers
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


@pytest.mark.parametrize(("in_memory", "block_rows"), [(True, 1), ("device", 1), (False, 3), (False, 1)])
def test_batches_follow_the_contract_across_two_stores(stores: tuple[str, str], in_memory: bool | str,
                                                       block_rows: int) -> None:
    """Catches rows lost or repeated at block/window/store boundaries, metadata gathered out of step with the
    features, or batches widened on the host (the contract is the stored dtype)."""
    dm = FeatureCacheDataModule(features=["deu", "clip_pooled"], train=list(stores), batch_size=4,
                                in_memory=in_memory, block_rows=block_rows, shuffle_blocks=2)
    dm.setup("fit")
    assert dm.generator_names == ["adm", "glide", "sdv4"]
    first = next(iter(dm.train_dataloader()))
    assert first["deu"].dtype == torch.float32 and first["deu"].shape == (4, 4, 4, 4)
    assert first["clip_pooled"].dtype == torch.float16
    assert first["clip_pooled"].shape == (4, 6)
    assert {first[k].dtype for k in ("label", "generator", "row")} == {torch.int64}
    data = all_batches(dm.train_dataloader())
    assert len(data["row"]) == 9 + 7  # store a's row 3 failed in phase 1
    from_b = data["deu"][:, 0, 0, 0] >= 100
    rows_a, rows_b = data["row"][~from_b], data["row"][from_b]
    assert sorted(rows_a.tolist()) == [0, 1, 2, 4, 5, 6, 7, 8, 9] and sorted(rows_b.tolist()) == list(range(7))
    torch.testing.assert_close(data["clip_pooled"][:, 3].float(), data["row"].float() + 100 * from_b)
    assert torch.equal(data["label"], data["row"] % 2)
    expected_generator = torch.where(from_b, torch.tensor([1, 2])[data["row"] % 2], torch.tensor([0, 2])[data["row"] % 2])
    assert torch.equal(data["generator"], expected_generator)


def test_generator_filter_and_seeded_val_split(stores: tuple[str, str]) -> None:
    dm = FeatureCacheDataModule(features=["deu"], train=list(stores), generators=["sdv4"], batch_size=3,
                                num_workers=0, val_fraction=0.25, seed=7)
    dm.setup("fit")
    train, val = all_batches(dm.train_dataloader()), all_batches(dm.val_dataloader())
    assert set(train["generator"].tolist()) == set(val["generator"].tolist()) == {2}
    identities = lambda d: {(float(v), int(r)) for v, r in zip(d["deu"][:, 0, 0, 0], d["row"])}  # noqa: E731
    assert len(identities(val)) == 2 and not identities(train) & identities(val)
    assert identities(train) | identities(val) == {(o + r, r) for o, rows in ((0, [1, 5, 7, 9]), (100, [1, 3, 5]))
                                                   for r in rows}
    again = FeatureCacheDataModule(features=["deu"], train=list(stores), generators=["sdv4"], num_workers=0,
                                   val_fraction=0.25, seed=7)
    again.setup("fit")
    assert identities(all_batches(again.val_dataloader())) == identities(val)


def test_clear_errors_for_bad_requests(tmp_path: Path, stores: tuple[str, str]) -> None:
    """Also catches a feature typo reaching the CLI's shape links (an error about visual_channels) instead of
    naming the unknown feature and the stored ones when the stores are first opened."""
    with pytest.raises(ValueError,
                       match=r"features: 'clip_layer3' not in feature store .*a; choose from \['deu', 'clip_pooled'\]"):
        FeatureCacheDataModule(features=["clip_layer3"], train=[stores[0]]).setup("fit")
    with pytest.raises(ValueError, match=r"'deuu' \(did you mean 'deu'\?\) not in feature store"):
        FeatureCacheDataModule(features=["deuu"], train=[stores[0]]).stored_shapes
    with pytest.raises(ValueError, match=r"generators \['midjourney'\] are in no store"):
        FeatureCacheDataModule(features=["deu"], train=[stores[0]], generators=["midjourney"]).setup("fit")
    with pytest.raises(FileNotFoundError, match=r"images=True reads the images from .*no_shards, which lacks 3 of"):
        FeatureCacheDataModule(features=["deu"], train=[stores[0]], images=True).setup("fit")
    unfinished = make_store(tmp_path / "c", 0.0, ["adm"], done=False)
    with pytest.raises(ValueError, match="1 of 3 tars of group g0 not computed yet"):
        FeatureCacheDataModule(features=["deu"], test=[str(unfinished.path)]).setup("test")


def test_contiguous_runs() -> None:
    assert contiguous_runs(np.array([2, 3, 4, 9, 11, 12])) == [(2, 5), (9, 10), (11, 13)]
    assert contiguous_runs(np.array([], dtype=np.int64)) == []


@pytest.mark.parametrize("chunk_rows", [1, 4, 25, 32, 40])
def test_read_calls_cover_runs_once_and_each_stays_within_whole_chunks(chunk_rows: int) -> None:
    """Catches calls that straddle a chunk boundary (two calls decoding one chunk, the per-chunk cost that bounds
    reads) or that lose or repeat rows of a run."""
    runs = [(3, 70), (90, 91), (100, 260)]
    calls = read_calls(runs, chunk_rows)
    covered = np.concatenate([np.arange(a, b) for a, b in calls])
    np.testing.assert_array_equal(covered, np.concatenate([np.arange(a, b) for a, b in runs]))
    step = chunk_rows * max(1, READ_ROWS // chunk_rows)
    assert all(a // step == (b - 1) // step for a, b in calls)  # one aligned call-sized span of whole chunks


def centroid(x: torch.Tensor) -> torch.Tensor:
    """(y, x) centre of mass of a (C, H, W) map in normalized [0, 1] coordinates (pixel centres)."""
    mass = x.float().sum(0)
    h, w = mass.shape
    ys, xs = (torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w
    total = mass.sum()
    return torch.stack([(mass.sum(1) * ys).sum() / total, (mass.sum(0) * xs).sum() / total])


def test_paired_flip_crop_keeps_image_and_map_aligned() -> None:
    image, fine_map = torch.zeros(3, 64, 64), torch.zeros(4, 16, 16)
    image[:, 16:24, 8:20] = 1.0  # the same normalized region [0.25, 0.375) x [0.125, 0.3125)
    fine_map[:, 4:6, 2:5] = 1.0
    flipped = apply_flip_crop(image, FlipCrop(0.0, 0.0, 1.0, 1.0, True))
    torch.testing.assert_close(flipped, image.flip(-1), atol=1e-5, rtol=0)
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        box = sample_flip_crop(scale=(0.6, 1.0), generator=generator)
        left, right = box.left, box.left + box.width
        if not (left < 0.15 and right > 0.3 and box.top < 0.25 and box.top + box.height > 0.4):
            continue  # keep boxes that contain the marker
        out_image, out_map = apply_flip_crop(image, box), apply_flip_crop(fine_map, box)
        assert out_image.shape == image.shape and out_map.shape == fine_map.shape
        torch.testing.assert_close(centroid(out_image), centroid(out_map), atol=0.02, rtol=0)
        expected_x = (0.21875 - left) / box.width
        assert abs(float(centroid(out_image)[1]) - (1 - expected_x if box.flip else expected_x)) < 0.02


def test_images_are_paired_and_augmented_identically(tmp_path: Path) -> None:
    make_shard_dir(tmp_path / "shards", num_rows=10, shard_size=4, image_size=32)

    def lare(rows: np.ndarray) -> dict[str, np.ndarray]:
        return {"lare": np.stack([marker_image(r, 32)[..., 0].reshape(16, 2, 16, 2).mean((1, 3))[None] / 255
                                  for r in rows]).astype(np.float32)}
    store = write_store(tmp_path / "store", lare, {"lare": FeatureSpec((1, 16, 16), "float32", "zstd", "guidance")}, ["nature"],
                        keys=[f"img{r:05d}" for r in range(10)], labels=[0] * 10, shards="shards",
                        pixels={"resolution": 32, **RAW_PROTOCOL})
    dm = FeatureCacheDataModule(features=["lare"], train=[str(store.path)], test=[str(store.path)], images=True,
                                batch_size=5, num_workers=0, crop_scale=(0.7, 1.0), allow_shared_images=True)
    dm.setup()  # every split: this test reads train and test
    test = all_batches(dm.test_dataloader())  # no augmentation: the decoded image itself
    expected = torch.stack([torch.from_numpy(marker_image(r, 32)).permute(2, 0, 1).float() / 127.5 - 1
                            for r in test["row"].tolist()])
    torch.testing.assert_close(test["image"], expected)
    torch.manual_seed(0)
    train = all_batches(dm.train_dataloader())
    assert train["image"].shape == (10, 3, 32, 32)
    plain = torch.stack([torch.from_numpy(marker_image(r, 32)).permute(2, 0, 1).float() / 127.5 - 1
                         for r in train["row"].tolist()])
    assert (train["image"] - plain).abs().amax((1, 2, 3)).gt(0.1).sum() >= 5  # most rows were cropped/flipped
    compared = 0
    for image, lare in zip(train["image"], train["lare"]):
        marker = (image[:1] + 1) / 2
        if marker.sum() < 1 or lare.sum() < 0.1:
            continue  # the crop left the marker out
        compared += 1
        torch.testing.assert_close(centroid(marker), centroid(lare), atol=0.04, rtol=0)
    assert compared >= 5


def test_stores_computed_with_different_settings_are_never_mixed(tmp_path: Path) -> None:
    train = make_store(tmp_path / "train", 0.0, ["sdv4"])
    test = make_store(tmp_path / "test", 0.0, ["sdv4"], timestep=300)
    dm = FeatureCacheDataModule(features=["deu"], train=[str(train.path)], test=[str(test.path)], num_workers=0)
    with pytest.raises(ValueError, match=r"computed with different settings \(deu.common.timestep 200 != 300\)"):
        dm.setup()


def test_unlabelled_rows_are_skipped_and_an_empty_split_is_named(tmp_path: Path) -> None:
    store = make_store(tmp_path / "s", 0.0, ["sdv4"], labels=[-1] * 4 + [r % 2 for r in range(4, 10)])
    dm = FeatureCacheDataModule(features=["deu"], train=[str(store.path)], num_workers=0, batch_size=100)
    dm.setup("fit")
    assert sorted(all_batches(dm.train_dataloader())["row"].tolist()) == list(range(4, 10))
    other = make_store(tmp_path / "other", 0.0, ["adm"])
    empty = FeatureCacheDataModule(features=["deu"], train=[str(store.path)], test=[str(other.path)],
                                   generators=["adm"], num_workers=0)
    with pytest.raises(ValueError, match=r"the train split has no rows after filtering \(generators=\['adm'\]"):
        empty.setup("fit")


def test_block_shuffle_covers_every_row_once_and_deals_ranks_disjoint_blocks() -> None:
    """Catches a block permutation that drops or repeats rows (last short block, window edges), the same
    order every epoch, ranks reading the same blocks, and a within-window shuffle that leaks across windows."""
    kwargs = dict(shuffle=True, block_rows=8, window_rows=24, seed=3)
    first, second = epoch_order(101, epoch=0, **kwargs), epoch_order(101, epoch=1, **kwargs)
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(101))
    assert not np.array_equal(first, second) and np.array_equal(first, epoch_order(101, epoch=0, **kwargs))
    for start in range(0, 101, 24):  # each window is a union of whole blocks (one read per block)
        blocks = set((first[start:start + 24] // 8).tolist())
        assert sum(min(8, 101 - 8 * b) for b in blocks) == len(first[start:start + 24])
    ranks = [epoch_order(101, epoch=0, rank=r, world_size=2, **kwargs) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 50  # equal steps per rank
    assert not set((ranks[0] // 8).tolist()) & set((ranks[1] // 8).tolist())
    evaluation = [epoch_order(5, shuffle=False, block_rows=8, window_rows=24, seed=0, epoch=0, rank=r, world_size=2)
                  for r in (0, 1)]
    assert [e.tolist() for e in evaluation] == [[0, 1, 2], [3, 4, 0]]  # padded like DistributedSampler


def test_block_shuffle_windows_hold_the_label_mix_of_a_label_sorted_store() -> None:
    """Catches windows filled from a bare block permutation (on a store sorted by label, GenImage's `ai/` then
    `nature/`, a window's fake share then varies like shuffle_blocks draws: 1.5x a full shuffle's batch spread),
    a stratification that drops, repeats or reorders rows between runs, and one that breaks the DDP dealing
    (ranks overlapping, rows lost, a rank's windows unbalanced)."""
    block, window, fakes = 10, 160, 900  # 16 blocks per window, 30 % fake, fakes sorted first
    share, spread = fakes / 3000, 1 / (window // block)
    labels = (np.arange(3007) < fakes).astype(np.int64)
    kwargs = dict(shuffle=True, block_rows=block, window_rows=window, seed=3)
    order = epoch_order(3007, epoch=0, labels=labels, **kwargs)
    assert sorted(order.tolist()) == list(range(3007))  # a short last block too
    assert np.array_equal(order, epoch_order(3007, epoch=0, labels=labels, **kwargs))
    assert not np.array_equal(order, epoch_order(3007, epoch=1, labels=labels, **kwargs))
    for world in (1, 2):
        ranks = [epoch_order(3000, epoch=0, labels=labels[:3000], rank=r, world_size=world, **kwargs)
                 for r in range(world)]
        assert sorted(np.concatenate(ranks).tolist()) == list(range(3000))  # disjoint and covering
        for rank in ranks:
            full = len(rank) // window * window
            for start in range(0, full, window):  # every whole window of every rank
                assert abs(labels[rank[start:start + window]].mean() - share) <= spread + 1e-9
    plain = epoch_order(3000, epoch=0, **kwargs)  # what the same seed gives without labels: unbalanced windows
    assert max(abs(labels[plain[s:s + window]].mean() - share) for s in range(0, 2880, window)) > spread


def test_default_block_is_the_stores_inner_chunk_and_reads_each_chunk_once(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches a default block that ignores the store's chunking (32-row blocks over the 25-row chunks of
    500-row tars cut chunks, which are then read, crc32c and all, once per block that touches them) and an
    explicit `block_rows` that is not honoured. Counts the reader's own per-chunk reads, for an uncompressed
    and a compressed array."""
    specs = {"deu": FeatureSpec((4, 4, 4), "float32", "none", "guidance"),
             "clip_pooled": FeatureSpec((6,), "float16", "lz4", "clip")}
    store = write_store(tmp_path / "s", lambda rows: {name: np.broadcast_to(
        rows.reshape(-1, *[1] * len(spec.shape)), (len(rows), *spec.shape)).astype(np.float32)
        for name, spec in specs.items()}, specs, ["sdv4"], num_rows=400, shard_size=50,
        labels=[int(r < 200) for r in range(400)])
    assert store.chunk_rows("deu") == store.chunk_rows("clip_pooled") == 25
    reads: list[tuple[str, int, int]] = []
    original = RawChunks._read_chunk

    def counted(self: RawChunks, fd: int, shard: int, chunk: int, *args: Any) -> None:
        reads.append((self.name, shard, chunk))
        original(self, fd, shard, chunk, *args)
    monkeypatch.setattr(RawChunks, "_read_chunk", counted)

    def epoch(**kwargs: Any) -> dict[str, torch.Tensor]:
        reads.clear()
        dm = FeatureCacheDataModule(features=list(specs), train=[str(store.path)], batch_size=20, in_memory=False,
                                    shuffle_blocks=4, **kwargs)
        dm.setup("fit")
        return all_batches(dm.train_dataloader())
    data = epoch()
    assert sorted(data["row"].tolist()) == list(range(400))  # every row exactly once
    np.testing.assert_array_equal(data["deu"][:, 0, 0, 0].numpy(), data["row"].numpy())
    assert sorted(reads) == sorted({(f"g0/{name}", shard, chunk) for name in specs for shard in range(8)
                                    for chunk in range(2)})  # each of the 2 x 16 chunks exactly once
    assert sorted(epoch(block_rows=32)["row"].tolist()) == list(range(400))
    assert len(reads) > len(set(reads))  # 32-row blocks read some 25-row chunks twice


@pytest.mark.parametrize("in_memory", [True, False])
def test_same_seed_same_batches_and_host_batches_reuse_their_buffers(stores: tuple[str, str], in_memory: bool) -> None:
    """Catches an order that depends on anything but (seed, epoch) (grid rows trained together must see the
    batches they would see alone), a reader that allocates fresh batch memory every epoch, and buffers reused
    too early (a batch overwritten before RING_SLOTS more batches were handed out: Lightning's prefetch and a
    grid's lockstep rows still hold it)."""
    def epoch(loader: Iterable[dict[str, torch.Tensor]]) -> tuple[list[int], set[int]]:
        batches, kept = [], []
        for batch in loader:
            kept.append((batch, {k: v.clone() for k, v in batch.items()}))
            if len(kept) == RING_SLOTS:  # the oldest must hold while RING_SLOTS - 1 later batches exist
                old, copy = kept.pop(0)
                assert all(torch.equal(old[k], copy[k]) for k in copy), "a batch was overwritten too early"
            batches.append(batch)
        return [int(r) for b in batches for r in b["row"]], {b["deu"].data_ptr() for b in batches}

    def loader() -> Iterable[dict[str, torch.Tensor]]:
        dm = FeatureCacheDataModule(features=["deu"], train=list(stores), batch_size=2, in_memory=in_memory,
                                    block_rows=2, shuffle_blocks=2, seed=5)
        dm.setup("fit")
        return dm.train_dataloader()

    batches = loader()
    order, buffers = epoch(batches)
    assert epoch(loader())[0] == order and len(order) == 16
    assert epoch(batches)[1] <= buffers  # the second epoch reuses the first one's memory


def test_splits_sharing_an_image_are_refused_unless_allowed(tmp_path: Path) -> None:
    """Catches a check by row or key instead of content (these stores share no key but two images) and an
    opt-in that does not open."""
    train = make_store(tmp_path / "train", 0.0, ["sdv4"], identity="x")
    keys = [f"test{r}" for r in range(6)]
    test = make_store(tmp_path / "test", 50.0, ["sdv4"], num_rows=6, keys=keys, identity="x")  # sha of rows 0..5
    other = make_store(tmp_path / "other", 50.0, ["sdv4"], num_rows=6, keys=keys, identity="y")
    dm = FeatureCacheDataModule(features=["deu"], train=[str(train.path)], test=[str(test.path)])
    with pytest.raises(ValueError, match=r"the train and test splits share 6 images \(same sha256\), e\.g\. "
                                         r"k\d \(train\) = test\d \(test\)"):
        dm.setup()
    FeatureCacheDataModule(features=["deu"], train=[str(train.path)], test=[str(test.path)],
                           allow_shared_images=True).setup()
    FeatureCacheDataModule(features=["deu"], train=[str(train.path)], test=[str(other.path)]).setup()


def test_non_finite_rows_and_damaged_files_are_refused(tmp_path: Path) -> None:
    """Catches training on rows the writer flagged NaN/inf, and reading a store whose shard file was deleted
    or truncated (zarr would read fill values: silent zeros)."""
    def poisoned(rows: np.ndarray) -> dict[str, np.ndarray]:
        values = {name: np.ones((len(rows), *spec.shape), np.float32) for name, spec in SPECS.items()}
        values["deu"][rows == 5] = np.nan
        return values
    bad = write_store(tmp_path / "bad", poisoned, SPECS, ["sdv4"])
    with pytest.raises(ValueError, match=r"bad: 1 rows have NaN/inf values in groups \['g0'\] \(e\.g\. keys \['k5'\]\)"):
        FeatureCacheDataModule(features=["deu"], train=[str(bad.path)]).setup("fit")
    store = make_store(tmp_path / "s", 0.0, ["sdv4"])
    shard = next((store.path / "g0" / "clip_pooled").rglob("c/1/*"))
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(ValueError, match=r"s: 1 damaged files \(g0 shard-000001.tar: g0/clip_pooled/c/1/0 .*"
                                         r"python -m cli verify"):
        FeatureCacheDataModule(features=["deu"], train=[str(store.path)]).setup("fit")


@pytest.mark.parametrize("dtype", ["int8_rowscale", "float8_e4m3"])
def test_eight_bit_maps_arrive_narrow_and_widen_to_the_stored_values(tmp_path: Path, dtype: str) -> None:
    """Catches a reader that drops `NAME__scale`, gathers scales out of step with their rows, or hands float8
    bits over as plain uint8 (the model would widen them as integers)."""
    specs = {"clip_layer3": FeatureSpec((3, 2, 2), dtype, "lz4", "clip")}
    rng = np.random.default_rng(0)
    raw = rng.standard_normal((10, 3, 2, 2)).astype(np.float32) * np.array([0.01, 1.0, 30.0], np.float32)[:, None, None]
    store = write_store(tmp_path / "s", lambda rows: {"clip_layer3": raw[rows]}, specs, ["sdv4"])
    dm = FeatureCacheDataModule(features=["clip_layer3"], train=[str(store.path)], batch_size=4)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["clip_layer3"].dtype == {"int8_rowscale": torch.int8, "float8_e4m3": torch.float8_e4m3fn}[dtype]
    widened = DetectorBase.batch_tensor(batch, "clip_layer3")
    original = torch.from_numpy(raw[batch["row"].numpy()])
    if dtype == "float8_e4m3":
        expected = original.to(torch.float8_e4m3fn).float()
    else:  # the codec's definition: s = max|x| / 127 per row and channel, q = round(x / s)
        scale = original.abs().amax(dim=(2, 3), keepdim=True) / 127
        expected = torch.round(original / scale) * scale
    assert widened.dtype == torch.float32
    torch.testing.assert_close(widened, expected, rtol=1e-6, atol=0)


def test_available_ram_counts_the_reclaimable_page_cache(tmp_path: Path) -> None:
    """Catches sizing `in_memory` by free pages only: after phase 1 wrote the stores, the page cache holds most
    of RAM, free pages are near zero, and every split would silently be read from disk."""
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       25000000 kB\nMemFree:          300000 kB\nMemAvailable:   20000000 kB\n"
                       "Buffers:           10000 kB\nCached:         19000000 kB\n")
    assert available_ram(meminfo) == 20_000_000 * 1024
    assert available_ram(tmp_path / "absent") == os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("count", [1, 2, 7, 48])
def test_gather_rows_split_over_two_threads_equals_fancy_indexing(count):
    """Bugs caught: the helper thread's half and the caller's half overlapping or leaving a row unfilled (odd
    counts), rows written to the wrong slots, a result read before the helper finished."""
    from datamodules.row_batches import gather_rows

    source = np.random.default_rng(count).standard_normal((64, 3, 5)).astype(np.float16)
    rows = np.random.default_rng(count + 1).choice(64, count, replace=False)
    out = np.full((count, 3, 5), np.nan, np.float16)
    gather_rows(source, rows, out)
    assert np.array_equal(out, source[rows])
