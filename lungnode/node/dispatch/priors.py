"""Find the prior exam of a job's patient and compare with it (``[priors]``).

``source = "local"`` (the default): the latest earlier result of **this node** for the same
patient, i.e. a ``done`` job whose stored figures (``Job.measurements["report"]``, written by the
pipeline) belong to a study with the same Patient ID **and** Issuer of Patient ID and an earlier
Study Date. Never across patients: an empty Patient ID or Study Date means no comparison, and
the report says why. ``off``: no look-up, nothing is said about priors.

``source = "pacs"``: ``local`` first; when this node has no earlier result of the patient, the
PACS named by ``[priors] destination`` is asked (:mod:`lungnode.node.dimse.query`): C-FIND at
series level for the patient's SR series (Patient ID, Modality SR, our series description
"*AI lung report*", an earlier Study Date), C-GET of the latest one, and only an SR that carries
our provenance block, the same Patient ID **and** Issuer and region groups is read back
(:func:`lungnode.node.results.sr_report.read_report_figures`). A PACS that cannot be asked is
said so in the report; the job goes on without comparison.
"""

from __future__ import annotations

import logging

from pydicom.dataset import Dataset
from sqlalchemy import select

from lungnode.config import Config, DestinationConfig
from lungnode.inference.comparison import Comparison, PriorFigures
from lungnode.node.dimse.query import QueryError, find_series, get_series
from lungnode.node.results.sr_report import read_report_figures
from lungnode.provenance import is_own_output
from lungnode.storage.db import Database
from lungnode.storage.models import Job, Patient, Series, Study
from lungnode.uids import COMPREHENSIVE_SR_STORAGE

log = logging.getLogger(__name__)

NO_PATIENT_ID = "No comparison with a prior exam: the Patient ID is missing."
NO_STUDY_DATE = "No comparison with a prior exam: the Study Date is missing."
NO_PRIOR = "No prior exam of this patient in lungnode's results."


def find_comparison(config: Config, db: Database, job_pk: int) -> Comparison | None:
    """The comparison for a job's report per ``[priors]`` (``None`` when ``source = "off"``).

    Parameters
    ----------
    config:
        ``[priors]``.
    db:
        The node's database.
    job_pk:
        The job being reported.

    Returns
    -------
    Comparison or None
    """
    if config.priors.source == "off":
        return None
    comparison = local_comparison(db, job_pk)
    if config.priors.source == "pacs" and comparison.prior is None and comparison.note == NO_PRIOR:
        patient = _patient_of(db, job_pk)
        assert patient is not None  # local_comparison found it
        return pacs_comparison(config.destination(config.priors.destination), *patient,
                               timeout=config.delivery.timeout_s)
    return comparison


def _patient_of(db: Database, job_pk: int) -> tuple[str, str, str, str] | None:
    """Patient ID, Issuer, Study Date and Study UID of a job's series (stripped)."""
    with db.session() as s:
        row = s.execute(
            select(Patient.patient_id, Patient.issuer, Study.study_date, Study.study_uid)
            .join(Study, Study.patient_pk == Patient.id)
            .join(Series, Series.study_pk == Study.id)
            .join(Job, Job.series_uid == Series.series_uid)
            .where(Job.id == job_pk)).first()
    if row is None:
        return None
    pid, issuer, date, uid = (str(v or "").strip() for v in row)
    return pid, issuer, date, uid


def pacs_comparison(dest: DestinationConfig, patient_id: str, issuer: str, study_date: str,
                    study_uid: str, *, timeout: float = 30.0) -> Comparison:
    """Ask the PACS for the patient's latest earlier lungnode SR and compare with it.

    Parameters
    ----------
    dest:
        The PACS (a configured destination).
    patient_id, issuer, study_date, study_uid:
        The current study's patient and date (both IDs must match the prior SR exactly).
    timeout:
        DIMSE timeout in seconds.

    Returns
    -------
    Comparison
    """
    query = Dataset()
    query.PatientID = patient_id
    query.IssuerOfPatientID = ""
    query.StudyDate = ""
    query.StudyInstanceUID = ""
    query.SeriesInstanceUID = ""
    query.Modality = "SR"
    query.SeriesDescription = "*AI lung report*"  # also behind [results] label_not_for_clinical_use
    try:
        matches = find_series(dest, query, timeout=timeout)
        candidates = sorted(
            ((str(m.get("StudyDate", "")), str(m.StudyInstanceUID), str(m.SeriesInstanceUID))
             for m in matches
             if str(m.get("PatientID", "")) == patient_id and m.get("StudyInstanceUID")
             and "" < str(m.get("StudyDate", "")) < study_date
             and str(m.StudyInstanceUID) != study_uid),
            reverse=True)
        for date, prior_study, prior_series in candidates:
            got = get_series(dest, prior_study, prior_series, [COMPREHENSIVE_SR_STORAGE], timeout=timeout)
            for sr in got.datasets:
                if not (is_own_output(sr) and str(sr.get("PatientID", "")) == patient_id
                        and str(sr.get("IssuerOfPatientID", "")).strip() == issuer):
                    continue
                figures = read_report_figures(sr)
                if figures is None:
                    continue
                prior = PriorFigures.from_report_dict(
                    figures, date, prior_study, f"PACS {dest.name}, SR {sr.SOPInstanceUID}")
                return Comparison.of(prior, study_date)
    except QueryError as exc:
        log.warning("prior look-up on %s failed: %s", dest.name, exc)
        return Comparison.none(f"{NO_PRIOR} The PACS {dest.name} could not be asked.")
    return Comparison.none(f"No prior exam of this patient in lungnode's results or on "
                           f"{dest.name}.")


def local_comparison(db: Database, job_pk: int) -> Comparison:
    """Compare with this node's latest earlier result for the same patient.

    Parameters
    ----------
    db:
        The node's database.
    job_pk:
        The job being reported.

    Returns
    -------
    Comparison
        With the prior's figures, or the reason there is none.
    """
    patient = _patient_of(db, job_pk)
    if patient is None:
        return Comparison.none(NO_PRIOR)
    patient_id, issuer, study_date, study_uid = patient
    if not patient_id:
        return Comparison.none(NO_PATIENT_ID)
    if not study_date:
        return Comparison.none(NO_STUDY_DATE)
    with db.session() as s:
        candidates = s.execute(
            select(Job.id, Job.measurements, Study.study_date, Study.study_uid)
            .join(Series, Series.series_uid == Job.series_uid)
            .join(Study, Study.id == Series.study_pk)
            .join(Patient, Patient.id == Study.patient_pk)
            .where(Patient.patient_id == patient_id, Patient.issuer == issuer,
                   Study.study_date < study_date, Study.study_date != "",
                   Study.study_uid != study_uid, Job.state == "done", Job.id != job_pk)
            .order_by(Study.study_date.desc(), Job.id.desc())).all()
    for prior_job, measurements, prior_date, prior_uid in candidates:
        report = (measurements or {}).get("report")
        if not report:
            continue
        try:
            prior = PriorFigures.from_report_dict(report, str(prior_date), str(prior_uid),
                                                  f"lungnode job {prior_job}")
        except (KeyError, IndexError, TypeError, ValueError):
            log.warning("job %d: stored figures of job %d are unreadable; skipped", job_pk,
                        prior_job)
            continue
        return Comparison.of(prior, study_date)
    return Comparison.none(NO_PRIOR)
