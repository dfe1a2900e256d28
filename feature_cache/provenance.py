"""Typed provenance of a feature store: the only place it is encoded to or decoded from Zarr attrs.

A store's provenance is `StoreProvenance` = {dataset, pixels} (what the rows are and how their pixels
were made), and each feature group adds its `ExtractorProvenance` = {common, maps} (how the values were
computed). A feature's full provenance is the store's plus its group's. Mismatches are reported as dotted
field names (`common.batch_size 3 != 4`), so a refusal names exactly what differs.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from core.hashing import file_sha256
from feature_cache.manifest import read_manifest_rows

# What a stored array is: a guidance map (float32, what detectors are guided by and separability scores), a CLIP
# feature (reduced precision, what a frozen backbone reads) or per-row metadata (rows/, error, flags). Declared
# once per output by the map registry (lightning_modules/maps/registry.py) and recorded on each `FeatureSpec`.
FeatureKind = Literal["guidance", "clip", "metadata"]
FEATURE_KINDS: tuple[str, ...] = get_args(FeatureKind)
# Stores written before kinds were recorded held exactly these CLIP outputs; every other feature was a guidance map.
_CLIP_BEFORE_KINDS = ("clip_layer3", "clip_pooled")

DATASET_KEYS = ("shards", "layout", "split")  # keys of a datamodule's provenance that describe the data, not pixels


def normalized(value: Any) -> Any:
    """The value as it reads back from JSON attrs (tuples become lists), so comparisons are fair."""
    return json.loads(json.dumps(value))


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys, so a mismatch names the exact leaf field."""
    if isinstance(value, dict) and value:
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: value}


def config_differences(stored: Mapping[str, Any], requested: Mapping[str, Any]) -> list[str]:
    """Every differing field as `name stored != requested` (`<missing>` where one side lacks it)."""
    left, right = _flatten(normalized(dict(stored))), _flatten(normalized(dict(requested)))
    missing = "<missing>"
    return [f"{name} {left.get(name, missing)} != {right.get(name, missing)}"
            for name in sorted(left.keys() | right.keys()) if left.get(name, missing) != right.get(name, missing)]


@dataclass(frozen=True)
class DatasetProvenance:
    """Which shard directory the rows come from, bound to its exact files (a re-conversion is refused)."""

    shards: str
    layout: str
    split: str
    manifest_sha256: str
    tars: list[dict[str, Any]]  # {name, first_row, num_samples, bytes, mtime_ns}
    stats: dict[str, Any]  # {real_jpeg_qualities: {quality: count}, width: [min, max], height: [min, max]}

    @classmethod
    def from_shard_dir(cls, shard_dir: str | Path, layout: str, split: str,
                       shard_table: list[Mapping[str, Any]]) -> DatasetProvenance:
        """Hash manifest.csv and stat every tar; a missing tar or manifest is one clear error."""
        shard_dir = Path(shard_dir).resolve()
        manifest = shard_dir / "manifest.csv"
        if not manifest.is_file():
            raise FileNotFoundError(f"manifest {manifest}: not found (write shards with `python -m cli shards`)")
        missing = [entry["name"] for entry in shard_table if not (shard_dir / entry["name"]).is_file()]
        if missing:
            raise FileNotFoundError(f"shard directory {shard_dir}: tars {', '.join(missing)} are missing "
                                    "(re-run `python -m cli shards` or restore them)")
        tars = []
        for entry in shard_table:
            status = (shard_dir / entry["name"]).stat()
            tars.append({"name": entry["name"], "first_row": int(entry["first_row"]),
                         "num_samples": int(entry["num_samples"]), "bytes": status.st_size,
                         "mtime_ns": status.st_mtime_ns})
        return cls(str(shard_dir), layout, split, file_sha256(manifest), tars, manifest_stats(shard_dir))

    def to_attrs(self) -> dict[str, Any]:
        return normalized(asdict(self))

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> DatasetProvenance:
        return cls(**{k: attrs[k] for k in ("shards", "layout", "split", "manifest_sha256", "tars", "stats")})

    def changed_tars(self, current: DatasetProvenance) -> list[str]:
        """Tars whose size or mtime differ (or that appear on one side only): the data was re-converted."""
        mine = {t["name"]: (t["bytes"], t["mtime_ns"], t["first_row"], t["num_samples"]) for t in self.tars}
        theirs = {t["name"]: (t["bytes"], t["mtime_ns"], t["first_row"], t["num_samples"]) for t in current.tars}
        return sorted(name for name in mine.keys() | theirs.keys() if mine.get(name) != theirs.get(name))

    def binding_problem(self, current: DatasetProvenance) -> str | None:
        """Why `current` (the shard directory now) is not the data this store was made from, or None."""
        changed = self.changed_tars(current)
        if self.manifest_sha256 == current.manifest_sha256 and not changed:
            return None
        parts = []
        if self.manifest_sha256 != current.manifest_sha256:
            parts.append("manifest.csv changed")
        if changed:
            shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
            parts.append(f"tars changed (size or mtime): {shown}")
        return "; ".join(parts)


