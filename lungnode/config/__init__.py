"""The node's configuration: ``config.toml`` read once into typed, validated objects.

Every switch an admin can set lives in one dataclass of this package (one module per group of
sections), with its default and a one-line meaning
(the commented ``config.toml`` at the repository root mirrors these). :func:`load_config` (in
:mod:`~lungnode.config.load`) reads it. Import everything from ``lungnode.config``.

Sections
--------
``[node]``           DIMSE listener: AE title, address, peers, TLS, timeouts.
``[storage]``        Storage root, database URL, disk watermark.
``[completion]``     When a series counts as complete.
``[[rules]]``        Which series are dispatched (ordered include/exclude rules).
``[jobs]``           Job leases, retries, local workers.
``[inference]``      Model bundle, device, sliding window.
``[results]``        Output series numbering, quality gate.
``[report]``         Regions (zones or lobes), severity score scheme, high-opacity threshold.
``[priors]``         Comparison with the prior exam (off, local, pacs).
``[[destinations]]`` Where results are sent (DICOM C-STORE or DICOMweb STOW-RS; or shadow).
``[delivery]``       Send retries.
``[metrics]``        Prometheus and health endpoint.
``[web]``            Status web pages beside ``/metrics``.
``[[notifications]]`` Webhooks and HL7 messages about job and delivery events.
``[retention]``      Cleanup of old data.
"""

from lungnode.config.dispatch import (
    CompletionConfig,
    InferenceConfig,
    JobsConfig,
    RuleConfig,
)
from lungnode.config.load import ENV_CONFIG, Config, config_path, load_config, parse_config
from lungnode.config.node import NodeConfig, PeerConfig, StorageConfig, TlsConfig
from lungnode.config.ops import LoggingConfig, MetricsConfig, RetentionConfig
from lungnode.config.results import (
    DeliveryConfig,
    DestinationConfig,
    PriorsConfig,
    QualityGateConfig,
    ReportConfig,
    ResultsConfig,
)
from lungnode.config.typed_toml import ConfigError
from lungnode.config.web import NOTIFICATION_EVENTS, NotificationConfig, WebConfig

__all__ = [
    "ENV_CONFIG", "NOTIFICATION_EVENTS", "CompletionConfig", "Config", "ConfigError", "DeliveryConfig",
    "DestinationConfig", "InferenceConfig", "JobsConfig", "LoggingConfig", "MetricsConfig", "NodeConfig",
    "NotificationConfig", "PeerConfig", "PriorsConfig", "QualityGateConfig", "ReportConfig",
    "ResultsConfig", "RetentionConfig", "RuleConfig", "StorageConfig", "TlsConfig", "WebConfig",
    "config_path", "load_config", "parse_config",
]
