"""Operator actions from the web page: release, retry, resend, reprocess, each audited.

Allowed only with ``[web] actions = true``. Every request carries a token; ``[web] token_file``
holds one ``NAME:TOKEN`` per line (``#`` comments allowed) and is read at each request, so tokens
can be changed without a restart. The matching ``NAME`` and the client's address are recorded in
the audit trail (event ``web_action``) with the action, the job and the outcome, also when the
action is refused.
"""

from __future__ import annotations

import hmac
from pathlib import Path

from lungnode.config import Config
from lungnode.storage.audit import record_event
from lungnode.storage.db import Database
from lungnode.storage.models import Job

ACTIONS = ("release", "retry", "resend", "reprocess")


class ActionRefusedError(PermissionError):
    """Actions are off, or the token is unknown."""


def token_owner(token_file: str, token: str) -> str | None:
    """The name of the token in ``token_file`` equal to ``token`` (constant-time compare), or None."""
    if not token_file or not token:
        return None
    try:
        lines = Path(token_file).read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    owner = None
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, secret = line.partition(":")
        name, secret = (name.strip(), secret.strip()) if sep else ("operator", name.strip())
        if secret and hmac.compare_digest(secret.encode(), token.encode()):
            owner = name
    return owner


def _run(db: Database, config: Config, action: str, job_pk: int) -> str:
    from lungnode.node.dispatch import jobs
    from lungnode.node.results import delivery

    if action == "release":
        queued = delivery.release(db, config, job_pk)
        return f"job {job_pk} released; queued for {', '.join(queued) or 'no destination'}"
    if action == "retry":
        job = jobs.retry_job(db, job_pk)
        return f"job {job.id} queued again"
    if action == "resend":
        queued = delivery.resend(db, config, job_pk)
        return f"job {job_pk}: queued again for {', '.join(queued) or 'no destination'}"
    with db.session() as s:
        row = s.get(Job, job_pk)
        if row is None:
            raise KeyError(f"no job {job_pk}")
        series_uid = row.series_uid
    result = jobs.reprocess(db, config, series_uid)
    return f"job {result.job_pk} queued for the series of job {job_pk}"


def perform(db: Database, config: Config, action: str, job_pk: int, token: str, client: str) -> str:
    """Check the token, do ``action`` on job ``job_pk`` and audit it.

    Returns
    -------
    str
        What was done, for the page.

    Raises
    ------
    ActionRefusedError
        Actions are off or the token is not in the token file (audited too).
    ValueError, KeyError, LookupError
        The action does not apply to the job (audited with the reason).
    """
    who = token_owner(config.web.token_file, token) if config.web.actions else None
    outcome, message = "refused", "actions are off" if not config.web.actions else "unknown token"
    try:
        if action not in ACTIONS:
            outcome, message = "refused", f"unknown action {action!r}"
            raise ValueError(message)
        if who is None:
            raise ActionRefusedError(message)
        try:
            message = _run(db, config, action, job_pk)
            outcome = "done"
        except (KeyError, LookupError, ValueError) as exc:
            outcome, message = "failed", str(exc).strip("'\"")
            raise
        return message
    finally:
        with db.session() as s:
            record_event(s, "web_action", peer=client, job_pk=job_pk, action=action,
                         who=who or "", outcome=outcome, message=message[:300])
