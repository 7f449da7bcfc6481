"""DICOM decoding: modality LUT / rescale, VOI LUT or window, MONOCHROME1 inversion, raw ("For Processing")
images, and the pixel spacing from every place a DICOM file can state it."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from mammo.imaging.errors import ImageReadError
from mammo.imaging.raster import _finish_dtype, _to_grayscale


def _dicom_value_range(ds: Any, arr_is_lut_output: bool) -> tuple[float, float]:
    """Nominal output range of the stored values after the modality LUT / rescale (DICOM PS3.3 C.11.1)."""
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
    if ds.get("ModalityLUTSequence") and arr_is_lut_output:
        lut_bits = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2**lut_bits - 1)
    if int(ds.get("PixelRepresentation", 0)) == 0:
        lo, hi = 0.0, float(2**bits - 1)
    else:
        lo, hi = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope = ds.get("RescaleSlope", None)
    intercept = ds.get("RescaleIntercept", None)
    if slope is not None and intercept is not None:
        a, b = lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)
        lo, hi = min(a, b), max(a, b)
    return lo, hi


#: SOP classes of raw detector images, DICOM PS3.4 B.5: Digital X-Ray, Digital Mammography and Digital Intra-Oral
#: X-Ray Image Storage - For Processing.
FOR_PROCESSING_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1.2.1",
                              "1.2.840.10008.5.1.4.1.1.1.3.1")

#: Percentiles of the log-converted raw image mapped to 0 and 65535 (ours: keeps burned-in markers and the odd
#: dead pixel from setting the range).
RAW_STRETCH_PERCENTILES = (0.1, 99.9)


def is_for_processing(ds: Any) -> bool:
    """Whether a DICOM dataset is a raw detector ("For Processing") image: its SOP Class UID is one of
    :data:`FOR_PROCESSING_SOP_CLASSES`, or its Presentation Intent Type (0008,0068) is ``FOR PROCESSING``."""
    sop_class = str(ds.get("SOPClassUID", ""))
    intent = str(ds.get("PresentationIntentType", "")).strip().upper()
    return sop_class in FOR_PROCESSING_SOP_CLASSES or intent == "FOR PROCESSING"


def _raw_to_presentation(values: np.ndarray, ds: Any, notes: list[str]) -> np.ndarray:
    """A raw ("For Processing") mammogram -> a presentation-like uint16 image (dense tissue bright).

    As LIBRA does for raw FFDM images (Keller et al., Med Phys 39(8), 2012, "Estimation of breast percent density
    in raw and processed full field digital mammography images"): the logarithm of values that are linear in the
    X-ray intensity (Pixel Intensity Relationship (0028,1040) ``LIN``; ``LOG`` data is already logarithmic), then an
    inversion when higher values mean more X-ray intensity (Pixel Intensity Relationship Sign (0028,1041) +1, the
    default), so that attenuating (dense) tissue is bright, then a linear stretch of
    :data:`RAW_STRETCH_PERCENTILES` onto 0..65535. A vendor's own presentation processing differs; the note says so.
    """
    relationship = str(ds.get("PixelIntensityRelationship", "LIN")).strip().upper()
    sign = int(ds.get("PixelIntensityRelationshipSign", 1) or 1)
    if relationship != "LOG":
        values = np.log1p(np.maximum(values - values.min(), 0.0))
    if sign > 0:
        values = -values
    lo, hi = np.percentile(values, RAW_STRETCH_PERCENTILES)
    out = np.clip((values - lo) * (65535.0 / max(hi - lo, 1e-12)), 0, 65535)
    notes.append("For Processing (raw detector) image: converted to a presentation-like image as LIBRA does for raw "
                 f"FFDM (Keller et al., Med Phys 2012): {'logarithm, ' if relationship != 'LOG' else ''}"
                 f"{'inversion, ' if sign > 0 else ''}stretch of the {RAW_STRETCH_PERCENTILES[0]:g}-"
                 f"{RAW_STRETCH_PERCENTILES[1]:g} percentiles. The vendor's presentation processing differs: where the "
                 "For Presentation image of this view exists, pass that one")
    return np.rint(out).astype(np.uint16)


def _spacing_pair(value: Any) -> tuple[float, float] | None:
    try:
        row_mm, col_mm = float(value[0]), float(value[1])
    except (TypeError, ValueError, IndexError):
        return None
    return (row_mm, col_mm) if row_mm > 0 and col_mm > 0 else None


def dicom_pixel_spacing(ds: Any, notes: list[str]) -> tuple[float, float] | None:
    """The ``(row, col)`` pixel spacing in mm of a DICOM image, from every place it can be stored (DICOM PS3.3
    10.7.1 and C.8.11.7), in this order: Pixel Spacing (0028,0030), calibrated; the Pixel Measures functional group
    of an enhanced image (shared, then the first frame's); Imager Pixel Spacing (0018,1164), at the detector, divided
    by the Estimated Radiographic Magnification Factor (0018,1114) when one above 1 is given, so that areas are those
    of the breast; Nominal Scanned Pixel Spacing (0018,2010) of a digitised film. None when none is stated.
    Every source other than Pixel Spacing is noted."""
    spacing = _spacing_pair(ds.get("PixelSpacing", None))
    if spacing is not None:
        return spacing
    for group in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        items = ds.get(group, None) or []
        measures = items[0].get("PixelMeasuresSequence", None) if len(items) else None
        spacing = _spacing_pair(measures[0].get("PixelSpacing", None)) if measures else None
        if spacing is not None:
            notes.append(f"pixel spacing from the Pixel Measures functional group ({group})")
            return spacing
    spacing = _spacing_pair(ds.get("ImagerPixelSpacing", None))
    if spacing is not None:
        try:
            magnification = float(ds.get("EstimatedRadiographicMagnificationFactor", 1.0) or 1.0)
        except (TypeError, ValueError):
            magnification = 1.0
        if magnification > 1.0:
            notes.append(f"pixel spacing from ImagerPixelSpacing divided by the estimated radiographic magnification "
                         f"factor {magnification:g} (spacing in the breast, not at the detector)")
            return spacing[0] / magnification, spacing[1] / magnification
        notes.append("pixel spacing from ImagerPixelSpacing")
        return spacing
    spacing = _spacing_pair(ds.get("NominalScannedPixelSpacing", None))
    if spacing is not None:
        notes.append("pixel spacing from NominalScannedPixelSpacing (a digitised film)")
    return spacing


def _read_dicom(data: bytes, path: Path, notes: list[str],
                info: dict | None = None) -> tuple[np.ndarray, tuple[float, float] | None]:
    """Decode a DICOM file to (H, W) uint8/uint16 in display orientation, plus its pixel spacing in mm.

    Grayscale pipeline (DICOM PS3.3 C.11 and PS3.4 N.2): stored values -> modality LUT or rescale
    (``pydicom.pixels.apply_modality_lut``) -> VOI LUT, else the first window centre/width
    (``pydicom.pixels.apply_voi_lut(index=0)``) -> inversion when Photometric Interpretation is MONOCHROME1 or
    Presentation LUT Shape is INVERSE (for DX/MG images these state the same single inversion, PS3.3 C.8.11.1)
    -> the nominal output range ``[lo, hi]`` of that chain (not the image's own min/max, so that a MONOCHROME1
    copy of an image reads back identically) is mapped linearly onto uint8 when it is exactly 0..255, else
    onto the full uint16 range 0..65535. Colour images are converted to gray; raw ("For Processing") images go
    through :func:`_raw_to_presentation`.

    Raises:
        ImageReadError: not a DICOM file, no or undecodable pixel data, invalid LUT / window or value range.

    ``info``, when given, receives ``view_position`` (the ViewPosition attribute, or None).
    """
    ds = _read_dataset(data, path)
    if info is not None:  # what the anatomy rules need: the view (DICOM PS3.3 C.8.11.7, e.g. "MLO", "CC")
        info["view_position"] = str(ds.get("ViewPosition", "") or "").strip() or None
    arr = _pixel_array(ds, path)
    samples = int(ds.get("SamplesPerPixel", 1))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        notes.append(f"multi-frame DICOM ({frames} frames): first frame used")
        arr = arr[0]
    spacing = dicom_pixel_spacing(ds, notes)

    if samples != 1:
        # pydicom returns colour as RGB (YBR converted); LUTs do not apply to colour data.
        try:
            arr = _to_grayscale(np.asarray(arr), notes, "rgb")
        except ValueError as exc:
            raise ImageReadError(path, str(exc)) from exc
        return _finish_dtype(arr, path, notes), spacing

    if is_for_processing(ds):
        from pydicom.pixels import apply_modality_lut

        try:
            values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise ImageReadError(path, f"invalid DICOM modality LUT / rescale: {type(exc).__name__}: {exc}") from exc
        return _raw_to_presentation(values, ds, notes), spacing

    values, lo, hi = _grayscale_values(arr, ds, path, notes)
    return _to_display_range(values, lo, hi, ds, path, notes), spacing


def _read_dataset(data: bytes, path: Path) -> Any:
    """Parse DICOM bytes into a ``pydicom.Dataset`` that holds pixel data (the preamble is optional).

    Raises:
        ImageReadError: corrupt file, no standard DICOM element at all (not a DICOM file), or no pixel data.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    has_preamble = len(data) >= 132 and data[128:132] == b"DICM"
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=not has_preamble)
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError, AttributeError) as exc:
        raise ImageReadError(path, f"corrupt DICOM file: {type(exc).__name__}: {exc}") from exc
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        standard_groups = {0x0002, 0x0008, 0x0010, 0x0018, 0x0020, 0x0028}  # meta, study, patient, acquisition, image
        if not has_preamble and not any(tag.group in standard_groups for tag in ds.keys()):
            raise ImageReadError(path, "not a DICOM file (no 'DICM' header and no standard DICOM elements), although "
                                       "its name ends in a DICOM suffix; is it a text or other file renamed?")
        raise ImageReadError(path, "DICOM file has no pixel data (not an image: a report, structured "
                                   "report or presentation state?)")
    return ds


