"""Find the prior exam of a job's patient and compare with it (``[priors]``).

``source = "local"`` (the default): the latest earlier result of **this node** for the same
patient, i.e. a ``done`` job whose stored figures (``Job.measurements["report"]``, written by the
pipeline) belong to a study with the same Patient ID **and** Issuer of Patient ID and an earlier
Study Date. Never across patients: an empty Patient ID or Study Date means no comparison, and
the report says why. ``off``: no look-up, nothing is said about priors.

``source = "pacs"`` (asking the PACS with C-FIND and C-MOVE for our earlier SRs) is **not
implemented yet**: it behaves like ``local`` and the report says the PACS was not asked.
"""

from __future__ import annotations

import logging

from sqlalchemy import select

from lungnode.config import Config
from lungnode.inference.comparison import Comparison, PriorFigures
from lungnode.storage.db import Database
from lungnode.storage.models import Job, Patient, Series, Study

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
        return Comparison.none(f"{NO_PRIOR} (asking the PACS is not implemented yet)")
    return comparison


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
    with db.session() as s:
        row = s.execute(
            select(Patient.patient_id, Patient.issuer, Study.study_date, Study.study_uid)
            .join(Study, Study.patient_pk == Patient.id)
            .join(Series, Series.study_pk == Study.id)
            .join(Job, Job.series_uid == Series.series_uid)
            .where(Job.id == job_pk)).first()
        if row is None:
            return Comparison.none(NO_PRIOR)
        patient_id, issuer, study_date, study_uid = (str(v or "").strip() for v in row)
        if not patient_id:
            return Comparison.none(NO_PATIENT_ID)
        if not study_date:
            return Comparison.none(NO_STUDY_DATE)
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
