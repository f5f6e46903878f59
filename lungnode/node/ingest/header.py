"""Fast reading of a received instance's top-level header, for the C-STORE hot path.

pydicom reads a data set element by element in Python at about 10 µs an element; for a 90-element
CT header plus the field reads that is 2-3 ms of a C-STORE. :func:`scan_header` walks the
top-level elements of a little endian data set with :mod:`struct` (about 1 µs an element), skips
undefined-length sequences without decoding them, stops at the pixel data, and returns a pydicom
:class:`~pydicom.dataset.Dataset` built from the raw top-level elements (values are converted
lazily by pydicom when read, as after ``dcmread``).

It answers ``None`` whenever it is not sure, and the caller then reads the header with pydicom
(:func:`lungnode.node.ingest.policy.parse_header`): big endian and deflated syntaxes, any length that
does not fit, a sequence nesting deeper than :data:`MAX_DEPTH`, and objects whose fields live in
sequences (multi-frame functional groups), so what it returns always equals pydicom's reading for
the top-level elements it holds.
"""

from __future__ import annotations

import functools
import mmap
import struct

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag

from lungnode.uids import DEFLATED_EXPLICIT_VR_LE, EXPLICIT_VR_BE, IMPLICIT_VR_LE

#: Deepest sequence nesting skipped.
MAX_DEPTH = 16
#: Top-level sequences whose presence means the fields are read from them (pydicom path).
_FUNCTIONAL_GROUPS = frozenset({0x52009229, 0x52009230})  # Shared / Per-frame Functional Groups
#: Pixel data elements: the header ends at the first of them.
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
#: Tags that end the scan: True = pixel data (the header ends), False = functional groups.
_STOPS = {**dict.fromkeys(_PIXEL_TAGS, True), **dict.fromkeys(_FUNCTIONAL_GROUPS, False)}
#: Two upper-case letters: what a VR may look like (unknown ones included, as pydicom reads them).
_VALID_VRS = frozenset(bytes((a, b)) for a in range(65, 91) for b in range(65, 91))
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT",
                       b"SV", b"UV"})
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD

_TAG = struct.Struct("<HH")
_EXPLICIT_HEAD = struct.Struct("<HH2sH")  # group, element, VR, 16-bit length (or reserved)
_IMPLICIT_HEAD = struct.Struct("<HHI")  # group, element, 32-bit length
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")


class _UnsureError(Exception):
    """The scanner leaves this header to pydicom."""