def _pixel_array(ds: Any, path: Path) -> np.ndarray:
    """The dataset's stored pixel values, decoded for any transfer syntax the installed plug-ins handle.

    Raises:
        ImageReadError: no decoder for the transfer syntax (names the plug-ins to install), or corrupt pixel data.
    """
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    ts_name = getattr(tsyntax, "name", str(tsyntax))
    try:
        return ds.pixel_array
    except (NotImplementedError, RuntimeError, ImportError) as exc:
        raise ImageReadError(path, f"cannot decode DICOM pixel data with transfer syntax {ts_name}: {exc}. "
                                   "Install the pylibjpeg plug-ins (pylibjpeg-libjpeg, pylibjpeg-openjpeg, "
                                   "pylibjpeg-rle; see requirements.txt)") from exc
    except (ValueError, AttributeError, KeyError, TypeError, EOFError, OSError) as exc:
        raise ImageReadError(path, f"corrupt DICOM pixel data ({ts_name}): {type(exc).__name__}: {exc}") from exc


def _grayscale_values(arr: np.ndarray, ds: Any, path: Path,
                      notes: list[str]) -> tuple[np.ndarray, float, float]:
    """One-sample stored values -> modality LUT / rescale -> VOI LUT or first window, as float64, with the
    nominal output range ``(lo, hi)`` of that chain.

    Raises:
        ImageReadError: an invalid LUT, rescale or window.
    """
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        values = apply_modality_lut(arr, ds)
        lo, hi = _dicom_value_range(ds, arr_is_lut_output=True)
        has_voi_lut = bool(ds.get("VOILUTSequence"))
        has_window = ds.get("WindowCenter", None) is not None and ds.get("WindowWidth", None) is not None
        if has_voi_lut:
            values = apply_voi_lut(values, ds, index=0)
            lo, hi = 0.0, float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
            notes.append("VOI LUT applied (first of the VOI LUT sequence)")
        elif has_window:
            n_windows = ds["WindowCenter"].VM
            values = apply_voi_lut(values, ds, index=0)
            # pydicom's windowing maps into the same nominal range as computed above
            notes.append("window centre/width applied" + (f" (first of {n_windows})" if n_windows > 1 else ""))
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise ImageReadError(path, f"invalid DICOM grayscale LUT / window: {type(exc).__name__}: {exc}") from exc
    return np.asarray(values, dtype=np.float64), lo, hi


