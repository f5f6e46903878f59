"""The systemd units: ``systemd-analyze verify`` passes and the node's exposure is at most 3.0;
``install.sh`` stages the units and the configuration."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from lungnode.config import load_config
from tests.conftest import REPO

SYSTEMD = REPO / "systemd"
VENV_LUNGNODE = REPO / ".venv" / "bin" / "lungnode"
NODE_MAX_EXPOSURE = 3.0
WORKER_MAX_EXPOSURE = 3.0


def _analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd): units not checked")
    return tool


def _staged(tmp_path: Path, name: str, as_name: str | None = None) -> Path:
    """The unit with ExecStart pointing at this checkout's venv (verify needs the program)."""
    text = (SYSTEMD / name).read_text()
    assert "/opt/lungnode/venv/bin/lungnode" in text
    if VENV_LUNGNODE.exists():
        text = text.replace("/opt/lungnode/venv/bin/lungnode", str(VENV_LUNGNODE))
    target = tmp_path / (as_name or name)
    target.write_text(text)
    return target


def _exposure(tool: str, unit: Path) -> float:
    version = subprocess.run([tool, "--version"], capture_output=True, text=True).stdout
    match = re.search(r"systemd (\d+)", version)
    if not match or int(match.group(1)) < 252:
        pytest.skip(f"systemd-analyze {version.split()[1] if version else '?'} has no --offline (needs 252)")
    proc = subprocess.run([tool, "security", "--offline=true", "--no-pager", str(unit)],
                          capture_output=True, text=True)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout + proc.stderr)
    assert found, proc.stdout + proc.stderr
    return float(found.group(1))


@pytest.mark.parametrize(("name", "as_name"), [("lungnode.service", None),
                                               ("lungnode-worker@.service", "lungnode-worker@0.service")])
def test_units_verify(tmp_path: Path, name: str, as_name: str | None) -> None:
    tool = _analyze()
    unit = _staged(tmp_path, name, as_name)
    proc = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr  # no unknown keys or other warnings


def test_node_unit_exposure(tmp_path: Path) -> None:
    tool = _analyze()
    exposure = _exposure(tool, _staged(tmp_path, "lungnode.service"))
    print(f"lungnode.service exposure {exposure}")
    assert exposure <= NODE_MAX_EXPOSURE


def test_worker_unit_exposure(tmp_path: Path) -> None:
    tool = _analyze()
    exposure = _exposure(tool, _staged(tmp_path, "lungnode-worker@.service", "lungnode-worker@0.service"))
    print(f"lungnode-worker@0.service exposure {exposure}")
    assert exposure <= WORKER_MAX_EXPOSURE


def test_unit_settings_match_the_brief() -> None:
    node = (SYSTEMD / "lungnode.service").read_text()
    worker = (SYSTEMD / "lungnode-worker@.service").read_text()
    for text in (node, worker):
        for line in ("User=lungnode", "StateDirectory=lungnode", "Restart=on-failure",
                     "ProtectSystem=strict", "PrivateTmp=yes", "NoNewPrivileges=yes",
                     "CapabilityBoundingSet=\n"):
            assert line in text, line
    assert "ExecStart=/opt/lungnode/venv/bin/lungnode --config /etc/lungnode/config.toml run" in node
    assert "PrivateDevices=yes" in node
    assert "PrivateDevices=no" in worker and "DeviceAllow=/dev/nvidiactl rw" in worker


def test_install_script_stages_units_and_config(tmp_path: Path) -> None:
    stage = tmp_path / "stage"
    proc = subprocess.run(["sh", str(SYSTEMD / "install.sh"), "--destdir", str(stage)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    units = stage / "etc" / "systemd" / "system"
    assert (units / "lungnode.service").read_text() == (SYSTEMD / "lungnode.service").read_text()
    assert (units / "lungnode-worker@.service").exists()
    conf = stage / "etc" / "lungnode" / "config.toml"
    assert oct(conf.stat().st_mode & 0o777) == "0o640"
    config = load_config(conf)  # the installed configuration is valid and points at StateDirectory
    assert config.storage.root == "/var/lib/lungnode"
    conf.write_text(conf.read_text() + "# admin edit\n")
    subprocess.run(["sh", str(SYSTEMD / "install.sh"), "--destdir", str(stage)], check=True,
                   capture_output=True)
    assert conf.read_text().endswith("# admin edit\n")  # never overwritten
