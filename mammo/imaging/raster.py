"""Decoding PNG / JPEG / TIFF / BMP / PGM bytes into a ``(H, W)`` uint8 / uint16 grayscale array.

OpenCV decodes (Pillow is the fallback); colour becomes gray, EXIF orientation is applied, indexed PNGs give their
gray levels or their palette indices, a multi-page TIFF gives its largest page (or the one asked for), with a note.
The grayscale and dtype helpers are shared with the DICOM decoder.
"""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np

from mammo.imaging.errors import ImageReadError


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


def _decode_raster(data: bytes, path: Path, fmt: str, notes: list[str], page: int | None = None) -> np.ndarray:
    """Decode PNG/JPEG/TIFF/BMP/PGM bytes with OpenCV (Pillow as a fallback) to (H, W) uint8/uint16.

    ``page``: the page of a multi-page TIFF to read; None reads the largest (see :func:`choose_tiff_page`). Other
    formats hold one image: ``read_image`` refuses a page other than 0 before calling this.
    """
    if fmt == "png" and len(data) > 25 and data[25] == 3:  # IHDR colour type 3: indexed colour (PNG spec 11.2.2)
        return _decode_indexed_png(data, path, notes)
    page_index, orientation = None, None
    if fmt == "tiff":
        pages = tiff_pages(data)
        page_index = choose_tiff_page(pages, page, path, notes)
        if page_index is not None:
            orientation = pages[page_index][2]
    arr, cv_error = _opencv_decode(data, page_index)
    order = "bgr"
    if arr is None:
        arr = _pillow_decode(data, path, fmt, page_index, cv_error)
        order = "rgb"
    try:
        arr = _to_grayscale(arr, notes, order)
    except ValueError as exc:
        raise ImageReadError(path, str(exc)) from exc
    if orientation is None:
        orientation = exif_orientation(data)
    if fmt == "tiff":  # libtiff (OpenCV) and Pillow turn TIFF pixels into the displayed orientation themselves
        if orientation != 1:
            notes.append(f"TIFF Orientation {orientation}: applied by the decoder (outputs are in the displayed "
                         "orientation)")
    else:
        arr = apply_exif_orientation(arr, orientation, notes)
    return _finish_dtype(arr, path, notes)


def _opencv_decode(data: bytes, page_index: int | None) -> tuple[np.ndarray | None, str]:
    """OpenCV's decoding of ``data`` as stored (16 bit kept, EXIF not applied): the whole file, or only page
    ``page_index`` of a multi-page TIFF. ``(None, reason)`` when OpenCV cannot decode it."""
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        # IMREAD_UNCHANGED keeps 16-bit data and does not apply EXIF rotation. OpenCV's own warnings on a broken
        # file ("PNG input buffer is incomplete") would reach the terminal beside our one-line error: errors only.
        if cv2.utils.logging.getLogLevel() > cv2.utils.logging.LOG_LEVEL_ERROR:
            cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
        if page_index is None:
            return cv2.imdecode(buf, cv2.IMREAD_UNCHANGED), ""
        ok, mats = cv2.imdecodemulti(buf, cv2.IMREAD_UNCHANGED, None, (page_index, page_index + 1))
        return (mats[0] if ok and len(mats) == 1 else None), ""
    except cv2.error as exc:  # pragma: no cover - OpenCV raises rather than returning None only for odd inputs
        return None, str(exc).strip().splitlines()[-1]


def _pillow_decode(data: bytes, path: Path, fmt: str, page_index: int | None, cv_error: str) -> np.ndarray:
    """Pillow's decoding of ``data`` (page ``page_index`` of a multi-page TIFF) when OpenCV cannot: 16-bit modes
    kept, palette / CMYK / YCbCr as RGB, 1-bit as 8-bit.

    Raises:
        ImageReadError: a file neither decoder reads, or an unsupported pixel mode.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            if page_index is not None:
                im.seek(page_index)
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
                return np.array(im, dtype=np.uint16)
            if im.mode == "I":
                return np.array(im)
            if im.mode not in ("1", "L", "P", "LA", "RGB", "RGBA", "CMYK", "YCbCr", "PA"):
                raise ImageReadError(path, f"unsupported {fmt} pixel mode {im.mode!r}")
            if im.mode in ("P", "PA", "CMYK", "YCbCr"):
                return np.array(im.convert("RGB"))
            return np.array(im.convert("L") if im.mode == "1" else im)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        detail = f" (OpenCV: {cv_error})" if cv_error else ""
        raise ImageReadError(path, f"corrupt or unsupported {fmt} file: {exc}{detail}") from exc


def tiff_pages(data: bytes) -> list[tuple[int, int, int]]:
    """``(width, height, orientation)`` of each page (image file directory of the main IFD chain, TIFF 6.0
    section 2) of a TIFF file's bytes, in file order, read from the headers with Pillow (no pixels decoded).

    ``orientation`` is the page's Orientation tag (274), 1 when absent or out of range. An empty list when Pillow
    cannot parse the file (the decoders then read it as one image).
    """
    from PIL import Image

    pages = []
    try:
        with Image.open(io.BytesIO(data)) as im:
            for index in range(int(getattr(im, "n_frames", 1))):
                im.seek(index)
                tags = getattr(im, "tag_v2", {})
                orientation = int(tags.get(0x0112, 1)) if hasattr(tags, "get") else 1
                pages.append((int(im.size[0]), int(im.size[1]), orientation if orientation in range(1, 9) else 1))
    except Exception:  # noqa: BLE001 - a header Pillow cannot walk: no page list (OpenCV may still decode it)
        return []
    return pages


#: How many pages a note lists by size before it shortens the list.
_PAGES_LISTED = 8


def choose_tiff_page(pages: list[tuple[int, int, int]], page: int | None, path: Path,
                     notes: list[str]) -> int | None:
    """Which page of a TIFF to read, given its :func:`tiff_pages` list and the page the caller asked for.

    A multi-page TIFF often starts with a small preview or thumbnail page before the full-resolution image, and
    the decoders read the first page: so with ``page`` None the largest page (most pixels; the first of equal
    ones) is read. Every multi-page file gets a note naming the page count, the pages' sizes, the page read
    and why.

    Returns:
        The page index to decode, or None for a one-page file (or one whose pages could not be listed).

    Raises:
        ImageReadError: ``page`` is beyond the file's pages (the message gives the valid range).
    """
    count = len(pages)
    if count <= 1:
        if page not in (None, 0):
            raise ImageReadError(path, f"page {page} asked for, but the TIFF holds one page (page 0); pass page 0")
        return None
    if page is not None and not 0 <= page < count:
        raise ImageReadError(path, f"page {page} asked for, but the TIFF holds {count} pages (0..{count - 1}); pass "
                                   "a page in that range")
    areas = [width * height for width, height, _ in pages]
    if page is None:
        index = areas.index(max(areas))
        ties = areas.count(max(areas))
        why = ("the largest (most pixels" + (f"; the first of {ties} pages of that size" if ties > 1 else "") +
               "): a small page before it is usually a preview or thumbnail")
    else:
        index, why = page, "as asked"
    sizes = ", ".join(f"{i}: {w}x{h}" for i, (w, h, _) in enumerate(pages[:_PAGES_LISTED]))
    sizes += " ..." if count > _PAGES_LISTED else ""
    width, height, _ = pages[index]
    notes.append(f"multi-page TIFF with {count} pages (width x height: {sizes}): page {index} ({width}x{height} px) "
                 f"read, {why}; read_image(path, page=N) reads page N")
    return index


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
