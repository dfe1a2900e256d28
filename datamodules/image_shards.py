"""ImageShardDataModule: `python -m cli shards` output as batches, each image exactly once over ranks × workers.

Exactly once (NOTES.md): every rank computes the same to-do list (shards.json minus excluded shards),
takes its part (balanced by sample count), and its workers split that list (`wds.split_by_worker`); a tar
goes to one worker of one rank. No sampler, no padding, no repeats; ranks or workers with no shard simply
yield nothing. Every row of a tar comes out: images a truncated or unreadable tar lost come out as error
rows (blank images, reason in `error`), so the run finishes and the rows are recorded as rejected.
Images are uint8 (pinned when CUDA is there) and normalised on the device; `sha256` of each image's
original bytes keys its noise. Batch format: docs/contracts.md.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from datamodules.image_io import describe_error
from datamodules.image_protocols import JPEG_PROTOCOLS, SIZE_PROTOCOLS, ClipInput, ImagePreprocessor, Protocol
from datamodules.shards import read_shard_index
from feature_cache.manifest import read_manifest_rows
from feature_cache.provenance import PixelProvenance, manifest_stats, real_jpeg_qualities
from feature_cache.store import FeatureStore

LOST = "lost: tar"  # how the error of a row its tar lost starts (`ShardDecoder.lost`, read by `lost_tars`)


def balance(shards: list[dict[str, Any]], parts: int) -> list[list[dict[str, Any]]]:
    """Split shards into `parts` lists of nearly equal sample counts (largest first to the lightest part).

    Deterministic, so every rank computes the same split without talking to the others.
    """
    order = sorted(range(len(shards)), key=lambda i: (-int(shards[i]["num_samples"]), i))
    loads, assigned = [0] * parts, [[] for _ in range(parts)]
    for i in order:
        part = min(range(parts), key=lambda p: (loads[p], p))
        loads[part] += int(shards[i]["num_samples"])
        assigned[part].append(i)
    return [[shards[i] for i in sorted(indices)] for indices in assigned]


def build_preprocessor(stats: Mapping[str, Any], resolution: int, protocol: Protocol = "raw",
                       jpeg_quality: int | None = None, seed: int = 0, size_filter: bool = False,
                       perturbation: tuple[str, float] = ("none", 0.0), clip_input: ClipInput = "resize",
                       clip_size: int = 224) -> ImagePreprocessor:
    """A protocol's image pipeline from a shard directory's statistics (`feature_cache.provenance.manifest_stats`,
    stored in every feature store), so phase 2 and `predict` rebuild it without manifest.csv.

    Anything else that shows these images to a model (e.g. fine-tuning from the feature cache) should get
    its pipeline from `preprocessor_from_provenance`, so phase 1 and phase 2 see the same pixels.
    """
    if size_filter and protocol not in SIZE_PROTOCOLS:
        raise ValueError(f"size_filter applies to the size protocols only, not protocol {protocol}")
    qualities = real_jpeg_qualities(stats) if protocol in JPEG_PROTOCOLS and jpeg_quality is None else ()
    ranges = None
    if size_filter:
        if not stats.get("fake_side_ranges"):
            raise ValueError("size_filter needs fake images (label 1) in the manifest to take their size range from")
        ranges = tuple((str(name), int(low), int(high)) for name, low, high in stats["fake_side_ranges"])
    return ImagePreprocessor(resolution, protocol, jpeg_quality, qualities, seed, ranges, tuple(perturbation),
                             clip_input, clip_size)


def pixel_settings(pixels: PixelProvenance) -> dict[str, Any]:
    """ImageShardDataModule's pixel arguments that reproduce a store's (or checkpoint's) pixels.

    A JPEG quality that an older version drew per manifest key (`quality_key`, see
    `feature_cache.provenance.upgrade_attrs`) cannot be reproduced: refused with what to do."""
    if pixels.quality_key not in (None, "sha256"):
        raise ValueError(f"pixel provenance: its JPEG qualities were drawn per {pixels.quality_key} by an older "
                         "version (inserting a file changed other images); this version draws per image sha256 and "
                         "cannot reproduce them: recompute the store with `python -m cli precompute`")
    return {"resolution": int(pixels.resolution), "protocol": pixels.protocol, "jpeg_quality": pixels.jpeg_quality,
            "seed": pixels.seed or 0, "size_filter": bool(pixels.size_filter),
            "perturbation": tuple(pixels.perturbation),
            "clip_input": pixels.clip_input, "clip_size": pixels.clip_size or 224}


def preprocessor_from_provenance(pixels: PixelProvenance, stats: Mapping[str, Any]) -> ImagePreprocessor:
    """The pipeline that a store's (or checkpoint's) pixel provenance and dataset statistics describe."""
    return build_preprocessor(stats, **pixel_settings(pixels))


def blank_image(resolution: int) -> torch.Tensor:
    """The uint8 image of a row that could not be read: all 127, ≈ 0 after normalisation (the old zero image)."""
    return torch.full((3, resolution, resolution), 127, dtype=torch.uint8)


@dataclass(frozen=True)
class SampleDecoder:
    """WebDataset sample (tar members) → one batch row; a failing image gives a blank image and its reason."""

    preprocess: ImagePreprocessor
    generator_codes: dict[str, int]
    shard_indices: dict[str, int]  # tar file name → index in shards.json

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        meta = json.loads(sample["json"])
        image_members = [name for name in sample if not name.startswith("__") and name != "json"]
        error, digest = "", ""
        try:
            if len(image_members) != 1:
                raise ValueError(f"expected one image member, found {sorted(image_members)}")
            data = sample[image_members[0]]
            digest = hashlib.sha256(data).hexdigest()
            prepared = self.preprocess.prepared(data, int(meta["label"]), meta["generator"])
            pixels = {"image": self.preprocess.resized(prepared), **self.preprocess.clip_pixels(prepared)}
        except Exception as failure:  # noqa: BLE001  recorded per image in `error`; one bad file never stops a worker
            pixels = {"image": blank_image(self.preprocess.resolution), **self.preprocess.blank_clip_pixels()}
            error = describe_error(failure)
        return {**pixels, "key": sample["__key__"], "sha256": digest or meta.get("sha256", ""),
                "row": int(meta["row"]), "label": int(meta["label"]),
                "generator": self.generator_codes[meta["generator"]],
                "shard_index": self.shard_indices[Path(sample["__url__"]).name], "error": error}

    def lost(self, record: dict[str, Any], shard_name: str, reason: str) -> dict[str, Any]:
        """The row of an image its tar lost (truncated or unreadable), from the manifest's record."""
        return {"image": blank_image(self.preprocess.resolution), **self.preprocess.blank_clip_pixels(),
                "key": record["key"],
                "sha256": record.get("sha256") or "", "row": int(record["row"]), "label": int(record["label"]),
                "generator": self.generator_codes[record["generator"]], "shard_index": self.shard_indices[shard_name],
                "error": f"{LOST} {shard_name} is truncated or unreadable ({reason})"}


