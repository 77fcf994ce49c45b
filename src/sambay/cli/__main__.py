"""`sambay <command>`: the command-line entry point, a table of subcommands.

Each subcommand module defines `HELP`, `add_arguments(parser)` and `main(args) -> int`. Errors the
user can fix print one line and exit 2 (bad arguments) or 1 (missing files, invalid checkpoints, ...),
never a traceback; set SAMBAY_DEBUG=1 to see the traceback anyway.
"""

from __future__ import annotations

import argparse
import os
import pkgutil
import sys
from typing import NoReturn

import sambay.cli
from sambay.cli import bench, bench_serve, chat, generate, serve, train
from sambay.cli._common import UsageError

COMMANDS = {"bench": bench, "bench-serve": bench_serve, "chat": chat, "generate": generate, "serve": serve,
            "train": train}


def _check_commands() -> None:
    """Every public module of `sambay.cli` is a command in the table, and the other way round."""
    modules = {m.name for m in pkgutil.iter_modules(sambay.cli.__path__) if not m.name.startswith("_")}
    table = {module.__name__.rsplit(".", 1)[-1] for module in COMMANDS.values()}  # "bench-serve" → bench_serve
    assert modules == table, f"sambay.cli modules {sorted(modules)} != COMMANDS {sorted(table)}"
    assert all(name.replace("-", "_") == module.__name__.rsplit(".", 1)[-1] for name, module in COMMANDS.items())


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error message."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sambay", description="Phi-4-mini-flash-reasoning / SambaY in PyTorch")
    parser.add_argument("--version", action="version", version=f"sambay {sambay.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in COMMANDS.items():
        sub = commands.add_parser(name, help=module.HELP, description=module.__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(parser=sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    _check_commands()
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command].main(args)
    except UsageError as e:
        args.parser.error(str(e))
    except (OSError, ValueError, RuntimeError) as e:
        if os.environ.get("SAMBAY_DEBUG"):
            raise
        print(f"sambay {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
