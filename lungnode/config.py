"""The node's configuration: ``config.toml`` read once into typed, validated objects.

Every switch an admin can set lives in one dataclass here, with its default and a one-line meaning
(the commented ``config.toml`` at the repository root mirrors these). :func:`load_config` reads the
file named by ``--config``, else ``$LUNGNODE_CONFIG``, else the embedded defaults, and raises
:class:`ConfigError` naming the key, the value and what was expected.

Sections
--------
``[node]``           DIMSE listener: AE title, address, peers, TLS, timeouts.
``[storage]``        Storage root, database URL, disk watermark.
``[completion]``     When a series counts as complete.
``[[rules]]``        Which series are dispatched (ordered include/exclude rules).
``[jobs]``           Job leases, retries, local workers.
``[inference]``      Model bundle, device, sliding window.
``[results]``        Output series numbering, quality gate.
``[[destinations]]`` Where results are sent (DICOM C-STORE or DICOMweb STOW-RS; or shadow).
``[delivery]``       Send retries.
``[metrics]``        Prometheus and health endpoint.
``[web]``            Status web pages beside ``/metrics``.
``[[notifications]]`` Webhooks told about job and delivery events.
``[retention]``      Cleanup of old data.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from lungnode._typed_toml import ConfigError, build_dataclass

ENV_CONFIG = "LUNGNODE_CONFIG"
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII without backslash


def _check_ae(key: str, value: str) -> None:
    if not _AE_RE.match(value) or value.strip() == "":
        raise ConfigError(key, value, "an AE title of 1-16 printable ASCII characters, no backslash")


def _check_range(key: str, value: float, low: float | None = None, high: float | None = None) -> None:
    if (low is not None and value < low) or (high is not None and value > high):
        raise ConfigError(key, value, f"a number in [{low if low is not None else '-inf'}, "
                                      f"{high if high is not None else 'inf'}]")


@dataclass(frozen=True)
class PeerConfig:
    """A calling AE allowed to send to the node."""

    ae_title: str
    #: Address or network in CIDR notation the association must come from.
    host: str = "127.0.0.1"

    def validate(self, key: str) -> None:
        _check_ae(f"{key}.ae_title", self.ae_title)
        try:
            ipaddress.ip_network(self.host, strict=False)
        except ValueError:
            raise ConfigError(f"{key}.host", self.host, "an IP address or CIDR network") from None

    def allows(self, ae_title: str, address: str) -> bool:
        """Return whether an association from ``ae_title`` at ``address`` matches this peer."""
        if ae_title.strip() != self.ae_title:
            return False
        try:
            return ipaddress.ip_address(address) in ipaddress.ip_network(self.host, strict=False)
        except ValueError:
            return False


@dataclass(frozen=True)
class TlsConfig:
    """DICOM TLS for the listener; off unless both ``cert`` and ``key`` are set."""

    #: PEM certificate chain of the node.
    cert: str = ""
    #: PEM private key of the node.
    key: str = ""
    #: PEM CA bundle that client certificates must chain to; empty: client certificates not checked.
    ca: str = ""
    #: Refuse TLS clients without a certificate signed by ``ca``.
    require_client_cert: bool = False

    @property
    def enabled(self) -> bool:
        """Whether TLS is on."""
        return bool(self.cert and self.key)

    def validate(self, key: str) -> None:
        if bool(self.cert) != bool(self.key):
            raise ConfigError(f"{key}.cert/key", (self.cert, self.key), "both set or both empty")
        if self.require_client_cert and not self.ca:
            raise ConfigError(f"{key}.ca", self.ca, "a CA file when require_client_cert = true")
        for name in ("cert", "key", "ca"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise ConfigError(f"{key}.{name}", path, "an existing readable file")


@dataclass(frozen=True)
class NodeConfig:
    """The DIMSE listener."""

    #: Our AE title; associations calling another title are rejected.
    ae_title: str = "LUNGNODE"
    #: Address to listen on.
    bind: str = "0.0.0.0"
    #: TCP port (11112 is the registered DICOM port; below 1024 needs CAP_NET_BIND_SERVICE).
    port: int = 11112
    #: Concurrent associations accepted per listener process; more are rejected (transient).
    max_associations: int = 16
    #: Receiving processes sharing the port (SO_REUSEPORT); 1 = in the main process only.
    listener_processes: int = 1
    #: Callers allowed to send; an unknown calling AE or address is rejected.
    peers: tuple[PeerConfig, ...] = (PeerConfig("PACS", "127.0.0.1"),)
    #: DICOM TLS.
    tls: TlsConfig = field(default_factory=TlsConfig)
    #: Seconds to wait for association messages (ACSE).
    acse_timeout_s: float = 30.0
    #: Seconds to wait for DIMSE messages.
    dimse_timeout_s: float = 60.0
    #: Seconds of network silence before an association is aborted.
    network_timeout_s: float = 60.0
    #: On SIGTERM, seconds open associations get to finish before they are aborted.
    shutdown_grace_s: float = 30.0

    def validate(self, key: str) -> None:
        _check_ae(f"{key}.ae_title", self.ae_title)
        try:
            ipaddress.ip_address(self.bind)
        except ValueError:
            raise ConfigError(f"{key}.bind", self.bind, "an IP address") from None
        _check_range(f"{key}.port", self.port, 1, 65535)
        _check_range(f"{key}.max_associations", self.max_associations, 1, 1000)
        _check_range(f"{key}.listener_processes", self.listener_processes, 1, 64)
        for i, peer in enumerate(self.peers):
            peer.validate(f"{key}.peers[{i}]")
        self.tls.validate(f"{key}.tls")
        for name in ("acse_timeout_s", "dimse_timeout_s", "network_timeout_s", "shutdown_grace_s"):
            _check_range(f"{key}.{name}", getattr(self, name), 0.1, 3600)


@dataclass(frozen=True)
class StorageConfig:
    """Where instances, results and the database live."""

    #: Storage root: received instances under ``<root>/<Study>/<Series>/<SOP>.dcm``.
    root: str = "/var/lib/lungnode"
    #: SQLAlchemy URL; empty = SQLite file ``<root>/lungnode.sqlite3``; or ``postgresql+psycopg://…``.
    database_url: str = ""
    #: Below this free space (MiB) on the storage root, C-STORE answers 0xA700 (out of resources).
    min_free_disk_mb: int = 2048
    #: fsync files and their folder before acknowledging (turn off only for throw-away test nodes).
    fsync: bool = True
    #: Write received instances with O_DIRECT (straight to disk, no page-cache copy) when fsync is
    #: on and the filesystem takes it; page-cache writes otherwise.
    direct_io: bool = True

    @property
    def root_path(self) -> Path:
        """The storage root as a path."""
        return Path(self.root)

    @property
    def effective_database_url(self) -> str:
        """The database URL, defaulting to SQLite inside the storage root."""
        return self.database_url or f"sqlite:///{Path(self.root) / 'lungnode.sqlite3'}"

    def validate(self, key: str) -> None:
        if not self.root:
            raise ConfigError(f"{key}.root", self.root, "a folder path")
        _check_range(f"{key}.min_free_disk_mb", self.min_free_disk_mb, 0)
        if self.database_url and not re.match(r"^(sqlite|postgresql)(\+\w+)?://", self.database_url):
            raise ConfigError(f"{key}.database_url", self.database_url,
                              "empty, sqlite:///PATH or postgresql+psycopg://USER@HOST/DB")


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
        _check_range(f"{key}.poll_s", self.poll_s, 0.02, 10)
        _check_range(f"{key}.quiet_period_s", self.quiet_period_s, 0.1, 86400)
        _check_range(f"{key}.grace_s", self.grace_s, 0.0, self.quiet_period_s)
        _check_range(f"{key}.spacing_tolerance", self.spacing_tolerance, 0.0, 1.0)


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


#: SOP classes of single-frame CT slices the pipeline reads (CT Image Storage).
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def _default_rules() -> tuple[RuleConfig, ...]:
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
    #: What a worker runs for a claimed job: ``module:function(job_pk, ctx) -> JobOutcome``.
    processor: str = "lungnode.node.pipeline:process_job"
    #: Builds the inference engine once per worker process on first use: ``module:function(config)``.
    engine_factory: str = "lungnode.node.pipeline:engine_from_config"

    def validate(self, key: str) -> None:
        for name in ("processor", "engine_factory"):
            if not re.match(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", getattr(self, name)):
                raise ConfigError(f"{key}.{name}", getattr(self, name), "a 'package.module:function' path")
        for i, delay in enumerate(self.retry_delays_s):
            _check_range(f"{key}.retry_delays_s[{i}]", delay, 0.0, 7 * 86400)
        _check_range(f"{key}.max_attempts", self.max_attempts, 1, 100)
        _check_range(f"{key}.lease_s", self.lease_s, 5, 86400)
        _check_range(f"{key}.heartbeat_s", self.heartbeat_s, 1, self.lease_s / 2)
        _check_range(f"{key}.local_workers", self.local_workers, 0, 64)
        _check_range(f"{key}.poll_s", self.poll_s, 0.05, 60)


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
        if not re.match(r"^(auto|cpu|cuda(:\d+)?)$", self.device):
            raise ConfigError(f"{key}.device", self.device, "'auto', 'cpu', 'cuda' or 'cuda:N'")
        _check_range(f"{key}.overlap", self.overlap, 0.0, 0.9)
        _check_range(f"{key}.threads", self.threads, 0, 512)
        _check_range(f"{key}.min_component_ml", self.min_component_ml, 0.0)


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
        _check_range(f"{key}.lung_min_ml", self.lung_min_ml, 0.0)
        _check_range(f"{key}.lung_max_ml", self.lung_max_ml, self.lung_min_ml)
        _check_range(f"{key}.max_outside_fraction", self.max_outside_fraction, 0.0, 1.0)


@dataclass(frozen=True)
class ResultsConfig:
    """The DICOM objects the node writes."""

    #: Series numbers of our outputs start here (SEG +0, SR +1, SC +2).
    series_number_base: int = 9100
    #: Manufacturer written into every output (also how loop protection recognises them).
    manufacturer: str = "lungnode"
    #: Start every output's SeriesDescription with "NOT FOR CLINICAL USE" (validation, research).
    label_not_for_clinical_use: bool = False
    quality_gate: QualityGateConfig = field(default_factory=QualityGateConfig)

    def validate(self, key: str) -> None:
        _check_range(f"{key}.series_number_base", self.series_number_base, 1, 2**31 - 10)
        self.quality_gate.validate(f"{key}.quality_gate")


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

    @property
    def target(self) -> str:
        """Where it goes, for messages: ``AE@host:port`` or the URL."""
        return self.url if self.kind == "stow-rs" else f"{self.ae_title}@{self.host}:{self.port}"

    def validate(self, key: str) -> None:
        if not re.match(r"^[A-Za-z0-9_.-]{1,64}$", self.name):
            raise ConfigError(f"{key}.name", self.name, "1-64 letters, digits, '_', '.', '-'")
        if self.kind not in ("dimse", "stow-rs"):
            raise ConfigError(f"{key}.kind", self.kind, "'dimse' or 'stow-rs'")
        if self.mode not in ("send", "shadow"):
            raise ConfigError(f"{key}.mode", self.mode, "'send' or 'shadow'")
        if self.kind == "dimse":
            _check_ae(f"{key}.ae_title", self.ae_title)
            _check_ae(f"{key}.calling_ae_title", self.calling_ae_title)
            if not self.host:
                raise ConfigError(f"{key}.host", self.host, "a host name or address")
            _check_range(f"{key}.port", self.port, 1, 65535)
            if self.tls.cert or self.tls.key or self.tls.ca:
                self.tls.validate(f"{key}.tls")
        else:
            self._validate_stow(key)
        for obj in self.objects:
            if obj not in ("seg", "sr", "sc"):
                raise ConfigError(f"{key}.objects", list(self.objects), "a list of 'seg', 'sr', 'sc'")
        if self.seg_transfer_syntax not in ("explicit", "jpeg2000"):
            raise ConfigError(f"{key}.seg_transfer_syntax", self.seg_transfer_syntax,
                              "'explicit' or 'jpeg2000'")
        _check_range(f"{key}.max_frames_per_seg", self.max_frames_per_seg, 0)

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
            _check_range(f"{key}.retry_delays_s[{i}]", delay, 0.0, 7 * 86400)
        _check_range(f"{key}.timeout_s", self.timeout_s, 1, 3600)
        _check_range(f"{key}.lease_s", self.lease_s, 5, 86400)
        _check_range(f"{key}.poll_s", self.poll_s, 0.05, 60)


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus metrics and ``/healthz``."""

    #: Serve ``/metrics`` and ``/healthz`` over HTTP.
    enabled: bool = True
    #: Address of the HTTP endpoint (loopback by default; it has no authentication).
    bind: str = "127.0.0.1"
    #: TCP port of the HTTP endpoint.
    port: int = 9110
    #: Local folder where processes share metric files; empty: ``$PROMETHEUS_MULTIPROC_DIR``, else
    #: ``$RUNTIME_DIRECTORY/metrics`` (systemd), else ``<storage.root>/.metrics``. Never on NFS.
    multiprocess_dir: str = ""
    #: A local worker whose last poll of the job table is older than this (s) counts as dead.
    worker_stale_s: float = 60.0
    #: ``/healthz`` fails when a due job waited this long (s) and no job started or finished meanwhile.
    queue_stall_s: float = 900.0

    def validate(self, key: str) -> None:
        try:
            ipaddress.ip_address(self.bind)
        except ValueError:
            raise ConfigError(f"{key}.bind", self.bind, "an IP address") from None
        _check_range(f"{key}.port", self.port, 1, 65535)
        _check_range(f"{key}.worker_stale_s", self.worker_stale_s, 1, 86400)
        _check_range(f"{key}.queue_stall_s", self.queue_stall_s, 1, 7 * 86400)


