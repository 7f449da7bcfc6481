"""Reading every mammogram format into one array type, preprocessing, and letterbox geometry.

One path from any mammogram file to a network-ready 8-bit image, and back to the original image's pixels:

1. :func:`read_image` reads PNG / TIFF (8 and 16 bit, full range kept), JPEG, BMP, PGM and DICOM (with its
   modality LUT, VOI LUT / first window, MONOCHROME1 and Presentation LUT Shape INVERSE, compressed transfer
   syntaxes via the pylibjpeg plug-ins) into a :class:`MammogramImage` holding a ``(H, W)`` uint8 or uint16 array.
   :func:`read_mask` reads binary lesion masks and DDSM tissue label maps; :func:`write_png` writes 8/16-bit PNGs
   atomically. Every read error is an :class:`ImageReadError` that names the file and the reason.
2. :func:`preprocess` turns the pixels into the ``(H, W)`` uint8 image the networks see: intensity scaling to
   8 bit, median filter, CLAHE (optionally a stronger "adaptive" CLAHE for low-contrast images) and orientation
   normalisation (mirror so that the chest wall, where the breast is widest, is on the left). It is configured
   by a plain, JSON-serialisable dict (:data:`DEFAULT_PREPROCESS`) that checkpoints store, so training and
   inference preprocess identically.
   :func:`unflip` undoes the orientation flip on any output.
3. :func:`letterbox` / :func:`unletterbox`: aspect-preserving resize to a network size whose sides are multiples
   of 32 (image at the top-left, zero padding at the bottom / right) and its exact inverse (crop + resize).
   Masks use nearest-neighbour interpolation everywhere (pixel-centre rule, done with integer index arrays so
   that any dtype stays integer-valued and an upscale followed by the inverse is exactly the identity).

Non-ASCII paths work on every OS: files are read as bytes and decoded in memory (``cv2.imdecode``) and written
with ``cv2.imencode`` + a byte write; no C-level path handling is involved.

This module creates no threads at import time and leaves ``cv2.setNumThreads`` to the caller.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from mammo.core.fileio import atomic_write_bytes
from mammo.core.labels import FGT, PARTIAL_LABEL_VALUES

__all__ = [
    "DEFAULT_PREPROCESS",
    "ImageReadError",
    "LetterboxGeometry",
    "MammogramImage",
    "Preprocessed",
    "breast_on_right",
    "breast_threshold",
    "image_format",
    "check_preprocess_config",
    "letterbox",
    "network_size",
    "preprocess",
    "read_image",
    "read_mask",
    "scale_to_uint8",
    "sniff_format",
    "unflip",
    "unletterbox",
    "write_png",
]

#: Network input sides must be multiples of this (five 2x down-samplings in the U-Net encoders).
SIZE_MULTIPLE = 32

#: File suffixes treated as DICOM even without the 128-byte preamble + ``DICM`` magic.
DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")

#: Formats whose values are exact (no lossy compression): masks read from them must be exactly binary.
LOSSLESS_FORMATS = ("png", "tiff", "bmp", "pgm", "dicom")


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------
class ImageReadError(Exception):
    """A mammogram (or mask) file could not be read.

    The message always names the file and the reason (missing, empty, corrupt, unsupported, ...), and where
    possible the fix. ``path`` and ``reason`` are also available as attributes.
    """

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path!r}: {reason}")

    def __reduce__(self):  # keep the exception picklable (DataLoader workers send it to the main process)
        return (type(self), (self.path, self.reason))


@dataclass
class MammogramImage:
    """A mammogram as read from disk, before any preprocessing.

    Attributes:
        pixels: ``(H, W)`` uint8 or uint16 grayscale array, in display orientation (higher = brighter = denser
            tissue; MONOCHROME1 DICOMs are already inverted).
        path: the file it was read from.
        bit_depth: 8 or 16, the container depth (``pixels.dtype``); a 16-bit PNG keeps its stored values.
        pixel_spacing_mm: ``(row, col)`` pixel spacing in mm when the file states it (DICOM PixelSpacing, else
            ImagerPixelSpacing); None otherwise (PNG/JPEG/TIFF resolution tags are not trusted).
        source_format: "png", "jpeg", "tiff", "bmp", "pgm", "dicom" (or the decoder's guess from the suffix).
        notes: human-readable remarks on conversions made (colour to gray, frame dropped, DICOM range mapping).
    """

    pixels: np.ndarray
    path: str
    bit_depth: int
    pixel_spacing_mm: tuple[float, float] | None = None
    source_format: str = ""
    notes: list[str] = field(default_factory=list)


def sniff_format(head: bytes, suffix: str) -> str:
    """Guess an image file's format from its first 132 bytes (magic numbers), then from its ``suffix``.

    Returns one of "dicom", "png", "jpeg", "tiff", "bmp", "pgm", or the suffix without its dot ("unknown" when there is none).
    """
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8"):
        return "jpeg"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head.startswith(b"BM"):
        return "bmp"
    if head[:2] in (b"P2", b"P5"):
        return "pgm"
    if suffix in DICOM_SUFFIXES:
        return "dicom"
    return {".jpg": "jpeg", ".jpeg": "jpeg", ".tif": "tiff", ".tiff": "tiff", ".png": "png", ".bmp": "bmp",
            ".pgm": "pgm", ".pnm": "pgm"}.get(suffix, suffix.lstrip(".") or "unknown")


#: Formats whose files announce themselves in their first 132 bytes (see :func:`sniff_format`).
IMAGE_FORMATS = ("dicom", "png", "jpeg", "tiff", "bmp", "pgm")


def image_format(head: bytes) -> str | None:
    """The image format a file's first 132 bytes announce by their magic numbers alone (one of
    :data:`IMAGE_FORMATS`), or None: the name is not consulted, so a text file renamed ``.png`` gives None."""
    found = sniff_format(head[:132], "")
    return found if found in IMAGE_FORMATS else None


def looks_like_text(head: bytes) -> bool:
    """Whether a file's first bytes are text: UTF-8 without NUL bytes (for messages about files that are not what
    their name says)."""
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _to_grayscale(arr: np.ndarray, notes: list[str], channel_order: str) -> np.ndarray:
    """(H, W, C) colour -> (H, W): equal channels are taken as gray; true colour is converted (and noted)."""
    if arr.ndim == 2:
        return arr
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"unexpected array shape {arr.shape}")
    channels = arr.shape[2]
    if channels in (2, 4):
        notes.append("alpha channel dropped")
        arr = arr[:, :, : channels - 1]
    if arr.shape[2] == 1:
        return arr[:, :, 0]
    if np.array_equal(arr[:, :, 0], arr[:, :, 1]) and np.array_equal(arr[:, :, 0], arr[:, :, 2]):
        return np.ascontiguousarray(arr[:, :, 0])
    notes.append("true colour image converted to grayscale (ITU-R BT.601 luma weights, OpenCV cvtColor)")
    code = cv2.COLOR_BGR2GRAY if channel_order == "bgr" else cv2.COLOR_RGB2GRAY
    return cv2.cvtColor(np.ascontiguousarray(arr), code)


def _finish_dtype(arr: np.ndarray, path: Path, notes: list[str]) -> np.ndarray:
    """Accept uint8 / uint16; convert what can be converted losslessly; reject the rest."""
    if arr.dtype == np.uint8 or arr.dtype == np.uint16:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.integer) and arr.size and arr.min() >= 0 and arr.max() <= 65535:
        notes.append(f"{arr.dtype} pixels stored as uint16")
        return arr.astype(np.uint16)
    raise ImageReadError(path, f"unsupported pixel type {arr.dtype} (expected 8- or 16-bit unsigned grayscale); "
                               "convert the file to an 8- or 16-bit PNG")


def _decode_raster(data: bytes, path: Path, fmt: str, notes: list[str]) -> np.ndarray:
    """Decode PNG/JPEG/TIFF/BMP/PGM bytes with OpenCV (Pillow as a fallback) to (H, W) uint8/uint16."""
    if fmt == "png" and len(data) > 25 and data[25] == 3:  # IHDR colour type 3: indexed colour (PNG spec 11.2.2)
        return _decode_indexed_png(data, path, notes)
    buf = np.frombuffer(data, dtype=np.uint8)
    arr = None
    cv_error = ""
    try:
        # IMREAD_UNCHANGED keeps 16-bit data and does not apply EXIF rotation. OpenCV's own warnings on a broken
        # file ("PNG input buffer is incomplete") would reach the terminal beside our one-line error: errors only.
        if cv2.utils.logging.getLogLevel() > cv2.utils.logging.LOG_LEVEL_ERROR:
            cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
        arr = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:  # pragma: no cover - OpenCV raises rather than returning None only for odd inputs
        cv_error = str(exc).strip().splitlines()[-1]
    order = "bgr"
    if arr is None:
        try:
            from PIL import Image, UnidentifiedImageError

            with Image.open(io.BytesIO(data)) as im:
                im.load()
                if im.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
                    arr = np.array(im, dtype=np.uint16)
                elif im.mode == "I":
                    arr = np.array(im)
                elif im.mode in ("1", "L", "P", "LA", "RGB", "RGBA", "CMYK", "YCbCr", "PA"):
                    if im.mode in ("P", "PA", "CMYK", "YCbCr"):
                        im2 = im.convert("RGB")
                    elif im.mode == "1":
                        im2 = im.convert("L")
                    else:
                        im2 = im
                    arr = np.array(im2)
                    order = "rgb"
                else:
                    raise ImageReadError(path, f"unsupported {fmt} pixel mode {im.mode!r}")
        except ImageReadError:
            raise
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            detail = f" (OpenCV: {cv_error})" if cv_error else ""
            raise ImageReadError(path, f"corrupt or unsupported {fmt} file: {exc}{detail}") from exc
    try:
        arr = _to_grayscale(arr, notes, order)
    except ValueError as exc:
        raise ImageReadError(path, str(exc)) from exc
    orientation = exif_orientation(data)
    if fmt == "tiff":  # libtiff (OpenCV) and Pillow turn TIFF pixels into the displayed orientation themselves
        if orientation != 1:
            notes.append(f"TIFF Orientation {orientation}: applied by the decoder (outputs are in the displayed "
                         "orientation)")
    else:
        arr = apply_exif_orientation(arr, orientation, notes)
    return _finish_dtype(arr, path, notes)


#: EXIF Orientation (tag 0x0112, EXIF 2.32 / TIFF 6.0 section 'Orientation') -> (description, transform of the
#: stored (H, W) array into the orientation a viewer displays). numpy's rot90 turns counter-clockwise.
_EXIF_TRANSFORMS = {
    2: ("mirrored left-right", lambda a: a[:, ::-1]),
    3: ("rotated 180 degrees", lambda a: a[::-1, ::-1]),
    4: ("mirrored top-bottom", lambda a: a[::-1, :]),
    5: ("transposed (mirrored about the main diagonal)", lambda a: a.T),
    6: ("rotated 90 degrees clockwise", lambda a: np.rot90(a, -1)),
    7: ("transversed (mirrored about the anti-diagonal)", lambda a: a[::-1, ::-1].T),
    8: ("rotated 90 degrees counter-clockwise", lambda a: np.rot90(a, 1)),
}


def exif_orientation(data: bytes) -> int:
    """The EXIF Orientation (1..8) stored in a JPEG, TIFF (tag 274), PNG (eXIf) or WebP file's bytes; 1 when absent.

    Read with Pillow's lazy header parser (no pixel decoding). An unreadable or out-of-range tag counts as 1. A PNG
    without an ``eXIf`` chunk is answered without Pillow, which would walk the whole file looking for one (27 ms on
    a 2944x1920 16-bit PNG, measured; the byte search takes about 1 ms).
    """
    if data.startswith(b"\x89PNG\r\n\x1a\n") and b"eXIf" not in data:
        return 1
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            value = int(im.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - any header Pillow cannot parse means: no usable EXIF orientation
        return 1
    return value if value in range(1, 9) else 1


def apply_exif_orientation(arr: np.ndarray, orientation: int, notes: list[str]) -> np.ndarray:
    """Turn ``arr`` ``(H, W)`` as stored into the orientation a viewer displays, per EXIF ``orientation``.

    Cameras and some scanners store pixels rotated and record the rotation in EXIF; masks are drawn on the image
    as displayed, and every output of the suite is in that orientation. A note says what was done.
    """
    if orientation not in _EXIF_TRANSFORMS:
        return arr
    description, transform = _EXIF_TRANSFORMS[orientation]
    notes.append(f"EXIF Orientation {orientation}: pixels {description} into the displayed orientation (outputs "
                 "are in the displayed orientation)")
    return np.ascontiguousarray(transform(arr))


def _decode_indexed_png(data: bytes, path: Path, notes: list[str]) -> np.ndarray:
    """An indexed-colour PNG -> (H, W) uint8: its palette's gray levels when every palette entry used is gray (an
    image stored with a palette), else its palette indices (a label map such as ``<stem>_tissue_seg.png``, whose
    colours are for display only; noted)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            indices = np.array(im.convert("P") if im.mode != "P" else im, dtype=np.uint8)
            palette = np.array(im.getpalette() or [], dtype=np.uint8).reshape(-1, 3)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageReadError(path, f"corrupt or unsupported png file: {exc}") from exc
    used = np.unique(indices)
    if used.size and palette.shape[0] > int(used.max()):
        colours = palette[used]
        if np.all(colours[:, 0] == colours[:, 1]) and np.all(colours[:, 1] == colours[:, 2]):
            return palette[:, 0][indices]
    notes.append("indexed-colour PNG: read as its palette indices (a label map; the palette colours are for display)")
    return indices


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


