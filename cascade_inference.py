"""Run the trained cascade on one mammogram or a folder, and write results a clinician-researcher can read.

Usage::

    python cascade_inference.py --checkpoint-dir checkpoints --image-dir scans/ --recursive --output-dir predictions
    python cascade_inference.py --stage1-weights checkpoints/stage1/best_stage1.pth \\
        --stage2-weights checkpoints/stage2/best_stage2.pth --image 0_R-CC.dcm --output-dir predictions
    python cascade_inference.py --checkpoint-dir checkpoints --image-dir scans/ --interactive   # OpenCV viewer

The two checkpoints alone define the networks, their input sizes and the preprocessing (no training flag is
repeated). Every format ``imaging.read_image`` reads is accepted: PNG / TIFF (8 and 16 bit), JPEG, BMP, PGM and
DICOM (also extensionless DICOM files, recognised by their ``DICM`` magic).

Pipeline for each image (``cascade.Cascade``; nothing of it is re-implemented here): read -> preprocess (config from
the stage-1 checkpoint; mirrored so the chest wall is on the left) -> stage 1 at its network size -> tissue classes
mapped back to the original pixels -> FGT region of interest (box around the predicted FGT grown by the stage-2
checkpoint's margin, default 10 % per side, at least 64 px; the whole breast when no FGT is found, and the JSON says
so) -> crop of the full-resolution preprocessed image -> stage 2 -> lesion probability pasted back into the ROI box
(exactly zero elsewhere) -> every output mirrored back to the input's own orientation and resolution.

Outputs for each input ``<stem>`` (in ``--output-dir``; with ``--recursive`` the input's sub-folders are mirrored
there, so equal stems in different folders do not collide; two inputs with one stem in one folder, e.g. ``a.png``
and ``a.dcm``, get ``a_png`` / ``a_dcm``):

=============================  ===================================================================================
``<stem>_tissue_seg.png``      8-bit class indices: 0 background, 1 adipose, 2 FGT, 3 pectoral muscle
``<stem>_tissue_seg_color.png`` the same map in colour (:data:`TISSUE_COLORS_RGB`)
``<stem>_fgt_mask.png``        8-bit, 255 = FGT, 0 elsewhere
``<stem>_cancer_prob.png``     lesion probability; ``--prob-encoding uint8`` (default): value = round(p x 255);
                               ``uint16``: value = round(p x 65535). The JSON's ``cancer_prob_encoding`` says which.
``<stem>_visualization.png``   matplotlib figure: image, tissue overlay with legend, FGT + ROI, lesion contours
``<stem>.json``                the record (:data:`RECORD_SPEC`; checked by :func:`validate_record`); written last,
                               so its presence means the image is complete
=============================  ===================================================================================

For a folder, ``predictions.csv`` (one row per input, :data:`CSV_COLUMNS`) and ``summary.json`` (counts, failures,
density distribution, timings) are written too, and a summary is printed.

Safety: an input that cannot be read is skipped with its reason and the rest go on (exit status 1 at the end);
files that are not images (no image suffix and no image magic bytes, e.g. ``notes.txt``) are listed as
``not_image`` (reported, not a failure); hidden files are ignored. Inputs are never written to (an output path that
would equal an input is refused). An input whose ``<stem>.json`` exists is skipped as ``exists`` (its row in
``predictions.csv`` is filled from that JSON) unless ``--overwrite``; an existing ``predictions.csv`` /
``summary.json`` is kept and the new one gets a timestamped name unless ``--overwrite``.

Speed: images go through the networks in groups of ``--batch-size`` (``Cascade.run_batch``: stage 1 on the group's
letterboxed images at once, then stage 2 on their ROI crops); while the networks run on one group, a background
thread reads the next group and another writes the previous group's outputs (PNG encoding, the figure;
``--prefetch 1``, the default). ``--no-visualization`` skips the slowest output.
``--backend onnxruntime`` runs both networks under ONNX Runtime on the CPU (``onnx_backend.py``; ``.onnx`` files
exported by it are accepted as weights).

Exit status: 0 every input done (or skipped as ``exists`` / ``not_image``), 1 some inputs failed (each is reported
with its reason; the others were processed), 2 usage, checkpoint or display error.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import io
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import cv2
import numpy as np

import cascade
import checkpoints
import cli
import imaging
import labels
import metrics
import roi
import runners
from fileio import atomic_write_bytes, json_safe

#: Version of the JSON record layout (:data:`RECORD_SPEC`); bump when fields change meaning.
RECORD_SCHEMA_VERSION = 1

#: File suffixes read as images (the formats ``imaging.read_image`` decodes). Files without a suffix are read when
#: their magic bytes say DICOM / PNG / JPEG / TIFF / BMP / PGM.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".pgm", ".pnm", ".dcm", ".dicom", ".dic")

#: Display colours (RGB) of the tissue classes 0..3 in the coloured map, the figure and the viewer. Our choice:
#: background black, adipose yellow, FGT magenta, pectoral muscle blue (distinct for the common colour blindnesses).
TISSUE_COLORS_RGB = ((0, 0, 0), (240, 200, 60), (220, 40, 150), (60, 120, 255))

#: Probability PNG encodings: name -> (dtype, full-scale value). Value = round(probability x full scale).
PROB_ENCODINGS = {"uint8": (np.uint8, 255), "uint16": (np.uint16, 65535)}

#: Connectivity of lesion components (``cv2.connectedComponentsWithStats``): 8 (diagonal neighbours join).
LESION_CONNECTIVITY = 8

#: At most this many lesion components are listed per image (largest first); ``count`` always gives the total.
MAX_LISTED_COMPONENTS = 100

#: Plain-language names of the density categories (ACR BI-RADS Atlas, 4th edition, 2003).
DENSITY_DESCRIPTIONS = {
    "A": "almost entirely fatty",
    "B": "scattered areas of fibroglandular density",
    "C": "heterogeneously dense",
    "D": "extremely dense",
}
DENSITY_SOURCE = (
    "Percent density = FGT area / breast area x 100, breast = adipose + FGT pixels of the tissue map, pectoral muscle "
    "excluded (area-based density, Byng et al., Phys Med Biol 1994; as in Tiryaki & Kaplanoglu, IRBM 2022). "
    "Categories from the quartiles of the ACR BI-RADS Atlas, 4th edition (2003): A <= 25 %, B 25-50 %, C 50-75 %, "
    "D > 75 % (upper bounds inclusive; metrics.DENSITY_THRESHOLDS_PERCENT)."
)
DENSITY_CAVEAT = (
    "An automatic 2-D area estimate from the segmentation, not a radiologist's BI-RADS density assessment "
    "(the BI-RADS 5th edition, 2013, no longer defines categories by percentage)."
)

_NoneType = type(None)
_BOX_SPEC = {"y0": int, "x0": int, "y1": int, "x1": int}
_CHECKPOINT_SPEC = {"path": str, "sha256_16": str, "stage": int, "epoch": (int, _NoneType),
                    "best_metric": (float, int, _NoneType), "metric_name": (str, _NoneType), "input_size": list}
_FLOAT = (float, int)

#: The documented fields of ``<stem>.json``: name -> type (or tuple of types, or a nested spec). Units: pixels
#: unless the name says ``_mm`` / ``_mm2`` / ``_s``; boxes are half-open ``[y0, y1) x [x0, x1)`` in the input
#: image's own pixel coordinates and orientation.
RECORD_SPEC: dict[str, Any] = {
    "schema_version": int,
    "status": str,  # "ok"
    "input": {"path": str, "relative_path": str, "source_format": str, "bit_depth": int, "notes": list},
    "image_size": {"height": int, "width": int},
    "pixel_spacing_mm": (list, _NoneType),  # [row, col] in mm, or null when the file does not state it
    "orientation": {"mirrored_for_processing": bool, "note": str},
    "roi": {"box": _BOX_SPEC, "source": str, "margin_fraction": _FLOAT, "min_side_px": int, "explanation": str},
    "tissue": {"class_names": list, "areas_px": dict, "areas_mm2": (dict, _NoneType), "confidence": _FLOAT},
    "density": {"percent": _FLOAT, "category": str, "category_description": str, "thresholds_percent": list,
                "definition_and_source": str, "caveat": str},
    "lesions": {"threshold": _FLOAT, "connectivity": int, "min_area_px": int, "count": int, "listed": int,
                "max_probability": _FLOAT, "total_area_px": int, "total_area_mm2": (float, int, _NoneType),
                "components": list},
    "preprocessing": {"config": dict, "adaptive_clahe": str, "adaptive_clahe_used": bool, "tta": bool},
    # file names relative to the JSON's folder; null when not written (predict_image writes nothing)
    "outputs": {"tissue_seg": (str, _NoneType), "tissue_seg_color": (str, _NoneType), "fgt_mask": (str, _NoneType),
                "cancer_prob": (str, _NoneType), "visualization": (str, _NoneType), "json": (str, _NoneType)},
    "cancer_prob_encoding": str,
    "timings_s": dict,
    "checkpoints": {"stage1": _CHECKPOINT_SPEC, "stage2": _CHECKPOINT_SPEC},
    "runtime": {"device": str, "backend": str, "batch_size": int, "created_utc": str, "versions": dict},
    "findings": list,  # plain-language sentences
}

#: Fields of each entry of ``record["lesions"]["components"]`` (largest component first).
COMPONENT_SPEC: dict[str, Any] = {
    "id": int, "box": _BOX_SPEC, "area_px": int, "area_mm2": (float, int, _NoneType),
    "max_probability": _FLOAT, "mean_probability": _FLOAT, "centroid_yx": list,
}

#: Columns of ``predictions.csv`` (one row per input; empty cells where a value does not apply).
CSV_COLUMNS = ("input", "status", "reason", "height", "width", "pixel_spacing_row_mm", "pixel_spacing_col_mm",
               "percent_density", "density_category", "roi_source", "roi_y0", "roi_x0", "roi_y1", "roi_x1",
               "lesion_count", "lesion_max_probability", "lesion_total_area_px", "lesion_total_area_mm2",
               "tissue_confidence", "adaptive_clahe_used", "seconds", "json")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The command line of the inference script (see the module docstring)."""
    parser = argparse.ArgumentParser(description="Run the two-stage mammogram cascade on an image or a folder.",
                                     add_help=add_help, parents=[cli.runtime_parser("device", "backend", "amp", "tta")])
    # checkpoints
    parser.add_argument("--stage1-weights", type=str, default=None,
                        help="stage-1 (tissue) checkpoint .pth, or .onnx with --backend onnxruntime (default: %(default)s)")
    parser.add_argument("--stage2-weights", type=str, default=None,
                        help="stage-2 (lesion) checkpoint .pth, or .onnx with --backend onnxruntime (default: %(default)s)")
    parser.add_argument("--checkpoint-dir", type=str, default=None,
                        help="folder holding best_stage1.pth and best_stage2.pth (directly or in stage1/ and stage2/); "
                             "used for a stage whose --stageN-weights is not given (default: %(default)s)")
    # inputs and outputs
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--image", type=str, default=None, help="one mammogram file (default: %(default)s)")
    source.add_argument("--image-dir", type=str, default=None, help="a folder of mammograms (default: %(default)s)")
    parser.add_argument("--recursive", action="store_true", help="also read the sub-folders of --image-dir")
    parser.add_argument("--output-dir", type=str, default="predictions", help="where outputs go (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: skip those images)")
    # the model run
    parser.add_argument("--threshold", type=cli.probability, default=0.5,
                        help="lesion probability threshold in (0, 1] for the reported components (default: %(default)s)")
    parser.add_argument("--min-lesion-area", type=int, default=1,
                        help="smallest lesion component reported, in pixels (default: %(default)s)")
    parser.add_argument("--adaptive-clahe", action="store_true",
                        help="when stage 1 is unsure (mean confidence < cascade.ADAPTIVE_CLAHE_CONFIDENCE), re-run it "
                             "with the stronger CLAHE and keep the more confident result (reported per image)")
    parser.add_argument("--batch-size", type=cli.positive_int, default=1,
                        help="images per network call: stage 1 runs on the group's letterboxed images at once, then "
                             "stage 2 on their ROI crops (more memory, faster on a GPU) (default: %(default)s)")
    parser.add_argument("--prefetch", type=int, default=1, choices=(0, 1),
                        help="1: read the next image and write the previous one's outputs in background threads while "
                             "the network runs; 0: all in turn (default: %(default)s)")
    parser.add_argument("--prob-encoding", type=str, default="uint8", choices=tuple(PROB_ENCODINGS),
                        help="<stem>_cancer_prob.png: uint8 = round(p x 255), uint16 = round(p x 65535) "
                             "(default: %(default)s)")
    parser.add_argument("--no-visualization", action="store_true", help="skip <stem>_visualization.png (faster)")
    # interactive viewer
    parser.add_argument("--interactive", action="store_true",
                        help="open the OpenCV viewer over the inputs instead of writing all outputs (needs a display)")
    return parser


