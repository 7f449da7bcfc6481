"""Train the cascade: stage 1 (tissue) and stage 2 (lesions in the FGT region of interest), on one or many devices.

Stage 1 learns 4 tissue classes (background, adipose, fibroglandular tissue (FGT), pectoral muscle) on whole
mammograms. Stage 2 learns lesions on the crops that the trained stage 1 gives: every lesion image goes through
``cascade.Cascade.tissue_and_roi`` (the code inference runs: preprocessing, orientation normalisation, stage 1, the
FGT box with its margin), the preprocessed image and its (equally mirrored) lesion mask are cut to that box, and the
crops are cached under ``<stage2-checkpoint-dir>/roi_crops/<key>/`` (the key hashes the stage-1 checkpoint file, its
preprocessing config and input size, the ROI margin and the lesion files, so a new stage 1 gives new crops).

Recipe (the project issue): AdamW (weight decay 1e-4), CosineAnnealingWarmRestarts stepped once per epoch
(T_0 10 / 15 epochs for stage 1 / 2, T_mult 2), stage-1 loss 0.5 Dice + 0.5 cross-entropy, stage-2 loss Dice + BCE,
plus an L1 weight penalty; the best checkpoint is the one with the highest validation Dice of FGT (stage 1) or of
the lesion (stage 2). Validation Dice is pooled over the whole validation split (sum of intersections over sum of
sizes, ``metrics.dice_from_counts``) on hard predictions at the network's input size (letterboxed images; stage 2 on
the ROI crops).

Outputs (rank 0 only):

- ``<stageN-checkpoint-dir>/best_stageN.pth``, ``stageN_epoch{E}.pth`` (the last ``--keep-epoch-checkpoints``),
  ``last_stageN.pth`` (what ``--resume`` continues from: weights, optimizer, scheduler, AMP scaler, RNG states,
  early-stopping counter). The format is ``checkpoints.make_checkpoint``'s, written atomically, readable with
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
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import cv2
import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

import cascade
import checkpoints
import cli
import datasets
import distributed
import imaging
import labels
import roi
import runners
from losses import LesionLoss, TissueLoss, l1_penalty
from metrics import dice_from_counts
from fileio import atomic_write_text, file_sha256
from models import MODEL_REGISTRY, build_model, default_model_config

#: Version of the ROI-crop cache layout; part of the cache key (bump when the crop files change meaning).
CROP_CACHE_VERSION = 1

#: Exit statuses of :func:`main`.
EXIT_OK, EXIT_INPUT_ERROR, EXIT_NONFINITE_LOSS = 0, 2, 3


class TrainingInputError(Exception):
    """Bad command line or data for training; the message names what was expected, what was found and the fix."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message names the stage, epoch and step."""


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------
def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """Command-line flags of the training script (see the module docstring)."""
    parser = argparse.ArgumentParser(description="Train the two-stage cascade (stage 1 tissue, stage 2 lesions).",
                                     add_help=add_help,
                                     parents=[cli.runtime_parser("device", "workers", "seed", "deterministic", "amp")],
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
    data.add_argument("--fold", type=int, default=None, help="k-fold cross-validation: the validation fold, 0-based (default: %(default)s)")
    data.add_argument("--folds", type=int, default=None, help="k-fold cross-validation: number of folds, with --fold (default: %(default)s)")

    recipe = parser.add_argument_group("recipe")
    recipe.add_argument("--epochs-stage1", type=int, default=30, help="stage-1 epochs (default: %(default)s)")
    recipe.add_argument("--epochs-stage2", type=int, default=150, help="stage-2 epochs (default: %(default)s)")
    recipe.add_argument("--lr-stage1", type=float, default=1e-3, help="stage-1 AdamW learning rate (default: %(default)s)")
    recipe.add_argument("--lr-stage2", type=float, default=3e-4, help="stage-2 AdamW learning rate (default: %(default)s)")
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
    recipe.add_argument("--t-mult", type=int, default=2, help="factor of each next restart period (default: %(default)s)")
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

    out = parser.add_argument_group("outputs")
    out.add_argument("--stage1-checkpoint-dir", type=Path, default=Path("checkpoints/stage1"),
                     help="stage-1 checkpoints (default: %(default)s)")
    out.add_argument("--stage2-checkpoint-dir", type=Path, default=Path("checkpoints/stage2"),
                     help="stage-2 checkpoints and the ROI-crop cache (default: %(default)s)")
    out.add_argument("--logdir", type=Path, default=Path("runs/cascade"),
                     help="TensorBoard folder; stage N logs to <logdir>/stageN (default: %(default)s)")
    out.add_argument("--keep-epoch-checkpoints", type=int, default=3,
                     help="how many stageN_epoch{E}.pth files to keep (default: %(default)s)")
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
# Small helpers
# ----------------------------------------------------------------------------------------------------------------
def plain_args(args: argparse.Namespace) -> dict:
    """The arguments as plain JSON types (Path -> str, tuple -> list), for checkpoints and args.json."""
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
    return {k: plain(v) for k, v in vars(args).items()}


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
        "numpy": [str(name), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)],
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


