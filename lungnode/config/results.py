"""Configuration of results: ``[results]`` (quality gate, label), ``[report]`` (regions, severity
score), ``[priors]`` (comparison with the prior exam), ``[[destinations]]`` (DICOM, STOW-RS, shadow)
and ``[delivery]``."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

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
    #: Largest share of predicted infiltrate lying outside the lung mask (0-1); counted inside the
    #: patient's body and above the lung base, where lung could have been missed.
    max_outside_fraction: float = 0.2
    #: Outside-lung infiltrate smaller than this (mL) never holds a result: on a normal chest the
    #: prediction is a few specks, and a share of specks (0.04 of 0.14 mL) is noise, not evidence.
    outside_min_ml: float = 5.0

    def validate(self, key: str) -> None:
        check_range(f"{key}.lung_min_ml", self.lung_min_ml, 0.0)
        check_range(f"{key}.lung_max_ml", self.lung_max_ml, self.lung_min_ml)
        check_range(f"{key}.max_outside_fraction", self.max_outside_fraction, 0.0, 1.0)
        check_range(f"{key}.outside_min_ml", self.outside_min_ml, 0.0)


@dataclass(frozen=True)
class ResultsConfig:
    """The DICOM objects the node writes."""

    #: Series numbers of our outputs start here (SEG +0, SR +1, SC +2, summary +3, PDF +4).
    series_number_base: int = 9100
    #: Manufacturer written into every output (also how loop protection recognises them).
    manufacturer: str = "lungnode"
    #: Start every output's SeriesDescription with "NOT FOR CLINICAL USE" (validation, research).
    label_not_for_clinical_use: bool = False
    quality_gate: QualityGateConfig = field(default_factory=QualityGateConfig)

    def validate(self, key: str) -> None:
        check_range(f"{key}.series_number_base", self.series_number_base, 1, 2**31 - 10)
        self.quality_gate.validate(f"{key}.quality_gate")


#: Objects a destination can get.
RESULT_OBJECTS = ("seg", "sr", "sc", "summary", "pdf")
#: Severity score schemes known by name (``lungnode.inference.severity.SCHEMES``).
SCORE_SCHEMES = ("pan", "chung")
_CUTOFF = re.compile(r"^\s*(>=|>)\s*\d+(\.\d+)?\s*%?\s*$")


@dataclass(frozen=True)
class ReportConfig:
    """The radiologist's report: regions, severity score, high-opacity threshold."""

    #: ``auto`` (lobes when the model declares lobe classes, else zones by the carina or volume
    #: thirds), ``zones`` (never lobes) or ``thirds`` (zones by volume thirds only).
    regions: str = "auto"
    #: Score scheme: ``pan`` (0-5 per region: >0, >=5, >25, >=50, >75 %) or ``chung`` (0-4).
    scheme: str = "pan"
    #: Your own cut-offs instead of the scheme's, e.g. [">0", ">=5", ">25", ">=50", ">75"].
    cutoffs: tuple[str, ...] = ()
    #: High opacity (PHO) is infiltrate above this HU (Chaganti et al. 2020: -200).
    pho_min_hu: float = -200.0

    def validate(self, key: str) -> None:
        if self.regions not in ("auto", "zones", "thirds"):
            raise ConfigError(f"{key}.regions", self.regions, "'auto', 'zones' or 'thirds'")
        if self.scheme not in SCORE_SCHEMES and not self.cutoffs:
            raise ConfigError(f"{key}.scheme", self.scheme,
                              f"one of {', '.join(SCORE_SCHEMES)} (or set cutoffs)")
        values = []
        for c in self.cutoffs:
            if not _CUTOFF.match(c):
                raise ConfigError(f"{key}.cutoffs", list(self.cutoffs), "cut-offs like '>0', '>=5'")
            values.append(float(c.strip().lstrip(">=").rstrip("% ")))
        if values != sorted(values) or (values and values[-1] > 100):
            raise ConfigError(f"{key}.cutoffs", list(self.cutoffs), "ascending percentages 0-100")
        check_range(f"{key}.pho_min_hu", self.pho_min_hu, -1000.0, 1000.0)


