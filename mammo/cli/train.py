"""Train the cascade: stage 1 (tissue) and stage 2 (lesions in the FGT region of interest), on one or many devices.

Stage 1 learns 4 tissue classes (background, adipose, fibroglandular tissue (FGT), pectoral muscle) on whole
mammograms. Stage 2 learns lesions on the crops that the trained stage 1 gives (the code inference runs: stage 1,
the FGT box with its margin), cached under ``<stage2-checkpoint-dir>/roi_crops/<key>/`` (a new stage 1 gives new
crops).

This module is the command line only: its flags (:func:`get_args_parser`), their checks (:func:`_check_args`), the
frozen :class:`~mammo.training.config.TrainConfig` built from them once (:func:`config_from_args`; nothing below
``mammo/cli/`` sees the argparse namespace) and which stages to run (:func:`main`). The work is done by:

- ``mammo/training/trainer.py``: one stage from the config (output folders, ``--resume`` / ``--overwrite``, model,
  optimizer, scheduler, the epoch loop with early stopping);
- ``mammo/training/inputs.py``: everything a run reads or writes, checked before training (``check_inputs``), the
  data tables and their train / validation split, the stages' settings (``stage_spec``);
- ``mammo/training/engine.py``: seeding and RNG state, the seeded epoch order and augmentation,
  ``train_one_epoch``, ``evaluate``, checkpoint writing and rotation, TensorBoard / ``metrics.jsonl`` logging, the
  epoch summary line;
- ``mammo/training/roi_crops.py``: the stage-2 ROI crops made by the trained stage 1, and their cache;
- ``mammo/training/datasets.py`` and ``mammo/data/splits.py`` (datasets; tables and patient splits),
  ``mammo/core/distributed.py`` (torchrun set-up), ``mammo/weights/checkpoints.py`` (the checkpoint format),
  ``mammo/cascade/checks.py`` (a user's paths and numbers), ``mammo/cli/common.py`` (shared flags).

Recipe: AdamW, cosine warm restarts, Dice + cross-entropy (stage 1) / Dice + BCE (stage 2) plus an L1 weight
penalty (details in ``mammo/training/trainer.py``); the best checkpoint is the one with the highest validation Dice
of FGT (stage 1) or of the lesion (stage 2). Validation Dice is pooled over the whole validation split (sum of
intersections over sum of sizes, ``metrics.dice_from_counts``) on hard predictions at the network's input size
(letterboxed images; stage 2 on the ROI crops).

Outputs (rank 0 only):

- ``<stageN-checkpoint-dir>/best_stageN.pth``, ``stageN_epoch{E}.pth`` (the last ``--keep-epoch-checkpoints``),
  ``last_stageN.pth`` (what ``--resume`` continues from: weights, optimizer, scheduler, AMP scaler, RNG states,
  early-stopping counter, and the arguments as a dict: ``engine.plain_args``). The format is
  ``checkpoints.make_checkpoint``'s, written atomically, readable with
  ``torch.load(weights_only=True)``; ``checkpoints.load_stage`` rebuilds the model from it with no training flag.
- ``<logdir>/stageN/``: TensorBoard events (``train/loss``, ``train/seg_loss``, ``train/l1_penalty``, ``val/loss``,
  ``val/dice_<class>``, ``val/pixel_accuracy`` (stage 1), ``lr``, ``time/train_s``, ``time/epoch_s`` (training +
  validation + saving), image panels
  ``val/panel_<i>`` (input | truth | prediction), and for stage 2 ``stage2/roi_lesion_coverage[_train|_val]``),
  ``args.json`` (the arguments) and ``metrics.jsonl`` (one JSON line per epoch).

Reproducibility: the training order of epoch ``e`` is a permutation drawn from ``torch.Generator`` seeded with
``seed + e`` and the augmentation of each item is seeded from ``(seed, epoch, index)``, so an epoch does not depend
on what earlier epochs consumed: ``--resume`` after a crash gives bit-identical weights to an uninterrupted run on
the CPU with ``--deterministic`` (with any number of loader workers).

Distributed: ``torchrun --nproc_per_node=N cascade_segmentation_model.py ...`` trains with
DistributedDataParallel (NCCL on CUDA, gloo on the CPU); ``--batch-size-stageN`` is per process; each process sees
its own shard of every epoch's permutation; validation counts and losses are summed over processes.

Examples::

    python cascade_segmentation_model.py --train-both --tissue-csv workspace/tissue_dataset.csv \\
        --cancer-csv workspace/unified_segmentation_dataset.csv
    torchrun --nproc_per_node=4 cascade_segmentation_model.py --train-stage1 --tissue-csv workspace/tissue_dataset.csv
    python cascade_segmentation_model.py --train-stage1 --tissue-data-dir ../shared/data/tissue/train_valid \\
        --img-size-stage1 256 128 --epochs-stage1 6 --encoder-weights none --device cpu
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from mammo.cli import common
from mammo.core import distributed
from mammo.imaging import roi
from mammo.weights import runners
from mammo.cascade import checks
from mammo.training.config import DataConfig, LoopConfig, NetworkConfig, SplitConfig, StageConfig, TrainConfig
from mammo.training.engine import NonFiniteLossError, plain_args
from mammo.nn.models import MODEL_REGISTRY
from mammo.training.inputs import TrainingInputError, check_inputs, stage_spec
from mammo.training.trainer import train_stage

#: Exit statuses of :func:`main`.
EXIT_OK, EXIT_INPUT_ERROR, EXIT_NONFINITE_LOSS = 0, 2, 3


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------
def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """Command-line flags of the training script (see the module docstring)."""
    parser = common.ArgumentParser(description="Train the two-stage cascade (stage 1 tissue, stage 2 lesions).",
                                add_help=add_help,
                                parents=[common.runtime_parser("device", "workers", "seed", "deterministic", "amp")],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_argument_group("what to train").add_mutually_exclusive_group(required=True)
    what.add_argument("--train-stage1", action="store_true", help="train stage 1 (tissue) only")
    what.add_argument("--train-stage2", action="store_true",
                      help="train stage 2 (lesions) only, on crops made by an existing stage-1 checkpoint")
    what.add_argument("--train-both", action="store_true", help="train stage 1, then stage 2 on its crops")

    data = parser.add_argument_group("data")
    data.add_argument("--tissue-data-dir", type=Path, default=None,
                      help="stage-1 data: a DDSM tissue-label folder (fgt_seg/ + fgt_seg_labels/) or a workspace "
                           "folder holding tissue_dataset.csv (default: %(default)s)")
    data.add_argument("--tissue-csv", type=Path, default=None,
                      help="stage-1 data: tissue_dataset.csv written by prepare_to_train.py (default: %(default)s)")
    data.add_argument("--cancer-csv", type=Path, default=None,
                      help="stage-2 data: unified_segmentation_dataset.csv written by prepare_to_train.py "
                           "(default: %(default)s)")
    data.add_argument("--stage1-checkpoint", type=Path, default=None,
                      help="stage-1 checkpoint that makes the stage-2 crops (default: best_stage1.pth in "
                           "--stage1-checkpoint-dir)")
    data.add_argument("--val-fraction", type=float, default=None,
                      help="re-split by patient with this fraction of images in validation (default: use the "
                           "table's train/val split column, else 0.2)")
    data.add_argument("--fold", type=int, default=None,
                      help="k-fold cross-validation: the validation fold, 0-based (default: %(default)s)")
    data.add_argument("--folds", type=int, default=None,
                      help="k-fold cross-validation: number of folds, with --fold (default: %(default)s)")

    recipe = parser.add_argument_group("recipe")
    recipe.add_argument("--epochs-stage1", type=int, default=30, help="stage-1 epochs (default: %(default)s)")
    recipe.add_argument("--epochs-stage2", type=int, default=150, help="stage-2 epochs (default: %(default)s)")
    recipe.add_argument("--lr-stage1", type=float, default=1e-3,
                        help="stage-1 AdamW learning rate (default: %(default)s)")
    recipe.add_argument("--lr-stage2", type=float, default=3e-4,
                        help="stage-2 AdamW learning rate (default: %(default)s)")
    recipe.add_argument("--batch-size-stage1", type=int, default=8,
                        help="stage-1 images per batch and process (>= 2: BatchNorm) (default: %(default)s)")
    recipe.add_argument("--batch-size-stage2", type=int, default=12,
                        help="stage-2 crops per batch and process (>= 2: BatchNorm) (default: %(default)s)")
    recipe.add_argument("--img-size-stage1", type=int, nargs="+", default=[512], metavar="PX",
                        help="stage-1 network input in pixels: one value (square) or two (height width), multiples "
                             "of 32; images are letterboxed into it (default: %(default)s)")
    recipe.add_argument("--img-size-stage2", type=int, nargs="+", default=[384], metavar="PX",
                        help="stage-2 network input in pixels, as --img-size-stage1 (default: %(default)s)")
    recipe.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (default: %(default)s)")
    recipe.add_argument("--l1-lambda", type=float, default=5e-5,
                        help="L1 penalty weight on conv/linear weights (0 = off) (default: %(default)s)")
    recipe.add_argument("--t0-stage1", type=int, default=10,
                        help="stage-1 cosine warm-restart period T_0 in epochs (default: %(default)s)")
    recipe.add_argument("--t0-stage2", type=int, default=15,
                        help="stage-2 cosine warm-restart period T_0 in epochs (default: %(default)s)")
    recipe.add_argument("--t-mult", type=int, default=2,
                        help="factor of each next restart period (default: %(default)s)")
    recipe.add_argument("--appearance-augmentation", choices=("on", "off"), default="on",
                        help="stage 1: intensity curves, CLAHE and blur/sharpening that span screen-film and digital "
                             "mammograms (datasets.appearance_augmentation) (default: %(default)s)")
    recipe.add_argument("--source-repeat", action="append", default=None, metavar="SOURCE=N",
                        help="repeat the training rows of a table source N times per epoch, e.g. csaw-s=3 "
                             "(repeatable; default: each row once)")
    recipe.add_argument("--patience", type=int, default=0,
                        help="early stopping: stop after this many epochs without a better validation Dice "
                             "(0 = off) (default: %(default)s)")
    recipe.add_argument("--max-batches-per-epoch", type=int, default=0,
                        help="cap on training and validation batches per epoch, for smoke runs (0 = no cap) "
                             "(default: %(default)s)")

    model = parser.add_argument_group("model")
    model.add_argument("--model", default="aca_atrous_resunet", choices=sorted(MODEL_REGISTRY),
                       help="network of both stages (default: %(default)s)")
    model.add_argument("--encoder", default="resnet34",
                       help="segmentation-models-pytorch encoder of aca_atrous_resunet (default: %(default)s)")
    model.add_argument("--encoder-weights", default="imagenet",
                       help="encoder initialisation: imagenet (needs a network or a filled cache), none, or a path "
                            "to a local encoder state_dict / suite checkpoint (default: %(default)s)")
    model.add_argument("--stage2-init-from-stage1", action="store_true",
                       help="initialise stage 2's encoder from the stage-1 checkpoint's encoder (instead of "
                            "--encoder-weights; for users without ImageNet weights)")
    model.add_argument("--sync-bn", action="store_true",
                       help="synchronise BatchNorm statistics across processes (CUDA + torchrun only)")
    model.add_argument("--roi-margin", type=float, default=roi.ROI_MARGIN_FRACTION,
                       help="margin around the FGT box on each side, as a fraction of its height / width; stored "
                            "in the stage-2 checkpoint for inference (default: %(default)s)")
    model.add_argument("--roi-breast-margin", type=float, default=0.0,
                       help="at least this margin around the FGT box on each side, as a fraction of the breast's "
                            "bounding box (roi.RoiRule; stored in the stage-2 checkpoint) (default: %(default)s)")
    model.add_argument("--roi-clip-to-breast", action="store_true",
                       help="clip the ROI box to the breast's bounding box (roi.RoiRule)")
    model.add_argument("--roi-min-fgt", type=float, default=0.0,
                       help="leave FGT components smaller than this fraction of the breast's area out of the ROI box "
                            "(roi.RoiRule) (default: %(default)s)")

    out = parser.add_argument_group("outputs")
    out.add_argument("--stage1-checkpoint-dir", type=Path, default=Path("checkpoints/stage1"),
                     help="stage-1 checkpoints (default: %(default)s)")
    out.add_argument("--stage2-checkpoint-dir", type=Path, default=Path("checkpoints/stage2"),
                     help="stage-2 checkpoints and the ROI-crop cache (default: %(default)s)")
    out.add_argument("--logdir", type=Path, default=Path("runs/cascade"),
                     help="TensorBoard folder; stage N logs to <logdir>/stageN (default: %(default)s)")
    out.add_argument("--keep-epoch-checkpoints", type=int, default=3,
                     help="how many stageN_epoch{E}.pth files to keep; 0 writes none (best and last are always "
                          "written) (default: %(default)s)")
    out.add_argument("--image-every", type=int, default=5,
                     help="log validation image panels every this many epochs (and at epoch 1) "
                          "(default: %(default)s)")
    resume = out.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true",
                        help="continue from last_stageN.pth in the checkpoint folder (exact epoch, optimizer, "
                             "scheduler and RNG state); a finished stage is skipped")
    resume.add_argument("--overwrite", action="store_true",
                        help="start over, deleting this stage's earlier checkpoints, TensorBoard events and "
                             "metrics.jsonl")
    return parser


# ----------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------
def _check_args(args: argparse.Namespace) -> None:
    """Refuse flags that do not go together and numbers outside their range (one line naming the flag)."""
    if (args.fold is None) != (args.folds is None):
        raise TrainingInputError("--fold and --folds go together (e.g. --fold 0 --folds 5)")
    if args.val_fraction is not None and args.folds is not None:
        raise TrainingInputError("choose --val-fraction or --fold/--folds, not both")
    if args.num_workers < 0 or args.max_batches_per_epoch < 0 or args.patience < 0:
        raise TrainingInputError("--num-workers, --max-batches-per-epoch and --patience must be >= 0")
    for flag, value in (("--roi-margin", args.roi_margin), ("--roi-breast-margin", args.roi_breast_margin),
                        ("--roi-min-fgt", args.roi_min_fgt)):
        if not 0 <= value < 1:
            raise TrainingInputError(f"{flag} must be in [0, 1), got {value}")
    if (args.train_stage1 or args.train_both) and (args.tissue_csv is None) == (args.tissue_data_dir is None):
        raise TrainingInputError("stage 1 needs exactly one of --tissue-csv or --tissue-data-dir")
    if (args.train_stage2 or args.train_both) and args.cancer_csv is None:
        raise TrainingInputError("stage 2 needs --cancer-csv (workspace/unified_segmentation_dataset.csv)")
    for stage in (1, 2):
        if getattr(args, f"epochs_stage{stage}") < 1:
            raise TrainingInputError(f"--epochs-stage{stage} must be >= 1")
    try:
        for stage in (1, 2):
            checks.number(getattr(args, f"lr_stage{stage}"), f"--lr-stage{stage}", 0, low_open=True)
            checks.number(getattr(args, f"t0_stage{stage}"), f"--t0-stage{stage}", 1)
        checks.number(args.t_mult, "--t-mult", 1)
        checks.number(args.weight_decay, "--weight-decay", 0)
        checks.number(args.l1_lambda, "--l1-lambda", 0)
        checks.number(args.val_fraction, "--val-fraction", 0, 1, low_open=True, high_open=True)
        checks.number(args.folds, "--folds", 2)
        if args.folds is not None:
            checks.number(args.fold, "--fold", 0, args.folds - 1)
        checks.number(args.keep_epoch_checkpoints, "--keep-epoch-checkpoints", 0)
        checks.number(args.image_every, "--image-every", 0)
    except checks.UserInputError as error:
        raise TrainingInputError(str(error)) from None


def _check_outputs(config: TrainConfig) -> None:
    """The checkpoint folder of each stage trained and the TensorBoard folder can be written
    (``checks.writable_folder``: not below a file, not read-only), before any table or model is read.

    Raises:
        TrainingInputError: one line naming the flag, the folder and the fix.
    """
    folders = [(f"--stage{stage}-checkpoint-dir", config.stage(stage).checkpoint_dir) for stage in config.stages]
    try:
        for flag, folder in [*folders, ("--logdir", config.logdir)]:
            checks.writable_folder(folder, flag)
    except checks.UserInputError as error:
        raise TrainingInputError(str(error)) from None


def _optional_path(value) -> Path | None:
    """A path flag's value as a ``Path``; None stays None."""
    return None if value is None else Path(value)


