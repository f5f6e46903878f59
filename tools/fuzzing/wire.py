"""The fuzz tool's side of the wire: a raw DICOM peer and the PDUs and command sets it sends.

Deliberately not pynetdicom's association machinery (which refuses to send malformed input):
PDUs are built here byte by byte (an A-ASSOCIATE-RQ is encoded by pynetdicom's PDU class, then
mutated by the cases), and :class:`Peer` reads whole PDUs back and names the node's answer.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Iterable

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context

CT = "1.2.840.10008.5.1.4.1.1.2"
VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
DEFLATED = "1.2.840.10008.1.2.1.99"
JPEG_LS = "1.2.840.10008.1.2.4.80"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
#: Context IDs of the standard proposal.
CX_ECHO, CX_CT_EXPLICIT, CX_CT_IMPLICIT, CX_CT_DEFLATED, CX_CT_JPEGLS = 1, 3, 5, 7, 9


def associate_rq(calling: str, called: str, contexts: Iterable[tuple[int, str, list[str]]],
                 max_pdu: int = 65536, *, window: bool = False) -> bytes:
    """An A-ASSOCIATE-RQ encoded by pynetdicom (``window``: ask for 5 operations each way)."""
    rq = A_ASSOCIATE()
    rq.application_context_name = APPLICATION_CONTEXT
    rq.calling_ae_title, rq.called_ae_title = calling, called
    items = []
    for cid, abstract, syntaxes in contexts:
        cx = build_context(abstract, syntaxes)
        cx.context_id = cid
        items.append(cx)
    rq.presentation_context_definition_list = items
    item = MaximumLengthNotification()
    item.maximum_length_received = max_pdu
    user: list[object] = [item]
    if window:
        async_ops = AsynchronousOperationsWindowNegotiation()
        async_ops.maximum_number_operations_invoked = 5
        async_ops.maximum_number_operations_performed = 5
        user.append(async_ops)
    rq.user_information = user  # type: ignore[assignment]
    out = A_ASSOCIATE_RQ()
    out.from_primitive(rq)
    return bytes(out.encode())


def drop_transfer_syntaxes(rq: bytes) -> bytes:
    """The A-ASSOCIATE-RQ with the transfer syntax items of its first presentation context removed."""
    i = rq.index(b"\x20\x00", 74)
    (length,) = struct.unpack_from(">H", rq, i + 2)
    context = rq[i + 4:i + 4 + length]
    (abstract_len,) = struct.unpack_from(">H", context, 6)
    body = context[:8 + abstract_len]
    new = b"\x20\x00" + struct.pack(">H", len(body)) + body
    out = rq[:i] + new + rq[i + 4 + length:]
    return out[:2] + struct.pack(">I", len(out) - 6) + out[6:]


STANDARD_CONTEXTS = [(CX_ECHO, VERIFICATION, [IMPLICIT]), (CX_CT_EXPLICIT, CT, [EXPLICIT]),
                     (CX_CT_IMPLICIT, CT, [IMPLICIT]), (CX_CT_DEFLATED, CT, [DEFLATED]),
                     (CX_CT_JPEGLS, CT, [JPEG_LS])]


def p_data(context_id: int, data: bytes, *, command: bool, last: bool = True) -> bytes:
    """One P-DATA-TF PDU of one PDV."""
    control = (1 if command else 0) | (2 if last else 0)
    return struct.pack(">BxIIBB", 4, len(data) + 6, len(data) + 2, context_id, control) + data


def p_data_chunks(context_id: int, data: bytes, *, command: bool, size: int = 65536 - 6) -> bytes:
    """``data`` as P-DATA-TF PDUs of at most ``size`` bytes of data each."""
    out = []
    for start in range(0, max(len(data), 1), size):
        out.append(p_data(context_id, data[start:start + size], command=command,
                          last=start + size >= len(data)))
    return b"".join(out)


def command_set(**elements: object) -> bytes:
    """An implicit VR little endian command set with its group length."""
    ds = Dataset()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    body = encode(ds, implicit=True)
    group = Dataset()
    group.CommandGroupLength = len(body)
    return encode(group, implicit=True) + body


def raw_element(element: int, value: bytes) -> bytes:
    """A command set element (group 0000), implicit VR little endian."""
    return struct.pack("<HHI", 0, element, len(value)) + value


def raw_command(*elements: bytes) -> bytes:
    """A command set of raw elements, its group length first."""
    body = b"".join(elements)
    return raw_element(0x0000, struct.pack("<I", len(body))) + body


def store_rq(instance_uid: str, sop_class: str = CT) -> bytes:
    """A C-STORE-RQ command set (message ID 1, a data set follows)."""
    return command_set(AffectedSOPClassUID=sop_class, CommandField=0x0001, MessageID=1, Priority=0,
                       CommandDataSetType=0x0000, AffectedSOPInstanceUID=instance_uid)


def echo_rq(sop_class: str = VERIFICATION) -> bytes:
    """A C-ECHO-RQ command set (message ID 1, no data set)."""
    return command_set(AffectedSOPClassUID=sop_class, CommandField=0x0030, MessageID=1,
                       CommandDataSetType=0x0101)


def encode(ds: Dataset, *, implicit: bool) -> bytes:
    """``ds`` encoded little endian, implicit or explicit VR, without preamble or file meta."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, implicit
    write_dataset(fp, ds)
    return bytes(fp.getvalue())


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    """Exactly ``n`` bytes from ``sock`` (``EOFError`` when it closes first)."""
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    """The next whole PDU (type, header and body); ``EOFError`` when the connection closes."""
    header = recv_exactly(sock, 6)
    pdu_type, length = struct.unpack(">BxI", header)
    return pdu_type, header + recv_exactly(sock, length)