def manifest_stats(shard_dir: str | Path) -> dict[str, Any]:
    """What the pixel protocols need from a shard directory's manifest, stored so manifest.csv need not exist
    later: the real JPEGs' qualities {quality: count} (drawn from in key order, see `real_jpeg_qualities`), the
    width/height ranges, and the shorter side's [generator, min, max] of the fakes per generator plus
    ["", min, max] over all fakes (the size filter's ranges)."""
    records = read_manifest_rows(shard_dir)
    qualities = Counter(r["jpeg_quality"] for r in records if r["label"] == 0 and r["jpeg_quality"])
    widths, heights = [r["width"] for r in records], [r["height"] for r in records]
    sides: dict[str, list[int]] = {}
    for r in records:
        if r["label"] == 1:
            side = min(r["width"], r["height"])
            sides.setdefault(r["generator"], []).append(side)
            sides.setdefault("", []).append(side)
    return {"real_jpeg_qualities": {str(q): n for q, n in sorted(qualities.items())},
            "width": [min(widths), max(widths)] if widths else None,
            "height": [min(heights), max(heights)] if heights else None,
            "fake_side_ranges": [[name, min(values), max(values)] for name, values in sorted(sides.items())]}


def real_jpeg_qualities(stats: Mapping[str, Any]) -> tuple[int, ...]:
    """The real images' JPEG qualities as the sorted multiset the per-image draw chooses from (phases 1 and 2 alike)."""
    return tuple(int(q) for q, n in sorted(stats["real_jpeg_qualities"].items(), key=lambda item: int(item[0]))
                 for _ in range(int(n)))


@dataclass(frozen=True)
class PixelProvenance:
    """Everything that changes the pixels a model saw (read-time protocol and resize)."""

    resolution: int
    protocol: str = "raw"
    jpeg_quality: int | None = None
    seed: int | None = None  # of the per-image JPEG quality draw; None where no quality is drawn
    quality_key: str | None = None  # what keys that draw: "sha256" (of the image's bytes); None: no draw
    size_filter: bool = False
    perturbation: list[Any] = field(default_factory=lambda: ["none", 0.0])
    clip_input: str = "resize"  # how CLIP sees the image: "resize" or "native_crop"
    clip_size: int | None = None  # side of the native crop; None (and absent from the attrs) under resize
    extra: dict[str, Any] = field(default_factory=dict)  # any further pixel setting the datamodule reports

    @classmethod
    def from_datamodule(cls, provenance: Mapping[str, Any]) -> PixelProvenance:
        """From `ImageShardDataModule.provenance()` (its data keys shards/layout/split are dropped)."""
        pixel = {k: v for k, v in provenance.items() if k not in DATASET_KEYS}
        return cls.from_attrs(pixel)

    def to_attrs(self) -> dict[str, Any]:
        """Flat attrs; `clip_size` only where it means something, so provenance recorded before it existed (every
        store and checkpoint made with `resize`) compares equal."""
        attrs = asdict(self)
        skipped = ("extra",) + (("clip_size",) if self.clip_size is None else ())
        return normalized({**{k: v for k, v in attrs.items() if k not in skipped}, **attrs["extra"]})

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> PixelProvenance:
        known = {name for name in cls.__dataclass_fields__ if name != "extra"}
        if "resolution" not in attrs:
            raise ValueError(f"pixel provenance {dict(attrs)} lacks resolution")
        return cls(**{k: v for k, v in attrs.items() if k in known},
                   extra={k: v for k, v in attrs.items() if k not in known})