class RawHeader:
    """The top-level header elements of a received file, read in place (no pydicom objects).

    Values are read on demand by keyword with pydicom's rules for the few VRs the ingest fields use
    (text, UI, IS, DS, US); a read that could differ from pydicom's raises :class:`UnsureError`,
    and the caller then reads the header with pydicom (:meth:`dataset`).

    Parameters
    ----------
    data:
        The received file (kept referenced; valid as long as the caller keeps it).
    elements:
        Tag → (explicit VR as written, None when implicit; value offset; value length).
    implicit:
        Implicit VR little endian.
    pixel_offset:
        Offset of the pixel data element, -1 when there is none.
    sequences:
        The top-level undefined-length sequences the scan skipped: (tag, VR as written or None,
        offset of their first item).
    """

    __slots__ = ("_data", "_elements", "_encoding", "implicit", "pixel_offset", "sequences")

    def __init__(self, data: bytes | mmap.mmap, elements: dict[int, tuple[bytes | None, int, int]],
                 implicit: bool, pixel_offset: int,
                 sequences: list[tuple[int, bytes | None, int]] | None = None) -> None:
        self._data = data
        self._elements = elements
        self.implicit = implicit
        self.pixel_offset = pixel_offset
        self.sequences = sequences or []
        self._encoding: str | None = None

    @property
    def data(self) -> bytes | mmap.mmap:
        """The received file the header was read from."""
        return self._data

    def elements(self) -> dict[int, tuple[bytes | None, int, int]]:
        """Tag → (explicit VR or None, value offset, value length) of the defined-length
        top-level elements before the pixel data."""
        return self._elements

    def has_group(self, group: int) -> bool:
        """Whether any top-level element of ``group`` is present."""
        return any((tag >> 16) == group for tag in self._elements)

    def dataset(self) -> Dataset:
        """The same elements as a pydicom data set (values converted lazily by pydicom)."""
        data, implicit = self._data, self.implicit
        out: dict[BaseTag, DataElement | RawDataElement] = {}
        for tag, (vr, offset, length) in self._elements.items():
            key = Tag(tag)
            out[key] = RawDataElement(key, None if vr is None else vr.decode("ascii"), length,
                                      bytes(data[offset:offset + length]), offset, implicit, True,
                                      True, False)
        return Dataset(out)

    # ---------------------------------------------------------------- values, pydicom's reading
    def text(self, keyword: str) -> str:
        """The value as pydicom's ``str`` of it, multiple values joined with ``\\``; "" if absent."""
        tag, vr, vr_bytes = _spec(keyword)
        found = self._elements.get(tag)
        if found is None:
            return ""
        explicit_vr, offset, length = found
        if vr not in _TEXT_VRS or (explicit_vr is not None and explicit_vr != vr_bytes):
            raise UnsureError
        raw = self._data[offset:offset + length]
        if raw.isascii() and b"\x1b" not in raw:
            value = raw.decode("ascii")
        else:
            try:
                value = raw.decode(self._text_encoding())
            except UnicodeDecodeError:
                raise UnsureError from None
        value = value.rstrip("\x00 ")
        if vr == "UI":
            return value.strip()
        if vr in ("DS", "IS") and value:  # pydicom keeps each number's text, stripped
            parts = [part.strip() for part in value.split("\\")]
            for part in parts:
                _float_text(part)
            return "\\".join(parts)
        return value

    def integer(self, keyword: str) -> int | None:
        """An IS or US value as an int; None when absent or empty."""
        tag, vr, vr_bytes = _spec(keyword)
        if vr == "US":
            found = self._elements.get(tag)
            if found is None or not found[2]:
                return None
            explicit_vr, offset, length = found
            if length != 2 or (explicit_vr is not None and explicit_vr != vr_bytes):
                raise UnsureError
            return int(_U16.unpack_from(self._data, offset)[0])
        value = self.text(keyword)
        if not value:
            return None
        try:
            return int(value)
        except ValueError:
            raise UnsureError from None

    def number(self, keyword: str) -> float | None:
        """A DS value as a float; None when absent or empty."""
        value = self.text(keyword)
        return _float_text(value) if value else None

    def _text_encoding(self) -> str:
        if self._encoding is None:
            name = self.text("SpecificCharacterSet").strip()
            if name not in _ENCODINGS:
                raise UnsureError
            self._encoding = _ENCODINGS[name]
        return self._encoding


class UnsureError(ValueError):
    """A value that the fast reader leaves to pydicom."""


#: Specific Character Set values read here (others go to pydicom); no value means pydicom's default.
_ENCODINGS = {"": "latin_1", "ISO_IR 100": "latin_1", "ISO_IR 192": "utf_8"}
_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "PN", "SH", "TM", "UI"})


@functools.cache
def _spec(keyword: str) -> tuple[int, str, bytes]:
    """Tag, dictionary VR and that VR as it is written in explicit VR, of a keyword."""
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    vr = str(dictionary_VR(tag))
    return int(tag), vr, vr.encode("ascii")


