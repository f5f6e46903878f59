"""The statements of the ingest hot path (one C-STORE = three of these), built once.

:meth:`lungnode.node.ingest.catalog.Catalog.commit_batch` runs, per received instance: the stored
versions of its SOP Instance UID, the completion-timer update of its series, and the instance
insert. :func:`statements_for` returns them bound to the batch's connection:

* :class:`CoreStatements` (any database, PostgreSQL in practice): prebuilt SQLAlchemy Core
  statements executed with plain parameter dicts, which skips the ORM's per-statement work.
* :class:`SqliteStatements`: the same SQL text, run on the SQLite DB-API cursor of the same
  connection, inside the same transaction. SQLAlchemy's execution context (compiled-cache lookup,
  result set-up, event dispatch) cost ~0.45 ms of CPU per instance here, about a tenth of the
  node's whole cost of a C-STORE. Values go through the column types' own bind processors
  (:meth:`~sqlalchemy.types.TypeEngine.bind_processor` for the SQLite dialect), so the stored
  rows are the ones SQLAlchemy writes.

Both are exercised by the catalog tests (SQLite and PostgreSQL).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol, cast

from sqlalchemy import Table, bindparam, insert, select, update
from sqlalchemy.engine import Connection, Dialect

from lungnode.storage.models import Instance, Series

_INSTANCES = cast(Table, Instance.__table__)
_SERIES = cast(Table, Series.__table__)

#: Every stored version of one SOP instance (duplicate / version decision).
SELECT_VERSIONS = (select(_INSTANCES.c.id, _INSTANCES.c.version, _INSTANCES.c.sha256, _INSTANCES.c.path)
                   .where(_INSTANCES.c.sop_instance_uid == bindparam("b_sop")))
#: Older versions stop being current when a new one arrives.
CLEAR_CURRENT = (update(_INSTANCES).where(_INSTANCES.c.sop_instance_uid == bindparam("b_sop"))
                 .values(current=False))
#: The instance row (columns = the parameter dict's keys).
INSERT_INSTANCE = insert(_INSTANCES)
#: Timer and state of a series known by primary key (SET = the parameter keys other than ``b_pk``).
TOUCH_SERIES_BY_PK = (update(_SERIES).where(_SERIES.c.id == bindparam("b_pk"))
                      .returning(_SERIES.c.id))
#: The same by series UID (right after the insert-if-missing).
TOUCH_SERIES_BY_UID = (update(_SERIES).where(_SERIES.c.series_uid == bindparam("b_uid"))
                       .returning(_SERIES.c.id))


class StoredVersion(NamedTuple):
    """A stored version of a SOP instance."""

    id: int
    version: int
    sha256: str
    path: str


class IngestStatements(Protocol):
    """The hot-path statements, bound to one connection in a transaction."""

    def versions(self, sop_uid: str) -> list[StoredVersion]:
        """The stored versions of ``sop_uid``."""

    def insert_instance(self, values: Mapping[str, Any]) -> None:
        """Insert an instance row; ``values`` names every column but ``id``."""

    def touch_series(self, pk: int, values: Mapping[str, Any]) -> int | None:
        """Set ``values`` on series ``pk``; its primary key, None when it no longer exists."""


def statements_for(conn: Connection) -> IngestStatements:
    """The hot-path statements for ``conn`` (the DB-API ones on SQLite, Core elsewhere)."""
    if conn.dialect.name == "sqlite":
        return SqliteStatements(conn)
    return CoreStatements(conn)


class CoreStatements:
    """:class:`IngestStatements` as SQLAlchemy Core statements."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def versions(self, sop_uid: str) -> list[StoredVersion]:
        return [StoredVersion(*row) for row in self.conn.execute(SELECT_VERSIONS, {"b_sop": sop_uid})]

    def insert_instance(self, values: Mapping[str, Any]) -> None:
        self.conn.execute(INSERT_INSTANCE, dict(values))

    def touch_series(self, pk: int, values: Mapping[str, Any]) -> int | None:
        return touch_series(self.conn, dict(values), pk=pk)


