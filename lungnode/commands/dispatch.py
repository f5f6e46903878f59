"""Dispatch subcommands: ``worker``, ``jobs``, ``retry``, ``reprocess``, ``explain``, ``rules dry-run``.

These are thin wrappers over :mod:`lungnode.node.dispatch.jobs`, :mod:`lungnode.node.dispatch.worker` and
:mod:`lungnode.node.dispatch.rules`; they print UIDs, states and rule conditions, never patient data.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from lungnode.config import Config
from lungnode.storage.db import Database

if TYPE_CHECKING:
    from lungnode.node.dispatch.worker import EngineFactory, Processor

EXIT_NOT_FOUND = 1


def _db(config: Config) -> Database:
    return Database(config.storage.effective_database_url)


def _worker(args: argparse.Namespace, config: Config) -> int:
    return worker_command(config)


def worker_command(config: Config, processor: Processor | None = None,
                   engine_factory: EngineFactory | None = None) -> int:
    """``lungnode worker``: one worker in the foreground, with the metrics endpoint.

    ``processor`` and ``engine_factory`` default to the pipeline and the configured engine; the
    tests' launcher passes its own.
    """
    from lungnode.logs import configure_logging
    from lungnode.node.dispatch.worker import run_worker

    configure_logging(config, "worker %(process)d")
    from lungnode.ops import metrics

    # A worker unit beside the node shares its metrics folder only when one is named explicitly
    # (the default <storage.root>/.metrics may be a network mount on a remote worker machine).
    folder = config.metrics.multiprocess_dir or os.environ.get(metrics.ENV_MULTIPROC, "")
    if config.metrics.enabled and folder:
        metrics.setup_multiprocess(folder, wipe=False)
    # Metrics: join this machine's shared folder (no wipe: a node may be running beside us) and
    # serve /metrics + /healthz unless the node on this machine already does (port taken).
    from lungnode.ops.metrics import setup_from_config
    from lungnode.ops.server import make_worker_service
    from lungnode.storage.filestore import FileStore

    setup_from_config(config.storage.root, config.metrics.multiprocess_dir, wipe=False)
    endpoint_db = _db(config)
    endpoint = make_worker_service(config, endpoint_db, FileStore(config.storage.root_path, fsync=False))
    endpoint.start()
    try:
        n = run_worker(config, processor, engine_factory=engine_factory)
    finally:
        endpoint.stop()
        endpoint_db.dispose()
    print(f"worker stopped after {n} job(s)")
    return 0


def _jobs(args: argparse.Namespace, config: Config) -> int:
    from lungnode.node.dispatch import jobs

    db = _db(config)
    try:
        rows = jobs.list_jobs(db, args.state, args.limit)
        print(f"{'job':>6} {'state':<10} {'att':>3} {'inst':>5}  {'created (UTC)':<19}  series / reason")
        for j in rows:
            created = j.created_at.strftime("%Y-%m-%d %H:%M:%S") if j.created_at else ""
            extra = f" supersedes {j.supersedes_job_pk}" if j.supersedes_job_pk else ""
            print(f"{j.id:>6} {j.state:<10} {j.attempts:>3} {j.instance_count:>5}  {created:<19}  "
                  f"{j.series_uid}{extra}")
            if j.reason:
                print(f"{'':>48}{j.reason[:200]}")
        print("totals: " + ", ".join(f"{k}={v}" for k, v in jobs.counts(db).items()))
    finally:
        db.dispose()
    return 0


def _retry(args: argparse.Namespace, config: Config) -> int:
    from lungnode.node.dispatch import jobs

    db = _db(config)
    try:
        job = jobs.retry_job(db, args.job)
    except (LookupError, ValueError) as exc:
        print(f"lungnode: {exc}")
        return EXIT_NOT_FOUND
    finally:
        db.dispose()
    print(f"job {job.id} queued again")
    return 0


def _reprocess(args: argparse.Namespace, config: Config) -> int:
    from lungnode.node.dispatch import jobs

    db = _db(config)
    try:
        result = jobs.reprocess(db, config, args.series_uid)
    except LookupError as exc:
        print(f"lungnode: {exc}")
        return EXIT_NOT_FOUND
    finally:
        db.dispose()
    sup = f", supersedes job {result.supersedes_job_pk}" if result.supersedes_job_pk else ""
    print(f"job {result.job_pk} queued for series {args.series_uid}{sup}")
    return 0


def _explain(args: argparse.Namespace, config: Config) -> int:
    from lungnode.node.dispatch.explain import explain_lines

    db = _db(config)
    try:
        lines = explain_lines(db, config, args.series_uid, verbose=True)
    finally:
        db.dispose()
    if lines is None:
        print(f"lungnode: series {args.series_uid} is not stored")
        return EXIT_NOT_FOUND
    print("\n".join(lines))
    return 0


def _dry_run(args: argparse.Namespace, config: Config) -> int:
    from lungnode.node.dispatch.explain import explain_lines
    from lungnode.storage.models import Series

    db = _db(config)
    try:
        with db.session() as s:
            uids = list(s.scalars(select(Series.series_uid).order_by(Series.id)).all())
        print(f"{'decision':<8} {'rule':<20} {'state':<10} {'slices':>5} series")
        for uid in uids:
            print("\n".join(explain_lines(db, config, uid, verbose=args.verbose) or []))
        print(f"{len(uids)} series")
    finally:
        db.dispose()
    return 0


def register(subparsers: Any) -> None:
    """Add this module's subcommands."""
    p = subparsers.add_parser("worker", help="run an inference worker (claims jobs from the database)")
    p.set_defaults(func=_worker)

    p = subparsers.add_parser("jobs", help="list jobs and their states")
    p.add_argument("--state", default=None,
                   choices=["queued", "running", "done", "held", "failed", "superseded"])
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=_jobs)

    p = subparsers.add_parser("retry", help="queue a failed job again")
    p.add_argument("job", type=int, metavar="JOB")
    p.set_defaults(func=_retry)

    p = subparsers.add_parser("reprocess", help="run a stored series again (new result supersedes)")
    p.add_argument("series_uid", metavar="SERIES_UID")
    p.set_defaults(func=_reprocess)

    p = subparsers.add_parser("explain", help="show which rule decides a stored series, and why")
    p.add_argument("series_uid", metavar="SERIES_UID")
    p.set_defaults(func=_explain)

    p = subparsers.add_parser("rules", help="selection rules")
    sub = p.add_subparsers(dest="rules_command", metavar="ACTION", required=True)
    d = sub.add_parser("dry-run", help="print the decision of the current rules for every stored series")
    d.add_argument("--verbose", action="store_true", help="print every condition")
    d.set_defaults(func=_dry_run)
