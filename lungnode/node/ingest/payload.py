"""Checks of a received data set beyond its header: encoding, pixel data, trailing bytes, inflation.

What a C-STORE acknowledges must be readable in full by pydicom and DCMTK. The header is read by
:func:`lungnode.node.ingest.policy.parse_header`; this module checks the rest without decoding pixels:

* :func:`check_encoding`: the data set's first element is encoded the way the presentation
  context's transfer syntax says (an explicit VR data set sent on an implicit VR context, or the
  other way round, would be stored with file meta that contradicts it).
* :func:`check_pixel_data`: native pixel data is exactly Rows × Columns × Samples per Pixel ×
  Bits Allocated / 8 × Number of Frames bytes long (plus the one padding byte of an odd length),
  and lies within the received bytes; encapsulated pixel data has its Basic Offset Table item, at
  least one fragment and its sequence delimiter; float pixel data (not part of any image IOD the
  node accepts) is refused; what follows the pixel data are well-formed elements of higher tags
  (Data Set Trailing Padding, Digital Signatures), nothing else.
A deflated data set is inflated first (:mod:`lungnode.node.ingest.inflate`, in bounded steps)
and checked like an explicit VR little endian one.

Each check returns a :class:`~lungnode.node.ingest.policy.Refusal`-ready reason (empty when fine).
"""

from __future__ import annotations

import functools
import mmap
import struct
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR

from lungnode.node.ingest.header import RawHeader, skip_undefined_sequence
from lungnode.uids import DEFLATED_EXPLICIT_VR_LE, EXPLICIT_VR_BE, EXPLICIT_VR_LE, IMPLICIT_VR_LE

DEFLATED = DEFLATED_EXPLICIT_VR_LE
BIG_ENDIAN = EXPLICIT_VR_BE
#: Transfer syntaxes with native (not encapsulated) pixel data.
NATIVE = frozenset({IMPLICIT_VR_LE, EXPLICIT_VR_LE, DEFLATED, BIG_ENDIAN})

#: The pixel data elements: (7FE0,0010) Pixel Data, (7FE0,0008) Float, (7FE0,0009) Double Float.
PIXEL_DATA, FLOAT_PIXEL_DATA, DOUBLE_FLOAT_PIXEL_DATA = 0x7FE00010, 0x7FE00008, 0x7FE00009
#: The VRs pydicom and DCMTK know (a first element whose "VR" is one of these is explicit VR).
_KNOWN_VRS = frozenset({b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS",
                        b"LO", b"LT", b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"PN", b"SH",
                        b"SL", b"SQ", b"SS", b"ST", b"SV", b"TM", b"UC", b"UI", b"UL", b"UN",
                        b"UR", b"US", b"UT", b"UV"})
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT",
                       b"SV", b"UV"})
_UNDEFINED = 0xFFFFFFFF
_ITEM, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE0DD


@dataclass(frozen=True)
class ImageSize:
    """The header values that give the length of native pixel data (None: absent)."""

    rows: int | None
    columns: int | None
    samples_per_pixel: int | None
    bits_allocated: int | None
    number_of_frames: int | None

    def expected_bytes(self) -> int | None:
        """Rows × Columns × Samples × Bits Allocated / 8 × Frames (bits rounded up to bytes
        over the whole frame set for 1-bit data); None when a needed value is missing."""
        if not self.rows or not self.columns or not self.bits_allocated:
            return None
        bits = self.rows * self.columns * (self.samples_per_pixel or 1) * \
            (self.number_of_frames or 1) * self.bits_allocated
        return (bits + 7) // 8


def dataset_offset(data: bytes | mmap.mmap) -> int:
    """Offset of the data set after the preamble and file meta group (the node writes the meta).

    Raises
    ------
    ValueError
        When the file meta group is not where the node puts it.
    """
    if len(data) < 144 or data[128:132] != b"DICM" or data[132:136] != b"\x02\x00\x00\x00":
        raise ValueError("no file meta group")
    (group_length,) = struct.unpack_from("<I", data, 140)
    return 144 + int(group_length)


