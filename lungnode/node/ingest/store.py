"""The C-STORE handler and the group-commit writer: received bytes to durable file + row.

Per C-STORE (in the association's thread, called by :mod:`lungnode.node.dimse.acceptor`): when the
command arrives, check that its SOP class is the context's and that the disk is above the
watermark, and start a :class:`ReceivedDataset` (preamble + file meta + the data set bytes as
sent; no decoding), which writes each fragment to a temp file and hashes it as it arrives. When
the last fragment arrived, read the header (:func:`lungnode.node.ingest.policy.parse_header`, fast path
:mod:`lungnode.node.ingest.header`) and check it (the temp file of a refused instance is removed),
``fdatasync`` the temp file, then hand the instance to the :class:`GroupCommitWriter` and wait.
The writer files every instance waiting at that moment in one transaction
(:meth:`Catalog.commit_batch` renames the files into place before the commit), so one database
commit serves several associations and success is only answered after both file and row are
durable. The writer has no thread: the first waiting handler leads the batch (see
:class:`GroupCommitWriter`).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import mmap
import os
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from lungnode.logs import log_exception
from lungnode.node.dimse.pdu import IMPLEMENTATION_VERSION_NAME, Command
from lungnode.node.ingest.catalog import Catalog, Filed, Incoming, InstanceFields
from lungnode.node.ingest.policy import (
    DEFAULT_MAX_DATASET_BYTES,
    STATUS_DOES_NOT_MATCH,
    STATUS_OUT_OF_RESOURCES,
    STATUS_PROCESSING_FAILURE,
    STATUS_SOP_CLASS_NOT_SUPPORTED,
    Refusal,
    check_instance,
    parse_header,
)
from lungnode.ops import metrics
from lungnode.storage.filestore import DiskFullError, FileStore, write_all
from lungnode.uids import IMPLEMENTATION_CLASS_UID, is_valid_uid

log = logging.getLogger(__name__)

#: Instances up to this size are also kept in memory for the header checks (larger: ``mmap``).
#: With the 1 MiB read chunk and the 4 MiB PDU this bounds what one association holds in memory
#: (see docs/conformance.md, "Limits").
MEMORY_COPY_LIMIT = 16 << 20


@dataclass(eq=False)
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


class RefusedSink:
    """The sink of a C-STORE refused before its data set arrived: the data set is dropped."""

    def __init__(self, refusal: Refusal) -> None:
        self.refusal = refusal

    def write(self, chunk: bytes) -> None:
        """Drop ``chunk``."""

    def discard(self) -> None:
        """Nothing to drop."""


class ReceivedDataset:
    """A C-STORE data set as it arrives, written to its temp file piece by piece.

    The bytes are the file to be stored: preamble and file meta information, then the data set
    as sent. Each piece goes to the temp file (with ``O_DIRECT`` through the store's
    :class:`~lungnode.storage.filestore.DirectWriter` when the store uses direct I/O, else into
    the page cache as it arrives) and, up to :data:`MEMORY_COPY_LIMIT`, into a memory copy for
    the header checks and the SHA-256. :meth:`sync` hashes that copy in one call (each call
    hands the GIL to the other associations' threads and back, so one call per instance instead
    of one per fragment). A larger instance is hashed piece by piece from the moment it outgrows
    the limit and read back through ``mmap`` for the header (memory stays bounded). :meth:`sync`
    makes the file durable. A write error (disk full) is kept and reported at the end.
    """

    def __init__(self, store: FileStore, prefix: bytes, limit: int = DEFAULT_MAX_DATASET_BYTES) -> None:
        self.store = store
        self.size = 0
        #: Most bytes (file meta included) kept; beyond it the rest is dropped (:attr:`too_large`).
        self.limit = limit + len(prefix)
        self.too_large = False
        self.error: OSError | None = None
        self.fd, path, self._direct = store.open_direct()
        self.path: Path | None = path
        self._hash = hashlib.sha256()
        self._chunks: list[bytes] | None = []
        self._map: mmap.mmap | None = None
        self.write(prefix)

    @property
    def spilled(self) -> bool:
        """Whether the data set outgrew the memory limit (the header is read from the file)."""
        return self._chunks is None

    def write(self, chunk: bytes) -> None:
        """Take the next piece (dropped, with what was kept, once the data set outgrew its limit)."""
        self.size += len(chunk)
        if self.too_large:
            return
        if self.size > self.limit:
            self.too_large = True
            self.release()
            self._chunks = None
            if self.error is None:
                with contextlib.suppress(OSError):
                    self._close_direct()
                    os.ftruncate(self.fd, 0)  # give the disk space back now
            return
        if self._chunks is None:
            self._hash.update(chunk)
        elif self.size <= MEMORY_COPY_LIMIT:
            self._chunks.append(chunk)
        else:  # outgrew the memory copy: hash what it held, then each piece as it comes
            for held in self._chunks:
                self._hash.update(held)
            self._hash.update(chunk)
            self._chunks = None
        if self.error is None:
            try:
                if self._direct is not None:
                    self._direct.write(chunk)
                else:
                    write_all(self.fd, chunk)
            except OSError as exc:
                self.error = exc

    def complete(self) -> None:
        """The data set is complete: hand the last bytes to the file (a direct writer holds up to
        a flush's worth). A write error is kept in :attr:`error`."""
        if self._direct is not None and self.error is None and not self.too_large:
            try:
                self._direct.finish()
            except OSError as exc:
                self.error = exc

    def sync(self) -> tuple[Path, str]:
        """Make the temp file durable and close it; its path and the SHA-256 of its bytes (a data
        set still in memory is hashed here, in one call).

        Call after :meth:`complete`, when :attr:`error` is ``None``.
        """
        assert self.path is not None and self.error is None
        if self._chunks is not None:
            self._hash.update(self.contents())
        fd, self.fd = self.fd, -1
        try:
            if self.store.fsync:
                os.fdatasync(fd)
        finally:
            self._close_direct()
            os.close(fd)
        return self.path, self._hash.hexdigest()

    def _close_direct(self) -> None:
        direct, self._direct = self._direct, None
        if direct is not None:
            direct.close()

    def contents(self) -> bytes | mmap.mmap:
        """The whole file: from memory, or mapped from the temp file (a spilled data set)."""
        if self._chunks is not None:
            if len(self._chunks) != 1:
                self._chunks = [b"".join(self._chunks)]
            return self._chunks[0]
        if self._map is None:
            assert self.path is not None, "contents of a discarded data set"
            with open(self.path, "rb") as fh:
                self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        return self._map

    def release(self) -> None:
        """Drop the memory copy or mapping (the temp file stays)."""
        if self._chunks is not None:
            self._chunks = []
        if self._map is not None:
            self._map.close()
            self._map = None

    def discard(self) -> None:
        """Drop everything, the temp file included."""
        self.release()
        self._close_direct()
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None


class StoreHandler:
    """Turns a received C-STORE into a durable file + row, or a refusal (see the module docstring).

    Parameters
    ----------
    catalog, store, writer:
        Storage.
    """

    def __init__(self, catalog: Catalog, store: FileStore, writer: GroupCommitWriter, *,
                 max_dataset_bytes: int = DEFAULT_MAX_DATASET_BYTES) -> None:
        self.catalog = catalog
        self.store = store
        self.writer = writer
        self.max_dataset_bytes = max_dataset_bytes

    def begin(self, stats: AssociationStats, command: Command, abstract_syntax: str,
              transfer_syntax: str) -> ReceivedDataset | RefusedSink:
        """Open the sink of a C-STORE data set, or a refusal decided before it arrives."""
        if command.affected_sop_class != abstract_syntax:
            return RefusedSink(Refusal(STATUS_SOP_CLASS_NOT_SUPPORTED,
                                       "SOP class not negotiated on this presentation context"))
        if not is_valid_uid(command.affected_sop_instance):
            return RefusedSink(Refusal(STATUS_DOES_NOT_MATCH,
                                       "Affected SOP Instance UID of the request is not a valid UID"))
        try:
            self.store.check_space()
            return ReceivedDataset(self.store, file_prefix(command, transfer_syntax, stats.calling_ae),
                                   self.max_dataset_bytes)
        except DiskFullError as exc:
            return RefusedSink(Refusal(STATUS_OUT_OF_RESOURCES, str(exc)))
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                return RefusedSink(Refusal(STATUS_OUT_OF_RESOURCES, "disk full"))
            raise

    def finish(self, stats: AssociationStats, command: Command, transfer_syntax: str,
               sink: object) -> tuple[int, str]:
        """Decide a complete C-STORE: file and record it, or refuse it; the status and comment."""
        try:
            if isinstance(sink, RefusedSink):
                result: int | Refusal = sink.refusal
            else:
                assert isinstance(sink, ReceivedDataset)
                try:
                    result = self._file(stats, command, transfer_syntax, sink)
                finally:
                    sink.release()
                if isinstance(result, Refusal):
                    sink.discard()
        except Exception as exc:  # answer a failure rather than drop the association
            log_exception(log, "C-STORE handling failed (association %s)", exc, stats.assoc_id)
            if isinstance(sink, ReceivedDataset):
                sink.discard()
            result = Refusal(STATUS_PROCESSING_FAILURE, f"processing failure: {type(exc).__name__}")
        if not isinstance(result, Refusal):
            return result, ""
        stats.failures += 1
        metrics.INSTANCES_REJECTED.labels(reason=f"0x{result.status:04X}").inc()
        log.warning("C-STORE refused with 0x%04X: %s (association %s, calling AE %s)",
                    result.status, result.reason, stats.assoc_id, stats.calling_ae)
        try:
            self.catalog.instance_refused(
                assoc_id=stats.assoc_id, calling_ae=stats.calling_ae, peer=stats.peer,
                status=result.status, reason=result.reason,
                sop_instance_uid=command.affected_sop_instance)
        except Exception:
            log.exception("could not audit a refused instance")
        return result.status, result.reason

    def _file(self, stats: AssociationStats, command: Command, transfer_syntax: str,
              sink: ReceivedDataset) -> int | Refusal:
        if sink.too_large:
            return Refusal(STATUS_OUT_OF_RESOURCES, f"data set larger than the limit of "
                           f"{self.max_dataset_bytes >> 20} MiB ([storage] max_dataset_mb)")
        sink.complete()
        if sink.error is not None:
            if sink.error.errno in (errno.ENOSPC, errno.EDQUOT):
                return Refusal(STATUS_OUT_OF_RESOURCES, "disk full")
            raise sink.error
        try:
            self.store.check_space()  # the bytes are written: is the watermark still kept?
        except DiskFullError as exc:
            return Refusal(STATUS_OUT_OF_RESOURCES, str(exc))
        checked = self._check(sink.contents(), transfer_syntax, command.affected_sop_class,
                              command.affected_sop_instance)
        if isinstance(checked, Refusal):
            return checked
        try:
            temp_path, digest = sink.sync()
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            return Refusal(STATUS_OUT_OF_RESOURCES, "disk full")
        outcome = self.writer.submit(Incoming(
            fields=checked, temp_path=temp_path, sha256=digest, size=sink.size,
            transfer_syntax_uid=transfer_syntax, calling_ae=stats.calling_ae,
            association_id=stats.assoc_id))
        if isinstance(outcome, BaseException):
            temp_path.unlink(missing_ok=True)
            if isinstance(outcome, OSError) and outcome.errno in (errno.ENOSPC, errno.EDQUOT):
                return Refusal(STATUS_OUT_OF_RESOURCES, "disk full")
            return Refusal(STATUS_OUT_OF_RESOURCES, f"could not store: {type(outcome).__name__}")
        stats.instances += 1
        if outcome.outcome == "duplicate":
            stats.duplicates += 1
        else:
            stats.nbytes += sink.size
            metrics.BYTES_RECEIVED.inc(sink.size)
        metrics.INSTANCES_RECEIVED.labels(calling_ae=stats.calling_ae).inc()
        return 0x0000

    def _check(self, data: bytes | mmap.mmap, transfer_syntax: str, affected_class: str,
               affected_instance: str) -> InstanceFields | Refusal:
        """Parse and check the header; the row fields, or a refusal."""
        header = parse_header(data, transfer_syntax, max_dataset_bytes=self.max_dataset_bytes,
                              spill_dir=self.store.tmp)
        if isinstance(header, Refusal):
            return header
        refusal = check_instance(header, affected_class, affected_instance)
        if refusal:
            return refusal
        return header.fields


def file_prefix(command: Command, transfer_syntax: str, calling_ae: str) -> bytes:
    """Preamble, ``DICM`` and the file meta information of a received instance (PS3.10 7.1).

    Encoded here (explicit VR little endian, eight elements) rather than with pydicom, which took
    about 1 ms a C-STORE for it.
    """
    body = b"".join([
        _meta_element(0x0001, b"OB", b"\x00\x01"),
        _meta_element(0x0002, b"UI", _padded(command.affected_sop_class, b"\x00")),
        _meta_element(0x0003, b"UI", _padded(command.affected_sop_instance, b"\x00")),
        _meta_element(0x0010, b"UI", _padded(transfer_syntax, b"\x00")),
        _meta_element(0x0012, b"UI", _padded(IMPLEMENTATION_CLASS_UID, b"\x00")),
        _meta_element(0x0013, b"SH", _padded(IMPLEMENTATION_VERSION_NAME, b" ")),
        _meta_element(0x0016, b"AE", _padded(calling_ae, b" ")) if calling_ae else b"",
    ])
    return b"\x00" * 128 + b"DICM" + _meta_element(0x0000, b"UL", struct.pack("<I", len(body))) + body


def _padded(value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii", "replace")
    return raw + pad if len(raw) % 2 else raw


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2sxxI", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value
