"""Read the shard converter's `manifest.csv` and `rejected.csv` (the per-row facts a store is made from)."""

from __future__ import annotations

import csv
from pathlib import Path


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


def read_rejected(shard_dir: str | Path) -> list[dict[str, str]]:
    """The converter's rejects `{path, reason}` from `<shard_dir>/rejected.csv` (none if the file is absent)."""
    path = Path(shard_dir) / "rejected.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [{"path": r["path"], "reason": r["reason"]} for r in csv.DictReader(f)]


def store_rows(shard_dir: str | Path, generator_names: list[str],
               row_metadata: dict[str, list] | None = None) -> dict[str, list]:
    """A feature store's rows/ columns from the manifest: key, sha256, label, generator code, path (relative to the
    dataset root), and format, jpeg_quality (-1: not JPEG), width, height (from `row_metadata` when the read-time
    protocol changes them)."""
    path = Path(shard_dir) / "manifest.csv"
    records = read_manifest_rows(shard_dir)
    if records and not all(r.get("sha256") for r in records):
        raise ValueError(f"manifest {path}: no sha256 column (written by an older `python -m cli shards`); "
                         "re-convert the images, the content hash is each row's identity")
    code = {name: index for index, name in enumerate(generator_names)}
    unknown = sorted({r["generator"] for r in records} - code.keys())
    if unknown:
        raise ValueError(f"manifest {path}: generators {unknown} are not in the datamodule's generator_names "
                         f"{generator_names}")
    rows = {"key": [r["key"] for r in records], "sha256": [r["sha256"] for r in records],
            "label": [r["label"] for r in records], "generator": [code[r["generator"]] for r in records],
            "format": [r["format"] for r in records],
            "jpeg_quality": [-1 if r["jpeg_quality"] is None else r["jpeg_quality"] for r in records],
            "width": [r["width"] for r in records], "height": [r["height"] for r in records],
            "path": [r["path"] for r in records]}
    rows.update(row_metadata or {})
    return rows
