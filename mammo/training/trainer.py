"""One training stage, from a :class:`~mammo.training.config.TrainConfig` to its checkpoints.

What lives here (the command line is ``mammo/cli/train.py``, the config ``mammo/training/config.py``; the inputs
checked before training, the data tables and the stages' settings are in ``mammo/training/inputs.py``; the engine
pieces this module calls (seeding, loaders, one epoch, validation, saving, logging) in ``mammo/training/engine.py``;
the stage-2 crops in ``mammo/training/roi_crops.py``; the datasets in ``mammo/training/datasets.py``, the tables'
readers and patient splits in ``mammo/data/splits.py``):

- :func:`train_stage`: output folders (``--resume`` / ``--overwrite``), the stage's datasets (:func:`_stage_data`;
  stage 2: ROI crops and their lesion coverage), model (:func:`_build_stage_model`), AdamW, cosine warm restarts,
  AMP scaler, resuming from ``last_stageN.pth`` (:func:`_resume`), DistributedDataParallel, TensorBoard, then the
  epochs with early stopping (:func:`_run_epochs`, :func:`_one_epoch`);
- :func:`_data_error`: a file that cannot be read during an epoch stops training with one line naming it
  (``inputs.TrainingInputError``, exit 2).

Every function takes the config, one of its parts or plain values, never the command line's namespace.

Recipe (the project issue): AdamW (weight decay 1e-4), CosineAnnealingWarmRestarts stepped once per epoch
(T_0 10 / 15 epochs for stage 1 / 2, T_mult 2), stage-1 loss 0.5 Dice + 0.5 cross-entropy, stage-2 loss Dice + BCE,
plus an L1 weight penalty; the best checkpoint is the one with the highest validation Dice of FGT (stage 1) or of
the lesion (stage 2).
"""

from __future__ import annotations

import json
import pickle
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from mammo import imaging
from mammo.cascade import checks
from mammo.core import distributed
from mammo.core.fileio import atomic_write_text
from mammo.data import splits
from mammo.nn.losses import LesionLoss, TissueLoss
from mammo.nn.models import build_model
from mammo.training import datasets, roi_crops
from mammo.training.config import TrainConfig
from mammo.training.engine import (EpochSampler, NonFiniteLossError, SeedableAugment, StageSpec, evaluate,
                                   log_epoch, make_loader, print_epoch, save_epoch, seed_everything, set_rng_state,
                                   train_one_epoch)
from mammo.training.inputs import (ENCODER_WEIGHTS_ADVICE, TrainingInputError, lesion_table, model_config_for,
                                   split_table, stage1_checkpoint, stage_spec, tissue_table)
from mammo.weights import checkpoints


