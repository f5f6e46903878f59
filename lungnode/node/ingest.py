"""The C-STORE handler and the group-commit writer: received bytes to durable file + row.

Per C-STORE (in the association's thread): check the context, take the bytes as sent
(``event.encoded_dataset()``: preamble + file meta + raw data set; no decoding), check the disk
watermark, parse the header with ``stop_before_pixels=True``, check it (:mod:`lungnode.node.policy`)
while a helper thread writes the bytes to a temp file and fsyncs it (the temp file of a refused
instance is removed), then hand it to the :class:`GroupCommitWriter` and wait. The
writer files every instance waiting at that moment in one transaction (:meth:`Catalog.commit_batch`
renames the files into place before the commit), so one database commit serves several
associations and success is only answered after both file and row are durable. The writer has no
thread: the first waiting handler leads the batch (see :class:`GroupCommitWriter`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from lungnode.node.policy import (
    STATUS_OUT_OF_RESOURCES,
    STATUS_PROCESSING_FAILURE,
    STATUS_SOP_CLASS_NOT_SUPPORTED,
    Refusal,
    check_instance,
    parse_header,
)
from lungnode.ops import metrics
from lungnode.storage.catalog import Catalog, Filed, Incoming, InstanceFields, header_fields
from lungnode.storage.filestore import DiskFullError, FileStore

LOG = logging.getLogger(__name__)


@dataclass
class AssociationStats:
    """Running totals of one association (updated by its own thread only)."""

    assoc_id: str
    calling_ae: str
    called_ae: str
    peer: str
    started: float = field(default_factory=time.monotonic)
    instances: int = 0
    nbytes: int = 0
    failures: int = 0
    duplicates: int = 0
    recorded: bool = False


class _Pending:
    __slots__ = ("done", "item", "lead", "result")

    def __init__(self, item: Incoming) -> None:
        self.item = item
        self.done = threading.Event()
        #: Set (with ``done``) when this waiter is to take over as leader.
        self.lead = False
        self.result: Filed | BaseException = RuntimeError("not filed")


class GroupCommitWriter:
    """Group commit without a thread of its own: the waiting handlers take turns as leader.

    A handler that submits while no batch is being filed becomes the leader: it files every
    instance waiting at that moment (its own included) in one transaction, hands each waiter its
    outcome, and, when more arrived meanwhile, wakes one of them to lead the next batch. With one
    association the handler thread commits its own instance (no hand-off to another thread and
    back, about 1 ms a C-STORE); with several, one commit serves all that wait.

    Parameters
    ----------
    catalog:
        Where batches are committed.
    max_batch:
        Most instances per transaction.
    """

    def __init__(self, catalog: Catalog, max_batch: int = 32) -> None:
        self.catalog = catalog
        self.max_batch = max_batch
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._waiting: list[_Pending] = []
        self._leading = False
        self._started = False
        self._stopping = False

    def start(self) -> None:
        """Accept submissions."""
        self._started = True

    def submit(self, item: Incoming) -> Filed | BaseException:
        """File ``item`` and block until its batch committed; return the outcome."""
        pending = _Pending(item)
        with self._lock:
            if self._stopping or not self._started:
                return RuntimeError("writer stopped")
            self._waiting.append(pending)
            lead = not self._leading
            self._leading = True
        if not lead:
            pending.done.wait()
            if not pending.lead:
                return pending.result
        self._lead(pending)
        return pending.result

    def stop(self, timeout: float = 10.0) -> None:
        """Refuse new submissions; wait up to ``timeout`` s for the batches being filed."""
        with self._lock:
            self._stopping = True
            self._idle.wait_for(lambda: not self._leading, timeout)

    def _lead(self, own: _Pending) -> None:
        """File batches until ``own`` is filed, then pass the lead to a waiter (if any)."""
        while True:
            with self._lock:
                batch = self._waiting[:self.max_batch]
                del self._waiting[:self.max_batch]
            try:
                results = self.catalog.commit_batch([p.item for p in batch])
            except BaseException as exc:  # never leave a handler waiting
                results = [exc] * len(batch)
            for pending, result in zip(batch, results, strict=True):
                pending.result = result
                if pending is not own:
                    pending.done.set()
            if any(p is own for p in batch):
                break
        with self._lock:
            if self._waiting:
                successor = self._waiting[0]
                successor.lead = True
                successor.done.set()
            else:
                self._leading = False
                self._idle.notify_all()


class StoreHandler:
    """The ``EVT_C_STORE`` handler.

    Parameters
    ----------
    catalog, store, writer:
        Storage.
    stats_for:
        Returns the :class:`AssociationStats` of an association.
    io_threads:
        Threads that write temp files (one per concurrently storing association is enough).
    """

    def __init__(self, catalog: Catalog, store: FileStore, writer: GroupCommitWriter,
                 stats_for: Callable[[Any], AssociationStats], io_threads: int = 8) -> None:
        self.catalog = catalog
        self.store = store
        self.writer = writer
        self.stats_for = stats_for
        self._io = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="lungnode-io")

    def __call__(self, event: Any) -> int | Dataset:
        """Handle one C-STORE request; return the status."""
        stats = self.stats_for(event.assoc)
        try:
            result = self._handle(event, stats)
        except Exception as exc:  # answer a failure rather than pynetdicom's 0xC211
            LOG.exception("C-STORE handler failed (association %s)", stats.assoc_id)
            result = Refusal(STATUS_PROCESSING_FAILURE, f"processing failure: {type(exc).__name__}")
        if isinstance(result, Refusal):
            stats.failures += 1
            metrics.INSTANCES_REJECTED.labels(reason=f"0x{result.status:04X}").inc()
            LOG.warning("C-STORE refused with 0x%04X: %s (association %s, calling AE %s)",
                        result.status, result.reason, stats.assoc_id, stats.calling_ae)
            try:
                self.catalog.instance_refused(
                    assoc_id=stats.assoc_id, calling_ae=stats.calling_ae, peer=stats.peer,
                    status=result.status, reason=result.reason,
                    sop_instance_uid=str(event.request.AffectedSOPInstanceUID or ""))
            except Exception:
                LOG.exception("could not audit a refused instance")
            return result.as_status()
        return result

    def _handle(self, event: Any, stats: AssociationStats) -> int | Refusal:
        request = event.request
        affected_class = str(request.AffectedSOPClassUID or "")
        if affected_class != str(event.context.abstract_syntax):
            return Refusal(STATUS_SOP_CLASS_NOT_SUPPORTED,
                           "SOP class not negotiated on this presentation context")
        data = event.encoded_dataset()
        try:
            self.store.check_space(len(data))
        except DiskFullError as exc:
            return Refusal(STATUS_OUT_OF_RESOURCES, str(exc))
        transfer_syntax = str(event.context.transfer_syntax)
        # The temp file is written and fsync'd in a helper thread (which does not hold the GIL
        # meanwhile) while this thread parses, checks and hashes; a refused instance's temp file is
        # removed again, so what is answered and recorded is as if the checks had come first.
        writing = self._io.submit(self.store.write_temp, data)
        try:
            checked = self._check(data, transfer_syntax, affected_class,
                                  str(request.AffectedSOPInstanceUID or ""))
        except BaseException:
            _discard(writing)
            raise
        if isinstance(checked, Refusal):
            _discard(writing)
            return checked
        fields, digest = checked
        try:
            tmp = writing.result()
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                return Refusal(STATUS_OUT_OF_RESOURCES, "disk full")
            raise
        outcome = self.writer.submit(Incoming(
            fields=fields, temp_path=tmp, sha256=digest, size=len(data),
            transfer_syntax_uid=transfer_syntax, calling_ae=stats.calling_ae,
            association_id=stats.assoc_id))
        if isinstance(outcome, BaseException):
            tmp.unlink(missing_ok=True)
            if isinstance(outcome, OSError) and outcome.errno in (errno.ENOSPC, errno.EDQUOT):
                return Refusal(STATUS_OUT_OF_RESOURCES, "disk full")
            return Refusal(STATUS_OUT_OF_RESOURCES, f"could not store: {type(outcome).__name__}")
        stats.instances += 1
        if outcome.outcome == "duplicate":
            stats.duplicates += 1
        else:
            stats.nbytes += len(data)
            metrics.BYTES_RECEIVED.inc(len(data))
        metrics.INSTANCES_RECEIVED.labels(calling_ae=stats.calling_ae).inc()
        return 0x0000

    @staticmethod
    def _check(data: bytes, transfer_syntax: str, affected_class: str,
               affected_instance: str) -> tuple[InstanceFields, str] | Refusal:
        """Parse and check the header; the row fields and the SHA-256 of the bytes, or a refusal."""
        header = parse_header(data, transfer_syntax)
        if isinstance(header, Refusal):
            return header
        refusal = check_instance(header, affected_class, affected_instance)
        if refusal:
            return refusal
        return header_fields(header.dataset), hashlib.sha256(data).hexdigest()

    def close(self) -> None:
        """Stop the temp-file writing threads (after the last association ended)."""
        self._io.shutdown(wait=True)


def _discard(writing: Future[Path]) -> None:
    """Wait for a temp-file write that is not needed any more and remove the file."""
    with contextlib.suppress(OSError):  # on a write error write_temp left nothing behind
        writing.result().unlink(missing_ok=True)
