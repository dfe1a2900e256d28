"""Hostile inputs: folders, files and checkpoints that once hung, looped, exhausted memory, lost work or ran code.

Each test reproduces one defect of issue 15 (items 9-13, 15, 16) on real files, through the real command
line where the defect was in it: its entry point in-process (`tests/cli_runner.py`), a fresh process where a hang
or a killed worker is the defect.
"""

from __future__ import annotations

import csv
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import datamodules.shards as shards_module
from datamodules.image_io import MAX_PIXELS, decode_rgb
from datamodules.layouts import walk_files
from datamodules.shards import convert
from feature_cache.manifest import read_manifest_rows
from cli_runner import CliResult, run_cli
from image_trees import noise, save


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def shards_cli(root: Path, out: Path, *extra: str, timeout: float = 120) -> CliResult:
    """`python -m cli shards --layout folder` of `root` in a fresh process: its users' bugs were hangs (a timeout)."""
    return run_cli(["shards", "--layout", "folder", "--root", str(root), "--split", "train", "--out", str(out), *extra],
                   subprocess_=True, timeout=timeout)


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A valid PNG signature and IHDR declaring width×height, then one tiny IDAT and IEND: ~100 bytes on disk."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture
def labelled(tmp_path: Path) -> Path:
    """root/real/a.jpg and root/fake/b.png: the two images every hostile tree starts from."""
    root = tmp_path / "root"
    save(root / "real" / "a.jpg", Image.fromarray(noise(1, 32, 32)), quality=85)
    save(root / "fake" / "b.png", Image.fromarray(noise(2, 32, 32)))
    return root


def test_fifo_named_png_is_skipped_not_waited_on(labelled: Path, tmp_path: Path) -> None:
    """Bug caught: opening a FIFO named *.png blocks forever (the old walker yielded it as a file)."""
    os.mkfifo(labelled / "fake" / "pipe.png")
    result = shards_cli(labelled, tmp_path / "out", "--workers", "1", timeout=60)
    assert result.returncode == 0, result.stderr
    rejected = {r["path"]: r["reason"] for r in read_csv(tmp_path / "out" / "rejected.csv")}
    assert rejected == {"fake/pipe.png": "not a regular file: a named pipe (FIFO)"}
    assert [r["path"] for r in read_manifest_rows(tmp_path / "out")] == ["fake/b.png", "real/a.jpg"]


def test_self_symlinks_and_folder_loops_give_one_row_per_image(labelled: Path, tmp_path: Path) -> None:
    """Bug caught: a link to '.' turned one image into 41 rows; two folders linking to each other never ended;
    a file linking to itself raised instead of being recorded."""
    (labelled / "fake" / "loop").symlink_to(".")
    (labelled / "fake" / "x").mkdir()
    (labelled / "fake" / "y").mkdir()
    (labelled / "fake" / "x" / "to_y").symlink_to("../y")
    (labelled / "fake" / "y" / "to_x").symlink_to("../x")
    (labelled / "fake" / "self.png").symlink_to("self.png")
    result = shards_cli(labelled, tmp_path / "out", "--workers", "1", timeout=60)
    assert result.returncode == 0, result.stderr
    assert [r["path"] for r in read_manifest_rows(tmp_path / "out")] == ["fake/b.png", "real/a.jpg"]
    rejected = {r["path"]: r["reason"] for r in read_csv(tmp_path / "out" / "rejected.csv")}
    assert rejected["fake/self.png"].startswith("broken or looping symlink: OSError")
    for link in ("fake/loop", "fake/x/to_y", "fake/y/to_x"):
        assert rejected[link].startswith("symlink back into the dataset tree"), rejected