class _SqliteSql:
    """SQL text and bind processors of the hot path for one SQLite dialect (built once)."""

    def __init__(self, dialect: Dialect) -> None:
        quote = dialect.identifier_preparer.quote
        self.insert_columns = [c.name for c in _INSTANCES.c if c.name != "id"]
        self.insert = (f"INSERT INTO {quote(_INSTANCES.name)} "
                       f"({', '.join(quote(n) for n in self.insert_columns)}) "
                       f"VALUES ({', '.join('?' for _ in self.insert_columns)})")
        self.versions = (f"SELECT {quote('id')}, {quote('version')}, {quote('sha256')}, {quote('path')} "
                         f"FROM {quote(_INSTANCES.name)} WHERE {quote('sop_instance_uid')} = ?")
        self.series_table = quote(_SERIES.name)
        self.quote = quote
        self.processors: dict[tuple[str, str], Callable[[Any], Any] | None] = {}
        for table in (_INSTANCES, _SERIES):
            for column in table.c:
                impl = column.type.dialect_impl(dialect)
                self.processors[table.name, column.name] = impl.bind_processor(dialect)
        self._touch: dict[tuple[str, ...], str] = {}

    def touch(self, columns: tuple[str, ...]) -> str:
        sql = self._touch.get(columns)
        if sql is None:
            quote = self.quote
            sets = ", ".join(f"{quote(c)} = ?" for c in columns)
            sql = f"UPDATE {self.series_table} SET {sets} WHERE {quote('id')} = ? RETURNING {quote('id')}"
            self._touch[columns] = sql
        return sql

    def bind(self, table: str, column: str, value: Any) -> Any:
        processor = self.processors[table, column]
        return value if processor is None or value is None else processor(value)


_SQLITE_SQL: weakref.WeakKeyDictionary[Dialect, _SqliteSql] = weakref.WeakKeyDictionary()


class SqliteStatements:
    """:class:`IngestStatements` on the SQLite DB-API cursor of ``conn`` (see the module docstring)."""

    def __init__(self, conn: Connection) -> None:
        dialect = conn.dialect
        sql = _SQLITE_SQL.get(dialect)
        if sql is None:
            sql = _SQLITE_SQL[dialect] = _SqliteSql(dialect)
        self.sql = sql
        dbapi = conn.connection.dbapi_connection
        assert dbapi is not None
        self.cursor = dbapi.cursor()

    def versions(self, sop_uid: str) -> list[StoredVersion]:
        self.cursor.execute(self.sql.versions, (sop_uid,))
        return [StoredVersion(*row) for row in self.cursor.fetchall()]

    def insert_instance(self, values: Mapping[str, Any]) -> None:
        bind, table = self.sql.bind, _INSTANCES.name
        self.cursor.execute(self.sql.insert, [bind(table, name, values[name])
                                              for name in self.sql.insert_columns])

    def touch_series(self, pk: int, values: Mapping[str, Any]) -> int | None:
        columns = tuple(values)
        bind, table = self.sql.bind, _SERIES.name
        self.cursor.execute(self.sql.touch(columns), [*(bind(table, c, values[c]) for c in columns), pk])
        rows = self.cursor.fetchall()
        return int(rows[0][0]) if rows else None


def touch_series(conn: Connection, values: dict[str, Any], *, pk: int | None = None,
                 series_uid: str = "") -> int | None:
    """Set ``values`` on a series (by ``pk`` or ``series_uid``); its primary key, None if absent."""
    if pk is not None:
        result = conn.execute(TOUCH_SERIES_BY_PK, {"b_pk": pk, **values})
    else:
        result = conn.execute(TOUCH_SERIES_BY_UID, {"b_uid": series_uid, **values})
    found = result.scalar_one_or_none()
    return None if found is None else int(found)
