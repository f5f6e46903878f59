"""Operations subcommands: ``cleanup``, ``audit`` and ``health``.

``lungnode cleanup [--dry-run] [--json]``
    Apply the retention policy now (``--dry-run``: list what would be deleted, delete nothing).
``lungnode audit [--since WHEN] [--event NAME] [--limit N] [--json]``
    Print the audit trail, oldest first. ``WHEN`` is an ISO date/time (UTC unless it has an
    offset) or a relative age such as ``90m``, ``12h``, ``7d``.
``lungnode health [--json]``
    Run the ``/healthz`` checks in this process (no listener check); exit 0 when healthy, 1 if not.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
from typing import Any

from lungnode.config import Config
from lungnode.ops import health, retention
from lungnode.storage import audit
from lungnode.storage.db import Database
from lungnode.storage.models import aware, utcnow

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """Parse ``--since``: an ISO date/time or a relative age (``12h``, ``7d``).

    Parameters
    ----------
    text:
        What the user typed.
    now:
        The current time (tests).

    Returns
    -------
    datetime
        A timezone-aware UTC time.

    Raises
    ------
    ValueError
        Neither form.
    """
    now = now or utcnow()
    match = _RELATIVE.match(text.strip().lower())
    if match:
        return now - dt.timedelta(seconds=float(match.group(1)) * _UNIT_S[match.group(2)])
    return aware(dt.datetime.fromisoformat(text.strip()))


def _open_db(config: Config) -> Database:
    return Database(config.storage.effective_database_url)


def _cleanup(args: argparse.Namespace, config: Config) -> int:
    db = _open_db(config)
    try:
        audit.ensure_append_only(db)
        result = retention.cleanup(db, config, dry_run=args.dry_run)
    finally:
        db.dispose()
    now = utcnow()
    if args.json:
        print(json.dumps({"dry_run": result.dry_run, "units": [u.as_dict(now) for u in result.units],
                          "deleted_files": result.deleted_files, "deleted_bytes": result.deleted_bytes,
                          "skipped": list(result.skipped)}, indent=1))
        return 0
    verb = "would delete" if result.dry_run else "deleted"
    for unit in result.units:
        days = (now - unit.age_at).total_seconds() / 86400
        print(f"{verb}\t{unit.kind}\t{unit.key}\t{days:.1f} days\t{len(unit.files)} files\t"
              f"{unit.size_bytes / 1048576:.1f} MiB\t{unit.reason}")
    total = sum(u.size_bytes for u in result.units)
    print(f"{len(result.units)} unit(s), {total / 1048576:.1f} MiB {verb}"
          + (f"; {len(result.skipped)} skipped" if result.skipped else ""))
    for line in result.skipped:
        print(f"skipped\t{line}", file=sys.stderr)
    return 0


def _format_event(row: dict[str, Any]) -> str:
    who = " ".join(x for x in (row["ae_title"], row["peer"] and f"@{row['peer']}") if x)
    what = " ".join(x for x in (row["study_uid"] and f"study={row['study_uid']}",
                                row["series_uid"] and f"series={row['series_uid']}",
                                row["job_pk"] is not None and f"job={row['job_pk']}") if x)
    details = " ".join(f"{k}={json.dumps(v)}" for k, v in sorted(row["details"].items()))
    return "\t".join((row["at"], row["event"], who or "-", what or "-", details))


def _audit(args: argparse.Namespace, config: Config) -> int:
    try:
        since = parse_since(args.since) if args.since else None
    except ValueError:
        print(f"lungnode audit: --since {args.since!r}: expected an ISO date/time or e.g. 12h, 7d",
              file=sys.stderr)
        return 2
    if args.event and args.event not in audit.EVENTS:
        print(f"lungnode audit: --event {args.event!r}: expected one of {', '.join(audit.EVENTS)}",
              file=sys.stderr)
        return 2
    db = _open_db(config)
    try:
        audit.ensure_append_only(db)
        with db.session() as s:
            rows = [audit.event_dict(r) for r in
                    audit.read_events(s, since=since, event=args.event, limit=args.limit)]
    finally:
        db.dispose()
    if args.json:
        for row in rows:
            print(json.dumps(row, sort_keys=True))
    else:
        for row in rows:
            print(_format_event(row))
    return 0


def _health(args: argparse.Namespace, config: Config) -> int:
    db = _open_db(config)
    try:
        checks = health.standard_checks(config, db, listener=args.listener, local_workers=0)
        report = health.run_checks(checks)
    finally:
        db.dispose()
    if args.json:
        print(report.to_json())
    else:
        for c in report.checks:
            print(f"{'ok' if c.ok else 'FAIL'}\t{c.name}\t{c.detail}")
    return 0 if report.ok else 1


def register(subparsers: Any) -> None:
    """Add ``cleanup``, ``audit`` and ``health``."""
    p = subparsers.add_parser("cleanup", help="apply the retention policy now")
    p.add_argument("--dry-run", action="store_true", help="list what would be deleted; delete nothing")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cleanup)

    p = subparsers.add_parser("audit", help="print the audit trail (oldest first)")
    p.add_argument("--since", metavar="WHEN", help="ISO date/time or relative age (90m, 12h, 7d)")
    p.add_argument("--event", metavar="NAME", help="only this event type")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only the newest N events")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=_audit)

    p = subparsers.add_parser("health", help="run the health checks here; exit 1 when unhealthy")
    p.add_argument("--listener", action="store_true", help="also check the DIMSE port")
    p.add_argument("--json", action="store_true", help="the /healthz JSON body")
    p.set_defaults(func=_health)
