"""Read the shard converter's `manifest.csv` and `rejected.csv` (the per-row facts a store is made from)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Manifest:
    """Per-row metadata of a shard directory, indexed by global row (dense 0..n-1)."""

    keys: list[str]
    labels: list[int]
    generators: list[str]


def read_manifest_rows(shard_dir: str | Path) -> list[dict]:
    """Rows of `<shard_dir>/manifest.csv` sorted by `row`, with row/label/width/height as int and jpeg_quality
    as int or None; a gap or duplicate row is an error (no silent misalignment)."""
    path = Path(shard_dir) / "manifest.csv"
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path}: not found (write shards with `python -m cli shards`)")
    with path.open(newline="") as f:
        records = sorted(csv.DictReader(f), key=lambda r: int(r["row"]))
    for expected, record in enumerate(records):
        if int(record["row"]) != expected:
            raise ValueError(f"manifest {path}: rows are not dense 0..{len(records) - 1} "
                             f"(row {record['row']} where {expected} was expected)")
        for column in ("row", "label", "width", "height"):
            record[column] = int(record[column])
        record["jpeg_quality"] = int(record["jpeg_quality"]) if record["jpeg_quality"] else None
    return records


def read_manifest(shard_dir: str | Path) -> Manifest:
    """The columns a feature store is preallocated from."""
    records = read_manifest_rows(shard_dir)
    return Manifest(keys=[r["key"] for r in records], labels=[r["label"] for r in records],
                    generators=[r["generator"] for r in records])


def read_rejected(shard_dir: str | Path) -> list[dict[str, str]]:
    """The converter's rejects `{path, reason}` from `<shard_dir>/rejected.csv` (none if the file is absent)."""
    path = Path(shard_dir) / "rejected.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [{"path": r["path"], "reason": r["reason"]} for r in csv.DictReader(f)]
