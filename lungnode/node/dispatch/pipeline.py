"""The job processor: one claimed job → inference → quality gate → stored outputs → deliveries.

:func:`process_job` is what the worker calls for a claimed job. Steps:

1. Read the job and the current instances of its series (paths in the file store).
2. Run the inference engine (``ctx.engine``). Unreadable or geometrically invalid series are a
   :class:`PermanentJobError`; anything else propagates and is retried by the worker.
3. Score the regions (:func:`~lungnode.inference.report.severity_for`, ``[report]``), look up
   the prior exam (:mod:`.priors`, ``[priors]``), then build the outputs once per destination
   (SEG, SR, SC, summary page, PDF per its settings; with no destination configured, SEG + SR +
   summary under the destination name ``""`` so results exist locally), write
   them durably and record :class:`~lungnode.storage.models.Output` rows. A retried job reuses
   outputs already recorded for a destination, so SOP Instance UIDs never change.
4. Quality gate: a failing result returns ``held`` with its reason (outputs kept, nothing queued;
   ``lungnode release JOB`` queues it). A passing one queues a ``pending`` delivery per destination
   and returns ``done``. Deliveries are sent only once the job's state is ``done`` (the worker sets
   it from the returned outcome).

Superseding (late instances): when ``Job.supersedes_job_pk`` is set, the new SR lists the old
job's SR for the same destination in Predecessor Documents Sequence, new SEG/SR/SC are new
series whose description ends in "(replaces earlier)", and the old job's deliveries that have
not sent a single instance yet are ``cancelled`` (a PACS cannot be told over DIMSE to delete the
old SEG; viewers show both, the SR chain says which is current).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import select

from lungnode.config import Config
from lungnode.inference.comparison import Comparison, report_to_dict
from lungnode.inference.report import ReportOptions, lobe_labels_for, severity_for
from lungnode.inference.severity import SeverityReport
from lungnode.inference.types import InferenceResult
from lungnode.node.dispatch.outcome import JobOutcome, PermanentJobError
from lungnode.node.dispatch.priors import find_comparison
from lungnode.node.dispatch.quality import GateDecision, check_quality
from lungnode.node.results.build import BuiltOutput, Profile, build_outputs, profiles_for
from lungnode.node.results.common import NOT_FOR_CLINICAL_USE, OutputContext, SourceSeries
from lungnode.node.results.delivery import queue_deliveries
from lungnode.ops import metrics
from lungnode.storage.db import Database
from lungnode.storage.filestore import FileStore
from lungnode.storage.models import Delivery, Instance, Job, Output, Series

log = logging.getLogger(__name__)


class Engine(Protocol):
    """What the pipeline needs from an engine (:class:`~lungnode.inference.engine.InferenceEngine`)."""

    def run(self, files: Sequence[Path]) -> InferenceResult:
        """Segment and measure the series in ``files``."""
        ...


class PipelineContext(Protocol):
    """What the pipeline needs from the worker (``lungnode.node.dispatch.worker.WorkerContext``)."""

    config: Config
    db: Database
    store: FileStore

    @property
    def engine(self) -> Engine:
        """The process-lifetime inference engine."""
        ...


def engine_from_config(config: Config) -> Any:
    """An :class:`~lungnode.inference.engine.InferenceEngine` from ``[inference]`` (model, device,
    threads, overlap, mirror TTA, minimum component size, resampling); usable as ``jobs.engine_factory =
    "lungnode.node.dispatch.pipeline:engine_from_config"``."""
    from lungnode.inference.engine import EngineOptions, InferenceEngine

    inf = config.inference
    options = EngineOptions.from_settings(overlap=inf.overlap, mirror_tta=inf.mirror_tta,
                                          threads=inf.threads, min_component_ml=inf.min_component_ml,
                                          allow_resample=inf.allow_resample)
    return InferenceEngine(Path(inf.model) if inf.model else None, device=inf.device,
                           options=options)


def report_options(config: Config) -> ReportOptions:
    """``[report]`` as the options of :func:`~lungnode.inference.report.severity_for`."""
    r = config.report
    return ReportOptions.from_settings(r.regions, r.scheme, tuple(r.cutoffs), r.pho_min_hu)


def measurements_dict(result: InferenceResult, gate: GateDecision,
                      report: SeverityReport | None = None,
                      comparison: Comparison | None = None) -> dict[str, Any]:
    """JSON-serialisable measurements stored on the job (``lungnode jobs`` shows them; a later
    study of the same patient is compared with ``report``; ``severity_score`` is what
    :attr:`lungnode.storage.models.Job.score` reads for the pages and the notifications)."""
    m = result.measurements

    def region(r: Any) -> dict[str, float]:
        return {"lung_ml": round(r.lung_ml, 2), "infiltrate_ml": round(r.infiltrate_ml, 2),
                "percent_involved": round(r.percent_involved, 2)}

    return {"left": region(m.left), "right": region(m.right), "both": region(m.both),
            "infiltrate_outside_lung_ml": round(m.infiltrate_outside_lung_ml, 2),
            "lung_source": result.lung_source,
            "model": {"name": result.model.name, "version": result.model.version},
            "seconds": {k: round(v, 3) for k, v in result.seconds.items()},
            "quality_gate": {"passed": gate.passed, "reasons": list(gate.reasons)},
            **({"report": report_to_dict(report),
                "severity_score": {"total": report.total_score, "max": report.max_score,
                                   "scheme": report.scheme.name,
                                   "regions": report.region_kind}} if report is not None else {}),
            **({"prior": _prior_dict(comparison, report)} if comparison is not None
               and report is not None else {})}


def _prior_dict(comparison: Comparison, report: SeverityReport) -> dict[str, Any]:
    if comparison.prior is None:
        return {"note": comparison.note}
    change = comparison.po_change(report)
    return {"study_date": comparison.prior.study_date, "source": comparison.prior.source,
            "po": comparison.prior.po, "total_score": comparison.prior.total_score,
            "po_change_pp": None if change is None else round(change, 2),
            "score_change": comparison.score_change(report), "days": comparison.days}


def series_files(db: Database, store: FileStore, series_uid: str) -> list[Path]:
    """Paths of the current instances of a series."""
    with db.session() as s:
        rows = s.scalars(select(Instance.path).join(Series, Series.id == Instance.series_pk)
                         .where(Series.series_uid == series_uid, Instance.current.is_(True))).all()
    return [store.path(p) for p in rows]


def predecessor_sr(db: Database, store: FileStore, job_pk: int | None,
                   destination: str) -> Dataset | None:
    """The SR of a superseded job for ``destination`` (else any of its SRs), or ``None``."""
    if job_pk is None:
        return None
    with db.session() as s:
        rows = s.scalars(select(Output).where(Output.job_pk == job_pk, Output.kind == "sr")).all()
    chosen = next((r for r in rows if r.destination == destination), rows[0] if rows else None)
    if chosen is None or not store.path(chosen.path).is_file():
        return None
    return pydicom.dcmread(store.path(chosen.path))


def store_outputs(db: Database, store: FileStore, job_pk: int, destination: str,
                  outputs: list[BuiltOutput]) -> None:
    """Write outputs durably, then record them (one transaction) as built for ``destination``."""
    written = []
    for out in outputs:
        rel = store.output_relpath(job_pk, out.kind, out.sop_instance_uid)
        store.write_bytes(rel, out.data)
        written.append((out, rel))
    with db.session() as s:
        for out, rel in written:
            s.add(Output(job_pk=job_pk, kind=out.kind, destination=destination,
                         sop_class_uid=out.sop_class_uid, sop_instance_uid=out.sop_instance_uid,
                         series_uid=out.series_uid, transfer_syntax_uid=out.transfer_syntax_uid,
                         path=rel))


def output_context(config: Config, job_pk: int, result: InferenceResult) -> OutputContext:
    """Producer identity of a job's outputs from the configuration."""
    return OutputContext(job_id=job_pk, model=result.model,
                         manufacturer=config.results.manufacturer,
                         series_number_base=config.results.series_number_base,
                         station_ae=config.node.ae_title,
                         label=NOT_FOR_CLINICAL_USE if config.results.label_not_for_clinical_use else "")


