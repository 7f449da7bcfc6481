"""A DICOM Segmentation (SEG) of one mammogram: the stage-1 tissue classes and the stage-2 lesion mask, written with
``highdicom`` so that PACS viewers can overlay it on the source image.

One SEG instance (Segmentation Storage, SOP Class UID 1.2.840.10008.5.1.4.1.1.66.4; DICOM PS3.3 A.51) per source
image, Segmentation Type BINARY (PS3.3 C.8.20.2), one frame per segment, always all four segments in this order
(the numbering is fixed, whether or not a segment has any pixel):

1. "Adipose tissue": ``tissue_classes == 1``; category Tissue (SCT 85756007), type Adipose tissue (SCT 55603005).
2. "Fibroglandular tissue": ``tissue_classes == 2``; category Tissue, type Parenchyma (SCT 91772007).
3. "Pectoral muscle": ``tissue_classes == 3``; category Anatomical Structure (SCT 91723000), type Pectoralis major
   muscle (SCT 60005003).
4. "Lesion": ``lesion_mask``; category Morphologically Abnormal Structure (SCT 49755003), type Lesion (SCT 52988006).
5. "Dense tissue", written when a ``dense_mask`` is given (the suite always gives one): the dense pixels whose share of
   the breast is the record's percent density; category Tissue, type Mammographic breast density (SCT 129793001).

Why these codes: :data:`SEGMENTS`. Background (class 0) is not a segment: a SEG pixel outside every segment is
background by definition. The lesion segment overlaps the tissue segments (Segments Overlap is stated in the file).

Geometry. Mammograms are 2-D projection images (MG / DX) and usually state no Image Position / Orientation
(Patient). highdicom then builds the SEG the way PS3.3 A.51.5 allows for images without a patient coordinate
system: the SEG frames have the source's rows and columns, pixel for pixel, and each frame points at the source
image through the Derivation Image Sequence (Source Image Sequence, Spatial Locations Preserved YES); the source is
also listed in the Referenced Series Sequence. The SEG carries the source's Study Instance UID, patient and study
attributes, and its Frame of Reference UID when the source has one. Its Pixel Measures (shared functional group)
give the source's pixel spacing in mm (see :func:`mammo.imaging.dicom_pixel_spacing`: Pixel Spacing, else Imager Pixel
Spacing over the magnification factor, ...); they are left out when the source states no spacing. How highdicom
handles sources without a patient coordinate system: ``highdicom.seg.Segmentation`` (its ``source_images`` /
``pixel_array`` parameters) and highdicom pull request #183, "Allow segmentations of images without a frame of
reference UID".

What lives here: :func:`write_dicom_seg` (one SEG file from a source DICOM and its two masks), the segments and
their codes (:data:`SEGMENTS`, :data:`SEGMENT_COLORS_RGB`, :data:`LESION_SEGMENT`) and the fixed texts of the SEG
(:data:`ALGORITHM_NAME`, :data:`MANUFACTURER`, ...). :mod:`mammo.inference.outputs` calls it for each DICOM input.

This module needs ``highdicom`` (``requirements.txt``) and does no inference; the caller passes the masks.
"""

from __future__ import annotations

import copy
import io
import math
import os
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.sr.codedict import codes

from mammo.core import labels
from mammo.core.fileio import atomic_write_bytes
from mammo.imaging import dicom_pixel_spacing