@pytest.mark.parametrize("layout", ["folder", "genimage"])
def test_link_to_a_parent_never_relabels_a_class(tmp_path: Path, layout: str) -> None:
    """Bug caught: `ln -s .. ROOT/fake/loop` made the walk of fake/ reach real/ first, so every real image was
    labelled fake (exit 0); the same in GenImage's ai/ -> nature/. Each real file is read once, at its real
    location: the manifest equals the one without the link, and the link is in rejected.csv with its reason."""
    root = tmp_path / "root"
    fake, real = {"folder": ("fake", "real"), "genimage": ("sdv4/train/ai", "sdv4/train/nature")}[layout]
    save(root / real / "a.jpg", Image.fromarray(noise(1, 32, 32)), quality=85)
    save(root / fake / "b.png", Image.fromarray(noise(2, 32, 32)))
    convert(layout, root, "train", tmp_path / "clean", workers=1)
    (root / fake / "loop").symlink_to("..")
    result = run_cli(["shards", "--layout", layout, "--root", str(root), "--split", "train", "--out",
                      str(tmp_path / "out"), "--workers", "1"])
    assert result.returncode == 0, result.stderr
    rows = [(r["path"], r["label"], r["generator"]) for r in read_manifest_rows(tmp_path / "out")]
    assert rows == [(r["path"], r["label"], r["generator"]) for r in read_manifest_rows(tmp_path / "clean")]
    assert {path: label for path, label, _ in rows} == {f"{fake}/b.png": 1, f"{real}/a.jpg": 0}
    rejected = {r["path"]: r["reason"] for r in read_csv(tmp_path / "out" / "rejected.csv")}
    assert rejected == {f"{fake}/loop": f"symlink back into the dataset tree (to {(root / fake).parent.resolve()}): "
                                        "its files are read once, at their real location, never relabelled"}


def test_generator_folder_linked_to_another_is_not_relabelled(tmp_path: Path) -> None:
    """Bug caught: GenImage's `a_copy -> sdv4` (sorted first) was walked as generator `a_copy`, then sdv4's own
    folder was skipped as already walked: every sdv4 row relabelled. The link is rejected; sdv4 keeps its rows."""
    root = tmp_path / "root"
    save(root / "sdv4" / "train" / "ai" / "b.png", Image.fromarray(noise(2, 32, 32)))
    save(root / "sdv4" / "train" / "nature" / "a.jpg", Image.fromarray(noise(1, 32, 32)), quality=85)
    (root / "a_copy").symlink_to("sdv4")
    convert("genimage", root, "train", tmp_path / "out", workers=1)
    assert {(r["path"], r["generator"]) for r in read_manifest_rows(tmp_path / "out")} == {
        ("sdv4/train/ai/b.png", "sdv4"), ("sdv4/train/nature/a.jpg", "sdv4")}
    rejected = {r["path"]: r["reason"] for r in read_csv(tmp_path / "out" / "rejected.csv")}
    assert set(rejected) == {"a_copy/train/ai", "a_copy/train/nature"}
    assert all(reason.startswith("symlink back into the dataset tree") for reason in rejected.values())


def test_links_to_one_file_are_read_once(labelled: Path, tmp_path: Path) -> None:
    """Bug caught: two links to one file outside the tree became two rows (the same bytes read twice)."""
    outside = save(tmp_path / "elsewhere" / "c.png", Image.fromarray(noise(3, 32, 32)))
    (labelled / "fake" / "c1.png").symlink_to(outside)
    (labelled / "fake" / "c2.png").symlink_to(outside)
    files, skipped = walk_files(labelled / "fake")
    assert files == [labelled / "fake" / "b.png", labelled / "fake" / "c1.png"]
    assert skipped == [(labelled / "fake" / "c2.png", f"file already read (same file as {outside.resolve()})")]


def test_symlinked_folder_is_followed_once(labelled: Path, tmp_path: Path) -> None:
    """Bug caught: symlinked dataset folders not followed (lost rows), or followed twice through two links."""
    outside = tmp_path / "elsewhere"
    save(outside / "c.png", Image.fromarray(noise(3, 32, 32)))
    (labelled / "fake" / "linked").symlink_to(outside)
    (labelled / "fake" / "linked_again").symlink_to(outside)
    files, skipped = walk_files(labelled / "fake")
    assert files == [labelled / "fake" / "b.png", labelled / "fake" / "linked" / "c.png"]
    assert skipped == [(labelled / "fake" / "linked_again", f"folder already walked (same folder as {outside})")]


