"""Basic subcommands: ``check-config``."""

from __future__ import annotations

import argparse
from typing import Any

from lungnode.config import Config


def _check_config(args: argparse.Namespace, config: Config) -> int:
    where = config.source or "embedded defaults"
    print(f"configuration OK ({where}): AE {config.node.ae_title} on {config.node.bind}:"
          f"{config.node.port}, storage {config.storage.root}, "
          f"{len(config.node.peers)} peer(s), {len(config.destinations)} destination(s), "
          f"{len(config.rules)} rule(s)")
    return 0


def register(subparsers: Any) -> None:
    """Add this module's subcommands."""
    p = subparsers.add_parser("check-config", help="load and validate the configuration")
    p.set_defaults(func=_check_config)
