"""Node subcommands: ``run`` (the node in the foreground) and ``status`` (what is stored)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from lungnode.config import Config


def _run(args: argparse.Namespace, config: Config) -> int:
    from lungnode.logs import configure_logging
    from lungnode.node.app import NodeApp

    configure_logging(config)
    return NodeApp(config).run()


def _status(args: argparse.Namespace, config: Config) -> int:
    from lungnode.node.ingest.catalog import Catalog
    from lungnode.storage.db import Database
    from lungnode.storage.filestore import FileStore

    db = Database(config.storage.effective_database_url)
    try:
        store = FileStore(config.storage.root_path, fsync=False)
        counts = Catalog(db, store, config.completion.quiet_period_s).status_counts()
    finally:
        db.dispose()
    if args.json:
        print(json.dumps(counts, indent=2, sort_keys=True))
        return 0
    print(f"storage root     {counts['storage_root']}")
    print(f"disk free        {counts['disk_free_bytes'] / 2**30:.1f} GiB")
    print(f"studies          {counts['studies']}")
    print(f"series           {counts['series_total']}  {_states(counts['series'])}")
    print(f"instances        {counts['instances']}  ({counts['instance_files']} files, "
          f"{counts['stored_bytes'] / 2**20:.1f} MiB)")
    print(f"jobs             {sum(counts['jobs'].values())}  {_states(counts['jobs'])}")
    print(f"open assocs      {counts['open_associations']}")
    return 0


def _states(states: dict[str, Any]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(states.items()))


def register(subparsers: Any) -> None:
    """Add ``run`` and ``status``."""
    p = subparsers.add_parser("run", help="run the node in the foreground (SIGTERM stops it cleanly)")
    p.set_defaults(func=_run)
    p = subparsers.add_parser("status", help="studies, series, instances and jobs by state; disk free")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_status)
