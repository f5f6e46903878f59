"""The whole proof: Orthanc + OHIF up, a study with results in, the browser steps, the report;
and the command line (``tools/viewer_proof.py``)."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tools.ohif_proof.browser import OhifPage, start_chromium
from tools.ohif_proof.checks import SliceCheck, analyse_seg_slice, colour_counts
from tools.ohif_proof.common import (
    DEFAULT_CACHE,
    OHIF_BASE,
    OHIF_VERSION,
    REPO,
    ImageU8,
    log,
    missing_prerequisites,
    wait_until,
)
from tools.ohif_proof.images import SegTruth, colour_mask, read_seg_truth, rendered_lung_region
from tools.ohif_proof.orthanc import Orthanc, running_orthanc
from tools.ohif_proof.populate import SOURCES, populate_builders, populate_harness, populate_node
from tools.ohif_proof.site import fetch_ohif, prepare_site


@dataclass
class ProofReport:
    """Everything measured, and where the pictures are."""

    source: str
    out_dir: str
    engine: str = ""
    destination: dict[str, Any] = field(default_factory=dict)
    ohif_version: str = OHIF_VERSION
    study_uid: str = ""
    seg_slices: list[SliceCheck] = field(default_factory=list)
    sc_slices: list[SliceCheck] = field(default_factory=list)
    sc_series_count: int | None = None
    sc_shown_count: int | None = None
    sr: dict[str, Any] = field(default_factory=dict)
    #: The one-page summary (Secondary Capture): shown in the viewport, warning colour seen.
    summary: dict[str, Any] = field(default_factory=dict)
    ohif_segmentations: list[dict[str, Any]] = field(default_factory=list)
    browser_errors: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        """The report as JSON."""
        import dataclasses

        return json.dumps(dataclasses.asdict(self), indent=2)


def instances_of(orthanc: Orthanc, series: dict[str, Any]) -> list[Any]:
    """The series' instances, downloaded and parsed."""
    import io

    import pydicom

    return [pydicom.dcmread(io.BytesIO(orthanc.get_bytes(f"/instances/{iid}/file")))
            for iid in series["Instances"]]


def pick_slices(truth: SegTruth, sops: Sequence[str]) -> tuple[int, int]:
    """Viewer indices of a slice with the most segment content (both labels preferred) and of an
    empty slice (no segment), nearest to the content so both show the chest."""
    scored = []
    for i, sop in enumerate(sops):
        labels = truth.labels_on(sop)
        area = sum(int(m.sum()) for m in truth.masks.get(sop, {}).values())
        scored.append((len(labels), area, i))
    full = max(scored)
    empties = [i for n, _, i in scored if n == 0]
    if full[0] == 0 or not empties:
        raise RuntimeError("the SEG needs a slice with content and one without for this proof")
    empty = min(empties, key=lambda i: abs(i - full[2]))
    return full[2], empty


SR_TEXT_LIMIT = 3000
#: What OHIF made of the SR (its display set as the DICOM SR extension built it).
SR_DISPLAY_SETS_JS = """
const dss = window.services.displaySetService.getActiveDisplaySets();
return dss.filter(d => d.Modality === 'SR').map(d => ({
  SOPClassHandlerId: String(d.SOPClassHandlerId || ''),
  SeriesDescription: String(d.SeriesDescription || ''),
  isLoaded: !!d.isLoaded, isRehydratable: !!d.isRehydratable, isHydrated: !!d.isHydrated,
  unsupported: !!d.unsupported,
  measurements: Array.isArray(d.measurements) ? d.measurements.length : null,
  referencedImages: Array.isArray(d.referencedImages) ? d.referencedImages.length : null,
}));
"""


