"""The audit trail: ``lungnode audit`` reads it; the database refuses to change it (SQLite and a
real PostgreSQL server); retention on PostgreSQL keeps unsent results too."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import delete, update
from sqlalchemy.exc import DatabaseError

from lungnode.config import Config
from lungnode.ops import retention
from lungnode.storage.audit import ensure_append_only, read_events, record_event
from lungnode.storage.db import Database
from lungnode.storage.filestore import FileStore
from lungnode.storage.models import AuditEvent, utcnow
from tests.conftest import REPO
from tests.ops.conftest import Filler, make_config


def _write_events(db: Database) -> None:
    with db.session() as s:
        old = AuditEvent(event="association", ae_title="OLDPACS", peer="10.0.0.9",
                         at=utcnow() - dt.timedelta(days=3), details={"instances": 1})
        s.add(old)
        record_event(s, "association", ae_title="PACS", peer="127.0.0.1", instances=30, bytes=15_000_000,
                     outcome="released")
        record_event(s, "job_done", study_uid="1.2.3", series_uid="1.2.3.4", job_pk=7,
                     model="lungnode-demo", model_version="0")
        record_event(s, "delivered", ae_title="PACS", series_uid="1.2.3.4", job_pk=7, destination="pacs",
                     sop_instance_uids=["1.2.3.4.5"])


def _run(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lungnode.cli", "--config", str(cfg), "audit", *args],
                          cwd=REPO, capture_output=True, text=True)


def test_audit_command_filters_and_prints_json(tmp_path: Path, ops_config: Config, ops_db: Database) -> None:
    _write_events(ops_db)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[storage]\nroot = "{ops_config.storage.root}"\n')
    out = _run(cfg, "--json")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["event"] for r in rows] == ["association", "association", "job_done", "delivered"]
    recent = [json.loads(line) for line in _run(cfg, "--since", "1d", "--json").stdout.splitlines()]
    assert [r["ae_title"] for r in recent if r["event"] == "association"] == ["PACS"]
    delivered = _run(cfg, "--event", "delivered", "--json").stdout.splitlines()
    assert len(delivered) == 1 and json.loads(delivered[0])["details"]["destination"] == "pacs"
    text = _run(cfg, "--since", (utcnow() - dt.timedelta(hours=1)).isoformat()).stdout
    assert "job_done" in text and "model=\"lungnode-demo\"" in text and "OLDPACS" not in text
    assert _run(cfg, "--since", "yesterday").returncode == 2


def _assert_append_only(db: Database) -> None:
    _write_events(db)
    ensure_append_only(db)
    ensure_append_only(db)  # idempotent
    with pytest.raises(DatabaseError, match="append-only"), db.session() as s:
        s.execute(update(AuditEvent).values(ae_title="X"))
    with pytest.raises(DatabaseError, match="append-only"), db.session() as s:
        s.execute(delete(AuditEvent))
    with db.session() as s:
        record_event(s, "cleanup", kind="series")  # appending still works
        assert len(read_events(s)) == 5
        assert [e.event for e in read_events(s, limit=2)] == ["delivered", "cleanup"]


def test_audit_table_is_append_only_sqlite(ops_db: Database) -> None:
    _assert_append_only(ops_db)


@pytest.mark.postgres
def test_audit_append_only_and_retention_on_postgres(postgres_db_url: str, tmp_path: Path) -> None:
    db = Database(postgres_db_url)
    try:
        _assert_append_only(db)
        config = make_config(tmp_path / "store", storage={"database_url": postgres_db_url})
        filler = Filler(db, FileStore(config.storage.root_path, fsync=False))
        sent = filler.series(days_old=40)
        sent_job = filler.job(sent, state="done", days_old=40, deliveries=("sent",))
        unsent = filler.series(days_old=40)
        filler.job(unsent, state="done", days_old=40, deliveries=("pending",))
        result = retention.cleanup(db, config)
        assert {u.key for u in result.units} == {sent, str(sent_job)}
        assert any(unsent in str(p) for p in config.storage.root_path.rglob("*.dcm"))
    finally:
        db.dispose()
