"""The node's own DICOM acceptor (lungnode.node.dimse.acceptor / pdu / header) at the protocol level.

A real :class:`ListenerWorker` listens on loopback in this process; peers are pynetdicom (an
independent DICOM implementation) and raw sockets that send what well-behaved senders never do:
an unknown PDU type, a PDV on a context that was not accepted, a command the node does not serve,
a release or a dropped connection in the middle of a data set. After each, the node must answer as
the standard says, leave no temp file or row behind, and keep serving.
"""

from __future__ import annotations

import hashlib
import io
import socket
import ssl
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pynetdicom import AE
from pynetdicom.pdu import A_ASSOCIATE_AC
from pynetdicom.pdu_primitives import AsynchronousOperationsWindowNegotiation
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]
from sqlalchemy import func, select

from lungnode.config import Config, load_config
from lungnode.node.dimse import pdu
from lungnode.node.ingest import store
from lungnode.node.ingest.fields import fields_from, header_fields
from lungnode.node.ingest.header import RawHeader, UnsureError, scan_header
from lungnode.node.ingest.listener import ListenerWorker, ingest_file_store, supported_contexts
from lungnode.storage.db import Database
from lungnode.storage.filestore import StagingPool
from lungnode.storage.models import Instance
from lungnode.uids import IMPLEMENTATION_CLASS_UID
from tests.node_process import free_port
from tools.fuzzing import wire
from tools.fuzzing.wire import CT, EXPLICIT, IMPLICIT, command_set, p_data, read_pdu


class Running:
    """A listener in this process and its storage."""

    def __init__(self, root: Path, node_settings: str = "") -> None:
        self.port = free_port()
        (root / "config.toml").write_text(f"""
[node]
ae_title = "LUNGNODE"
bind = "127.0.0.1"
port = {self.port}
acse_timeout_s = 5.0
{node_settings}
[[node.peers]]
ae_title = "PEER"
host = "127.0.0.1"
[storage]
root = "{root / 'store'}"
fsync = true
[completion]
quiet_period_s = 3600.0
""")
        self.config: Config = load_config(root / "config.toml")
        self.store = ingest_file_store(self.config)
        self.db = Database(self.config.storage.effective_database_url, create=True)
        self.worker = ListenerWorker(self.config, self.db, self.store)

    def instances(self) -> int:
        with self.db.session() as session:
            return int(session.execute(select(func.count()).select_from(Instance)).scalar_one())

    def temp_files(self) -> list[Path]:
        return sorted(self.store.tmp.iterdir())

    def __enter__(self) -> Running:
        self.worker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.worker.stop(5)
        self.db.dispose()


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    with Running(tmp_path) as node:
        yield node


