"""`python -m cli SUBCOMMAND ...`: Trainer runs go to LightningCLI, the rest to plain functions.

Parse and dispatch only, lazily: the command table (cli/commands.py) names modules, and only the chosen
command's module is imported (`--help` imports no torch or lightning).
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

from cli.commands import PLAIN_COMMANDS, TRAINER_SUBCOMMANDS, plain_command, summary
from core.outputs import OUTPUT_ERRNOS

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("cli", "workflows", "reports", "lightning_modules", "datamodules", "feature_cache", "core")


def _usage() -> str:
    lines = ["usage: python -m cli SUBCOMMAND [options]   (python -m cli SUBCOMMAND --help)", "",
             "Trainer runs (LightningCLI: --config, --print_config, --trainer.*):"]
    lines += [f"  {name}" for name in TRAINER_SUBCOMMANDS]
    lines += ["", "Other commands:"]
    lines += [f"  {name:12s} {summary(name)}" for name in PLAIN_COMMANDS]
    return "\n".join(lines)


def _input_error(error: BaseException | None) -> BaseException | None:
    """The first error in the cause/context chain that this project raised about its input.

    Our input checks raise ValueError/FileNotFoundError/KeyError with one-line messages; libraries wrap
    them (jsonargparse, Lightning), so the chain is searched for one whose traceback ends in our code. An OSError
    about where output goes (`core.outputs.OUTPUT_ERRNOS`: disk full, read-only) is one line wherever it arose.
    """
    while error is not None:
        if isinstance(error, OSError) and error.errno in OUTPUT_ERRNOS:  # a full or read-only disk, from any code
            return ValueError(f"{error.strerror}: {error.filename or 'writing output'} (free space or fix the location, "
                              "then rerun)")
        frames = traceback.extract_tb(error.__traceback__)
        if isinstance(error, (ValueError, FileNotFoundError, KeyError)) and frames \
                and any(Path(frames[-1].filename).resolve().is_relative_to(REPO / package) for package in PACKAGES):
            return error
        error = error.__cause__ or error.__context__
    return None


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return
    if argv[0] not in PLAIN_COMMANDS and argv[0] not in TRAINER_SUBCOMMANDS:
        sys.exit(f"python -m cli: unknown subcommand {argv[0]!r}\n{_usage()}")
    try:
        if argv[0] in PLAIN_COMMANDS:
            from jsonargparse import CLI

            from cli.argv import shell_style
            from cli.parse_errors import PlainCommandParser

            function = plain_command(argv[0])
            CLI(function, args=shell_style(function, argv[1:]), prog=f"python -m cli {argv[0]}",
                parser_class=PlainCommandParser)
        else:
            from cli.lightning_cli import build_cli

            build_cli(argv)
    except Exception as error:
        # Bad input (a missing model, a store of another config, a corrupt posterior...) is one line, not a
        # traceback through jsonargparse and Lightning; CLI_TRACEBACK=1 shows the whole chain.
        cause = _input_error(error)
        if cause is None or os.environ.get("CLI_TRACEBACK") == "1":
            raise
        message = " ".join(str(cause.args[0] if isinstance(cause, KeyError) and cause.args else cause).split())
        sys.exit(f"python -m cli {argv[0]}: {message}  (CLI_TRACEBACK=1 for the traceback)")


if __name__ == "__main__":
    from core.runtime import with_streaming_copies

    with_streaming_copies()
    main()
