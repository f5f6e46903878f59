"""Process lifecycle: SIGTERM drains open associations; kill -9 loses nothing acknowledged;
several listener processes share the port."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from lungnode.storage.models import AssociationRecord, Instance
from tests.node.ingest.conftest import storescu, with_db
from tests.node_process import LungnodeProcess, dataset_bytes, send_files, stored_files


@pytest.fixture(scope="module")
def four_series(tmp_path_factory: pytest.TempPathFactory, chest_ct_dir: Path) -> list[list[Path]]:
    """Four copies of the chest series (new study/series/SOP UIDs), 30 slices each."""
    out = tmp_path_factory.mktemp("series")
    sources = sorted(chest_ct_dir.glob("*.dcm"))
    result = []
    for s in range(4):
        folder = out / f"s{s}"
        folder.mkdir()
        study, series = generate_uid(), generate_uid()
        files = []
        for i, src in enumerate(sources):
            ds = pydicom.dcmread(src)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            dst = folder / f"{i:03d}.dcm"
            ds.save_as(dst, enforce_file_format=True)
            files.append(dst)
        result.append(files)
    return result


def test_sigterm_lets_open_association_finish(make_node: Callable[..., LungnodeProcess],
                                              four_series: list[list[Path]]) -> None:
    node = make_node({"node": {"shutdown_grace_s": 20.0}})
    files = four_series[0]
    statuses: list[int | None] = []
    sender = threading.Thread(target=lambda: statuses.extend(send_files(node.port, files, pause=0.1)))
    sender.start()
    while len(stored_files(node.root)) < 5:
        time.sleep(0.05)
    assert node.proc is not None
    node.proc.terminate()  # SIGTERM while the association is open
    time.sleep(0.5)
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", node.port), timeout=2):
        pass  # no new associations once stopping
    sender.join(60)
    assert node.stop() == 0
    assert statuses == [0] * len(files)
    rows = with_db(node, lambda s: list(s.execute(select(Instance)).scalars()))
    assert len(rows) == len(files)
    (assoc,) = with_db(node, lambda s: list(s.execute(select(AssociationRecord).where(
        AssociationRecord.calling_ae == "TESTSCU")).scalars()))
    assert assoc.outcome == "released" and assoc.instances == len(files)
    assert (node.root / ".clean-shutdown").exists()


def test_a_second_sigterm_while_exiting_keeps_the_clean_exit(
        make_node: Callable[..., LungnodeProcess]) -> None:
    """A supervisor that repeats SIGTERM after the node logged its stop still sees exit status 0."""
    node = make_node()
    node.wait_running()
    assert node.proc is not None
    node.proc.terminate()
    deadline = time.monotonic() + 60
    while "lungnode stopped" not in node.log() and time.monotonic() < deadline:
        time.sleep(0.005)
    node.proc.terminate()  # lands while the interpreter is shutting down (or after it exited)
    assert node.proc.wait(60) == 0
    assert (node.root / ".clean-shutdown").exists()


def _check_durable(node: LungnodeProcess, sent: dict[Path, int | None]) -> tuple[int, int]:
    """Every acknowledged instance is on disk with its bytes and in the database; no orphans."""
    rows = with_db(node, lambda s: list(s.execute(select(Instance)).scalars()))
    by_uid = {r.sop_instance_uid: r for r in rows}
    acked = 0
    for path, status in sent.items():
        if status != 0:
            continue
        acked += 1
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        row = by_uid[uid]
        stored = node.root / row.path
        assert dataset_bytes(stored) == dataset_bytes(path)
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == row.sha256
    for row in rows:  # no row without its file
        assert (node.root / row.path).is_file(), row.path
    assert {str(p.relative_to(node.root)) for p in stored_files(node.root)} == {r.path for r in rows}
    assert list((node.root / ".tmp").iterdir()) == []
    return acked, len(rows)


def test_kill_9_loses_nothing_acknowledged(make_node: Callable[..., LungnodeProcess],
                                           four_series: list[list[Path]]) -> None:
    node = make_node()
    sent: dict[Path, int | None] = {}
    lock = threading.Lock()

    def send(files: list[Path]) -> None:
        try:
            statuses = send_files(node.port, files, timeout=5)
        except ConnectionError:
            statuses = [None] * len(files)
        with lock:
            sent.update(zip(files, statuses, strict=True))

    threads = [threading.Thread(target=send, args=(files,)) for files in four_series]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        # Every association established and storing (a file in each of the 4 series folders),
        # and about a fifth of the instances stored: the kill lands in the middle of all four.
        stored = stored_files(node.root)
        if len(stored) >= 25 and len({p.parent for p in stored}) == 4:
            break
        time.sleep(0.01)
    node.kill()  # kill -9 while 4 associations are sending
    for t in threads:
        t.join(60)
    acked_before = sum(1 for s in sent.values() if s == 0)
    assert 0 < acked_before < 120, "the kill should land while instances are still being sent"

    node.start()  # restart: recovery runs before the port opens
    acked, nrows = _check_durable(node, sent)
    assert acked == acked_before and nrows >= acked
    open_rows = with_db(node, lambda s: list(s.execute(select(AssociationRecord).where(
        AssociationRecord.ended_at.is_(None))).scalars()))
    assert open_rows == []
    interrupted = with_db(node, lambda s: list(s.execute(select(AssociationRecord).where(
        AssociationRecord.outcome == "interrupted")).scalars()))
    assert len(interrupted) == 4
    # The senders' retries after the restart complete the series without duplicates.
    for files in four_series:
        assert send_files(node.port, files) == [0] * len(files)
    acked, nrows = _check_durable(node, dict.fromkeys((f for s in four_series for f in s), 0))
    assert acked == nrows == 120
    assert node.status()["instances"] == 120


def test_two_listener_processes(make_node: Callable[..., LungnodeProcess], four_series: list[list[Path]],
                               dcmtk_env: dict[str, str]) -> None:
    node = make_node({"node": {"listener_processes": 2}})
    assert len(node.children()) >= 2
    results: list[int] = []
    threads = [threading.Thread(target=lambda f=folder: results.append(
        storescu(node.port, [f[0].parent], dcmtk_env).returncode)) for folder in four_series]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == [0, 0, 0, 0]
    status = node.status()
    assert status["instances"] == 120 and status["series_total"] == 4 and status["studies"] == 4
    assert node.stop() == 0
    log = node.log()
    pids = {line.split("(pid ")[1].split(",")[0] for line in log.splitlines() if "listening on" in line}
    assert len(pids) == 2