# ------------------------------------------------------------------------------------------------- checkpoints
@dataclass
class LoadedCascade:
    """A ready cascade with what the reports say about it."""

    cascade: cascade.Cascade
    identities: dict  # {"stage1": checkpoint_identity, "stage2": ...}
    device: str
    backend: str
    notes: list = field(default_factory=list)


def load_cascade(stage1_path: str | os.PathLike, stage2_path: str | os.PathLike, *, device: str = "auto",
                 backend: str = "torch", tta: bool = False, adaptive_clahe: bool = False,
                 amp: bool = False) -> LoadedCascade:
    """Load both checkpoints and build the :class:`cascade.Cascade` that inference runs.

    Raises:
        FileNotFoundError: a checkpoint is missing. ValueError: a file is not a checkpoint of this suite, or holds
        the other stage. RuntimeError: ``device="cuda"`` without a GPU.
    """
    if backend == "onnxruntime" and device == "auto":
        device = "cpu"  # ONNX Runtime runs on the CPU here (runners.make_runner)
    torch_device = runners.resolve_device(device)
    stage1_path, stage2_path = Path(stage1_path), Path(stage2_path)
    runner1, checkpoint1 = runners.load_runner(stage1_path, backend, torch_device, amp=amp)
    runner2, checkpoint2 = runners.load_runner(stage2_path, backend, torch_device, amp=amp)
    notes = []
    if dict(checkpoint2.get("preprocess_config", {})) != dict(checkpoint1["preprocess_config"]):
        notes.append("the two checkpoints store different preprocessing configs; the stage-1 one is used for both "
                     "stages (cascade.Cascade)")
    model = cascade.Cascade(checkpoint1, checkpoint2, stage1_runner=runner1, stage2_runner=runner2,
                            device=torch_device, tta=tta, adaptive_clahe="auto" if adaptive_clahe else "off")
    identities = {"stage1": checkpoints.checkpoint_identity(stage1_path, checkpoint1),
                  "stage2": checkpoints.checkpoint_identity(stage2_path, checkpoint2)}
    return LoadedCascade(model, identities, str(torch_device), backend, notes)


