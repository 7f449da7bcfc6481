"""The predictors the evaluation scores, each with ``tissue(case, pixels)`` and ``lesion(case, pixels)``.

What lives here (the cases are ``cases.py``, the scores ``scores.py``): :class:`LesionPrediction` (one image's
lesion probability, ROI box, stage-1 tissue map and ROI source), :class:`FolderPredictions` (the files
``cascade_inference.py`` wrote) and :class:`CascadePredictions` (the cascade run here, either backend).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mammo import cascade
from mammo import imaging
from mammo.cascade import checks
from mammo.core import labels
from mammo.evaluation.cases import Case
from mammo.imaging import roi
from mammo.weights import runners

_NUM_TISSUE_CLASSES = len(labels.TISSUE_CLASS_NAMES)


@dataclass
class LesionPrediction:
    """One image's lesion prediction as scored: the probability map and the ROI box it was searched in (None when
    the predictions folder does not say)."""

    prob: np.ndarray  # (H, W) float32 in [0, 1]
    roi_box: roi.RoiBox | None
    tissue_classes: np.ndarray | None = None  # (H, W) uint8 stage-1 classes 0..3 (None: not available)
    roi_source: str | None = None  # "fgt", "breast" or "image" (roi.fgt_roi_box); None: not known


class FolderPredictions:
    """Predictions written by ``cascade_inference.py``: ``<stem>_tissue_seg.png``, ``<stem>_cancer_prob.png`` (uint8
    p x 255 or uint16 p x 65535) and ``<stem>.json`` (its ``roi.box``).

    Files are looked up in the folder itself first, then anywhere below it (``cascade_inference.py --recursive``
    mirrors the input's sub-folders); a name found in several sub-folders is an error (ambiguous).
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise checks.UserInputError(
                f"--predictions-dir {self.folder} is {checks.describe(self.folder)}, not a folder; pass the "
                "--output-dir of cascade_inference.py")
        if not self.folder.is_dir():
            raise FileNotFoundError(f"predictions folder {self.folder} not found; run cascade_inference.py first")
        self._below: dict[str, list[Path]] | None = None

    def _find(self, name: str) -> Path | None:
        path = self.folder / name
        if path.is_file():
            return path
        if self._below is None:  # index the sub-folders once
            self._below = {}
            for root, _, files in os.walk(self.folder):
                for file in files:
                    self._below.setdefault(file, []).append(Path(root) / file)
        found = self._below.get(name, [])
        if len(found) > 1:
            raise ValueError(f"prediction {name} is ambiguous: found {[str(p) for p in found[:3]]}; evaluate each "
                             "sub-folder separately or give the images unique names")
        return found[0] if found else None

    def _file(self, case: Case, suffix: str) -> Path:
        path = self._find(f"{case.stem}{suffix}")
        if path is None:
            raise FileNotFoundError(f"prediction {case.stem}{suffix} not found in {self.folder} "
                                    f"for image {case.image_path}")
        return path

    def tissue(self, case: Case, pixels: np.ndarray) -> np.ndarray:
        """The case's ``<stem>_tissue_seg.png``: ``(H, W)`` uint8 classes 0..3 (``pixels`` is not used).

        Raises:
            FileNotFoundError: no such file; ValueError: ambiguous, or values above 3 (a colour map).
        """
        path = self._file(case, "_tissue_seg.png")
        classes = imaging.read_image(path).pixels
        if classes.max() >= _NUM_TISSUE_CLASSES:
            raise ValueError(f"{path} holds values up to {classes.max()}; expected class indices 0..3 "
                             "(cascade_inference.py's *_tissue_seg.png, not the colour map)")
        return classes.astype(np.uint8)

    def dense_tissue(self, case: Case, pixels: np.ndarray, tissue: np.ndarray) -> np.ndarray | None:
        """The case's ``<stem>_dense_mask.png`` as ``(H, W)`` bool; for outputs written before that file existed, the
        dense pixels of ``tissue``'s FGT region in the image preprocessed with the default configuration
        (``imaging.dense_tissue``), mapped to the input's size."""
        if self._find(f"{case.stem}_dense_mask.png") is not None:
            return imaging.read_image(self._file(case, "_dense_mask.png")).pixels > 0
        pre = imaging.preprocess(pixels, imaging.DEFAULT_PREPROCESS)
        return imaging.dense_tissue(pre.to_input(pre.image, "linear"), tissue)

    def lesion(self, case: Case, pixels: np.ndarray) -> LesionPrediction:
        """The case's ``<stem>_cancer_prob.png`` as float32 probabilities in [0, 1], with the ROI box and source of
        ``<stem>.json`` and the tissue map when those files exist (None otherwise).

        Raises:
            FileNotFoundError: no probability file; ValueError: an ambiguous name or a bad tissue map.
        """
        raw = imaging.read_image(self._file(case, "_cancer_prob.png")).pixels
        prob = raw.astype(np.float32) / float(np.iinfo(raw.dtype).max)  # 8-bit: /255, 16-bit: /65535
        box, source = None, None
        report = self._find(f"{case.stem}.json")
        if report is not None:
            loaded = json.loads(report.read_text(encoding="utf-8"))
            box = _roi_from_report(loaded)
            source = loaded.get("roi", {}).get("source") if isinstance(loaded.get("roi"), dict) else None
        tissue = self.tissue(case, pixels) if self._find(f"{case.stem}_tissue_seg.png") is not None else None
        return LesionPrediction(prob, box, tissue, source)


def _roi_from_report(report: dict) -> roi.RoiBox | None:
    """The ROI box of an inference report: ``roi_box`` as ``{y0, x0, y1, x1}`` or ``[y0, x0, y1, x1]``."""
    for key in ("roi_box", "roi"):
        value = report.get(key)
        if isinstance(value, dict) and {"y0", "x0", "y1", "x1"} <= set(value):
            return roi.RoiBox(*(int(value[k]) for k in ("y0", "x0", "y1", "x1")))
        if isinstance(value, dict) and isinstance(value.get("box"), (dict, list)):
            return _roi_from_report({"roi_box": value["box"]})
        if isinstance(value, (list, tuple)) and len(value) == 4:
            return roi.RoiBox(*(int(v) for v in value))
    return None


class CascadePredictions:
    """Predictions made here by :class:`cascade.Cascade` from the two checkpoints (either backend).

    Raises (on construction): ``checks.UserInputError`` for a file that cannot be a checkpoint (a folder, an
    image, a text file, ...), ValueError / FileNotFoundError from loading, ValueError from ``cascade.Cascade`` for
    checkpoints of the wrong stages (naming both files, with the advice that fits), RuntimeError for a missing GPU.
    """

    def __init__(self, stage1_weights: str, stage2_weights: str | None, backend: str, device: str, tta: bool,
                 adaptive_clahe: str, channels_last: bool, threads: int | None, anatomy: bool = True):
        checks.checkpoint_file(stage1_weights, "--stage1-weights", 1, allow_onnx=True)
        if stage2_weights:
            checks.checkpoint_file(stage2_weights, "--stage2-weights", 2, allow_onnx=True)
        device = str(runners.resolve_device(device))
        runner1, checkpoint1 = runners.load_runner(stage1_weights, backend, device, channels_last=channels_last,
                                                   threads=threads)
        runner2, checkpoint2 = (None, None)
        if stage2_weights:
            runner2, checkpoint2 = runners.load_runner(stage2_weights, backend, device,
                                                       channels_last=channels_last, threads=threads)
        self.cascade = cascade.Cascade(checkpoint1, checkpoint2, stage1_runner=runner1, stage2_runner=runner2,
                                       tta=tta, adaptive_clahe=adaptive_clahe, stage1_name=str(stage1_weights),
                                       stage2_name=str(stage2_weights) if stage2_weights else None,
                                       anatomy=anatomy)
        self.seconds: list[float] = []
        self._last: tuple = (None, None)  # (image path, TissueAndRoi) of the last tissue(): dense_tissue() reuses it
        self.preprocess_config = self.cascade.preprocess_config  # the image the network sees (dense-tissue split)

    def tissue(self, case: Case, pixels: np.ndarray) -> np.ndarray:
        """Stage 1 on ``pixels`` (``(H, W)`` as read): ``(H, W)`` uint8 classes 0..3 in the image's orientation.
        The seconds taken are appended to :attr:`seconds`."""
        start = time.perf_counter()
        found = self.cascade.tissue_and_roi(pixels, name=Path(case.image_path).name)
        self.seconds.append(time.perf_counter() - start)
        self._last = (case.image_path, found)
        return found.tissue_at_input()

    def dense_tissue(self, case: Case, pixels: np.ndarray, tissue: np.ndarray) -> np.ndarray:
        """The cascade's dense-tissue mask of the image :meth:`tissue` ran on last (``(H, W)`` bool, as inference
        writes it); ``tissue`` is not used."""
        path, found = self._last
        if path != case.image_path:
            found = self.cascade.tissue_and_roi(pixels, name=Path(case.image_path).name)
        return found.dense_at_input(tissue)

    def lesion(self, case: Case, pixels: np.ndarray) -> LesionPrediction:
        """The whole cascade on ``pixels``: the lesion probability at the original size, ROI box, tissue map and
        ROI source. The seconds taken are appended to :attr:`seconds`.

        Raises:
            RuntimeError: no stage-2 model was given.
        """
        if self.cascade.stage2 is None:
            raise RuntimeError("lesion evaluation needs --stage2-weights (or --predictions-dir)")
        start = time.perf_counter()
        result = self.cascade(pixels, name=Path(case.image_path).name)
        self.seconds.append(time.perf_counter() - start)
        return LesionPrediction(result.lesion_prob, result.roi_box, result.tissue_classes, result.roi_source)
