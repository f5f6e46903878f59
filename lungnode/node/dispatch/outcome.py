"""What processing one job can end in: the contract between the worker (job states) and the
pipeline (inference, result objects, deliveries).

The worker calls the pipeline for a claimed job. The pipeline returns a :class:`JobOutcome` or
raises :class:`TransientJobError` (retried with backoff) or :class:`PermanentJobError` (failed at
once, reason recorded). Any other exception counts as transient until attempts run out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class TransientJobError(RuntimeError):
    """A failure worth retrying (resource busy, out of memory, destination not yet ready)."""


class PermanentJobError(RuntimeError):
    """A failure that will not go away by retrying (bad geometry, unreadable pixel data)."""


@dataclass(frozen=True)
class JobOutcome:
    """How a job ended when the pipeline returned normally.

    Attributes
    ----------
    state:
        ``done`` (outputs written, deliveries queued) or ``held`` (quality gate: outputs written but
        not queued for delivery until released).
    reason:
        Human-readable reason, required for ``held``.
    measurements:
        JSON-serialisable measurements stored on the job.
    """

    state: str
    reason: str = ""
    measurements: dict[str, Any] = field(default_factory=dict)
