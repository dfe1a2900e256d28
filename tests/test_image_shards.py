"""ImageShardDataModule on real shards: the batch contract (uint8 images, content hashes), read-time failures
(undecodable images, truncated tars), input checks, protocols, exactly-once under DDP."""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.image_io import to_rgb
from core.geometry import center_square
from datamodules.image_shards import ImageShardDataModule, balance, preprocessor_from_provenance
from feature_cache.provenance import PixelProvenance
from datamodules.shards import convert
from feature_cache.manifest import read_manifest_rows
from image_trees import make_genimage, noise, save
from cli_runner import cli_env

SHARD_SIZE = 4
RESOLUTION = 24
SCRIPT = Path(__file__).parent / "ddp_scripts" / "image_shards_predict.py"


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """GenImage train split (13 images of mixed formats and modes) in tars of 4, 4, 4, 1."""
    base = tmp_path_factory.mktemp("image_shards")
    make_genimage(base / "root")
    convert("genimage", base / "root", "train", base / "shards", shard_size=SHARD_SIZE, workers=1)
    return base / "shards"


def collect(datamodule: ImageShardDataModule) -> tuple[list[dict], dict[str, dict]]:
    """All batches, and every image's row of fields by key (asserting no key comes twice)."""
    batches = list(datamodule.predict_dataloader())
    by_key: dict[str, dict] = {}
    for batch in batches:
        for i, key in enumerate(batch["key"]):
            assert key not in by_key, f"key {key} delivered twice"
            by_key[key] = {name: batch[name][i] for name in batch}
    return batches, by_key


