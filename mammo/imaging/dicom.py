"""DICOM decoding: modality LUT / rescale, VOI LUT or window (those of an enhanced image's functional groups
included; one that cannot be applied is ignored with a note), MONOCHROME1 inversion, raw ("For Processing") images,
the frame of a multi-frame image, and the pixel spacing from every place a DICOM file can state it."""

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


def dicom_pixel_spacing(ds: Any, notes: list[str], frame: int = 0) -> tuple[float, float] | None:
    """The ``(row, col)`` pixel spacing in mm of a DICOM image, from every place it can be stored (DICOM PS3.3
    10.7.1 and C.8.11.7), in this order: Pixel Spacing (0028,0030), calibrated; the Pixel Measures functional group
    of an enhanced image (shared, then frame ``frame``'s); Imager Pixel Spacing (0018,1164), at the detector, divided
    by the Estimated Radiographic Magnification Factor (0018,1114) when one above 1 is given, so that areas are those
    of the breast; Nominal Scanned Pixel Spacing (0018,2010) of a digitised film. None when none is stated.
    Every source other than Pixel Spacing is noted."""
    spacing = _spacing_pair(ds.get("PixelSpacing", None))
    if spacing is not None:
        return spacing
    for group in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        items = ds.get(group, None) or []
        index = frame if group == "PerFrameFunctionalGroupsSequence" else 0
        measures = items[index].get("PixelMeasuresSequence", None) if len(items) > index else None
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


