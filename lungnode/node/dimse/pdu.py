"""DICOM upper-layer PDUs and DIMSE command sets for the node's acceptor (PS3.8 9.3, PS3.7 E).

This module owns the bytes on the wire that :mod:`lungnode.node.dimse.acceptor` reads and writes:
reading a PDU header, negotiating an association (pynetdicom decodes the A-ASSOCIATE-RQ, chooses
the presentation contexts with :func:`pynetdicom.presentation.negotiate_as_acceptor` and encodes
the A-ASSOCIATE-AC), the fixed-size PDUs (A-ASSOCIATE-RJ, A-RELEASE-RP, A-ABORT), and the small
implicit-VR-little-endian command sets of C-ECHO and C-STORE. Command sets are decoded and encoded
here directly: they are a handful of fixed elements, and doing it with a general DICOM parser was
the largest part of pynetdicom's per-message cost. No sockets, no storage.
"""

from __future__ import annotations

import dataclasses
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from pydicom.uid import UID
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor
from pynetdicom.utils import decode_bytes, set_ae

from lungnode.uids import IMPLEMENTATION_CLASS_UID

# PDU types (PS3.8 9.3.1).
A_ASSOCIATE_RQ_TYPE = 0x01
A_ASSOCIATE_AC_TYPE = 0x02
A_ASSOCIATE_RJ_TYPE = 0x03
P_DATA_TF_TYPE = 0x04
A_RELEASE_RQ_TYPE = 0x05
A_RELEASE_RP_TYPE = 0x06
A_ABORT_TYPE = 0x07

#: The DICOM application context name (PS3.7 A.2.1).
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
#: Implementation Version Name sent in the A-ASSOCIATE-AC (16 characters at most).
IMPLEMENTATION_VERSION_NAME = "LUNGNODE_1"
#: Largest A-ASSOCIATE-RQ accepted (a request with hundreds of contexts is ~30 kB).
MAX_ASSOCIATE_RQ_BYTES = 1 << 20
#: Largest command set accepted (a C-STORE-RQ is ~200 bytes).
MAX_COMMAND_BYTES = 1 << 16

# A-ABORT source and reason (PS3.8 9.3.8).
ABORT_SOURCE_PROVIDER = 0x02
ABORT_REASON_UNRECOGNIZED_PDU = 0x01
ABORT_REASON_UNEXPECTED_PDU = 0x02
ABORT_REASON_INVALID_PARAMETER = 0x06

# Command fields (PS3.7 E.1).
C_STORE_RQ = 0x0001
C_ECHO_RQ = 0x0030
#: Command Data Set Type value meaning "no data set follows".
NO_DATASET = 0x0101

_HEADER = struct.Struct(">BxI")
_PDV_HEADER = struct.Struct(">IBB")
_ELEMENT = struct.Struct("<HHI")


class ProtocolError(Exception):
    """The peer broke the upper-layer protocol; the association is aborted with ``reason``."""

    def __init__(self, message: str, reason: int = ABORT_REASON_INVALID_PARAMETER) -> None:
        super().__init__(message)
        self.reason = reason


class RequestRejectedError(ProtocolError):
    """An A-ASSOCIATE-RQ that is answered with an A-ASSOCIATE-RJ (``rejection``), not an abort."""

    def __init__(self, message: str, rejection: tuple[int, int, int]) -> None:
        super().__init__(message)
        self.rejection = rejection


#: A-ASSOCIATE-RJ (result, source, reason) for an empty or malformed Calling / Called AE Title:
#: rejected-permanent, service user, calling (3) / called (7) AE title not recognised.
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_CALLED_AE = (0x01, 0x01, 0x07)


def pdu_header(header: bytes) -> tuple[int, int]:
    """The type and length of a PDU from its 6-byte header."""
    pdu_type, length = _HEADER.unpack(header)
    return pdu_type, length


def pdv_header(header: bytes) -> tuple[int, int, bool, bool]:
    """A PDV item's data length, presentation context ID, is-command and is-last flags."""
    length, context_id, control = _PDV_HEADER.unpack(header)
    if length < 2:
        raise ProtocolError(f"PDV item of length {length}")
    return length - 2, context_id, bool(control & 0x01), bool(control & 0x02)


PDV_HEADER_SIZE = _PDV_HEADER.size


def associate_rj(result: int, source: int, reason: int) -> bytes:
    """An A-ASSOCIATE-RJ PDU."""
    return struct.pack(">BxIxBBB", A_ASSOCIATE_RJ_TYPE, 4, result, source, reason)


