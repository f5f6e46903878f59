#!/usr/bin/env python3
"""Fuzz a running lungnode (or any C-STORE SCP) over the network and print what it answered.

Seeded and repeatable: ``--seed`` and ``--cases`` fix every case. Each case opens its own
connection, sends one kind of bad input and records the node's answer:

========== ===================================================================================
family     what is sent
========== ===================================================================================
pdu        malformed A-ASSOCIATE-RQs (bit flips, cuts, empty or non-ASCII AE titles, a context
           without transfer syntax), unknown PDU types, PDUs out of order
command    malformed DIMSE command sets on an association (cut or bad elements, non-ASCII UIDs,
           unknown commands, C-ECHO on a storage context, a C-STORE without data set)
dataset    a real CT slice with its data set mutated (bit flips and byte runs in the header,
           cut at a random place, element lengths and VRs changed, garbage appended)
pixels     pixel data that does not fit the header (short, long, empty, Rows = Columns = 65535,
           float pixel data, encapsulated without fragment, deflated and short, trailing bytes,
           explicit VR on an implicit VR context)
huge       lengths meant to make the node allocate (P-DATA-TF, PDV, A-RELEASE-RQ and
           A-ASSOCIATE-RQ of 0xFFFFFFF0 bytes, a command PDV of 4 MiB, a deflate bomb)
trickle    connections that send one byte at a time, slowly, while a real C-ECHO must succeed
========== ===================================================================================

Outcomes: ``status 0xNNNN`` (a DIMSE status), ``A-ASSOCIATE-RJ``, ``A-ABORT``,
``A-ASSOCIATE-AC`` (a mutated request that is still valid), ``closed (peer aborted)`` (the case
sent an A-ABORT itself: no answer is due), ``closed`` (closed without an answer: a finding),
``cut`` (a trickle closed by the node within its timeout). Findings are listed after the
table: a case that got no answer, a deliberately broken pixel case acknowledged with 0x0000, a
C-ECHO that failed between cases. With ``--storage-root`` (the node's ``[storage] root`` on this
machine) every stored file is read back with pydicom (and DCMTK ``dcmdump`` when installed).

Example::

    python tools/fuzz_node.py --host 127.0.0.1 --port 11112 --cases 2000 --seed 1 \\
        --calling-ae PACS --sample /path/to/ct-slice.dcm
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import random
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import generate_uid
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context

CT = "1.2.840.10008.5.1.4.1.1.2"
VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
DEFLATED = "1.2.840.10008.1.2.1.99"
JPEG_LS = "1.2.840.10008.1.2.4.80"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
FAMILIES = ("pdu", "command", "dataset", "pixels", "huge", "trickle")
#: Families whose cases must never be acknowledged with success.
MUST_FAIL = frozenset({"pixels"})
#: Context IDs of the standard proposal.
CX_ECHO, CX_CT_EXPLICIT, CX_CT_IMPLICIT, CX_CT_DEFLATED, CX_CT_JPEGLS = 1, 3, 5, 7, 9
DEFAULT_SAMPLE = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "ct" / \
    "chest-30-slices-uncompressed"


# ------------------------------------------------------------------------------------- wire
def associate_rq(calling: str, called: str, contexts: Iterable[tuple[int, str, list[str]]],
                 max_pdu: int = 65536) -> bytes:
    """An A-ASSOCIATE-RQ encoded by pynetdicom."""
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
    rq.user_information = [item]
    out = A_ASSOCIATE_RQ()
    out.from_primitive(rq)
    return bytes(out.encode())


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
    body = _encode(ds, implicit=True)
    group = Dataset()
    group.CommandGroupLength = len(body)
    return _encode(group, implicit=True) + body


def raw_element(element: int, value: bytes) -> bytes:
    """A command set element (group 0000), implicit VR little endian."""
    return struct.pack("<HHI", 0, element, len(value)) + value


def raw_command(*elements: bytes) -> bytes:
    body = b"".join(elements)
    return raw_element(0x0000, struct.pack("<I", len(body))) + body


def store_rq(instance_uid: str, sop_class: str = CT) -> bytes:
    return command_set(AffectedSOPClassUID=sop_class, CommandField=0x0001, MessageID=1, Priority=0,
                       CommandDataSetType=0x0000, AffectedSOPInstanceUID=instance_uid)


def echo_rq(sop_class: str = VERIFICATION) -> bytes:
    return command_set(AffectedSOPClassUID=sop_class, CommandField=0x0030, MessageID=1,
                       CommandDataSetType=0x0101)


def _encode(ds: Dataset, *, implicit: bool) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, implicit
    write_dataset(fp, ds)
    return bytes(fp.getvalue())


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
            header = self._recv(6)
            pdu_type, length = struct.unpack(">BxI", header)
            if length > 1 << 24:
                return pdu_type, b""
            return pdu_type, header + self._recv(length)
        except (OSError, EOFError):
            return None

    def _recv(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

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
        if self.send(struct.pack(">BxI4x", 5, 4)):
            self.read_pdu()
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def describe(answer: tuple[int, bytes] | None) -> str:
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


# ------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    """One fuzz case: its family, a short label and what it does against the node."""

    family: str
    label: str
    run: Callable[[Fuzzer], str]
    #: The instance a data set case sends (its acknowledgement is checked against the store).
    sop_instance_uid: str = ""
    #: The case ends the association itself (an A-ABORT): a close without answer is right.
    closing: bool = False


@dataclass
class Results:
    """Outcomes per family and the findings."""

    table: dict[str, collections.Counter[str]] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter))
    findings: list[str] = field(default_factory=list)
    acknowledged: list[str] = field(default_factory=list)
    cases: int = 0

    def add(self, case: Case, outcome: str) -> None:
        if case.closing and outcome == "closed":
            outcome = "closed (peer aborted)"
        self.cases += 1
        self.table[case.family][outcome] += 1
        if outcome == "closed":
            self.findings.append(f"{case.family}/{case.label}: no answer (bare close)")
        if outcome == "status 0x0000" and case.sop_instance_uid:
            self.acknowledged.append(case.sop_instance_uid)
            if case.family in MUST_FAIL:
                self.findings.append(f"{case.family}/{case.label}: acknowledged with 0x0000")


class Fuzzer:
    """Builds seeded cases from a sample CT slice and runs them against a node.

    Parameters
    ----------
    host, port, calling_ae, called_ae:
        The node and the AE titles it accepts.
    sample:
        A CT Image Storage file (native pixel data) the data set cases mutate.
    seed:
        Seed of every random choice.
    timeout:
        Seconds to wait for an answer.
    trickle_s:
        How long a trickle case may take to be cut (the node's ACSE timeout plus a margin).
    """

    def __init__(self, host: str, port: int, calling_ae: str, called_ae: str, sample: Path,
                 seed: int, timeout: float = 20.0, trickle_s: float = 40.0) -> None:
        self.host, self.port = host, port
        self.calling_ae, self.called_ae = calling_ae, called_ae
        self.rng = random.Random(seed)
        self.timeout = timeout
        self.trickle_s = trickle_s
        self.sample = pydicom.dcmread(sample)
        if self.sample.file_meta.TransferSyntaxUID.is_compressed:
            self.sample.decompress()

    # ---------------------------------------------------------------- helpers
    def peer(self) -> Peer:
        return Peer(self.host, self.port, self.timeout)

    def echo_ok(self) -> bool:
        """A well-formed C-ECHO succeeds."""
        try:
            peer = self.peer()
            peer.associate(self.calling_ae, self.called_ae, [(CX_ECHO, VERIFICATION, [IMPLICIT])])
            peer.send(p_data(CX_ECHO, echo_rq(), command=True))
            ok = peer.answer() == "status 0x0000"
            peer.release()
            return ok
        except (OSError, ConnectionError):
            return False

    def fresh_dataset(self) -> Dataset:
        """The sample with new study, series and instance UIDs (a new one-slice series)."""
        ds = copy.deepcopy(self.sample)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (generate_uid() for _ in range(3))
        ds.FrameOfReferenceUID = generate_uid()
        ds.PatientName = "FUZZ^PATIENT"
        return ds

    def store(self, context: int, instance_uid: str, data: bytes, *, sop_class: str = CT) -> str:
        """One C-STORE of ``data`` (the data set bytes as sent) on ``context``; the answer."""
        peer = self.peer()
        try:
            peer.associate(self.calling_ae, self.called_ae)
            peer.send(p_data(context, store_rq(instance_uid, sop_class), command=True))
            if not peer.send(p_data_chunks(context, data, command=False)):
                return peer.answer()
            outcome = peer.answer()
            if outcome.startswith("status"):
                peer.release()
            return outcome
        finally:
            peer.close()

    def exchange(self, *messages: bytes, associate: bool = True,
                 contexts: list[tuple[int, str, list[str]]] = STANDARD_CONTEXTS) -> str:
        """Send ``messages`` (after an association, unless told not to); the first answer."""
        peer = self.peer()
        try:
            if associate:
                peer.associate(self.calling_ae, self.called_ae, contexts)
            for message in messages:
                if not peer.send(message):
                    break
            outcome = peer.answer()
            if outcome.startswith("status"):
                peer.release()
            return outcome
        finally:
            peer.close()

    # ---------------------------------------------------------------- families
    def cases(self, n: int, families: Iterable[str] = FAMILIES) -> list[Case]:
        """``n`` cases drawn round-robin from ``families`` (trickle cases come as one batch)."""
        chosen = [f for f in families if f != "trickle"]
        makers: dict[str, Callable[[int], Case]] = {
            "pdu": self._pdu_case, "command": self._command_case, "dataset": self._dataset_case,
            "pixels": self._pixels_case, "huge": self._huge_case}
        return [makers[chosen[i % len(chosen)]](i) for i in range(n)]

    def _pdu_case(self, i: int) -> Case:
        rng = self.rng
        good = associate_rq(self.calling_ae, self.called_ae, STANDARD_CONTEXTS)
        kind = rng.choice(["flip", "cut", "empty-calling", "empty-called", "non-ascii-ae",
                           "no-ts-item", "unknown-type", "release-first", "p-data-first", "zero"])
        if kind == "flip":
            data = bytearray(good)
            for _ in range(rng.randint(1, 8)):
                pos = rng.randrange(6, len(data))
                data[pos] ^= 1 << rng.randrange(8)
            message = bytes(data)
        elif kind == "cut":
            cut = rng.randrange(7, len(good))
            message = good[:2] + struct.pack(">I", cut - 6) + good[6:cut]
        elif kind in ("empty-calling", "empty-called", "non-ascii-ae"):
            data = bytearray(good)
            where = slice(26, 42) if kind != "empty-called" else slice(10, 26)
            data[where] = b" " * 16 if kind != "non-ascii-ae" else b"PEER\xe9\xe9".ljust(16)
            message = bytes(data)
        elif kind == "no-ts-item":
            message = _drop_transfer_syntaxes(good)
        elif kind == "unknown-type":
            message = struct.pack(">BxI", rng.choice([0x00, 0x08, 0x09, 0x7F, 0xFF]), 4) + b"\0" * 4
        elif kind == "release-first":
            message = struct.pack(">BxI4x", 5, 4)
        elif kind == "p-data-first":
            message = p_data(1, echo_rq(), command=True)
        else:
            message = b"\0" * 10
        return Case("pdu", kind, lambda f: f.exchange(message, associate=False))

    def _command_case(self, i: int) -> Case:
        rng = self.rng
        kind = rng.choice(["non-ascii-class", "non-ascii-instance", "cut-element", "bad-length",
                           "unknown-command", "echo-on-ct", "store-no-dataset", "no-command-field",
                           "garbage", "wrong-context", "dataset-first"])
        uid = generate_uid()
        if kind == "non-ascii-class":
            cmd = raw_command(raw_element(0x0002, "1.2.840.10008.1.1\u00e9".encode("latin-1")),
                              raw_element(0x0100, struct.pack("<H", 0x0030)),
                              raw_element(0x0110, struct.pack("<H", 1)),
                              raw_element(0x0800, struct.pack("<H", 0x0101)))
            messages = [p_data(CX_ECHO, cmd, command=True)]
        elif kind == "non-ascii-instance":
            cmd = raw_command(raw_element(0x0002, CT.encode() + b"\0"),
                              raw_element(0x0100, struct.pack("<H", 1)),
                              raw_element(0x0110, struct.pack("<H", 1)),
                              raw_element(0x0800, struct.pack("<H", 0)),
                              raw_element(0x1000, "1.2.3.\u00e94".encode("latin-1")))
            messages = [p_data(CX_CT_EXPLICIT, cmd, command=True),
                        p_data(CX_CT_EXPLICIT, b"\x08\x00\x16\x00UI\x00\x00", command=False)]
        elif kind == "cut-element":
            cmd = store_rq(uid)
            messages = [p_data(CX_CT_EXPLICIT, cmd[:rng.randrange(1, len(cmd))], command=True)]
        elif kind == "bad-length":
            edited = bytearray(store_rq(uid))
            struct.pack_into("<I", edited, 12 + 4, rng.choice([0xFFFFFFFF, 0xFFFF, len(edited) + 1]))
            messages = [p_data(CX_CT_EXPLICIT, bytes(edited), command=True)]
        elif kind == "unknown-command":
            field_ = rng.choice([0x0020, 0x0010, 0x0FFF, 0x8001, 0x0021])
            messages = [p_data(CX_CT_EXPLICIT, command_set(AffectedSOPClassUID=CT, CommandField=field_,
                                                           MessageID=2, CommandDataSetType=0x0101),
                               command=True)]
        elif kind == "echo-on-ct":
            messages = [p_data(CX_CT_EXPLICIT, echo_rq(CT), command=True)]
        elif kind == "store-no-dataset":
            messages = [p_data(CX_CT_EXPLICIT, command_set(
                AffectedSOPClassUID=CT, CommandField=1, MessageID=1, Priority=0,
                CommandDataSetType=0x0101, AffectedSOPInstanceUID=uid), command=True)]
        elif kind == "no-command-field":
            messages = [p_data(CX_CT_EXPLICIT, command_set(AffectedSOPClassUID=CT, MessageID=1),
                               command=True)]
        elif kind == "garbage":
            messages = [p_data(CX_CT_EXPLICIT, rng.randbytes(rng.randint(1, 300)), command=True)]
        elif kind == "wrong-context":
            messages = [p_data(rng.choice([2, 11, 255]), echo_rq(), command=True)]
        else:
            messages = [p_data(CX_CT_EXPLICIT, b"\x08\x00\x16\x00UI\x00\x00", command=False)]
        return Case("command", kind, lambda f: f.exchange(*messages))

    def _dataset_case(self, i: int) -> Case:
        rng = self.rng
        ds = self.fresh_dataset()
        uid = str(ds.SOPInstanceUID)
        implicit = rng.random() < 0.3
        data = bytearray(_encode(ds, implicit=implicit))
        header_end = data.find(b"\xe0\x7f\x10\x00")
        kind = rng.choice(["flip", "run", "cut", "length", "vr", "garbage-end", "drop-element",
                           "unclosed-sequence"])
        if kind == "flip":
            for _ in range(rng.randint(1, 6)):
                pos = rng.randrange(0, header_end)
                data[pos] ^= 1 << rng.randrange(8)
        elif kind == "run":
            pos = rng.randrange(0, header_end)
            data[pos:pos + 8] = rng.randbytes(8)
        elif kind == "cut":
            del data[rng.randrange(1, len(data)):]
        elif kind == "length":
            offsets = _element_offsets(bytes(data[:header_end]), implicit)
            pos = rng.choice(offsets)
            if implicit:
                struct.pack_into("<I", data, pos + 4, rng.choice([0, 1, 0xFFFF, 0xFFFFFFF0, 0xFFFFFFFF]))
            else:
                struct.pack_into("<H", data, pos + 6, rng.choice([0, 1, 0xFFFF]))
        elif kind == "vr" and not implicit:
            pos = rng.choice(_element_offsets(bytes(data[:header_end]), implicit))
            data[pos + 4:pos + 6] = rng.choice([b"SQ", b"OB", b"UN", b"ZZ", b"\x00\x00", b"US"])
        elif kind == "garbage-end":
            data += rng.randbytes(rng.randint(1, 64))
        elif kind == "drop-element":
            offsets = _element_offsets(bytes(data[:header_end]), implicit)
            k = rng.randrange(len(offsets) - 1)
            del data[offsets[k]:offsets[k + 1]]
        else:
            data += b"\xfa\xff\xfa\xffSQ\x00\x00\xff\xff\xff\xff\xfe\xff\x00\xe0\xff\xff\xff\xff"
        context = CX_CT_IMPLICIT if implicit else CX_CT_EXPLICIT
        blob = bytes(data)
        return Case("dataset", kind, lambda f: f.store(context, uid, blob), uid)

    def _pixels_case(self, i: int) -> Case:
        rng = self.rng
        ds = self.fresh_dataset()
        uid = str(ds.SOPInstanceUID)
        pixels = bytes(ds.PixelData)
        kind = rng.choice(["short", "long", "empty", "huge-size", "float", "no-fragment",
                           "deflated-short", "trailing", "explicit-on-implicit", "rows-changed",
                           "odd-padding-wrong"])
        context = CX_CT_EXPLICIT
        if kind == "short":
            ds.PixelData = pixels[:rng.randrange(2, len(pixels) - 2) & ~1]
        elif kind == "long":
            ds.PixelData = pixels + b"\0" * (2 * rng.randint(1, 1000))
        elif kind == "empty":
            ds.PixelData = b""
        elif kind == "huge-size":
            ds.Rows = ds.Columns = 65535
        elif kind == "float":
            del ds.PixelData
            ds.FloatPixelData = np.zeros(ds.Rows * ds.Columns, np.float32).tobytes()
        elif kind == "rows-changed":
            ds.Rows = int(ds.Rows) + rng.choice([-3, -1, 1, 7])
        elif kind == "odd-padding-wrong":
            ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 3, 3, 8, 8, 7
            ds.PixelRepresentation = 0
            ds.PixelData = b"\x01" * 12
        if kind == "no-fragment":
            ds.PixelData = b"\xfe\xff\x00\xe0\x00\x00\x00\x00"  # the offset table only
            data = _encode_encapsulated(ds)
            context = CX_CT_JPEGLS
        elif kind == "deflated-short":
            ds.PixelData = pixels[:len(pixels) // 2]
            compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
            data = compressor.compress(_encode(ds, implicit=False)) + compressor.flush()
            context = CX_CT_DEFLATED
        elif kind == "trailing":
            data = _encode(ds, implicit=False) + rng.randbytes(rng.randint(1, 200))
        elif kind == "explicit-on-implicit":
            data = _encode(ds, implicit=False)
            context = CX_CT_IMPLICIT
        else:
            data = _encode(ds, implicit=False)
        return Case("pixels", kind, lambda f: f.store(context, uid, data), uid)

    def _huge_case(self, i: int) -> Case:
        rng = self.rng
        kind = rng.choice(["p-data", "pdv", "command-pdv", "release", "associate-rq", "abort",
                           "element", "deflate-bomb"])
        big = 0xFFFFFFF0
        if kind == "p-data":
            message = struct.pack(">BxI", 4, big) + struct.pack(">IBB", big - 4, CX_CT_EXPLICIT, 3)
            return Case("huge", kind, lambda f: f.exchange(message + b"\0" * 4096))
        if kind == "pdv":
            message = struct.pack(">BxI", 4, 65536) + struct.pack(">IBB", big, CX_CT_EXPLICIT, 3)
            return Case("huge", kind, lambda f: f.exchange(message))
        if kind == "command-pdv":
            size = (4 << 20) - 6
            message = struct.pack(">BxI", 4, size + 6) + struct.pack(">IBB", size + 2, CX_CT_EXPLICIT, 3)
            return Case("huge", kind, lambda f: f.exchange(message + b"\0" * 65536))
        if kind == "release":
            message = struct.pack(">BxI", 5, big) + b"\0" * 4096
            return Case("huge", kind, lambda f: f.exchange(message))
        if kind == "associate-rq":
            message = struct.pack(">BxI", 1, big) + b"\0" * 4096
            return Case("huge", kind, lambda f: f.exchange(message, associate=False))
        if kind == "abort":
            message = struct.pack(">BxI", 7, big) + b"\0" * 64
            return Case("huge", kind, lambda f: f.exchange(message, p_data(CX_ECHO, echo_rq(),
                                                                          command=True)),
                        closing=True)
        ds = self.fresh_dataset()
        uid = str(ds.SOPInstanceUID)
        if kind == "element":
            data = bytearray(_encode(ds, implicit=False))
            pos = data.find(b"\xe0\x7f\x10\x00")
            struct.pack_into("<I", data, pos + 8, big)
            blob = bytes(data)
            return Case("huge", kind, lambda f: f.store(CX_CT_EXPLICIT, uid, blob), uid)
        ds.PixelData = b"\0" * (64 << 20)  # 64 MiB of zeros: 64 kB deflated
        ds.Rows = ds.Columns = 4096
        compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        bomb = compressor.compress(_encode(ds, implicit=False)) + compressor.flush()
        return Case("huge", kind, lambda f: f.store(CX_CT_DEFLATED, uid, bomb), uid)

    # ---------------------------------------------------------------- trickle
    def trickle(self, n: int, interval: float = 1.0) -> tuple[list[str], bool]:
        """Open ``n`` connections that send a valid A-ASSOCIATE-RQ one byte per ``interval``;
        while they trickle, a real C-ECHO must succeed. The outcome of each trickle ("cut" when
        the node closed it, with or without an A-ABORT, before it finished) and the echo's."""
        message = associate_rq(self.calling_ae, self.called_ae, STANDARD_CONTEXTS)
        peers = [self.peer() for _ in range(n)]
        outcomes = ["" for _ in peers]
        stop = threading.Event()

        def drip() -> None:
            position = 0
            while not stop.is_set() and position < len(message):
                for k, peer in enumerate(peers):
                    if not outcomes[k] and not peer.send(message[position:position + 1]):
                        outcomes[k] = "cut"
                position += 1
                stop.wait(interval)

        thread = threading.Thread(target=drip, daemon=True)
        thread.start()
        time.sleep(min(3.0, interval * 3))
        echo = self.echo_ok()
        deadline = time.monotonic() + self.trickle_s
        for k, peer in enumerate(peers):
            if outcomes[k]:
                continue
            peer.sock.settimeout(max(0.1, deadline - time.monotonic()))
            answer = peer.read_pdu()
            outcomes[k] = "cut" if answer is None or answer[0] == 7 else describe(answer)
        stop.set()
        thread.join(5)
        for peer in peers:
            peer.close()
        return outcomes, echo


def _drop_transfer_syntaxes(rq: bytes) -> bytes:
    """The A-ASSOCIATE-RQ with the transfer syntax items of its first presentation context removed."""
    i = rq.index(b"\x20\x00", 74)
    (length,) = struct.unpack_from(">H", rq, i + 2)
    context = rq[i + 4:i + 4 + length]
    (abstract_len,) = struct.unpack_from(">H", context, 6)
    body = context[:8 + abstract_len]
    new = b"\x20\x00" + struct.pack(">H", len(body)) + body
    out = rq[:i] + new + rq[i + 4 + length:]
    return out[:2] + struct.pack(">I", len(out) - 6) + out[6:]


def _element_offsets(data: bytes, implicit: bool) -> list[int]:
    """Offsets of the top-level elements of an encoded data set (up to the pixel data)."""
    offsets, offset = [], 0
    while offset + 8 <= len(data):
        offsets.append(offset)
        if implicit:
            (length,) = struct.unpack_from("<I", data, offset + 4)
            offset += 8 + length
        else:
            vr = data[offset + 4:offset + 6]
            if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR", b"OF", b"OD", b"OL"):
                (length,) = struct.unpack_from("<I", data, offset + 8)
                offset += 12 + length
            else:
                (length,) = struct.unpack_from("<H", data, offset + 6)
                offset += 8 + length
        if length == 0xFFFFFFFF:
            break
    return offsets or [0]


def _encode_encapsulated(ds: Dataset) -> bytes:
    """``ds`` explicit VR little endian with its PixelData bytes written as an encapsulated item
    sequence (``PixelData`` holds the items, the delimiter is added)."""
    items = bytes(ds.PixelData)
    del ds.PixelData
    head = _encode(ds, implicit=False)
    return head + b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff" + items + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


# ------------------------------------------------------------------------------------- checks
def check_store(root: Path, acknowledged: Iterable[str]) -> list[str]:
    """Problems with what the node stored: acknowledged instances that are not readable in full
    by pydicom (and DCMTK dcmdump when installed), or temp files left behind."""
    problems: list[str] = []
    dcmdump = shutil.which("dcmdump")
    files = {p.name.split(".dcm")[0].split(".v")[0]: p for p in root.rglob("*.dcm")
             if ".tmp" not in p.parts and "results" not in p.parts}
    for uid in acknowledged:
        path = files.get(uid)
        if path is None:
            problems.append(f"{uid}: acknowledged but not stored")
            continue
        try:
            ds = pydicom.dcmread(path)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for element in ds.iterall():  # every value converted: reading in full is the check
                    _ = element.value
            if "PixelData" in ds and not ds.file_meta.TransferSyntaxUID.is_compressed:
                ds.pixel_array  # noqa: B018 - decoding is the check
        except Exception as exc:
            problems.append(f"{path.name}: pydicom cannot read it ({type(exc).__name__})")
            continue
        if dcmdump:
            run = subprocess.run([dcmdump, "-q", "+E", str(path)], capture_output=True, text=True,
                                 errors="replace")
            if run.returncode != 0 or "E: " in run.stderr:
                problems.append(f"{path.name}: dcmdump fails ({run.stderr.strip()[:200]})")
    tmp = root / ".tmp"
    if tmp.is_dir() and any(tmp.iterdir()):
        problems.append(f"temp files left: {sorted(p.name for p in tmp.iterdir())[:5]}")
    return problems


def run_campaign(fuzzer: Fuzzer, n: int, *, trickles: int = 0, echo_every: int = 25,
                 families: Iterable[str] = FAMILIES,
                 progress: Callable[[int, Case, str], None] | None = None) -> Results:
    """Run ``n`` cases (and a batch of ``trickles`` trickle connections); the outcomes."""
    results = Results()
    for i, case in enumerate(fuzzer.cases(n, families)):
        try:
            outcome = case.run(fuzzer)
        except (OSError, ConnectionError) as exc:
            outcome = "closed" if "not accepted" not in str(exc) else str(exc).split(": ", 1)[-1]
        results.add(case, outcome)
        if progress is not None:
            progress(i, case, outcome)
        if echo_every and (i + 1) % echo_every == 0 and not fuzzer.echo_ok():
            results.findings.append(f"C-ECHO failed after case {i} ({case.family}/{case.label})")
    if trickles:
        outcomes, echo = fuzzer.trickle(trickles)
        for outcome in outcomes:
            results.add(Case("trickle", "one byte a second", _batched), outcome)
        if not echo:
            results.findings.append("C-ECHO failed while trickling connections were open")
        not_cut = [o for o in outcomes if o != "cut"]
        if not_cut:
            results.findings.append(f"{len(not_cut)} trickling connection(s) not cut: {not_cut[:3]}")
    if not fuzzer.echo_ok():
        results.findings.append("C-ECHO failed after the campaign")
    return results


def _batched(fuzzer: Fuzzer) -> str:
    """The run of a case that is run in a batch (trickle), not on its own."""
    raise NotImplementedError("trickle cases run together in Fuzzer.trickle")


def format_table(results: Results) -> str:
    """Families × outcomes as a Markdown table."""
    outcomes = sorted({o for counter in results.table.values() for o in counter})
    lines = ["| family | cases | " + " | ".join(outcomes) + " |",
             "| --- | --- | " + " | ".join("---" for _ in outcomes) + " |"]
    for family in FAMILIES:
        counter = results.table.get(family)
        if not counter:
            continue
        lines.append(f"| {family} | {sum(counter.values())} | "
                     + " | ".join(str(counter.get(o, "")) for o in outcomes) + " |")
    return "\n".join(lines)


def _sample_path(given: str | None) -> Path:
    if given:
        return Path(given)
    files = sorted(DEFAULT_SAMPLE.glob("*.dcm"))
    if not files:
        sys.exit("no --sample given and the default sample folder is absent")
    return files[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--calling-ae", default="PACS", help="an AE title the node accepts")
    parser.add_argument("--called-ae", default="LUNGNODE")
    parser.add_argument("--sample", help="a CT Image Storage file to mutate (native pixel data)")
    parser.add_argument("--trickles", type=int, default=60,
                        help="trickling connections opened at the end (0: none)")
    parser.add_argument("--trickle-wait", type=float, default=40.0,
                        help="seconds the node gets to cut them (its acse_timeout_s plus a margin)")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--storage-root", help="the node's [storage] root, to read back what it stored")
    parser.add_argument("--timeout", type=float, default=20.0)
    args = parser.parse_args(argv)
    fuzzer = Fuzzer(args.host, args.port, args.calling_ae, args.called_ae, _sample_path(args.sample),
                    args.seed, timeout=args.timeout, trickle_s=args.trickle_wait)
    if not fuzzer.echo_ok():
        print("the node does not answer a C-ECHO: check --port and --calling-ae", file=sys.stderr)
        return 2
    started = time.monotonic()
    families = [f for f in args.families.split(",") if f]

    def progress(i: int, case: Case, outcome: str) -> None:
        if (i + 1) % 100 == 0:
            print(f"{i + 1} cases, {time.monotonic() - started:.0f} s", file=sys.stderr)

    results = run_campaign(fuzzer, args.cases, trickles=args.trickles if "trickle" in families else 0,
                           families=families, progress=progress)
    problems = check_store(Path(args.storage_root), results.acknowledged) if args.storage_root else []
    print(format_table(results))
    print(f"\n{results.cases} cases in {time.monotonic() - started:.0f} s, seed {args.seed}; "
          f"{len(results.acknowledged)} acknowledged with 0x0000")
    for finding in results.findings + problems:
        print(f"FINDING: {finding}")
    return 1 if results.findings or problems else 0


if __name__ == "__main__":
    sys.exit(main())