#: Algorithm Name (0066,0036) of every segment, and the Manufacturer Model Name of the SEG (LO, at most 64 chars).
ALGORITHM_NAME = "Cascade mammogram segmentation (ACA-ASPP ResUNet)"
#: Manufacturer (0008,0070) of the SEG: the software that made it (PS3.3 C.7.5.1, General Equipment).
MANUFACTURER = "Cascade mammogram segmentation suite"
#: Device Serial Number (0018,1000): Type 1 in the Enhanced General Equipment module (PS3.3 C.7.5.2) that the SEG
#: IOD requires; software has no serial number, so a fixed placeholder is written.
DEVICE_SERIAL_NUMBER = "0"
#: Algorithm Version (0066,0031) when the caller gives none. Pass something that identifies the weights (e.g. the
#: first 12 hex digits of the checkpoints' SHA-256) so that a reader can tell which model made the SEG.
DEFAULT_ALGORITHM_VERSION = "unspecified"
#: Series Description (0008,103E) of the SEG series when the caller gives none (LO, at most 64 characters).
DEFAULT_SERIES_DESCRIPTION = "AI tissue and lesion segmentation (research)"
#: Series Number (0020,0011) of the SEG series when the caller gives none. Our choice: far above the numbers that
#: modalities give acquired series (1, 2, ...), so the SEG sorts after them in a viewer's series list.
DEFAULT_SERIES_NUMBER = 9001
#: Content Label (0070,0080) of the SEG (CS: upper case, at most 16 characters; PS3.3 C.10.9).
CONTENT_LABEL = "TISSUE_LESION"
#: Slice Thickness (0018,0050) written in the Pixel Measures when the source states none. A projection image has no
#: slice, but the Pixel Measures macro needs one when a Frame of Reference is present (PS3.3 C.7.6.16.2.1, CP 1426)
#: and highdicom's reader refuses a Pixel Measures item without it (``PixelMeasuresSequence.from_sequence`` in
#: highdicom 0.28), so it is written with or without a Frame of Reference. 1 mm is a placeholder with no geometric
#: meaning for a single 2-D frame; it does not change where the SEG lies on the mammogram.
PLACEHOLDER_SLICE_THICKNESS_MM = 1.0

#: Number of the lesion segment (the tissue segments are numbered by their stage-1 class ids 1..3).
LESION_SEGMENT = 4
#: Number of the dense-tissue segment (present when a dense mask is given).
DENSE_SEGMENT = 5

#: Segment number -> (Segment Label, Segmented Property Category, Segmented Property Type, anatomic region or None).
#: Codes from ``pydicom.sr.codedict.codes`` (DICOM PS3.16). Categories from CID 7150 "Segmentation Property
#: Categories"; types as follows:
#:
#: - adipose: SCT 55603005 "Adipose tissue" (CID 7166 / 7191, tissue types; pydicom's meaning string is "Fat").
#: - FGT: no SNOMED CT concept for "fibroglandular tissue" is in pydicom's dictionary or in CID 7151
#:   "Segmentation Property Types"; SCT 91772007 "Parenchyma" is used (the breast parenchyma is the usual
#:   radiological name of the fibroglandular tissue), with the anatomic region Breast (SCT 76752008).
#:   The Segment Label says "Fibroglandular tissue" plainly.
#: - pectoral: SCT 60005003 "Pectoralis major muscle" (CID 7151), the muscle seen on the MLO view, in the category
#:   Anatomical Structure (SCT 91723000); more specific than Tissue / Muscle.
#: - lesion: SCT 52988006 "Lesion" (CID 7159 "Lesion Segmentation Types"), category Morphologically Abnormal
#:   Structure (SCT 49755003): stage 2 segments any lesion (its masks do not tell masses from other findings), so
#:   no narrower type (Mass, Neoplasm) would be true.
SEGMENTS: dict[int, tuple[str, Any, Any, Any]] = {
    labels.ADIPOSE: ("Adipose tissue", codes.SCT.Tissue, codes.SCT.AdiposeTissue, codes.SCT.Breast),
    labels.FGT: ("Fibroglandular tissue", codes.SCT.Tissue, codes.SCT.Parenchyma, codes.SCT.Breast),
    labels.PECTORAL: ("Pectoral muscle", codes.SCT.AnatomicalStructure, codes.SCT.PectoralisMajorMuscle, None),
    LESION_SEGMENT: ("Lesion", codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Lesion, codes.SCT.Breast),
    # the dense pixels: SCT 129793001 "Mammographic breast density" (pydicom's dictionary), region Breast
    DENSE_SEGMENT: ("Dense tissue", codes.SCT.Tissue, codes.SCT.MammographicBreastDensity, codes.SCT.Breast),
}