def with_adaptive_clahe(model: cascade.Cascade, mode: str) -> cascade.Cascade:
    """A cascade sharing ``model``'s runners with another ``adaptive_clahe`` mode ("off", "on" or "auto")."""
    return cascade.Cascade(model.stage1_checkpoint, model.stage2_checkpoint, stage1_runner=model.stage1,
                           stage2_runner=model.stage2, tta=model.tta, adaptive_clahe=mode)


# ---------------------------------------------------------------------------------------------- measurements
def _box_dict(y0: int, x0: int, y1: int, x1: int) -> dict:
    return {"y0": int(y0), "x0": int(x0), "y1": int(y1), "x1": int(x1)}


def _pixel_area_mm2(spacing_mm) -> float | None:
    return None if spacing_mm is None else float(spacing_mm[0]) * float(spacing_mm[1])


def tissue_summary(tissue_classes: np.ndarray, spacing_mm=None) -> dict:
    """Per-class areas of a ``(H, W)`` class map: ``{"areas_px": {name: int}, "areas_mm2": {name: float} | None}``."""
    counts = np.bincount(tissue_classes.ravel(), minlength=len(labels.TISSUE_CLASS_NAMES))
    areas = {name: int(counts[i]) for i, name in enumerate(labels.TISSUE_CLASS_NAMES)}
    pixel_mm2 = _pixel_area_mm2(spacing_mm)
    return {"areas_px": areas,
            "areas_mm2": None if pixel_mm2 is None else {k: round(v * pixel_mm2, 3) for k, v in areas.items()}}


def density_summary(tissue_classes: np.ndarray) -> dict:
    """Percent density of a class map, its category and where both come from (see :data:`DENSITY_SOURCE`)."""
    percent = float(metrics.percent_density(tissue_classes, labels.ADIPOSE, labels.FGT))
    category = metrics.density_category(percent)
    return {"percent": round(percent, 3), "category": category, "category_description": DENSITY_DESCRIPTIONS[category],
            "thresholds_percent": list(metrics.DENSITY_THRESHOLDS_PERCENT), "definition_and_source": DENSITY_SOURCE,
            "caveat": DENSITY_CAVEAT}


def lesion_components(prob: np.ndarray, threshold: float = 0.5, spacing_mm=None, min_area_px: int = 1) -> dict:
    """Connected components (8-connectivity) of ``prob >= threshold``, largest first.

    Args:
        prob: ``(H, W)`` float32 lesion probability in [0, 1].
        threshold: probability threshold (components are where ``prob >= threshold``).
        spacing_mm: ``(row, col)`` pixel spacing in mm, or None (then areas in mm^2 are None).
        min_area_px: components smaller than this many pixels are dropped.

    Returns:
        The ``"lesions"`` part of the record: ``threshold``, ``connectivity``, ``min_area_px``, ``count`` (all
        components kept), ``listed`` (at most :data:`MAX_LISTED_COMPONENTS`), ``max_probability`` (over the whole
        map), ``total_area_px`` / ``total_area_mm2`` and ``components`` (each as :data:`COMPONENT_SPEC`; boxes are
        half-open ``[y0, y1) x [x0, x1)`` in pixels, centroids ``[y, x]`` in pixels).
    """
    mask = (prob >= threshold).astype(np.uint8)
    n, labels, stats, centroids = cv2.connectedComponentsWithStats(mask, connectivity=LESION_CONNECTIVITY)
    pixel_mm2 = _pixel_area_mm2(spacing_mm)
    kept = sorted((i for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] >= max(1, min_area_px)),
                  key=lambda j: (-int(stats[j, cv2.CC_STAT_AREA]), j))
    components = []
    for i in kept[:MAX_LISTED_COMPONENTS]:  # statistics inside each component's own box (fast on large images)
        x, y, w, h, area = (int(v) for v in stats[i])
        values = prob[y:y + h, x:x + w][labels[y:y + h, x:x + w] == i]
        components.append({
            "id": 0, "box": _box_dict(y, x, y + h, x + w), "area_px": area,
            "area_mm2": None if pixel_mm2 is None else round(area * pixel_mm2, 3),
            "max_probability": round(float(values.max()), 4),
            "mean_probability": round(float(values.mean(dtype=np.float64)), 4),
            "centroid_yx": [round(float(centroids[i][1]), 1), round(float(centroids[i][0]), 1)],
        })
    for rank, component in enumerate(components, start=1):
        component["id"] = rank
    total_px = int(sum(int(stats[i, cv2.CC_STAT_AREA]) for i in kept))
    return {
        "threshold": float(threshold), "connectivity": LESION_CONNECTIVITY, "min_area_px": int(min_area_px),
        "count": len(kept), "listed": len(components),
        "max_probability": round(float(prob.max()) if prob.size else 0.0, 4),
        "total_area_px": total_px, "total_area_mm2": None if pixel_mm2 is None else round(total_px * pixel_mm2, 3),
        "components": components,
    }


def roi_explanation(source: str, margin_fraction: float) -> str:
    """A plain sentence saying how the ROI box was chosen (``source`` from ``roi.fgt_roi_box``)."""
    grow = (f"grown by {margin_fraction * 100:g} % of its height and width on each side (each side at least "
            f"{roi.ROI_MIN_SIDE} px), clipped to the image")
    if source == "fgt":
        return f"Box around the predicted fibroglandular tissue (FGT), {grow}."
    if source == "breast":
        return f"No FGT was predicted: the ROI is the box around the whole breast (all tissue classes), {grow}."
    return "No breast tissue was predicted: the ROI is the whole image."


def colorize_tissue(tissue_classes: np.ndarray) -> np.ndarray:
    """``(H, W)`` class map -> ``(H, W, 3)`` uint8 RGB with :data:`TISSUE_COLORS_RGB`."""
    palette = np.array(TISSUE_COLORS_RGB, dtype=np.uint8)
    return palette[np.clip(tissue_classes, 0, len(palette) - 1)]


def encode_probability(prob: np.ndarray, encoding: str = "uint8") -> np.ndarray:
    """Lesion probability ``(H, W)`` float in [0, 1] -> uint8 (round(p x 255)) or uint16 (round(p x 65535))."""
    dtype, full = PROB_ENCODINGS[encoding]
    return np.rint(np.clip(prob, 0.0, 1.0) * full).astype(dtype)


def decode_probability(encoded: np.ndarray) -> np.ndarray:
    """Inverse of :func:`encode_probability` (from the array's dtype): ``(H, W)`` float32 in [0, 1]."""
    full = 65535.0 if encoded.dtype == np.uint16 else 255.0
    return encoded.astype(np.float32) / full


