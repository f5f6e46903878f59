"""Configuration: the shipped config.toml, defaults, and clear errors for bad values."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lungnode.config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parents[1]


def test_shipped_config_toml_is_valid_and_equals_defaults() -> None:
    shipped = load_config(REPO / "config.toml")
    defaults = load_config(None)
    assert shipped.node == defaults.node
    assert shipped.storage == defaults.storage
    assert shipped.rules == defaults.rules
    assert shipped.report == defaults.report and shipped.priors == defaults.priors


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ("[node]\nport = 70000\n", "node.port", "a number in"),
        ("[node]\nport = 'x'\n", "node.port", "an integer"),
        ("[node]\nae_title = 'A\\\\B'\n", "node.ae_title", "AE title"),
        ("[node]\nbogus = 1\n", "node.bogus", "a known key"),
        ("[node]\nbind = 'localhost'\n", "node.bind", "an IP address"),
        ("[node]\nae_title = \"LUNGNODE\\n\"\n", "node.ae_title", "AE title"),
        ("[[destinations]]\nname = \"pacs\\n\"\nae_title = 'P'\nhost = 'h'\n", "destinations[0].name",
         "letters"),
        ("[[notifications]]\nname = 'ris'\nkind = 'hl7'\nurl = \"mllp://ris:2575\\n\"\n",
         "notifications[0].url", "mllp://HOST:PORT"),
        ("[inference]\ndevice = \"cpu\\n\"\n", "inference.device", ""),
        ("[metrics]\nbind = '0.0.0.300'\n", "metrics.bind", "an IP address"),
        ("[[node.peers]]\nae_title = 'PACS'\nhost = 'not-an-ip'\n", "node.peers[0].host", "CIDR"),
        ("[storage]\ndatabase_url = 'mysql://x'\n", "storage.database_url", "postgresql"),
        ("[[destinations]]\nname = 'pacs'\nae_title = 'ORTHANC'\nhost = 'h'\nobjects = ['png']\n",
         "destinations[0].objects", "'summary', 'pdf'"),
        ("[report]\nscheme = 'mine'\n", "report.scheme", "pan, chung"),
        ("[report]\ncutoffs = ['>10', '>5']\n", "report.cutoffs", "ascending"),
        ("[report]\ncutoffs = ['10']\n", "report.cutoffs", "'>0'"),
        ("[report]\nregions = 'segments'\n", "report.regions", "'thirds'"),
        ("[priors]\nsource = 'cloud'\n", "priors.source", "'pacs'"),
        ("[priors]\nsource = 'pacs'\n", "priors.destination", "[[destinations]]"),
        ("[priors]\nsource = 'pacs'\ndestination = 'x'\n", "priors.destination",
         "none configured"),
        ("[[rules]]\nname = 'r'\naction = 'maybe'\n", "rules[0].action", "'include'"),
        ("[[destinations]]\nae_title = 'X'\nhost = 'h'\n", "destinations[0].name", "required"),
    ],
)
def test_bad_values_name_key_value_and_expectation(text: str, key: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert info.value.key == key
    assert expected in str(info.value)


def test_check_config_command_exits_2_on_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[node]\nport = 0\n")
    proc = subprocess.run([sys.executable, "-m", "lungnode.cli", "--config", str(bad), "check-config"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "node.port = 0" in proc.stderr
    ok = subprocess.run([sys.executable, "-m", "lungnode.cli", "--config", str(REPO / "config.toml"),
                         "check-config"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr


def test_deprecated_job_keys_still_work_and_warn_once(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    from lungnode.config import load
    from lungnode.node.dispatch.worker import Worker, run_pipeline
    from tests.node.dispatch import dispatch_procs

    assert load.warn_deprecated(load_config(REPO / "config.toml")) == []  # the shipped file is clean
    load._warned.clear()
    storage = f'[storage]\nroot = "{tmp_path}"\n'
    old = storage + ('[jobs]\nprocessor = "lungnode.node.pipeline:process_job"\n'
                     'engine_factory = "lungnode.node.pipeline:engine_from_config"\n')
    custom = storage + f'[jobs]\nprocessor = "{dispatch_procs.__name__}:record"\n'
    with caplog.at_level("WARNING", logger="lungnode.config.load"):
        configs = [parse_config(old), parse_config(old), parse_config(custom)]
    warned = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    assert len(warned) == 2  # once per key and process, not per load
    assert any("jobs.processor" in m for m in warned) and any("jobs.engine_factory" in m for m in warned)
    # The old built-in paths (modules that moved) still mean the built-in pipeline ...
    worker = Worker(configs[0])
    assert worker.processor is run_pipeline
    worker.db.dispose()
    # ... and another function is still imported and run.
    worker = Worker(configs[2])
    assert worker.processor is dispatch_procs.record
    worker.db.dispose()
