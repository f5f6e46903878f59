"""The DIMSE listener: a pynetdicom C-ECHO/C-STORE SCP with access control, TLS and clean stop.

:class:`ListenerWorker` runs one pynetdicom association server (threads) in the current process,
with its own :class:`GroupCommitWriter`. :class:`Listener` is what ``lungnode run`` starts: with
``node.listener_processes = 1`` one worker in the main process; with more, that many child
processes (``multiprocessing`` spawn), each binding the same port with ``SO_REUSEPORT`` (the
kernel spreads connections over them) and opening its own database engine.

Association policy (checked at ``EVT_REQUESTED``, before any data): an unknown calling AE or an
address outside the peer's network → A-ASSOCIATE-RJ rejected-permanent / service-user /
calling-AE-title-not-recognised; another called AE → called-AE-title-not-recognised; more than
``node.max_associations`` open → rejected-transient / service-provider (presentation) /
local-limit-exceeded (pynetdicom's check). Stop: close the listening socket, let open
associations finish for up to ``node.shutdown_grace_s``, abort the rest, close their rows.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.process
import os
import signal
import socket
import ssl
import threading
import time
import uuid
from typing import Any

import pynetdicom.association
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from lungnode.config import Config
from lungnode.node.ingest import AssociationStats, GroupCommitWriter, StoreHandler
from lungnode.node.policy import SCP_SOP_CLASSES, SCP_TRANSFER_SYNTAXES
from lungnode.ops import metrics
from lungnode.storage.catalog import Catalog
from lungnode.storage.db import Database
from lungnode.storage.filestore import FileStore

LOG = logging.getLogger(__name__)

# pynetdicom tuning (facts.md): no per-PDU standard log handlers.
_config.LOG_HANDLER_LEVEL = "none"
#: Idle sleep of pynetdicom's DUL loop and association reactor loop (pynetdicom: 1 ms each).
DUL_LOOP_DELAY_S = 0.0002
#: DUL loop sleep while the association's C-STORE handler runs: the peer waits for our response
#: then, so fast polling only takes the GIL from the handler (measured: +2-5 % instances/s).
DUL_BUSY_LOOP_DELAY_S = 0.002


class _ShortPollTime:
    """``time`` for pynetdicom's association module with its 1 ms reactor nap shortened.

    The association reactor polls the DIMSE queue with a hard-coded ``time.sleep(0.001)``; with
    the DUL's own 1 ms nap that is most of the latency of a C-STORE (facts.md). Only sleeps of
    exactly 1 ms are shortened (measured: +15-20 % instances/s on one association); everything
    else is the real :mod:`time`.
    """

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        time.sleep(DUL_LOOP_DELAY_S if seconds == 0.001 else seconds)


pynetdicom.association.time = _ShortPollTime()  # type: ignore[assignment]


class _Server(ThreadedAssociationServer):
    """pynetdicom's threaded server with optional SO_REUSEPORT and a bounded TLS handshake."""

    reuse_port = False
    handshake_timeout = 30.0

    def server_bind(self) -> None:
        assert self.socket is not None
        if self.reuse_port:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        sock, address = self.socket.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context:
            sock.settimeout(self.handshake_timeout)
            try:
                sock = self.ssl_context.wrap_socket(sock, server_side=True)
            except (OSError, ssl.SSLError) as exc:
                LOG.warning("TLS handshake from %s failed: %s", address[0], exc)
                metrics.ASSOCIATIONS.labels(outcome="tls-failed").inc()
                sock.close()
                raise
            sock.settimeout(None)
        return sock, address


def make_ssl_context(config: Config) -> ssl.SSLContext | None:
    """Server TLS context from ``[node.tls]`` (None when TLS is off)."""
    tls = config.node.tls
    if not tls.enabled:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.cert, tls.key)
    if tls.ca:
        context.load_verify_locations(cafile=tls.ca)
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    return context


