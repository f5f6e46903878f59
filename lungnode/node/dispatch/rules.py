"""Selection rules: which complete series are dispatched to inference, and why.

This module owns the series-level features the ``[[rules]]`` of ``config.toml`` look at and the
evaluation of those rules. Features are aggregated from **all** current instance rows of a series
(never from the first file): the set of modalities, SOP classes, ImageType values, kernels and
calling AEs; the median slice thickness; the slice spacing measured from the positions along the
slice normal; the number of slices (frames); and the angle between the slice normal and the
patient's z axis.

Evaluation: the first rule whose conditions all hold decides (``include`` → dispatched,
``exclude`` → stored only). When no rule matches the series is excluded with the reason
``no rule matched``. Every condition is reported with the feature value it saw, which is what
``lungnode explain`` and ``lungnode rules dry-run`` print.

Condition semantics
-------------------
* list conditions (``modality``, ``sop_class_uid``, ``body_part``, ``calling_ae``): at least one of
  the series' values is listed (comparison ignores case and surrounding spaces);
* ``modality_not``: none of the series' modalities is listed;
* ``image_type_any``: at least one listed value occurs in the ImageType of some instance;
* ``image_type_all``: every instance's ImageType contains all listed values;
* regexes are searched case-insensitively; ``kernel_regex`` holds if any kernel matches;
* numeric ranges are inclusive; an unknown value (e.g. spacing of a one-slice series) fails them.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from lungnode.config import RuleConfig
from lungnode.inference.geometry import median_slice_step_mm, slice_normal, tilt_from_axial_deg
from lungnode.node.ingest.fields import split_numbers
from lungnode.storage.models import Instance, Series

NO_RULE = "no rule matched"


@dataclass(frozen=True)
class SeriesFeatures:
    """Series-level features aggregated from every current instance of a series.

    Attributes
    ----------
    series_uid:
        SeriesInstanceUID.
    modalities, sop_classes, kernels, calling_aes:
        Distinct non-empty values over the instances (sorted).
    image_types:
        ImageType value sets, one per distinct ImageType seen.
    body_part, description:
        Series-level BodyPartExamined and SeriesDescription.
    slice_thickness:
        Median SliceThickness (mm) or ``None``.
    spacing:
        Median step between consecutive slice positions along the normal (mm); falls back to
        SpacingBetweenSlices; ``None`` when unknown.
    slices:
        Number of slices (sum of NumberOfFrames over the instances).
    axial_angle_deg:
        Angle between the slice normal and the patient z axis, folded to 0-90; ``None`` unknown.
    own_output:
        The series was made by lungnode (loop protection).
    """

    series_uid: str
    modalities: tuple[str, ...] = ()
    sop_classes: tuple[str, ...] = ()
    image_types: tuple[frozenset[str], ...] = ()
    body_part: str = ""
    description: str = ""
    kernels: tuple[str, ...] = ()
    slice_thickness: float | None = None
    spacing: float | None = None
    slices: int = 0
    axial_angle_deg: float | None = None
    calling_aes: tuple[str, ...] = ()
    own_output: bool = False


@dataclass(frozen=True)
class ConditionResult:
    """One condition of a rule with the value it was checked against."""

    name: str
    expected: str
    actual: str
    holds: bool


@dataclass(frozen=True)
class RuleResult:
    """A rule's evaluation: whether it matched and each of its set conditions."""

    name: str
    action: str
    matched: bool
    conditions: tuple[ConditionResult, ...] = ()


@dataclass(frozen=True)
class Decision:
    """The outcome of the rules for one series.

    Attributes
    ----------
    action:
        ``include`` or ``exclude``.
    rule:
        Name of the deciding rule, or :data:`NO_RULE`.
    evaluated:
        Every rule evaluated up to and including the deciding one, in order.
    """

    action: str
    rule: str
    evaluated: tuple[RuleResult, ...] = field(default_factory=tuple)

    @property
    def include(self) -> bool:
        """Whether the series is dispatched."""
        return self.action == "include"


