"""Accuracy of the cascade against ground truth: tissue Dice / IoU / accuracy, lesion Dice / IoU and detection.

The command line only; the work is done in ``mammo/evaluation/``: ``cases.py`` (cases, ground truth, patient
filters), ``predictors.py`` (the two predictors), ``scores.py`` (per-image rows, summaries, the metric conventions)
and ``plots.py`` (the figures).

Predictions come either from a folder written by ``cascade_inference.py`` (``--predictions-dir``:
``<stem>_tissue_seg.png`` class indices 0..3, ``<stem>_cancer_prob.png`` lesion probability, ``<stem>.json`` with
the ROI box) or from running the cascade here (``--stage1-weights`` / ``--stage2-weights``, ``--backend torch`` or
``onnxruntime``) on the ground-truth images. Everything is compared at the image's original resolution. Without
``--predictions-dir``, a stage given no ``--stageN-weights`` runs the shipped default model
``weights/stageN.safetensors`` (``release.py``; ``$MAMMO_WEIGHTS_DIR`` replaces the folder; stage 2 only when
lesion or CSAW-S ground truth is given), and a line says so. The lesion threshold and the smallest component counted
are the user's ``--threshold`` / ``--min-lesion-area``, else the stage-2 model's ``lesion_threshold`` /
``min_lesion_area`` when it carries them, else 0.5 and 1 pixel (``release.resolve_lesion_settings``: one rule and one
range for every script).

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
figures against the cancer mask): see ``scores.py``'s docstring and ``scores.CONVENTIONS``, which
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mammo.cli import common
from mammo.core import fileio
from mammo.core import metrics
from mammo.weights import release
from mammo.evaluation import cases, plots, predictors, scores
from mammo.data import tables
from mammo.cascade import checks


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """Command-line flags of the evaluation (see the module docstring)."""
    parser = common.ArgumentParser(description="Evaluate the cascade against tissue and lesion ground truth.",
                                   add_help=add_help,
                                   parents=[common.runtime_parser("backend", "device", "threads", "tta")])
    # evaluation is reproducible on any machine (and comparable with RESULTS.md) unless a GPU or ONNX Runtime is asked
    # for: ONNX Runtime's logits differ from torch's by ~1e-6, enough to flip a thresholded pixel
    parser.set_defaults(device="cpu", backend="torch")
    # ground truth
    parser.add_argument("--tissue-dir", type=str, default=None,
                        help="DDSM tissue-label folder (fgt_seg/ + fgt_seg_labels/) (default: %(default)s)")
    parser.add_argument("--tissue-csv", type=str, default=None,
                        help="workspace tissue_dataset.csv (default: %(default)s)")
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
                        help="outputs of cascade_inference.py (<stem>_tissue_seg.png, <stem>_cancer_prob.png, "
                             "<stem>.json)")
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
    parser.add_argument("--no-anatomy", dest="anatomy", action="store_false",
                        help="score stage 1's own map, without the anatomy rules (to measure what they add)")
    parser.add_argument("--export-onnx", type=str, default=None, metavar="DIR",
                        help="also export the given checkpoints to DIR/stage1.onnx and DIR/stage2.onnx")
    # metric settings
    parser.add_argument("--threshold", type=common.probability, default=None,
                        help="lesion probability threshold in (0, 1) (default: the stage-2 model's lesion_threshold "
                             f"when it carries one, else {release.DEFAULT_LESION_THRESHOLD})")
    parser.add_argument("--match-iou", type=float, default=metrics.LESION_MATCH_IOU,
                        help="IoU a predicted component needs with a lesion to detect it (default: %(default)s)")
    parser.add_argument("--min-lesion-area", type=common.positive_int, default=None,
                        help="true and predicted components under this many pixels are ignored in detection counts "
                             "(e.g. 10 for the JPEG specks of CDD-CESM masks); Dice and IoU use every pixel (default: "
                             "the stage-2 model's min_lesion_area when it carries one, else "
                             f"{release.DEFAULT_MIN_LESION_AREA_PX})")
    # outputs
    parser.add_argument("--output-dir", type=str, default=None, help="folder for metrics.json, per_image.csv, plots/")
    parser.add_argument("--worst-n", type=int, default=6, help="worst cases shown per task (default: %(default)s)")
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="skip the plots")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs in --output-dir")
    return parser


class _Refused(Exception):
    """A usage error found while checking the flags or preparing the run: ``main`` prints ``error: <message>`` and
    returns 2 (not a ValueError, so that no ``except ValueError`` on the way swallows it)."""


@dataclass(frozen=True)
class _Cases:
    """The ground truth of each task (empty lists for the tasks not asked for)."""

    tissue: list
    lesion: list
    density: list
    csaw: list


@dataclass
class _Results:
    """What the tasks produced: per-image rows, the tissue confusion matrix (4, 4), the worst-case thumbnails and the
    skipped items."""

    tissue_rows: list
    confusion: np.ndarray
    tissue_thumbs: list
    lesion_rows: list
    lesion_thumbs: list
    density_rows: list
    csaw_rows: list
    skipped: list

    @property
    def rows(self) -> list[dict]:
        """Every per-image row, task by task (the rows of ``per_image.csv``)."""
        return self.tissue_rows + self.lesion_rows + self.density_rows + self.csaw_rows


@common.interruptible("evaluate.py", "it does not resume: run it again (with --overwrite if it had written "
                       "metrics.json or per_image.csv)")
def main(args: argparse.Namespace | None = None) -> int:
    """Evaluate as the command line asks; returns 0 (done; skipped items listed), 1 (nothing evaluated) or 2 (usage)."""
    args = get_args_parser().parse_args() if args is None else args
    try:
        _check_values(args)
        if args.export_onnx and _export_onnx(args):
            return 0
        shipped = _check_flags(args)
        found = _read_cases(args)
        predictor, from_model = _build_predictor(args, found, shipped)
    except _Refused as refusal:
        return common.usage_error(str(refusal))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    results = _run_tasks(args, found, predictor)
    summary = _summary(args, found, results, predictor, shipped, from_model)
    return _write_outputs(args, results, summary)


def _check_values(args: argparse.Namespace) -> None:
    """Numbers in range, ``--split`` normalised (``args.split`` rewritten), ``--output-dir`` a folder that can be
    written (``checks.writable_folder``), before any model loads.

    Raises:
        _Refused: one line naming the flag.
    """
    try:
        _check_numbers(args)
        if args.split is not None:
            args.split = tables.normalise_split_name(args.split)
        if args.output_dir is not None:
            checks.writable_folder(args.output_dir, "--output-dir")
    except ValueError as error:
        raise _Refused(checks.one_line(error)) from None


def _export_onnx(args: argparse.Namespace) -> bool:
    """``--export-onnx``: both stages' checkpoints to ONNX files, one line printed per file written.

    Returns:
        True when nothing else is asked (no ground truth given): the run ends here with 0.

    Raises:
        _Refused: no checkpoint given, an unusable folder or checkpoint, or a file that exists.
    """
    from mammo.weights import export

    if not (args.stage1_weights or args.stage2_weights):
        raise _Refused("--export-onnx needs --stage1-weights and/or --stage2-weights")
    try:
        checks.writable_folder(args.export_onnx, "--export-onnx")
        checks.load_stage_pair(args.stage1_weights, args.stage2_weights)
        report = export.export_stages(args.stage1_weights, args.stage2_weights, args.export_onnx,
                                      overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        raise _Refused(checks.one_line(error)) from None
    for name, item in report.items():
        print(f"exported {name}: {item['path']} (max |logit diff| vs PyTorch {item['max_abs_logit_diff']:.2e})")
    return not _ground_truth_given(args)


def _check_flags(args: argparse.Namespace) -> list[int]:
    """The flags checked against each other, before any file is read.

    Returns:
        The stages that will run the shipped default model (``[1]`` when neither ``--predictions-dir`` nor
        ``--stage1-weights`` is given, else ``[]``; stage 2 is added by :func:`_cascade_predictor`).

    Raises:
        _Refused: conflicting or missing flags, a threshold out of range, outputs that exist without ``--overwrite``.
    """
    if args.tissue_dir and args.tissue_csv:
        raise _Refused("give --tissue-dir or --tissue-csv, not both")
    if args.lesion_dir and args.lesion_csv:
        raise _Refused("give --lesion-dir or --lesion-csv, not both")
    if not _ground_truth_given(args):
        raise _Refused("no ground truth: pass --tissue-dir/--tissue-csv, --lesion-dir/--lesion-csv, "
                       "--density-dir and/or --csaw-dir")
    if args.predictions_dir and args.stage1_weights:
        raise _Refused("pass either --predictions-dir or --stage1-weights (+ --stage2-weights), not both")
    shipped = []
    if not args.predictions_dir and not args.stage1_weights:
        if not release.default_weights(1).is_file():
            raise _Refused("pass --predictions-dir or --stage1-weights (+ --stage2-weights): "
                           f"{release.missing_default_note(1)}")
        shipped.append(1)
    if args.output_dir is None:
        raise _Refused("--output-dir is required")
    if not 0 < args.match_iou <= 1:
        raise _Refused("--match-iou must be in (0, 1]")
    out = Path(args.output_dir)
    existing = [p for p in (out / "metrics.json", out / "per_image.csv") if p.exists()]
    if existing and not args.overwrite:
        raise _Refused(f"{existing[0]} exists; pass --overwrite or choose another --output-dir")
    return shipped


def _read_cases(args: argparse.Namespace) -> _Cases:
    """The ground truth of every task asked for, without ``--exclude-patients`` and cut to ``--limit``.

    Raises:
        _Refused: a folder or table that cannot be used (the readers' one-line message).
    """
    if args.split and (args.tissue_dir or args.lesion_dir):
        print(f"note: --split {args.split} applies to CSV ground truth only; folders (--tissue-dir / --lesion-dir) "
              "are evaluated whole", file=sys.stderr)
    try:
        tissue = cases.tissue_cases(args.tissue_dir, args.tissue_csv, args.split)
        lesion = cases.lesion_cases(args.lesion_dir, args.lesion_csv, args.split)
        density = cases.density_cases(args.density_dir)
        csaw = cases.csaw_cases(args.csaw_dir, args.csaw_patients)
        excluded = _exclude_patients(args, lesion, csaw)
    except (FileNotFoundError, ValueError) as error:
        raise _Refused(checks.one_line(error)) from None
    if excluded is not None:
        lesion, csaw = excluded
    if args.limit is not None:
        tissue, lesion = tissue[: args.limit], lesion[: args.limit]
        density, csaw = density[: args.limit], csaw[: args.limit]
    return _Cases(tissue, lesion, density, csaw)


def _build_predictor(args: argparse.Namespace, found: _Cases, shipped: list[int]):
    """The predictor (a folder of predictions, or the cascade run here) and the lesion settings of the run.

    ``args.threshold`` / ``args.min_lesion_area`` are set to the values used (the user's, else the stage-2 model's,
    else the defaults); ``args.stageN_weights`` to the shipped model's path where that runs (appended to
    ``shipped``).

    Returns:
        ``(predictor, from_model)``: ``from_model`` names the lesion settings taken from the stage-2 model.

    Raises:
        _Refused: an unusable predictions folder or checkpoint, a bad model setting, no stage 2 for lesions.
    """
    try:
        if args.predictions_dir:
            predictor = predictors.FolderPredictions(args.predictions_dir)
        else:
            predictor = _cascade_predictor(args, bool(found.lesion or found.csaw), bool(found.lesion), shipped)
        stage2 = predictor.cascade.stage2_checkpoint if isinstance(predictor, predictors.CascadePredictions) else None
        lesion = release.resolve_lesion_settings(stage2, args.threshold, args.min_lesion_area)
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        raise _Refused(checks.one_line(error)) from None
    args.threshold, args.min_lesion_area, from_model = lesion.threshold, lesion.min_area_px, list(lesion.from_model)
    if from_model:
        values = {"lesion_threshold": args.threshold, "min_lesion_area": args.min_lesion_area}
        print("using the stage-2 model's " + " and ".join(f"{key} {values[key]:g}" for key in from_model)
              + " (--threshold / --min-lesion-area override it)")
    if found.csaw and isinstance(predictor, predictors.CascadePredictions) and predictor.cascade.stage2 is None:
        raise _Refused("--csaw-dir scores lesions too: pass --stage2-weights (or --predictions-dir)")
    return predictor, from_model


def _cascade_predictor(args: argparse.Namespace, needs_stage2: bool, lesion_given: bool,
                       shipped: list[int]) -> predictors.CascadePredictions:
    """The cascade run here: the given checkpoints, and the shipped default model for a stage given none (stage 2
    only when lesions are scored, ``needs_stage2``); a line is printed per shipped model used and its stage is
    appended to ``shipped``.

    Raises:
        _Refused: stage 2 is needed, not given, and not shipped. Loading errors as
            :class:`predictors.CascadePredictions`.
    """
    if needs_stage2 and not args.stage2_weights:
        if not release.default_weights(2).is_file():
            flag = "lesion ground truth given" if lesion_given else "--csaw-dir scores lesions too"
            raise _Refused(f"{flag}: pass --stage2-weights too (or --predictions-dir); "
                           f"{release.missing_default_note(2)}")
        shipped.append(2)
    for stage in shipped:
        path = release.default_weights(stage)
        print(release.default_weights_note(path, stage))
        setattr(args, f"stage{stage}_weights", str(path))
    return predictors.CascadePredictions(args.stage1_weights, args.stage2_weights, args.backend, args.device,
                                         args.tta, args.adaptive_clahe, args.channels_last, args.threads,
                                         anatomy=args.anatomy)


def _progress():
    """A tqdm progress bar over a list of cases (on stderr), or None without tqdm."""
    try:
        from tqdm import tqdm

        def progress(items):
            return tqdm(items, desc="evaluating", unit="image", file=sys.stderr, disable=None)
    except ImportError:  # pragma: no cover - tqdm is a requirement
        progress = None
    return progress


def _run_tasks(args: argparse.Namespace, found: _Cases, predictor) -> _Results:
    """Every task over its cases (bad items skipped, each printed on stderr)."""
    progress = _progress()
    skipped: list[dict] = []
    tissue_rows, confusion, tissue_thumbs = scores.evaluate_tissue(found.tissue, predictor, args.worst_n, 384,
                                                                   skipped, progress)
    lesion_rows, lesion_thumbs = scores.evaluate_lesion(found.lesion, predictor, args.threshold, args.match_iou,
                                                        args.min_lesion_area, args.worst_n, 384, skipped, progress)
    density_rows = scores.evaluate_density(found.density, predictor, skipped, progress)
    csaw_rows = scores.evaluate_csaw(found.csaw, predictor, args.threshold, args.match_iou, args.min_lesion_area,
                                     skipped, progress)
    for item in skipped:
        print(f"skipped {item['task']} {item['image']}: {item['reason']}", file=sys.stderr)
    return _Results(tissue_rows, confusion, tissue_thumbs, lesion_rows, lesion_thumbs, density_rows, csaw_rows,
                    skipped)


def _summary(args: argparse.Namespace, found: _Cases, results: _Results, predictor, shipped: list[int],
             from_model: list[str]) -> dict:
    """The content of ``metrics.json``: the run's settings, the conventions, skipped items, one section per task."""
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
        "conventions": {**scores.CONVENTIONS, "lesion_threshold_value": args.threshold,
                        "match_iou_value": args.match_iou, "min_lesion_area_px_value": args.min_lesion_area},
        "skipped": results.skipped,
    }
    if isinstance(predictor, predictors.CascadePredictions) and predictor.seconds:
        summary["evaluation"]["seconds_per_image_mean"] = float(np.mean(predictor.seconds))
    if found.tissue:
        summary["tissue"] = scores.summarize_tissue(results.tissue_rows, results.confusion)
    if found.lesion:
        summary["lesion"] = scores.summarize_lesion_by_group(results.lesion_rows)
    if found.density:
        summary["density"] = scores.summarize_density(results.density_rows)
    if found.csaw:
        summary["csaw"] = scores.summarize_csaw(results.csaw_rows)
    return summary


