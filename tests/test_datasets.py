"""Tests of datasets.py on the real files: tables, items, augmentation, patient-level splits, DataLoader spawn."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import datasets as D
from mammo import imaging


def lesion_table(lesion_dir: Path) -> pd.DataFrame:
    images = sorted((lesion_dir / "images").glob("*.jpg"))
    return pd.DataFrame({"image_file_path": [str(p) for p in images],
                         "roi_mask_file_path": [str(lesion_dir / "masks" / p.name) for p in images],
                         "patient_id": [D.patient_id_from_name(p) for p in images], "split": "train"})


# ----------------------------------------------------------------------------------------------------------------
# constants, names, tables
# ----------------------------------------------------------------------------------------------------------------
def test_label_constants():
    assert D.TISSUE_CLASS_NAMES == ("background", "adipose", "fgt", "pectoral")
    assert D.TISSUE_LABEL_VALUES == {64: 0, 128: 1, 192: 2, 255: 3}


@pytest.mark.parametrize("name, expected", [
    ("P105_R_CM_MLO.jpg", "P105"),
    ("flipped_P105_L_DM_CC.jpg", "P105"),
    ("mirrored_P105_R_DM_MLO", "P105"),
    ("/x/y/A_0002_1.RIGHT_MLO.png", "A_0002"),
    ("A_0002_1.RIGHT_MLO_LI.png", "A_0002"),
    ("Mass-Training_P_00001_LEFT_CC.dcm", "P_00001"),
    ("Calc-Test_P_00038_LEFT_CC_1", "P_00038"),
    ("0_R-MLO_benign.png", "0"),
    ("something_else.png", "something_else"),
])
def test_patient_id_from_name(name, expected):
    assert D.patient_id_from_name(name) == expected


def test_read_tissue_table_from_folder_and_csv(tmp_path, tissue_dir):
    df = D.read_tissue_table(tissue_dir)
    assert len(df) == 60 and df["patient_id"].nunique() == 60
    assert all(Path(p).is_file() for p in df["image_file_path"]) and all(Path(p).is_file()
                                                                        for p in df["label_file_path"])
    assert Path(df.loc[0, "label_file_path"]).name == Path(df.loc[0, "image_file_path"]).stem + "_LI.png"
    # a CSV with paths relative to its folder (here: reaching the data folder through "..")
    local = tmp_path / "tissue.csv"
    pd.DataFrame({"image_file_path": [os.path.relpath(p, tmp_path) for p in df["image_file_path"][:3]],
                  "label_file_path": [os.path.relpath(p, tmp_path) for p in df["label_file_path"][:3]],
                  "split": ["train", "val", "test"]}).to_csv(local, index=False)
    t = D.read_tissue_table(local)
    assert [Path(p).resolve() for p in t["image_file_path"]] == [Path(p).resolve() for p in
                                                                 df["image_file_path"][:3]]
    assert list(t["patient_id"]) == list(df["patient_id"][:3]) and list(t["split"]) == ["train", "val", "test"]
    assert len(D.TissueDataset(local, 512, split="val")) == 1
    with pytest.raises(ValueError, match="label_file_path"):
        pd.DataFrame({"image_file_path": ["a.png"]}).to_csv(tmp_path / "bad.csv", index=False)
        D.read_tissue_table(tmp_path / "bad.csv")


def test_read_lesion_table_resolves_relative_and_multiple_masks(tmp_path):
    (tmp_path / "ws").mkdir()
    csv = tmp_path / "ws" / "lesions.csv"
    csv.write_text("image_file_path,roi_mask_file_path,patient_id,split\n"
                   "images/a.png,masks/a1.png;masks/a2.png,007,train\n"
                   "images/b.png,,,val\n")
    df = D.read_lesion_table(csv)
    root = tmp_path / "ws"
    assert df.loc[0, "image_file_path"] == str(root / "images" / "a.png")
    assert df.loc[0, "roi_mask_file_path"] == f"{root / 'masks' / 'a1.png'};{root / 'masks' / 'a2.png'}"
    assert df.loc[0, "patient_id"] == "007"  # read as text: leading zeros kept
    assert df.loc[1, "roi_mask_file_path"] == "" and df.loc[1, "patient_id"] == "b"


# ----------------------------------------------------------------------------------------------------------------
# datasets
# ----------------------------------------------------------------------------------------------------------------
def test_tissue_item_matches_files(tissue_dir):
    df = D.read_tissue_table(tissue_dir)
    # the images' own size and no working scale: letterbox is the identity
    own_scale = dict(imaging.DEFAULT_PREPROCESS, working_breast_height_px=0)
    ds = D.TissueDataset(df, (960, 480), preprocess_config=own_scale)
    for name, should_flip in (("A_0002_1.RIGHT_MLO", False), ("B_3606_1.RIGHT_MLO", True)):
        index = int(np.flatnonzero(df["image_file_path"].str.endswith(name + ".png"))[0])
        item = ds[index]
        assert item["image"].shape == (1, 960, 480) and item["image"].dtype == torch.float32
        assert item["mask"].shape == (960, 480) and item["mask"].dtype == torch.int64
        assert item["flipped"] is should_flip
        pre = imaging.preprocess(imaging.read_image(df.loc[index, "image_file_path"]).pixels, own_scale)
        np.testing.assert_allclose(item["image"][0].numpy(), pre.image / 255.0, atol=1e-6)
        labels = imaging.read_mask(df.loc[index, "label_file_path"], kind="tissue")
        expected = labels[:, ::-1] if should_flip else labels
        np.testing.assert_array_equal(item["mask"].numpy(), expected)
        # the pectoral muscle (class 3) sits on the chest-wall side: the left after normalisation
        assert np.nonzero(item["mask"].numpy() == 3)[1].mean() < 240


def test_tissue_item_at_network_size(tissue_dir):
    ds = D.TissueDataset(tissue_dir, (512, 512), split=None)
    item = ds[0]
    assert item["image"].shape == (1, 512, 512) and item["mask"].shape == (512, 512)
    assert set(item["mask"].unique().tolist()) <= {0, 1, 2, 3}
    # the letterbox starts from the preprocessed image (the working scale: this breast is 889 px of 960, so the image
    # becomes 1037 x 518 to make it 960 px high)
    assert item["geometry"] == {"orig_h": 1037, "orig_w": 518, "net_h": 512, "net_w": 512,
                                "resized_h": 512, "resized_w": 256}
    assert float(item["image"][0, :, 256:].abs().max()) == 0.0  # right padding is zero
    assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0


def test_tissue_stray_label_value_raises_with_file_name(tmp_path, tissue_dir):
    df = D.read_tissue_table(tissue_dir).iloc[:1].copy()
    raw = np.array(Image.open(df.iloc[0]["label_file_path"]))
    raw[0, 0] = 77
    bad = imaging.write_png(tmp_path / "stray_LI.png", raw)
    df["label_file_path"] = str(bad)
    with pytest.raises(ValueError) as info:
        D.TissueDataset(df, (960, 480))[0]
    assert str(bad) in str(info.value) and "77" in str(info.value)


def test_lesion_dataset_masks(tmp_path, lesion_dir):
    names = [p.name for p in sorted((lesion_dir / "images").glob("*.jpg"))[:2]]
    m1 = imaging.read_mask(lesion_dir / "masks" / names[0])
    half = np.zeros_like(m1)
    half[:100, :100] = 1
    imaging.write_png(tmp_path / "m01.png", half)  # 0/1 PNG
    imaging.write_png(tmp_path / "m255.png", m1 * 255)  # 0/255 PNG
    img0 = lesion_dir / "images" / names[0]
    csv = tmp_path / "lesions.csv"
    pd.DataFrame({"image_file_path": [str(img0)] * 3,
                  "roi_mask_file_path": [str(lesion_dir / "masks" / names[0]), "m255.png;m01.png", ""],
                  "split": ["train", "train", "val"]}).to_csv(csv, index=False)
    cfg = dict(imaging.DEFAULT_PREPROCESS, normalize_orientation=False)
    ds = D.LesionDataset(csv, 512, preprocess_config=cfg)
    jpeg_item, union_item, empty_item = ds[0], ds[1], ds[2]
    assert jpeg_item["mask"].shape == (1, 512, 512) and jpeg_item["mask"].dtype == torch.float32
    np.testing.assert_array_equal(jpeg_item["mask"][0].numpy(), m1)
    np.testing.assert_array_equal(union_item["mask"][0].numpy(), m1 | half)
    assert float(empty_item["mask"].sum()) == 0.0
    assert len(D.LesionDataset(csv, 512, split="val")) == 1
    with pytest.raises(ValueError, match="no rows"):
        D.LesionDataset(csv, 512, split="test")


def test_preprocess_none_uses_files_as_they_are(tmp_path, lesion_dir):
    img = imaging.read_image(sorted((lesion_dir / "images").glob("*.jpg"))[0]).pixels
    crop = img[100:300, 50:250]
    path = imaging.write_png(tmp_path / "crop.png", crop)
    table = pd.DataFrame({"image_file_path": [str(path)], "roi_mask_file_path": [""]})
    item = D.LesionDataset(table, (224, 224), preprocess_config=None)[0]
    expected, _ = imaging.letterbox(crop, (224, 224))  # no median, no CLAHE, no flip
    np.testing.assert_allclose(item["image"][0].numpy(), expected / 255.0, atol=1e-6)
    assert item["flipped"] is False
    sixteen = imaging.write_png(tmp_path / "c16.png", crop.astype(np.uint16) * 257)
    with pytest.raises(ValueError, match="8-bit"):
        D.LesionDataset(table.assign(image_file_path=str(sixteen)), 224, preprocess_config=None)[0]


# ----------------------------------------------------------------------------------------------------------------
# augmentation
# ----------------------------------------------------------------------------------------------------------------
def _centroid(binary: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(binary)
    return np.array([ys.mean(), xs.mean()])


@pytest.mark.parametrize("preset", ["lesion", "tissue"])
def test_augmented_lesion_mask_stays_binary_and_aligned(lesion_dir, preset):
    """50 random augmentations of a real lesion mask: values stay in {0, 1}, and the lesion stays where the
    image's lesion is: the image carries a bright marker drawn from the same mask, and the centroid of the
    augmented mask is within 2 pixels of the centroid of the augmented marker."""
    mask = imaging.read_mask(lesion_dir / "masks" / "P105_R_CM_MLO.jpg")
    assert mask.sum() > 500
    marker = (mask * 255).astype(np.uint8)
    aug = D.lesion_augmentation(seed=3) if preset == "lesion" else D.tissue_augmentation(seed=3)
    start = _centroid(mask)
    moved = 0
    for _ in range(50):
        out = aug(image=marker, mask=mask)
        m, img = out["mask"], out["image"]
        img = img[:, :, 0] if img.ndim == 3 else img
        assert m.shape == mask.shape and m.dtype == mask.dtype
        assert set(np.unique(m)) <= {0, 1}
        if m.sum() < 0.5 * mask.sum():  # lesion pushed mostly out of the frame: nothing to compare
            continue
        dist = np.linalg.norm(_centroid(m) - _centroid(img > 102))
        assert dist <= 2.0, dist
        moved += np.linalg.norm(_centroid(m) - start) > 3
    assert moved >= 10  # the geometric transforms did act


def test_tissue_augmentation_keeps_classes(tissue_dir):
    """Label maps are remapped, never blended: with classes {0, 1, 3} only, a linear interpolation would
    create class 2 between 1 and 3; nearest interpolation cannot."""
    labels = imaging.read_mask(sorted((tissue_dir / "fgt_seg_labels").glob("*.png"))[0], kind="tissue")
    labels[labels == 2] = 1
    image = (labels * 60).astype(np.uint8)
    aug = D.tissue_augmentation(seed=0, rotate_p=1.0)
    for _ in range(20):
        out = aug(image=image, mask=labels)
        assert set(np.unique(out["mask"])) <= {0, 1, 3}


def test_dataset_pickles_and_reseeds_per_process(lesion_dir):
    ds = D.LesionDataset(lesion_table(lesion_dir).iloc[:2], 256, augment=D.lesion_augmentation())
    copies = [pickle.loads(pickle.dumps(ds)) for _ in range(3)]
    torch.manual_seed(1)
    a = copies[0][0]["mask"]
    torch.manual_seed(1)
    b = copies[1][0]["mask"]
    torch.manual_seed(2)
    c = [copies[2][0]["mask"] for _ in range(3)]
    assert torch.equal(a, b)  # same torch seed -> same augmentation stream
    assert any(not torch.equal(a, x) for x in c)  # another seed (another worker) -> another stream


def test_dataloader_with_spawn_workers(lesion_dir):
    ds = D.LesionDataset(lesion_table(lesion_dir).iloc[:2], 128)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1,
                                         multiprocessing_context="spawn")
    batch = next(iter(loader))
    assert batch["image"].shape == (2, 1, 128, 128) and batch["mask"].shape == (2, 1, 128, 128)
    torch.testing.assert_close(batch["image"][0], ds[0]["image"])
    assert batch["geometry"]["orig_h"].tolist() == [960, 960]  # the working scale of these 512-px images


# ----------------------------------------------------------------------------------------------------------------
# splits
# ----------------------------------------------------------------------------------------------------------------
def test_split_by_patient_keeps_patients_and_copies_together(lesion_dir):
    df = lesion_table(lesion_dir)
    assert df["patient_id"].nunique() == 77  # the readme's count
    for seed in range(5):
        train, val = D.split_by_patient(df, 0.2, seed)
        assert len(train) + len(val) == len(df)
        assert not set(train["patient_id"]) & set(val["patient_id"])
        assert abs(len(val) - 0.2 * len(df)) <= 3
        # every flipped_/mirrored_ copy lies on the side of its patient's other views
        for part, other in ((train, val), (val, train)):
            stems = {Path(p).stem.replace("flipped_", "").replace("mirrored_", "")[:5] for p in
                     part["image_file_path"]}
            assert not {D.patient_id_from_name(s) for s in stems} & set(other["patient_id"])
        assert set(train["split"]) == {"train"} and set(val["split"]) == {"val"}
    t1, v1 = D.split_by_patient(df, 0.2, 7)
    t2, v2 = D.split_by_patient(df.sample(frac=1, random_state=0), 0.2, 7)  # row order does not matter
    assert sorted(v1["image_file_path"]) == sorted(v2["image_file_path"])
    _, v3 = D.split_by_patient(df, 0.2, 8)
    assert sorted(v1["image_file_path"]) != sorted(v3["image_file_path"])
    with pytest.raises(ValueError):
        D.split_by_patient(df, 1.0, 0)


def test_kfold_by_patient_partitions(lesion_dir):
    df = lesion_table(lesion_dir)
    seen = []
    for fold in range(5):
        train, val = D.kfold_by_patient(df, 5, fold, seed=3)
        assert not set(train["patient_id"]) & set(val["patient_id"])
        assert len(train) + len(val) == len(df)
        assert 17 <= len(val) <= 22  # 98 images in 5 balanced folds
        seen.extend(val["image_file_path"])
        again = D.kfold_by_patient(df, 5, fold, seed=3)[1]
        assert list(again["image_file_path"]) == list(val["image_file_path"])
    assert sorted(seen) == sorted(df["image_file_path"])  # each image validates exactly once
    with pytest.raises(ValueError):
        D.kfold_by_patient(df, 5, 5, 0)
