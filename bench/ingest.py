"""Ingest benchmark: DCMTK ``storescu`` → lungnode, DCMTK ``storescp`` and Orthanc, side by side.

A 400-slice 512×512 CT series (the real 30-slice chest series from ``../shared/data`` cycled to 400
slices with new UIDs and positions; uncompressed, ~0.5 MB a slice) is sent by ``storescu`` over 1
association and over 4 parallel associations (100 slices each) into, in turn:

* lungnode (``lungnode run``, fsync on, SQLite; ``node.listener_processes`` = 1 and the values
  given with ``--listener-processes`` for the 4-association case),
* DCMTK ``storescp`` (1 association) and ``storescp --fork`` (4), which do not fsync,
* Orthanc (its default SyncStorageArea = fsync; SQLite index), with a config this script writes.

With ``--breakdown``, two more 4-association cases show where the distance to ``storescp --fork``
goes: lungnode with ``storage.fsync = false`` (no file or folder fsync, page-cache writes; SQLite
still commits with ``synchronous=FULL``), and ``bench/acceptor_only.py``, lungnode's acceptor
alone, which answers success and stores nothing (the network path's ceiling).

Every DCMTK tool and Orthanc run with ``TCP_NODELAY=1``. The cases run round-robin, ``--runs``
rounds, each on fresh storage; all of it is deleted at the end, not after each run (about 1.5 GB
of disk per round). On ext4 without a journal, as on these machines, creating a file skips the
inodes deleted in the last minutes one by one: with the 400 files of the previous run deleted just
before, ``perf`` showed 18 % of the node's CPU in file creation (``recently_deleted``), a cost
that fell on whichever receiver ran next. The median of each case is reported: instances/s, MB/s,
and the ratios lungnode/storescp and lungnode/Orthanc; also lungnode's peak memory (RSS of the
node and its listener processes) while ingesting and the load average before and after.

Usage::

    .venv/bin/python -m bench.ingest [--runs 3] [--slices 400] [--listener-processes 1 2 4]
                                     [--breakdown]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from tests.node_process import LungnodeProcess

REPO = Path(__file__).resolve().parents[1]

SHARED = Path(os.environ.get("LUNGNODE_SHARED_DATA", REPO.parent / "shared" / "data"))
ENV = dict(os.environ, TCP_NODELAY="1")
BREAKDOWN_FSYNC_OFF = "lungnode x4, storage.fsync = false"
BREAKDOWN_ACCEPTOR = "acceptor alone x4 (stores nothing)"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(port)


def make_series(folder: Path, slices: int) -> list[Path]:
    """The chest series cycled to ``slices`` slices (new UIDs, positions 1 mm apart)."""
    files = sorted(folder.glob("*.dcm"))
    if len(files) == slices:
        return files
    folder.mkdir(parents=True, exist_ok=True)
    chest = SHARED / "ct" / "chest-30-slices-uncompressed"
    sources = [pydicom.dcmread(p) for p in sorted(chest.glob("*.dcm"))]
    study, series = generate_uid(), generate_uid()
    out = []
    for i in range(slices):
        ds = sources[i % len(sources)]
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        x, y, _ = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, -float(i)]
        ds.InstanceNumber = i + 1
        path = folder / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out


def send(port: int, aec: str, parts: Sequence[Sequence[Path]]) -> float:
    """Run one storescu per part in parallel; return the wall time (all must succeed)."""
    start = time.perf_counter()
    procs = [subprocess.Popen(["storescu", "-aet", "STORESCU", "-aec", aec, "127.0.0.1", str(port),
                               *map(str, part)], env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for part in parts]
    outputs = [p.communicate()[0] for p in procs]
    elapsed = time.perf_counter() - start
    for p, out in zip(procs, outputs, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"storescu to {aec} exited with {p.returncode}: "
                               f"{out.decode(errors='replace')[-500:] or '(no output)'}")
    return elapsed


def tree_rss(pid: int) -> int:
    """RSS in bytes of a process and its descendants."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                stack.extend(int(c) for c in (task / "children").read_text().split())
        except (OSError, ValueError):
            continue
    return total


