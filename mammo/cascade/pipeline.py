"""The cascade itself: stage 1 -> FGT region of interest -> stage 2, at the input's original resolution.

Used by training (stage-2 crops come from :meth:`Cascade.tissue_and_roi`, the same code inference runs, see
``roi_crops.py``), by inference (``inference.py``) and by evaluation (``scoring.py``). Where the rest lives: the
checkpoint format in ``checkpoints.py``, checkpoint -> runner for any backend in ``runners.py``, the ROI rule in
``roi.py``, class indices in ``labels.py``.

Geometry: the whole pipeline runs on the orientation-normalised image (``imaging.preprocess`` may mirror it) and
every output is mirrored back, so outputs are at the input's own resolution and orientation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from mammo import imaging
from mammo.weights import runners
from mammo.core.labels import BACKGROUND, FGT
from mammo.imaging.roi import RoiBox, RoiRule, fgt_roi_box, paste_into_box
from mammo.weights.runners import LogitsFn

if TYPE_CHECKING:  # annotations only: a cascade over ONNX Runtime runners never loads PyTorch (see runners.py)
    import torch

#: Mean stage-1 confidence (max softmax probability over breast pixels) below which ``adaptive_clahe="auto"`` re-runs
#: stage 1 on the stronger-CLAHE image. A heuristic of this suite, not from a paper.
ADAPTIVE_CLAHE_CONFIDENCE = 0.90

# ------------------------------------------------------------------------------------------------ stage runners
def _network_logits(logits_fn: LogitsFn, images: list[np.ndarray], tta: bool) -> np.ndarray:
    """Stack ``(H, W)`` float32 images to ``(N, 1, H, W)``, run, and average with the mirrored run when ``tta``."""
    batch = np.stack(images)[:, None]
    logits = logits_fn(batch)
    if tta:
        logits = 0.5 * (logits + logits_fn(np.ascontiguousarray(batch[..., ::-1]))[..., ::-1])
    return logits


def _softmax(logits: np.ndarray, axis: int = 1) -> np.ndarray:
    shifted = logits - logits.max(axis=axis, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=axis, keepdims=True)


def predict_tissue_batch(logits_fn: LogitsFn, images_u8: list[np.ndarray], size_hw: tuple[int, int],
                         tta: bool = False) -> list[tuple[np.ndarray, float]]:
    """Stage 1 on several preprocessed images in one network call (each letterboxed to ``size_hw``).

    Args:
        logits_fn: the stage-1 runner (``runners.TorchRunner`` or ``runners.OnnxRunner``).
        images_u8: ``(H_i, W_i)`` uint8 preprocessed images (orientation-normalised); sizes may differ.
        size_hw: network input size (multiples of 32).
        tta: average with the horizontally mirrored prediction.

    Returns:
        One ``(classes, confidence)`` per image: ``(H_i, W_i)`` uint8 class map at the image's size (argmax at network
        size, mapped back with nearest interpolation) and the mean max-softmax probability over predicted breast
        pixels (adipose + FGT + pectoral) at network size, in [0, 1].
    """
    nets, geometries = zip(*(imaging.letterbox(image, size_hw, interpolation="linear") for image in images_u8))
    probs = _softmax(_network_logits(logits_fn, [net.astype(np.float32) / 255.0 for net in nets], tta))
    results = []
    for prob, geometry in zip(probs, geometries):
        classes_net = prob.argmax(axis=0).astype(np.uint8)
        top = prob.max(axis=0)
        breast = classes_net != BACKGROUND
        confidence = float(top[breast].mean()) if breast.any() else float(top.mean())
        classes = imaging.unletterbox(classes_net, geometry, interpolation="nearest")
        results.append((classes.astype(np.uint8), confidence))
    return results


def predict_tissue(logits_fn: LogitsFn, image_u8: np.ndarray, size_hw: tuple[int, int],
                   tta: bool = False) -> tuple[np.ndarray, float]:
    """Stage 1 on one preprocessed ``(H, W)`` uint8 image: see :func:`predict_tissue_batch`."""
    return predict_tissue_batch(logits_fn, [image_u8], size_hw, tta)[0]


def predict_lesion_batch(logits_fn: LogitsFn, crops_u8: list[np.ndarray], size_hw: tuple[int, int],
                         tta: bool = False) -> list[np.ndarray]:
    """Stage 2 on several ROI crops in one network call.

    Args:
        crops_u8: ``(h_i, w_i)`` uint8 crops of preprocessed images; sizes may differ (each is letterboxed).

    Returns:
        One lesion probability map ``(h_i, w_i)`` float32 in [0, 1] per crop, computed at network size and mapped
        back to the crop with linear interpolation.
    """
    nets, geometries = zip(*(imaging.letterbox(crop, size_hw, interpolation="linear") for crop in crops_u8))
    logits = _network_logits(logits_fn, [net.astype(np.float32) / 255.0 for net in nets], tta)[:, 0]
    probs = 1.0 / (1.0 + np.exp(-logits))
    return [np.clip(imaging.unletterbox(prob.astype(np.float32), geometry, interpolation="linear"),
                    0.0, 1.0).astype(np.float32)
            for prob, geometry in zip(probs, geometries)]


def predict_lesion(logits_fn: LogitsFn, crop_u8: np.ndarray, size_hw: tuple[int, int], tta: bool = False) -> np.ndarray:
    """Stage 2 on one ROI crop ``(h, w)`` uint8 -> probability ``(h, w)`` float32: see :func:`predict_lesion_batch`."""
    return predict_lesion_batch(logits_fn, [crop_u8], size_hw, tta)[0]


# ------------------------------------------------------------------------------------------------ the cascade
def checkpoint_stage(checkpoint: dict) -> int:
    """The stage a checkpoint dict (or the settings of an exported ``.onnx`` file) says it holds; 0 when it says
    nothing usable."""
    try:
        return int(checkpoint.get("stage", 0))
    except (TypeError, ValueError):
        return 0


def stage_mismatch(found1: int | None, found2: int | None, name1: str | None = None, name2: str | None = None,
                   flags: tuple[str, str] = ("--stage1-weights", "--stage2-weights")) -> str | None:
    """Why the checkpoints given for stage 1 and stage 2 do not fit, with the advice that fits the case; None if
    they do.

    Args:
        found1, found2: the stage each checkpoint holds (:func:`checkpoint_stage`); ``found2`` None = no stage 2 given.
        name1, name2: what to call the files in the message (their paths), or None.
        flags: the command-line flags of the two checkpoints.

    Returns:
        One line: stage 1 got a stage-2 checkpoint and stage 2 a stage-1 one: swap the flags; both hold one stage:
        pass a checkpoint of the other stage to that stage's flag; one holds the other stage (or no stage): pass the
        right one there. None when stage 1 holds stage 1 and stage 2 holds stage 2 (or is absent).
    """
    def named(name):
        return f" ({name})" if name else ""

    if found1 == 1 and found2 in (None, 2):
        return None
    if found1 == 2 and found2 == 1:
        return (f"the stage-1 checkpoint given{named(name1)} holds stage 2 and the stage-2 checkpoint given"
                f"{named(name2)} holds stage 1; swap {flags[0]} and {flags[1]}")
    if found1 == found2 and found1 in (1, 2):
        names = f" ({name1} and {name2})" if name1 and name2 else ""
        other = 3 - found1
        return (f"both checkpoints given are stage-{found1} checkpoints{names}; pass a stage-{other} checkpoint as "
                f"{flags[other - 1]}")
    for wanted, found, name in ((1, found1, name1), (2, found2, name2)):
        if found in (None, wanted):
            continue
        flag = flags[wanted - 1]
        if found in (1, 2):
            return (f"the stage-{wanted} checkpoint given{named(name)} holds stage {found}; pass a stage-{wanted} "
                    f"checkpoint (best_stage{wanted}.pth) as {flag}")
        return (f"the stage-{wanted} checkpoint given{named(name)} holds stage {found}, which is neither 1 nor 2: it "
                f"is not a stage checkpoint of this suite; pass best_stage{wanted}.pth as {flag}")
    return None


@dataclass
class TissueAndRoi:
    """Stage 1 and the ROI on one image, all in the orientation-normalised frame (what stage 2 training needs)."""

    image: np.ndarray  # (H, W) uint8 preprocessed, orientation-normalised
    flipped: bool  # True when ``image`` is the input mirrored left-right
    tissue_classes: np.ndarray  # (H, W) uint8
    confidence: float
    roi_box: RoiBox
    roi_source: str  # "fgt", "breast" or "image"
    adaptive_clahe_used: bool
    timings_s: dict = field(default_factory=dict)  # seconds: preprocess, stage1


@dataclass
class CascadeResult:
    """Outputs of the cascade on one image, at the input's original resolution and orientation.

    Attributes:
        tissue_classes: ``(H, W)`` uint8, 0 background, 1 adipose, 2 FGT, 3 pectoral.
        lesion_prob: ``(H, W)`` float32 in [0, 1]; exactly 0 outside ``roi_box``.
        roi_box: the FGT ROI in original pixel coordinates.
        roi_source: "fgt", "breast" (no FGT found: box around the breast) or "image".
        tissue_confidence: mean max-softmax probability of stage 1 over breast pixels.
        flipped: whether preprocessing mirrored the image (undone on every output here).
        adaptive_clahe_used: whether the stronger CLAHE result was kept.
        timings_s: seconds per step (``preprocess``, ``stage1``, ``stage2``).
        dense_tissue: ``(H, W)`` bool, the dense pixels of the FGT region (``imaging.dense_tissue``); None when not
            computed.
    """

    tissue_classes: np.ndarray
    lesion_prob: np.ndarray
    roi_box: RoiBox
    roi_source: str
    tissue_confidence: float
    flipped: bool
    adaptive_clahe_used: bool
    timings_s: dict = field(default_factory=dict)
    dense_tissue: np.ndarray | None = None

    @property
    def fgt_mask(self) -> np.ndarray:
        """``(H, W)`` bool mask of fibroglandular tissue."""
        return self.tissue_classes == FGT


class Cascade:
    """Stage 1 -> FGT ROI -> stage 2, rebuilt from the two checkpoints alone.

    Args:
        stage1_checkpoint, stage2_checkpoint: checkpoint dicts (see ``checkpoints.load_checkpoint``); stage 2 may be
            None to run stage 1 and the ROI only (as stage-2 training does).
        stage1_runner, stage2_runner: logits functions; default ``runners.TorchRunner`` over the checkpoint's model on
            ``device``. Pass ONNX Runtime runners to use that backend.
        device: torch device for the default runners.
        tta: horizontal-flip test-time augmentation in both stages.
        adaptive_clahe: ``"off"``, ``"on"`` (always use the stronger CLAHE) or ``"auto"`` (re-run stage 1 with it
            when the confidence is below :data:`ADAPTIVE_CLAHE_CONFIDENCE`, keep the more confident result).
        roi_rule: how the ROI box is grown (``roi.RoiRule``); default: the stage-2 checkpoint's ``roi`` settings
            (``RoiRule.from_dict``), else the first rule (10 % of the FGT box).
        roi_margin: overrides the rule's ``margin_fraction`` when given.
        stage1_name, stage2_name: what error messages call the two checkpoints (their paths); None: unnamed.

    Raises:
        ValueError: checkpoints of the wrong stages, with the advice that fits (:func:`stage_mismatch`: swapped, two
            of one stage, one of the other stage), or a bad ``adaptive_clahe``.
    """

    def __init__(self, stage1_checkpoint: dict, stage2_checkpoint: dict | None = None, *,
                 stage1_runner: LogitsFn | None = None,
                 stage2_runner: LogitsFn | None = None, device: torch.device | str = "cpu", tta: bool = False,
                 adaptive_clahe: str = "off", amp: bool = False, channels_last: bool = False,
                 roi_margin: float | None = None, roi_rule: RoiRule | None = None, stage1_name: str | None = None,
                 stage2_name: str | None = None):
        if adaptive_clahe not in ("off", "on", "auto"):
            raise ValueError(f"adaptive_clahe must be 'off', 'on' or 'auto', not {adaptive_clahe!r}")
        mismatch = stage_mismatch(checkpoint_stage(stage1_checkpoint),
                                  None if stage2_checkpoint is None else checkpoint_stage(stage2_checkpoint),
                                  stage1_name, stage2_name)
        if mismatch:
            raise ValueError(mismatch)
        self.stage1_checkpoint, self.stage2_checkpoint = stage1_checkpoint, stage2_checkpoint
        self.preprocess_config = dict(stage1_checkpoint["preprocess_config"])
        self.stage1_size = tuple(int(v) for v in stage1_checkpoint["input_size"])
        self.stage1 = stage1_runner or runners.make_runner(stage1_checkpoint, "torch", device, amp=amp,
                                                           channels_last=channels_last)
        self.stage2 = None
        if stage2_checkpoint is not None:
            self.stage2_size = tuple(int(v) for v in stage2_checkpoint["input_size"])
            self.stage2 = stage2_runner or runners.make_runner(stage2_checkpoint, "torch", device, amp=amp,
                                                               channels_last=channels_last)
        if roi_rule is None:
            roi_rule = RoiRule.from_dict((stage2_checkpoint or {}).get("roi"))
        if roi_margin is not None:
            roi_rule = replace(roi_rule, margin_fraction=float(roi_margin))
        self.roi_rule = roi_rule
        self.roi_margin = roi_rule.margin_fraction
        self.tta = tta
        self.adaptive_clahe = adaptive_clahe

    def tissue_and_roi_batch(self, pixels_list: list[np.ndarray]) -> list[TissueAndRoi]:
        """Preprocess each image ((H, W) uint8/uint16 as read), run stage 1 on all in one call, find each ROI.

        Everything is in the orientation-normalised frame. Each result's ``timings_s`` holds the batch's preprocessing
        and stage-1 seconds divided by the number of images.
        """
        if not pixels_list:
            return []
        start = time.perf_counter()
        strong = self.adaptive_clahe == "on"
        pres = [imaging.preprocess(pixels, self.preprocess_config, adaptive_clahe=strong) for pixels in pixels_list]
        preprocess_s = time.perf_counter() - start
        start = time.perf_counter()
        tissues = predict_tissue_batch(self.stage1, [pre.image for pre in pres], self.stage1_size, self.tta)
        used = [strong] * len(pres)
        unsure = [i for i, (_, confidence) in enumerate(tissues) if confidence < ADAPTIVE_CLAHE_CONFIDENCE]
        if self.adaptive_clahe == "auto" and unsure:
            alts = [imaging.preprocess(pixels_list[i], self.preprocess_config, adaptive_clahe=True) for i in unsure]
            for i, alt, alt_tissue in zip(unsure, alts, predict_tissue_batch(self.stage1, [a.image for a in alts],
                                                                             self.stage1_size, self.tta)):
                if alt_tissue[1] > tissues[i][1]:
                    pres[i], tissues[i], used[i] = alt, alt_tissue, True
        stage1_s = time.perf_counter() - start
        found = []
        for pre, (classes, confidence), strong_used in zip(pres, tissues, used):
            box, source = fgt_roi_box(classes, rule=self.roi_rule)
            timings = {"preprocess": preprocess_s / len(pres), "stage1": stage1_s / len(pres)}
            found.append(TissueAndRoi(pre.image, pre.flipped, classes, confidence, box, source, strong_used, timings))
        return found

    def tissue_and_roi(self, pixels: np.ndarray) -> TissueAndRoi:
        """:meth:`tissue_and_roi_batch` on one image."""
        return self.tissue_and_roi_batch([pixels])[0]

    def run_batch(self, pixels_list: list[np.ndarray]) -> list[CascadeResult]:
        """The whole cascade on several images as read (``(H_i, W_i)`` uint8 or uint16; sizes may differ).

        Stage 1 runs once over all images and stage 2 once over all ROI crops (each letterboxed to its network
        size); the results equal those of one image at a time up to floating-point summation order. ``timings_s``
        of each result holds the batch's seconds per step divided by the number of images.
        """
        if self.stage2 is None:
            raise RuntimeError("this Cascade was built without a stage-2 checkpoint; pass one to run stage 2")
        found = self.tissue_and_roi_batch(pixels_list)
        if not found:
            return []
        start = time.perf_counter()
        lesions = predict_lesion_batch(self.stage2, [f.image[f.roi_box.slices()] for f in found], self.stage2_size,
                                       self.tta)
        stage2_s = (time.perf_counter() - start) / len(found)
        results = []
        for f, lesion in zip(found, lesions):
            full = paste_into_box(lesion, f.roi_box, f.image.shape[:2])
            results.append(CascadeResult(
                tissue_classes=imaging.unflip(f.tissue_classes, f.flipped),
                lesion_prob=imaging.unflip(full, f.flipped),
                roi_box=f.roi_box.mirrored(f.image.shape[1]) if f.flipped else f.roi_box,
                roi_source=f.roi_source,
                tissue_confidence=f.confidence,
                flipped=f.flipped,
                adaptive_clahe_used=f.adaptive_clahe_used,
                timings_s={**f.timings_s, "stage2": stage2_s},
                dense_tissue=imaging.unflip(imaging.dense_tissue(f.image, f.tissue_classes), f.flipped),
            ))
        return results

    def __call__(self, pixels: np.ndarray) -> CascadeResult:
        """Run the whole cascade on one image as read (``(H, W)`` uint8 or uint16): :meth:`run_batch` of one."""
        return self.run_batch([pixels])[0]
