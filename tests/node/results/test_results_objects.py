"""SEG, SR and SC objects built from a real chest CT: validity (dciodvfy, dsrdump), voxel-exact
round trip, provenance, per-destination variants, and structure compared with the references."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from lungnode.inference.types import InferenceResult
from lungnode.node.results.build import BuiltOutput, Profile, build_outputs
from lungnode.node.results.common import OutputContext
from lungnode.node.results.seg import SegOptions
from lungnode.provenance import is_own_output


def _dciodvfy_errors(path: Path) -> list[str]:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def _write(tmp_path: Path, out: BuiltOutput) -> Path:
    path = tmp_path / f"{out.kind}-{out.sop_instance_uid}.dcm"
    path.write_bytes(out.data)
    return path


def _ctx(result: InferenceResult) -> OutputContext:
    return OutputContext(job_id=42, model=result.model, series_number_base=9100)


@pytest.fixture(scope="module")
def default_outputs(chest_result: InferenceResult) -> list[BuiltOutput]:
    return build_outputs(chest_result, _ctx(chest_result), Profile(objects=("seg", "sr", "sc")))


def _seg_masks(seg_paths: list[Path], result: InferenceResult) -> dict[str, np.ndarray]:
    """Read SEG files back and paint them onto the source grid, by segment label."""
    uids = list(result.volume.sop_instance_uids)
    shape = result.lung_labels.shape
    masks: dict[str, np.ndarray] = {}
    for path in seg_paths:
        seg = hd.seg.segread(path)
        referenced = [u for u in uids if u in {
            item.ReferencedSOPInstanceUID
            for ref in seg.ReferencedSeriesSequence for item in ref.ReferencedInstanceSequence}]
        for item in seg.SegmentSequence:
            label, number = str(item.SegmentLabel), int(item.SegmentNumber)
            pixels = seg.get_pixels_by_source_instance(
                source_sop_instance_uids=referenced, segment_numbers=[number],
                combine_segments=False, skip_overlap_checks=True)
            target = masks.setdefault(label, np.zeros(shape, dtype=bool))
            for i, uid in enumerate(referenced):
                target[uids.index(uid)] |= pixels[i, :, :, 0] > 0
    return masks


def test_seg_round_trip_is_voxel_exact_and_valid(tmp_path: Path, chest_result: InferenceResult,
                                                 default_outputs: list[BuiltOutput]) -> None:
    segs = [o for o in default_outputs if o.kind == "seg"]
    assert len(segs) == 1
    path = _write(tmp_path, segs[0])
    assert _dciodvfy_errors(path) == []
    masks = _seg_masks([path], chest_result)
    assert np.array_equal(masks["Lung"], chest_result.lung_labels > 0)
    assert np.array_equal(masks["Infiltrate"], chest_result.infiltrate)
    assert chest_result.infiltrate.sum() > 0
    ds = pydicom.dcmread(path)
    src = pydicom.dcmread(chest_result.volume.source_files[0], stop_before_pixels=True)
    assert ds.SegmentationType == "BINARY"
    assert ds.FrameOfReferenceUID == src.FrameOfReferenceUID
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == src.SeriesInstanceUID
    assert len(ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == 30
    assert int(ds.NumberOfFrames) == 60  # empty frames kept by default (OHIF)
    lung, infiltrate = ds.SegmentSequence
    assert (lung.SegmentedPropertyCategoryCodeSequence[0].CodeValue,
            lung.SegmentedPropertyTypeCodeSequence[0].CodeValue) == ("91723000", "39607008")
    assert (infiltrate.SegmentedPropertyCategoryCodeSequence[0].CodeValue,
            infiltrate.SegmentedPropertyTypeCodeSequence[0].CodeValue) == ("49755003", "112121")
    assert infiltrate.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "DCM"
    assert infiltrate.AnatomicRegionSequence[0].CodeValue == "39607008"
    for item in (lung, infiltrate):
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        assert item.SegmentAlgorithmName == "lungnode-test"
        assert item.SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion == "0.0.1"
        assert item.TrackingUID and len(item.RecommendedDisplayCIELabValue) == 3


def test_provenance_and_patient_study_copied(tmp_path: Path, chest_result: InferenceResult,
                                             default_outputs: list[BuiltOutput]) -> None:
    src = pydicom.dcmread(chest_result.volume.source_files[0], stop_before_pixels=True)
    numbers = {"seg": 9100, "sr": 9101, "sc": 9102}
    for out in default_outputs:
        ds = out.dataset
        assert is_own_output(ds)
        assert ds.Manufacturer == "lungnode" and ds.ManufacturerModelName
        assert ds.SeriesNumber == numbers[out.kind]
        assert ds.SeriesInstanceUID != src.SeriesInstanceUID
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                        "StudyInstanceUID", "StudyDate", "AccessionNumber"):
            assert ds.get(keyword) == src.get(keyword), (out.kind, keyword)
        assert any(e.Manufacturer == "lungnode"
                   and e.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
                   for e in ds.ContributingEquipmentSequence), out.kind


def test_sr_tid1500_tree_in_dsrdump(tmp_path: Path, chest_result: InferenceResult,
                                     default_outputs: list[BuiltOutput]) -> None:
    if shutil.which("dsrdump") is None:
        pytest.skip("DCMTK dsrdump is not installed")
    sr = next(o for o in default_outputs if o.kind == "sr")
    seg = next(o for o in default_outputs if o.kind == "seg")
    path = _write(tmp_path, sr)
    assert _dciodvfy_errors(path) == []
    dump = subprocess.run(["dsrdump", "+Pc", str(path)], capture_output=True, text=True, check=True)
    text = dump.stdout
    assert "Comprehensive SR Document" in text
    assert '(126000,DCM,"Imaging Measurement Report")' in text
    assert '(126010,DCM,"Imaging Measurements")' in text
    # lung, infiltrate, six zones, both lungs
    assert text.count('(125007,DCM,"Measurement Group")') == 9
    assert '(121007,DCM,"Device")' in text
    assert text.count('(LN0001,99LUNGNODE,"Percent of lung involved")') == 3 + 6 + 1
    assert text.count('(118565006,SCT,"Volume")') == 6 + 6
    for zone in ("Upper", "Middle", "Lower"):
        assert text.count(f'(LNZ0{"UML".index(zone[0]) + 1},99LUNGNODE,"{zone} lung zone")') >= 2
    assert text.count('(LN0006,99LUNGNODE,"CT severity score of region")') == 6
    assert '(LN0007,99LUNGNODE,"Total CT severity score")' in text
    assert '(LNS01,99LUNGNODE,"CT severity score, Pan et al. 2020")' in text
    assert '(LN0020,99LUNGNODE,"Region assignment method")' in text
    assert '(121073,DCM,"Impression")' in text and "severity score" in text
    assert '(mL,UCUM,"milliliter")' in text
    for side in ("Left", "Right", "Right and left"):
        assert '(121071,DCM,"Finding")' in text and f'"{side}")' in text
    assert '(121191,DCM,"Referenced Segment")' in text
    both = chest_result.measurements.both
    assert f'="{round(both.percent_involved, 2)}"' in text
    # Both groups reference segments of the SEG we built.
    ds = pydicom.dcmread(path)
    evidence = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == seg.sop_instance_uid
    assert ds.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99LUNGNODE"


def test_sc_overlay_series(tmp_path: Path, chest_result: InferenceResult,
                           default_outputs: list[BuiltOutput]) -> None:
    scs = [o for o in default_outputs if o.kind == "sc"]
    assert len(scs) == 30
    assert _dciodvfy_errors(_write(tmp_path, scs[15])) == []
    ds = scs[15].dataset
    assert ds.BurnedInAnnotation == "YES" and "NOT FOR PRIMARY DIAGNOSIS" in ds.ImageComments
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == chest_result.volume.sop_instance_uids[15]
    assert len({o.series_uid for o in scs}) == 1
    pixels = ds.pixel_array
    assert pixels.shape == (512, 512, 3)
    # Infiltrate outline colour is burned in on a slice through the ball.
    k = int(np.argmax(chest_result.infiltrate.sum(axis=(1, 2))))
    burned = scs[k].dataset.pixel_array
    assert np.any(np.all(burned == (255, 80, 0), axis=-1))


def test_destination_variants(tmp_path: Path, chest_result: InferenceResult) -> None:
    """JPEG 2000 lossless, omitted empty frames, one SEG per segment, and a frame budget."""
    profile = Profile(objects=("seg", "sr"), seg=SegOptions(
        transfer_syntax="jpeg2000", omit_empty_frames=True, one_seg_per_segment=True,
        max_frames_per_seg=12))
    outputs = build_outputs(chest_result, _ctx(chest_result), profile)
    segs = [o for o in outputs if o.kind == "seg"]
    assert len({o.series_uid for o in segs}) == 1
    assert all(o.transfer_syntax_uid == "1.2.840.10008.1.2.4.90" for o in segs)
    assert all(int(o.dataset.NumberOfFrames) <= 12 for o in segs)
    # Lung: 30 slices in slabs of 12 → 3 parts; infiltrate: only slabs with content survive?
    assert len(segs) >= 4
    paths = [_write(tmp_path, o) for o in segs]
    assert _dciodvfy_errors(paths[0]) == []
    masks = _seg_masks(paths, chest_result)
    assert np.array_equal(masks["Lung"], chest_result.lung_labels > 0)
    assert np.array_equal(masks["Infiltrate"], chest_result.infiltrate)
    sr = next(o for o in outputs if o.kind == "sr")
    assert _dciodvfy_errors(_write(tmp_path, sr)) == []


def test_predecessor_documents(chest_result: InferenceResult,
                               default_outputs: list[BuiltOutput]) -> None:
    old_sr = next(o for o in default_outputs if o.kind == "sr").dataset
    outputs = build_outputs(chest_result, _ctx(chest_result), Profile(objects=("seg", "sr")),
                            predecessor_sr=old_sr)
    sr = next(o for o in outputs if o.kind == "sr").dataset
    ref = sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == old_sr.SOPInstanceUID
    assert sr.SeriesDescription.endswith("(replaces earlier)")


def test_structure_matches_references(shared_data: Path,
                                      default_outputs: list[BuiltOutput]) -> None:
    """Our SEG carries every attribute of highdicom's and dcmqi's reference SEGs' segment items
    and top level; our SR has dcmqi's TID 1500 skeleton."""
    seg = next(o for o in default_outputs if o.kind == "seg").dataset
    for ref_path in (shared_data / "reference/highdicom/seg_image_ct_binary.dcm",
                     shared_data / "reference/dcmqi-tid1500/seg.dcm"):
        ref = pydicom.dcmread(ref_path, stop_before_pixels=True)
        optional = {"ClinicalTrialSeriesID", "ClinicalTrialTimePointID", "BodyPartExamined",
                    "ContentCreatorName", "InstitutionName", "SeriesDate", "SeriesTime",
                    "AcquisitionContextSequence", "ContentQualification", "ImageComments",
                    "ClinicalTrialCoordinatingCenterName", "ClinicalTrialProtocolID",
                    "ClinicalTrialProtocolName", "ClinicalTrialSiteID", "ClinicalTrialSiteName",
                    "ClinicalTrialSponsorName", "ClinicalTrialSubjectID", "PatientAge",
                    "PatientSize", "PatientWeight", "StudyID", "ReferringPhysicianName",
                    "InstanceCreationDate", "InstanceCreationTime", "StationName",
                    "SpecificCharacterSet", "OtherPatientIDs", "IssuerOfPatientID",
                    "StudyDescription", "AccessionNumber", "SeriesDescription",
                    "LossyImageCompression", "ClinicalTrialTimePointDescription",
                    "DeviceSerialNumber", "SoftwareVersions", "ManufacturerModelName",
                    "PatientIdentityRemoved", "DeidentificationMethod", "TotalPixelMatrixRows",
                    "TotalPixelMatrixColumns", "ImageOrientationSlide", "DimensionOrganizationType",
                    "ContainerIdentifier", "SpecimenDescriptionSequence",
                    "IssuerOfTheContainerIdentifierSequence", "ContainerTypeCodeSequence",
                    "TotalPixelMatrixOriginSequence", "PositionReferenceIndicator",
                    "TotalPixelMatrixFocalPlanes", "ContentDate", "ContentTime", "SeriesNumber",
                    "RequestingService"}
        missing = {e.keyword for e in ref if e.keyword and not e.tag.is_private}
        missing -= {e.keyword for e in seg} | optional
        assert missing == set(), ref_path.name
        ref_item = {e.keyword for e in ref.SegmentSequence[0]} - {"SegmentDescription"}
        ours = {e.keyword for e in seg.SegmentSequence[1]}
        assert ref_item - ours - {"AnatomicRegionSequence"} == set(), ref_path.name
    ref_sr = pydicom.dcmread(shared_data / "reference/dcmqi-tid1500/sr.dcm")
    sr = next(o for o in default_outputs if o.kind == "sr").dataset

    def top_concepts(ds: pydicom.Dataset) -> list[str]:
        return [item.ConceptNameCodeSequence[0].CodeValue for item in ds.ContentSequence
                if item.ValueType == "CONTAINER"]

    assert sr.ConceptNameCodeSequence[0].CodeValue == ref_sr.ConceptNameCodeSequence[0].CodeValue
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    # dcmqi adds the optional Image Library (111028); the Imaging Measurements container is shared.
    assert top_concepts(sr) == ["126010"]
    assert set(top_concepts(sr)) <= set(top_concepts(ref_sr))
