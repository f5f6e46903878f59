"""Benchmark: completion latency and job claiming throughput.

1. Seconds from the last instance's C-STORE response to the job being queued, through a real
   ``lungnode run`` with the default ``[completion]`` settings (quiet period 30 s, grace 3 s),
   for a complete series (early completion: goal <= 3.5 s) and for one with a missing slice
   (full quiet period). The series is the shared 30-slice chest CT under a new Series UID.
2. Jobs claimed (and finished by a no-op processor) per second by 4 ``lungnode worker`` processes on
   a throw-away PostgreSQL cluster (initdb on 127.0.0.1).

Usage::

    .venv/bin/python -m bench.completion [--runs 3] [--gap-runs 1] [--jobs 400] [--skip-pg]
                                         [--skip-latency]
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lungnode.node.dispatch.outcome import JobOutcome
from lungnode.storage.db import Database
from tests.node.dispatch.dispatch_helpers import clone_series, seed_series, write_config
from tests.node_process import LungnodeProcess, free_port, wait_for_port

REPO = Path(__file__).resolve().parents[1]

CHEST = Path(os.environ.get("LUNGNODE_SHARED_DATA", REPO.parent / "shared" / "data")) / "ct" / \
    "chest-30-slices-uncompressed"


def noop_processor(job_pk: int, ctx: object) -> JobOutcome:
    """A processor that does nothing (measures the queue, not inference)."""
    return JobOutcome("done")


def _send_and_time(port: int, files: list[Path]) -> float:
    """Send over one association; return the wall-clock time of the last C-STORE response."""
    from pynetdicom import AE, _config
    from pynetdicom.dsutils import split_dataset

    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = AE(ae_title="TESTSCU")
    for sop_class, ts in {(str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID))
                          for m in (split_dataset(f)[0] for f in files)}:
        ae.add_requested_context(sop_class, ts)
    assoc = ae.associate("127.0.0.1", port, ae_title="LUNGNODE")
    assert assoc.is_established
    last = 0.0
    for f in files:
        status = assoc.send_c_store(f)
        assert int(status.Status) == 0
        last = time.time()
    assoc.release()
    return last


def _queued_at(db: Database, series_uid: str, timeout: float) -> float:
    from sqlalchemy import select

    from lungnode.storage.models import Job

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with db.session() as s:
            created = s.scalar(select(Job.created_at).where(Job.series_uid == series_uid))
        if created is not None:
            if created.tzinfo is None:
                created = created.replace(tzinfo=dt.UTC)
            return created.timestamp()
        time.sleep(0.02)
    raise TimeoutError(f"no job for {series_uid} after {timeout} s")


def bench_latency(runs: int, gap_runs: int) -> dict[str, list[float]]:
    """Latency last C-STORE response → job queued, complete and gapped series (default config)."""
    from pydicom.uid import generate_uid

    files = sorted(CHEST.glob("*.dcm"))
    out: dict[str, list[float]] = {"complete": [], "gap": []}
    with tempfile.TemporaryDirectory(prefix="lungnode-bench-") as tmp:
        node = LungnodeProcess(Path(tmp) / "node", {
            "completion": {"quiet_period_s": 30.0, "grace_s": 3.0, "poll_s": 0.25},
            "storage": {"fsync": True}, "jobs": {"local_workers": 0}})
        with node:
            db = Database(node.db_url)
            for kind, n, drop in (("complete", runs, ()), ("gap", gap_runs, (15,))):
                for i in range(n):
                    uid = generate_uid()
                    series = clone_series(files, Path(tmp) / f"{kind}{i}", series_uid=uid, drop=drop)
                    last = _send_and_time(node.port, series)
                    out[kind].append(_queued_at(db, uid, 60) - last)
                    print(f"{kind:>8} run {i + 1}: {out[kind][-1]:.2f} s", flush=True)
            db.dispose()
    return out


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise SystemExit(f"PostgreSQL server binary {name} not found")
    return found[-1]


def bench_claims(n_jobs: int, n_workers: int = 4) -> float:
    """Jobs claimed and finished per second by ``n_workers`` worker processes on PostgreSQL."""
    from sqlalchemy import func, select

    from lungnode.storage.models import Job

    base = Path(tempfile.mkdtemp(prefix="lungnode-bench-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    subprocess.run([*prefix, _pg_bin("initdb"), "-D", str(base / "data"), "-U", "lungnode",
                    "--auth=trust"], check=True, capture_output=True)
    subprocess.run([*prefix, _pg_bin("pg_ctl"), "-D", str(base / "data"), "-o",
                    f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={base}",
                    "-l", str(base / "log"), "-w", "start"], check=True, capture_output=True)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        wait_for_port(port, 20)
        url = f"postgresql+psycopg://lungnode@127.0.0.1:{port}/postgres"
        db = Database(url)
        seed_series(db, n_jobs, slices=1)
        cfg = write_config(base / "c.toml", {
            "storage": {"root": str(base / "store"), "database_url": url, "fsync": False},
            "jobs": {"poll_s": 0.05, "local_workers": 0},
            "metrics": {"enabled": False}})
        procs = [subprocess.Popen([sys.executable, "-m", "tests.launch", "--processor",
                                   "bench.completion:noop_processor", "--config", str(cfg), "worker"],
                                  cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for _ in range(n_workers)]
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            with db.session() as s:
                done = s.scalar(select(func.count()).select_from(Job).where(Job.state == "done"))
            if done == n_jobs:
                break
            time.sleep(0.2)
        with db.session() as s:
            first, last = s.execute(select(func.min(Job.started_at), func.max(Job.finished_at))).one()
            repeated = s.scalar(select(func.count()).select_from(Job).where(Job.attempts != 1))
        db.dispose()
        assert first is not None and last is not None
        rate = n_jobs / (last - first).total_seconds()
        print(f"claims: {n_jobs} jobs, {n_workers} workers, {rate:.0f} jobs/s "
              f"({repeated} jobs claimed more than once)", flush=True)
        return rate
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(30)
        subprocess.run([*prefix, _pg_bin("pg_ctl"), "-D", str(base / "data"), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def main() -> int:
    """Run the benchmarks and print a summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--gap-runs", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--skip-pg", action="store_true")
    parser.add_argument("--skip-latency", action="store_true")
    args = parser.parse_args()
    lat = {} if args.skip_latency else bench_latency(args.runs, args.gap_runs)
    for kind, values in lat.items():
        if values:
            print(f"SUMMARY {kind}: median {statistics.median(values):.2f} s, "
                  f"min {min(values):.2f}, max {max(values):.2f} (n={len(values)})")
    if not args.skip_pg:
        rate = bench_claims(args.jobs)
        print(f"SUMMARY claims: {rate:.0f} jobs/s with 4 workers on PostgreSQL")
    return 0


if __name__ == "__main__":
    sys.exit(main())
