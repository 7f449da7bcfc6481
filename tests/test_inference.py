"""cascade_inference.py on real files: sizes and orientation, the ROI, JSON, bad files, read-only inputs, DICOM.

Checkpoints are saved untrained (seeded) at small network sizes (stage 1 128x64, stage 2 64x64; ResNet18 encoder to
keep the files small), which is enough for geometry: every output must have the input's size and orientation, the
lesion probability must be zero outside the ROI box, and the files on disk must equal what ``cascade.Cascade``
returns. Because an untrained stage 1 may find no FGT, the ROI is also tested with fake stage runners whose FGT
region is known, so that the expected box can be computed by hand.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from mammo import cascade
from mammo.cli import infer as ci
from mammo.core import fileio
from mammo import imaging
from mammo.inference import predict
from mammo.cascade import load
from mammo.inference import listing
from mammo.core import labels, metrics
from mammo.inference import outputs
from mammo.inference import probability
from mammo.imaging import roi
from mammo.inference.record import RECORD_SPEC, lesion_components, validate_record

TISSUE_NAME = "A_0002_1.RIGHT_MLO.png"


# ---------------------------------------------------------------------------------------------------- fixtures
# checkpoint_dir (untrained, seeded best_stage1.pth / best_stage2.pth) is in conftest.py
@pytest.fixture(scope="session")
def loaded(checkpoint_dir) -> load.LoadedCascade:
    return load.load_cascade(checkpoint_dir / "stage1" / "best_stage1.pth",
                                  checkpoint_dir / "stage2" / "best_stage2.pth", device="cpu")


@pytest.fixture(scope="session")
def tissue_image(tissue_dir) -> Path:
    return tissue_dir / "fgt_seg" / TISSUE_NAME


def _args(checkpoint_dir: Path, *extra: str):
    return ci.get_args_parser().parse_args(["--checkpoint-dir", str(checkpoint_dir), "--device", "cpu", *extra])


def _read(path: Path) -> np.ndarray:
    return imaging.read_image(path).pixels


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns,
                                               hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _check_outputs(out_dir: Path, stem: str, pixels: np.ndarray, expected: cascade.CascadeResult | None = None) -> dict:
    """Every output of one image: size, values, consistency with each other and with the cascade's result."""
    record = json.loads((out_dir / f"{stem}.json").read_text(encoding="utf-8"))
    assert validate_record(record) == []
    shape = pixels.shape
    assert (record["image_size"]["height"], record["image_size"]["width"]) == shape
    tissue = _read(out_dir / f"{stem}_tissue_seg.png")
    color = cv2.imread(str(out_dir / f"{stem}_tissue_seg.png"), cv2.IMREAD_COLOR)  # a viewer shows the palette
    fgt = _read(out_dir / f"{stem}_fgt_mask.png")
    prob_png = _read(out_dir / f"{stem}_cancer_prob.png")
    assert tissue.shape == fgt.shape == prob_png.shape == color.shape[:2] == shape
    assert tissue.dtype == np.uint8 and set(np.unique(tissue)) <= {0, 1, 2, 3}
    assert np.array_equal(fgt, (tissue == 2).astype(np.uint8) * 255)
    palette_bgr = np.array(outputs.TISSUE_COLORS_RGB, np.uint8)[:, ::-1]
    assert np.array_equal(color, palette_bgr[tissue])
    if (out_dir / f"{stem}_tissue_seg_color.png").exists():  # --color-map: the same colours as plain RGB
        assert np.array_equal(cv2.imread(str(out_dir / f"{stem}_tissue_seg_color.png"), cv2.IMREAD_COLOR), color)
    box = record["roi"]["box"]
    inside = np.zeros(shape, bool)
    inside[box["y0"]:box["y1"], box["x0"]:box["x1"]] = True
    assert prob_png[~inside].max(initial=0) == 0  # exactly zero outside the ROI box
    assert record["tissue"]["areas_px"]["fgt"] == int((tissue == 2).sum())
    assert sum(record["tissue"]["areas_px"].values()) == tissue.size
    assert (out_dir / f"{stem}_visualization.png").stat().st_size > 10_000
    if expected is not None:  # what was written is what the cascade computed, in the input's orientation
        assert np.array_equal(tissue, expected.tissue_classes)
        assert np.array_equal(prob_png, probability.encode_probability(expected.lesion_prob))
        assert box == expected.roi_box.to_dict()
    return record


