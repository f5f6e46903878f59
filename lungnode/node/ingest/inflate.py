"""Bounded inflation of a received Deflated Explicit VR Little Endian data set.

The data set is inflated in steps of :data:`INFLATE_STEP` (``zlib.decompressobj`` with
``max_length``) into an anonymous temp file, never whole into memory, and refused as soon as it
inflates beyond the data-set size limit (a deflate bomb costs the node one step of memory and at
most the limit on disk, briefly). The result is mapped read-only, with the file meta rewritten to
Explicit VR Little Endian, so :func:`lungnode.node.ingest.policy.parse_header` checks it like any
explicit VR little endian data set (:mod:`lungnode.node.ingest.payload`).
"""

from __future__ import annotations

import contextlib
import mmap
import struct
import tempfile
import zlib
from pathlib import Path
from typing import IO

from lungnode.node.ingest.payload import dataset_offset
from lungnode.uids import EXPLICIT_VR_LE

#: Inflated bytes produced per step (and compressed bytes fed per step) while inflating.
INFLATE_STEP = 1 << 20
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT",
                       b"SV", b"UV"})


class Inflated(contextlib.AbstractContextManager["Inflated"]):
    """A deflated data set inflated into an anonymous temp file, mapped read-only.

    :attr:`data` is preamble + file meta (transfer syntax rewritten to Explicit VR Little Endian)
    + the inflated data set; closed (mapping and file) on exit.
    """

    def __init__(self, data: mmap.mmap, fh: IO[bytes]) -> None:
        self.data = data
        self._fh = fh

    def __exit__(self, *exc: object) -> None:
        self.data.close()
        self._fh.close()


def inflate(data: bytes | mmap.mmap, limit: int, spill_dir: Path | None = None) -> Inflated | str:
    """Inflate the data set of a received Deflated Explicit VR Little Endian file, in bounded steps.

    Parameters
    ----------
    data:
        The received file (preamble, file meta, deflated data set).
    limit:
        Most bytes the data set may inflate to.
    spill_dir:
        Where the anonymous temp file is made (the store's temp folder; None: the system's).

    Returns
    -------
    Inflated or str
        The inflated copy, or why the data set cannot be inflated (too large, corrupt, truncated).
    """
    try:
        start = dataset_offset(data)
        meta = _explicit_meta(bytes(data[132:start]))
    except (ValueError, struct.error):
        return "file meta information unreadable"
    fh = tempfile.TemporaryFile(dir=spill_dir)  # noqa: SIM115 - closed by Inflated or below
    try:
        fh.write(bytes(data[:128]) + b"DICM" + meta)
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        total, pos, end = 0, start, len(data)
        while not inflater.eof:
            if inflater.unconsumed_tail:
                piece = inflater.unconsumed_tail
            elif pos < end:
                piece = bytes(data[pos:pos + INFLATE_STEP])
                pos += len(piece)
            else:
                piece = b""
            out = inflater.decompress(piece, INFLATE_STEP)
            total += len(out)
            if total > limit:
                fh.close()
                return f"data set inflates to more than the limit of {limit >> 20} MiB"
            fh.write(out)
            if not out and not piece:
                break
        if not inflater.eof:
            fh.close()
            return "deflated data set truncated"
        if len(inflater.unused_data) + (end - pos) > 1:  # one padding byte to an even length
            fh.close()
            return "bytes after the end of the deflated data set"
        fh.flush()
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except zlib.error:
        fh.close()
        return "deflated data set cannot be inflated"
    except BaseException:
        fh.close()
        raise
    return Inflated(mapped, fh)


def _explicit_meta(meta: bytes) -> bytes:
    """The file meta group (from its group length element on) with the transfer syntax replaced
    by Explicit VR Little Endian and the group length recomputed."""
    offset, elements = 12, []  # skip (0002,0000) UL 4
    while offset < len(meta):
        group, element, vr = struct.unpack_from("<HH2s", meta, offset)
        if group != 0x0002:
            raise ValueError("element outside the file meta group")
        if vr in _LONG_VRS:
            (length,) = struct.unpack_from("<I", meta, offset + 8)
            head = 12
        else:
            (length,) = struct.unpack_from("<H", meta, offset + 6)
            head = 8
        raw = meta[offset:offset + head + length]
        if element == 0x0010:
            value = EXPLICIT_VR_LE.encode("ascii") + b"\x00"
            raw = struct.pack("<HH2sH", 0x0002, 0x0010, b"UI", len(value)) + value
        elements.append(raw)
        offset += head + length
    body = b"".join(elements)
    return struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body)) + body
