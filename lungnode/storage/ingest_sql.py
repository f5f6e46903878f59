"""Prebuilt SQLAlchemy Core statements of the ingest hot path (one C-STORE = a few of these).

:meth:`lungnode.storage.catalog.Catalog.commit_batch` runs several statements per received
instance. Built once here and executed on the session's connection with plain parameter dicts,
they skip the ORM's per-statement work (``.values()`` coercion, ORM bulk-persistence context,
cache-key generation over every value): profiled, that was most of the ~5 ms the writer thread
spent per instance. Same SQL, same transaction, same rows as the ORM forms.
"""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import Table, bindparam, insert, select, update
from sqlalchemy.engine import Connection

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


def versions(conn: Connection, sop_uid: str) -> list[Any]:
    """Rows (id, version, sha256, path) of the stored versions of ``sop_uid``."""
    return list(conn.execute(SELECT_VERSIONS, {"b_sop": sop_uid}).all())


def touch_series(conn: Connection, values: dict[str, Any], *, pk: int | None = None,
                 series_uid: str = "") -> int | None:
    """Set ``values`` on a series (by ``pk`` or ``series_uid``); its primary key, None if absent."""
    if pk is not None:
        result = conn.execute(TOUCH_SERIES_BY_PK, {"b_pk": pk, **values})
    else:
        result = conn.execute(TOUCH_SERIES_BY_UID, {"b_uid": series_uid, **values})
    found = result.scalar_one_or_none()
    return None if found is None else int(found)
