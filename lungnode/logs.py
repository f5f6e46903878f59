"""Logging setup shared by every lungnode process (listener, workers, commands).

One format, the configured level, and third-party libraries held at WARNING so their per-PDU or
per-attribute INFO lines (which can carry dataset UIDs) stay out of the log. Patient names and IDs
appear only at DEBUG, in lungnode's own messages.

What a peer sends must not reach the log raw (issue 20): pydicom's warnings about malformed
elements quote the element's value (a patient name, an ID), so Python warnings are routed into
logging (``logging.captureWarnings``) and :class:`PrivacyFilter` drops pydicom's records and the
warnings below ERROR unless the node logs at DEBUG (an ERROR keeps its level, with the text
replaced). :class:`BoundedFormatter` escapes every non-ASCII or control character (``\\xNN``) and
cuts each line of a record at :data:`MAX_LINE_CHARS`, whichever library wrote it (pynetdicom
included: its handlers are the root's).
"""

from __future__ import annotations

import logging
import sys
import traceback

from lungnode.config import Config

#: Libraries whose INFO output is noise for an admin.
QUIET_LIBRARIES = ("pynetdicom", "highdicom", "monai", "apscheduler")
#: Loggers whose messages may quote data set values (pydicom's, and Python warnings, which pydicom
#: also raises); kept out of the log above DEBUG.
VALUE_QUOTING_LOGGERS = ("pydicom", "py.warnings")
#: pynetdicom's value decoding and checking helpers: they log each malformed byte a peer sends
#: (a traceback at ERROR for a non-ASCII UID), while the node logs the malformed PDU itself in one
#: line; held at CRITICAL above DEBUG.
PEER_VALUE_LOGGERS = ("pynetdicom.utils",)
#: Longest line a log record may have (longer ones are cut, saying how much was cut).
MAX_LINE_CHARS = 2000


class PrivacyFilter(logging.Filter):
    """Keep records that may quote data set values out of a log above DEBUG.

    Parameters
    ----------
    level:
        The configured level: at DEBUG every record passes.
    """

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if self.level <= logging.DEBUG:
            return True
        name = record.name
        if not any(name == quoted or name.startswith(quoted + ".") for quoted in VALUE_QUOTING_LOGGERS):
            return True
        if record.levelno < logging.ERROR:
            return False
        record.msg = f"{name} reported an error (its text may quote data set values: see it at DEBUG)"
        record.args = None
        record.exc_info = record.exc_text = None
        return True


class BoundedFormatter(logging.Formatter):
    """A formatter whose output is ASCII (other characters escaped) and whose lines are at most
    :data:`MAX_LINE_CHARS` long."""

    def format(self, record: logging.LogRecord) -> str:
        return bound_text(super().format(record))


def bound_text(text: str, limit: int = MAX_LINE_CHARS) -> str:
    """``text`` with non-ASCII and control characters (but newlines) escaped and each line cut at
    ``limit`` characters."""
    lines = []
    for line in text.split("\n"):
        if not (line.isascii() and line.isprintable()):
            line = "".join(c if " " <= c <= "~" else c.encode("unicode_escape").decode("ascii")
                           for c in line)
        if len(line) > limit:
            line = f"{line[:limit]}... [{len(line) - limit} characters cut]"
        lines.append(line)
    return "\n".join(lines)


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
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(BoundedFormatter(f"%(asctime)s %(levelname)s [{role}] %(name)s: %(message)s"))
    handler.addFilter(PrivacyFilter(level))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.captureWarnings(True)  # warnings go through the handler's filter, not straight to stderr
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
    for name in PEER_VALUE_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if level <= logging.DEBUG else logging.CRITICAL)


def where_raised(exc: BaseException) -> str:
    """Where ``exc`` was raised, without its message: ``ValueError in highdicom/seg/sop.py:123``."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return type(exc).__name__
    path = tb.tb_frame.f_code.co_filename.replace("\\", "/")
    if "/site-packages/" in path:
        where = path.split("/site-packages/", 1)[1]
    else:
        where = "/".join(path.rsplit("/", 2)[-2:])
    return f"{type(exc).__name__} in {where}:{tb.tb_lineno}"


def log_exception(log: logging.Logger, message: str, exc: BaseException, *args: object) -> None:
    """Log an unexpected exception without its message text (which may quote data set values):
    at ERROR the message, the exception type and the stack (code lines only); the exception's own
    text at DEBUG."""
    stack = "".join(traceback.format_tb(exc.__traceback__))
    log.error(message + " (%s)\n%s", *args, where_raised(exc), stack.rstrip())
    log.debug("the exception's text: %s", exc)
