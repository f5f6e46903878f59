"""Viewer proof: what lungnode sends is what a radiologist sees in OHIF.

One run (``tools/viewer_proof.py``): Orthanc with DICOMweb and the prebuilt OHIF viewer on one origin,
a chest CT sent with storescu through ``lungnode run`` (segmentation by a threshold stand-in
engine, see the ``proof`` fixture), which delivers SEG, SR and the Secondary Capture overlay series
to that Orthanc; headless Chromium opens the study, loads the SEG, steps with
the keyboard to a slice with mask content and to one without, opens the SC series and the SR, and
takes screenshots. The assertions are on the screenshots' pixels; the screenshots stay in
``test-artifacts/viewer/`` (or ``$LUNGNODE_VIEWER_ARTIFACTS``), printed at the end.

Run it alone: ``.venv/bin/python -m pytest -m viewer -s tests/viewer``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tools import viewer_proof
from tools.viewer_proof import ProofReport, SliceCheck

# The first test also runs the module fixture (the whole proof: ~2 min here, more on a busy machine).
pytestmark = [pytest.mark.viewer, pytest.mark.slow, pytest.mark.timeout(1500)]

#: A colour "appears" with at least this many screen pixels ...
MIN_SHOWN = 200
#: ... and is "absent" with at most this share of the displayed image's pixels (anti-aliasing noise).
MAX_ABSENT_SHARE = 0.0005


@pytest.fixture(scope="module")
def proof(viewer_prerequisites: None, viewer_artifacts: Path, chest_ct_dir: Path,
          dcmtk_env: dict[str, str]) -> ProofReport:
    """The whole viewer run through ``lungnode run`` (once for the module).

    The node runs with the threshold stand-in engine (``tests/launch.py --engine``): everything is the
    real node (listener, completion, job, SEG/SR/SC builders, delivery) except the segmentation, so
    the masks are exact (a threshold lung mask and a known infiltrate) and the pixel-placement
    thresholds below are calibrated on them. ``python -m tools.viewer_proof --engine model`` runs the same
    flow with the bundled demo model (README picture).
    """
    report = viewer_proof.run_proof(viewer_artifacts, source="node", ct_dir=chest_ct_dir,
                                    engine="threshold")
    print(f"\nviewer screenshots: {viewer_artifacts} (engine: {report.engine}, "
          f"seconds: { {k: round(v) for k, v in report.seconds.items()} })")
    return report


def _by_name(checks: list[SliceCheck], name: str) -> SliceCheck:
    found = [c for c in checks if c.name == name]
    assert found, f"no {name!r} slice was captured: {checks}"
    return found[0]


def _area(report: ProofReport) -> int:
    """Screen pixels of one displayed CT image (to scale the 'absent' tolerance)."""
    from tools.viewer_proof import load_png

    shot = load_png(Path(_by_name(report.seg_slices, "content").screenshot))
    return int(shot.shape[0] * shot.shape[1])


def test_ohif_knows_both_segments_with_their_colours(proof: ProofReport) -> None:
    """OHIF hydrated the SEG with the segments Lung and Infiltrate and the SEG's own colours."""
    assert len(proof.ohif_segmentations) == 1
    segments = {s["label"]: s for s in proof.ohif_segmentations[0]["segments"]}
    assert {"Lung", "Infiltrate"} <= set(segments)
    lung = segments["Lung"]["color"][:3]
    infiltrate = segments["Infiltrate"]["color"][:3]
    assert lung != infiltrate


def test_segment_colours_appear_on_a_slice_with_mask(proof: ProofReport) -> None:
    """On the slice with the most mask content both segment colours are in the viewport."""
    content = _by_name(proof.seg_slices, "content")
    assert set(content.expected_labels) == {"Lung", "Infiltrate"}
    for label in ("Lung", "Infiltrate"):
        assert content.colour_pixels[label] >= MIN_SHOWN, (label, content)


