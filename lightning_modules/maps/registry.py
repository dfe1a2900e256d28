"""The feature registry: every output phase 1 can store, with its kind; guidance maps are named functions of the
fused pass's output.

A module registers its maps with `@register_map`; the extractor imports the modules named in its
`map_modules` and computes exactly the requested names, so a new map is one file plus one YAML line. The CLIP
tower's outputs (`clip_layer3`, `clip_pooled`) are registered here too (`kind="clip"`), so `feature_kind(name)`
answers for every output and the writer, the store, separability and the detectors read the kind instead of
guessing it. Store shapes, config validation, detectors' guidance, reports and `predict` take names and channel
counts from here instead of keeping their own lists.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from core.registries import import_modules
from feature_cache.provenance import FEATURE_KINDS, FeatureKind, FeatureSpec

if TYPE_CHECKING:
    from lightning_modules.maps.context import MapContext

MapFunction = Callable[["MapContext"], torch.Tensor]
# Imported everywhere the registry is (extractor, detectors, reports, predict), so phase 2 knows these names too.
BUILTIN_MAP_MODULES = ("lightning_modules.maps.builtin", "lightning_modules.maps.ensemble")
CLIP_OUTPUTS = ("clip_layer3", "clip_pooled")  # computed by the extractor's CLIP tower, not from the pass
# Units of the variance-like maps (all maps are on the epsilon-prediction scale: eps is unit-variance noise).
EPS_SQUARED = "eps^2 (squared units of the unit-variance noise prediction)"


def latent_channels(channels: int) -> int:
    """Channel rule of a per-latent-channel map: as many channels as the VAE latent (4 for SD v1.5)."""
    return channels


@dataclass(frozen=True)
class FeatureEntry:
    """One output phase 1 can store: its kind (how the store keeps it and who reads it), what it is, its units."""

    name: str
    kind: FeatureKind
    description: str
    units: str


@dataclass(frozen=True)
class MapSpec(FeatureEntry):
    """One registered map: how many channels it has, what it depends on, how to compute it."""

    channels: Callable[[int], int]  # latent channel count → this map's channel count
    settings: tuple[str, ...]  # extractor settings only this map depends on (its provenance entry)
    fn: MapFunction
    needs_posterior: bool = False  # computed from the conv_out Laplace posterior
    min_noises: int = 1  # the fewest diffusion noises N it is defined for
    check: Callable[[dict[str, Any]], None] | None = None  # refuses unusable settings (a damaged file) in one line


FEATURES: dict[str, FeatureEntry] = {}  # every output by name: the maps and CLIP's
MAP_REGISTRY: dict[str, MapSpec] = {}  # the outputs computed from the fused pass


def _check_new(entry: FeatureEntry, same: Callable[[FeatureEntry], bool]) -> None:
    """A name is registered once (re-importing the same definition is fine); the kind must be a known one."""
    if entry.kind not in FEATURE_KINDS:
        raise ValueError(f"feature {entry.name!r}: kind {entry.kind!r} is not one of {list(FEATURE_KINDS)}")
    existing = FEATURES.get(entry.name)
    if existing is not None and not same(existing):
        owner = existing.fn.__module__ if isinstance(existing, MapSpec) else "the feature registry"
        raise ValueError(f"feature {entry.name!r} is already registered by {owner}")


def register_map(name: str, channels: int | Callable[[int], int], description: str, settings: Iterable[str] = (),
                 needs_posterior: bool = False, min_noises: int = 1, kind: FeatureKind = "guidance",
                 units: str = "", check: Callable[[dict[str, Any]], None] | None = None
                 ) -> Callable[[MapFunction], MapFunction]:
    """Decorator: register `fn(ctx) -> (B, C, h, w)` under `name` (a name may be registered once).

    `kind` is what the store and the readers make of the values (a guidance map by default: float32, read as
    guidance by detectors and scored by separability); `units` is written into the stored array's attributes.
    `check(settings)` (optional) gets the map's `settings` when the extractor is built, before any store is
    created or grown: a file it reads that is damaged or made for other settings is refused there, not on the
    first batch (which would leave a group bound to that file)."""
    def decorate(fn: MapFunction) -> MapFunction:
        rule = channels if callable(channels) else (lambda _latent, fixed=int(channels): fixed)
        spec = MapSpec(name=name, kind=kind, description=description, units=units, channels=rule,
                       settings=tuple(settings), fn=fn, needs_posterior=needs_posterior, min_noises=min_noises, check=check)
        _check_new(spec, lambda existing: isinstance(existing, MapSpec) and existing.fn is fn)
        FEATURES[name] = MAP_REGISTRY[name] = spec
        return fn
    return decorate


def register_feature(name: str, kind: FeatureKind, description: str, units: str = "") -> None:
    """Register an output computed outside the pass (the CLIP tower's): its kind and meaning only."""
    entry = FeatureEntry(name, kind, description, units)
    _check_new(entry, lambda existing: existing == entry)
    FEATURES[name] = entry


register_feature("clip_layer3", "clip", "CLIP RN50 layer3 feature map of the image (frozen tower)",
                 units="activation (unitless)")
register_feature("clip_pooled", "clip", "CLIP RN50 attention-pooled image embedding (frozen tower)",
                 units="activation (unitless)")


def import_map_modules(modules: Iterable[str]) -> None:
    """Import the modules that register maps (the built-ins plus a user's); one line if one is missing."""
    import_modules(modules, "map_modules")


def available_maps() -> list[str]:
    """Names of the registered maps, sorted."""
    return sorted(MAP_REGISTRY)


def feature_kind(name: str) -> FeatureKind:
    """The kind of output `name` as registered (guidance, clip, metadata); one line naming the known ones."""
    if name not in FEATURES:
        raise KeyError(f"unknown feature {name!r}; registered: {sorted(FEATURES)} (a map registered by a module "
                       "not imported here is unknown: name the module in map_modules)")
    return FEATURES[name].kind


def feature_spec(name: str, shape: tuple[int, ...], storage: Mapping[str, tuple[str, str]]) -> FeatureSpec:
    """How output `name` is stored: its registered kind, units and description, and the (dtype, codec) that
    `storage` (the writer's settings) gives that kind."""
    kind = feature_kind(name)
    entry = FEATURES[name]
    if kind not in storage:
        raise ValueError(f"feature {name!r} is of kind {kind!r}, which the writer has no stored form for "
                         f"(it stores {sorted(storage)})")
    dtype, codec = storage[kind]
    return FeatureSpec(tuple(shape), dtype, codec, kind, entry.units, entry.description)


def map_channels(name: str, latent: int = 4) -> int:
    """Channel count of guidance map `name` for a VAE latent of `latent` channels (SD v1.5: 4)."""
    if name in FEATURES and FEATURES[name].kind != "guidance":
        raise KeyError(f"{name!r} is a {FEATURES[name].kind} feature, not a guidance map")
    if name not in MAP_REGISTRY:
        raise KeyError(f"unknown guidance map {name!r}; registered maps: {available_maps()}")
    return MAP_REGISTRY[name].channels(latent)
