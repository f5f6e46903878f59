"""Viewer proof: lungnode's SEG, SR and overlay series shown by a real OHIF viewer in headless Chromium.

What it does
------------
1. Fetches the prebuilt OHIF viewer (npm package ``@ohif/app``, pinned to :data:`OHIF_VERSION`, its
   ``dist/`` folder) with ``npm pack`` into the git-ignored cache ``.cache/ohif`` and prepares a copy
   served under ``/ohif/`` (the dist is built for ``/``: its public path is rewritten, the SPA routes
   ``viewer`` and ``segmentation`` become copies of ``index.html``, and ``app-config.js`` points the
   DICOMweb data source at the same origin).
2. Starts a throw-away Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``) on 127.0.0.1 whose
   ServeFolders plugin serves that folder at ``/ohif`` — viewer and DICOMweb on one origin, no CORS.
3. Puts a chest CT and its results into Orthanc: either through ``lungnode run`` (the real flow:
   storescu → node → C-STORE of SEG/SR/SC to Orthanc), or, as a harness, a SEG made here with
   highdicom from a threshold lung mask (``--source harness``).
4. Opens the study in headless Chromium (Debian ``chromium`` + ``chromium-driver``, driven by
   Selenium), loads the SEG, steps to a slice with mask content and one without using the keyboard,
   and takes screenshots of the viewport; the Secondary Capture series and the SR are opened too.
5. Analyses the screenshots with numpy: segment colours present/absent, overlay inside the lung
   region of the rendered CT.

Run ``.venv/bin/python -m tools.viewer_proof --out test-artifacts/viewer`` from the repository root
and look at the PNGs.
The test ``tests/viewer/test_ohif_viewer.py`` runs the same steps with assertions.

The steps live in the package ``tools/ohif_proof`` (one module per part: ``site``, ``orthanc``,
``harness_seg``, ``images``, ``browser``, ``checks``, ``populate``, ``proof``); this script is its
command line and names what the tests use.
"""

from __future__ import annotations

import sys

from tools.ohif_proof.checks import SliceCheck
from tools.ohif_proof.common import missing_prerequisites
from tools.ohif_proof.images import load_png
from tools.ohif_proof.proof import ProofReport, main, run_proof

__all__ = ["ProofReport", "SliceCheck", "load_png", "main", "missing_prerequisites", "run_proof"]

if __name__ == "__main__":
    sys.exit(main())
