"""Completion, idempotent jobs, late instances and restarts through a real ``lungnode run``.

Series are sent with DCMTK ``storescu`` and with a pynetdicom SCU; a local worker process runs the
test processor ``tests.node.dispatch.dispatch_procs:record`` (reads every instance file of the job,
records the job), given to the node by the tests' launcher (``tests/launch.py``).
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from lungnode.storage.db import Database
from tests.node.dispatch.dispatch_helpers import (
    PROCS,
    clone_series,
    read_jobs,
    read_series,
    records,
    storescu,
    wait_for,
)
from tests.node_process import LungnodeProcess, send_files


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


@pytest.fixture
def record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The test processor's record file."""
    path = tmp_path / "record.jsonl"
    monkeypatch.setenv("LUNGNODE_TEST_RECORD", str(path))
    return path


def _node(workdir: Path, quiet: float, grace: float = 1.5, workers: int = 1,
          database_url: str = "") -> LungnodeProcess:
    return LungnodeProcess(workdir, {
        "storage": {"database_url": database_url},
        "completion": {"quiet_period_s": quiet, "grace_s": grace, "poll_s": 0.1},
        "jobs": {"local_workers": workers, "poll_s": 0.2, "lease_s": 30.0, "heartbeat_s": 5.0},
    }, hooks=("--processor", f"{PROCS}:record"))


def _one_job(db: Database, uid: str, timeout: float, state: str = "done") -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        rows = read_jobs(db, uid)
        return rows[-1] if rows and rows[-1]["state"] == state else None
    return dict(wait_for(ready, timeout, what=f"a {state} job for the series"))


def test_split_series_is_one_job_early_and_resend_runs_once(tmp_path: Path, record: Path,
                                                            chest_ct_dir: Path,
                                                            dcmtk_env: dict[str, str]) -> None:
    files = sorted(chest_ct_dir.glob("*.dcm"))
    uid = "1.2.826.0.1.3680043.8.498.4242.1"
    series = clone_series(files, tmp_path / "split", series_uid=uid)
    with _node(tmp_path / "node", quiet=20.0) as node:
        db = Database(node.db_url)
        storescu(node.port, series[:15], dcmtk_env)
        storescu(node.port, series[15:], dcmtk_env)
        sent = time.monotonic()
        job = _one_job(db, uid, 15)
        queued_after = time.monotonic() - sent
        assert queued_after < 10, "released + geometrically complete: grace, not the 20 s quiet period"
        assert job["instance_count"] == 30 and job["attempts"] == 1
        assert len(read_jobs(db, uid)) == 1
        # the same series again (storescu) and once more (pynetdicom): duplicates, no second job
        storescu(node.port, series, dcmtk_env)
        assert send_files(node.port, series) == [0] * 30
        time.sleep(3.0)
        assert len(read_jobs(db, uid)) == 1
        done = [r for r in records(record) if r["series"] == uid]
        assert len(done) == 1 and done[0]["files"] == 30
        row = read_series(db, uid)
        assert row is not None and row["state"] == "complete" and row["decision_rule"] == "chest-ct"
        db.dispose()


def test_gap_waits_full_quiet_period(tmp_path: Path, record: Path, chest_ct_dir: Path,
                                     dcmtk_env: dict[str, str]) -> None:
    files = sorted(chest_ct_dir.glob("*.dcm"))
    uid = "1.2.826.0.1.3680043.8.498.4242.2"
    series = clone_series(files, tmp_path / "gap", series_uid=uid, drop=(14,))
    quiet = 6.0
    with _node(tmp_path / "node", quiet=quiet, grace=0.5, workers=0) as node:
        db = Database(node.db_url)
        storescu(node.port, series, dcmtk_env)
        time.sleep(quiet / 2)
        assert read_jobs(db, uid) == [], "a series with a missing slice must not complete early"
        job = _one_job(db, uid, quiet + 5, state="queued")
        waited = (_aware(job["created_at"]) - _aware(job["last_instance_at"])).total_seconds()
        assert quiet - 0.1 <= waited < quiet + 2, waited
        assert job["instance_count"] == 29
        db.dispose()


