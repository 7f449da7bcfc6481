"""The training engine: seeding, the epoch's data order, one epoch, validation, saving.

What lives here (``mammo/training/trainer.py`` puts it together into one stage from a
``mammo.training.config.TrainConfig``; ``mammo/cli/train.py`` is the command line). Every function takes plain values
or a part of the config (:class:`~mammo.training.config.LoopConfig`), never the command line's namespace:

- seeding and RNG state: :func:`seed_everything` (once per process, ``seed + rank``), :func:`rng_state` /
  :func:`set_rng_state` (stored in ``last_stageN.pth`` for ``--resume``), :func:`item_seed`;
- the data of an epoch as a pure function of ``(seed, epoch)``: :class:`SeedableAugment`, :class:`SeededItems`,
  :class:`EpochSampler`, :func:`make_loader` (with its worker start-up);
- the loop: :func:`train_one_epoch` and :func:`evaluate` (pooled Dice, image panels), each returning a dict;
  :class:`NonFiniteLossError` when the loss becomes NaN / infinite;
- one epoch's outputs (rank 0): :func:`save_epoch` (last / best / epoch checkpoints, keeping the newest
  ``--keep-epoch-checkpoints``; only ``last`` keeps the optimizer, scheduler, scaler and RNG states),
  :func:`log_epoch` (TensorBoard scalars and panels, ``metrics.jsonl``), :func:`print_epoch` (the one summary line);
  :class:`StageSpec` names what differs between the stages; :func:`plain_args` turns the command line into the
  plain JSON dict stored in ``args.json`` and in every checkpoint.

Reproducibility: the training order of epoch ``e`` is a permutation drawn from ``torch.Generator`` seeded with
``seed + e`` and the augmentation of each item is seeded from ``(seed, epoch, index)``, so an epoch does not depend
on what earlier epochs consumed (with any number of loader workers).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import cv2
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from mammo.weights import checkpoints
from mammo.core import distributed
from mammo.nn.losses import l1_penalty
from mammo.core.metrics import dice_from_counts
from mammo.training.config import LoopConfig


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message names the stage, epoch and step."""


