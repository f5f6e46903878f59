"""Webhook notifications from audit events to a real HTTP listener: signature, body, retries, dead."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
from pathlib import Path

import pytest
from sqlalchemy import select

from lungnode.config import Config, parse_config
from lungnode.ops.notify import NotificationSender, fan_out
from lungnode.storage.audit import record_event
from lungnode.storage.db import Database
from lungnode.storage.models import Job, Notification, Patient, Series, Study
from tests.ops.webhook_listener import mllp_listener, webhook_listener

SERIES, STUDY = "1.2.3.4.5", "1.2.3.4"


def _setup(tmp_path: Path, url: str, delays: str = "[0.0, 0.0]",
           events: str = '["done", "held", "failed", "delivered", "dead_letter"]',
           database_url: str = "", history: int = 0) -> tuple[Config, Database]:
    """A receiver, one study with job 7, and ``history`` job_done events before the first pass."""
    secret = tmp_path / "hook.key"
    secret.write_text("shared-secret\n")
    config = parse_config(f"""
[storage]
root = "{tmp_path / 'store'}"
database_url = "{database_url}"
[metrics]
port = 9555
[[notifications]]
name = "ris-hook"
kind = "webhook"
url = "{url}"
events = {events}
secret_file = "{secret}"
retry_delays_s = {delays}
timeout_s = 5.0
""")
    db = Database(config.storage.effective_database_url)
    with db.session() as s:
        patient = Patient(patient_id="PID-7", patient_name="Doe^Jane")
        s.add(patient)
        s.flush()
        study = Study(study_uid=STUDY, patient_pk=patient.id, accession_number="ACC42", study_date="20240101")
        s.add(study)
        s.flush()
        s.add(Series(series_uid=SERIES, study_pk=study.id, description="chest", state="complete"))
        s.add(Job(id=7, series_uid=SERIES, study_uid=STUDY, instance_set_hash="h", model_id="m",
                  model_version="1", state="done",
                  measurements={"both": {"percent_involved": 12.5, "lung_ml": 4000.0},
                                "model": {"name": "m", "version": "1"}}))
        for _ in range(history):
            record_event(s, "job_done", study_uid=STUDY, series_uid=SERIES, job_pk=7)
    assert fan_out(db, config) == 0  # first pass: starts at the end of the trail
    return config, db


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_done_event_is_posted_signed_with_the_job_and_no_patient_data(
        tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue("postgres_db_url") if backend == "postgresql" else ""
    with webhook_listener() as hook:
        config, db = _setup(tmp_path, hook.url, database_url=url)
        with db.session() as s:
            record_event(s, "job_done", study_uid=STUDY, series_uid=SERIES, job_pk=7)
            record_event(s, "job_queued", study_uid=STUDY, series_uid=SERIES, job_pk=8)  # not notified
        sender = NotificationSender(config, db)
        assert sender.run_once() == 2  # one row made, one sent
        assert sender.run_once() == 0
        assert len(hook.requests) == 1
        req = hook.requests[0]
        expected = "sha256=" + hmac.new(b"shared-secret", req.body, hashlib.sha256).hexdigest()
        assert req.headers["X-Lungnode-Signature"] == expected
        assert req.headers["X-Lungnode-Event"] == "done"
        body = json.loads(req.body)
        assert body["event"] == "done" and body["job"]["id"] == 7
        assert body["job"]["url"] == "http://127.0.0.1:9555/jobs/7"
        assert body["accession_number"] == "ACC42" and body["series_uid"] == SERIES
        assert body["measurements"]["both"]["percent_involved"] == 12.5
        assert body["model"] == {"name": "m", "version": "1"}
        assert b"Doe^Jane" not in req.body and b"PID-7" not in req.body
        with db.session() as s:
            row = s.scalars(select(Notification)).one()
            assert (row.state, row.response_status, row.attempts) == ("sent", 200, 0)
        assert fan_out(db, config) == 0  # the look-back does not make it twice


def test_history_before_the_first_pass_is_never_notified(tmp_path: Path) -> None:
    """The look-back behind the cursor (for ids committed out of order) must not reach events that
    were already in the trail when notifications started."""
    with webhook_listener() as hook:
        config, db = _setup(tmp_path, hook.url, history=3)
        assert fan_out(db, config) == 0
        with db.session() as s:
            record_event(s, "job_held", study_uid=STUDY, series_uid=SERIES, job_pk=7, reason="gate")
        assert fan_out(db, config) == 1
        assert fan_out(db, config) == 0
        with db.session() as s:
            assert [r.event for r in s.scalars(select(Notification))] == ["held"]
        assert hook.requests == []


def test_failed_answers_are_retried_then_sent_with_the_same_body(tmp_path: Path) -> None:
    with webhook_listener(statuses=[500, 503]) as hook:
        config, db = _setup(tmp_path, hook.url, delays="[0.0, 0.0, 0.0]")
        with db.session() as s:
            record_event(s, "delivery_dead", study_uid=STUDY, series_uid=SERIES, job_pk=7,
                         destination="pacs", attempts=5, error="refused")
        sender = NotificationSender(config, db)
        for _ in range(4):
            sender.run_once()
        assert [r.body for r in hook.requests] == [hook.requests[0].body] * 3
        assert {r.headers["X-Lungnode-Notification"] for r in hook.requests} == {"1"}
        body = json.loads(hook.requests[0].body)
        assert body["event"] == "dead_letter" and body["delivery"]["destination"] == "pacs"
        with db.session() as s:
            row = s.scalars(select(Notification)).one()
            assert (row.state, row.attempts) == ("sent", 2)


def test_a_redirect_is_not_taken_for_delivery(tmp_path: Path) -> None:
    """A webhook answered with 302 was re-sent by urllib as a GET without the body, whose 200
    marked the notification sent."""
    with webhook_listener(statuses=[302]) as hook:
        config, db = _setup(tmp_path, hook.url, delays="[0.0, 0.0]")
        with db.session() as s:
            record_event(s, "job_done", study_uid=STUDY, series_uid=SERIES, job_pk=7)
        sender = NotificationSender(config, db)
        sender.run_once()
        with db.session() as s:
            row = s.scalars(select(Notification)).one()
            assert (row.state, row.attempts, row.last_error) == ("pending", 1, "HTTP 302")
        assert [r.method for r in hook.requests] == ["POST"]
        sender.run_once()  # the retry is answered 200
        with db.session() as s:
            assert s.scalars(select(Notification)).one().state == "sent"


def test_score_is_read_as_on_the_web_page(tmp_path: Path) -> None:
    """A score stored as a dict (total and parts) is sent as its total, the figure the pages show."""
    with webhook_listener() as hook:
        config, db = _setup(tmp_path, hook.url)
        with db.session() as s:
            job = s.get(Job, 7)
            assert job is not None
            job.measurements = {**(job.measurements or {}), "severity_score": {"total": 7, "left": 3}}
            record_event(s, "job_done", study_uid=STUDY, series_uid=SERIES, job_pk=7)
        NotificationSender(config, db).run_once()
        assert json.loads(hook.requests[0].body)["score"] == 7


def test_unreachable_receiver_is_dead_after_the_last_retry(tmp_path: Path) -> None:
    with webhook_listener() as hook:
        url = hook.url
    config, db = _setup(tmp_path, url, delays="[0.0]", events='["held"]')  # listener gone now
    with db.session() as s:
        record_event(s, "job_held", study_uid=STUDY, series_uid=SERIES, job_pk=7, reason="gate")
        record_event(s, "job_done", study_uid=STUDY, series_uid=SERIES, job_pk=7)  # not subscribed
    sender = NotificationSender(config, db)
    sender.run_once()
    sender.run_once()
    with db.session() as s:
        row = s.scalars(select(Notification)).one()
        assert row.state == "dead" and row.attempts == 2 and "Error" in row.last_error


def test_patient_data_only_when_configured(tmp_path: Path) -> None:
    with webhook_listener() as hook:
        config, db = _setup(tmp_path, hook.url)
        receiver = dataclasses.replace(config.notifications[0], include_patient_data=True)
        config = dataclasses.replace(config, notifications=(receiver,))
        with db.session() as s:
            record_event(s, "job_failed", study_uid=STUDY, series_uid=SERIES, job_pk=7, reason="x")
        NotificationSender(config, db).run_once()
        assert json.loads(hook.requests[0].body)["patient"] == {"name": "Doe^Jane", "id": "PID-7"}


def test_hl7_oru_r01_over_mllp_with_impression_and_retry_on_reject(tmp_path: Path) -> None:
    with mllp_listener(codes=["AE"]) as ris:
        config, db = _setup(tmp_path, "http://unused.invalid/")
        receiver = dataclasses.replace(config.notifications[0], kind="hl7", url=ris.url,
                                       include_patient_data=True)
        config = dataclasses.replace(config, notifications=(receiver,))
        config.validate()
        with db.session() as s:
            record_event(s, "job_done", study_uid=STUDY, series_uid=SERIES, job_pk=7)
        sender = NotificationSender(config, db)
        sender.run_once()  # answered AE: retried
        sender.run_once()
        assert len(ris.messages) == 2  # the same control id on both attempts
        assert {m.split("\r")[0].split("|")[9] for m in ris.messages} == {"LN1"}
        segments = {line.split("|")[0]: line.split("|") for line in ris.messages[1].split("\r") if line}
        assert segments["MSH"][8] == "ORU^R01^ORU_R01" and segments["MSH"][9] == "LN1"
        assert segments["PID"][3] == "PID-7" and segments["PID"][5] == "Doe\\S\\Jane"  # ^ escaped
        assert segments["OBR"][3] == "ACC42" and segments["OBR"][7] == "20240101"
        assert segments["OBR"][25] == "F"
        obx = [line.split("|") for line in ris.messages[1].split("\r") if line.startswith("OBX")]
        assert obx[0][3].startswith("LN0001^Percent of lung involved") and obx[0][5] == "12.50"
        assert obx[-1][2] == "TX" and "Infiltrate involves 12.50 % of the lungs" in obx[-1][5]
        with db.session() as s:
            row = s.scalars(select(Notification)).one()
            assert (row.state, row.attempts) == ("sent", 1)
