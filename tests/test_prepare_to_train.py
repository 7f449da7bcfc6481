"""Tests of prepare_to_train.py: fake CBIS-DDSM / Mini-DDSM trees, the real tissue + CDD-CESM folders, zips,
synthetic data, resumability and input safety. Everything is written under tmp_path."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

import datasets
from mammo import imaging
from mammo.cli import prepare as ptt
from mammo.data import synthetic
from mammo.prepare.sources.archives import classify_zip
from mammo.prepare.sources.common import SkipSample, clean_path_field, fit_mask, parse_image_name

os.environ.setdefault("OMP_NUM_THREADS", "1")


def run(*argv) -> int:
    return ptt.main(ptt.get_args_parser().parse_args([str(a) for a in argv]))


def checksums(root: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file below ``root``."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    return out


def read_png(path: Path) -> np.ndarray:
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert arr is not None, path
    return arr


def write_dicom(path: Path, pixels: np.ndarray) -> None:
    """A minimal MONOCHROME2 DICOM holding ``pixels`` (uint8 or uint16)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "MG"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.save_as(path, enforce_file_format=True)


def rect_mask(shape, y0, y1, x0, x1, value=255, dtype=np.uint8) -> np.ndarray:
    m = np.zeros(shape, dtype)
    m[y0:y1, x0:x1] = value
    return m


# ----------------------------------------------------------------------------------------------------------------
# pure helpers
# ----------------------------------------------------------------------------------------------------------------
def test_helpers_on_dataset_quirks():
    assert clean_path_field(" Mass-Test_P_1_LEFT_CC_1\\a\\000001.dcm\n") == "Mass-Test_P_1_LEFT_CC_1/a/000001.dcm"
    assert clean_path_field("-") == "" and clean_path_field(float("nan")) == ""
    assert classify_zip("Data-MoreThanTwoMasks.zip") == "mini2"
    assert classify_zip("MINI-DDSM-Complete-JPEG-8.zip") == "mini1"
    assert classify_zip("CBIS-DDSM.zip") == "cbis" and classify_zip("ddsm_all.zip") == "cbis"
    assert classify_zip("Mammogram-segmentation-master.zip") == "tissue"
    assert classify_zip("holiday photos.zip") is None
    cdd = parse_image_name("mirrored_P155_L_DM_CC")
    assert (cdd["patient_id"], cdd["laterality"], cdd["view"], cdd["acquisition"], cdd["augmentation"]) == \
        ("P155", "L", "CC", "DM", "mirrored")
    ddsm = parse_image_name("A_0002_1.RIGHT_MLO")
    assert (ddsm["patient_id"], ddsm["laterality"], ddsm["view"]) == ("A_0002", "R", "MLO")


def test_fit_mask_resizes_within_tolerance_and_refuses_other_aspects():
    small = rect_mask((50, 100), 10, 20, 30, 60)
    big = cv2.resize(small, (200, 100), interpolation=cv2.INTER_NEAREST)  # same aspect, twice the size
    out, note = fit_mask(big, (50, 100), 0.02, "m")
    assert out.dtype == bool and np.array_equal(out, small > 0) and "resized" in note
    out, note = fit_mask(np.zeros((101, 100), np.uint8), (100, 100), 0.02, "m")  # 1 % off: accepted
    assert out.shape == (100, 100) and note
    with pytest.raises(SkipSample, match="aspect"):
        fit_mask(np.zeros((104, 100), np.uint8), (100, 100), 0.02, "m")  # 4 % off: refused


# ----------------------------------------------------------------------------------------------------------------
# CBIS-DDSM from a sample of the real description CSVs
# ----------------------------------------------------------------------------------------------------------------
IMG_SHAPE = (64, 40)  # (H, W) of the fake full mammograms