def echo(port: int) -> int:
    """C-ECHO with pynetdicom; the status."""
    ae = AE(ae_title="PEER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="LUNGNODE")
    assert assoc.is_established
    status = assoc.send_c_echo()
    assoc.release()
    return int(status.Status)


# ---------------------------------------------------------------------------- raw peer
def associate_rq(contexts: list[tuple[int, str, list[str]]], *, window: bool = False,
                 calling: str = "PEER") -> bytes:
    """An A-ASSOCIATE-RQ from ``calling`` to LUNGNODE (16 kB PDUs), encoded by pynetdicom."""
    return wire.associate_rq(calling, "LUNGNODE", contexts, 16384, window=window)


def open_association(port: int, contexts: list[tuple[int, str, list[str]]], window: bool = False,
                     tls: ssl.SSLContext | None = None) -> tuple[socket.socket, A_ASSOCIATE_AC]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    if tls is not None:
        sock = tls.wrap_socket(sock, server_hostname="127.0.0.1")
    sock.sendall(associate_rq(contexts, window=window))
    pdu_type, raw = read_pdu(sock)
    assert pdu_type == pdu.A_ASSOCIATE_AC_TYPE
    ac = A_ASSOCIATE_AC()
    ac.decode(raw)
    return sock, ac


def start_c_store(sock: socket.socket, path: Path) -> bytes:
    """Send the C-STORE-RQ command of the file at ``path`` on context 1 (CT, explicit VR little
    endian); its data set, encoded for that context, for the caller to send (or not)."""
    ds = pydicom.dcmread(path)
    sock.sendall(p_data(1, command_set(AffectedSOPClassUID=CT, CommandField=0x0001, MessageID=1,
                                       Priority=0, CommandDataSetType=0x0000,
                                       AffectedSOPInstanceUID=str(ds.SOPInstanceUID)), command=True))
    return wire.encode(ds, implicit=False)


# ---------------------------------------------------------------------------- tests
def test_command_set_round_trip_with_pydicom() -> None:
    raw = command_set(AffectedSOPClassUID=CT, CommandField=0x0001, MessageID=7, Priority=0,
                      CommandDataSetType=0x0000, AffectedSOPInstanceUID="1.2.3.4")
    command = pdu.decode_command(raw)
    assert (command.command_field, command.message_id, command.affected_sop_class,
            command.affected_sop_instance, command.has_dataset) == (1, 7, CT, "1.2.3.4", True)
    response = pydicom.filereader.read_dataset(io.BytesIO(pdu.encode_response(command, 0xA700, "disk full")),
                                               True, True)
    assert response.CommandGroupLength == len(pdu.encode_response(command, 0xA700, "disk full")) - 12
    assert (response.CommandField, response.MessageIDBeingRespondedTo, response.Status,
            response.ErrorComment, response.AffectedSOPInstanceUID, response.CommandDataSetType) == \
        (0x8001, 7, 0xA700, "disk full", "1.2.3.4", 0x0101)
    with pytest.raises(pdu.ProtocolError):
        pdu.decode_command(raw[:-3])


def test_negotiator_remembers_outcomes_and_echoes_each_requests_ae_titles() -> None:
    supported = supported_contexts()
    proposal = [(1, CT, [EXPLICIT, IMPLICIT]), (3, "1.2.840.10008.5.1.4.1.1.4", [EXPLICIT])]
    negotiator = pdu.Negotiator(supported, max_pdu=1 << 20)
    first = negotiator.negotiate(negotiator.decode(associate_rq(proposal, calling="SCANNER_A")))
    second_rq = associate_rq(proposal, calling="SCANNER_B")
    request = negotiator.decode(second_rq)  # remembered: only the AE titles are read
    assert (request.calling_ae, request.called_ae, request.peer_max_pdu) == ("SCANNER_B", "LUNGNODE", 16384)
    second = negotiator.negotiate(request)
    fresh = pdu.negotiate(pdu.decode_associate_rq(second_rq), supported, max_pdu=1 << 20)
    assert second.ac_pdu == fresh.ac_pdu and second.contexts == fresh.contexts == first.contexts
    assert second.ac_pdu != first.ac_pdu  # the calling AE title differs
    ac = A_ASSOCIATE_AC()
    ac.decode(second.ac_pdu)
    assert ac.calling_ae_title.strip() == "SCANNER_B"
    other = negotiator.negotiate(negotiator.decode(associate_rq([(5, CT, [IMPLICIT])])))
    assert other.contexts == {5: (CT, IMPLICIT)}  # another proposal is negotiated afresh
    blank = bytearray(second_rq)
    blank[26:42] = b" " * 16  # a Calling AE Title of spaces is refused, remembered or not
    with pytest.raises(pdu.ProtocolError):
        negotiator.decode(bytes(blank))


def test_p_data_respects_the_peer_maximum_pdu_length() -> None:
    data = bytes(range(256)) * 40
    stream = pdu.p_data_pdus(3, data, command=True, peer_max_pdu=4096)
    offset, pieces, controls = 0, [], []
    while offset < len(stream):
        pdu_type, length = struct.unpack_from(">BxI", stream, offset)
        assert pdu_type == 4 and length <= 4096
        size, context_id, is_command, last = pdu.pdv_header(stream[offset + 6:offset + 12])
        assert context_id == 3 and is_command
        pieces.append(stream[offset + 12:offset + 12 + size])
        controls.append(last)
        offset += 6 + length
    assert b"".join(pieces) == data and controls[-1] and not any(controls[:-1])


def test_header_scanner_equals_pydicom_on_every_shared_file(shared_data: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # Some real series carry a private element whose length does not fit its VR (facts.md: POPI);
    # pydicom refuses to convert it unless told to keep it as UN, on both sides of the comparison.
    monkeypatch.setattr(pydicom.config, "convert_wrong_length_to_UN", True)
    fast = fields_read = 0
    for path in sorted(shared_data.rglob("*.dcm")):
        data = path.read_bytes()
        try:
            stream = io.BytesIO(data)
            reference = pydicom.dcmread(stream, stop_before_pixels=True)
        except Exception:
            continue
        syntax = str(reference.file_meta.TransferSyntaxUID)
        raw = scan_header(data, syntax)
        if raw is None:
            continue
        fast += 1
        ds = raw.dataset()
        for element in reference:
            if element.VR == "SQ":
                continue
            assert element.tag in ds, (path, element.tag)
            assert ds[element.tag].value == element.value, (path, element.tag)
        pos = stream.tell()  # pydicom stops in front of the pixel data element
        has_pixels = data[pos:pos + 4] in (b"\xe0\x7f\x10\x00", b"\xe0\x7f\x08\x00", b"\xe0\x7f\x09\x00")
        assert raw.pixel_offset == (pos if has_pixels else -1), path
        # The row values read in place equal pydicom's reading, or the reader leaves them to pydicom.
        try:
            fields = fields_from(raw)
        except UnsureError:
            continue
        fields_read += 1
        expected = header_fields(reference)
        assert (fields.patient, fields.study, fields.series, fields.instance) == \
            (expected.patient, expected.study, expected.series, expected.instance), path
    assert fast >= 20, "the scanner should read most shared files itself"
    assert fields_read >= fast - 3, "the in-place reader should read the fields of most headers"
    one = next(iter(sorted((shared_data / "ct").rglob("*.dcm"))))
    data = one.read_bytes()
    syntax = str(pydicom.dcmread(one, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    assert scan_header(data, "1.2.840.10008.1.2.2") is None  # big endian: pydicom reads it
    assert scan_header(data[:200], syntax) is None  # truncated inside the header


def test_in_place_reader_follows_pydicom_on_odd_values() -> None:
    """Values the in-place reader must read like pydicom, or leave to it (UnsureError): an IS
    that is not an integer, an ISO 2022 character set, an explicit VR other than the dictionary's."""
    def header(elements: list[tuple[str, str, str | bytes]], charset: str = "") -> RawHeader:
        ds = Dataset()
        if charset:
            ds.SpecificCharacterSet = charset
        for keyword, vr, value in elements:
            ds.add_new(keyword, vr, value)
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = EXPLICIT
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        raw = scan_header(buffer.getvalue(), EXPLICIT)
        assert raw is not None
        return raw

    raw = header([("SeriesNumber", "IS", " 7 "), ("InstanceNumber", "IS", ""),
                  ("ImagePositionPatient", "DS", ["-1.50 ", " 2", "3e1"]),
                  ("ImageType", "CS", ["ORIGINAL ", "PRIMARY"]), ("StudyInstanceUID", "UI", "1.2.3"),
                  ("PatientName", "PN", "M\u00fcller^Hans"), ("Rows", "US", 512)], "ISO_IR 100")
    assert raw.integer("SeriesNumber") == 7 and raw.integer("InstanceNumber") is None
    assert raw.text("ImagePositionPatient") == "-1.50\\2\\3e1"
    assert raw.text("ImageType") == "ORIGINAL \\PRIMARY"
    assert raw.text("StudyInstanceUID") == "1.2.3" and raw.integer("Rows") == 512
    assert raw.text("PatientName") == "M\u00fcller^Hans" and raw.text("AccessionNumber") == ""
    utf8 = header([("PatientName", "PN", "\u5c71\u7530^\u592a\u90ce")], "ISO_IR 192")
    assert utf8.text("PatientName") == "\u5c71\u7530^\u592a\u90ce"
    for unsure, keyword in ((header([("SeriesNumber", "IS", "3.0")]), "SeriesNumber"),
                            (header([("PatientName", "PN", "\u5c71\u7530")], "ISO 2022 IR 87"),
                             "PatientName"),
                            (header([("PatientID", "SH", "X1")]), "PatientID")):
        with pytest.raises(UnsureError):
            unsure.integer(keyword) if keyword == "SeriesNumber" else unsure.text(keyword)


def test_association_negotiation_and_echo(running: Running) -> None:
    sock, ac = open_association(running.port, [(1, Verification, [IMPLICIT]),
                                               (3, CT, ["1.2.840.10008.1.2.4.100"]),  # MPEG2: no
                                               (5, "1.2.840.10008.5.1.4.1.1.4", [EXPLICIT])],  # MR: no
                                window=True)
    results = {cx.context_id: cx.result for cx in ac.presentation_context}
    assert results == {1: 0, 3: 4, 5: 3}
    user = ac.to_primitive().user_information
    assert any(getattr(i, "implementation_class_uid", None) == IMPLEMENTATION_CLASS_UID for i in user)
    windows = [i for i in user if isinstance(i, AsynchronousOperationsWindowNegotiation)]
    assert windows and windows[0].maximum_number_operations_invoked == 1
    sock.sendall(p_data(1, command_set(AffectedSOPClassUID=Verification, CommandField=0x0030,
                                       MessageID=9, CommandDataSetType=0x0101), command=True))
    pdu_type, raw = read_pdu(sock)
    response = pydicom.filereader.read_dataset(io.BytesIO(raw[12:]), True, True)
    assert pdu_type == 4 and (response.CommandField, response.Status,
                              response.MessageIDBeingRespondedTo) == (0x8030, 0, 9)
    sock.sendall(struct.pack(">BxI4x", 5, 4))  # A-RELEASE-RQ
    assert read_pdu(sock)[0] == pdu.A_RELEASE_RP_TYPE
    sock.close()


def test_protocol_violations_get_an_abort_and_the_node_goes_on(running: Running) -> None:
    # An unknown PDU type instead of the association request.
    with socket.create_connection(("127.0.0.1", running.port), timeout=10) as sock:
        sock.sendall(struct.pack(">BxI", 0x09, 4) + b"\0" * 4)
        assert read_pdu(sock)[0] == pdu.A_ABORT_TYPE
    # A PDV on a presentation context that was not accepted.
    sock, _ac = open_association(running.port, [(1, CT, [EXPLICIT])])
    sock.sendall(p_data(7, b"\0" * 8, command=True))
    assert read_pdu(sock)[0] == pdu.A_ABORT_TYPE
    sock.close()
    # A C-FIND-RQ on a storage context: "unrecognized operation", the data set is dropped.
    sock, _ac = open_association(running.port, [(1, CT, [EXPLICIT])])
    sock.sendall(p_data(1, command_set(AffectedSOPClassUID=CT, CommandField=0x0020, MessageID=2,
                                       Priority=0, CommandDataSetType=0x0000), command=True))
    sock.sendall(p_data(1, b"\x08\x00\x52\x00CS\x06\x00SERIES", command=False))
    _pdu_type, raw = read_pdu(sock)
    response = pydicom.filereader.read_dataset(io.BytesIO(raw[12:]), True, True)
    assert (response.CommandField, response.Status) == (0x8020, 0x0211)
    sock.close()
    assert echo(running.port) == 0


@pytest.mark.parametrize("ending", ["release", "drop"])
def test_a_data_set_cut_short_leaves_nothing(running: Running, chest_ct_dir: Path, ending: str) -> None:
    sock, _ac = open_association(running.port, [(1, CT, [EXPLICIT])])
    body = start_c_store(sock, sorted(chest_ct_dir.glob("*.dcm"))[0])
    sock.sendall(p_data(1, body[:len(body) // 2], command=False, last=False))
    if ending == "release":
        sock.sendall(struct.pack(">BxI4x", 5, 4))
        assert read_pdu(sock)[0] == pdu.A_RELEASE_RP_TYPE
    sock.close()
    assert echo(running.port) == 0  # the cut association has been served to its end by now
    assert running.instances() == 0
    assert running.temp_files() == []


@pytest.mark.parametrize("stall", ["idle", "mid-data-set", "idle-tls", "mid-data-set-tls"])
def test_a_silent_peer_is_cut_off_after_its_timeout(tmp_path: Path, chest_ct_dir: Path,
                                                     certs: dict[str, Path], stall: str) -> None:
    """An association that goes quiet between messages is aborted (A-ABORT, then the close) after
    ``network_timeout_s``, one that stops in the middle of a data set after ``dimse_timeout_s``
    (plain TCP and DICOM TLS); nothing is kept of the half data set and the node goes on serving."""
    settings = "network_timeout_s = 1.0\ndimse_timeout_s = 2.0"
    tls = None
    if stall.endswith("-tls"):
        settings += (f'\n[node.tls]\ncert = "{certs["server_pem"]}"\n'
                     f'key = "{certs["server_key"]}"')
        tls = ssl.create_default_context(cafile=str(certs["ca_pem"]))
    with Running(tmp_path, settings) as node:
        sock, _ac = open_association(node.port, [(1, CT, [EXPLICIT])], tls=tls)
        expected = 1.0
        if stall.startswith("mid-data-set"):
            body = start_c_store(sock, sorted(chest_ct_dir.glob("*.dcm"))[0])
            sock.sendall(p_data(1, body[:5000], command=False, last=False))
            expected = 2.0
        started = time.monotonic()
        sock.settimeout(expected + 10)
        received = b""
        try:
            while chunk := sock.recv(64):
                received += chunk
        except ConnectionResetError:
            pass
        # An A-ABORT (service provider), then the close.
        assert received[:1] == bytes([pdu.A_ABORT_TYPE]) and len(received) == 10, received
        waited = time.monotonic() - started
        assert expected - 0.3 <= waited <= expected + 5, waited
        sock.close()
        if tls is None:
            assert echo(node.port) == 0
        else:
            sock, _ac = open_association(node.port, [(1, Verification, [IMPLICIT])], tls=tls)
            sock.close()
        assert node.instances() == 0 and node.temp_files() == []


@pytest.mark.parametrize("writes", ["direct", "page-cache"])
def test_large_instance_is_streamed_to_disk(running: Running, chest_ct_dir: Path,
                                            monkeypatch: pytest.MonkeyPatch, writes: str) -> None:
    """Above the memory limit the data set goes to its temp file as it arrives and the header is
    read back from the file; same outcome with direct I/O (written in 8 KiB steps here) and with
    page-cache writes."""
    monkeypatch.setattr(store, "MEMORY_COPY_LIMIT", 64 * 1024)
    if writes == "direct":
        if not running.store.direct_io:
            pytest.skip("the filesystem of the test's temp folder does not take O_DIRECT")
        running.store.staging = StagingPool(flush_bytes=8192)
    else:
        running.store.direct_io = False
    path = sorted(chest_ct_dir.glob("*.dcm"))[0]
    ds = pydicom.dcmread(path)
    ae = AE(ae_title="PEER")
    ae.add_requested_context(CTImageStorage, str(ds.file_meta.TransferSyntaxUID))
    assoc = ae.associate("127.0.0.1", running.port, ae_title="LUNGNODE")
    assert assoc.is_established
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == 0
    assert running.instances() == 1 and running.temp_files() == []
    stored = next(running.store.root.rglob(f"{ds.SOPInstanceUID}.dcm"))
    back = pydicom.dcmread(stored)
    assert back.file_meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert back.file_meta.SourceApplicationEntityTitle.strip() == "PEER"
    assert back.PixelData == ds.PixelData and back.SOPInstanceUID == ds.SOPInstanceUID
    with running.db.session() as session:  # hashed piece by piece once it outgrew the memory copy
        recorded = session.scalars(select(Instance.sha256)).one()
    assert recorded == hashlib.sha256(stored.read_bytes()).hexdigest()