def make_loader(dataset: Dataset, sampler: EpochSampler, batch_size: int, args: argparse.Namespace,
                train: bool, device: torch.device) -> DataLoader:
    """DataLoader over :class:`SeededItems`; training drops the last partial batch (BatchNorm never sees one image)."""
    kwargs: dict[str, Any] = {}
    if args.num_workers > 0:
        kwargs.update(persistent_workers=True, worker_init_fn=_worker_init, prefetch_factor=2)
        if args.worker_start_method != "default":
            kwargs["multiprocessing_context"] = args.worker_start_method
    return DataLoader(SeededItems(dataset), batch_size=batch_size, sampler=sampler, num_workers=args.num_workers,
                      pin_memory=device.type == "cuda", drop_last=train, **kwargs)


def split_table(table: pd.DataFrame, args: argparse.Namespace) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """Train / validation tables: k-fold, a fresh patient split, or the table's own ``split`` column.

    Rows with ``split == "test"`` never take part. Returns ``(train, val, description)``.

    Raises:
        TrainingInputError: an empty side, or a bad fold / fraction.
    """
    table = table[table["split"].astype(str) != "test"].reset_index(drop=True)
    try:
        if args.folds is not None:
            train, val = datasets.kfold_by_patient(table, args.folds, args.fold, args.seed)
            how = f"patient-level fold {args.fold} of {args.folds} (seed {args.seed})"
        elif args.val_fraction is not None or not {"train", "val"} <= set(table["split"].astype(str)):
            fraction = 0.2 if args.val_fraction is None else args.val_fraction
            train, val = datasets.split_by_patient(table, fraction, args.seed)
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
    return train, val, how


def tissue_table(args: argparse.Namespace) -> pd.DataFrame:
    """The stage-1 table from ``--tissue-csv`` or ``--tissue-data-dir`` (a raw folder or a workspace)."""
    if (args.tissue_csv is None) == (args.tissue_data_dir is None):
        raise TrainingInputError("stage 1 needs exactly one of --tissue-csv (workspace/tissue_dataset.csv) or "
                                 "--tissue-data-dir (a DDSM tissue folder with fgt_seg/ and fgt_seg_labels/)")
    source = args.tissue_csv
    if source is None:
        source = args.tissue_data_dir
        if (source / "tissue_dataset.csv").is_file():
            source = source / "tissue_dataset.csv"
    try:
        table = datasets.read_tissue_table(source)
    except (FileNotFoundError, ValueError) as error:
        raise TrainingInputError(str(error)) from None
    check_files_exist(table, ("image_file_path", "label_file_path"), source)
    return table


