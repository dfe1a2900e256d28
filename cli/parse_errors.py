"""A bad option or config key names itself in the first line: jsonargparse prints ~50 lines of usage first.

`OneLineErrors` makes a jsonargparse parser print, on a parse error,
`python -m cli fit: --model.init_args.lrr: not an option of DEUADetector (did you mean 'lr'?); options: ...`
and a pointer to `--help`, instead of the usage block followed by a nested Union report; and it turns off
argparse's prefix matching (`--trainer.max_epoch` silently set `max_epochs`, `--ou` meant `--out`). The
LightningCLI's parser (`cli.lightning_cli.ForensicsParser`) and the plain commands' (`PlainCommandParser`)
both use it.
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
import sys
from typing import Any, NoReturn

from jsonargparse import ArgumentParser

NOT_ACCEPTED = re.compile(r"Option '(?P<option>[^']+)' is not accepted")
CLASS_PATH = re.compile(r"Problem with given class_path '(?P<path>[^']+)'")
PARSER_KEY = re.compile(r'Parser key "(?P<key>[^"]+)"')
SUBCOMMAND_OPTION = re.compile(r"does not accept option '(?P<option>[^']+)'")
UNRECOGNIZED = re.compile(r"[Uu]nrecognized arguments: --(?P<option>\S+)")


def class_options(class_path: str) -> list[str]:
    """The init arguments jsonargparse accepts for a class (following `**kwargs` into its bases)."""
    module, _, name = class_path.rpartition(".")
    parser = ArgumentParser()
    parser.add_class_arguments(getattr(importlib.import_module(module), name))
    return list(parser.get_defaults().keys())


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, 1, 0.7)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _value_problem(report: str) -> str:
    """The first line of jsonargparse's complaint about a value, or for a Union (`int | None`) the value and the
    types it is not (the first line alone says only "Does not validate against any of the Union subtypes")."""
    lines = [line.strip() for line in report.strip().splitlines()] or ["invalid value"]
    subtypes = next((line for line in lines if line.startswith("Subtypes: ")), None)
    given = next((line for line in lines if line.startswith("Given value: ")), None)
    if lines[0].startswith("Does not validate against any of the Union subtypes") and subtypes and given:
        return f"{given.removeprefix('Given value: ')!r} is not one of {subtypes.removeprefix('Subtypes: ')}"
    return lines[0]


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
        report = message.split(f'Parser key "{keys[1]}":', 1)[1]
        return f"--{keys[0]}.init_args.{keys[1]}: {_value_problem(report)}"
    if len(keys) == 1 and f'Parser key "{keys[0]}":' in message:  # an option's bad value
        report = message.split(f'Parser key "{keys[0]}":', 1)[1]
        return f"--{keys[0]}: {_value_problem(report)}"
    unknown = SUBCOMMAND_OPTION.search(message) or UNRECOGNIZED.search(message)
    if unknown:
        return f"{message.splitlines()[0]}{_suggest(unknown['option'], known)}"
    return None


class OneLineErrors:
    """A jsonargparse parser mixin: parse errors print the useful line first, without the usage block; no
    abbreviated options (an option is spelled out or refused)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

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


class PlainCommandParser(OneLineErrors, ArgumentParser):
    """The parser of the plain commands (`shards`, `toy-data`, ...: jsonargparse over a function's signature)."""