def check_encoding(data: bytes | mmap.mmap, transfer_syntax: str) -> str:
    """Whether the first data set element is encoded in the context's VR mode (little endian).

    Returns
    -------
    str
        Empty when it is (or when there is nothing to tell), else the mismatch.
    """
    if transfer_syntax in (BIG_ENDIAN, DEFLATED):
        return ""
    try:
        offset = dataset_offset(data)
    except ValueError:
        return ""
    if len(data) < offset + 8:
        return ""
    looks_explicit = bytes(data[offset + 4:offset + 6]) in _KNOWN_VRS
    if transfer_syntax == IMPLICIT_VR_LE and looks_explicit:
        return "data set encoded with explicit VR on an Implicit VR Little Endian context"
    if transfer_syntax != IMPLICIT_VR_LE and not looks_explicit:
        return "data set encoded with implicit VR on an explicit VR context"
    return ""


def check_pixel_data(data: bytes | mmap.mmap, pos: int, transfer_syntax: str,
                     size: ImageSize) -> tuple[bool, str]:
    """Check the pixel data element at ``pos`` and whatever follows it, without decoding pixels.

    Parameters
    ----------
    data:
        The received file (for a deflated data set: the inflated copy, explicit VR).
    pos:
        Offset of the pixel data element's tag.
    transfer_syntax:
        The transfer syntax the bytes are encoded in.
    size:
        The image's Rows, Columns, Samples per Pixel, Bits Allocated, Number of Frames.

    Returns
    -------
    tuple of (bool, str)
        Whether the problem is one of the data set not matching its IOD (else: cannot be
        understood), and the problem (empty when the pixel data and its trailer are sound).
    """
    big = transfer_syntax == BIG_ENDIAN
    implicit = transfer_syntax == IMPLICIT_VR_LE
    order = ">" if big else "<"
    if len(data) < pos + 8:
        return False, "pixel data element truncated"
    group, element = struct.unpack_from(order + "HH", data, pos)
    tag = (group << 16) | element
    if tag in (FLOAT_PIXEL_DATA, DOUBLE_FLOAT_PIXEL_DATA):
        return True, "float pixel data, which no image IOD the node accepts allows"
    if implicit:
        (length,) = struct.unpack_from("<I", data, pos + 4)
        header = 8
    else:
        if len(data) < pos + 12:
            return False, "pixel data element truncated"
        vr = bytes(data[pos + 4:pos + 6])
        if vr not in (b"OB", b"OW"):
            return False, f"pixel data with VR {vr!r} (OB or OW expected)"
        (length,) = struct.unpack_from(order + "I", data, pos + 8)
        header = 12
    if transfer_syntax in NATIVE:
        if length == _UNDEFINED:
            return False, "native pixel data with undefined length"
        if pos + header + length > len(data):
            return False, f"pixel data truncated ({len(data) - pos - header} of {length} bytes)"
        expected = size.expected_bytes()
        if expected is None:
            return True, "pixel data without Rows, Columns or Bits Allocated"
        if length not in (expected, expected + 1) or (length == expected + 1 and expected % 2 == 0):
            return False, (f"pixel data of {length} bytes where Rows, Columns, Samples per Pixel, "
                           f"Bits Allocated and Number of Frames give {expected}")
        end = pos + header + length
    else:
        if length != _UNDEFINED:
            return False, "encapsulated pixel data without undefined length"
        found = _fragments_end(data, pos + header)
        if isinstance(found, str):
            return False, found
        end = found
    return False, check_trailer(data, end, tag, implicit=implicit, big_endian=big)


def _fragments_end(data: bytes | mmap.mmap, offset: int, need_fragment: bool = True) -> int | str:
    """Offset after the item sequence of encapsulated pixel data, or what is wrong with it."""
    end = len(data)
    items = 0
    while offset + 8 <= end:
        tag = bytes(data[offset:offset + 4])
        (item_len,) = struct.unpack_from("<I", data, offset + 4)
        if tag == b"\xfe\xff\xdd\xe0":
            if item_len != 0:
                return "encapsulated pixel data: sequence delimiter with a length"
            if items < 2 and need_fragment:
                return "encapsulated pixel data without a fragment"
            return offset + 8
        if tag != b"\xfe\xff\x00\xe0":
            return "encapsulated pixel data: unexpected tag between fragments"
        if item_len == _UNDEFINED:
            return "encapsulated pixel data: fragment of undefined length"
        items += 1
        offset += 8 + item_len
        if offset > end:
            return "encapsulated pixel data truncated inside a fragment"
    return "encapsulated pixel data truncated (no sequence delimiter)"