def abort_pdu(source: int = ABORT_SOURCE_PROVIDER, reason: int = 0) -> bytes:
    """An A-ABORT PDU (service-provider source unless told otherwise)."""
    return struct.pack(">BxIxxBB", A_ABORT_TYPE, 4, source, reason)


RELEASE_RP = struct.pack(">BxI4x", A_RELEASE_RP_TYPE, 4)


@dataclass
class AssociationRequest:
    """What the node needs of a decoded A-ASSOCIATE-RQ."""

    calling_ae: str
    called_ae: str
    application_context: str
    protocol_version: int
    #: The peer's maximum PDU length (0: no limit).
    peer_max_pdu: int
    primitive: A_ASSOCIATE
    #: The request's protocol version and variable items (application context, presentation
    #: contexts, user information): what negotiation depends on (see :class:`Negotiator`).
    key: bytes = b""
    #: The Called and Calling AE Title fields as sent (echoed in the A-ASSOCIATE-AC).
    ae_fields: bytes = b""


def decode_associate_rq(pdu: bytes) -> AssociationRequest:
    """Decode a whole A-ASSOCIATE-RQ PDU (header included) with pynetdicom's PDU class.

    Raises
    ------
    ProtocolError
        When the PDU cannot be decoded.
    """
    check_ae_fields(pdu)
    rq = A_ASSOCIATE_RQ()
    try:
        rq.decode(pdu)
        primitive = rq.to_primitive()
    except Exception as exc:  # pynetdicom raises several types on malformed items
        raise ProtocolError(f"malformed A-ASSOCIATE-RQ: {type(exc).__name__}") from exc
    for context in primitive.presentation_context_definition_list:
        if not context.abstract_syntax or not context.transfer_syntax:
            raise ProtocolError(f"presentation context {context.context_id} without an abstract "
                                "syntax or transfer syntax item")
    peer_max = 0
    for item in primitive.user_information:
        if isinstance(item, MaximumLengthNotification):
            peer_max = int(item.maximum_length_received or 0)
    return AssociationRequest(
        calling_ae=str(primitive.calling_ae_title or "").strip(),
        called_ae=str(primitive.called_ae_title or "").strip(),
        application_context=str(primitive.application_context_name or ""),
        protocol_version=int(rq.protocol_version),
        peer_max_pdu=peer_max,
        primitive=primitive,
        key=_request_key(pdu),
        ae_fields=bytes(pdu[_AE_FIELDS]),
    )


#: Where the Called and Calling AE Title fields lie in an A-ASSOCIATE-RQ or -AC PDU (PS3.8 9.3.2).
_AE_FIELDS = slice(10, 42)
_VARIABLE_ITEMS = 74
#: Where the Called and the Calling AE Title lie in an A-ASSOCIATE-RQ PDU.
_CALLED_AE, _CALLING_AE = slice(10, 26), slice(26, 42)


def check_ae_fields(pdu: bytes) -> None:
    """Reject an A-ASSOCIATE-RQ whose Called or Calling AE Title is empty or not an AE title.

    An AE title is 1-16 characters of the default repertoire without control characters or
    backslash (PS3.5 6.2), leading and trailing spaces not significant.

    Raises
    ------
    RequestRejectedError
        With the A-ASSOCIATE-RJ for a called (reason 7) or calling (reason 3) AE title.
    ProtocolError
        When the PDU is too short to hold the fields.
    """
    if len(pdu) < _VARIABLE_ITEMS:
        raise ProtocolError("A-ASSOCIATE-RQ shorter than its fixed fields")
    for name, where, rejection in (("Called", _CALLED_AE, REJECT_CALLED_AE),
                                   ("Calling", _CALLING_AE, REJECT_CALLING_AE)):
        raw = bytes(pdu[where]).strip(b" \x00")
        if not raw:
            raise RequestRejectedError(f"empty {name} AE Title", rejection)
        if any(byte < 0x20 or byte > 0x7E or byte == 0x5C for byte in raw):
            raise RequestRejectedError(f"{name} AE Title with characters outside the DICOM default "
                                  "repertoire", rejection)


def _request_key(pdu: bytes) -> bytes:
    return bytes(pdu[6:8]) + bytes(pdu[_VARIABLE_ITEMS:])


