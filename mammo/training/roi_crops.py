"""Stage-2 training crops made by the trained stage 1, and their cache.

Stage 2 learns lesions on the crops that the trained stage 1 gives: every lesion image goes through
``cascade.Cascade.tissue_and_roi`` (the code inference runs: preprocessing, orientation normalisation, stage 1, the
FGT box with its margin), the preprocessed image and its (equally mirrored) lesion mask are cut to that box, and the
crops are cached under ``<stage2-checkpoint-dir>/roi_crops/<key>/`` (:func:`crop_cache_key` hashes the stage-1
checkpoint file, its preprocessing config and input size, the ROI margin and the lesion files, so a new stage 1 gives
new crops). The stage-1 network comes from ``runners.load_runner``, like every other user of a checkpoint.

Cache folder: ``images/*.png`` (8-bit preprocessed crops), ``masks/*_mask.png`` (0/255), ``crop_report.json`` (rows
cropped, rows skipped with the reason) and ``crops.csv`` (written last: its presence marks the cache complete).
:func:`build_roi_crops` makes or reuses it (each process crops its share, :func:`_crop_share` / :func:`_write_crop`;
rank 0 merges, :func:`_merge_shares`); :func:`roi_coverage` measures how much of the lesions the ROI keeps. Used by
``mammo/training/trainer.py`` for stage 2.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from mammo import cascade
from mammo.weights import checkpoints
from mammo.data import splits
from mammo.core import distributed
from mammo import imaging
from mammo.imaging import roi
from mammo.weights import runners
from mammo.core.fileio import atomic_write_text, file_sha256

#: Version of the ROI-crop cache layout; part of the cache key (bump when the crop files change meaning).
CROP_CACHE_VERSION = 1


class RoiCropError(ValueError):
    """No crops can be made: the checkpoint is not a stage-1 one, or no row could be read (the message says why)."""


def _read_merged_mask(cell: str, shape: tuple[int, int]) -> np.ndarray:
    """The union of the binary masks named in ``cell`` (paths joined by ``splits.MASK_PATH_SEPARATOR``) as an
    ``(H, W)`` uint8 0/1 array of ``shape`` (all zero for an empty cell); ValueError on a mask of another shape."""
    mask = np.zeros(shape, np.uint8)
    for path in (p for p in str(cell).split(splits.MASK_PATH_SEPARATOR) if p.strip()):
        part = imaging.read_mask(path, kind="binary")
        if part.shape != shape:
            raise ValueError(f"mask {path!r} has shape {part.shape} but its image has {shape}")
        mask |= part
    return mask


def crop_cache_key(stage1_sha256: str, stage1_checkpoint: dict, rule: roi.RoiRule, table: pd.DataFrame) -> str:
    """16-hex-digit key of a ROI-crop cache: stage-1 file, preprocessing, input size, ROI rule and lesion files.

    A rule with only the first rule's settings (``RoiRule(margin_fraction=m)``) gives the key caches made before
    :class:`roi.RoiRule` existed, so they are reused."""
    files = []
    for image, masks in zip(table["image_file_path"], table["roi_mask_file_path"]):
        for path in [image] + [p for p in str(masks).split(splits.MASK_PATH_SEPARATOR) if p.strip()]:
            stat = os.stat(path) if os.path.exists(path) else None
            files.append([str(path), stat.st_size if stat else -1, stat.st_mtime_ns if stat else -1])
    material = {
        "version": CROP_CACHE_VERSION,
        "stage1_sha256": stage1_sha256,
        "preprocess_config": stage1_checkpoint["preprocess_config"],
        "input_size": list(stage1_checkpoint["input_size"]),
        "margin_fraction": float(rule.margin_fraction),
        "min_side": int(rule.min_side),
        "files": files,
    }
    extra = {k: v for k, v in rule.to_dict().items() if k not in ("margin_fraction", "min_side")}
    if extra != {k: v for k, v in roi.RoiRule().to_dict().items() if k in extra}:
        material["rule"] = extra
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]


def build_roi_crops(stage1_path: Path, table: pd.DataFrame, cache_root: Path, rule: roi.RoiRule,
                    device: torch.device, ctx: distributed.DistContext) -> tuple[pd.DataFrame, dict]:
    """Make (or reuse) the stage-2 training crops: stage 1 -> FGT ROI -> crop of image and mask.

    For every row of ``table`` (a lesion table from ``splits.read_lesion_table``): read the image and the union of
    its masks, run ``cascade.Cascade(stage-1 checkpoint).tissue_and_roi`` with the stage-1 network from
    ``runners.load_runner`` (preprocessing + orientation normalisation + stage 1 + ``fgt_roi_box`` with ``rule``),
    mirror the mask like the image, cut both to the ROI box and write them as PNGs (image 8-bit preprocessed, mask
    0/255). Under torchrun each process crops its share of the rows; rank 0 merges. Rows that cannot be read are
    skipped and listed in ``crop_report.json``.

    Args:
        stage1_path: stage-1 checkpoint file.
        table: lesion table (absolute paths), all rows to crop.
        cache_root: ``<stage2-checkpoint-dir>/roi_crops``; the crops go to ``<cache_root>/<key>/``.
        rule: the ROI rule (``roi.RoiRule``).
        device: where stage 1 runs.
        ctx: distributed context.

    Returns:
        ``(crops, info)``: the crop table (``splits.read_lesion_table`` of ``crops.csv``: the lesion table's
        columns with crop paths, plus ``original_image_file_path``, ``roi_y0/x0/y1/x1``, ``roi_source``, ``flipped``,
        ``stage1_confidence``, ``lesion_pixels_inside``, ``lesion_pixels_total``) and ``info`` (``key``, ``folder``,
        ``reused``, ``skipped``, ``stage1_sha256``).

    Raises:
        RoiCropError: the file is not a stage-1 checkpoint, or no row could be cropped.
        FileNotFoundError, ValueError: the checkpoint file is missing or unreadable (``checkpoints.load_checkpoint``).
    """
    checkpoint = checkpoints.load_checkpoint(stage1_path)
    if int(checkpoint["stage"]) != 1:
        raise RoiCropError(f"{stage1_path} is a stage-{checkpoint['stage']} checkpoint; stage-2 crops need a "
                           "stage-1 checkpoint (--stage1-checkpoint)")
    sha = file_sha256(stage1_path)
    key = crop_cache_key(sha, checkpoint, rule, table)
    folder = cache_root / key
    crops_csv = folder / "crops.csv"
    info = {"key": key, "folder": str(folder), "reused": crops_csv.is_file(), "skipped": [], "stage1_sha256": sha}
    if not info["reused"]:
        stage1_runner, _ = runners.load_runner(stage1_path, "torch", device)
        runner = cascade.Cascade(checkpoint, None, stage1_runner=stage1_runner, roi_rule=rule)
        rows, skipped = _crop_share(runner, table, folder, ctx)
        atomic_write_text(folder / f".part{ctx.rank}.json", json.dumps({"rows": rows, "skipped": skipped}))
        distributed.barrier(ctx)
        if ctx.is_main:
            report = {"key": key, "stage1_checkpoint": str(stage1_path), "stage1_sha256": sha,
                      "roi_rule": rule.to_dict()}
            _merge_shares(folder, ctx.world_size, report)
        distributed.barrier(ctx)
    report_path = folder / "crop_report.json"
    if report_path.is_file():
        info["skipped"] = json.loads(report_path.read_text(encoding="utf-8"))["skipped"]
    if not crops_csv.is_file():
        raise RoiCropError(f"no lesion image could be cropped ({len(info['skipped'])} skipped; reasons in "
                           f"{report_path}); check --cancer-csv")
    return splits.read_lesion_table(crops_csv), info


def _crop_share(runner: cascade.Cascade, table: pd.DataFrame, folder: Path,
                ctx: distributed.DistContext) -> tuple[list[dict], list[dict]]:
    """Crop this process's rows of ``table`` (every ``world_size``-th from ``rank``) into ``folder``; returns
    ``(rows, skipped)``: one crop-table row per cropped image, ``{"row", "image_file_path", "reason"}`` per row that
    could not be read (the image, a mask, or stage 1 on it)."""
    rows, skipped = [], []
    mine = range(ctx.rank, len(table), ctx.world_size)
    for i in tqdm(mine, desc="stage-2 ROI crops", disable=None if ctx.is_main else True, leave=False):
        record = table.iloc[i].to_dict()
        try:
            pixels = imaging.read_image(record["image_file_path"]).pixels
            mask = _read_merged_mask(record["roi_mask_file_path"], pixels.shape)
            found = runner.tissue_and_roi(pixels, name=Path(record["image_file_path"]).name,
                                          view_position=record.get("view") or None)
        except (imaging.ImageReadError, ValueError, OSError) as error:
            skipped.append({"row": int(i), "image_file_path": record["image_file_path"], "reason": str(error)})
            continue
        rows.append(_write_crop(folder, int(i), record, found, mask))
    return rows, skipped


def _write_crop(folder: Path, i: int, record: dict, found, mask: np.ndarray) -> dict:
    """Write row ``i``'s crop (``images/{i:05d}_<stem>.png``, the preprocessed 8-bit image in the ROI box) and, when
    the row names masks, its mask crop (``masks/{i:05d}_<stem>_mask.png``, 0/255) under ``folder``; ``found`` is
    ``Cascade.tissue_and_roi``'s result and ``mask`` the ``(H, W)`` 0/1 union of the row's masks (brought into the
    image's preprocessed frame here: working scale and mirror). Returns the crop-table row (paths relative to
    ``folder``)."""
    mask = np.ascontiguousarray(found.pre.to_working(mask, "nearest"))  # the preprocessed frame (scale, mirror)
    box = found.roi_box
    stem = Path(record["image_file_path"]).stem
    image_rel = f"images/{i:05d}_{stem}.png"
    imaging.write_png(folder / image_rel, np.ascontiguousarray(found.image[box.slices()]))
    mask_rel = ""
    if str(record["roi_mask_file_path"]).strip():
        mask_rel = f"masks/{i:05d}_{stem}_mask.png"
        imaging.write_png(folder / mask_rel, (mask[box.slices()] * 255).astype(np.uint8))
    return {**record, "row": i, "original_image_file_path": record["image_file_path"],
            "original_roi_mask_file_path": record["roi_mask_file_path"],
            "image_file_path": image_rel, "roi_mask_file_path": mask_rel,
            "roi_y0": box.y0, "roi_x0": box.x0, "roi_y1": box.y1, "roi_x1": box.x1,
            "roi_source": found.roi_source, "flipped": bool(found.flipped),
            "stage1_confidence": float(found.confidence),
            "lesion_pixels_inside": int(mask[box.slices()].sum()), "lesion_pixels_total": int(mask.sum())}


def _merge_shares(folder: Path, world_size: int, report: dict) -> None:
    """Rank 0: merge the processes' ``.part{rank}.json`` files into ``crop_report.json`` (``report`` plus the row
    count and the skipped rows) and ``crops.csv`` (written last, only when some row was cropped: it marks the cache
    complete), then delete the parts."""
    rows, skipped = [], []
    for rank in range(world_size):
        piece = json.loads((folder / f".part{rank}.json").read_text(encoding="utf-8"))
        rows += piece["rows"]
        skipped += piece["skipped"]
    rows.sort(key=lambda r: r["row"])
    skipped.sort(key=lambda r: r["row"])
    report = {**report, "rows": len(rows), "skipped": skipped}
    atomic_write_text(folder / "crop_report.json", json.dumps(report, indent=2))
    if rows:
        frame = pd.DataFrame(rows).drop(columns=["row"])
        atomic_write_text(folder / "crops.csv", frame.to_csv(index=False))  # written last: marks the cache complete
    for rank in range(world_size):
        (folder / f".part{rank}.json").unlink(missing_ok=True)


def roi_coverage(table: pd.DataFrame) -> float:
    """Share of lesion pixels inside the ROI boxes: sum(inside) / sum(total) over the table (NaN without lesions)."""
    total = float(pd.to_numeric(table["lesion_pixels_total"]).sum())
    return float(pd.to_numeric(table["lesion_pixels_inside"]).sum()) / total if total > 0 else float("nan")
