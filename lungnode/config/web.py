"""Configuration of what admins see and hear: ``[web]`` (status pages) and ``[[notifications]]``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from lungnode.config.checks import check_range
from lungnode.config.typed_toml import ConfigError


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
        check_range(f"{key}.refresh_s", self.refresh_s, 0, 3600)
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
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", self.name):
            raise ConfigError(f"{key}.name", self.name, "1-64 letters, digits, '_', '.', '-'")
        if self.kind not in ("webhook", "hl7"):
            raise ConfigError(f"{key}.kind", self.kind, "'webhook' or 'hl7'")
        if self.kind == "webhook" and not re.match(r"^https?://", self.url):
            raise ConfigError(f"{key}.url", self.url, "an http:// or https:// URL")
        if self.kind == "hl7" and not re.fullmatch(r"mllp://[^/:\s]+:\d+/?", self.url):
            raise ConfigError(f"{key}.url", self.url, "mllp://HOST:PORT")
        for event in self.events:
            if event not in NOTIFICATION_EVENTS:
                raise ConfigError(f"{key}.events", list(self.events),
                                  f"a list of {', '.join(NOTIFICATION_EVENTS)}")
        for name in ("secret_file", "ca"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise ConfigError(f"{key}.{name}", path, "an existing readable file")
        check_range(f"{key}.timeout_s", self.timeout_s, 0.1, 600)
        for i, delay in enumerate(self.retry_delays_s):
            check_range(f"{key}.retry_delays_s[{i}]", delay, 0.0, 7 * 86400)