class Negotiator:
    """Decodes and negotiates A-ASSOCIATE-RQs, remembering recent outcomes.

    A PACS or scanner proposes the same presentation contexts on every association, and decoding
    and negotiating a proposal of a hundred contexts with pynetdicom takes 10-20 ms of CPU. The
    outcome depends only on the request's variable items (and this node's fixed contexts), so it
    is kept under those bytes; a repeated request only has its AE titles read (and checked the
    way pynetdicom checks them) and echoed into the remembered A-ASSOCIATE-AC.

    Parameters
    ----------
    supported:
        The node's contexts (one per abstract syntax, transfer syntaxes in order of preference).
    max_pdu:
        The largest P-DATA-TF PDU this node receives (0: no limit).
    capacity:
        Distinct requests remembered (least recently used ones are dropped).
    """

    def __init__(self, supported: list[PresentationContext], *, max_pdu: int = 0,
                 capacity: int = 32) -> None:
        self.supported = supported
        self.max_pdu = max_pdu
        self.capacity = capacity
        self._lock = threading.Lock()
        self._known: OrderedDict[bytes, tuple[AssociationRequest, Negotiated]] = OrderedDict()

    def decode(self, pdu: bytes) -> AssociationRequest:
        """Decode a whole A-ASSOCIATE-RQ PDU (see :func:`decode_associate_rq`)."""
        key = _request_key(pdu)
        with self._lock:
            known = self._known.get(key)
            if known is not None:
                self._known.move_to_end(key)
        if known is None:
            return decode_associate_rq(pdu)
        check_ae_fields(pdu)
        try:
            called = set_ae(decode_bytes(pdu[10:26]).strip(), "Called AE Title", False, False)
            calling = set_ae(decode_bytes(pdu[26:42]).strip(), "Calling AE Title", False, False)
        except ValueError as exc:
            raise ProtocolError(f"malformed A-ASSOCIATE-RQ: {type(exc).__name__}") from exc
        return dataclasses.replace(known[0], called_ae=str(called or "").strip(),
                                   calling_ae=str(calling or "").strip(),
                                   ae_fields=bytes(pdu[_AE_FIELDS]))

    def negotiate(self, request: AssociationRequest) -> Negotiated:
        """Choose the presentation contexts and encode the A-ASSOCIATE-AC (see :func:`negotiate`)."""
        with self._lock:
            known = self._known.get(request.key)
        if known is None:
            outcome = negotiate(request, self.supported, max_pdu=self.max_pdu)
            with self._lock:
                self._known[request.key] = (request, outcome)
                while len(self._known) > self.capacity:
                    self._known.popitem(last=False)
        else:
            outcome = known[1]
        ac = bytearray(outcome.ac_pdu)
        ac[_AE_FIELDS] = request.ae_fields  # "the same value as in the A-ASSOCIATE-RQ" (PS3.8)
        return Negotiated(bytes(ac), dict(outcome.contexts))


@dataclass
class Negotiated:
    """The outcome of presentation-context negotiation."""

    ac_pdu: bytes
    #: Accepted context ID → (abstract syntax, transfer syntax).
    contexts: dict[int, tuple[str, str]] = field(default_factory=dict)


