"""The file store: where received instances and our outputs live on disk, written durably.

Layout under the storage root::

    <root>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm      received, version 1
    <root>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.v2.dcm   a later different copy
    <root>/results/<job id>/<kind>-<SOPInstanceUID>.dcm                   our outputs
    <root>/web/job-<job id>.png                                           a job's picture (web page)
    <root>/.tmp/                                                          in-flight writes

Every UID is checked against the DICOM grammar before it becomes a path. A write goes to a temp
file in ``.tmp`` (same filesystem), is fsync'd, renamed into place, and the folder is fsync'd, so
after a crash a file is either complete or absent; leftovers in ``.tmp`` are removed at start.

Received instances can be written with ``O_DIRECT`` (:class:`DirectWriter`): the bytes go from a
page-aligned buffer to the disk without being copied into the page cache first. With fsync on,
that copy and its later write-back were the largest single CPU cost of a C-STORE on the node's
machines (a 0.5 MB file written and fdatasync'd: 1.7 ms of CPU buffered, 0.5 ms direct). The
store probes at start whether its filesystem accepts ``O_DIRECT`` (tmpfs, for one, does not) and
falls back to page-cache writes when it does not.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import shutil
import threading
import uuid
from pathlib import Path

from lungnode.uids import require_uid

log = logging.getLogger(__name__)

TMP_DIR = ".tmp"
#: Alignment of ``O_DIRECT`` writes: file offsets, lengths and buffer addresses are multiples of
#: it (4096 covers disks with 512-byte and 4 KiB logical blocks).
DIRECT_IO_ALIGN = 4096
#: A :class:`DirectWriter` writes once this many bytes are gathered, and at the end: an instance
#: up to this size (a CT slice is ~0.5 MB) is written with one system call after its last
#: fragment arrived. Writing every 256 KiB as fragments arrive was slower (each direct write
#: blocks the receiving thread until the disk has the data).
DIRECT_IO_FLUSH_BYTES = 2 << 20
#: Idle staging buffers kept for reuse (one per association writing at the same time).
DIRECT_IO_POOL_SIZE = 8


class DiskFullError(OSError):
    """Free space on the storage root is below the configured watermark."""


def fsync_dir(folder: Path) -> None:
    """fsync a folder, so that renames and new entries in it survive a crash."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DirectWriter:
    """Streams bytes into a file opened with ``O_DIRECT``, through a page-aligned staging buffer.

    Bytes are gathered in the buffer and written in multiples of :data:`DIRECT_IO_ALIGN`;
    :meth:`finish` writes the last partial block through the page cache. The buffer goes back
    to its pool in :meth:`close`.

    Parameters
    ----------
    fd:
        A descriptor opened with ``O_DIRECT`` (see :meth:`FileStore.open_direct`).
    pool:
        Where the staging buffer comes from.
    """

    def __init__(self, fd: int, pool: StagingPool) -> None:
        self.fd = fd
        self.pool = pool
        self.buffer: mmap.mmap | None = pool.acquire()
        self.view = memoryview(self.buffer)
        self.size = 0
        self._filled = 0

    def write(self, data: bytes | memoryview) -> None:
        """Append ``data`` to the file."""
        source = memoryview(data)
        capacity, flush_at = len(self.view), self.pool.flush_bytes
        while source:
            n = min(len(source), capacity - self._filled)
            self.view[self._filled:self._filled + n] = source[:n]
            self._filled += n
            self.size += n
            source = source[n:]
            if self._filled >= flush_at:
                self._flush_blocks()

    def _flush_blocks(self) -> None:
        """Write the whole blocks gathered and keep the partial one at the start of the buffer."""
        whole = self._filled - self._filled % DIRECT_IO_ALIGN
        write_all(self.fd, self.view[:whole])
        rest = self._filled - whole
        if rest:
            self.view[:rest] = self.view[whole:self._filled]
        self._filled = rest

    def finish(self) -> None:
        """Write what is left: the whole blocks direct, the last partial block through the page
        cache (``O_DIRECT`` is switched off for it; the caller's fdatasync writes it)."""
        if self._filled >= DIRECT_IO_ALIGN:
            self._flush_blocks()
        if self._filled:
            flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
            fcntl.fcntl(self.fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
            write_all(self.fd, self.view[:self._filled])
        self._filled = 0

    def close(self) -> None:
        """Give the staging buffer back (the descriptor is the caller's)."""
        buffer, self.buffer = self.buffer, None
        if buffer is not None:
            self.view.release()
            self.pool.release(buffer)


class StagingPool:
    """Page-aligned buffers for :class:`DirectWriter`, reused so that their memory stays mapped.

    Parameters
    ----------
    flush_bytes:
        A writer writes once this many bytes are gathered (a multiple of
        :data:`DIRECT_IO_ALIGN`); a buffer holds that plus one block.
    keep:
        Most idle buffers kept.
    """

    def __init__(self, flush_bytes: int = DIRECT_IO_FLUSH_BYTES, keep: int = DIRECT_IO_POOL_SIZE) -> None:
        if flush_bytes <= 0 or flush_bytes % DIRECT_IO_ALIGN:
            raise ValueError(f"flush_bytes must be a positive multiple of {DIRECT_IO_ALIGN}")
        self.flush_bytes = flush_bytes
        self.keep = keep
        self._idle: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def acquire(self) -> mmap.mmap:
        """An idle buffer, or a new one."""
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return mmap.mmap(-1, self.flush_bytes + DIRECT_IO_ALIGN)

    def release(self, buffer: mmap.mmap) -> None:
        """Return ``buffer`` (closed when enough are idle)."""
        with self._lock:
            if len(self._idle) < self.keep:
                self._idle.append(buffer)
                return
        buffer.close()


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write all of ``data`` to ``fd`` (``os.write`` may write less than it was given)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def supports_direct_io(folder: Path) -> bool:
    """Whether files in ``folder`` can be written with ``O_DIRECT`` (one aligned block is tried)."""
    if not hasattr(os, "O_DIRECT"):
        return False
    probe = folder / f"direct-io-probe-{uuid.uuid4().hex}.part"
    buffer = mmap.mmap(-1, DIRECT_IO_ALIGN)
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o600)
        try:
            os.write(fd, buffer)
        finally:
            os.close(fd)
        return True
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
            return False
        raise
    finally:
        buffer.close()
        with contextlib.suppress(OSError):
            probe.unlink()