class Sampler:
    """Peak RSS of a process tree, sampled every 50 ms in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, tree_rss(self.pid))

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_lungnode(work: Path, parts: Sequence[Sequence[Path]], processes: int,
                 fsync: bool = True) -> tuple[float, int]:
    node = LungnodeProcess(work / f"lungnode-{time.monotonic_ns()}", {
        "node": {"listener_processes": processes, "max_associations": 16,
                 "peers": [{"ae_title": "STORESCU", "host": "127.0.0.1"}]},
        "completion": {"quiet_period_s": 3600.0}, "storage": {"fsync": fsync}})
    node.start(timeout=120)
    node.wait_running()  # the listener opens the port before the other services have started
    try:
        assert node.proc is not None
        with Sampler(node.proc.pid) as sampler:
            elapsed = send(node.port, "LUNGNODE", parts)
        stored = node.status()["instances"]
        if stored != sum(len(p) for p in parts):
            raise RuntimeError(f"lungnode stored {stored} instances")
        return elapsed, sampler.peak
    finally:
        node.stop()


def run_acceptor_only(parts: Sequence[Sequence[Path]]) -> float:
    """``bench/acceptor_only.py``: lungnode's network path, storing nothing."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.acceptor_only", str(port)],
                            stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout is not None
    try:
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("bench/acceptor_only.py did not start")
        elapsed = send(port, "ACCEPTOR", parts)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    received = json.loads(out.strip().splitlines()[-1])
    expected = sum(len(p) for p in parts)
    expected_bytes = sum(p.stat().st_size for part in parts for p in part)
    # The data set is the file minus preamble, "DICM" and file meta (a few hundred bytes each).
    if received["instances"] != expected or not 0 < expected_bytes - received["bytes"] < 1024 * expected:
        raise RuntimeError(f"acceptor_only received {received}, expected {expected} instances")
    return elapsed


