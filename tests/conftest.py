"""Shared pytest fixtures: where the real data lives, and skips when it is absent.

The real public mammograms sit beside the project root at ``../shared/data`` (see that folder's README).
CI mounts them read-only, so tests write only under ``tmp_path``. A test that needs them skips with a reason
when the folder is missing; it never falls back to fake data silently.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

#: Real-data folder; override with MAMMO_SHARED_DATA for a checkout laid out differently.
SHARED_DATA = Path(os.environ.get("MAMMO_SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data")).resolve()


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not found at {path} (expected ../shared/data beside the project root; "
                    "set MAMMO_SHARED_DATA to point elsewhere)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the real data (``../shared/data``); skips the test if absent."""
    return _require(SHARED_DATA)


@pytest.fixture(scope="session")
def tissue_dir() -> Path:
    """DDSM tissue-label set: ``fgt_seg/<name>.png`` + ``fgt_seg_labels/<name>_LI.png`` (60 pairs, 960x480)."""
    return _require(SHARED_DATA / "tissue" / "train_valid")


@pytest.fixture(scope="session")
def lesion_dir() -> Path:
    """CDD-CESM lesion pairs: ``images/<name>.jpg`` + ``masks/<name>.jpg`` (98 pairs, 512x512)."""
    return _require(SHARED_DATA / "lesion_cdd_cesm")


@pytest.fixture(scope="session")
def nyu_dir() -> Path:
    """Two 16-bit full-field NYU images (2944x1920) with binary lesion masks."""
    return _require(SHARED_DATA / "nyu_16bit")


@pytest.fixture(scope="session")
def cbis_csv_dir() -> Path:
    """The four official CBIS-DDSM description CSVs (no images)."""
    return _require(SHARED_DATA / "cbis_ddsm_csv")


#: Network sizes of the untrained checkpoints of :func:`checkpoint_dir` (small: geometry, not accuracy, is tested).
STAGE1_SIZE, STAGE2_SIZE = (128, 64), (64, 64)


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory) -> Path:
    """best_stage1.pth / best_stage2.pth in ``stage1/`` and ``stage2/``: untrained, seeded (ResNet18 encoder, stage 1
    at 128x64, stage 2 at 64x64), saved with ``checkpoints.save_checkpoint``."""
    import torch

    from mammo.weights import checkpoints
    from mammo import imaging
    from mammo.nn.models import build_model, default_model_config

    folder = tmp_path_factory.mktemp("checkpoints")
    for stage, classes, size in ((1, 4, STAGE1_SIZE), (2, 1, STAGE2_SIZE)):
        torch.manual_seed(stage)
        config = default_model_config(classes, encoder_name="resnet18", encoder_weights=None)
        checkpoint = checkpoints.make_checkpoint(stage=stage, model=build_model(config), model_config=config,
                                                 preprocess_config=dict(imaging.DEFAULT_PREPROCESS), input_size=size,
                                                 epoch=2, best_metric=0.25)
        checkpoints.save_checkpoint(checkpoint, folder / f"stage{stage}" / f"best_stage{stage}.pth")
    return folder
