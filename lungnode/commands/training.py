"""``lungnode training ...``: the training pipeline's commands inside the node's command line.

The commands themselves live in :mod:`lungnode.training.cli` (also ``python -m lungnode.training``);
this module only mounts them under ``training``. Nothing heavy is imported until a command runs.
"""

from __future__ import annotations

import argparse
from typing import Any

from lungnode.config import Config


def _dispatch(args: argparse.Namespace, config: Config) -> int:
    result: int = args.run(args)
    return result


def register(subparsers: Any) -> None:
    """Add ``training`` and its subcommands."""
    from lungnode.training.cli import add_commands

    p = subparsers.add_parser("training", help="make models: phantoms, train, evaluate, export, "
                                               "prepare-ricord, pretrain")
    sub = p.add_subparsers(dest="training_command", metavar="COMMAND", required=True)
    add_commands(sub)
    p.set_defaults(func=_dispatch)
