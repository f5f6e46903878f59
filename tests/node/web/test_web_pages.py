"""The status pages without a browser: patient data switch, actions and tokens, not-found pages,
HTML escaping, and the pages served by the metrics HTTP server itself."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from sqlalchemy import select

from lungnode.config import Config, WebConfig, parse_config
from lungnode.node.web.actions import token_owner
from lungnode.node.web.app import WebPages
from lungnode.ops import health
from lungnode.ops.server import MetricsService
from lungnode.storage.db import Database
from lungnode.storage.filestore import FileStore
from lungnode.storage.models import AuditEvent, Delivery, Job, Patient, Series, Study, utcnow

SERIES, STUDY = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"


def _pages(tmp_path: Path, **web: object) -> tuple[WebPages, Database]:
    config = parse_config(f'[storage]\nroot = "{tmp_path / "store"}"\nmin_free_disk_mb = 0\n'
                          '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\n')
    config = dataclasses.replace(config, web=dataclasses.replace(WebConfig(), **web))  # type: ignore[arg-type]
    db = Database(config.storage.effective_database_url)
    store = FileStore(config.storage.root_path, fsync=False)
    with db.session() as s:
        patient = Patient(patient_id="PID-<9>", patient_name="Doe^Jane")
        s.add(patient)
        s.flush()
        study = Study(study_uid=STUDY, patient_pk=patient.id, accession_number="ACC&1",
                      study_date="20240102")
        s.add(study)
        s.flush()
        s.add(Series(series_uid=SERIES, study_pk=study.id, description="<b>chest</b>", state="complete",
                     decision="include", decision_rule="chest-ct", modality="CT"))
        s.add(Job(id=3, series_uid=SERIES, study_uid=STUDY, instance_set_hash="h", model_id="m",
                  model_version="1", state="held", reason="lung volume 150 mL below 200 mL",
                  measurements={"both": {"percent_involved": 3.25, "lung_ml": 150.0}, "score": 4}))
    return WebPages(config, db, store, lambda: health.run_checks([])), db


def _config_with(config: Config, **web: object) -> Config:
    return dataclasses.replace(config, web=dataclasses.replace(config.web, **web))  # type: ignore[arg-type]


def test_overview_hides_patient_data_unless_configured(tmp_path: Path) -> None:
    pages, _ = _pages(tmp_path)
    html = pages.get("/").body.decode()
    assert "Doe^Jane" not in html and "PID-" not in html
    assert "ACC&amp;1" in html and "&lt;b&gt;chest&lt;/b&gt;" in html  # escaped, not markup
    assert "lung volume 150 mL below 200 mL" in html  # held job with its reason
    assert ">3.25<" in html and ">4<" in html  # percent and score
    job = pages.get("/jobs/3").body.decode()
    assert "Doe^Jane" not in job and "actions are off" in job
    pages.config = _config_with(pages.config, show_patient_data=True)
    pages.web = pages.config.web
    assert "Doe^Jane" in pages.get("/").body.decode()
    assert "PID-&lt;9&gt;" in pages.get("/jobs/3").body.decode()


def test_not_found_and_series_page(tmp_path: Path) -> None:
    pages, _ = _pages(tmp_path)
    assert pages.get("/jobs/99").status == 404
    assert pages.get("/series/1.2.3").status == 404
    assert pages.get("/nothing").status == 404
    assert pages.get("/jobs/99/picture.png").status == 404
    assert pages.get("/jobs/3%0A").status == 404  # a trailing newline is not part of a route
    assert pages.get(f"/series/{SERIES}%0A").status == 404
    assert pages.get("/jobs/3").status == 200
    series = pages.get(f"/series/{SERIES}")
    assert series.status == 200
    assert b"chest-ct" in series.body and b'href="/jobs/3"' in series.body


def test_actions_need_the_switch_and_a_token_and_are_audited(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# comment\nalice:tok-a\nbob : tok-b \n")
    assert token_owner(str(tokens), "tok-b") == "bob" and token_owner(str(tokens), "tok") is None
    pages, db = _pages(tmp_path, token_file=str(tokens))
    form = urllib.parse.urlencode({"action": "release", "token": "tok-a"}).encode()
    assert pages.post("/jobs/3/action", form, "10.0.0.5").status == 403  # actions = false
    pages.config = _config_with(pages.config, actions=True)
    pages.web = pages.config.web
    assert b'name="action" value="release"' in pages.get("/jobs/3").body
    bad = urllib.parse.urlencode({"action": "release", "token": "nope"}).encode()
    assert pages.post("/jobs/3/action", bad, "10.0.0.5").status == 403
    wrong = urllib.parse.urlencode({"action": "retry", "token": "tok-a"}).encode()
    assert pages.post("/jobs/3/action", wrong, "10.0.0.5").status == 409  # held, not failed
    done = pages.post("/jobs/3/action", form, "10.0.0.6")
    assert done.status == 200 and b"job 3 released; queued for no destination" in done.body
    with db.session() as s:
        assert s.get(Job, 3).state == "done"  # type: ignore[union-attr]
        assert s.scalars(select(Delivery)).all() == []  # nothing was built for pacs
        events = [(e.details["action"], e.details["who"], e.details["outcome"], e.peer)
                  for e in s.scalars(select(AuditEvent).where(AuditEvent.event == "web_action"))]
    assert events == [("release", "", "refused", "10.0.0.5"), ("release", "", "refused", "10.0.0.5"),
                      ("retry", "alice", "failed", "10.0.0.5"), ("release", "alice", "done", "10.0.0.6")]


def test_pages_are_served_beside_metrics(tmp_path: Path) -> None:
    pages, _ = _pages(tmp_path)
    service = MetricsService("127.0.0.1", 0, [], None, None, web=pages)
    service.start()
    try:
        base = f"http://127.0.0.1:{service.port}"
        with urllib.request.urlopen(base + "/", timeout=10) as resp:
            assert resp.status == 200 and "text/html" in resp.headers["Content-Type"]
            assert "default-src 'none'" in resp.headers["Content-Security-Policy"]
        with urllib.request.urlopen(base + "/metrics", timeout=10) as resp:
            assert resp.status == 200
        head = urllib.request.Request(base + "/jobs/3", method="HEAD")
        with urllib.request.urlopen(head, timeout=10) as resp:
            assert resp.status == 200 and resp.read() == b""
        try:
            urllib.request.urlopen(urllib.request.Request(base + "/jobs/3/action", data=b"x" * 9000),
                                   timeout=10)
        except urllib.error.HTTPError as exc:
            assert exc.code == 413
        else:
            raise AssertionError("an oversized form was accepted")
        for declared in ("-1", "x"):  # read(-1) would read until the client closes: unbounded
            with socket.create_connection(("127.0.0.1", service.port), timeout=5) as sock:
                sock.sendall(f"POST /jobs/3/action HTTP/1.1\r\nHost: x\r\n"
                             f"Content-Length: {declared}\r\n\r\naction=release".encode())
                assert sock.recv(64).startswith(b"HTTP/1.1 400 ")
    finally:
        service.stop()


def test_retention_deletes_a_job_picture_with_its_results(tmp_path: Path) -> None:
    from lungnode.ops import retention
    from tests.ops.conftest import Filler, make_config

    config = make_config(tmp_path / "store")
    db = Database(config.storage.effective_database_url)
    store = FileStore(config.storage.root_path, fsync=False)
    filler = Filler(db, store)
    old = filler.job(filler.series(days_old=40), state="done", days_old=40, deliveries=("sent",))
    held = filler.job(filler.series(days_old=40), state="held", days_old=40)
    for job in (old, held):  # as job_picture leaves it: dated at the job's end
        path = store.write_bytes(store.picture_relpath(job), b"\x89PNG fake")
        stamp = (utcnow() - dt.timedelta(days=40)).timestamp()
        os.utime(path, (stamp, stamp))
    result = retention.cleanup(db, config)
    assert str(old) in {u.key for u in result.units}
    assert not store.path(store.picture_relpath(old)).exists()
    assert store.path(store.picture_relpath(held)).exists()  # held results are kept, picture too
    db.dispose()