def _raw_rows(csv_path: Path) -> tuple[list[str], list[list[str]]]:
    with open(csv_path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    return rows[0], rows[1:]


@pytest.fixture(scope="module")
def cbis_tree(tmp_path_factory, request):
    """A fake CBIS-DDSM tree built from real CSV rows. Returns (root, csv paths, expectations)."""
    shared = request.getfixturevalue("cbis_csv_dir")
    root = tmp_path_factory.mktemp("cbis")
    rng = np.random.default_rng(0)
    header, rows = _raw_rows(shared / "mass_case_description_train_set.csv")
    col = {name: i for i, name in enumerate(header)}
    img_c, crop_c, roi_c = col["image file path"], col["cropped image file path"], col["ROI mask file path"]
    by_image: dict[str, list[list[str]]] = {}
    for r in rows:
        by_image.setdefault(clean_path_field(r[img_c]), []).append(r)
    multi = next(k for k, v in by_image.items() if len(v) >= 2)
    singles = [k for k, v in by_image.items() if len(v) == 1][:4]
    chosen = {"multi": by_image[multi][:2], "swapped": by_image[singles[0]], "resized": by_image[singles[1]],
              "badaspect": by_image[singles[2]], "missing": by_image[singles[3]]}
    # a quirk the real mass CSV lacks: backslashes and stray whitespace in the image path
    chosen["swapped"] = [list(chosen["swapped"][0])]
    chosen["swapped"][0][img_c] = "  " + chosen["swapped"][0][img_c].replace("/", "\\") + " \n"

    expected_masks = {}
    for case, case_rows in chosen.items():
        image_rel = clean_path_field(case_rows[0][img_c])
        image = rng.integers(0, 65536, IMG_SHAPE, dtype=np.uint16)
        if case != "missing":
            write_dicom(root / image_rel, image)
        merged = np.zeros(IMG_SHAPE, bool)
        for k, r in enumerate(case_rows):
            y0, x0 = 6 + 20 * k, 4 + 10 * k
            mask = rect_mask(IMG_SHAPE, y0, y0 + 12, x0, x0 + 8)
            merged |= mask > 0
            crop = rng.integers(100, 60000, (13, 11), dtype=np.uint16)
            roi_path, crop_path = root / clean_path_field(r[roi_c]), root / clean_path_field(r[crop_c])
            if case == "swapped":
                roi_path, crop_path = crop_path, roi_path
            if case == "resized":  # twice the size, same aspect ratio, even-aligned rectangle
                mask = cv2.resize(mask, (IMG_SHAPE[1] * 2, IMG_SHAPE[0] * 2), interpolation=cv2.INTER_NEAREST)
            if case == "badaspect":
                mask = rect_mask((IMG_SHAPE[0], IMG_SHAPE[0]), 5, 15, 5, 15)
            write_dicom(crop_path, crop)
            write_dicom(roi_path, mask)
        expected_masks[case] = (image_rel, image, merged)

    mass_csv = root / "mass_case_description_train_set.csv"
    with open(mass_csv, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for case_rows in chosen.values():
            w.writerows(case_rows)

    # one calcification test row (split "test"), as written in the real file
    header_c, rows_c = _raw_rows(shared / "calc_case_description_test_set.csv")
    col_c = {name: i for i, name in enumerate(header_c)}
    calc_row = rows_c[0]
    calc_image_rel = clean_path_field(calc_row[col_c["image file path"]])
    write_dicom(root / calc_image_rel, rng.integers(0, 65536, IMG_SHAPE, dtype=np.uint16))
    write_dicom(root / clean_path_field(calc_row[col_c["ROI mask file path"]]), rect_mask(IMG_SHAPE, 1, 5, 1, 5))
    write_dicom(root / clean_path_field(calc_row[col_c["cropped image file path"]]),
                rng.integers(100, 60000, (7, 9), dtype=np.uint16))
    calc_csv = root / "calc_case_description_test_set.csv"
    with open(calc_csv, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header_c)
        w.writerow(calc_row)
    assert "\n" in calc_csv.read_text().split("\n", 1)[1].rstrip("\n")  # the newline-in-path quirk is kept
    return root, [mass_csv, calc_csv], expected_masks, calc_row[col_c["patient_id"]]


def test_cbis_ddsm_fake_tree(cbis_tree, tmp_path):
    root, csvs, expected, calc_patient = cbis_tree
    before = checksums(root)
    ws = tmp_path / "ws"
    rc = run("--cbis-dir", root, "--cbis-csv", csvs[0], "--cbis-csv", csvs[1].name, "--workspace", ws)
    assert rc == 0
    df = pd.read_csv(ws / "unified_segmentation_dataset.csv", dtype=str, keep_default_na=False)
    assert len(df) == 4  # multi (2 rows -> 1 sample), swapped, resized, calc test; badaspect + missing skipped
    assert set(df["source"]) == {"cbis-ddsm"}
    for case in ("multi", "swapped", "resized"):
        image_rel, image, merged = expected[case]
        row = df[df["original_name"] == image_rel]
        assert len(row) == 1, case
        row = row.iloc[0]
        assert np.array_equal(read_png(ws / row["image_file_path"]), image)  # 16-bit kept exactly
        mask = read_png(ws / row["roi_mask_file_path"])
        assert set(np.unique(mask)) == {0, 255}
        assert np.array_equal(mask > 0, merged), case
        assert row["split"] in ("train", "val") and row["laterality"] in ("L", "R") and row["view"] in ("CC", "MLO")
        assert row["pathology"] in ("MALIGNANT", "BENIGN", "BENIGN_WITHOUT_CALLBACK")
    assert df.loc[df["original_name"] == expected["multi"][0], "n_masks"].item() == "2"
    test_row = df[df["split"] == "test"]
    assert len(test_row) == 1 and test_row["patient_id"].item() == calc_patient
    assert test_row["abnormality"].item() == "calcification"

    report = json.loads((ws / "prepare_report.json").read_text())
    reasons = {s["item"]: s["reason"] for s in report["skipped"]}
    assert "aspect" in reasons[expected["badaspect"][0]]
    assert "not found" in reasons[expected["missing"][0]]
    notes = " ".join(n["note"] for n in report["notes"])
    assert "swapped" in notes and "resized" in notes
    assert report["lesion"]["cbis-ddsm"]["samples"] == 4 and report["elapsed_s"] >= 0
    assert checksums(root) == before  # inputs untouched

    # mass only: the calcification test row is left out
    ws2 = tmp_path / "ws_mass"
    assert run("--cbis-dir", root, "--cbis-csv", csvs[0], "--cbis-csv", csvs[1], "--abnormality", "mass",
               "--workspace", ws2) == 0
    df2 = pd.read_csv(ws2 / "unified_segmentation_dataset.csv", dtype=str, keep_default_na=False)
    assert len(df2) == 3 and "test" not in set(df2["split"])
    # without --cbis-csv the description CSVs are found in the folder; same table as the first run
    ws3 = tmp_path / "ws_auto"
    assert run("--cbis-dir", root, "--workspace", ws3) == 0
    assert (ws3 / "unified_segmentation_dataset.csv").read_bytes() == \
        (ws / "unified_segmentation_dataset.csv").read_bytes()


def test_cbis_ddsm_nbia_folder_layout(cbis_csv_dir, tmp_path):
    """The NBIA downloader names folders and files differently from the CSV; files are found by the top folder."""
    header, rows = _raw_rows(cbis_csv_dir / "mass_case_description_test_set.csv")
    col = {name: i for i, name in enumerate(header)}
    row = rows[0]
    root = tmp_path / "CBIS-DDSM"
    image_top = clean_path_field(row[col["image file path"]]).split("/")[0]
    roi_top = clean_path_field(row[col["ROI mask file path"]]).split("/")[0]
    image = np.random.default_rng(2).integers(0, 65536, IMG_SHAPE, dtype=np.uint16)
    write_dicom(root / image_top / "08-29-2017-DDSM-96009" / "1.000000-full mammogram images-63992" / "1-1.dcm",
                image)
    mask = rect_mask(IMG_SHAPE, 10, 30, 5, 25)
    write_dicom(root / roi_top / "08-29-2017-DDSM-12345" / "1.000000-ROI mask images-1111" / "1-1.dcm",
                np.random.default_rng(3).integers(0, 60000, (9, 9), dtype=np.uint16))
    write_dicom(root / roi_top / "08-29-2017-DDSM-12345" / "1.000000-ROI mask images-1111" / "1-2.dcm", mask)
    csv_path = tmp_path / "one.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([header, row])
    ws = tmp_path / "ws"
    assert run("--cbis-dir", root, "--cbis-csv", csv_path, "--workspace", ws) == 0
    df = pd.read_csv(ws / "unified_segmentation_dataset.csv", dtype=str, keep_default_na=False)
    assert len(df) == 1 and df["split"].item() == "test"
    assert np.array_equal(read_png(ws / df["image_file_path"].item()), image)
    assert np.array_equal(read_png(ws / df["roi_mask_file_path"].item()) > 0, mask > 0)


# ----------------------------------------------------------------------------------------------------------------
# Mini-DDSM with DataWMask.xlsx quirks
# ----------------------------------------------------------------------------------------------------------------
def _mini_tree(root: Path) -> dict:
    """Mini-DDSM-like folders; returns the expected merged masks by file name."""
    rng = np.random.default_rng(1)
    base = root / "MINI-DDSM-Complete-PNG-16"
    shape = (60, 40)
    expected = {}

    def image(rel: str) -> None:
        p = base / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(p), rng.integers(0, 65536, shape, dtype=np.uint16))

    def mask(folder: Path, rel: str, y0, x0, jpeg=False) -> np.ndarray:
        m = rect_mask(shape, y0, y0 + 16, x0, x0 + 16)
        p = folder / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if jpeg:
            cv2.imwrite(str(p), m, [cv2.IMWRITE_JPEG_QUALITY, 100])
        else:
            cv2.imwrite(str(p), m)
        return m > 0

    image("Benign/0029/C_0029_1.LEFT_CC.png")
    expected["C_0029_1.LEFT_CC"] = (mask(base, "Benign/0029/C_0029_1.LEFT_CC_Mask.png", 8, 8)
                                    | mask(base, "Benign/0029/C_0029_1.LEFT_CC_Mask2.png", 32, 16))
    image("Cancer/0031/A_0031_1.RIGHT_MLO.png")
    expected["A_0031_1.RIGHT_MLO"] = mask(base, "Cancer/0031/A_0031_1.RIGHT_MLO_Mask.jpg", 16, 8, jpeg=True)
    image("Normal/0002/A_0002_1.LEFT_CC.png")
    image("Cancer/0040/B_0040_1.LEFT_MLO.png")
    rows = [
        {"fullPath": "Benign\\0029\\C_0029_1.LEFT_CC.png", "fileName": "C_0029_1.LEFT_CC.png", "View": "CC",
         "Side": "LEFT", "Status": "Benign", "Tumour_Contour": "Benign\\0029\\C_0029_1.LEFT_CC_Mask.png",
         "Tumour_Contour2": " Benign\\0029\\C_0029_1.LEFT_CC_Mask2.png", "Age": 61, "Density": 2},
        {"fullPath": "Cancer\\0031\\A_0031_1.RIGHT_MLO.png", "fileName": "A_0031_1.RIGHT_MLO.png", "View": "MLO",
         "Side": "RIGHT", "Status": "Cancer", "Tumour_Contour": "Cancer\\0031\\A_0031_1.RIGHT_MLO_Mask.jpg",
         "Tumour_Contour2": "-", "Age": 70, "Density": 3},
        {"fullPath": "Normal\\0002\\A_0002_1.LEFT_CC.png", "fileName": "A_0002_1.LEFT_CC.png", "View": "CC",
         "Side": "LEFT", "Status": "Normal", "Tumour_Contour": "-", "Tumour_Contour2": None, "Age": 55,
         "Density": 1},
        # listed here with one contour, and in Data-MoreThanTwoMasks with three: the latter must win
        {"fullPath": "Cancer\\0040\\B_0040_1.LEFT_MLO.png", "fileName": "B_0040_1.LEFT_MLO.png", "View": "MLO",
         "Side": "LEFT", "Status": "Cancer", "Tumour_Contour": "Cancer\\0040\\B_0040_1.LEFT_MLO_Mask.png",
         "Tumour_Contour2": "-", "Age": 48, "Density": 4},
    ]
    pd.DataFrame(rows).to_excel(base / "DataWMask.xlsx", index=False)
    more = root / "Mini-DDSM-Data-MoreThanTwoMasks"  # sorts after the main folder: the order must not matter
    m1 = mask(base, "Cancer/0040/B_0040_1.LEFT_MLO_Mask.png", 2, 2)
    m2 = mask(more, "Cancer/0040/B_0040_1.LEFT_MLO_Mask2.png", 20, 20)
    m3 = mask(more, "Cancer/0040/B_0040_1.LEFT_MLO_Mask3.png", 40, 4)
    expected["B_0040_1.LEFT_MLO"] = m1 | m2 | m3
    pd.DataFrame([{"fullPath": "Cancer\\0040\\B_0040_1.LEFT_MLO.png", "fileName": "B_0040_1.LEFT_MLO.png",
                   "View": "MLO", "Side": "LEFT", "Status": "Cancer",
                   "Tumour_Contour": "Cancer\\0040\\B_0040_1.LEFT_MLO_Mask.png",
                   "Tumour_Contour2": "Cancer\\0040\\B_0040_1.LEFT_MLO_Mask2.png",
                   "Tumour_Contour3": "Cancer\\0040\\B_0040_1.LEFT_MLO_Mask3.png", "Age": 48, "Density": 4}]
                 ).to_excel(more / "Data-MoreThanTwoMasks.xlsx", index=False)
    return expected


def test_mini_ddsm_datawmask_quirks(tmp_path):
    mini = tmp_path / "mini"
    expected = _mini_tree(mini)
    before = checksums(mini)
    ws = tmp_path / "ws"
    assert run("--mini-ddsm-dir", mini, "--workspace", ws) == 0
    df = pd.read_csv(ws / "unified_segmentation_dataset.csv", dtype=str, keep_default_na=False)
    names = {Path(p).stem: r for p, r in zip(df["image_file_path"], df.to_dict("records"))}
    assert set(names) == set(expected)  # the normal case is left out without --include-normals
    for stem, truth in expected.items():
        mask = read_png(ws / names[stem]["roi_mask_file_path"]) > 0
        if stem.startswith("A_0031"):  # JPEG mask, thresholded at > 127
            assert (mask & truth).sum() / (mask | truth).sum() > 0.95
        else:
            assert np.array_equal(mask, truth), stem
    b40 = names["B_0040_1.LEFT_MLO"]
    assert b40["source"] == "mini-ddsm-morethantwomasks" and b40["n_masks"] == "3"
    assert (b40["patient_id"], b40["laterality"], b40["view"], b40["pathology"]) == ("B_0040", "L", "MLO",
                                                                                      "MALIGNANT")
    assert names["C_0029_1.LEFT_CC"]["pathology"] == "BENIGN"
    assert read_png(ws / b40["image_file_path"]).dtype == np.uint16
    report = json.loads((ws / "prepare_report.json").read_text())
    assert any("--include-normals" in s["reason"] and "A_0002" in s["item"] for s in report["skipped"])
    assert any("duplicate" in s["reason"] for s in report["skipped"])

    ws2 = tmp_path / "ws_normals"
    assert run("--mini-ddsm-dir", mini, "--include-normals", "--workspace", ws2) == 0
    df2 = pd.read_csv(ws2 / "unified_segmentation_dataset.csv", dtype=str, keep_default_na=False)
    normal = df2[df2["image_file_path"].str.contains("A_0002_1")]
    assert len(df2) == 4 and normal["roi_mask_file_path"].item() == ""
    assert normal["pathology"].item() == "NORMAL" and normal["patient_id"].item() == "A_0002"
    assert checksums(mini) == before


# ----------------------------------------------------------------------------------------------------------------
# Real tissue + CDD-CESM folders -> datasets load them; patient-level splits; reruns are identical
# ----------------------------------------------------------------------------------------------------------------
def test_real_tissue_and_cdd_cesm_workspace(tissue_dir, lesion_dir, tmp_path):
    ws = tmp_path / "ws"
    args = ["--tissue-dir", tissue_dir, "--lesion-dir", lesion_dir, "--workspace", ws, "--seed", "3"]
    before_t = {p.name: p.stat().st_mtime_ns for p in tissue_dir.rglob("*") if p.is_file()}
    assert run(*args) == 0
    tissue = pd.read_csv(ws / "tissue_dataset.csv", dtype=str, keep_default_na=False)
    lesion = pd.read_csv(ws / "unified_segmentation_dataset.csv", dtype=str, keep_default_na=False)
    assert list(tissue.columns[:5]) == ["image_file_path", "label_file_path", "patient_id", "source", "split"]
    assert len(tissue) == 60 and len(lesion) == 98
    assert not any(Path(p).is_absolute()
                   for p in tissue["image_file_path"].tolist() + lesion["image_file_path"].tolist())
    assert set(tissue["split"]) == {"train", "val"} and set(lesion["split"]) == {"train", "val"}
    for df in (tissue, lesion):  # patient-level: no patient on both sides
        assert not set(df[df["split"] == "train"]["patient_id"]) & set(df[df["split"] == "val"]["patient_id"])
    assert lesion["patient_id"].nunique() == 77
    assert set(lesion["acquisition"]) == {"DM", "CM"} and set(lesion["source"]) == {"cdd-cesm"}
    aug = lesion[lesion["image_file_path"].str.contains("/mirrored_P155_L_DM_CC")].iloc[0]
    assert (aug["patient_id"], aug["augmentation"], aug["laterality"], aug["view"]) == ("P155", "mirrored", "L",
                                                                                         "CC")
    a2 = tissue[tissue["image_file_path"].str.contains("A_0002_1.RIGHT_MLO")].iloc[0]
    assert (a2["patient_id"], a2["laterality"], a2["view"]) == ("A_0002", "R", "MLO")
    label = read_png(ws / a2["label_file_path"])
    assert set(np.unique(label)) <= {64, 128, 192, 255}
    assert np.array_equal(label, read_png(tissue_dir / "fgt_seg_labels" / "A_0002_1.RIGHT_MLO_LI.png"))
    masks = [read_png(ws / p) for p in lesion["roi_mask_file_path"] if p][:5]
    assert masks and all(set(np.unique(m)) <= {0, 255} for m in masks)

    # the suite's datasets read the workspace
    ttable = datasets.read_tissue_table(ws / "tissue_dataset.csv")
    ltable = datasets.read_lesion_table(ws / "unified_segmentation_dataset.csv")
    assert len(ttable) == 60 and len(ltable) == 98
    tds = datasets.TissueDataset(ttable.iloc[:2], size_hw=(128, 64))
    item = tds[0]
    assert item["image"].ndim == 3 and item["mask"].max() <= 3
    lds = datasets.LesionDataset(ltable.iloc[:2], size_hw=(128, 128))
    assert lds[0]["mask"].shape[0] == 1

    # a second run reuses everything and writes byte-identical CSVs
    first = {n: (ws / n).read_bytes() for n in ("tissue_dataset.csv", "unified_segmentation_dataset.csv")}
    assert run(*args) == 0
    assert {n: (ws / n).read_bytes() for n in first} == first
    assert json.loads((ws / "prepare_report.json").read_text())["reused"] == 158
    assert {p.name: p.stat().st_mtime_ns for p in tissue_dir.rglob("*") if p.is_file()} == before_t


# ----------------------------------------------------------------------------------------------------------------
# synthetic set, interruption, archive
# ----------------------------------------------------------------------------------------------------------------
def test_synthetic_is_deterministic_and_complete(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run("--synthetic", "8", "--workspace", a, "--seed", "5") == 0
    assert run("--synthetic", "8", "--workspace", b, "--seed", "5") == 0
    for name in ("tissue_dataset.csv", "unified_segmentation_dataset.csv"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    tissue = pd.read_csv(a / "tissue_dataset.csv", dtype=str, keep_default_na=False)
    lesion = pd.read_csv(a / "unified_segmentation_dataset.csv", dtype=str, keep_default_na=False)
    assert len(tissue) == 8 and len(lesion) == 8 and tissue["patient_id"].nunique() == 4
    assert (lesion["roi_mask_file_path"] == "").sum() == 2  # cases 1 and 5 are lesion-free
    for p in tissue["image_file_path"]:
        assert (a / p).read_bytes() == (b / p).read_bytes()
    label = read_png(a / tissue["label_file_path"][0])
    assert label.shape == (synthetic.DEFAULT_HEIGHT, synthetic.DEFAULT_WIDTH)
    assert set(np.unique(label)) <= {64, 128, 192, 255} and len(np.unique(label)) >= 3
    mlo = [read_png(a / p) for p in tissue["label_file_path"] if "MLO" in p]
    assert all((m == 255).any() for m in mlo)  # every MLO view has a pectoral wedge
    mask = read_png(a / next(p for p in lesion["roi_mask_file_path"] if p))
    assert set(np.unique(mask)) == {0, 255}
    case = synthetic.make_case(0, 5)
    assert np.array_equal(read_png(a / f"lesion/synthetic/images/{case.name}.png"), case.image)
    # both training stages can read it
    tds = datasets.TissueDataset(a / "tissue_dataset.csv", size_hw=(256, 128))
    assert set(np.unique(tds[0]["mask"].numpy())) >= {0, 1, 2}
    lds = datasets.LesionDataset(a / "unified_segmentation_dataset.csv", size_hw=(256, 128))
    sums = [float(lds[i]["mask"].sum()) for i in range(len(lds))]
    assert sum(s == 0 for s in sums) == 2 and all(s > 0 for s in sums if s)


def test_tables_of_other_sources_are_not_replaced_without_overwrite(tmp_path, capsys):
    ws = tmp_path / "ws"
    assert run("--synthetic", "8", "--workspace", ws) == 0
    tables = {name: (ws / name).read_bytes() for name in ("tissue_dataset.csv", "unified_segmentation_dataset.csv")}
    assert run("--synthetic", "8", "--workspace", ws) == 0  # same sources: identical tables, no flag needed
    assert run("--synthetic", "4", "--workspace", ws) == 2  # other rows: refused, nothing replaced
    err = capsys.readouterr().err
    assert "8 rows" in err and "4 rows" in err and "--overwrite" in err
    assert all((ws / name).read_bytes() == content for name, content in tables.items())
    assert run("--synthetic", "4", "--workspace", ws, "--overwrite") == 0
    assert len(pd.read_csv(ws / "tissue_dataset.csv")) == 4

    # a hand edit of the same rows is named: the first cell that differs
    edited = pd.read_csv(ws / "tissue_dataset.csv", dtype=str, keep_default_na=False)
    cell = str(edited.loc[1, "split"])
    edited.loc[1, "split"] = "training"
    edited.to_csv(ws / "tissue_dataset.csv", index=False)
    capsys.readouterr()
    assert run("--synthetic", "4", "--workspace", ws) == 2
    err = capsys.readouterr().err
    assert f"row 3 (the header is row 1), column 'split': 'training' in the file, '{cell}' from this run" in err, err
    assert len(err.strip().splitlines()) == 1


def test_interrupted_run_is_completed_by_a_rerun(tmp_path, monkeypatch):
    clean, ws = tmp_path / "clean", tmp_path / "ws"
    assert run("--synthetic", "6", "--workspace", clean) == 0
    real_write = imaging.write_png
    calls = {"n": 0}

    def flaky_write(path, array, overwrite=True):
        calls["n"] += 1
        if calls["n"] == 5:
            Path(path).with_name(".tmp_half.png").write_bytes(b"\x89PNG half")  # what a crash could leave
            raise KeyboardInterrupt
        return real_write(path, array, overwrite)

    monkeypatch.setattr(imaging, "write_png", flaky_write)
    assert run("--synthetic", "6", "--workspace", ws) == 130  # Ctrl-C: one line, exit 130 (issue 21)
    monkeypatch.setattr(imaging, "write_png", real_write)
    assert not (ws / "tissue_dataset.csv").exists()
    assert run("--synthetic", "6", "--workspace", ws) == 0
    for name in ("tissue_dataset.csv", "unified_segmentation_dataset.csv"):
        assert (ws / name).read_bytes() == (clean / name).read_bytes()
    assert not list(ws.rglob(".tmp*"))  # the crash's leftover is removed, never used
    # a lost output is rebuilt, not trusted from the manifest
    lost = pd.read_csv(ws / "tissue_dataset.csv")["image_file_path"][0]
    (ws / lost).unlink()
    assert run("--synthetic", "6", "--workspace", ws) == 0
    assert (ws / lost).read_bytes() == (clean / lost).read_bytes()
    assert json.loads((ws / "prepare_report.json").read_text())["written"] == 1


def test_archive_holds_a_movable_workspace(tmp_path):
    ws = tmp_path / "ws"
    assert run("--synthetic", "4", "--workspace", ws, "--archive") == 0
    target = tmp_path / "ws.zip"
    with zipfile.ZipFile(target) as zf:
        names = set(zf.namelist())
        zf.extractall(tmp_path / "moved")
    assert "ws/tissue_dataset.csv" in names and not any("_extracted" in n or "manifest" in n for n in names)
    moved = tmp_path / "moved" / "ws"
    df = pd.read_csv(moved / "unified_segmentation_dataset.csv", dtype=str, keep_default_na=False)
    assert all((moved / p).is_file() for p in df["image_file_path"])


# ----------------------------------------------------------------------------------------------------------------
# zips and the offline download
# ----------------------------------------------------------------------------------------------------------------
def test_zips_dir_recognised_extracted_once_and_inputs_untouched(tmp_path):
    src = tmp_path / "src"
    mini = src / "mini"
    _mini_tree(mini)
    zips = tmp_path / "zips"
    zips.mkdir()
    with zipfile.ZipFile(zips / "MINI-DDSM-Complete-PNG-16.zip", "w") as zf:
        for p in sorted((mini / "MINI-DDSM-Complete-PNG-16").rglob("*")):
            zf.write(p, p.relative_to(mini).as_posix())
    case = synthetic.make_case(1, 0)
    with zipfile.ZipFile(zips / "Mammogram-segmentation-master.zip", "w") as zf:
        for sub, arr in (("fgt_seg", case.image), ("fgt_seg_labels", case.tissue_label)):
            suffix = "_LI" if sub.endswith("labels") else ""
            zf.writestr(f"Mammogram-segmentation-master/segmentation_data/train_valid/{sub}/"
                        f"A_0007_1.RIGHT_MLO{suffix}.png", cv2.imencode(".png", arr)[1].tobytes())
        zf.writestr("../escape.txt", "must not be extracted")
    with zipfile.ZipFile(zips / "holiday photos.zip", "w") as zf:
        zf.writestr("a.txt", "x")
    before = checksums(zips)
    ws = tmp_path / "ws"
    assert run("--zips-dir", zips, "--workspace", ws) == 0
    assert checksums(zips) == before and sorted(p.name for p in zips.iterdir()) == sorted(before)
    assert not (tmp_path / "escape.txt").exists() and not (ws / "escape.txt").exists()
    assert {p.name.split("-")[0] for p in (ws / "_extracted").iterdir()} == {"mini1", "tissue"}
    tissue = pd.read_csv(ws / "tissue_dataset.csv", dtype=str, keep_default_na=False)
    assert tissue["patient_id"].tolist() == ["A_0007"]
    lesion = pd.read_csv(ws / "unified_segmentation_dataset.csv", dtype=str, keep_default_na=False)
    assert len(lesion) == 3  # the main table only: B_0040 keeps its one contour (the extra masks are not zipped)
    assert lesion.loc[lesion["image_file_path"].str.contains("B_0040"), "n_masks"].item() == "1"
    report = json.loads((ws / "prepare_report.json").read_text())
    reasons = " ".join(s["reason"] for s in report["skipped"])
    assert "not recognised" in reasons and "unsafe path" in reasons
    marker = next((ws / "_extracted").glob("mini1-*")) / ".extracted.json"
    stamp = marker.stat().st_mtime_ns
    assert run("--zips-dir", zips, "--workspace", ws) == 0
    assert marker.stat().st_mtime_ns == stamp  # not extracted again


def test_tissue_url_offline_fails_with_a_clear_message(tmp_path, capsys):
    rc = run("--tissue-url", "http://127.0.0.1:9/", "--workspace", tmp_path / "ws")
    assert rc == 1
    err = capsys.readouterr().err
    assert "--tissue-dir" in err and "127.0.0.1:9" in err


def test_non_ascii_names_and_lesion_free_masks(tmp_path):
    src = tmp_path / "données"
    img = np.random.default_rng(4).integers(0, 256, (40, 30), dtype=np.uint8)
    imaging.write_png(src / "images" / "patiente_é_L_CC.png", img)
    imaging.write_png(src / "masks" / "patiente_é_L_CC.png", rect_mask((40, 30), 5, 9, 5, 9))
    imaging.write_png(src / "images" / "vide_R_MLO.png", img)
    imaging.write_png(src / "masks" / "vide_R_MLO.png", np.zeros((40, 30), np.uint8))
    imaging.write_png(src / "images" / "orphan_R_CC.png", img)
    ws = tmp_path / "espace de travail é"
    assert run("--lesion-dir", src, "--workspace", ws) == 0
    df = pd.read_csv(ws / "unified_segmentation_dataset.csv", dtype=str, keep_default_na=False)
    assert len(df) == 2 and set(df["source"]) == {"données"}
    row = df[df["image_file_path"].str.contains("patiente_é")].iloc[0]
    assert (row["laterality"], row["view"]) == ("L", "CC")
    assert np.array_equal(imaging.read_image(ws / row["image_file_path"]).pixels, img)
    empty = df[df["image_file_path"].str.contains("vide")].iloc[0]
    assert empty["roi_mask_file_path"] == "" and empty["pathology"] == "NORMAL" and empty["n_masks"] == "0"
    report = json.loads((ws / "prepare_report.json").read_text(encoding="utf-8"))
    assert [s["item"] for s in report["skipped"]] == [str(Path("images") / "orphan_R_CC.png")]


def test_bad_usage_is_refused(tissue_dir, tmp_path, capsys):
    assert run("--workspace", tmp_path / "ws") == 2
    assert "no source" in capsys.readouterr().err
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    assert run("--lesion-dir", src, "--workspace", src / "ws") == 2
    assert "inside the input folder" in capsys.readouterr().err
    assert not (src / "ws").exists()


def test_preparer_loads_neither_torch_nor_albumentations():
    """The preparer parses file names and tables: importing its command line loads no deep-learning stack."""
    code = "import sys, mammo.cli.prepare; print(sorted(m for m in ('torch','albumentations') if m in sys.modules))"
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