def test_hidden_files_and_folders_are_recorded(labelled: Path, tmp_path: Path) -> None:
    """Bug caught: `.hidden.png` was in neither the manifest nor rejected.csv (a file silently unaccounted for)."""
    save(labelled / "fake" / ".hidden.png", Image.fromarray(noise(4, 32, 32)))
    save(labelled / "real" / ".cache" / "d.png", Image.fromarray(noise(5, 32, 32)))
    convert("folder", labelled, "train", tmp_path / "out", workers=1)
    rejected = {r["path"]: r["reason"] for r in read_csv(tmp_path / "out" / "rejected.csv")}
    assert rejected == {"fake/.hidden.png": "hidden file", "real/.cache": "hidden folder, not searched"}


def test_decompression_bomb_is_refused_from_its_header(labelled: Path, tmp_path: Path) -> None:
    """Bug caught: PIL's own guard raises only above twice the limit, so a 30000² PNG was decoded (5.2 GB RSS).

    The file's pixel data is truncated: a guard applied after decoding would report a decode error instead.
    """
    bomb = png_header_only(labelled / "fake" / "bomb.png", 30000, 30000)
    assert 30000 * 30000 > MAX_PIXELS and bomb.stat().st_size < 200
    with pytest.raises(ValueError, match="30000x30000 pixels exceed the limit .* not decoded"):
        decode_rgb(bomb.read_bytes())
    convert("folder", labelled, "train", tmp_path / "out", workers=1)
    rejected = {r["path"]: r["reason"] for r in read_csv(tmp_path / "out" / "rejected.csv")}
    assert "decompression-bomb guard" in rejected["fake/bomb.png"]


def test_float_and_int32_tiffs_are_scaled_or_refused(tmp_path: Path) -> None:
    """Bug caught: a float32 TIFF in 0..1 became all black and an int32 TIFF all white, both accepted as normal."""
    ramp = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    for name, array in (("float.tif", ramp), ("int32.tif", (ramp * 65535).astype(np.int32))):
        save(tmp_path / name, Image.fromarray(array))
        rgb = np.asarray(decode_rgb((tmp_path / name).read_bytes())[1])
        np.testing.assert_array_equal(rgb[..., 0], np.round(ramp * 255).astype(np.uint8))
    save(tmp_path / "float_wide.tif", Image.fromarray(ramp * 1000))
    with pytest.raises(ValueError, match="floating-point pixels span 0..1000, not 0..1"):
        decode_rgb((tmp_path / "float_wide.tif").read_bytes())
    save(tmp_path / "int32_wide.tif", Image.fromarray((ramp.astype(np.float64) * (2**31 - 1)).astype(np.int32)))
    with pytest.raises(ValueError, match="32-bit integer pixels span .* beyond 0..65535"):
        decode_rgb((tmp_path / "int32_wide.tif").read_bytes())


