"""Fixtures of the viewer proof: prerequisites, the OHIF dist, and the artefact folder.

The steps themselves live in ``tools/ohif_proof`` (command line: ``tools/viewer_proof.py``, a script that
leaves the pictures).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tools import viewer_proof

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def viewer_prerequisites() -> None:
    """Skip (with what is missing) unless Orthanc, its plugins, Chromium, npm and Selenium exist."""
    missing = viewer_proof.missing_prerequisites()
    if missing:
        pytest.skip("viewer proof needs: " + "; ".join(missing))


@pytest.fixture(scope="session")
def viewer_artifacts() -> Path:
    """Where the screenshots are kept: ``$LUNGNODE_VIEWER_ARTIFACTS`` or ``test-artifacts/viewer``."""
    path = Path(os.environ.get("LUNGNODE_VIEWER_ARTIFACTS", REPO / "test-artifacts" / "viewer"))
    path.mkdir(parents=True, exist_ok=True)
    return path
