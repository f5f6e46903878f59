"""Issue 20: a seeded, bounded fuzz campaign against a real ``lungnode run`` over loopback.

400 cases in five families (malformed PDUs, command sets, data sets, pixel data mismatches, huge
declared lengths) plus 60 connections trickling an association request one byte a second, from
``tools/fuzz_node.py`` (the longer campaign a user runs against a node). The node must stay up
(same PID, C-ECHO answered every 25 cases and after), answer every case (a status, an
A-ASSOCIATE-RJ or an A-ABORT; trickles cut), never acknowledge a broken pixel case, store only
what it acknowledged and only what pydicom and DCMTK ``dcmdump`` read back in full, leave no temp
file, and stay under 500 MB of peak resident memory (``VmHWM``) through it all.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.node_process import LungnodeProcess, stored_files
from tools import fuzz_node

SEED = 20
CASES = 400
TRICKLES = 60


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_fuzz_campaign_node_stays_up_and_answers_everything(
        make_node: Callable[..., LungnodeProcess], chest_ct_dir: Path) -> None:
    node = make_node({"node": {"acse_timeout_s": 3.0, "dimse_timeout_s": 5.0, "network_timeout_s": 5.0},
                      "storage": {"max_dataset_mb": 32}})
    assert node.proc is not None
    pid = node.proc.pid
    sample = sorted(chest_ct_dir.glob("*.dcm"))[0]
    fuzzer = fuzz_node.Fuzzer("127.0.0.1", node.port, "TESTSCU", "LUNGNODE", sample, SEED,
                              timeout=20.0, trickle_s=15.0)
    results = fuzz_node.run_campaign(fuzzer, CASES, trickles=TRICKLES)
    table = fuzz_node.format_table(results)
    print(table)
    assert results.cases == CASES + TRICKLES
    assert set(results.table) == set(fuzz_node.FAMILIES), table
    assert results.findings == [], (results.findings, table)
    # Everything acknowledged is stored and readable in full; nothing else was stored.
    assert fuzz_node.check_store(node.root, results.acknowledged) == []
    assert len(stored_files(node.root)) == len(results.acknowledged) > 0
    assert node.proc.poll() is None and node.proc.pid == pid and fuzzer.echo_ok()
    assert _peak_rss_mb(pid) < 500
    log = node.log()
    assert "Traceback" not in log and "association thread failed" not in log
