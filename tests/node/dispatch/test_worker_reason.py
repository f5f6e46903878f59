"""Issue 20, item 6: what the worker records for an exception it did not expect is a sentence an
admin understands (where it happened, that the log has the details), never the exception's text,
which may quote data set values; the log keeps the stack and that text only at DEBUG."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from lungnode.config import Config, JobsConfig, StorageConfig
from lungnode.node.dispatch.outcome import JobOutcome
from lungnode.node.dispatch.worker import Worker, WorkerContext
from lungnode.storage.db import Database
from lungnode.storage.models import Job
from tests.node.dispatch.dispatch_helpers import seed_series

SECRET = "ZZPRIVACY^SECRET"


def test_unexpected_exception_is_recorded_as_a_sentence(tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    db = Database(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    (pk,) = seed_series(db, 1)
    config = Config(storage=StorageConfig(root=str(tmp_path / "store")),
                    jobs=JobsConfig(max_attempts=3, retry_delays_s=(0.0,), poll_s=0.05))

    def processor(job_pk: int, ctx: WorkerContext) -> JobOutcome:
        raise ValueError(f"Frame of Reference UID of {SECRET} does not match")

    caplog.set_level(logging.INFO)
    assert Worker(config, processor, db=db).run(max_jobs=1) == 1
    with db.session() as s:
        job = s.get(Job, pk)
        assert job is not None
        reason = str(job.reason)
    assert reason.startswith("unexpected internal error (ValueError in ")
    assert reason.endswith("the worker's log has the details") and SECRET not in reason
    errors = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert any("ValueError in" in r.getMessage() for r in errors)
    assert all(SECRET not in r.getMessage() for r in errors)
    db.dispose()
