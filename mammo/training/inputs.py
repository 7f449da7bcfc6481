"""What a training run reads and writes, checked before anything is trained; the stages' settings.

What lives here (the stage itself is in ``mammo/training/trainer.py``, the config in ``mammo/training/config.py``,
the command line in ``mammo/cli/train.py``):

- :class:`TrainingInputError`: bad command line or data, found before anything is trained (the script exits 2);
  :func:`check_inputs` finds it for every stage asked for before the first one starts (tables, their files, the
  stage-1 checkpoint, ``--encoder-weights``, output folders, sizes);
- data tables: :func:`split_table` (k-fold, a fresh patient split or the table's ``split`` column),
  :func:`repeat_sources` (``--source-repeat``), :func:`tissue_table` (``--tissue-csv`` / ``--tissue-data-dir``),
  :func:`lesion_table` (``--cancer-csv``), :func:`check_files_exist`; the tables are read by
  ``mammo.data.splits.read_tissue_table`` / ``read_lesion_table`` (``mammo.data.tables.read_table``: cells
  normalised, unknown splits refused);
- :func:`stage1_checkpoint`: the checkpoint that makes the stage-2 crops, checked (a file, a checkpoint, stage 1);
- a stage's settings: :func:`stage_spec` (``engine.StageSpec`` from the config, sizes checked),
  :func:`model_config_for`.

Every function takes the config (``mammo.training.config.TrainConfig``), one of its parts or plain values; the
flag names in messages are the command line's.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mammo import imaging
from mammo.cascade import checks
from mammo.core import labels
from mammo.data import splits, tables
from mammo.nn.models import default_model_config
from mammo.training.config import DataConfig, NetworkConfig, SplitConfig, TrainConfig
from mammo.training.engine import StageSpec


class TrainingInputError(Exception):
    """Bad command line or data for training; the message names what was expected, what was found and the fix."""


#: What ``--encoder-weights`` may be (the end of its error messages).
ENCODER_WEIGHTS_ADVICE = ("pass 'imagenet', 'none', an encoder state_dict (.pth) or a checkpoint of this suite "
                          "(best_stage1.pth)")


# ----------------------------------------------------------------------------------------------------------------
# Data tables
# ----------------------------------------------------------------------------------------------------------------
def split_table(table: pd.DataFrame, split: SplitConfig) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """Train / validation tables: k-fold, a fresh patient split, or the table's own ``split`` column.

    Rows with ``split == "test"`` never take part. The table's column is used when it names both ``train`` and
    ``val`` rows (values normalised by ``tables.read_table``: ``"train "`` is ``train``) and neither ``--folds`` nor
    ``--val-fraction`` asks for another split. The training rows of ``split.source_repeat``'s sources are repeated
    (:func:`repeat_sources`). Returns ``(train, val, description)``.

    Raises:
        TrainingInputError: an empty side, a bad fold / fraction, or a table whose split column names train and val
            rows but leaves other rows empty (they would silently take no part).
    """
    table = table[table["split"].astype(str) != "test"].reset_index(drop=True)
    split_values = set(table["split"].astype(str))
    if split.folds is None and split.val_fraction is None and {"train", "val"} <= split_values and "" in split_values:
        blank = int((table["split"].astype(str) == "").sum())
        raise TrainingInputError(f"the table's split column names train and val rows but leaves {blank} row(s) "
                                 "empty, which would take no part; fill them in, or pass --val-fraction F to re-split "
                                 "all rows by patient")
    try:
        if split.folds is not None:
            train, val = splits.kfold_by_patient(table, split.folds, split.fold, split.seed)
            how = f"patient-level fold {split.fold} of {split.folds} (seed {split.seed})"
        elif split.val_fraction is not None or not {"train", "val"} <= set(table["split"].astype(str)):
            fraction = 0.2 if split.val_fraction is None else split.val_fraction
            train, val = splits.split_by_patient(table, fraction, split.seed)
            how = f"patient-level split, {fraction:.0%} validation (seed {split.seed})"
        else:
            train = table[table["split"] == "train"].reset_index(drop=True)
            val = table[table["split"] == "val"].reset_index(drop=True)
            how = "the table's split column"
    except ValueError as error:
        raise TrainingInputError(f"cannot split the data into train and validation: {error}") from None
    if len(train) == 0 or len(val) == 0:
        raise TrainingInputError(f"the split ({how}) leaves {len(train)} training and {len(val)} validation images; "
                                 "both need at least one (use --val-fraction or more data)")
    return repeat_sources(train, list(split.source_repeat or [])), val, how


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


def tissue_table(data: DataConfig) -> pd.DataFrame:
    """The stage-1 table from ``data.tissue_csv`` (``--tissue-csv``) or ``data.tissue_data_dir``
    (``--tissue-data-dir``: a raw folder or a workspace), its files checked (:func:`check_files_exist`).

    Raises:
        TrainingInputError: neither or both flags, a file where a folder goes or the reverse, a table that cannot be
            used (``tables.read_table``), or files that do not exist or are not images.
    """
    if (data.tissue_csv is None) == (data.tissue_data_dir is None):
        raise TrainingInputError("stage 1 needs exactly one of --tissue-csv (workspace/tissue_dataset.csv) or "
                                 "--tissue-data-dir (a DDSM tissue folder with fgt_seg/ and fgt_seg_labels/)")
    try:
        if data.tissue_csv is not None:
            source = checks.input_file(data.tissue_csv, "--tissue-csv", "pass the workspace's tissue_dataset.csv, "
                                            "or a tissue folder with --tissue-data-dir")
        else:
            source = checks.input_folder(data.tissue_data_dir, "--tissue-data-dir", "pass a workspace folder "
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


def lesion_table(data: DataConfig) -> pd.DataFrame:
    """The stage-2 table from ``data.cancer_csv`` (``--cancer-csv``; all rows, ``test`` ones included), its files
    checked.

    Raises:
        TrainingInputError: no ``--cancer-csv``, a folder, a table that cannot be used, or files that do not exist
            or are not images.
    """
    if data.cancer_csv is None:
        raise TrainingInputError("stage 2 needs --cancer-csv (workspace/unified_segmentation_dataset.csv)")
    return _checked_table(splits.read_lesion_table, data.cancer_csv, ("image_file_path", "roi_mask_file_path"),
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


def stage1_checkpoint(config: TrainConfig) -> tuple[Path, dict]:
    """The stage-1 checkpoint that makes the stage-2 crops: ``--stage1-checkpoint``, else ``best_stage1.pth`` in
    ``--stage1-checkpoint-dir`` (``config.stage1_checkpoint_path``); returns ``(path, checkpoint dict)``.

    Raises:
        TrainingInputError: the file is missing, a folder, not a checkpoint (a text file, an image, ...), or a
            checkpoint of stage 2; the message names it and fits the case.
    """
    path = config.stage1_checkpoint_path
    explicit = config.data.stage1_checkpoint is not None
    if not explicit and not path.exists():
        raise TrainingInputError(f"stage-1 checkpoint {path} not found; train stage 1 first (--train-stage1 or "
                                 "--train-both) or pass --stage1-checkpoint")
    flag = "--stage1-checkpoint" if explicit else "the stage-1 checkpoint of --stage1-checkpoint-dir"
    try:
        return path, checks.load_stage_checkpoint(path, flag, 1, fix="stage-2 crops are made by stage 1: pass "
                                                       "a stage-1 checkpoint (best_stage1.pth)")
    except checks.UserInputError as error:
        raise TrainingInputError(str(error)) from None


def check_inputs(config: TrainConfig) -> None:
    """Check everything the stages asked for will read or write, before the first one starts.

    Stage 1: its size and batch (:func:`stage_spec`) and its table with its files (:func:`tissue_table`). Stage 2:
    the same with :func:`lesion_table`, and the stage-1 checkpoint (:func:`stage1_checkpoint`; not with
    ``--train-both`` and no ``--stage1-checkpoint``: stage 1 makes it first). Both: ``--encoder-weights`` when it is
    a file (:func:`checks.checkpoint_file`'s checks), and the checkpoint and log folders (not files).

    Raises:
        TrainingInputError: the first problem found (one line naming the file or flag and the fix).
    """
    stages = config.stages
    network = config.network
    try:
        for stage in stages:
            spec = stage_spec(stage, config)
            checks.output_folder(spec.checkpoint_dir, f"--stage{stage}-checkpoint-dir")
        checks.output_folder(config.logdir, "--logdir")
        weights = str(network.encoder_weights)
        used = network.model == "aca_atrous_resunet" and (1 in stages or not network.stage2_init_from_stage1)
        if used and not config.resume and weights.lower() not in ("imagenet", "none", ""):
            checks.checkpoint_file(weights, "--encoder-weights", 1, advice=ENCODER_WEIGHTS_ADVICE)
    except checks.UserInputError as error:
        raise TrainingInputError(str(error)) from None
    if 1 in stages:
        tissue_table(config.data)
    if 2 in stages:
        lesion_table(config.data)
        # stage 2 alone (--train-stage2) reads an existing checkpoint; else stage 1 is trained first and writes it
        if config.data.stage1_checkpoint is not None or stages == (2,):
            stage1_checkpoint(config)


# ----------------------------------------------------------------------------------------------------------------
# A stage's settings
# ----------------------------------------------------------------------------------------------------------------
def stage_spec(stage: int, config: TrainConfig) -> StageSpec:
    """The :class:`StageSpec` of ``stage`` from the config (sizes checked).

    Raises:
        TrainingInputError: a size that is not one or two multiples of 32, or a batch size under 2.
    """
    s = str(stage)
    settings = config.stage(stage)
    try:
        size = imaging.network_size(list(settings.img_size))
    except ValueError as error:
        raise TrainingInputError(f"--img-size-stage{s}: {error}") from None
    batch = settings.batch_size
    if batch < 2:
        raise TrainingInputError(f"--batch-size-stage{s} is {batch}; BatchNorm needs at least 2 images per batch")
    names = labels.TISSUE_CLASS_NAMES if stage == 1 else labels.LESION_CLASS_NAMES
    return StageSpec(stage=stage, class_names=tuple(names), metric_class=labels.FGT if stage == 1 else 0,
                     epochs=settings.epochs, lr=settings.lr, batch_size=batch, size_hw=size, t0=settings.t0,
                     checkpoint_dir=Path(settings.checkpoint_dir), log_dir=Path(config.logdir) / f"stage{s}")


def model_config_for(stage: int, network: NetworkConfig, encoder_weights: str | None) -> dict:
    """The model config of a stage (plain dict for ``models.build_model`` and the checkpoint): ``network.model``
    with ``network.encoder`` (``aca_atrous_resunet``) initialised from ``encoder_weights`` (``none``: random)."""
    classes = len(labels.TISSUE_CLASS_NAMES) if stage == 1 else len(labels.LESION_CLASS_NAMES)
    if network.model == "aca_atrous_resunet":
        weights = None if str(encoder_weights).lower() in ("none", "") else encoder_weights
        return default_model_config(classes, network.encoder, weights)
    return {"name": network.model, "in_channels": 1, "classes": classes}
