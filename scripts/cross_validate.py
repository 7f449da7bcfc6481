"""Patient-level k-fold cross-validation of stage 1: train on each fold's other patients, test on its own, report
mean ± sd over folds per measure and per domain (issue 19).

For each fold ``i`` it writes ``OUT/fold<i>/table.csv`` (:func:`mammo.evaluation.crossval.fold_tables`: the fold's
patients ``test``, the others ``train`` / ``val`` by patient and source), trains stage 1 on ``train`` choosing its
epoch on ``val`` (``--val-fraction`` of each source's other patients; never the fold's test patients), then runs
``evaluate.py`` on the fold's test rows, with the CSAW-S patients of the fold scored as a digital domain
(``--csaw-dir``) and the VinDr dense-tissue set measured (``--density-dir``; measurement only, it takes part in no
choice). A fold whose
``metrics.json`` exists is not redone (``--resume`` semantics by default: delete the fold's folder to redo it). The
summary goes to ``OUT/cv_summary_<tag>.json`` and ``OUT/cv_summary_<tag>.md``::

    .venv/bin/python prepare_to_train.py --tissue-dir ../shared/data/tissue/train_valid \\
        --csaw-dir ../shared/data/csaw_s_dev --workspace workspace_cv
    OMP_NUM_THREADS=2 .venv/bin/python scripts/cross_validate.py --tissue-csv workspace_cv/tissue_dataset.csv \\
        --folds 3 --output-dir cv_stage1 -- --img-size-stage1 256 128 --epochs-stage1 12 --t0-stage1 4 \\
        --batch-size-stage1 4 --appearance-augmentation on --source-repeat csaw-s=3 --encoder-weights none

Flags after ``--`` go to ``cascade_segmentation_model.py`` unchanged. ``--evaluate-flags`` go to every
``evaluate.py`` run (e.g. ``"--no-anatomy"`` to measure a variant on the same trained folds).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mammo.cli import common  # noqa: E402
from mammo.data import splits  # noqa: E402
from mammo.evaluation import crossval  # noqa: E402

#: The measures of the summary table: (label, measure name in metrics.json, flattened).
MEASURES = [
    ("film FGT Dice per image", "tissue/mean/dice_fgt"),
    ("film 4-class Dice per image (with background)", "tissue/mean/dice_4channel"),
    ("film pectoral Dice per image", "tissue/mean/dice_pectoral"),
    ("film percent-density error (FGT region, points)", "tissue/percent_density_abs_error_mean"),
    ("CSAW-S pectoral Dice, MLO views of the fold's patient", "csaw/pectoral/dice_mean"),
    ("CSAW-S pectoral share of the breast, CC views (max)", "csaw/pectoral/fraction_cc_max"),
    ("VinDr dense-pixel Dice per image", "density/model_dense_pixels/fgt_dice_mean"),
    ("VinDr percent-density error, dense pixels (points)", "density/model_dense_pixels/density_abs_error_mean"),
    ("VinDr density correlation r, dense pixels", "density/model_dense_pixels/density_pearson_r"),
    ("VinDr FGT-region Dice per image", "density/model/fgt_dice_mean"),
    ("VinDr pectoral share of the breast (max over images)", "density/pectoral_fraction_max"),
]


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = common.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=add_help)
    parser.add_argument("--tissue-csv", required=True, help="the workspace's tissue_dataset.csv (all patients)")
    parser.add_argument("--folds", type=common.positive_int, default=3, help="number of folds (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="fold and split seed (default: %(default)s)")
    parser.add_argument("--val-fraction", type=float, default=0.2,
                        help="inner validation share of each fold's training patients (default: %(default)s)")
    parser.add_argument("--output-dir", required=True, help="folder of the folds and the summary")
    parser.add_argument("--shared-data", default=str(ROOT.parent / "shared" / "data"),
                        help="the real data folder (default: %(default)s)")
    parser.add_argument("--evaluate-flags", default="", help="extra flags for every evaluate.py run (one string)")
    parser.add_argument("--evaluate-only", action="store_true", help="re-evaluate trained folds, train nothing")
    parser.add_argument("--tag", default="eval", help="name of each fold's evaluation folder (default: %(default)s)")
    parser.add_argument("train_flags", nargs=argparse.REMAINDER, help="-- then flags for cascade_segmentation_model.py")
    return parser


def _run(command: list[str], log: Path) -> None:
    print("$ " + " ".join(shlex.quote(c) for c in command), flush=True)
    with open(log, "a", encoding="utf-8") as stream:
        done = subprocess.run(command, cwd=ROOT, stdout=stream, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"error: the command above failed (exit {done.returncode}); see {log}")


def _held_out_csaw(table) -> str | None:
    """The CSAW-S patients of a fold's test rows, comma-separated, as ``evaluate.py --csaw-patients`` takes them."""
    test = table[(table["split"] == crossval.TEST) & (table.get("source", "") == "csaw-s")]
    patients = sorted({str(p).replace("CSAW_", "") for p in test["patient_id"]})
    return ",".join(patients) or None


def run_fold(args: argparse.Namespace, fold: int, table, out: Path) -> dict:
    """Train (unless done) and evaluate one fold; returns its metrics.json."""
    fold_dir = out / f"fold{fold}"
    fold_dir.mkdir(parents=True, exist_ok=True)
    table_csv = fold_dir / "table.csv"
    table.to_csv(table_csv, index=False)
    checkpoint = fold_dir / "stage1" / "best_stage1.pth"
    python = sys.executable
    flags = [f for f in args.train_flags if f != "--"]
    if not checkpoint.exists() and not args.evaluate_only:
        _run([python, "cascade_segmentation_model.py", "--train-stage1", "--tissue-csv", str(table_csv),
              "--seed", str(args.seed),
              "--stage1-checkpoint-dir", str(fold_dir / "stage1"), "--logdir", str(fold_dir / "runs"),
              "--num-workers", "0", "--keep-epoch-checkpoints", "0", *flags], fold_dir / "train.log")
    evaluation = fold_dir / args.tag
    metrics = evaluation / "metrics.json"
    if not metrics.exists():
        data = Path(args.shared_data)
        command = [python, "evaluate.py", "--tissue-csv", str(table_csv), "--split", crossval.TEST,
                   "--stage1-weights", str(checkpoint), "--density-dir", str(data / "vindr_density_dev"),
                   "--output-dir", str(evaluation), "--no-plots", *shlex.split(args.evaluate_flags)]
        patients = _held_out_csaw(table)
        if patients:
            command += ["--csaw-dir", str(data / "csaw_s_dev"), "--csaw-patients", patients]
        _run(command, fold_dir / f"{args.tag}.log")
    return json.loads(metrics.read_text(encoding="utf-8"))


def main(args: argparse.Namespace) -> int:
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = splits.read_tissue_table(args.tissue_csv)
    tables = crossval.fold_tables(table, args.folds, args.seed, args.val_fraction)
    per_fold = [run_fold(args, fold, fold_table, out) for fold, fold_table in enumerate(tables)]
    summary = crossval.summarize_folds(per_fold)
    (out / f"cv_summary_{args.tag}.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    text = crossval.markdown_table(summary, MEASURES)
    (out / f"cv_summary_{args.tag}.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
