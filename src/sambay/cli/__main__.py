"""`sambay <command>`: the command-line entry point, a table of subcommands.

Each subcommand module defines `HELP`, `add_arguments(parser)` and `main(args) -> int`. Errors the
user can fix print one line and exit 2 (bad arguments) or 1 (missing files, invalid checkpoints, ...),
never a traceback; set SAMBAY_DEBUG=1 to see the traceback anyway.

Two exits are quiet and follow the shell's 128 + signal convention: Ctrl-C exits 130 (SIGINT) wherever
it lands once `main` runs, the subcommands' imports included (only ``import sambay`` itself, which imports
torch, comes before `main`); a reader that closes the pipe early (``sambay generate ... | head -1``) exits 141
(SIGPIPE), what the shell reports for ``cat``, ``grep`` or ``git`` in the same place, so ``PIPESTATUS`` and
``set -o pipefail`` see sambay like any other filter, and a truncated output is never reported as success.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
from types import ModuleType
from typing import NoReturn

import sambay.cli

# command → module of `sambay.cli`. The modules are imported inside `main` (they pull in torch, the
# tokenizer and rich: a second or more), so that Ctrl-C during the imports is handled like any other.
COMMANDS = {"bench": "bench", "bench-serve": "bench_serve", "chat": "chat", "eval": "eval", "generate": "generate",
            "merge": "merge", "quantize": "quantize", "serve": "serve", "train": "train"}


def _check_commands() -> None:
    """Every public module of `sambay.cli` is a command in the table, and the other way round."""
    modules = {m.name for m in pkgutil.iter_modules(sambay.cli.__path__) if not m.name.startswith("_")}
    table = set(COMMANDS.values())
    assert modules == table, f"sambay.cli modules {sorted(modules)} != COMMANDS {sorted(table)}"
    assert all(name.replace("-", "_") == module for name, module in COMMANDS.items())


def _module(command: str) -> ModuleType:
    return importlib.import_module(f"sambay.cli.{COMMANDS[command]}")


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error message."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sambay", description="Phi-4-mini-flash-reasoning / SambaY in PyTorch")
    parser.add_argument("--version", action="version", version=f"sambay {sambay.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = _module(name)
        sub = commands.add_parser(name, help=module.HELP, description=module.__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(parser=sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code."""
    try:
        return _run(argv)
    except KeyboardInterrupt:
        return 130  # 128 + SIGINT, no traceback
    except BrokenPipeError:
        _discard_stdout()
        return 141  # 128 + SIGPIPE: the reader left; see the module docstring


def _run(argv: list[str] | None) -> int:
    from sambay.cli._common import UsageError

    _check_commands()
    args = build_parser().parse_args(argv)
    try:
        code = _module(args.command).main(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handlers, not at interpreter exit
        return code
    except (BrokenPipeError, KeyboardInterrupt):
        raise
    except UsageError as e:
        args.parser.error(str(e))
    except (OSError, ValueError, RuntimeError) as e:
        if os.environ.get("SAMBAY_DEBUG"):
            raise
        print(f"sambay {args.command}: error: {e}", file=sys.stderr)
        return 1


def _discard_stdout() -> None:
    """Point stdout at /dev/null: Python flushes it at exit, which would raise again on the closed pipe
    (the Python docs' note on SIGPIPE, in the `signal` module)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a file (an embedding or a test's capture)
        pass


if __name__ == "__main__":
    sys.exit(main())
