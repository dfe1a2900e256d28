"""The guidance-map registry: a map is a named function of the fused pass's output.

A module registers its maps with `@register_map`; the extractor imports the modules named in its
`map_modules` and computes exactly the requested names, so a new map is one file plus one YAML line.
Store shapes, config validation, detectors' guidance, reports and `predict` take names and channel
counts from here instead of keeping their own lists.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from lightning_modules.maps.context import MapContext

MapFunction = Callable[["MapContext"], torch.Tensor]
# Imported everywhere the registry is (extractor, detectors, reports, predict), so phase 2 knows these names too.
BUILTIN_MAP_MODULES = ("lightning_modules.maps.builtin", "lightning_modules.maps.ensemble")


def latent_channels(channels: int) -> int:
    """Channel rule of a per-latent-channel map: as many channels as the VAE latent (4 for SD v1.5)."""
    return channels


@dataclass(frozen=True)
class MapSpec:
    """One registered map: how many channels it has, what it is, what it depends on, how to compute it."""

    name: str
    channels: Callable[[int], int]  # latent channel count → this map's channel count
    description: str
    settings: tuple[str, ...]  # extractor settings only this map depends on (its provenance entry)
    fn: MapFunction
    needs_posterior: bool = False  # computed from the conv_out Laplace posterior
    min_noises: int = 1  # the fewest diffusion noises N it is defined for
    check: Callable[[dict[str, Any]], None] | None = None  # refuses unusable settings (a damaged file) in one line


MAP_REGISTRY: dict[str, MapSpec] = {}


def register_map(name: str, channels: int | Callable[[int], int], description: str, settings: Iterable[str] = (),
                 needs_posterior: bool = False, min_noises: int = 1,
                 check: Callable[[dict[str, Any]], None] | None = None) -> Callable[[MapFunction], MapFunction]:
    """Decorator: register `fn(ctx) -> (B, C, h, w)` under `name` (a name may be registered once).

    `check(settings)` (optional) gets the map's `settings` when the extractor is built, before any store is
    created or grown: a file it reads that is damaged or made for other settings is refused there, not on the
    first batch (which would leave a group bound to that file)."""
    def decorate(fn: MapFunction) -> MapFunction:
        if name in MAP_REGISTRY and MAP_REGISTRY[name].fn is not fn:
            raise ValueError(f"map {name!r} is already registered by {MAP_REGISTRY[name].fn.__module__}")
        rule = channels if callable(channels) else (lambda _latent, fixed=int(channels): fixed)
        MAP_REGISTRY[name] = MapSpec(name, rule, description, tuple(settings), fn, needs_posterior, min_noises, check)
        return fn
    return decorate


def import_map_modules(modules: Iterable[str]) -> None:
    """Import the modules that register maps (the built-ins plus a user's); one line if one is missing."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as missing:
            raise ValueError(f"map_modules: cannot import {module!r} ({missing})") from missing


def available_maps() -> list[str]:
    """Names of the registered maps, sorted."""
    return sorted(MAP_REGISTRY)


def map_channels(name: str, latent: int = 4) -> int:
    """Channel count of map `name` for a VAE latent of `latent` channels (SD v1.5: 4)."""
    if name not in MAP_REGISTRY:
        raise KeyError(f"unknown guidance map {name!r}; registered maps: {available_maps()}")
    return MAP_REGISTRY[name].channels(latent)
