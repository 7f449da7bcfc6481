"""Loading a cascade: both stage files -> runners for one backend -> a :class:`LoadedCascade` ready to run.

What lives here: :class:`LoadedCascade` (the cascade with the identities of its stage files, the device and the
backend that run it), :func:`load_cascade` and :func:`with_adaptive_clahe`. The runners come from
:mod:`mammo.weights.runners` and the stage files' identities from :mod:`mammo.weights.checkpoints`; the cascade itself
is :class:`mammo.cascade.pipeline.Cascade`. Running it on files is :mod:`mammo.inference.predict`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from mammo.cascade.pipeline import Cascade
from mammo.weights import checkpoints, runners


@dataclass
class LoadedCascade:
    """A ready cascade with what the reports say about it."""

    cascade: Cascade
    identities: dict  # {"stage1": checkpoint_identity, "stage2": ...}
    device: str
    backend: str
    notes: list = field(default_factory=list)


def load_cascade(stage1_path: str | os.PathLike, stage2_path: str | os.PathLike, *, device: str = "auto",
                 backend: str = "auto", tta: bool = False, adaptive_clahe: bool = False,
                 amp: bool = False, threads: int | None = None, anatomy: bool = True) -> LoadedCascade:
    """Load both checkpoints and build the :class:`Cascade` that inference runs.

    ``backend`` / ``device``: as :func:`mammo.weights.runners.load_runner` (``auto``: ONNX Runtime on a CPU, its
    export cached beside the checkpoint; torch with float16 autocast on CUDA). The returned ``backend`` and
    ``device`` are those that run. ``tta``: as :class:`~mammo.cascade.pipeline.Cascade`; ``adaptive_clahe``: True
    runs it with ``adaptive_clahe="auto"`` (else ``"off"``); ``amp``: autocast in the torch runners (float16 on CUDA,
    bfloat16 on the CPU); ``anatomy``: reconcile stage 1 with the anatomy rules (``mammo.cascade.anatomy``).

    ``threads``: CPU threads of the ONNX Runtime sessions (default: all cores this process may use; torch's own
    thread count is the caller's, ``torch.set_num_threads``).

    Raises:
        FileNotFoundError: a checkpoint is missing. ValueError: a file is not a checkpoint of this suite, or holds
        the other stage. RuntimeError: ``device="cuda"`` without a GPU.
    """
    stage1_path, stage2_path = Path(stage1_path), Path(stage2_path)
    runner1, checkpoint1 = runners.load_runner(stage1_path, backend, device, amp=amp, threads=threads)
    runner2, checkpoint2 = runners.load_runner(stage2_path, backend, device, amp=amp, threads=threads)
    notes = []
    if dict(checkpoint2.get("preprocess_config", {})) != dict(checkpoint1["preprocess_config"]):
        notes.append("the two checkpoints store different preprocessing configs; the stage-1 one is used for both "
                     "stages (Cascade)")
    model = Cascade(checkpoint1, checkpoint2, stage1_runner=runner1, stage2_runner=runner2,
                    tta=tta, adaptive_clahe="auto" if adaptive_clahe else "off",
                    stage1_name=str(stage1_path), stage2_name=str(stage2_path), anatomy=anatomy)
    identities = {"stage1": checkpoints.checkpoint_identity(stage1_path, checkpoint1),
                  "stage2": checkpoints.checkpoint_identity(stage2_path, checkpoint2)}
    return LoadedCascade(model, identities, str(runner1.device), runner1.backend, notes)


def with_adaptive_clahe(model: Cascade, mode: str) -> Cascade:
    """A cascade sharing ``model``'s runners with another ``adaptive_clahe`` mode ("off", "on" or "auto")."""
    return Cascade(model.stage1_checkpoint, model.stage2_checkpoint, stage1_runner=model.stage1,
                   stage2_runner=model.stage2, tta=model.tta, adaptive_clahe=mode, roi_rule=model.roi_rule,
                   anatomy=model.anatomy)