class ListenerWorker:
    """One association server in this process.

    Parameters
    ----------
    config:
        The configuration.
    db, store:
        Storage opened by the caller (closed by the caller).
    reuse_port:
        Bind with SO_REUSEPORT (several processes on one port).
    """

    def __init__(self, config: Config, db: Database, store: FileStore, *, reuse_port: bool = False) -> None:
        self.config = config
        self.catalog = Catalog(db, store, config.completion.quiet_period_s)
        self.writer = GroupCommitWriter(self.catalog)
        self.reuse_port = reuse_port
        self._stats: dict[int, AssociationStats] = {}
        self._lock = threading.Lock()
        self.handler = StoreHandler(self.catalog, store, self.writer, self._stats_for)
        self.server: _Server | None = None
        self.ae = self._make_ae()

    def _make_ae(self) -> AE:
        node = self.config.node
        ae = AE(ae_title=node.ae_title)
        ae.maximum_pdu_size = 0
        # The limit is enforced at EVT_REQUESTED (see _open_associations); pynetdicom's own check
        # stays as a backstop with headroom for threads of finished associations.
        ae.maximum_associations = node.max_associations + 50
        ae.acse_timeout = node.acse_timeout_s
        ae.dimse_timeout = node.dimse_timeout_s
        ae.network_timeout = node.network_timeout_s
        ae.require_called_aet = True
        syntaxes = list(SCP_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification, syntaxes[:2])  # implicit and explicit VR little endian
        for sop_class in SCP_SOP_CLASSES:
            ae.add_supported_context(sop_class, syntaxes)
        return ae

    # ------------------------------------------------------------------ events
    def _stats_for(self, assoc: Any) -> AssociationStats:
        with self._lock:
            stats = self._stats.get(id(assoc))
            if stats is None:  # should not happen: created at EVT_ACCEPTED
                stats = AssociationStats(str(uuid.uuid4()), "", "", "")
                self._stats[id(assoc)] = stats
            return stats

    def _on_c_store(self, event: Any) -> Any:
        """Run the C-STORE handler with the association's DUL polling slowed down meanwhile."""
        dul = event.assoc.dul
        dul._run_loop_delay = DUL_BUSY_LOOP_DELAY_S
        try:
            return self.handler(event)
        finally:
            dul._run_loop_delay = DUL_LOOP_DELAY_S

    def _on_requested(self, event: Any) -> None:
        assoc = event.assoc
        # The DUL thread polls its socket and sleeps 1 ms when idle; a shorter nap cuts the latency
        # of every C-STORE (facts.md: polling is 35-45 % of a C-STORE) for little CPU.
        assoc.dul._run_loop_delay = DUL_LOOP_DELAY_S
        rq = assoc.requestor.primitive
        calling = (rq.calling_ae_title or "").strip()
        called = (rq.called_ae_title or "").strip()
        peer = str(assoc.requestor.address)
        reason = ""
        if not any(p.allows(calling, peer) for p in self.config.node.peers):
            reason, rsd = "calling-ae", (0x01, 0x01, 0x03)
        elif called != self.config.node.ae_title:
            reason, rsd = "called-ae", (0x01, 0x01, 0x07)
        elif self._open_associations() >= self.config.node.max_associations:
            reason, rsd = "limit", (0x02, 0x03, 0x02)
        if not reason:
            return
        assoc_id = str(uuid.uuid4())
        LOG.info("association %s rejected (%s): calling AE %s, called AE %s, peer %s",
                 assoc_id, reason if reason != "limit" else
                 f"limit of {self.config.node.max_associations} reached", calling, called, peer)
        metrics.ASSOCIATIONS.labels(outcome=f"rejected-{reason}").inc()
        # Recorded (row + audit) before the peer hears the answer, so whoever sees the reject also
        # finds it in the database.
        try:
            self.catalog.association_rejected(assoc_id, calling_ae=calling, called_ae=called, peer=peer,
                                              reason=reason)
        except Exception:
            LOG.exception("could not record a rejected association")
        assoc.acse.send_reject(*rsd)
        assoc.kill()

    def _open_associations(self) -> int:
        """Associations of this process that were accepted and have not ended.

        Counted here rather than by pynetdicom, whose count includes threads of connections that
        never sent an A-ASSOCIATE-RQ (port probes wait out the ACSE timeout) and of associations
        already rejected or released whose threads have not exited yet.
        """
        with self._lock:
            return len(self._stats)

    def _on_rejected(self, event: Any) -> None:
        # pynetdicom's own rejection (association limit).
        assoc = event.assoc
        rq = assoc.requestor.primitive
        assoc_id = str(uuid.uuid4())
        calling = (rq.calling_ae_title or "").strip()
        peer = str(assoc.requestor.address)
        LOG.info("association %s rejected (limit of %d reached): calling AE %s, peer %s",
                 assoc_id, self.config.node.max_associations, calling, peer)
        metrics.ASSOCIATIONS.labels(outcome="rejected-limit").inc()
        try:
            self.catalog.association_rejected(assoc_id, calling_ae=calling,
                                              called_ae=(rq.called_ae_title or "").strip(), peer=peer,
                                              reason="limit")
        except Exception:
            LOG.exception("could not record a rejected association")

    def _on_accepted(self, event: Any) -> None:
        assoc = event.assoc
        rq = assoc.requestor.primitive
        stats = AssociationStats(str(uuid.uuid4()), (rq.calling_ae_title or "").strip(),
                                 (rq.called_ae_title or "").strip(), str(assoc.requestor.address))
        with self._lock:
            self._stats[id(assoc)] = stats
        metrics.ASSOCIATIONS.labels(outcome="accepted").inc()
        try:
            self.catalog.association_started(stats.assoc_id, calling_ae=stats.calling_ae,
                                             called_ae=stats.called_ae, peer=stats.peer)
        except Exception:
            LOG.exception("could not record association start")

    def _on_ended(self, event: Any, outcome: str) -> None:
        with self._lock:
            stats = self._stats.pop(id(event.assoc), None)
        if stats is not None:
            self._finish(stats, outcome)

    def _finish(self, stats: AssociationStats, outcome: str) -> None:
        if stats.recorded:
            return
        stats.recorded = True
        seconds = time.monotonic() - stats.started
        if outcome == "released":
            metrics.ASSOCIATIONS.labels(outcome="released").inc()
        else:
            metrics.ASSOCIATIONS.labels(outcome="aborted").inc()
        LOG.info("association %s %s: calling AE %s, peer %s, %d instance(s), %d byte(s), %d failure(s), "
                 "%.2f s", stats.assoc_id, outcome, stats.calling_ae, stats.peer, stats.instances,
                 stats.nbytes, stats.failures, seconds)
        try:
            self.catalog.association_ended(stats.assoc_id, outcome=outcome, instances=stats.instances,
                                           nbytes=stats.nbytes, failures=stats.failures,
                                           calling_ae=stats.calling_ae, peer=stats.peer, seconds=seconds)
        except Exception:
            LOG.exception("could not record association end")

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Bind the port and serve in background threads."""
        node = self.config.node
        self.writer.start()
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self._on_c_store),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_RELEASED, self._on_ended, ["released"]),
            (evt.EVT_ABORTED, self._on_ended, ["aborted"]),
        ]
        server_class = type("LungnodeServer", (_Server,), {"reuse_port": self.reuse_port,
                                                           "handshake_timeout": node.acse_timeout_s})
        server = self.ae.make_server((node.bind, node.port), ae_title=node.ae_title,
                                     ssl_context=make_ssl_context(self.config),
                                     evt_handlers=handlers, server_class=server_class)
        self.server = server  # type: ignore[assignment]
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                  name="lungnode-accept", daemon=True)
        thread.start()
        self.ae._servers.append(server)
        LOG.info("listening on %s:%d as %s (pid %d, TLS %s)", node.bind, node.port, node.ae_title,
                 os.getpid(), "on" if node.tls.enabled else "off")

    def stop(self, grace: float) -> None:
        """Stop accepting, let open associations finish for ``grace`` s, abort the rest."""
        server = self.server
        if server is None:
            return
        server.shutdown()  # closes the listening socket
        start = time.monotonic()
        deadline = start + grace
        while time.monotonic() < deadline:
            # Wait for established associations and those negotiating (A-ASSOCIATE-RQ received);
            # a connection that never sent a request (a port probe) is not waited for.
            busy = [a for a in server.active_associations
                    if a.is_established or (a.requestor.primitive is not None and not (
                        a.is_rejected or a.is_released or a.is_aborted)
                        and time.monotonic() - start < 5.0)]
            if not busy:
                break
            time.sleep(0.05)
        remaining = server.active_associations
        for assoc in remaining:
            if not assoc.is_established:
                assoc.abort()
                continue
            LOG.warning("aborting association still open at shutdown (%s, established %s, state %s)",
                        assoc.name, assoc.is_established, assoc.dul.state_machine.current_state)
            assoc.abort()
        for assoc in remaining:
            assoc.join(2.0)
        # Association rows of aborted associations are closed by EVT_ABORTED; be sure of it.
        with self._lock:
            leftovers = list(self._stats.values())
            self._stats.clear()
        for stats in leftovers:
            self._finish(stats, "aborted-shutdown")
        self.handler.close()
        self.writer.stop()
        self.server = None


def _child_main(config: Config, ready: Any, stop_event: Any) -> None:
    """Entry point of a listener child process (spawned)."""
    from lungnode.logs import configure_logging

    configure_logging(config)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: stop_event.set())
    db = Database(config.storage.effective_database_url, create=False)
    store = FileStore(config.storage.root_path, fsync=config.storage.fsync,
                      min_free_mb=config.storage.min_free_disk_mb)
    worker = ListenerWorker(config, db, store, reuse_port=True)
    try:
        worker.start()
        ready.set()
        stop_event.wait()
        worker.stop(config.node.shutdown_grace_s)
    finally:
        db.dispose()


class Listener:
    """The node's listener: in-process (1) or ``node.listener_processes`` spawned children.

    Parameters
    ----------
    config, db, store:
        Configuration and storage of the main process.
    """

    name = "listener"

    def __init__(self, config: Config, db: Database, store: FileStore) -> None:
        self.config = config
        self.db = db
        self.store = store
        self._worker: ListenerWorker | None = None
        self._children: list[tuple[multiprocessing.process.BaseProcess, Any]] = []

    def start(self) -> None:
        """Start listening; returns once every listener has bound the port."""
        n = self.config.node.listener_processes
        if n == 1:
            self._worker = ListenerWorker(self.config, self.db, self.store)
            self._worker.start()
            return
        ctx = multiprocessing.get_context("spawn")
        readies = []
        for i in range(n):
            ready, stop_event = ctx.Event(), ctx.Event()
            proc = ctx.Process(target=_child_main, args=(self.config, ready, stop_event),
                               name=f"lungnode-listener-{i}", daemon=False)
            proc.start()
            self._children.append((proc, stop_event))
            readies.append(ready)
        deadline = time.monotonic() + 120
        for i, ready in enumerate(readies):
            if not ready.wait(max(0.1, deadline - time.monotonic())):
                raise RuntimeError(f"listener process {i} did not start")

    def stop(self, timeout: float) -> None:
        """Stop every listener (grace for open associations is ``timeout``)."""
        if self._worker is not None:
            self._worker.stop(timeout)
            self._worker = None
        for _proc, stop_event in self._children:
            stop_event.set()
        for proc, _ in self._children:
            proc.join(timeout + 15)
            if proc.is_alive():
                LOG.error("listener process %s did not stop; killing it", proc.pid)
                proc.kill()
                proc.join(5)
        self._children.clear()

    @property
    def child_pids(self) -> list[int]:
        """Process ids of the listener children (empty with one listener)."""
        return [p.pid for p, _ in self._children if p.pid is not None]