def check_files_exist(table: pd.DataFrame, columns: tuple[str, ...], source) -> None:
    """Raise ``TrainingInputError`` listing every file named in ``columns`` that does not exist (before training).

    Cells may hold several paths joined by ";" (merged lesion masks); empty cells mean "none".
    """
    missing = []
    for column in columns:
        for cell in table[column].fillna("").astype(str):
            missing += [path for path in cell.split(";") if path.strip() and not Path(path.strip()).is_file()]
    if missing:
        shown = "\n  ".join(missing[:10]) + (f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise TrainingInputError(f"{source} names {len(missing)} file(s) that do not exist:\n  {shown}\n"
                                 "fix the paths (relative paths are resolved against the CSV's folder) or re-run "
                                 "prepare_to_train.py")


# ----------------------------------------------------------------------------------------------------------------
# Stage-2 crops from the trained stage 1
# ----------------------------------------------------------------------------------------------------------------
def _read_merged_mask(cell: str, shape: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    for path in (p for p in str(cell).split(datasets.MASK_PATH_SEPARATOR) if p.strip()):
        part = imaging.read_mask(path, kind="binary")
        if part.shape != shape:
            raise ValueError(f"mask {path!r} has shape {part.shape} but its image has {shape}")
        mask |= part
    return mask


def crop_cache_key(stage1_sha256: str, stage1_checkpoint: dict, margin: float, table: pd.DataFrame) -> str:
    """16-hex-digit key of a ROI-crop cache: stage-1 file, preprocessing, input size, margin and lesion files."""
    files = []
    for image, masks in zip(table["image_file_path"], table["roi_mask_file_path"]):
        for path in [image] + [p for p in str(masks).split(datasets.MASK_PATH_SEPARATOR) if p.strip()]:
            stat = os.stat(path) if os.path.exists(path) else None
            files.append([str(path), stat.st_size if stat else -1, stat.st_mtime_ns if stat else -1])
    material = {
        "version": CROP_CACHE_VERSION,
        "stage1_sha256": stage1_sha256,
        "preprocess_config": stage1_checkpoint["preprocess_config"],
        "input_size": list(stage1_checkpoint["input_size"]),
        "margin_fraction": float(margin),
        "min_side": roi.ROI_MIN_SIDE,
        "files": files,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]


def build_roi_crops(stage1_path: Path, table: pd.DataFrame, cache_root: Path, margin: float,
                    device: torch.device, ctx: distributed.DistContext) -> tuple[pd.DataFrame, dict]:
    """Make (or reuse) the stage-2 training crops: stage 1 -> FGT ROI -> crop of image and mask.

    For every row of ``table`` (a lesion table from ``datasets.read_lesion_table``): read the image and the union of
    its masks, run ``cascade.Cascade(stage-1 checkpoint).tissue_and_roi`` (preprocessing + orientation
    normalisation + stage 1 + ``fgt_roi_box`` with ``margin``), mirror the mask like the image, cut both to the
    ROI box and write them as PNGs (image 8-bit preprocessed, mask 0/255). Under torchrun each process crops its
    share of the rows; rank 0 merges. Rows that cannot be read are skipped and listed in ``crop_report.json``.

    Args:
        stage1_path: stage-1 checkpoint file.
        table: lesion table (absolute paths), all rows to crop.
        cache_root: ``<stage2-checkpoint-dir>/roi_crops``; the crops go to ``<cache_root>/<key>/``.
        margin: ROI margin fraction (see ``roi.fgt_roi_box``).
        device: where stage 1 runs.
        ctx: distributed context.

    Returns:
        ``(crops, info)``: the crop table (``datasets.read_lesion_table`` of ``crops.csv``: the lesion table's
        columns with crop paths, plus ``original_image_file_path``, ``roi_y0/x0/y1/x1``, ``roi_source``, ``flipped``,
        ``stage1_confidence``, ``lesion_pixels_inside``, ``lesion_pixels_total``) and ``info`` (``key``, ``folder``,
        ``reused``, ``skipped``, ``stage1_sha256``).

    Raises:
        TrainingInputError: the file is not a stage-1 checkpoint, or no row could be cropped.
    """
    checkpoint = checkpoints.load_checkpoint(stage1_path)
    if int(checkpoint["stage"]) != 1:
        raise TrainingInputError(f"{stage1_path} is a stage-{checkpoint['stage']} checkpoint; stage-2 crops need a "
                                 "stage-1 checkpoint (--stage1-checkpoint)")
    sha = file_sha256(stage1_path)
    key = crop_cache_key(sha, checkpoint, margin, table)
    folder = cache_root / key
    crops_csv = folder / "crops.csv"
    info = {"key": key, "folder": str(folder), "reused": crops_csv.is_file(), "skipped": [], "stage1_sha256": sha}
    if not info["reused"]:
        runner = cascade.Cascade(checkpoint, None, device=device, roi_margin=margin)
        rows, skipped = [], []
        mine = range(ctx.rank, len(table), ctx.world_size)
        for i in tqdm(mine, desc="stage-2 ROI crops", disable=None if ctx.is_main else True, leave=False):
            record = table.iloc[i].to_dict()
            try:
                pixels = imaging.read_image(record["image_file_path"]).pixels
                mask = _read_merged_mask(record["roi_mask_file_path"], pixels.shape)
                found = runner.tissue_and_roi(pixels)
            except (imaging.ImageReadError, ValueError, OSError) as error:
                skipped.append({"row": int(i), "image_file_path": record["image_file_path"], "reason": str(error)})
                continue
            if found.flipped:
                mask = np.ascontiguousarray(mask[:, ::-1])
            box = found.roi_box
            stem = Path(record["image_file_path"]).stem
            image_rel = f"images/{i:05d}_{stem}.png"
            imaging.write_png(folder / image_rel, np.ascontiguousarray(found.image[box.slices()]))
            mask_rel = ""
            if str(record["roi_mask_file_path"]).strip():
                mask_rel = f"masks/{i:05d}_{stem}_mask.png"
                imaging.write_png(folder / mask_rel, (mask[box.slices()] * 255).astype(np.uint8))
            rows.append({**record, "row": int(i), "original_image_file_path": record["image_file_path"],
                         "original_roi_mask_file_path": record["roi_mask_file_path"],
                         "image_file_path": image_rel, "roi_mask_file_path": mask_rel,
                         "roi_y0": box.y0, "roi_x0": box.x0, "roi_y1": box.y1, "roi_x1": box.x1,
                         "roi_source": found.roi_source, "flipped": bool(found.flipped),
                         "stage1_confidence": float(found.confidence),
                         "lesion_pixels_inside": int(mask[box.slices()].sum()), "lesion_pixels_total": int(mask.sum())})
        part = folder / f".part{ctx.rank}.json"
        atomic_write_text(part, json.dumps({"rows": rows, "skipped": skipped}))
        distributed.barrier(ctx)
        if ctx.is_main:
            rows, skipped = [], []
            for rank in range(ctx.world_size):
                piece = json.loads((folder / f".part{rank}.json").read_text(encoding="utf-8"))
                rows += piece["rows"]
                skipped += piece["skipped"]
            rows.sort(key=lambda r: r["row"])
            skipped.sort(key=lambda r: r["row"])
            report = {"key": key, "stage1_checkpoint": str(stage1_path), "stage1_sha256": sha,
                      "margin_fraction": float(margin), "rows": len(rows), "skipped": skipped}
            atomic_write_text(folder / "crop_report.json", json.dumps(report, indent=2))
            if rows:
                frame = pd.DataFrame(rows).drop(columns=["row"])
                atomic_write_text(crops_csv, frame.to_csv(index=False))  # written last: marks the cache complete
            for rank in range(ctx.world_size):
                (folder / f".part{rank}.json").unlink(missing_ok=True)
        distributed.barrier(ctx)
    report_path = folder / "crop_report.json"
    if report_path.is_file():
        info["skipped"] = json.loads(report_path.read_text(encoding="utf-8"))["skipped"]
    if not crops_csv.is_file():
        raise TrainingInputError(f"no lesion image could be cropped ({len(info['skipped'])} skipped; reasons in "
                                 f"{report_path}); check --cancer-csv")
    return datasets.read_lesion_table(crops_csv), info


def roi_coverage(table: pd.DataFrame) -> float:
    """Share of lesion pixels inside the ROI boxes: sum(inside) / sum(total) over the table (NaN without lesions)."""
    total = float(pd.to_numeric(table["lesion_pixels_total"]).sum())
    return float(pd.to_numeric(table["lesion_pixels_inside"]).sum()) / total if total > 0 else float("nan")


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------
def _finite_or_raise(loss: torch.Tensor, ctx: distributed.DistContext, device: torch.device, where: str) -> None:
    if not distributed.all_true(bool(torch.isfinite(loss.detach()).item()), ctx, device):
        raise NonFiniteLossError(f"non-finite training loss ({loss.item()}) at {where}")


def train_one_epoch(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader,
                    device: torch.device, epoch: int, args: argparse.Namespace, scaler: torch.amp.GradScaler,
                    ctx: distributed.DistContext, stage: int, epochs: int) -> dict:
    """One pass over the training loader; returns averages over all processes.

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
    steps = len(loader) if not args.max_batches_per_epoch else min(len(loader), args.max_batches_per_epoch)
    bar = tqdm(total=steps, desc=f"stage {stage} epoch {epoch}/{epochs}", disable=None if ctx.is_main else True,
               leave=False, dynamic_ncols=True)
    step = 0
    for step, batch in enumerate(loader, start=1):
        if step > steps:
            break
        images = batch["image"].to(device, non_blocking=True)
        masks = batch["mask"].to(device, non_blocking=True)
        with torch.autocast(device.type, enabled=args.amp):
            seg_loss = criterion(model(images), masks)
        l1 = l1_penalty(model, args.l1_lambda).to(device)
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
             args: argparse.Namespace, ctx: distributed.DistContext, panels: int = 0) -> dict:
    """Validation loss and pooled per-class Dice of hard predictions, summed over all processes.

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
    steps = len(loader) if not args.max_batches_per_epoch else min(len(loader), args.max_batches_per_epoch)
    for step, batch in enumerate(loader, start=1):
        if step > steps:
            break
        images = batch["image"].to(device, non_blocking=True)
        masks = batch["mask"].to(device, non_blocking=True)
        with torch.autocast(device.type, enabled=args.amp):
            logits = model(images)
        loss = criterion(logits, masks)
        if num_classes == 1:
            predicted, truth = (logits[:, 0] > 0).long(), (masks[:, 0] > 0.5).long()
        else:
            predicted, truth = logits.argmax(dim=1), masks.long()
        confusion += torch.bincount((truth * classes + predicted).flatten(), minlength=classes * classes)
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
# One stage
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class StageSpec:
    """What differs between the two stages."""

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


def _stage_data(spec: StageSpec, args: argparse.Namespace, ctx: distributed.DistContext, device: torch.device,
                stage1_path: Path | None) -> dict:
    """Datasets of a stage and what the checkpoint needs to know about them."""
    if spec.stage == 1:
        table = tissue_table(args)
        preprocess_config = dict(imaging.DEFAULT_PREPROCESS)
        train_df, val_df, how = split_table(table, args)
        make = datasets.TissueDataset
        extra: dict = {}
        augment = datasets.tissue_augmentation()
    else:
        if args.cancer_csv is None:
            raise TrainingInputError("stage 2 needs --cancer-csv (workspace/unified_segmentation_dataset.csv)")
        try:
            table = datasets.read_lesion_table(args.cancer_csv)
        except (FileNotFoundError, ValueError) as error:
            raise TrainingInputError(str(error)) from None
        check_files_exist(table, ("image_file_path", "roi_mask_file_path"), args.cancer_csv)
        table = table[table["split"].astype(str) != "test"].reset_index(drop=True)
        if not stage1_path.is_file():
            raise TrainingInputError(f"stage-1 checkpoint {stage1_path} not found; train stage 1 first "
                                     "(--train-stage1 or --train-both) or pass --stage1-checkpoint")
        crops, info = build_roi_crops(stage1_path, table, spec.checkpoint_dir / "roi_crops", args.roi_margin,
                                      device, ctx)
        preprocess_config = dict(checkpoints.load_checkpoint(stage1_path)["preprocess_config"])
        train_df, val_df, how = split_table(crops, args)
        coverage = {"all": roi_coverage(pd.concat([train_df, val_df])), "train": roi_coverage(train_df),
                    "val": roi_coverage(val_df)}
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
    stage1_path = Path(args.stage1_checkpoint) if args.stage1_checkpoint else Path(args.stage1_checkpoint_dir) / "best_stage1.pth"
    data = _stage_data(spec, args, ctx, device, stage1_path if stage == 2 else None)

    weights = args.encoder_weights
    if stage == 2 and args.stage2_init_from_stage1:
        weights = str(stage1_path)
    model_config = model_config_for(stage, args, weights)
    if resume_state is not None:
        _check_resumable(resume_state, spec, model_config, last_path)
    build_config = dict(model_config)
    if resume_state is not None and "encoder_weights" in build_config:
        build_config["encoder_weights"] = None  # the weights come from the checkpoint
    try:
        model = build_model(build_config).to(device)
    except (RuntimeError, FileNotFoundError, ValueError) as error:  # offline ImageNet, bad --encoder-weights path
        raise TrainingInputError(str(error)) from None
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

    roi = None
    if stage == 2:
        roi = {"margin_fraction": float(args.roi_margin), "min_side": roi.ROI_MIN_SIDE,
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
                _save_epoch(spec, args, bare, model_config, data["preprocess_config"], optimizer, scheduler, scaler,
                            epoch, best, since_best, stopped, improved, val_stats, roi)
                train_stats["epoch_seconds"] = time.perf_counter() - epoch_start  # train + validation + saving
                _log_epoch(writer, spec, epoch, train_stats, val_stats)
                _print_epoch(spec, epoch, train_stats, val_stats, best, improved)
            if stopped:
                if ctx.is_main:
                    print(f"stage {stage}: early stop after epoch {epoch}: no better {spec.metric_name} for "
                          f"{args.patience} epochs (best {best:.4f})")
                break
    except NonFiniteLossError as error:
        kept = f"{last_path} (epoch {epoch - 1})" if last_path.is_file() else "none (no epoch finished)"
        raise NonFiniteLossError(f"{error}: training stopped; the last good checkpoint is kept: {kept}. Lower "
                                 f"--lr-stage{stage} or --l1-lambda, or train without --amp") from None
    finally:
        if writer is not None:
            writer.close()
    distributed.barrier(ctx)
    return {"best_metric": best, "epoch": epoch, "stopped": stopped}


def _save_epoch(spec: StageSpec, args: argparse.Namespace, model: nn.Module, model_config: dict,
                preprocess_config: dict, optimizer, scheduler, scaler, epoch: int, best: float, since_best: int,
                stopped: bool, improved: bool, val_stats: dict, roi: dict | None) -> None:
    """Write last / epoch / best checkpoints (atomically) and prune old epoch checkpoints (rank 0)."""
    state = checkpoints.make_checkpoint(
        stage=spec.stage, model=model, model_config=model_config, preprocess_config=preprocess_config,
        input_size=spec.size_hw, epoch=epoch, best_metric=best, metric_name=spec.metric_name, optimizer=optimizer,
        lr_scheduler=scheduler, scaler=scaler, rng_state=rng_state(), args=plain_args(args), roi=roi)
    state["epochs_since_best"] = int(since_best)
    state["early_stopped"] = bool(stopped)
    state["val_metrics"] = {f"val/dice_{name}": float(d) for name, d in zip(spec.class_names, val_stats["dice"])}
    state["val_metrics"]["val/loss"] = float(val_stats["loss"])
    checkpoints.save_checkpoint(state, spec.path("epoch", epoch))
    if improved:
        checkpoints.save_checkpoint(state, spec.path("best"))
    checkpoints.save_checkpoint(state, spec.path("last"))  # last: a crash before this line resumes the epoch before
    numbered = []
    for path in spec.checkpoint_dir.glob(f"stage{spec.stage}_epoch*.pth"):
        suffix = path.stem.rsplit("epoch", 1)[-1]
        if suffix.isdigit():
            numbered.append((int(suffix), path))
    for _, path in sorted(numbered)[: max(len(numbered) - max(args.keep_epoch_checkpoints, 1), 0)]:
        path.unlink(missing_ok=True)


def _log_epoch(writer, spec: StageSpec, epoch: int, train_stats: dict, val_stats: dict) -> None:
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


def _print_epoch(spec: StageSpec, epoch: int, train_stats: dict, val_stats: dict, best: float, improved: bool) -> None:
    dice = " ".join(f"{n} {d:.4f}" for n, d in zip(spec.class_names, val_stats["dice"]))
    print(f"stage {spec.stage} | epoch {epoch}/{spec.epochs} | train loss {train_stats['loss']:.4f} "
          f"(seg {train_stats['seg_loss']:.4f} + l1 {train_stats['l1_penalty']:.4f}) | val loss "
          f"{val_stats['loss']:.4f} | dice {dice} | lr {train_stats['lr']:.3g} | {train_stats['seconds']:.1f} s train, "
          f"{train_stats['epoch_seconds']:.1f} s epoch | "
          f"best {spec.class_names[spec.metric_class]} {best:.4f}{' *' if improved else ''}", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------
def _check_args(args: argparse.Namespace) -> None:
    if (args.fold is None) != (args.folds is None):
        raise TrainingInputError("--fold and --folds go together (e.g. --fold 0 --folds 5)")
    if args.val_fraction is not None and args.folds is not None:
        raise TrainingInputError("choose --val-fraction or --fold/--folds, not both")
    if args.num_workers < 0 or args.max_batches_per_epoch < 0 or args.patience < 0:
        raise TrainingInputError("--num-workers, --max-batches-per-epoch and --patience must be >= 0")
    if not 0 <= args.roi_margin < 1:
        raise TrainingInputError(f"--roi-margin must be in [0, 1), got {args.roi_margin}")
    if (args.train_stage1 or args.train_both) and (args.tissue_csv is None) == (args.tissue_data_dir is None):
        raise TrainingInputError("stage 1 needs exactly one of --tissue-csv or --tissue-data-dir")
    if (args.train_stage2 or args.train_both) and args.cancer_csv is None:
        raise TrainingInputError("stage 2 needs --cancer-csv (workspace/unified_segmentation_dataset.csv)")
    for stage in (1, 2):
        if getattr(args, f"epochs_stage{stage}") < 1:
            raise TrainingInputError(f"--epochs-stage{stage} must be >= 1")


def main(args: argparse.Namespace) -> int:
    """Train the stages the flags ask for. Returns 0 on success, 2 for bad input, 3 for a non-finite loss."""
    try:
        _check_args(args)
        device = runners.resolve_device(args.device)
        if args.resume:
            stages = [s for s, wanted in ((1, args.train_stage1 or args.train_both), (2, args.train_stage2 or args.train_both)) if wanted]
            lasts = [stage_spec(s, args).path("last") for s in stages]
            if not any(path.is_file() for path in lasts):
                raise TrainingInputError(f"--resume: nothing to resume from ({', '.join(map(str, lasts))} not found); "
                                         "check --stage1-checkpoint-dir / --stage2-checkpoint-dir, or drop --resume")
    except (TrainingInputError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    cudnn_before = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    ctx = distributed.init_distributed(device.type)
    if ctx.enabled and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
    try:
        if args.train_stage1 or args.train_both:
            train_stage(1, args, ctx, device)
        if args.train_stage2 or args.train_both:
            train_stage(2, args, ctx, device)
        return EXIT_OK
    except TrainingInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except NonFiniteLossError as error:
        if ctx.is_main:
            print(f"error: {error}", file=sys.stderr)
        return EXIT_NONFINITE_LOSS
    finally:
        distributed.cleanup(ctx)
        torch.use_deterministic_algorithms(deterministic_before)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn_before


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
