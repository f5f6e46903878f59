"""The job queue's state machine on a real SQLite database, the worker loop in-process with real
processors, the model identity read from a real safetensors header, and the job CLI commands."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file
from sqlalchemy import select, update

from lungnode.cli import main
from lungnode.config import Config, InferenceConfig, JobsConfig, StorageConfig
from lungnode.node.dispatch import jobs
from lungnode.node.dispatch.outcome import JobOutcome, PermanentJobError, TransientJobError
from lungnode.node.dispatch.worker import Worker, WorkerContext
from lungnode.storage.db import Database
from lungnode.storage.models import Job, Series, aware, utcnow
from tests.node.dispatch.dispatch_helpers import cli, seed_series, write_config

CFG = JobsConfig(max_attempts=3, retry_delays_s=(0.0, 60.0), lease_s=5.0, heartbeat_s=1.0, poll_s=0.05)


@pytest.fixture
def db(tmp_path: Path) -> Database:
    return Database(f"sqlite:///{tmp_path / 'db.sqlite3'}")


def _state(db: Database, pk: int) -> Job:
    with db.session() as s:
        job = s.get(Job, pk)
        assert job is not None
        s.expunge(job)
        return job


def test_enqueue_is_idempotent_and_supersedes_active_jobs(db: Database) -> None:
    first = seed_series(db, 1)[0]
    model = jobs.ModelIdentity("lungnode-test", "1")
    running = jobs.claim(db, "w0", CFG)  # the first job is running when new content arrives
    assert running is not None and running.job_pk == first
    with db.session() as s:
        series = s.scalar(select(Series))
        assert series is not None
        again = jobs.enqueue_series(s, series, model)
    assert (again.job_pk, again.created) == (first, False)
    with db.session() as s:  # a new instance arrives: a different instance set
        series = s.scalar(select(Series))
        assert series is not None
        from lungnode.storage.models import Instance
        s.add(Instance(series_pk=series.id, sop_instance_uid="1.2.3.99", sop_class_uid="1.2",
                       transfer_syntax_uid="1.2", path="x", size_bytes=0, sha256=""))
        s.flush()
        newer = jobs.enqueue_series(s, series, model)
    assert newer.created and newer.superseded == (first,) and newer.supersedes_job_pk is None
    assert _state(db, first).state == "superseded"
    assert jobs.heartbeat(db, first, "w0", 5.0) is False, "the running worker learns it lost the job"
    assert jobs.finish(db, first, "w0", JobOutcome("done")) is False
    assert _state(db, first).state == "superseded"
    # once done, the next content change points at it as predecessor
    claim = jobs.claim(db, "w1", CFG)
    assert claim is not None and claim.job_pk == newer.job_pk
    assert jobs.finish(db, claim.job_pk, "w1", JobOutcome("done", measurements={"ml": 1.0}))
    assert jobs.finish(db, claim.job_pk, "w1", JobOutcome("done")) is False
    result = jobs.reprocess(db, Config(), series.series_uid)
    assert result.created and result.supersedes_job_pk == newer.job_pk
    assert jobs.counts(db) == {**dict.fromkeys(jobs.STATES, 0), "superseded": 1, "done": 1, "queued": 1}


def test_transient_retries_with_backoff_then_failed(db: Database) -> None:
    pk = seed_series(db, 1)[0]
    claim = jobs.claim(db, "w1", CFG)
    assert claim is not None and claim.attempt == 1
    assert jobs.fail(db, pk, "w1", "busy", transient=True, cfg=CFG) == "queued"  # delay 0 s
    claim = jobs.claim(db, "w1", CFG)
    assert claim is not None and claim.attempt == 2
    assert jobs.fail(db, pk, "w1", "busy", transient=True, cfg=CFG) == "queued"  # delay 60 s
    job = _state(db, pk)
    assert 55 < (aware(job.not_before) - utcnow()).total_seconds() <= 60  # type: ignore[operator]
    assert jobs.claim(db, "w1", CFG) is None, "backoff: not runnable before not_before"
    with db.session() as s:
        s.execute(update(Job).values(not_before=utcnow()))
    claim = jobs.claim(db, "w1", CFG)
    assert claim is not None and claim.attempt == 3
    assert jobs.fail(db, pk, "w1", "still busy", transient=True, cfg=CFG) == "failed"
    assert _state(db, pk).reason == "still busy"
    assert jobs.retry_job(db, pk).state == "queued"
    assert _state(db, pk).attempts == 0


def test_expired_lease_is_claimed_again_and_fails_after_last_attempt(db: Database) -> None:
    pk = seed_series(db, 1)[0]
    one = JobsConfig(max_attempts=2, lease_s=5.0, heartbeat_s=1.0)
    assert jobs.claim(db, "dead-worker", one) is not None
    assert jobs.claim(db, "w2", one) is None, "leased"
    past = utcnow() - dt.timedelta(seconds=1)
    with db.session() as s:
        s.execute(update(Job).values(lease_expires_at=past))
    claim = jobs.claim(db, "w2", one)
    assert claim is not None and claim.attempt == 2
    assert jobs.heartbeat(db, pk, "dead-worker", 5.0) is False
    assert jobs.heartbeat(db, pk, "w2", 5.0) is True
    with db.session() as s:
        s.execute(update(Job).values(lease_expires_at=past))
    assert jobs.claim(db, "w3", one) is None
    job = _state(db, pk)
    assert job.state == "failed" and "expired on attempt 2 of 2" in job.reason


def test_worker_loop_outcomes(db: Database, tmp_path: Path) -> None:
    pks = seed_series(db, 3)
    config = Config(storage=StorageConfig(root=str(tmp_path / "store")), jobs=CFG)
    seen: list[tuple[int, str]] = []

    def processor(job_pk: int, ctx: WorkerContext) -> JobOutcome:
        seen.append((job_pk, ctx.worker_id))
        if job_pk == pks[0]:
            return JobOutcome("held", reason="lung volume implausible")
        if job_pk == pks[1]:
            raise PermanentJobError("irregular slice spacing")
        raise TransientJobError("CUDA out of memory")

    worker = Worker(config, processor, db=db)
    assert worker.run(max_jobs=4) == 4
    assert [_state(db, pk).state for pk in pks] == ["held", "failed", "queued"]
    assert _state(db, pks[1]).reason == "irregular slice spacing"
    assert _state(db, pks[2]).attempts == 2 and _state(db, pks[2]).reason == "CUDA out of memory"
    assert len({w for _, w in seen}) == 1


def test_model_identity_from_bundle_header(tmp_path: Path) -> None:
    bundle = tmp_path / "model.safetensors"
    meta = {"name": "lungnode-r3d18", "version": "1.2.0", "weights_sha256": "ab" * 32}
    save_file({"w": np.zeros((2, 2), np.float32)}, str(bundle), metadata={"lungnode": json.dumps(meta)})
    config = dataclasses.replace(Config(), inference=InferenceConfig(model=str(bundle)))
    assert jobs.model_identity(config) == jobs.ModelIdentity("lungnode-r3d18", "1.2.0+abababababab")
    assert jobs.read_bundle_header(bundle)["lungnode"] == json.dumps(meta)
    missing = dataclasses.replace(Config(), inference=InferenceConfig())
    ident = jobs.model_identity(missing)
    assert ident.model_id  # packaged model or the demo fallback


def test_job_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    db = Database(url)
    pks = seed_series(db, 2)
    claim = jobs.claim(db, "w1", CFG)
    assert claim is not None
    jobs.fail(db, claim.job_pk, "w1", "unreadable pixel data", transient=False, cfg=CFG)
    cfg = write_config(tmp_path / "c.toml", {"storage": {"root": str(tmp_path), "database_url": url}})

    def run(*args: str) -> tuple[int, str]:
        code = main(["--config", str(cfg), *args])
        return code, capsys.readouterr().out

    code, out = run("jobs")
    assert code == 0 and "failed" in out and "unreadable pixel data" in out and "queued=1" in out
    assert run("jobs", "--state", "failed")[1].count("\n") == 4
    assert run("retry", str(pks[0]))[0] == 0
    assert _state(db, pks[0]).state == "queued"
    assert run("retry", str(pks[1]))[0] == 1, "a queued job is not retried"
    assert run("retry", "999")[0] == 1
    with db.session() as s:
        uid = s.scalars(select(Series.series_uid)).first()
    code, out = run("reprocess", str(uid))
    assert code == 0 and out.startswith("job 3 queued") and len(jobs.list_jobs(db)) == 3
    assert run("reprocess", "1.2.3.404")[0] == 1
    db.dispose()
    # the installed command runs too (one subprocess)
    assert "totals: queued=2" in cli(cfg, "jobs").stdout
