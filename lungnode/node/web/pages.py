"""The three pages (overview, series, job) assembled from :mod:`.data` with :mod:`.render`."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from lungnode.node.web import data
from lungnode.node.web.render import (
    esc,
    fmt_bytes,
    json_block,
    link_job,
    link_series,
    state,
    table,
)
from lungnode.ops.health import HealthReport


def _patient_cells(row: dict[str, Any], show: bool) -> list[str]:
    return [esc(row.get("patient_name")), esc(row.get("patient_id"))] if show else []


def _deliveries_table(rows: list[dict[str, Any]], with_job: bool) -> str:
    headers = (["job"] if with_job else []) + ["destination", "state", "attempts", "acknowledged",
                                               "next attempt", "delivered", "last error"]
    return table(headers, [([link_job(d["job_pk"])] if with_job else []) + [
        esc(d["destination"]), state(d["state"]), esc(d["attempts"]), esc(d["acknowledged"]),
        esc(d["next_attempt_at"]) if d["state"] == "pending" else "", esc(d["delivered_at"]),
        esc(d["last_error"][:300])] for d in rows])


def _notifications_table(rows: list[dict[str, Any]], with_job: bool) -> str:
    headers = (["job"] if with_job else []) + ["receiver", "event", "state", "attempts",
                                               "HTTP status", "made", "sent", "last error"]
    return table(headers, [([link_job(n["job_pk"])] if with_job else []) + [
        esc(n["name"]), esc(n["event"]), state(n["state"]), esc(n["attempts"]), esc(n["response"]),
        esc(n["created_at"]), esc(n["sent_at"]), esc(n["last_error"][:300])] for n in rows])


def _shadow_table(rows: list[dict[str, Any]], targets: dict[str, str]) -> str:
    return table(["job", "destination", "would have gone to", "objects", "recorded (UTC)"], [
        [link_job(d["job_pk"]), esc(d["destination"]), esc(targets.get(d["destination"], "?")),
         esc(d["objects"]), esc(d["delivered_at"])] for d in rows])


def overview(session: Any, report: HealthReport, storage_root: Path, show_patient_data: bool,
             targets: dict[str, str]) -> str:
    """Body of ``/`` (``targets``: destination name → where it sends, for the shadow table)."""
    counts = data.counts(session)
    rates = data.rates(session)
    try:
        disk = shutil.disk_usage(storage_root)
        disk_text = f"{fmt_bytes(disk.free)} free of {fmt_bytes(disk.total)}"
    except OSError as exc:
        disk_text = f"storage root unusable: {exc.strerror}"
    health = "".join(
        f'<span class="card">{esc(c.name)}: <span class="{"ok" if c.ok else "bad"}">'
        f'{"ok" if c.ok else "FAIL"}</span> <span class="muted">{esc(c.detail)}</span></span>'
        for c in report.checks)
    queue = "".join(
        f'<span class="card">{esc(kind)}: '
        + (", ".join(f"{state(k)} {v}" for k, v in sorted(by_state.items())) or "none") + "</span>"
        for kind, by_state in counts.items())
    rate = "".join(f'<span class="card">{esc(k.replace("_", " "))}: {v}</span>' for k, v in rates.items())
    series_rows = []
    for r in data.last_series(session, show_patient_data):
        decision = f"{state(r['decision'])} <span class=\"muted\">({esc(r['decision_rule'])})</span>" \
            if r["decision"] else state(r["state"])
        series_rows.append([
            esc(r["received_at"]), esc(r["study_date"]), esc(r["accession_number"]),
            *_patient_cells(r, show_patient_data),
            link_series(r["series_uid"], r["description"] or "(no description)"),
            esc(r["modality"]), f'<span class="num">{r["instances"]}</span>', decision,
            f"{link_job(r['job_pk'])} {state(r['job_state'])}" if r["job_pk"] else "",
            esc(r["percent"]) if r["percent"] is not None else "", esc(r["score"])])
    patient_headers = ["patient", "patient ID"] if show_patient_data else []
    held = table(["job", "series", "since", "reason"], [
        [link_job(j["job_pk"]), link_series(j["series_uid"]), esc(j["finished_at"]), esc(j["reason"])]
        for j in data.held_jobs(session)])
    failed = table(["job", "series", "since", "reason"], [
        [link_job(j["job_pk"]), link_series(j["series_uid"]), esc(j["finished_at"]),
         esc(j["reason"][:300])] for j in data.failed_jobs(session)])
    return (
        "<h1>lungnode</h1>"
        f"<h2>Health</h2><p>{health}</p><p>disk: {esc(disk_text)}</p>"
        f"<h2>Queues</h2><p>{queue}</p><p>{rate}</p>"
        f"<h2>Last {data.LAST_SERIES} series</h2>"
        + table(["received (UTC)", "study date", "accession", *patient_headers, "series", "modality",
                 "instances", "decision (rule)", "job", "infiltrate %", "score"], series_rows,
                "no series received yet")
        + f"<h2>Held jobs</h2>{held}<h2>Failed jobs</h2>{failed}"
        + "<h2>Failing and dead-letter deliveries</h2>"
        + _deliveries_table(data.troubled_deliveries(session), with_job=True)
        + "<h2>Shadow destinations: what would have been sent</h2>"
        + _shadow_table(data.shadow_deliveries(session), targets)
        + "<h2>Failing and dead notifications</h2>"
        + _notifications_table(data.troubled_notifications(session), with_job=True))


def series_page(session: Any, series_uid: str, explain: list[str] | None) -> str | None:
    """Body of ``/series/UID``; ``None`` when the series is not stored."""
    if explain is None:
        return None
    jobs = table(["job", "state", "attempts", "queued", "infiltrate %", "score", "reason"], [
        [link_job(j["job_pk"]), state(j["state"]), esc(j["attempts"]), esc(j["created_at"]),
         esc(j["percent"]), esc(j["score"]), esc(j["reason"][:300])]
        for j in data.series_jobs(session, series_uid)], "no job (excluded, or not complete yet)")
    return (f"<h1>Series <code>{esc(series_uid)}</code></h1>"
            f"<h2>Selection (lungnode explain)</h2><pre>{esc(chr(10).join(explain))}</pre>"
            f"<h2>Jobs</h2>{jobs}")


def _measurements(m: dict[str, Any]) -> str:
    rows = []
    for side in ("right", "left", "both"):
        region = m.get(side)
        if isinstance(region, dict):
            rows.append([esc(side), esc(region.get("lung_ml")), esc(region.get("infiltrate_ml")),
                         esc(region.get("percent_involved"))])
    main = table(["lung", "lung mL", "infiltrate mL", "% involved"], rows, "not measured")
    return main + "<details><summary>all values</summary>" + json_block(m) + "</details>"


def _actions(job: dict[str, Any], enabled: bool) -> str:
    if not enabled:
        return '<p class="muted">actions are off ([web] actions = false)</p>'
    possible = {"held": ("release",), "failed": ("retry",), "done": ("resend", "reprocess")}
    choices = list(possible.get(job["state"], ())) + (
        ["reprocess"] if job["state"] in ("held", "failed") else [])
    if not choices:
        return '<p class="muted">no action for a job in this state</p>'
    forms = "".join(
        f'<form method="post" action="/jobs/{int(job["id"])}/action">'
        f'<input type="hidden" name="action" value="{esc(a)}">'
        f'<input type="password" name="token" placeholder="token" required autocomplete="off">'
        f'<button type="submit">{esc(a)}</button></form>' for a in choices)
    return f"<p>{forms}</p>"


def job_page(detail: dict[str, Any], actions_enabled: bool, show_patient_data: bool) -> str:
    """Body of ``/jobs/N``."""
    job, series = detail["job"], detail["series"]
    facts = [("state", state(job["state"])), ("reason", esc(job["reason"])),
             ("series", link_series(job["series_uid"], series.get("description") or job["series_uid"])),
             ("series UID", f"<code>{esc(job['series_uid'])}</code>"),
             ("study UID", f"<code>{esc(job['study_uid'])}</code>"),
             ("study date", esc(series.get("study_date"))),
             ("accession number", esc(series.get("accession_number"))),
             ("decision (rule)", f"{esc(series.get('decision'))} ({esc(series.get('decision_rule'))})"),
             ("instances", esc(job["instances"])), ("model", esc(job["model"])),
             ("attempts", esc(job["attempts"])), ("queued", esc(job["created_at"])),
             ("started", esc(job["started_at"])), ("finished", esc(job["finished_at"])),
             ("supersedes job", link_job(job["supersedes"])),
             ("newer jobs of the series", " ".join(link_job(j) for j in detail["newer_jobs"])),
             ("score", esc(detail["score"]))]
    if show_patient_data:
        facts[3:3] = [("patient", esc(series.get("patient_name"))),
                      ("patient ID", esc(series.get("patient_id")))]
    picture = (f'<p><img src="/jobs/{int(job["id"])}/picture.png" alt="key slices of job '
               f'{int(job["id"])} with lung and infiltrate outlines" style="max-width:100%"></p>'
               if job["state"] in ("done", "held") else '<p class="muted">no result picture</p>')
    audit = table(["at (UTC)", "event", "AE / who", "details"], [
        [esc(e["at"]), esc(e["event"]), esc(" ".join(x for x in (e["ae_title"], e["peer"]) if x)),
         esc(", ".join(f"{k}={v}" for k, v in sorted(e["details"].items())))[:600]]
        for e in detail["audit"]])
    outputs = table(["kind", "built for", "status there", "SOP Instance UID", "series UID"], [
        [esc(o["kind"]), esc(o["destination"]), state(o["status"]),
         f"<code>{esc(o['sop_instance_uid'])}</code>", f"<code>{esc(o['series_uid'])}</code>"]
        for o in detail["outputs"]])
    return (f"<h1>Job {int(job['id'])} {state(job['state'])}</h1>"
            + table((), [[esc(k), v] for k, v in facts])
            + f"<h2>Actions</h2>{_actions(job, actions_enabled)}"
            + f"<h2>Result</h2>{picture}<h2>Measurements</h2>{_measurements(detail['measurements'])}"
            + "<h2>Deliveries</h2>" + _deliveries_table(detail["deliveries"], with_job=False)
            + "<h2>Notifications</h2>" + _notifications_table(detail["notifications"], with_job=False)
            + f"<h2>Outputs</h2>{outputs}<h2>History (audit trail)</h2>{audit}")