def display_image(pixels: np.ndarray) -> np.ndarray:
    """The input as ``(H, W)`` uint8 for figures (``imaging.scale_to_uint8`` with its bit-depth scaling)."""
    return imaging.scale_to_uint8(pixels, {"intensity_scaling": "bit_depth"})


# ----------------------------------------------------------------------------------------------- prediction
@dataclass
class Prediction:
    """One image's result: the JSON record and the arrays the outputs are made from."""

    record: dict
    image: imaging.MammogramImage
    result: cascade.CascadeResult


def _timed_read(path: Path) -> tuple[imaging.MammogramImage, float]:
    start = time.perf_counter()
    image = imaging.read_image(path)
    return image, time.perf_counter() - start


#: Plausibility limits of a mammogram's size: the smallest side in pixels (public full-field mammograms are 2000-4000
#: px; the DDSM tissue and CDD-CESM sets are resized to 480-512 px), and the largest height/width ratio (breast
#: images are about 1.2-2.0; 4 leaves room for strips of film). Outside them results are computed but flagged.
MIN_PLAUSIBLE_SIDE_PX = 128
MAX_PLAUSIBLE_ASPECT = 4.0


def plausibility_warnings(height: int, width: int) -> list[str]:
    """Warnings for an image size that is unlikely to be a mammogram (see :data:`MIN_PLAUSIBLE_SIDE_PX`)."""
    warnings = []
    if min(height, width) < MIN_PLAUSIBLE_SIDE_PX:
        warnings.append(f"image is only {width} x {height} px (W x H), below {MIN_PLAUSIBLE_SIDE_PX} px on a side: "
                        "probably not a mammogram, or a thumbnail; results are unreliable")
    if max(height, width) > MAX_PLAUSIBLE_ASPECT * min(height, width):
        warnings.append(f"image aspect ratio {max(height, width) / min(height, width):.1f} exceeds "
                        f"{MAX_PLAUSIBLE_ASPECT:g}: probably not a whole mammogram; results are unreliable")
    return warnings


def _findings(record: dict) -> list[str]:
    height, width = record["image_size"]["height"], record["image_size"]["width"]
    density, roi, lesions = record["density"], record["roi"], record["lesions"]
    spacing = record["pixel_spacing_mm"]
    out = [f"Image {width} x {height} px (W x H), {record['input']['bit_depth']}-bit {record['input']['source_format']}"
           + (f", pixel spacing {spacing[0]:g} x {spacing[1]:g} mm." if spacing else ", pixel spacing unknown "
              "(areas in pixels only).")]
    out.append(f"Percent density {density['percent']:.1f} % -> category {density['category']} "
               f"({density['category_description']}); thresholds {density['thresholds_percent']} %.")
    box = roi["box"]
    out.append(f"Lesion search region (rows {box['y0']}-{box['y1']}, columns {box['x0']}-{box['x1']}): "
               + roi["explanation"])
    if lesions["count"] == 0:
        out.append(f"No lesion candidate at probability >= {lesions['threshold']:g} "
                   f"(highest probability {lesions['max_probability']:.2f}).")
    else:
        top = lesions["components"][0]
        size = f"{top['area_px']} px" + (f" = {top['area_mm2']:.1f} mm^2" if top["area_mm2"] is not None else "")
        out.append(f"{lesions['count']} lesion candidate(s) at probability >= {lesions['threshold']:g}; largest "
                   f"{size}, max probability {top['max_probability']:.2f}.")
    if record["preprocessing"]["adaptive_clahe"] != "off":
        out.append("Stronger (adaptive) CLAHE " + ("was used: stage 1 was more confident with it."
                                                   if record["preprocessing"]["adaptive_clahe_used"]
                                                   else "was tried or not needed; the standard CLAHE result was kept."))
    return out


def run_image(loaded: LoadedCascade, path: str | os.PathLike, *, threshold: float = 0.5, min_area_px: int = 1,
              image: imaging.MammogramImage | None = None, read_s: float | None = None,
              relative_path: str | None = None, prob_encoding: str = "uint8") -> Prediction:
    """Run the cascade on one file and build its record (the arrays are kept for :func:`write_outputs`).

    Args:
        loaded: from :func:`load_cascade`.
        path: the input file.
        threshold: lesion probability threshold for the components.
        min_area_px: smallest component reported, pixels.
        image: the file already read (prefetching); read here when None.
        read_s: seconds the read took (when ``image`` is given).
        relative_path: the input's name as reported (default: the file name).
        prob_encoding: the ``cancer_prob`` PNG encoding recorded (see :data:`PROB_ENCODINGS`).

    Raises:
        imaging.ImageReadError: the file cannot be read.
    """
    path = Path(path)
    if image is None:
        image, read_s = _timed_read(path)
    start = time.perf_counter()
    result = loaded.cascade(image.pixels)
    return build_prediction(loaded, path, image, result, read_s=read_s or 0.0, cascade_s=time.perf_counter() - start,
                            threshold=threshold, min_area_px=min_area_px, relative_path=relative_path,
                            prob_encoding=prob_encoding)