def run_proof(out_dir: Path, source: str = "node", ct_dir: Path | None = None,
              cache: Path = DEFAULT_CACHE, keep_open: float = 0.0, engine: str = "auto",
              destination: dict[str, Any] | None = None, harness_shift: int = 0) -> ProofReport:
    """Run the whole proof; screenshots and ``report.json`` go to ``out_dir``.

    ``source`` is one of :data:`SOURCES`; ``engine`` and ``destination`` apply to ``node`` (see
    :func:`populate_node`), ``harness_shift`` to ``harness`` (see :func:`make_harness_seg`).
    """
    ct_dir = ct_dir or REPO.parent / "shared" / "data" / "ct" / "chest-30-slices-uncompressed"
    missing = missing_prerequisites()
    if missing:
        raise RuntimeError("missing: " + "; ".join(missing))
    out_dir.mkdir(parents=True, exist_ok=True)
    report = ProofReport(source=source, out_dir=str(out_dir), destination=dict(destination or {}))
    t_start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="viewerproof", dir="/tmp"))
    try:
        dist = fetch_ohif(cache)
        site = prepare_site(dist, work / "site")
        report.seconds["ohif_ready"] = time.monotonic() - t_start
        with running_orthanc(work / "orthanc", site) as orthanc:
            t0 = time.monotonic()
            if source == "harness":
                populate_harness(orthanc, ct_dir, work, harness_shift)
            elif source == "builders":
                populate_builders(orthanc, ct_dir)
            elif source == "node":
                report.engine, log_text = populate_node(orthanc, ct_dir, work, engine,
                                                        destination)
                (out_dir / "lungnode.log").write_text(log_text, encoding="utf-8")
            else:
                raise ValueError(f"source must be one of {SOURCES}")
            report.seconds["populate"] = time.monotonic() - t0
            studies = orthanc.find("Study", {})
            if len(studies) != 1:
                raise RuntimeError(f"expected one study in Orthanc, found {len(studies)}")
            report.study_uid = studies[0]["MainDicomTags"]["StudyInstanceUID"]
            by_mod = orthanc.series_by_modality(report.study_uid)
            seg_series = by_mod.get("SEG", [])
            if not seg_series:
                raise RuntimeError(f"no SEG in Orthanc (series by modality: {sorted(by_mod)})")
            truth = read_seg_truth(instances_of(orthanc, seg_series[0]))
            driver = start_chromium(work / "chromium-profile")
            try:
                _browse(driver, orthanc, report, truth, by_mod, out_dir)
                if keep_open:
                    log.info("browser and Orthanc stay up %.0f s at %s%s/viewer?StudyInstanceUIDs=%s",
                             keep_open, orthanc.url, OHIF_BASE, report.study_uid)
                    time.sleep(keep_open)
            finally:
                driver.quit()
    finally:
        report.seconds["total"] = time.monotonic() - t_start
        (out_dir / "report.json").write_text(report.to_json(), encoding="utf-8")
        shutil.rmtree(work, ignore_errors=True)
    return report


def _shows(page: OhifPage, sop_uid: str) -> bool:
    """Whether the active viewport shows the instance ``sop_uid``."""
    state = page.state()
    return state is not None and state.sop_uid == sop_uid


def _is_summary(series: dict[str, Any]) -> bool:
    """The summary page series (lungnode's "AI lung report page")."""
    return "AI lung report page" in str(series["MainDicomTags"].get("SeriesDescription", ""))


def _image_sops(page: OhifPage) -> list[str]:
    js = """
const cs = window.cornerstone; let vp = null;
for (const e of cs.getRenderingEngines()) for (const v of e.getViewports())
  if (v.element && v.element.isConnected && v.element.offsetWidth > 0) vp = v;
return vp && vp.getImageIds ? vp.getImageIds() : [];
"""
    ids = page.driver.execute_script(js)
    return [str(i).split("/instances/", 1)[1].split("/", 1)[0] if "/instances/" in str(i) else ""
            for i in ids]


