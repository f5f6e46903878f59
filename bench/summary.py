"""Benchmark: the one-page summary for a 300-slice chest CT on the CPU (goal: under 2 s).

A real chest CT (``ct/real-chest/lidc-idri-0002``, 261 slices at 1.25 mm) is read once and
resampled in memory to ``--slices`` slices (nearest slice, spacing scaled so the extent is
unchanged), with the node's threshold lung mask and two ball infiltrates. Timed with the node's own
code, median of ``--repeats``:

* ``regions + figures``: :func:`lungnode.inference.report.severity_for` (carina search, zones,
  volumes, PO, PHO, scores);
* ``page``: :func:`lungnode.node.results.summary_page.render_summary`;
* ``SC + PDF``: building and encoding both DICOM objects from the page;

and, as anchors in the same run, two plain operations on the same data: the lung window over the
whole volume in numpy, and Pillow writing the page as PNG.

Usage: ``.venv/bin/python bench/summary.py [--slices 300] [--repeats 5] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lungnode.inference.dicom_io import find_series_files, read_series
from lungnode.inference.lungmask import threshold_lung_mask
from lungnode.inference.report import severity_for
from lungnode.inference.types import InferenceResult, ModelInfo
from lungnode.node.results.common import OutputContext, SourceSeries, encode
from lungnode.node.results.sc import lung_window
from lungnode.node.results.summary import build_pdf, build_summary_sc, page_text
from lungnode.node.results.summary_page import render_summary
from tests.node.results.results_factory import ball_in, measure

REPO = Path(__file__).resolve().parents[1]

SHARED = Path(os.environ.get("LUNGNODE_SHARED_DATA", REPO.parent / "shared" / "data"))
SERIES = SHARED / "ct" / "real-chest" / "lidc-idri-0002"


def _median(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (lung mask only)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if not SERIES.is_dir():
        print(f"missing {SERIES}", file=sys.stderr)
        return 1
    files = find_series_files(SERIES)
    vol = read_series(files)
    n0 = vol.hu.shape[0]
    pick = np.rint(np.linspace(0, n0 - 1, args.slices)).astype(int)
    dz = vol.spacing_mm[0] * (n0 - 1) / (args.slices - 1)
    vol = replace(vol, hu=np.ascontiguousarray(vol.hu[pick]),
                  spacing_mm=(dz, vol.spacing_mm[1], vol.spacing_mm[2]),
                  source_files=tuple(vol.source_files[i] for i in pick),
                  source_frames=tuple(vol.source_frames[i] for i in pick),
                  sop_instance_uids=tuple(vol.sop_instance_uids[i] for i in pick))
    lab = threshold_lung_mask(vol)
    inf = ball_in(lab, 1, 45) | ball_in(lab, 2, 30)
    result = InferenceResult(vol, lab, inf, measure(vol, lab, inf),
                             ModelInfo("bench", "0", "0" * 64))
    source = SourceSeries.from_files(vol.source_files)
    ctx = OutputContext(job_id=1, model=result.model)
    text = page_text(source, ctx)

    t_fig, report = _median(lambda: severity_for(result), args.repeats)
    t_page, page = _median(lambda: render_summary(result, report, text), args.repeats)

    def dicom() -> int:
        return (len(encode(build_summary_sc(result, page, source, ctx)))
                + len(encode(build_pdf(result, page, source, ctx))))

    t_dcm, _ = _median(dicom, args.repeats)
    t_win, _ = _median(lambda: lung_window(vol.hu), args.repeats)

    def png() -> int:
        buf = io.BytesIO()
        Image.fromarray(page).save(buf, "PNG")
        return buf.tell()

    t_png, _ = _median(png, args.repeats)
    total = t_fig + t_page + t_dcm
    print(f"series {SERIES.name} resampled to {vol.hu.shape} ({dz:.2f} mm), rule {report.rule}, "
          f"score {report.total_score}/{report.max_score}, PO {report.both.po:.1f} %")
    print(f"regions + figures {t_fig:.3f} s | page {t_page:.3f} s | SC + PDF {t_dcm:.3f} s | "
          f"total {total:.3f} s (goal < 2 s)")
    print(f"anchors: lung window of the volume {t_win:.3f} s | page as PNG {t_png:.3f} s")
    return 0 if total < 2.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
