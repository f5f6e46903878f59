"""Configuration of dispatch: ``[completion]``, ``[[rules]]``, ``[jobs]`` and ``[inference]``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from lungnode.config.checks import check_range
from lungnode.config.typed_toml import ConfigError
from lungnode.uids import CT_IMAGE_STORAGE


@dataclass(frozen=True)
class CompletionConfig:
    """When a series counts as complete."""

    #: Seconds without a new instance after which a series is complete.
    quiet_period_s: float = 30.0
    #: Seconds after the association is released when the series is geometrically complete.
    grace_s: float = 3.0
    #: Relative tolerance of slice spacing regularity (0.1 = 10 % of the median step).
    spacing_tolerance: float = 0.1
    #: Seconds between the completion service's checks for due series and ended associations.
    poll_s: float = 0.25

    def validate(self, key: str) -> None:
        check_range(f"{key}.poll_s", self.poll_s, 0.02, 10)
        check_range(f"{key}.quiet_period_s", self.quiet_period_s, 0.1, 86400)
        check_range(f"{key}.grace_s", self.grace_s, 0.0, self.quiet_period_s)
        check_range(f"{key}.spacing_tolerance", self.spacing_tolerance, 0.0, 1.0)


@dataclass(frozen=True)
class RuleConfig:
    """One selection rule; the first rule whose conditions all hold decides.

    Unset conditions (empty string, empty list, ``None``) always hold.
    """

    #: A name shown by ``lungnode explain``.
    name: str
    #: ``include`` (dispatch) or ``exclude`` (store only).
    action: str = "include"
    modality: tuple[str, ...] = ()
    #: Modalities the series must NOT have (an empty Modality counts as not listed).
    modality_not: tuple[str, ...] = ()
    sop_class_uid: tuple[str, ...] = ()
    #: ImageType values of which at least one must be present.
    image_type_any: tuple[str, ...] = ()
    #: ImageType values that must all be present.
    image_type_all: tuple[str, ...] = ()
    body_part: tuple[str, ...] = ()
    #: Python regular expression searched (case-insensitive) in SeriesDescription.
    description_regex: str = ""
    #: Python regular expression searched (case-insensitive) in ConvolutionKernel.
    kernel_regex: str = ""
    slice_thickness_min: float | None = None
    slice_thickness_max: float | None = None
    spacing_min: float | None = None
    spacing_max: float | None = None
    slices_min: int | None = None
    slices_max: int | None = None
    #: The slice normal within this many degrees of the patient's z axis.
    axial_within_deg: float | None = None
    calling_ae: tuple[str, ...] = ()

    def validate(self, key: str) -> None:
        if self.action not in ("include", "exclude"):
            raise ConfigError(f"{key}.action", self.action, "'include' or 'exclude'")
        for name in ("description_regex", "kernel_regex"):
            try:
                re.compile(getattr(self, name))
            except re.error as exc:
                raise ConfigError(f"{key}.{name}", getattr(self, name),
                                  f"a valid regular expression ({exc})") from None




def default_rules() -> tuple[RuleConfig, ...]:
    """The embedded ``[[rules]]`` (chest CT defaults)."""
    # Chest CT defaults; the numbers and their reasons are documented in config.toml.
    return (
        RuleConfig(name="not-ct", action="exclude", modality_not=("CT",)),
        RuleConfig(name="not-ct-image", action="exclude", sop_class_uid=(
            "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7.1", "1.2.840.10008.5.1.4.1.1.7.2",
            "1.2.840.10008.5.1.4.1.1.7.3", "1.2.840.10008.5.1.4.1.1.7.4",
            "1.2.840.10008.5.1.4.1.1.88.67", "1.2.840.10008.5.1.4.1.1.66")),
        RuleConfig(name="localizer", action="exclude", image_type_any=("LOCALIZER",)),
        RuleConfig(name="derived", action="exclude", image_type_any=(
            "DERIVED", "SECONDARY", "MPR", "REFORMATTED", "PROJECTION", "MIP", "MINIP", "VOLUME")),
        RuleConfig(name="scout-or-dose", action="exclude",
                   description_regex=r"scout|topogram|surview|scanogram|localizer|\bdose\b|"
                                     r"patient protocol|\bmip\b|\bminip\b|\bvrt?\b|\bmpr\b"),
        RuleConfig(name="other-body-part", action="exclude", body_part=(
            "HEAD", "BRAIN", "NECK", "PELVIS", "HIP", "KNEE", "LEG", "ANKLE", "FOOT", "HAND", "WRIST",
            "ELBOW", "ARM", "SHOULDER", "EXTREMITY", "CSPINE", "LSPINE", "PANCREAS", "LIVER", "KIDNEY")),
        RuleConfig(name="thick-slices", action="exclude", slice_thickness_min=10.01),
        RuleConfig(name="too-few-slices", action="exclude", slices_max=19),
        RuleConfig(name="chest-ct", action="include", modality=("CT",), sop_class_uid=(CT_IMAGE_STORAGE,),
                   axial_within_deg=5.0, spacing_max=10.0),
    )


@dataclass(frozen=True)
class JobsConfig:
    """Durable inference jobs."""

    #: Attempts before a job is marked failed.
    max_attempts: int = 3
    #: Seconds to wait before each retry of a transiently failed job.
    retry_delays_s: tuple[float, ...] = (30.0, 120.0, 600.0)
    #: Seconds a worker's claim on a job lasts without a heartbeat.
    lease_s: float = 120.0
    #: Seconds between heartbeats of a running job.
    heartbeat_s: float = 20.0
    #: Worker processes ``lungnode run`` starts beside the listener (0 = none; run ``lungnode worker``).
    local_workers: int = 1
    #: Seconds an idle worker sleeps between polls of the job table.
    poll_s: float = 1.0
    #: Deprecated (kept for one release, logged when set): ``module:function(job_pk, ctx)`` run per
    #: job instead of the pipeline. Empty = the pipeline.
    processor: str = ""
    #: Deprecated (kept for one release, logged when set): ``module:function(config)`` building the
    #: engine. Empty = the engine of ``[inference]``.
    engine_factory: str = ""

    def validate(self, key: str) -> None:
        for name in ("processor", "engine_factory"):
            value = getattr(self, name)
            if value and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", value):
                raise ConfigError(f"{key}.{name}", getattr(self, name), "a 'package.module:function' path")
        for i, delay in enumerate(self.retry_delays_s):
            check_range(f"{key}.retry_delays_s[{i}]", delay, 0.0, 7 * 86400)
        check_range(f"{key}.max_attempts", self.max_attempts, 1, 100)
        check_range(f"{key}.lease_s", self.lease_s, 5, 86400)
        check_range(f"{key}.heartbeat_s", self.heartbeat_s, 1, self.lease_s / 2)
        check_range(f"{key}.local_workers", self.local_workers, 0, 64)
        check_range(f"{key}.poll_s", self.poll_s, 0.05, 60)


@dataclass(frozen=True)
class InferenceConfig:
    """The inference engine."""

    #: Model bundle (.safetensors); empty = the bundled demo model.
    model: str = ""
    #: ``auto`` (GPU when present), ``cpu`` or ``cuda``/``cuda:N``.
    device: str = "auto"
    #: Sliding-window overlap (0-0.9).
    overlap: float = 0.25
    #: Left-right mirror test-time augmentation (2 passes: slower, slightly smoother).
    mirror_tta: bool = False
    #: CPU threads for torch; 0 = the cores available.
    threads: int = 0
    #: Connected infiltrate components smaller than this (mL) are removed.
    min_component_ml: float = 0.1
    #: Resample irregular slice spacing instead of rejecting the series.
    allow_resample: bool = False

    def validate(self, key: str) -> None:
        if self.model and not Path(self.model).is_file():
            raise ConfigError(f"{key}.model", self.model, "an existing model bundle file")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"{key}.device", self.device, "'auto', 'cpu', 'cuda' or 'cuda:N'")
        check_range(f"{key}.overlap", self.overlap, 0.0, 0.9)
        check_range(f"{key}.threads", self.threads, 0, 512)
        check_range(f"{key}.min_component_ml", self.min_component_ml, 0.0)
