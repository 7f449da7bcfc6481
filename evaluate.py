"""Accuracy of the cascade against ground truth: tissue Dice / IoU / accuracy, lesion Dice / IoU and detection.

The command line only; the work is done in ``scoring.py`` (cases, ground truth, the two predictors, per-image rows,
summaries, the metric conventions) and ``evaluation_plots.py`` (the figures).

Predictions come either from a folder written by ``cascade_inference.py`` (``--predictions-dir``:
``<stem>_tissue_seg.png`` class indices 0..3, ``<stem>_cancer_prob.png`` lesion probability, ``<stem>.json`` with
the ROI box) or from running the cascade here (``--stage1-weights`` / ``--stage2-weights``, ``--backend torch`` or
``onnxruntime``) on the ground-truth images. Everything is compared at the image's original resolution.

Ground truth:
    tissue: ``--tissue-dir`` (DDSM tissue-label layout ``fgt_seg/`` + ``fgt_seg_labels/``) or ``--tissue-csv``
    (the workspace's ``tissue_dataset.csv``); lesion: ``--lesion-csv`` (``unified_segmentation_dataset.csv``) or
    ``--lesion-dir`` (``images/`` + ``masks/``; ``masks/<stem>.*`` or ``masks/<stem>_*.*``, merged by union; an image
    without a mask is lesion-free). ``--split`` keeps one split of a CSV.

Outputs in ``--output-dir``: ``metrics.json`` (summary, conventions, skipped items), ``per_image.csv`` (one row
per image and task) and ``plots/`` (per-class Dice distribution, worst cases with overlays).

Metrics (tissue per-class / macro / 4-channel Dice, IoU, pixel accuracy; lesion Dice / IoU, detection sensitivity
and false positives per image, ROI lesion coverage; DM and CM apart): see ``scoring.py``'s docstring and
``scoring.CONVENTIONS``, which ``metrics.json`` repeats.

Example::

    python evaluate.py --tissue-dir ../shared/data/tissue/train_valid --lesion-dir ../shared/data/lesion_cdd_cesm \\
        --stage1-weights checkpoints/stage1/best_stage1.pth --stage2-weights checkpoints/stage2/best_stage2.pth \\
        --backend onnxruntime --output-dir evaluation/
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import cli
import evaluation_plots
import fileio
import metrics
import scoring
import tables
import user_inputs


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """Command-line flags of the evaluation (see the module docstring)."""
    parser = argparse.ArgumentParser(description="Evaluate the cascade against tissue and lesion ground truth.",
                                     add_help=add_help, parents=[cli.runtime_parser("backend", "device", "threads", "tta")])
    # evaluation is reproducible on any machine (and comparable with RESULTS.md) unless a GPU or ONNX Runtime is asked
    # for: ONNX Runtime's logits differ from torch's by ~1e-6, enough to flip a thresholded pixel
    parser.set_defaults(device="cpu", backend="torch")
    # ground truth
    parser.add_argument("--tissue-dir", type=str, default=None,
                        help="DDSM tissue-label folder (fgt_seg/ + fgt_seg_labels/) (default: %(default)s)")
    parser.add_argument("--tissue-csv", type=str, default=None, help="workspace tissue_dataset.csv (default: %(default)s)")
    parser.add_argument("--lesion-csv", type=str, default=None,
                        help="workspace unified_segmentation_dataset.csv (default: %(default)s)")
    parser.add_argument("--lesion-dir", type=str, default=None,
                        help="lesion folder with images/ and masks/ (masks/<stem>.* or <stem>_*.*; no mask = "
                             "lesion-free) (default: %(default)s)")
    parser.add_argument("--split", type=str, default=None,
                        help="keep only this split of a CSV: train, val or test, in any case (default: all rows)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate at most this many images per task")
    # predictions
    parser.add_argument("--predictions-dir", type=str, default=None,
                        help="outputs of cascade_inference.py (<stem>_tissue_seg.png, <stem>_cancer_prob.png, <stem>.json)")
    parser.add_argument("--stage1-weights", type=str, default=None,
                        help="stage-1 checkpoint (.pth, or .onnx with --backend onnxruntime): run the cascade here")
    parser.add_argument("--stage2-weights", type=str, default=None, help="stage-2 checkpoint (.pth or .onnx)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last memory format (torch backend)")
    parser.add_argument("--adaptive-clahe", choices=("off", "on", "auto"), default="off",
                        help="stronger CLAHE for low-contrast images (default: %(default)s)")
    parser.add_argument("--export-onnx", type=str, default=None, metavar="DIR",
                        help="also export the given checkpoints to DIR/stage1.onnx and DIR/stage2.onnx")
    # metric settings
    parser.add_argument("--threshold", type=float, default=scoring.LESION_THRESHOLD,
                        help="lesion probability threshold (default: %(default)s)")
    parser.add_argument("--match-iou", type=float, default=metrics.LESION_MATCH_IOU,
                        help="IoU a predicted component needs with a lesion to detect it (default: %(default)s)")
    parser.add_argument("--min-lesion-area", type=int, default=scoring.MIN_LESION_AREA_PX,
                        help="true and predicted components under this many pixels are ignored in detection counts "
                             "(JPEG specks in thresholded masks); Dice and IoU use every pixel (default: %(default)s)")
    # outputs
    parser.add_argument("--output-dir", type=str, default=None, help="folder for metrics.json, per_image.csv, plots/")
    parser.add_argument("--worst-n", type=int, default=6, help="worst cases shown per task (default: %(default)s)")
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="skip the plots")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs in --output-dir")
    return parser


def main(args: argparse.Namespace) -> int:
    """Evaluate as the command line asks; returns 0 (done; skipped items listed), 1 (nothing evaluated) or 2 (usage)."""
    import pandas as pd

    try:
        _check_numbers(args)
        if args.split is not None:
            args.split = tables.normalise_split_name(args.split)
        if args.output_dir is not None:
            user_inputs.output_folder(args.output_dir, "--output-dir")
    except ValueError as error:
        return cli.usage_error(user_inputs.one_line(error))
    if args.export_onnx:
        import onnx_export

        if not (args.stage1_weights or args.stage2_weights):
            return cli.usage_error("--export-onnx needs --stage1-weights and/or --stage2-weights")
        try:
            user_inputs.output_folder(args.export_onnx, "--export-onnx")
            user_inputs.load_stage_pair(args.stage1_weights, args.stage2_weights)
            report = onnx_export.export_stages(args.stage1_weights, args.stage2_weights, args.export_onnx,
                                               overwrite=args.overwrite)
        except (FileNotFoundError, FileExistsError, ValueError) as error:
            return cli.usage_error(user_inputs.one_line(error))
        for name, item in report.items():
            print(f"exported {name}: {item['path']} (max |logit diff| vs PyTorch {item['max_abs_logit_diff']:.2e})")
        if not any((args.tissue_dir, args.tissue_csv, args.lesion_dir, args.lesion_csv)):
            return 0

    if args.tissue_dir and args.tissue_csv:
        return cli.usage_error("give --tissue-dir or --tissue-csv, not both")
    if args.lesion_dir and args.lesion_csv:
        return cli.usage_error("give --lesion-dir or --lesion-csv, not both")
    if not any((args.tissue_dir, args.tissue_csv, args.lesion_dir, args.lesion_csv)):
        return cli.usage_error("no ground truth: pass --tissue-dir/--tissue-csv and/or --lesion-dir/--lesion-csv")
    if bool(args.predictions_dir) == bool(args.stage1_weights):
        return cli.usage_error("pass either --predictions-dir or --stage1-weights (+ --stage2-weights), exactly one")
    if args.output_dir is None:
        return cli.usage_error("--output-dir is required")
    if not 0 < args.threshold < 1 or not 0 < args.match_iou <= 1:
        return cli.usage_error("--threshold must be in (0, 1) and --match-iou in (0, 1]")
    out = Path(args.output_dir)
    existing = [p for p in (out / "metrics.json", out / "per_image.csv") if p.exists()]
    if existing and not args.overwrite:
        return cli.usage_error(f"{existing[0]} exists; pass --overwrite or choose another --output-dir")

    if args.split and (args.tissue_dir or args.lesion_dir):
        print(f"note: --split {args.split} applies to CSV ground truth only; folders (--tissue-dir / --lesion-dir) "
              "are evaluated whole", file=sys.stderr)
    try:
        tissue = scoring.tissue_cases(args.tissue_dir, args.tissue_csv, args.split)
        lesion = scoring.lesion_cases(args.lesion_dir, args.lesion_csv, args.split)
    except (FileNotFoundError, ValueError) as error:
        return cli.usage_error(user_inputs.one_line(error))
    if args.limit is not None:
        tissue, lesion = tissue[: args.limit], lesion[: args.limit]
    try:
        if args.predictions_dir:
            predictor = scoring.FolderPredictions(args.predictions_dir)
        else:
            if lesion and not args.stage2_weights:
                return cli.usage_error("lesion ground truth given: pass --stage2-weights too (or --predictions-dir)")
            predictor = scoring.CascadePredictions(args.stage1_weights, args.stage2_weights, args.backend, args.device,
                                           args.tta, args.adaptive_clahe, args.channels_last, args.threads)
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        return cli.usage_error(user_inputs.one_line(error))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        from tqdm import tqdm

        def progress(items):
            return tqdm(items, desc="evaluating", unit="image", file=sys.stderr, disable=None)
    except ImportError:  # pragma: no cover - tqdm is a requirement
        progress = None

    skipped: list[dict] = []
    tissue_rows, confusion, tissue_thumbs = scoring.evaluate_tissue(tissue, predictor, args.worst_n, 384, skipped,
                                                                    progress)
    lesion_rows, lesion_thumbs = scoring.evaluate_lesion(lesion, predictor, args.threshold, args.match_iou,
                                                         args.min_lesion_area, args.worst_n, 384, skipped, progress)
    for item in skipped:
        print(f"skipped {item['task']} {item['image']}: {item['reason']}", file=sys.stderr)

    summary = {
        "evaluation": {
            "mode": "predictions_dir" if args.predictions_dir else "cascade",
            "predictions_dir": args.predictions_dir, "stage1_weights": args.stage1_weights,
            "stage2_weights": args.stage2_weights, "backend": None if args.predictions_dir else args.backend,
            "tta": args.tta, "adaptive_clahe": args.adaptive_clahe,
            "ground_truth": {"tissue": args.tissue_dir or args.tissue_csv, "lesion": args.lesion_dir or args.lesion_csv,
                             "split": args.split},
            "lesion_threshold": args.threshold, "match_iou": args.match_iou, "min_lesion_area_px": args.min_lesion_area,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        "conventions": {**scoring.CONVENTIONS, "lesion_threshold_value": args.threshold,
                        "match_iou_value": args.match_iou, "min_lesion_area_px_value": args.min_lesion_area},
        "skipped": skipped,
    }
    if isinstance(predictor, scoring.CascadePredictions) and predictor.seconds:
        summary["evaluation"]["seconds_per_image_mean"] = float(np.mean(predictor.seconds))
    if tissue:
        summary["tissue"] = scoring.summarize_tissue(tissue_rows, confusion)
    if lesion:
        summary["lesion"] = scoring.summarize_lesion_by_group(lesion_rows)

    rows = tissue_rows + lesion_rows
    out.mkdir(parents=True, exist_ok=True)
    fileio.atomic_write_text(out / "per_image.csv", pd.DataFrame(rows).to_csv(index=False) if rows else "task,stem\n")
    if args.plots and rows:
        plots = out / "plots"
        evaluation_plots.plot_dice_distribution(tissue_rows, lesion_rows, plots / "dice_distribution.png")
        if tissue_thumbs:
            evaluation_plots.plot_worst_cases(tissue_thumbs, args.worst_n, "tissue", plots / "worst_tissue.png")
        if lesion_thumbs:
            evaluation_plots.plot_worst_cases(lesion_thumbs, args.worst_n, "lesion", plots / "worst_lesion.png")
    fileio.atomic_write_text(out / "metrics.json", json.dumps(fileio.json_safe(summary), indent=2) + "\n")
    _print_summary(summary)
    if not rows:
        print("error: no image could be evaluated (see the skipped items above)", file=sys.stderr)
        return 1
    return 0


def _check_numbers(args: argparse.Namespace) -> None:
    """Refuse numbers outside their range (``user_inputs.UserInputError``, one line naming the flag)."""
    user_inputs.number(args.limit, "--limit", 1)
    user_inputs.number(args.worst_n, "--worst-n", 0)
    user_inputs.number(args.min_lesion_area, "--min-lesion-area", 0)
    user_inputs.number(args.threads, "--threads", 1)


def _print_summary(summary: dict) -> None:
    tissue = summary.get("tissue")
    if tissue and tissue.get("n_images"):
        mean, pooled = tissue["mean"], tissue["pooled"]
        print(f"tissue ({tissue['n_images']} images): 4-channel Dice {mean['dice_4channel']:.4f} "
              f"(pooled {pooled['dice_4channel']:.4f}), macro Dice {mean['macro_dice']:.4f}, "
              f"pixel accuracy {mean['pixel_accuracy']:.4f}")
        print("  per-class Dice: " + ", ".join(f"{n} {mean['dice_' + n]:.4f}" for n in scoring.TISSUE_CLASS_NAMES))
    for group, item in summary.get("lesion", {}).items():
        if item.get("n_images"):
            print(f"lesion [{group}] ({item['n_images']} images, {item['lesions']} lesions): Dice {item['dice_mean']:.4f} "
                  f"(pooled {item['dice_pooled']:.4f}), sensitivity {item['sensitivity']:.3f}, "
                  f"FP/image {item['false_positives_per_image']:.2f}, ROI coverage {item['roi_coverage_pooled']:.3f}")
    if summary["skipped"]:
        print(f"{len(summary['skipped'])} item(s) skipped (listed in metrics.json)")


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
