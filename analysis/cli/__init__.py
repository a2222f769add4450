"""The command line: `python -m analysis COMMAND ...`.

Every command module defines `add_parser(subparsers)` and `main(args) -> int`. Errors a user can
fix are printed as one line on stderr with exit code 2, never as a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from ..models import TokenscopeError

COMMANDS = ("inspect", "sweep", "figures", "bench")


class CLIError(TokenscopeError):
    """A bad command-line value."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other user error
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m analysis", description="tokenscope: token pruning and merging in vision transformers")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as err:
            if err.name == f"{__name__}.{name}":
                continue
            raise
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (TokenscopeError, KeyError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        sys.stderr.write(f"error: {message}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        return 130
