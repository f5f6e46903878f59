"""Value checks shared by the configuration sections."""

from __future__ import annotations

import ipaddress
import re

from lungnode.config.typed_toml import ConfigError

_AE_RE = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")  # printable ASCII without backslash


def check_ae(key: str, value: str) -> None:
    """Raise :class:`ConfigError` unless ``value`` is a valid AE title."""
    if not _AE_RE.fullmatch(value) or value.strip() == "":
        raise ConfigError(key, value, "an AE title of 1-16 printable ASCII characters, no backslash")


def check_range(key: str, value: float, low: float | None = None, high: float | None = None) -> None:
    """Raise :class:`ConfigError` unless ``low <= value <= high`` (``None``: unbounded)."""
    if (low is not None and value < low) or (high is not None and value > high):
        raise ConfigError(key, value, f"a number in [{low if low is not None else '-inf'}, "
                                      f"{high if high is not None else 'inf'}]")


def check_ip(key: str, value: str) -> None:
    """Raise :class:`ConfigError` unless ``value`` is an IPv4 or IPv6 address."""
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ConfigError(key, value, "an IP address") from None
