"""Default selection rules on every shipped sample series, our own outputs, ``explain`` and
``rules dry-run``, through a real ``lungnode run`` fed by a pynetdicom SCU."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from sqlalchemy import func, select

from lungnode.provenance import add_provenance
from lungnode.storage.db import Database
from lungnode.storage.models import Series
from tests.node.dispatch.dispatch_helpers import clone_series, read_jobs, read_series, wait_for
from tests.node_process import LungnodeProcess, send_files

#: Shipped sample files (relative to the shared data folder) → (decision, deciding rule); ``refused``:
#: the node does not accept the SOP class at association time (MR, US, RWV), so no series exists.
EXPECTED: dict[str, tuple[str, str]] = {
    "ct/chest-30-slices-uncompressed": ("include", "chest-ct"),
    "ct/ct-3-slices-with-seg/01.dcm": ("exclude", "too-few-slices"),
    "ct/ct-3-slices-with-seg/seg-liver.dcm": ("exclude", "not-ct"),
    "transfer-syntaxes/693_UNCR.dcm": ("exclude", "too-few-slices"),
    "transfer-syntaxes/eCT_Supplemental.dcm": ("exclude", "derived"),
    "ct/ct-2-slices": ("exclude", "not-ct"),  # no Modality element at all
    "transfer-syntaxes/emri_small.dcm": ("refused", "SOP class not accepted"),
    "transfer-syntaxes/JPEG-LL.dcm": ("exclude", "not-ct"),
    "transfer-syntaxes/JPGLosslessP14SV1_1s_1f_8b.dcm": ("refused", "SOP class not accepted"),
    "transfer-syntaxes/liver_rle.dcm": ("exclude", "not-ct"),
    "transfer-syntaxes/explicit_VR-UN.dcm": ("exclude", "other-body-part"),
    "reference/highdicom/ct_image.dcm": ("exclude", "too-few-slices"),
    # highdicom's SR shares ct_image.dcm's SeriesInstanceUID: one mixed CT+SR series of 2 objects
    "reference/highdicom/sr_document.dcm": ("exclude", "too-few-slices"),
    "reference/highdicom/seg_image_ct_binary.dcm": ("exclude", "not-ct"),
    "reference/dcmqi-tid1500/sr.dcm": ("exclude", "not-ct"),
    "reference/dcmqi-tid1500/rwvm.dcm": ("refused", "SOP class not accepted"),
}


def _files(root: Path, rel: str) -> list[Path]:
    path = root / rel
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file())
    if rel == "ct/ct-3-slices-with-seg/01.dcm":
        return sorted(path.parent.glob("0*.dcm"))
    return [path]


def test_default_rules_on_shipped_samples_and_own_outputs(tmp_path: Path, shared_data: Path,
                                                          chest_ct_dir: Path) -> None:
    chest = sorted(chest_ct_dir.glob("*.dcm"))

    def thick(ds: pydicom.Dataset) -> None:
        ds.SliceThickness = "12"

    def localizer(ds: pydicom.Dataset) -> None:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]

    def own(ds: pydicom.Dataset) -> None:
        add_provenance(ds, job_id=1, model="lungnode-demo 0", source_series_uid="1.2.3")

    variants = {  # real slices with one header change each → expected rule
        "thick": (clone_series(chest, tmp_path / "thick", edit=thick), "thick-slices"),
        "localizer": (clone_series(chest[:2], tmp_path / "loc", edit=localizer), "localizer"),
        "short": (clone_series(chest[:15], tmp_path / "short"), "too-few-slices"),
        "own": (clone_series(chest, tmp_path / "own", edit=own), "own-output"),
    }
    uid_of = {rel: str(pydicom.dcmread(_files(shared_data, rel)[0], stop_before_pixels=True)
                       .SeriesInstanceUID) for rel in EXPECTED}
    with LungnodeProcess(tmp_path / "node", {
            "completion": {"quiet_period_s": 2.0, "grace_s": 0.5, "poll_s": 0.1},
            "jobs": {"local_workers": 0}}) as node:
        db = Database(node.db_url)
        for rel, (decision, _) in EXPECTED.items():
            if decision == "refused":
                with pytest.raises(ConnectionError):
                    send_files(node.port, _files(shared_data, rel))
                continue
            statuses = send_files(node.port, _files(shared_data, rel))
            assert all(s == 0 for s in statuses), (rel, statuses)
        for files, _rule in variants.values():
            assert send_files(node.port, files) == [0] * len(files)
        # the abdomen series has empty UIDs: refused, never a series
        bad = sorted((shared_data / "ct/abdomen-20-slices-j2k-empty-uids").iterdir())[:2]
        assert all(s not in (0, None) for s in send_files(node.port, bad))

        def settled() -> bool:
            with db.session() as s:
                return not s.scalar(select(func.count()).select_from(Series)
                                    .where(Series.state == "receiving"))
        wait_for(settled, 20, what="every series to complete")
        accepted = {rel: v for rel, v in EXPECTED.items() if v[0] != "refused"}
        for rel, (decision, rule) in EXPECTED.items():
            row = read_series(db, uid_of[rel])
            if decision == "refused":
                assert row is None, rel
                continue
            assert row is not None, rel
            assert (row["decision"], row["decision_rule"]) == (decision, rule), rel
            assert row["state"] == ("complete" if decision == "include" else "ignored")
        for name, (files, rule) in variants.items():
            uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
            row = read_series(db, uid)
            assert row is not None and (row["decision"], row["decision_rule"]) == ("exclude", rule), name
            assert read_jobs(db, uid) == []
        with db.session() as s:
            n_series = s.scalar(select(func.count()).select_from(Series))
        assert n_series == len({uid_of[rel] for rel in accepted}) + len(variants)
        jobs = read_jobs(db)
        assert [j["series_uid"] for j in jobs] == [uid_of["ct/chest-30-slices-uncompressed"]]

        chest_uid = uid_of["ct/chest-30-slices-uncompressed"]
        out = node.cli("explain", chest_uid).stdout
        assert "decision: include (rule: chest-ct)" in out
        assert "ok   axial_angle_deg: 0 (wanted <= 5)" in out
        assert "ok   spacing: 8 (wanted <= 10)" in out
        assert "FAIL slices: 30 (wanted <= 19)" in out
        out = node.cli("explain", uid_of["reference/dcmqi-tid1500/sr.dcm"]).stdout
        assert "decision: exclude (rule: not-ct)" in out
        assert "ok   modality_not: ['SR'] (wanted none of ['CT'])" in out
        dry = node.cli("rules", "dry-run").stdout.splitlines()
        assert dry[-1] == f"{n_series} series"
        lines = {line.split()[-1]: line.split()[:2] for line in dry[1:-1]}
        for rel, (decision, rule) in accepted.items():
            assert lines[uid_of[rel]] == [decision, rule], rel
        assert node.cli("explain", "1.2.3.4.404", check=False).returncode == 1
        db.dispose()
