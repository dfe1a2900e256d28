"""The shard converter on real image trees: what is accepted and rejected, the tars' content, determinism."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from cli.__main__ import main
from datamodules.image_io import decode_rgb, estimate_jpeg_quality, to_rgb
from datamodules.shards import ShardsInputError, convert, read_shard_index
from feature_cache.manifest import read_manifest_rows

from cli_runner import CliResult, run_cli
from image_trees import make_drct, make_folder, make_genimage, noise, sixteen_bit, truncated

SHARD_SIZE = 4


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def genimage(tmp_path_factory: pytest.TempPathFactory):
    """A GenImage tree converted once with a process pool (train split, shard size 4)."""
    base = tmp_path_factory.mktemp("genimage")
    expected = make_genimage(base / "root")
    summary = convert("genimage", base / "root", "train", base / "out", shard_size=SHARD_SIZE, workers=2)
    return base, expected, summary


def test_manifest_rows_are_the_decodable_files(genimage) -> None:
    base, expected, summary = genimage
    train = {rel: v for rel, v in expected.accepted.items() if "/train/" in rel}
    rows = read_manifest_rows(base / "out")
    assert [r["path"] for r in rows] == sorted(train)
    assert [r["row"] for r in rows] == list(range(len(train)))
    assert len({r["key"] for r in rows}) == len(rows)
    for r in rows:
        label, generator, fmt, quality = train[r["path"]]
        assert (r["label"], r["generator"], r["format"], r["jpeg_quality"]) == (label, generator, fmt, quality)
        with Image.open(base / "root" / r["path"]) as image:
            assert (r["width"], r["height"]) == image.size
        assert r["shard"] == f"shard-{r['row'] // SHARD_SIZE:06d}.tar" and r["class_name"] == ""
    assert summary.num_samples == len(train) and summary.generators == ["imagenet_ai_0419_sdv4", "imagenet_glide"]


def test_broken_files_are_rejected_with_a_reason(genimage) -> None:
    base, expected, summary = genimage
    rejected = {r["path"]: r["reason"] for r in read_csv(base / "out" / "rejected.csv")}
    assert set(rejected) == expected.rejected and summary.num_rejected == len(expected.rejected)
    assert "truncated" in rejected["imagenet_ai_0419_sdv4/train/nature/real_truncated.jpg"]
    assert "empty" in rejected["imagenet_ai_0419_sdv4/train/ai/fake_empty.png"]
    assert "cannot identify" in rejected["imagenet_glide/train/ai/notes.txt"]


def test_truncated_file_passes_verify_but_not_load(tmp_path: Path) -> None:
    """Why the converter decodes every pixel: PIL's verify() accepts a JPEG cut in half."""
    path = truncated(tmp_path / "cut.jpg", 0)
    with Image.open(path) as image:
        image.verify()
    with pytest.raises(OSError, match="truncated"):
        decode_rgb(path.read_bytes())


def test_shard_index_tiles_the_rows(genimage) -> None:
    base, _, summary = genimage
    index = read_shard_index(base / "out")
    sizes = [s["num_samples"] for s in index["shards"]]
    assert all(size == SHARD_SIZE for size in sizes[:-1]) and 0 < sizes[-1] <= SHARD_SIZE
    assert sum(sizes) == index["num_samples"] == summary.num_samples
    assert [s["first_row"] for s in index["shards"]] == [k * SHARD_SIZE for k in range(len(sizes))]
    assert [s["name"] for s in index["shards"]] == sorted(p.name for p in (base / "out").glob("shard-*.tar"))
    assert (index["layout"], index["split"], index["shard_size"]) == ("genimage", "train", SHARD_SIZE)
    assert index["generators"] == summary.generators


