"""Benchmark of the inference engine: seconds and peak memory per 300-slice 512x512 chest CT.

Usage::

    python bench/inference.py                       # CPU, real chest CT stretched to 300 slices
    python bench/inference.py --synthetic --device cuda --variants full,trunc3,trunc2

Series:
* default: the real 30-slice chest CT (``../shared/data/ct/chest-30-slices-uncompressed``) read
  with pydicom and linearly resampled along z *in memory* to ``--slices`` slices (same 232 mm
  coverage, 0.78 mm steps for 300 slices); no file is written;
* ``--synthetic``: a numpy-only chest phantom generated in memory (for machines without pydicom).

Each variant runs in its own subprocess (so the peak resident memory is per series): the
engine is created (random-weights bundle of that architecture, fp16 storage), warmed up on a
small crop, then one full series is timed. GPU runs report peak GPU memory and achieved TFLOP/s
(model FLOPs counted with ``torch.utils.flop_counter`` on the meta device, times the number of
sliding windows and TTA passes) against the device's dense bf16 peak (H100 SXM: 989 TFLOP/s).
Prints a markdown table; ``--json`` also writes the rows.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = {"full": 4, "trunc3": 3, "trunc2": 2}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def synthetic_volume(slices: int) -> Any:
    """Chest-like phantom (HU) 512x512, 0.7 mm pixels, 240 mm coverage, made with numpy only."""
    from lungnode.inference.types import SeriesVolume

    rng = np.random.default_rng(0)
    h = w = 512
    px = 0.7
    dz = 240.0 / (slices - 1)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    hu = np.empty((slices, h, w), np.float32)
    for k in range(slices):
        t = k / (slices - 1)  # 0 = base, 1 = apex
        s = hu[k]
        s.fill(-1000.0)
        body = ((yy - 256) / 170) ** 2 + ((xx - 256) / 230) ** 2 < 1
        s[body] = 40.0
        scale = math.sin(math.pi * min(1.0, 0.15 + 0.85 * t)) ** 0.5
        for cx in (150.0, 362.0):
            lung = ((yy - 250) / (120 * scale + 1)) ** 2 + ((xx - cx) / (75 * scale + 1)) ** 2 < 1
            s[lung] = -850.0
        if t > 0.8:
            s[(yy - 200) ** 2 + (xx - 256) ** 2 < 12**2] = -1000.0  # trachea
        s += rng.normal(0, 20, size=(h, w)).astype(np.float32)
    # a few ground-glass and consolidation blobs
    kk, rr, cc = np.ogrid[0:slices, 0:h, 0:w]
    blobs = ((0.4, 250, 150, 25, -550.0), (0.6, 280, 362, 18, 20.0))
    for zc, yc, xc, rad, v in blobs:
        zc_i = int(zc * slices)
        z0, z1 = max(0, zc_i - 40), min(slices, zc_i + 40)
        dist2 = ((kk[z0:z1] - zc_i) * dz) ** 2 + ((rr - yc) * px) ** 2 + ((cc - xc) * px) ** 2
        sub = dist2 < rad**2
        hu[z0:z1][sub] = v
    n = slices
    return SeriesVolume(hu=hu, spacing_mm=(dz, px, px), origin_mm=(-179.2, -179.2, 0.0),
                        direction=((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)),
                        source_files=tuple(Path(f"synthetic-{i:04d}.dcm") for i in range(n)),
                        source_frames=(1,) * n, sop_instance_uids=("",) * n)


def stretched_real_volume(slices: int, data: Path) -> Any:
    """The real 30-slice chest CT linearly resampled along z to ``slices`` slices (in memory)."""
    from lungnode.inference.dicom_io import read_series
    from lungnode.inference.types import SeriesVolume

    src = read_series(sorted((data / "ct" / "chest-30-slices-uncompressed").glob("*.dcm")))
    z = src.slice_positions()
    zt = np.linspace(z[0], z[-1], slices)
    k = np.clip(np.searchsorted(z, zt, side="right") - 1, 0, len(z) - 2)
    wt = ((zt - z[k]) / (z[k + 1] - z[k])).astype(np.float32)
    hu = np.empty((slices, *src.hu.shape[1:]), np.float32)
    for i in range(slices):
        hu[i] = src.hu[k[i]] * (1 - wt[i]) + src.hu[k[i] + 1] * wt[i]
    dz = float(zt[1] - zt[0])
    return SeriesVolume(hu=hu, spacing_mm=(dz, src.spacing_mm[1], src.spacing_mm[2]),
                        origin_mm=src.origin_mm, direction=src.direction,
                        source_files=tuple(Path(f"stretched-{i:04d}.dcm") for i in range(slices)),
                        source_frames=(1,) * slices, sop_instance_uids=("",) * slices)


def _windows(vol: tuple[int, ...], patch: tuple[int, ...], overlap: float) -> int:
    n = 1
    for v, p in zip(vol, patch, strict=True):
        step = max(1, int(p * (1 - overlap)))
        n *= 1 if v <= p else math.ceil((v - p) / step) + 1
    return n


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Run one variant and return its row."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from lungnode.inference.checkpoint import BundleMetadata, save_bundle
    from lungnode.inference.engine import EngineOptions, InferenceEngine
    from lungnode.inference.model import ModelConfig, build_model
    from lungnode.inference.predict import model_grid, valid_patch_size

    t0 = time.perf_counter()
    volume = synthetic_volume(args.slices) if args.synthetic else stretched_real_volume(
        args.slices, Path(args.data))
    make_s = time.perf_counter() - t0
    spacing = tuple(float(v) for v in args.spacing.split(","))
    patch = tuple(int(v) for v in args.patch.split(","))
    tta = tuple(int(v) for v in args.tta.split(",")) if args.tta else ()
    cfg = ModelConfig(encoder_depth=VARIANTS[args.worker])
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "bench.safetensors"
        torch.manual_seed(0)
        save_bundle(bundle, build_model(cfg), BundleMetadata(
            name=f"bench-{args.worker}", version="0", model=cfg, spacing_mm=spacing,  # type: ignore[arg-type]
            patch_size=patch, overlap=args.overlap, weights_dtype="float16"))  # type: ignore[arg-type]
        opts = EngineOptions(tta_axes=tta, threads=args.threads or None,
                             sw_batch_size=args.sw_batch or None)
        engine = InferenceEngine(bundle, device=args.device, options=opts)
    cuda = engine.device.type == "cuda"
    # warm-up on a small crop (kernel selection, lazy imports)
    from dataclasses import replace

    n_w = volume.hu.shape[0] if args.device.startswith("cuda") else min(volume.hu.shape[0], 60)
    engine.run_volume(replace(volume, hu=volume.hu[:n_w].copy(), source_files=volume.source_files[:n_w],
                              source_frames=volume.source_frames[:n_w],
                              sop_instance_uids=volume.sop_instance_uids[:n_w]))
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t = time.perf_counter()
    res = engine.run_volume(volume)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    grid = model_grid(volume.hu.shape, volume.slice_positions(), volume.spacing_mm[1:], spacing)  # type: ignore[arg-type]
    used_patch = valid_patch_size(patch, grid.shape, engine.model.divisor, args.overlap)
    meta_model = build_model(cfg).to("meta").eval()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        meta_model(torch.empty((1, 1, *used_patch), device="meta"))
    passes = 2 ** len(tta)
    flops = fc.get_total_flops() * _windows(grid.shape, used_patch, args.overlap) * passes
    row: dict[str, Any] = {
        "variant": args.worker, "device": torch.cuda.get_device_name() if cuda else
        f"CPU x{torch.get_num_threads()} threads",
        "series": f"{'synthetic' if args.synthetic else 'stretched real'} {volume.hu.shape[0]}x512x512",
        "model_grid": "x".join(map(str, grid.shape)), "patch": "x".join(map(str, used_patch)),
        "windows": _windows(grid.shape, used_patch, args.overlap), "tta_passes": passes,
        "params_M": round(sum(p.numel() for p in engine.model.parameters()) / 1e6, 1),
        "seconds": round(seconds, 2), "infer_s": round(res.seconds["infer"], 2),
        "cpu_s": round(cpu_s, 1),
        "stages": {k: round(v, 2) for k, v in res.seconds.items()},
        "peak_rss_GB": round(rss_peak / 1024, 2), "rss_before_run_GB": round(rss_before / 1024, 2),
        "model_TFLOP": round(flops / 1e12, 2), "make_volume_s": round(make_s, 1),
        "lung_ml": round(res.measurements.both.lung_ml, 0),
    }
    if cuda:
        row["gpu_peak_GB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        achieved = flops / res.seconds["infer"] / 1e12
        row["TFLOP/s"] = round(achieved, 1)
        row["pct_of_peak"] = round(100 * achieved / peak, 1) if peak else None
    return row


def main() -> None:
    """Parse arguments; run each variant in a subprocess; print a markdown table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--synthetic", action="store_true", help="numpy phantom instead of the real CT")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--variants", default="full,trunc2")
    ap.add_argument("--spacing", default="3.0,1.6,1.6", help="model spacing z,y,x mm")
    ap.add_argument("--patch", default="96,224,224", help="largest patch z,y,x")
    ap.add_argument("--overlap", type=float, default=0.25)
    ap.add_argument("--tta", default="", help="mirror axes, e.g. 2 or 0,1,2")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--sw-batch", type=int, default=0)
    ap.add_argument("--json", default="")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("ROW " + json.dumps(worker(args)), flush=True)
        return
    rows = []
    for v in args.variants.split(","):
        cmd = [sys.executable, __file__, "--worker", v] + [a for a in sys.argv[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")), None)
        if line is None:
            print(f"variant {v} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(line[4:]))
        print(f"# {v}: {rows[-1]}", file=sys.stderr, flush=True)
    cols = ["variant", "device", "series", "params_M", "model_grid", "patch", "windows", "tta_passes",
            "seconds", "infer_s", "cpu_s", "peak_rss_GB", "model_TFLOP"]
    if any("gpu_peak_GB" in r for r in rows):
        cols += ["gpu_peak_GB", "TFLOP/s", "pct_of_peak"]
    print(f"\nspacing {args.spacing} mm, overlap {args.overlap}, max patch {args.patch}\n")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    for r in rows:
        print(f"- {r['variant']}: stages {r['stages']}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