def test_file_deleted_after_discovery_is_rejected_not_fatal(labelled: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Bug caught: the file was read twice (decode check, then tar write); deleting it in between killed the
    run with a traceback, a leftover .tar.tmp and no manifest. The real `discover` runs, then the file goes."""
    discover = shards_module.discover

    def discover_then_delete(*args):
        found = discover(*args)
        (labelled / "fake" / "b.png").unlink()
        return found

    monkeypatch.setattr(shards_module, "discover", discover_then_delete)
    summary = convert("folder", labelled, "train", tmp_path / "out", workers=1)
    assert summary.num_samples == 1 and summary.num_rejected == 1
    assert read_csv(tmp_path / "out" / "rejected.csv")[0]["reason"].startswith("FileNotFoundError")
    assert not list((tmp_path / "out").glob("*.tmp"))


def forked_workers(pid: int) -> list[int]:
    """Children of `pid` that are forks of it (same command line): its pool workers, not helper programs. A helper
    program between its fork and its exec has the same command line for a moment (importing lightning runs
    `ldconfig -p` twice, one at a time): only a pool's full set of workers, alive together, tells them apart."""
    command = Path(f"/proc/{pid}/cmdline").read_bytes()
    found = []
    for entry in Path("/proc").iterdir():
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent == pid and (entry / "cmdline").read_bytes() == command:
                found.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


@pytest.mark.slow
def test_killed_decode_worker_is_an_error_naming_the_file(tmp_path: Path) -> None:
    """Bug caught: `shards --workers 2` with a worker killed (OOM killer, a crashing codec) waited forever.

    A pool worker of the real command is SIGKILLed as soon as the pool's 2 workers exist (not the transient fork
    of a helper program, whose kill the command rightly survives: that made this test flaky); the command must end
    by itself, non-zero, naming files it was reading, and leave no temp tar.
    """
    root = tmp_path / "root"
    image = Image.fromarray(noise(1, 96, 96))
    for index in range(300):
        save(root / "fake" / f"{index:03d}.png", image)
    process = subprocess.Popen([sys.executable, "-m", "cli", "shards", "--layout", "folder", "--root", str(root),
                                "--split", "train", "--out", str(tmp_path / "out"), "--workers", "2",
                                "--shard_size", "50"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, workers = time.monotonic() + 120, []
    while process.poll() is None and len(workers) < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
        workers = forked_workers(process.pid)
    assert len(workers) == 2, f"the pool's 2 workers never showed (exit {process.poll()}, found {workers})"
    os.kill(workers[0], signal.SIGKILL)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0
    message = stderr.strip().splitlines()[-1]
    assert "process died" in message and str(root / "fake") in message and "rerun with --overwrite true" in message
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_duplicates_within_and_across_splits_are_reported(labelled: Path, tmp_path: Path) -> None:
    """Bug caught: an image copied within a split or shared between train and test went unnoticed (inflated
    accuracy); the hash must be of the original bytes, so a re-encoded copy is not a duplicate."""
    (labelled / "fake" / "b_copy.png").write_bytes((labelled / "fake" / "b.png").read_bytes())
    save(labelled / "fake" / "b_reencoded.png", Image.open(labelled / "fake" / "b.png"), compress_level=1)
    test_root = tmp_path / "test_root"
    save(test_root / "real" / "same_as_a.jpg", Image.new("RGB", (8, 8)))
    (test_root / "real" / "same_as_a.jpg").write_bytes((labelled / "real" / "a.jpg").read_bytes())
    convert("folder", test_root, "val", tmp_path / "test_out", workers=1)
    result = run_cli(["shards", "--layout", "folder", "--root", str(labelled), "--split", "train", "--out",
                      str(tmp_path / "out"), "--workers", "1", "--check_against", str(tmp_path / "test_out")])
    assert result.returncode == 0, result.stderr
    assert f"1 exact duplicates within the split, 1 also in {tmp_path / 'test_out'}" in result.stdout
    assert read_csv(tmp_path / "out" / "duplicates.csv") == [
        {"sha256": read_manifest_rows(tmp_path / "out")[0]["sha256"], "path": "fake/b_copy.png",
         "duplicate_of": "fake/b.png", "duplicate_in": ""},
        {"sha256": read_manifest_rows(tmp_path / "test_out")[0]["sha256"], "path": "real/a.jpg",
         "duplicate_of": "real/same_as_a.jpg", "duplicate_in": str(tmp_path / "test_out")}]


class RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint carries."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# The feature provenance `fit` wrote into checkpoints before FeatureProvenance existed (a loose dict built in
# datamodules/cached_features.py: store part, and per feature {common, map, module}; `protocol_seed`, no spec).
OLD_CHECKPOINT_PROVENANCE = {
    "dataset": {"shards": "/data/train", "layout": "genimage", "split": "train", "manifest_sha256": "m0",
                "tars": [], "stats": {"real_jpeg_qualities": {}, "width": [64, 64], "height": [64, 64],
                                      "fake_side_ranges": []}},
    "pixels": {"resolution": 64, "protocol": "raw", "resize": "PIL bilinear", "jpeg_quality": None,
               "jpeg_quality_source": None, "protocol_seed": None, "size_filter": False,
               "perturbation": ["none", 0.0], "clip_input": "resize"},
    "features": {"deu": {"common": {"unet_hash": "aaaa", "timestep": 200, "seed": 0},
                         "map": {"posterior_sha256": "bbbb", "deu_mode": "closed_form"},
                         "module": "lightning_modules.maps.builtin"}},
}


def store_provenance(shards: str = "/data/train", split: str = "train", resolution: int = 64,
                     unet_hash: str = "aaaa", posterior_sha256: str = "bbbb"):
    """A test store's FeatureProvenance of `deu` as today's code reports it (with the stored form)."""
    from feature_cache.provenance import FeatureProvenance

    old = OLD_CHECKPOINT_PROVENANCE
    deu = old["features"]["deu"]
    return FeatureProvenance.from_attrs({
        "format": 3, "dataset": {**old["dataset"], "shards": shards, "split": split},
        "pixels": {**old["pixels"], "resolution": resolution},
        "features": {"deu": {"spec": {"shape": [4, 8, 8], "dtype": "float32", "codec": "zstd"},
                             "extractor": {"common": {**deu["common"], "unet_hash": unet_hash},
                                           "maps": {"deu": {**deu["map"], "posterior_sha256": posterior_sha256}},
                                           "modules": {"deu": deu["module"]}}}}})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real checkpoint of a fitted (one step) DEUA detector, as `fit` writes it, with a feature provenance."""
    import lightning.pytorch as pl
    from test_detectors import SyntheticDataModule, _detector

    path = tmp_path_factory.mktemp("ckpt") / "last.ckpt"
    detector = _detector("deua", ["deu"])
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, max_steps=1, limit_val_batches=1, num_sanity_val_steps=0,
                         default_root_dir=path.parent)
    trainer.fit(detector, datamodule=SyntheticDataModule(n_train=32, n_eval=32))
    detector.feature_provenance = OLD_CHECKPOINT_PROVENANCE  # as `fit` wrote it before FeatureProvenance
    trainer.save_checkpoint(path)
    return path


def predict_cli(ckpt: Path, data: Path, out: Path) -> CliResult:
    return run_cli(["predict", "--ckpt", str(ckpt), "--data", str(data), "--out", str(out), "--num_workers", "0"])


def test_checkpoint_records_its_class_path_and_loads_weights_only(checkpoint: Path) -> None:
    """Bug caught: the class was recorded by bare name (a hand-kept dict to resolve it) and loading ran pickle."""
    import torch

    from lightning_modules.checkpoints import load_detector
    from lightning_modules.detectors import DEUADetector

    recorded = torch.load(checkpoint, weights_only=True)["detector_class"]
    assert recorded == "lightning_modules.detectors.deua.DEUADetector"
    detector, provenance = load_detector(checkpoint)
    assert type(detector) is DEUADetector and not detector.training
    assert provenance.features["deu"].extractor.common["unet_hash"] == "aaaa"


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "malicious"])
def test_damaged_or_malicious_checkpoint_is_one_line(checkpoint: Path, tmp_path: Path, damage: str) -> None:
    """Bug caught: torch.load(weights_only=False) ran a checkpoint's pickled code, and damaged checkpoints gave
    tracebacks. Through the real `predict` command: exit non-zero, one line naming the file, no code run."""
    import torch

    bad, marker = tmp_path / f"{damage}.ckpt", tmp_path / "code_ran"
    data = checkpoint.read_bytes()
    if damage == "malicious":
        torch.save({**torch.load(checkpoint, weights_only=True), "hook": RunsCode(marker)}, bad)
    else:
        damaged = {"empty": b"", "truncated": data[: len(data) // 2], "garbage": b"\x80\x02 not a checkpoint " * 64}
        bad.write_bytes(damaged[damage])
    image = save(tmp_path / "x.png", Image.fromarray(noise(1, 16, 16)))
    result = predict_cli(bad, image, tmp_path / "p.csv")
    assert result.returncode != 0 and not marker.exists()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"python -m cli predict: checkpoint {bad}: "), result.stderr
    refused = "refused, it holds objects other than tensors"
    assert (refused if damage == "malicious" else "not a readable PyTorch file") in lines[0]


def test_predict_out_is_checked_before_any_work(checkpoint: Path, tmp_path: Path) -> None:
    """Bug caught: `--out` naming a directory failed only after every prediction was computed. A checkpoint
    that cannot even be loaded proves the check runs first: the message is about --out, not the model."""
    (tmp_path / "results").mkdir()
    result = predict_cli(tmp_path / "no_such.ckpt", tmp_path, tmp_path / "results")
    assert result.returncode != 0
    assert result.stderr.strip() == (f"python -m cli predict: --out {tmp_path / 'results'}: is a directory; give a "
                                     f"CSV file path such as {tmp_path / 'results' / 'predictions.csv'}  "
                                     "(CLI_TRACEBACK=1 for the traceback)")


def test_feature_provenance_mismatch_names_the_fields(checkpoint: Path) -> None:
    """Bug caught: a checkpoint trained on one UNet's/posterior's features was tested on a store made with
    others, rc=0. Per-dataset fields (shards, split) may differ; weight hashes and settings may not."""
    from core.checkpoint_io import safe_torch_load
    from feature_cache.provenance import FeatureProvenance
    from workflows.provenance_checks import check_feature_provenance

    trained = FeatureProvenance.from_attrs(safe_torch_load(checkpoint, "checkpoint")["feature_provenance"])
    same_settings = store_provenance(shards="/data/test", split="val")
    check_feature_provenance(trained, {"test.zarr": same_settings}, "last.ckpt")
    other = store_provenance(unet_hash="cccc", posterior_sha256="dddd")
    with pytest.raises(ValueError, match=r"feature store other.zarr was computed otherwise .*\(deu.common.unet_hash "
                                         r"aaaa != cccc; deu.map.posterior_sha256 bbbb != dddd\)"):
        check_feature_provenance(trained, {"test.zarr": same_settings, "other.zarr": other}, "last.ckpt")


def test_checkpoint_against_test_stores_reads_the_checkpoint(checkpoint: Path) -> None:
    """Bug caught: `test` scoring a store made with another posterior (rc=0, numbers printed); the guard
    `ForensicsTrainer.test` calls reads the real checkpoint's recorded provenance and refuses."""
    from workflows.provenance_checks import check_checkpoint_against_stores

    check_checkpoint_against_stores(checkpoint, {"test.zarr": store_provenance(shards="/data/test")})
    with pytest.raises(ValueError, match=r"test.zarr .*\(pixels.resolution 64 != 128\)"):
        check_checkpoint_against_stores(checkpoint, {"test.zarr": store_provenance(resolution=128)})


def test_generator_filter_drops_the_other_generators_skipped_files(tmp_path: Path) -> None:
    """Bug caught: with --generators, the skipped files of generators that were not asked for still filled
    rejected.csv (reasons for files the user excluded)."""
    for generator in ("glide", "sdv4"):
        save(tmp_path / "root" / generator / "train" / "ai" / "a.png", Image.fromarray(noise(1, 16, 16)))
        save(tmp_path / "root" / generator / "train" / "ai" / ".hidden.png", Image.fromarray(noise(2, 16, 16)))
    convert("genimage", tmp_path / "root", "train", tmp_path / "out", workers=1, generators=["sdv4"])
    assert read_csv(tmp_path / "out" / "rejected.csv") == [{"path": "sdv4/train/ai/.hidden.png",
                                                            "reason": "hidden file"}]
