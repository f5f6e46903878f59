"""Peak resident memory of ``lungnode run`` under hostile associations (issue 20's memory goal).

Two fresh nodes, each measured by its peak RSS (``VmHWM`` of the node process) before and after:

* ``single``: one association at a time sends, in turn, a deflate bomb (64 kB inflating to a
  consistent 512 MiB data set, accepted), a 300 MiB native data set (streamed to disk, accepted),
  a deflated data set inflating beyond ``max_dataset_mb`` (refused), and PDUs declaring
  0xFFFFFFF0 bytes (aborted). Goal: under 500 MB.
* ``parallel``: ``--parallel`` associations at once, each sending a 15 MiB data set (the largest
  kept in memory, just under the 16 MiB copy limit), three rounds: the bound with several at once
  (docs/conformance.md §6.1 gives the formula).

Usage::

    .venv/bin/python -m bench.hostile_memory [--parallel 16]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from tests.node_process import LungnodeProcess
from tools.fuzzing.cases import Fuzzer
from tools.fuzzing.wire import CX_CT_DEFLATED, CX_CT_EXPLICIT, encode

REPO = Path(__file__).resolve().parents[1]

SAMPLE = REPO.parent / "shared" / "data" / "ct" / "chest-30-slices-uncompressed"


def peak_mb(node: LungnodeProcess) -> float:
    """The node process's peak resident memory (MB)."""
    assert node.proc is not None
    for line in Path(f"/proc/{node.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def image(base: pydicom.Dataset, rows: int, columns: int, pixels: bytes) -> pydicom.Dataset:
    ds = copy.deepcopy(base)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (generate_uid() for _ in range(3))
    ds.Rows, ds.Columns, ds.PixelData = rows, columns, pixels
    return ds


def bomb(base: pydicom.Dataset, rows: int, columns: int) -> tuple[str, bytes]:
    """A deflated 16-bit image of ``rows`` x ``columns`` zeros, compressed piece by piece (the
    inflated data set is never built here); its SOP Instance UID and bytes."""
    ds = image(base, rows, columns, b"")
    del ds.PixelData
    length = rows * columns * 2
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [packer.compress(encode(ds, implicit=False)
                           + b"\xe0\x7f\x10\x00OW\x00\x00" + length.to_bytes(4, "little"))]
    zeros = b"\0" * (16 << 20)
    for start in range(0, length, len(zeros)):
        out.append(packer.compress(zeros[:min(len(zeros), length - start)]))
    out.append(packer.flush())
    return str(ds.SOPInstanceUID), b"".join(out)


def single(fuzzer: Fuzzer, base: pydicom.Dataset) -> list[tuple[str, str]]:
    """One hostile association at a time; each case's answer."""
    out = []
    uid, data = bomb(base, 16384, 16384)
    out.append((f"deflate bomb, {len(data) >> 10} KiB inflating to a consistent 512 MiB",
                fuzzer.store(CX_CT_DEFLATED, uid, data)))
    big = image(base, 10240, 15360, b"\1\0" * (150 << 20))
    out.append(("native data set, 300 MiB",
                fuzzer.store(CX_CT_EXPLICIT, big.SOPInstanceUID,
                             encode(big, implicit=False))))
    del big
    uid, data = bomb(base, 32768, 40960)
    out.append((f"deflate bomb, {len(data) >> 10} KiB inflating to 2.5 GiB (over the limit)",
                fuzzer.store(CX_CT_DEFLATED, uid, data)))
    for kind in ("p-data", "pdv", "command-pdv", "release", "associate-rq"):
        case = next(c for c in fuzzer.cases(200, ["huge"]) if c.label == kind)
        out.append((f"declared length: {kind}", case.run(fuzzer)))
    return out


def parallel(fuzzer: Fuzzer, base: pydicom.Dataset, n: int, rounds: int = 3) -> list[str]:
    """``n`` associations at once, each storing a 15 MiB data set; every answer."""
    answers: list[str] = []
    lock = threading.Lock()

    def one() -> None:
        ds = image(base, 3840, 2048, b"\1\0" * (3840 * 2048))  # 15 MiB
        answer = fuzzer.store(CX_CT_EXPLICIT, ds.SOPInstanceUID,
                              encode(ds, implicit=False))
        with lock:
            answers.append(answer)

    for _ in range(rounds):
        threads = [threading.Thread(target=one) for _ in range(n)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return answers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parallel", type=int, default=16)
    args = parser.parse_args()
    sample = sorted(SAMPLE.glob("*.dcm"))[0]
    base = pydicom.dcmread(sample)
    with tempfile.TemporaryDirectory() as tmp:
        node = LungnodeProcess(Path(tmp) / "single", {"node": {"dimse_timeout_s": 120.0}})
        node.start()
        try:
            fuzzer = Fuzzer("127.0.0.1", node.port, "TESTSCU", "LUNGNODE", sample, 1,
                                      timeout=300.0)
            before = peak_mb(node)
            started = time.monotonic()
            for what, answer in single(fuzzer, base):
                print(f"single | {what} | {answer} | peak RSS so far {peak_mb(node):.0f} MB")
            print(f"single: peak RSS {before:.0f} MB at start, {peak_mb(node):.0f} MB after "
                  f"({time.monotonic() - started:.0f} s)")
        finally:
            node.stop()
        node = LungnodeProcess(Path(tmp) / "parallel",
                               {"node": {"max_associations": args.parallel, "dimse_timeout_s": 120.0}})
        node.start()
        try:
            fuzzer = Fuzzer("127.0.0.1", node.port, "TESTSCU", "LUNGNODE", sample, 1,
                                      timeout=300.0)
            before = peak_mb(node)
            answers = parallel(fuzzer, base, args.parallel)
            print(f"parallel: {args.parallel} associations x 15 MiB, 3 rounds, answers "
                  f"{sorted(set(answers))}; peak RSS {before:.0f} MB at start, {peak_mb(node):.0f} MB after")
        finally:
            node.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