# ----------------------------------------------------------------------------------------------------------------
# Data files that cannot be read during an epoch
# ----------------------------------------------------------------------------------------------------------------
def _data_error(error: BaseException) -> str | None:
    """The one-line reason when ``error`` comes from reading a data file during an epoch, else None (a bug).

    Errors raised in the main process (``--num-workers 0``) are recognised by their type and by passing through
    ``mammo/training/datasets.py``, ``mammo/data/splits.py`` or the ``mammo/imaging`` package; errors re-raised
    from a DataLoader worker carry the worker's traceback as their message, whose last line is the original
    ``Type: message``.
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
# A stage's output folders
# ----------------------------------------------------------------------------------------------------------------
def _prepare_output_dirs(spec: StageSpec, resume: bool, overwrite: bool, ctx: distributed.DistContext) -> None:
    """Refuse to mix with an earlier run unless ``resume`` / ``overwrite``; with ``overwrite`` delete its files."""
    earlier = sorted(spec.checkpoint_dir.glob(f"*stage{spec.stage}*.pth")) if spec.checkpoint_dir.is_dir() else []
    events = sorted(spec.log_dir.glob("events.out.tfevents.*")) if spec.log_dir.is_dir() else []
    if resume or not (earlier or events):
        return
    if not overwrite:
        shown = [str(p) for p in (earlier + events)[:3]]
        raise TrainingInputError(f"stage {spec.stage} has outputs of an earlier run ({', '.join(shown)} ...); pass "
                                 "--resume to continue it, --overwrite to start over, or choose other "
                                 f"--stage{spec.stage}-checkpoint-dir / --logdir folders")
    if ctx.is_main:
        for path in earlier + events + [spec.log_dir / "metrics.jsonl"]:
            path.unlink(missing_ok=True)
    distributed.barrier(ctx)


# ----------------------------------------------------------------------------------------------------------------
# A stage's data
# ----------------------------------------------------------------------------------------------------------------
def _stage2_rows(spec: StageSpec, config: TrainConfig, ctx: distributed.DistContext,
                 device: torch.device) -> tuple[pd.DataFrame, pd.DataFrame, str, dict, dict]:
    """Stage 2's training and validation rows: the ROI crops (made or reused) of the lesion table's non-test rows,
    split; returns ``(train, val, how, preprocess_config of the stage-1 checkpoint, {"crops": info, "coverage"})``
    and prints the crops, the lesion coverage and the skipped rows (rank 0)."""
    table = lesion_table(config.data)
    table = table[table["split"].astype(str) != "test"].reset_index(drop=True)
    stage1_path, stage1_state = stage1_checkpoint(config)
    try:
        crops, info = roi_crops.build_roi_crops(stage1_path, table, spec.checkpoint_dir / "roi_crops",
                                                config.roi_rule, device, ctx)
    except roi_crops.RoiCropError as error:
        raise TrainingInputError(str(error)) from None
    preprocess_config = dict(stage1_state["preprocess_config"])
    train_df, val_df, how = split_table(crops, config.split)
    coverage = {"all": roi_crops.roi_coverage(pd.concat([train_df, val_df])),
                "train": roi_crops.roi_coverage(train_df), "val": roi_crops.roi_coverage(val_df)}
    if ctx.is_main:
        state = "reused" if info["reused"] else "made"
        print(f"stage 2: ROI crops {state} in {info['folder']} ({len(crops)} images, "
              f"{len(info['skipped'])} skipped) from {stage1_path}")
        print(f"stage 2: ROI lesion coverage (lesion pixels inside the FGT ROI / all lesion pixels): "
              f"all {coverage['all']:.4f}, train {coverage['train']:.4f}, val {coverage['val']:.4f}")
        for skipped in info["skipped"]:
            print(f"stage 2: skipped {skipped['image_file_path']}: {skipped['reason']}", file=sys.stderr)
    return train_df, val_df, how, preprocess_config, {"crops": info, "coverage": coverage}


def _stage_data(spec: StageSpec, config: TrainConfig, ctx: distributed.DistContext, device: torch.device) -> dict:
    """Datasets of a stage and what the checkpoint needs to know about them: ``{"train", "val",
    "preprocess_config"}`` and for stage 2 ``"crops"`` (``roi_crops.build_roi_crops``'s info) and ``"coverage"``."""
    if spec.stage == 1:
        table = tissue_table(config.data)
        preprocess_config = dict(imaging.DEFAULT_PREPROCESS)
        train_df, val_df, how = split_table(table, config.split)
        make = datasets.TissueDataset
        extra: dict = {}
        augment = datasets.tissue_augmentation(appearance=config.data.appearance_augmentation)
    else:
        train_df, val_df, how, preprocess_config, extra = _stage2_rows(spec, config, ctx, device)
        make = datasets.LesionDataset
        augment = datasets.lesion_augmentation()
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


# ----------------------------------------------------------------------------------------------------------------
# One stage
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class _StageRun:
    """What the epochs of one stage work with (built by :func:`train_stage`)."""

    spec: StageSpec
    model: nn.Module  # what trains: ``bare``, or ``bare`` in DistributedDataParallel under torchrun
    bare: nn.Module
    model_config: dict
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts
    scaler: torch.amp.GradScaler
    data: dict  # _stage_data's
    train_loader: torch.utils.data.DataLoader | None = None
    val_loader: torch.utils.data.DataLoader | None = None
    writer: object | None = None  # TensorBoard SummaryWriter (rank 0)
    roi_settings: dict | None = None  # what the stage-2 checkpoint records about its ROI


@dataclass
class _Progress:
    """Where the epochs stand: the epoch running (or last run), the best metric, epochs since it, early stop."""

    epoch: int = 0
    best: float = float("-inf")
    since_best: int = 0
    stopped: bool = False


def _check_resumable(state: dict, spec: StageSpec, model_config: dict, path: Path) -> None:
    saved = {k: v for k, v in state["model_config"].items() if k != "encoder_weights"}
    wanted = {k: v for k, v in model_config.items() if k != "encoder_weights"}
    if saved != wanted or list(state["input_size"]) != list(spec.size_hw):
        raise TrainingInputError(
            f"cannot resume from {path}: it holds model {saved} at input {state['input_size']}, but the arguments ask "
            f"for {wanted} at {list(spec.size_hw)}; use the same --model/--encoder/--img-size-stage{spec.stage} or "
            "--overwrite to start over")


def _resume_state(spec: StageSpec, resume: bool, ctx: distributed.DistContext) -> dict | None:
    """``last_stageN.pth`` when resuming and it exists (loaded on the CPU), else None."""
    last_path = spec.path("last")
    if resume:
        if last_path.is_file():
            return checkpoints.load_checkpoint(last_path, map_location="cpu")
        if ctx.is_main:  # main() checked that some stage has one: this stage had not started yet
            print(f"stage {spec.stage}: --resume but {last_path} does not exist yet; starting from scratch")
    return None


def _build_stage_model(spec: StageSpec, config: TrainConfig, resume_state: dict | None, ctx: distributed.DistContext,
                       device: torch.device) -> tuple[nn.Module, dict]:
    """The stage's network on ``device`` (SyncBatchNorm with ``--sync-bn``) and its model config.

    Raises:
        TrainingInputError: a checkpoint to resume from with another model or size, weights that cannot be had
            (offline ImageNet, a bad ``--encoder-weights`` file), an unknown encoder, ``--sync-bn`` off CUDA.
    """
    network = config.network
    weights = network.encoder_weights
    if spec.stage == 2 and network.stage2_init_from_stage1:
        weights = str(config.stage1_checkpoint_path)
    model_config = model_config_for(spec.stage, network, weights)
    if resume_state is not None:
        _check_resumable(resume_state, spec, model_config, spec.path("last"))
    build_config = dict(model_config)
    if resume_state is not None and "encoder_weights" in build_config:
        build_config["encoder_weights"] = None  # the weights come from the checkpoint
    try:
        model = build_model(build_config).to(device)
    except (RuntimeError, FileNotFoundError, ValueError) as error:  # offline ImageNet, bad --encoder-weights path
        raise TrainingInputError(checks.one_line(error)) from None
    except KeyError:  # segmentation-models-pytorch: an encoder name it does not know
        if network.model != "aca_atrous_resunet":
            raise
        raise TrainingInputError(f"--encoder {network.encoder} is not an encoder segmentation-models-pytorch knows; "
                                 "pass one of its encoder names (resnet34, the default; resnet18, efficientnet-b0, "
                                 "...) or a timm encoder as tu-<name>") from None
    except (pickle.UnpicklingError, EOFError) as error:  # --encoder-weights: a file torch.load cannot read
        raise TrainingInputError(f"--encoder-weights {build_config.get('encoder_weights')} cannot be read as PyTorch "
                                 f"weights ({type(error).__name__}); {ENCODER_WEIGHTS_ADVICE}") from None
    if network.sync_bn and ctx.enabled:
        if device.type != "cuda":
            raise TrainingInputError("--sync-bn works with CUDA processes under torchrun only")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model, model_config


def _new_run(spec: StageSpec, config: TrainConfig, model: nn.Module, model_config: dict, data: dict,
             device: torch.device) -> _StageRun:
    """The stage's run around ``model``: AdamW, cosine warm restarts, the AMP scaler and the stage's loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=spec.t0, T_mult=config.t_mult)
    scaler = torch.amp.GradScaler("cuda", enabled=config.loop.amp and device.type == "cuda")
    criterion = TissueLoss() if spec.stage == 1 else LesionLoss()
    return _StageRun(spec=spec, model=model, bare=model, model_config=model_config, criterion=criterion,
                     optimizer=optimizer, scheduler=scheduler, scaler=scaler, data=data)


def _resume(run: _StageRun, state: dict, config: TrainConfig, ctx: distributed.DistContext,
            device: torch.device) -> _Progress:
    """Load weights, optimizer, scheduler, scaler and RNG state from ``state`` (``last_stageN.pth``); returns where
    the epochs stood."""
    spec, last_path = run.spec, run.spec.path("last")
    run.bare.load_state_dict({k.removeprefix("module."): v for k, v in state["model"].items()})
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["lr_scheduler"])
    if state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    progress = _Progress(epoch=int(state["epoch"]), best=float(state["best_metric"]),
                         since_best=int(state.get("epochs_since_best", 0)))
    if ctx.is_main:
        set_rng_state(state.get("rng_state", {}))
    else:  # only rank 0's RNG state is stored; the others get their own stream
        seed_everything(config.seed + ctx.rank + 1000 * progress.epoch, config.deterministic, device.type)
    if spec.stage == 2 and state.get("roi", {}).get("crops_key") not in (None, run.data["crops"]["key"]) \
            and ctx.is_main:
        print(f"stage 2: warning: the ROI crops changed since {last_path} was written (stage 1 or the lesion "
              "files changed); the resumed run trains on the new crops", file=sys.stderr)
    if ctx.is_main:
        print(f"stage {spec.stage}: resuming from {last_path} after epoch {progress.epoch} (best {spec.metric_name} "
              f"{progress.best:.4f})")
    return progress


def _open_outputs(run: _StageRun, config: TrainConfig, purge_step: int | None, ctx: distributed.DistContext) -> None:
    """Rank 0: the stage's folders, its TensorBoard writer (``purge_step``: drop events from that step on, when
    resuming), ``args.json`` and, for stage 2, the ROI lesion coverage at step 0. Sets ``run.writer``."""
    if not ctx.is_main:
        return
    from torch.utils.tensorboard import SummaryWriter

    spec = run.spec
    spec.log_dir.mkdir(parents=True, exist_ok=True)
    spec.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    run.writer = writer = SummaryWriter(str(spec.log_dir), purge_step=purge_step)
    atomic_write_text(spec.log_dir / "args.json", json.dumps(config.arguments, indent=2, sort_keys=True))
    if spec.stage == 2:
        for name, value in (("", "all"), ("_train", "train"), ("_val", "val")):
            writer.add_scalar(f"stage2/roi_lesion_coverage{name}", run.data["coverage"][value], 0)
        writer.flush()


def train_stage(stage: int, config: TrainConfig, ctx: distributed.DistContext, device: torch.device) -> dict:
    """Train one stage from scratch or from ``last_stageN.pth``; returns ``{"best_metric", "epoch", "stopped"}``.

    Raises:
        TrainingInputError: bad arguments or data (nothing trained).
        NonFiniteLossError: NaN / inf loss; the checkpoints of the last finished epoch are kept.
    """
    spec = stage_spec(stage, config)
    _prepare_output_dirs(spec, config.resume, config.overwrite, ctx)
    resume_state = _resume_state(spec, config.resume, ctx)
    if resume_state is not None and (resume_state.get("early_stopped") or int(resume_state["epoch"]) >= spec.epochs):
        if ctx.is_main:
            print(f"stage {stage}: {spec.path('last')} is complete (epoch {resume_state['epoch']}, best "
                  f"{resume_state['metric_name']} {resume_state['best_metric']:.4f}); nothing to resume")
        return {"best_metric": float(resume_state["best_metric"]), "epoch": int(resume_state["epoch"]), "stopped": True}

    seed_everything(config.seed + ctx.rank, config.deterministic, device.type)
    data = _stage_data(spec, config, ctx, device)
    model, model_config = _build_stage_model(spec, config, resume_state, ctx, device)
    run = _new_run(spec, config, model, model_config, data, device)
    progress = _Progress() if resume_state is None else _resume(run, resume_state, config, ctx, device)
    if ctx.enabled:
        device_ids = [device.index] if device.type == "cuda" else None
        run.model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    train_sampler = EpochSampler(len(data["train"]), config.seed, True, ctx.rank, ctx.world_size)
    val_sampler = EpochSampler(len(data["val"]), config.seed, False, ctx.rank, ctx.world_size)
    run.train_loader = make_loader(data["train"], train_sampler, spec.batch_size, config.num_workers, True, device,
                                   config.worker_start_method)
    run.val_loader = make_loader(data["val"], val_sampler, spec.batch_size, config.num_workers, False, device,
                                 config.worker_start_method)
    _open_outputs(run, config, progress.epoch + 1 if resume_state is not None else None, ctx)
    if stage == 2:
        run.roi_settings = {**config.roi_rule.to_dict(), "crops_key": data["crops"]["key"],
                            "stage1_checkpoint_sha256": data["crops"]["stage1_sha256"],
                            "lesion_coverage": {k: float(v) for k, v in data["coverage"].items()}}
    return _run_epochs(run, progress, config, ctx, device)


def _one_epoch(run: _StageRun, progress: _Progress, config: TrainConfig, ctx: distributed.DistContext,
               device: torch.device) -> None:
    """Train and validate epoch ``progress.epoch``, then (rank 0) save, log and print it; updates ``progress``
    (best metric, epochs since it, early stop)."""
    spec, epoch = run.spec, progress.epoch
    epoch_start = time.perf_counter()
    run.train_loader.sampler.set_epoch(epoch)
    run.val_loader.sampler.set_epoch(epoch)
    train_stats = train_one_epoch(run.model, run.criterion, run.optimizer, run.train_loader, device, epoch,
                                  config.loop, run.scaler, ctx, spec.stage, spec.epochs)
    run.scheduler.step()
    distributed.broadcast_buffers(run.bare, ctx)
    want_panels = 2 if ctx.is_main and run.writer is not None and (
        epoch == 1 or epoch % max(config.image_every, 1) == 0) else 0
    val_stats = evaluate(run.bare, run.criterion, run.val_loader, device, spec.num_classes, config.loop, ctx,
                         want_panels)
    metric = val_stats["dice"][spec.metric_class]
    improved = metric > progress.best
    if improved:
        progress.best, progress.since_best = metric, 0
    else:
        progress.since_best += 1
    progress.stopped = config.patience > 0 and progress.since_best >= config.patience
    if ctx.is_main:
        save_epoch(spec, run.bare, run.model_config, run.data["preprocess_config"], run.optimizer, run.scheduler,
                   run.scaler, epoch, progress.best, progress.since_best, progress.stopped, improved, val_stats,
                   run.roi_settings, arguments=config.arguments, keep_epochs=config.keep_epoch_checkpoints)
        train_stats["epoch_seconds"] = time.perf_counter() - epoch_start  # train + validation + saving
        log_epoch(run.writer, spec, epoch, train_stats, val_stats)
        print_epoch(spec, epoch, train_stats, val_stats, progress.best, improved)


def _run_epochs(run: _StageRun, progress: _Progress, config: TrainConfig, ctx: distributed.DistContext,
                device: torch.device) -> dict:
    """The epochs after ``progress.epoch`` up to the stage's last, or an early stop; returns ``train_stage``'s dict.

    Raises:
        NonFiniteLossError: NaN / inf loss (the message names the last good checkpoint and what to change).
        TrainingInputError: a data file that cannot be read (:func:`_data_error`; the message names it and the
            table to fix).
    """
    spec, stage = run.spec, run.spec.stage
    last_path = spec.path("last")
    try:
        for epoch in range(progress.epoch + 1, spec.epochs + 1):
            progress.epoch = epoch
            _one_epoch(run, progress, config, ctx, device)
            if progress.stopped:
                if ctx.is_main:
                    print(f"stage {stage}: early stop after epoch {epoch}: no better {spec.metric_name} for "
                          f"{config.patience} epochs (best {progress.best:.4f})")
                break
    except NonFiniteLossError as error:
        epoch = progress.epoch
        kept = f"{last_path} (epoch {epoch - 1})" if last_path.is_file() else "none (no epoch finished)"
        raise NonFiniteLossError(f"{error}: training stopped; the last good checkpoint is kept: {kept}. Lower "
                                 f"--lr-stage{stage} or --l1-lambda, or train without --amp") from None
    except (imaging.ImageReadError, ValueError, OSError, RuntimeError) as error:
        reason = _data_error(error)
        if reason is None:
            raise
        epoch = progress.epoch
        kept = (f"the checkpoints of epoch {epoch - 1} are kept ({last_path}; --resume continues)"
                if last_path.is_file() else "no epoch finished")
        data = config.data
        table = data.tissue_csv or data.tissue_data_dir if stage == 1 else data.cancer_csv
        raise TrainingInputError(f"stage {stage} stopped in epoch {epoch}: {checks.one_line(reason)}; fix or "
                                 f"replace the file, or remove its row from {table}; {kept}") from None
    finally:
        if run.writer is not None:
            run.writer.close()
    distributed.barrier(ctx)
    return {"best_metric": progress.best, "epoch": progress.epoch, "stopped": progress.stopped}