# -------------------------------------------------------------------------------------------- sizes and geometry
@pytest.mark.parametrize("kind", ["tissue_960x480", "nyu_16bit_2944x1920", "odd_1000x613"])
def test_outputs_have_each_inputs_size(kind, checkpoint_dir, loaded, tissue_image, nyu_dir, tmp_path):
    if kind == "tissue_960x480":
        source = tissue_image
    elif kind == "nyu_16bit_2944x1920":
        source = nyu_dir / "images" / "0_R-CC.png"
    else:
        source = tmp_path / "odd.png"
        imaging.write_png(source, cv2.resize(_read(tissue_image), (613, 1000), interpolation=cv2.INTER_AREA))
    pixels = _read(source)
    expected_shape = {"tissue_960x480": (960, 480), "nyu_16bit_2944x1920": (2944, 1920),
                      "odd_1000x613": (1000, 613)}[kind]
    assert pixels.shape == expected_shape
    out = tmp_path / "out"
    assert ci.main(_args(checkpoint_dir, "--image", str(source), "--output-dir", str(out))) == 0
    record = _check_outputs(out, source.stem, pixels, loaded.cascade(pixels))
    assert record["input"]["bit_depth"] == (16 if kind.startswith("nyu") else 8)
    assert record["checkpoints"]["stage1"]["epoch"] == 2 and record["checkpoints"]["stage1"]["best_metric"] == 0.25
    sha = hashlib.sha256((checkpoint_dir / "stage1" / "best_stage1.pth").read_bytes()).hexdigest()[:16]
    assert record["checkpoints"]["stage1"]["sha256_16"] == sha
    assert record["cancer_prob_encoding"].startswith("uint8")


def test_mirrored_input_gives_mirrored_outputs(loaded, tissue_image, tmp_path):
    """Orientation: the mirrored image is normalised back by preprocessing, so its outputs are the mirror images."""
    pixels = _read(tissue_image)
    mirrored_path = tmp_path / "in" / "mirrored.png"
    imaging.write_png(mirrored_path, np.ascontiguousarray(pixels[:, ::-1]))
    first = predict.run_image(loaded, tissue_image)
    second = predict.run_image(loaded, mirrored_path)
    assert first.result.flipped != second.result.flipped
    assert np.array_equal(second.result.tissue_classes, first.result.tissue_classes[:, ::-1])
    np.testing.assert_allclose(second.result.lesion_prob, first.result.lesion_prob[:, ::-1], atol=1e-6)
    assert second.record["roi"]["box"] == first.result.roi_box.mirrored(pixels.shape[1]).to_dict()


def _fake_stage1(rows: tuple[int, int], cols: tuple[int, int], fgt: bool = True):
    """Stage-1 logits: adipose everywhere, FGT in ``rows x cols`` of the network input (normalised frame)."""
    def run(batch: np.ndarray) -> np.ndarray:
        logits = np.zeros((batch.shape[0], 4) + batch.shape[2:], np.float32)
        logits[:, 1] = 5.0
        if fgt:
            logits[:, 2, rows[0]:rows[1], cols[0]:cols[1]] = 10.0
        return logits
    return run


def _constant_stage2(logit: float):
    def run(batch: np.ndarray) -> np.ndarray:
        return np.full((batch.shape[0], 1) + batch.shape[2:], logit, np.float32)
    return run


@pytest.mark.parametrize("mirror", [False, True])
def test_roi_box_by_hand_and_zero_outside_with_a_known_fgt_region(mirror, loaded, tissue_image, tmp_path):
    """FGT at network rows [32, 64) x cols [8, 32) of 128x64 -> original rows [240, 480) x cols [60, 240) of
    960x480 (scale 7.5, pixel-centre nearest); 10 % margin: 24 rows, 18 columns -> box [216, 504) x [42, 258) in
    the normalised frame, mirrored to [222, 438) when preprocessing mirrored the input."""
    pixels = _read(tissue_image)
    if mirror:
        pixels = np.ascontiguousarray(pixels[:, ::-1])
    source = tmp_path / "in" / "image.png"
    imaging.write_png(source, pixels)
    # at the input's own scale (no working scale), so that the geometry is the one computed by hand above
    stage1 = dict(loaded.cascade.stage1_checkpoint,
                  preprocess_config=dict(loaded.cascade.preprocess_config, working_breast_height_px=0))
    model = cascade.Cascade(stage1, loaded.cascade.stage2_checkpoint,
                            stage1_runner=_fake_stage1((32, 64), (8, 32)), stage2_runner=_constant_stage2(2.0))
    fake = load.LoadedCascade(model, loaded.identities, "cpu", "torch")
    prediction = predict.run_image(fake, source, threshold=0.5)
    flipped = imaging.preprocess(pixels, model.preprocess_config).flipped
    assert flipped == mirror  # this DDSM right MLO has its chest wall on the left
    x0, x1 = (222, 438) if flipped else (42, 258)
    expected_box = {"y0": 216, "x0": x0, "y1": 504, "x1": x1}
    out = tmp_path / "out"
    record = outputs.write_outputs(prediction, out, "image", threshold=0.5)
    assert record["roi"]["box"] == expected_box and record["roi"]["source"] == "fgt"
    prob = _read(out / "image_cancer_prob.png")
    inside = np.zeros(prob.shape, bool)
    inside[216:504, x0:x1] = True
    assert np.all(prob[inside] == round(255 / (1 + np.exp(-2.0))))  # sigmoid(2) = 0.8808 -> 225
    assert np.all(prob[~inside] == 0)
    fgt = _read(out / "image_fgt_mask.png") > 0
    # stage 1's probabilities are resized linearly (issue 19), so the network's square region keeps its edges (the
    # argmax crosses half-way between network pixels, as nearest did) and rounds its four corners off
    c0 = 240 if flipped else 60
    rectangle = np.zeros_like(fgt)
    rectangle[240:480, c0:c0 + 180] = True
    assert not (fgt & ~rectangle).any() and fgt[243:477, c0 + 3:c0 + 177].all()
    assert fgt[240, c0 + 90] and fgt[479, c0 + 90] and fgt[360, c0] and fgt[360, c0 + 179]  # the edges stay
    assert 240 * 180 - 4 * 10 <= fgt.sum() < 240 * 180  # only the corners are cut
    lesions = record["lesions"]  # the whole ROI is one component above 0.5
    assert lesions["count"] == 1 and lesions["components"][0]["box"] == expected_box
    assert lesions["components"][0]["area_px"] == 288 * 216
    assert lesions["components"][0]["max_probability"] == pytest.approx(0.8808, abs=1e-4)
    assert record["density"]["percent"] == pytest.approx(100 * fgt.sum() / (960 * 480), abs=5e-4)  # 3 decimals
    assert record["density"]["category"] == "A"
    _check_outputs(out, "image", pixels)