# ----------------------------------------------------------------------------------------------------------------
# Seeds and RNG state
# ----------------------------------------------------------------------------------------------------------------
def seed_everything(seed: int, deterministic: bool, device_type: str = "cpu") -> None:
    """Seed Python, NumPy and torch (all devices) once; with ``deterministic`` allow deterministic kernels only.

    On CUDA a few kernels PyTorch uses here have no deterministic version (e.g. the backward of bilinear
    upsampling); they warn instead of failing (``warn_only``), so CUDA runs are close to, not bit-exactly,
    repeatable. ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` is set when absent, as cuBLAS needs for determinism
    (PyTorch's reproducibility notes).
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=device_type == "cuda")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def rng_state() -> dict:
    """Python, NumPy and torch RNG states as plain types and tensors (loadable with ``weights_only=True``)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [int(version), [int(v) for v in internal], gauss],
        "numpy": [str(name), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                  float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` saved (missing parts are left alone)."""
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    if "numpy" in state:
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), int(pos), int(has_gauss),
                             float(cached)))
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def item_seed(seed: int, epoch: int, index: int) -> int:
    """Augmentation seed of dataset item ``index`` in ``epoch``: 32 bits mixed by NumPy's SeedSequence."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, index]).generate_state(1)[0])


def _worker_init(worker_id: int) -> None:
    """DataLoader worker start: OpenCV single-threaded (the workers are the parallelism) and seeded NumPy/random."""
    cv2.setNumThreads(0)
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


# ----------------------------------------------------------------------------------------------------------------
# Data: per-epoch seeded order and augmentation
# ----------------------------------------------------------------------------------------------------------------
class SeedableAugment:
    """Picklable wrapper of an albumentations pipeline whose random state is set per item by :class:`SeededItems`.

    It has no ``set_random_seed`` attribute on purpose: the datasets then leave its seed alone (they would reseed
    each process once), and the seed of every item is set just before the item is made.
    """

    def __init__(self, pipeline: Callable) -> None:
        self.pipeline = pipeline

    def reseed(self, seed: int) -> None:
        self.pipeline.set_random_seed(int(seed))

    def __call__(self, **data):
        return self.pipeline(**data)


class SeededItems(Dataset):
    """Map ``(index, seed)`` keys (from :class:`EpochSampler`) to items, seeding the augmentation per item.

    Args:
        dataset: a ``datasets.TissueDataset`` / ``LesionDataset`` whose ``augment`` is a :class:`SeedableAugment`
            or None.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, seed = key
        augment = getattr(self.dataset, "augment", None)
        if isinstance(augment, SeedableAugment):
            augment.reseed(seed)
        return self.dataset[index]


class EpochSampler(Sampler):
    """Each process's share of an epoch, as ``(index, augmentation seed)`` keys; a pure function of the epoch.

    Training (``shuffle=True``): a permutation from ``torch.Generator().manual_seed(seed + epoch)``, padded by
    repeating its head to a multiple of ``world_size`` (as ``DistributedSampler`` does, so that every process runs
    the same number of steps), then every ``world_size``-th entry from ``rank``. Validation (``shuffle=False``): the
    indices in order, sharded without padding (pooled metrics count every image exactly once).

    Call :meth:`set_epoch` before each epoch.
    """

    def __init__(self, size: int, seed: int, shuffle: bool, rank: int = 0, world_size: int = 1) -> None:
        self.size, self.seed, self.shuffle = int(size), int(seed), bool(shuffle)
        self.rank, self.world_size = int(rank), int(world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _indices(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))[self.rank::self.world_size]
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        total = math.ceil(self.size / self.world_size) * self.world_size
        order += (order * math.ceil(total / max(self.size, 1)))[: total - self.size]
        return order[self.rank::self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(i, item_seed(self.seed, self.epoch, i)) for i in self._indices()])

    def __len__(self) -> int:
        if self.shuffle:
            return math.ceil(self.size / self.world_size)
        return len(range(self.rank, self.size, self.world_size))


def make_loader(dataset: Dataset, sampler: EpochSampler, batch_size: int, num_workers: int,
                train: bool, device: torch.device, start_method: str = "default") -> DataLoader:
    """DataLoader over :class:`SeededItems`; training drops the last partial batch (BatchNorm never sees one image).

    Args:
        num_workers: worker processes (0: items are made in this process); workers persist across epochs.
        start_method: how workers start: ``default`` (the platform's), ``spawn``, ``fork`` or ``forkserver``.
    """
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs.update(persistent_workers=True, worker_init_fn=_worker_init, prefetch_factor=2)
        if start_method != "default":
            kwargs["multiprocessing_context"] = start_method
    return DataLoader(SeededItems(dataset), batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=device.type == "cuda", drop_last=train, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------
def _capped_steps(loader: DataLoader, max_batches: int) -> int:
    """Batches one pass runs: all of ``loader``, or at most ``max_batches`` (0 = no cap)."""
    return len(loader) if not max_batches else min(len(loader), max_batches)


def _device_batches(loader: DataLoader, steps: int,
                    device: torch.device) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """``(step, images, masks)`` of the first ``steps`` batches of ``loader`` (step 1-based), moved to ``device``."""
    for step, batch in enumerate(loader, start=1):
        if step > steps:
            break
        yield step, batch["image"].to(device, non_blocking=True), batch["mask"].to(device, non_blocking=True)


def _finite_or_raise(loss: torch.Tensor, ctx: distributed.DistContext, device: torch.device, where: str) -> None:
    if not distributed.all_true(bool(torch.isfinite(loss.detach()).item()), ctx, device):
        raise NonFiniteLossError(f"non-finite training loss ({loss.item()}) at {where}")


def train_one_epoch(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader,
                    device: torch.device, epoch: int, loop: LoopConfig, scaler: torch.amp.GradScaler,
                    ctx: distributed.DistContext, stage: int, epochs: int) -> dict:
    """One pass over the training loader (at most ``loop.max_batches_per_epoch`` batches, 0 = all; autocast with
    ``loop.amp``; L1 penalty weight ``loop.l1_lambda``); returns averages over all processes.

    Returns:
        ``{"loss", "seg_loss", "l1_penalty", "lr", "steps", "images", "seconds"}``: ``loss = seg_loss + l1_penalty``
        averaged over images (float), the learning rate of the epoch, steps and images of this process, wall time.

    Raises:
        NonFiniteLossError: a NaN / infinite loss on any process (all processes raise at the same step).
    """
    model.train()
    start = time.perf_counter()
    lr = float(optimizer.param_groups[0]["lr"])
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # seg_loss * n, l1 * n, n
    steps = _capped_steps(loader, loop.max_batches_per_epoch)
    bar = tqdm(total=steps, desc=f"stage {stage} epoch {epoch}/{epochs}", disable=None if ctx.is_main else True,
               leave=False, dynamic_ncols=True)
    step = 0
    for step, images, masks in _device_batches(loader, steps, device):
        with torch.autocast(device.type, enabled=loop.amp):
            seg_loss = criterion(model(images), masks)
        l1 = l1_penalty(model, loop.l1_lambda).to(device)
        loss = seg_loss + l1
        _finite_or_raise(loss, ctx, device, f"stage {stage}, epoch {epoch}, step {step}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        n = images.shape[0]
        sums += torch.tensor([seg_loss.item() * n, l1.item() * n, n], dtype=torch.float64, device=device)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    images_here = int(sums[2].item())
    distributed.all_reduce_sum(sums, ctx)
    count = max(float(sums[2].item()), 1.0)
    seg, l1_mean = float(sums[0].item()) / count, float(sums[1].item()) / count
    return {"loss": seg + l1_mean, "seg_loss": seg, "l1_penalty": l1_mean, "lr": lr, "steps": min(step, steps),
            "images": images_here, "seconds": time.perf_counter() - start}


def _panel(image: torch.Tensor, truth: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
    """``(1, H, 3W)`` float in [0, 1]: input | truth | prediction side by side."""
    return torch.cat([image.float().cpu(), truth.float().cpu(), prediction.float().cpu()], dim=-1).clamp(0, 1)


@torch.inference_mode()
def evaluate(model: nn.Module, criterion: nn.Module, loader: DataLoader, device: torch.device, num_classes: int,
             loop: LoopConfig, ctx: distributed.DistContext, panels: int = 0) -> dict:
    """Validation loss and pooled per-class Dice of hard predictions, summed over all processes.

    At most ``loop.max_batches_per_epoch`` batches (0 = all), autocast with ``loop.amp``; ``panels`` image panels
    from the first batches.

    Stage 1 (``num_classes`` 4): argmax classes; stage 2 (``num_classes`` 1): lesion where the logit > 0
    (probability > 0.5). Counts (intersection, predicted, true pixels per class) are summed over the whole split and
    over processes, then ``metrics.dice_from_counts`` (1.0 for a class absent from both).

    Returns:
        ``{"loss", "dice" (list per class), "pixel_accuracy", "images", "panels" (list of (1, H, 3W) tensors,
        rank 0 only)}``.
    """
    model.eval()
    classes = max(num_classes, 2)
    confusion = torch.zeros(classes * classes, dtype=torch.int64, device=device)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss * n, n
    shown: list[torch.Tensor] = []
    steps = _capped_steps(loader, loop.max_batches_per_epoch)
    for _, images, masks in _device_batches(loader, steps, device):
        with torch.autocast(device.type, enabled=loop.amp):
            logits = model(images)
        loss = criterion(logits, masks)
        if num_classes == 1:
            predicted, truth = (logits[:, 0] > 0).long(), (masks[:, 0] > 0.5).long()
        else:
            predicted, truth = logits.argmax(dim=1), masks.long()
        counted = truth < classes  # partial-label codes (labels.ADIPOSE_OR_FGT, labels.IGNORE) are not scored
        confusion += torch.bincount((truth * classes + predicted)[counted], minlength=classes * classes)
        sums += torch.tensor([loss.item() * images.shape[0], images.shape[0]], dtype=torch.float64, device=device)
        for i in range(min(panels - len(shown), images.shape[0])):
            scale = 1.0 / max(num_classes - 1, 1)
            shown.append(_panel(images[i], truth[i:i + 1] * scale, predicted[i:i + 1] * scale))
    distributed.all_reduce_sum(confusion, ctx)
    distributed.all_reduce_sum(sums, ctx)
    matrix = confusion.view(classes, classes).cpu().numpy().astype(np.int64)  # rows truth, columns prediction
    dice = dice_from_counts(np.diag(matrix), matrix.sum(axis=0), matrix.sum(axis=1))
    if num_classes == 1:
        dice = dice[1:]
    total = int(matrix.sum())
    return {"loss": float(sums[0].item()) / max(float(sums[1].item()), 1.0), "dice": [float(d) for d in dice],
            "pixel_accuracy": float(np.trace(matrix)) / total if total else 1.0, "images": int(sums[1].item()),
            "panels": shown}


# ----------------------------------------------------------------------------------------------------------------
# What one epoch leaves behind (rank 0)
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class StageSpec:
    """What differs between the two stages (built from the config by ``mammo.training.trainer.stage_spec``)."""

    stage: int
    class_names: tuple[str, ...]
    metric_class: int  # index into class_names of the metric that picks the best checkpoint
    epochs: int
    lr: float
    batch_size: int
    size_hw: tuple[int, int]
    t0: int
    checkpoint_dir: Path
    log_dir: Path

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def metric_name(self) -> str:
        return f"val/dice_{self.class_names[self.metric_class]}"

    def path(self, kind: str, epoch: int = 0) -> Path:
        names = {"last": f"last_stage{self.stage}.pth", "best": f"best_stage{self.stage}.pth",
                 "epoch": f"stage{self.stage}_epoch{epoch}.pth"}
        return self.checkpoint_dir / names[kind]


def plain_args(values: Mapping[str, Any]) -> dict:
    """The command line's values (``vars`` of its namespace) as plain JSON types (Path -> str, tuple -> list), for
    checkpoints and args.json: the same keys, values converted."""
    def plain(value):
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        return str(value)
    return {k: plain(v) for k, v in values.items()}


def save_epoch(spec: StageSpec, model: nn.Module, model_config: dict, preprocess_config: dict, optimizer, scheduler,
               scaler, epoch: int, best: float, since_best: int, stopped: bool, improved: bool, val_stats: dict,
               roi: dict | None, *, arguments: Mapping[str, Any], keep_epochs: int) -> None:
    """Write last / epoch / best checkpoints (atomically) and prune old epoch checkpoints (rank 0).

    ``arguments`` (plain JSON types, :func:`plain_args`) is stored as the checkpoint's ``args``; the newest
    ``keep_epochs`` epoch checkpoints are kept (0: none is written).

    ``last_stageN.pth`` holds the training state as well (optimizer, scheduler, scaler, RNG: what ``--resume``
    needs); ``best_stageN.pth`` and ``stageN_epoch{E}.pth`` hold the weights and settings only
    (``checkpoints.without_training_state``): a third of the size with AdamW.
    """
    state = checkpoints.make_checkpoint(
        stage=spec.stage, model=model, model_config=model_config, preprocess_config=preprocess_config,
        input_size=spec.size_hw, epoch=epoch, best_metric=best, metric_name=spec.metric_name, optimizer=optimizer,
        lr_scheduler=scheduler, scaler=scaler, rng_state=rng_state(), args=dict(arguments), roi=roi)
    state["epochs_since_best"] = int(since_best)
    state["early_stopped"] = bool(stopped)
    state["val_metrics"] = {f"val/dice_{name}": float(d) for name, d in zip(spec.class_names, val_stats["dice"])}
    state["val_metrics"]["val/loss"] = float(val_stats["loss"])
    lean = checkpoints.without_training_state(state)
    if keep_epochs > 0:
        checkpoints.save_checkpoint(lean, spec.path("epoch", epoch))
    if improved:
        checkpoints.save_checkpoint(lean, spec.path("best"))
    checkpoints.save_checkpoint(state, spec.path("last"))  # last: a crash before this line resumes the epoch before
    numbered = []
    for path in spec.checkpoint_dir.glob(f"stage{spec.stage}_epoch*.pth"):
        suffix = path.stem.rsplit("epoch", 1)[-1]
        if suffix.isdigit():
            numbered.append((int(suffix), path))
    for _, path in sorted(numbered)[: max(len(numbered) - keep_epochs, 0)]:
        path.unlink(missing_ok=True)


def log_epoch(writer, spec: StageSpec, epoch: int, train_stats: dict, val_stats: dict) -> None:
    """TensorBoard scalars and image panels of one epoch (step = epoch), and its line in ``metrics.jsonl``."""
    writer.add_scalar("train/loss", train_stats["loss"], epoch)
    writer.add_scalar("train/seg_loss", train_stats["seg_loss"], epoch)
    writer.add_scalar("train/l1_penalty", train_stats["l1_penalty"], epoch)
    writer.add_scalar("val/loss", val_stats["loss"], epoch)
    for name, dice in zip(spec.class_names, val_stats["dice"]):
        writer.add_scalar(f"val/dice_{name}", dice, epoch)
    if spec.stage == 1:
        writer.add_scalar("val/pixel_accuracy", val_stats["pixel_accuracy"], epoch)
    writer.add_scalar("lr", train_stats["lr"], epoch)
    writer.add_scalar("time/train_s", train_stats["seconds"], epoch)
    writer.add_scalar("time/epoch_s", train_stats["epoch_seconds"], epoch)
    for i, panel in enumerate(val_stats["panels"]):
        writer.add_image(f"val/panel_{i}", panel, epoch, dataformats="CHW")
    writer.flush()
    record = {"stage": spec.stage, "epoch": epoch, **{f"train/{k}": v for k, v in train_stats.items()},
              "val/loss": val_stats["loss"], "val/pixel_accuracy": val_stats["pixel_accuracy"],
              "val/images": val_stats["images"],
              **{f"val/dice_{n}": d for n, d in zip(spec.class_names, val_stats["dice"])}}
    with open(spec.log_dir / "metrics.jsonl", "a", encoding="utf-8") as stream:
        stream.write(json.dumps(record) + "\n")


def print_epoch(spec: StageSpec, epoch: int, train_stats: dict, val_stats: dict, best: float, improved: bool) -> None:
    """The epoch's one summary line on stdout (`` *`` marks a new best checkpoint)."""
    dice = " ".join(f"{n} {d:.4f}" for n, d in zip(spec.class_names, val_stats["dice"]))
    print(f"stage {spec.stage} | epoch {epoch}/{spec.epochs} | train loss {train_stats['loss']:.4f} "
          f"(seg {train_stats['seg_loss']:.4f} + l1 {train_stats['l1_penalty']:.4f}) | val loss "
          f"{val_stats['loss']:.4f} | dice {dice} | lr {train_stats['lr']:.3g} | {train_stats['seconds']:.1f} s train, "
          f"{train_stats['epoch_seconds']:.1f} s epoch | "
          f"best {spec.class_names[spec.metric_class]} {best:.4f}{' *' if improved else ''}", flush=True)