def check_trailer(data: bytes | mmap.mmap, offset: int, after_tag: int, *, implicit: bool,
                  big_endian: bool = False) -> str:
    """Check that the bytes from ``offset`` to the end are whole elements with tags above
    ``after_tag`` in ascending order (e.g. Data Set Trailing Padding); empty when they are."""
    end = len(data)
    previous = after_tag
    order = ">" if big_endian else "<"
    try:
        while offset < end:
            if offset + 8 > end:
                raise ValueError
            group, element = struct.unpack_from(order + "HH", data, offset)
            tag = (group << 16) | element
            if tag <= previous or group == 0xFFFE:
                raise ValueError
            previous = tag
            vr = None if implicit else bytes(data[offset + 4:offset + 6])
            if vr is None:
                (length,) = struct.unpack_from(order + "I", data, offset + 4)
                offset += 8
            elif vr in _LONG_VRS:
                if offset + 12 > end:
                    raise ValueError
                (length,) = struct.unpack_from(order + "I", data, offset + 8)
                offset += 12
            elif vr in _KNOWN_VRS:
                (length,) = struct.unpack_from(order + "H", data, offset + 6)
                offset += 8
            else:
                raise ValueError
            if length == _UNDEFINED:
                if big_endian or vr not in (None, b"SQ", b"UN"):
                    raise ValueError
                offset = skip_undefined_sequence(data, offset, implicit)
            elif offset + length > end:
                raise ValueError
            else:
                offset += length
    except (ValueError, struct.error):
        return "bytes after the pixel data that are not complete DICOM elements"
    return ""


#: Deepest sequence nesting :func:`check_structure` follows.
MAX_NESTING = 32
_ITEM_END = 0xFFFEE00D
_PIXEL_TAGS = frozenset({PIXEL_DATA, FLOAT_PIXEL_DATA, DOUBLE_FLOAT_PIXEL_DATA})


#: Binary VRs whose value length must be a multiple of their value size (pydicom refuses others).
_VALUE_SIZES = {b"US": 2, b"SS": 2, b"UL": 4, b"SL": 4, b"FL": 4, b"FD": 8, b"AT": 4, b"OW": 2,
                b"OF": 4, b"OD": 8, b"OL": 4, b"OV": 8, b"SV": 8, b"UV": 8}
_SPECIFIC_CHARACTER_SET = 0x00080005


@functools.lru_cache(maxsize=4096)
def _dictionary_vr(tag: int) -> bytes | None:
    """The data dictionary's VR of ``tag`` (the first of "US or SS"); None when unknown."""
    try:
        return str(dictionary_VR(tag))[:2].encode("ascii")
    except KeyError:
        return None


def check_structure(data: bytes | mmap.mmap, transfer_syntax: str) -> str:
    """Walk the data set's elements, items and delimiters up to the top-level pixel data (or the
    end) the way a strict reader (DCMTK) does; empty when the encoding is sound.

    pydicom reads past some encodings DCMTK refuses (an item tag with a flipped bit, an unclosed
    sequence); this walk refuses them, without converting any value. Little endian only (big
    endian data sets are left to pydicom's reading).
    """
    if transfer_syntax == BIG_ENDIAN:
        return ""
    try:
        start = dataset_offset(data)
        _walk(data, start, len(data), transfer_syntax == IMPLICIT_VR_LE, 0, in_item=False)
    except ValueError as exc:
        return f"unreadable header: its encoding is malformed ({exc})"
    except struct.error:
        return "unreadable header: its encoding is malformed (cut inside an element)"
    return ""


def check_scanned(raw: RawHeader) -> str:
    """What :func:`check_structure` checks, for a header the in-place scan already walked: the
    scan checked the top-level element layout and the item/delimiter layout of undefined-length
    sequences; this checks each element's VR and binary value length, the Specific Character
    Set's VR, and walks the contents of every sequence. Empty when sound."""
    data, implicit = raw.data, raw.implicit
    sizes, known_vrs = _VALUE_SIZES, _KNOWN_VRS
    try:
        for tag, (vr, offset, length) in raw.elements().items():
            if vr is None or vr == b"UN":
                known = _dictionary_vr(tag)
            elif vr not in known_vrs:
                raise ValueError(f"unknown VR {vr!r}")
            else:
                known = vr
            size = sizes.get(known) if known is not None else None
            if size and length % size:
                raise ValueError(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) {known!r} value of "
                                 f"{length} bytes")
            if known == b"SQ" and length and vr != b"UN":
                _walk_items(data, offset, offset + length, implicit, 1, undefined=False)
        spec = raw.elements().get(_SPECIFIC_CHARACTER_SET)
        if spec is not None and spec[0] not in (None, b"CS", b"UN"):
            raise ValueError("Specific Character Set not encoded as CS")
        for _tag, vr, offset in raw.sequences:
            _walk_items(data, offset, len(data), implicit or vr == b"UN", 1, undefined=True)
    except ValueError as exc:
        return f"unreadable header: its encoding is malformed ({exc})"
    except struct.error:
        return "unreadable header: its encoding is malformed (cut inside an element)"
    return ""


