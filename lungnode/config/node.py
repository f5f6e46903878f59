"""Configuration of the receiving side: ``[node]`` (DIMSE listener, peers, TLS) and ``[storage]``."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path

from lungnode.config.checks import check_ae, check_ip, check_range
from lungnode.config.typed_toml import ConfigError


@dataclass(frozen=True)
class PeerConfig:
    """A calling AE allowed to send to the node."""

    ae_title: str
    #: Address or network in CIDR notation the association must come from.
    host: str = "127.0.0.1"

    def validate(self, key: str) -> None:
        check_ae(f"{key}.ae_title", self.ae_title)
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
    #: Connections that have not completed their association request (half-open: port scanners,
    #: slow or stuck peers) held at once per listener process; a new one beyond this closes the
    #: oldest of them.
    max_pending_connections: int = 32

    def validate(self, key: str) -> None:
        check_ae(f"{key}.ae_title", self.ae_title)
        check_ip(f"{key}.bind", self.bind)
        check_range(f"{key}.port", self.port, 1, 65535)
        check_range(f"{key}.max_associations", self.max_associations, 1, 1000)
        check_range(f"{key}.listener_processes", self.listener_processes, 1, 64)
        check_range(f"{key}.max_pending_connections", self.max_pending_connections, 1, 1000)
        for i, peer in enumerate(self.peers):
            peer.validate(f"{key}.peers[{i}]")
        self.tls.validate(f"{key}.tls")
        for name in ("acse_timeout_s", "dimse_timeout_s", "network_timeout_s", "shutdown_grace_s"):
            check_range(f"{key}.{name}", getattr(self, name), 0.1, 3600)


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
    #: Largest data set (MiB, as received; deflated ones also after inflating) a C-STORE may carry;
    #: a larger one is refused with 0xA700 (out of resources) while its bytes are dropped.
    max_dataset_mb: int = 2048

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
        check_range(f"{key}.min_free_disk_mb", self.min_free_disk_mb, 0)
        check_range(f"{key}.max_dataset_mb", self.max_dataset_mb, 1, 1 << 20)
        if self.database_url and not re.match(r"^(sqlite|postgresql)(\+\w+)?://", self.database_url):
            raise ConfigError(f"{key}.database_url", self.database_url,
                              "empty, sqlite:///PATH or postgresql+psycopg://USER@HOST/DB")
