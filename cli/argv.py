"""Shell-style options for the plain commands: `--extra a.yaml b.yaml`, `--seeds 0 1 2`, a bare `--overwrite`.

jsonargparse wants `--extra+ a.yaml --extra+ b.yaml` (or `--extra '[a.yaml, b.yaml]'`) for a list and
`--overwrite true` for a bool; researchers type what every other tool accepts. The command's signature
says which options are lists and which are flags, so the rewrite is exact, not a guess.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable


def _kinds(annotation: object) -> set[type]:
    """The outer types an annotation allows (`list[int] | None` → {list, NoneType})."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return {kind for arg in typing.get_args(annotation) for kind in _kinds(arg)}
    return {origin or annotation} if isinstance(origin or annotation, type) else set()


def option_kinds(function: Callable) -> tuple[set[str], set[str]]:
    """(list options, bool options) of a command function, as `--name` strings."""
    hints = typing.get_type_hints(function)
    lists, flags = set(), set()
    for name in inspect.signature(function).parameters:
        kinds = _kinds(hints.get(name))
        if list in kinds:
            lists.add(f"--{name}")
        elif kinds == {bool}:
            flags.add(f"--{name}")
    return lists, flags


def shell_style(function: Callable, argv: list[str]) -> list[str]:
    """Rewrite list options given as several words and bare bool flags into jsonargparse's spelling."""
    lists, flags = option_kinds(function)
    out: list[str] = []
    k = 0
    while k < len(argv):
        word = argv[k]
        k += 1
        if word in lists:
            values = []
            while k < len(argv) and not argv[k].startswith("--"):
                values.append(argv[k])
                k += 1
            if len(values) == 1 and values[0].startswith("["):
                out += [word, values[0]]  # already a list literal: '[a, b]'
            else:
                out += [item for value in values for item in (f"{word}+", value)] or [word, "[]"]
        elif word in flags and (k == len(argv) or argv[k].startswith("--")):
            out += [word, "true"]
        else:
            out.append(word)
    return out