def build_prediction(loaded: LoadedCascade, path: Path, image: imaging.MammogramImage, result: cascade.CascadeResult,
                     *, read_s: float, cascade_s: float, threshold: float = 0.5, min_area_px: int = 1,
                     relative_path: str | None = None, prob_encoding: str = "uint8", batch_size: int = 1) -> Prediction:
    """The JSON record of one image from its cascade result (see :func:`run_image` for the arguments).

    ``cascade_s`` is the cascade's seconds for this image (its share of the batch when ``batch_size`` > 1).
    """
    start = time.perf_counter()
    height, width = image.pixels.shape
    spacing = image.pixel_spacing_mm
    model = loaded.cascade
    record = {
        "schema_version": RECORD_SCHEMA_VERSION,
        "status": "ok",
        "input": {"path": str(path.resolve()), "relative_path": relative_path or path.name,
                  "source_format": image.source_format, "bit_depth": int(image.bit_depth), "notes": list(image.notes)},
        "image_size": {"height": int(height), "width": int(width)},
        "pixel_spacing_mm": None if spacing is None else [float(spacing[0]), float(spacing[1])],
        "orientation": {"mirrored_for_processing": bool(result.flipped),
                        "note": "outputs are in the input's own orientation and resolution"
                                + (" (the image was mirrored for the networks and the outputs mirrored back)"
                                   if result.flipped else "")},
        "roi": {"box": result.roi_box.to_dict(), "source": result.roi_source,
                "margin_fraction": float(model.roi_margin), "min_side_px": int(roi.ROI_MIN_SIDE),
                "explanation": roi_explanation(result.roi_source, model.roi_margin)},
        "tissue": {"class_names": list(labels.TISSUE_CLASS_NAMES), **tissue_summary(result.tissue_classes, spacing),
                   "confidence": round(float(result.tissue_confidence), 4)},
        "density": density_summary(result.tissue_classes),
        "lesions": lesion_components(result.lesion_prob, threshold, spacing, min_area_px),
        "preprocessing": {"config": dict(model.preprocess_config), "adaptive_clahe": model.adaptive_clahe,
                          "adaptive_clahe_used": bool(result.adaptive_clahe_used), "tta": bool(model.tta)},
        "outputs": {key: None for key in RECORD_SPEC["outputs"]},
        "cancer_prob_encoding": _encoding_text(prob_encoding),
        "timings_s": {},
        "checkpoints": loaded.identities,
        "runtime": {"device": loaded.device, "backend": loaded.backend, "batch_size": int(batch_size),
                    "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    "versions": _versions()},
        "findings": [],
    }
    if loaded.notes:
        record["input"]["notes"] += loaded.notes
    warnings = plausibility_warnings(height, width)
    record["input"]["notes"] += [f"warning: {text}" for text in warnings]
    record["findings"] = _findings(record) + [f"Warning: {text}." for text in warnings]
    timings = {"read": read_s, **result.timings_s, "cascade_total": cascade_s, "postprocess": time.perf_counter() - start}
    record["timings_s"] = {k: round(float(v), 4) for k, v in timings.items()}
    return Prediction(record, image, result)


def predict_image(loaded: LoadedCascade, path: str | os.PathLike, **kwargs) -> dict:
    """Run the cascade on one file and return its JSON record (no file written). See :func:`run_image`."""
    return run_image(loaded, path, **kwargs).record


def _encoding_text(encoding: str) -> str:
    full = PROB_ENCODINGS[encoding][1]
    return f"{encoding}: pixel value = round(probability x {full}); probability = value / {full}"


_VERSIONS: dict | None = None


def _versions() -> dict:
    global _VERSIONS
    if _VERSIONS is None:
        _VERSIONS = checkpoints.library_versions()
    return _VERSIONS


# -------------------------------------------------------------------------------------------------- writing
def output_paths(out_dir: str | os.PathLike, stem: str) -> dict[str, Path]:
    """The output files of one input (keys as in the record's ``outputs``)."""
    out_dir = Path(out_dir)
    return {"tissue_seg": out_dir / f"{stem}_tissue_seg.png", "tissue_seg_color": out_dir / f"{stem}_tissue_seg_color.png",
            "fgt_mask": out_dir / f"{stem}_fgt_mask.png", "cancer_prob": out_dir / f"{stem}_cancer_prob.png",
            "visualization": out_dir / f"{stem}_visualization.png", "json": out_dir / f"{stem}.json"}


def write_json(path: str | os.PathLike, value) -> Path:
    """Write ``value`` as indented UTF-8 JSON, atomically (NaN written as null)."""
    text = json.dumps(json_safe(value), indent=2, ensure_ascii=False, allow_nan=False)
    return atomic_write_bytes(path, (text + "\n").encode("utf-8"))


def make_visualization(pixels: np.ndarray, result: cascade.CascadeResult, threshold: float, title: str = "",
                       max_rows: int = 800) -> bytes:
    """The four-panel figure as PNG bytes: image, tissue overlay with legend, FGT + ROI, lesion contours.

    Uses matplotlib's object API with the Agg canvas (no pyplot, no display, safe in threads). Arrays taller than
    ``max_rows`` are shrunk for drawing only; axes stay in original pixel coordinates.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    height, width = pixels.shape
    scale = min(1.0, max_rows / height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    gray = display_image(pixels)
    if scale < 1.0:
        gray = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
        classes = cv2.resize(result.tissue_classes, size, interpolation=cv2.INTER_NEAREST)
        prob = cv2.resize(result.lesion_prob, size, interpolation=cv2.INTER_AREA)
    else:
        classes, prob = result.tissue_classes, result.lesion_prob
    extent = (0, width, height, 0)
    panel_w = 3.4
    panel_h = min(8.0, panel_w * height / width + 0.6)
    figure = Figure(figsize=(4 * panel_w, panel_h), dpi=110, layout="constrained")
    axes = figure.subplots(1, 4)
    for ax in axes:
        ax.imshow(gray, cmap="gray", vmin=0, vmax=255, extent=extent, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].set_title("Image")
    colors = colorize_tissue(classes).astype(np.float32) / 255.0
    overlay = np.dstack([colors, np.where(classes > 0, 0.45, 0.0)])
    axes[1].imshow(overlay, extent=extent, interpolation="nearest")
    counts = np.bincount(result.tissue_classes.ravel(), minlength=4)
    handles = [Patch(color=np.array(TISSUE_COLORS_RGB[i]) / 255.0,
                     label=f"{name}: {100 * counts[i] / counts.sum():.0f} % of image")
               for i, name in enumerate(labels.TISSUE_CLASS_NAMES) if i > 0]
    axes[1].legend(handles=handles, loc="lower right", fontsize=7, framealpha=0.8)
    axes[1].set_title("Tissue classes")
    fgt = np.zeros(classes.shape + (4,), np.float32)
    fgt[classes == labels.FGT] = (220 / 255, 40 / 255, 150 / 255, 0.55)
    axes[2].imshow(fgt, extent=extent, interpolation="nearest")
    box = result.roi_box
    for ax in axes[2:]:
        ax.add_patch(Rectangle((box.x0, box.y0), box.width, box.height, fill=False, edgecolor="cyan", linestyle="--",
                               linewidth=1.2))
    density = metrics.percent_density(result.tissue_classes)
    axes[2].set_title(f"FGT ({density:.1f} % density), ROI: {result.roi_source}", fontsize=9)
    heat = np.zeros(prob.shape + (4,), np.float32)
    heat[..., 0], heat[..., 1] = 1.0, 0.6
    heat[..., 3] = np.clip(prob, 0, 1) * 0.6
    axes[3].imshow(heat, extent=extent, interpolation="bilinear")
    if (prob >= threshold).any() and (prob < threshold).any():
        ys = (np.arange(prob.shape[0]) + 0.5) * height / prob.shape[0]
        xs = (np.arange(prob.shape[1]) + 0.5) * width / prob.shape[1]
        axes[3].contour(xs, ys, prob, levels=[threshold], colors="red", linewidths=1.2)
    axes[3].set_title(f"Lesion probability, contour at {threshold:g}", fontsize=9)
    if title:
        figure.suptitle(title, fontsize=10)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def write_outputs(prediction: Prediction, out_dir: str | os.PathLike, stem: str, *, threshold: float = 0.5,
                  prob_encoding: str = "uint8", visualization: bool = True, overwrite: bool = False,
                  protected: Iterable[str | os.PathLike] = ()) -> dict:
    """Write one image's outputs (PNG maps, figure, then the JSON last) and fill ``record["outputs"]``.

    Args:
        prediction: from :func:`run_image`.
        out_dir: folder for this image's outputs (created).
        stem: file name stem of the outputs.
        threshold: contour level of the figure (should equal the record's lesion threshold).
        prob_encoding: see :data:`PROB_ENCODINGS`.
        visualization: also draw ``<stem>_visualization.png``.
        overwrite: replace an existing ``<stem>.json`` (otherwise FileExistsError).
        protected: input files; an output path equal to one of them raises ValueError (inputs are never written).

    Returns:
        The record (also updated in place) with ``outputs`` (file names relative to ``out_dir``) and the
        ``write`` / ``total`` timings.

    Raises:
        FileExistsError: ``<stem>.json`` exists and ``overwrite`` is False. ValueError: see ``protected``.
    """
    start = time.perf_counter()
    paths = output_paths(out_dir, stem)
    protected_set = {Path(p).resolve() for p in protected}
    for key, path in paths.items():
        if path.resolve() in protected_set:
            raise ValueError(f"output {path} would overwrite an input file; choose another --output-dir")
    if paths["json"].exists() and not overwrite:
        raise FileExistsError(f"{paths['json']} exists; pass --overwrite to replace it")
    result, record = prediction.result, prediction.record
    imaging.write_png(paths["tissue_seg"], result.tissue_classes.astype(np.uint8))
    imaging.write_png(paths["tissue_seg_color"], cv2.cvtColor(colorize_tissue(result.tissue_classes), cv2.COLOR_RGB2BGR))
    imaging.write_png(paths["fgt_mask"], (result.tissue_classes == labels.FGT).astype(np.uint8) * 255)
    imaging.write_png(paths["cancer_prob"], encode_probability(result.lesion_prob, prob_encoding))
    record["cancer_prob_encoding"] = _encoding_text(prob_encoding)
    if visualization:
        title = (f"{record['input']['relative_path']}: density {record['density']['percent']:.1f} % "
                 f"({record['density']['category']}), {record['lesions']['count']} lesion candidate(s)")
        atomic_write_bytes(paths["visualization"], make_visualization(prediction.image.pixels, result, threshold, title))
    record["outputs"] = {k: (p.name if (k != "visualization" or visualization) else None) for k, p in paths.items()}
    timings = record["timings_s"]
    timings["write"] = round(time.perf_counter() - start, 4)
    timings["total"] = round(timings.get("read", 0) + timings.get("cascade_total", 0) + timings.get("postprocess", 0)
                             + timings["write"], 4)
    write_json(paths["json"], record)
    return record


# ----------------------------------------------------------------------------------------------- validation
def _check(value, spec, where: str, problems: list[str]) -> None:
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            problems.append(f"{where}: expected an object, found {type(value).__name__}")
            return
        for key, sub in spec.items():
            if key not in value:
                problems.append(f"{where}.{key}: missing")
            else:
                _check(value[key], sub, f"{where}.{key}", problems)
        return
    types = spec if isinstance(spec, tuple) else (spec,)
    if isinstance(value, bool) and bool not in types:
        problems.append(f"{where}: expected {'/'.join(t.__name__ for t in types)}, found bool")
    elif not isinstance(value, types):
        problems.append(f"{where}: expected {'/'.join(t.__name__ for t in types)}, found {type(value).__name__}")


def validate_record(record: dict) -> list[str]:
    """Check a record (e.g. a loaded ``<stem>.json``) against :data:`RECORD_SPEC` and :data:`COMPONENT_SPEC`.

    Also checks the values that must hold: box inside the image, density category matching the percent, lesion
    count equal to the listed components when below the listing limit.

    Returns:
        The problems found, as sentences (empty when the record is valid).
    """
    problems: list[str] = []
    _check(record, RECORD_SPEC, "record", problems)
    if problems:
        return problems
    for i, component in enumerate(record["lesions"]["components"]):
        _check(component, COMPONENT_SPEC, f"record.lesions.components[{i}]", problems)
    height, width = record["image_size"]["height"], record["image_size"]["width"]
    box = record["roi"]["box"]
    if not (0 <= box["y0"] < box["y1"] <= height and 0 <= box["x0"] < box["x1"] <= width):
        problems.append(f"record.roi.box {box} is not inside the {height}x{width} image")
    if metrics.density_category(record["density"]["percent"]) != record["density"]["category"]:
        problems.append("record.density.category does not match record.density.percent")
    if record["roi"]["source"] not in ("fgt", "breast", "image"):
        problems.append(f"record.roi.source {record['roi']['source']!r} is not fgt / breast / image")
    lesions = record["lesions"]
    if lesions["listed"] != len(lesions["components"]) or lesions["listed"] > lesions["count"]:
        problems.append("record.lesions.listed disagrees with the components listed / the count")
    if record["pixel_spacing_mm"] is not None and len(record["pixel_spacing_mm"]) != 2:
        problems.append("record.pixel_spacing_mm must be [row, col]")
    return problems


# -------------------------------------------------------------------------------------------- folder handling
@dataclass
class InputItem:
    """One input file and where its outputs go."""

    path: Path
    relative: str  # as reported (relative to --image-dir, or the file name)
    out_dir: Path
    stem: str
    status: str = "pending"  # pending / ok / failed / exists / not_image
    reason: str = ""
    record: dict | None = None
    seconds: float | None = None


def _looks_like_image(path: Path) -> bool:
    try:
        with open(path, "rb") as stream:
            head = stream.read(132)
    except OSError:
        return True  # let the reader report the error
    return imaging.sniff_format(head, "") in ("dicom", "png", "jpeg", "tiff", "bmp", "pgm")


def list_inputs(image_dir: Path, recursive: bool, output_dir: Path) -> list[InputItem]:
    """Candidate files of a folder (sorted; hidden files and anything under ``output_dir`` left out).

    Files with an image suffix (:data:`IMAGE_SUFFIXES`) or image magic bytes are ``pending``; other files are
    ``not_image`` with the reason. Output stems are unique per output folder.
    """
    output_dir = output_dir.resolve()
    pattern = image_dir.rglob("*") if recursive else image_dir.iterdir()
    files = []
    for path in pattern:
        relative = path.relative_to(image_dir)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        resolved = path.resolve()
        if resolved == output_dir or output_dir in resolved.parents:
            continue
        files.append(path)
    files.sort(key=lambda p: p.relative_to(image_dir).as_posix())
    items = []
    for path in files:
        relative = path.relative_to(image_dir)
        item = InputItem(path, relative.as_posix(), output_dir / relative.parent, path.stem)
        if path.suffix.lower() not in IMAGE_SUFFIXES and not _looks_like_image(path):
            item.status = "not_image"
            item.reason = (f"not an image file (suffix {path.suffix or 'none'!r} and no image header); "
                           f"supported: {', '.join(IMAGE_SUFFIXES)} or DICOM without a suffix")
        items.append(item)
    stems: dict[tuple[Path, str], list[InputItem]] = {}
    for item in items:
        if item.status == "pending":
            stems.setdefault((item.out_dir, item.stem.lower()), []).append(item)
    for group in stems.values():
        if len(group) > 1:
            for item in group:
                item.stem = item.path.name.replace(".", "_")
    return items


def _row(item: InputItem) -> dict:
    row = {column: "" for column in CSV_COLUMNS}
    row.update(input=item.relative, status=item.status, reason=item.reason)
    record = item.record
    if record:
        spacing = record.get("pixel_spacing_mm") or ["", ""]
        box = record["roi"]["box"]
        lesions = record["lesions"]
        row.update(height=record["image_size"]["height"], width=record["image_size"]["width"],
                   pixel_spacing_row_mm=spacing[0], pixel_spacing_col_mm=spacing[1],
                   percent_density=record["density"]["percent"], density_category=record["density"]["category"],
                   roi_source=record["roi"]["source"], roi_y0=box["y0"], roi_x0=box["x0"], roi_y1=box["y1"],
                   roi_x1=box["x1"], lesion_count=lesions["count"], lesion_max_probability=lesions["max_probability"],
                   lesion_total_area_px=lesions["total_area_px"],
                   lesion_total_area_mm2="" if lesions["total_area_mm2"] is None else lesions["total_area_mm2"],
                   tissue_confidence=record["tissue"]["confidence"],
                   adaptive_clahe_used=record["preprocessing"]["adaptive_clahe_used"],
                   seconds="" if item.seconds is None else round(item.seconds, 3),
                   json=(Path(item.relative).parent / f"{item.stem}.json").as_posix())
    return row


def _free_name(path: Path, overwrite: bool) -> Path:
    if overwrite or not path.exists():
        return path
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    candidate = path.with_name(f"{path.stem}_{stamp}{path.suffix}")
    counter = 1
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}_{stamp}_{counter}{path.suffix}")
        counter += 1
    return candidate


def write_csv(path: Path, items: list[InputItem]) -> Path:
    """``predictions.csv``: one row per input, :data:`CSV_COLUMNS`, written atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for item in items:
        writer.writerow(_row(item))
    return atomic_write_bytes(path, buffer.getvalue().encode("utf-8"))


def summarize(items: list[InputItem], elapsed_s: float, loaded: LoadedCascade, args: argparse.Namespace) -> dict:
    """The run summary (``summary.json``): counts by status, failures with reasons, density and lesion overview."""
    counts: dict[str, int] = {}
    for item in items:
        counts[item.status] = counts.get(item.status, 0) + 1
    done = [item for item in items if item.record is not None]
    densities = [item.record["density"]["percent"] for item in done]
    categories = {c: sum(1 for item in done if item.record["density"]["category"] == c) for c in metrics.DENSITY_CATEGORIES}
    processed = [item.seconds for item in items if item.status == "ok" and item.seconds is not None]
    return {
        "inputs": len(items),
        "counts": counts,
        "failed": [{"input": item.relative, "reason": item.reason} for item in items if item.status == "failed"],
        "not_images": [{"input": item.relative, "reason": item.reason} for item in items if item.status == "not_image"],
        "existing_outputs_kept": [item.relative for item in items if item.status == "exists"],
        "density_percent": ({"mean": round(float(np.mean(densities)), 3), "median": round(float(np.median(densities)), 3),
                             "min": round(float(np.min(densities)), 3), "max": round(float(np.max(densities)), 3)}
                            if densities else None),
        "density_categories": categories,
        "images_with_lesion_candidates": sum(1 for item in done if item.record["lesions"]["count"] > 0),
        "lesion_threshold": args.threshold,
        "elapsed_s": round(elapsed_s, 3),
        "mean_s_per_processed_image": round(float(np.mean(processed)), 3) if processed else None,
        "batching": f"{args.batch_size} image(s) per network call"
                    + ("; the next group is read and the last one written in background threads" if args.prefetch else ""),
        "device": loaded.device, "backend": loaded.backend,
        "checkpoints": loaded.identities,
        "arguments": {k: v for k, v in vars(args).items()},
    }


def _print_summary(summary: dict, csv_path: Path | None, summary_path: Path | None) -> None:
    counts = summary["counts"]
    print("\nSummary")
    print(f"  inputs: {summary['inputs']}  " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    if summary["density_percent"]:
        d = summary["density_percent"]
        cats = ", ".join(f"{k}: {v}" for k, v in summary["density_categories"].items())
        print(f"  percent density: mean {d['mean']:.1f} %, median {d['median']:.1f} % (range {d['min']:.1f}-"
              f"{d['max']:.1f} %); categories {cats}")
    print(f"  images with lesion candidates (p >= {summary['lesion_threshold']:g}): "
          f"{summary['images_with_lesion_candidates']}")
    if summary["mean_s_per_processed_image"] is not None:
        print(f"  time: {summary['elapsed_s']:.1f} s in all, {summary['mean_s_per_processed_image']:.2f} s per "
              f"processed image ({summary['device']}, {summary['backend']})")
    for entry in summary["failed"]:
        print(f"  FAILED {entry['input']}: {entry['reason']}")
    for entry in summary["not_images"]:
        print(f"  not an image, skipped: {entry['input']}")
    if csv_path:
        print(f"  table: {csv_path}")
    if summary_path:
        print(f"  summary: {summary_path}")


# --------------------------------------------------------------------------------------------------- main
def _resolve_weights(args) -> tuple[Path, Path]:
    paths = []
    for stage in (1, 2):
        given = getattr(args, f"stage{stage}_weights")
        if given:
            paths.append(Path(given))
        elif args.checkpoint_dir:
            paths.append(checkpoints.find_checkpoint(args.checkpoint_dir, stage))
        else:
            raise FileNotFoundError(f"no stage-{stage} checkpoint: pass --stage{stage}-weights FILE or --checkpoint-dir DIR")
    return paths[0], paths[1]


def _report(item: InputItem, index: int, total: int) -> None:
    if item.status == "failed":
        print(f"[{index + 1}/{total}] {item.relative}: FAILED, skipped: {item.reason}", file=sys.stderr, flush=True)
        return
    record = item.record
    print(f"[{index + 1}/{total}] {item.relative}: density {record['density']['percent']:.1f} % "
          f"({record['density']['category']}), ROI from {record['roi']['source']}, "
          f"{record['lesions']['count']} lesion candidate(s), max p {record['lesions']['max_probability']:.2f}"
          f"{', adaptive CLAHE used' if record['preprocessing']['adaptive_clahe_used'] else ''}"
          f" ({item.seconds:.2f} s)", flush=True)
    for note in record["input"]["notes"]:
        if note.startswith("warning: ") or "converted" in note:
            print(f"    {item.relative}: {note}", file=sys.stderr, flush=True)


def _fail(item: InputItem, error: Exception) -> None:
    item.status = "failed"
    if isinstance(error, imaging.ImageReadError):
        item.reason = str(error)  # already names the file
    else:
        item.reason = f"{item.path}: {type(error).__name__}: {error}"


#: Errors that mark one input as failed (the batch goes on); anything else is a bug and stops the run.
_INPUT_ERRORS = (imaging.ImageReadError, ValueError, TypeError, OSError, RuntimeError, MemoryError)


def _read_group(paths: list[Path]) -> list:
    """Read each file: a list of ``(image, seconds)`` or the exception raised for that file."""
    out = []
    for path in paths:
        try:
            out.append(_timed_read(path))
        except _INPUT_ERRORS as error:
            out.append(error)
    return out


def _process(items: list[InputItem], loaded: LoadedCascade, args, protected: set) -> None:
    """Run every pending item, ``args.batch_size`` images per network call; fills status / reason / record / seconds.

    With ``args.prefetch`` a reader thread reads the next group while the networks run on this one, and a writer
    thread writes the outputs of this group (PNG encoding, the matplotlib figure) while the next one runs. At most one
    group is read ahead and one written behind, so memory stays at about three groups of images. A file that cannot
    be read fails alone; the rest of its group goes on.
    """
    pending = [item for item in items if item.status == "pending"]
    total = len(pending)
    size = max(1, int(args.batch_size))
    groups = [list(range(i, min(i + size, total))) for i in range(0, total, size)]
    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="read") if args.prefetch else None
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="write") if args.prefetch else None
    in_flight: list = []  # (index, item, future, start) of writes running in the background

    def read(group: list[int]):
        paths = [pending[i].path for i in group]
        return reader.submit(_read_group, paths) if reader else None

    def finish_writes() -> None:
        while in_flight:
            index, item, future, start = in_flight.pop(0)
            try:
                item.record = future.result()
                item.status, item.seconds = "ok", time.perf_counter() - start
            except (*_INPUT_ERRORS, FileExistsError) as error:
                _fail(item, error)
            _report(item, index, total)

    def write(prediction: Prediction, item: InputItem):
        return write_outputs(prediction, item.out_dir, item.stem, threshold=args.threshold,
                             prob_encoding=args.prob_encoding, visualization=not args.no_visualization,
                             overwrite=args.overwrite, protected=protected)

    try:
        future = read(groups[0]) if groups else None
        for number, group in enumerate(groups):
            start = time.perf_counter()
            current = future.result() if future is not None else _read_group([pending[i].path for i in group])
            future = read(groups[number + 1]) if number + 1 < len(groups) else None
            readable = [(i, got) for i, got in zip(group, current) if not isinstance(got, Exception)]
            for i, got in zip(group, current):
                if isinstance(got, Exception):
                    _fail(pending[i], got)
                    _report(pending[i], i, total)
            try:
                network_start = time.perf_counter()
                results = loaded.cascade.run_batch([image.pixels for _, (image, _) in readable])
                cascade_s = (time.perf_counter() - network_start) / max(1, len(readable))
                predictions = [build_prediction(loaded, pending[i].path, image, result, read_s=read_s, cascade_s=cascade_s,
                                                threshold=args.threshold, min_area_px=args.min_lesion_area,
                                                relative_path=pending[i].relative, prob_encoding=args.prob_encoding,
                                                batch_size=len(readable))
                               for (i, (image, read_s)), result in zip(readable, results)]
            except _INPUT_ERRORS:  # find the image at fault: run the group's images one by one
                predictions = []
                for i, (image, read_s) in readable:
                    try:
                        predictions.append(run_image(loaded, pending[i].path, threshold=args.threshold,
                                                     min_area_px=args.min_lesion_area, image=image, read_s=read_s,
                                                     relative_path=pending[i].relative, prob_encoding=args.prob_encoding))
                    except _INPUT_ERRORS as error:
                        _fail(pending[i], error)
                        _report(pending[i], i, total)
                        predictions.append(None)
            finish_writes()
            for (i, _), prediction in zip(readable, predictions):
                if prediction is None:
                    continue
                if writer is not None:
                    in_flight.append((i, pending[i], writer.submit(write, prediction, pending[i]), start))
                    continue
                try:
                    pending[i].record = write(prediction, pending[i])
                    pending[i].status, pending[i].seconds = "ok", time.perf_counter() - start
                except (*_INPUT_ERRORS, FileExistsError) as write_error:
                    _fail(pending[i], write_error)
                _report(pending[i], i, total)
        finish_writes()
    finally:
        for pool in (reader, writer):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)


