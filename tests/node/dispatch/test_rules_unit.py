"""Rule evaluation on features aggregated from instance rows (no network, no database)."""

from __future__ import annotations

from lungnode.config import Config, RuleConfig
from lungnode.node.dispatch.rules import NO_RULE, decide, features_from_instances
from lungnode.storage.models import Instance, Series


def _series(n: int, orientation: str, kernel: str = "B40f",
            ae: str = "PACS") -> tuple[Series, list[Instance]]:
    series = Series(series_uid="1.2.3", modality="CT", description="Thorax", body_part="CHEST",
                    own_output=False)
    rows = [Instance(sop_instance_uid=f"1.2.3.{k}", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                     modality="CT", image_type="ORIGINAL\\PRIMARY\\AXIAL", instance_number=k + 1,
                     image_position=f"0\\{k * 1.118034:.4f}\\{k * 2.236068:.4f}",
                     image_orientation=orientation,
                     slice_thickness=2.5, kernel=kernel, calling_ae=ae, number_of_frames=1)
            for k in range(n)]
    return series, rows


def test_features_come_from_all_instances_and_oblique_series_match_no_rule() -> None:
    series, rows = _series(40, "1\\0\\0\\0\\0.894427\\-0.447214")  # about 26.6 degrees off axial
    rows[7].image_type = "DERIVED\\SECONDARY\\MPR"  # one odd instance is enough to be seen
    f = features_from_instances(series, rows)
    assert f.slices == 40 and 26 < (f.axial_angle_deg or 0) < 27
    assert abs((f.spacing or 0) - 2.5) < 0.01, "spacing measured along the normal"
    assert decide(Config().rules, f).rule == "derived"
    rows[7].image_type = "ORIGINAL\\PRIMARY\\AXIAL"
    decision = decide(Config().rules, features_from_instances(series, rows))
    assert (decision.action, decision.rule) == ("exclude", NO_RULE)
    chest = decision.evaluated[-1]
    assert chest.name == "chest-ct" and not chest.matched
    assert [c.name for c in chest.conditions if not c.holds] == ["axial_angle_deg"]


def test_kernel_calling_ae_and_ranges() -> None:
    series, rows = _series(30, "1\\0\\0\\0\\1\\0", kernel="I70f", ae="CT_SCANNER")
    rules = (RuleConfig(name="sharp-kernel", action="exclude", kernel_regex=r"^[BI]7\d"),
             RuleConfig(name="from-ct", action="include", calling_ae=("CT_SCANNER",),
                        slice_thickness_min=1.0, slice_thickness_max=3.0, slices_min=20,
                        image_type_all=("ORIGINAL", "AXIAL")))
    f = features_from_instances(series, rows)
    assert decide(rules, f).rule == "sharp-kernel"
    for r in rows:
        r.kernel = "B30f"
    decision = decide(rules, features_from_instances(series, rows))
    assert (decision.action, decision.rule) == ("include", "from-ct")
    assert decide((), f).rule == NO_RULE
