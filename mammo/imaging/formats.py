"""Which image format a file holds: magic numbers of its first 132 bytes, then its suffix."""

from __future__ import annotations


#: File suffixes treated as DICOM even without the 128-byte preamble + ``DICM`` magic.
DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")

#: Formats whose values are exact (no lossy compression): masks read from them must be exactly binary.
LOSSLESS_FORMATS = ("png", "tiff", "bmp", "pgm", "dicom")


def sniff_format(head: bytes, suffix: str) -> str:
    """Guess an image file's format from its first 132 bytes (magic numbers), then from its ``suffix``.

    Returns one of "dicom", "png", "jpeg", "tiff", "bmp", "pgm", or the suffix without its dot ("unknown" when there
    is none).
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
