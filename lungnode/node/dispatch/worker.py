"""Job workers: the claim → heartbeat → process → finish loop, and the local worker pool.

This module owns where inference runs. A worker is a separate process (never the listener): it
claims a job from the database (:func:`lungnode.node.dispatch.jobs.claim`), renews the lease from a
heartbeat thread while a *processor* runs, and records the outcome. The processor is
:func:`run_pipeline` (the job pipeline, imported on first use in the worker process, so the
listener never imports torch); :class:`WorkerContext` gives it the config, database, file store,
worker id and a process-lifetime inference engine built on first use by :func:`default_engine`.
Both can be passed in (``Worker``, :func:`run_worker`, :class:`LocalWorkerPool`): tests and
benchmarks do that through their own launcher (``tests/launch.py``), never through the config.
The config keys ``jobs.processor`` and ``jobs.engine_factory`` (``module:function`` strings) still
work for this release and are deprecated (see :mod:`lungnode.config.load`).

``lungnode worker`` runs :func:`run_worker` in the foreground (one per machine or GPU; any number
against PostgreSQL). ``lungnode run`` starts :class:`LocalWorkerPool` (``jobs.local_workers``
spawned processes, restarted when they die); a crashed or OOM-killed worker cannot take the listener
down, and its job is leased again when the lease expires.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import multiprocessing.process
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lungnode.config import Config
from lungnode.logs import configure_logging, log_exception, where_raised
from lungnode.node.dispatch import jobs
from lungnode.node.dispatch.outcome import JobOutcome, PermanentJobError, TransientJobError
from lungnode.ops import metrics
from lungnode.ops.metrics import STAGE_SECONDS
from lungnode.storage.db import Database
from lungnode.storage.filestore import FileStore
from lungnode.storage.models import utcnow

log = logging.getLogger(__name__)

Processor = Callable[[int, "WorkerContext"], JobOutcome]


EngineFactory = Callable[[Config], Any]

#: Values of the deprecated ``jobs.processor`` / ``jobs.engine_factory`` keys that name the built-in
#: processor or engine (the defaults ``config.toml`` shipped, before and after the re-homing).
BUILTIN_HOOKS = frozenset({
    "lungnode.node.pipeline:process_job", "lungnode.node.dispatch.pipeline:process_job",
    "lungnode.node.pipeline:engine_from_config", "lungnode.node.dispatch.pipeline:engine_from_config",
})


def configured_hook(value: str) -> Any | None:
    """What a deprecated ``jobs.processor`` / ``jobs.engine_factory`` value names.

    ``None`` when the key is unset or names the built-in; otherwise the imported
    ``package.module:function``.
    """
    if not value or value in BUILTIN_HOOKS:
        return None
    module_name, _, attr = value.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def run_pipeline(job_pk: int, ctx: WorkerContext) -> JobOutcome:
    """The default processor: :func:`lungnode.node.dispatch.pipeline.process_job`.

    Imported here, on the first job, so that processes which never run a job do not load the
    pipeline (highdicom, the inference engine, torch).
    """
    from lungnode.node.dispatch.pipeline import process_job

    return process_job(job_pk, ctx)


def default_engine(config: Config) -> Any:
    """The default engine: :func:`lungnode.node.dispatch.pipeline.engine_from_config` (lazy import)."""
    from lungnode.node.dispatch.pipeline import engine_from_config

    return engine_from_config(config)


@dataclass
class WorkerContext:
    """What a processor gets besides the job id.

    Attributes
    ----------
    config, db, store:
        The node's configuration, database and file store (``store.path(instance.path)`` is the
        file of an instance row; remote workers mount the same storage root).
    worker_id:
        ``host:pid:random``, the lease owner.
    engine_factory:
        Builds the inference engine from the config; called once, on first use of :attr:`engine`
        (``None``: the deprecated ``jobs.engine_factory`` if set, else :func:`default_engine`).
    lease_lost:
        Set while a job runs when its lease was lost (the job was superseded by a newer job of the
        series, or re-leased after missed heartbeats): a long processor may check it and stop early;
        its outcome will not be recorded either way.
    """

    config: Config
    db: Database
    store: FileStore
    worker_id: str
    engine_factory: EngineFactory | None = None
    lease_lost: threading.Event = field(default_factory=threading.Event)
    _engine: Any = field(default=None, repr=False)

    @property
    def engine(self) -> Any:
        """The process-lifetime inference engine (created lazily; torch is imported here)."""
        if self._engine is None:
            factory = (self.engine_factory or configured_hook(self.config.jobs.engine_factory)
                       or default_engine)
            self._engine = factory(self.config)
        return self._engine


def make_worker_id() -> str:
    """A unique, readable worker id."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Worker:
    """One worker loop in the current process.

    Parameters
    ----------
    config:
        The node configuration.
    processor:
        Called for each claimed job; ``None``: the deprecated ``jobs.processor`` if set, else
        :func:`run_pipeline`.
    db:
        An existing database handle (a new one is opened from the config otherwise).
    engine_factory:
        Builds the engine (see :class:`WorkerContext`).
    """

    def __init__(self, config: Config, processor: Processor | None = None,
                 db: Database | None = None, engine_factory: EngineFactory | None = None) -> None:
        self.config = config
        self.db = db or Database(config.storage.effective_database_url)
        self.store = FileStore(config.storage.root_path, fsync=config.storage.fsync)
        self.ctx = WorkerContext(config, self.db, self.store, make_worker_id(),
                                 engine_factory=engine_factory)
        self._processor = processor
        self.stop_event = threading.Event()
        self.processed = 0

    @property
    def processor(self) -> Processor:
        """The processor (the one given, else the deprecated ``jobs.processor``, else the pipeline)."""
        if self._processor is None:
            self._processor = configured_hook(self.config.jobs.processor) or run_pipeline
        return self._processor

    def _heartbeat(self, job_pk: int, done: threading.Event, lost: threading.Event) -> None:
        cfg = self.config.jobs
        while not done.wait(cfg.heartbeat_s):
            metrics.worker_heartbeat()  # a busy worker is alive too (``/healthz`` staleness)
            try:
                if not jobs.heartbeat(self.db, job_pk, self.ctx.worker_id, cfg.lease_s):
                    log.warning("job %d is no longer ours (superseded or re-leased)", job_pk)
                    lost.set()
                    return
            except Exception:
                log.exception("heartbeat of job %d failed; retrying", job_pk)

    def run_once(self) -> bool:
        """Claim and process one job; return whether there was one."""
        claim = jobs.claim(self.db, self.ctx.worker_id, self.config.jobs)
        if claim is None:
            return False
        if claim.created_at is not None and claim.attempt == 1:
            STAGE_SECONDS.labels("queue_wait").observe(
                max(0.0, (utcnow() - claim.created_at).total_seconds()))
        log.info("job %d (series %s): attempt %d by %s", claim.job_pk, claim.series_uid, claim.attempt,
                 self.ctx.worker_id)
        done, lost = threading.Event(), self.ctx.lease_lost
        lost.clear()
        beat = threading.Thread(target=self._heartbeat, args=(claim.job_pk, done, lost),
                                name=f"heartbeat-{claim.job_pk}", daemon=True)
        beat.start()
        started = time.monotonic()
        try:
            outcome = self.processor(claim.job_pk, self.ctx)
        except PermanentJobError as exc:
            state = jobs.fail(self.db, claim.job_pk, self.ctx.worker_id, str(exc), transient=False,
                              cfg=self.config.jobs)
            log.warning("job %d failed permanently: %s", claim.job_pk, exc)
        except Exception as exc:
            transient = isinstance(exc, TransientJobError)
            # An unexpected exception's text may quote data set values and means nothing to an
            # admin: the job records a sentence, the log the stack (its text only at DEBUG).
            reason = str(exc) if transient else (
                f"unexpected internal error ({where_raised(exc)}); the worker's log has the details")
            state = jobs.fail(self.db, claim.job_pk, self.ctx.worker_id, reason, transient=True,
                              cfg=self.config.jobs)
            if transient:
                log.warning("job %d attempt %d failed (%s) -> %s", claim.job_pk, claim.attempt, reason,
                            state)
            else:
                log_exception(log, "job %d attempt %d failed -> %s", exc, claim.job_pk, claim.attempt,
                              state)
        else:
            ok = jobs.finish(self.db, claim.job_pk, self.ctx.worker_id, outcome)
            state = outcome.state if ok else None
            log.info("job %d %s in %.1f s", claim.job_pk, state or "finished but no longer ours",
                     time.monotonic() - started)
        finally:
            done.set()
            beat.join(timeout=5)
            metrics.sample_gpu_memory()
        self.processed += 1
        return True

    def run(self, max_jobs: int | None = None) -> int:
        """Loop until :attr:`stop_event` is set (or ``max_jobs`` were processed); return the count."""
        poll = self.config.jobs.poll_s
        while not self.stop_event.is_set():
            metrics.worker_heartbeat()
            try:
                got = self.run_once()
            except Exception:
                log.exception("worker loop error (database unreachable?); retrying")
                got = False
                self.stop_event.wait(min(5.0, poll * 5))
            if max_jobs is not None and self.processed >= max_jobs:
                break
            if not got:
                self.stop_event.wait(poll)
        return self.processed


