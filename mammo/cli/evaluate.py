"""Accuracy of the cascade against ground truth: tissue Dice / IoU / accuracy, lesion Dice / IoU and detection.

The command line only; the work is done in ``scoring.py`` (cases, ground truth, the two predictors, per-image rows,
summaries, the metric conventions) and ``plots.py`` (the figures).

Predictions come either from a folder written by ``cascade_inference.py`` (``--predictions-dir``:
``<stem>_tissue_seg.png`` class indices 0..3, ``<stem>_cancer_prob.png`` lesion probability, ``<stem>.json`` with
the ROI box) or from running the cascade here (``--stage1-weights`` / ``--stage2-weights``, ``--backend torch`` or
``onnxruntime``) on the ground-truth images. Everything is compared at the image's original resolution. Without
``--predictions-dir``, a stage given no ``--stageN-weights`` runs the shipped default model
``weights/stageN.safetensors`` (``release.py``; ``$MAMMO_WEIGHTS_DIR`` replaces the folder; stage 2 only when
lesion or CSAW-S ground truth is given), and a line says so. The lesion threshold and the smallest component counted are the
user's ``--threshold`` / ``--min-lesion-area``, else the stage-2 model's ``lesion_threshold`` / ``min_lesion_area``
when it carries them, else ``scoring.LESION_THRESHOLD`` / ``scoring.MIN_LESION_AREA_PX``.

Ground truth:
    tissue: ``--tissue-dir`` (DDSM tissue-label layout ``fgt_seg/`` + ``fgt_seg_labels/``) or ``--tissue-csv``
    (the workspace's ``tissue_dataset.csv``); lesion: ``--lesion-csv`` (``unified_segmentation_dataset.csv``) or
    ``--lesion-dir`` (``images/`` + ``masks/``; ``masks/<stem>.*`` or ``masks/<stem>_*.*``, merged by union; an image
    without a mask is lesion-free). ``--split`` keeps one split of a CSV.
    digital mammograms: ``--density-dir`` (VinDr layout ``images/<n>.jpg`` + ``masks/<n>.jpg`` dense-tissue masks,
    ``../shared/data/vindr_density_dev``) and ``--csaw-dir`` (CSAW-S layout ``images/<patient>_<view>.png`` +
    ``masks/<stem>_{cancer,pectoral_muscle,...}.png``, ``../shared/data/csaw_s_dev``; ``--csaw-patients 002,001``
    keeps those patients only). ``--exclude-patients`` leaves listed patients out of ``--lesion-dir`` and
    ``--csaw-dir`` (e.g. a workspace table: its train patients).

Outputs in ``--output-dir``: ``metrics.json`` (summary, conventions, skipped items; one section per task:
``tissue``, ``lesion``, ``density``, ``csaw``), ``per_image.csv`` (one row per image and task, its ``task`` column
says which) and ``plots/`` (per-class Dice distribution, worst cases with overlays, density scatter).

Metrics (tissue per-class / macro / 4-channel Dice, IoU, pixel accuracy; lesion Dice / IoU, detection sensitivity
and false positives per image, ROI lesion coverage, ROI box fraction (ROI box area / bounding box of the predicted
breast, adipose + FGT + pectoral) and ROI sources; DM and CM apart; density: FGT Dice, percent density against the
mask's (mask pixels / predicted adipose + FGT pixels, as ``../shared/FINDINGS.md`` measured it), absolute error,
Pearson r, and an Otsu baseline inside the predicted breast; CSAW-S: pectoral Dice on MLO views and the lesion
figures against the cancer mask): see ``scoring.py``'s docstring and ``scoring.CONVENTIONS``, which
``metrics.json`` repeats.

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

from mammo.cli import common
from mammo.core import fileio
from mammo.core import metrics
from mammo.weights import release
from mammo.evaluation import plots, scoring
from mammo.data import tables
from mammo.cascade import checks


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """Command-line flags of the evaluation (see the module docstring)."""
    parser = common.ArgumentParser(description="Evaluate the cascade against tissue and lesion ground truth.",
                                add_help=add_help, parents=[common.runtime_parser("backend", "device", "threads", "tta")])
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
    parser.add_argument("--density-dir", type=str, default=None,
                        help="dense-tissue folder: images/<n>.jpg + masks/<n>.jpg (VinDr layout, "
                             "../shared/data/vindr_density_dev): FGT Dice and percent density (default: %(default)s)")
    parser.add_argument("--csaw-dir", type=str, default=None,
                        help="CSAW-S folder: images/<patient>_<view>.png + masks/<stem>_{cancer,pectoral_muscle}.png: "
                             "pectoral Dice and lesion metrics (default: %(default)s)")
    parser.add_argument("--csaw-patients", type=str, default=None, metavar="ID[,ID...]",
                        help="keep only these CSAW-S patients, e.g. 002,001 (default: all)")
    parser.add_argument("--exclude-patients", type=str, default=None, metavar="FILE_OR_LIST",
                        help="leave these patients out of --lesion-dir and --csaw-dir: ids separated by commas, a text "
                             "file (one id a line) or a table with a patient_id column (a workspace table: its train "
                             "rows) (default: none)")
    parser.add_argument("--split", type=str, default=None,
                        help="keep only this split of a CSV: train, val or test, in any case (default: all rows)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate at most this many images per task")
    # predictions
    parser.add_argument("--predictions-dir", type=str, default=None,
                        help="outputs of cascade_inference.py (<stem>_tissue_seg.png, <stem>_cancer_prob.png, <stem>.json)")
    parser.add_argument("--stage1-weights", type=str, default=None,
                        help="stage-1 checkpoint (.pth, model file .safetensors, or .onnx with --backend onnxruntime): "
                             "run the cascade here (default without --predictions-dir: the shipped "
                             f"weights/stage1.safetensors, or the one in ${release.WEIGHTS_DIR_ENV})")
    parser.add_argument("--stage2-weights", type=str, default=None,
                        help="stage-2 checkpoint (.pth, .safetensors or .onnx) (default without --predictions-dir, "
                             "for lesion or CSAW-S ground truth: the shipped weights/stage2.safetensors)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last memory format (torch backend)")
    parser.add_argument("--adaptive-clahe", choices=("off", "on", "auto"), default="off",
                        help="stronger CLAHE for low-contrast images (default: %(default)s)")
    parser.add_argument("--export-onnx", type=str, default=None, metavar="DIR",
                        help="also export the given checkpoints to DIR/stage1.onnx and DIR/stage2.onnx")
    # metric settings
    parser.add_argument("--threshold", type=float, default=None,
                        help="lesion probability threshold (default: the stage-2 model's lesion_threshold when it "
                             f"carries one, else {scoring.LESION_THRESHOLD})")
    parser.add_argument("--match-iou", type=float, default=metrics.LESION_MATCH_IOU,
                        help="IoU a predicted component needs with a lesion to detect it (default: %(default)s)")
    parser.add_argument("--min-lesion-area", type=int, default=None,
                        help="true and predicted components under this many pixels are ignored in detection counts "
                             "(JPEG specks in thresholded masks); Dice and IoU use every pixel (default: the stage-2 "
                             f"model's min_lesion_area when it carries one, else {scoring.MIN_LESION_AREA_PX})")
    # outputs
    parser.add_argument("--output-dir", type=str, default=None, help="folder for metrics.json, per_image.csv, plots/")
    parser.add_argument("--worst-n", type=int, default=6, help="worst cases shown per task (default: %(default)s)")
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="skip the plots")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs in --output-dir")
    return parser


def main(args: argparse.Namespace | None = None) -> int:
    """Evaluate as the command line asks; returns 0 (done; skipped items listed), 1 (nothing evaluated) or 2 (usage)."""
    args = get_args_parser().parse_args() if args is None else args
    import pandas as pd

    try:
        _check_numbers(args)
        if args.split is not None:
            args.split = tables.normalise_split_name(args.split)
        if args.output_dir is not None:
            checks.output_folder(args.output_dir, "--output-dir")
    except ValueError as error:
        return common.usage_error(checks.one_line(error))
    if args.export_onnx:
        from mammo.weights import export

        if not (args.stage1_weights or args.stage2_weights):
            return common.usage_error("--export-onnx needs --stage1-weights and/or --stage2-weights")
        try:
            checks.output_folder(args.export_onnx, "--export-onnx")
            checks.load_stage_pair(args.stage1_weights, args.stage2_weights)
            report = export.export_stages(args.stage1_weights, args.stage2_weights, args.export_onnx,
                                               overwrite=args.overwrite)
        except (FileNotFoundError, FileExistsError, ValueError) as error:
            return common.usage_error(checks.one_line(error))
        for name, item in report.items():
            print(f"exported {name}: {item['path']} (max |logit diff| vs PyTorch {item['max_abs_logit_diff']:.2e})")
        if not _ground_truth_given(args):
            return 0

    if args.tissue_dir and args.tissue_csv:
        return common.usage_error("give --tissue-dir or --tissue-csv, not both")
    if args.lesion_dir and args.lesion_csv:
        return common.usage_error("give --lesion-dir or --lesion-csv, not both")
    if not _ground_truth_given(args):
        return common.usage_error("no ground truth: pass --tissue-dir/--tissue-csv, --lesion-dir/--lesion-csv, "
                               "--density-dir and/or --csaw-dir")
    if args.predictions_dir and args.stage1_weights:
        return common.usage_error("pass either --predictions-dir or --stage1-weights (+ --stage2-weights), not both")
    shipped = []
    if not args.predictions_dir and not args.stage1_weights:
        if not release.default_weights(1).is_file():
            return common.usage_error("pass --predictions-dir or --stage1-weights (+ --stage2-weights): "
                                   f"{release.missing_default_note(1)}")
        shipped.append(1)
    if args.output_dir is None:
        return common.usage_error("--output-dir is required")
    if (args.threshold is not None and not 0 < args.threshold < 1) or not 0 < args.match_iou <= 1:
        return common.usage_error("--threshold must be in (0, 1) and --match-iou in (0, 1]")
    out = Path(args.output_dir)
    existing = [p for p in (out / "metrics.json", out / "per_image.csv") if p.exists()]
    if existing and not args.overwrite:
        return common.usage_error(f"{existing[0]} exists; pass --overwrite or choose another --output-dir")

    if args.split and (args.tissue_dir or args.lesion_dir):
        print(f"note: --split {args.split} applies to CSV ground truth only; folders (--tissue-dir / --lesion-dir) "
              "are evaluated whole", file=sys.stderr)
    try:
        tissue = scoring.tissue_cases(args.tissue_dir, args.tissue_csv, args.split)
        lesion = scoring.lesion_cases(args.lesion_dir, args.lesion_csv, args.split)
        density = scoring.density_cases(args.density_dir)
        csaw = scoring.csaw_cases(args.csaw_dir, args.csaw_patients)
        excluded = _exclude_patients(args, lesion, csaw)
    except (FileNotFoundError, ValueError) as error:
        return common.usage_error(checks.one_line(error))
    if excluded is not None:
        lesion, csaw = excluded
    if args.limit is not None:
        tissue, lesion = tissue[: args.limit], lesion[: args.limit]
        density, csaw = density[: args.limit], csaw[: args.limit]
    try:
        if args.predictions_dir:
            predictor = scoring.FolderPredictions(args.predictions_dir)
        else:
            if (lesion or csaw) and not args.stage2_weights:
                if not release.default_weights(2).is_file():
                    flag = "lesion ground truth given" if lesion else "--csaw-dir scores lesions too"
                    return common.usage_error(f"{flag}: pass --stage2-weights too (or --predictions-dir); "
                                           f"{release.missing_default_note(2)}")
                shipped.append(2)
            for stage in shipped:
                path = release.default_weights(stage)
                print(release.default_weights_note(path, stage))
                setattr(args, f"stage{stage}_weights", str(path))
            predictor = scoring.CascadePredictions(args.stage1_weights, args.stage2_weights, args.backend, args.device,
                                           args.tta, args.adaptive_clahe, args.channels_last, args.threads)
        stage2 = predictor.cascade.stage2_checkpoint if isinstance(predictor, scoring.CascadePredictions) else None
        args.threshold, args.min_lesion_area, from_model = release.lesion_settings(
            stage2, args.threshold, args.min_lesion_area, default_threshold=scoring.LESION_THRESHOLD,
            default_min_area=scoring.MIN_LESION_AREA_PX)
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        return common.usage_error(checks.one_line(error))
    if from_model:
        if not 0 < args.threshold < 1:
            return common.usage_error(f"the stage-2 model's lesion_threshold {args.threshold:g} is not in (0, 1); pass "
                                   "--threshold")
        values = {"lesion_threshold": args.threshold, "min_lesion_area": args.min_lesion_area}
        print("using the stage-2 model's " + " and ".join(f"{key} {values[key]:g}" for key in from_model)
              + " (--threshold / --min-lesion-area override it)")
    if csaw and isinstance(predictor, scoring.CascadePredictions) and predictor.cascade.stage2 is None:
        return common.usage_error("--csaw-dir scores lesions too: pass --stage2-weights (or --predictions-dir)")
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
    density_rows = scoring.evaluate_density(density, predictor, skipped, progress)
    csaw_rows = scoring.evaluate_csaw(csaw, predictor, args.threshold, args.match_iou, args.min_lesion_area, skipped,
                                      progress)
    for item in skipped:
        print(f"skipped {item['task']} {item['image']}: {item['reason']}", file=sys.stderr)

    summary = {
        "evaluation": {
            "mode": "predictions_dir" if args.predictions_dir else "cascade",
            "predictions_dir": args.predictions_dir, "stage1_weights": args.stage1_weights,
            "stage2_weights": args.stage2_weights, "shipped_default_weights": [f"stage{s}" for s in shipped],
            "lesion_settings_from_model": from_model,
            "backend": None if args.predictions_dir else args.backend,
            "tta": args.tta, "adaptive_clahe": args.adaptive_clahe,
            "ground_truth": {"tissue": args.tissue_dir or args.tissue_csv, "lesion": args.lesion_dir or args.lesion_csv,
                             "split": args.split, "density": args.density_dir, "csaw": args.csaw_dir,
                             "csaw_patients": args.csaw_patients, "exclude_patients": args.exclude_patients},
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
    if density:
        summary["density"] = scoring.summarize_density(density_rows)
    if csaw:
        summary["csaw"] = scoring.summarize_csaw(csaw_rows)

    rows = tissue_rows + lesion_rows + density_rows + csaw_rows
    out.mkdir(parents=True, exist_ok=True)
    fileio.atomic_write_text(out / "per_image.csv", pd.DataFrame(rows).to_csv(index=False) if rows else "task,stem\n")
    if args.plots and rows:
        plot_dir = out / "plots"
        if tissue_rows or lesion_rows:
            plots.plot_dice_distribution(tissue_rows, lesion_rows, plot_dir / "dice_distribution.png")
        if density_rows:
            plots.plot_density_scatter(density_rows, plot_dir / "density_scatter.png")
        if tissue_thumbs:
            plots.plot_worst_cases(tissue_thumbs, args.worst_n, "tissue", plot_dir / "worst_tissue.png")
        if lesion_thumbs:
            plots.plot_worst_cases(lesion_thumbs, args.worst_n, "lesion", plot_dir / "worst_lesion.png")
    fileio.atomic_write_text(out / "metrics.json", json.dumps(fileio.json_safe(summary), indent=2) + "\n")
    _print_summary(summary)
    if not rows:
        print("error: no image could be evaluated (see the skipped items above)", file=sys.stderr)
        return 1
    return 0


def _check_numbers(args: argparse.Namespace) -> None:
    """Refuse numbers outside their range (``checks.UserInputError``, one line naming the flag)."""
    checks.number(args.limit, "--limit", 1)
    checks.number(args.worst_n, "--worst-n", 0)
    checks.number(args.min_lesion_area, "--min-lesion-area", 0)
    checks.number(args.threads, "--threads", 1)


def _print_summary(summary: dict) -> None:
    tissue = summary.get("tissue")
    if tissue and tissue.get("n_images"):
        mean, pooled = tissue["mean"], tissue["pooled"]
        print(f"tissue ({tissue['n_images']} images): 4-channel Dice {mean['dice_4channel']:.4f} "
              f"(pooled {pooled['dice_4channel']:.4f}), macro Dice {mean['macro_dice']:.4f}, "
              f"pixel accuracy {mean['pixel_accuracy']:.4f}")
        print("  per-class Dice: " + ", ".join(f"{n} {mean['dice_' + n]:.4f}" for n in scoring.TISSUE_CLASS_NAMES))
    lesion = {group: item for group, item in summary.get("lesion", {}).items() if item.get("n_images")}
    if lesion:
        _print_table("lesion", *_lesion_table(lesion))
    density = summary.get("density")
    if density and density.get("n_images"):
        header = ["", "FGT Dice mean", "sd", "pooled", "density %", "|error| pts", "Pearson r"]
        body = [[name, *(_number(density[key][k], digits) for k, digits in (
            ("fgt_dice_mean", 3), ("fgt_dice_std", 3), ("fgt_dice_pooled", 3), ("percent_density_mean", 1),
            ("density_abs_error_mean", 1), ("density_pearson_r", 3)))] for name, key in (
                ("model FGT", "model"), ("model dense", "model_dense_pixels"), ("Otsu", "otsu_baseline"))
                if key in density]
        body.append(["mask", "", "", "", _number(density["percent_density_mask_mean"], 1), "", ""])
        _print_table(f"density ({density['n_images']} images, {density['density_images']} with a predicted breast)",
                     header, body)
    csaw = summary.get("csaw")
    if csaw and csaw.get("n_images"):
        pectoral = csaw["pectoral"]
        print(f"csaw ({csaw['n_images']} images, patients {', '.join(csaw['patients'])}): pectoral Dice "
              f"{_number(pectoral['dice_mean'], 3)} (sd {_number(pectoral['dice_std'], 3)}, pooled "
              f"{_number(pectoral['dice_pooled'], 3)}, {pectoral['n_images']} MLO images)")
        _print_table("csaw lesion", *_lesion_table({"all": csaw["lesion"]}))
    if summary["skipped"]:
        print(f"{len(summary['skipped'])} item(s) skipped (listed in metrics.json)")



def _ground_truth_given(args: argparse.Namespace) -> bool:
    """Whether any ground truth flag was given."""
    return any((args.tissue_dir, args.tissue_csv, args.lesion_dir, args.lesion_csv, args.density_dir, args.csaw_dir))


def _exclude_patients(args: argparse.Namespace, lesion: list, csaw: list) -> tuple[list, list] | None:
    """``(lesion, csaw)`` cases without the ``--exclude-patients`` (folders only: a ``--lesion-csv`` is filtered by
    ``--split``); None when the flag is not given. Prints how many images were left out."""
    if not args.exclude_patients:
        return None
    patients = scoring.read_patient_list(args.exclude_patients)
    if args.lesion_csv:
        print("note: --exclude-patients applies to --lesion-dir and --csaw-dir; filter a --lesion-csv with --split",
              file=sys.stderr)
    else:
        lesion, dropped = scoring.exclude_patients(lesion, patients)
        if args.lesion_dir:
            print(f"--exclude-patients: {dropped} lesion image(s) left out", file=sys.stderr)
    csaw, dropped = scoring.exclude_patients(csaw, patients)
    if args.csaw_dir:
        print(f"--exclude-patients: {dropped} CSAW-S image(s) left out", file=sys.stderr)
    return lesion, csaw


def _number(value, digits: int) -> str:
    """A figure for the console tables: ``digits`` decimals, "-" for a missing (None / NaN) value."""
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return f"{value:.{digits}f}"


def _lesion_table(groups: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the lesion table: one row per group summary (``scoring.summarize_lesion``)."""
    header = ["group", "images", "lesions", "Dice", "pooled", "sens", "FP/img", "ROI cov", "pooled", "ROI box",
              "pooled", "src fgt/breast/image"]
    body = []
    for group, item in groups.items():
        sources = item.get("roi_sources", {})
        body.append([group, str(item["n_images"]), str(item["lesions"]), _number(item["dice_mean"], 3),
                     _number(item["dice_pooled"], 3), _number(item["sensitivity"], 3),
                     _number(item["false_positives_per_image"], 2), _number(item["roi_coverage_mean"], 3),
                     _number(item["roi_coverage_pooled"], 3), _number(item.get("roi_box_fraction_mean"), 3),
                     _number(item.get("roi_box_fraction_pooled"), 3),
                     "/".join(str(sources.get(k, 0)) for k in ("fgt", "breast", "image"))])
    return header, body


def _print_table(title: str, header: list[str], body: list[list[str]]) -> None:
    """Print ``title`` and a column-aligned table."""
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    print(f"{title}:")
    for row in [header, *body]:
        print("  " + "  ".join(cell.rjust(width) if i else cell.ljust(width)
                               for i, (cell, width) in enumerate(zip(row, widths))))


if __name__ == "__main__":
    sys.exit(main())
