"""How lungnode marks the objects it writes, and recognises them when they come back.

Every output (SEG, SR, SC) carries a private block with :data:`PRIVATE_CREATOR` in group
:data:`PRIVATE_GROUP`; the ingest path sets ``Series.own_output`` when it sees it, and such series
are stored but never dispatched (loop protection).
"""

from __future__ import annotations

from pydicom.dataset import Dataset

#: Private creator of our block (PS3.5 §7.8.1).
PRIVATE_CREATOR = "LUNGNODE 1.0"
#: Odd group of our private block.
PRIVATE_GROUP = 0x0071
#: Element offsets inside the block: (0071,xx01) job id, (0071,xx02) model name and version,
#: (0071,xx03) source series instance UID.
ELEMENT_JOB_ID = 0x01
ELEMENT_MODEL = 0x02
ELEMENT_SOURCE_SERIES = 0x03


def add_provenance(ds: Dataset, *, job_id: int, model: str, source_series_uid: str) -> None:
    """Write our private block into ``ds``.

    Parameters
    ----------
    ds:
        The output dataset.
    job_id:
        The job that produced it.
    model:
        Model name and version, e.g. ``"lungnode-demo 0.1.0"``.
    source_series_uid:
        The series the result was computed from.
    """
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(ELEMENT_JOB_ID, "LO", str(job_id))
    block.add_new(ELEMENT_MODEL, "LO", model[:64])
    block.add_new(ELEMENT_SOURCE_SERIES, "UI", source_series_uid)


def is_own_output(ds: Dataset) -> bool:
    """Return whether ``ds`` (a header, pixel data not needed) carries our private block."""
    for offset in range(0x10, 0x100):
        element = ds.get((PRIVATE_GROUP << 16) | offset)
        if element is None:
            continue
        if str(element.value).strip() == PRIVATE_CREATOR:
            return True
    return False
