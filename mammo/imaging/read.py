"""Reading a mammogram of any format into a :class:`MammogramImage`, and lesion masks / tissue label maps.

Non-ASCII paths work on every OS: files are read as bytes by Python and decoded in memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mammo.core.labels import PARTIAL_LABEL_VALUES
from mammo.imaging.dicom import _read_dicom
from mammo.imaging.errors import ImageReadError
from mammo.imaging.formats import IMAGE_FORMATS, LOSSLESS_FORMATS, image_format, looks_like_text, sniff_format
from mammo.imaging.raster import _decode_raster


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
        notes: human-readable remarks on conversions made (colour to gray, which page / frame of several was read
            and why, a window ignored, DICOM range mapping).
        view_position: the DICOM ViewPosition ("MLO", "CC", ...) when the file states it; None otherwise.
    """

    pixels: np.ndarray
    path: str
    bit_depth: int
    pixel_spacing_mm: tuple[float, float] | None = None
    source_format: str = ""
    notes: list[str] = field(default_factory=list)
    view_position: str | None = None


#: The last 8 bytes of every complete PNG: the IEND chunk's type and CRC (PNG specification 11.2.5).
_PNG_END = b"IEND\xaeB`\x82"


def read_image(path: str | os.PathLike, page: int | None = None) -> MammogramImage:
    """Read a mammogram in any supported format into a grayscale uint8 / uint16 array.

    Formats: PNG and TIFF (8 and 16 bit; stored values kept exactly), JPEG, BMP, PGM, and DICOM (a ``.dcm`` /
    ``.dicom`` / ``.dic`` file, or any file with the 128-byte preamble and ``DICM`` magic) through pydicom and
    the pylibjpeg plug-ins (JPEG Baseline/Extended/Lossless, JPEG-LS, JPEG 2000, RLE Lossless). See
    ``_read_dicom`` for the DICOM grayscale pipeline: the DICOM nominal output range is mapped onto 0..65535
    (or kept as uint8 when it is exactly 0..255), so uint16 DICOM output always uses the full 16-bit scale.

    A colour file whose channels are all equal becomes grayscale silently; a true colour image is converted
    (BT.601 luma) and a note is added. An alpha channel is dropped (noted). Non-ASCII paths work: the file is
    read as bytes by Python and decoded in memory.

    Files that hold several images: a multi-page TIFF gives its largest page (most pixels), since a small first
    page is usually a preview; a multi-frame DICOM gives frame 0, with the window / VOI LUT and rescale of that
    frame's functional groups. A note names the count and the page read. ``page`` picks another; the command
    line tools have no flag for it (they read the default page): to process another page, read it here, or save
    that page as its own file.

    Args:
        path: the image file.
        page: index (from 0) of the TIFF page or DICOM frame to read; None for the default above. A one-image
            format accepts only None or 0.

    Returns:
        MammogramImage with ``pixels`` ``(H, W)`` uint8 or uint16, ``bit_depth`` 8 or 16, pixel spacing in mm
        (DICOM only) and notes.

    Raises:
        ImageReadError: the file is missing, not a file, empty, corrupt, of an unsupported format or pixel
            type, a DICOM without decodable pixel data, or ``page`` is beyond the file's pages / frames. The
            message names the file and the reason.
        ValueError: ``page`` is not None or an integer >= 0.
    """
    if page is not None and (isinstance(page, bool) or not isinstance(page, (int, np.integer)) or page < 0):
        raise ValueError(f"page must be None or an integer >= 0 (a page / frame index), got {page!r}")
    page = None if page is None else int(page)
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
    if page not in (None, 0) and fmt not in ("tiff", "dicom"):
        raise ImageReadError(p, f"page {page} asked for, but a {fmt.upper()} file holds one image (page 0); pass "
                                "page 0 or none")
    notes: list[str] = []
    spacing, info = None, {}
    if fmt == "dicom":
        pixels, spacing = _read_dicom(data, p, notes, info, page=page)
    else:
        pixels = _decode_raster(data, p, fmt, notes, page=page)
    if pixels.ndim != 2 or pixels.shape[0] < 1 or pixels.shape[1] < 1:
        raise ImageReadError(p, f"expected a 2-D grayscale image, found shape {pixels.shape}")
    return MammogramImage(pixels=np.ascontiguousarray(pixels), path=str(p),
                          bit_depth=8 if pixels.dtype == np.uint8 else 16, pixel_spacing_mm=spacing,
                          source_format=fmt, notes=notes, view_position=info.get("view_position"))


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
