"""The cascade itself: stage 1 -> anatomy rules -> FGT region of interest -> stage 2, at the input's resolution.

Used by training (stage-2 crops come from :meth:`Cascade.tissue_and_roi`, the same code inference runs, see
:mod:`mammo.training.roi_crops`), by inference (:mod:`mammo.inference.predict`) and by evaluation
(:mod:`mammo.evaluation.predictors`). Where the rest lives: the checkpoint format in :mod:`mammo.weights.checkpoints`,
checkpoint -> runner for any backend in :mod:`mammo.weights.runners`, the anatomy rules in
:mod:`mammo.cascade.anatomy`, the ROI rule in :mod:`mammo.imaging.roi`, class indices in :mod:`mammo.core.labels`.

Geometry: the networks and the rules work in the preprocessed frame (``imaging.preprocess``: the working scale, at
which the breast is ``working_breast_height_px`` high, and the orientation with the chest wall on the left); every
output is mapped back to the input's own resolution and orientation. Stage 1's probabilities, not its labels, are
resized (a map that follows tissue boundaries at any size); the lesion probability of the ROI crop is resized into
the ROI box scaled to the input.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from mammo import imaging
from mammo.cascade import anatomy as anatomy_rules
from mammo.weights import runners
from mammo.core.labels import BACKGROUND, FGT
from mammo.imaging.roi import RoiBox, RoiRule, fgt_roi_box
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


def tissue_probabilities_batch(logits_fn: LogitsFn, images_u8: list[np.ndarray], size_hw: tuple[int, int],
                               tta: bool = False) -> list[tuple[np.ndarray, float]]:
    """Stage 1 on several preprocessed images in one network call (each letterboxed to ``size_hw``).

    Args:
        logits_fn: the stage-1 runner (``runners.TorchRunner`` or ``runners.OnnxRunner``).
        images_u8: ``(H_i, W_i)`` uint8 preprocessed images (orientation-normalised); sizes may differ.
        size_hw: network input size (multiples of 32).
        tta: average with the horizontally mirrored prediction.

    Returns:
        One ``(probs, confidence)`` per image: ``(4, H_i, W_i)`` float32 softmax probabilities at the image's size
        (computed at network size and resized linearly: the map follows tissue boundaries, not network pixels) and
        the mean max-softmax probability over predicted breast pixels (adipose + FGT + pectoral) at network size.
    """
    nets, geometries = zip(*(imaging.letterbox(image, size_hw, interpolation="linear") for image in images_u8))
    probs = _softmax(_network_logits(logits_fn, [net.astype(np.float32) / 255.0 for net in nets], tta))
    results = []
    for prob, geometry in zip(probs, geometries):
        top = prob.max(axis=0)
        breast = prob.argmax(axis=0) != BACKGROUND
        confidence = float(top[breast].mean()) if breast.any() else float(top.mean())
        full = imaging.unletterbox(prob.astype(np.float32), geometry, interpolation="linear")
        results.append((np.ascontiguousarray(full, dtype=np.float32), confidence))
    return results


def predict_tissue_batch(logits_fn: LogitsFn, images_u8: list[np.ndarray], size_hw: tuple[int, int],
                         tta: bool = False) -> list[tuple[np.ndarray, float]]:
    """Stage 1's own map (no anatomy rules) of several images: ``(H_i, W_i)`` uint8 argmax of
    :func:`tissue_probabilities_batch` and the confidence."""
    return [(probs.argmax(axis=0).astype(np.uint8), confidence)
            for probs, confidence in tissue_probabilities_batch(logits_fn, images_u8, size_hw, tta)]


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
    """Stage 1, the anatomy rules and the ROI on one image, in the preprocessed frame (working scale, orientation
    normalised: what stage 2 and its training crops see); :meth:`tissue_at_input` maps the tissue back.

    Attributes:
        image: ``(h, w)`` uint8, the preprocessed image (``pre.image``).
        flipped: whether preprocessing mirrored the input.
        tissue_classes: ``(h, w)`` uint8, stage 1 reconciled with the anatomy rules.
        confidence: stage 1's mean max-softmax probability over breast pixels (network size).
        roi_box, roi_source: the stage-2 ROI in this frame (``mammo.imaging.roi.fgt_roi_box``).
        probs: ``(4, h, w)`` float32 stage-1 probabilities in this frame.
        anatomy: what the rules did (``mammo.cascade.anatomy.Reconciled``), None when they are off.
        pre: the preprocessing result (maps arrays between this frame and the input).
    """

    image: np.ndarray
    flipped: bool
    tissue_classes: np.ndarray
    confidence: float
    roi_box: RoiBox
    roi_source: str  # "fgt", "breast" or "image"
    adaptive_clahe_used: bool
    timings_s: dict = field(default_factory=dict)  # seconds: preprocess, stage1
    probs: np.ndarray | None = None
    anatomy: anatomy_rules.Reconciled | None = None
    pre: imaging.Preprocessed | None = None

    def tissue_at_input(self) -> np.ndarray:
        """``(H, W)`` uint8 classes at the input's size and orientation: the argmax of the probabilities resized
        linearly (boundaries follow the tissue), and where the anatomy rules changed a pixel the rule's class."""
        if self.pre is None or self.probs is None:
            return imaging.unflip(self.tissue_classes, self.flipped)
        classes = self.pre.to_input(self.probs, "linear").argmax(axis=0).astype(np.uint8)
        changed = self.tissue_classes != self.probs.argmax(axis=0)
        if changed.any():
            ruled = self.pre.to_input(changed, "nearest")
            classes[ruled] = self.pre.to_input(self.tissue_classes, "nearest")[ruled]
        return classes

    def dense_at_input(self, tissue_at_input: np.ndarray | None = None) -> np.ndarray:
        """``(H, W)`` bool dense pixels at the input's size and orientation: the FGT region's pixels above its Otsu
        level (``imaging.dense_tissue``) in this frame, resized linearly (boundaries follow the tissue), and kept
        inside the FGT class of ``tissue_at_input`` (:meth:`tissue_at_input`'s map; computed when not given)."""
        dense = imaging.dense_tissue(self.image, self.tissue_classes)
        if self.pre is None:
            return imaging.unflip(dense, self.flipped)
        tissue = self.tissue_at_input() if tissue_at_input is None else tissue_at_input
        return (self.pre.to_input(dense.astype(np.float32), "linear") >= 0.5) & (tissue == FGT)