def test_tars_hold_the_original_bytes_under_the_manifest_keys(genimage) -> None:
    base, _, _ = genimage
    rows = {r["key"]: r for r in read_manifest_rows(base / "out")}
    urls = [str(p) for p in sorted((base / "out").glob("shard-*.tar"))]
    seen = []
    for sample in wds.WebDataset(urls, shardshuffle=False):
        key = sample["__key__"]
        seen.append(key)
        meta = json.loads(sample["json"])
        row = rows[key]
        assert (meta["row"], meta["label"], meta["generator"], meta["path"]) == \
               (row["row"], row["label"], row["generator"], row["path"])
        images = [name for name in sample if not name.startswith("__") and name != "json"]
        expected_extension = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[row["format"]]
        assert images == [expected_extension]
        assert sample[expected_extension] == (base / "root" / row["path"]).read_bytes()  # never re-encoded
        # The hash is of the bytes in the tar (read once, checked, hashed, written), in manifest and json alike.
        assert meta["sha256"] == row["sha256"] == hashlib.sha256(sample[expected_extension]).hexdigest()
        assert Path(sample["__url__"]).name == row["shard"]
    assert sorted(seen) == sorted(rows) and len(seen) == len(set(seen))


def test_rerun_gives_byte_identical_output(genimage, tmp_path: Path) -> None:
    """Same tree → same bytes, with or without the process pool."""
    base, _, _ = genimage
    convert("genimage", base / "root", "train", tmp_path / "again", shard_size=SHARD_SIZE, workers=1)
    first = sorted(p.name for p in (base / "out").iterdir())
    assert first == sorted(p.name for p in (tmp_path / "again").iterdir())
    for name in first:
        assert (base / "out" / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name


def test_existing_output_needs_overwrite(genimage, tmp_path: Path) -> None:
    base, _, _ = genimage
    out = tmp_path / "out"
    convert("genimage", base / "root", "val", out, shard_size=2, workers=1)
    with pytest.raises(ShardsInputError, match="already holds shards"):
        convert("genimage", base / "root", "val", out, shard_size=2, workers=1)
    summary = convert("genimage", base / "root", "val", out, shard_size=100, workers=1, overwrite=True)
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000000.tar"]  # stale tars are gone
    assert summary.num_shards == 1 and summary.num_samples == 6


@pytest.mark.parametrize("quality", [75, 90, 96])
def test_jpeg_quality_estimate_recovers_the_encoder_setting(quality: int) -> None:
    for image in (Image.fromarray(noise(quality, 64, 48)), Image.fromarray(noise(quality, 64, 48, 1))):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        with Image.open(buffer) as decoded:
            assert abs(estimate_jpeg_quality(decoded) - quality) <= 2
    assert estimate_jpeg_quality(Image.fromarray(noise(0, 8, 8))) is None


def test_awkward_modes_decode_to_rgb() -> None:
    """16-bit gray is rescaled (PIL's own convert would clip to 255); CMYK, LA, RGBA, P end up RGB."""
    sixteen = sixteen_bit(1)
    rgb = np.asarray(to_rgb(sixteen))
    expected = np.round(np.asarray(sixteen, dtype=np.float64) / 257).astype(np.uint8)
    assert rgb.shape == (40, 40, 3) and np.array_equal(rgb[..., 0], expected) and rgb.max() > 200
    for mode in ("CMYK", "LA", "RGBA", "P", "L"):
        assert to_rgb(Image.fromarray(noise(2, 16, 16)).convert(mode)).mode == "RGB"


def test_drct_layout(tmp_path: Path) -> None:
    expected = make_drct(tmp_path / "root")
    convert("drct", tmp_path / "root", "train", tmp_path / "out", workers=1)
    rows = read_manifest_rows(tmp_path / "out")
    assert {r["path"]: (r["label"], r["generator"]) for r in rows} == \
           {rel: (label, generator) for rel, (label, generator, _, _) in expected.accepted.items()}
    index = read_shard_index(tmp_path / "out")
    assert index["generators"] == ["MSCOCO", "ldm-text2im-large-256", "stable-diffusion-v1-4"]
    filtered = convert("drct", tmp_path / "root", "val", tmp_path / "val",
                       generators=["MSCOCO", "stable-diffusion-v1-4"], workers=1)
    assert filtered.generators == ["MSCOCO", "stable-diffusion-v1-4"] and filtered.num_samples == 3
    assert all("val2017" in r["path"] for r in read_manifest_rows(tmp_path / "val"))


@pytest.mark.parametrize("labelled", [True, False])
def test_folder_layout(tmp_path: Path, labelled: bool) -> None:
    root = tmp_path / "my_images"
    expected = make_folder(root, labelled)
    convert("folder", root, "val", tmp_path / "out", workers=1)
    rows = read_manifest_rows(tmp_path / "out")
    assert {r["path"]: (r["label"], r["generator"], r["format"], r["jpeg_quality"]) for r in rows} == expected.accepted
    assert {r["path"] for r in read_csv(tmp_path / "out" / "rejected.csv")} == expected.rejected
    assert all(r["class_name"] == "" for r in rows)


def _cli(*args: str, subprocess_: bool = False) -> CliResult:
    """`python -m cli shards ARGS`, in-process unless `subprocess_`."""
    return run_cli(["shards", *args], subprocess_=subprocess_, timeout=300)


def test_cli_converts_and_filters_generators(genimage, tmp_path: Path) -> None:
    base, _, _ = genimage
    result = _cli("--layout", "genimage", "--root", str(base / "root"), "--split", "val", "--out", str(tmp_path / "o"),
                  "--shard_size", "2", "--generators", "imagenet_glide", "--workers", "1")
    assert result.returncode == 0, result.stderr
    rows = read_manifest_rows(tmp_path / "o")
    assert len(rows) == 3 and {r["generator"] for r in rows} == {"imagenet_glide"}
    assert [s["num_samples"] for s in read_shard_index(tmp_path / "o")["shards"]] == [2, 1]


def test_cli_log_has_a_line_per_filled_tar_with_total_and_eta(genimage, tmp_path: Path) -> None:
    """stdout piped, as under SLURM or `> log` (a fresh process: what its console finds at start). Catches progress
    shown only as a redrawn bar (nothing useful in a log), a filled tar without its line, or lines without the
    total and ETA."""
    base, _, _ = genimage
    result = _cli("--layout", "genimage", "--root", str(base / "root"), "--split", "val", "--out", str(tmp_path / "o"),
                  "--shard_size", "2", "--generators", "imagenet_glide", "--workers", "1", subprocess_=True)
    assert result.returncode == 0, result.stderr
    found = len(read_manifest_rows(tmp_path / "o")) + len(read_csv(tmp_path / "o" / "rejected.csv"))
    lines = [line for line in result.stdout.splitlines() if line.startswith("shards: ")]
    assert lines[0].startswith(f"shards: 1/{found} images") and all("ETA" in line for line in lines), lines
    assert any(", 1 tars of at most" in line for line in lines), lines  # the first tar's line, forced when it fills
    assert lines[-1].startswith(f"shards: {found}/{found} images (100%)"), lines


@pytest.mark.parametrize("layout, root_name, extra, message", [
    ("genimage", "missing", (), "missing: not a directory"),
    ("drct", "root", (), "no MSCOCO/train2017 or DRCT-2M/<generator>/train2017"),
    ("genimage", "root", ("--generators", "imagenet_glide,dalle9"), "--generators dalle9: not found"),
    ("genimage", "root", ("--shard_size", "0"), "--shard_size 0: must be at least 1"),
    ("genimages", "root", (), "--layout 'genimages': not a registered layout; registered: drct, folder, genimage"),
    ("mine", "root", ("--layout_modules", "no_such_layouts"), "--layout_modules: cannot import 'no_such_layouts'"),
])
def test_cli_bad_input_is_one_clear_line(genimage, tmp_path: Path, layout: str, root_name: str,
                                         extra: tuple[str, ...], message: str) -> None:
    """In-process (the subprocess path is covered above: the log test): the exit message is what the user sees on
    stderr."""
    base, _, _ = genimage
    with pytest.raises(SystemExit) as exit_info:
        main(["shards", "--layout", layout, "--root", str(base / root_name), "--split", "train", "--out",
              str(tmp_path / "o"), *extra])
    text = str(exit_info.value.code)
    assert "\n" not in text and text.startswith("python -m cli shards: ") and message in text
    assert not (tmp_path / "o" / "shards.json").exists()
