"""Database engine and sessions: SQLite (default, WAL) or PostgreSQL (scale-out).

:class:`Database` owns the SQLAlchemy engine. SQLite runs in WAL mode with a busy timeout and
``synchronous=FULL`` so a committed row survives a crash; PostgreSQL is used as-is. The schema is
created on first start (``create_all``); the tables are in :mod:`lungnode.storage.models`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, delete, event, insert
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from lungnode.storage.models import Base, HealthProbe, utcnow

SQLITE_BUSY_TIMEOUT_MS = 30_000


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_begin_immediate(conn: Any) -> None:
    # Take the write lock at BEGIN so concurrent writers queue on busy_timeout instead of
    # failing with "database is locked" when a read transaction tries to upgrade.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


class Database:
    """The node's database.

    Parameters
    ----------
    url:
        SQLAlchemy URL (``sqlite:///PATH`` or ``postgresql+psycopg://…``).
    create:
        Create missing tables.
    """

    def __init__(self, url: str, *, create: bool = True) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        kwargs: dict[str, Any] = {"future": True}
        if self.is_sqlite:
            path = url.split("///", 1)[1] if "///" in url else ""
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000,
                                      "check_same_thread": False,
                                      "isolation_level": None}
        else:
            kwargs.update(pool_pre_ping=True, pool_size=10, max_overflow=20)
        self.engine: Engine = create_engine(url, **kwargs)
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
            event.listen(self.engine, "begin", _sqlite_begin_immediate)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        if create:
            self.create_schema()

    def create_schema(self) -> None:
        """Create every table that does not exist yet."""
        Base.metadata.create_all(self.engine)

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on error."""
        with self._sessions() as session, session.begin():
            yield session

    def dispose(self) -> None:
        """Close every pooled connection (call after fork and at shutdown)."""
        self.engine.dispose()

    def ping(self) -> None:
        """Write one row in a real table and roll back; raises if the database cannot be written."""
        with self.engine.connect() as conn:
            trans = conn.begin()
            try:
                conn.execute(delete(HealthProbe))
                conn.execute(insert(HealthProbe).values(id=1, at=utcnow()))
            finally:
                trans.rollback()
