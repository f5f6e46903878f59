"""Fixtures of the ingest tests: a running ``lungnode run`` node, DCMTK senders, database access.

``node`` is one node per test module (storage in a temp folder; see
:class:`tests.node_process.LungnodeProcess`); tests that need another configuration start their
own with ``make_node``.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select

from lungnode.storage.db import Database
from lungnode.storage.models import Instance
from tests.node_process import LungnodeProcess


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LungnodeProcess]:
    """A running node shared by the tests of one module."""
    proc = LungnodeProcess(tmp_path_factory.mktemp("node"))
    proc.start()
    yield proc
    code = proc.stop()
    assert code == 0, proc.log()[-3000:]


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator[Callable[..., LungnodeProcess]]:
    """Factory: ``make_node(overrides, name="node")`` starts a node with config overrides."""
    started: list[LungnodeProcess] = []

    def factory(overrides: dict[str, Any] | None = None, name: str = "node",
                start: bool = True) -> LungnodeProcess:
        proc = LungnodeProcess(tmp_path / name, overrides)
        if start:
            proc.start()
        started.append(proc)
        return proc

    yield factory
    for proc in started:
        if proc.proc is not None and proc.proc.poll() is None:
            proc.stop()


def storescu(port: int, paths: Sequence[Path | str], env: dict[str, str], *, aet: str = "STORESCU",
             aec: str = "LUNGNODE", extra: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    """Run DCMTK ``storescu -R`` (propose only the files' SOP classes; folders scanned recursively)."""
    args = ["storescu", "-R", "-aet", aet, "-aec", aec, *extra]
    if any(Path(p).is_dir() for p in paths):
        args += ["+sd", "+r"]
    return subprocess.run([*args, "127.0.0.1", str(port), *map(str, paths)], capture_output=True,
                          text=True, env=env, timeout=300)


def sop_uid(path: Path) -> str:
    """SOP Instance UID of a file (from its data set)."""
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def instance_rows(node: LungnodeProcess, **where: Any) -> list[Instance]:
    """Instance rows of a node's database (filtered by column equality)."""
    db = Database(node.db_url, create=False)
    try:
        with db.session() as session:
            query = select(Instance)
            for key, value in where.items():
                query = query.where(getattr(Instance, key) == value)
            rows = list(session.execute(query).scalars())
            session.expunge_all()
            return rows
    finally:
        db.dispose()


def with_db(node: LungnodeProcess, fn: Callable[[Any], Any]) -> Any:
    """Run ``fn(session)`` against a node's database and return its result."""
    db = Database(node.db_url, create=False)
    try:
        with db.session() as session:
            return fn(session)
    finally:
        db.dispose()
