"""dicom_seg: the DICOM Segmentation written for a DICOM mammogram, read back with highdicom.

The source images are made here with pydicom (no real DICOM mammogram is in ../shared/data): MG "For Presentation",
MONOCHROME2, 16-bit, 61 x 47 pixels (odd sizes, so BINARY bit packing crosses byte and frame boundaries), with
hand-made masks whose pixels are known.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from mammo.inference import dicom_seg
from dicom_helpers import make_dicom  # the suite's DICOM maker (pydicom, MG For Presentation, Explicit VR LE)

ROWS, COLUMNS = 61, 47


def make_mammogram(path, *, frame_of_reference: bool = True, spacing_keyword: str = "PixelSpacing",
                   spacing=(0.07, 0.065)):
    """Write a small MG For Presentation image (16-bit MONOCHROME2) to ``path``; returns it as read back."""
    elements = dict(StudyInstanceUID=generate_uid(), SeriesInstanceUID=generate_uid(), SeriesNumber=1,
                    InstanceNumber=1, PresentationIntentType="FOR PRESENTATION", BodyPartExamined="BREAST",
                    ImageLaterality="L", ViewPosition="MLO", PatientOrientation=["A", "FR"],
                    PatientName="Test^Patient", PatientBirthDate="19700101", PatientSex="F", AccessionNumber="A1",
                    StudyID="1", StudyDate="20240101", StudyTime="120000", ReferringPhysicianName="")
    elements[spacing_keyword] = list(spacing)
    if frame_of_reference:
        elements.update(FrameOfReferenceUID=generate_uid(), PositionReferenceIndicator="")
    pixels = np.arange(ROWS * COLUMNS, dtype=np.uint16).reshape(ROWS, COLUMNS) * 20
    return pydicom.dcmread(make_dicom(pixels, path, **elements))


def known_masks():
    """An adipose block, an FGT block, a pectoral triangle in the top-left corner and a 3x3 lesion in the FGT."""
    tissue = np.zeros((ROWS, COLUMNS), np.uint8)
    yy, xx = np.mgrid[:ROWS, :COLUMNS]
    tissue[30:55, 5:40] = 1                     # adipose block
    tissue[35:48, 12:30] = 2                    # FGT block inside it
    tissue[xx + yy < 15] = 3                    # pectoral triangle: 15 * 16 / 2 = 120 pixels
    lesion = np.zeros((ROWS, COLUMNS), bool)
    lesion[40:43, 20:23] = True                 # small lesion square inside the FGT
    return tissue, lesion


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_segments(seg_path, source) -> np.ndarray:
    """(H, W, 4) bool: segments 1..4 of the SEG at ``seg_path``, for the frame derived from ``source``."""
    seg = hd.seg.segread(seg_path)
    pixels = seg.get_pixels_by_source_instance([source.SOPInstanceUID], segment_numbers=[1, 2, 3, 4])
    assert pixels.shape == (1, ROWS, COLUMNS, 4)
    return pixels[0].astype(bool)


@pytest.mark.parametrize("frame_of_reference, spacing_keyword", [(True, "PixelSpacing"),
                                                                 (False, "ImagerPixelSpacing")])
def test_seg_holds_the_four_segments_and_references_the_source(tmp_path, frame_of_reference, spacing_keyword):
    source_path = tmp_path / "mammo.dcm"
    source = make_mammogram(source_path, frame_of_reference=frame_of_reference, spacing_keyword=spacing_keyword)
    source_hash = sha256(source_path)
    tissue, lesion = known_masks()

    out = dicom_seg.write_dicom_seg(source_path, tissue, lesion, tmp_path / "mammo_seg.dcm", threshold=0.4,
                                    min_area_px=25, algorithm_version="abc123")

    assert out == tmp_path / "mammo_seg.dcm"
    assert sha256(source_path) == source_hash  # the source is never modified
    seg = hd.seg.segread(out)
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.SegmentationType == "BINARY"
    assert seg.get_segment_numbers() == [1, 2, 3, 4]
    expected = {1: ("Adipose tissue", "55603005"), 2: ("Fibroglandular tissue", "91772007"),
                3: ("Pectoral muscle", "60005003"), 4: ("Lesion", "52988006")}
    for number, (label, type_code) in expected.items():
        description = seg.get_segment_description(number)
        assert description.segment_label == label
        assert description.segmented_property_type.value == type_code
        assert description.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        algorithm = description.algorithm_identification[0]
        assert algorithm.AlgorithmName == dicom_seg.ALGORITHM_NAME and algorithm.AlgorithmVersion == "abc123"
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == codes.cid7162.ArtificialIntelligence.value
    assert seg.get_segment_description(4).segmented_property_category.value == "49755003"
    parameters = str(seg.get_segment_description(4).algorithm_identification[0].AlgorithmParameters)
    assert "lesion_probability_threshold=0.4" in parameters and "min_lesion_area_px=25" in parameters
    assert seg.get_segment_description(4).SegmentDescription.endswith(">= 0.4, components >= 25 px")

    pixels = read_segments(out, source)
    np.testing.assert_array_equal(pixels[..., 0], tissue == 1)
    np.testing.assert_array_equal(pixels[..., 1], tissue == 2)
    np.testing.assert_array_equal(pixels[..., 2], tissue == 3)
    np.testing.assert_array_equal(pixels[..., 3], lesion)
    assert pixels[..., 2].sum() == 120 and pixels[..., 3].sum() == 9  # the triangle and square, as drawn

    assert (seg.Rows, seg.Columns) == (source.Rows, source.Columns)
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.SeriesInstanceUID != source.SeriesInstanceUID and seg.Modality == "SEG"
    (series,) = seg.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    assert [item.ReferencedSOPInstanceUID for item in series.ReferencedInstanceSequence] == [source.SOPInstanceUID]
    assert [item.ReferencedSOPInstanceUID for item in seg.SourceImageSequence] == [source.SOPInstanceUID]
    for frame in seg.PerFrameFunctionalGroupsSequence:  # every frame is derived from the source, pixel for pixel
        (derived,) = frame.DerivationImageSequence[0].SourceImageSequence
        assert derived.ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert derived.SpatialLocationsPreserved == "YES"
    if frame_of_reference:
        assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    else:
        assert "FrameOfReferenceUID" not in seg
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert [float(v) for v in measures.PixelSpacing] == [float(v) for v in source.get(spacing_keyword)]
    assert seg.PatientID == source.PatientID and seg.PatientOrientation == source.PatientOrientation
    assert seg.BodyPartExamined == "BREAST"


def test_empty_segments_are_kept_so_the_numbering_is_fixed(tmp_path):
    source = make_mammogram(tmp_path / "mammo.dcm")
    tissue = np.zeros((ROWS, COLUMNS), np.uint8)
    tissue[10:20, 10:20] = 2  # FGT only: no adipose, no pectoral muscle, no lesion
    out = dicom_seg.write_dicom_seg(tmp_path / "mammo.dcm", tissue, np.zeros((ROWS, COLUMNS), bool),
                                    tmp_path / "mammo_seg.dcm")
    seg = hd.seg.segread(out)
    assert seg.NumberOfFrames == 4 and seg.get_segment_numbers() == [1, 2, 3, 4]
    pixels = read_segments(out, source)
    assert pixels.sum(axis=(0, 1)).tolist() == [0, 100, 0, 0]


def test_a_dataset_source_is_accepted_and_left_unchanged(tmp_path):
    """A pydicom Dataset (pixel data not needed) lacking Type 2 patient / study attributes still gives a SEG."""
    make_mammogram(tmp_path / "mammo.dcm", frame_of_reference=False)
    source = pydicom.dcmread(tmp_path / "mammo.dcm", stop_before_pixels=True)
    for keyword in dicom_seg._TYPE2_COPIED:
        delattr(source, keyword)
    before = source.to_json()
    tissue, lesion = known_masks()
    out = dicom_seg.write_dicom_seg(source, tissue, lesion, tmp_path / "out" / "mammo_seg.dcm")
    assert source.to_json() == before
    assert hd.seg.segread(out).PatientID == ""
    np.testing.assert_array_equal(read_segments(out, source)[..., 3], lesion)


def test_an_existing_seg_is_not_overwritten_unless_asked(tmp_path):
    make_mammogram(tmp_path / "mammo.dcm")
    tissue, lesion = known_masks()
    out = tmp_path / "mammo_seg.dcm"
    out.write_bytes(b"earlier output")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        dicom_seg.write_dicom_seg(tmp_path / "mammo.dcm", tissue, lesion, out)
    assert out.read_bytes() == b"earlier output"
    dicom_seg.write_dicom_seg(tmp_path / "mammo.dcm", tissue, lesion, out, overwrite=True)
    assert hd.seg.segread(out).NumberOfFrames == 4
    with pytest.raises(ValueError, match="source is never overwritten"):
        dicom_seg.write_dicom_seg(tmp_path / "mammo.dcm", tissue, lesion, tmp_path / "mammo.dcm", overwrite=True)


@pytest.mark.parametrize("change, message", [
    (lambda t, m: (t.T, m), r"tissue_classes has shape \(47, 61\), expected \(61, 47\)"),
    (lambda t, m: (t, m[:-1]), r"lesion_mask has shape \(60, 47\), expected \(61, 47\)"),
    (lambda t, m: (t + 1, m), r"values 1\.\.4, expected 0\.\.3"),
    (lambda t, m: (t, m * 0.7), "pass a boolean mask"),
])
def test_wrong_masks_are_refused_with_the_file_named(tmp_path, change, message):
    make_mammogram(tmp_path / "mammo.dcm")
    tissue, lesion = change(*known_masks())
    with pytest.raises(ValueError, match=message) as info:
        dicom_seg.write_dicom_seg(tmp_path / "mammo.dcm", tissue, lesion, tmp_path / "mammo_seg.dcm")
    assert "mammo.dcm" in str(info.value)
    assert not (tmp_path / "mammo_seg.dcm").exists()


def test_a_text_file_named_dcm_is_refused(tmp_path):
    fake = tmp_path / "notes.dcm"
    fake.write_text("this is not a DICOM file\n")
    tissue, lesion = known_masks()
    with pytest.raises(ValueError, match="notes.dcm: not a") as info:
        dicom_seg.write_dicom_seg(fake, tissue, lesion, tmp_path / "notes_seg.dcm")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "notes_seg.dcm").exists()


def test_segment_colours_are_the_suites_tissue_colours():
    from mammo.inference.outputs import TISSUE_COLORS_RGB  # imports torch: kept inside this test

    assert [dicom_seg.SEGMENT_COLORS_RGB[n] for n in (1, 2, 3)] == list(TISSUE_COLORS_RGB[1:])


@pytest.mark.skipif(shutil.which("dciodvfy") is None,
                    reason="dciodvfy not on PATH (Debian/Ubuntu package dicom3tools: apt-get install dicom3tools)")
@pytest.mark.parametrize("frame_of_reference", [True, False])
def test_dciodvfy_finds_no_error(tmp_path, frame_of_reference):
    make_mammogram(tmp_path / "mammo.dcm", frame_of_reference=frame_of_reference)
    tissue, lesion = known_masks()
    out = dicom_seg.write_dicom_seg(tmp_path / "mammo.dcm", tissue, lesion, tmp_path / "mammo_seg.dcm",
                                    threshold=0.5)
    result = subprocess.run(["dciodvfy", str(out)], capture_output=True, text=True, timeout=60)
    report = (result.stdout + result.stderr).splitlines()
    assert "Segmentation" in report, report  # dciodvfy recognised the IOD
    assert [line for line in report if line.startswith("Error")] == [], "\n".join(report)


def test_imager_pixel_spacing_is_corrected_for_magnification(tmp_path):
    """Without Pixel Spacing, the SEG's spacing is that of imaging.dicom_pixel_spacing: the detector spacing over
    the Estimated Radiographic Magnification Factor (a spacing in the breast, PS3.3 10.7.1)."""
    source = make_mammogram(tmp_path / "mammo.dcm", spacing_keyword="ImagerPixelSpacing", spacing=(0.1, 0.1))
    source.EstimatedRadiographicMagnificationFactor = 1.25
    tissue, lesion = known_masks()
    out = dicom_seg.write_dicom_seg(source, tissue, lesion, tmp_path / "mammo_seg.dcm")
    measures = hd.seg.segread(out).SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert [float(v) for v in measures.PixelSpacing] == pytest.approx([0.08, 0.08])
    assert "PixelSpacing" not in source  # the caller's dataset is not changed
