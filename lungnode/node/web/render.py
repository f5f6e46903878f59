"""HTML of the status pages: escaped text, tables, a meta refresh and inline CSS (no JavaScript).

Every value put into a page goes through :func:`esc`; links only carry UIDs and numbers.
"""

from __future__ import annotations

import datetime as dt
import html
import json
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import quote

CSS = """
body{font-family:system-ui,sans-serif;margin:1.2em;color:#222;background:#fafafa}
h1{font-size:1.4em;margin:0 0 .4em} h2{font-size:1.1em;margin:1.2em 0 .4em}
table{border-collapse:collapse;font-size:.85em;background:#fff}
th,td{border:1px solid #ccc;padding:2px 6px;text-align:left;vertical-align:top}
th{background:#eee} td.num{text-align:right} code{font-size:.9em}
.ok{color:#176a17;font-weight:600} .bad{color:#b00020;font-weight:600} .warn{color:#a15c00}
.muted{color:#777} nav a{margin-right:1em} pre{background:#fff;border:1px solid #ccc;padding:.5em;
overflow-x:auto;font-size:.85em} form{display:inline-block;margin:0 .5em .5em 0}
.card{display:inline-block;border:1px solid #ccc;background:#fff;padding:.4em .8em;margin:0 .5em .5em 0}
"""

STATE_CLASS = {"done": "ok", "sent": "ok", "include": "ok", "held": "warn", "pending": "warn",
               "queued": "warn", "running": "warn", "shadow": "muted", "failed": "bad", "dead": "bad",
               "exclude": "muted", "superseded": "muted", "cancelled": "muted",
               "acknowledged": "ok", "recorded (shadow)": "muted"}


def esc(value: Any) -> str:
    """Text for HTML (None → empty; datetimes as UTC without microseconds)."""
    if value is None:
        return ""
    if isinstance(value, dt.datetime):
        return html.escape(value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S"))
    if isinstance(value, float):
        return html.escape(f"{value:.2f}")
    return html.escape(str(value))


def state(value: str) -> str:
    """A state word coloured by what it means."""
    return f'<span class="{STATE_CLASS.get(value, "")}">{esc(value)}</span>'


def link_job(job_pk: int | None) -> str:
    """Link to a job page."""
    return "" if job_pk is None else f'<a href="/jobs/{int(job_pk)}">{int(job_pk)}</a>'


def link_series(uid: str, text: str | None = None) -> str:
    """Link to a series page."""
    return f'<a href="/series/{quote(uid, safe="")}">{esc(text if text is not None else uid)}</a>'


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], empty: str = "none") -> str:
    """A table of already-escaped cells (``headers`` are escaped here; none: no header row)."""
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    if not body:
        return f'<p class="muted">{esc(empty)}</p>'
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    return f"<table>{f'<tr>{head}</tr>' if head else ''}{body}</table>"


def page(title: str, body: str, refresh_s: int = 0) -> bytes:
    """A whole HTML document."""
    meta = f'<meta http-equiv="refresh" content="{int(refresh_s)}">' if refresh_s > 0 else ""
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    doc = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">{meta}'
           f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
           f'<nav><a href="/">overview</a><a href="/healthz">/healthz</a><a href="/metrics">/metrics</a>'
           f'<span class="muted">{esc(now)}</span></nav>{body}</body></html>')
    return doc.encode("utf-8")


def json_block(value: Any) -> str:
    """A value as indented JSON in a ``<pre>``."""
    return f"<pre>{esc(json.dumps(value, indent=1, sort_keys=True, default=str))}</pre>"


def fmt_bytes(n: int) -> str:
    """Bytes in GiB with one decimal."""
    return f"{n / 2**30:.1f} GiB"