def _browse(driver: Any, orthanc: Orthanc, report: ProofReport, truth: SegTruth,
            by_mod: dict[str, list[dict[str, Any]]], out_dir: Path) -> None:
    t0 = time.monotonic()
    page = OhifPage(driver, orthanc.url)
    page.open_study(report.study_uid)
    report.seconds["first_image"] = time.monotonic() - t0
    page.screenshot(out_dir / "00-study-opened.png")
    sops = _image_sops(page)
    full, empty = pick_slices(truth, sops)
    # 1. the CT alone on both slices (the reference for "inside the rendered lungs")
    ct_pages: dict[int, ImageU8] = {}
    for idx, name in ((full, "content"), (empty, "empty")):
        page.go_to_index(idx)
        ct_pages[idx] = page.screenshot(out_dir / f"01-ct-only-{name}-slice.png")
    # 2. the SEG loaded, same slices
    page.load_seg(truth.series_description or "SEG")
    report.ohif_segmentations = page.segmentations()
    for idx, name in ((full, "content"), (empty, "empty")):
        state = page.go_to_index(idx)
        shot = out_dir / f"02-seg-{name}-slice.png"
        img = page.screenshot(shot)
        report.seg_slices.append(analyse_seg_slice(name, state, img, ct_pages[idx], truth, shot))
    report.seconds["seg_done"] = time.monotonic() - t0
    # 3. the Secondary Capture overlay series: opens as ordinary images
    others = [s for m, lst in by_mod.items() if m not in ("CT", "SEG", "SR") for s in lst]
    summaries = [s for s in others if _is_summary(s)]
    sc_series = [s for s in others if not _is_summary(s)]
    if sc_series:
        sc_instances = instances_of(orthanc, sc_series[0])
        report.sc_series_count = len(sc_instances)
        sc_source = {str(ds.SOPInstanceUID): str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)
                     for ds in sc_instances if "SourceImageSequence" in ds}
        page.double_click_series(str(sc_instances[0].get("SeriesDescription", "")) or "OT")
        wait_until(lambda: (st := page.state()) and st.sop_uid in sc_source, 60,
                   "the SC series in the viewport")
        page.settle()
        report.sr["cine_player_closed_for_sc"] = page.close_cine()
        sc_sops = _image_sops(page)
        report.sc_shown_count = len(sc_sops)
        for src_idx, name in ((full, "content"), (empty, "empty")):
            want = sops[src_idx]
            sc_idx = next(i for i, s in enumerate(sc_sops) if sc_source.get(s) == want)
            state = page.go_to_index(sc_idx)
            shot = out_dir / f"03-sc-{name}-slice.png"
            img = page.screenshot(shot)
            crop = state.crop(img)
            # the legend (top left) and the warning (bottom) carry the colours on every image
            bands = np.zeros(crop.shape[:2], dtype=bool)
            bands[: int(0.12 * crop.shape[0])] = True
            bands[int(0.9 * crop.shape[0]):] = True
            check = SliceCheck(name, state.sop_uid, state.index, str(shot),
                               sorted(truth.labels_on(want)),
                               colour_counts(crop, truth.colours, exclude=bands),
                               image_box=state.image_box)
            ct_idx = src_idx
            ct_crop = state.crop(ct_pages[ct_idx]) if ct_idx in ct_pages else None
            if ct_crop is not None and ct_crop.shape == crop.shape:
                from scipy import ndimage

                lungs = ndimage.binary_dilation(rendered_lung_region(ct_crop), iterations=4)
                for label, rgb in truth.colours.items():
                    m = colour_mask(crop, rgb) & ~bands
                    if m.sum():
                        check.inside_rendered_lungs[label] = float((m & lungs).sum() / m.sum())
            report.sc_slices.append(check)
    report.seconds["sc_done"] = time.monotonic() - t0
    # 3b. the one-page summary (a single Secondary Capture image)
    for series in summaries[:1]:
        (page_ds,) = instances_of(orthanc, series)[:1]
        page.double_click_series(str(page_ds.get("SeriesDescription", "")) or "OT")
        wait_until(functools.partial(_shows, page, str(page_ds.SOPInstanceUID)), 60,
                   "the summary page in the viewport")
        page.settle()
        shot = out_dir / "05-summary.png"
        shown = page.state()
        warning = 0
        if shown is not None:
            warning = int(colour_mask(shown.crop(page.screenshot(shot)), (255, 220, 0)).sum())
        report.summary = {"shown": shown is not None, "screenshot": str(shot),
                          "warning_pixels": warning}
    # everything up to here must be free of errors; the SR is looked at on its own
    report.browser_errors = page.errors(page.read_console())
    # 4. the SR: what does OHIF make of it?
    for sr_series in by_mod.get("SR", [])[:1]:
        desc = str(sr_series["MainDicomTags"].get("SeriesDescription", "")) or "SR"
        before = page.body_text()
        page.double_click_series(desc)
        time.sleep(6.0)
        page.screenshot(out_dir / "04-sr.png")
        after = page.body_text()
        console = page.read_console()
        report.sr = {**report.sr, "series_description": desc, "listed_in_study_browser": desc in before,
                     "text_after_open": after[:SR_TEXT_LIMIT],
                     "viewport_state": (st.__dict__ if (st := page.state()) else None),
                     "ohif_display_sets": page.driver.execute_script(SR_DISPLAY_SETS_JS),
                     "errors_on_open": page.errors(console),
                     "console_on_open": [str(e["message"])[:300] for e in console
                                         if "SR" in e["message"] or "easurement" in e["message"]]}
    report.seconds["browser"] = time.monotonic() - t0


def main(argv: Sequence[str] | None = None) -> int:
    """``tools/viewer_proof.py [--source node|builders|harness] [--out DIR]``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    parser = argparse.ArgumentParser(description="Show lungnode's results in OHIF (headless "
                                     "Chromium) and leave screenshots for a person to look at.")
    parser.add_argument("--out", type=Path, default=REPO / "test-artifacts" / "viewer",
                        help="folder for the screenshots and report.json")
    parser.add_argument("--source", choices=SOURCES, default="node",
                        help="node: CT through `lungnode run` (default); builders: lungnode's "
                             "SEG/SR/SC builders on a threshold result; harness: a highdicom SEG")
    parser.add_argument("--engine", choices=("auto", "model", "threshold"), default="auto",
                        help="segmentation inside `lungnode run` (source node): the configured model, "
                             "the threshold stand-in, or auto (model if its bundle exists)")
    parser.add_argument("--destination-option", action="append", default=[], metavar="KEY=JSON",
                        help="extra key of the node's [[destinations]] entry, e.g. "
                             "omit_empty_frames=true (repeatable)")
    parser.add_argument("--harness-shift", type=int, default=0, metavar="COLUMNS",
                        help="source harness: move the SEG's masks this many columns (a misplaced "
                             "SEG, to see the checks fail)")
    parser.add_argument("--ct", type=Path, default=None, help="CT series folder")
    parser.add_argument("--keep-open", type=float, default=0.0,
                        help="seconds to keep Orthanc and the browser up at the end")
    args = parser.parse_args(argv)
    # SIGTERM → SystemExit, so that Orthanc, the node and Chromium are stopped by the finally blocks
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    destination = {k: json.loads(v) for k, v in (o.split("=", 1) for o in args.destination_option)}
    report = run_proof(args.out, args.source, args.ct, keep_open=args.keep_open, engine=args.engine,
                       destination=destination, harness_shift=args.harness_shift)
    print(report.to_json())
    print(f"screenshots: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
