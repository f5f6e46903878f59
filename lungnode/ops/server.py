"""The HTTP endpoint of the node: ``/metrics`` (Prometheus), ``/healthz`` and the status pages.

A stdlib :class:`~http.server.ThreadingHTTPServer` in a daemon thread, bound to
``[metrics] bind:port`` (loopback by default; there is no authentication, so expose it only to the
Prometheus server, e.g. through a firewall rule or a reverse proxy).

``GET /metrics``
    Prometheus text format, summed over every process writing to the shared metrics folder. Before
    rendering, the gauges that describe state rather than events (jobs and deliveries by state, free
    disk) are refreshed from the database and the disk, so they are right whichever machine a
    worker runs on.
``GET /healthz``
    ``200`` with ``{"status": "ok", …}`` or ``503`` with ``{"status": "unhealthy", …}`` and the
    detail of each check (:mod:`lungnode.ops.health`). No patient data in either.
Everything else (``/``, ``/series/…``, ``/jobs/…``)
    Handed to the :class:`PageHandler` given as ``web`` (``lungnode run`` gives the status pages
    of :mod:`lungnode.node.web` when ``[web] enabled``); without one, 404.

:func:`make_service` builds the endpoint with every node check;
:func:`lungnode.node.web.app.make_service` (the ``DEFAULT_SERVICES`` entry of ``lungnode run``)
adds the status pages to it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import shutil
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Protocol

from sqlalchemy import func, select

from lungnode.config import Config
from lungnode.ops import health, metrics
from lungnode.storage import audit
from lungnode.storage.db import Database
from lungnode.storage.filestore import FileStore
from lungnode.storage.models import Delivery, Job

log = logging.getLogger(__name__)

#: Largest form body a page handler is given.
MAX_FORM_BYTES = 8192


@dataclass(frozen=True)
class Response:
    """What a page handler answers."""

    status: int
    body: bytes
    content_type: str
    headers: dict[str, str] = field(default_factory=dict)


class PageHandler(Protocol):
    """Pages served beside ``/metrics`` and ``/healthz`` (the node's status pages)."""

    def get(self, path: str) -> Response:
        """Answer a GET (query string removed)."""

    def post(self, path: str, form: bytes, client: str) -> Response:
        """Answer a POST with its form body and the client's address."""


JOB_STATES = ("queued", "running", "done", "failed", "held", "superseded")
DELIVERY_STATES = ("pending", "sent", "dead", "shadow")


def refresh_state_gauges(db: Database | None, storage_root: Path | None) -> None:
    """Set the jobs/deliveries-by-state and free-disk gauges from the database and the disk.

    Also forgets the live gauges (heartbeats, GPU memory) of processes that died unnoticed.
    """
    metrics.sweep_dead_processes()
    if storage_root is not None:
        with contextlib.suppress(OSError):
            metrics.FREE_DISK_BYTES.set(shutil.disk_usage(storage_root).free)
    if db is None:
        return
    try:
        with db.session() as s:
            jobs: dict[str, int] = {
                state: n for state, n in s.execute(select(Job.state, func.count()).group_by(Job.state))}
            deliveries: dict[str, int] = {
                state: n for state, n in s.execute(select(Delivery.state, func.count())
                                                   .group_by(Delivery.state))}
    except Exception as exc:  # the scrape still shows the event metrics
        log.warning("metrics: cannot read job/delivery counts: %s", type(exc).__name__)
        return
    for state in sorted(set(JOB_STATES) | set(jobs)):
        metrics.JOBS.labels(state).set(jobs.get(state, 0))
    for state in sorted(set(DELIVERY_STATES) | set(deliveries)):
        metrics.DELIVERY_QUEUE.labels(state).set(deliveries.get(state, 0))


class _Handler(BaseHTTPRequestHandler):
    server: MetricsHTTPServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            refresh_state_gauges(self.server.db, self.server.storage_root)
            body, ctype = metrics.render()
            self._send(200, body, ctype)
        elif path in ("/healthz", "/health"):
            report = health.run_checks(self.server.checks)
            self._send(200 if report.ok else 503, report.to_json().encode(), "application/json")
        elif self.server.web is not None:
            self._respond(self.server.web.get(path))
        elif path == "/":
            self._send(200, b"lungnode: /metrics /healthz\n", "text/plain; charset=utf-8")
        else:
            self._send(404, b"not found\n", "text/plain; charset=utf-8")

    def do_POST(self) -> None:
        if self.server.web is None:
            self._send(404, b"no\n", "text/plain; charset=utf-8")
            return
        declared = (self.headers.get("Content-Length") or "0").strip()
        length = int(declared) if declared.isdigit() else -1  # rfile.read(-1) would read to EOF
        if not 0 <= length <= MAX_FORM_BYTES:
            self.close_connection = True  # the unread body must not be taken for a request
            self._send(413 if length > MAX_FORM_BYTES else 400, b"no\n", "text/plain; charset=utf-8")
            return
        form = self.rfile.read(length)
        self._respond(self.server.web.post(self.path.split("?", 1)[0], form, self.client_address[0]))

    def _respond(self, response: Response) -> None:
        self._send(response.status, response.body, response.content_type, response.headers)

    def do_HEAD(self) -> None:
        path = self.path.split("?", 1)[0]
        if self.server.web is not None and path not in ("/metrics", "/healthz", "/health"):
            self._respond(self.server.web.get(path))  # the body is not written for HEAD
            return
        self._send(200 if path in ("/", "/metrics", "/healthz") else 404, b"", "text/plain")

    def _send(self, status: int, body: bytes, ctype: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        extra = headers or {}
        self.send_header("Cache-Control", extra.pop("Cache-Control", "no-store"))
        for name, value in extra.items():
            self.send_header(name, value)
        if ctype.startswith("text/html"):
            # nothing from elsewhere, no scripts: the pages work without JavaScript
            self.send_header("Content-Security-Policy",
                             "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; "
                             "form-action 'self'; frame-ancestors 'none'")
            self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("http %s " + format, self.client_address[0], *args)


class MetricsHTTPServer(ThreadingHTTPServer):
    """The HTTP server with what its handler needs."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], checks: Sequence[health.Check],
                 db: Database | None, storage_root: Path | None, web: PageHandler | None = None) -> None:
        self.checks = list(checks)
        self.db = db
        self.storage_root = storage_root
        self.web = web
        super().__init__(address, _Handler)


class MetricsService:
    """``/metrics`` and ``/healthz`` as a node service (``name``, ``start()``, ``stop(timeout)``).

    Parameters
    ----------
    bind, port:
        Where to listen (port 0: any free port; see :attr:`port` after :meth:`start`).
    checks:
        The health checks behind ``/healthz``.
    db, storage_root:
        Source of the state gauges refreshed at each scrape.
    optional:
        When the port is taken, log and carry on instead of failing (extra workers beside a node
        whose exporter already serves the shared metrics folder).
    enabled:
        ``False``: :meth:`start` does nothing.
    web:
        The status pages to serve beside ``/metrics`` (``None``: none).
    """

    name = "metrics"

    def __init__(self, bind: str, port: int, checks: Sequence[Callable[[], health.CheckResult]],
                 db: Database | None = None, storage_root: Path | None = None, *,
                 optional: bool = False, enabled: bool = True, web: PageHandler | None = None) -> None:
        self.bind = bind
        self.port = port
        self.checks = list(checks)
        self.db = db
        self.storage_root = storage_root
        self.optional = optional
        self.enabled = enabled
        self.web = web
        self._server: MetricsHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind and serve in a daemon thread (nothing when ``[metrics] enabled = false``)."""
        if not self.enabled:
            log.info("metrics: HTTP endpoint off ([metrics] enabled = false)")
            return
        try:
            self._server = MetricsHTTPServer((self.bind, self.port), self.checks, self.db,
                                             self.storage_root, self.web)
        except OSError as exc:
            if self.optional and exc.errno == errno.EADDRINUSE:
                log.info("metrics: %s:%d in use; another lungnode process exports this machine's "
                         "metrics", self.bind, self.port)
                return
            raise
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="metrics-http", daemon=True)
        self._thread.start()
        log.info("metrics: serving /metrics and /healthz on http://%s:%d", self.bind, self.port)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving and close the socket."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout)
        self._server = None

    @property
    def running(self) -> bool:
        """Whether the server is bound and serving."""
        return self._server is not None


def make_service(config: Config, db: Database, store: FileStore) -> MetricsService:
    """The endpoint with every node check (``lungnode run`` adds the pages: :mod:`lungnode.node.web`).

    Parameters
    ----------
    config, db, store:
        The node's configuration, database and file store.

    Returns
    -------
    MetricsService
        Not started.
    """
    audit.ensure_append_only(db)
    checks = health.standard_checks(config, db, listener=True,
                                    local_workers=config.jobs.local_workers)
    return MetricsService(config.metrics.bind, config.metrics.port, checks, db, store.root,
                          enabled=config.metrics.enabled)


def make_worker_service(config: Config, db: Database, store: FileStore) -> MetricsService:
    """The endpoint for a stand-alone ``lungnode worker`` (no listener; optional port).

    On a machine that also runs the node the port is taken and the worker's metrics reach
    Prometheus through the node's exporter (same metrics folder); on a worker-only machine the
    worker serves them itself.
    """
    checks = health.standard_checks(config, db, listener=False, local_workers=1)
    return MetricsService(config.metrics.bind, config.metrics.port, checks, db, store.root,
                          optional=True, enabled=config.metrics.enabled)