class FileStore:
    """Durable files under a storage root.

    Parameters
    ----------
    root:
        The storage root folder (created if missing).
    fsync:
        fsync files and folders before a write counts as done.
    min_free_mb:
        Refuse writes when free space would drop under this many MiB.
    direct_io:
        Write received instances with ``O_DIRECT`` when ``fsync`` is on and the filesystem
        supports it (:attr:`direct_io` says whether it is used).
    """

    def __init__(self, root: Path, *, fsync: bool = True, min_free_mb: int = 0,
                 direct_io: bool = False) -> None:
        self.root = Path(root)
        self.fsync = fsync
        self.min_free_bytes = int(min_free_mb) * 1024 * 1024
        self.tmp = self.root / TMP_DIR
        self.tmp.mkdir(parents=True, exist_ok=True)
        #: Whether :meth:`open_direct` writes with ``O_DIRECT`` (asked for, fsync on, supported).
        self.direct_io = bool(direct_io and fsync and supports_direct_io(self.tmp))
        if direct_io and fsync and not self.direct_io:
            log.info("the storage root's filesystem does not take O_DIRECT: page-cache writes")
        self.staging = StagingPool()

    def instance_relpath(self, study_uid: str, series_uid: str, sop_uid: str, version: int = 1) -> str:
        """Relative path of a received instance; raises InvalidUIDError on a bad UID."""
        study = require_uid("StudyInstanceUID", study_uid)
        series = require_uid("SeriesInstanceUID", series_uid)
        sop = require_uid("SOPInstanceUID", sop_uid)
        name = f"{sop}.dcm" if version == 1 else f"{sop}.v{version}.dcm"
        return f"{study}/{series}/{name}"

    def output_relpath(self, job_id: int, kind: str, sop_uid: str) -> str:
        """Relative path of an output object of a job."""
        sop = require_uid("SOPInstanceUID", sop_uid)
        if kind not in ("seg", "sr", "sc", "summary", "pdf"):
            raise ValueError(f"unknown output kind {kind!r}")
        return f"results/{int(job_id)}/{kind}-{sop}.dcm"

    @staticmethod
    def picture_relpath(job_id: int) -> str:
        """Relative path of a job's picture on the status web page (deleted with its results)."""
        return f"web/job-{int(job_id)}.png"

    def path(self, relpath: str) -> Path:
        """Absolute path of a stored relative path."""
        return self.root / relpath

    def free_bytes(self) -> int:
        """Free bytes on the storage root's filesystem (for unprivileged users)."""
        return shutil.disk_usage(self.root).free

    def check_space(self, incoming_bytes: int = 0) -> None:
        """Raise :class:`DiskFullError` when the watermark would be crossed."""
        if self.min_free_bytes and self.free_bytes() - incoming_bytes < self.min_free_bytes:
            raise DiskFullError(f"free disk below {self.min_free_bytes // (1024 * 1024)} MiB")

    def temp_file(self) -> Path:
        """A fresh, empty temp path inside ``.tmp`` (same filesystem as the store)."""
        fd, path = self.open_temp()
        os.close(fd)
        return path

    def open_temp(self) -> tuple[int, Path]:
        """Create a fresh temp file in ``.tmp`` for writing; its descriptor and path.

        The caller writes into the page cache and, with ``fsync`` on, calls ``os.fdatasync``
        when the file is complete, before :meth:`commit_temp` or its own rename.
        """
        return self._create_temp(0)

    def _create_temp(self, extra_flags: int) -> tuple[int, Path]:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | extra_flags
        path = self.tmp / f"{uuid.uuid4().hex}.part"
        return os.open(path, flags, 0o600), path

    def open_direct(self) -> tuple[int, Path, DirectWriter | None]:
        """Like :meth:`open_temp`, with a :class:`DirectWriter` when :attr:`direct_io` is on.

        Without one (``None``) the caller writes to the descriptor itself, into the page cache.
        Either way the caller fdatasyncs the file when it is complete (with ``fsync`` on).
        """
        if not self.direct_io:
            fd, path = self.open_temp()
            return fd, path, None
        fd, path = self._create_temp(os.O_DIRECT)
        return fd, path, DirectWriter(fd, self.staging)

    def write_bytes(self, relpath: str, data: bytes | memoryview) -> Path:
        """Write ``data`` durably to ``relpath`` (temp file, fsync, rename, fsync folder)."""
        self.check_space(len(data))
        tmp = self.temp_file()
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                if self.fsync:
                    fh.flush()
                    os.fsync(fh.fileno())
            return self.commit_temp(tmp, relpath)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def commit_temp(self, tmp: Path, relpath: str) -> Path:
        """Move a complete (already fsync'd) temp file to ``relpath`` and fsync the folder."""
        final = self.root / relpath
        folder = final.parent
        if not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            if self.fsync:
                fsync_dir(folder.parent)
                fsync_dir(folder.parent.parent)
        os.replace(tmp, final)
        if self.fsync:
            fsync_dir(folder)
        return final

    def remove_temp_files(self) -> int:
        """Delete leftovers of interrupted writes; return how many were removed."""
        count = 0
        for leftover in self.tmp.glob("*"):
            if leftover.is_file():
                leftover.unlink(missing_ok=True)
                count += 1
        return count
