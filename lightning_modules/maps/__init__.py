"""Guidance maps by name: `MAP_REGISTRY`, `available_maps()`, `map_channels(name)`; built-ins registered on import."""

from lightning_modules.maps.context import MapContext
from lightning_modules.maps.registry import (BUILTIN_MAP_MODULES, MAP_REGISTRY, MapSpec, available_maps,
                                             import_map_modules, latent_channels, map_channels, register_map)

import_map_modules(BUILTIN_MAP_MODULES)

__all__ = ["BUILTIN_MAP_MODULES", "MAP_REGISTRY", "MapContext", "MapSpec", "available_maps", "import_map_modules",
           "latent_channels", "map_channels", "register_map"]
