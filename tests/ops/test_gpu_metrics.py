"""GPU memory metric on a real CUDA device: a worker-like child process allocates on the GPU, calls
``sample_gpu_memory()``, and the parent's ``/metrics`` shows its peak (multiprocess mode)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port
from tests.ops.conftest import metric_value

MIB = 1024 * 1024

_SCRIPT = textwrap.dedent('''
    import json, multiprocessing as mp, sys, urllib.request
    from lungnode.ops import metrics, server


    def worker(q) -> None:
        import torch
        big = torch.empty(300 * 1024 * 1024, dtype=torch.uint8, device="cuda")
        first = metrics.sample_gpu_memory()
        del big
        metrics.sample_gpu_memory()  # still >= 300 MiB: the reset keeps what was allocated then
        small = torch.empty(8 * 1024 * 1024, dtype=torch.uint8, device="cuda")
        second = metrics.sample_gpu_memory()  # the peak since the previous sample only
        q.put((first, second))
        del small


    if __name__ == "__main__":
        metrics.setup_multiprocess(sys.argv[1])
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        p = ctx.Process(target=worker, args=(q,))
        p.start()
        first, second = q.get(timeout=120)
        service = server.MetricsService("127.0.0.1", int(sys.argv[2]), [])
        service.start()
        text = urllib.request.urlopen(f"http://127.0.0.1:{service.port}/metrics").read().decode()
        p.join()
        service.stop()
        print(json.dumps({"first": first, "second": second, "text": text, "pid": p.pid}))
''')


@pytest.mark.gpu
def test_gpu_memory_metric_from_a_worker_process(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    script = tmp_path / "gpu.py"
    script.write_text(_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "metrics"), str(free_port())],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["first"] >= 300 * MIB
    assert 8 * MIB <= out["second"] < 300 * MIB
    shown = metric_value(out["text"], "lungnode_gpu_memory_bytes", {"pid": str(out["pid"])})
    assert shown == out["second"]