def test_segment_colours_absent_on_an_empty_slice(proof: ProofReport) -> None:
    """On a slice where the SEG's frames are empty no segment colour is drawn (no misplaced frame)."""
    empty = _by_name(proof.seg_slices, "empty")
    assert empty.expected_labels == []
    limit = MAX_ABSENT_SHARE * _area(proof)
    for label, count in empty.colour_pixels.items():
        assert count <= limit, (label, count, empty)


def test_overlay_sits_on_the_rendered_lungs(proof: ProofReport) -> None:
    """The coloured pixels fall inside the lungs of the rendered CT (same slice, SEG not loaded),
    the lung colour matches the SEG's lung mask scaled onto the screen, and outside the overlay the
    picture is the CT unchanged (same slice, same place)."""
    content = _by_name(proof.seg_slices, "content")
    for label in ("Lung", "Infiltrate"):
        assert content.inside_rendered_lungs[label] >= 0.9, (label, content)
    assert content.lung_iou is not None and content.lung_iou >= 0.8, content
    assert content.background_diff is not None and content.background_diff < 3.0, content


def test_secondary_capture_opens_as_ordinary_images(proof: ProofReport) -> None:
    """The SC series is displayed image by image; its burned-in outlines show on the slice with the
    mask (inside the rendered lungs) and not on the empty one (legend and warning bands excluded)."""
    assert proof.sc_series_count is not None, "no Secondary Capture series reached Orthanc"
    assert proof.sc_shown_count == proof.sc_series_count
    content = _by_name(proof.sc_slices, "content")
    empty = _by_name(proof.sc_slices, "empty")
    for label in ("Lung", "Infiltrate"):
        assert content.colour_pixels[label] >= MIN_SHOWN / 4, (label, content)
        assert content.inside_rendered_lungs.get(label, 0.0) >= 0.9, (label, content)
    for label, count in empty.colour_pixels.items():
        assert count <= MAX_ABSENT_SHARE * _area(proof), (label, count, empty)


def test_summary_page_opens_in_ohif(proof: ProofReport) -> None:
    """The one-page summary (Secondary Capture) sent by the node opens in the viewport and its
    yellow "NOT FOR PRIMARY DIAGNOSIS" is on screen (``05-summary.png``)."""
    assert proof.summary, "no summary page reached Orthanc"
    assert proof.summary["shown"], proof.summary
    assert proof.summary["warning_pixels"] >= 200, proof.summary


def test_sr_is_listed_and_parsed_by_ohif(proof: ProofReport) -> None:
    """OHIF lists the SR in the study browser and its DICOM SR handler finds the measurement
    groups: Lung, Infiltrate, the six zones and Both lungs (docs/report.md). What it shows on
    opening it: ``04-sr.png`` and the report."""
    assert proof.sr, "no SR reached Orthanc"
    assert proof.sr["listed_in_study_browser"], proof.sr
    (display_set,) = proof.sr["ohif_display_sets"]
    assert display_set["SOPClassHandlerId"].endswith("dicom-sr"), display_set
    assert display_set["measurements"] == 2 + 6 + 1, display_set


@pytest.mark.xfail(strict=True, reason="OHIF 3.13.2 reads coords[0].ReferencedSOPSequence of every "
                   "TID 1500 measurement; lungnode's volume measurements (of SEG segments) have no "
                   "SCOORD, so opening the SR throws a TypeError and shows an empty viewport "
                   "(OHIF/Viewers#3390). strict: passes again once OHIF or the SR changes.")
def test_sr_opens_without_error(proof: ProofReport) -> None:
    """Opening the SR in OHIF raises no error."""
    assert proof.sr.get("errors_on_open") == [], proof.sr.get("errors_on_open")


def test_no_browser_errors(proof: ProofReport) -> None:
    """Opening the study, the SEG and the SC series logged no error in the browser console."""
    assert proof.browser_errors == []
