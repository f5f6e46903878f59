"""The contract of a service that ``lungnode run`` starts beside the listener.

Each area contributes a factory ``make_service(config, db, store) -> Service`` listed (imported,
as a function) in :data:`lungnode.node.app.DEFAULT_SERVICES`. :class:`NodeApp
<lungnode.node.app.NodeApp>` starts services in list order after the listener and stops them in
reverse order after the listener has stopped.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Service(Protocol):
    """A long-running part of the node (scheduler, worker pool, sender, metrics server…)."""

    #: Short name used in logs.
    name: str

    def start(self) -> None:
        """Start in the background and return (raise to refuse starting the node)."""

    def stop(self, timeout: float) -> None:
        """Stop, waiting at most ``timeout`` seconds for work in progress."""
