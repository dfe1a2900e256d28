"""`python -m cli SUBCOMMAND ...`: Trainer runs go to LightningCLI, the rest to plain functions."""

from __future__ import annotations

import sys

from jsonargparse import CLI

from cli.plain_commands import PLAIN_COMMANDS
from cli.lightning_cli import TRAINER_SUBCOMMANDS, run_lightning_cli


def _usage() -> str:
    lines = ["usage: python -m cli SUBCOMMAND [options]   (python -m cli SUBCOMMAND --help)", "",
             "Trainer runs (LightningCLI: --config, --print_config, --trainer.*):"]
    lines += [f"  {name}" for name in TRAINER_SUBCOMMANDS]
    lines += ["", "Other commands:"]
    lines += [f"  {name:12s} {fn.__doc__.splitlines()[0]}" for name, fn in PLAIN_COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return
    if argv[0] in PLAIN_COMMANDS:
        CLI(PLAIN_COMMANDS[argv[0]], args=argv[1:], prog=f"python -m cli {argv[0]}")
    elif argv[0] in TRAINER_SUBCOMMANDS:
        run_lightning_cli(argv)
    else:
        sys.exit(f"python -m cli: unknown subcommand {argv[0]!r}\n{_usage()}")


if __name__ == "__main__":
    main()
