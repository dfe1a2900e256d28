"""Content hashes: the one definition of a file's sha256 (posteriors, members files, manifests, chunk files)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def bytes_sha256(data: bytes) -> str:
    """Hex sha256 of bytes in memory: an image's identity (its row key in stores, the key of its random draws)."""
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in chunks (hashlib releases the GIL on large updates)."""
    digest = hashlib.sha256()
    with Path(path).expanduser().open("rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()
