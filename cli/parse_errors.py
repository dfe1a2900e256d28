"""A bad option or config key names itself in the first line: jsonargparse prints ~50 lines of usage first.

`OneLineErrorParser` is the LightningCLI's parser class: on a parse error it prints
`python -m cli fit: --model.init_args.lrr: not an option of DEUADetector (did you mean 'lr'?); options: ...`
and a pointer to `--help`, instead of the usage block followed by a nested Union report.
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
import sys
from typing import NoReturn

from lightning.pytorch.cli import LightningArgumentParser

NOT_ACCEPTED = re.compile(r"Option '(?P<option>[^']+)' is not accepted")
CLASS_PATH = re.compile(r"Problem with given class_path '(?P<path>[^']+)'")
PARSER_KEY = re.compile(r'Parser key "(?P<key>[^"]+)"')
SUBCOMMAND_OPTION = re.compile(r"does not accept option '(?P<option>[^']+)'")


def class_options(class_path: str) -> list[str]:
    """The init arguments jsonargparse accepts for a class (following `**kwargs` into its bases)."""
    from jsonargparse import ArgumentParser

    module, _, name = class_path.rpartition(".")
    parser = ArgumentParser()
    parser.add_class_arguments(getattr(importlib.import_module(module), name))
    return list(parser.get_defaults().keys())


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, 1, 0.7)
    return f" (did you mean {close[0]!r}?)" if close else ""


def useful_line(message: str, known: list[str]) -> str | None:
    """The one line of a jsonargparse error that names the bad key and what is accepted (None if not recognised)."""
    keys = PARSER_KEY.findall(message)
    path = CLASS_PATH.search(message)
    option = NOT_ACCEPTED.search(message)
    if option and path and keys:
        choices = class_options(path["path"])
        name = option["option"]
        return (f"--{keys[0]}.init_args.{name}: not an option of {path['path'].rpartition('.')[2]}"
                f"{_suggest(name, choices)}; its options: {', '.join(choices)}")
    if path and len(keys) >= 2:  # a known key with a bad value: the nested key's own complaint
        detail = message.split(f'Parser key "{keys[1]}":', 1)[1].strip().splitlines()[0]
        return f"--{keys[0]}.init_args.{keys[1]}: {detail}"
    unknown = SUBCOMMAND_OPTION.search(message)
    if unknown:
        return f"{message.splitlines()[0]}{_suggest(unknown['option'], known)}"
    return None


class OneLineErrorParser(LightningArgumentParser):
    """LightningArgumentParser whose parse errors print the useful line first, without the usage block."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        words = parser.prog.replace(" [options]", "").split()
        prog = " ".join([*words[:-1], words[-1].replace("_", "-")])
        known = [action.dest for action in parser._actions]
        line = useful_line(message, known)
        sys.stderr.write(f"{prog}: {line}\n" if line else f"{prog}: {message}\n")
        sys.stderr.write(f"(every option: {prog} --help; jsonargparse's full report: JSONARGPARSE_DEBUG=1)\n")
        self.exit(2)
