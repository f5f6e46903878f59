"""The DIMSE data phase of one established association: P-DATA-TF PDUs until release or abort.

:class:`DataPhase` reads PDUs with whole-PDU deadlines (the connection's watchdog cuts a peer
past them), collects command fragments (bounded by
:data:`~lungnode.node.dimse.pdu.MAX_COMMAND_BYTES` before they are read), answers C-ECHO on the
Verification context, and streams each C-STORE data set in :data:`CHUNK_BYTES` pieces into the
:class:`DatasetSink` that its :class:`AcceptorHooks` open; when the data set is complete the hooks
decide the status and the C-STORE-RSP is sent. A protocol violation gets an A-ABORT; a partly
received data set is always discarded. :mod:`lungnode.node.dimse.acceptor` runs it after the
association is accepted.
"""

from __future__ import annotations

import logging
import time
from typing import IO, Protocol

from lungnode.node.dimse import pdu
from lungnode.node.dimse.connection import Connection, read_exact
from lungnode.node.dimse.pdu import AssociationRequest, Command, ProtocolError
from lungnode.uids import VERIFICATION

log = logging.getLogger(__name__)

#: Largest piece of a data set PDV read and handed to a sink at once.
CHUNK_BYTES = 1 << 20
#: Status "unrecognized operation" (PS3.7 C.5.9), for commands other than C-ECHO and C-STORE.
STATUS_UNRECOGNIZED_OPERATION = 0x0211
#: Status "refused: SOP class not supported" (PS3.7 C.5), e.g. a C-ECHO on a storage context.
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122


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


class DataPhase:
    """Reads PDUs of one established association until release, abort or error."""

    def __init__(self, conn: Connection, reader: IO[bytes], contexts: dict[int, tuple[str, str]],
                 peer_max_pdu: int, hooks: AcceptorHooks, token: object, network_timeout_s: float,
                 dimse_timeout_s: float, max_pdu: int) -> None:
        self.conn = conn
        self.reader = reader
        self.contexts = contexts
        self.peer_max_pdu = peer_max_pdu
        self.hooks = hooks
        self.token = token
        self.network_timeout_s = network_timeout_s
        self.dimse_timeout_s = dimse_timeout_s
        self.max_pdu = max_pdu
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
            self._abort(exc.reason)
            return "aborted"
        except (OSError, EOFError) as exc:
            if self.conn.cut or isinstance(exc, TimeoutError):
                log.warning("association with %s aborted: no complete PDU in time (network %.0f s, "
                            "DIMSE %.0f s)", self.conn.peer, self.network_timeout_s,
                            self.dimse_timeout_s)
                self._abort(0)
            return "aborted"
        finally:
            if self.sink is not None:
                self.sink.discard()
                self.sink = None

    def _abort(self, reason: int) -> None:
        self.conn.abort(reason)

    def _loop(self) -> str:
        reader, conn = self.reader, self.conn
        sock = conn.sock
        idle_timeout = self.network_timeout_s or None
        busy_timeout = self.dimse_timeout_s or None
        max_pdu = self.max_pdu
        current = sock.gettimeout()
        while True:
            wanted = idle_timeout if self.command is None else busy_timeout
            if wanted != current:  # settimeout is a system call that hands the GIL away
                sock.settimeout(wanted)
                current = wanted
            now = time.monotonic()
            conn.deadline = now + wanted if wanted else None  # the whole header, not each read
            pdu_type, length = pdu.pdu_header(read_exact(reader, 6))
            conn.deadline = time.monotonic() + busy_timeout if busy_timeout else None
            if pdu_type == pdu.P_DATA_TF_TYPE:
                if max_pdu and length > max_pdu:
                    raise ProtocolError(f"P-DATA-TF of {length} bytes, more than the maximum PDU "
                                        f"length of {max_pdu} this node advertised")
                self._p_data(length)
            elif pdu_type == pdu.A_RELEASE_RQ_TYPE:
                if length != 4:
                    raise ProtocolError(f"A-RELEASE-RQ of length {length} (4 expected)")
                read_exact(reader, length)
                conn.deadline = None
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
            size, context_id, is_command, last = pdu.pdv_header(read_exact(reader, pdu.PDV_HEADER_SIZE))
            remaining -= pdu.PDV_HEADER_SIZE
            if size > remaining:
                raise ProtocolError("PDV item longer than its PDU")
            remaining -= size
            if context_id not in self.contexts:
                raise ProtocolError(f"PDV on presentation context {context_id}, which was not accepted")
            if is_command:
                if len(self.command_bytes) + size > pdu.MAX_COMMAND_BYTES:  # before reading it
                    raise ProtocolError(f"command set longer than {pdu.MAX_COMMAND_BYTES} bytes")
                self._command_fragment(read_exact(reader, size), context_id, last)
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
                # Verification is answered on its own context only (PS3.7 9.1.5, PS3.4 A.4).
                verification = abstract_syntax == command.affected_sop_class == VERIFICATION
                status = 0x0000 if verification else STATUS_SOP_CLASS_NOT_SUPPORTED
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
            chunk = read_exact(reader, min(size, CHUNK_BYTES))
            size -= len(chunk)
            sink.write(chunk)
        if not last:
            return
        self.command = self.sink = None
        if command.command_field == pdu.C_STORE_RQ:
            transfer_syntax = self.contexts[context_id][1]
            deadline, self.conn.deadline = self.conn.deadline, None  # filing is not the peer's time
            status, comment = self.hooks.finish_store(self.token, command, transfer_syntax, sink)
            if deadline is not None and self.dimse_timeout_s:
                self.conn.deadline = time.monotonic() + self.dimse_timeout_s
        else:
            status, comment = STATUS_UNRECOGNIZED_OPERATION, ""
        self._respond(context_id, command, status, comment)

    def _respond(self, context_id: int, command: Command, status: int, comment: str) -> None:
        response = pdu.encode_response(command, status, comment)
        self.conn.send(pdu.p_data_pdus(context_id, response, command=True,
                                       peer_max_pdu=self.peer_max_pdu))
