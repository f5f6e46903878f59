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
          f"{len(config.rules)} rule(s), {len(config.notifications)} notification(s)")
    shadow = [d.name for d in config.destinations if d.mode == "shadow"]
    if shadow:
        print(f"shadow mode (nothing is sent): {', '.join(shadow)}")
    if config.metrics.enabled and config.web.enabled:
        print(f"status pages: http://{config.metrics.bind}:{config.metrics.port}/"
              f"{' (actions on)' if config.web.actions else ''}")
    return 0


def register(subparsers: Any) -> None:
    """Add this module's subcommands."""
    p = subparsers.add_parser("check-config", help="load and validate the configuration")
    p.set_defaults(func=_check_config)
