"""Query/retrieve SCU: find a patient's series on a peer (C-FIND) and fetch them (C-GET).

Used to find the prior exam's lungnode SR on the PACS (:mod:`lungnode.node.dispatch.priors`).
Study Root information model; C-GET brings the instances back on the same association (the node
takes the Storage SCP role for the SOP classes asked for), so the PACS needs no route back to the
node, only permission for our calling AE title to query and retrieve.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)

from lungnode.config import DestinationConfig
from lungnode.node.dimse.scu import tls_args

__all__ = ["QueryError", "RetrieveResult", "find_series", "get_series"]

#: C-FIND/C-GET statuses that mean "more to come".
PENDING = (0xFF00, 0xFF01)


class QueryError(RuntimeError):
    """The peer could not be asked (association refused, failure status)."""


@dataclass
class RetrieveResult:
    """Instances received by C-GET."""

    datasets: list[Dataset] = field(default_factory=list)
    status: int | None = None


def _ae(dest: DestinationConfig, timeout: float) -> AE:
    ae = AE(ae_title=dest.calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = min(timeout, 10.0)
    return ae


def find_series(dest: DestinationConfig, query: Dataset, *, timeout: float = 30.0) -> list[Dataset]:
    """C-FIND at SERIES level; returns the identifiers of the matches.

    Parameters
    ----------
    dest:
        The peer (host, port, AE titles, TLS).
    query:
        Identifier with the matching and return keys (``QueryRetrieveLevel`` is set here).
    timeout:
        Seconds for association and answers.

    Raises
    ------
    QueryError
        The association failed or the peer answered with a failure status.
    """
    ae = _ae(dest, timeout)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    query.QueryRetrieveLevel = "SERIES"
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title,
                         tls_args=tls_args(dest.tls, dest.host))
    if not assoc.is_established:
        raise QueryError(f"association with {dest.name} for C-FIND was refused or failed")
    matches: list[Dataset] = []
    try:
        for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            if status is None or "Status" not in status:
                raise QueryError(f"{dest.name} did not answer the C-FIND")
            if int(status.Status) in PENDING and identifier is not None:
                matches.append(identifier)
            elif int(status.Status) != 0x0000:
                raise QueryError(f"{dest.name} answered C-FIND with status 0x{int(status.Status):04X}")
    finally:
        assoc.release()
    return matches


def get_series(dest: DestinationConfig, study_uid: str, series_uid: str,
               sop_classes: Sequence[str], *, timeout: float = 60.0) -> RetrieveResult:
    """C-GET one series; the instances arrive on the same association (kept in memory).

    Parameters
    ----------
    dest:
        The peer.
    study_uid, series_uid:
        The series to fetch.
    sop_classes:
        Storage SOP classes we accept (the node takes the SCP role for them).
    timeout:
        Seconds for association and answers.

    Raises
    ------
    QueryError
        The association failed.
    """
    result = RetrieveResult()

    def on_store(event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        result.datasets.append(ds)
        return 0x0000

    ae = _ae(dest, timeout)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    for sop in sop_classes:
        ae.add_requested_context(sop)
    roles: list[Any] = [build_role(sop, scp_role=True) for sop in sop_classes]
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, ext_neg=roles,
                         evt_handlers=[(evt.EVT_C_STORE, on_store)],
                         tls_args=tls_args(dest.tls, dest.host))
    if not assoc.is_established:
        raise QueryError(f"association with {dest.name} for C-GET was refused or failed")
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study_uid
    query.SeriesInstanceUID = series_uid
    try:
        for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet):
            if status is not None and "Status" in status:
                result.status = int(status.Status)
    finally:
        assoc.release()
    return result
