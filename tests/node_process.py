"""Test helpers to run a real ``lungnode run`` process and to send it real DICOM.

Importable from the repository root, by tests, ``bench/`` and ``tools/`` alike
(``from tests.node_process import LungnodeProcess, send_files``; no ``sys.path`` edits):

* :class:`LungnodeProcess` writes a config into a temp folder (storage root there, a free port,
  long completion quiet period, no local workers, metrics off, test peers on 127.0.0.1), starts
  ``python -m lungnode.cli --config … run`` as a subprocess (``python -m tests.launch … run`` when
  it is given test hooks), waits for the port, and stops it with SIGTERM (or ``kill -9``).
  Overrides are nested dicts merged into the config.
* :func:`send_files` is a pynetdicom SCU that sends files with their exact bytes (no decode, no
  re-encode; the request's SOP class/instance come from the file meta) and returns each status.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

#: Calling AE titles the default test config allows from 127.0.0.1.
TEST_PEERS = ("STORESCU", "ECHOSCU", "TESTSCU", "PACS")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 20.0, host: str = "127.0.0.1") -> None:
    """Block until something accepts TCP connections on ``host:port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s")


def toml_value(value: Any) -> str:
    """A scalar, list or dict (inline table) as a TOML value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(config: Mapping[str, Any]) -> str:
    """Write nested dicts as TOML (tables for dicts; lists of dicts as inline tables)."""
    lines: list[str] = []

    def table(prefix: str, data: Mapping[str, Any]) -> None:
        scalars = {k: v for k, v in data.items() if not isinstance(v, Mapping)}
        if prefix:
            lines.append(f"[{prefix}]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in scalars.items())
        lines.append("")
        for key, value in data.items():
            if isinstance(value, Mapping):
                table(f"{prefix}.{key}" if prefix else key, value)

    table("", config)
    return "\n".join(lines)


def merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``overrides`` into a copy of ``base``."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


class LungnodeProcess:
    """A ``lungnode run`` subprocess with a config of its own.

    Parameters
    ----------
    workdir:
        Folder for the config, the storage root (``workdir/store``) and the log.
    overrides:
        Nested config overrides, e.g. ``{"node": {"max_associations": 2}}``.
    port:
        DICOM port (default: a free one).
    hooks:
        Options of :mod:`tests.launch` (``--processor``, ``--engine``, ``--fault-before-ack``); with
        any, the node is started through that launcher.
    """

    def __init__(self, workdir: Path, overrides: Mapping[str, Any] | None = None,
                 port: int | None = None, hooks: Sequence[str] = ()) -> None:
        self.workdir = Path(workdir)
        self.hooks = tuple(hooks)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.root = self.workdir / "store"
        self.config_path = self.workdir / "lungnode.toml"
        self.log_path = self.workdir / "lungnode.log"
        base: dict[str, Any] = {
            "node": {"ae_title": "LUNGNODE", "bind": "127.0.0.1", "port": self.port,
                     "shutdown_grace_s": 10.0,
                     "peers": [{"ae_title": t, "host": "127.0.0.1"} for t in TEST_PEERS]},
            "storage": {"root": str(self.root), "min_free_disk_mb": 0, "fsync": True},
            "completion": {"quiet_period_s": 3600.0, "grace_s": 3.0},
            "jobs": {"local_workers": 0},
            "metrics": {"enabled": False},
        }
        self.config = merge(base, overrides or {})
        self.config_path.write_text(to_toml(self.config))
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def db_url(self) -> str:
        """The node's database URL."""
        url = self.config.get("storage", {}).get("database_url", "")
        return str(url) if url else f"sqlite:///{self.root / 'lungnode.sqlite3'}"

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run another ``lungnode`` subcommand with this config."""
        return subprocess.run([sys.executable, "-m", "lungnode.cli", "--config", str(self.config_path),
                               *args], capture_output=True, text=True, check=check, cwd=REPO,
                              timeout=120)

    def status(self) -> dict[str, Any]:
        """``lungnode status --json``."""
        return dict(json.loads(self.cli("status", "--json").stdout))

    def start(self, timeout: float = 60.0) -> LungnodeProcess:
        """Start ``lungnode run`` and wait until the port accepts connections."""
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()/kill()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        entry = ["tests.launch", *self.hooks] if self.hooks else ["lungnode.cli"]
        self.proc = subprocess.Popen([sys.executable, "-m", *entry, "--config",
                                      str(self.config_path), "run"], stdout=self._log,
                                     stderr=subprocess.STDOUT, cwd=REPO, env=env)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"lungnode run exited with {self.proc.returncode}:\n{self.log()}")
            try:
                wait_for_port(self.port, 0.5)
                return self
            except TimeoutError:
                if time.monotonic() > deadline:
                    self.kill()
                    raise
        return self

    def wait_running(self, timeout: float = 120.0) -> None:
        """Wait until the node logged that every service started (the port opens before)."""
        deadline = time.monotonic() + timeout
        while "lungnode running" not in self.log():
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"lungnode run exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError("lungnode did not finish starting")
            time.sleep(0.05)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; return the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(10)
        self._close_log()
        return code

    def kill(self) -> None:
        """``kill -9`` the node (and its listener children, which are in its process group)."""
        if self.proc is not None and self.proc.poll() is None:
            for pid in self.children():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.kill()
            self.proc.wait(10)
        self._close_log()

    def children(self) -> list[int]:
        """Process ids of the node's direct children (listener processes)."""
        if self.proc is None:
            return []
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        try:
            return [int(p) for p in path.read_text().split()]
        except OSError:
            return []

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def log(self) -> str:
        """The node's log so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> LungnodeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()
        self._close_log()


def send_files(port: int, files: Iterable[Path], *, calling_ae: str = "TESTSCU",
               called_ae: str = "LUNGNODE", tls_args: Any = None, timeout: float = 30.0,
               pause: float = 0.0) -> list[int | None]:
    """Send files with their exact bytes over one association; return each C-STORE status.

    The request's SOP class/instance and the proposed transfer syntax come from each file's meta.
    ``None`` marks an instance without a response (association lost). Raises ``ConnectionError`` if
    the association is not accepted. ``timeout`` is the ACSE/DIMSE/network timeout; ``pause`` a
    sleep after each instance (to keep an association open for a while).
    """
    from pynetdicom import AE, _config
    from pynetdicom.dsutils import split_dataset

    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes, never re-encode
    paths = [Path(f) for f in files]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    contexts: dict[tuple[str, str], None] = {}
    for path in paths:
        meta, _ = split_dataset(path)
        contexts[(str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))] = None
    for sop_class, ts in list(contexts)[:128]:
        ae.add_requested_context(sop_class, ts)
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae, tls_args=tls_args)
    if not assoc.is_established:
        raise ConnectionError("association not accepted")
    statuses: list[int | None] = []
    try:
        for path in paths:
            if not assoc.is_established:
                statuses.append(None)
                continue
            try:
                rsp = assoc.send_c_store(path)
            except (RuntimeError, ValueError):
                statuses.append(None)
                continue
            statuses.append(int(rsp.Status) if "Status" in rsp else None)
            if pause:
                time.sleep(pause)
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses


def dataset_bytes(path: Path) -> bytes:
    """The data set part of a DICOM file (after preamble and file meta)."""
    from pynetdicom.dsutils import split_dataset

    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def stored_files(root: Path) -> list[Path]:
    """Every received instance file under a storage root."""
    return sorted(p for p in root.rglob("*.dcm") if ".tmp" not in p.parts and "results" not in p.parts)