def test_no_fgt_falls_back_to_the_breast_box_and_says_so(loaded, tissue_image):
    model = cascade.Cascade(loaded.cascade.stage1_checkpoint, loaded.cascade.stage2_checkpoint,
                            stage1_runner=_fake_stage1((0, 0), (0, 0), fgt=False), stage2_runner=_constant_stage2(-8.0))
    record = predict.predict_image(load.LoadedCascade(model, loaded.identities, "cpu", "torch"), tissue_image)
    assert record["roi"]["source"] == "breast" and "No FGT" in record["roi"]["explanation"]
    assert any("No FGT" in line for line in record["findings"])
    assert record["lesions"]["count"] == 0 and record["density"]["percent"] == 0.0
    assert validate_record(record) == []


# ------------------------------------------------------------------------------------------------ measurements
def test_lesion_components_by_hand():
    prob = np.zeros((20, 30), np.float32)
    prob[2:5, 3:7] = 0.9  # 12 px
    prob[5, 7] = 0.6  # touches the block only diagonally: joined under 8-connectivity
    prob[10:12, 20:21] = 0.7  # 2 px
    prob[15, 15] = 0.4  # below the threshold
    result = lesion_components(prob, threshold=0.5, spacing_mm=(0.1, 0.2))
    assert result["count"] == 2 and result["total_area_px"] == 15
    first, second = result["components"]
    assert first["id"] == 1 and first["area_px"] == 13 and first["box"] == {"y0": 2, "x0": 3, "y1": 6, "x1": 8}
    assert first["max_probability"] == pytest.approx(0.9)
    assert first["mean_probability"] == pytest.approx((12 * 0.9 + 0.6) / 13, abs=1e-4)
    assert first["area_mm2"] == pytest.approx(13 * 0.02)
    assert second["box"] == {"y0": 10, "x0": 20, "y1": 12, "x1": 21} and second["centroid_yx"] == [10.5, 20.0]
    assert result["max_probability"] == pytest.approx(0.9)
    filtered = lesion_components(prob, threshold=0.5, min_area_px=3)
    assert filtered["count"] == 1 and filtered["total_area_mm2"] is None
    assert lesion_components(prob, threshold=0.95)["count"] == 0
    box = roi.RoiBox(1, 1, prob.shape[0], prob.shape[1])  # prob is 0 outside it: searching the box alone is the same
    assert not prob[0].any() and not prob[:, 0].any()
    assert lesion_components(prob, threshold=0.5, spacing_mm=(0.1, 0.2), box=box) == result


def test_probability_encodings_round_trip():
    prob = np.array([[0.0, 0.5, 1.0, 0.25]], np.float32)
    eight, sixteen = probability.encode_probability(prob, "uint8"), probability.encode_probability(prob, "uint16")
    assert eight.dtype == np.uint8 and eight.tolist() == [[0, 128, 255, 64]]
    assert sixteen.dtype == np.uint16 and sixteen.tolist() == [[0, 32768, 65535, 16384]]
    assert np.abs(probability.decode_probability(sixteen) - prob).max() < 1e-4


def test_validate_record_catches_missing_and_mistyped_fields(loaded, tissue_image):
    record = json.loads(json.dumps(fileio.json_safe(predict.predict_image(loaded, tissue_image))))
    record["outputs"] = {k: "x.png" for k in RECORD_SPEC["outputs"]}
    assert validate_record(record) == []
    broken = json.loads(json.dumps(record))
    del broken["density"]["category"]
    broken["image_size"]["height"] = "960"
    broken["roi"]["box"]["x1"] = 10_000
    problems = validate_record(broken)
    assert any("density.category: missing" in p for p in problems)
    assert any("image_size.height: expected int, found str" in p for p in problems)
    broken = json.loads(json.dumps(record))
    broken["roi"]["box"]["x1"] = 10_000
    assert any("not inside" in p for p in validate_record(broken))


