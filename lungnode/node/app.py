"""The ``lungnode run`` process: storage, startup recovery, listener, services, clean stop.

:class:`NodeApp` opens the database and file store, recovers from a crash (removes temp files,
indexes files without rows, closes association rows left open), starts the listener (see
:mod:`lungnode.node.ingest.listener`), then every service of :data:`DEFAULT_SERVICES` (or the
factories it is given: the tests' launcher swaps in its own worker pool and sender). On SIGTERM or
SIGINT it stops the listener first (no new associations; open ones get ``node.shutdown_grace_s``),
then the services in reverse order, and writes the clean-shutdown marker.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Sequence
from types import FrameType

from lungnode.config import Config
from lungnode.node.dispatch import completion, worker
from lungnode.node.ingest.catalog import Catalog
from lungnode.node.ingest.listener import Listener, ingest_file_store
from lungnode.node.results import delivery
from lungnode.node.service import Service
from lungnode.node.web import app as web_app
from lungnode.ops import notify, retention
from lungnode.ops.metrics import setup_from_config
from lungnode.storage.db import Database
from lungnode.storage.filestore import FileStore

log = logging.getLogger(__name__)

#: ``make_service(config, db, store) -> Service``: builds one background service.
ServiceFactory = Callable[[Config, Database, FileStore], Service]

#: The services ``lungnode run`` starts after the listener, in this order (stopped in reverse):
#: completion scheduler, local worker pool, delivery sender, metrics/health server with the status
#: pages, notification sender, retention.
DEFAULT_SERVICES: tuple[ServiceFactory, ...] = (
    completion.make_service,
    worker.make_service,
    delivery.make_service,
    web_app.make_service,
    notify.make_service,
    retention.make_service,
)


class NodeApp:
    """The node process.

    Parameters
    ----------
    config:
        The validated configuration.
    services:
        The service factories to start after the listener (default :data:`DEFAULT_SERVICES`).
    """

    def __init__(self, config: Config, services: Sequence[ServiceFactory] = DEFAULT_SERVICES) -> None:
        self.config = config
        self.service_factories = tuple(services)
        self.db = Database(config.storage.effective_database_url)
        self.store = ingest_file_store(config)
        self.catalog = Catalog(self.db, self.store, config.completion.quiet_period_s)
        self.listener = Listener(config, self.db, self.store)
        self.services: list[Service] = []
        self._stop = threading.Event()

    def recover(self) -> dict[str, int]:
        """Startup recovery: temp files, files without rows, association rows left open."""
        removed = self.store.remove_temp_files()
        counts = self.catalog.reconcile()
        closed = self.catalog.close_open_associations("interrupted")
        if removed or closed or counts["indexed"] or counts["deleted"]:
            log.warning("recovery: %d temp file(s) removed, %d file(s) indexed, %d deleted, "
                        "%d association row(s) closed", removed, counts["indexed"], counts["deleted"],
                        closed)
        return {"temp_removed": removed, "associations_closed": closed, **counts}

    def start(self) -> None:
        """Recover, start the listener, then the services."""
        # Shared metrics folder, exported in the environment before any child process starts.
        setup_from_config(self.config.storage.root, self.config.metrics.multiprocess_dir)
        self.recover()
        self.listener.start()
        for factory in self.service_factories:
            service = factory(self.config, self.db, self.store)
            service.start()
            self.services.append(service)
            log.info("service %s started", service.name)

    def stop(self) -> None:
        """Stop the listener (grace for open associations), then the services in reverse order."""
        grace = self.config.node.shutdown_grace_s
        self.listener.stop(grace)
        for service in reversed(self.services):
            try:
                service.stop(grace)
            except Exception:
                log.exception("service %s did not stop cleanly", service.name)
        self.services.clear()
        self.catalog.close_open_associations("aborted-shutdown")
        self.catalog.mark_clean_shutdown()
        self.db.dispose()

    def request_stop(self, signum: int = signal.SIGTERM, _frame: FrameType | None = None) -> None:
        """Signal handler: ask :meth:`run` to stop."""
        log.info("signal %d: stopping (grace %.0f s)", signum, self.config.node.shutdown_grace_s)
        self._stop.set()

    def run(self) -> int:
        """Run in the foreground until SIGTERM/SIGINT; return the exit status."""
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        try:
            self.start()
        except Exception:
            log.exception("node did not start")
            self.listener.stop(0.1)
            return 1
        log.info("lungnode running (AE %s, port %d, %d listener process(es))", self.config.node.ae_title,
                 self.config.node.port, self.config.node.listener_processes)
        while not self._stop.wait(1.0):
            pass
        self.stop()
        log.info("lungnode stopped")
        # Everything is stopped and recorded. A late SIGTERM (a supervisor repeating it) must not
        # turn the clean exit into a kill: at interpreter exit Python puts back the default
        # action of every signal it handled, but leaves ignored ones ignored.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        return 0
