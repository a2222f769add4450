"""The command line: `python -m analysis [--plugin FILE_OR_MODULE ...] COMMAND ...`.

Every command module defines `add_parser(subparsers)` and `main(args) -> int`. Errors a user can
fix (`TokenscopeError`) are printed as one line on stderr with exit code 2; anything else is a bug
and keeps its traceback. `--plugin` (repeatable) loads a method plugin before the commands and their
method flags are built, so a plugin's method works in every command like a built-in one
(`TOKENSCOPE_PLUGINS` does the same from the environment; see analysis/registry.py).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import CLIError, TokenscopeError  # noqa: F401  (CLIError re-exported)
from ..registry import load_plugin

COMMANDS = ("inspect", "sweep", "figures", "bench", "compare")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other user error
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def _plugins(argv: list[str]) -> list[str]:
    """The --plugin values before the command (read before the parser exists: they add flags)."""
    found, index = [], 0
    while index < len(argv):
        item = argv[index]
        if item == "--plugin" and index + 1 < len(argv):
            found.append(argv[index + 1])
            index += 2
            continue
        if item.startswith("--plugin="):
            found.append(item.split("=", 1)[1])
        elif not item.startswith("-"):
            break  # the command: its own arguments follow
        index += 1
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m analysis", description="tokenscope: token pruning and merging in vision transformers",
                     allow_abbrev=False)
    parser.add_argument("--plugin", action="append", default=[], metavar="FILE_OR_MODULE",
                        help="load a method plugin (a .py file or a module name) before running the command; repeatable")
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
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        for source in _plugins(argv):
            load_plugin(source)
        parser = build_parser()
    except TokenscopeError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except TokenscopeError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        return 130
    except BrokenPipeError:  # the reader went away (`... | head`): stop quietly
        sys.stderr.close()
        return 0