@dataclass(frozen=True)
class StoreProvenance:
    """What every feature of a store shares: the rows (dataset) and the pixels they were computed from."""

    dataset: DatasetProvenance
    pixels: PixelProvenance

    def to_attrs(self) -> dict[str, Any]:
        return {"dataset": self.dataset.to_attrs(), "pixels": self.pixels.to_attrs()}

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> StoreProvenance:
        return cls(DatasetProvenance.from_attrs(attrs["dataset"]), PixelProvenance.from_attrs(attrs["pixels"]))


@dataclass(frozen=True)
class ExtractorProvenance:
    """How a group's features were computed: settings every map shares, and each map's own settings.

    `common` holds the extractor class, weights and their hashes, seed, timestep, noises, prompt, latent,
    autocast dtype, trainer precision, batch size, CPU threads and output scale; `maps[name]` only what that
    output depends on (e.g. deu_mode, num_weight_samples, posterior_sha256). `modules[name]` is the module that
    registers map `name`: phase 2 and `predict` import it, so a user's map file needs no other mention (not
    compared: moving a map's code changes no value).
    """

    common: dict[str, Any]
    maps: dict[str, dict[str, Any]]
    modules: dict[str, str] = field(default_factory=dict)

    def to_attrs(self) -> dict[str, Any]:
        return normalized({"common": self.common, "maps": self.maps, "modules": self.modules})

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> ExtractorProvenance:
        return cls(dict(attrs["common"]), {k: dict(v) for k, v in attrs["maps"].items()},
                   dict(attrs.get("modules", {})))

    def restricted(self, names: list[str]) -> ExtractorProvenance:
        """The same settings for a subset of the outputs."""
        missing = [n for n in names if n not in self.maps]
        if missing:
            raise KeyError(f"extractor provenance has no settings for outputs {missing}")
        return ExtractorProvenance(dict(self.common), {n: dict(self.maps[n]) for n in names},
                                   {n: m for n, m in self.modules.items() if n in names})

    def differences(self, requested: ExtractorProvenance, names: list[str]) -> list[str]:
        """Differing fields on the common settings and on `names`' own settings (dotted, both values)."""
        return config_differences({"common": self.common, "maps": {n: self.maps.get(n, {}) for n in names}},
                                  {"common": requested.common, "maps": {n: requested.maps.get(n, {}) for n in names}})


@dataclass(frozen=True)
class FeatureSpec:
    """What one feature is and how it is stored: per-row shape, stored dtype name (see `codecs`), codec, and its
    kind as the map registry declares it. `units` and `description` (also the registry's) are written into the
    array's attributes for readers without this code; they are not compared (rewording changes no value), and
    neither is the codec (lossless: a store written with zstd guidance maps, the default before issue 31, is
    resumed, grown, mixed and tested against like one written without a codec; each array keeps its own)."""

    shape: tuple[int, ...]
    dtype: str
    codec: str = field(compare=False)
    kind: FeatureKind
    units: str = field(default="", compare=False)
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.kind not in FEATURE_KINDS:
            raise ValueError(f"feature kind {self.kind!r} is not one of {list(FEATURE_KINDS)}")

    def to_attrs(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype, "codec": self.codec, "kind": self.kind,
                "units": self.units, "description": self.description}

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any], name: str = "") -> FeatureSpec:
        """From group attrs; a spec recorded before kinds were (no `kind`) is upgraded from its feature `name`."""
        kind = attrs.get("kind") or ("clip" if name in _CLIP_BEFORE_KINDS else "guidance")
        return cls(tuple(int(d) for d in attrs["shape"]), attrs["dtype"], attrs["codec"], kind,
                   attrs.get("units", ""), attrs.get("description", ""))


