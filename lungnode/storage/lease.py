"""Claiming a due row with a lease: the conditional UPDATE shared by deliveries and notifications.

A sender picks candidate ids (its own query: what is due, in which order), then leases the first
that is still ``pending`` and unleased with one conditional UPDATE per candidate; only one
process can win a row, on SQLite and PostgreSQL alike. The lease is given up when the attempt is
recorded, or expires if the sender dies, and the row is claimed again.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

from sqlalchemy import ColumnElement, or_, update

from lungnode.storage.db import Database
from lungnode.storage.models import LeasedSend


def lease_free(table: type[LeasedSend], now: dt.datetime) -> ColumnElement[bool]:
    """The condition "no live lease" on ``table`` at ``now``."""
    return or_(table.lease_expires_at.is_(None), table.lease_expires_at < now)


def take_lease(db: Database, table: type[LeasedSend], candidates: Iterable[int], owner: str,
               until: dt.datetime, now: dt.datetime) -> int | None:
    """Lease the first of ``candidates`` that is still pending and free; return its id or ``None``.

    Parameters
    ----------
    db:
        The database (one short transaction per candidate).
    table:
        The mapped class (:class:`~lungnode.storage.models.Delivery`, ``Notification``).
    candidates:
        Row ids in the order to try.
    owner:
        The lease owner written to ``lease_owner``.
    until:
        When the lease expires unless renewed.
    now:
        The time the candidates were chosen at (a lease that expired before it is free).
    """
    for candidate in candidates:
        with db.session() as s:
            res = s.execute(update(table).where(
                table.id == candidate, table.state == "pending", lease_free(table, now)).values(
                lease_owner=owner, lease_expires_at=until))
            if getattr(res, "rowcount", 0) == 1:
                return candidate
    return None