def _float_text(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UnsureError from None


def scan_header(data: bytes | mmap.mmap, transfer_syntax: str) -> RawHeader | None:
    """Read the top-level header of a received file (preamble, meta, data set).

    Parameters
    ----------
    data:
        The received file.
    transfer_syntax:
        The data set's transfer syntax UID.

    Returns
    -------
    RawHeader or None
        The header (top-level elements before the pixel data, but for undefined-length
        sequences) and the offset of the pixel data element; ``None`` when pydicom should read it.
    """
    if transfer_syntax in (DEFLATED_EXPLICIT_VR_LE, EXPLICIT_VR_BE):
        return None
    implicit = transfer_syntax == IMPLICIT_VR_LE
    elements: dict[int, tuple[bytes | None, int, int]] = {}
    sequences: list[tuple[int, bytes | None, int]] = []
    pixel_offset = -1
    # The loop reads each element header with one struct call (it runs ~90 times per CT header).
    head = _IMPLICIT_HEAD if implicit else _EXPLICIT_HEAD  # both 8 bytes
    stops, long_vrs, valid_vrs, u32 = _STOPS, _LONG_VRS, _VALID_VRS, _U32
    try:
        offset = _dataset_offset(data)
        end = len(data)
        while offset < end:
            start = offset
            if implicit:
                group, element, length = head.unpack_from(data, offset)
                vr: bytes | None = None
            else:
                group, element, vr, length = head.unpack_from(data, offset)
                if group == 0xFFFE:  # item tags have no VR: not expected at the top level
                    raise _UnsureError
                if vr not in valid_vrs:
                    raise _UnsureError
                if vr in long_vrs:
                    (length,) = u32.unpack_from(data, offset + 8)
                    offset += 4
            offset += 8
            tag = (group << 16) | element
            stop = stops.get(tag)
            if stop is not None:
                if stop:  # pixel data: the header ends here
                    pixel_offset = start
                    break
                return None  # functional groups: the fields live in sequences
            if length == _UNDEFINED:
                if vr not in (None, b"SQ", b"UN"):
                    raise _UnsureError
                sequences.append(((group << 16) | element, vr, offset))
                offset = _skip_sequence(data, offset, implicit, 1)
                continue
            if offset + length > end:
                raise _UnsureError
            elements[tag] = (vr, offset, length)
            offset += length
    except (_UnsureError, struct.error):
        return None
    if not elements:
        return None
    return RawHeader(data, elements, implicit, pixel_offset, sequences)


def _dataset_offset(data: bytes | mmap.mmap) -> int:
    """Offset of the data set after the preamble and the (explicit VR LE) file meta group."""
    if data[128:132] != b"DICM" or _TAG.unpack_from(data, 132) != (0x0002, 0x0000) or \
            data[136:138] != b"UL":
        raise _UnsureError
    (group_length,) = _U32.unpack_from(data, 140)
    return 144 + int(group_length)


def _element_header(data: bytes | mmap.mmap, offset: int,
                    implicit: bool) -> tuple[int, bytes | None, int, int]:
    """Tag, VR (None when implicit), value length and value offset of the element at ``offset``."""
    group, element, length = _IMPLICIT_HEAD.unpack_from(data, offset)
    tag = (group << 16) | element
    if implicit or group == 0xFFFE:  # item and delimitation tags carry no VR
        return tag, None, int(length), offset + 8
    _group, _element, vr, length = _EXPLICIT_HEAD.unpack_from(data, offset)
    if vr not in _VALID_VRS:
        raise _UnsureError
    if vr in _LONG_VRS:
        (length,) = _U32.unpack_from(data, offset + 8)
        return tag, vr, int(length), offset + 12
    return tag, vr, int(length), offset + 8


def skip_undefined_sequence(data: bytes | mmap.mmap, offset: int, implicit: bool) -> int:
    """Offset after an undefined-length sequence whose items start at ``offset``.

    Raises
    ------
    ValueError
        When the sequence is not closed, nests deeper than :data:`MAX_DEPTH` or is malformed.
    """
    try:
        return _skip_sequence(data, offset, implicit, 1)
    except (_UnsureError, struct.error):
        raise ValueError("malformed or unclosed sequence") from None


def _skip_sequence(data: bytes | mmap.mmap, offset: int, implicit: bool, depth: int) -> int:
    """Offset after an undefined-length sequence whose items start at ``offset``."""
    if depth > MAX_DEPTH:
        raise _UnsureError
    end = len(data)
    while offset + 8 <= end:
        tag, _vr, length, offset = _element_header(data, offset, True)
        if tag == _SEQUENCE_END:
            return offset
        if tag != _ITEM:
            raise _UnsureError
        if length != _UNDEFINED:
            offset += length
            continue
        offset = _skip_item(data, offset, implicit, depth)
    raise _UnsureError


def _skip_item(data: bytes | mmap.mmap, offset: int, implicit: bool, depth: int) -> int:
    """Offset after an undefined-length item whose elements start at ``offset``."""
    end = len(data)
    while offset + 8 <= end:
        tag, vr, length, offset = _element_header(data, offset, implicit)
        if tag == _ITEM_END:
            return offset
        if length == _UNDEFINED:
            if vr not in (None, b"SQ", b"UN"):
                raise _UnsureError
            offset = _skip_sequence(data, offset, implicit, depth + 1)
        else:
            offset += length
    raise _UnsureError