# ------------------------------------------------------------------------------------------------------ folders
def test_folder_with_bad_files_processes_the_rest_and_never_touches_inputs(checkpoint_dir, tissue_dir, tmp_path):
    inputs = tmp_path / "inputs"
    (inputs / "sub").mkdir(parents=True)
    names = sorted(p.name for p in (tissue_dir / "fgt_seg").glob("*.png"))[:2]
    shutil.copy(tissue_dir / "fgt_seg" / names[0], inputs / names[0])
    shutil.copy(tissue_dir / "fgt_seg" / names[1], inputs / "sub" / names[1])
    shutil.copy(tissue_dir / "fgt_seg" / names[1], inputs / "sub" / "copy.png")
    shutil.copy(tissue_dir / "fgt_seg" / names[0], inputs / "sub" / names[0])  # same stem in another folder
    good = (inputs / names[0]).read_bytes()
    (inputs / "corrupt.png").write_bytes(good[:400])  # a truncated PNG
    (inputs / "empty.png").write_bytes(b"")
    (inputs / "notes.txt").write_text("not an image\n", encoding="utf-8")
    before = _snapshot(inputs)
    out = tmp_path / "out"
    assert ci.main(_args(checkpoint_dir, "--image-dir", str(inputs), "--recursive", "--output-dir", str(out),
                         "--no-visualization")) == 1
    assert _snapshot(inputs) == before  # nothing in the input folder changed
    rows = {row["input"]: row for row in csv.DictReader((out / "predictions.csv").open(encoding="utf-8"))}
    assert set(rows) == {names[0], f"sub/{names[1]}", "sub/copy.png", f"sub/{names[0]}", "corrupt.png", "empty.png",
                         "notes.txt"}
    assert {k: v["status"] for k, v in rows.items()} == {
        names[0]: "ok", f"sub/{names[1]}": "ok", "sub/copy.png": "ok", f"sub/{names[0]}": "ok",
        "corrupt.png": "failed", "empty.png": "failed", "notes.txt": "not_image"}
    assert "empty" in rows["empty.png"]["reason"] and "corrupt.png" in rows["corrupt.png"]["reason"]
    assert "not an image" in rows["notes.txt"]["reason"]
    stem = Path(names[0]).stem
    assert (out / f"{stem}.json").is_file() and (out / "sub" / f"{stem}.json").is_file()  # folders mirrored
    assert rows[f"sub/{names[0]}"]["json"] == f"sub/{stem}.json"
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["counts"] == {"ok": 4, "failed": 2, "not_image": 1}
    assert {entry["input"] for entry in summary["failed"]} == {"corrupt.png", "empty.png"}
    assert sum(summary["density_categories"].values()) == 4
    # the same pixels in two places give the same results
    assert np.array_equal(_read(out / f"{stem}_tissue_seg.png"), _read(out / "sub" / f"{stem}_tissue_seg.png"))

    # a second run without --overwrite keeps every output and reports the images as "exists"
    outputs_before = _snapshot(out)
    assert ci.main(_args(checkpoint_dir, "--image-dir", str(inputs), "--recursive", "--output-dir", str(out),
                         "--no-visualization")) == 1
    after = _snapshot(out)
    assert all(after[name] == value for name, value in outputs_before.items())
    new_tables = sorted(set(after) - set(outputs_before))
    assert len(new_tables) == 2 and all(name.startswith(("predictions_", "summary_")) for name in new_tables)
    table = next(name for name in new_tables if name.startswith("predictions_"))
    rows = {row["input"]: row for row in csv.DictReader((out / table).open(encoding="utf-8"))}
    assert rows[names[0]]["status"] == "exists" and rows[names[0]]["percent_density"] != ""
    assert _snapshot(inputs) == before


@pytest.mark.parametrize("prefetch", ["0", "1"])
def test_batches_give_the_same_outputs_as_single_images(prefetch, checkpoint_dir, tissue_dir, nyu_dir, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name in sorted(p.name for p in (tissue_dir / "fgt_seg").glob("*.png"))[:3]:
        shutil.copy(tissue_dir / "fgt_seg" / name, inputs / name)
    shutil.copy(nyu_dir / "images" / "0_R-MLO.png", inputs / "0_R-MLO.png")  # 16-bit, another size, same group
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # fails alone inside its group
    results = {}
    for batch in ("1", "3"):
        out = tmp_path / f"out_{batch}"
        assert ci.main(_args(checkpoint_dir, "--image-dir", str(inputs), "--output-dir", str(out), "--batch-size",
                             batch, "--prefetch", prefetch, "--no-visualization")) == 1
        rows = {row["input"]: row["status"] for row in csv.DictReader((out / "predictions.csv").open(encoding="utf-8"))}
        assert rows.pop("broken.png") == "failed" and set(rows.values()) == {"ok"} and len(rows) == 4
        results[batch] = {p.name: _read(p) for p in sorted(out.glob("*_tissue_seg.png"))}
        results[batch].update({p.name: _read(p) for p in sorted(out.glob("*_cancer_prob.png"))})
        record = json.loads((out / "0_R-MLO.json").read_text(encoding="utf-8"))
        assert record["runtime"]["batch_size"] == (1 if batch == "1" else 3)
    assert results["1"].keys() == results["3"].keys() and len(results["1"]) == 8
    for name, single in results["1"].items():
        difference = np.abs(single.astype(int) - results["3"][name].astype(int))
        assert difference.max() <= 1, name  # probabilities may differ by one 8-bit step (summation order)


def test_stem_collisions_and_output_folder_inside_the_input(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "a.dcm").write_bytes(b"x")
    (tmp_path / "scan001").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 10)  # extensionless DICOM
    (tmp_path / ".hidden.png").write_bytes(b"x")
    (tmp_path / "predictions").mkdir()
    (tmp_path / "predictions" / "old_tissue_seg.png").write_bytes(b"x")
    items = listing.list_inputs(tmp_path, recursive=True, output_dir=tmp_path / "predictions")
    assert {item.relative: (item.stem, item.status) for item in items} == {
        "a.dcm": ("a_dcm", "pending"), "a.png": ("a_png", "pending"), "scan001": ("scan001", "pending")}


