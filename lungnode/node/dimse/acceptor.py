"""The node's DICOM association acceptor: sockets, association negotiation and the DIMSE data phase.

One thread per connection, blocking reads, no polling. The thread reads the A-ASSOCIATE-RQ (within
``acse_timeout``), asks its :class:`AcceptorHooks` whether to accept (association policy lives in
the listener), answers A-ASSOCIATE-AC or -RJ (:mod:`lungnode.node.dimse.pdu`, built on pynetdicom's PDU
classes and context negotiation), then reads P-DATA-TF PDUs: command fragments are collected and
decoded; data set fragments go straight to the :class:`DatasetSink` the hooks open for the C-STORE
(a temp file), in chunks as they arrive, so a large instance is never held whole in memory by this
module. When the last fragment arrived the hooks decide the status, and the C-STORE-RSP is sent.
C-ECHO is answered here. A-RELEASE-RQ is answered with A-RELEASE-RP; a protocol violation gets an
A-ABORT; a lost or timed-out connection ends the association as aborted. A partly received data set
is always discarded.

This replaces pynetdicom's association threads (a DUL thread and a reactor thread polling each
other every millisecond), which were most of the cost of a C-STORE on the node's machines.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
from dataclasses import dataclass
from typing import IO, Protocol

from pynetdicom.presentation import PresentationContext

from lungnode.node.dimse import pdu
from lungnode.node.dimse.pdu import AssociationRequest, Command, ProtocolError
from lungnode.ops import metrics

log = logging.getLogger(__name__)

#: Largest piece of a data set PDV read and handed to a sink at once.
CHUNK_BYTES = 1 << 20
#: Read buffer of a connection.
READ_BUFFER_BYTES = 1 << 18
#: Status "unrecognized operation" (PS3.7 C.5.9), for commands other than C-ECHO and C-STORE.
STATUS_UNRECOGNIZED_OPERATION = 0x0211

#: A-ASSOCIATE-RJ (result, source, reason) for an unsupported application context / protocol.
REJECT_APPLICATION_CONTEXT = (0x01, 0x01, 0x02)
REJECT_PROTOCOL_VERSION = (0x01, 0x02, 0x02)


class DatasetSink(Protocol):
    """Where the fragments of one C-STORE data set go while they arrive."""

    def write(self, chunk: bytes) -> None:
        """Take the next piece of the data set (errors are kept and reported by the hooks)."""

    def discard(self) -> None:
        """Drop what was received (association ended mid-message)."""


class AcceptorHooks(Protocol):
    """What the acceptor asks of the listener."""

    def requested(self, request: AssociationRequest, peer: str) -> tuple[int, int, int] | None:
        """``None`` to accept, or the A-ASSOCIATE-RJ (result, source, reason)."""

    def accepted(self, request: AssociationRequest, peer: str) -> object:
        """The association was accepted; return a token passed to the other hooks."""

    def begin_store(self, token: object, command: Command, abstract_syntax: str,
                    transfer_syntax: str) -> DatasetSink:
        """A C-STORE-RQ arrived; return the sink for its data set."""

    def finish_store(self, token: object, command: Command, transfer_syntax: str,
                     sink: DatasetSink) -> tuple[int, str]:
        """The data set is complete; return the C-STORE status and error comment."""

    def ended(self, token: object, outcome: str) -> None:
        """The association ended: ``released`` or ``aborted``."""


class _Discard:
    """A sink that drops everything (data set of a command the node does not serve)."""

    def write(self, chunk: bytes) -> None:
        pass

    def discard(self) -> None:
        pass


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
    ssl_context: ssl.SSLContext | None = None
    reuse_port: bool = False
    #: Largest P-DATA-TF PDU accepted from the peer (sent in the A-ASSOCIATE-AC; 0: no limit).
    max_pdu: int = 0


class _Connection:
    """One accepted connection, served by its own thread."""

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self.sock = sock
        self.peer = peer
        #: "connected" → "negotiating" (RQ read) → "associated" → "closed".
        self.state = "connected"
        self.thread: threading.Thread | None = None
        self._send_lock = threading.Lock()

    def send(self, data: bytes) -> None:
        with self._send_lock:
            self.sock.sendall(data)


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
        self._connections: set[_Connection] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()

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
            conn = _Connection(sock, str(address[0]))
            with self._lock:
                if len(self._connections) >= self.settings.max_connections:
                    log.warning("connection from %s closed: %d connections open", conn.peer,
                                len(self._connections))
                    sock.close()
                    continue
                self._connections.add(conn)
            conn.thread = threading.Thread(target=self._serve, args=(conn,), name="lungnode-assoc",
                                           daemon=True)
            conn.thread.start()

    def _serve(self, conn: _Connection) -> None:
        try:
            self._serve_connection(conn)
        except Exception:
            log.exception("association thread failed (peer %s)", conn.peer)
        finally:
            conn.state = "closed"
            with contextlib.suppress(OSError):
                conn.sock.close()
            with self._lock:
                self._connections.discard(conn)

    def _serve_connection(self, conn: _Connection) -> None:
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
            rejection = self._check_request(request)
            if rejection is None:
                rejection = self.hooks.requested(request, conn.peer)
            if rejection is not None:
                with contextlib.suppress(OSError):
                    conn.send(pdu.associate_rj(*rejection))
                    sock.shutdown(socket.SHUT_WR)
                return
            negotiated = self.negotiator.negotiate(request)
            token = self.hooks.accepted(request, conn.peer)
            outcome = "aborted"
            try:
                conn.send(negotiated.ac_pdu)
                conn.state = "associated"
                outcome = _DataPhase(conn, reader, negotiated.contexts, request.peer_max_pdu,
                                     self.hooks, token, settings).run()
            except OSError:
                outcome = "aborted"
            finally:
                self.hooks.ended(token, outcome)
        finally:
            reader.close()

    def _read_request(self, conn: _Connection, reader: IO[bytes]) -> AssociationRequest | None:
        try:
            header = _read_exact(reader, 6)
            pdu_type, length = pdu.pdu_header(header)
            if pdu_type != pdu.A_ASSOCIATE_RQ_TYPE or length > pdu.MAX_ASSOCIATE_RQ_BYTES:
                log.warning("connection from %s: expected A-ASSOCIATE-RQ, got PDU type 0x%02X (%d bytes)",
                            conn.peer, pdu_type, length)
                with contextlib.suppress(OSError):
                    conn.send(pdu.abort_pdu(reason=pdu.ABORT_REASON_UNEXPECTED_PDU))
                return None
            return self.negotiator.decode(header + _read_exact(reader, length))
        except ProtocolError as exc:
            log.warning("connection from %s: %s", conn.peer, exc)
            with contextlib.suppress(OSError):
                conn.send(pdu.abort_pdu(reason=exc.reason))
            return None
        except (OSError, EOFError):  # closed or timed out before a request (e.g. a port probe)
            return None

    @staticmethod
    def _check_request(request: AssociationRequest) -> tuple[int, int, int] | None:
        if not request.protocol_version & 0x0001:
            return REJECT_PROTOCOL_VERSION
        if request.application_context != pdu.APPLICATION_CONTEXT:
            return REJECT_APPLICATION_CONTEXT
        return None


class _DataPhase:
    """Reads PDUs of one established association until release, abort or error."""

    def __init__(self, conn: _Connection, reader: IO[bytes], contexts: dict[int, tuple[str, str]],
                 peer_max_pdu: int, hooks: AcceptorHooks, token: object,
                 settings: AcceptorSettings) -> None:
        self.conn = conn
        self.reader = reader
        self.contexts = contexts
        self.peer_max_pdu = peer_max_pdu
        self.hooks = hooks
        self.token = token
        self.settings = settings
        self.command_bytes = bytearray()
        self.command: Command | None = None
        self.command_context = 0
        self.sink: DatasetSink | None = None

    def run(self) -> str:
        """Serve messages; the outcome: ``released`` or ``aborted``."""
        try:
            return self._loop()
        except ProtocolError as exc:
            log.warning("association with %s aborted: %s", self.conn.peer, exc)
            with contextlib.suppress(OSError):
                self.conn.send(pdu.abort_pdu(reason=exc.reason))
            return "aborted"
        except (OSError, EOFError):
            return "aborted"
        finally:
            if self.sink is not None:
                self.sink.discard()
                self.sink = None

    def _loop(self) -> str:
        reader, sock = self.reader, self.conn.sock
        idle_timeout = self.settings.network_timeout_s or None
        busy_timeout = self.settings.dimse_timeout_s or None
        current = sock.gettimeout()
        while True:
            wanted = idle_timeout if self.command is None else busy_timeout
            if wanted != current:  # settimeout is a system call that hands the GIL away
                sock.settimeout(wanted)
                current = wanted
            pdu_type, length = pdu.pdu_header(_read_exact(reader, 6))
            if pdu_type == pdu.P_DATA_TF_TYPE:
                self._p_data(length)
            elif pdu_type == pdu.A_RELEASE_RQ_TYPE:
                _read_exact(reader, length)
                self.conn.send(pdu.RELEASE_RP)
                return "released"
            elif pdu_type == pdu.A_ABORT_TYPE:
                return "aborted"
            elif pdu_type in (pdu.A_ASSOCIATE_RQ_TYPE, pdu.A_ASSOCIATE_AC_TYPE,
                              pdu.A_ASSOCIATE_RJ_TYPE, pdu.A_RELEASE_RP_TYPE):
                raise ProtocolError(f"unexpected PDU type 0x{pdu_type:02X}",
                                    pdu.ABORT_REASON_UNEXPECTED_PDU)
            else:
                raise ProtocolError(f"unrecognized PDU type 0x{pdu_type:02X}",
                                    pdu.ABORT_REASON_UNRECOGNIZED_PDU)

    def _p_data(self, length: int) -> None:
        reader = self.reader
        remaining = length
        while remaining > 0:
            if remaining < pdu.PDV_HEADER_SIZE:
                raise ProtocolError("P-DATA-TF with a truncated PDV item")
            size, context_id, is_command, last = pdu.pdv_header(_read_exact(reader, pdu.PDV_HEADER_SIZE))
            remaining -= pdu.PDV_HEADER_SIZE
            if size > remaining:
                raise ProtocolError("PDV item longer than its PDU")
            remaining -= size
            if context_id not in self.contexts:
                raise ProtocolError(f"PDV on presentation context {context_id}, which was not accepted")
            if is_command:
                self._command_fragment(_read_exact(reader, size), context_id, last)
            else:
                self._dataset_fragment(size, context_id, last)

    def _command_fragment(self, data: bytes, context_id: int, last: bool) -> None:
        if self.command is not None:
            raise ProtocolError("command fragment while a data set was expected")
        self.command_bytes += data
        if len(self.command_bytes) > pdu.MAX_COMMAND_BYTES:
            raise ProtocolError("command set too long")
        if not last:
            return
        command = pdu.decode_command(bytes(self.command_bytes))
        self.command_bytes.clear()
        abstract_syntax, transfer_syntax = self.contexts[context_id]
        if not command.has_dataset:
            if command.command_field == pdu.C_ECHO_RQ:
                status = 0x0000
            elif command.command_field == pdu.C_STORE_RQ:
                raise ProtocolError("C-STORE-RQ without a data set")
            else:
                status = STATUS_UNRECOGNIZED_OPERATION
            self._respond(context_id, command, status, "")
            return
        self.command, self.command_context = command, context_id
        if command.command_field == pdu.C_STORE_RQ:
            self.sink = self.hooks.begin_store(self.token, command, abstract_syntax, transfer_syntax)
        else:
            self.sink = _Discard()

    def _dataset_fragment(self, size: int, context_id: int, last: bool) -> None:
        command, sink = self.command, self.sink
        if command is None or sink is None:
            raise ProtocolError("data set fragment without a command")
        if context_id != self.command_context:
            raise ProtocolError("data set on another presentation context than its command")
        reader = self.reader
        while size > 0:
            chunk = _read_exact(reader, min(size, CHUNK_BYTES))
            size -= len(chunk)
            sink.write(chunk)
        if not last:
            return
        self.command = self.sink = None
        if command.command_field == pdu.C_STORE_RQ:
            transfer_syntax = self.contexts[context_id][1]
            status, comment = self.hooks.finish_store(self.token, command, transfer_syntax, sink)
        else:
            status, comment = STATUS_UNRECOGNIZED_OPERATION, ""
        self._respond(context_id, command, status, comment)

    def _respond(self, context_id: int, command: Command, status: int, comment: str) -> None:
        response = pdu.encode_response(command, status, comment)
        self.conn.send(pdu.p_data_pdus(context_id, response, command=True,
                                       peer_max_pdu=self.peer_max_pdu))


def _read_exact(reader: IO[bytes], n: int) -> bytes:
    """``n`` bytes from ``reader``; EOFError when the peer closed first."""
    data = reader.read(n)
    if data is None or len(data) != n:
        raise EOFError(f"connection closed ({0 if data is None else len(data)} of {n} bytes)")
    return data
