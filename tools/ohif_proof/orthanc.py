"""A throw-away Orthanc (DICOMweb + ServeFolders) on 127.0.0.1 that plays the PACS and serves
the viewer."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tools.ohif_proof.common import DICOMWEB_PLUGIN, OHIF_BASE, SERVE_FOLDERS_PLUGIN, free_port, wait_until


@dataclass
class Orthanc:
    """A throw-away Orthanc on 127.0.0.1 with DICOMweb and ServeFolders (``/ohif`` → ``site``)."""

    workdir: Path
    site: Path
    http_port: int = field(default_factory=free_port)
    dicom_port: int = field(default_factory=free_port)
    aet: str = "ORTHANC"
    #: AE titles allowed to C-STORE into it: (title, port) of peers it knows (C-STORE needs none).
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Base HTTP URL."""
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 30.0) -> None:
        """Write the configuration, start Orthanc and wait until its REST API answers."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "lungnode-viewer-proof",
            "StorageDirectory": str(self.workdir / "db"),
            "IndexDirectory": str(self.workdir / "db"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "UnknownSopClassAccepted": True,
            "StorageCompression": False,
            "SyncStorageArea": False,
            "ConcurrentJobs": 1,
            "HttpThreadsCount": 20,
            "Plugins": [SERVE_FOLDERS_PLUGIN, DICOMWEB_PLUGIN],
            "ServeFolders": {"Folders": {OHIF_BASE: str(self.site)},
                             "Extensions": {".wasm": "application/wasm", ".mjs": "text/javascript",
                                            ".json": "application/json", ".css": "text/css",
                                            ".svg": "image/svg+xml", ".woff2": "font/woff2",
                                            "": "text/html"},
                             "AllowCache": False, "GenerateETag": True},
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True,
                         "WadoRoot": "/wado", "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
        }
        cfg = self.workdir / "orthanc.json"
        cfg.write_text(json.dumps(config, indent=2), encoding="utf-8")
        env = dict(os.environ, TCP_NODELAY="1")
        logf = (self.workdir / "orthanc.log").open("wb")
        self.process = subprocess.Popen(["Orthanc", str(cfg)], stdout=logf, stderr=subprocess.STDOUT,
                                        env=env, cwd=self.workdir)
        wait_until(lambda: self.get_json("/system"), timeout, "Orthanc's REST API")

    def stop(self) -> None:
        """Stop the Orthanc started by :meth:`start`."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def get_json(self, path: str) -> Any:
        """GET ``path`` from the REST API, decoded."""
        with urllib.request.urlopen(self.url + path, timeout=30) as resp:
            return json.loads(resp.read())

    def get_bytes(self, path: str) -> bytes:
        """GET ``path`` from the REST API, raw."""
        with urllib.request.urlopen(self.url + path, timeout=60) as resp:
            return bytes(resp.read())

    def post_instance(self, data: bytes) -> dict[str, Any]:
        """Store one DICOM file (REST POST /instances)."""
        req = urllib.request.Request(self.url + "/instances", data=data, method="POST",
                                     headers={"Content-Type": "application/dicom"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            result: dict[str, Any] = json.loads(resp.read())
            return result

    def series_by_modality(self, study_uid: str) -> dict[str, list[dict[str, Any]]]:
        """The study's series in Orthanc, grouped by Modality (``MainDicomTags``)."""
        found = self.find("Series", {"StudyInstanceUID": study_uid})
        out: dict[str, list[dict[str, Any]]] = {}
        for series in found:
            out.setdefault(series["MainDicomTags"].get("Modality", ""), []).append(series)
        return out

    def find(self, level: str, query: dict[str, str]) -> list[dict[str, Any]]:
        """REST /tools/find with ``Expand``."""
        body = json.dumps({"Level": level, "Query": query, "Expand": True}).encode()
        req = urllib.request.Request(self.url + "/tools/find", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            result: list[dict[str, Any]] = json.loads(resp.read())
            return result


@contextlib.contextmanager
def running_orthanc(workdir: Path, site: Path) -> Iterator[Orthanc]:
    """Start :class:`Orthanc` for the ``with`` block."""
    server = Orthanc(workdir=workdir, site=site)
    try:
        server.start()
        yield server
    finally:
        server.stop()
