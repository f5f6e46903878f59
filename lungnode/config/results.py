"""Configuration of results: ``[results]`` (quality gate), ``[[destinations]]`` and ``[delivery]``."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from lungnode.config.checks import check_ae, check_range
from lungnode.config.node import TlsConfig
from lungnode.config.typed_toml import ConfigError


@dataclass(frozen=True)
class QualityGateConfig:
    """Results failing these checks are held with a reason instead of being sent."""

    enabled: bool = True
    #: Smallest plausible total lung volume in mL (the series may cover only part of the chest).
    lung_min_ml: float = 200.0
    #: Largest plausible total lung volume in mL.
    lung_max_ml: float = 12000.0
    #: Largest share of predicted infiltrate lying outside the lung mask (0-1).
    max_outside_fraction: float = 0.2

    def validate(self, key: str) -> None:
        check_range(f"{key}.lung_min_ml", self.lung_min_ml, 0.0)
        check_range(f"{key}.lung_max_ml", self.lung_max_ml, self.lung_min_ml)
        check_range(f"{key}.max_outside_fraction", self.max_outside_fraction, 0.0, 1.0)


@dataclass(frozen=True)
class ResultsConfig:
    """The DICOM objects the node writes."""

    #: Series numbers of our outputs start here (SEG +0, SR +1, SC +2).
    series_number_base: int = 9100
    #: Manufacturer written into every output (also how loop protection recognises them).
    manufacturer: str = "lungnode"
    quality_gate: QualityGateConfig = field(default_factory=QualityGateConfig)

    def validate(self, key: str) -> None:
        check_range(f"{key}.series_number_base", self.series_number_base, 1, 2**31 - 10)
        self.quality_gate.validate(f"{key}.quality_gate")


@dataclass(frozen=True)
class DestinationConfig:
    """A DICOM peer that receives results."""

    name: str
    ae_title: str
    host: str
    port: int = 104
    #: Objects to send: any of ``seg``, ``sr``, ``sc`` (burned-in overlay series).
    objects: tuple[str, ...] = ("seg", "sr")
    #: SEG transfer syntax: ``explicit`` (Explicit VR Little Endian) or ``jpeg2000`` (lossless).
    seg_transfer_syntax: str = "explicit"
    #: Leave frames without any segment out of the SEG (OHIF misplaces segments when on).
    omit_empty_frames: bool = False
    #: Write one SEG per segment instead of one SEG with both.
    one_seg_per_segment: bool = False
    #: Split a SEG above this many frames (Weasis hides SEGs over 400); 0 = never split.
    max_frames_per_seg: int = 0
    #: Our calling AE title on this association.
    calling_ae_title: str = "LUNGNODE"
    #: DICOM TLS to this peer: on when ``ca`` (peer certificate checked against it, host name =
    #: ``host``) or ``cert``/``key`` (our client certificate) are set.
    tls: TlsConfig = field(default_factory=TlsConfig)

    def validate(self, key: str) -> None:
        if not re.match(r"^[A-Za-z0-9_.-]{1,64}$", self.name):
            raise ConfigError(f"{key}.name", self.name, "1-64 letters, digits, '_', '.', '-'")
        check_ae(f"{key}.ae_title", self.ae_title)
        check_ae(f"{key}.calling_ae_title", self.calling_ae_title)
        if not self.host:
            raise ConfigError(f"{key}.host", self.host, "a host name or address")
        check_range(f"{key}.port", self.port, 1, 65535)
        for obj in self.objects:
            if obj not in ("seg", "sr", "sc"):
                raise ConfigError(f"{key}.objects", list(self.objects), "a list of 'seg', 'sr', 'sc'")
        if self.seg_transfer_syntax not in ("explicit", "jpeg2000"):
            raise ConfigError(f"{key}.seg_transfer_syntax", self.seg_transfer_syntax,
                              "'explicit' or 'jpeg2000'")
        check_range(f"{key}.max_frames_per_seg", self.max_frames_per_seg, 0)
        if self.tls.cert or self.tls.key or self.tls.ca:
            self.tls.validate(f"{key}.tls")


@dataclass(frozen=True)
class DeliveryConfig:
    """Retries of result sending."""

    #: Delay before each retry; after the last, the delivery is dead-lettered.
    retry_delays_s: tuple[float, ...] = (30.0, 120.0, 600.0, 3600.0)
    #: Seconds to wait for the peer's association and DIMSE answers.
    timeout_s: float = 60.0
    #: Seconds a sender's claim on a delivery lasts; renewed after every acknowledged instance.
    lease_s: float = 300.0
    #: Seconds the idle delivery service sleeps between looks for due deliveries.
    poll_s: float = 1.0

    def validate(self, key: str) -> None:
        for i, delay in enumerate(self.retry_delays_s):
            check_range(f"{key}.retry_delays_s[{i}]", delay, 0.0, 7 * 86400)
        check_range(f"{key}.timeout_s", self.timeout_s, 1, 3600)
        check_range(f"{key}.lease_s", self.lease_s, 5, 86400)
        check_range(f"{key}.poll_s", self.poll_s, 0.05, 60)