def run_worker(config: Config, processor: Processor | None = None,
               stop: Any | None = None, engine_factory: EngineFactory | None = None) -> int:
    """Run a worker in this process until SIGTERM/SIGINT (or ``stop`` is set).

    Parameters
    ----------
    config:
        The node configuration.
    processor:
        What runs a job (default: :func:`run_pipeline`).
    stop:
        An event (threading or multiprocessing) that ends the loop when set.
    engine_factory:
        Builds the engine (default: :func:`default_engine`).

    Returns
    -------
    int
        Jobs processed.
    """
    worker = Worker(config, processor, engine_factory=engine_factory)

    def _on_signal(signum: int, _frame: Any) -> None:
        log.info("worker %s: signal %d, stopping after the current job", worker.ctx.worker_id, signum)
        worker.stop_event.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
    if stop is not None:
        def _watch() -> None:
            stop.wait()
            worker.stop_event.set()
        threading.Thread(target=_watch, daemon=True, name="stop-watch").start()
    log.info("worker %s started (database %s)", worker.ctx.worker_id,
             "PostgreSQL" if not worker.db.is_sqlite else "SQLite")
    try:
        return worker.run()
    finally:
        worker.db.dispose()


def _pool_child(config: Config, processor: Processor | None,
                engine_factory: EngineFactory | None) -> None:
    configure_logging(config, "worker %(process)d")
    run_worker(config, processor, engine_factory=engine_factory)


