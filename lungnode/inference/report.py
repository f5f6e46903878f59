"""One call from an inference result to the radiologist's figures (:class:`SeverityReport`).

:func:`severity_for` picks the regions (lobes when a lobe label image is given, else zones by
:func:`~lungnode.inference.regions.assign_zones`) and runs
:func:`~lungnode.inference.severity.assess`. :func:`lobe_labels_for` runs the lobe pass when the
options allow it and the engine's bundle declares lobe classes. ``node/`` and ``lungnode infer``
use these two functions, so both report the same figures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from lungnode.inference.regions import assign_zones, lobe_regions
from lungnode.inference.severity import PHO_MIN_HU, SCHEMES, ScoreScheme, SeverityReport, assess
from lungnode.inference.types import InferenceResult

__all__ = ["REGION_MODES", "ReportOptions", "lobe_labels_for", "severity_for"]

#: ``auto``: lobes when the model has them, else zones (carina, or thirds); ``zones``: zones even
#: with a lobe model; ``thirds``: zones by volume thirds only (no landmark search).
REGION_MODES = ("auto", "zones", "thirds")


@dataclass(frozen=True)
class ReportOptions:
    """``[report]`` settings: regions, score scheme, high-opacity threshold."""

    regions: str = "auto"
    scheme: ScoreScheme = field(default_factory=lambda: SCHEMES["pan"])
    pho_min_hu: float = PHO_MIN_HU

    @classmethod
    def from_settings(cls, regions: str = "auto", scheme: str = "pan",
                      cutoffs: tuple[str, ...] = (), pho_min_hu: float = PHO_MIN_HU) -> ReportOptions:
        """Options from the ``[report]`` values (own ``cutoffs`` make a scheme named ``site``)."""
        chosen = (ScoreScheme("site", f"site cut-offs {', '.join(cutoffs)}", tuple(cutoffs))
                  if cutoffs else SCHEMES[scheme])
        return cls(regions=regions, scheme=chosen, pho_min_hu=pho_min_hu)


def lobe_labels_for(engine: Any, result: InferenceResult,
                    options: ReportOptions) -> npt.NDArray[np.uint8] | None:
    """Lobe labels when ``options.regions`` is ``auto`` and the engine's bundle has lobes."""
    from lungnode.inference.lobes import has_lobes, predict_lobe_labels

    meta = getattr(engine, "metadata", None)
    if options.regions != "auto" or meta is None or not has_lobes(meta):
        return None
    return predict_lobe_labels(engine, result.volume)


def severity_for(result: InferenceResult, options: ReportOptions | None = None,
                 lobe_labels: npt.NDArray[np.uint8] | None = None) -> SeverityReport:
    """The severity report of ``result``.

    Parameters
    ----------
    result:
        Masks and volume.
    options:
        Regions, scheme, PHO threshold (defaults when ``None``).
    lobe_labels:
        From :func:`lobe_labels_for`; zones are used when ``None``.

    Returns
    -------
    SeverityReport
    """
    options = options or ReportOptions()
    if lobe_labels is not None:
        regions = lobe_regions(lobe_labels, result.lung_labels)
    else:
        regions = assign_zones(result.volume, result.lung_labels,
                               use_carina=options.regions != "thirds")
    return assess(result.volume, regions, result.infiltrate, options.scheme, options.pho_min_hu)
