"""The cascade itself: checkpoints, the FGT region of interest, and stage 1 -> ROI -> stage 2 at original resolution.

Used by training (stage-2 crops come from :meth:`Cascade.tissue_and_roi`, the same code inference runs), by
``cascade_inference.py`` and by ``evaluate.py``.

Checkpoint format (one dict, plain Python types and tensors only, so ``torch.load(weights_only=True)`` reads it;
written atomically by :func:`save_checkpoint`):

====================  ==========================================================================================
key                   value
====================  ==========================================================================================
``format_version``    int, :data:`CHECKPOINT_FORMAT_VERSION`
``stage``             1 (tissue) or 2 (lesion)
``model``             ``state_dict`` (no ``module.`` prefix)
``model_config``      dict for ``models.build_model``
``preprocess_config`` dict for ``imaging.preprocess``
``class_names``       list of str (stage 1: background, adipose, fgt, pectoral; stage 2: lesion)
``input_size``        [height, width] of the network input, pixels
``epoch``             int, last finished epoch (1-based)
``best_metric``       float, best validation metric so far; ``metric_name`` names it (``val/dice_fgt``)
``optimizer`` ...     ``optimizer``, ``lr_scheduler``, ``scaler`` state dicts (or None), ``rng_state`` (dict)
``args``              the training arguments as a dict of plain types
``versions``          library versions (python, torch, smp, numpy, opencv)
``roi``               stage 2 only: the ROI settings it was trained with (``margin_fraction``)
====================  ==========================================================================================

Geometry: the whole pipeline runs on the orientation-normalised image (``imaging.preprocess`` may mirror it) and
every output is mirrored back, so outputs are at the input's own resolution and orientation.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import imaging
from fileio import atomic_writer
from models import build_model

CHECKPOINT_FORMAT_VERSION = 1

#: Stage-1 class indices (labels 64/128/192/255 of the DDSM tissue set map to 0..3, see datasets.py).
BACKGROUND, ADIPOSE, FGT, PECTORAL = 0, 1, 2, 3
TISSUE_CLASS_NAMES = ("background", "adipose", "fgt", "pectoral")
LESION_CLASS_NAMES = ("lesion",)

#: Margin added on each side of the FGT bounding box, as a fraction of the box's height / width. Our choice: lesions
#: at the FGT border (often in the subcutaneous fat just outside it) stay inside the crop; 10 % keeps the crop small.
ROI_MARGIN_FRACTION = 0.10

#: Smallest ROI side in original pixels; a tiny FGT island is grown to this so stage 2 sees some context.
ROI_MIN_SIDE = 64

#: Mean stage-1 confidence (max softmax probability over breast pixels) below which ``adaptive_clahe="auto"`` re-runs
#: stage 1 on the stronger-CLAHE image. A heuristic of this suite, not from a paper.
ADAPTIVE_CLAHE_CONFIDENCE = 0.90

LogitsFn = Callable[[np.ndarray], np.ndarray]


# --------------------------------------------------------------------------------------------------- checkpoints
def library_versions() -> dict:
    """Versions of the libraries a checkpoint depends on (plain strings)."""
    import cv2
    import segmentation_models_pytorch as smp

    return {
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "segmentation_models_pytorch": str(smp.__version__),
        "numpy": str(np.__version__),
        "opencv": str(cv2.__version__),
    }


def make_checkpoint(*, stage: int, model: torch.nn.Module, model_config: dict, preprocess_config: dict,
                    input_size: tuple[int, int], epoch: int = 0, best_metric: float = float("nan"),
                    metric_name: str = "", optimizer=None, lr_scheduler=None, scaler=None, rng_state: dict | None = None,
                    args: dict | None = None, roi: dict | None = None) -> dict:
    """Assemble the one checkpoint dict of the suite (see the module docstring for the keys).

    ``model`` may be wrapped in ``DistributedDataParallel``; its unwrapped ``state_dict`` is stored. Optimizer,
    scheduler and scaler are stored through their ``state_dict()`` when given. ``args`` must hold plain types.
    """
    model = getattr(model, "module", model)
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, not {stage!r}")
    checkpoint = {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "stage": stage,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model_config": dict(model_config),
        "preprocess_config": dict(preprocess_config),
        "class_names": list(TISSUE_CLASS_NAMES if stage == 1 else LESION_CLASS_NAMES),
        "input_size": [int(input_size[0]), int(input_size[1])],
        "epoch": int(epoch),
        "best_metric": float(best_metric),
        "metric_name": metric_name or ("val/dice_fgt" if stage == 1 else "val/dice_lesion"),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "lr_scheduler": lr_scheduler.state_dict() if lr_scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng_state": rng_state or {},
        "args": dict(args or {}),
        "versions": library_versions(),
    }
    if stage == 2:
        checkpoint["roi"] = dict(roi or {"margin_fraction": ROI_MARGIN_FRACTION})
    return checkpoint


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically (``fileio.atomic_writer``): a crash mid-write leaves the previous file
    intact, never a truncated one. Parent folders are created."""
    with atomic_writer(path) as stream:
        torch.save(state, stream)
    return Path(path)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``.

    Raises:
        FileNotFoundError: no file at ``path`` (the message says how to make one).
        ValueError: the file is not a checkpoint of this suite (corrupt, truncated, or another format).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} not found; train one with cascade_segmentation_model.py or pass the right path"
        )
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types; its advice to unpickle with weights_only=False is unsafe
        raise ValueError(
            f"checkpoint {path} cannot be read: it is corrupt, truncated, or not a PyTorch checkpoint of this suite "
            f"({type(error).__name__}). This suite writes only plain types and tensors, so a file that needs full "
            "unpickling did not come from it; re-download or re-train it") from None
    missing = {"model", "model_config", "preprocess_config", "stage", "input_size"} - set(checkpoint if isinstance(checkpoint, dict) else ())
    if missing:
        raise ValueError(f"{path} is not a checkpoint of this suite: missing keys {sorted(missing)}")
    return checkpoint