#: Recommended Display CIELab Value (0062,000D) of each segment, given here in RGB. The tissue colours are those of
#: :data:`mammo.inference.outputs.TISSUE_COLORS_RGB` (adipose yellow, FGT magenta, pectoral blue; repeated, not
#: imported, because ``outputs`` imports torch; a test keeps them equal); the lesion is red, as its contour in the
#: figure.
SEGMENT_COLORS_RGB: dict[int, tuple[int, int, int]] = {
    labels.ADIPOSE: (240, 200, 60), labels.FGT: (220, 40, 150), labels.PECTORAL: (60, 120, 255),
    LESION_SEGMENT: (255, 0, 0), DENSE_SEGMENT: (255, 255, 255),
}

#: Attributes highdicom reads from the source without a default (Type 2 in the Patient / General Study modules,
#: PS3.3 C.7.1.1 and C.7.2.1: present, but may be empty). A source lacking one gets an empty value in the copy
#: handed to highdicom, which is what Type 2 allows.
_TYPE2_COPIED = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                 "StudyDate", "StudyTime")
#: Attributes without which a file is not a usable source image (PS3.3 C.12.1 SOP Common, C.7.2.1 / C.7.3.1 study
#: and series, C.7.6.3 Image Pixel).
_REQUIRED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Rows", "Columns")
#: Pixel data elements, left out of the metadata copy handed to highdicom (it needs the metadata only).
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def _source_name(source: Dataset | str | os.PathLike) -> str:
    if isinstance(source, Dataset):
        filename = getattr(source, "filename", None)
        return str(filename) if isinstance(filename, (str, os.PathLike)) and str(filename) else (
            f"dataset with SOP Instance UID {source.get('SOPInstanceUID', '?')}")
    return str(source)