@dataclass(frozen=True)
class PriorsConfig:
    """Comparison with the prior exam of the same patient (same Patient ID and Issuer)."""

    #: ``off``, ``local`` (this node's own earlier results) or ``pacs`` (also ask a PACS).
    source: str = "local"
    #: The ``[[destinations]]`` entry to query when ``source = "pacs"``.
    destination: str = ""

    def validate(self, key: str) -> None:
        if self.source not in ("off", "local", "pacs"):
            raise ConfigError(f"{key}.source", self.source, "'off', 'local' or 'pacs'")
        if self.source == "pacs" and not self.destination:
            raise ConfigError(f"{key}.destination", self.destination,
                              "the name of a [[destinations]] entry when source = 'pacs'")


@dataclass(frozen=True)
class DestinationConfig:
    """Where results go: a DICOM peer (C-STORE) or a DICOMweb STOW-RS service."""

    name: str
    #: ``dimse`` (C-STORE to ae_title@host:port) or ``stow-rs`` (DICOMweb POST to ``url``).
    kind: str = "dimse"
    #: ``send``, or ``shadow``: build and record everything, send nothing (validation before go-live).
    mode: str = "send"
    #: DIMSE: the peer's AE title, host and port.
    ae_title: str = ""
    host: str = ""
    port: int = 104
    #: STOW-RS: the DICOMweb root (``…/dicom-web``); results are POSTed to ``<url>/studies``.
    url: str = ""
    #: STOW-RS authentication: ``none``, ``basic`` (``username`` + password in ``secret_file``) or
    #: ``bearer`` (token in ``secret_file``).
    auth: str = "none"
    username: str = ""
    secret_file: str = ""
    #: STOW-RS over https: PEM CA bundle to verify the server (empty: the system's CAs).
    ca: str = ""
    #: Objects to send: any of ``seg``, ``sr``, ``sc`` (burned-in overlay series), ``summary``
    #: (the one-page report as a Secondary Capture), ``pdf`` (the page as Encapsulated PDF).
    objects: tuple[str, ...] = ("seg", "sr", "summary")
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

    @property
    def target(self) -> str:
        """Where it goes, for messages: ``AE@host:port`` or the URL."""
        return self.url if self.kind == "stow-rs" else f"{self.ae_title}@{self.host}:{self.port}"

    def validate(self, key: str) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", self.name):
            raise ConfigError(f"{key}.name", self.name, "1-64 letters, digits, '_', '.', '-'")
        if self.kind not in ("dimse", "stow-rs"):
            raise ConfigError(f"{key}.kind", self.kind, "'dimse' or 'stow-rs'")
        if self.mode not in ("send", "shadow"):
            raise ConfigError(f"{key}.mode", self.mode, "'send' or 'shadow'")
        if self.kind == "dimse":
            check_ae(f"{key}.ae_title", self.ae_title)
            check_ae(f"{key}.calling_ae_title", self.calling_ae_title)
            if not self.host:
                raise ConfigError(f"{key}.host", self.host, "a host name or address")
            check_range(f"{key}.port", self.port, 1, 65535)
            if self.tls.cert or self.tls.key or self.tls.ca:
                self.tls.validate(f"{key}.tls")
        else:
            self._validate_stow(key)
        for obj in self.objects:
            if obj not in RESULT_OBJECTS:
                raise ConfigError(f"{key}.objects", list(self.objects),
                                  f"a list of {', '.join(repr(o) for o in RESULT_OBJECTS)}")
        if self.seg_transfer_syntax not in ("explicit", "jpeg2000"):
            raise ConfigError(f"{key}.seg_transfer_syntax", self.seg_transfer_syntax,
                              "'explicit' or 'jpeg2000'")
        check_range(f"{key}.max_frames_per_seg", self.max_frames_per_seg, 0)

    def _validate_stow(self, key: str) -> None:
        if not re.match(r"^https?://[^\s/]+", self.url):
            raise ConfigError(f"{key}.url", self.url, "an http:// or https:// DICOMweb root URL")
        if self.auth not in ("none", "basic", "bearer"):
            raise ConfigError(f"{key}.auth", self.auth, "'none', 'basic' or 'bearer'")
        if self.auth == "basic" and not self.username:
            raise ConfigError(f"{key}.username", self.username, "a user name when auth = 'basic'")
        if self.auth != "none" and not self.secret_file:
            raise ConfigError(f"{key}.secret_file", self.secret_file,
                              f"a file with the {'password' if self.auth == 'basic' else 'token'}")
        for name in ("secret_file", "ca"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise ConfigError(f"{key}.{name}", path, "an existing readable file")


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
