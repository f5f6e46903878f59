"""Scale-out: three ``lungnode worker`` processes on a real PostgreSQL process 50 jobs exactly once,
while one of them is SIGKILLed in the middle of a job (its job is leased again after the lease).
The workers are the product's ``worker`` command started through ``tests/launch.py`` with a test
processor."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lungnode.node.dispatch import jobs
from lungnode.storage.db import Database
from tests.node.dispatch.dispatch_helpers import PROCS, REPO, node_env, seed_series, wait_for, write_config

pytestmark = pytest.mark.postgres


def test_three_workers_fifty_jobs_exactly_once_with_one_killed(tmp_path: Path,
                                                                postgres_db_url: str) -> None:
    db = Database(postgres_db_url)
    job_pks = seed_series(db, 50)
    hang_job = job_pks[5]
    cfg = write_config(tmp_path / "lungnode.toml", {
        "storage": {"root": str(tmp_path / "store"), "database_url": postgres_db_url, "fsync": False},
        "jobs": {"lease_s": 5.0, "heartbeat_s": 1.0, "poll_s": 0.1, "local_workers": 0,
                 "retry_delays_s": [0.5]},
    })
    record = tmp_path / "record.jsonl"
    env = node_env(record, LUNGNODE_TEST_HANG_JOB=str(hang_job), LUNGNODE_TEST_SLEEP="0.1")
    procs = [subprocess.Popen([sys.executable, "-m", "tests.launch", "--processor", f"{PROCS}:record_slow",
                               "--config", str(cfg), "worker"],
                              env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for _ in range(3)]
    try:
        hang_pid = int(wait_for(lambda: (Path(str(record) + ".hang").exists()
                                         and Path(str(record) + ".hang").read_text()), 30,
                                what="a worker to start the job that hangs"))
        killed = next(p for p in procs if p.pid == hang_pid)
        os.kill(hang_pid, signal.SIGKILL)
        killed.wait(10)
        wait_for(lambda: jobs.counts(db)["done"] == 50, 60, interval=0.25, what="50 jobs done")
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        outputs = [p.communicate(timeout=20)[0].decode(errors="replace") for p in procs]
    lines = [json.loads(line) for line in record.read_text().splitlines()]
    done_jobs = [line["job"] for line in lines]
    assert sorted(done_jobs) == sorted(job_pks), "every job processed to the end exactly once"
    assert len(set(done_jobs)) == 50
    hung = next(line for line in lines if line["job"] == hang_job)
    assert hung["attempt"] == 2 and hung["pid"] != hang_pid, "the killed worker's job was leased again"
    workers = {line["pid"] for line in lines}
    assert len(workers) >= 2, f"jobs spread over the surviving workers: {workers}"
    assert jobs.counts(db) == {**dict.fromkeys(jobs.STATES, 0), "done": 50}
    survivors = [p for p in procs if p.pid != hang_pid]
    assert all(p.returncode == 0 for p in survivors), outputs
    db.dispose()
