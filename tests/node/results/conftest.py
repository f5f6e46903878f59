"""Fixtures of the results tests: a real Orthanc, and a real chest CT result without the model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lungnode.inference.types import InferenceResult
from tests.node.results.results_factory import make_result
from tests.orthanc import OrthancServer


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancServer]:
    """A fresh Orthanc on free 127.0.0.1 ports with its storage in ``tmp_path``."""
    if not OrthancServer.available():
        pytest.skip("Orthanc is not installed")
    server = OrthancServer(tmp_path / "orthanc")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def chest_result(chest_ct_dir: Path) -> InferenceResult:
    """The shared 30-slice chest CT with a threshold lung mask and a ball infiltrate."""
    return make_result(chest_ct_dir)