@dataclass(frozen=True)
class WebConfig:
    """The status web pages, served beside ``/metrics`` on ``[metrics] bind:port``."""

    #: Serve the pages (``/``, ``/series/UID``, ``/jobs/N``); needs ``[metrics] enabled``.
    enabled: bool = True
    #: Show patient names, IDs and birth dates (off: UIDs, accession numbers and dates only).
    show_patient_data: bool = False
    #: Offer release, retry, resend and reprocess buttons (each needs a token from ``token_file``).
    actions: bool = False
    #: File with one ``NAME:TOKEN`` per line (``NAME`` is recorded in the audit trail as who acted).
    token_file: str = ""
    #: Seconds between automatic reloads of a page (HTML meta refresh).
    refresh_s: int = 30
    #: Base URL of the pages as others reach them (links in notifications); empty:
    #: ``http://<metrics.bind>:<metrics.port>``.
    public_url: str = ""

    def validate(self, key: str) -> None:
        if self.actions and not self.token_file:
            raise ConfigError(f"{key}.token_file", self.token_file, "a token file when actions = true")
        if self.token_file and not Path(self.token_file).is_file():
            raise ConfigError(f"{key}.token_file", self.token_file, "an existing readable file")
        _check_range(f"{key}.refresh_s", self.refresh_s, 0, 3600)
        if self.public_url and not re.match(r"^https?://", self.public_url):
            raise ConfigError(f"{key}.public_url", self.public_url, "empty or an http(s):// URL")


