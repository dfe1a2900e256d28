"""Features by name: `FEATURES` (every output and its kind), `MAP_REGISTRY` (the guidance maps), `feature_kind(name)`,
`available_maps()`, `map_channels(name)`; built-ins registered on import."""

from lightning_modules.maps.context import MapContext
from lightning_modules.maps.registry import (BUILTIN_MAP_MODULES, CLIP_OUTPUTS, FEATURES, MAP_REGISTRY, FeatureEntry,
                                             MapSpec, available_maps, feature_kind, feature_spec, import_map_modules,
                                             latent_channels, map_channels, register_feature, register_map)

import_map_modules(BUILTIN_MAP_MODULES)

__all__ = ["BUILTIN_MAP_MODULES", "CLIP_OUTPUTS", "FEATURES", "MAP_REGISTRY", "FeatureEntry", "MapContext", "MapSpec",
           "available_maps", "feature_kind", "feature_spec", "import_map_modules", "latent_channels", "map_channels",
           "register_feature", "register_map"]
