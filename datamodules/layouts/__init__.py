"""Dataset layouts, registered by name like guidance maps: one file each, `shards --layout NAME` takes any of them.

Importing this package registers the built-ins (`genimage`, `drct`, `folder`); a user's layout module is imported
by naming it (`python -m cli shards --layout_modules my_layouts --layout mine ...`).
"""

from datamodules.layouts.registry import (LAYOUTS, LayoutSpec, LayoutWalk, ShardsInputError, SourceFile, Split,
                                          available_layouts, import_layout_modules, layout_named, register_layout,
                                          walk_files)
from datamodules.layouts import drct, folder, genimage  # noqa: F401,E402  (registers the built-in layouts)

__all__ = ["LAYOUTS", "LayoutSpec", "LayoutWalk", "ShardsInputError", "SourceFile", "Split", "available_layouts",
           "import_layout_modules", "layout_named", "register_layout", "walk_files"]
