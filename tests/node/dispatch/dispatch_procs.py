"""Test processors for the dispatch tests (run inside real worker processes, no model needed).

``record``: reads every instance file of the job's series from the storage root (pydicom header),
appends one JSON line per finished job to ``$LUNGNODE_TEST_RECORD`` and returns ``done``.
``record_slow``: like ``record`` but sleeps ``$LUNGNODE_TEST_SLEEP`` seconds first; on the first
attempt of the job whose id is in ``$LUNGNODE_TEST_HANG_JOB`` it writes ``<record>.hang`` (its pid)
and sleeps for a minute, so the test can kill the worker mid-job.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pydicom
from sqlalchemy import select

from lungnode.node.dispatch.outcome import JobOutcome, PermanentJobError
from lungnode.node.dispatch.worker import WorkerContext
from lungnode.storage.models import Instance, Job, Series


def _append(line: dict[str, object]) -> None:
    path = os.environ["LUNGNODE_TEST_RECORD"]
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(line) + "\n").encode())
    finally:
        os.close(fd)


def record(job_pk: int, ctx: WorkerContext) -> JobOutcome:
    """Read the job's instance files and record the job as processed."""
    with ctx.db.session() as s:
        job = s.get(Job, job_pk)
        assert job is not None
        series = s.scalar(select(Series).where(Series.series_uid == job.series_uid))
        if series is None:
            raise PermanentJobError(f"series {job.series_uid} not stored")
        paths = list(s.scalars(select(Instance.path).where(Instance.series_pk == series.id,
                                                           Instance.current.is_(True))).all())
        attempts, count, hash_ = job.attempts, job.instance_count, job.instance_set_hash
    uids = set()
    for rel in paths:
        ds = pydicom.dcmread(ctx.store.path(rel), stop_before_pixels=True)
        uids.add(str(ds.SOPInstanceUID))
    if len(uids) != count:
        raise PermanentJobError(f"job says {count} instances, {len(uids)} files read")
    _append({"job": job_pk, "series": job.series_uid, "files": len(uids), "attempt": attempts,
             "pid": os.getpid(), "worker": ctx.worker_id, "hash": hash_})
    return JobOutcome("done", measurements={"files": len(uids)})


def record_slow(job_pk: int, ctx: WorkerContext) -> JobOutcome:
    """Sleep, optionally hang on one job's first attempt, then record the job (no files read)."""
    with ctx.db.session() as s:
        job = s.get(Job, job_pk)
        assert job is not None
        attempts, series_uid = job.attempts, job.series_uid
    if str(job_pk) == os.environ.get("LUNGNODE_TEST_HANG_JOB") and attempts == 1:
        Path(os.environ["LUNGNODE_TEST_RECORD"] + ".hang").write_text(str(os.getpid()))
        time.sleep(60)
    time.sleep(float(os.environ.get("LUNGNODE_TEST_SLEEP", "0.05")))
    _append({"job": job_pk, "series": series_uid, "attempt": attempts, "pid": os.getpid(),
             "worker": ctx.worker_id})
    return JobOutcome("done")