def _walk(data: bytes | mmap.mmap, offset: int, end: int, implicit: bool, depth: int, *,
          in_item: bool) -> int:
    """Walk elements from ``offset``: to ``end`` (defined length), to the item delimiter
    (``in_item`` with undefined length: ``end`` is then the data's end) or, at the top level, to
    the pixel data. The offset where the walk ended."""
    if depth > MAX_NESTING:
        raise ValueError("nesting too deep")
    while offset < end:
        if offset + 8 > end:
            raise ValueError("element header cut")
        group, element, length = struct.unpack_from("<HHI", data, offset)
        tag = (group << 16) | element
        if tag == _ITEM_END and in_item:
            if length != 0:
                raise ValueError("item delimiter with a length")
            return offset + 8
        if group == 0xFFFE:
            raise ValueError("item tag among elements")
        if depth == 0 and tag in _PIXEL_TAGS:
            return offset
        if implicit:
            vr: bytes | None = None
            value = offset + 8
            known = _dictionary_vr(tag)
            is_sequence = known == b"SQ"
        else:
            vr = bytes(data[offset + 4:offset + 6])
            if vr not in _KNOWN_VRS:
                raise ValueError("unknown VR")
            if vr in _LONG_VRS:
                if offset + 12 > end:
                    raise ValueError("element header cut")
                (length,) = struct.unpack_from("<I", data, offset + 8)
                value = offset + 12
            else:
                (length,) = struct.unpack_from("<H", data, offset + 6)
                value = offset + 8
            is_sequence = vr == b"SQ"
            known = _dictionary_vr(tag) if vr == b"UN" else vr  # pydicom reads UN as the dictionary's
            if tag == _SPECIFIC_CHARACTER_SET and vr not in (b"CS", b"UN"):
                raise ValueError(f"Specific Character Set with VR {vr.decode('ascii')}")
        size = _VALUE_SIZES.get(known or b"")
        if size and length != _UNDEFINED and length % size:
            raise ValueError(f"({group:04X},{element:04X}) {(known or b'').decode('ascii')} value of "
                             f"{length} bytes")
        if length == _UNDEFINED:
            if vr in (b"OB", b"OW") or tag == PIXEL_DATA:
                found = _fragments_end(data, value, need_fragment=False)
                if isinstance(found, str):
                    raise ValueError(found)
                offset = found
            elif vr in (None, b"SQ", b"UN"):
                offset = _walk_items(data, value, len(data), implicit or vr == b"UN", depth + 1,
                                     undefined=True)
            else:
                raise ValueError("undefined length on a VR that cannot have it")
        else:
            if value + length > end:
                raise ValueError("value beyond its container")
            if is_sequence and length:
                _walk_items(data, value, value + length, implicit, depth + 1, undefined=False)
            offset = value + length
    if in_item and end == len(data):
        raise ValueError("item not closed")
    return offset


def _walk_items(data: bytes | mmap.mmap, offset: int, end: int, implicit: bool, depth: int, *,
                undefined: bool) -> int:
    """Walk the items of a sequence; the offset after it."""
    while offset + 8 <= end:
        group, element, length = struct.unpack_from("<HHI", data, offset)
        tag = (group << 16) | element
        if tag == _SEQUENCE_END:
            if not undefined or length != 0:
                raise ValueError("misplaced sequence delimiter")
            return offset + 8
        if tag != _ITEM:
            raise ValueError("not an item")
        if length == _UNDEFINED:
            offset = _walk(data, offset + 8, len(data), implicit, depth, in_item=True)
        else:
            if offset + 8 + length > end:
                raise ValueError("item beyond its sequence")
            if length:
                _walk(data, offset + 8, offset + 8 + length, implicit, depth, in_item=False)
            offset += 8 + length
    if undefined or offset != end:
        raise ValueError("sequence not closed")
    return offset