@dataclass
class CascadeResult:
    """Outputs of the cascade on one image, at the input's original resolution and orientation.

    Attributes:
        tissue_classes: ``(H, W)`` uint8, 0 background, 1 adipose, 2 FGT, 3 pectoral (after the anatomy rules).
        lesion_prob: ``(H, W)`` float32 in [0, 1]; exactly 0 outside ``roi_box``.
        roi_box: the FGT ROI in original pixel coordinates.
        roi_source: "fgt", "breast" (no FGT found: box around the breast) or "image".
        tissue_confidence: mean max-softmax probability of stage 1 over breast pixels.
        flipped: whether preprocessing mirrored the image (undone on every output here).
        adaptive_clahe_used: whether the stronger CLAHE result was kept.
        timings_s: seconds per step (``preprocess``, ``stage1``, ``stage2``).
        dense_tissue: ``(H, W)`` bool, the dense pixels of the FGT region (``imaging.dense_tissue`` at the working
            scale, resized); None when not computed.
        anatomy: ``{"view", "view_source", "notes", "changed_fraction"}`` of the anatomy rules, or None (rules off).
        working_scale: the preprocessed image's size / the input's (rows).
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
    anatomy: dict | None = None
    working_scale: float = 1.0

    @property
    def fgt_mask(self) -> np.ndarray:
        """``(H, W)`` bool mask of fibroglandular tissue."""
        return self.tissue_classes == FGT


def _anatomy_dict(reconciled: anatomy_rules.Reconciled | None) -> dict | None:
    if reconciled is None:
        return None
    return {"view": reconciled.view.name, "view_source": reconciled.view.source, "notes": list(reconciled.notes),
            "changed_fraction": round(float(reconciled.changed_fraction), 4)}


def _to_input(found: TissueAndRoi, lesion: np.ndarray | None, stage2_s: float) -> CascadeResult:
    """One image's result in the input's frame: the tissue map (:meth:`TissueAndRoi.tissue_at_input`), the lesion
    probability of the ROI crop resized into the ROI box scaled to the input, the dense mask, the box."""
    pre = found.pre
    input_hw = tuple(pre.input_hw)
    box = found.roi_box.scaled(found.image.shape[:2], input_hw)
    lesion_full = np.zeros(input_hw, np.float32)
    if lesion is not None:
        lesion_full[box.slices()] = np.clip(imaging.resize(lesion, (box.height, box.width), "linear"), 0.0, 1.0)
    tissue = found.tissue_at_input()
    return CascadeResult(
        tissue_classes=tissue,
        lesion_prob=imaging.unflip(lesion_full, found.flipped),
        roi_box=box.mirrored(input_hw[1]) if found.flipped else box,
        roi_source=found.roi_source,
        tissue_confidence=found.confidence,
        flipped=found.flipped,
        adaptive_clahe_used=found.adaptive_clahe_used,
        timings_s={**found.timings_s, "stage2": stage2_s},
        dense_tissue=found.dense_at_input(tissue),
        anatomy=_anatomy_dict(found.anatomy),
        working_scale=float(pre.scale),
    )


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
        anatomy: reconcile stage 1 with the anatomy rules (``mammo.cascade.anatomy``); False shows the network's
            own map (for measuring what the rules add).

    Raises:
        ValueError: checkpoints of the wrong stages, with the advice that fits (:func:`stage_mismatch`: swapped, two
            of one stage, one of the other stage), or a bad ``adaptive_clahe``.
    """

    def __init__(self, stage1_checkpoint: dict, stage2_checkpoint: dict | None = None, *,
                 stage1_runner: LogitsFn | None = None,
                 stage2_runner: LogitsFn | None = None, device: torch.device | str = "cpu", tta: bool = False,
                 adaptive_clahe: str = "off", amp: bool = False, channels_last: bool = False,
                 roi_margin: float | None = None, roi_rule: RoiRule | None = None, stage1_name: str | None = None,
                 stage2_name: str | None = None, anatomy: bool = True):
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
        self.anatomy = bool(anatomy)

    def _stage1(self, pixels_list: list[np.ndarray]) -> tuple[list, list, list, float, float]:
        """Preprocess and run stage 1 on every image (and, with adaptive CLAHE "auto", again on the unsure ones with
        the stronger CLAHE, keeping the more confident result). Returns ``(preprocessed, (probs, confidence) per
        image, strong CLAHE used per image, preprocess seconds, stage-1 seconds)``."""
        start = time.perf_counter()
        strong = self.adaptive_clahe == "on"
        pres = [imaging.preprocess(pixels, self.preprocess_config, adaptive_clahe=strong) for pixels in pixels_list]
        preprocess_s = time.perf_counter() - start
        start = time.perf_counter()
        tissues = tissue_probabilities_batch(self.stage1, [pre.image for pre in pres], self.stage1_size, self.tta)
        used = [strong] * len(pres)
        unsure = [i for i, (_, confidence) in enumerate(tissues) if confidence < ADAPTIVE_CLAHE_CONFIDENCE]
        if self.adaptive_clahe == "auto" and unsure:
            alts = [imaging.preprocess(pixels_list[i], self.preprocess_config, adaptive_clahe=True) for i in unsure]
            alt_tissues = tissue_probabilities_batch(self.stage1, [a.image for a in alts], self.stage1_size, self.tta)
            for i, alt, alt_tissue in zip(unsure, alts, alt_tissues):
                if alt_tissue[1] > tissues[i][1]:
                    pres[i], tissues[i], used[i] = alt, alt_tissue, True
        return pres, tissues, used, preprocess_s, time.perf_counter() - start

    def tissue_and_roi_batch(self, pixels_list: list[np.ndarray], names: list[str | None] | None = None,
                             view_positions: list[str | None] | None = None) -> list[TissueAndRoi]:
        """Preprocess each image ((H, W) uint8/uint16 as read), run stage 1 on all in one call, reconcile each map
        with the anatomy rules, find each ROI.

        Everything is in the preprocessed frame (working scale, orientation normalised). ``names`` (file names) and
        ``view_positions`` (DICOM ViewPosition) tell the anatomy rules the view (``mammo.cascade.anatomy.view_of``).
        Each result's ``timings_s`` holds the batch's preprocessing and stage-1 seconds divided by the number of
        images.
        """
        if not pixels_list:
            return []
        names = names or [None] * len(pixels_list)
        view_positions = view_positions or [None] * len(pixels_list)
        pres, tissues, used, preprocess_s, stage1_s = self._stage1(pixels_list)
        found = []
        for pre, (probs, confidence), strong_used, name, view in zip(pres, tissues, used, names, view_positions):
            reconciled = (anatomy_rules.reconcile(probs, view_position=view, file_name=name) if self.anatomy
                          else None)
            classes = reconciled.classes if reconciled else probs.argmax(axis=0).astype(np.uint8)
            box, source = fgt_roi_box(classes, rule=self.roi_rule)
            timings = {"preprocess": preprocess_s / len(pres), "stage1": stage1_s / len(pres)}
            found.append(TissueAndRoi(pre.image, pre.flipped, classes, confidence, box, source, strong_used, timings,
                                      probs=probs, anatomy=reconciled, pre=pre))
        return found

    def tissue_and_roi(self, pixels: np.ndarray, name: str | None = None,
                       view_position: str | None = None) -> TissueAndRoi:
        """:meth:`tissue_and_roi_batch` on one image."""
        return self.tissue_and_roi_batch([pixels], [name], [view_position])[0]

    def run_batch(self, pixels_list: list[np.ndarray], names: list[str | None] | None = None,
                  view_positions: list[str | None] | None = None) -> list[CascadeResult]:
        """The whole cascade on several images as read (``(H_i, W_i)`` uint8 or uint16; sizes may differ).

        Stage 1 runs once over all images and stage 2 once over all ROI crops (each letterboxed to its network
        size); the results equal those of one image at a time up to floating-point summation order. ``timings_s``
        of each result holds the batch's seconds per step divided by the number of images. ``names`` /
        ``view_positions``: see :meth:`tissue_and_roi_batch`.
        """
        if self.stage2 is None:
            raise RuntimeError("this Cascade was built without a stage-2 checkpoint; pass one to run stage 2")
        found = self.tissue_and_roi_batch(pixels_list, names, view_positions)
        if not found:
            return []
        start = time.perf_counter()
        lesions = predict_lesion_batch(self.stage2, [f.image[f.roi_box.slices()] for f in found], self.stage2_size,
                                       self.tta)
        stage2_s = (time.perf_counter() - start) / len(found)
        return [_to_input(f, lesion, stage2_s) for f, lesion in zip(found, lesions)]

    def __call__(self, pixels: np.ndarray, name: str | None = None, view_position: str | None = None) -> CascadeResult:
        """Run the whole cascade on one image as read (``(H, W)`` uint8 or uint16): :meth:`run_batch` of one."""
        return self.run_batch([pixels], [name], [view_position])[0]
