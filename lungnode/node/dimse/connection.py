"""One accepted DICOM connection: its socket, state, deadline, and how it is cut and closed.

:class:`Connection` is what :mod:`lungnode.node.dimse.acceptor` keeps per connection: the state
("connected" until the A-ASSOCIATE-RQ is read, then "negotiating", "associated", "closed"), the
deadline by which the PDU being read must be complete (whole PDUs, not single reads: see
:func:`cut_late`, run by the acceptor's watchdog thread), sending under a lock, an A-ABORT, and
the close: after an A-ABORT the sending side is ended and what the peer still sends is read and
dropped for a bounded time, so the peer reads the A-ABORT (a close with unread data would be a
reset that discards it).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterable
from typing import IO

from lungnode.node.dimse import pdu

#: After an A-ABORT, what the peer still sends is read and dropped for up to this long (and
#: :data:`DRAIN_BYTES`) before the close.
DRAIN_S = 1.0
DRAIN_BYTES = 4 << 20


class Connection:
    """One accepted connection, served by its own thread."""

    def __init__(self, sock: socket.socket, peer: str, deadline: float | None) -> None:
        self.sock = sock
        self.peer = peer
        #: "connected" → "negotiating" (RQ read) → "associated" → "closed".
        self.state = "connected"
        self.thread: threading.Thread | None = None
        self.opened = time.monotonic()
        #: ``time.monotonic()`` by which the PDU being read must be complete (None: no limit).
        self.deadline = deadline
        #: Why the watchdog or the accept loop cut this connection ("" while it was not).
        self.cut = ""
        #: An A-ABORT was sent (the close waits for the peer's data to drain, see :meth:`close`).
        self.aborted = False
        self._send_lock = threading.Lock()

    def send(self, data: bytes) -> None:
        with self._send_lock:
            self.sock.sendall(data)

    def abort(self, reason: int = 0) -> None:
        """Send an A-ABORT (service provider, ``reason``); errors of a dead connection ignored."""
        self.aborted = True
        with contextlib.suppress(OSError):
            self.send(pdu.abort_pdu(reason=reason))

    def close(self) -> None:
        """Close the socket; after an A-ABORT first end the sending side and drop what the peer
        still sends, for a bounded time and amount (:data:`DRAIN_S`, :data:`DRAIN_BYTES`)."""
        sock = self.sock
        with contextlib.suppress(OSError, ValueError):
            if self.aborted and not self.cut:
                socket.socket.shutdown(sock, socket.SHUT_WR)
                deadline = time.monotonic() + DRAIN_S
                drained = 0
                while drained < DRAIN_BYTES:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    sock.settimeout(left)
                    chunk = socket.socket.recv(sock, 65536)
                    if not chunk:
                        break
                    drained += len(chunk)
        with contextlib.suppress(OSError):
            sock.close()

    def cut_off(self, why: str) -> None:
        """End the reads of this connection's thread (which then answers and closes): the socket
        is shut for reading, so a blocked read returns at once. Safe from another thread."""
        if self.cut:
            return
        self.cut = why
        with contextlib.suppress(OSError):
            # The plain socket's shutdown also for TLS: SSLSocket.shutdown drops the TLS state,
            # which the connection's own thread still needs to send its A-ABORT.
            socket.socket.shutdown(self.sock, socket.SHUT_RD)


def cut_late(connections: Iterable[Connection], now: float) -> int:
    """Cut the connections whose deadline passed before ``now``; how many."""
    late = [c for c in connections if c.deadline is not None and c.deadline < now and not c.cut]
    for conn in late:
        conn.cut_off("timeout")
    return len(late)


def read_exact(reader: IO[bytes], n: int) -> bytes:
    """``n`` bytes from ``reader``; EOFError when the peer closed first."""
    data = reader.read(n)
    if data is None or len(data) != n:
        raise EOFError(f"connection closed ({0 if data is None else len(data)} of {n} bytes)")
    return data
