"""The DIMSE listener: C-ECHO/C-STORE SCP with association policy, TLS and a clean stop.

:class:`ListenerWorker` runs one :class:`~lungnode.node.dimse.acceptor.Acceptor` (a thread per
association) in the current process, with its own :class:`GroupCommitWriter`, and supplies the
acceptor's hooks: association policy, storage (:class:`StoreHandler`) and the association log.
:class:`Listener` is what ``lungnode run`` starts: with ``node.listener_processes = 1`` one worker
in the main process; with more, that many child processes (``multiprocessing`` spawn), each binding
the same port with ``SO_REUSEPORT`` (the kernel spreads connections over them) and opening its own
database engine.

Association policy (checked when the A-ASSOCIATE-RQ arrived, before any data): an unknown calling
AE or an address outside the peer's network → A-ASSOCIATE-RJ rejected-permanent / service-user /
calling-AE-title-not-recognised; another called AE → called-AE-title-not-recognised; more than
``node.max_associations`` open → rejected-transient / service-provider (presentation) /
local-limit-exceeded. Stop: close the listening socket, let open associations finish for up to
``node.shutdown_grace_s``, abort the rest, close their rows.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import multiprocessing.process
import os
import signal
import ssl
import sys
import threading
import time
import uuid
from typing import Any

from pynetdicom.presentation import PresentationContext, build_context

from lungnode.config import Config
from lungnode.node.dimse.acceptor import Acceptor, AcceptorSettings
from lungnode.node.dimse.dataphase import DatasetSink
from lungnode.node.dimse.pdu import AssociationRequest, Command
from lungnode.node.ingest.catalog import Catalog
from lungnode.node.ingest.policy import SCP_SOP_CLASSES, SCP_TRANSFER_SYNTAXES
from lungnode.node.ingest.store import AssociationStats, GroupCommitWriter, StoreHandler
from lungnode.ops import metrics
from lungnode.storage.db import Database
from lungnode.storage.filestore import FileStore
from lungnode.uids import VERIFICATION

log = logging.getLogger(__name__)

#: Connections beyond ``node.max_associations`` and ``node.max_pending_connections`` that may be
#: open while negotiating (their A-ASSOCIATE-RQ is answered with the limit rejection).
CONNECTION_HEADROOM = 16
#: Largest P-DATA-TF PDU the node accepts (sent in the A-ASSOCIATE-AC): senders cap it at their own
#: maximum (DCMTK: 128 KiB), and the acceptor reads data sets in chunks, so memory stays bounded.
MAX_PDU_BYTES = 4 << 20
#: Interpreter thread switch interval while a listener runs (Python's default is 5 ms). A thread
#: coming back from a socket read or an fdatasync waits for the GIL up to this long while another
#: association's thread parses; with 0.5 ms one association stores ~25 % more instances a second.
SWITCH_INTERVAL_S = 0.0005
#: Allocations between young-generation garbage collections while a listener runs (Python's
#: default is 700). A C-STORE allocates a few thousand short-lived objects, nearly all freed by
#: reference counting; at the default the collector ran several times per instance and took
#: ~0.7 ms of its CPU (measured with 4 associations). Objects alive at start are frozen
#: (``gc.freeze``) so the older generations are not walked again and again either.
GC_YOUNG_THRESHOLD = 20_000


def supported_contexts() -> list[PresentationContext]:
    """The SCP presentation contexts: Verification, and every storage class in every syntax."""
    syntaxes = list(SCP_TRANSFER_SYNTAXES)
    contexts = [build_context(VERIFICATION, syntaxes[:2])]  # implicit and explicit VR little endian
    contexts += [build_context(sop_class, syntaxes) for sop_class in SCP_SOP_CLASSES]
    return contexts


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


def ingest_file_store(config: Config) -> FileStore:
    """The file store of a receiving process, as ``[storage]`` configures it."""
    storage = config.storage
    return FileStore(storage.root_path, fsync=storage.fsync, min_free_mb=storage.min_free_disk_mb,
                     direct_io=storage.direct_io)


def tune_garbage_collector() -> None:
    """Freeze the objects alive now and collect the young generation less often (see
    :data:`GC_YOUNG_THRESHOLD`); cyclic garbage is still collected, in larger steps."""
    gc.collect()
    gc.freeze()
    young, middle, old = gc.get_threshold()
    gc.set_threshold(max(GC_YOUNG_THRESHOLD, young), middle, old)


class ListenerWorker:
    """One acceptor in this process, and the hooks it calls.

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
        self._open: set[AssociationStats] = set()
        self._lock = threading.Lock()
        self.handler = StoreHandler(self.catalog, store, self.writer,
                                    max_dataset_bytes=config.storage.max_dataset_mb << 20)
        self.supported_contexts = supported_contexts()
        self.acceptor: Acceptor | None = None

    # ------------------------------------------------------------------ acceptor hooks
    def requested(self, request: AssociationRequest, peer: str) -> tuple[int, int, int] | None:
        """Association policy: ``None`` to accept, else the A-ASSOCIATE-RJ (result, source, reason)."""
        calling, called = request.calling_ae, request.called_ae
        rsd: tuple[int, int, int] | None = None
        if not any(p.allows(calling, peer) for p in self.config.node.peers):
            reason, rsd = "calling-ae", (0x01, 0x01, 0x03)
        elif called != self.config.node.ae_title:
            reason, rsd = "called-ae", (0x01, 0x01, 0x07)
        else:
            with self._lock:
                if len(self._open) >= self.config.node.max_associations:
                    reason, rsd = "limit", (0x02, 0x03, 0x02)
        if rsd is None:
            return None
        assoc_id = str(uuid.uuid4())
        log.info("association %s rejected (%s): calling AE %s, called AE %s, peer %s",
                 assoc_id, reason if reason != "limit" else
                 f"limit of {self.config.node.max_associations} reached", calling, called, peer)
        metrics.ASSOCIATIONS.labels(outcome=f"rejected-{reason}").inc()
        # Recorded (row + audit) before the peer hears the answer, so whoever sees the reject also
        # finds it in the database.
        try:
            self.catalog.association_rejected(assoc_id, calling_ae=calling, called_ae=called, peer=peer,
                                              reason=reason)
        except Exception:
            log.exception("could not record a rejected association")
        return rsd

    def accepted(self, request: AssociationRequest, peer: str) -> AssociationStats:
        """Open the association's row and running totals."""
        stats = AssociationStats(str(uuid.uuid4()), request.calling_ae, request.called_ae, peer)
        with self._lock:
            self._open.add(stats)
        metrics.ASSOCIATIONS.labels(outcome="accepted").inc()
        try:
            self.catalog.association_started(stats.assoc_id, calling_ae=stats.calling_ae,
                                             called_ae=stats.called_ae, peer=stats.peer)
        except Exception:
            log.exception("could not record association start")
        return stats

    def begin_store(self, token: object, command: Command, abstract_syntax: str,
                    transfer_syntax: str) -> DatasetSink:
        """Where the data set of a C-STORE goes (see :class:`StoreHandler`)."""
        assert isinstance(token, AssociationStats)
        return self.handler.begin(token, command, abstract_syntax, transfer_syntax)

    def finish_store(self, token: object, command: Command, transfer_syntax: str,
                     sink: DatasetSink) -> tuple[int, str]:
        """File or refuse a complete C-STORE; its status and error comment."""
        assert isinstance(token, AssociationStats)
        return self.handler.finish(token, command, transfer_syntax, sink)

    def ended(self, token: object, outcome: str) -> None:
        """Close the association's row and write its log line."""
        assert isinstance(token, AssociationStats)
        with self._lock:
            self._open.discard(token)
        self._finish(token, outcome)

    def _finish(self, stats: AssociationStats, outcome: str) -> None:
        with self._lock:
            if stats.recorded:
                return
            stats.recorded = True
        seconds = time.monotonic() - stats.started
        if outcome == "released":
            metrics.ASSOCIATIONS.labels(outcome="released").inc()
        else:
            metrics.ASSOCIATIONS.labels(outcome="aborted").inc()
        log.info("association %s %s: calling AE %s, peer %s, %d instance(s), %d byte(s), %d failure(s), "
                 "%.2f s", stats.assoc_id, outcome, stats.calling_ae, stats.peer, stats.instances,
                 stats.nbytes, stats.failures, seconds)
        try:
            self.catalog.association_ended(stats.assoc_id, outcome=outcome, instances=stats.instances,
                                           nbytes=stats.nbytes, failures=stats.failures,
                                           calling_ae=stats.calling_ae, peer=stats.peer, seconds=seconds)
        except Exception:
            log.exception("could not record association end")

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Bind the port and serve in background threads."""
        node = self.config.node
        self.writer.start()
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
        tune_garbage_collector()
        settings = AcceptorSettings(
            bind=node.bind, port=node.port, contexts=self.supported_contexts,
            acse_timeout_s=node.acse_timeout_s, dimse_timeout_s=node.dimse_timeout_s,
            network_timeout_s=node.network_timeout_s,
            max_connections=node.max_associations + node.max_pending_connections + CONNECTION_HEADROOM,
            max_pending=node.max_pending_connections,
            ssl_context=make_ssl_context(self.config), reuse_port=self.reuse_port,
            max_pdu=MAX_PDU_BYTES)
        self.acceptor = Acceptor(settings, self)
        self.acceptor.start()
        log.info("listening on %s:%d as %s (pid %d, TLS %s, direct I/O %s)", node.bind, node.port,
                 node.ae_title, os.getpid(), "on" if node.tls.enabled else "off",
                 "on" if self.handler.store.direct_io else "off")

    def stop(self, grace: float) -> None:
        """Stop accepting, let open associations finish for ``grace`` s, abort the rest."""
        acceptor = self.acceptor
        if acceptor is None:
            return
        acceptor.stop_accepting()
        start = time.monotonic()
        deadline = start + grace
        while time.monotonic() < deadline:
            # Wait for established associations, and for those negotiating during the first 5 s;
            # a connection that never sent a request (a port probe) is not waited for.
            if not acceptor.busy(negotiating_too=time.monotonic() - start < 5.0):
                break
            time.sleep(0.05)
        left = acceptor.busy(negotiating_too=False)
        if left:
            log.warning("aborting %d association(s) still open at shutdown", left)
        acceptor.abort_all()
        # Rows of aborted associations are closed by their threads; be sure of it.
        with self._lock:
            leftovers = list(self._open)
            self._open.clear()
        for stats in leftovers:
            self._finish(stats, "aborted-shutdown")
        self.writer.stop()
        self.catalog.close()
        self.acceptor = None


def _child_main(config: Config, ready: Any, stop_event: Any) -> None:
    """Entry point of a listener child process (spawned)."""
    from lungnode.logs import configure_logging

    configure_logging(config)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: stop_event.set())
    db = Database(config.storage.effective_database_url, create=False)
    store = ingest_file_store(config)
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
                log.error("listener process %s did not stop; killing it", proc.pid)
                proc.kill()
                proc.join(5)
        self._children.clear()

    @property
    def child_pids(self) -> list[int]:
        """Process ids of the listener children (empty with one listener)."""
        return [p.pid for p, _ in self._children if p.pid is not None]