def lost_tars(store: FeatureStore) -> list[str]:
    """Tars of the store's shard directory that lost rows to damage (truncated or unreadable) in any group: their
    rows are error rows (blank images), so a run that computed them must not report success."""
    errors = [store.errors(group) for group in store.groups]
    return [tar["name"] for tar in store.shard_table
            if any(str(error).startswith(LOST) for group_errors in errors
                   for error in group_errors[tar["first_row"]: tar["first_row"] + tar["num_samples"]])]


def collate_samples(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack images (and CLIP's native crops with their boxes) and integer fields; keep keys, content hashes (where
    the samples have them) and errors as lists."""
    batch: dict[str, Any] = {name: torch.stack([s[name] for s in samples])
                             for name in ("image", "clip_image", "clip_box") if name in samples[0]}
    for name in ("row", "label", "generator", "shard_index"):
        batch[name] = torch.tensor([s[name] for s in samples], dtype=torch.int64)
    for name in ("key", "sha256", "error"):
        if name in samples[0]:
            batch[name] = [s[name] for s in samples]
    return batch


def tar_aligned_batches(batch_size: int) -> Callable[[Iterable[dict[str, Any]]], Iterator[dict[str, Any]]]:
    """Batch a worker's samples so that no batch spans two tars.

    A tar is read whole and in order by one worker, so each batch is then rows [kB, (k+1)B) of one tar
    whatever the rank, worker count or set of tars already done. Identical batches give bit-identical
    features (float kernels are not batch-invariant to the last bit), which is what makes a resumed or
    multi-rank store equal to an uninterrupted single-process one.
    """
    def batches(samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        pending: list[dict[str, Any]] = []
        for sample in samples:
            if pending and (len(pending) == batch_size or sample["shard_index"] != pending[0]["shard_index"]):
                yield collate_samples(pending)
                pending = []
            pending.append(sample)
        if pending:
            yield collate_samples(pending)
    return batches


class TarRows(IterableDataset):
    """A rank's tars, split over its workers, read whole and in order, batched per tar.

    A tar that ends early or cannot be read stops only itself: the rows it did not deliver come out as
    `SampleDecoder.lost` rows (their metadata from the manifest), so every row of the tar is accounted for.
    """

    def __init__(self, shard_dir: Path, entries: list[dict[str, Any]], decoder: SampleDecoder,
                 batch_size: int) -> None:
        self.shard_dir, self.entries, self.decoder, self.batch_size = shard_dir, entries, decoder, batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        batches = tar_aligned_batches(self.batch_size)
        for entry in wds.split_by_worker(self.entries):
            yield from batches(self._rows(entry))

    def _rows(self, entry: dict[str, Any]) -> Iterator[dict[str, Any]]:
        first, count = int(entry["first_row"]), int(entry["num_samples"])
        seen: set[int] = set()
        reason = f"{count} rows expected"
        try:
            for sample in wds.WebDataset(str(self.shard_dir / entry["name"]), shardshuffle=False, nodesplitter=None,
                                         workersplitter=None, empty_check=False):
                row = self.decoder(sample)
                seen.add(row["row"])
                yield row
        except Exception as failure:  # noqa: BLE001  a damaged tar loses its remaining rows, not the run
            reason = describe_error(failure)
        missing = [r for r in range(first, first + count) if r not in seen]
        if missing:
            records = read_manifest_rows(self.shard_dir)
            for r in missing:
                yield self.decoder.lost(records[r], entry["name"], reason)


class ImageShardDataModule(pl.LightningDataModule):
    """Images of one shard directory for predict (phase 1, laplace-fit), under a read-time protocol.

    Args:
        shards: output directory of `python -m cli shards` (holds shards.json and the tars).
        resolution: images are resized to resolution × resolution (256 as LaRE²; 512 allowed).
        batch_size: images per batch (per rank).
        num_workers: DataLoader processes per rank; each reads whole tars.
        protocol: raw | jpeg_aligned | size_aligned | jpeg_size_aligned (see datamodules/image_protocols.py).
        jpeg_quality: fixed re-encoding quality for the jpeg protocols; None draws one per image from the
            real images' estimated qualities in the manifest.
        seed: seed of the per-image quality draw (combined with each image's key).
        size_filter: under the size protocols, exclude real images outside the fakes' size range
            (they come out as zero images with an `error`).
        perturbation: (name, parameter) applied to every decoded image first, for robustness sweeps
            (datamodules/perturbations.py: jpeg, downscale, blur); ("none", 0) leaves images as they are.
        clip_input: what CLIP sees: `resize` (the resized image) or `native_crop` (LaRE²'s centred `clip_size`²
            window at native resolution, added to batches as `clip_image` with its `clip_box`; see
            datamodules/image_protocols.py). Recorded in the store's pixel provenance.
        clip_size: side of the native crop (CLIP RN50's input, 224).
    """

    def __init__(self, shards: str, resolution: int = 256, batch_size: int = 16, num_workers: int = 2,
                 protocol: Protocol = "raw", jpeg_quality: int | None = None, seed: int = 0,
                 size_filter: bool = False, perturbation: tuple[str, float] = ("none", 0.0),
                 clip_input: ClipInput = "resize", clip_size: int = 224) -> None:
        super().__init__()
        self.save_hyperparameters()
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"batch_size {batch_size} must be >= 1 and num_workers {num_workers} >= 0")
        self.shard_dir = Path(shards)
        self._index = read_shard_index(self.shard_dir)
        self._excluded: set[str] = set()
        self.stats = manifest_stats(self.shard_dir)
        self.preprocess = build_preprocessor(self.stats, resolution, protocol, jpeg_quality, seed, size_filter,
                                             perturbation, clip_input, clip_size)

    @property
    def generator_names(self) -> list[str]:
        """Names of the generator codes in batches (index = code)."""
        return list(self._index["generators"])

    def shard_table(self) -> list[dict[str, Any]]:
        """The `shards` entries of shards.json: name, first_row, num_samples."""
        return [dict(entry) for entry in self._index["shards"]]

    def exclude_shards(self, names: Iterable[str]) -> None:
        """Skip these tars (already done in a resumed run); call before `predict_dataloader()`.

        Every rank must pass the same names (e.g. the store's done markers read before predict starts),
        since each rank derives its part from the same to-do list.
        """
        names = set(names)
        unknown = sorted(names - {entry["name"] for entry in self._index["shards"]})
        if unknown:
            raise ValueError(f"exclude_shards: {unknown} are not shards of {self.shard_dir}")
        self._excluded = names

    def row_metadata(self) -> dict[str, list]:
        """Per row: format, JPEG quality (-1: not JPEG), width, height as the protocol leaves them.

        Stored with the features so a format-only reference can show whether a split is confounded.
        """
        columns: dict[str, list] = {"format": [], "jpeg_quality": [], "width": [], "height": []}
        for row in read_manifest_rows(self.shard_dir):
            image_format, quality, width, height = self.preprocess.effective_metadata(
                row["sha256"], row["format"], row["jpeg_quality"], row["width"], row["height"])
            for name, value in zip(columns, (image_format, -1 if quality is None else quality, width, height)):
                columns[name].append(value)
        return columns

    def provenance(self) -> dict[str, Any]:
        """Shard directory and every read-time setting that changes pixels (goes into the feature store)."""
        return {"shards": str(self.shard_dir.resolve()), "layout": self._index["layout"],
                "split": self._index["split"], **self.preprocess.provenance()}

    def _rank_and_world(self) -> tuple[int, int]:
        """From the attached Trainer (never from env vars, which spawned workers may not see)."""
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def rank_shards(self, rank: int, world_size: int) -> list[dict[str, Any]]:
        """This rank's tars: the same to-do list on every rank, balanced by sample count."""
        todo = [entry for entry in self._index["shards"] if entry["name"] not in self._excluded]
        return balance(todo, world_size)[rank]

    def predict_batches(self) -> int:
        """Batches this rank's loader yields, known before any image is read (progress totals, ETA): batches
        never span two tars, so each tar gives ceil(rows / batch_size) of them."""
        size = self.hparams.batch_size
        return sum(-(-int(entry["num_samples"]) // size) for entry in self.rank_shards(*self._rank_and_world()))

    def predict_dataloader(self) -> DataLoader:
        """This rank's tars, split over its workers; each image exactly once over all ranks × workers."""
        rank, world = self._rank_and_world()
        todo = sum(entry["name"] not in self._excluded for entry in self._index["shards"])
        if rank == 0 and world > todo:
            print(f"warning: {world} ranks for {todo} tars to do in {self.shard_dir}: {world - todo} ranks get no "
                  f"tar and idle (a tar is read by one rank); --trainer.devices {max(todo, 1)} would use them all",
                  file=sys.stderr, flush=True)
        mine = self.rank_shards(rank, world)
        decoder = SampleDecoder(self.preprocess, {name: code for code, name in enumerate(self.generator_names)},
                                {entry["name"]: k for k, entry in enumerate(self._index["shards"])})
        dataset = TarRows(self.shard_dir, mine, decoder, self.hparams.batch_size)
        # Batching happens inside each worker (tar-aligned), so the DataLoader only forwards batches; pinned
        # uint8 images go to the device with non_blocking copies.
        return DataLoader(dataset, batch_size=None, num_workers=self.hparams.num_workers,
                          pin_memory=torch.cuda.is_available())
