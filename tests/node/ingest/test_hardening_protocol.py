"""Issue 20 at the protocol level: every malformed exchange gets an answer, sizes and times are bounded.

A real :class:`ListenerWorker` listens on loopback in this process (``Running`` from the acceptor
tests); peers are raw sockets sending what the fuzz campaign found: non-ASCII UIDs, a presentation
context without transfer syntax, empty AE titles, PDUs and command sets of huge declared length,
data sets over the size limit, deflate bombs, and connections that trickle one byte at a time.
The last test floods a ``lungnode run`` node with 60 trickling connections while DCMTK ``echoscu``
must get through.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import socket
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from lungnode.config import load_config
from lungnode.node.dimse import pdu
from lungnode.node.ingest.listener import ListenerWorker
from lungnode.uids import is_valid_uid
from tests.node.dimse.test_acceptor import Running, associate_rq, echo, open_association
from tests.node_process import LungnodeProcess
from tools.fuzzing.wire import (
    CT,
    DEFLATED,
    EXPLICIT,
    IMPLICIT,
    command_set,
    drop_transfer_syntaxes,
    encode,
    p_data,
    raw_command,
    raw_element,
    read_pdu,
)


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    with Running(tmp_path) as node:
        yield node


def _status(raw: bytes) -> int:
    response = pydicom.filereader.read_dataset(io.BytesIO(raw[12:]), True, True)
    return int(response.Status)


def _answer(sock: socket.socket) -> int | str:
    """The node's answer: a DIMSE status, or the name of the PDU, or "closed"."""
    try:
        pdu_type, raw = read_pdu(sock)
    except (EOFError, OSError):
        return "closed"
    if pdu_type == pdu.P_DATA_TF_TYPE:
        return _status(raw)
    return {3: "RJ", 6: "RP", 7: "ABORT"}.get(pdu_type, f"PDU {pdu_type}")


def test_uid_grammar_refuses_a_trailing_newline() -> None:
    assert is_valid_uid("1.2.3") and not is_valid_uid("1.2.3\n") and not is_valid_uid("1.2.3\n4")


def test_non_ascii_uids_get_a_status_and_the_association_goes_on(running: Running) -> None:
    sock, _ac = open_association(running.port, [(1, Verification, [IMPLICIT]), (3, CT, [EXPLICIT])])
    # A C-ECHO whose Affected SOP Class UID holds a non-ASCII byte: refused, not a dead thread.
    sock.sendall(p_data(1, raw_command(raw_element(0x0002, b"1.2.840.10008.1.1\xe9"),
                                        raw_element(0x0100, struct.pack("<H", 0x0030)),
                                        raw_element(0x0110, struct.pack("<H", 5)),
                                        raw_element(0x0800, struct.pack("<H", 0x0101))), command=True))
    assert _answer(sock) == 0x0122
    # A C-STORE whose Affected SOP Instance UID holds one: 0xA900, the data set is dropped.
    sock.sendall(p_data(3, raw_command(raw_element(0x0002, CT.encode() + b"\0"),
                                        raw_element(0x0100, struct.pack("<H", 1)),
                                        raw_element(0x0110, struct.pack("<H", 6)),
                                        raw_element(0x0800, struct.pack("<H", 0)),
                                        raw_element(0x1000, b"1.2.3.\xe94")), command=True))
    sock.sendall(p_data(3, b"\x08\x00\x18\x00UI\x06\x001.2.34", command=False))
    assert _answer(sock) == 0xA900
    # The same association still serves a proper C-ECHO.
    sock.sendall(p_data(1, command_set(AffectedSOPClassUID=Verification, CommandField=0x0030,
                                       MessageID=7, CommandDataSetType=0x0101), command=True))
    assert _answer(sock) == 0
    sock.sendall(struct.pack(">BxI4x", 5, 4))
    assert _answer(sock) == "RP"
    sock.close()
    assert running.instances() == 0 and running.temp_files() == []


def test_c_echo_is_answered_on_the_verification_context_only(running: Running) -> None:
    sock, _ac = open_association(running.port, [(1, Verification, [IMPLICIT]), (3, CT, [EXPLICIT])])
    sock.sendall(p_data(3, command_set(AffectedSOPClassUID=CT, CommandField=0x0030, MessageID=1,
                                       CommandDataSetType=0x0101), command=True))
    assert _answer(sock) == 0x0122
    sock.sendall(p_data(1, command_set(AffectedSOPClassUID=Verification, CommandField=0x0030,
                                       MessageID=2, CommandDataSetType=0x0101), command=True))
    assert _answer(sock) == 0
    sock.close()