def _read_dicom(data: bytes, path: Path, notes: list[str]) -> tuple[np.ndarray, tuple[float, float] | None]:
    """Decode a DICOM file to (H, W) uint8/uint16 in display orientation, plus its pixel spacing in mm.

    Grayscale pipeline (DICOM PS3.3 C.11 and PS3.4 N.2): stored values -> modality LUT or rescale
    (``pydicom.pixels.apply_modality_lut``) -> VOI LUT, else the first window centre/width
    (``pydicom.pixels.apply_voi_lut(index=0)``) -> inversion when Photometric Interpretation is MONOCHROME1 or
    Presentation LUT Shape is INVERSE (for DX/MG images these state the same single inversion, PS3.3 C.8.11.1)
    -> the nominal output range ``[lo, hi]`` of that chain (not the image's own min/max, so that a MONOCHROME1
    copy of an image reads back identically) is mapped linearly onto uint8 when it is exactly 0..255, else
    onto the full uint16 range 0..65535.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

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
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    ts_name = getattr(tsyntax, "name", str(tsyntax))
    try:
        arr = ds.pixel_array
    except (NotImplementedError, RuntimeError, ImportError) as exc:
        raise ImageReadError(path, f"cannot decode DICOM pixel data with transfer syntax {ts_name}: {exc}. "
                                   "Install the pylibjpeg plug-ins (pylibjpeg-libjpeg, pylibjpeg-openjpeg, "
                                   "pylibjpeg-rle; see requirements.txt)") from exc
    except (ValueError, AttributeError, KeyError, TypeError, EOFError, OSError) as exc:
        raise ImageReadError(path, f"corrupt DICOM pixel data ({ts_name}): {type(exc).__name__}: {exc}") from exc

    samples = int(ds.get("SamplesPerPixel", 1))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        notes.append(f"multi-frame DICOM ({frames} frames): first frame used")
        arr = arr[0]
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()

    spacing = dicom_pixel_spacing(ds, notes)

    if samples != 1:
        # pydicom returns colour as RGB (YBR converted); LUTs do not apply to colour data.
        try:
            arr = _to_grayscale(np.asarray(arr), notes, "rgb")
        except ValueError as exc:
            raise ImageReadError(path, str(exc)) from exc
        return _finish_dtype(arr, path, notes), spacing

    if is_for_processing(ds):
        try:
            values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise ImageReadError(path, f"invalid DICOM modality LUT / rescale: {type(exc).__name__}: {exc}") from exc
        return _raw_to_presentation(values, ds, notes), spacing

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

    values = np.asarray(values, dtype=np.float64)
    shape = str(ds.get("PresentationLUTShape", "")).strip().upper()
    if photometric == "MONOCHROME1" or shape == "INVERSE":
        values = (lo + hi) - values
        notes.append("inverted (" + ("MONOCHROME1" if photometric == "MONOCHROME1" else
                                     "Presentation LUT Shape INVERSE") + ")")
    elif photometric != "MONOCHROME2":
        notes.append(f"unexpected Photometric Interpretation {photometric!r} for one sample: read as MONOCHROME2")
    values = np.clip(values, lo, hi)
    if lo == 0 and hi == 255:
        return np.rint(values).astype(np.uint8), spacing
    if hi <= lo:
        raise ImageReadError(path, f"invalid DICOM value range [{lo}, {hi}]")
    if not (lo == 0 and hi == 65535):
        notes.append(f"DICOM values mapped from [{lo:g}, {hi:g}] to 0..65535")
    out = np.rint((values - lo) * (65535.0 / (hi - lo))).astype(np.uint16)
    return out, spacing


#: The last 8 bytes of every complete PNG: the IEND chunk's type and CRC (PNG specification 11.2.5).
_PNG_END = b"IEND\xaeB`\x82"


def read_image(path: str | os.PathLike) -> MammogramImage:
    """Read a mammogram in any supported format into a grayscale uint8 / uint16 array.

    Formats: PNG and TIFF (8 and 16 bit; stored values kept exactly), JPEG, BMP, PGM, and DICOM (a ``.dcm`` /
    ``.dicom`` / ``.dic`` file, or any file with the 128-byte preamble and ``DICM`` magic) through pydicom and
    the pylibjpeg plug-ins (JPEG Baseline/Extended/Lossless, JPEG-LS, JPEG 2000, RLE Lossless). See
    ``_read_dicom`` for the DICOM grayscale pipeline: the DICOM nominal output range is mapped onto 0..65535
    (or kept as uint8 when it is exactly 0..255), so uint16 DICOM output always uses the full 16-bit scale.

    A colour file whose channels are all equal becomes grayscale silently; a true colour image is converted
    (BT.601 luma) and a note is added. An alpha channel is dropped (noted). Non-ASCII paths work: the file is
    read as bytes by Python and decoded in memory.

    Args:
        path: the image file.

    Returns:
        MammogramImage with ``pixels`` ``(H, W)`` uint8 or uint16, ``bit_depth`` 8 or 16, pixel spacing in mm
        (DICOM only) and notes.

    Raises:
        ImageReadError: the file is missing, not a file, empty, corrupt, of an unsupported format or pixel
            type, or a DICOM without decodable pixel data. The message names the file and the reason.
    """
    p = Path(path)
    if not p.exists():
        raise ImageReadError(p, "file not found (check the path and the CSV's folder for relative paths)")
    if not p.is_file():
        raise ImageReadError(p, "not a regular file (a folder?)")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ImageReadError(p, f"cannot open: {exc.strerror or exc}") from exc
    if not data:
        raise ImageReadError(p, "file is empty (0 bytes): an interrupted copy or download?")
    fmt = sniff_format(data[:132], p.suffix.lower())
    if fmt in IMAGE_FORMATS and fmt != "dicom" and image_format(data) is None:  # the name says image, the bytes not
        kind = "text" if looks_like_text(data[:512]) else "unknown binary data"
        raise ImageReadError(p, f"not a {fmt.upper()} file: it starts with {kind}, not an image signature; is it "
                                "another kind of file renamed? Pass the image itself")
    if fmt == "png" and not data.rstrip(b"\x00").endswith(_PNG_END):
        raise ImageReadError(p, "corrupt PNG, truncated (no IEND chunk at its end): an interrupted copy or download? "
                                "Copy it again")
    notes: list[str] = []
    spacing = None
    if fmt == "dicom":
        pixels, spacing = _read_dicom(data, p, notes)
    else:
        pixels = _decode_raster(data, p, fmt, notes)
    if pixels.ndim != 2 or pixels.shape[0] < 1 or pixels.shape[1] < 1:
        raise ImageReadError(p, f"expected a 2-D grayscale image, found shape {pixels.shape}")
    return MammogramImage(pixels=np.ascontiguousarray(pixels), path=str(p),
                          bit_depth=8 if pixels.dtype == np.uint8 else 16, pixel_spacing_mm=spacing,
                          source_format=fmt, notes=notes)


#: DDSM tissue label intensities -> class indices (dataset readme of tiryakiv/Mammogram-segmentation; see
#: ../shared/data/README.md): 64 background, 128 adipose, 192 fibroglandular tissue (FGT), 255 pectoral muscle.
TISSUE_LABEL_VALUES: dict[int, int] = {64: 0, 128: 1, 192: 2, 255: 3}


def read_mask(path: str | os.PathLike, kind: str = "binary") -> np.ndarray:
    """Read a lesion mask or a DDSM tissue label map.

    Args:
        path: mask file (any format :func:`read_image` reads).
        kind: ``"binary"``: a lesion mask. JPEG masks (lossy, values near 0 and 255) are thresholded at > 127
            (the midpoint of 8 bit, as the CDD-CESM readme advises). Lossless masks must hold exactly two
            levels, 0 and 1 or 0 and the maximum of their type (255 / 65535); anything else is an error.
            ``"tissue"``: a DDSM tissue label map whose intensities 64/128/192/255 are mapped to classes 0..3
            (:data:`TISSUE_LABEL_VALUES`); any other value is an error.
            ``"partial_tissue"``: a tissue label map that may also hold the partial-label intensities 160 (adipose
            or FGT, code 4) and 32 (unlabelled, code 255) of :data:`labels.PARTIAL_LABEL_VALUES`.

    Returns:
        ``(H, W)`` uint8: values in {0, 1} for ``"binary"``, in {0, 1, 2, 3} for ``"tissue"`` (and 4, 255 for
        ``"partial_tissue"``).

    Raises:
        ImageReadError: the file cannot be read (see :func:`read_image`).
        ValueError: unexpected values (the message names the file and the values found) or a bad ``kind``.
    """
    if kind not in ("binary", "tissue", "partial_tissue"):
        raise ValueError(f"kind must be 'binary', 'tissue' or 'partial_tissue', got {kind!r}")
    img = read_image(path)
    arr = img.pixels
    if kind in ("tissue", "partial_tissue"):
        values = {**TISSUE_LABEL_VALUES, **(PARTIAL_LABEL_VALUES if kind == "partial_tissue" else {})}
        lut = np.zeros(65536 if arr.dtype == np.uint16 else 256, dtype=np.uint8)
        known = np.zeros(lut.shape, dtype=bool)
        for value, cls in values.items():
            lut[value], known[value] = cls, True
        out = lut[arr]
        if not known[arr].all():
            stray = np.unique(arr[~known[arr]])
            shown = ", ".join(str(int(v)) for v in stray[:10]) + (" ..." if stray.size > 10 else "")
            raise ValueError(
                f"tissue label file {img.path!r} holds unexpected values [{shown}] "
                f"({int((~known[arr]).sum())} pixels); expected only {sorted(values)} "
                "(64 background, 128 adipose, 192 FGT, 255 pectoral). Was it saved as JPEG or resized with "
                "interpolation? Re-export it as PNG with nearest-neighbour resizing.")
        return out
    if img.source_format not in LOSSLESS_FORMATS:
        return (arr > 127).astype(np.uint8) if arr.dtype == np.uint8 else (arr > 32767).astype(np.uint8)
    values = np.unique(arr)
    top = np.iinfo(arr.dtype).max
    if values.size <= 2 and (set(values.tolist()) <= {0, 1} or set(values.tolist()) <= {0, top}):
        return (arr > 0).astype(np.uint8)
    shown = ", ".join(str(int(v)) for v in values[:10]) + (" ..." if values.size > 10 else "")
    raise ValueError(f"binary mask {img.path!r} ({img.source_format}) holds values [{shown}]; expected 0/1 or "
                     f"0/{top}. A tissue label map (64/128/192/255) passed as a lesion mask? Otherwise binarise "
                     "it first (e.g. mask > 0) and save it as PNG.")


#: PNG encoder settings by bit depth (False: 8 bit, True: 16 bit), chosen by measurement on the cascade's outputs of
#: a 2944x1920 image (issue 13): zlib level 1 costs the same CPU time as levels 0-3 and far less than 6; the RLE
#: strategy gives the smallest 8-bit masks and maps (a 4-class colour map 23 kB vs 88 kB with the default
#: strategy), while 16-bit probabilities compress a third better with the default strategy (2.9 MB vs 4.3 MB with
#: RLE) at the same time.
_PNG_PARAMS = {False: [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE],
               True: [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_DEFAULT]}


def write_png(path: str | os.PathLike, array: np.ndarray, overwrite: bool = True,
              palette: tuple[tuple[int, int, int], ...] | None = None) -> Path:
    """Write a ``(H, W)`` (or ``(H, W, 3)``) uint8 / uint16 array as PNG, atomically.

    With ``palette`` (RGB triples, index = value) a ``(H, W)`` uint8 array is written as an indexed-colour PNG
    (PNG colour type 3): the pixel values are exact (class indices, read back by :func:`read_image`) and every
    image viewer shows the palette's colours, the habit of label maps in the field (e.g. PASCAL VOC).

    The PNG is encoded in memory, written to a temporary file in the target folder and moved into place with
    ``os.replace``, so a half-written file never carries the final name. Non-ASCII paths work. Missing parent
    folders are created.

    Args:
        path: target file; should end in ``.png``.
        array: uint8 or uint16 array. bool arrays are written as 0/255 uint8.
        overwrite: when False, an existing file raises FileExistsError instead of being replaced.

    Returns:
        The path written.

    Raises:
        TypeError: unsupported dtype. ValueError: unsupported shape or suffix. FileExistsError: see above.
        OSError: the folder cannot be written.
    """
    p = Path(path)
    if p.suffix.lower() != ".png":
        raise ValueError(f"write_png: {str(p)!r} does not end in .png")
    arr = np.asarray(array)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype not in (np.uint8, np.uint16):
        raise TypeError(f"write_png: {str(p)!r}: expected uint8 or uint16, got {arr.dtype} "
                        "(convert with np.clip(...).astype(np.uint8))")
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise ValueError(f"write_png: {str(p)!r}: expected (H, W) or (H, W, 3|4), got shape {arr.shape}")
    if not overwrite and p.exists():
        raise FileExistsError(f"write_png: {str(p)!r} exists; remove it or allow overwriting")
    if palette is not None:
        return atomic_write_bytes(p, _indexed_png_bytes(arr, palette, p))
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(arr), _PNG_PARAMS[arr.dtype == np.uint16])
    if not ok:  # pragma: no cover - OpenCV fails only on unsupported input, checked above
        raise OSError(f"write_png: PNG encoding failed for {str(p)!r}")
    atomic_write_bytes(p, encoded.tobytes())
    return p


def _indexed_png_bytes(arr: np.ndarray, palette, path: Path) -> bytes:
    from PIL import Image

    if arr.dtype != np.uint8 or arr.ndim != 2:
        raise ValueError(f"write_png: {str(path)!r}: an indexed PNG needs a (H, W) uint8 array, got {arr.dtype} "
                         f"{arr.shape}")
    if arr.size and int(arr.max()) >= len(palette):
        raise ValueError(f"write_png: {str(path)!r}: value {int(arr.max())} has no palette entry "
                         f"({len(palette)} colours)")
    image = Image.frombytes("P", (arr.shape[1], arr.shape[0]), np.ascontiguousarray(arr).tobytes())
    image.putpalette([int(c) for rgb in palette for c in rgb])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------------------------------
#: The preprocessing used by training and inference; stored in every checkpoint (plain JSON types only).
#: Do not modify it in place: make a variant with ``dict(DEFAULT_PREPROCESS, key=value)``.
DEFAULT_PREPROCESS: dict[str, Any] = {
    # How 8/16-bit pixels become 8 bit:
    #   "bit_depth": uint8 unchanged; uint16 divided by (2**b - 1) / 255 where b is the smallest detector depth
    #       in (10, 12, 14, 16) bits that holds the image's maximum (a 12-bit image stored in a 16-bit PNG is
    #       not darkened 16x; a full-range 16-bit image, e.g. NYU or any DICOM read by read_image, uses b=16).
    #       The 8-bit copy of a 16-bit image (x / 257) gives the same result up to rounding.
    #   "percentile": linear stretch between the given percentiles of the foreground (pixels above the image
    #       minimum), per image; robust to burned-in labels, for mixed sources.
    "intensity_scaling": "bit_depth",
    "percentiles": [0.5, 99.5],          # (low, high) in percent, used by "percentile" only
    "median_kernel": 3,                  # median filter aperture in pixels (odd; 0 or 1 = off); issue spec: 3x3
    "clahe_clip_limit": 1.5,             # OpenCV CLAHE clipLimit; issue spec: 1.5 (0 = CLAHE off)
    "clahe_tile_grid": [8, 8],           # CLAHE tiles (rows, cols); issue spec: 8x8 (also the OpenCV default)
    "adaptive_clahe": False,             # stronger CLAHE for low-contrast images (also switchable per call)
    "adaptive_clahe_clip_limit": 3.0,    # clipLimit for low-contrast images when adaptive CLAHE is on (ours: 2x)
    # 8-bit std of the breast pixels (after the median) below which an image counts as low-contrast. Measured:
    # DDSM tissue 41-74 (never low); CDD-CESM DM median 39 (10% below 30), CM median 32 (~45% below 30).
    "low_contrast_std": 30.0,
    "normalize_orientation": True,       # mirror left-right so that the chest wall (breast base) is on the left
}

_BREAST_THRESHOLD_8BIT = 20  # 8-bit level separating breast from a black background for orientation / contrast
#: A background this dark or darker (8-bit histogram mode below the Otsu level) counts as black: the fixed
#: :data:`_BREAST_THRESHOLD_8BIT` applies, as measured on the 160 real images (tests). Ours.
_BLACK_BACKGROUND_8BIT = 10
#: A background level above this is taken for dark tissue, not background (no background found). Ours.
_MAX_BACKGROUND_8BIT = 80
#: Breast pixels must exceed a grey background's level by this much (its noise after the 5x5 median). Ours.
_BACKGROUND_MARGIN_8BIT = 10


def check_preprocess_config(config: dict | None) -> dict[str, Any]:
    """Validate a preprocessing config and fill missing keys from :data:`DEFAULT_PREPROCESS`.

    Args:
        config: a (possibly partial) config dict, e.g. from a checkpoint. None means the default.

    Returns:
        A new complete dict (the input is not modified).

    Raises:
        ValueError: unknown keys or invalid values (the message names the key and the allowed values).
    """
    cfg = dict(DEFAULT_PREPROCESS)
    if config is None:
        return cfg
    unknown = sorted(set(config) - set(DEFAULT_PREPROCESS))
    if unknown:
        raise ValueError(f"unknown preprocessing config keys {unknown}; known: {sorted(DEFAULT_PREPROCESS)}")
    cfg.update(config)
    if cfg["intensity_scaling"] not in ("bit_depth", "percentile"):
        raise ValueError(f"intensity_scaling must be 'bit_depth' or 'percentile', got {cfg['intensity_scaling']!r}")
    lo, hi = (float(v) for v in cfg["percentiles"])
    if not 0 <= lo < hi <= 100:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {cfg['percentiles']!r}")
    k = int(cfg["median_kernel"])
    if k < 0 or (k > 1 and k % 2 == 0):
        raise ValueError(f"median_kernel must be 0/1 (off) or an odd number of pixels, got {k}")
    if float(cfg["clahe_clip_limit"]) < 0 or float(cfg["adaptive_clahe_clip_limit"]) < 0:
        raise ValueError("CLAHE clip limits must be >= 0")
    grid = list(cfg["clahe_tile_grid"])
    if len(grid) != 2 or min(int(g) for g in grid) < 1:
        raise ValueError(f"clahe_tile_grid must be two positive ints (rows, cols), got {cfg['clahe_tile_grid']!r}")
    return cfg


def _effective_depth(max_value: int) -> int:
    for bits in (10, 12, 14, 16):
        if max_value <= 2**bits - 1:
            return bits
    return 16


def scale_to_uint8(pixels: np.ndarray, config: dict | None = None) -> np.ndarray:
    """Intensity scaling step of :func:`preprocess` alone (see ``DEFAULT_PREPROCESS["intensity_scaling"]``).

    Args:
        pixels: ``(H, W)`` uint8 or uint16.
        config: preprocessing config (only ``intensity_scaling`` and ``percentiles`` are used).

    Returns:
        ``(H, W)`` uint8.

    Raises:
        TypeError: pixels are not uint8 / uint16. ValueError: bad config or shape.
    """
    cfg = check_preprocess_config(config)
    if pixels.dtype not in (np.uint8, np.uint16):
        raise TypeError(f"expected uint8 or uint16 pixels (from read_image), got {pixels.dtype}")
    if pixels.ndim != 2:
        raise ValueError(f"expected (H, W) pixels, got shape {pixels.shape}")
    if cfg["intensity_scaling"] == "bit_depth":
        if pixels.dtype == np.uint8:
            return pixels.copy()
        full = 2 ** _effective_depth(int(pixels.max())) - 1
        return np.rint(pixels.astype(np.float32) * (255.0 / full)).astype(np.uint8)
    # percentile stretch over the foreground (pixels above the image minimum; the whole image if flat)
    values = pixels.astype(np.float32)
    foreground = values[values > values.min()]
    if foreground.size == 0:
        return np.zeros(pixels.shape, np.uint8)
    p_lo, p_hi = np.percentile(foreground, [float(v) for v in cfg["percentiles"]])
    if p_hi <= p_lo:
        p_lo, p_hi = float(values.min()), float(values.max())
    out = (values - p_lo) * (255.0 / max(p_hi - p_lo, 1e-6))
    return np.rint(np.clip(out, 0, 255)).astype(np.uint8)


def histogram_u8(image8: np.ndarray) -> np.ndarray:
    """Counts of each value 0..255 of a uint8 array, ``(256,)`` int64, exact.

    ``cv2.calcHist`` over chunks of 2**23 pixels: several times faster than ``np.bincount``, which first copies the
    array to 64-bit integers (measured on a 2944x1920 image); calcHist counts in float32, exact below 2**24 per bin,
    hence the chunks."""
    flat = np.ascontiguousarray(image8, dtype=np.uint8).reshape(-1, 1)
    counts = np.zeros(256, np.int64)
    for start in range(0, flat.shape[0], 1 << 23):
        chunk = flat[start:start + (1 << 23)]
        counts += np.rint(cv2.calcHist([chunk], [0], None, [256], [0, 256]).ravel()).astype(np.int64)
    return counts


def otsu_level(histogram: np.ndarray) -> int:
    """Otsu's threshold (IEEE Trans. SMC 9(1), 1979) of a 256-bin histogram: the level t maximising the between-class
    variance of {values <= t} and {values > t}, the first t where several tie, as ``cv2.threshold(..., THRESH_OTSU)``
    returns it; computed on the histogram (no pass over the image)."""
    p = np.asarray(histogram, np.float64)
    total = p.sum()
    if total <= 0:
        return 0
    p = p / total
    omega = np.cumsum(p)
    mu = np.cumsum(p * np.arange(p.size))
    mu_total = mu[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu_total * omega - mu) ** 2 / (omega * (1.0 - omega))
    between[~np.isfinite(between)] = -1.0
    return int(np.argmax(between))


def dense_tissue(image8: np.ndarray, tissue_classes: np.ndarray) -> np.ndarray:
    """Dense (fibroglandular) pixels: the FGT-region pixels brighter than Otsu's level of the FGT region.

    Stage 1's FGT class is a *region*, as the DDSM tissue labels it learned from draw it (Tiryaki & Kaplanoglu 2022:
    outlines around the glandular tissue, fat strands included). Percent density as radiologists' dense-tissue masks
    and area-based tools measure it counts dense *pixels* (VinDr-Mammo's expert masks; LIBRA, Keller et al., Med Phys
    2012, clusters breast pixels by intensity). This splits the region into its two intensity classes with Otsu's
    method (:func:`otsu_level`, no parameter to tune) and keeps the brighter one. It assumes fat inside the region;
    an extremely dense region is split too, so its density is underestimated.

    Args:
        image8: ``(H, W)`` uint8, the network's view of the image (:func:`preprocess`'s ``image``, in the same
            orientation as ``tissue_classes``).
        tissue_classes: ``(H, W)`` integer class map (2 = FGT).

    Returns:
        ``(H, W)`` bool; all False when no FGT is predicted.
    """
    if image8.shape != tissue_classes.shape:
        raise ValueError(f"image {image8.shape} and tissue map {tissue_classes.shape} differ in size")
    region = tissue_classes == FGT
    if not region.any():
        return region
    level = otsu_level(np.bincount(image8[region], minlength=256))
    return region & (image8 > level)


def breast_threshold(image8: np.ndarray) -> int:
    """The 8-bit level above which a pixel of a (median-filtered) mammogram counts as breast, not background.

    The background is the most common value below the image's Otsu threshold (``cv2.THRESH_OTSU``). A black
    background (at most :data:`_BLACK_BACKGROUND_8BIT`) gives the fixed level 20, validated on the real data; a
    grey one (a scanned film, a lifted black level, e.g. 30 +- 6) gives its level plus
    :data:`_BACKGROUND_MARGIN_8BIT`; a "background" brighter than :data:`_MAX_BACKGROUND_8BIT` is dark tissue of an
    image without background, and the fixed level applies.

    Args:
        image8: ``(H, W)`` uint8.

    Returns:
        The threshold, an int in [20, 90].
    """
    histogram = histogram_u8(image8)
    otsu = otsu_level(histogram)
    level = int(np.argmax(histogram[: otsu + 1]))
    if level <= _BLACK_BACKGROUND_8BIT or level > _MAX_BACKGROUND_8BIT:
        return _BREAST_THRESHOLD_8BIT
    return max(_BREAST_THRESHOLD_8BIT, level + _BACKGROUND_MARGIN_8BIT)


def breast_on_right(image8: np.ndarray) -> bool:
    """Whether the chest wall (the side the breast is attached to) lies on the right of an 8-bit mammogram.

    Rule: after a 5x5 median filter, the half (left / right of the middle column) holding more breast pixels
    (above :func:`breast_threshold`: 20/255 on a black background, the background's level plus a margin on a
    grey one) holds the chest wall: a breast is widest where it meets the chest wall and narrows towards the
    nipple. Counting pixels rather than summing intensities keeps the rule right for dense or contrast-enhanced
    breasts whose brightest part is away from the chest wall. Measured on the real data (tests): correct on all
    60 DDSM tissue images (49 with the chest wall left, 11 with it right; truth from the pectoral label), all 98
    CDD-CESM images (truth from the L/R name and the ``mirrored_`` prefix) and both NYU images. An intensity-sum
    rule failed on 26 of these 160 and a "which edge column touches tissue" rule on 45 (the CDD-CESM images have
    black margins on both sides). A fixed level of 20 failed on a grey (30 +- 6) background, where both halves
    count as breast.

    Args:
        image8: ``(H, W)`` uint8 (scaled, before CLAHE).

    Returns:
        True when the right half holds more breast pixels (mirror it for orientation normalisation).
    """
    w = image8.shape[1]
    smooth = cv2.medianBlur(np.ascontiguousarray(image8), 5) if min(image8.shape) >= 5 else image8
    counts = (smooth > breast_threshold(smooth)).sum(axis=0)
    left, right = int(counts[: w // 2].sum()), int(counts[w - w // 2:].sum())
    return right > left


@dataclass
class Preprocessed:
    """Result of :func:`preprocess`.

    Attributes:
        image: ``(H, W)`` uint8, the network's view of the mammogram (same H, W as the input).
        flipped: True when the image was mirrored left-right for orientation normalisation; undo with
            :func:`unflip` on every output derived from ``image``.
        clahe_clip_limit: the CLAHE clip limit actually used (the adaptive one for low-contrast images).
        breast_std: standard deviation of the 8-bit breast pixels before CLAHE (the low-contrast measure).
    """

    image: np.ndarray
    flipped: bool
    clahe_clip_limit: float = 0.0
    breast_std: float = 0.0


def preprocess(pixels: np.ndarray, config: dict | None = DEFAULT_PREPROCESS,
               adaptive_clahe: bool = False) -> Preprocessed:
    """Preprocess a mammogram for the networks; the same function for training and inference.

    Steps: (1) intensity scaling to 8 bit (:func:`scale_to_uint8`); (2) median filter (``median_kernel``,
    ``cv2.medianBlur``); (3) orientation normalisation (below); (4) CLAHE
    (``cv2.createCLAHE(clahe_clip_limit, clahe_tile_grid)``); when adaptive CLAHE is on (``adaptive_clahe``
    argument or config key) and the breast pixels' standard deviation after the median is below
    ``low_contrast_std``, ``adaptive_clahe_clip_limit`` is used instead. Orientation normalisation: mirrored
    left-right when :func:`breast_on_right` says the chest wall is on the right, so that the chest wall is
    always on the left and the breast points right (decided on the median-filtered image before CLAHE).
    This is the side of 49 of the 60 DDSM tissue training images (right MLO), so most training data needs no
    flip.

    Args:
        pixels: ``(H, W)`` uint8 or uint16 (``MammogramImage.pixels``).
        config: preprocessing config (:data:`DEFAULT_PREPROCESS`; partial dicts are completed from it).
        adaptive_clahe: switch adaptive CLAHE on for this call (in addition to ``config["adaptive_clahe"]``).

    Returns:
        Preprocessed(image ``(H, W)`` uint8, flipped, clahe_clip_limit, breast_std).

    Raises:
        TypeError / ValueError: bad pixel type / shape or config (see :func:`check_preprocess_config`).
    """
    cfg = check_preprocess_config(config)
    img = scale_to_uint8(pixels, cfg)
    k = int(cfg["median_kernel"])
    if k > 1:
        img = cv2.medianBlur(img, k)
    flipped = bool(cfg["normalize_orientation"]) and breast_on_right(img)
    if flipped:  # before CLAHE, so that CLAHE always sees the canonical orientation
        img = np.ascontiguousarray(img[:, ::-1])
    breast = img[img > breast_threshold(img)]
    breast_std = float(breast.std()) if breast.size else 0.0
    clip = float(cfg["clahe_clip_limit"])
    if (adaptive_clahe or bool(cfg["adaptive_clahe"])) and breast_std < float(cfg["low_contrast_std"]):
        clip = float(cfg["adaptive_clahe_clip_limit"])
    if clip > 0:
        rows, cols = (int(g) for g in cfg["clahe_tile_grid"])
        img = cv2.createCLAHE(clipLimit=clip, tileGridSize=(cols, rows)).apply(img)
    return Preprocessed(image=img, flipped=flipped, clahe_clip_limit=clip, breast_std=breast_std)


def unflip(array: np.ndarray, flipped: bool) -> np.ndarray:
    """Undo the orientation flip of :func:`preprocess` on an ``(H, W)`` or ``(..., H, W)`` array.

    Works for numpy arrays and torch tensors (the last axis is mirrored). Returns the input unchanged when
    ``flipped`` is False, else a mirrored copy.
    """
    if not flipped:
        return array
    if hasattr(array, "flip") and not isinstance(array, np.ndarray):  # torch.Tensor
        return array.flip(-1)
    return np.ascontiguousarray(np.asarray(array)[..., ::-1])


# ----------------------------------------------------------------------------------------------------------------
# Geometry: letterbox to the network size and back
# ----------------------------------------------------------------------------------------------------------------
def network_size(value: int | str | tuple | list) -> tuple[int, int]:
    """Parse a network input size: one int (square) or two (height, width); both multiples of 32.

    Args:
        value: ``512``, ``"512"``, ``"1024,512"``, ``"1024x512"``, ``(1024, 512)`` or ``[1024, 512]``.

    Returns:
        ``(h, w)`` in pixels.

    Raises:
        ValueError: unparsable, not positive, or not a multiple of 32 (the message names the nearest valid size).
    """
    if isinstance(value, str):
        parts = [p for p in value.replace("x", ",").replace("X", ",").replace(" ", ",").split(",") if p]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        parts = [value]
    try:
        nums = [int(p) for p in parts]
        if any(float(p) != n for p, n in zip(parts, nums)):
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"network size must be one int (square) or two ints (height, width), got {value!r}") \
            from None
    if len(nums) == 1:
        nums = nums * 2
    if len(nums) != 2:
        raise ValueError(f"network size must be one int (square) or two ints (height, width), got {value!r}")
    h, w = nums
    if h <= 0 or w <= 0 or h % SIZE_MULTIPLE or w % SIZE_MULTIPLE:
        def nearest(n: int) -> int:
            return max(SIZE_MULTIPLE, int(round(n / SIZE_MULTIPLE)) * SIZE_MULTIPLE)
        raise ValueError(f"network size {h}x{w} (HxW): both sides must be positive multiples of {SIZE_MULTIPLE} "
                         f"(the encoders down-sample 5 times); nearest valid size: {nearest(h)}x{nearest(w)}")
    return h, w


@dataclass(frozen=True)
class LetterboxGeometry:
    """Where an image went in a letterboxed network input.

    The original ``(orig_h, orig_w)`` image is resized (aspect ratio kept) to ``(resized_h, resized_w)``,
    placed at the top-left corner of the ``(net_h, net_w)`` network input, and the bottom / right remainder is
    zero padding. The inverse is a crop of the top-left ``(resized_h, resized_w)`` followed by a resize to the
    original size. All values in pixels.
    """

    orig_h: int
    orig_w: int
    net_h: int
    net_w: int
    resized_h: int
    resized_w: int

    @property
    def scale(self) -> float:
        """Uniform scale factor (network pixels per original pixel) used to compute the resized size."""
        return min(self.net_h / self.orig_h, self.net_w / self.orig_w)

    def to_dict(self) -> dict[str, int]:
        """Flat dict of ints (JSON-serialisable; collates into tensors in a DataLoader batch)."""
        return {"orig_h": self.orig_h, "orig_w": self.orig_w, "net_h": self.net_h, "net_w": self.net_w,
                "resized_h": self.resized_h, "resized_w": self.resized_w}

    @classmethod
    def from_dict(cls, d: dict) -> "LetterboxGeometry":
        """Inverse of :meth:`to_dict`; accepts ints, 0-d tensors or numpy scalars as values."""
        keys = ("orig_h", "orig_w", "net_h", "net_w", "resized_h", "resized_w")
        missing = [k for k in keys if k not in d]
        if missing:
            raise KeyError(f"letterbox geometry dict lacks {missing}; got keys {sorted(d)}")
        return cls(**{k: int(d[k]) for k in keys})


def letterbox_geometry(orig_hw: tuple[int, int], size_hw: tuple[int, int] | int) -> LetterboxGeometry:
    """Geometry of :func:`letterbox` for an ``orig_hw`` image and a network size (see :func:`network_size`)."""
    net_h, net_w = network_size(size_hw)
    h, w = int(orig_hw[0]), int(orig_hw[1])
    if h < 1 or w < 1:
        raise ValueError(f"image size must be positive, got {h}x{w}")
    scale = min(net_h / h, net_w / w)
    rh = min(net_h, max(1, int(round(h * scale))))
    rw = min(net_w, max(1, int(round(w * scale))))
    return LetterboxGeometry(h, w, net_h, net_w, rh, rw)


def _nearest_indices(src: int, dst: int) -> np.ndarray:
    """Pixel-centre nearest-neighbour source index for each destination index (as OpenCV INTER_NEAREST_EXACT).

    ``src_index = floor((dst_index + 0.5) * src / dst)``. With this rule an upscale followed by the
    downscale back to the original size is exactly the identity.
    """
    idx = ((np.arange(dst, dtype=np.float64) + 0.5) * (src / dst)).astype(np.int64)
    return np.minimum(idx, src - 1)


_INTERPOLATIONS = ("linear", "nearest", "area")


def _resize(array: np.ndarray, out_hw: tuple[int, int], interpolation: str) -> np.ndarray:
    """Resize the last two axes of ``array`` to ``out_hw``."""
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}, got {interpolation!r}")
    h, w = array.shape[-2:]
    oh, ow = out_hw
    if (h, w) == (oh, ow):
        return array.copy()
    if interpolation == "nearest":
        rows, cols = _nearest_indices(h, oh), _nearest_indices(w, ow)
        return array[..., rows[:, None], cols[None, :]]
    if array.dtype not in (np.uint8, np.uint16, np.float32, np.float64, np.int16):
        raise TypeError(f"{interpolation} resizing needs uint8/uint16/int16/float32/float64 data, got {array.dtype};"
                        " use interpolation='nearest' for label maps")
    # INTER_AREA when shrinking (anti-aliasing), INTER_LINEAR when enlarging; "area" forces INTER_AREA.
    shrinking = oh * ow < h * w
    flag = cv2.INTER_AREA if (interpolation == "area" or shrinking) else cv2.INTER_LINEAR
    if array.ndim == 2:
        return cv2.resize(array, (ow, oh), interpolation=flag)
    flat = array.reshape((-1, h, w))
    out = np.stack([cv2.resize(np.ascontiguousarray(c), (ow, oh), interpolation=flag) for c in flat])
    return out.reshape(array.shape[:-2] + (oh, ow))


def letterbox(image: np.ndarray, size_hw: tuple[int, int] | int,
              interpolation: str = "linear") -> tuple[np.ndarray, LetterboxGeometry]:
    """Aspect-preserving resize of an image or mask into a network-size canvas (zero padding bottom / right).

    The scale is ``min(net_h / H, net_w / W)``; the resized image (sides rounded to whole pixels) sits at the
    top-left corner so that the inverse (:func:`unletterbox`) is a plain crop + resize.

    Args:
        image: ``(H, W)`` or ``(C, H, W)`` array (uint8 / uint16 / float; any integer type with "nearest").
        size_hw: network size ``(h, w)`` (multiples of 32) or one int for a square.
        interpolation: "linear" for images (OpenCV INTER_LINEAR when enlarging, INTER_AREA when shrinking),
            "area", or "nearest" for masks and label maps (pixel-centre nearest neighbour; values are only
            copied, never mixed, so binary / integer masks stay binary / integer-valued).

    Returns:
        ``(out, geometry)``: ``out`` of shape ``(net_h, net_w)`` or ``(C, net_h, net_w)`` and the input's dtype,
        and the :class:`LetterboxGeometry` to undo it.

    Raises:
        ValueError: bad size (see :func:`network_size`), shape or interpolation. TypeError: dtype unsupported by
            the interpolation.
    """
    arr = np.asarray(image)
    if arr.ndim not in (2, 3):
        raise ValueError(f"letterbox expects (H, W) or (C, H, W), got shape {arr.shape}")
    geom = letterbox_geometry(arr.shape[-2:], size_hw)
    resized = _resize(arr, (geom.resized_h, geom.resized_w), interpolation)
    out = np.zeros(arr.shape[:-2] + (geom.net_h, geom.net_w), dtype=arr.dtype)
    out[..., : geom.resized_h, : geom.resized_w] = resized
    return out, geom


def unletterbox(array: np.ndarray, geometry: LetterboxGeometry | dict,
                interpolation: str = "linear") -> np.ndarray:
    """Map a network-size output back onto the original image's pixel grid (inverse of :func:`letterbox`).

    Args:
        array: ``(net_h, net_w)`` or ``(C, net_h, net_w)`` array (probabilities: float, "linear"; class or binary
            masks: any integer dtype, "nearest"). A torch tensor is converted with ``.numpy()`` on the CPU.
        geometry: the :class:`LetterboxGeometry` returned by :func:`letterbox` (or its ``to_dict()``).
        interpolation: "linear", "area" or "nearest" (see :func:`letterbox`).

    Returns:
        ``(orig_h, orig_w)`` or ``(C, orig_h, orig_w)`` array of the input's dtype.

    Guarantees (tested on real masks): with "nearest", when the network size is at least the image size (the
    letterbox enlarges) ``unletterbox(letterbox(m)) == m`` exactly; when it shrinks by a factor f, every pixel
    that differs takes a value found within ``ceil(f / 2)`` pixels of it in the original (only pixels next
    to a class boundary can change).

    Raises:
        ValueError: the array's last two axes do not match the geometry's network size.
    """
    geom = geometry if isinstance(geometry, LetterboxGeometry) else LetterboxGeometry.from_dict(geometry)
    arr = array.detach().cpu().numpy() if hasattr(array, "detach") else np.asarray(array)
    if arr.ndim not in (2, 3) or arr.shape[-2:] != (geom.net_h, geom.net_w):
        raise ValueError(f"unletterbox: expected (..., {geom.net_h}, {geom.net_w}) for this geometry, "
                         f"got shape {arr.shape}")
    crop = arr[..., : geom.resized_h, : geom.resized_w]
    return _resize(np.ascontiguousarray(crop), (geom.orig_h, geom.orig_w), interpolation)
