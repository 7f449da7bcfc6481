"""Cross-validation folds and their summary: every patient tested exactly once, folds per source, mean ± sd by hand."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from mammo.evaluation import crossval


def _table() -> pd.DataFrame:
    film = [{"image_file_path": f"/w/film_{i}.png", "patient_id": f"F{i}", "source": "film"} for i in range(10)]
    csaw = [{"image_file_path": f"/w/{p}_{v}.png", "patient_id": f"CSAW_{p}", "source": "csaw-s"}
            for p in ("000", "001", "002") for v in (0, 1)]
    return pd.DataFrame(film + csaw).assign(split="train")


def test_each_patient_is_tested_once_and_sources_spread_over_the_folds():
    table = _table()
    folds = crossval.fold_tables(table, 3, seed=0)
    assert len(folds) == 3
    tested = pd.concat([f[f["split"] == crossval.TEST] for f in folds])
    assert sorted(tested["image_file_path"]) == sorted(table["image_file_path"])  # every row once
    for fold in folds:
        assert len(fold) == len(table) and set(fold["split"]) == {crossval.TEST, "train", "val"}
        test = fold[fold["split"] == crossval.TEST]
        for split in ("train", "val"):  # no patient on two sides
            assert not set(test["patient_id"]) & set(fold.loc[fold["split"] == split, "patient_id"])
        assert not set(fold.loc[fold["split"] == "val", "patient_id"]) & set(
            fold.loc[fold["split"] == "train", "patient_id"])
        # inner validation per source: round(0.2 x 6 or 7 film patients) = 1, and of the 2 other CSAW-S patients
        # min(round(0.4), 1) = 0: every source keeps training patients
        assert (fold.loc[fold["split"] == "val", "source"] == "film").sum() == 1
        assert (fold.loc[fold["split"] == "train", "source"] == "csaw-s").sum() == 4
        assert test["patient_id"].str.startswith("CSAW_").sum() == 2  # one CSAW-S patient (two views) per fold
        assert 3 <= (test["source"] == "film").sum() <= 4  # 10 film patients dealt over 3 folds
    again = crossval.fold_tables(table, 3, seed=0)
    assert all(a.equals(b) for a, b in zip(folds, again))  # seeded


def test_too_few_patients_for_the_folds():
    with pytest.raises(ValueError, match="folds"):
        crossval.fold_tables(_table().iloc[:2], 3, seed=0)
    with pytest.raises(ValueError, match=">= 2"):
        crossval.fold_tables(_table(), 1, seed=0)


def test_summary_is_mean_and_sample_sd_over_folds():
    per_fold = [{"tissue": {"dice": {"fgt": 0.8}, "n": 4, "note": "x"}},
                {"tissue": {"dice": {"fgt": 0.6}, "n": 5}},
                {"tissue": {"dice": {"fgt": 0.7}, "n": float("nan")}}]
    summary = crossval.summarize_folds(per_fold)
    assert set(summary) == {"tissue/dice/fgt", "tissue/n"}
    fgt = summary["tissue/dice/fgt"]
    assert fgt["mean"] == pytest.approx(0.7) and fgt["sd"] == pytest.approx(0.1)  # sqrt(((.1)^2+(.1)^2+0)/2)
    assert fgt["folds"] == [0.8, 0.6, 0.7] and fgt["n_folds"] == 3
    n = summary["tissue/n"]
    assert n["folds"] == [4.0, 5.0, None] and n["mean"] == 4.5 and n["sd"] == pytest.approx(math.sqrt(0.5))
    table = crossval.markdown_table(summary, [("FGT Dice", "tissue/dice/fgt"), ("absent", "no/such")])
    assert "| FGT Dice | 0.700 ± 0.100 (n=3) | 0.800, 0.600, 0.700 |" in table and "| absent | n/a | |" in table
