"""The file store: where received instances and our outputs live on disk, written durably.

Layout under the storage root::

    <root>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm      received, version 1
    <root>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.v2.dcm   a later different copy
    <root>/results/<job id>/<kind>-<SOPInstanceUID>.dcm                   our outputs
    <root>/.tmp/                                                          in-flight writes

Every UID is checked against the DICOM grammar before it becomes a path. A write goes to a temp
file in ``.tmp`` (same filesystem), is fsync'd, renamed into place, and the folder is fsync'd, so
after a crash a file is either complete or absent; leftovers in ``.tmp`` are removed at start.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from lungnode.uids import require_uid

TMP_DIR = ".tmp"


class DiskFullError(OSError):
    """Free space on the storage root is below the configured watermark."""


def fsync_dir(folder: Path) -> None:
    """fsync a folder, so that renames and new entries in it survive a crash."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    """

    def __init__(self, root: Path, *, fsync: bool = True, min_free_mb: int = 0) -> None:
        self.root = Path(root)
        self.fsync = fsync
        self.min_free_bytes = int(min_free_mb) * 1024 * 1024
        self.tmp = self.root / TMP_DIR
        self.tmp.mkdir(parents=True, exist_ok=True)

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
        if kind not in ("seg", "sr", "sc"):
            raise ValueError(f"unknown output kind {kind!r}")
        return f"results/{int(job_id)}/{kind}-{sop}.dcm"

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
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        path = self.tmp / f"{uuid.uuid4().hex}.part"
        return os.open(path, flags, 0o600), path

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
