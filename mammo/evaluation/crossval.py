"""Patient-level cross-validation: the fold tables a run trains and tests on, and the mean ± sd over folds.

How every model choice is judged (issue 19): the outer folds are what is reported; whatever a training run chooses
(the epoch, by validation Dice) it chooses on an inner validation split of its own training patients
(``--val-fraction``), never on the fold it is tested on. What lives here:

- :func:`fold_tables`: one table per fold, the fold's patients marked ``test``, the other patients ``train`` or
  ``val`` (the inner split the trainer chooses its epoch on), both assigned per ``source`` so that each source (the
  film set, CSAW-S, ...) is spread over the folds and keeps patients in training;
- :func:`flatten_metrics` / :func:`summarize_folds`: the numbers of each fold's ``metrics.json`` and their mean,
  sample standard deviation and per-fold values;
- :func:`markdown_table`: those as a table for RESULTS.md.

The command that runs it all is ``scripts/cross_validate.py``.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from mammo.data.splits import kfold_by_patient

#: ``split`` value of a fold's held-out rows; the trainer drops them (``mammo.training.inputs.split_table``) and
#: ``evaluate.py --split test`` scores them.
TEST = "test"


def fold_tables(table: pd.DataFrame, folds: int, seed: int, val_fraction: float = 0.2) -> list[pd.DataFrame]:
    """The ``folds`` tables of a patient-level k-fold split, stratified by ``source``.

    Each returned table holds every row of ``table``; the rows of fold ``i``'s patients have ``split == "test"``.
    Within each source the patients are dealt to folds by :func:`mammo.data.splits.kfold_by_patient` (seeded,
    balanced in images), so a source of ``folds`` patients or more appears in every fold. Of the other patients of
    each source, ``round(val_fraction x n)`` (at most n - 1, so that every source keeps a training patient) are
    ``val`` and the rest ``train`` (:func:`inner_split`).

    Args:
        table: a workspace table (tissue or lesion) with ``image_file_path`` and ``patient_id``; ``source`` optional.
        folds: number of folds (>= 2).
        seed: the shuffle seed.

    Returns:
        ``folds`` DataFrames, row order as ``table``.

    Raises:
        ValueError: fewer than ``folds`` patients in the whole table, or ``folds`` < 2.
    """
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    table = table.reset_index(drop=True)
    fold_of = np.full(len(table), -1)
    sources = table["source"].astype(str) if "source" in table.columns else pd.Series([""] * len(table))
    for source in sorted(set(sources)):
        rows = np.flatnonzero((sources == source).to_numpy())
        part = table.iloc[rows].reset_index(drop=True)
        k = min(folds, part["patient_id"].astype(str).nunique() if "patient_id" in part else len(part))
        if k < 2:
            fold_of[rows] = 0
            continue
        for fold in range(k):
            _, held = kfold_by_patient(part.assign(_row=rows), k, fold, seed)
            fold_of[held["_row"].to_numpy()] = fold
    if len(set(fold_of.tolist())) < folds:
        raise ValueError(f"{table['patient_id'].nunique()} patients cannot fill {folds} folds")
    return [inner_split(table.assign(split=np.where(fold_of == fold, TEST, "")), val_fraction, seed + fold)
            for fold in range(folds)]


def inner_split(table: pd.DataFrame, val_fraction: float, seed: int) -> pd.DataFrame:
    """Mark the rows that are not ``test`` as ``train`` or ``val`` by patient, per ``source``: of a source's n
    patients, ``min(round(val_fraction x n), n - 1)`` chosen at random (seeded) are ``val``."""
    out = table.copy()
    sources = out["source"].astype(str) if "source" in out.columns else pd.Series([""] * len(out), index=out.index)
    rest = out["split"] != TEST
    out.loc[rest, "split"] = "train"
    rng = np.random.default_rng(seed)
    for source in sorted(set(sources[rest])):
        rows = rest & (sources == source)
        patients = sorted(set(out.loc[rows, "patient_id"].astype(str)))
        n_val = min(int(round(val_fraction * len(patients))), len(patients) - 1)
        chosen = set(rng.permutation(patients)[:n_val].tolist()) if n_val > 0 else set()
        out.loc[rows & out["patient_id"].astype(str).isin(chosen), "split"] = "val"
    return out


def flatten_metrics(metrics: dict, prefix: str = "") -> dict[str, float]:
    """The finite numbers of a nested ``metrics.json`` as ``{"tissue/dice_mean/fgt": 0.81, ...}`` (lists and strings
    are left out)."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(flatten_metrics(value, name))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            flat[name] = float(value)
    return flat


def summarize_folds(per_fold: list[dict]) -> dict[str, dict]:
    """Mean, sample standard deviation (``ddof=1``; 0 for one fold) and the per-fold values of every measure.

    Args:
        per_fold: one ``metrics.json`` dict per fold (nested; see :func:`flatten_metrics`).

    Returns:
        ``{measure: {"mean": float, "sd": float, "n_folds": int, "folds": [float | None, ...]}}`` for the measures
        found in at least one fold; ``folds`` holds None where a fold lacks the measure.
    """
    flats = [flatten_metrics(m) for m in per_fold]
    names = sorted(set().union(*flats)) if flats else []
    summary = {}
    for name in names:
        values = [flat.get(name) for flat in flats]
        present = [v for v in values if v is not None]
        sd = float(np.std(present, ddof=1)) if len(present) > 1 else 0.0
        summary[name] = {"mean": float(np.mean(present)), "sd": sd, "n_folds": len(present), "folds": values}
    return summary


def markdown_table(summary: dict[str, dict], measures: list[tuple[str, str]], digits: int = 3) -> str:
    """A Markdown table of the chosen measures: ``measures`` is ``[(label, measure name), ...]``; a measure no fold
    has is shown as "n/a"."""
    lines = ["| measure | mean ± sd over folds | folds |", "|---|---|---|"]
    for label, name in measures:
        entry = summary.get(name)
        if entry is None:
            lines.append(f"| {label} | n/a | |")
            continue
        folds = ", ".join("-" if v is None else f"{v:.{digits}f}" for v in entry["folds"])
        lines.append(f"| {label} | {entry['mean']:.{digits}f} ± {entry['sd']:.{digits}f} (n={entry['n_folds']}) "
                     f"| {folds} |")
    return "\n".join(lines) + "\n"
