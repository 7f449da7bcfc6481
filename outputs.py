"""Writing one image's outputs and a run's tables, and drawing them: PNG maps, the figure, JSON, ``predictions.csv``.

What lives here: the tissue colours (:data:`TISSUE_COLORS_RGB`, :func:`colorize_tissue`), the probability PNG
encodings (:data:`PROB_ENCODINGS`, :func:`encode_probability` / :func:`decode_probability`), the output file names
(:func:`output_paths`), the four-panel figure (:func:`make_visualization`), :func:`write_outputs` (one image's PNGs,
figure and JSON, the JSON last), :func:`write_json`, and the folder tables: :data:`CSV_COLUMNS` with
:func:`write_csv`, and :func:`free_name` (a timestamped name instead of overwriting ``predictions.csv`` /
``summary.json``). Every file is written atomically (``fileio``).

The record itself (its fields and measurements) is ``record.py``; running the cascade on files is ``inference.py``.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import cv2
import numpy as np

import cascade
import imaging
import labels
import metrics
from fileio import atomic_write_bytes, json_safe

if TYPE_CHECKING:
    from inference import InputItem
    from record import Prediction


#: Every file written for one input ``<stem>``, in the order written: (record ``outputs`` key, file name pattern, what
#: it holds). ``cascade_inference.py --help`` and the README list these; a test checks that the README does.
OUTPUT_FILES = (
    ("tissue_seg", "<stem>_tissue_seg.png",
     "tissue classes, 8-bit indexed-colour PNG: pixel value = class index (0 background, 1 adipose, 2 FGT, "
     "3 pectoral muscle), palette = the display colours, so the file is exact and viewable"),
    ("tissue_seg_color", "<stem>_tissue_seg_color.png",
     "the same map as 8-bit RGB (black, yellow, magenta, blue), for tools that ignore palettes"),
    ("fgt_mask", "<stem>_fgt_mask.png", "FGT mask, 8-bit grayscale: 255 = FGT, 0 elsewhere"),
    ("cancer_prob", "<stem>_cancer_prob.png",
     "lesion probability, grayscale PNG: uint8 value = round(p x 255) (default) or, with --prob-encoding uint16, "
     "round(p x 65535); exactly 0 outside the ROI box"),
    ("visualization", "<stem>_visualization.png",
     "RGB figure for reading: image, tissue overlay, FGT + ROI box, lesion probability with its contour "
     "(not with --no-visualization)"),
    ("dicom_seg", "<stem>_seg.dcm",
     "DICOM inputs only (not with --no-dicom-seg): a DICOM Segmentation (BINARY) referencing the source image, "
     "segments 1 adipose, 2 FGT, 3 pectoral muscle, 4 lesion (probability >= --threshold), for PACS viewers"),
    ("json", "<stem>.json",
     "the record: sizes, pixel spacing, ROI, tissue areas (px, mm2), percent density, lesion components, reading "
     "notes, checkpoints, timings (record.RECORD_SPEC); written last, so its presence means the image is complete"),
)

#: Files written for a folder (``--image-dir``), beside the per-image files.
FOLDER_FILES = (
    ("predictions.csv", "one row per input (CSV_COLUMNS): status, reason, size, density, ROI, lesion counts"),
    ("summary.json", "counts by status, failures with reasons, the density distribution, timings, the arguments"),
)

#: Display colours (RGB) of the tissue classes 0..3 in the coloured map, the figure and the viewer. Our choice:
#: background black, adipose yellow, FGT magenta, pectoral muscle blue (distinct for the common colour blindnesses).
TISSUE_COLORS_RGB = ((0, 0, 0), (240, 200, 60), (220, 40, 150), (60, 120, 255))

#: Probability PNG encodings: name -> (dtype, full-scale value). Value = round(probability x full scale).
PROB_ENCODINGS = {"uint8": (np.uint8, 255), "uint16": (np.uint16, 65535)}

#: Columns of ``predictions.csv`` (one row per input; empty cells where a value does not apply).
CSV_COLUMNS = ("input", "status", "reason", "height", "width", "pixel_spacing_row_mm", "pixel_spacing_col_mm",
               "percent_density", "density_category", "roi_source", "roi_y0", "roi_x0", "roi_y1", "roi_x1",
               "lesion_count", "lesion_max_probability", "lesion_total_area_px", "lesion_total_area_mm2",
               "tissue_confidence", "adaptive_clahe_used", "seconds", "json")


# ----------------------------------------------------------------------------------------- drawing and encoding
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


def encoding_text(encoding: str) -> str:
    """The record's ``cancer_prob_encoding``: how to turn a ``<stem>_cancer_prob.png`` value back into a probability."""
    full = PROB_ENCODINGS[encoding][1]
    return f"{encoding}: pixel value = round(probability x {full}); probability = value / {full}"


def display_image(pixels: np.ndarray) -> np.ndarray:
    """The input as ``(H, W)`` uint8 for figures (``imaging.scale_to_uint8`` with its bit-depth scaling)."""
    return imaging.scale_to_uint8(pixels, {"intensity_scaling": "bit_depth"})


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