@dataclass(frozen=True)
class GroupInfo:
    """One feature group: the features computed together by one `precompute` run, and how."""

    features: dict[str, FeatureSpec]
    extractor: ExtractorProvenance

    def to_attrs(self) -> dict[str, Any]:
        return {"features": {k: v.to_attrs() for k, v in self.features.items()},
                "extractor": self.extractor.to_attrs()}

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> GroupInfo:
        return cls({k: FeatureSpec.from_attrs(v, k) for k, v in attrs["features"].items()},
                   ExtractorProvenance.from_attrs(attrs["extractor"]))


@dataclass(frozen=True)
class UsedFeature:
    """One feature a detector reads: how its store holds it (None in checkpoints from before the spec was
    recorded) and its group's extractor provenance restricted to it."""

    spec: FeatureSpec | None
    extractor: ExtractorProvenance

    def to_attrs(self) -> dict[str, Any]:
        return {"spec": None if self.spec is None else self.spec.to_attrs(), "extractor": self.extractor.to_attrs()}

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> UsedFeature:
        spec = attrs.get("spec")
        return cls(None if spec is None else FeatureSpec.from_attrs(spec),
                   ExtractorProvenance.from_attrs(attrs["extractor"]))


FEATURE_PROVENANCE_FORMAT = 3  # 2: the loose checkpoint dict {dataset, pixels, features: {name: {common, map, module}}}


@dataclass(frozen=True)
class FeatureProvenance:
    """What a checkpoint records about its inputs: the store part (rows and pixels) and, per feature it reads, the
    stored form and the extractor settings. `predict`, `robustness` and the on-the-fly detector rebuild the
    extractor from it (`FeatureExtractor.from_provenance`); `test` compares it with each test store's."""

    store: StoreProvenance
    features: dict[str, UsedFeature]

    @classmethod
    def of_store(cls, store: StoreProvenance, groups: Mapping[str, GroupInfo], names: list[str]) -> FeatureProvenance:
        """The provenance of features `names` of a store (its `provenance` and `groups`)."""
        used = {}
        for name in names:
            group = next((g for g in groups.values() if name in g.features), None)
            if group is None:
                raise KeyError(f"feature provenance: no group holds feature {name!r}")
            used[name] = UsedFeature(group.features[name], group.extractor.restricted([name]))
        return cls(store, used)

    def extractor(self) -> ExtractorProvenance:
        """The one extractor every feature came from: the shared settings, each feature's own, their modules.
        Features whose shared settings differ (two extractors) are refused, naming the fields."""
        first_name, first = next(iter(self.features.items()))
        maps: dict[str, dict[str, Any]] = {}
        modules: dict[str, str] = {}
        for name, used in self.features.items():
            differences = config_differences(first.extractor.common, used.extractor.common)
            if differences:
                raise ValueError(f"feature provenance: {first_name} and {name} come from different extractors "
                                 f"({'; '.join(differences)})")
            maps[name] = used.extractor.maps[name]
            modules.update(used.extractor.modules)
        return ExtractorProvenance(dict(first.extractor.common), maps, modules)

    def map_modules(self) -> list[str]:
        """The modules that register the features' maps (a user's map file included), each once."""
        return list(dict.fromkeys(m for used in self.features.values() for m in used.extractor.modules.values()))

    def differences(self, other: FeatureProvenance) -> list[str]:
        """Every field that changes feature values and differs (`name mine != other`, dotted): the pixels, and for each
        of my features its extractor settings (not the module that registers it) and stored form where both record
        it. Which images a store holds (`dataset`) may differ."""
        def values(prov: FeatureProvenance, name: str, with_spec: bool) -> dict[str, Any]:
            used = prov.features.get(name)
            if used is None:
                return {}
            settings = {"common": used.extractor.common, "map": used.extractor.maps.get(name, {})}
            if not (with_spec and used.spec is not None):
                return settings
            return {**settings, "spec": {k: v for k, v in used.spec.to_attrs().items() if k != "codec"}}  # lossless

        mine, theirs = {"pixels": self.store.pixels.to_attrs()}, {"pixels": other.store.pixels.to_attrs()}
        for name, used in self.features.items():
            with_spec = used.spec is not None and name in other.features and other.features[name].spec is not None
            mine[name], theirs[name] = values(self, name, with_spec), values(other, name, with_spec)
        return config_differences(mine, theirs)

    def to_attrs(self) -> dict[str, Any]:
        return normalized({"format": FEATURE_PROVENANCE_FORMAT, **self.store.to_attrs(),
                           "features": {name: used.to_attrs() for name, used in self.features.items()}})

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> FeatureProvenance:
        """From what a checkpoint holds, in any format `upgrade_attrs` reads."""
        attrs = upgrade_attrs(attrs)
        return cls(StoreProvenance.from_attrs(attrs),
                   {name: UsedFeature.from_attrs(used) for name, used in attrs["features"].items()})