def model_from_checkpoint(checkpoint: dict, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild the model stored in ``checkpoint`` (in eval mode, on ``device``). No training flag is needed."""
    config = dict(checkpoint["model_config"])
    if "encoder_weights" in config:
        config["encoder_weights"] = None  # the trained weights come from the state dict, not from ImageNet
    model = build_model(config)
    state = {k.removeprefix("module."): v for k, v in checkpoint["model"].items()}
    model.load_state_dict(state)
    return model.to(device).eval()


def load_stage(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Load a checkpoint and rebuild its model: returns ``(model in eval mode, checkpoint dict)``."""
    checkpoint = load_checkpoint(path)
    return model_from_checkpoint(checkpoint, device), checkpoint


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` -> CUDA if available else CPU; ``"cuda"`` without a GPU raises ``RuntimeError`` saying so."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    return torch.device(name)


# --------------------------------------------------------------------------------------------------------- ROI
@dataclass(frozen=True)
class RoiBox:
    """A half-open pixel box ``[y0, y1) x [x0, x1)`` in an image's pixel coordinates."""

    y0: int
    x0: int
    y1: int
    x1: int

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    def slices(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y1), slice(self.x0, self.x1)

    def mirrored(self, image_width: int) -> "RoiBox":
        """The same box after mirroring an image of ``image_width`` pixels left-right."""
        return RoiBox(self.y0, image_width - self.x1, self.y1, image_width - self.x0)

    def to_dict(self) -> dict:
        return asdict(self)


def _bounding_box(mask: np.ndarray) -> RoiBox | None:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return RoiBox(int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1)


def fgt_roi_box(tissue_classes: np.ndarray, margin_fraction: float = ROI_MARGIN_FRACTION,
                min_side: int = ROI_MIN_SIDE) -> tuple[RoiBox, str]:
    """The stage-2 region of interest: the bounding box of the FGT, grown by a margin, clipped to the image.

    Args:
        tissue_classes: ``(H, W)`` integer class map (0 background, 1 adipose, 2 FGT, 3 pectoral).
        margin_fraction: margin on each side as a fraction of the box's own height / width (default 0.10).
        min_side: each side is grown (about the centre) to at least this many pixels, image size permitting.

    Returns:
        ``(box, source)``: ``source`` is ``"fgt"`` normally, ``"breast"`` when no FGT pixel exists (box around
        adipose + FGT + pectoral) and ``"image"`` when the map has no tissue at all (the whole image).
    """
    height, width = tissue_classes.shape[:2]
    box, source = _bounding_box(tissue_classes == FGT), "fgt"
    if box is None:
        box, source = _bounding_box(tissue_classes != BACKGROUND), "breast"
    if box is None:
        return RoiBox(0, 0, height, width), "image"
    dy, dx = int(round(box.height * margin_fraction)), int(round(box.width * margin_fraction))
    y0, y1 = _grow(box.y0 - dy, box.y1 + dy, min_side, height)
    x0, x1 = _grow(box.x0 - dx, box.x1 + dx, min_side, width)
    return RoiBox(y0, x0, y1, x1), source


def _grow(start: int, stop: int, min_side: int, limit: int) -> tuple[int, int]:
    start, stop = max(start, 0), min(stop, limit)
    missing = min(min_side, limit) - (stop - start)
    if missing > 0:
        start = max(0, start - missing // 2)
        stop = min(limit, start + min(min_side, limit))
        start = max(0, stop - min(min_side, limit))
    return start, stop


def paste_into_box(values: np.ndarray, box: RoiBox, shape_hw: tuple[int, int]) -> np.ndarray:
    """A float32 ``(H, W)`` array of zeros with ``values`` ``(box.height, box.width)`` placed at ``box``."""
    if values.shape[:2] != (box.height, box.width):
        raise ValueError(f"values of shape {values.shape} do not fit the ROI box {box.height}x{box.width}")
    full = np.zeros(shape_hw, dtype=np.float32)
    full[box.slices()] = values
    return full


# ------------------------------------------------------------------------------------------------ stage runners
class TorchRunner:
    """Runs a PyTorch model on a NumPy batch: ``(N, 1, H, W)`` float32 in [0, 1] -> logits ``(N, C, H, W)`` float32.

    Args:
        model: a model in eval mode.
        device: where it runs.
        amp: autocast (float16 on CUDA, bfloat16 on the CPU); outputs are float32 either way.
        channels_last: use the channels-last memory format (often faster for convolutions on CPU and GPU).
    """

    def __init__(self, model: torch.nn.Module, device: torch.device | str = "cpu", amp: bool = False, channels_last: bool = False):
        self.device = torch.device(device)
        self.amp = amp
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=self.memory_format).eval()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), torch.autocast(self.device.type, enabled=self.amp):
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device, memory_format=self.memory_format)
            return self.model(x).float().cpu().numpy()


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
        logits_fn: the stage-1 runner (:class:`TorchRunner` or an ONNX Runtime runner).
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


def predict_tissue(logits_fn: LogitsFn, image_u8: np.ndarray, size_hw: tuple[int, int], tta: bool = False) -> tuple[np.ndarray, float]:
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
    return [np.clip(imaging.unletterbox(prob.astype(np.float32), geometry, interpolation="linear"), 0.0, 1.0).astype(np.float32)
            for prob, geometry in zip(probs, geometries)]


def predict_lesion(logits_fn: LogitsFn, crop_u8: np.ndarray, size_hw: tuple[int, int], tta: bool = False) -> np.ndarray:
    """Stage 2 on one ROI crop ``(h, w)`` uint8 -> probability ``(h, w)`` float32: see :func:`predict_lesion_batch`."""
    return predict_lesion_batch(logits_fn, [crop_u8], size_hw, tta)[0]


# ------------------------------------------------------------------------------------------------ the cascade
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
    """

    tissue_classes: np.ndarray
    lesion_prob: np.ndarray
    roi_box: RoiBox
    roi_source: str
    tissue_confidence: float
    flipped: bool
    adaptive_clahe_used: bool
    timings_s: dict = field(default_factory=dict)

    @property
    def fgt_mask(self) -> np.ndarray:
        """``(H, W)`` bool mask of fibroglandular tissue."""
        return self.tissue_classes == FGT


class Cascade:
    """Stage 1 -> FGT ROI -> stage 2, rebuilt from the two checkpoints alone.

    Args:
        stage1_checkpoint, stage2_checkpoint: checkpoint dicts (see :func:`load_checkpoint`); stage 2 may be None
            to run stage 1 and the ROI only (as stage-2 training does).
        stage1_runner, stage2_runner: logits functions; default :class:`TorchRunner` over the checkpoint's model on
            ``device``. Pass ONNX Runtime runners to use that backend.
        device: torch device for the default runners.
        tta: horizontal-flip test-time augmentation in both stages.
        adaptive_clahe: ``"off"``, ``"on"`` (always use the stronger CLAHE) or ``"auto"`` (re-run stage 1 with it
            when the confidence is below :data:`ADAPTIVE_CLAHE_CONFIDENCE`, keep the more confident result).
        roi_margin: ROI margin fraction; default: the stage-2 checkpoint's ``roi["margin_fraction"]``, else
            :data:`ROI_MARGIN_FRACTION`.

    Raises:
        ValueError: a checkpoint of the other stage (the two were swapped), or a bad ``adaptive_clahe``.
    """

    def __init__(self, stage1_checkpoint: dict, stage2_checkpoint: dict | None = None, *, stage1_runner: LogitsFn | None = None,
                 stage2_runner: LogitsFn | None = None, device: torch.device | str = "cpu", tta: bool = False,
                 adaptive_clahe: str = "off", amp: bool = False, channels_last: bool = False,
                 roi_margin: float | None = None):
        if adaptive_clahe not in ("off", "on", "auto"):
            raise ValueError(f"adaptive_clahe must be 'off', 'on' or 'auto', not {adaptive_clahe!r}")
        for wanted, checkpoint in ((1, stage1_checkpoint), (2, stage2_checkpoint)):
            found = None if checkpoint is None else int(checkpoint.get("stage", 0))
            if found not in (None, wanted):
                raise ValueError(f"the stage-{wanted} checkpoint given holds stage {found}; swap --stage1-weights and "
                                 "--stage2-weights")
        self.stage1_checkpoint, self.stage2_checkpoint = stage1_checkpoint, stage2_checkpoint
        self.preprocess_config = dict(stage1_checkpoint["preprocess_config"])
        self.stage1_size = tuple(int(v) for v in stage1_checkpoint["input_size"])
        self.stage1 = stage1_runner or TorchRunner(model_from_checkpoint(stage1_checkpoint, device), device, amp, channels_last)
        self.stage2 = None
        if stage2_checkpoint is not None:
            self.stage2_size = tuple(int(v) for v in stage2_checkpoint["input_size"])
            self.stage2 = stage2_runner or TorchRunner(model_from_checkpoint(stage2_checkpoint, device), device, amp, channels_last)
        if roi_margin is None:
            roi_margin = (stage2_checkpoint or {}).get("roi", {}).get("margin_fraction", ROI_MARGIN_FRACTION)
        self.roi_margin = float(roi_margin)
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
            box, source = fgt_roi_box(classes, self.roi_margin)
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
        lesions = predict_lesion_batch(self.stage2, [f.image[f.roi_box.slices()] for f in found], self.stage2_size, self.tta)
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
            ))
        return results

    def __call__(self, pixels: np.ndarray) -> CascadeResult:
        """Run the whole cascade on one image as read (``(H, W)`` uint8 or uint16): :meth:`run_batch` of one."""
        return self.run_batch([pixels])[0]
