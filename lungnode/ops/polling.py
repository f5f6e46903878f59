"""A background thread that polls for due work: the loop under the delivery and notification services.

Both services claim one due row at a time (a lease in the database) and send it; between rows
they do the same thing: call the sender's ``run_once`` again at once while it finds work, wait
``poll_s`` when it found none, and survive an unexpected error (the claimed row's lease expires
and it is tried again). :class:`PollingService` is that loop, once; each service subclasses it
with its own sender.
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol

log = logging.getLogger(__name__)


class Poller(Protocol):
    """What a :class:`PollingService` drives: one step of work per call."""

    def run_once(self) -> int:
        """Do at most one unit of due work; return how many rows were handled (0: idle)."""
        ...


class PollingService:
    """A daemon thread calling ``sender.run_once()`` until stopped (a ``lungnode run`` service).

    Parameters
    ----------
    name:
        The service's name (thread name, log lines).
    sender:
        The work: ``run_once()`` returns 0 when nothing was due.
    poll_s:
        Seconds to wait after an idle step.
    enabled:
        ``False``: :meth:`start` starts nothing (e.g. no receiver configured).
    """

    def __init__(self, name: str, sender: Poller, poll_s: float, *, enabled: bool = True) -> None:
        self.name = name
        self.sender = sender
        self.poll_s = poll_s
        self.enabled = enabled
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread (nothing when not enabled)."""
        if not self.enabled:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                handled = self.sender.run_once()
            except Exception:  # keep the service alive; the lease expires and the row is retried
                log.exception("%s loop error", self.name)
                handled = 0
            if not handled:
                self._stop.wait(self.poll_s)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the current step (a row's lease lets another process resume it)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
