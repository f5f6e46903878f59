"""The whole configuration: :class:`Config` and reading ``config.toml`` once (:func:`load_config`).

:func:`load_config` reads the file named by ``--config``, else ``$LUNGNODE_CONFIG``, else the
embedded defaults, and raises :class:`ConfigError` naming the key, the value and what was expected.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from lungnode.config.dispatch import CompletionConfig, InferenceConfig, JobsConfig, RuleConfig, default_rules
from lungnode.config.node import NodeConfig, StorageConfig
from lungnode.config.ops import LoggingConfig, MetricsConfig, RetentionConfig
from lungnode.config.results import (
    DeliveryConfig,
    DestinationConfig,
    PriorsConfig,
    ReportConfig,
    ResultsConfig,
)
from lungnode.config.typed_toml import ConfigError, build_dataclass
from lungnode.config.web import NotificationConfig, WebConfig

ENV_CONFIG = "LUNGNODE_CONFIG"

log = logging.getLogger(__name__)

#: Keys that still work for one release; setting one logs a warning (once per process).
DEPRECATED_KEYS = {
    "jobs.processor": "the pipeline is built in; tests and benchmarks pass their own processor "
                      "through their launcher",
    "jobs.engine_factory": "the engine is built from [inference]; tests pass their own engine "
                           "through their launcher",
}
_warned: set[str] = set()


def warn_deprecated(config: Config) -> list[str]:
    """Log each deprecated key ``config`` sets (once per process); return the keys set."""
    used = [key for key in DEPRECATED_KEYS
            if getattr(getattr(config, key.split(".")[0]), key.split(".")[1])]
    for key in used:
        if key not in _warned:
            _warned.add(key)
            log.warning("config key %s is deprecated and will be removed in the next release (%s); "
                        "remove it from %s", key, DEPRECATED_KEYS[key], config.source or "the config")
    return used


@dataclass(frozen=True)
class Config:
    """The whole configuration."""

    node: NodeConfig = field(default_factory=NodeConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    completion: CompletionConfig = field(default_factory=CompletionConfig)
    rules: tuple[RuleConfig, ...] = field(default_factory=default_rules)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    results: ResultsConfig = field(default_factory=ResultsConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    priors: PriorsConfig = field(default_factory=PriorsConfig)
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
        notification_names = [n.name for n in self.notifications]
        if len(notification_names) != len(set(notification_names)):
            raise ConfigError("notifications", notification_names, "unique notification names")
        if self.priors.source == "pacs":
            dimse = [d.name for d in self.destinations if d.kind == "dimse"]
            if self.priors.destination not in dimse:
                raise ConfigError("priors.destination", self.priors.destination,
                                  f"one of the DICOM (kind = 'dimse') destinations "
                                  f"({', '.join(dimse) or 'none configured'})")

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
    warn_deprecated(config)
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