@pytest.mark.parametrize("case", ["no-transfer-syntax", "empty-calling", "empty-called",
                                  "non-ascii-calling"])
def test_malformed_association_requests_get_an_answer(running: Running, case: str) -> None:
    rq = bytearray(associate_rq([(1, CT, [EXPLICIT])]))
    if case == "no-transfer-syntax":
        rq = bytearray(drop_transfer_syntaxes(bytes(rq)))
    elif case == "empty-calling":
        rq[26:42] = b" " * 16
    elif case == "empty-called":
        rq[10:26] = b"\0" * 16
    else:
        rq[26:42] = b"PEER\xe9".ljust(16)
    with socket.create_connection(("127.0.0.1", running.port), timeout=10) as sock:
        sock.sendall(bytes(rq))
        pdu_type, raw = read_pdu(sock)
    if case == "no-transfer-syntax":
        assert pdu_type == pdu.A_ABORT_TYPE and raw[9] == pdu.ABORT_REASON_INVALID_PARAMETER
    else:  # rejected-permanent, service user, calling (3) / called (7) AE title not recognised
        expected = (1, 1, 7) if case == "empty-called" else (1, 1, 3)
        assert pdu_type == pdu.A_ASSOCIATE_RJ_TYPE and tuple(raw[7:10]) == expected
    assert echo(running.port) == 0


@pytest.mark.parametrize("case", ["p-data-over-max", "command-pdv", "release", "associate-rq"])
def test_huge_declared_lengths_are_aborted_before_the_body_is_read(running: Running, case: str) -> None:
    """The node answers from the header alone: the test sends no body, and the A-ABORT comes."""
    if case == "associate-rq":
        sock = socket.create_connection(("127.0.0.1", running.port), timeout=10)
        sock.sendall(struct.pack(">BxI", 1, 0xFFFFFFF0))
    else:
        sock, _ac = open_association(running.port, [(1, CT, [EXPLICIT])])
        if case == "p-data-over-max":  # the node advertised 4 MiB
            sock.sendall(struct.pack(">BxI", 4, (4 << 20) + 1))
        elif case == "command-pdv":  # within the PDU limit, but no command set is that long
            sock.sendall(struct.pack(">BxI", 4, 4 << 20) + struct.pack(">IBB", (4 << 20) - 4, 1, 3))
        else:
            sock.sendall(struct.pack(">BxI", 5, 0xFFFFFFF0))
    started = time.monotonic()
    assert _answer(sock) == "ABORT"
    assert time.monotonic() - started < 3
    sock.close()
    assert echo(running.port) == 0


def _store(port: int, context: tuple[int, str, list[str]], instance: str, body: bytes) -> int | str:
    sock, _ac = open_association(port, [context])
    try:
        sock.sendall(p_data(context[0], command_set(
            AffectedSOPClassUID=CT, CommandField=1, MessageID=1, Priority=0, CommandDataSetType=0,
            AffectedSOPInstanceUID=instance), command=True))
        for start in range(0, len(body), 1 << 20):
            piece = body[start:start + (1 << 20)]
            sock.sendall(p_data(context[0], piece, command=False, last=start + (1 << 20) >= len(body)))
        return _answer(sock)
    finally:
        sock.close()


def _limited(root: Path, max_dataset_mb: int) -> Running:
    """A :class:`Running` node whose ``[storage] max_dataset_mb`` is ``max_dataset_mb``."""
    node = Running(root)
    config_path = root / "config.toml"
    config_path.write_text(config_path.read_text().replace(
        "fsync = true", f"fsync = true\nmax_dataset_mb = {max_dataset_mb}"))
    node.config = load_config(config_path)
    node.worker = ListenerWorker(node.config, node.db, node.store)
    return node


def test_data_set_size_limit_and_deflate_bomb(tmp_path: Path, chest_ct_dir: Path) -> None:
    """Over ``[storage] max_dataset_mb`` a data set is refused with 0xA700 while its bytes are
    dropped; a deflated data set that inflates beyond it too (inflated in bounded steps)."""
    base = pydicom.dcmread(sorted(chest_ct_dir.glob("*.dcm"))[0])
    with _limited(tmp_path, 2) as running:
        assert running.worker.handler.max_dataset_bytes == 2 << 20
        big = copy.deepcopy(base)
        big.SOPInstanceUID = generate_uid()
        big.PixelData = bytes(base.PixelData) * 6  # 3 MiB
        big.Rows = int(base.Rows) * 6
        body = encode(big, implicit=False)
        assert _store(running.port, (1, CT, [EXPLICIT]), big.SOPInstanceUID, body) == 0xA700
        bomb = copy.deepcopy(base)
        bomb.SOPInstanceUID = generate_uid()
        bomb.PixelData = b"\0" * (32 << 20)
        bomb.Rows = bomb.Columns = 4096
        packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        deflated = packer.compress(encode(bomb, implicit=False)) + packer.flush()
        assert len(deflated) < 100_000
        assert _store(running.port, (1, CT, [DEFLATED]), bomb.SOPInstanceUID, deflated) == 0xA700
        small = copy.deepcopy(base)  # within the limit: stored
        small.SOPInstanceUID = generate_uid()
        packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        deflated = packer.compress(encode(small, implicit=False)) + packer.flush()
        assert _store(running.port, (1, CT, [DEFLATED]), small.SOPInstanceUID, deflated) == 0
        assert running.instances() == 1 and running.temp_files() == []
        assert echo(running.port) == 0