def _read_source(path: Path) -> Dataset:
    """Read a source DICOM's metadata (pixel data not loaded). Raises ValueError for a file that is not DICOM."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such DICOM file")
    with open(path, "rb") as stream:
        head = stream.read(132)
    has_preamble = len(head) == 132 and head[128:132] == b"DICM"
    try:
        # force=True only without the preamble (a bare data set), as imaging.read_image does
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=not has_preamble)
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError, AttributeError) as exc:
        raise ValueError(f"{path}: not a readable DICOM file ({type(exc).__name__}: {exc})") from exc
    standard_groups = {0x0002, 0x0008, 0x0010, 0x0018, 0x0020, 0x0028}
    if not has_preamble and not any(tag.group in standard_groups for tag in ds.keys()):
        raise ValueError(f"{path}: not a DICOM file (no 'DICM' header and no standard DICOM elements); is it a text "
                         "or other file renamed .dcm?")
    return ds


def _source_metadata(ds: Dataset, name: str) -> Dataset:
    """A copy of the source's metadata for highdicom: no pixel data, empty Type 2 patient / study attributes where
    missing, and the Pixel Spacing / Slice Thickness the SEG's Pixel Measures are built from. ``ds`` is not changed.
    """
    missing = [keyword for keyword in _REQUIRED if keyword not in ds]
    if missing:
        raise ValueError(f"{name}: not a DICOM image that a SEG can reference: missing {', '.join(missing)}")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ValueError(f"{name}: a multi-frame image ({frames} frames); the suite segments single-frame "
                         "mammograms (pass one 2-D image per file)")
    meta = Dataset()
    for tag in ds.keys():
        element = ds[tag]
        if element.keyword not in _PIXEL_KEYWORDS:
            meta.add(copy.deepcopy(element))
    if hasattr(ds, "file_meta"):
        meta.file_meta = copy.deepcopy(ds.file_meta)
    for keyword in _TYPE2_COPIED:
        if keyword not in meta:
            setattr(meta, keyword, None)
    spacing = dicom_pixel_spacing(ds, [])
    if spacing is not None:
        if "PixelSpacing" not in meta:
            # Pixel Spacing of the SEG = spacing in the patient (PS3.3 10.7.1); imaging.dicom_pixel_spacing gives
            # it from ImagerPixelSpacing (divided by the magnification factor) etc. when the source has no
            # PixelSpacing. Only the copy changes.
            meta.PixelSpacing = [f"{value:.10g}" for value in spacing]
        if "SliceThickness" not in meta:
            meta.SliceThickness = PLACEHOLDER_SLICE_THICKNESS_MM
    return meta


def _check_masks(tissue_classes: np.ndarray, lesion_mask: np.ndarray, shape: tuple[int, int],
                 name: str) -> tuple[np.ndarray, np.ndarray]:
    tissue_classes, lesion_mask = np.asarray(tissue_classes), np.asarray(lesion_mask)
    for what, array in (("tissue_classes", tissue_classes), ("lesion_mask", lesion_mask)):
        if array.shape != shape:
            raise ValueError(f"{name}: {what} has shape {array.shape}, expected {shape} (Rows, Columns of the source "
                             "image): pass the masks at the image's original resolution and orientation")
    if not np.issubdtype(tissue_classes.dtype, np.integer):
        raise ValueError(f"{name}: tissue_classes has dtype {tissue_classes.dtype}, expected integer class ids 0..3")
    if tissue_classes.size and (tissue_classes.min() < 0 or tissue_classes.max() > labels.PECTORAL):
        raise ValueError(f"{name}: tissue_classes has values {tissue_classes.min()}..{tissue_classes.max()}, expected "
                         f"0..{labels.PECTORAL} ({', '.join(labels.TISSUE_CLASS_NAMES)})")
    if lesion_mask.dtype != bool:
        if not np.issubdtype(lesion_mask.dtype, np.integer):
            raise ValueError(f"{name}: lesion_mask has dtype {lesion_mask.dtype}; pass a boolean mask (e.g. "
                             "probability >= threshold), not the probability map")
        if not np.isin(lesion_mask, (0, 1)).all():
            raise ValueError(f"{name}: lesion_mask has values other than 0 / 1; pass a boolean mask")
        lesion_mask = lesion_mask.astype(bool)
    return tissue_classes, lesion_mask


def _check_request(source: Dataset | str | os.PathLike, name: str, out_path: Path, *, overwrite: bool,
                   threshold: float | None, min_area_px: int | None, texts: dict[str, str]) -> Dataset:
    """The source dataset (read from its file when ``source`` is a path), once the request is known to be valid.

    ``texts``: ``{argument name: text}`` of the LO elements (at most 64 characters each). Raises as
    :func:`write_dicom_seg`.
    """
    source_file = Path(name) if not isinstance(source, Dataset) or getattr(source, "filename", None) else None
    if source_file is not None and source_file.exists() and out_path.exists() and \
            out_path.resolve() == source_file.resolve():
        raise ValueError(f"{name}: out_path is the source file itself; the source is never overwritten")
    ds = source if isinstance(source, Dataset) else _read_source(Path(source))
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"{out_path} exists; not overwritten (remove it or pass overwrite=True)")
    if threshold is not None and not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
        raise ValueError(f"{name}: threshold {threshold} is not a probability in [0, 1]")
    if min_area_px is not None and int(min_area_px) < 1:
        raise ValueError(f"{name}: min_area_px {min_area_px} is not a pixel count >= 1")
    for what, text in texts.items():
        if len(text) > 64:
            raise ValueError(f"{name}: {what} has {len(text)} characters, at most 64 fit its DICOM element (LO)")
    return ds


def _stacked_segments(tissue_classes: np.ndarray, lesion_mask: np.ndarray, shape: tuple[int, int],
                      dense_mask: np.ndarray | None = None) -> np.ndarray:
    """``(1, H, W, 4)`` uint8 (``(1, H, W, 5)`` with ``dense_mask``), one channel per segment (number - 1):
    highdicom's layout for overlapping BINARY segments."""
    stacked = np.zeros((1, *shape, LESION_SEGMENT if dense_mask is None else DENSE_SEGMENT), dtype=np.uint8)
    for number in (labels.ADIPOSE, labels.FGT, labels.PECTORAL):
        stacked[0, :, :, number - 1] = tissue_classes == number
    stacked[0, :, :, LESION_SEGMENT - 1] = lesion_mask
    if dense_mask is not None:
        stacked[0, :, :, DENSE_SEGMENT - 1] = dense_mask
    return stacked


