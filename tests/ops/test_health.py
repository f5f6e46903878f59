"""``/healthz`` over real HTTP: healthy, then unhealthy when the database file is made unwritable,
the disk watermark is crossed, the listener is gone or the job queue stalls."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from lungnode.config import Config
from lungnode.ops import server
from lungnode.storage.db import Database
from lungnode.storage.filestore import FileStore
from lungnode.storage.models import Job, utcnow
from tests.ops.conftest import http_get, metric_value


@contextlib.contextmanager
def _serving(config: Config, db: Database) -> Iterator[str]:
    store = FileStore(config.storage.root_path, fsync=False)
    service = server.make_service(config, db, store)
    service.start()
    try:
        yield f"http://127.0.0.1:{service.port}"
    finally:
        service.stop()


@contextlib.contextmanager
def _listener(config: Config) -> Iterator[socket.socket]:
    sock = socket.create_server((config.node.bind, config.node.port))
    try:
        yield sock
    finally:
        sock.close()


def _no_workers(config: Config) -> Config:
    return dataclasses.replace(config, jobs=dataclasses.replace(config.jobs, local_workers=0))


def _make_unwritable(path: Path) -> None:
    path.chmod(0o444)
    if os.geteuid() == 0:  # root ignores file modes: make the file immutable instead
        if shutil.which("chattr") is None:
            pytest.skip("running as root without chattr: cannot make a file unwritable")
        proc = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"chattr +i not supported here: {proc.stderr.strip()}")


def _make_writable(path: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)
    path.chmod(0o644)


def test_healthz_turns_unhealthy_when_database_file_is_unwritable(ops_config: Config,
                                                                  ops_db: Database) -> None:
    config = _no_workers(ops_config)
    db_file = config.storage.root_path / "lungnode.sqlite3"
    with _listener(config), _serving(config, ops_db) as base:
        status, body = http_get(base + "/healthz")
        assert status == 200, body
        report = json.loads(body)
        assert report["status"] == "ok"
        assert set(report["checks"]) == {"database", "disk", "workers", "listener"}
        # The pool holds an open connection: the node's own writes would go on until it reconnects,
        # which is exactly why the check opens a fresh connection.
        _make_unwritable(db_file)
        try:
            status, body = http_get(base + "/healthz")
            assert status == 503, body
            report = json.loads(body)
            assert report["status"] == "unhealthy"
            assert report["checks"]["database"]["ok"] is False
            assert "not writable" in report["checks"]["database"]["detail"]
            assert report["checks"]["disk"]["ok"] is True
            _, text = http_get(base + "/metrics")
            assert metric_value(text, "lungnode_health_ok", {"check": "database"}) == 0.0
            assert metric_value(text, "lungnode_health_ok", {"check": "disk"}) == 1.0
        finally:
            _make_writable(db_file)
        status, body = http_get(base + "/healthz")
        assert status == 200, body


def test_healthz_turns_unhealthy_when_disk_watermark_is_crossed(ops_config: Config,
                                                                ops_db: Database) -> None:
    root = ops_config.storage.root_path
    free_mb = shutil.disk_usage(root).free // (1024 * 1024)
    if free_mb < 2048:
        pytest.skip(f"only {free_mb} MiB free; not enough room to cross a watermark safely")
    # Watermark 256 MiB under today's free space; then take 768 MiB with a real file.
    config = _no_workers(dataclasses.replace(
        ops_config, storage=dataclasses.replace(ops_config.storage, min_free_disk_mb=free_mb - 256)))
    filler_path = root / "ballast.bin"
    with _listener(config), _serving(config, ops_db) as base:
        status, body = http_get(base + "/healthz")
        assert status == 200, body
        fd = os.open(filler_path, os.O_CREAT | os.O_WRONLY, 0o600)
        try:
            os.posix_fallocate(fd, 0, 768 * 1024 * 1024)
            status, body = http_get(base + "/healthz")
            assert status == 503, body
            check = json.loads(body)["checks"]["disk"]
            assert check["ok"] is False and "below the watermark" in check["detail"]
            _, text = http_get(base + "/metrics")
            assert 0 < metric_value(text, "lungnode_free_disk_bytes") < (free_mb - 256) * 1024 * 1024
        finally:
            os.close(fd)
            filler_path.unlink()
        status, body = http_get(base + "/healthz")
        assert status == 200, body


def test_healthz_unhealthy_without_listener_or_with_stalled_queue(ops_config: Config,
                                                                  ops_db: Database) -> None:
    config = _no_workers(ops_config)
    with _serving(config, ops_db) as base:
        status, body = http_get(base + "/healthz")
        assert status == 503
        assert json.loads(body)["checks"]["listener"]["ok"] is False
        with _listener(config):
            assert http_get(base + "/healthz")[0] == 200
            with ops_db.session() as s:  # due 20 min ago, nothing started since
                s.add(Job(series_uid="1.2.3", study_uid="1.2", instance_set_hash="h", model_id="m",
                          model_version="1", state="queued",
                          not_before=utcnow() - dt.timedelta(minutes=20)))
            status, body = http_get(base + "/healthz")
            assert status == 503
            assert "waited" in json.loads(body)["checks"]["workers"]["detail"]


def test_healthz_needs_local_worker_heartbeats(ops_config: Config, ops_db: Database) -> None:
    from lungnode.ops import metrics

    config = dataclasses.replace(ops_config, jobs=dataclasses.replace(ops_config.jobs, local_workers=1))
    with _listener(config), _serving(config, ops_db) as base:
        metrics.worker_heartbeat(now=0.0)  # long ago
        status, body = http_get(base + "/healthz")
        assert status == 503 and "local worker" in json.loads(body)["checks"]["workers"]["detail"]
        metrics.worker_heartbeat()
        status, body = http_get(base + "/healthz")
        assert status == 200, body


def test_health_command_exit_status(tmp_path: Path, ops_config: Config, ops_db: Database) -> None:
    import sys

    from tests.conftest import REPO

    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[storage]\nroot = "{ops_config.storage.root}"\nmin_free_disk_mb = 1\n')
    cmd = [sys.executable, "-m", "lungnode.cli", "--config", str(cfg), "health", "--json"]
    ok = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert json.loads(ok.stdout)["status"] == "ok"
    db_file = ops_config.storage.root_path / "lungnode.sqlite3"
    _make_unwritable(db_file)
    try:
        bad = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    finally:
        _make_writable(db_file)
    assert bad.returncode == 1
    assert json.loads(bad.stdout)["checks"]["database"]["ok"] is False
