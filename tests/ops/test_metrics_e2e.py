"""End to end: the metrics of a real ``lungnode run`` change as a real series flows through it.

A pynetdicom SCU sends the real 30-slice chest CT to ``lungnode run`` (listener in the main process,
one spawned worker process, tiny random-weights model on CPU); the node sends SEG + SR to a real
pynetdicom storage SCP standing in for the PACS. ``/metrics`` is scraped over HTTP before and after:
the counters and histograms written by the listener, completion, worker and delivery (three
processes, one shared metrics folder) all show the series; ``/healthz`` is healthy throughout.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import ComprehensiveSRStorage, SegmentationStorage  # type: ignore[attr-defined]

from tests.conftest import free_port
from tests.node_process import LungnodeProcess, send_files
from tests.ops.conftest import http_get, metric_value
from tests.ops.test_conformance import doc_table


class FakePacs:
    """A real storage SCP on loopback that records what it is sent."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[str] = []
        self.proposed: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        ae = AE(ae_title="PACS")
        for sop in (SegmentationStorage, ComprehensiveSRStorage):
            ae.add_supported_context(sop, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.90",
                                           "1.2.840.10008.1.2"])
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store),
                                                    (evt.EVT_REQUESTED, self._on_requested)])

    def _on_requested(self, event: Any) -> None:
        with self._lock:
            for cx in event.assoc.requestor.requested_contexts:
                self.proposed.update((str(cx.abstract_syntax), str(ts)) for ts in cx.transfer_syntax)

    def _on_store(self, event: Any) -> int:
        with self._lock:
            self.received.append(str(event.request.AffectedSOPClassUID))
        return 0x0000

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def pacs() -> Iterator[FakePacs]:
    server = FakePacs()
    try:
        yield server
    finally:
        server.stop()


def _scrape(base: str) -> str:
    status, text = http_get(base + "/metrics")
    assert status == 200
    return text


@pytest.mark.slow
def test_metrics_follow_a_real_series(tmp_path: Path, chest_ct_dir: Path, pacs: FakePacs) -> None:
    from tests.node.results.results_factory import make_tiny_bundle

    files = sorted(chest_ct_dir.glob("*.dcm"))
    assert len(files) == 30
    bundle = make_tiny_bundle(tmp_path / "tiny.safetensors")
    metrics_port = free_port()
    overrides = {
        "completion": {"quiet_period_s": 20.0, "grace_s": 1.0, "poll_s": 0.1},
        "jobs": {"local_workers": 1, "poll_s": 0.2},
        "inference": {"model": str(bundle), "device": "cpu", "threads": 1},
        "results": {"quality_gate": {"enabled": False}},
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port,
                          "objects": ["seg", "sr"]}],
        "delivery": {"retry_delays_s": [0.5, 1.0], "poll_s": 0.2, "timeout_s": 20.0},
        "metrics": {"enabled": True, "bind": "127.0.0.1", "port": metrics_port},
    }
    with LungnodeProcess(tmp_path / "node", overrides) as node:
        base = f"http://127.0.0.1:{metrics_port}"
        deadline = time.monotonic() + 30
        while True:  # the endpoint starts after the listener
            try:
                before = _scrape(base)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(node.log()[-3000:]) from None
                time.sleep(0.2)
        assert metric_value(before, "lungnode_instances_received_total", {"calling_ae": "TESTSCU"}) == 0
        assert metric_value(before, "lungnode_jobs", {"state": "done"}) == 0
        deadline = time.monotonic() + 60  # the local worker's first heartbeat (spawned process)
        while http_get(base + "/healthz")[0] != 200:
            if time.monotonic() > deadline:
                raise AssertionError(http_get(base + "/healthz")[1] + node.log()[-3000:])
            time.sleep(0.5)

        statuses = send_files(node.port, files, calling_ae="TESTSCU")
        assert statuses == [0] * 30
        after_receive = _scrape(base)
        assert metric_value(after_receive, "lungnode_instances_received_total",
                            {"calling_ae": "TESTSCU"}) == 30
        total = sum(f.stat().st_size for f in files)
        assert 0.9 * total <= metric_value(after_receive, "lungnode_bytes_received_total") <= 1.1 * total
        assert metric_value(after_receive, "lungnode_associations_total", {"outcome": "accepted"}) >= 1

        deadline = time.monotonic() + 300
        text = after_receive
        while metric_value(text, "lungnode_end_to_end_seconds_count") < 1:
            if time.monotonic() > deadline:
                raise AssertionError(text[-3000:] + node.log()[-4000:])
            time.sleep(1.0)
            text = _scrape(base)
        assert sorted(pacs.received) == sorted([SegmentationStorage, ComprehensiveSRStorage])
        # What the real delivery proposed is in the conformance statement's SCU table.
        scu_rows = doc_table("scu-presentation-contexts")
        assert pacs.proposed <= {(r["SOP Class UID"], r["Transfer Syntax UID"]) for r in scu_rows}
        assert metric_value(text, "lungnode_series_completed_total", {"decision": "include"}) == 1
        assert metric_value(text, "lungnode_jobs", {"state": "done"}) == 1
        assert metric_value(text, "lungnode_jobs", {"state": "queued"}) == 0
        assert metric_value(text, "lungnode_delivery_rows", {"state": "sent"}) == 1
        assert metric_value(text, "lungnode_deliveries_total", {"outcome": "sent"}) == 1
        for stage in ("receive_to_complete", "queue_wait", "inference", "build", "send"):
            assert metric_value(text, "lungnode_stage_seconds_count", {"stage": stage}) == 1, stage
        e2e = metric_value(text, "lungnode_end_to_end_seconds_sum")
        inference = metric_value(text, "lungnode_stage_seconds_sum", {"stage": "inference"})
        assert e2e >= inference > 0
        assert metric_value(text, "lungnode_free_disk_bytes") > 0
        status, body = http_get(base + "/healthz")
        assert status == 200, body
        assert all(c["ok"] for c in json.loads(body)["checks"].values())
        print(f"end-to-end {e2e:.1f} s, inference {inference:.1f} s")
        audit = node.cli("audit", "--json").stdout.splitlines()
        events = [json.loads(line)["event"] for line in audit]
        assert {"association", "series_complete", "job_done", "delivered"} <= set(events), events
        assert "Doe" not in "\n".join(audit)