def _median(values: Sequence[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def features_from_instances(series: Series, instances: Sequence[Instance]) -> SeriesFeatures:
    """Aggregate series-level features from instance rows (no file is read).

    Parameters
    ----------
    series:
        The series row (body part, description, own_output).
    instances:
        Its current instance rows.

    Returns
    -------
    SeriesFeatures
        The features the rules look at.
    """
    def distinct(values: Sequence[str]) -> tuple[str, ...]:
        return tuple(sorted({v.strip() for v in values if v and v.strip()}))

    modalities = distinct([i.modality for i in instances] or [series.modality])
    if not modalities and series.modality:
        modalities = (series.modality.strip(),)
    image_types = tuple(sorted(
        {frozenset(v.strip().upper() for v in (i.image_type or "").split("\\") if v.strip())
         for i in instances}, key=lambda s: sorted(s)))
    thickness = _median([i.slice_thickness for i in instances if i.slice_thickness is not None])
    slices = sum(max(1, i.number_of_frames or 1) for i in instances)
    normals = [n for n in (slice_normal(split_numbers(i.image_orientation) or []) for i in instances) if n]
    angle: float | None = None
    spacing: float | None = None
    if normals:
        normal = normals[0]
        angle = tilt_from_axial_deg(normal)
        spacing = median_slice_step_mm([split_numbers(i.image_position) for i in instances], normal)
    if spacing is None:
        spacing = _median([i.spacing_between_slices for i in instances
                           if i.spacing_between_slices is not None])
    return SeriesFeatures(
        series_uid=series.series_uid,
        modalities=modalities,
        sop_classes=distinct([i.sop_class_uid for i in instances]),
        image_types=image_types,
        body_part=(series.body_part or "").strip(),
        description=(series.description or "").strip(),
        kernels=distinct([i.kernel for i in instances]),
        slice_thickness=thickness,
        spacing=spacing,
        slices=slices,
        axial_angle_deg=angle,
        calling_aes=distinct([i.calling_ae for i in instances]),
        own_output=bool(series.own_output),
    )


def load_features(session: Session, series: Series) -> SeriesFeatures:
    """Features of ``series`` from its current instance rows in the database."""
    rows = session.scalars(select(Instance).where(Instance.series_pk == series.id,
                                                  Instance.current.is_(True))).all()
    return features_from_instances(series, rows)


def _fmt_num(value: float | None) -> str:
    return "unknown" if value is None else f"{value:g}"


def _in_list(name: str, wanted: tuple[str, ...], values: tuple[str, ...]) -> ConditionResult:
    want = {w.strip().upper() for w in wanted}
    holds = any(v.strip().upper() in want for v in values)
    return ConditionResult(name, f"one of {list(wanted)}", str(list(values)), holds)


def _range(name: str, value: float | None, low: float | None, high: float | None) -> ConditionResult:
    expected = (f"between {_fmt_num(low)} and {_fmt_num(high)}" if low is not None and high is not None
                else f">= {_fmt_num(low)}" if low is not None else f"<= {_fmt_num(high)}")
    holds = value is not None and (low is None or value >= low) and (high is None or value <= high)
    return ConditionResult(name, expected, _fmt_num(value), holds)


def evaluate_rule(rule: RuleConfig, f: SeriesFeatures) -> RuleResult:
    """Evaluate one rule's set conditions against ``f``."""
    out: list[ConditionResult] = []
    if rule.modality:
        out.append(_in_list("modality", rule.modality, f.modalities))
    if rule.modality_not:
        bad = {m.strip().upper() for m in rule.modality_not}
        out.append(ConditionResult("modality_not", f"none of {list(rule.modality_not)}",
                                   str(list(f.modalities)),
                                   not any(m.upper() in bad for m in f.modalities)))
    if rule.sop_class_uid:
        out.append(_in_list("sop_class_uid", rule.sop_class_uid, f.sop_classes))
    seen = sorted(set().union(*f.image_types)) if f.image_types else []
    if rule.image_type_any:
        want = {v.strip().upper() for v in rule.image_type_any}
        out.append(ConditionResult("image_type_any", f"any of {list(rule.image_type_any)}", str(seen),
                                   bool(want & set(seen))))
    if rule.image_type_all:
        want = {v.strip().upper() for v in rule.image_type_all}
        holds = bool(f.image_types) and all(want <= t for t in f.image_types)
        out.append(ConditionResult("image_type_all", f"all of {list(rule.image_type_all)} in every "
                                   "instance", str(seen), holds))
    if rule.body_part:
        out.append(_in_list("body_part", rule.body_part, (f.body_part,) if f.body_part else ()))
    if rule.description_regex:
        out.append(ConditionResult("description_regex", f"/{rule.description_regex}/i",
                                   repr(f.description),
                                   re.search(rule.description_regex, f.description, re.I) is not None))
    if rule.kernel_regex:
        out.append(ConditionResult("kernel_regex", f"/{rule.kernel_regex}/i", str(list(f.kernels)),
                                   any(re.search(rule.kernel_regex, k, re.I) for k in f.kernels)))
    if rule.slice_thickness_min is not None or rule.slice_thickness_max is not None:
        out.append(_range("slice_thickness", f.slice_thickness, rule.slice_thickness_min,
                          rule.slice_thickness_max))
    if rule.spacing_min is not None or rule.spacing_max is not None:
        out.append(_range("spacing", f.spacing, rule.spacing_min, rule.spacing_max))
    if rule.slices_min is not None or rule.slices_max is not None:
        out.append(_range("slices", float(f.slices),
                          None if rule.slices_min is None else float(rule.slices_min),
                          None if rule.slices_max is None else float(rule.slices_max)))
    if rule.axial_within_deg is not None:
        out.append(_range("axial_angle_deg", f.axial_angle_deg, None, rule.axial_within_deg))
    if rule.calling_ae:
        out.append(_in_list("calling_ae", rule.calling_ae, f.calling_aes))
    return RuleResult(rule.name, rule.action, all(c.holds for c in out), tuple(out))


def decide(rules: Sequence[RuleConfig], features: SeriesFeatures) -> Decision:
    """Apply the ordered rules; the first matching rule decides, else exclude (:data:`NO_RULE`).

    Parameters
    ----------
    rules:
        The configured rules in order.
    features:
        The series' features.

    Returns
    -------
    Decision
        Action, deciding rule and every rule evaluated.
    """
    evaluated: list[RuleResult] = []
    for rule in rules:
        result = evaluate_rule(rule, features)
        evaluated.append(result)
        if result.matched:
            return Decision(rule.action, rule.name, tuple(evaluated))
    return Decision("exclude", NO_RULE, tuple(evaluated))


def format_features(f: SeriesFeatures) -> list[str]:
    """Human-readable lines describing the features (no patient data)."""
    return [
        f"modality={list(f.modalities)} sop_class={list(f.sop_classes)}",
        f"image_type={sorted(set().union(*f.image_types)) if f.image_types else []}",
        f"body_part={f.body_part!r} description={f.description!r} kernel={list(f.kernels)}",
        f"slice_thickness={_fmt_num(f.slice_thickness)} spacing={_fmt_num(f.spacing)} "
        f"slices={f.slices} axial_angle_deg={_fmt_num(f.axial_angle_deg)}",
        f"calling_ae={list(f.calling_aes)} own_output={f.own_output}",
    ]


def format_decision(decision: Decision, *, verbose: bool = True) -> list[str]:
    """Lines for ``lungnode explain``: the deciding rule, then each rule with its conditions."""
    lines = [f"decision: {decision.action} (rule: {decision.rule})"]
    if not verbose:
        return lines
    for r in decision.evaluated:
        mark = "MATCH" if r.matched else "no match"
        lines.append(f"  rule {r.name!r} [{r.action}]: {mark}")
        if not r.conditions:
            lines.append("    (no conditions: always matches)")
        for c in r.conditions:
            lines.append(f"    {'ok  ' if c.holds else 'FAIL'} {c.name}: {c.actual} (wanted {c.expected})")
    return lines
