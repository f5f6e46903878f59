"""Zones and lobes on a phantom of known geometry; severity figures and score edges."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lungnode.inference.regions import LOBES, ZONES, assign_zones, find_carina, lobe_regions
from lungnode.inference.severity import SCHEMES, ScoreScheme, assess
from lungnode.inference.types import SeriesVolume

N, ROWS, COLS = 60, 96, 96
LUNG_SLICES = range(5, 56)  # lungs from slice 5 (base) to 55 (apex); index grows cranially
CARINA = 42


def phantom(with_trachea: bool = True, flip: bool = False) -> tuple[SeriesVolume, np.ndarray]:
    """Soft-tissue body, two box lungs (-850 HU), a trachea dividing at slice ``CARINA``."""
    hu = np.full((N, ROWS, COLS), -1000.0, np.float32)
    hu[:, 8:88, 4:92] = 40.0
    labels = np.zeros(hu.shape, np.uint8)
    for k in LUNG_SLICES:
        hu[k, 20:76, 10:41] = -850.0
        hu[k, 20:76, 56:87] = -850.0
        labels[k, 20:76, 10:41] = 1  # right lung on the image's left (patient right)
        labels[k, 20:76, 56:87] = 2
    if with_trachea:
        yy, xx = np.ogrid[:ROWS, :COLS]
        for k in range(CARINA + 1, N):
            hu[k][(yy - 30) ** 2 + (xx - 48) ** 2 <= 9] = -1000.0
        for k in range(CARINA - 6, CARINA + 1):
            for c in (44, 52):
                hu[k][(yy - 30) ** 2 + (xx - c) ** 2 <= 4] = -1000.0
    normal = 1.0
    if flip:  # same anatomy stored caudal-first along a normal pointing to the feet
        hu, labels, normal = hu[::-1].copy(), labels[::-1].copy(), -1.0
    vol = SeriesVolume(hu=hu, spacing_mm=(2.5, 4.0, 4.0), origin_mm=(0.0, 0.0, 0.0),
                       direction=((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, normal)),
                       source_files=(Path("x"),) * N, source_frames=(1,) * N,
                       sop_instance_uids=("",) * N)
    return vol, labels


def _zone_slices(labels: np.ndarray, zone: int) -> set[int]:
    return {int(k) for k in np.flatnonzero((labels == zone).any(axis=(1, 2)))}


def test_carina_found_and_zones_follow_it() -> None:
    vol, lungs = phantom()
    assert find_carina(vol, lungs) == CARINA
    rm = assign_zones(vol, lungs)
    assert rm.rule == "carina" and rm.kind == "zones" and rm.carina_index == CARINA
    assert "carina" in rm.rule_text
    # upper: above the carina; the 38 infracarinal slices halved by volume (19 + 19)
    assert _zone_slices(rm.labels, 1) == set(range(CARINA + 1, 56))
    assert _zone_slices(rm.labels, 2) == set(range(24, CARINA + 1))
    assert _zone_slices(rm.labels, 3) == set(range(5, 24))
    for right, left in ((1, 4), (2, 5), (3, 6)):
        assert _zone_slices(rm.labels, right) == _zone_slices(rm.labels, left)
        assert np.all(lungs[rm.labels == right] == 1) and np.all(lungs[rm.labels == left] == 2)
    assert np.array_equal(rm.labels > 0, lungs > 0)


def test_zones_do_not_depend_on_slice_order() -> None:
    vol, lungs = phantom(flip=True)
    rm = assign_zones(vol, lungs)
    assert rm.rule == "carina" and rm.carina_index == N - 1 - CARINA
    assert _zone_slices(rm.labels, 1) == {N - 1 - k for k in range(CARINA + 1, 56)}


def test_no_trachea_falls_back_to_volume_thirds() -> None:
    vol, lungs = phantom(with_trachea=False)
    assert find_carina(vol, lungs) is None
    rm = assign_zones(vol, lungs)
    assert rm.rule == "thirds" and "thirds" in rm.rule_text
    assert _zone_slices(rm.labels, 1) == set(range(39, 56))
    assert _zone_slices(rm.labels, 2) == set(range(22, 39))
    assert _zone_slices(rm.labels, 3) == set(range(5, 22))


def test_lobe_labels_limited_to_lungs_and_gaps_filled() -> None:
    _, lungs = phantom(with_trachea=False)
    lobes = np.zeros(lungs.shape, np.uint8)
    lobes[30:, :, :48] = 1  # RUL
    lobes[:30, :, :48] = 3  # RLL
    lobes[:, :, 48:] = 4  # LUL
    lobes[:20, :, 48:] = 5  # LLL
    lobes[30, 40, 20] = 0  # a gap inside the right lung
    lobes[40, 40, 20] = 5  # a left lobe inside the right lung
    rm = lobe_regions(lobes, lungs)
    assert rm.kind == "lobes" and rm.rule == "model-lobes" and rm.regions == LOBES
    assert np.array_equal(rm.labels > 0, lungs > 0)
    assert rm.labels[30, 40, 20] == 1 and rm.labels[40, 40, 20] == 1
    assert not np.any(np.isin(rm.labels[lungs == 1], (4, 5)))
    assert rm.labels[10, 40, 70] == 5 and rm.labels[40, 40, 70] == 4


@pytest.mark.parametrize(("percent", "pan", "chung"), [
    (0.0, 0, 0), (0.001, 1, 1), (4.999, 1, 1), (5.0, 2, 1), (25.0, 2, 1), (25.001, 3, 2),
    (49.999, 3, 2), (50.0, 4, 2), (50.001, 4, 3), (75.0, 4, 3), (75.001, 5, 4), (100.0, 5, 4),
])
def test_score_edges(percent: float, pan: int, chung: int) -> None:
    assert SCHEMES["pan"].score(percent) == pan
    assert SCHEMES["chung"].score(percent) == chung


def test_bad_cutoffs_are_refused() -> None:
    with pytest.raises(ValueError, match="cut-off"):
        ScoreScheme("x", "x", (">0", "5"))
    with pytest.raises(ValueError, match="ascend"):
        ScoreScheme("x", "x", (">10", ">5"))


def test_assess_figures_per_zone_lung_and_total() -> None:
    vol, lungs = phantom()
    rm = assign_zones(vol, lungs)
    infiltrate = np.zeros(lungs.shape, bool)
    ru = rm.labels == 1
    idx = np.argwhere(ru)
    n_ru = len(idx)
    chosen = idx[: n_ru // 2]  # 50 % of the right upper zone
    infiltrate[tuple(chosen.T)] = True
    hu = vol.hu.copy()
    third = len(chosen) // 3
    hu[tuple(chosen[:third].T)] = -500.0  # ground glass
    hu[tuple(chosen[third:2 * third].T)] = -250.0  # consolidation, not high opacity
    hu[tuple(chosen[2 * third:].T)] = -100.0  # consolidation and high opacity
    vol = SeriesVolume(hu=hu, spacing_mm=vol.spacing_mm, origin_mm=vol.origin_mm,
                       direction=vol.direction, source_files=vol.source_files,
                       source_frames=vol.source_frames, sop_instance_uids=vol.sop_instance_uids)
    rep = assess(vol, rm, infiltrate)
    v = 2.5 * 4 * 4 / 1000
    r_u = rep.regions[0]
    assert r_u.key == "right_upper" and r_u.level == "upper"
    assert r_u.lung_ml == pytest.approx(n_ru * v)
    assert r_u.infiltrate_ml == pytest.approx(len(chosen) * v)
    assert r_u.ground_glass_ml == pytest.approx(third * v)
    assert r_u.consolidation_ml == pytest.approx((len(chosen) - third) * v)
    assert r_u.high_opacity_ml == pytest.approx((len(chosen) - 2 * third) * v)
    assert r_u.po == pytest.approx(100 * len(chosen) / n_ru)
    assert r_u.po == pytest.approx(50.0) and r_u.score == 4  # 50 % exactly: Pan 50-75 %
    assert all(r.score == 0 and r.po == 0 for r in rep.regions[1:])
    assert rep.total_score == 4 and rep.max_score == 30 and rep.right.score == 4
    assert rep.both.lung_ml == pytest.approx(float((lungs > 0).sum()) * v)
    assert rep.both.pho == pytest.approx(100 * r_u.high_opacity_ml / rep.both.lung_ml)
    assert rep.left.infiltrate_ml == 0 and rep.region_kind == "zones"
    assert [r.key for r in rep.regions] == [z.key for z in ZONES]


def test_lobe_bundle_reports_five_lobes(tmp_path: Path, chest_ct_dir: Path) -> None:
    """A small bundle declaring the lobe classes: the engine runs it, the lobe pass labels the
    lungs and the report is on five lobes (Pan 0-25)."""
    import torch

    from lungnode.inference.checkpoint import BundleMetadata, save_bundle
    from lungnode.inference.engine import InferenceEngine
    from lungnode.inference.model import ModelConfig, build_model
    from lungnode.inference.regions import LOBE_CLASSES
    from lungnode.inference.report import ReportOptions, lobe_labels_for, severity_for

    classes = ("background", "infiltrate", *LOBE_CLASSES)
    cfg = ModelConfig(encoder="r3d_18", encoder_depth=2, in_channels=3, num_classes=len(classes),
                      final_channels=4)
    torch.manual_seed(0)
    save_bundle(tmp_path / "lobes.safetensors", build_model(cfg),
                         BundleMetadata(name="tiny-lobes", version="0.0.1", model=cfg,
                                        classes=classes, spacing_mm=(8.0, 6.0, 6.0),
                                        patch_size=(32, 64, 64), weights_dtype="float16"))
    engine = InferenceEngine(tmp_path / "lobes.safetensors", device="cpu")
    files = sorted(p for p in chest_ct_dir.iterdir() if p.is_file())
    result = engine.run(files)
    lobes = lobe_labels_for(engine, result, ReportOptions())
    assert lobes is not None and lobes.shape == result.lung_labels.shape
    assert lobes.max() <= 5
    rep = severity_for(result, ReportOptions(), lobes)
    assert rep.region_kind == "lobes" and rep.rule == "model-lobes"
    assert [r.key for r in rep.regions] == ["rul", "rml", "rll", "lul", "lll"]
    assert rep.max_score == 25
    assert rep.both.lung_ml == pytest.approx(result.measurements.both.lung_ml, rel=1e-6)
    assert rep.both.infiltrate_ml == pytest.approx(result.measurements.both.infiltrate_ml, rel=1e-6)
    assert rep.right.lung_ml == pytest.approx(result.measurements.right.lung_ml, rel=1e-6)
    # zones are still available on request
    assert lobe_labels_for(engine, result, ReportOptions(regions="zones")) is None
    assert severity_for(result, ReportOptions(regions="thirds")).rule == "thirds"


def test_site_cutoffs_make_their_own_scheme() -> None:
    from lungnode.inference.report import ReportOptions

    options = ReportOptions.from_settings("zones", "pan", (">0", ">=10"), -150.0)
    assert options.scheme.name == "site" and options.scheme.max_per_region == 2
    assert options.scheme.score(9.99) == 1 and options.scheme.score(10.0) == 2
    assert ReportOptions.from_settings(scheme="chung").scheme.max_per_region == 4
