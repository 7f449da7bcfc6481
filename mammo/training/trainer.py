"""One training stage, from the arguments to its checkpoints: data tables, the stage's set-up, the epoch loop.

What lives here (the engine pieces it calls are in ``engine.py``, the stage-2 crops in ``roi_crops.py``, the command
line in ``cascade_segmentation_model.py``):

- :class:`TrainingInputError`: bad command line or data, found before anything is trained (the script exits 2);
  :func:`check_inputs` finds it for every stage asked for before the first one starts (tables, their files, the
  stage-1 checkpoint, ``--encoder-weights``, output folders, sizes), and a file that cannot be read during an epoch
  stops training with one line naming it;
- data tables: :func:`split_table` (k-fold, a fresh patient split or the table's ``split`` column),
  :func:`tissue_table` (``--tissue-csv`` / ``--tissue-data-dir``), :func:`lesion_table` (``--cancer-csv``),
  :func:`check_files_exist`; tables are read by ``tables.read_table`` (cells normalised, unknown splits refused);
- :func:`stage1_checkpoint`: the checkpoint that makes the stage-2 crops, checked (a file, a checkpoint, stage 1);
- a stage's settings: :func:`stage_spec` (``engine.StageSpec`` from the arguments, sizes checked),
  :func:`model_config_for`;
- :func:`train_stage`: output folders (``--resume`` / ``--overwrite``), the stage's datasets (stage 2: ROI crops and
  their lesion coverage), model, AdamW, cosine warm restarts, AMP scaler, resuming from ``last_stageN.pth``,
  DistributedDataParallel, TensorBoard, then the epochs with early stopping.

Recipe (the project issue): AdamW (weight decay 1e-4), CosineAnnealingWarmRestarts stepped once per epoch
(T_0 10 / 15 epochs for stage 1 / 2, T_mult 2), stage-1 loss 0.5 Dice + 0.5 cross-entropy, stage-2 loss Dice + BCE,
plus an L1 weight penalty; the best checkpoint is the one with the highest validation Dice of FGT (stage 1) or of
the lesion (stage 2).
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
import traceback
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from mammo.weights import checkpoints
from mammo.data import splits
from mammo.training import datasets
from mammo.core import distributed
from mammo import imaging
from mammo.core import labels
from mammo.imaging import roi
from mammo.training import roi_crops
from mammo.data import tables
from mammo.cascade import checks
from mammo.training.engine import (EpochSampler, NonFiniteLossError, SeedableAugment, StageSpec, evaluate, log_epoch, make_loader,
                    plain_args, print_epoch, save_epoch, seed_everything, set_rng_state, train_one_epoch)
from mammo.core.fileio import atomic_write_text
from mammo.nn.losses import LesionLoss, TissueLoss
from mammo.nn.models import build_model, default_model_config


class TrainingInputError(Exception):
    """Bad command line or data for training; the message names what was expected, what was found and the fix."""


_ENCODER_WEIGHTS_ADVICE = ("pass 'imagenet', 'none', an encoder state_dict (.pth) or a checkpoint of this suite "
                           "(best_stage1.pth)")



# ----------------------------------------------------------------------------------------------------------------
# Data tables
# ----------------------------------------------------------------------------------------------------------------
def split_table(table: pd.DataFrame, args: argparse.Namespace) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """Train / validation tables: k-fold, a fresh patient split, or the table's own ``split`` column.

    Rows with ``split == "test"`` never take part. The table's column is used when it names both ``train`` and
    ``val`` rows (values normalised by ``tables.read_table``: ``"train "`` is ``train``) and neither ``--folds`` nor
    ``--val-fraction`` asks for another split. Returns ``(train, val, description)``.

    Raises:
        TrainingInputError: an empty side, a bad fold / fraction, or a table whose split column names train and val
            rows but leaves other rows empty (they would silently take no part).
    """
    table = table[table["split"].astype(str) != "test"].reset_index(drop=True)
    split_values = set(table["split"].astype(str))
    if args.folds is None and args.val_fraction is None and {"train", "val"} <= split_values and "" in split_values:
        blank = int((table["split"].astype(str) == "").sum())
        raise TrainingInputError(f"the table's split column names train and val rows but leaves {blank} row(s) "
                                 "empty, which would take no part; fill them in, or pass --val-fraction F to re-split "
                                 "all rows by patient")
    try:
        if args.folds is not None:
            train, val = splits.kfold_by_patient(table, args.folds, args.fold, args.seed)
            how = f"patient-level fold {args.fold} of {args.folds} (seed {args.seed})"
        elif args.val_fraction is not None or not {"train", "val"} <= set(table["split"].astype(str)):
            fraction = 0.2 if args.val_fraction is None else args.val_fraction
            train, val = splits.split_by_patient(table, fraction, args.seed)
            how = f"patient-level split, {fraction:.0%} validation (seed {args.seed})"
        else:
            train = table[table["split"] == "train"].reset_index(drop=True)
            val = table[table["split"] == "val"].reset_index(drop=True)
            how = "the table's split column"
    except ValueError as error:
        raise TrainingInputError(f"cannot split the data into train and validation: {error}") from None
    if len(train) == 0 or len(val) == 0:
        raise TrainingInputError(f"the split ({how}) leaves {len(train)} training and {len(val)} validation images; "
                                 "both need at least one (use --val-fraction or more data)")
    return repeat_sources(train, args.source_repeat or []), val, how


def repeat_sources(train: pd.DataFrame, repeats: list[str]) -> pd.DataFrame:
    """The training table with the rows of some sources repeated (``--source-repeat csaw-s=3``): a few images of a
    new domain then weigh more in each epoch, each copy augmented differently.

    Args:
        train: the training rows (a ``source`` column).
        repeats: ``"SOURCE=N"`` texts, N >= 1 (1: unchanged).

    Raises:
        TrainingInputError: a malformed text, N < 1, or a source that has no training row.
    """
    out = train
    for text in repeats:
        source, _, count = text.partition("=")
        if not count.strip().isdigit() or int(count) < 1:
            raise TrainingInputError(f"--source-repeat {text!r}: expected SOURCE=N with an integer N >= 1, "
                                     "e.g. csaw-s=3")
        rows = train[train["source"].astype(str) == source.strip()]
        if rows.empty:
            known = ", ".join(sorted(set(train["source"].astype(str)))) or "none"
            raise TrainingInputError(f"--source-repeat {text!r}: no training row has source {source.strip()!r} "
                                     f"(sources: {known})")
        out = pd.concat([out] + [rows] * (int(count) - 1), ignore_index=True)
    return out


def tissue_table(args: argparse.Namespace) -> pd.DataFrame:
    """The stage-1 table from ``--tissue-csv`` or ``--tissue-data-dir`` (a raw folder or a workspace), its files
    checked (:func:`check_files_exist`).

    Raises:
        TrainingInputError: neither or both flags, a file where a folder goes or the reverse, a table that cannot be
            used (``tables.read_table``), or files that do not exist or are not images.
    """
    if (args.tissue_csv is None) == (args.tissue_data_dir is None):
        raise TrainingInputError("stage 1 needs exactly one of --tissue-csv (workspace/tissue_dataset.csv) or "
                                 "--tissue-data-dir (a DDSM tissue folder with fgt_seg/ and fgt_seg_labels/)")
    try:
        if args.tissue_csv is not None:
            source = checks.input_file(args.tissue_csv, "--tissue-csv", "pass the workspace's tissue_dataset.csv, "
                                            "or a tissue folder with --tissue-data-dir")
        else:
            source = checks.input_folder(args.tissue_data_dir, "--tissue-data-dir", "pass a workspace folder "
                                              "(holding tissue_dataset.csv) or a DDSM tissue folder (fgt_seg/ + "
                                              "fgt_seg_labels/); a CSV goes to --tissue-csv")
    except checks.UserInputError as error:
        raise TrainingInputError(str(error)) from None
    if source.is_dir() and (source / "tissue_dataset.csv").exists():
        source = source / "tissue_dataset.csv"
    elif source.is_dir() and not ((source / "fgt_seg").is_dir() and (source / "fgt_seg_labels").is_dir()):
        raise TrainingInputError(f"--tissue-data-dir {source} holds neither tissue_dataset.csv (a workspace) nor "
                                 "fgt_seg/ + fgt_seg_labels/ (a DDSM tissue-label folder); pass the --workspace of "
                                 "prepare_to_train.py or the tissue-label folder")
    return _checked_table(splits.read_tissue_table, source, ("image_file_path", "label_file_path"))


def lesion_table(args: argparse.Namespace) -> pd.DataFrame:
    """The stage-2 table from ``--cancer-csv`` (all rows, ``test`` ones included), its files checked.

    Raises:
        TrainingInputError: no ``--cancer-csv``, a folder, a table that cannot be used, or files that do not exist
            or are not images.
    """
    if args.cancer_csv is None:
        raise TrainingInputError("stage 2 needs --cancer-csv (workspace/unified_segmentation_dataset.csv)")
    return _checked_table(splits.read_lesion_table, args.cancer_csv, ("image_file_path", "roi_mask_file_path"),
                          ("--cancer-csv", "pass the workspace's unified_segmentation_dataset.csv"))


def _checked_table(read, source: Path, columns: tuple[str, ...], file_flag: tuple[str, str] | None = None
                   ) -> pd.DataFrame:
    """``read(source)`` (a ``datasets`` table reader) with the files named in ``columns`` checked; ``file_flag``
    (``(flag, fix)``, when given) first checks that ``source`` is a file. Every problem becomes a one-line
    ``TrainingInputError``."""
    try:
        if file_flag:
            source = checks.input_file(source, *file_flag)
        table = read(source)
    except (FileNotFoundError, ValueError) as error:
        raise TrainingInputError(str(error)) from None
    check_files_exist(table, columns, source)
    return table


def check_files_exist(table: pd.DataFrame, columns: tuple[str, ...], source) -> None:
    """Raise ``TrainingInputError`` (one line: how many, the first five, the fix) when a file named in ``columns``
    does not exist or is not an image (``tables.check_table_files``), before anything is trained.

    Cells may hold several paths joined by ";" (merged lesion masks); empty cells mean "none".
    """
    try:
        tables.check_table_files(table, columns, source)
    except tables.TableError as error:
        raise TrainingInputError(str(error)) from None


def stage1_checkpoint(args: argparse.Namespace) -> tuple[Path, dict]:
    """The stage-1 checkpoint that makes the stage-2 crops: ``--stage1-checkpoint``, else ``best_stage1.pth`` in
    ``--stage1-checkpoint-dir``; returns ``(path, checkpoint dict)``.

    Raises:
        TrainingInputError: the file is missing, a folder, not a checkpoint (a text file, an image, ...), or a
            checkpoint of stage 2; the message names it and fits the case.
    """
    path = _stage1_path(args)
    if not args.stage1_checkpoint and not path.exists():
        raise TrainingInputError(f"stage-1 checkpoint {path} not found; train stage 1 first (--train-stage1 or "
                                 "--train-both) or pass --stage1-checkpoint")
    flag = "--stage1-checkpoint" if args.stage1_checkpoint else "the stage-1 checkpoint of --stage1-checkpoint-dir"
    try:
        return path, checks.load_stage_checkpoint(path, flag, 1, fix="stage-2 crops are made by stage 1: pass "
                                                       "a stage-1 checkpoint (best_stage1.pth)")
    except checks.UserInputError as error:
        raise TrainingInputError(str(error)) from None


def _stage1_path(args: argparse.Namespace) -> Path:
    """Where the stage-1 checkpoint of stage 2 is: ``--stage1-checkpoint``, else ``best_stage1.pth`` in
    ``--stage1-checkpoint-dir`` (not checked)."""
    if args.stage1_checkpoint:
        return Path(args.stage1_checkpoint)
    return Path(args.stage1_checkpoint_dir) / "best_stage1.pth"


def check_inputs(args: argparse.Namespace) -> None:
    """Check everything the stages asked for will read or write, before the first one starts.

    Stage 1: its size and batch (:func:`stage_spec`) and its table with its files (:func:`tissue_table`). Stage 2:
    the same with :func:`lesion_table`, and the stage-1 checkpoint (:func:`stage1_checkpoint`; not with
    ``--train-both`` and no ``--stage1-checkpoint``: stage 1 makes it first). Both: ``--encoder-weights`` when it is
    a file (:func:`checks.checkpoint_file`'s checks), and the checkpoint and log folders (not files).

    Raises:
        TrainingInputError: the first problem found (one line naming the file or flag and the fix).
    """
    stages = [s for s, wanted in ((1, args.train_stage1 or args.train_both), (2, args.train_stage2 or args.train_both))
              if wanted]
    try:
        for stage in stages:
            spec = stage_spec(stage, args)
            checks.output_folder(spec.checkpoint_dir, f"--stage{stage}-checkpoint-dir")
        checks.output_folder(args.logdir, "--logdir")
        weights = str(args.encoder_weights)
        used = args.model == "aca_atrous_resunet" and (1 in stages or not args.stage2_init_from_stage1)
        if used and not args.resume and weights.lower() not in ("imagenet", "none", ""):
            checks.checkpoint_file(weights, "--encoder-weights", 1, advice=_ENCODER_WEIGHTS_ADVICE)
    except checks.UserInputError as error:
        raise TrainingInputError(str(error)) from None
    if 1 in stages:
        tissue_table(args)
    if 2 in stages:
        lesion_table(args)
        if args.stage1_checkpoint or args.train_stage2:  # else stage 1 is trained first and writes it
            stage1_checkpoint(args)


def _data_error(error: BaseException) -> str | None:
    """The one-line reason when ``error`` comes from reading a data file during an epoch, else None (a bug).

    Errors raised in the main process (``--num-workers 0``) are recognised by their type and by passing through
    ``mammo/training/datasets.py``, ``mammo/data/splits.py`` or the ``mammo/imaging`` package; errors re-raised from a DataLoader worker carry the worker's traceback as their
    message, whose last line is the original ``Type: message``.
    """
    text = str(error)
    if text.startswith("Caught ") and "DataLoader worker" in text.split("\n", 1)[0]:
        name, _, message = text.strip().splitlines()[-1].partition(": ")
        if name.rsplit(".", 1)[-1] in ("ImageReadError", "ValueError", "OSError", "FileNotFoundError"):
            return message
        return None
    if isinstance(error, imaging.ImageReadError):
        return text
    if isinstance(error, (ValueError, OSError)):
        files = {Path(datasets.__file__).resolve(), Path(splits.__file__).resolve()}
        imaging_dir = Path(imaging.__file__).resolve().parent  # every module of the mammo.imaging package
        for frame, _ in traceback.walk_tb(error.__traceback__):
            path = Path(frame.f_code.co_filename).resolve()
            if path in files or imaging_dir in path.parents:
                return text
    return None


# ----------------------------------------------------------------------------------------------------------------
# One stage
# ----------------------------------------------------------------------------------------------------------------
def roi_rule(args: argparse.Namespace) -> roi.RoiRule:
    """The ROI rule of the stage-2 flags (``--roi-margin``, ``--roi-breast-margin``, ``--roi-min-fgt``,
    ``--roi-clip-to-breast``)."""
    return roi.RoiRule(margin_fraction=float(args.roi_margin),
                       breast_margin_fraction=float(args.roi_breast_margin),
                       min_fgt_fraction=float(args.roi_min_fgt),
                       clip_to_breast=bool(args.roi_clip_to_breast))


def stage_spec(stage: int, args: argparse.Namespace) -> StageSpec:
    """The :class:`StageSpec` of ``stage`` from the arguments (sizes checked).

    Raises:
        TrainingInputError: a size that is not one or two multiples of 32, or a batch size under 2.
    """
    s = str(stage)
    try:
        size = imaging.network_size(list(getattr(args, f"img_size_stage{s}")))
    except ValueError as error:
        raise TrainingInputError(f"--img-size-stage{s}: {error}") from None
    batch = getattr(args, f"batch_size_stage{s}")
    if batch < 2:
        raise TrainingInputError(f"--batch-size-stage{s} is {batch}; BatchNorm needs at least 2 images per batch")
    names = labels.TISSUE_CLASS_NAMES if stage == 1 else labels.LESION_CLASS_NAMES
    return StageSpec(stage=stage, class_names=tuple(names), metric_class=labels.FGT if stage == 1 else 0,
                     epochs=getattr(args, f"epochs_stage{s}"), lr=getattr(args, f"lr_stage{s}"), batch_size=batch,
                     size_hw=size, t0=getattr(args, f"t0_stage{s}"),
                     checkpoint_dir=Path(getattr(args, f"stage{s}_checkpoint_dir")), log_dir=Path(args.logdir) / f"stage{s}")


def model_config_for(stage: int, args: argparse.Namespace, encoder_weights: str | None) -> dict:
    """The model config of a stage (plain dict for ``models.build_model`` and the checkpoint)."""
    classes = len(labels.TISSUE_CLASS_NAMES) if stage == 1 else len(labels.LESION_CLASS_NAMES)
    if args.model == "aca_atrous_resunet":
        weights = None if str(encoder_weights).lower() in ("none", "") else encoder_weights
        return default_model_config(classes, args.encoder, weights)
    return {"name": args.model, "in_channels": 1, "classes": classes}


def _prepare_output_dirs(spec: StageSpec, args: argparse.Namespace, ctx: distributed.DistContext) -> None:
    """Refuse to mix with an earlier run unless --resume / --overwrite; with --overwrite delete its files."""
    earlier = sorted(spec.checkpoint_dir.glob(f"*stage{spec.stage}*.pth")) if spec.checkpoint_dir.is_dir() else []
    events = sorted(spec.log_dir.glob("events.out.tfevents.*")) if spec.log_dir.is_dir() else []
    if args.resume or not (earlier or events):
        return
    if not args.overwrite:
        shown = [str(p) for p in (earlier + events)[:3]]
        raise TrainingInputError(f"stage {spec.stage} has outputs of an earlier run ({', '.join(shown)} ...); pass "
                                 "--resume to continue it, --overwrite to start over, or choose other "
                                 f"--stage{spec.stage}-checkpoint-dir / --logdir folders")
    if ctx.is_main:
        for path in earlier + events + [spec.log_dir / "metrics.jsonl"]:
            path.unlink(missing_ok=True)
    distributed.barrier(ctx)


def _stage_data(spec: StageSpec, args: argparse.Namespace, ctx: distributed.DistContext, device: torch.device) -> dict:
    """Datasets of a stage and what the checkpoint needs to know about them."""
    if spec.stage == 1:
        table = tissue_table(args)
        preprocess_config = dict(imaging.DEFAULT_PREPROCESS)
        train_df, val_df, how = split_table(table, args)
        make = datasets.TissueDataset
        extra: dict = {}
        augment = datasets.tissue_augmentation(appearance=args.appearance_augmentation == "on")
    else:
        table = lesion_table(args)
        table = table[table["split"].astype(str) != "test"].reset_index(drop=True)
        stage1_path, stage1_state = stage1_checkpoint(args)
        try:
            crops, info = roi_crops.build_roi_crops(stage1_path, table, spec.checkpoint_dir / "roi_crops",
                                                    roi_rule(args), device, ctx)
        except roi_crops.RoiCropError as error:
            raise TrainingInputError(str(error)) from None
        preprocess_config = dict(stage1_state["preprocess_config"])
        train_df, val_df, how = split_table(crops, args)
        coverage = {"all": roi_crops.roi_coverage(pd.concat([train_df, val_df])),
                    "train": roi_crops.roi_coverage(train_df), "val": roi_crops.roi_coverage(val_df)}
        extra = {"crops": info, "coverage": coverage}
        make = datasets.LesionDataset
        augment = datasets.lesion_augmentation()
        if ctx.is_main:
            state = "reused" if info["reused"] else "made"
            print(f"stage 2: ROI crops {state} in {info['folder']} ({len(crops)} images, "
                  f"{len(info['skipped'])} skipped) from {stage1_path}")
            print(f"stage 2: ROI lesion coverage (lesion pixels inside the FGT ROI / all lesion pixels): "
                  f"all {coverage['all']:.4f}, train {coverage['train']:.4f}, val {coverage['val']:.4f}")
            for skipped in info["skipped"]:
                print(f"stage 2: skipped {skipped['image_file_path']}: {skipped['reason']}", file=sys.stderr)
    crop_input = spec.stage == 2  # the crops are already preprocessed 8-bit images
    train_set = make(train_df, spec.size_hw, None if crop_input else preprocess_config, SeedableAugment(augment))
    val_set = make(val_df, spec.size_hw, None if crop_input else preprocess_config, None)
    per_step = spec.batch_size * ctx.world_size
    if len(train_set) < per_step:
        raise TrainingInputError(f"stage {spec.stage}: {len(train_set)} training images cannot fill one batch of "
                                 f"{spec.batch_size} per process x {ctx.world_size} process(es) (the last partial "
                                 f"batch is dropped); lower --batch-size-stage{spec.stage} or add data")
    if ctx.is_main:
        print(f"stage {spec.stage}: {len(train_set)} training / {len(val_set)} validation images ({how}); "
              f"network input {spec.size_hw[0]}x{spec.size_hw[1]} px")
    return {"train": train_set, "val": val_set, "preprocess_config": preprocess_config, **extra}


def _check_resumable(state: dict, spec: StageSpec, model_config: dict, path: Path) -> None:
    saved = {k: v for k, v in state["model_config"].items() if k != "encoder_weights"}
    wanted = {k: v for k, v in model_config.items() if k != "encoder_weights"}
    if saved != wanted or list(state["input_size"]) != list(spec.size_hw):
        raise TrainingInputError(
            f"cannot resume from {path}: it holds model {saved} at input {state['input_size']}, but the arguments ask "
            f"for {wanted} at {list(spec.size_hw)}; use the same --model/--encoder/--img-size-stage{spec.stage} or "
            "--overwrite to start over")


def train_stage(stage: int, args: argparse.Namespace, ctx: distributed.DistContext, device: torch.device) -> dict:
    """Train one stage from scratch or from ``last_stageN.pth``; returns ``{"best_metric", "epoch", "stopped"}``.

    Raises:
        TrainingInputError: bad arguments or data (nothing trained).
        NonFiniteLossError: NaN / inf loss; the checkpoints of the last finished epoch are kept.
    """
    spec = stage_spec(stage, args)
    _prepare_output_dirs(spec, args, ctx)
    last_path = spec.path("last")
    resume_state = None
    if args.resume:
        if last_path.is_file():
            resume_state = checkpoints.load_checkpoint(last_path, map_location="cpu")
        elif ctx.is_main:  # main() checked that some stage has one: this stage had not started yet
            print(f"stage {stage}: --resume but {last_path} does not exist yet; starting from scratch")
    if resume_state is not None and (resume_state.get("early_stopped") or int(resume_state["epoch"]) >= spec.epochs):
        if ctx.is_main:
            print(f"stage {stage}: {last_path} is complete (epoch {resume_state['epoch']}, best "
                  f"{resume_state['metric_name']} {resume_state['best_metric']:.4f}); nothing to resume")
        return {"best_metric": float(resume_state["best_metric"]), "epoch": int(resume_state["epoch"]), "stopped": True}

    seed_everything(args.seed + ctx.rank, args.deterministic, device.type)
    data = _stage_data(spec, args, ctx, device)

    weights = args.encoder_weights
    if stage == 2 and args.stage2_init_from_stage1:
        weights = str(_stage1_path(args))
    model_config = model_config_for(stage, args, weights)
    if resume_state is not None:
        _check_resumable(resume_state, spec, model_config, last_path)
    build_config = dict(model_config)
    if resume_state is not None and "encoder_weights" in build_config:
        build_config["encoder_weights"] = None  # the weights come from the checkpoint
    try:
        model = build_model(build_config).to(device)
    except (RuntimeError, FileNotFoundError, ValueError) as error:  # offline ImageNet, bad --encoder-weights path
        raise TrainingInputError(checks.one_line(error)) from None
    except KeyError:  # segmentation-models-pytorch: an encoder name it does not know
        if args.model != "aca_atrous_resunet":
            raise
        raise TrainingInputError(f"--encoder {args.encoder} is not an encoder segmentation-models-pytorch knows; pass "
                                 "one of its encoder names (resnet34, the default; resnet18, efficientnet-b0, ...) or "
                                 "a timm encoder as tu-<name>") from None
    except (pickle.UnpicklingError, EOFError) as error:  # --encoder-weights: a file torch.load cannot read
        raise TrainingInputError(f"--encoder-weights {build_config.get('encoder_weights')} cannot be read as PyTorch "
                                 f"weights ({type(error).__name__}); {_ENCODER_WEIGHTS_ADVICE}") from None
    if args.sync_bn and ctx.enabled:
        if device.type != "cuda":
            raise TrainingInputError("--sync-bn works with CUDA processes under torchrun only")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    bare = model
    optimizer = torch.optim.AdamW(bare.parameters(), lr=spec.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=spec.t0, T_mult=args.t_mult)
    scaler = torch.amp.GradScaler("cuda", enabled=args.amp and device.type == "cuda")
    criterion = TissueLoss() if stage == 1 else LesionLoss()

    start_epoch, best, since_best = 0, float("-inf"), 0
    if resume_state is not None:
        bare.load_state_dict({k.removeprefix("module."): v for k, v in resume_state["model"].items()})
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["lr_scheduler"])
        if resume_state.get("scaler"):
            scaler.load_state_dict(resume_state["scaler"])
        start_epoch = int(resume_state["epoch"])
        best = float(resume_state["best_metric"])
        since_best = int(resume_state.get("epochs_since_best", 0))
        if ctx.is_main:
            set_rng_state(resume_state.get("rng_state", {}))
        else:  # only rank 0's RNG state is stored; the others get their own stream
            seed_everything(args.seed + ctx.rank + 1000 * start_epoch, args.deterministic, device.type)
        if stage == 2 and resume_state.get("roi", {}).get("crops_key") not in (None, data["crops"]["key"]) and ctx.is_main:
            print(f"stage 2: warning: the ROI crops changed since {last_path} was written (stage 1 or the lesion "
                  "files changed); the resumed run trains on the new crops", file=sys.stderr)
        if ctx.is_main:
            print(f"stage {stage}: resuming from {last_path} after epoch {start_epoch} (best {spec.metric_name} "
                  f"{best:.4f})")
    if ctx.enabled:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    train_sampler = EpochSampler(len(data["train"]), args.seed, True, ctx.rank, ctx.world_size)
    val_sampler = EpochSampler(len(data["val"]), args.seed, False, ctx.rank, ctx.world_size)
    train_loader = make_loader(data["train"], train_sampler, spec.batch_size, args, True, device)
    val_loader = make_loader(data["val"], val_sampler, spec.batch_size, args, False, device)

    writer = None
    if ctx.is_main:
        from torch.utils.tensorboard import SummaryWriter

        spec.log_dir.mkdir(parents=True, exist_ok=True)
        spec.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        writer = SummaryWriter(str(spec.log_dir), purge_step=start_epoch + 1 if resume_state is not None else None)
        atomic_write_text(spec.log_dir / "args.json", json.dumps(plain_args(args), indent=2, sort_keys=True))
        if stage == 2:
            for name, value in (("", "all"), ("_train", "train"), ("_val", "val")):
                writer.add_scalar(f"stage2/roi_lesion_coverage{name}", data["coverage"][value], 0)
            writer.flush()

    roi_settings = None  # what the stage-2 checkpoint records about its ROI
    if stage == 2:
        roi_settings = {**roi_rule(args).to_dict(),
                        "crops_key": data["crops"]["key"], "stage1_checkpoint_sha256": data["crops"]["stage1_sha256"],
                        "lesion_coverage": {k: float(v) for k, v in data["coverage"].items()}}
    stopped = False
    epoch = start_epoch
    try:
        for epoch in range(start_epoch + 1, spec.epochs + 1):
            epoch_start = time.perf_counter()
            train_sampler.set_epoch(epoch)
            val_sampler.set_epoch(epoch)
            train_stats = train_one_epoch(model, criterion, optimizer, train_loader, device, epoch, args, scaler, ctx,
                                          stage, spec.epochs)
            scheduler.step()
            distributed.broadcast_buffers(bare, ctx)
            want_panels = 2 if ctx.is_main and writer is not None and (epoch == 1 or epoch % max(args.image_every, 1) == 0) else 0
            val_stats = evaluate(bare, criterion, val_loader, device, spec.num_classes, args, ctx, want_panels)
            metric = val_stats["dice"][spec.metric_class]
            improved = metric > best
            if improved:
                best, since_best = metric, 0
            else:
                since_best += 1
            stopped = args.patience > 0 and since_best >= args.patience
            if ctx.is_main:
                save_epoch(spec, args, bare, model_config, data["preprocess_config"], optimizer, scheduler, scaler,
                           epoch, best, since_best, stopped, improved, val_stats, roi_settings)
                train_stats["epoch_seconds"] = time.perf_counter() - epoch_start  # train + validation + saving
                log_epoch(writer, spec, epoch, train_stats, val_stats)
                print_epoch(spec, epoch, train_stats, val_stats, best, improved)
            if stopped:
                if ctx.is_main:
                    print(f"stage {stage}: early stop after epoch {epoch}: no better {spec.metric_name} for "
                          f"{args.patience} epochs (best {best:.4f})")
                break
    except NonFiniteLossError as error:
        kept = f"{last_path} (epoch {epoch - 1})" if last_path.is_file() else "none (no epoch finished)"
        raise NonFiniteLossError(f"{error}: training stopped; the last good checkpoint is kept: {kept}. Lower "
                                 f"--lr-stage{stage} or --l1-lambda, or train without --amp") from None
    except (imaging.ImageReadError, ValueError, OSError, RuntimeError) as error:
        reason = _data_error(error)
        if reason is None:
            raise
        kept = (f"the checkpoints of epoch {epoch - 1} are kept ({last_path}; --resume continues)"
                if last_path.is_file() else "no epoch finished")
        table = args.tissue_csv or args.tissue_data_dir if stage == 1 else args.cancer_csv
        raise TrainingInputError(f"stage {stage} stopped in epoch {epoch}: {checks.one_line(reason)}; fix or "
                                 f"replace the file, or remove its row from {table}; {kept}") from None
    finally:
        if writer is not None:
            writer.close()
    distributed.barrier(ctx)
    return {"best_metric": best, "epoch": epoch, "stopped": stopped}
