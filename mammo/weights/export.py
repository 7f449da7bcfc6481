"""Exporting trained stages to ONNX files with a parity check against PyTorch (``onnx_backend.py``'s work).

What lives here: :func:`export_stages` (both stages -> ``stage1.onnx`` / ``stage2.onnx``) and
:func:`max_logit_difference` (PyTorch vs ONNX Runtime on one batch). The export itself is
:mod:`mammo.weights.onnx_export`; the runners that are compared are :mod:`mammo.weights.runners`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mammo.weights import checkpoints, runners
from mammo.weights.onnx_export import ONNX_OPSET, export_onnx


def max_logit_difference(checkpoint: dict, onnx_model: str | os.PathLike | bytes, batch: np.ndarray,
                         optimization: str = "all") -> float:
    """Largest absolute difference between PyTorch (fp32, eager) and ONNX Runtime logits on ``batch``.

    Args:
        checkpoint: the stage checkpoint dict the ONNX model was exported from.
        onnx_model: the exported model (path or bytes).
        batch: ``(N, 1, H, W)`` float32 in [0, 1] at the model's input size.
    """
    reference = runners.TorchRunner(checkpoints.model_from_checkpoint(checkpoint, "cpu"))(batch)
    return float(np.abs(runners.OnnxRunner(onnx_model, optimization=optimization)(batch) - reference).max())


def export_stages(stage1_weights: str | os.PathLike | None, stage2_weights: str | os.PathLike | None,
                  output_dir: str | os.PathLike, *, overwrite: bool = False, dynamic_size: bool = False,
                  opset: int = ONNX_OPSET, check: bool = True, seed: int = 0) -> dict:
    """Export the given stages to ``output_dir/stage1.onnx`` and ``stage2.onnx``; optionally check parity.

    Parity is checked on a seeded random batch of two images at the stage's input size.

    Returns:
        ``{"stage1": {"path": str, "max_abs_logit_diff": float | None}, "stage2": {...}}`` for the stages given.

    Raises:
        ValueError: neither stage given. FileExistsError: an output exists and ``overwrite`` is False.
    """
    if stage1_weights is None and stage2_weights is None:
        raise ValueError("nothing to export: pass --stage1-weights and/or --stage2-weights")
    report = {}
    for name, weights in (("stage1", stage1_weights), ("stage2", stage2_weights)):
        if weights is None:
            continue
        checkpoint = checkpoints.load_checkpoint(weights)
        path = export_onnx(checkpoint, Path(output_dir) / f"{name}.onnx", opset=opset, dynamic_size=dynamic_size,
                           overwrite=overwrite)
        diff = None
        if check:
            height, width = (int(v) for v in checkpoint["input_size"])
            batch = np.random.default_rng(seed).random((2, 1, height, width), dtype=np.float32)
            diff = max_logit_difference(checkpoint, path, batch)
        report[name] = {"path": str(path), "max_abs_logit_diff": diff}
    return report