def _segment_descriptions(threshold: float | None, min_area_px: int | None, algorithm_version: str,
                          dense: bool = False) -> list[hd.seg.SegmentDescription]:
    """The four segments' descriptions (:data:`SEGMENTS`, in segment order), each naming this suite as its AUTOMATIC
    algorithm; the lesion segment's parameters and description state the threshold and smallest component."""
    family = codes.cid7162.ArtificialIntelligence  # DCM 123110 "Artificial Intelligence", CID 7162 Algorithm Family
    lesion_parameters = {} if threshold is None else {"lesion_probability_threshold": f"{threshold:g}"}
    if min_area_px is not None:
        lesion_parameters["min_lesion_area_px"] = str(int(min_area_px))
    descriptions = []
    for number, (label, category, property_type, region) in SEGMENTS.items():
        if number == DENSE_SEGMENT and not dense:
            continue
        algorithm = hd.AlgorithmIdentificationSequence(
            name=ALGORITHM_NAME, family=family, version=algorithm_version,
            parameters=(lesion_parameters or None) if number == LESION_SEGMENT else None)
        description = hd.seg.SegmentDescription(
            segment_number=number, segment_label=label, segmented_property_category=category,
            segmented_property_type=property_type, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm, anatomic_regions=None if region is None else [region],
            display_color=hd.color.CIELabColor.from_rgb(*SEGMENT_COLORS_RGB[number]))
        if number == LESION_SEGMENT:
            description.SegmentDescription = ("stage-2 lesion probability" + (
                f" >= {threshold:g}" if threshold is not None else " above the run's threshold") + (
                f", components >= {int(min_area_px)} px" if min_area_px is not None else ""))
        elif number == DENSE_SEGMENT:
            description.SegmentDescription = "dense pixels of the FGT region (above its Otsu level)"
        else:
            description.SegmentDescription = f"stage-1 tissue class {number} ({labels.TISSUE_CLASS_NAMES[number]})"
        descriptions.append(description)
    return descriptions


def _build_seg(ds: Dataset, meta: Dataset, stacked: np.ndarray, descriptions: list, name: str, *,
               algorithm_version: str, series_description: str, series_number: int) -> hd.seg.Segmentation:
    """The SEG dataset of ``meta`` (the source's metadata copy), with the source's Patient Orientation and Body Part
    Examined. Raises ValueError (naming the source) when highdicom refuses the source."""
    try:
        seg = hd.seg.Segmentation(
            source_images=[meta], pixel_array=stacked, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=series_number,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER,
            manufacturer_model_name=ALGORITHM_NAME, software_versions=algorithm_version,
            device_serial_number=DEVICE_SERIAL_NUMBER, content_label=CONTENT_LABEL,
            content_description="tissue classes and lesion mask", omit_empty_frames=False,
            series_description=series_description)
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise ValueError(f"{name}: highdicom cannot build a SEG for this source ({type(exc).__name__}: {exc})") from exc
    # Patient Orientation (0020,0020), General Image module: Type 2C, required when the image has no Image
    # Orientation (Patient) (PS3.3 C.7.6.1), which is the case when the SEG has no Plane Orientation; highdicom does
    # not set it. The SEG's pixel grid is the source's, so the source's value (e.g. A\FR) holds for the SEG too;
    # empty when the source states none.
    if "PlaneOrientationSequence" not in seg.SharedFunctionalGroupsSequence[0]:
        seg.PatientOrientation = ds.get("PatientOrientation", None)
    # Body Part Examined (0018,0015), General Series (PS3.3 C.7.3.1), so that a viewer can group the SEG with its
    # image. Laterality (0020,0060) is not copied: dciodvfy reports it as present when its Type 2C condition is
    # unsatisfied (the SEG IOD has no Image Laterality to trigger it); the laterality stays in the referenced image.
    if ds.get("BodyPartExamined", None):
        seg.BodyPartExamined = ds.BodyPartExamined
    return seg


