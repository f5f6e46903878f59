"""The status web page of a real ``lungnode run``, looked at in headless Chromium (JavaScript off).

DCMTK ``storescu`` sends the real 30-slice chest CT; the node (one local worker, the tiny
random-weights model on CPU) segments it and tries to deliver to a destination that is down, so
the delivery fails and is dead-lettered. The overview lists the series (no patient name or ID),
the job page shows its picture (a real PNG drawn from the stored SEG), the deliveries and the
audit trail; an action with a wrong token is refused, one with the right token is done, and both
are in the audit trail with who and from where. Screenshots go to ``docs/img/``.
"""

from __future__ import annotations

import io
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.node.dispatch.dispatch_helpers import wait_for
from tests.node_process import REPO, LungnodeProcess, free_port

IMG = REPO / "docs" / "img"


def _get(url: str) -> tuple[int, bytes, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def _post(url: str, fields: dict[str, str]) -> tuple[int, str]:
    req = urllib.request.Request(url, data=urllib.parse.urlencode(fields).encode(), method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _wait(predicate: Callable[[], Any], timeout: float, what: str, node: LungnodeProcess) -> Any:
    return wait_for(predicate, timeout, 0.5, what, detail=lambda: node.log()[-4000:])


@pytest.mark.slow
def test_web_page_shows_a_series_sent_by_storescu(tmp_path: Path, chest_ct_dir: Path,
                                                  browser: Any) -> None:
    from tests.node.results.results_factory import make_tiny_bundle

    files = sorted(chest_ct_dir.glob("*.dcm"))
    bundle = make_tiny_bundle(tmp_path / "tiny.safetensors")
    tokens = tmp_path / "tokens"
    tokens.write_text("# web action tokens\nalice:s3cret-alice\n")
    web_port = free_port()
    overrides = {
        "completion": {"quiet_period_s": 20.0, "grace_s": 1.0, "poll_s": 0.1},
        "jobs": {"local_workers": 1, "poll_s": 0.2},
        "inference": {"model": str(bundle), "device": "cpu", "threads": 1},
        "results": {"quality_gate": {"enabled": False}},
        "destinations": [{"name": "pacs-down", "ae_title": "PACS", "host": "127.0.0.1",
                          "port": free_port(), "objects": ["seg", "sr"]}],
        "delivery": {"retry_delays_s": [0.2, 0.2], "poll_s": 0.2, "timeout_s": 5.0},
        "metrics": {"enabled": True, "bind": "127.0.0.1", "port": web_port},
        "web": {"enabled": True, "actions": True, "token_file": str(tokens), "refresh_s": 15},
    }
    with LungnodeProcess(tmp_path / "node", overrides) as node:
        base = f"http://127.0.0.1:{web_port}"
        sent = subprocess.run(["storescu", "-aet", "STORESCU", "-aec", "LUNGNODE", "127.0.0.1",
                               str(node.port), *map(str, files)], capture_output=True, text=True,
                              timeout=120)
        assert sent.returncode == 0, sent.stderr
        status = _wait(lambda: node.cli("jobs").stdout if " done " in node.cli("jobs").stdout else "",
                       300, "the job to finish", node)
        job_pk = int(next(line.split()[0] for line in status.splitlines() if " done " in line))
        _wait(lambda: "dead" in node.cli("jobs").stdout or _get(f"{base}/")[1].count(b">dead<"),
              60, "the delivery to be dead-lettered", node)

        status_code, body, headers = _get(base + "/")
        assert status_code == 200
        assert "script-src" not in headers.get("Content-Security-Policy", "") and \
            "default-src 'none'" in headers["Content-Security-Policy"]
        text = body.decode()
        assert "<script" not in text and "http-equiv=\"refresh\" content=\"15\"" in text
        assert "Lung_Dx-A0002" not in text  # patient name and ID are off by default

        browser.get(base + "/")
        page = browser.find_element("tag name", "body").text
        assert "ThoraxRoutine" in page and "20070425" in page  # series description, study date
        assert "chest-ct" in page  # the deciding rule
        assert "pacs-down" in page and "dead" in page  # the dead-letter delivery
        browser.save_screenshot(str(IMG / "web-overview.png"))

        browser.get(f"{base}/jobs/{job_pk}")
        page = browser.find_element("tag name", "body").text
        assert f"Job {job_pk}" in page and "tiny-random" in page
        assert "job_done" in page and "delivery_dead" in page  # history from the audit trail
        img = browser.find_element("css selector", "img")
        code, png, hdr = _get(f"{base}/jobs/{job_pk}/picture.png")
        assert code == 200 and hdr["Content-Type"] == "image/png"
        picture = Image.open(io.BytesIO(png))
        assert picture.size[0] >= 320 and picture.size[1] > 320
        assert (node.root / "web" / f"job-{job_pk}.png").read_bytes() == png  # made once, kept
        assert img.size["width"] >= 320  # the browser decoded and laid out the picture
        browser.save_screenshot(str(IMG / "web-job.png"))

        # actions: a wrong token is refused, the right one resends; both audited with who
        code, answer = _post(f"{base}/jobs/{job_pk}/action", {"action": "resend", "token": "nope"})
        assert code == 403 and "unknown token" in answer
        browser.get(f"{base}/jobs/{job_pk}")
        browser.find_element("css selector", "input[name=token]").send_keys("s3cret-alice")
        browser.find_element("css selector", "form button").click()
        assert "queued again for pacs-down" in browser.find_element("tag name", "body").text
        audit = node.cli("audit", "--event", "web_action").stdout
        assert "refused" in audit and '"alice"' in audit and "127.0.0.1" in audit
        assert audit.count("web_action") == 2
