"""`python -m cli verify STORE`: what a store's own records say about it, in lines a user can act on."""

from __future__ import annotations

from pathlib import Path

from feature_cache.store import FeatureStore


def verify_store(store: Path, checksums: bool) -> None:
    """Print the store's summary and either one line saying no damage was found or, on damage or unfinished
    groups, each damaged file and then exit non-zero with one line naming the repair (rerun precompute)."""
    opened = FeatureStore.open(store)
    print(opened.summary())
    damage = opened.verify(checksums)
    if damage:
        print("\n".join(f"damaged: {d}" for d in damage))
        tars = sorted({d.tar or "all tars" for d in damage})
        raise SystemExit(f"python -m cli verify: {store}: {len(damage)} damaged files in {', '.join(tars)}; "
                         "rerun the same precompute command to recompute them")
    unfinished = {group: len(opened.shard_table) - len(opened.done_tars(group)) for group in opened.incomplete_groups()}
    if unfinished:
        raise SystemExit(f"python -m cli verify: {store}: group(s) not computed in full: "
                         + ", ".join(f"{g} ({n} of {len(opened.shard_table)} tars without a done marker)"
                                     for g, n in unfinished.items())
                         + "; finish them with the same precompute command")
    digest = "crc32c" if opened.format >= 3 else "sha256"
    print(f"verify: {store}: no damage found ({f'sizes and {digest} checksums' if checksums else 'presence and sizes'})")