def _write_outputs(args: argparse.Namespace, results: _Results, summary: dict) -> int:
    """``per_image.csv``, the plots, ``metrics.json`` and the console summary; returns 0, or 1 when no image could be
    evaluated."""
    import pandas as pd

    out = Path(args.output_dir)
    rows = results.rows
    out.mkdir(parents=True, exist_ok=True)
    fileio.atomic_write_text(out / "per_image.csv", pd.DataFrame(rows).to_csv(index=False) if rows else "task,stem\n")
    if args.plots and rows:
        _plot(results, args.worst_n, out / "plots")
    fileio.atomic_write_text(out / "metrics.json", json.dumps(fileio.json_safe(summary), indent=2) + "\n")
    _print_summary(summary)
    if not rows:
        print("error: no image could be evaluated (see the skipped items above)", file=sys.stderr)
        return 1
    return 0


def _plot(results: _Results, worst_n: int, plot_dir: Path) -> None:
    """The figures of ``plots/`` for the tasks that produced rows (or worst-case thumbnails)."""
    if results.tissue_rows or results.lesion_rows:
        plots.plot_dice_distribution(results.tissue_rows, results.lesion_rows, plot_dir / "dice_distribution.png")
    if results.density_rows:
        plots.plot_density_scatter(results.density_rows, plot_dir / "density_scatter.png")
    if results.tissue_thumbs:
        plots.plot_worst_cases(results.tissue_thumbs, worst_n, "tissue", plot_dir / "worst_tissue.png")
    if results.lesion_thumbs:
        plots.plot_worst_cases(results.lesion_thumbs, worst_n, "lesion", plot_dir / "worst_lesion.png")