@pytest.mark.parametrize("database", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_late_instance_supersedes_previous_result(tmp_path: Path, record: Path, chest_ct_dir: Path,
                                                  database: str, request: pytest.FixtureRequest) -> None:
    files = sorted(chest_ct_dir.glob("*.dcm"))
    uid = "1.2.826.0.1.3680043.8.498.4242.3"
    series = clone_series(files, tmp_path / "late", series_uid=uid)
    url = request.getfixturevalue("postgres_db_url") if database == "postgresql" else ""
    with _node(tmp_path / "node", quiet=20.0, grace=1.0, database_url=url) as node:
        db = Database(node.db_url)
        assert send_files(node.port, series[:-1]) == [0] * 29  # the last slice is missing
        first = _one_job(db, uid, 15)
        assert first["instance_count"] == 29
        assert send_files(node.port, series[-1:]) == [0]       # late instance
        second = wait_for(lambda: next((j for j in read_jobs(db, uid)
                                        if j["id"] != first["id"] and j["state"] == "done"), None),
                          15, what="the superseding job")
        assert second["instance_count"] == 30
        assert second["supersedes_job_pk"] == first["id"]
        assert [r["files"] for r in records(record) if r["series"] == uid] == [29, 30]
        row = read_series(db, uid)
        assert row is not None and row["state"] == "complete"
        db.dispose()


def test_restart_with_pending_timer_still_dispatches(tmp_path: Path, record: Path,
                                                     chest_ct_dir: Path,
                                                     dcmtk_env: dict[str, str]) -> None:
    files = sorted(chest_ct_dir.glob("*.dcm"))
    uid = "1.2.826.0.1.3680043.8.498.4242.4"
    series = clone_series(files, tmp_path / "restart", series_uid=uid, drop=(10,))
    node = _node(tmp_path / "node", quiet=4.0, grace=0.5)
    node.start()
    try:
        storescu(node.port, series, dcmtk_env)
        node.kill()  # kill -9 while the series' timer is pending
        db = Database(node.db_url)
        row = read_series(db, uid)
        assert row is not None and row["state"] == "receiving" and read_jobs(db, uid) == []
        node.start()
        job = _one_job(db, uid, 20)
        assert job["instance_count"] == 29
        assert [r["series"] for r in records(record)] == [uid]
        db.dispose()
    finally:
        node.stop()


def test_killed_local_worker_is_restarted_and_its_job_leased_again(
        tmp_path: Path, record: Path, chest_ct_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LUNGNODE_TEST_HANG_JOB", "1")  # job 1 hangs on its first attempt
    files = sorted(chest_ct_dir.glob("*.dcm"))
    uid = "1.2.826.0.1.3680043.8.498.4242.5"
    series = clone_series(files, tmp_path / "kill", series_uid=uid)
    node = LungnodeProcess(tmp_path / "node", {
        "completion": {"quiet_period_s": 20.0, "grace_s": 0.5, "poll_s": 0.1},
        "jobs": {"local_workers": 1, "poll_s": 0.2, "lease_s": 5.0, "heartbeat_s": 1.0}},
        hooks=("--processor", f"{PROCS}:record_slow"))
    with node:
        db = Database(node.db_url)
        assert send_files(node.port, series) == [0] * 30
        hang = Path(str(record) + ".hang")
        pid = int(wait_for(lambda: hang.exists() and hang.read_text(), 20, what="the job to start"))
        assert pid in node.children()
        os.kill(pid, signal.SIGKILL)  # like the OOM killer
        assert send_files(node.port, series[:1]) == [0], "the listener is unaffected"
        job = _one_job(db, uid, 30)
        assert job["attempts"] == 2
        done = records(record)
        assert len(done) == 1 and done[0]["pid"] != pid
        ppid = [line for line in Path(f"/proc/{done[0]['pid']}/status").read_text().splitlines()
                if line.startswith("PPid:")]
        assert ppid == [f"PPid:\t{node.proc.pid}"], "the restarted worker is the node's child"
        assert "exited with -9; restarting" in node.log()
        db.dispose()