def pixels(image: Image.Image) -> torch.Tensor:
    """(3, H, W) uint8, written out here rather than imported from the code under test."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


def is_blank(image: torch.Tensor) -> bool:
    """The image of a row that could not be read: all 127 (≈ 0 after normalisation)."""
    return bool((image == 127).all())


def expected_raw(path: Path) -> torch.Tensor:
    with Image.open(path) as image:
        return pixels(to_rgb(image).resize((RESOLUTION, RESOLUTION), Image.BILINEAR))


def test_batches_follow_the_contract(shard_dir: Path) -> None:
    datamodule = ImageShardDataModule(str(shard_dir), resolution=RESOLUTION, batch_size=5, num_workers=2)
    batches, by_key = collect(datamodule)
    manifest = {r["key"]: r for r in read_manifest_rows(shard_dir)}
    assert sorted(by_key) == sorted(manifest)
    for batch in batches:
        size = len(batch["key"])
        assert 1 <= size <= 5 and len(batch["error"]) == size == len(batch["sha256"])
        assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (size, 3, RESOLUTION, RESOLUTION)
        for name in ("row", "label", "generator", "shard_index"):
            assert batch[name].dtype == torch.int64 and batch[name].shape == (size,)
    names = datamodule.generator_names
    root = shard_dir.parent / "root"
    for key, row in manifest.items():
        got = by_key[key]
        assert got["error"] == ""
        assert (int(got["row"]), int(got["label"]), names[int(got["generator"])]) == \
               (row["row"], row["label"], row["generator"])
        assert datamodule.shard_table()[int(got["shard_index"])]["name"] == row["shard"]
        torch.testing.assert_close(got["image"], expected_raw(root / row["path"]), rtol=0, atol=0)
        assert got["sha256"] == hashlib.sha256((root / row["path"]).read_bytes()).hexdigest()


def test_metadata_methods(shard_dir: Path) -> None:
    datamodule = ImageShardDataModule(str(shard_dir), resolution=RESOLUTION)
    assert datamodule.generator_names == ["imagenet_ai_0419_sdv4", "imagenet_glide"]
    assert [(s["first_row"], s["num_samples"]) for s in datamodule.shard_table()] == [(0, 4), (4, 4), (8, 4), (12, 1)]
    provenance = datamodule.provenance()
    assert provenance["shards"] == str(shard_dir.resolve()) and provenance["resolution"] == RESOLUTION
    assert provenance["protocol"] == "raw" and provenance["jpeg_quality"] is None


@pytest.mark.parametrize("settings", [{}, {"protocol": "jpeg_aligned", "seed": 3},
                                      {"protocol": "jpeg_size_aligned", "jpeg_quality": 70, "size_filter": True}])
def test_provenance_rebuilds_the_same_pipeline(shard_dir: Path, settings: dict) -> None:
    """Phase 2 (fine-tuning on images) can show the model exactly the pixels phase 1 saw."""
    datamodule = ImageShardDataModule(str(shard_dir), resolution=RESOLUTION, **settings)
    pixels = PixelProvenance.from_datamodule(datamodule.provenance())
    assert preprocessor_from_provenance(pixels, datamodule.stats) == datamodule.preprocess


def rewrite_member(tar_path: Path, key: str, transform: Callable[[bytes], bytes]) -> None:
    """Rewrite one tar with the image bytes of `key` replaced by transform(bytes)."""
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(tar_path, "w") as tar:
        for member, data in members:
            if member.name.startswith(key + ".") and not member.name.endswith(".json"):
                data = transform(data)
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))


def test_undecodable_image_gives_a_blank_image_and_a_reason(shard_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "shards"
    shutil.copytree(shard_dir, broken)
    rewrite_member(broken / "shard-000001.tar", "000000005", lambda data: data[: len(data) // 2])
    _, by_key = collect(ImageShardDataModule(str(broken), resolution=RESOLUTION, num_workers=2))
    assert len(by_key) == 13
    assert by_key["000000005"]["error"] == "OSError: image file is truncated"
    assert is_blank(by_key["000000005"]["image"])
    assert all(v["error"] == "" for k, v in by_key.items() if k != "000000005")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_truncated_tar_loses_rows_not_the_run(shard_dir: Path, tmp_path: Path, num_workers: int) -> None:
    """A tar cut mid-way: its first images come out normally, the lost ones as error rows with the manifest's
    key/row/label and a reason, every other tar intact. Catches a run that stops (or silently drops rows)."""
    broken = tmp_path / "shards"
    shutil.copytree(shard_dir, broken)
    tar = broken / "shard-000001.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2])
    _, by_key = collect(ImageShardDataModule(str(broken), resolution=RESOLUTION, num_workers=num_workers))
    manifest = {r["key"]: r for r in read_manifest_rows(broken)}
    assert sorted(by_key) == sorted(manifest)
    lost = {k for k, v in by_key.items() if v["error"]}
    assert lost and lost < {f"{row:09d}" for row in range(4, 8)}, lost
    for key in lost:
        got = by_key[key]
        assert got["error"].startswith("lost: tar shard-000001.tar is truncated or unreadable")
        assert (int(got["row"]), int(got["label"])) == (manifest[key]["row"], manifest[key]["label"])
        assert is_blank(got["image"])


@pytest.mark.parametrize(("kwargs", "message"), [({"batch_size": 0}, "batch_size 0"),
                                                 ({"resolution": 0}, "resolution 0"),
                                                 ({"resolution": 30}, "multiple of 8")])
def test_bad_batch_size_or_resolution_is_one_line(shard_dir: Path, kwargs: dict, message: str) -> None:
    """Catches batch_size 0 silently accepted and resolution 0 failing later (after a store was made)."""
    with pytest.raises(ValueError, match=message):
        ImageShardDataModule(str(shard_dir), **kwargs)


def test_exclude_shards(shard_dir: Path) -> None:
    datamodule = ImageShardDataModule(str(shard_dir), resolution=RESOLUTION, num_workers=0)
    datamodule.exclude_shards(["shard-000000.tar", "shard-000002.tar"])
    _, by_key = collect(datamodule)
    assert sorted(by_key) == [f"{row:09d}" for row in (4, 5, 6, 7, 12)]
    with pytest.raises(ValueError, match="shard-000009.tar"):
        datamodule.exclude_shards(["shard-000009.tar"])


def test_more_ranks_than_tars_warns_once_naming_the_idle_ranks(shard_dir: Path, capsys) -> None:
    """Bug caught: precompute with 8 ranks over 1 tar to do started 7 idle processes without a word."""
    from types import SimpleNamespace

    datamodule = ImageShardDataModule(str(shard_dir), resolution=RESOLUTION, num_workers=0)
    datamodule.exclude_shards(["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"])  # 1 of 4 tars to do
    for rank in range(3):
        datamodule.trainer = SimpleNamespace(global_rank=rank, world_size=3)
        datamodule.predict_dataloader()
    warnings = capsys.readouterr().err.strip().splitlines()
    assert warnings == [f"warning: 3 ranks for 1 tars to do in {shard_dir}: 2 ranks get no tar and idle (a tar is "
                        "read by one rank); --trainer.devices 1 would use them all"]
    datamodule.exclude_shards([])
    datamodule.predict_dataloader()  # 3 ranks, 4 tars: nothing to say
    assert capsys.readouterr().err == ""


def test_more_cpu_ranks_than_cores_warns(capsys) -> None:
    """Bug caught: `--trainer.devices 8` on a 2-core CPU machine silently starting 8 processes (5x slower)."""
    import os

    from cli.trainer import ForensicsTrainer

    cores = len(os.sched_getaffinity(0))
    ForensicsTrainer(accelerator="cpu", devices=cores + 1, strategy="ddp", logger=False)
    assert capsys.readouterr().err.strip().splitlines() == [
        f"warning: --trainer.devices {cores + 1} on CPU starts {cores + 1} processes on {cores} cores: each runs "
        f"about {(cores + 1) / cores:.1f}x slower and the run is no faster (--trainer.devices {cores} or fewer)"]
    ForensicsTrainer(accelerator="cpu", devices=1, logger=False)
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("num_workers, excluded", [(0, []), (2, []), (2, ["shard-000001.tar"])])
def test_batches_are_tar_aligned_and_independent_of_workers_and_resume(shard_dir: Path, num_workers: int,
                                                                      excluded: list[str]) -> None:
    """Batch composition is a function of the tar alone: rows [0,3), [3,4) of every 4-image tar."""
    datamodule = ImageShardDataModule(str(shard_dir), resolution=RESOLUTION, batch_size=3, num_workers=num_workers)
    datamodule.exclude_shards(excluded)
    batches, _ = collect(datamodule)
    compositions = sorted(batch["row"].tolist() for batch in batches)
    expected = [[0, 1, 2], [3], [4, 5, 6], [7], [8, 9, 10], [11], [12]]
    excluded_rows = {4, 5, 6, 7} if excluded else set()
    assert compositions == [rows for rows in expected if not set(rows) & excluded_rows]
    assert all(len(set(batch["shard_index"].tolist())) == 1 for batch in batches)
    # The progress total, known before reading: catches a total from the row count alone (ceil(13 / 3) = 5, not
    # the 7 tar-aligned batches) or one that still counts the tars a resume skips.
    assert datamodule.predict_batches() == len(batches)


def test_rank_split_covers_every_shard_once_and_balances_samples() -> None:
    shards = [{"name": f"s{k}", "num_samples": n} for k, n in enumerate((7, 7, 7, 7, 3))]
    for world in range(1, 8):
        parts = balance(shards, world)
        names = [s["name"] for part in parts for s in part]
        assert sorted(names) == sorted(s["name"] for s in shards) and len(parts) == world
        loads = [sum(s["num_samples"] for s in part) for part in parts]
        assert max(loads) - min(loads) <= 7
    assert [[s["name"] for s in part] for part in balance(shards, 2)] == [["s0", "s2", "s4"], ["s1", "s3"]]


def test_jpeg_aligned_reencodes_pngs_deterministically(shard_dir: Path) -> None:
    manifest = {r["key"]: r for r in read_manifest_rows(shard_dir)}
    _, raw = collect(ImageShardDataModule(str(shard_dir), resolution=RESOLUTION, num_workers=0))
    aligned = [collect(ImageShardDataModule(str(shard_dir), resolution=RESOLUTION, num_workers=workers,
                                            protocol="jpeg_aligned", jpeg_quality=50))[1] for workers in (0, 2)]
    png = [key for key, row in manifest.items() if row["format"] == "PNG"]
    assert png
    for key in png:
        assert not torch.equal(raw[key]["image"], aligned[0][key]["image"])
        assert torch.equal(aligned[0][key]["image"], aligned[1][key]["image"])
    key = next(k for k in png if manifest[k]["path"].endswith("fake_rgb.png"))
    with Image.open(shard_dir.parent / "root" / manifest[key]["path"]) as image:
        buffer = io.BytesIO()
        to_rgb(image).save(buffer, format="JPEG", quality=50)
    expected = Image.open(buffer).convert("RGB").resize((RESOLUTION, RESOLUTION), Image.BILINEAR)
    assert torch.equal(aligned[0][key]["image"], pixels(expected))


def test_jpeg_quality_drawn_from_real_images_per_key(shard_dir: Path) -> None:
    real_qualities = {r["jpeg_quality"] for r in read_manifest_rows(shard_dir) if r["label"] == 0}
    keys = [f"k{i}" for i in range(200)]
    first, again, other_seed = (ImageShardDataModule(str(shard_dir), protocol="jpeg_aligned", seed=seed).preprocess
                                for seed in (0, 0, 1))
    draws = [first.quality_for(key) for key in keys]
    assert set(draws) == real_qualities == {75, 90, 96}
    assert draws == [again.quality_for(key) for key in keys]
    assert draws != [other_seed.quality_for(key) for key in keys]
    provenance = first.provenance()
    assert provenance["protocol"] == "jpeg_aligned" and provenance["jpeg_quality_source"] == "real-image distribution"


def test_jpeg_aligned_needs_a_quality_source(tmp_path: Path) -> None:
    for i in range(2):
        save(tmp_path / "fakes_only" / "fake" / f"{i}.png", Image.fromarray(noise(i, 16, 16)))
    convert("folder", tmp_path / "fakes_only", "val", tmp_path / "out", workers=1)
    with pytest.raises(ValueError, match="set jpeg_quality"):
        ImageShardDataModule(str(tmp_path / "out"), protocol="jpeg_aligned")
    assert ImageShardDataModule(str(tmp_path / "out"), protocol="jpeg_aligned", jpeg_quality=80).provenance()[
        "jpeg_quality"] == 80


def test_size_aligned_center_crops_and_filters(shard_dir: Path) -> None:
    manifest = {r["key"]: r for r in read_manifest_rows(shard_dir)}
    _, cropped = collect(ImageShardDataModule(str(shard_dir), resolution=RESOLUTION, num_workers=0,
                                              protocol="size_aligned"))
    key = next(k for k, r in manifest.items() if (r["width"], r["height"]) == (56, 40))
    with Image.open(shard_dir.parent / "root" / manifest[key]["path"]) as image:
        expected = center_square(to_rgb(image)).resize((RESOLUTION, RESOLUTION), Image.BILINEAR)
    assert torch.equal(cropped[key]["image"], pixels(expected))

    datamodule = ImageShardDataModule(str(shard_dir), resolution=RESOLUTION, num_workers=0, protocol="size_aligned",
                                      size_filter=True)
    _, filtered = collect(datamodule)
    # glide's fakes are all 48 px; its reals' shorter side is 40 → excluded. sdv4's fakes span 32..48 → reals kept.
    excluded = {k for k, r in manifest.items() if r["generator"] == "imagenet_glide" and r["label"] == 0}
    assert len(excluded) == 2 and len(filtered) == len(manifest)
    for key, got in filtered.items():
        if key in excluded:
            assert "excluded by size_filter" in got["error"] and is_blank(got["image"])
        else:
            assert got["error"] == "" and torch.equal(got["image"], cropped[key]["image"])
    assert datamodule.provenance()["size_filter"] is True
    with pytest.raises(ValueError, match="size protocols only"):
        ImageShardDataModule(str(shard_dir), size_filter=True)


def test_jpeg_size_aligned_encodes_then_crops(shard_dir: Path) -> None:
    manifest = {r["key"]: r for r in read_manifest_rows(shard_dir)}
    key = next(k for k, r in manifest.items() if (r["width"], r["height"]) == (56, 40))  # a real JPEG, not square
    _, got = collect(ImageShardDataModule(str(shard_dir), resolution=RESOLUTION, num_workers=0,
                                          protocol="jpeg_size_aligned", jpeg_quality=60))
    with Image.open(shard_dir.parent / "root" / manifest[key]["path"]) as image:
        buffer = io.BytesIO()
        to_rgb(image).save(buffer, format="JPEG", quality=60)
    expected = center_square(Image.open(buffer).convert("RGB")).resize((RESOLUTION, RESOLUTION), Image.BILINEAR)
    assert torch.equal(got[key]["image"], pixels(expected))


@pytest.mark.slow
def test_two_ddp_ranks_see_every_image_exactly_once(tmp_path: Path) -> None:
    """Real 2-process gloo DDP with 2 workers each over tars of 7, 7, 7, 3; resumed runs exclude done tars."""
    for i in range(24):
        save(tmp_path / "images" / f"img{i:02d}.png", Image.fromarray(noise(i, 16, 16)))
    convert("folder", tmp_path / "images", "val", tmp_path / "shards", shard_size=7, workers=1)
    keys = [r["key"] for r in read_manifest_rows(tmp_path / "shards")]
    # Run 1: everything (every reader gets one tar); run 2: two tars left (each rank's second worker gets none);
    # run 3: one tar left (rank 1 reads nothing at all).
    excludes = ["", "shard-000000.tar,shard-000001.tar", "shard-000000.tar,shard-000001.tar,shard-000003.tar"]
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "shards"), str(tmp_path / "log"),
                             *[f"--exclude={e}" for e in excludes]], capture_output=True, text=True, timeout=600,
                            env=cli_env())  # the repository importable without relying on an editable install
    assert result.returncode == 0, result.stderr[-3000:]
    expected = [keys, keys[14:], keys[14:21]]
    for run, wanted in enumerate(expected):
        seen: list[str] = []
        for rank in (0, 1):
            log = tmp_path / "log" / f"run{run}" / f"rank{rank}.txt"
            lines = log.read_text().splitlines() if log.exists() else []
            assert all(line.split("\t")[1:] == [""] for line in lines)
            seen += [line.split("\t")[0] for line in lines]
        assert sorted(seen) == sorted(wanted), f"run {run}"
    assert not (tmp_path / "log" / "run2" / "rank1.txt").exists()
