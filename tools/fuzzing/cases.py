"""The fuzz cases: six families of bad input built, seeded, from a real CT slice (see
``tools/fuzz_node.py`` for the table of families), and the trickle batch."""

from __future__ import annotations

import copy
import random
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from tools.fuzzing.wire import (
    CT,
    CX_CT_DEFLATED,
    CX_CT_EXPLICIT,
    CX_CT_IMPLICIT,
    CX_CT_JPEGLS,
    CX_ECHO,
    IMPLICIT,
    STANDARD_CONTEXTS,
    VERIFICATION,
    Peer,
    associate_rq,
    command_set,
    describe,
    drop_transfer_syntaxes,
    echo_rq,
    encode,
    p_data,
    p_data_chunks,
    raw_command,
    raw_element,
    store_rq,
)

FAMILIES = ("pdu", "command", "dataset", "pixels", "huge", "trickle")


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
        return self.exchange(p_data(context, store_rq(instance_uid, sop_class), command=True),
                             p_data_chunks(context, data, command=False))

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
            message = drop_transfer_syntaxes(good)
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
        data = bytearray(encode(ds, implicit=implicit))
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
            data = compressor.compress(encode(ds, implicit=False)) + compressor.flush()
            context = CX_CT_DEFLATED
        elif kind == "trailing":
            data = encode(ds, implicit=False) + rng.randbytes(rng.randint(1, 200))
        elif kind == "explicit-on-implicit":
            data = encode(ds, implicit=False)
            context = CX_CT_IMPLICIT
        else:
            data = encode(ds, implicit=False)
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
            data = bytearray(encode(ds, implicit=False))
            pos = data.find(b"\xe0\x7f\x10\x00")
            struct.pack_into("<I", data, pos + 8, big)
            blob = bytes(data)
            return Case("huge", kind, lambda f: f.store(CX_CT_EXPLICIT, uid, blob), uid)
        ds.PixelData = b"\0" * (64 << 20)  # 64 MiB of zeros: 64 kB deflated
        ds.Rows = ds.Columns = 4096
        compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        bomb = compressor.compress(encode(ds, implicit=False)) + compressor.flush()
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
    head = encode(ds, implicit=False)
    return head + b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff" + items + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