def _read_dicom(data: bytes, path: Path, notes: list[str], info: dict | None = None,
                page: int | None = None) -> tuple[np.ndarray, tuple[float, float] | None]:
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

    A multi-frame image gives frame ``page`` (0 when None), read with the rescale and window / VOI LUT of that
    frame's functional groups where it has them (:func:`_frame_view`). A window that cannot be applied is ignored
    with a note (:func:`_apply_window`). ``info``, when given, receives ``view_position`` (the ViewPosition
    attribute, or None).
    """
    ds = _read_dataset(data, path)
    if info is not None:  # what the anatomy rules need: the view (DICOM PS3.3 C.8.11.7, e.g. "MLO", "CC")
        info["view_position"] = str(ds.get("ViewPosition", "") or "").strip() or None
    arr = _pixel_array(ds, path)
    samples = int(ds.get("SamplesPerPixel", 1))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    frame = 0 if page is None else page
    if frame >= frames:
        raise ImageReadError(path, f"frame {frame} asked for, but the DICOM holds {frames} frame"
                                   f"{'s' if frames > 1 else ''} (0..{frames - 1}); pass a frame in that range")
    if frames > 1:
        notes.append(f"multi-frame DICOM ({frames} frames): frame {frame} read" +
                     (" as asked" if page is not None else "; read_image(path, page=N) reads frame N"))
        arr = arr[frame]
    spacing = dicom_pixel_spacing(ds, notes, frame)

    if samples != 1:
        # pydicom returns colour as RGB (YBR converted); LUTs do not apply to colour data.
        try:
            arr = _to_grayscale(np.asarray(arr), notes, "rgb")
        except ValueError as exc:
            raise ImageReadError(path, str(exc)) from exc
        return _finish_dtype(arr, path, notes), spacing

    ds = _frame_view(ds, frame, notes)
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
    """One-sample stored values -> modality LUT / rescale -> VOI LUT, else the first valid window, as float64,
    with the nominal output range ``(lo, hi)`` of that chain.

    A VOI LUT or window that cannot be applied is ignored with a note, as viewers do (:func:`_apply_voi_lut`,
    :func:`_apply_window`); the image is then read as if the file gave none.

    Raises:
        ImageReadError: an invalid modality LUT or rescale (the stored values' meaning is unknown).
    """
    from pydicom.pixels import apply_modality_lut

    try:
        values = apply_modality_lut(arr, ds)
        lo, hi = _dicom_value_range(ds, arr_is_lut_output=True)
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise ImageReadError(path, f"invalid DICOM modality LUT / rescale: {type(exc).__name__}: {exc}") from exc
    looked_up = _apply_voi_lut(values, ds, notes)
    if looked_up is not None:
        return looked_up
    # pydicom's windowing maps into the same nominal range as computed above
    return np.asarray(_apply_window(values, ds, notes), dtype=np.float64), lo, hi


#: Exceptions pydicom raises on a VOI LUT or window it cannot apply.
_VOI_ERRORS = (ValueError, KeyError, IndexError, TypeError, AttributeError, NotImplementedError)


def _apply_voi_lut(values: np.ndarray, ds: Any, notes: list[str]) -> tuple[np.ndarray, float, float] | None:
    """The first item of the VOI LUT Sequence (0028,3010) applied to ``values`` (DICOM PS3.3 C.11.2.1.1), with its
    output range ``0..2**bits - 1`` (LUT Descriptor's third value); None when there is none, or when it cannot be
    applied (then noted; the window, if any, is tried next)."""
    if not ds.get("VOILUTSequence"):
        return None
    from pydicom.pixels import apply_voi

    if values.dtype.kind == "f" and np.array_equal(values, np.rint(values)):
        values = values.astype(np.int64)  # a LUT indexes integers (pydicom warns on float input)
    try:
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        out = apply_voi(values, ds, index=0)
    except _VOI_ERRORS as exc:
        notes.append(f"the VOI LUT (VOILUTSequence) cannot be applied ({type(exc).__name__}: {exc}); it was ignored "
                     "(the window is used where the file gives one, else the stored value range)")
        return None
    notes.append("VOI LUT applied (first of the VOI LUT sequence)")
    return np.asarray(out, dtype=np.float64), 0.0, float(2**bits - 1)


def _window_pairs(ds: Any) -> list[tuple[Any, Any]]:
    """The ``(centre, width)`` pairs of Window Center (0028,1050) / Window Width (0028,1051), values as stored; a
    single value pairs with each of the other's (as pydicom's ``apply_windowing(index=...)`` reads them)."""
    if ds.get("WindowCenter", None) is None or ds.get("WindowWidth", None) is None:
        return []
    centres = list(ds.WindowCenter) if ds["WindowCenter"].VM > 1 else [ds.WindowCenter]
    widths = list(ds.WindowWidth) if ds["WindowWidth"].VM > 1 else [ds.WindowWidth]
    if len(centres) == 1:
        centres = centres * len(widths)
    if len(widths) == 1:
        widths = widths * len(centres)
    return list(zip(centres, widths))


def _window_problem(centre: Any, width: Any, function: str) -> str | None:
    """Why a window cannot be applied (DICOM PS3.3 C.11.2.1.2 and C.11.2.1.3), or None when it can."""
    try:
        c, w = float(centre), float(width)
    except (TypeError, ValueError):
        return f"WindowCenter {centre!r} / WindowWidth {width!r} are not numbers"
    if not (np.isfinite(c) and np.isfinite(w)):
        return f"WindowCenter {c:g} / WindowWidth {w:g} are not finite"
    if function == "LINEAR" and w < 1:
        return f"WindowWidth {w:g} is invalid (PS3.3 C.11.2.1.2 requires >= 1)"
    if function in ("LINEAR_EXACT", "SIGMOID") and w <= 0:
        return f"WindowWidth {w:g} is invalid for VOI LUT Function {function} (PS3.3 C.11.2.1.3 requires > 0)"
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        return f"VOI LUT Function {function!r} is not one of LINEAR, LINEAR_EXACT, SIGMOID (PS3.3 C.11.2.1.3)"
    return None


def _apply_window(values: np.ndarray, ds: Any, notes: list[str]) -> np.ndarray:
    """The first valid window of ``ds`` applied to ``values`` with ``pydicom.pixels.apply_windowing`` (the
    LINEAR, LINEAR_EXACT or SIGMOID function of DICOM PS3.3 C.11.2.1.2 / C.11.2.1.3), each noted.

    A window that cannot be applied (a width below 1 for LINEAR, 0 or below for the others, a value that is not a
    number, an unknown function) is skipped, as viewers do rather than refusing the image; when none is left,
    ``values`` come back unchanged (the stored value range is used) and a note says why.
    """
    from pydicom.pixels import apply_windowing

    pairs = _window_pairs(ds)
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    problems = []
    for index, (centre, width) in enumerate(pairs):
        problem = _window_problem(centre, width, function)
        if problem is None:
            try:
                out = apply_windowing(values, ds, index)
            except _VOI_ERRORS as exc:
                problem = f"the window cannot be applied ({type(exc).__name__}: {exc})"
            else:
                skipped = "".join(f"window {i + 1} ignored: {p}; " for i, p in enumerate(problems))
                notes.append(f"{skipped}window centre/width applied" +
                             (f" ({'first' if index == 0 else f'window {index + 1}'} of {len(pairs)})"
                              if len(pairs) > 1 else ""))
                return out
        problems.append(problem)
    if problems:
        if len(problems) == 1:
            notes.append(f"{problems[0]}; the window was ignored and the stored value range used")
        else:
            notes.append(f"none of the {len(problems)} windows can be applied (the first: {problems[0]}); the "
                         "windows were ignored and the stored value range used")
    return values


#: Functional groups of an enhanced multi-frame image (DICOM PS3.3 C.7.6.16) that the grayscale pipeline reads,
#: with the elements of each that replace the top-level ones: Pixel Value Transformation (C.7.6.16.2.9, the
#: rescale / modality LUT) and Frame VOI LUT (C.7.6.16.2.10, the window / VOI LUT).
_FRAME_GROUPS = {
    "PixelValueTransformationSequence": ("RescaleIntercept", "RescaleSlope", "RescaleType", "ModalityLUTSequence"),
    "FrameVOILUTSequence": ("WindowCenter", "WindowWidth", "VOILUTFunction", "WindowCenterWidthExplanation",
                            "VOILUTSequence"),
}


def _frame_view(ds: Any, frame: int, notes: list[str]) -> Any:
    """``ds`` as frame ``frame`` of an enhanced image is to be read: the rescale and window / VOI LUT of the
    frame's functional groups (per-frame first, then shared; PS3.3 C.7.6.16) in place of the top-level ones.

    pydicom's ``apply_modality_lut`` / ``apply_voi_lut`` read only the top level, where an enhanced image has no
    window: without this view its window would be dropped without a word. Returns ``ds`` itself when the frame's
    groups hold none of :data:`_FRAME_GROUPS`, else a new dataset (``ds`` is not modified), with a note each.
    """
    from pydicom.dataset import Dataset

    view = None
    for sequence, keywords in _FRAME_GROUPS.items():
        item, where = None, ""
        per_frame = ds.get("PerFrameFunctionalGroupsSequence", None) or []
        shared = ds.get("SharedFunctionalGroupsSequence", None) or []
        for groups, index, label in ((per_frame, frame, f"per-frame functional groups of frame {frame}"),
                                     (shared, 0, "shared functional groups")):
            if len(groups) > index and groups[index].get(sequence, None):
                item, where = groups[index].get(sequence)[0], label
                break
        found = [k for k in keywords if item is not None and item.get(k, None) is not None]
        if not found:
            continue
        if view is None:
            view = Dataset({tag: ds.get_item(tag) for tag in ds.keys()})  # elements as read, not converted
            if hasattr(ds, "file_meta"):
                view.file_meta = ds.file_meta
            view.set_original_encoding(*ds.original_encoding)
        replaced = [k for k in keywords if k in view]
        for keyword in keywords:
            if keyword in view:
                del view[keyword]
        for keyword in found:
            view.add(item[keyword])
        notes.append(f"{', '.join(found)} from the {where} ({sequence})" +
                     (f", in place of the top-level {', '.join(replaced)}" if replaced else ""))
    return ds if view is None else view


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
