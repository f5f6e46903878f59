"""The C-STORE handler and the group-commit writer: received bytes to durable file + row.

Per C-STORE (in the association's thread): check the context, take the bytes as sent
(``event.encoded_dataset()``: preamble + file meta + raw data set; no decoding), check the disk
watermark, parse the header with ``stop_before_pixels=True``, check it (:mod:`lungnode.node.policy`),
write a temp file and fsync it, then hand it to the :class:`GroupCommitWriter` and wait. The
writer files every instance waiting at that moment in one transaction (:meth:`Catalog.commit_batch`
renames the files into place before the commit), so one database commit serves several
associations and success is only answered after both file and row are durable.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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
from lungnode.storage.catalog import Catalog, Filed, Incoming, header_fields
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
    __slots__ = ("done", "item", "result")

    def __init__(self, item: Incoming) -> None:
        self.item = item
        self.done = threading.Event()
        self.result: Filed | BaseException = RuntimeError("not filed")


class GroupCommitWriter:
    """One thread that files waiting instances in batches (one transaction per batch).

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
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="lungnode-writer", daemon=True)
        self._stopping = False

    def start(self) -> None:
        """Start the writer thread."""
        self._thread.start()

    def submit(self, item: Incoming) -> Filed | BaseException:
        """File ``item`` and block until its batch committed; return the outcome."""
        if self._stopping or not self._thread.is_alive():
            return RuntimeError("writer stopped")
        pending = _Pending(item)
        self._queue.put(pending)
        pending.done.wait()
        return pending.result

    def stop(self, timeout: float = 10.0) -> None:
        """File what is queued, then stop the thread."""
        self._stopping = True
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            try:
                results = self.catalog.commit_batch([p.item for p in batch])
            except BaseException as exc:  # never leave a handler waiting
                results = [exc] * len(batch)
            for pending, result in zip(batch, results, strict=True):
                pending.result = result
                pending.done.set()


class StoreHandler:
    """The ``EVT_C_STORE`` handler.

    Parameters
    ----------
    catalog, store, writer:
        Storage.
    stats_for:
        Returns the :class:`AssociationStats` of an association.
    """

    def __init__(self, catalog: Catalog, store: FileStore, writer: GroupCommitWriter,
                 stats_for: Callable[[Any], AssociationStats]) -> None:
        self.catalog = catalog
        self.store = store
        self.writer = writer
        self.stats_for = stats_for

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
        header = parse_header(data, transfer_syntax)
        if isinstance(header, Refusal):
            return header
        refusal = check_instance(header, affected_class, str(request.AffectedSOPInstanceUID or ""))
        if refusal:
            return refusal
        fields = header_fields(header.dataset)
        digest = hashlib.sha256(data).hexdigest()
        tmp = self.store.temp_file()
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                if self.store.fsync:
                    fh.flush()
                    os.fsync(fh.fileno())
        except OSError as exc:
            tmp.unlink(missing_ok=True)
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