def build_and_store(config: Config, db: Database, store: FileStore, job_pk: int,
                    result: InferenceResult, supersedes: int | None,
                    report: SeverityReport | None = None,
                    comparison: Comparison | None = None) -> dict[str, int]:
    """Build and store outputs for every destination profile that has none yet (``report`` and
    ``comparison`` go into the SR and the summary page).

    Returns
    -------
    dict
        Objects written now per destination name.
    """
    with db.session() as s:
        done = set(s.scalars(select(Output.destination).where(Output.job_pk == job_pk)))
    profiles: dict[str, Profile] = profiles_for(config.destinations)
    ctx = output_context(config, job_pk, result)
    source: SourceSeries | None = None
    written: dict[str, int] = {}
    for name, profile in profiles.items():
        if name in done:
            continue
        source = source or SourceSeries.from_files(result.volume.source_files)
        t0 = time.perf_counter()
        outputs = build_outputs(result, ctx, profile, source=source,
                                predecessor_sr=predecessor_sr(db, store, supersedes, name),
                                report=report, comparison=comparison)
        store_outputs(db, store, job_pk, name, outputs)
        metrics.STAGE_SECONDS.labels("build").observe(time.perf_counter() - t0)
        written[name] = len(outputs)
    return written


def cancel_superseded(db: Database, old_job_pk: int | None, new_job_pk: int) -> int:
    """Cancel the old job's deliveries that have not sent any instance; return how many."""
    if old_job_pk is None:
        return 0
    count = 0
    with db.session() as s:
        for d in s.scalars(select(Delivery).where(Delivery.job_pk == old_job_pk,
                                                  Delivery.state == "pending")):
            if not d.acknowledged:
                d.state = "cancelled"
                d.last_error = f"superseded by job {new_job_pk}"
                count += 1
    return count


