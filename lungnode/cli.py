"""The ``lungnode`` command: argument parsing and dispatch to each area's subcommands.

Each area registers its subcommands in its own module through a ``register(subparsers)``
function listed in :data:`COMMAND_MODULES`; this file only assembles them. Every command reads the
configuration once (``--config`` or ``$LUNGNODE_CONFIG`` or the embedded defaults); a bad file
prints the key, value and expectation and exits 2. ``--config PATH`` is accepted before the
subcommand and after it (``lungnode run --config PATH``), at every level of nested subcommands;
given twice, the one after the subcommand wins.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from types import ModuleType

from lungnode import __version__
from lungnode.commands import basic, dispatch, node, ops, results, training
from lungnode.config import Config, ConfigError, load_config

#: Modules that contribute subcommands, each with ``register(subparsers) -> None``. A registered
#: parser sets ``func(args, config) -> int`` with ``set_defaults``. They import their heavy parts
#: inside the command functions, so building the parser stays fast.
COMMAND_MODULES: tuple[ModuleType, ...] = (basic, training, node, ops, dispatch, results)

EXIT_CONFIG = 2
CONFIG_HELP = "config file (default: $LUNGNODE_CONFIG, else embedded defaults)"


def _add_config_everywhere(parser: argparse.ArgumentParser) -> None:
    """Add ``--config`` to every subcommand parser below ``parser`` (recursively).

    The subcommand's option has no default (``SUPPRESS``), so it only overrides the top-level
    value when it is given.
    """
    for action in parser._actions:  # argparse keeps subparsers only here
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for sub in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
            if not any("--config" in a.option_strings for a in sub._actions):
                sub.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS,
                                 help=CONFIG_HELP)
            _add_config_everywhere(sub)


def build_parser() -> argparse.ArgumentParser:
    """Build the full argument parser."""
    parser = argparse.ArgumentParser(prog="lungnode", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"lungnode {__version__}")
    parser.add_argument("--config", metavar="PATH", default=None, help=CONFIG_HELP)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMAND_MODULES:
        module.register(subparsers)
    _add_config_everywhere(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lungnode`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config: Config = load_config(getattr(args, "config", None))
    except ConfigError as exc:
        print(f"lungnode: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    result: int = args.func(args, config)
    return result


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
