"""Fixtures shared by every test area: the shared data folder, free ports, DCMTK's environment and
a real PostgreSQL server started for the session on 127.0.0.1.

Area-specific fixtures live in ``tests/<area>/conftest.py``. ``tests`` is a package imported from
the repository root (pytest puts the root on ``sys.path``; subprocesses run with ``cwd`` there).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.node_process import free_port, wait_for_port

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LUNGNODE_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real DICOM test data beside the checkout (``../shared/data``); skips if absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def chest_ct_dir(shared_data: Path) -> Path:
    """The real 30-slice chest CT series (uncompressed)."""
    return shared_data / "ct" / "chest-30-slices-uncompressed"


@pytest.fixture
def port() -> int:
    """A free TCP port on 127.0.0.1."""
    return free_port()


@pytest.fixture(scope="session")
def dcmtk_env() -> dict[str, str]:
    """Environment for DCMTK tools: TCP_NODELAY=1 (else ~44 ms Nagle stall per instance)."""
    if shutil.which("storescu") is None:
        pytest.skip("DCMTK (storescu) is not installed")
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        pytest.skip(f"PostgreSQL server binaries ({name}) are not installed")
    return found[-1]


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A throw-away PostgreSQL cluster on 127.0.0.1 (initdb in a temp folder), as a SQLAlchemy URL.

    As root the server runs as the ``postgres`` user (initdb refuses root).
    """
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    base = Path(tempfile.mkdtemp(prefix="lungnode-pg-"))
    data = base / "data"
    pg_port = free_port()
    prefix: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
        os.chmod(base, 0o755)
        prefix = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*prefix, initdb, "-D", str(data), "-U", "lungnode", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True)
    options = f"-c listen_addresses=127.0.0.1 -c port={pg_port} -c unix_socket_directories={base}"
    subprocess.run([*prefix, pg_ctl, "-D", str(data), "-o", options, "-l", str(base / "log"), "-w",
                    "start"], check=True, capture_output=True)
    try:
        wait_for_port(pg_port)
        yield f"postgresql+psycopg://lungnode@127.0.0.1:{pg_port}/postgres"
    finally:
        subprocess.run([*prefix, pg_ctl, "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def postgres_db_url(postgres_url: str) -> str:
    """A fresh, empty database in the session's PostgreSQL server for one test."""
    import uuid

    from sqlalchemy import create_engine, text

    name = f"t_{uuid.uuid4().hex[:12]}"
    engine = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return postgres_url.rsplit("/", 1)[0] + f"/{name}"
