"""Result subcommands: ``check-destination``, ``resend``, ``release`` and offline ``infer``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from sqlalchemy import select

from lungnode.config import Config

EXIT_FAIL = 1


def _open(config: Config) -> tuple[Any, Any]:
    from lungnode.storage.db import Database
    from lungnode.storage.filestore import FileStore

    return (Database(config.storage.effective_database_url),
            FileStore(config.storage.root_path, fsync=config.storage.fsync))


def _check_destination(args: argparse.Namespace, config: Config) -> int:
    from lungnode.node.dimse.scu import SOP_NAMES, TS_NAMES, check_destination
    from lungnode.uids import (
        COMPREHENSIVE_SR_STORAGE,
        ENCAPSULATED_PDF_STORAGE,
        SECONDARY_CAPTURE_STORAGE,
        SEGMENTATION_STORAGE,
    )

    try:
        dest = config.destination(args.name)
    except KeyError:
        print(f"no destination named {args.name!r} (configured: "
              f"{', '.join(d.name for d in config.destinations) or 'none'})", file=sys.stderr)
        return EXIT_FAIL
    shadow = " (shadow mode: results are recorded, never sent)" if dest.mode == "shadow" else ""
    if dest.kind == "stow-rs":
        from lungnode.node.results.stowrs import check_stow

        stow = check_stow(dest, timeout=config.delivery.timeout_s)
        print(f"destination {dest.name}: STOW-RS {dest.url} (auth {dest.auth}){shadow}")
        print(f"  {'OK' if stow.ok else 'FAILED'}: {stow.detail}")
        return 0 if stow.ok else EXIT_FAIL
    report = check_destination(dest, timeout=config.delivery.timeout_s)
    print(f"destination {dest.name}: {dest.ae_title}@{dest.host}:{dest.port}"
          f"{' (TLS)' if dest.tls.cert or dest.tls.ca else ''}{shadow}")
    if report.error:
        print(f"  FAILED: {report.error}")
        return EXIT_FAIL
    echo = "OK" if report.echo_status == 0 else f"status {report.echo_status}"
    print(f"  C-ECHO: {echo}")
    for label, pairs in (("accepted", report.accepted), ("rejected", report.rejected)):
        for sop, ts in pairs:
            print(f"  {label:8s} {SOP_NAMES.get(sop, sop)} in {TS_NAMES.get(ts, ts)}")
    needed = {"seg": SEGMENTATION_STORAGE, "sr": COMPREHENSIVE_SR_STORAGE, "sc": SECONDARY_CAPTURE_STORAGE,
              "summary": SECONDARY_CAPTURE_STORAGE, "pdf": ENCAPSULATED_PDF_STORAGE}
    accepted = {sop for sop, _ in report.accepted}
    missing = [obj for obj in dest.objects if needed[obj] not in accepted]
    if missing:
        print(f"  this destination is configured for {', '.join(missing)} but refuses it")
        return EXIT_FAIL
    return 0 if report.echo_status == 0 else EXIT_FAIL


def _send_now(config: Config, db: Any, store: Any, job_pk: int, names: list[str]) -> int:
    from lungnode.node.results.delivery import DeliverySender
    from lungnode.storage.models import Delivery

    sender = DeliverySender(config, db, store)
    status = 0
    with db.session() as s:
        ids = [(d.id, d.destination) for d in s.scalars(
            select(Delivery).where(Delivery.job_pk == job_pk, Delivery.destination.in_(names)))]
    for delivery_id, name in ids:
        if sender.claim(delivery_id) is not None:
            state = sender.send(delivery_id)
            print(f"  {name}: {state}")
        else:  # a running node's delivery service took it first: wait for its outcome
            state = _wait_for_other_sender(db, delivery_id, 2 * config.delivery.timeout_s + 30)
            print(f"  {name}: {state} (by the running node)")
        status = status if state in ("sent", "shadow") else EXIT_FAIL
    return status


def _wait_for_other_sender(db: Any, delivery_id: int, timeout: float) -> str:
    import time

    from lungnode.storage.models import Delivery

    deadline = time.monotonic() + timeout
    state = "pending"
    while time.monotonic() < deadline:
        with db.session() as s:
            d = s.get(Delivery, delivery_id)
            state = d.state if d is not None else "gone"
            retrying = d is not None and d.attempts > 0 and not d.lease_owner
        if state != "pending" or retrying:
            return state if state != "pending" else "pending (retry scheduled)"
        time.sleep(0.2)
    return state


def _resend(args: argparse.Namespace, config: Config) -> int:
    from lungnode.node.results.delivery import resend

    db, store = _open(config)
    try:
        queued = resend(db, config, args.job, args.destination)
    except (KeyError, ValueError) as exc:
        print(f"cannot resend: {exc}", file=sys.stderr)
        return EXIT_FAIL
    print(f"job {args.job}: queued again for {', '.join(queued) or 'no destination'}")
    return _send_now(config, db, store, args.job, queued) if args.now else 0


def _release(args: argparse.Namespace, config: Config) -> int:
    from lungnode.node.results.delivery import release

    db, store = _open(config)
    try:
        queued = release(db, config, args.job)
    except (KeyError, ValueError) as exc:
        print(f"cannot release: {exc}", file=sys.stderr)
        return EXIT_FAIL
    print(f"job {args.job} released; queued for {', '.join(queued) or 'no destination'}")
    return _send_now(config, db, store, args.job, queued) if args.now else 0


def _infer(args: argparse.Namespace, config: Config) -> int:
    from lungnode.inference.comparison import impression
    from lungnode.inference.dicom_io import SeriesError
    from lungnode.inference.engine import infer_folder
    from lungnode.inference.geometry import GeometryError
    from lungnode.inference.report import lobe_labels_for, severity_for
    from lungnode.node.dispatch.pipeline import engine_from_config, output_context, report_options
    from lungnode.node.dispatch.quality import check_quality
    from lungnode.node.results.build import Profile, build_outputs
    from lungnode.node.results.seg import SegOptions

    if args.destination:
        profile = Profile.from_destination(config.destination(args.destination))
    else:
        objects = tuple(o.strip() for o in args.objects.split(",") if o.strip())
        profile = Profile(objects=objects, seg=SegOptions())
    if args.model:
        config = dataclasses.replace(config, inference=dataclasses.replace(config.inference,
                                                                           model=args.model))
    engine = engine_from_config(config)
    try:
        result = infer_folder(Path(args.input_dir), engine, args.series)
    except (SeriesError, GeometryError) as exc:
        print(f"cannot process {args.input_dir}: {getattr(exc, 'reason', exc)}", file=sys.stderr)
        return EXIT_FAIL
    options = report_options(config)
    report = severity_for(result, options, lobe_labels_for(engine, result, options))
    # offline: no database of earlier results, so no comparison (and the report says nothing)
    outputs = build_outputs(result, output_context(config, 0, result), profile, report=report)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counters: dict[str, int] = {}
    for out in outputs:
        counters[out.kind] = counters.get(out.kind, 0) + 1
        (out_dir / f"{out.kind}-{counters[out.kind]:04d}.dcm").write_bytes(out.data)
    gate = check_quality(result.measurements, config.results.quality_gate)
    m = result.measurements
    print(json.dumps({
        "written": counters, "output_dir": str(out_dir),
        "lung_ml": {"left": round(m.left.lung_ml, 1), "right": round(m.right.lung_ml, 1),
                    "both": round(m.both.lung_ml, 1)},
        "infiltrate_ml": round(m.both.infiltrate_ml, 1),
        "percent_involved": {"left": round(m.left.percent_involved, 2),
                             "right": round(m.right.percent_involved, 2),
                             "both": round(m.both.percent_involved, 2)},
        "severity": {"score": f"{report.total_score}/{report.max_score}",
                     "scheme": report.scheme.name, "regions": report.region_kind,
                     "rule": report.rule, "po": round(report.both.po, 2),
                     "pho": round(report.both.pho, 2),
                     "po_by_region": {r.key: round(r.po, 2) for r in report.regions}},
        "impression": impression(report),
        "quality_gate": "passed" if gate.passed else f"would hold: {gate.reason}",
        "seconds": {k: round(v, 2) for k, v in result.seconds.items()}}, indent=2))
    return 0


def register(subparsers: Any) -> None:
    """Add this module's subcommands."""
    p = subparsers.add_parser("check-destination",
                              help="C-ECHO a DICOM destination and show which SEG/SR/SC contexts it "
                                   "accepts; ask a STOW-RS destination over QIDO-RS")
    p.add_argument("name", help="destination name from [[destinations]]")
    p.set_defaults(func=_check_destination)
    p = subparsers.add_parser("resend", help="send a job's stored results again (same UIDs)")
    p.add_argument("job", type=int)
    p.add_argument("--destination", default=None, help="only this destination")
    p.add_argument("--now", action="store_true", help="send in the foreground instead of queueing")
    p.set_defaults(func=_resend)
    p = subparsers.add_parser("release", help="send a result held by the quality gate")
    p.add_argument("job", type=int)
    p.add_argument("--now", action="store_true", help="send in the foreground instead of queueing")
    p.set_defaults(func=_release)
    p = subparsers.add_parser("infer", help="offline: segment one series folder, write SEG/SR/SC, "
                                            "the summary page and its PDF")
    p.add_argument("input_dir")
    p.add_argument("output_dir")
    p.add_argument("--series", default=None, help="SeriesInstanceUID when the folder holds several")
    p.add_argument("--objects", default="seg,sr,summary",
                   help="comma list of seg, sr, sc, summary, pdf (default seg,sr,summary)")
    p.add_argument("--destination", default=None, help="write what this destination would get")
    p.add_argument("--model", default=None, help="model bundle (default: [inference] model)")
    p.set_defaults(func=_infer)
