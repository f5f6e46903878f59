"""The file store's direct-I/O writer (``O_DIRECT``) and its fallback to page-cache writes."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest

from lungnode.storage import filestore
from lungnode.storage.filestore import (
    DIRECT_IO_ALIGN,
    DirectWriter,
    FileStore,
    StagingPool,
    supports_direct_io,
)


def _direct_store(root: Path) -> FileStore:
    store = FileStore(root, fsync=True, direct_io=True)
    if not store.direct_io:
        pytest.skip(f"the filesystem of {root} does not take O_DIRECT")
    return store


@pytest.mark.parametrize("size", [0, 1, DIRECT_IO_ALIGN - 1, DIRECT_IO_ALIGN, DIRECT_IO_ALIGN + 1,
                                  3 * 8192, 3 * 8192 + 17, 530_123, 2_000_003])
def test_direct_writer_stores_exactly_the_bytes_given(tmp_path: Path, size: int) -> None:
    """Any size, any fragmenting: the file holds exactly the bytes written, nothing more."""
    store = _direct_store(tmp_path)
    store.staging = StagingPool(flush_bytes=8192)  # many flushes mid-stream, partial blocks kept
    data = random.Random(size).randbytes(size)
    fd, path, writer = store.open_direct()
    assert writer is not None
    try:
        pos, pieces = 0, random.Random(-size)
        while pos < size:
            n = pieces.choice([1, 7, 4096, 5000, 65536, 131072])
            writer.write(data[pos:pos + n])
            pos += n
        writer.finish()
        os.fdatasync(fd)
    finally:
        writer.close()
        os.close(fd)
    assert writer.size == size
    assert path.stat().st_size == size
    assert path.read_bytes() == data


def test_staging_buffers_are_reused_and_bounded() -> None:
    pool = StagingPool(flush_bytes=8192, keep=2)
    first = pool.acquire()
    assert len(first) == 8192 + DIRECT_IO_ALIGN
    pool.release(first)
    assert pool.acquire() is first
    buffers = [pool.acquire() for _ in range(4)]
    for buffer in buffers:
        pool.release(buffer)
    assert sum(not b.closed for b in buffers) == 2  # the others were unmapped
    with pytest.raises(ValueError, match="multiple"):
        StagingPool(flush_bytes=1000)


def test_direct_io_only_with_fsync_and_when_asked(tmp_path: Path) -> None:
    assert not FileStore(tmp_path / "a", fsync=False, direct_io=True).direct_io
    plain = FileStore(tmp_path / "b", fsync=True, direct_io=False)
    assert not plain.direct_io
    fd, path, writer = plain.open_direct()
    os.close(fd)
    assert writer is None and path.parent == plain.tmp
    assert list(plain.tmp.iterdir()) == [path]  # the probe left nothing behind


def test_a_filesystem_that_refuses_o_direct_gets_page_cache_writes(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Where ``open(O_DIRECT)`` fails with EINVAL (as on some filesystems), the store falls back."""
    real_open = os.open

    def refusing_open(path: str | os.PathLike[str], flags: int, mode: int = 0o777) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode)

    monkeypatch.setattr(filestore.os, "open", refusing_open)
    assert not supports_direct_io(tmp_path)
    store = FileStore(tmp_path / "store", fsync=True, direct_io=True)
    assert not store.direct_io
    fd, path, writer = store.open_direct()
    os.close(fd)
    assert writer is None
    assert list(tmp_path.glob("**/*.part")) == [path]  # no probe file left behind


def test_the_partial_last_block_is_written_through_the_page_cache(tmp_path: Path) -> None:
    """After :meth:`DirectWriter.finish` the descriptor no longer has O_DIRECT set only when a
    partial block was left; whole blocks never leave the direct path."""
    import fcntl

    store = _direct_store(tmp_path)
    for size, direct_after in ((2 * DIRECT_IO_ALIGN, True), (2 * DIRECT_IO_ALIGN + 5, False)):
        fd, path, writer = store.open_direct()
        assert isinstance(writer, DirectWriter)
        writer.write(bytes(size))
        writer.finish()
        writer.close()
        assert bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT) is direct_after
        os.close(fd)
        assert path.stat().st_size == size