def main(args: argparse.Namespace) -> int:
    """Run inference as the command line asks; returns 0 (all done), 1 (some inputs failed) or 2 (usage error)."""
    if not args.image and not args.image_dir:
        return cli.usage_error("pass --image FILE or --image-dir DIR")
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        return cli.usage_error(f"--output-dir {output_dir} is a file, not a folder; choose a folder (it is created if "
                            "missing)")
    if args.image:
        source = Path(args.image)
        if not source.is_file():
            hint = " (a folder: use --image-dir)" if source.is_dir() else ""
            return cli.usage_error(f"--image {source} is not a file{hint}")
    else:
        source = Path(args.image_dir)
        if not source.is_dir():
            return cli.usage_error(f"--image-dir {source} is not a folder")
        if output_dir.resolve() == source.resolve():
            return cli.usage_error(f"--output-dir {output_dir} is the input folder; outputs would mix with the inputs. "
                                "Choose another folder")
    try:
        stage1_path, stage2_path = _resolve_weights(args)
        loaded = load_cascade(stage1_path, stage2_path, device=args.device, backend=args.backend, tta=args.tta,
                              adaptive_clahe=args.adaptive_clahe, amp=args.amp)
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        return cli.usage_error(str(error))
    for note in loaded.notes:
        print(f"note: {note}", file=sys.stderr)

    if args.image:
        items = [InputItem(source, source.name, output_dir, source.stem)]
    else:
        items = list_inputs(source, args.recursive, output_dir)
        if not any(item.status == "pending" for item in items):
            print(f"error: no image files in {source}" + ("" if args.recursive else " (sub-folders need --recursive)"),
                  file=sys.stderr)
            return 2

    if args.interactive:
        return _interactive(items, loaded, args)

    for item in items:
        if item.status == "pending" and not args.overwrite and (item.out_dir / f"{item.stem}.json").exists():
            item.status, item.reason = "exists", "outputs exist (pass --overwrite to redo)"
            try:
                item.record = json.loads((item.out_dir / f"{item.stem}.json").read_text(encoding="utf-8"))
                if validate_record(item.record):
                    item.record = None
            except (OSError, ValueError):
                item.record = None
            print(f"{item.relative}: outputs exist, skipped (pass --overwrite to redo)")
    protected = {item.path.resolve() for item in items}
    start = time.perf_counter()
    _process(items, loaded, args, protected)
    elapsed = time.perf_counter() - start

    if args.image:
        item = items[0]
        if item.record is not None and item.status == "ok":
            print("\n".join(f"  {line}" for line in item.record["findings"]))
            print(f"  outputs in {item.out_dir} ({item.stem}_*)")
    else:
        summary = summarize(items, elapsed, loaded, args)
        csv_path = write_csv(_free_name(output_dir / "predictions.csv", args.overwrite), items)
        summary_path = write_json(_free_name(output_dir / "summary.json", args.overwrite), summary)
        _print_summary(summary, csv_path, summary_path)
    return 1 if any(item.status == "failed" for item in items) else 0


