"""What a training run is asked to do, as frozen values: :class:`TrainConfig` and its parts.

``mammo/cli/train.py`` builds one :class:`TrainConfig` from its flags (``config_from_args``) after checking them;
every function of ``mammo/training/`` takes this object, one of its parts, or plain values. Nothing here is
checked: sizes and batch sizes are checked by ``mammo.training.trainer.stage_spec``, files and folders by
``mammo.training.trainer.check_inputs``.

Parts:

- :class:`StageConfig`: one stage's recipe and checkpoint folder (``TrainConfig.stage1`` / ``stage2``);
- :class:`DataConfig`: the tables and the stage-1 checkpoint that makes the stage-2 crops;
- :class:`SplitConfig`: how the tables are split into training and validation rows (``trainer.split_table``);
- :class:`NetworkConfig`: the network and its initialisation (``trainer.model_config_for``);
- :class:`LoopConfig`: what one training / validation pass needs (``engine.train_one_epoch``, ``engine.evaluate``);
- the ROI rule of stage 2 is a ``mammo.imaging.roi.RoiRule`` (already frozen).

Defaults are the command line's. ``TrainConfig.arguments`` keeps the command line itself as plain JSON types
(``engine.plain_args``): what ``args.json`` and every checkpoint's ``args`` hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mammo.imaging.roi import RoiRule


@dataclass(frozen=True)
class StageConfig:
    """One stage's recipe and checkpoint folder.

    Attributes:
        epochs: epochs to train (>= 1); default 30 (stage 1) / 150 (stage 2).
        lr: AdamW learning rate; default 1e-3 / 3e-4.
        batch_size: images (stage 2: crops) per batch and process, >= 2 (BatchNorm); default 8 / 12.
        img_size: network input in pixels, ``(side,)`` (square) or ``(height, width)``, multiples of 32; images are
            letterboxed into it; default ``(512,)`` / ``(384,)``.
        t0: period of the first cosine warm restart, in epochs; default 10 / 15.
        checkpoint_dir: folder of ``best_stageN.pth``, ``last_stageN.pth`` and ``stageN_epoch{E}.pth`` (stage 2:
            also the ROI-crop cache ``roi_crops/``); default ``checkpoints/stageN``.
    """

    epochs: int
    lr: float
    batch_size: int
    img_size: tuple[int, ...]
    t0: int
    checkpoint_dir: Path


#: The command line's defaults of each stage.
STAGE1_DEFAULTS = StageConfig(epochs=30, lr=1e-3, batch_size=8, img_size=(512,), t0=10,
                              checkpoint_dir=Path("checkpoints/stage1"))
STAGE2_DEFAULTS = StageConfig(epochs=150, lr=3e-4, batch_size=12, img_size=(384,), t0=15,
                              checkpoint_dir=Path("checkpoints/stage2"))


@dataclass(frozen=True)
class DataConfig:
    """The training data.

    Attributes:
        tissue_csv: stage 1: ``tissue_dataset.csv`` of ``prepare_to_train.py`` (or None).
        tissue_data_dir: stage 1: a DDSM tissue-label folder or a workspace folder (or None); exactly one of the two
            is needed for stage 1.
        cancer_csv: stage 2: ``unified_segmentation_dataset.csv`` (or None).
        stage1_checkpoint: the stage-1 checkpoint that makes the stage-2 crops; None: ``best_stage1.pth`` in the
            stage-1 checkpoint folder (:attr:`TrainConfig.stage1_checkpoint_path`).
        appearance_augmentation: stage 1: intensity curves, CLAHE and blur / sharpening
            (``datasets.appearance_augmentation``); default True.
    """

    tissue_csv: Path | None = None
    tissue_data_dir: Path | None = None
    cancer_csv: Path | None = None
    stage1_checkpoint: Path | None = None
    appearance_augmentation: bool = True


@dataclass(frozen=True)
class SplitConfig:
    """How a table is split into training and validation rows (``trainer.split_table``).

    Attributes:
        seed: the run's seed (default 42): the patient split, and also (``TrainConfig.seed``) the weights'
            initialisation, each epoch's order and each item's augmentation.
        val_fraction: re-split by patient with this fraction of images in validation, in (0, 1); None: the table's
            ``split`` column, else 0.2.
        fold: k-fold cross-validation: the validation fold, 0-based (with ``folds``), or None.
        folds: k-fold cross-validation: the number of folds (>= 2), or None.
        source_repeat: ``"SOURCE=N"`` texts: the training rows of that table source are repeated N times per epoch;
            default none.
    """

    seed: int = 42
    val_fraction: float | None = None
    fold: int | None = None
    folds: int | None = None
    source_repeat: tuple[str, ...] = ()


@dataclass(frozen=True)
class NetworkConfig:
    """The network of both stages and its initialisation.

    Attributes:
        model: a ``models.MODEL_REGISTRY`` name; default ``aca_atrous_resunet``.
        encoder: segmentation-models-pytorch encoder of ``aca_atrous_resunet``; default ``resnet34``.
        encoder_weights: ``imagenet``, ``none`` or a path to an encoder state_dict / suite checkpoint; default
            ``imagenet``.
        stage2_init_from_stage1: stage 2's encoder starts from the stage-1 checkpoint's (instead of
            ``encoder_weights``); default False.
        sync_bn: synchronise BatchNorm statistics across processes (CUDA + torchrun only); default False.
    """

    model: str = "aca_atrous_resunet"
    encoder: str = "resnet34"
    encoder_weights: str = "imagenet"
    stage2_init_from_stage1: bool = False
    sync_bn: bool = False


@dataclass(frozen=True)
class LoopConfig:
    """What one training or validation pass needs.

    Attributes:
        amp: automatic mixed precision (``torch.autocast``; the gradient scaler works on CUDA only); default False.
        l1_lambda: weight of the L1 penalty on conv / linear weights added to the training loss (0 = off); default
            5e-5.
        max_batches_per_epoch: cap on the batches of each training and validation pass (0 = no cap); default 0.
    """

    amp: bool = False
    l1_lambda: float = 5e-5
    max_batches_per_epoch: int = 0


@dataclass(frozen=True)
class TrainConfig:
    """One training run: which stages, their recipes, the data, the outputs (see the module docstring).

    Attributes:
        stages: the stages to train, in order: ``(1,)``, ``(2,)`` or ``(1, 2)``.
        stage1, stage2: each stage's recipe and checkpoint folder.
        data, split, network, loop: see :class:`DataConfig`, :class:`SplitConfig`, :class:`NetworkConfig`,
            :class:`LoopConfig`.
        roi_rule: how stage 1's FGT box is grown into the stage-2 crop (stored in the stage-2 checkpoint).
        logdir: TensorBoard folder; stage N logs to ``<logdir>/stageN``; default ``runs/cascade``.
        deterministic: deterministic algorithms only (``engine.seed_everything``); default False.
        num_workers: DataLoader worker processes (0: load in the training process); default 4.
        worker_start_method: ``default`` (the platform's), ``spawn``, ``fork`` or ``forkserver``.
        weight_decay: AdamW weight decay; default 1e-4.
        t_mult: factor of each next cosine warm-restart period; default 2.
        patience: early stopping after this many epochs without a better validation Dice (0 = off); default 0.
        keep_epoch_checkpoints: how many ``stageN_epoch{E}.pth`` files to keep (0 writes none); default 3.
        image_every: validation image panels every this many epochs (and at epoch 1); default 5.
        resume: continue from ``last_stageN.pth``; default False.
        overwrite: start over, deleting the stage's earlier outputs; default False.
        arguments: the command line as plain JSON types (``engine.plain_args``): ``args.json`` and the checkpoints'
            ``args``. Read only.
    """

    stages: tuple[int, ...]
    stage1: StageConfig = STAGE1_DEFAULTS
    stage2: StageConfig = STAGE2_DEFAULTS
    data: DataConfig = DataConfig()
    split: SplitConfig = SplitConfig()
    network: NetworkConfig = NetworkConfig()
    loop: LoopConfig = LoopConfig()
    roi_rule: RoiRule = RoiRule()
    logdir: Path = Path("runs/cascade")
    deterministic: bool = False
    num_workers: int = 4
    worker_start_method: str = "default"
    weight_decay: float = 1e-4
    t_mult: int = 2
    patience: int = 0
    keep_epoch_checkpoints: int = 3
    image_every: int = 5
    resume: bool = False
    overwrite: bool = False
    arguments: dict[str, Any] = field(default_factory=dict)

    @property
    def seed(self) -> int:
        """The run's seed (``split.seed``): split, weights' initialisation, epoch order, augmentation."""
        return self.split.seed

    def stage(self, number: int) -> StageConfig:
        """The :class:`StageConfig` of stage ``number`` (1 or 2)."""
        return self.stage1 if number == 1 else self.stage2

    @property
    def stage1_checkpoint_path(self) -> Path:
        """The stage-1 checkpoint of stage 2: ``data.stage1_checkpoint``, else ``best_stage1.pth`` in the stage-1
        checkpoint folder (not checked)."""
        if self.data.stage1_checkpoint is not None:
            return Path(self.data.stage1_checkpoint)
        return Path(self.stage1.checkpoint_dir) / "best_stage1.pth"