def test_usage_errors_exit_2(checkpoint_dir, tissue_image, tmp_path, capsys):
    parser = ci.get_args_parser()
    stage1 = str(checkpoint_dir / "stage1" / "best_stage1.pth")
    stage2 = str(checkpoint_dir / "stage2" / "best_stage2.pth")
    base = ["--image", str(tissue_image), "--output-dir", str(tmp_path / "o"), "--device", "cpu"]
    assert ci.main(parser.parse_args(["--stage1-weights", stage2, "--stage2-weights", stage1, *base])) == 2
    assert "swap" in capsys.readouterr().err
    assert ci.main(parser.parse_args(["--checkpoint-dir", str(tmp_path), *base])) == 2
    assert "best_stage1.pth" in capsys.readouterr().err
    assert ci.main(parser.parse_args(["--checkpoint-dir", str(checkpoint_dir), "--image", str(tmp_path / "none.png"),
                                      "--device", "cpu"])) == 2
    assert ci.main(parser.parse_args(["--checkpoint-dir", str(checkpoint_dir), "--image-dir", str(tmp_path),
                                      "--output-dir", str(tmp_path), "--device", "cpu"])) == 2
    assert "input folder" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("x")
    assert ci.main(parser.parse_args(["--checkpoint-dir", str(checkpoint_dir), "--image", str(tissue_image),
                                      "--output-dir", str(tmp_path / "a_file"), "--device", "cpu"])) == 2
    assert "is a file" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(bytes(range(256)) * 40)
    assert ci.main(parser.parse_args(["--stage1-weights", str(corrupt), "--stage2-weights", stage2, *base])) == 2
    err = capsys.readouterr().err
    assert "corrupt.pth" in err and "weights_only" not in err  # no advice to unpickle an untrusted file
    if not torch.cuda.is_available():
        assert ci.main(parser.parse_args(["--checkpoint-dir", str(checkpoint_dir), *base[:-2],
                                          "--device", "cuda"])) == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["--threshold", "1.5"])
    assert not (tmp_path / "o").exists()


def test_unreadable_single_image_exits_1(checkpoint_dir, tmp_path):
    bad = tmp_path / "in" / "bad.png"
    bad.parent.mkdir()
    bad.write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    assert ci.main(_args(checkpoint_dir, "--image", str(bad), "--output-dir", str(tmp_path / "out"))) == 1
    assert not (tmp_path / "out" / "bad.json").exists()


