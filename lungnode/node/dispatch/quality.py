"""The quality gate: results that look wrong are held with a reason instead of being sent.

Checks (``[results.quality_gate]``): the lung mask is empty, smaller than ``lung_min_ml`` or larger
than ``lung_max_ml``; more than ``max_outside_fraction`` of the predicted infiltrate lay outside
the lungs (before it was clipped), and at least ``outside_min_ml`` of it. A held job keeps its
outputs; ``lungnode release JOB`` queues them for delivery.
"""

from __future__ import annotations

from dataclasses import dataclass

from lungnode.config import QualityGateConfig
from lungnode.inference.types import Measurements


@dataclass(frozen=True)
class GateDecision:
    """Whether a result may be sent, and why not."""

    passed: bool
    reasons: tuple[str, ...] = ()

    @property
    def reason(self) -> str:
        """The reasons joined into one line (empty when passed)."""
        return "; ".join(self.reasons)


def check_quality(m: Measurements, gate: QualityGateConfig) -> GateDecision:
    """Apply the quality gate to a result's measurements.

    Parameters
    ----------
    m:
        Volumes from inference.
    gate:
        Thresholds.

    Returns
    -------
    GateDecision
        ``passed`` True when every check holds or the gate is disabled.
    """
    if not gate.enabled:
        return GateDecision(True)
    reasons: list[str] = []
    lung = m.both.lung_ml
    if lung <= 0:
        reasons.append("lung mask is empty")
    elif lung < gate.lung_min_ml:
        reasons.append(f"lung volume {lung:.0f} mL below the plausible minimum "
                       f"{gate.lung_min_ml:.0f} mL")
    elif lung > gate.lung_max_ml:
        reasons.append(f"lung volume {lung:.0f} mL above the plausible maximum "
                       f"{gate.lung_max_ml:.0f} mL")
    predicted = m.both.infiltrate_ml + m.infiltrate_outside_lung_ml
    if predicted > 0 and m.infiltrate_outside_lung_ml >= gate.outside_min_ml:
        outside = m.infiltrate_outside_lung_ml / predicted
        if outside > gate.max_outside_fraction:
            reasons.append(f"{100 * outside:.0f} % of the predicted infiltrate lies outside the "
                           f"lungs (limit {100 * gate.max_outside_fraction:.0f} %)")
    return GateDecision(not reasons, tuple(reasons))