def _interactive(items: list[InputItem], loaded: LoadedCascade, args, key_source=None) -> int:
    """Open the viewer (viewer.py) over the pending inputs; results are computed when an image is shown."""
    import viewer

    entries = [item for item in items if item.status == "pending"]
    cascades = {False: with_adaptive_clahe(loaded.cascade, "off"), True: with_adaptive_clahe(loaded.cascade, "auto")}

    def compute(index: int, adaptive: bool) -> viewer.ViewItem:
        item = entries[index]
        image = imaging.read_image(item.path)
        model = LoadedCascade(cascades[adaptive], loaded.identities, loaded.device, loaded.backend)
        prediction = run_image(model, item.path, threshold=args.threshold, image=image, read_s=0.0,
                               relative_path=item.relative)
        result, record = prediction.result, prediction.record
        box = result.roi_box
        return viewer.ViewItem(name=item.relative, stem=item.stem, image=display_image(image.pixels),
                               tissue_classes=result.tissue_classes, lesion_prob=result.lesion_prob,
                               roi_box=(box.y0, box.x0, box.y1, box.x1), roi_source=result.roi_source,
                               density_percent=record["density"]["percent"], density_category=record["density"]["category"],
                               adaptive_clahe_used=result.adaptive_clahe_used)

    state = viewer.ViewerState(count=len(entries), threshold=args.threshold, adaptive_clahe=bool(args.adaptive_clahe))
    return viewer.run_viewer(compute, state, save_dir=Path(args.output_dir), key_source=key_source,
                             tissue_colors_rgb=TISSUE_COLORS_RGB)


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
