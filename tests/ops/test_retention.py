"""Retention on real rows and real files: age, disk watermark, and what is never deleted."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

from sqlalchemy import func, select

from lungnode.config import Config
from lungnode.ops import retention
from lungnode.storage.db import Database
from lungnode.storage.models import AuditEvent, Instance, Output, Patient, Series
from tests.conftest import REPO
from tests.ops.conftest import Filler


def _instance_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*.dcm") if "results" not in p.parts}


def _result_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in (root / "results").rglob("*.dcm")}


def test_age_based_cleanup_keeps_what_is_needed(ops_config: Config, ops_db: Database,
                                                filler: Filler) -> None:
    root = ops_config.storage.root_path
    old_done = filler.series(days_old=40)
    job_sent = filler.job(old_done, state="done", days_old=40, deliveries=("sent",))
    old_unsent = filler.series(days_old=45)
    job_unsent = filler.job(old_unsent, state="done", days_old=45, deliveries=("sent", "pending"))
    old_queued = filler.series(days_old=50)
    filler.job(old_queued, state="queued", days_old=50)
    old_running = filler.series(days_old=50)
    filler.job(old_running, state="running", days_old=50)
    old_held = filler.series(days_old=50)
    job_held = filler.job(old_held, state="held", days_old=50)
    old_receiving = filler.series(days_old=60, state="receiving")
    young = filler.series(days_old=2)
    before_instances = _instance_files(root)
    before_results = _result_files(root)

    planned = retention.plan(ops_db, ops_config)
    assert [(u.kind, u.key, u.reason) for u in planned] == [
        ("series", old_done, "age"), ("results", str(job_sent), "age")]

    result = retention.cleanup(ops_db, ops_config)
    assert {u.key for u in result.units} == {old_done, str(job_sent)}
    assert result.deleted_files == 3 + 2
    after_instances = _instance_files(root)
    after_results = _result_files(root)
    gone = before_instances - after_instances
    assert gone and all(old_done in p for p in gone) and len(gone) == 3
    sent_dir = f"results/{job_sent}/"
    assert before_results - after_results == {p for p in before_results if p.startswith(sent_dir)}
    # The unsent (pending) and held results are all still there.
    assert any(p.startswith(f"results/{job_unsent}/") for p in after_results)
    assert any(p.startswith(f"results/{job_held}/") for p in after_results)
    for uid in (old_unsent, old_queued, old_running, old_held, old_receiving, young):
        assert any(uid in p for p in after_instances), uid
    with ops_db.session() as s:
        assert s.scalar(select(func.count()).select_from(Series).where(Series.series_uid == old_done)) == 0
        assert s.scalar(select(func.count()).select_from(Output).where(Output.job_pk == job_sent)) == 0
        assert s.scalar(select(func.count()).select_from(Output).where(Output.job_pk == job_unsent)) == 2
        # The patient of the deleted series had nothing else: gone too (no names kept for nothing).
        assert s.scalar(select(func.count()).select_from(Patient)) == 6
        events = s.scalars(select(AuditEvent).where(AuditEvent.event == "cleanup")).all()
        assert {(e.series_uid, e.job_pk) for e in events} == {(old_done, None), ("", job_sent)}
    # A second run has nothing left to do.
    assert retention.cleanup(ops_db, ops_config).units == ()


def test_disk_watermark_deletes_oldest_first_but_never_unsent(ops_config: Config, ops_db: Database,
                                                              filler: Filler) -> None:
    config = dataclasses.replace(ops_config, retention=dataclasses.replace(
        ops_config.retention, keep_days=0, free_disk_target_mb=10))
    oldest = filler.series(days_old=9, size=300_000)
    unsent = filler.series(days_old=20, size=300_000)  # older, but its results are unsent
    unsent_job = filler.job(unsent, state="done", days_old=20, deliveries=("pending",))
    middle = filler.series(days_old=5, size=300_000)
    newest = filler.series(days_old=1, size=300_000)
    mib = 1024 * 1024
    # 1.5 MiB short of the target: the two oldest deletable series (2 × 0.86 MiB) are enough.
    free = 10 * mib - int(1.5 * mib)
    planned = retention.plan(ops_db, config, free_bytes=lambda: free)
    assert [(u.key, u.reason) for u in planned] == [(oldest, "disk"), (middle, "disk")]
    retention.cleanup(ops_db, config, free_bytes=lambda: free)
    with ops_db.session() as s:
        left = set(s.scalars(select(Series.series_uid)).all())
        assert left == {unsent, newest}
        assert s.scalar(select(func.count()).select_from(Output).where(Output.job_pk == unsent_job)) == 2
        assert s.scalar(select(func.count()).select_from(Instance)) == 6


def test_cleanup_command_dry_run_lists_and_deletes_nothing(tmp_path: Path, ops_config: Config,
                                                           filler: Filler) -> None:
    old = filler.series(days_old=31)
    job = filler.job(old, state="done", days_old=31, deliveries=("sent", "dead"))
    filler.series(days_old=1)
    root = ops_config.storage.root_path
    before = sorted(root.rglob("*.dcm"))
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[storage]\nroot = "{root}"\nfsync = false\n')
    out = subprocess.run([sys.executable, "-m", "lungnode.cli", "--config", str(cfg), "cleanup",
                          "--dry-run", "--json"], cwd=REPO, capture_output=True, text=True, check=True)
    report = json.loads(out.stdout)
    assert report["dry_run"] is True
    assert [(u["kind"], u["key"]) for u in report["units"]] == [("series", old), ("results", str(job))]
    assert sorted(root.rglob("*.dcm")) == before
    text = subprocess.run([sys.executable, "-m", "lungnode.cli", "--config", str(cfg), "cleanup",
                           "--dry-run"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "would delete\tseries\t" + old in text and "Doe" not in text
    subprocess.run([sys.executable, "-m", "lungnode.cli", "--config", str(cfg), "cleanup"], cwd=REPO,
                   capture_output=True, text=True, check=True)
    assert len(sorted(root.rglob("*.dcm"))) == len(before) - 3 - 2


def test_scheduled_retention_service_runs_cleanup(ops_config: Config, ops_db: Database,
                                                  filler: Filler) -> None:
    import time

    from lungnode.ops.retention import RetentionService

    old = filler.series(days_old=40)
    keep = filler.series(days_old=1)
    service = RetentionService(ops_config, ops_db, first_delay_s=0.2)
    service.start()
    try:
        deadline = time.monotonic() + 20
        while service.runs < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        service.stop()
    assert service.runs >= 1
    with ops_db.session() as s:
        assert set(s.scalars(select(Series.series_uid)).all()) == {keep}
    assert not any(old in str(p) for p in ops_config.storage.root_path.rglob("*.dcm"))