def upgrade_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Provenance attrs an older version wrote, in today's shape: the one place old layouts are read.

    Reads a store's root attrs (`feature_store`, `provenance`, `groups`) and a checkpoint's feature provenance
    (format 2: `{dataset, pixels, features: {name: {common, map, module}}}`, the loose dict checkpoints held before
    `FeatureProvenance`; format 3: today's). Pixel settings: `protocol_seed` became `seed`, and a quality drawn
    by an older version was keyed by the manifest key (`quality_key: "manifest key"`, which this version cannot
    reproduce; `datamodules.image_shards.preprocessor_from_provenance` refuses it). Provenance from before feature
    store format 2 (flat settings) cannot be upgraded: its noise was keyed by row number.
    """
    attrs = dict(attrs)
    if "feature_store" in attrs:  # a store's root attrs
        provenance = attrs["provenance"]
        return {**attrs, "provenance": {**provenance, "pixels": _upgrade_pixels(provenance["pixels"])}}
    if "pixels" not in attrs or not isinstance(attrs.get("features"), Mapping):
        raise ValueError("feature provenance without pixels/features sections was written before feature store "
                         "format 2 (noise keyed by row number) and cannot be upgraded: retrain the detector on a "
                         "format-2 store")
    upgraded = {**attrs, "pixels": _upgrade_pixels(attrs["pixels"]), "format": FEATURE_PROVENANCE_FORMAT}
    if attrs.get("format") is None:  # format 2: {name: {common, map, module}}, no stored form
        upgraded["features"] = {
            name: {"spec": None, "extractor": {"common": part["common"], "maps": {name: part["map"]},
                                               "modules": {name: part["module"]} if "module" in part else {}}}
            for name, part in attrs["features"].items()}
    elif attrs["format"] != FEATURE_PROVENANCE_FORMAT:
        raise ValueError(f"feature provenance format {attrs['format']!r}: this version reads formats 2 and "
                         f"{FEATURE_PROVENANCE_FORMAT}")
    return upgraded


def _upgrade_pixels(pixels: Mapping[str, Any]) -> dict[str, Any]:
    """Pixel attrs with `protocol_seed` (before format 3) renamed to `seed` and its draw's key made explicit."""
    pixels = dict(pixels)
    if "protocol_seed" in pixels:
        seed = pixels.pop("protocol_seed")
        pixels.update(seed=seed, quality_key=None if seed is None else "manifest key")
    return pixels
