"""Export the two trained stages as the shipped default model: ``weights/stage1.safetensors`` and
``weights/stage2.safetensors`` (float16 weights, settings and provenance in the metadata: see ``release.py``).

Usage::

    python scripts/export_weights.py --stage1 checkpoints_real/stage1/best_stage1.pth \\
        --stage2 checkpoints_real/stage2/best_stage2.pth --output-dir weights \\
        --training-data "DDSM tissue-label set (60 images) + CDD-CESM (98 images), patient split" \\
        --recipe "train.sh --encoder-weights none ..." [--lesion-threshold 0.5] [--overwrite]

Each file's metadata gets ``training_data``, ``recipe``, ``commit`` (``git rev-parse HEAD`` of this checkout, null
when git or the repository is not there), ``date`` (UTC, ISO 8601) and ``source_checkpoint`` (the checkpoint's file
name and SHA-256) beside the checkpoint's settings. The stage-2 file always carries ``lesion_threshold``: the
checkpoint's, else ``--lesion-threshold``, else 0.5 (the threshold inference and evaluation use by default), so the
model states the threshold it is meant to be read at; ``min_lesion_area`` only when the checkpoint or
``--min-lesion-area`` gives one. ``--lesion-threshold`` / ``--min-lesion-area`` replace the checkpoint's values.

Existing files are kept unless ``--overwrite`` (nothing is written then). The sizes are printed; both files together
should stay within :data:`SIZE_TARGET_BYTES` (a line on stderr says when they do not). Exit status: 0 written,
2 a mistake on the command line or a checkpoint that cannot be exported (one ``error:`` line; neither file is
written, so an existing pair stays a pair).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mammo.cli import common  # noqa: E402
from mammo.core import fileio  # noqa: E402
from mammo.weights import release  # noqa: E402
from mammo.cascade import checks  # noqa: E402

#: Both shipped files together should not exceed this (bytes): two float16 ResNet34 stages take about 119 MB.
SIZE_TARGET_BYTES = 130_000_000


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    parser = common.ArgumentParser(description="Export both stages as the shipped default model (safetensors).",
                                add_help=add_help)
    parser.add_argument("--stage1", type=str, required=True, help="stage-1 checkpoint (best_stage1.pth)")
    parser.add_argument("--stage2", type=str, required=True, help="stage-2 checkpoint (best_stage2.pth)")
    parser.add_argument("--output-dir", type=str, default=str(release.DEFAULT_WEIGHTS_DIR),
                        help="where stage1.safetensors and stage2.safetensors go (default: the repository's weights/)")
    parser.add_argument("--training-data", type=str, default=None,
                        help="what the stages were trained on, recorded as training_data (default: not recorded)")
    parser.add_argument("--recipe", type=str, default=None,
                        help="the training command(s), recorded as recipe (default: not recorded)")
    parser.add_argument("--lesion-threshold", type=common.probability, default=None,
                        help="stage 2's lesion_threshold (default: the checkpoint's, else "
                             f"{release.DEFAULT_LESION_THRESHOLD})")
    parser.add_argument("--min-lesion-area", type=common.positive_int, default=None,
                        help="stage 2's min_lesion_area in pixels (default: the checkpoint's, else none recorded)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing files in --output-dir")
    return parser


def git_commit(folder: Path = ROOT) -> str | None:
    """``git rev-parse HEAD`` in ``folder`` (40 hex digits), or None without git or outside a repository."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and commit else None


def main(args: argparse.Namespace) -> int:
    """Export both stages; returns 0 (written) or 2 (usage error, nothing written)."""
    out = Path(args.output_dir)
    targets = {stage: out / release.DEFAULT_WEIGHTS_NAMES[stage] for stage in (1, 2)}
    try:
        checks.output_folder(out, "--output-dir")
        existing = [path for path in targets.values() if path.exists()]
        if existing and not args.overwrite:
            raise checks.UserInputError(f"{existing[0]} exists; pass --overwrite to replace it")
        loaded = checks.load_stage_pair(args.stage1, args.stage2, flags=("--stage1", "--stage2"))
    except ValueError as error:
        return common.usage_error(checks.one_line(error))
    shared = {"training_data": args.training_data, "recipe": args.recipe, "commit": git_commit(),
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    stage2 = dict(loaded[1])
    if args.lesion_threshold is not None or stage2.get("lesion_threshold") is None:
        stage2["lesion_threshold"] = args.lesion_threshold or release.DEFAULT_LESION_THRESHOLD
    if args.min_lesion_area is not None:
        stage2["min_lesion_area"] = args.min_lesion_area
    # both files are written under temporary names first and renamed only when both exist: a failing stage 2 never
    # leaves a new stage 1 beside an old stage 2 (the pair must come from one training run)
    parts = {stage: target.with_name(target.name + ".part") for stage, target in targets.items()}
    try:
        for stage, checkpoint, source in ((1, loaded[0], args.stage1), (2, stage2, args.stage2)):
            extra = {**shared, "source_checkpoint": {"name": Path(source).name,
                                                     "sha256": fileio.file_sha256(source)}}
            try:
                release.export_weights(checkpoint, parts[stage], extra)
            except ValueError as error:
                return common.usage_error(f"--stage{stage} {source}: {checks.one_line(error)}; nothing was written")
        for stage in (1, 2):
            os.replace(parts[stage], targets[stage])
    finally:
        for part in parts.values():
            part.unlink(missing_ok=True)
    total = 0
    for stage, checkpoint in ((1, loaded[0]), (2, stage2)):
        size = targets[stage].stat().st_size
        total += size
        parameters = sum(int(t.numel()) for t in checkpoint["model"].values() if t.is_floating_point())
        print(f"stage {stage}: {targets[stage]} {size / 1e6:.1f} MB ({parameters / 1e6:.1f} M float16 weights)")
    print(f"both: {total / 1e6:.1f} MB (target: at most {SIZE_TARGET_BYTES / 1e6:.0f} MB)")
    if total > SIZE_TARGET_BYTES:
        print(f"warning: the two files take {total / 1e6:.1f} MB, over the {SIZE_TARGET_BYTES / 1e6:.0f} MB target",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
