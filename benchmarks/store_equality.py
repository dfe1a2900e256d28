"""`python benchmarks/store_equality.py OLD_STORE NEW_STORE`: are two feature stores the same, array by array?

Shows that a change of code left the stores it builds bit-for-bit unchanged (issue 27: the demo's stores
before and after a refactor). Both stores are read with plain zarr, not the framework, so stores of two
versions of the code compare alike. Every array (each group's features, scales, errors, flags, and rows/)
is compared on dtype, shape and values (bitwise: NaN equals NaN at the same place), block by block along
the sample axis so a large store never has to fit in memory. Prints one line per array (`equal`, or
`differs` with the max abs diff, or `only in OLD/NEW`) and exits 1 if any array differs.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import zarr

BLOCK_BYTES = 256 << 20  # read at most about this much of one array at a time


def arrays(group: zarr.Group, prefix: str = "") -> Iterator[tuple[str, zarr.Array]]:
    """(path, array) of every array under `group`, groups in name order."""
    for name, member in sorted(group.members(), key=lambda item: item[0]):
        if isinstance(member, zarr.Group):
            yield from arrays(member, f"{prefix}{name}/")
        else:
            yield f"{prefix}{name}", member


def compare(old: zarr.Array, new: zarr.Array) -> tuple[bool, str]:
    """(equal, what differs) of two arrays: dtype, shape, then values block by block."""
    if old.dtype != new.dtype:
        return False, f"dtype {old.dtype} != {new.dtype}"
    if old.shape != new.shape:
        return False, f"shape {old.shape} != {new.shape}"
    if not old.shape or old.shape[0] == 0:
        return (bool(np.array_equal(old[...], new[...])), "values differ")
    row_bytes = max(1, old.dtype.itemsize * int(np.prod(old.shape[1:], dtype=np.int64)))
    block = max(1, BLOCK_BYTES // row_bytes)
    numeric = old.dtype.kind in "biuf"
    differing, max_diff = 0, 0.0
    for start in range(0, old.shape[0], block):
        a, b = old[start:start + block], new[start:start + block]
        if numeric:
            same = (a == b) | (np.isnan(a) & np.isnan(b)) if a.dtype.kind == "f" else a == b
            differing += int((~same).sum())
            if not same.all():
                gap = np.abs(a.astype(np.float64) - b.astype(np.float64))
                max_diff = max(max_diff, float(np.nanmax(np.where(same, 0.0, gap))))
        else:  # strings (numpy StringDType) and anything else: element by element
            differing += sum(x != y for x, y in zip(np.asarray(a).ravel().tolist(), np.asarray(b).ravel().tolist()))
    if differing:
        return False, f"{differing} values differ" + (f", max abs diff {max_diff:.3g}" if numeric else "")
    return True, ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", type=Path, help="the store built before the change")
    parser.add_argument("new", type=Path, help="the store built after it")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="Object at .* is not recognized")  # done markers, lock, configs
    for path in (args.old, args.new):
        if not (path / "zarr.json").is_file():
            parser.error(f"{path}: not a Zarr v3 store (no zarr.json)")
    old, new = (dict(arrays(zarr.open_group(str(p), mode="r"))) for p in (args.old, args.new))
    differs = 0
    for name in sorted(old.keys() | new.keys()):
        if name not in new or name not in old:
            print(f"{name}: only in {'OLD' if name in old else 'NEW'}")
            differs += 1
            continue
        equal, what = compare(old[name], new[name])
        shown = f"{old[name].dtype} {old[name].shape}"
        print(f"{name}: equal ({shown})" if equal else f"{name}: differs ({what})")
        differs += not equal
    print(f"{len(old.keys() | new.keys())} arrays, {differs} differ")
    return 1 if differs else 0


if __name__ == "__main__":
    sys.exit(main())
