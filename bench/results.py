"""Benchmark: seconds to build and send SEG + SR (+ SC) for a 300-slice chest CT series.

Makes a 300-slice series from the shared 30-slice chest CT (slices repeated, 1 mm apart, new UIDs)
in a temp folder, threshold lung masks and a ball infiltrate on it, then measures with the node's
own code (:func:`lungnode.node.results.build.build_outputs`, :func:`lungnode.node.dimse.scu.send_items`):

* build SEG + SR (Explicit VR LE), first build in the process and the median of warm builds;
* build SEG (JPEG 2000 lossless) + SR;
* build the SC overlay series (300 images);
* send SEG + SR, and SC, to a real Orthanc on 127.0.0.1 (one association each).

Usage: ``.venv/bin/python -m bench.results [--repeats 3] [--no-sc] [--no-send]``. Goal: SEG + SR
built and sent in ≤ 3 s on CPU.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from lungnode.inference.dicom_io import read_series
from lungnode.inference.types import InferenceResult, ModelInfo
from lungnode.node.results.build import BuiltOutput, Profile, build_outputs
from lungnode.node.results.common import OutputContext, SourceSeries
from lungnode.node.results.seg import SegOptions
from tests.node.results.results_factory import ball_in, measure, threshold_lungs

REPO = Path(__file__).resolve().parents[1]

SHARED = (Path(os.environ.get("LUNGNODE_SHARED_DATA", REPO.parent / "shared" / "data"))
          / "ct" / "chest-30-slices-uncompressed")


def make_series(out: Path, n: int = 300) -> list[Path]:
    """Write an ``n``-slice series (the 30 real slices repeated, 1 mm apart)."""
    src = sorted(SHARED.glob("*.dcm"))
    datasets = [pydicom.dcmread(p) for p in src]
    datasets.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    series_uid, z0 = generate_uid(), float(datasets[0].ImagePositionPatient[2])
    paths = []
    for k in range(n):
        ds = datasets[k % len(datasets)].copy()
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k + 1
        x, y, _ = ds.ImagePositionPatient
        ds.ImagePositionPatient = [x, y, z0 + k * 1.0]
        ds.SliceLocation = z0 + k * 1.0
        ds.SliceThickness = 1.0
        path = out / f"{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def timed(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    value = fn(*args, **kwargs)
    return time.perf_counter() - t0, value


def send(outputs: list[BuiltOutput], tmp: Path, port: int) -> float:
    from lungnode.config import DestinationConfig
    from lungnode.node.dimse.scu import OutboundItem, send_items

    items = []
    for o in outputs:
        path = tmp / f"{o.kind}-{o.sop_instance_uid}.dcm"
        path.write_bytes(o.data)
        items.append(OutboundItem(o.sop_instance_uid, o.sop_class_uid, o.transfer_syntax_uid, path))
    dest = DestinationConfig(name="bench", ae_title="ORTHANC", host="127.0.0.1", port=port)
    seconds, result = timed(send_items, dest, items, timeout=60)
    assert result.ok and len(result.acknowledged) == len(items), result
    return float(seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-sc", action="store_true")
    parser.add_argument("--no-send", action="store_true")
    parser.add_argument("--no-j2k", action="store_true")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)  # the >400-frame SEG warning would repeat per build
    with tempfile.TemporaryDirectory(prefix="lungnode-bench-") as tmpname:
        tmp = Path(tmpname)
        (tmp / "ct").mkdir()
        files = make_series(tmp / "ct")
        volume = read_series(files)
        labels = threshold_lungs(volume.hu)
        inf = ball_in(labels, radius=60)
        result = InferenceResult(volume=volume, lung_labels=labels, infiltrate=inf,
                                 measurements=measure(volume, labels, inf),
                                 model=ModelInfo("bench", "0", "0" * 64))
        ctx = OutputContext(job_id=1, model=result.model)
        t_src, source = timed(SourceSeries.from_files, volume.source_files)
        print(f"series: {len(files)} slices {volume.hu.shape}; read headers {t_src:.2f} s")
        explicit = Profile(objects=("seg", "sr"))
        first, outputs = timed(build_outputs, result, ctx, explicit, source=source)
        warm = [timed(build_outputs, result, ctx, explicit, source=source)[0]
                for _ in range(args.repeats)]
        seg_mb = sum(len(o.data) for o in outputs if o.kind == "seg") / 1e6
        frames = sum(int(o.dataset.NumberOfFrames) for o in outputs if o.kind == "seg")
        print(f"build SEG+SR explicit: first {first:.2f} s, warm median {statistics.median(warm):.2f} s "
              f"(runs {', '.join(f'{w:.2f}' for w in warm)}); SEG {frames} frames {seg_mb:.1f} MB")
        if not args.no_j2k:
            j2k = Profile(objects=("seg", "sr"), seg=SegOptions(transfer_syntax="jpeg2000"))
            t_j2k, out_j2k = timed(build_outputs, result, ctx, j2k, source=source)
            print(f"build SEG+SR JPEG 2000 lossless: {t_j2k:.2f} s; SEG "
                  f"{sum(len(o.data) for o in out_j2k if o.kind == 'seg') / 1e6:.2f} MB")
        sc: list[BuiltOutput] = []
        if not args.no_sc:
            t_sc, sc = timed(build_outputs, result, ctx, Profile(objects=("sc",)), source=source)
            print(f"build SC overlay: {t_sc:.2f} s for {len(sc)} images "
                  f"({sum(len(o.data) for o in sc) / 1e6:.0f} MB)")
        if not args.no_send:
            from orthanc import OrthancServer

            server = OrthancServer(tmp / "orthanc")
            server.start()
            try:
                t_send = send(outputs, tmp, server.dicom_port)
                print(f"send SEG+SR to Orthanc: {t_send:.2f} s")
                print(f"==> SEG+SR build (warm) + send: {statistics.median(warm) + t_send:.2f} s "
                      f"(goal <= 3 s); with first-build cost: {first + t_send:.2f} s")
                if sc:
                    print(f"send SC to Orthanc: {send(sc, tmp, server.dicom_port):.2f} s")
            finally:
                server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
