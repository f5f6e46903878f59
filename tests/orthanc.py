"""A real Orthanc (Debian ``/usr/sbin/Orthanc``) started on 127.0.0.1 for tests.

:class:`OrthancServer` writes a config JSON into a temp folder (storage and index there, free
DICOM and HTTP ports, no remote access, no authentication, any called AE accepted, no plugins),
starts Orthanc with ``TCP_NODELAY=1`` and waits until its REST API answers. It can be stopped and
started again on the same ports and storage (destination down → back up). Reusable by any test
area: ``from tests.orthanc import OrthancServer`` or the ``orthanc`` fixture in
``tests/node/results/conftest.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.node_process import free_port  # tests/ is on sys.path wherever this module is imported

ORTHANC_BIN = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"




class OrthancServer:
    """One Orthanc process with its own storage.

    Parameters
    ----------
    workdir:
        Folder for the config, storage, index and log.
    aet:
        Orthanc's AE title.
    tls:
        Optional DICOM TLS for Orthanc's listener: PEM paths ``cert``, ``key``, ``ca``.
    dicomweb:
        Load the DICOMweb plugin (Debian ``orthanc-dicomweb``): STOW-RS/QIDO-RS/WADO-RS under
        ``/dicom-web/``.
    users:
        HTTP basic authentication: ``{user: password}`` (none: no authentication).
    """

    def __init__(self, workdir: Path, aet: str = "ORTHANC", tls: dict[str, str] | None = None, *,
                 dicomweb: bool = False, users: dict[str, str] | None = None) -> None:
        self.workdir = Path(workdir)
        self.aet = aet
        #: DICOM TLS: ``{"cert": PEM, "key": PEM, "ca": PEM}`` (client certificates not required).
        self.tls = tls
        self.dicomweb = dicomweb
        self.users = dict(users or {})
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.config_path = self.workdir / "orthanc.json"
        self.log_path = self.workdir / "orthanc.log"

    @staticmethod
    def available() -> bool:
        """Whether the Orthanc binary is installed."""
        return Path(ORTHANC_BIN).exists() or shutil.which("Orthanc") is not None

    def write_config(self) -> None:
        """Write the Orthanc configuration JSON."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "lungnode-test",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "Plugins": [],
            "HttpServerEnabled": True,
            "StorageCompression": False,
            "OverwriteInstances": False,
            "ConcurrentJobs": 1,
            "HttpThreadsCount": 4,
            "DicomThreadsCount": 4,
        }
        if self.dicomweb:
            config["Plugins"] = [DICOMWEB_PLUGIN]
            config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": False}
        if self.users:
            config.update({"AuthenticationEnabled": True, "RegisteredUsers": self.users})
        if self.tls:
            config.update({"DicomTlsEnabled": True, "DicomTlsCertificate": self.tls["cert"],
                           "DicomTlsPrivateKey": self.tls["key"],
                           "DicomTlsTrustedCertificates": self.tls["ca"],
                           "DicomTlsRemoteCertificateRequired": False})
        self.config_path.write_text(json.dumps(config, indent=2))

    def start(self, timeout: float = 30.0) -> None:
        """Start Orthanc and wait for its REST API."""
        if not self.config_path.exists():
            self.write_config()
        env = dict(os.environ, TCP_NODELAY="1")
        binary = ORTHANC_BIN if Path(ORTHANC_BIN).exists() else "Orthanc"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([binary, str(self.config_path)], env=env, stdout=log,
                                         stderr=subprocess.STDOUT, cwd=self.workdir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {self.log_path.read_text()[-2000:]}")
            try:
                self.get("/system")
                return
            except OSError:
                time.sleep(0.1)
        raise TimeoutError("Orthanc did not start")

    def stop(self) -> None:
        """Stop Orthanc (SIGTERM, then SIGKILL)."""
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    @property
    def url(self) -> str:
        """Base URL of the REST API."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb root (with ``dicomweb=True``)."""
        return f"{self.url}/dicom-web"

    def get(self, path: str) -> Any:
        """GET a REST resource and decode its JSON (as the first registered user, if any)."""
        import base64

        request = urllib.request.Request(self.url + path)
        if self.users:
            user, password = next(iter(self.users.items()))
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=5) as resp:
            return json.loads(resp.read())

    def instances(self) -> list[str]:
        """Orthanc ids of every stored instance."""
        return list(self.get("/instances"))

    def instance_tags(self, orthanc_id: str) -> dict[str, Any]:
        """``simplified-tags`` of one instance."""
        return dict(self.get(f"/instances/{orthanc_id}/simplified-tags"))

    def statistics(self) -> dict[str, Any]:
        """``/statistics`` (counts of patients, studies, series, instances)."""
        return dict(self.get("/statistics"))

    def wait_for_instances(self, count: int, timeout: float = 30.0) -> list[str]:
        """Block until at least ``count`` instances are stored; return their ids."""
        deadline = time.monotonic() + timeout
        found: list[str] = []
        while time.monotonic() < deadline:
            found = self.instances()
            if len(found) >= count:
                return found
            time.sleep(0.2)
        raise TimeoutError(f"Orthanc holds {len(found)} instances, expected {count}")
