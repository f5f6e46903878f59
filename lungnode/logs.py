"""Logging setup shared by every lungnode process (listener, workers, commands).

One format, the configured level, and third-party libraries held at WARNING so their per-PDU or
per-attribute INFO lines (which can carry dataset UIDs) stay out of the log. Patient names and IDs
appear only at DEBUG, in lungnode's own messages.
"""

from __future__ import annotations

import logging
import sys

from lungnode.config import Config

#: Libraries whose INFO output is noise for an admin.
QUIET_LIBRARIES = ("pynetdicom", "highdicom", "monai", "apscheduler")


def configure_logging(config: Config, role: str = "%(processName)s") -> None:
    """Log to stderr (the journal under systemd) at ``[logging] level``.

    Parameters
    ----------
    config:
        The configuration.
    role:
        What the process is, shown in every line (e.g. ``"worker %(process)d"``).
    """
    level = getattr(logging, config.logging.level.upper(), logging.INFO)
    logging.basicConfig(level=level, stream=sys.stderr, force=True,
                        format=f"%(asctime)s %(levelname)s [{role}] %(name)s: %(message)s")
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
