"""The command table of `python -m cli`: names to where they live, so only the chosen command is imported.

`python -m cli --help` reads each plain command's summary from its module's source (`ast`, no import), and
`python -m cli NAME` imports NAME's module alone: listing commands costs no torch or lightning import, and a
plain command imports what its own body needs.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path

# Trainer runs over configs (LightningCLI, cli/lightning_cli.py): name as typed → the ForensicsTrainer method.
TRAINER_SUBCOMMANDS = {"fit": "fit", "validate": "validate", "test": "test",
                       "precompute": "precompute", "laplace-fit": "laplace_fit",
                       "generate": "generate", "ensemble-fit": "ensemble_fit"}

# Plain commands (jsonargparse over a function's signature): name → "module:function".
PLAIN_COMMANDS = {"shards": "cli.plain_commands:shards", "tiny-models": "cli.plain_commands:tiny_models",
                  "demo": "cli.plain_commands:demo", "toy-data": "cli.plain_commands:toy_data",
                  "compare": "cli.plain_commands:compare",
                  "grid": "cli.plain_commands:grid", "predict": "cli.plain_commands:predict",
                  "robustness": "cli.plain_commands:robustness", "verify": "cli.plain_commands:verify",
                  "separability": "cli.plain_commands:separability"}


def plain_command(name: str) -> Callable:
    """The function behind plain command `name`, importing its module (and only it)."""
    module, function = PLAIN_COMMANDS[name].split(":")
    return getattr(importlib.import_module(module), function)


def summary(name: str) -> str:
    """First docstring line of plain command `name`, read from its module's source without importing it."""
    module, function = PLAIN_COMMANDS[name].split(":")
    tree = ast.parse(Path(importlib.util.find_spec(module).origin).read_text())
    definition = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == function)
    return (ast.get_docstring(definition) or "").splitlines()[0]