#: Events a notification can subscribe to.
NOTIFICATION_EVENTS = ("done", "held", "failed", "delivered", "dead_letter")


@dataclass(frozen=True)
class NotificationConfig:
    """Someone told about job and delivery events: a webhook (HTTP POST of JSON) or HL7 ORU^R01."""

    name: str
    #: ``webhook`` (HTTP POST of a JSON body) or ``hl7`` (ORU^R01 over MLLP).
    kind: str = "webhook"
    #: ``http(s)://…`` for a webhook, ``mllp://HOST:PORT`` for hl7.
    url: str = ""
    #: Which events: any of ``done``, ``held``, ``failed``, ``delivered``, ``dead_letter``.
    events: tuple[str, ...] = ("done", "held", "failed", "dead_letter")
    #: File holding the HMAC-SHA256 key; the body's signature goes into ``X-Lungnode-Signature``.
    secret_file: str = ""
    #: Put patient name and ID into the body (hl7: into PID; most RIS need them).
    include_patient_data: bool = False
    #: PEM CA bundle to verify an https:// receiver (empty: the system's CAs).
    ca: str = ""
    #: Seconds to wait for the receiver.
    timeout_s: float = 10.0
    #: Delay before each retry; after the last one the notification is dead-lettered.
    retry_delays_s: tuple[float, ...] = (10.0, 60.0, 300.0, 1800.0, 3600.0)

    def validate(self, key: str) -> None:
        if not re.match(r"^[A-Za-z0-9_.-]{1,64}$", self.name):
            raise ConfigError(f"{key}.name", self.name, "1-64 letters, digits, '_', '.', '-'")
        if self.kind not in ("webhook", "hl7"):
            raise ConfigError(f"{key}.kind", self.kind, "'webhook' or 'hl7'")
        if self.kind == "webhook" and not re.match(r"^https?://", self.url):
            raise ConfigError(f"{key}.url", self.url, "an http:// or https:// URL")
        if self.kind == "hl7" and not re.match(r"^mllp://[^/:]+:\d+/?$", self.url):
            raise ConfigError(f"{key}.url", self.url, "mllp://HOST:PORT")
        for event in self.events:
            if event not in NOTIFICATION_EVENTS:
                raise ConfigError(f"{key}.events", list(self.events),
                                  f"a list of {', '.join(NOTIFICATION_EVENTS)}")
        for name in ("secret_file", "ca"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise ConfigError(f"{key}.{name}", path, "an existing readable file")
        _check_range(f"{key}.timeout_s", self.timeout_s, 0.1, 600)
        for i, delay in enumerate(self.retry_delays_s):
            _check_range(f"{key}.retry_delays_s[{i}]", delay, 0.0, 7 * 86400)


@dataclass(frozen=True)
class RetentionConfig:
    """Cleanup of received instances and results."""

    #: Delete data older than this many days (0 = keep forever).
    keep_days: int = 30
    #: Also delete oldest first while free disk (MiB) is below this; 0 = off.
    free_disk_target_mb: int = 0
    #: Hours between cleanup runs.
    interval_h: float = 6.0
    #: Run the scheduled cleanup inside ``lungnode run`` (``lungnode cleanup`` works either way).
    scheduled: bool = True

    def validate(self, key: str) -> None:
        _check_range(f"{key}.keep_days", self.keep_days, 0)
        _check_range(f"{key}.free_disk_target_mb", self.free_disk_target_mb, 0)
        _check_range(f"{key}.interval_h", self.interval_h, 0.01)


@dataclass(frozen=True)
class LoggingConfig:
    """Logging."""

    #: ``DEBUG``, ``INFO``, ``WARNING`` or ``ERROR``. Patient data appears only at DEBUG.
    level: str = "INFO"

    def validate(self, key: str) -> None:
        if self.level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"{key}.level", self.level, "DEBUG, INFO, WARNING or ERROR")