def negotiate(request: AssociationRequest, supported: list[PresentationContext],
              implementation_uid: str = IMPLEMENTATION_CLASS_UID,
              max_pdu: int = 0) -> Negotiated:
    """Choose presentation contexts and encode the A-ASSOCIATE-AC.

    Parameters
    ----------
    request:
        The decoded request.
    supported:
        The node's contexts (one per abstract syntax, transfer syntaxes in order of preference).
    implementation_uid:
        Implementation Class UID sent back.
    max_pdu:
        The largest P-DATA-TF PDU this node receives (0: no limit).
    """
    rq = request.primitive
    roles = {UID(str(item.sop_class_uid)): (item.scu_role, item.scp_role)
             for item in rq.user_information if isinstance(item, SCP_SCU_RoleSelectionNegotiation)}
    try:
        results, role_items = negotiate_as_acceptor(rq.presentation_context_definition_list,
                                                    supported, roles or None)
    except Exception as exc:  # pynetdicom on a proposal its decoder let through
        raise ProtocolError(f"presentation contexts cannot be negotiated: {type(exc).__name__}") \
            from exc
    ac = A_ASSOCIATE()
    ac.application_context_name = rq.application_context_name
    ac.calling_ae_title = rq.calling_ae_title
    ac.called_ae_title = rq.called_ae_title
    ac.result = 0x00
    ac.presentation_context_definition_results_list = results
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = max_pdu
    class_uid = ImplementationClassUIDNotification()
    class_uid.implementation_class_uid = implementation_uid
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    user_info: list[Any] = [max_length, class_uid, version, *role_items]
    if any(isinstance(item, AsynchronousOperationsWindowNegotiation) for item in rq.user_information):
        window = AsynchronousOperationsWindowNegotiation()  # we answer one operation at a time
        window.maximum_number_operations_invoked = 1
        window.maximum_number_operations_performed = 1
        user_info.append(window)
    ac.user_information = user_info
    pdu = A_ASSOCIATE_AC()
    pdu.from_primitive(ac)
    accepted = {int(cx.context_id): (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                for cx in results if cx.result == 0x00 and cx.context_id is not None}
    return Negotiated(pdu.encode(), accepted)


@dataclass(frozen=True)
class Command:
    """The elements of a DIMSE request command set that the node uses."""

    command_field: int
    message_id: int
    affected_sop_class: str
    affected_sop_instance: str
    has_dataset: bool


def decode_command(data: bytes) -> Command:
    """Decode an implicit VR little endian command set (PS3.7 E.1).

    Raises
    ------
    ProtocolError
        When the command set is malformed or lacks the Command Field.
    """
    values: dict[int, bytes] = {}
    offset, end = 0, len(data)
    while offset < end:
        if offset + 8 > end:
            raise ProtocolError("truncated command set element")
        group, element, length = _ELEMENT.unpack_from(data, offset)
        offset += 8
        if group != 0x0000 or length == 0xFFFFFFFF or offset + length > end:
            raise ProtocolError("malformed command set")
        values[element] = data[offset:offset + length]
        offset += length

    def us(element: int, default: int | None = None) -> int:
        raw = values.get(element)
        if raw is None or len(raw) != 2:
            if default is None:
                raise ProtocolError(f"command set without a valid (0000,{element:04X})")
            return default
        return int(struct.unpack("<H", raw)[0])

    def ui(element: int) -> str:
        return values.get(element, b"").rstrip(b"\x00 ").decode("ascii", "replace")

    return Command(command_field=us(0x0100), message_id=us(0x0110, 0),
                   affected_sop_class=ui(0x0002), affected_sop_instance=ui(0x1000),
                   has_dataset=us(0x0800, NO_DATASET) != NO_DATASET)


def _element(element: int, value: bytes) -> bytes:
    return _ELEMENT.pack(0x0000, element, len(value)) + value


def _echoable(value: str) -> bool:
    """Whether a UID from the request can be echoed in the response (printable ASCII, 64 at most)."""
    return bool(value) and len(value) <= 64 and value.isascii() and value.isprintable()


def _ui(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def encode_response(request: Command, status: int, error_comment: str = "") -> bytes:
    """The response command set to ``request`` with ``status`` (no data set follows).

    The request's Affected SOP Class / Instance UID are echoed when they are printable ASCII of at
    most 64 characters, and left out otherwise (a malformed request still gets its status).
    """
    body = b"".join([
        _element(0x0002, _ui(request.affected_sop_class)) if _echoable(request.affected_sop_class)
        else b"",
        _element(0x0100, struct.pack("<H", (request.command_field | 0x8000) & 0xFFFF)),
        _element(0x0120, struct.pack("<H", request.message_id)),
        _element(0x0800, struct.pack("<H", NO_DATASET)),
        _element(0x0900, struct.pack("<H", status)),
        _element(0x0902, _lo(error_comment)) if error_comment else b"",
        _element(0x1000, _ui(request.affected_sop_instance)) if _echoable(request.affected_sop_instance)
        else b"",
    ])
    return _element(0x0000, struct.pack("<I", len(body))) + body


def _lo(value: str) -> bytes:
    raw = value[:64].encode("ascii", "replace")
    return raw + b" " if len(raw) % 2 else raw


def p_data_pdus(context_id: int, data: bytes, *, command: bool, peer_max_pdu: int) -> bytes:
    """``data`` as P-DATA-TF PDUs of one PDV each, split to fit the peer's maximum PDU length."""
    chunk = len(data) or 1
    if peer_max_pdu:
        chunk = max(1, min(chunk, peer_max_pdu - 6))
    out = []
    for start in range(0, max(len(data), 1), chunk):
        part = data[start:start + chunk]
        last = start + chunk >= len(data)
        control = (0x01 if command else 0x00) | (0x02 if last else 0x00)
        out.append(struct.pack(">BxIIBB", P_DATA_TF_TYPE, len(part) + 6, len(part) + 2, context_id,
                               control) + part)
    return b"".join(out)