def _stage_config(args: argparse.Namespace, stage: int) -> StageConfig:
    """The ``--*-stageN`` flags of one stage."""
    def flag(name: str):
        return getattr(args, name.format(stage))
    return StageConfig(epochs=flag("epochs_stage{}"), lr=flag("lr_stage{}"), batch_size=flag("batch_size_stage{}"),
                       img_size=tuple(flag("img_size_stage{}")), t0=flag("t0_stage{}"),
                       checkpoint_dir=Path(flag("stage{}_checkpoint_dir")))


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The frozen :class:`~mammo.training.config.TrainConfig` of checked flags (:func:`_check_args`), built once;
    its ``arguments`` are the flags as plain JSON types (``engine.plain_args``), as ``args.json`` and the
    checkpoints store them."""
    stages = tuple(stage for stage, wanted in ((1, args.train_stage1 or args.train_both),
                                                (2, args.train_stage2 or args.train_both)) if wanted)
    data = DataConfig(tissue_csv=_optional_path(args.tissue_csv), tissue_data_dir=_optional_path(args.tissue_data_dir),
                      cancer_csv=_optional_path(args.cancer_csv),
                      stage1_checkpoint=_optional_path(args.stage1_checkpoint or None),
                      appearance_augmentation=args.appearance_augmentation == "on")
    network = NetworkConfig(model=args.model, encoder=args.encoder, encoder_weights=args.encoder_weights,
                            stage2_init_from_stage1=bool(args.stage2_init_from_stage1), sync_bn=bool(args.sync_bn))
    rule = roi.RoiRule(margin_fraction=float(args.roi_margin), breast_margin_fraction=float(args.roi_breast_margin),
                       min_fgt_fraction=float(args.roi_min_fgt), clip_to_breast=bool(args.roi_clip_to_breast))
    return TrainConfig(
        stages=stages, stage1=_stage_config(args, 1), stage2=_stage_config(args, 2), data=data, network=network,
        split=SplitConfig(seed=args.seed, val_fraction=args.val_fraction, fold=args.fold, folds=args.folds,
                          source_repeat=tuple(args.source_repeat or ())),
        loop=LoopConfig(amp=bool(args.amp), l1_lambda=args.l1_lambda, max_batches_per_epoch=args.max_batches_per_epoch),
        roi_rule=rule,
        logdir=Path(args.logdir), deterministic=bool(args.deterministic), num_workers=args.num_workers,
        worker_start_method=args.worker_start_method, weight_decay=args.weight_decay, t_mult=args.t_mult,
        patience=args.patience, keep_epoch_checkpoints=args.keep_epoch_checkpoints, image_every=args.image_every,
        resume=bool(args.resume), overwrite=bool(args.overwrite), arguments=plain_args(vars(args)))


@common.interruptible("cascade_segmentation_model.py", "checkpoints of finished epochs are kept, run it again with "
                       "--resume to continue (or --overwrite to start over)")
def main(args: argparse.Namespace | None = None) -> int:
    """Train the stages the flags ask for. Returns 0 on success, 2 for bad input, 3 for a non-finite loss.

    Bad input (flags, tables, files, checkpoints, output folders) is found before anything is trained
    (``mammo.training.inputs.check_inputs``) and printed as one line on stderr: ``error: <what, which file, the fix>``.
    """
    args = get_args_parser().parse_args() if args is None else args
    try:
        _check_args(args)
        config = config_from_args(args)
        device = runners.resolve_device(args.device)
        if config.resume:
            lasts = [stage_spec(s, config).path("last") for s in config.stages]
            if not any(path.is_file() for path in lasts):
                raise TrainingInputError(f"--resume: nothing to resume from ({', '.join(map(str, lasts))} not found); "
                                         "check --stage1-checkpoint-dir / --stage2-checkpoint-dir, or drop --resume")
        _check_outputs(config)
        check_inputs(config)
    except (TrainingInputError, RuntimeError) as error:
        return common.usage_error(checks.one_line(error))
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    cudnn_before = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    ctx = distributed.init_distributed(device.type)
    if ctx.enabled and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
    try:
        for stage in config.stages:
            train_stage(stage, config, ctx, device)
        return EXIT_OK
    except TrainingInputError as error:
        return common.usage_error(checks.one_line(error))
    except NonFiniteLossError as error:
        if ctx.is_main:
            print(f"error: {error}", file=sys.stderr)
        return EXIT_NONFINITE_LOSS
    finally:
        distributed.cleanup(ctx)
        torch.use_deterministic_algorithms(deterministic_before)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn_before


if __name__ == "__main__":
    sys.exit(main())