def write_dicom_seg(source: Dataset | str | os.PathLike, tissue_classes: np.ndarray, lesion_mask: np.ndarray,
                    out_path: str | os.PathLike, *, overwrite: bool = False, threshold: float | None = None,
                    min_area_px: int | None = None, algorithm_version: str = DEFAULT_ALGORITHM_VERSION,
                    series_description: str = DEFAULT_SERIES_DESCRIPTION,
                    series_number: int = DEFAULT_SERIES_NUMBER, dense_mask: np.ndarray | None = None) -> Path:
    """Write a BINARY DICOM Segmentation of one mammogram: segments 1 adipose, 2 FGT, 3 pectoral muscle, 4 lesion.

    See the module docstring for the segment numbering and codes. Every segment is written, empty or not
    (highdicom's ``omit_empty_frames=False``), so segment ``n`` is always frame ``n``. Each segment names this suite
    as its AUTOMATIC algorithm (Segment Algorithm Type, PS3.3 C.8.20.2; Algorithm Family "Artificial Intelligence",
    CID 7162); the lesion segment's Algorithm Parameters state the threshold. A new Series and SOP Instance UID is
    made on each call. The file is written atomically (:func:`mammo.core.fileio.atomic_write_bytes`), Explicit VR
    Little Endian.

    Shape:
        - tissue_classes: ``(Rows, Columns)`` of the source, integer (uint8) class ids 0..3 (:mod:`mammo.core.labels`).
        - lesion_mask: ``(Rows, Columns)`` bool (or integer 0 / 1): the lesion probability at the chosen threshold.

    Args:
        source: the source DICOM image: a path, or a ``pydicom.Dataset`` (its pixel data is not needed; it is not
            changed). Neither the file nor the dataset is ever modified.
        tissue_classes: stage-1 class map on the source's own pixel grid (original resolution and orientation).
        lesion_mask: stage-2 lesion mask on the same grid.
        out_path: the SEG file to write (``<stem>_seg.dcm`` by the suite's convention); parent folders are made.
        overwrite: replace an existing ``out_path``; by default an existing file is an error.
        threshold: the lesion probability threshold the mask was made with, in [0, 1]; recorded in the lesion
            segment's Algorithm Parameters and Segment Description. None: not recorded.
        min_area_px: the smallest lesion component kept in the mask, pixels (>= 1); recorded beside the threshold.
            None: not recorded.
        algorithm_version: Algorithm Version (0066,0031) and Software Versions (0018,1020) of the SEG.
        series_description: Series Description (0008,103E) of the new SEG series (at most 64 characters).
        series_number: Series Number (0020,0011) of the new SEG series.
        dense_mask: ``(Rows, Columns)`` bool dense-tissue mask, written as segment 5; None: four segments.

    Returns:
        ``out_path`` as a Path.

    Raises:
        FileNotFoundError: ``source`` is a path that does not exist.
        FileExistsError: ``out_path`` exists and ``overwrite`` is False (the message says how to allow it).
        ValueError: ``source`` is not a readable single-frame DICOM image (a text file named .dcm, a report, a file
            without Rows / Columns / UIDs); a mask's shape differs from the source's (Rows, Columns); a mask's values
            are out of range; ``threshold`` is outside [0, 1]; ``out_path`` is the source file; a text is too long;
            or highdicom refuses the source. Every message names the source file.
    """
    name = _source_name(source)
    out_path = Path(out_path)
    ds = _check_request(source, name, out_path, overwrite=overwrite, threshold=threshold, min_area_px=min_area_px,
                        texts={"series_description": series_description, "algorithm_version": algorithm_version})
    meta = _source_metadata(ds, name)
    shape = (int(meta.Rows), int(meta.Columns))
    tissue_classes, lesion_mask = _check_masks(tissue_classes, lesion_mask, shape, name)
    if dense_mask is not None:
        dense_mask = _check_masks(tissue_classes, dense_mask, shape, name)[1]
    seg = _build_seg(ds, meta, _stacked_segments(tissue_classes, lesion_mask, shape, dense_mask),
                     _segment_descriptions(threshold, min_area_px, algorithm_version, dense_mask is not None), name,
                     algorithm_version=algorithm_version, series_description=series_description,
                     series_number=series_number)
    # A DICOM Part 10 file (128-byte preamble, "DICM", file meta information; PS3.10 7.1), written atomically.
    stream = io.BytesIO()
    pydicom.dcmwrite(stream, seg, enforce_file_format=True)
    return atomic_write_bytes(out_path, stream.getvalue(), overwrite=overwrite)