def _to_display_range(values: np.ndarray, lo: float, hi: float, ds: Any, path: Path,
                      notes: list[str]) -> np.ndarray:
    """Grayscale values in ``[lo, hi]`` -> the ``(H, W)`` display image: inverted for MONOCHROME1 / Presentation
    LUT Shape INVERSE, then uint8 when ``[lo, hi]`` is exactly 0..255, else mapped linearly onto uint16 0..65535.

    Raises:
        ImageReadError: an empty value range (``hi <= lo``).
    """
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    shape = str(ds.get("PresentationLUTShape", "")).strip().upper()
    if photometric == "MONOCHROME1" or shape == "INVERSE":
        values = (lo + hi) - values
        notes.append("inverted (" + ("MONOCHROME1" if photometric == "MONOCHROME1" else
                                     "Presentation LUT Shape INVERSE") + ")")
    elif photometric != "MONOCHROME2":
        notes.append(f"unexpected Photometric Interpretation {photometric!r} for one sample: read as MONOCHROME2")
    values = np.clip(values, lo, hi)
    if lo == 0 and hi == 255:
        return np.rint(values).astype(np.uint8)
    if hi <= lo:
        raise ImageReadError(path, f"invalid DICOM value range [{lo}, {hi}]")
    if not (lo == 0 and hi == 65535):
        notes.append(f"DICOM values mapped from [{lo:g}, {hi:g}] to 0..65535")
    return np.rint((values - lo) * (65535.0 / (hi - lo))).astype(np.uint16)
