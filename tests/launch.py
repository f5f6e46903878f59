"""Tests-only entry point: ``lungnode run`` / ``lungnode worker`` with test hooks injected.

The product has no test hooks: its worker runs the pipeline with the engine of ``[inference]``,
and its sender commits every acknowledgement. Tests, benchmarks and the viewer proof that need
something else start the node through this module instead of ``python -m lungnode.cli``, from the
repository root (``cwd``), so that ``tests``, ``bench`` and ``tools`` import as packages::

    python -m tests.launch --config CFG [--processor MOD:FUNC] [--engine MOD:FUNC]
                           [--fault-before-ack exit:N|hang:N] {run,worker}

``--processor``  what a worker runs per job, ``function(job_pk, ctx) -> JobOutcome``
                 (e.g. ``tests.node.dispatch.dispatch_procs:record``).
``--engine``     builds the inference engine, ``function(config)`` with ``.run(files)``
                 (e.g. ``tools.ohif_proof.populate:threshold_engine``).
``--fault-before-ack``  the delivery sender exits the process (status 70) or blocks forever right
                 after the peer acknowledged its N-th instance and before that is committed: the
                 worst moment for a crash (restart tests).

Everything else is the product's own code: ``run`` builds :class:`~lungnode.node.app.NodeApp` with
its default services, swapping in a worker pool that carries the hooks and a sender with the
fault; ``worker`` is :func:`lungnode.commands.dispatch.worker_command`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from lungnode.config import Config, load_config
from lungnode.logs import configure_logging
from lungnode.node.app import DEFAULT_SERVICES, NodeApp, ServiceFactory
from lungnode.node.dispatch import worker
from lungnode.node.results import delivery
from lungnode.storage.db import Database
from lungnode.storage.filestore import FileStore

log = logging.getLogger(__name__)

#: Exit status of a process killed by ``--fault-before-ack exit:N``.
FAULT_EXIT_STATUS = 70


def load_function(path: str) -> Callable[..., Any]:
    """Import ``package.module:function``."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{path!r} is not 'package.module:function'")
    function: Callable[..., Any] = getattr(importlib.import_module(module_name), attr)
    return function


def parse_fault(text: str) -> tuple[str, int]:
    """``exit:N`` or ``hang:N`` as (mode, N)."""
    mode, _, count = text.partition(":")
    if mode not in ("exit", "hang") or not count.isdigit() or int(count) < 1:
        raise ValueError(f"fault {text!r} is not exit:N or hang:N")
    return mode, int(count)


class FaultySender(delivery.DeliverySender):
    """A delivery sender that crashes right before committing its N-th acknowledgement.

    Parameters
    ----------
    config, db, store:
        As for :class:`~lungnode.node.results.delivery.DeliverySender`.
    fault:
        ``("exit", N)``: the process exits with :data:`FAULT_EXIT_STATUS`; ``("hang", N)``: the
        sending thread blocks forever (the test kills the process).
    """

    def __init__(self, config: Config, db: Database, store: FileStore, fault: tuple[str, int]) -> None:
        super().__init__(config, db, store)
        self.fault_mode, self.fault_after = fault
        self.acks_seen = 0

    def record_ack(self, delivery_id: int, sop_uid: str) -> None:
        """Count the acknowledgement; crash before committing the N-th, else commit it."""
        self.acks_seen += 1
        if self.acks_seen >= self.fault_after:
            log.error("fault injection (%s): before recording acknowledgement %d", self.fault_mode,
                      self.acks_seen)
            if self.fault_mode == "exit":
                os._exit(FAULT_EXIT_STATUS)
            threading.Event().wait()
        super().record_ack(delivery_id, sop_uid)


def node_services(processor: worker.Processor | None, engine_factory: worker.EngineFactory | None,
                  fault: tuple[str, int] | None) -> list[ServiceFactory]:
    """The node's default services with the worker pool and the sender carrying the hooks."""

    def worker_pool(config: Config, db: Database, store: FileStore) -> worker.LocalWorkerPool:
        return worker.LocalWorkerPool(config, processor=processor, engine_factory=engine_factory)

    def sender(config: Config, db: Database, store: FileStore) -> delivery.DeliveryService:
        faulty = FaultySender(config, db, store, fault) if fault else None
        return delivery.DeliveryService(config, db, store, sender=faulty)

    swap: dict[ServiceFactory, ServiceFactory] = {worker.make_service: worker_pool,
                                                  delivery.make_service: sender}
    return [swap.get(factory, factory) for factory in DEFAULT_SERVICES]


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the hooks, then run the node or a worker; return the exit status."""
    parser = argparse.ArgumentParser(prog="python -m tests.launch", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, metavar="PATH")
    parser.add_argument("--processor", default="", metavar="MOD:FUNC")
    parser.add_argument("--engine", default="", metavar="MOD:FUNC")
    parser.add_argument("--fault-before-ack", default="", metavar="exit:N|hang:N")
    parser.add_argument("command", choices=["run", "worker"])
    args = parser.parse_args(argv)
    config = load_config(args.config)
    processor = load_function(args.processor) if args.processor else None
    engine = load_function(args.engine) if args.engine else None
    fault = parse_fault(args.fault_before_ack) if args.fault_before_ack else None
    if args.command == "worker":
        from lungnode.commands.dispatch import worker_command

        return worker_command(config, processor, engine)
    configure_logging(config)
    return NodeApp(config, node_services(processor, engine, fault)).run()


if __name__ == "__main__":
    sys.exit(main())