class Peer:
    """A raw DICOM connection: send bytes, read whole PDUs, classify the node's answer."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, data: bytes) -> bool:
        """Send; False when the node already closed the connection."""
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def read_pdu(self) -> tuple[int, bytes] | None:
        """The next PDU (type, body); None when the connection closed or timed out first."""
        try:
            header = recv_exactly(self.sock, 6)
            pdu_type, length = struct.unpack(">BxI", header)
            if length > 1 << 24:
                return pdu_type, b""
            return pdu_type, header + recv_exactly(self.sock, length)
        except (OSError, EOFError):
            return None

    def associate(self, calling: str, called: str,
                  contexts: list[tuple[int, str, list[str]]] = STANDARD_CONTEXTS) -> dict[int, str]:
        """Send an A-ASSOCIATE-RQ; the accepted contexts (ID → transfer syntax). Raises
        ``ConnectionError`` when the association is not accepted."""
        self.send(associate_rq(calling, called, contexts))
        answer = self.read_pdu()
        if answer is None or answer[0] != 2:
            raise ConnectionError(f"association not accepted: {describe(answer)}")
        ac = A_ASSOCIATE_AC()
        ac.decode(answer[1])
        return {int(cx.context_id or 0): str((cx.transfer_syntax or [""])[0])
                for cx in ac.presentation_context if cx.result == 0}

    def answer(self) -> str:
        """The node's answer to what was sent: the status of a response, an abort, a close."""
        answer = self.read_pdu()
        if answer is not None and answer[0] == 4:
            return f"status 0x{response_status(answer[1]):04X}"
        return describe(answer)

    def release(self) -> None:
        """Send an A-RELEASE-RQ, read the answer, close."""
        if self.send(struct.pack(">BxI4x", 5, 4)):
            self.read_pdu()
        self.close()

    def close(self) -> None:
        """Close the socket (already closed: nothing)."""
        with contextlib.suppress(OSError):
            self.sock.close()


def describe(answer: tuple[int, bytes] | None) -> str:
    """The name of a PDU the node answered with (``closed`` for no answer)."""
    if answer is None:
        return "closed"
    return {2: "A-ASSOCIATE-AC", 3: "A-ASSOCIATE-RJ", 6: "A-RELEASE-RP", 7: "A-ABORT"}.get(
        answer[0], f"PDU 0x{answer[0]:02X}")


def response_status(pdu: bytes) -> int:
    """The Status (0000,0900) of the command set in a P-DATA-TF PDU (-1 when absent)."""
    data = pdu[12:]
    offset = 0
    while offset + 8 <= len(data):
        _group, element, length = struct.unpack_from("<HHI", data, offset)
        if element == 0x0900 and length == 2:
            return int(struct.unpack_from("<H", data, offset + 8)[0])
        offset += 8 + length
    return -1
