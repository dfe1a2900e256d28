"""What the name registries share (maps, dataset layouts): importing the user modules that fill them."""

from __future__ import annotations

import importlib
from collections.abc import Iterable


def import_modules(modules: Iterable[str], option: str, error: type[ValueError] = ValueError) -> None:
    """Import each module (its import registers its entries); a missing one is one line naming `option`."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as missing:
            raise error(f"{option}: cannot import {module!r} ({missing})") from missing