def run_storescp(work: Path, parts: Sequence[Sequence[Path]], fork: bool) -> float:
    out = work / f"storescp-{time.monotonic_ns()}"
    out.mkdir()
    port = free_port()
    args = ["storescp", "-aet", "STORESCP", "-od", str(out), *(["--fork"] if fork else []), str(port)]
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        elapsed = send(port, "STORESCP", parts)
        stored = sum(1 for _ in out.iterdir())
        if stored != sum(len(p) for p in parts):
            raise RuntimeError(f"storescp stored {stored}")
        return elapsed
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def run_orthanc(work: Path, parts: Sequence[Sequence[Path]]) -> float:
    folder = work / f"orthanc-{time.monotonic_ns()}"
    folder.mkdir()
    port = free_port()
    config = {"Name": "bench", "StorageDirectory": str(folder / "storage"),
              "IndexDirectory": str(folder / "index"), "DicomAet": "ORTHANC", "DicomPort": port,
              "HttpServerEnabled": False, "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True,
              "StorageCompression": False, "Plugins": [], "DicomServerEnabled": True}
    (folder / "orthanc.json").write_text(json.dumps(config))
    proc = subprocess.Popen(["Orthanc", str(folder / "orthanc.json")], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        return send(port, "ORTHANC", parts)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--slices", type=int, default=400)
    parser.add_argument("--listener-processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "lungnode-bench-series")
    parser.add_argument("--skip", nargs="*", default=[], choices=["storescp", "orthanc"])
    parser.add_argument("--breakdown", action="store_true",
                        help="also run lungnode with fsync off and the acceptor alone (4 associations)")
    args = parser.parse_args(argv)

    files = make_series(args.cache / str(args.slices), args.slices)
    mb = sum(p.stat().st_size for p in files) / 1e6
    one = [files]
    four = [files[i::4] for i in range(4)]
    work = Path(tempfile.mkdtemp(prefix="lungnode-bench-"))
    # Every run's storage is kept until the end (see the module docstring): two copies of the
    # series per receiver and round, plus the databases.
    receivers = 1 + len(args.listener_processes) + args.breakdown + 2 * (
        ("storescp" not in args.skip) + ("orthanc" not in args.skip))
    needed_mb = args.runs * receivers * mb * 1.1
    free_mb = shutil.disk_usage(work).free / 1e6
    if free_mb < needed_mb:
        shutil.rmtree(work, ignore_errors=True)
        parser.error(f"{work.parent} has {free_mb:,.0f} MB free; {args.runs} rounds need about "
                     f"{needed_mb:,.0f} MB (fewer --runs, or TMPDIR on a larger disk)")
    print(f"series: {len(files)} slices, {mb:.0f} MB; load average before: {os.getloadavg()}")

    cases: list[tuple[str, Callable[[], float]]] = []
    peaks: dict[str, int] = {}

    def lungnode_case(key: str, parts: list[list[Path]], procs: int, fsync: bool = True
                      ) -> Callable[[], float]:
        def run() -> float:
            elapsed, rss = run_lungnode(work, parts, procs, fsync)
            peaks[key] = max(peaks.get(key, 0), rss)
            return elapsed
        return run

    for label, parts in (("x1", one), ("x4", four)):
        if label == "x1":
            cases.append(("lungnode x1", lungnode_case("lungnode x1", one, 1)))
        else:
            cases += [(f"lungnode x4 (listener_processes={procs})",
                       lungnode_case(f"lungnode x4 (listener_processes={procs})", four, procs))
                      for procs in args.listener_processes]
            if args.breakdown:
                cases += [(BREAKDOWN_FSYNC_OFF, lungnode_case(BREAKDOWN_FSYNC_OFF, four, 1, fsync=False)),
                          (BREAKDOWN_ACCEPTOR, functools.partial(run_acceptor_only, four))]
        if "storescp" not in args.skip:
            fork = label == "x4"
            cases.append(("storescp --fork x4" if fork else "storescp x1",
                          functools.partial(run_storescp, work, parts, fork)))
        if "orthanc" not in args.skip:
            cases.append((f"orthanc {label}", functools.partial(run_orthanc, work, parts)))
    times: dict[str, list[float]] = {key: [] for key, _ in cases}
    try:
        # Round-robin: every receiver runs once per round, so slow phases of a shared machine
        # hit lungnode and its anchors alike instead of biasing whichever ran then.
        for _ in range(args.runs):
            for key, run in cases:
                times[key].append(run())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results = {key: statistics.median(values) for key, values in times.items()}

    n = len(files)
    print(f"{'receiver':44} {'inst/s':>8} {'MB/s':>8} {'peak RSS MB':>12}")
    for key, elapsed in results.items():
        rss = f"{peaks[key] / 1e6:.0f}" if key in peaks else ""
        print(f"{key:44} {n / elapsed:8.1f} {mb / elapsed:8.1f} {rss:>12}")
    rate = {k: n / v for k, v in results.items()}
    best4 = max((v for k, v in rate.items() if k.startswith("lungnode x4 (")), default=0.0)
    if "orthanc x1" in rate:
        print(f"lungnode/Orthanc: 1 association {rate['lungnode x1'] / rate['orthanc x1']:.2f}x "
              f"(goal >= 1.0), 4 associations {best4 / rate['orthanc x4']:.2f}x (goal >= 1.2)")
    if "storescp x1" in rate:
        print(f"lungnode/storescp: 1 association {rate['lungnode x1'] / rate['storescp x1']:.2f}x, "
              f"4 associations {best4 / rate['storescp --fork x4']:.2f}x (goal >= 0.5 vs --fork)")
    if args.breakdown and "storescp --fork x4" in rate:
        fork_rate = rate["storescp --fork x4"]
        print(f"4 associations / storescp --fork: lungnode {best4 / fork_rate:.2f}x, "
              f"fsync off {rate[BREAKDOWN_FSYNC_OFF] / fork_rate:.2f}x, "
              f"acceptor alone {rate[BREAKDOWN_ACCEPTOR] / fork_rate:.2f}x")
    print(f"load average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
