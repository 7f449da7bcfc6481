"""Images: reading every mammogram format, preprocessing for the networks, letterbox geometry, the stage-2 ROI.

One path from any mammogram file to a network-ready 8-bit image, and back to the original image's pixels:
:func:`read_image` -> :func:`preprocess` -> :func:`letterbox` ... :func:`unletterbox` -> :func:`unflip`.
The public names below are re-exported here, so ``from mammo import imaging; imaging.read_image(...)`` is the way
to call them (tests patch ``imaging.write_png`` and callers look it up at call time).

What lives here:

- ``errors``: :class:`ImageReadError`, the one error every reader raises (names the file and the reason).
- ``formats``: which format a file holds (magic numbers, then the suffix).
- ``raster``: decoding PNG / JPEG / TIFF / BMP / PGM bytes to ``(H, W)`` uint8 / uint16, EXIF orientation.
- ``dicom``: DICOM decoding (modality / VOI LUT, window, MONOCHROME1, "For Processing"), pixel spacing.
- ``read``: :func:`read_image` (any format -> :class:`MammogramImage`) and :func:`read_mask`.
- ``write``: :func:`write_png`, 8/16-bit and indexed-colour PNGs written atomically.
- ``breast``: 8-bit intensity analysis: histograms, Otsu, breast threshold, chest-wall side, dense tissue.
- ``preprocessing``: :data:`DEFAULT_PREPROCESS`, :func:`scale_to_uint8`, :func:`preprocess`, :func:`unflip`.
- ``geometry``: :func:`network_size`, :class:`LetterboxGeometry`, :func:`letterbox`, :func:`unletterbox`.
- ``roi``: the stage-2 region of interest grown from stage 1's FGT.

This package creates no threads at import time and leaves ``cv2.setNumThreads`` to the caller.
"""

from __future__ import annotations

from mammo.imaging.breast import (breast_height, breast_on_right, breast_threshold, dense_tissue, histogram_u8,
                                  otsu_level)
from mammo.imaging.dicom import (FOR_PROCESSING_SOP_CLASSES, RAW_STRETCH_PERCENTILES, dicom_pixel_spacing,
                                 is_for_processing)
from mammo.imaging.errors import ImageReadError
from mammo.imaging.formats import (DICOM_SUFFIXES, IMAGE_FORMATS, LOSSLESS_FORMATS, image_format, looks_like_text,
                                   sniff_format)
from mammo.imaging.geometry import (SIZE_MULTIPLE, WORKING_SCALE_LIMITS, LetterboxGeometry, letterbox,
                                    letterbox_geometry, network_size, resize, unletterbox, working_size)
from mammo.imaging.preprocessing import (DEFAULT_PREPROCESS, Preprocessed, check_preprocess_config, preprocess,
                                         scale_to_uint8, unflip)
from mammo.imaging.raster import apply_exif_orientation, exif_orientation
from mammo.imaging.read import TISSUE_LABEL_VALUES, MammogramImage, read_image, read_mask
from mammo.imaging.write import write_png

__all__ = [
    "DEFAULT_PREPROCESS",
    "DICOM_SUFFIXES",
    "FOR_PROCESSING_SOP_CLASSES",
    "IMAGE_FORMATS",
    "ImageReadError",
    "LOSSLESS_FORMATS",
    "LetterboxGeometry",
    "MammogramImage",
    "Preprocessed",
    "RAW_STRETCH_PERCENTILES",
    "SIZE_MULTIPLE",
    "TISSUE_LABEL_VALUES",
    "apply_exif_orientation",
    "breast_on_right",
    "breast_threshold",
    "check_preprocess_config",
    "dense_tissue",
    "dicom_pixel_spacing",
    "exif_orientation",
    "histogram_u8",
    "image_format",
    "is_for_processing",
    "letterbox",
    "letterbox_geometry",
    "looks_like_text",
    "network_size",
    "otsu_level",
    "preprocess",
    "read_image",
    "read_mask",
    "scale_to_uint8",
    "sniff_format",
    "unflip",
    "unletterbox",
    "resize",
    "working_size",
    "WORKING_SCALE_LIMITS",
    "breast_height",
    "write_png",
]