class LocalWorkerPool:
    """``jobs.local_workers`` worker processes beside the listener, restarted when they die.

    Processes are started with the ``spawn`` method (no forked database connections or listener
    threads). A monitor thread restarts a dead worker after a short delay; its job is leased again
    by whichever worker claims next once the lease has expired. Workers are stopped with SIGTERM
    (they finish the current job), never through a shared multiprocessing primitive: a worker
    killed while waiting on one would leave it locked and hang the node's shutdown.
    ``processor`` and ``engine_factory`` are passed to every worker (see :class:`Worker`).
    """

    name = "workers"

    def __init__(self, config: Config, count: int | None = None, restart_delay_s: float = 1.0, *,
                 processor: Processor | None = None, engine_factory: EngineFactory | None = None) -> None:
        self.config = config
        # Handed to each spawned worker: must be module-level functions (pickled by reference).
        self.processor = processor
        self.engine_factory = engine_factory
        self.count = config.jobs.local_workers if count is None else count
        self.restart_delay_s = restart_delay_s
        self._ctx = multiprocessing.get_context("spawn")
        self._procs: list[multiprocessing.process.BaseProcess | None] = [None] * self.count
        self._monitor: threading.Thread | None = None
        self._halt = threading.Event()
        self.restarts = 0

    def _spawn(self, slot: int) -> None:
        proc = self._ctx.Process(target=_pool_child,
                                 args=(self.config, self.processor, self.engine_factory),
                                 name=f"lungnode-worker-{slot}", daemon=False)
        proc.start()
        self._procs[slot] = proc
        log.info("local worker %d started (pid %s)", slot, proc.pid)

    def pids(self) -> list[int]:
        """Process ids of the live workers."""
        return [p.pid for p in self._procs if p is not None and p.pid is not None and p.is_alive()]

    def _watch(self) -> None:
        while not self._halt.wait(0.5):
            for slot, proc in enumerate(self._procs):
                if proc is not None and not proc.is_alive() and not self._halt.is_set():
                    log.warning("local worker %d (pid %s) exited with %s; restarting", slot, proc.pid,
                                proc.exitcode)
                    self.restarts += 1
                    if proc.pid is not None:
                        metrics.mark_process_dead(proc.pid)
                    if self._halt.wait(self.restart_delay_s):
                        return
                    self._spawn(slot)

    def start(self) -> None:
        """Start the workers and the monitor."""
        for slot in range(self.count):
            self._spawn(slot)
        self._monitor = threading.Thread(target=self._watch, name="worker-monitor", daemon=True)
        self._monitor.start()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the workers (they finish the current job), wait ``timeout`` s, then SIGKILL."""
        self._halt.set()
        if self._monitor is not None:
            self._monitor.join(timeout=2)
        live = [p for p in self._procs if p is not None and p.is_alive()]
        for proc in live:
            proc.terminate()
        deadline = time.monotonic() + timeout
        for proc in live:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in live:
            if proc.is_alive():
                log.warning("local worker pid %s did not stop in %.0f s; killing it", proc.pid, timeout)
                proc.kill()
                proc.join(2)
            if proc.pid is not None:
                metrics.mark_process_dead(proc.pid)


def make_service(config: Config, db: Database, store: FileStore) -> LocalWorkerPool:
    """Service factory for :class:`~lungnode.node.app.NodeApp`: the local worker pool."""
    return LocalWorkerPool(config)