def test_trickling_peers_are_cut_by_whole_pdu_deadlines(tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """A byte every 0.5 s resets no timer: the A-ASSOCIATE-RQ must be complete within
    ``acse_timeout_s`` (5 s here), each PDU within the network/DIMSE timeouts (2 s); a cut
    association gets an A-ABORT first."""
    caplog.set_level(logging.INFO, logger="lungnode.node.dimse")
    with Running(tmp_path, "network_timeout_s = 2.0\ndimse_timeout_s = 2.0") as node:
        rq = associate_rq([(1, CT, [EXPLICIT])])
        pre = socket.create_connection(("127.0.0.1", node.port), timeout=15)
        assoc, _ac = open_association(node.port, [(1, CT, [EXPLICIT])])
        release = struct.pack(">BxI4x", 5, 4)
        started = time.monotonic()
        cut: dict[str, float] = {}
        answers: dict[str, bytes] = {}

        def trickle(name: str, sock: socket.socket, message: bytes) -> None:
            received = b""
            for byte in message:
                try:
                    sock.sendall(bytes([byte]))
                    time.sleep(0.5)
                    sock.setblocking(False)
                    try:
                        chunk = sock.recv(64)
                    except BlockingIOError:
                        continue
                    finally:
                        sock.setblocking(True)
                except OSError:
                    break
                received += chunk
                if not chunk:
                    break
            cut[name] = time.monotonic() - started
            answers[name] = received

        threads = [threading.Thread(target=trickle, args=("pre", pre, rq)),
                   threading.Thread(target=trickle, args=("assoc", assoc, release * 10))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        pre.close()
        assoc.close()
        assert cut["pre"] < 9 and cut["assoc"] < 6, cut
        assert answers["pre"] == b"" and answers["assoc"][:1] == bytes([pdu.A_ABORT_TYPE]), answers
        assert "no complete A-ASSOCIATE-RQ within 5 s" in caplog.text
        assert "no complete PDU in time" in caplog.text
        assert echo(node.port) == 0


@pytest.fixture
def echoscu_env(dcmtk_env: dict[str, str]) -> dict[str, str]:
    return {**dcmtk_env, "TCP_NODELAY": "1"}


def test_a_flood_of_trickling_connections_does_not_keep_echoscu_out(
        make_node: Callable[..., LungnodeProcess], echoscu_env: dict[str, str]) -> None:
    """60 connections sending an A-ASSOCIATE-RQ one byte every 2 s (no AE title needed to do it)
    used to hold every slot; now half-open connections have a limit of their own (the oldest is
    closed for a new one) and DCMTK echoscu gets through while the flood lasts."""
    node = make_node({"node": {"max_associations": 4, "max_pending_connections": 16,
                               "acse_timeout_s": 30.0}})
    rq = associate_rq([(1, CT, [EXPLICIT])], calling="ECHOSCU")
    socks = [socket.create_connection(("127.0.0.1", node.port), timeout=10) for _ in range(60)]
    stop = threading.Event()

    def drip() -> None:
        for position in range(len(rq)):
            for sock in socks:
                with contextlib.suppress(OSError):
                    sock.sendall(rq[position:position + 1])
            if stop.wait(2.0):
                return

    thread = threading.Thread(target=drip, daemon=True)
    thread.start()
    try:
        time.sleep(3)
        for _ in range(3):
            run = subprocess.run(["echoscu", "-aet", "ECHOSCU", "-aec", "LUNGNODE", "-to", "10",
                                  "127.0.0.1", str(node.port)], capture_output=True, text=True,
                                 env=echoscu_env, timeout=60)
            assert run.returncode == 0, run.stdout + run.stderr
    finally:
        stop.set()
        thread.join(5)
        for sock in socks:
            sock.close()
    assert "without an association request" in node.log()
    assert node.proc is not None and node.proc.poll() is None
