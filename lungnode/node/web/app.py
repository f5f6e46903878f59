"""Routing of the status pages inside the metrics HTTP server (:mod:`lungnode.ops.server`).

:class:`WebPages` answers ``GET`` and ``POST`` requests for every path except ``/metrics`` and
``/healthz`` with a :class:`~lungnode.ops.server.Response`; the server only writes it out.
:func:`make_service` is the ``DEFAULT_SERVICES`` entry of ``lungnode run``: the metrics endpoint
with these pages.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from urllib.parse import parse_qs, unquote

from lungnode.config import Config
from lungnode.node.dispatch.explain import explain_lines
from lungnode.node.web import actions, data, pages, picture
from lungnode.node.web.render import esc, page
from lungnode.ops import health, server
from lungnode.ops.health import HealthReport
from lungnode.ops.server import Response
from lungnode.storage.db import Database
from lungnode.storage.filestore import FileStore

log = logging.getLogger(__name__)

HTML = "text/html; charset=utf-8"
_JOB = re.compile(r"/jobs/(\d{1,12})")
_PICTURE = re.compile(r"/jobs/(\d{1,12})/picture\.png")
_ACTION = re.compile(r"/jobs/(\d{1,12})/action")
_SERIES = re.compile(r"/series/([0-9.]{1,64})")


class WebPages:
    """The status pages of one node.

    Parameters
    ----------
    config, db, store:
        The node's configuration, database and file store.
    health:
        Runs the health checks (the same as ``/healthz``).
    """

    def __init__(self, config: Config, db: Database, store: FileStore,
                 health: Callable[[], HealthReport]) -> None:
        self.config = config
        self.web = config.web
        self.db = db
        self.store = store
        self.health = health

    def _html(self, title: str, body: str, status: int = 200, refresh: bool = True) -> Response:
        return Response(status, page(title, body, self.web.refresh_s if refresh else 0), HTML)

    def _not_found(self, what: str) -> Response:
        return self._html("not found", f"<h1>Not found</h1><p>{esc(what)}</p>", 404, refresh=False)

    def get(self, path: str) -> Response:
        """Answer a GET for ``path`` (query string removed)."""
        path = unquote(path)
        if path == "/":
            report = self.health()
            with self.db.session() as s:
                body = pages.overview(s, report, self.store.root, self.web.show_patient_data,
                                      {d.name: f"{d.kind} {d.target}" for d in self.config.destinations})
            return self._html("lungnode", body)
        if m := _PICTURE.fullmatch(path):
            try:
                png = picture.job_picture(self.db, self.store, int(m.group(1)))
            except picture.NoPictureError as exc:
                return Response(404, f"{exc}\n".encode(), "text/plain; charset=utf-8")
            return Response(200, png, "image/png", {"Cache-Control": "max-age=86400"})
        if m := _JOB.fullmatch(path):
            with self.db.session() as s:
                detail = data.job_detail(s, int(m.group(1)), self.web.show_patient_data)
            if detail is None:
                return self._not_found(f"no job {m.group(1)}")
            body = pages.job_page(detail, self.web.actions, self.web.show_patient_data)
            return self._html(f"job {m.group(1)}", body)
        if m := _SERIES.fullmatch(path):
            uid = m.group(1)
            explain = explain_lines(self.db, self.config, uid, verbose=True)
            with self.db.session() as s:
                body_or_none = pages.series_page(s, uid, explain)
            if body_or_none is None:
                return self._not_found(f"series {uid} is not stored")
            return self._html(f"series {uid}", body_or_none)
        return self._not_found(path)

    def post(self, path: str, form: bytes, client: str) -> Response:
        """Answer a POST (only ``/jobs/N/action``)."""
        m = _ACTION.fullmatch(path)
        if m is None:
            return self._not_found(path)
        job_pk = int(m.group(1))
        fields = parse_qs(form.decode("utf-8", "replace"), max_num_fields=10)
        action = (fields.get("action") or [""])[0]
        token = (fields.get("token") or [""])[0]
        back = f'<p><a href="/jobs/{job_pk}">back to job {job_pk}</a></p>'
        try:
            message = actions.perform(self.db, self.config, action, job_pk, token, client)
        except actions.ActionRefusedError as exc:
            log.warning("web: %s refused from %s: %s", action, client, exc)
            return self._html("refused", f"<h1>Refused</h1><p>{esc(exc)}</p>{back}", 403, refresh=False)
        except (KeyError, LookupError, ValueError) as exc:
            return self._html("not done", f"<h1>Not done</h1><p>{esc(str(exc).strip(chr(39)))}</p>{back}",
                              409, refresh=False)
        log.info("web: %s on job %d from %s", action, job_pk, client)
        return self._html("done", f"<h1>Done</h1><p>{esc(message)}</p>{back}", 200, refresh=False)


def make_service(config: Config, db: Database, store: FileStore) -> server.MetricsService:
    """``DEFAULT_SERVICES`` entry of ``lungnode run``: ``/metrics``, ``/healthz`` and, with
    ``[web] enabled``, the status pages, on ``[metrics] bind:port``."""
    service = server.make_service(config, db, store)
    if config.web.enabled:
        checks = service.checks
        service.web = WebPages(config, db, store, lambda: health.run_checks(checks))
    return service
