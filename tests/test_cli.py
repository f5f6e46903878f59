"""``--config`` before and after every subcommand (issue 22, part 1)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lungnode.cli import build_parser, main

REPO = Path(__file__).resolve().parents[2]


def _leaf_parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.append((*path, name))
                out += _leaf_parsers(sub, (*path, name))
    return out


def test_every_subcommand_help_shows_config(capsys: pytest.CaptureFixture[str]) -> None:
    commands = _leaf_parsers(build_parser())
    assert ("run",) in commands and ("rules", "dry-run") in commands and ("training", "train") in commands
    for command in commands:
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args([*command, "--help"])
        assert exc.value.code == 0
        assert "--config PATH" in capsys.readouterr().out, command


@pytest.mark.parametrize("argv", [
    ["--config", "{cfg}", "status", "--json"],
    ["status", "--config", "{cfg}", "--json"],
    ["status", "--json", "--config", "{cfg}"],
    ["--config", "/nonexistent.toml", "status", "--config", "{cfg}", "--json"],
])
def test_config_before_or_after_subcommand(tmp_path: Path, argv: list[str],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[storage]\nroot = "{tmp_path / "store"}"\nmin_free_disk_mb = 0\n')
    assert main([a.replace("{cfg}", str(cfg)) for a in argv]) == 0
    assert json.loads(capsys.readouterr().out)["storage_root"] == str(tmp_path / "store")


def test_config_after_nested_subcommand_and_bad_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[storage]\nroot = "{tmp_path / "store"}"\n')
    ok = subprocess.run([sys.executable, "-m", "lungnode.cli", "rules", "dry-run", "--config", str(cfg)],
                        capture_output=True, text=True, cwd=REPO, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "0 series" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "lungnode.cli", "check-config", "--config",
                          str(tmp_path / "missing.toml")], capture_output=True, text=True, cwd=REPO,
                         timeout=120)
    assert bad.returncode == 2
    assert "missing.toml" in bad.stderr


def test_check_config_names_shadow_destinations_and_the_pages(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[storage]\nroot = "{tmp_path}"\n[metrics]\nport = 9333\n'
                   '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nmode = "shadow"\n'
                   '[[notifications]]\nname = "hook"\nurl = "http://127.0.0.1:1/x"\n')
    assert main(["check-config", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "1 destination(s)" in out and "1 notification(s)" in out
    assert "shadow mode (nothing is sent): pacs" in out
    assert "status pages: http://127.0.0.1:9333/" in out