# -------------------------------------------------------------------------------------------- one image's files
def output_paths(out_dir: str | os.PathLike, stem: str) -> dict[str, Path]:
    """The output files of one input (keys as in the record's ``outputs``)."""
    out_dir = Path(out_dir)
    return {key: out_dir / pattern.replace("<stem>", stem) for key, pattern, _ in OUTPUT_FILES}


def write_json(path: str | os.PathLike, value) -> Path:
    """Write ``value`` as indented UTF-8 JSON, atomically (NaN written as null)."""
    text = json.dumps(json_safe(value), indent=2, ensure_ascii=False, allow_nan=False)
    return atomic_write_bytes(path, (text + "\n").encode("utf-8"))


def write_outputs(prediction: Prediction, out_dir: str | os.PathLike, stem: str, *, threshold: float = 0.5,
                  prob_encoding: str = "uint8", visualization: bool = True, overwrite: bool = False,
                  protected: Iterable[str | os.PathLike] = (), dicom_seg: bool = True) -> dict:
    """Write one image's outputs (:data:`OUTPUT_FILES`: PNG maps, figure, DICOM SEG, then the JSON last) and fill
    ``record["outputs"]``.

    Args:
        prediction: from :func:`inference.run_image` (or :func:`record.build_prediction`).
        out_dir: folder for this image's outputs (created).
        stem: file name stem of the outputs.
        threshold: contour level of the figure (should equal the record's lesion threshold).
        prob_encoding: see :data:`PROB_ENCODINGS`.
        visualization: also draw ``<stem>_visualization.png``.
        overwrite: replace an existing ``<stem>.json`` (otherwise FileExistsError).
        protected: input files; an output path equal to one of them raises ValueError (inputs are never written).
        dicom_seg: for a DICOM input, also write ``<stem>_seg.dcm`` (:func:`write_dicom_seg_output`).

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
    imaging.write_png(paths["tissue_seg"], result.tissue_classes.astype(np.uint8), palette=TISSUE_COLORS_RGB)
    imaging.write_png(paths["tissue_seg_color"], cv2.cvtColor(colorize_tissue(result.tissue_classes), cv2.COLOR_RGB2BGR))
    imaging.write_png(paths["fgt_mask"], (result.tissue_classes == labels.FGT).astype(np.uint8) * 255)
    imaging.write_png(paths["cancer_prob"], encode_probability(result.lesion_prob, prob_encoding))
    record["cancer_prob_encoding"] = encoding_text(prob_encoding)
    if visualization:
        title = (f"{record['input']['relative_path']}: density {record['density']['percent']:.1f} % "
                 f"({record['density']['category']}), {record['lesions']['count']} lesion candidate(s)")
        atomic_write_bytes(paths["visualization"], make_visualization(prediction.image.pixels, result, threshold, title))
    seg_written = dicom_seg and prediction.image.source_format == "dicom" and write_dicom_seg_output(
        prediction, paths["dicom_seg"], threshold=threshold)
    written = {"visualization": visualization, "dicom_seg": seg_written}
    record["outputs"] = {k: (p.name if written.get(k, True) else None) for k, p in paths.items()}
    timings = record["timings_s"]
    timings["write"] = round(time.perf_counter() - start, 4)
    timings["total"] = round(timings.get("read", 0) + timings.get("cascade_total", 0) + timings.get("postprocess", 0)
                             + timings["write"], 4)
    write_json(paths["json"], record)
    return record


def write_dicom_seg_output(prediction: Prediction, path: Path, *, threshold: float) -> bool:
    """Write ``<stem>_seg.dcm`` of a DICOM input (``dicom_seg.write_dicom_seg``): the tissue classes and the lesion
    mask ``lesion_prob >= threshold`` on the source's pixel grid, the algorithm version naming both checkpoints.

    Like the PNGs, an existing file is replaced: :func:`write_outputs` has already refused to redo an image whose
    JSON exists, so a file here is left from an interrupted run. A source the SEG cannot be made for (a multi-frame
    image, a source highdicom refuses) costs only this file: the reason is added to the record's findings and input
    notes, and False is returned; the other outputs stand.
    """
    import dicom_seg  # highdicom is imported only when a DICOM input is written

    record, result = prediction.record, prediction.result
    identities = record.get("checkpoints", {})
    version = "stage1 {} stage2 {}".format(*(identities.get(f"stage{n}", {}).get("sha256_16", "?")[:12] for n in (1, 2)))
    try:
        dicom_seg.write_dicom_seg(prediction.image.path, result.tissue_classes, result.lesion_prob >= threshold, path,
                                  overwrite=True, threshold=threshold, algorithm_version=version)
    except ValueError as error:
        text = f"DICOM Segmentation not written: {error}"
        record["input"]["notes"].append(text)
        record["findings"].append(f"Warning: {text}.")
        return False
    return True


# ------------------------------------------------------------------------------------------------ folder tables
def _row(item: InputItem) -> dict:
    """One ``predictions.csv`` row (:data:`CSV_COLUMNS`) of an input; record cells stay empty when it has none."""
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


def free_name(path: Path, overwrite: bool) -> Path:
    """``path``; when it exists and ``overwrite`` is False, a free ``<stem>_<YYYYmmdd-HHMMSS>[_N]<suffix>`` beside it."""
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
