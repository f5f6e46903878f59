"""The node's DICOM association acceptor: sockets, association negotiation, then the data phase.

One thread per connection, blocking reads, no polling. The thread reads the A-ASSOCIATE-RQ (within
``acse_timeout``), asks its :class:`~lungnode.node.dimse.dataphase.AcceptorHooks` whether to accept
(association policy lives in the listener), answers A-ASSOCIATE-AC or -RJ
(:mod:`lungnode.node.dimse.pdu`, built on pynetdicom's PDU classes and context negotiation), then
runs the DIMSE data phase (:mod:`lungnode.node.dimse.dataphase`): command fragments are collected
and decoded; data set fragments go straight to the
:class:`~lungnode.node.dimse.dataphase.DatasetSink` the hooks open for the C-STORE (a temp file),
in chunks as they arrive, so a large instance is never held whole in memory. When the last
fragment arrived the hooks decide the status, and the C-STORE-RSP is sent. C-ECHO is answered
there (on the Verification context only). A-RELEASE-RQ is answered with A-RELEASE-RP; a protocol
violation gets an A-ABORT; a lost connection ends the association as aborted. A partly received
data set is always discarded.

Bounds on what a peer can make the node hold (memory, threads, time):

* Sizes: the A-ASSOCIATE-RQ (:data:`~lungnode.node.dimse.pdu.MAX_ASSOCIATE_RQ_BYTES`), every P-DATA-TF
  (the maximum PDU length the node advertises), a command set
  (:data:`~lungnode.node.dimse.pdu.MAX_COMMAND_BYTES`, checked before its bytes are read) and the
  fixed-size PDUs (A-RELEASE-RQ) are checked against the length in their header before the body
  is read; a larger one gets an A-ABORT. Data sets go to the sink in chunks of
  :data:`~lungnode.node.dimse.dataphase.CHUNK_BYTES` (the sink enforces the data-set size limit).
* Time: a connection has ``acse_timeout_s`` from its accept to a complete A-ASSOCIATE-RQ; in the
  data phase each PDU header must arrive within the idle (``network_timeout_s``, or
  ``dimse_timeout_s`` inside a message) timeout and each PDU body within ``dimse_timeout_s`` of
  its header. These are deadlines for the whole PDU, not per read: a watchdog thread
  cuts a connection past its deadline, so a peer trickling a byte every few seconds cannot hold a
  thread. An association cut by a timeout gets an A-ABORT.
* Connections: at most ``max_pending`` connections that have not completed their
  A-ASSOCIATE-RQ (half-open: port scanners, tricklers); a new connection beyond that closes the
  oldest of them, so a flood of idle connections cannot keep a real caller (who sends its
  request at once) out. ``max_connections`` bounds all connections (and threads).

This replaces pynetdicom's association threads (a DUL thread and a reactor thread polling each
other every millisecond), which were most of the cost of a C-STORE on the node's machines.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import IO

from pynetdicom.presentation import PresentationContext

from lungnode.logs import log_exception
from lungnode.node.dimse import pdu
from lungnode.node.dimse.connection import Connection, cut_late, read_exact
from lungnode.node.dimse.dataphase import AcceptorHooks, DataPhase
from lungnode.node.dimse.pdu import AssociationRequest, ProtocolError
from lungnode.ops import metrics

log = logging.getLogger(__name__)

#: Read buffer of a connection.
READ_BUFFER_BYTES = 1 << 18
#: How often the watchdog looks for connections past their deadline (seconds, at most).
WATCHDOG_PERIOD_S = 0.25

#: A-ASSOCIATE-RJ (result, source, reason) for an unsupported application context / protocol.
REJECT_APPLICATION_CONTEXT = (0x01, 0x01, 0x02)
REJECT_PROTOCOL_VERSION = (0x01, 0x02, 0x02)


@dataclass
class AcceptorSettings:
    """Network settings of an :class:`Acceptor`."""

    bind: str
    port: int
    contexts: list[PresentationContext]
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 60.0
    #: Most open connections (negotiating or associated); more are closed at once.
    max_connections: int = 66
    #: Most connections that have not completed their A-ASSOCIATE-RQ; a new one beyond this closes
    #: the oldest of them.
    max_pending: int = 32
    ssl_context: ssl.SSLContext | None = None
    reuse_port: bool = False
    #: Largest P-DATA-TF PDU accepted from the peer (sent in the A-ASSOCIATE-AC; 0: no limit).
    max_pdu: int = 0


class Acceptor:
    """Listening socket plus one thread per association.

    Parameters
    ----------
    settings:
        Address, contexts, timeouts, TLS.
    hooks:
        Association policy and storage.
    """

    def __init__(self, settings: AcceptorSettings, hooks: AcceptorHooks) -> None:
        self.settings = settings
        self.hooks = hooks
        self.negotiator = pdu.Negotiator(settings.contexts, max_pdu=settings.max_pdu)
        self._server: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._connections: set[Connection] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._watchdog: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Bind, listen and accept in a background thread."""
        family = socket.AF_INET6 if ":" in self.settings.bind else socket.AF_INET
        server = socket.socket(family, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.settings.reuse_port:
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        server.bind((self.settings.bind, self.settings.port))
        server.listen(128)
        self._server = server
        self._accept_thread = threading.Thread(target=self._accept_loop, name="lungnode-accept",
                                               daemon=True)
        self._accept_thread.start()
        self._watchdog = threading.Thread(target=self._watch, name="lungnode-watchdog", daemon=True)
        self._watchdog.start()

    def _watch(self) -> None:
        """Cut connections whose PDU (or association request) is not complete by its deadline."""
        settings = self.settings
        timeouts = [t for t in (settings.acse_timeout_s, settings.dimse_timeout_s,
                                settings.network_timeout_s) if t]
        period = min([WATCHDOG_PERIOD_S, *(t / 4 for t in timeouts)])
        while not self._stopping.wait(period):
            with self._lock:
                connections = list(self._connections)
            cut_late(connections, time.monotonic())

    def stop_accepting(self) -> None:
        """Close the listening socket (open associations go on)."""
        self._stopping.set()
        server, self._server = self._server, None
        if server is not None:
            with contextlib.suppress(OSError):
                server.shutdown(socket.SHUT_RDWR)
            server.close()
        if self._accept_thread is not None:
            self._accept_thread.join(5)

    def busy(self, negotiating_too: bool) -> int:
        """Connections in an association (and, with ``negotiating_too``, negotiating one)."""
        states = {"associated", "negotiating"} if negotiating_too else {"associated"}
        with self._lock:
            return sum(1 for c in self._connections if c.state in states)

    def abort_all(self, join_s: float = 2.0) -> int:
        """Send A-ABORT on every open connection, close them, wait for their threads; how many."""
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            if conn.state == "associated":
                with contextlib.suppress(OSError):
                    conn.send(pdu.abort_pdu())
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
        for conn in connections:
            if conn.thread is not None:
                conn.thread.join(join_s)
        return len(connections)

    # ------------------------------------------------------------------ accept
    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            server = self._server
            if server is None:
                return
            try:
                sock, address = server.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                log.exception("accept failed")
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            acse = self.settings.acse_timeout_s
            conn = Connection(sock, str(address[0]), time.monotonic() + acse if acse else None)
            with self._lock:
                pending = sorted((c for c in self._connections if c.state == "connected" and not c.cut),
                                 key=lambda c: c.opened)
                evict = None
                if pending and (len(pending) >= self.settings.max_pending or
                                len(self._connections) >= self.settings.max_connections):
                    evict = pending[0]
                elif len(self._connections) >= self.settings.max_connections:
                    log.warning("connection from %s closed: %d connections open", conn.peer,
                                len(self._connections))
                    sock.close()
                    continue
                self._connections.add(conn)
            if evict is not None:
                log.warning("connection from %s closed after %.1f s without an association request: "
                            "%d connections are waiting for theirs", evict.peer,
                            time.monotonic() - evict.opened, len(pending))
                metrics.ASSOCIATIONS.labels(outcome="half-open-closed").inc()
                evict.cut_off("evicted")
            conn.thread = threading.Thread(target=self._serve, args=(conn,), name="lungnode-assoc",
                                           daemon=True)
            conn.thread.start()

    def _serve(self, conn: Connection) -> None:
        try:
            self._serve_connection(conn)
        except Exception as exc:
            log_exception(log, "association thread failed (peer %s)", exc, conn.peer)
        finally:
            conn.state = "closed"
            conn.close()
            with self._lock:
                self._connections.discard(conn)

    def _serve_connection(self, conn: Connection) -> None:
        settings = self.settings
        sock = conn.sock
        sock.settimeout(settings.acse_timeout_s)
        if settings.ssl_context is not None:
            try:
                sock = conn.sock = settings.ssl_context.wrap_socket(sock, server_side=True)
            except (OSError, ssl.SSLError) as exc:
                log.warning("TLS handshake from %s failed: %s", conn.peer, exc)
                metrics.ASSOCIATIONS.labels(outcome="tls-failed").inc()
                return
        reader: IO[bytes] = sock.makefile("rb", buffering=READ_BUFFER_BYTES)  # type: ignore[assignment]
        try:
            request = self._read_request(conn, reader)
            if request is None:
                return
            conn.state = "negotiating"
            conn.deadline = None
            rejection = self._check_request(request)
            if rejection is None:
                rejection = self.hooks.requested(request, conn.peer)
            if rejection is not None:
                self._reject(conn, rejection)
                return
            try:
                negotiated = self.negotiator.negotiate(request)
            except ProtocolError as exc:
                log.warning("connection from %s: %s", conn.peer, exc)
                conn.abort(exc.reason)
                return
            token = self.hooks.accepted(request, conn.peer)
            outcome = "aborted"
            try:
                conn.send(negotiated.ac_pdu)
                conn.state = "associated"
                outcome = DataPhase(conn, reader, negotiated.contexts, request.peer_max_pdu,
                                    self.hooks, token, settings.network_timeout_s,
                                    settings.dimse_timeout_s, settings.max_pdu).run()
            except OSError:
                outcome = "aborted"
            finally:
                self.hooks.ended(token, outcome)
        finally:
            reader.close()

    @staticmethod
    def _reject(conn: Connection, rejection: tuple[int, int, int]) -> None:
        with contextlib.suppress(OSError):
            conn.send(pdu.associate_rj(*rejection))
            conn.sock.shutdown(socket.SHUT_WR)

    def _read_request(self, conn: Connection, reader: IO[bytes]) -> AssociationRequest | None:
        try:
            header = read_exact(reader, 6)
            pdu_type, length = pdu.pdu_header(header)
            if pdu_type != pdu.A_ASSOCIATE_RQ_TYPE:
                raise ProtocolError(f"expected A-ASSOCIATE-RQ, got PDU type 0x{pdu_type:02X}",
                                    pdu.ABORT_REASON_UNEXPECTED_PDU)
            if length > pdu.MAX_ASSOCIATE_RQ_BYTES:
                raise ProtocolError(f"A-ASSOCIATE-RQ of {length} bytes, more than "
                                    f"{pdu.MAX_ASSOCIATE_RQ_BYTES}")
            return self.negotiator.decode(header + read_exact(reader, length))
        except pdu.RequestRejectedError as exc:
            log.warning("connection from %s rejected: %s", conn.peer, exc)
            metrics.ASSOCIATIONS.labels(outcome="rejected-malformed").inc()
            self._reject(conn, exc.rejection)
            return None
        except ProtocolError as exc:
            log.warning("connection from %s aborted: %s", conn.peer, exc)
            conn.abort(exc.reason)
            return None
        except (OSError, EOFError) as exc:  # closed, timed out or cut before a request (port probe)
            if conn.cut == "timeout" or isinstance(exc, TimeoutError):
                log.info("connection from %s closed: no complete A-ASSOCIATE-RQ within %.0f s",
                         conn.peer, self.settings.acse_timeout_s)
            return None

    @staticmethod
    def _check_request(request: AssociationRequest) -> tuple[int, int, int] | None:
        if not request.protocol_version & 0x0001:
            return REJECT_PROTOCOL_VERSION
        if request.application_context != pdu.APPLICATION_CONTEXT:
            return REJECT_APPLICATION_CONTEXT
        return None