# -------------------------------------------------------------------------------------------------------- DICOM
def _write_dicom(path: Path, pixels: np.ndarray, spacing_mm=(0.1, 0.1)) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"  # Digital Mammography X-Ray Image (presentation)
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "MG"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    bits = 8 if pixels.dtype == np.uint8 else 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    ds.PixelSpacing = [f"{spacing_mm[0]:g}", f"{spacing_mm[1]:g}"]
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_dicom_input_gives_the_same_masks_as_its_png(checkpoint_dir, tissue_image, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    shutil.copy(tissue_image, inputs / "scan.png")
    _write_dicom(inputs / "scan_dicom", _read(tissue_image), spacing_mm=(0.1, 0.2))  # no suffix: found by its magic
    out = tmp_path / "out"
    assert ci.main(_args(checkpoint_dir, "--image-dir", str(inputs), "--output-dir", str(out),
                         "--no-visualization")) == 0
    for suffix in ("_tissue_seg.png", "_fgt_mask.png", "_cancer_prob.png"):
        assert np.array_equal(_read(out / f"scan{suffix}"), _read(out / f"scan_dicom{suffix}")), suffix
    png_record = json.loads((out / "scan.json").read_text(encoding="utf-8"))
    dicom_record = json.loads((out / "scan_dicom.json").read_text(encoding="utf-8"))
    assert dicom_record["input"]["source_format"] == "dicom" and dicom_record["pixel_spacing_mm"] == [0.1, 0.2]
    assert png_record["pixel_spacing_mm"] is None and png_record["tissue"]["areas_mm2"] is None
    areas_px, areas_mm2 = dicom_record["tissue"]["areas_px"], dicom_record["tissue"]["areas_mm2"]
    assert all(areas_mm2[k] == pytest.approx(areas_px[k] * 0.02, abs=1e-3) for k in areas_px)
    assert dicom_record["roi"] == png_record["roi"] and dicom_record["density"] == png_record["density"]


def test_dicom_input_writes_a_segmentation_with_the_png_masks_and_the_source_uids(checkpoint_dir, loaded, tissue_image,
                                                                                tmp_path):
    """<stem>_seg.dcm reads back (highdicom) with the tissue classes of <stem>_tissue_seg.png, the lesion mask of the
    cascade at the threshold, the source's UIDs and pixel spacing; --no-dicom-seg and non-DICOM inputs write none."""
    hd = pytest.importorskip("highdicom")
    import pydicom
    from pydicom.uid import generate_uid

    from dicom_helpers import make_dicom

    pixels = _read(tissue_image)
    (tmp_path / "in").mkdir()
    uids = {"StudyInstanceUID": generate_uid(), "SeriesInstanceUID": generate_uid(),
            "FrameOfReferenceUID": generate_uid()}
    source = make_dicom(pixels, tmp_path / "in" / "scan.dcm", PixelSpacing=[0.1, 0.2], PatientOrientation=["A", "R"],
                        PositionReferenceIndicator="", **uids)
    prob = loaded.cascade(pixels).lesion_prob
    threshold = round(float(np.median(prob[prob > 0])), 4)  # the untrained model's lesion mask is then partial
    out = tmp_path / "out"
    assert ci.main(_args(checkpoint_dir, "--image", str(source), "--output-dir", str(out), "--backend", "torch",
                         "--threshold", str(threshold), "--no-visualization")) == 0
    record = json.loads((out / "scan.json").read_text(encoding="utf-8"))
    assert record["outputs"]["dicom_seg"] == "scan_seg.dcm" and validate_record(record) == []
    seg = hd.seg.segread(out / "scan_seg.dcm")
    sop = pydicom.dcmread(source).SOPInstanceUID
    segments = seg.get_pixels_by_source_instance([sop], segment_numbers=[1, 2, 3, 4])[0].astype(bool)
    tissue = _read(out / "scan_tissue_seg.png")
    assert tissue.shape == segments.shape[:2] == pixels.shape
    for number, class_id in ((1, labels.ADIPOSE), (2, labels.FGT), (3, labels.PECTORAL)):
        np.testing.assert_array_equal(segments[..., number - 1], tissue == class_id)
    np.testing.assert_array_equal(segments[..., 3], prob >= threshold)
    for k in (0, 3):  # the comparisons are not between empty or full masks
        assert segments[..., k].any() and not segments[..., k].all()
    assert seg.StudyInstanceUID == uids["StudyInstanceUID"] and seg.FrameOfReferenceUID == uids["FrameOfReferenceUID"]
    assert [item.ReferencedSOPInstanceUID for item in seg.SourceImageSequence] == [sop]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uids["SeriesInstanceUID"]
    spacing = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    assert [float(v) for v in spacing] == [0.1, 0.2]

    # with --min-lesion-area the SEG holds the components the record lists, not the specks it leaves out
    count, ids, stats, _ = cv2.connectedComponentsWithStats((prob >= threshold).astype(np.uint8), connectivity=8)
    areas = sorted(int(a) for a in stats[1:, cv2.CC_STAT_AREA])
    assert len(areas) >= 2 and areas[0] < areas[-1], areas  # some components are dropped, some kept
    min_area = areas[-1]  # keeps the largest component (and any of equal size)
    out_min = tmp_path / "min_area"
    assert ci.main(_args(checkpoint_dir, "--image", str(source), "--output-dir", str(out_min), "--backend", "torch",
                         "--threshold", str(threshold), "--min-lesion-area", str(min_area), "--no-visualization")) == 0
    record = json.loads((out_min / "scan.json").read_text(encoding="utf-8"))
    lesion = hd.seg.segread(out_min / "scan_seg.dcm").get_pixels_by_source_instance(
        [sop], segment_numbers=[4])[0][..., 0].astype(bool)
    kept = [i for i in range(1, count) if stats[i, cv2.CC_STAT_AREA] >= min_area]
    np.testing.assert_array_equal(lesion, np.isin(ids, kept))
    assert int(lesion.sum()) == record["lesions"]["total_area_px"] < int((prob >= threshold).sum())

    assert ci.main(_args(checkpoint_dir, "--image", str(source), "--output-dir", str(tmp_path / "no_seg"),
                         "--no-dicom-seg", "--no-visualization")) == 0
    assert not (tmp_path / "no_seg" / "scan_seg.dcm").exists()
    assert json.loads((tmp_path / "no_seg" / "scan.json").read_text(encoding="utf-8"))["outputs"]["dicom_seg"] is None
    assert ci.main(_args(checkpoint_dir, "--image", str(tissue_image), "--output-dir", str(tmp_path / "png"),
                         "--no-visualization")) == 0
    assert not list((tmp_path / "png").glob("*.dcm"))


def test_dense_mask_round_trips_through_png_json_and_dicom_seg(loaded, tissue_image, tmp_path):
    """The dense pixels (issue 19): ``<stem>_dense_mask.png`` equals the SEG's segment 5, lies inside the FGT region,
    and the record's ``dense_percent`` is its share of the breast (adipose + FGT pixels of ``<stem>_tissue_seg.png``).
    Stage 1 is a fixed map with an FGT region, so that there are dense pixels to carry."""
    hd = pytest.importorskip("highdicom")
    import pydicom
    from pydicom.uid import generate_uid

    from dicom_helpers import make_dicom

    (tmp_path / "in").mkdir()
    source = make_dicom(_read(tissue_image), tmp_path / "in" / "scan.dcm", PixelSpacing=[0.1, 0.1],
                        StudyInstanceUID=generate_uid(), SeriesInstanceUID=generate_uid())
    model = cascade.Cascade(loaded.cascade.stage1_checkpoint, loaded.cascade.stage2_checkpoint,
                            stage1_runner=_fake_stage1((32, 64), (8, 32)), stage2_runner=_constant_stage2(-8.0))
    prediction = predict.run_image(load.LoadedCascade(model, loaded.identities, "cpu", "torch"), source)
    out = tmp_path / "out"
    record = outputs.write_outputs(prediction, out, "scan", visualization=False)
    tissue, dense = _read(out / "scan_tissue_seg.png"), _read(out / "scan_dense_mask.png") > 0
    assert record["outputs"]["dense_mask"] == "scan_dense_mask.png" and validate_record(record) == []
    assert dense.any() and not (dense & (tissue != labels.FGT)).any() and dense.sum() < (tissue == labels.FGT).sum()
    breast = int(((tissue == labels.ADIPOSE) | (tissue == labels.FGT)).sum())
    assert record["density"]["dense_percent"] == pytest.approx(100 * dense.sum() / breast, abs=5e-4)
    assert record["density"]["dense_category"] == metrics.density_category(record["density"]["dense_percent"])
    seg = hd.seg.segread(out / "scan_seg.dcm")
    sop = pydicom.dcmread(source).SOPInstanceUID
    assert seg.get_segment_numbers() == [1, 2, 3, 4, 5]
    assert seg.get_segment_description(5).segment_label == "Dense tissue"
    segment = seg.get_pixels_by_source_instance([sop], segment_numbers=[5])[0][..., 0].astype(bool)
    np.testing.assert_array_equal(segment, dense)


def test_tissue_map_is_an_indexed_png_with_exact_classes_and_the_display_palette(loaded, tissue_image, tmp_path):
    from PIL import Image

    prediction = predict.run_image(loaded, tissue_image)
    outputs.write_outputs(prediction, tmp_path, "t", visualization=False)
    with Image.open(tmp_path / "t_tissue_seg.png") as im:
        assert im.mode == "P"
        indices = np.array(im)
        palette = np.array(im.getpalette()[:12]).reshape(4, 3)
    np.testing.assert_array_equal(indices, prediction.result.tissue_classes)
    np.testing.assert_array_equal(palette, np.array(outputs.TISSUE_COLORS_RGB))
    np.testing.assert_array_equal(_read(tmp_path / "t_tissue_seg.png"), prediction.result.tissue_classes)
    assert any("palette indices" in note for note in imaging.read_image(tmp_path / "t_tissue_seg.png").notes)


def test_every_output_file_is_explained_in_the_readme_and_in_help():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    help_text = ci.get_args_parser().format_help()
    for pattern in [p for _, p, _ in outputs.OUTPUT_FILES] + [p for p, _ in outputs.FOLDER_FILES]:
        assert f"`{pattern}`" in readme, pattern
        assert pattern in help_text, pattern


# ----------------------------------------------------------------------------------------------------- options
def test_tta_adaptive_clahe_and_16_bit_probability(checkpoint_dir, tissue_image, tmp_path):
    out = tmp_path / "out"
    assert ci.main(_args(checkpoint_dir, "--image", str(tissue_image), "--output-dir", str(out), "--tta",
                         "--adaptive-clahe", "--prob-encoding", "uint16", "--threshold", "0.3")) == 0
    stem = tissue_image.stem
    record = _check_outputs(out, stem, _read(tissue_image))
    assert record["preprocessing"]["tta"] is True and record["preprocessing"]["adaptive_clahe"] == "auto"
    assert isinstance(record["preprocessing"]["adaptive_clahe_used"], bool)
    assert record["lesions"]["threshold"] == 0.3 and record["cancer_prob_encoding"].startswith("uint16")
    assert _read(out / f"{stem}_cancer_prob.png").dtype == np.uint16
    # an existing output is not overwritten without --overwrite (made with other settings: a conflict, exit 1) ...
    mtime = (out / f"{stem}.json").stat().st_mtime_ns
    assert ci.main(_args(checkpoint_dir, "--image", str(tissue_image), "--output-dir", str(out))) == 1
    assert (out / f"{stem}.json").stat().st_mtime_ns == mtime
    # ... and is with it
    assert ci.main(_args(checkpoint_dir, "--image", str(tissue_image), "--output-dir", str(out), "--overwrite")) == 0
    record = json.loads((out / f"{stem}.json").read_text(encoding="utf-8"))
    assert record["preprocessing"]["tta"] is False and _read(out / f"{stem}_cancer_prob.png").dtype == np.uint8


def test_onnxruntime_backend_matches_torch(checkpoint_dir, loaded, tissue_image):
    pytest.importorskip("onnxruntime")
    onnx_backend = pytest.importorskip("onnx_backend")
    assert onnx_backend is not None
    onnx = load.load_cascade(checkpoint_dir / "stage1" / "best_stage1.pth",
                                  checkpoint_dir / "stage2" / "best_stage2.pth", device="cpu", backend="onnxruntime")
    first, second = predict.run_image(loaded, tissue_image), predict.run_image(onnx, tissue_image)
    assert second.record["runtime"]["backend"] == "onnxruntime"
    assert (first.result.tissue_classes == second.result.tissue_classes).mean() > 0.999
    assert np.abs(first.result.lesion_prob - second.result.lesion_prob).max() < 1e-3


def test_interactive_without_a_display_exits_2(checkpoint_dir, tissue_image, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    if not __import__("sys").platform.startswith("linux"):
        pytest.skip("the DISPLAY check applies to Linux")
    assert ci.main(_args(checkpoint_dir, "--image", str(tissue_image), "--output-dir", str(tmp_path / "o"),
                         "--interactive")) == 2
    assert "no display" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_implausible_image_sizes_are_rejected(loaded, tissue_image, tmp_path):
    """Issue 21: an image no mammogram can be (5 x 5 px, a 3000 x 200 strip) is ``rejected`` with the reason, not
    measured as one with a warning; a real mammogram is ``ok``."""
    assert predict.predict_image(loaded, tissue_image)["status"] == "ok"
    tiny, strip = tmp_path / "tiny.png", tmp_path / "strip.png"
    imaging.write_png(tiny, np.full((5, 5), 120, np.uint8))
    imaging.write_png(strip, np.full((3000, 200), 120, np.uint8))
    for path, words in ((tiny, "5 x 5 px"), (strip, "a ratio over")):
        record = predict.predict_image(loaded, path)
        assert record["status"] == "rejected" and record["quality"]["status"] == "rejected"
        assert any(words in reason for reason in record["quality"]["reasons"]), record["quality"]
        assert any(finding.startswith("Rejected:") and words in finding for finding in record["findings"])
        assert validate_record(record) == []


def test_a_rejected_image_gets_its_record_only_and_no_numbers_in_the_table(checkpoint_dir, tissue_image, tmp_path):
    """Issue 21: an all-black frame is rejected: exit 1, only <stem>.json (status and reasons), no maps, and its
    predictions.csv row carries the verdict without density or lesion numbers; a rerun keeps the verdict."""
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copyfile(tissue_image, folder / "film.png")
    imaging.write_png(folder / "black.png", np.zeros((1024, 800), np.uint8))
    out = tmp_path / "out"
    for run in range(2):  # the second run keeps both records (same file, weights, settings)
        assert ci.main(_args(checkpoint_dir, "--image-dir", str(folder), "--output-dir", str(out),
                             "--no-visualization", "--backend", "torch")) == 1
        assert sorted(p.name for p in out.glob("black*")) == ["black.json"]
        record = json.loads((out / "black.json").read_text(encoding="utf-8"))
        assert record["status"] == "rejected" and "nearly uniform" in record["quality"]["reasons"][0]
        table = sorted(out.glob("predictions*.csv"))[-1]
        with table.open(encoding="utf-8", newline="") as stream:
            rows = {row["input"]: row for row in csv.DictReader(stream)}
        assert rows["black.png"]["status"] == "rejected" and "nearly uniform" in rows["black.png"]["reason"]
        assert rows["black.png"]["dense_percent"] == rows["black.png"]["lesion_count"] == ""
        assert rows["film.png"]["status"] == ("ok" if run == 0 else "exists") and rows["film.png"]["dense_percent"]


def test_progress_lines_keep_the_input_order_with_read_ahead_and_write_behind(checkpoint_dir, tissue_image, tmp_path,
                                                                               monkeypatch):
    """With the reader and writer threads, a file that fails to read is known while the image ahead of it is still
    being written; its progress line still comes after that image's (inputs a..e, b and d corrupt). The table gives
    the failures' reasons, and the warning of an image done with one (f, 10 x 10 px)."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a", "c", "e"):
        shutil.copyfile(tissue_image, folder / f"{name}.png")
    for name in ("b", "d"):
        (folder / f"{name}.png").write_bytes(tissue_image.read_bytes()[:300])  # truncated: fails at reading
    imaging.write_png(folder / "f.png", np.full((10, 10), 120, np.uint8))
    lines = []
    monkeypatch.setattr(predict, "_report",
                        lambda item, index, total: lines.append((index, item.relative, item.status)))
    assert ci.main(_args(checkpoint_dir, "--image-dir", str(folder), "--output-dir", str(tmp_path / "out"),
                         "--no-visualization", "--backend", "torch")) == 1
    assert lines == [(0, "a.png", "ok"), (1, "b.png", "failed"), (2, "c.png", "ok"), (3, "d.png", "failed"),
                     (4, "e.png", "ok"), (5, "f.png", "rejected")]  # 10 x 10 px is no mammogram (issue 21)
    with (tmp_path / "out" / "predictions.csv").open(encoding="utf-8", newline="") as stream:
        reasons = {row["input"]: row["reason"] for row in csv.DictReader(stream)}
    assert reasons["a.png"] == reasons["e.png"] == "" and "truncated" in reasons["b.png"]
    assert reasons["f.png"].startswith("the image is only 10 x 10 px"), reasons["f.png"]
