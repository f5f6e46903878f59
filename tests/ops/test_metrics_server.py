"""``/metrics`` over real HTTP: state gauges from the database, and sums across processes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from lungnode.config import Config
from lungnode.ops import metrics, server
from lungnode.storage.db import Database
from lungnode.storage.filestore import FileStore
from tests.conftest import REPO, free_port
from tests.ops.conftest import Filler, http_get, metric_value


def test_metrics_endpoint_serves_state_and_event_metrics(ops_config: Config, ops_db: Database,
                                                        filler: Filler) -> None:
    s1 = filler.series(days_old=1)
    filler.job(s1, state="done", days_old=1, deliveries=("sent", "pending"))
    s2 = filler.series(days_old=1)
    filler.job(s2, state="queued", days_old=0)
    service = server.make_service(ops_config, ops_db, FileStore(ops_config.storage.root_path))
    service.start()
    try:
        base = f"http://127.0.0.1:{service.port}"
        before = metric_value(http_get(base + "/metrics")[1], "lungnode_instances_received_total",
                              {"calling_ae": "TESTAE"})
        metrics.INSTANCES_RECEIVED.labels("TESTAE").inc(3)
        metrics.STAGE_SECONDS.labels("inference").observe(2.5)
        status, text = http_get(base + "/metrics")
        assert status == 200
        assert metric_value(text, "lungnode_instances_received_total", {"calling_ae": "TESTAE"}) == before + 3
        assert metric_value(text, "lungnode_jobs", {"state": "queued"}) == 1
        assert metric_value(text, "lungnode_jobs", {"state": "done"}) == 1
        assert metric_value(text, "lungnode_jobs", {"state": "running"}) == 0
        assert metric_value(text, "lungnode_delivery_rows", {"state": "pending"}) == 1
        assert metric_value(text, "lungnode_free_disk_bytes") > 0
        assert metric_value(text, "lungnode_stage_seconds_count", {"stage": "inference"}) >= 1
        assert "Doe" not in text
        assert http_get(base + "/nope")[0] == 404
    finally:
        service.stop()


_CHILDREN = textwrap.dedent('''
    import json, multiprocessing as mp, os, sys, urllib.request
    import prometheus_client  # imported before the switch on purpose: the switch must still work
    from lungnode.ops import metrics, server


    def child(n: int) -> None:
        metrics.INSTANCES_RECEIVED.labels("PACS").inc(n)
        metrics.BYTES_RECEIVED.inc(1000 * n)
        metrics.STAGE_SECONDS.labels("inference").observe(n)
        metrics.worker_heartbeat()


    if __name__ == "__main__":
        folder = sys.argv[1]
        metrics.BYTES_RECEIVED.inc(1)  # an in-memory value from before the switch: not exported
        metrics.setup_multiprocess(folder)
        pids = []
        for ctx, n in ((mp.get_context("fork"), 1), (mp.get_context("fork"), 2),
                       (mp.get_context("spawn"), 4)):
            p = ctx.Process(target=child, args=(n,))
            p.start()
            p.join()
            assert p.exitcode == 0
            pids.append(p.pid)
        metrics.INSTANCES_RECEIVED.labels("PACS").inc(8)
        service = server.MetricsService("127.0.0.1", int(sys.argv[2]), [])
        service.start()
        url = f"http://127.0.0.1:{service.port}/metrics"
        beats = len(metrics.worker_heartbeats())
        first = urllib.request.urlopen(url).read().decode()  # the scrape sweeps dead processes
        print(json.dumps({"first": first, "beats": beats, "beats_after": len(metrics.worker_heartbeats()),
                          "files": sorted(os.listdir(folder)), "pids": pids}))
        service.stop()
''')


def test_metrics_sum_over_processes(tmp_path: Path) -> None:
    script = tmp_path / "children.py"
    script.write_text(_CHILDREN)
    folder = tmp_path / "metrics"
    folder.mkdir()
    (folder / "counter_999999.db").write_bytes(b"stale file of a dead process")
    proc = subprocess.run([sys.executable, str(script), str(folder), str(free_port())], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    text = out["first"]
    assert metric_value(text, "lungnode_instances_received_total", {"calling_ae": "PACS"}) == 1 + 2 + 4 + 8
    assert metric_value(text, "lungnode_bytes_received_total") == 7000
    assert metric_value(text, "lungnode_stage_seconds_count", {"stage": "inference"}) == 3
    assert metric_value(text, "lungnode_stage_seconds_sum", {"stage": "inference"}) == 7
    assert out["beats"] == 3  # one live-gauge file per worker process
    assert out["beats_after"] == 0  # the exited processes' live gauges were swept at the scrape
    assert not [f for f in out["files"] if f.startswith("gauge_live")
                and int(f.rsplit("_", 1)[1][:-3]) in out["pids"]]
    assert "counter_999999.db" not in out["files"]  # wiped at start
    assert len([f for f in out["files"] if f.startswith("counter_")]) == 4  # 3 children + parent