def _check_numbers(args: argparse.Namespace) -> None:
    """Refuse numbers outside their range (``checks.UserInputError``, one line naming the flag)."""
    checks.number(args.limit, "--limit", 1)
    checks.number(args.worst_n, "--worst-n", 0)
    checks.number(args.threads, "--threads", 1)


def _print_summary(summary: dict) -> None:
    tissue = summary.get("tissue")
    if tissue and tissue.get("n_images"):
        mean, pooled = tissue["mean"], tissue["pooled"]
        print(f"tissue ({tissue['n_images']} images): 4-channel Dice {mean['dice_4channel']:.4f} "
              f"(pooled {pooled['dice_4channel']:.4f}), macro Dice {mean['macro_dice']:.4f}, "
              f"pixel accuracy {mean['pixel_accuracy']:.4f}")
        print("  per-class Dice: " + ", ".join(f"{n} {mean['dice_' + n]:.4f}" for n in scores.TISSUE_CLASS_NAMES))
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
    patients = cases.read_patient_list(args.exclude_patients)
    if args.lesion_csv:
        print("note: --exclude-patients applies to --lesion-dir and --csaw-dir; filter a --lesion-csv with --split",
              file=sys.stderr)
    else:
        lesion, dropped = cases.exclude_patients(lesion, patients)
        if args.lesion_dir:
            print(f"--exclude-patients: {dropped} lesion image(s) left out", file=sys.stderr)
    csaw, dropped = cases.exclude_patients(csaw, patients)
    if args.csaw_dir:
        print(f"--exclude-patients: {dropped} CSAW-S image(s) left out", file=sys.stderr)
    return lesion, csaw


def _number(value, digits: int) -> str:
    """A figure for the console tables: ``digits`` decimals, "-" for a missing (None / NaN) value."""
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return f"{value:.{digits}f}"


def _lesion_table(groups: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the lesion table: one row per group summary (``scores.summarize_lesion``)."""
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