def process_job(job_pk: int, ctx: PipelineContext) -> JobOutcome:
    """Run one job end to end (the worker's processor).

    Parameters
    ----------
    job_pk:
        The claimed job.
    ctx:
        Worker context: ``config``, ``db``, ``store`` and the lazily created inference engine.

    Returns
    -------
    JobOutcome
        ``done`` (deliveries queued) or ``held`` (quality gate, with the reason).

    Raises
    ------
    PermanentJobError
        The job or its series is gone, or the series cannot be read as one valid CT volume.
    """
    from lungnode.inference.dicom_io import SeriesError
    from lungnode.inference.geometry import GeometryError

    config, db, store = ctx.config, ctx.db, ctx.store
    with db.session() as s:
        job = s.get(Job, job_pk)
        if job is None:
            raise PermanentJobError(f"job {job_pk} does not exist")
        series_uid, supersedes = job.series_uid, job.supersedes_job_pk
    files = series_files(db, store, series_uid)
    if not files:
        raise PermanentJobError("the series has no stored instances (deleted by retention?)")
    t0 = time.perf_counter()
    engine = ctx.engine
    try:
        result: InferenceResult = engine.run(files)
    except (SeriesError, GeometryError) as exc:
        raise PermanentJobError(str(getattr(exc, "reason", exc))) from exc
    options = report_options(config)
    report = severity_for(result, options, lobe_labels_for(engine, result, options))
    metrics.STAGE_SECONDS.labels("inference").observe(time.perf_counter() - t0)
    comparison = find_comparison(config, db, job_pk)
    gate = check_quality(result.measurements, config.results.quality_gate)
    measurements = measurements_dict(result, gate, report, comparison)
    with db.session() as s:
        job_row = s.get(Job, job_pk)
        if job_row is not None:
            job_row.measurements = measurements
    written = build_and_store(config, db, store, job_pk, result, supersedes, report, comparison)
    log.info("job %d: outputs written %s; lung %.0f mL, infiltrate %.1f mL (%.1f %%)", job_pk,
             written or "(already present)", result.measurements.both.lung_ml,
             result.measurements.both.infiltrate_ml, result.measurements.both.percent_involved)
    if not gate.passed:
        log.warning("job %d held by the quality gate: %s", job_pk, gate.reason)
        return JobOutcome("held", gate.reason, measurements)
    with db.session() as s:
        # A late instance may have superseded this job while it ran: its results must not be sent
        # (the newer job's will). The row lock makes this check and the queueing one step.
        job_row = s.get(Job, job_pk, with_for_update=True)
        if job_row is None or job_row.state != "running":
            state = job_row.state if job_row is not None else "deleted"
            log.info("job %d is %s now; its results are kept but not sent", job_pk, state)
            return JobOutcome("done", f"{state} while running; results not sent", measurements)
        queued = queue_deliveries(s, job_pk, [d.name for d in config.destinations])
    cancelled = cancel_superseded(db, supersedes, job_pk)
    if cancelled:
        log.info("job %d: cancelled %d unsent deliveries of superseded job %s", job_pk, cancelled,
                 supersedes)
    log.info("job %d: deliveries queued to %s", job_pk, ", ".join(queued) or "(none)")
    return JobOutcome("done", "", measurements)