@dataclass(frozen=True)
class Config:
    """The whole configuration."""

    node: NodeConfig = field(default_factory=NodeConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    completion: CompletionConfig = field(default_factory=CompletionConfig)
    rules: tuple[RuleConfig, ...] = field(default_factory=_default_rules)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    results: ResultsConfig = field(default_factory=ResultsConfig)
    destinations: tuple[DestinationConfig, ...] = ()
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    web: WebConfig = field(default_factory=WebConfig)
    notifications: tuple[NotificationConfig, ...] = ()
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    #: The file this was read from (None: embedded defaults).
    source: str | None = field(default=None, metadata={"internal": True})

    def validate(self) -> None:
        """Check every section; raise :class:`ConfigError` on the first bad value."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                for i, item in enumerate(value):
                    item.validate(f"{f.name}[{i}]")
            elif hasattr(value, "validate"):
                value.validate(f.name)
        names = [d.name for d in self.destinations]
        if len(names) != len(set(names)):
            raise ConfigError("destinations", names, "unique destination names")
        names = [n.name for n in self.notifications]
        if len(names) != len(set(names)):
            raise ConfigError("notifications", names, "unique notification names")

    def destination(self, name: str) -> DestinationConfig:
        """Return the destination called ``name`` (KeyError if none)."""
        for dest in self.destinations:
            if dest.name == name:
                return dest
        raise KeyError(name)


def parse_config(text: str, source: str | None = None) -> Config:
    """Parse and validate TOML text.

    Parameters
    ----------
    text:
        The TOML document.
    source:
        Where it came from, for messages.

    Returns
    -------
    Config
        The validated configuration.
    """
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source or "<config>", None, f"valid TOML ({exc})") from None
    config = build_dataclass(Config, table, "")
    config = dataclasses.replace(config, source=source)
    config.validate()
    return config


def config_path(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """Return the config file to read: ``explicit``, else ``$LUNGNODE_CONFIG``, else none."""
    if explicit:
        return Path(explicit)
    env = os.environ.get(ENV_CONFIG)
    return Path(env) if env else None


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read the configuration once.

    Parameters
    ----------
    path:
        A TOML file; ``None`` uses ``$LUNGNODE_CONFIG`` or else the embedded defaults.

    Returns
    -------
    Config
        The validated configuration.

    Raises
    ------
    ConfigError
        The file is missing, unreadable or has a bad value.
    """
    file = config_path(path)
    if file is None:
        config = Config()
        config.validate()
        return config
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(file), None, f"a readable file ({exc.strerror})") from None
    return parse_config(text, source=str(file))
