"""The node's network path alone, for ``bench/ingest.py --breakdown``: not a DICOM node.

Runs lungnode's :class:`~lungnode.node.dimse.acceptor.Acceptor` (the same socket reading, association
negotiation, PDU and DIMSE code as ``lungnode run``, with the node's presentation contexts) with
hooks that accept every association from 127.0.0.1, drop each data set as it arrives and answer
every C-STORE with success. Nothing is written, checked, hashed or recorded. Its rate is the
ceiling the durable node could reach on the same machine if storing cost nothing, so
``bench/ingest.py`` can show how much of the distance to ``storescp --fork`` is the network path
and how much the durable work (files, fsync, SHA-256, header checks, database).

Prints ``ready`` when listening; on SIGTERM prints the instances and bytes it received as JSON
(the benchmark checks them) and exits.

Usage::

    .venv/bin/python -m bench.acceptor_only PORT
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Sequence

from lungnode.node.dimse.acceptor import Acceptor, AcceptorSettings
from lungnode.node.dimse.pdu import AssociationRequest, Command
from lungnode.node.ingest.listener import MAX_PDU_BYTES, supported_contexts


class CountingSink:
    """Counts a data set's bytes and drops them."""

    def __init__(self) -> None:
        self.nbytes = 0

    def write(self, chunk: bytes) -> None:
        """Count ``chunk`` and drop it."""
        self.nbytes += len(chunk)

    def discard(self) -> None:
        """Nothing is kept."""


class DiscardingHooks:
    """Acceptor hooks that accept everything and store nothing (see the module docstring)."""

    def __init__(self) -> None:
        self.instances = 0
        self.nbytes = 0
        self._lock = threading.Lock()

    def requested(self, request: AssociationRequest, peer: str) -> tuple[int, int, int] | None:
        """Accept every association (the socket is bound to 127.0.0.1 only)."""
        return None

    def accepted(self, request: AssociationRequest, peer: str) -> object:
        """No per-association state."""
        return None

    def begin_store(self, token: object, command: Command, abstract_syntax: str,
                    transfer_syntax: str) -> CountingSink:
        """A sink that drops the data set."""
        return CountingSink()

    def finish_store(self, token: object, command: Command, transfer_syntax: str,
                     sink: object) -> tuple[int, str]:
        """Count the instance; success."""
        assert isinstance(sink, CountingSink)
        with self._lock:
            self.instances += 1
            self.nbytes += sink.nbytes
        return 0x0000, ""

    def ended(self, token: object, outcome: str) -> None:
        """Nothing to record."""

    def totals(self) -> dict[str, int]:
        """Instances and bytes received so far."""
        with self._lock:
            return {"instances": self.instances, "bytes": self.nbytes}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or not args[0].isdigit():
        print(__doc__.rsplit("Usage::", 1)[1].strip(), file=sys.stderr)
        return 2
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})  # for sigwait
    hooks = DiscardingHooks()
    acceptor = Acceptor(AcceptorSettings(bind="127.0.0.1", port=int(args[0]),
                                         contexts=supported_contexts(), max_pdu=MAX_PDU_BYTES), hooks)
    acceptor.start()
    print("ready", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    acceptor.stop_accepting()
    acceptor.abort_all()
    print(json.dumps(hooks.totals()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
