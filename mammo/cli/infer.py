"""Run the trained cascade on one mammogram or a folder, and write results a clinician-researcher can read.

Usage::

    python cascade_inference.py --checkpoint-dir checkpoints --image-dir scans/ --recursive --output-dir predictions
    python cascade_inference.py --stage1-weights checkpoints/stage1/best_stage1.pth \\
        --stage2-weights checkpoints/stage2/best_stage2.pth --image 0_R-CC.dcm --output-dir predictions
    python cascade_inference.py --checkpoint-dir checkpoints --image-dir scans/ --interactive   # OpenCV viewer
    torchrun --nproc-per-node 4 cascade_inference.py --checkpoint-dir checkpoints --image-dir archive/ --recursive

Under ``torchrun`` (one machine or several: ``--nnodes``, ``--rdzv-endpoint``) the inputs are split across the
processes (every N-th input, :func:`mammo.inference.listing.shard`), each process uses one GPU
(``cuda:<LOCAL_RANK>``) or an equal share of the CPU cores and writes its own images' outputs, and rank 0 merges
``predictions.csv`` and ``summary.json`` in input order (the processes exchange their tables over gloo). An
interrupted run continues where it stopped: an input whose ``<stem>.json`` came from the same file with the same
weights and settings is skipped, whatever the number of processes.

The two checkpoints alone define the networks, their input sizes and the preprocessing (no training flag is
repeated). A stage given neither ``--stageN-weights`` nor ``--checkpoint-dir`` runs the shipped default model,
``weights/stageN.safetensors`` (:mod:`mammo.weights.release`; the folder ``$MAMMO_WEIGHTS_DIR`` replaces
``weights/``), and a line says so with the model's provenance. The lesion threshold and the smallest lesion component
are the user's ``--threshold`` / ``--min-lesion-area``, else the stage-2 model's ``lesion_threshold`` /
``min_lesion_area`` when it carries them, else 0.5 and 1 pixel. Every format :func:`mammo.imaging.read_image` reads
is accepted: PNG / TIFF (8 and 16 bit), JPEG, BMP, PGM and DICOM (also extensionless DICOM files, recognised by their
``DICM`` magic).

Pipeline for each image (:class:`mammo.cascade.pipeline.Cascade`; nothing of it is re-implemented here): read ->
preprocess (config from the stage-1 checkpoint; mirrored so the chest wall is on the left) -> stage 1 at its network
size -> tissue classes mapped back to the original pixels -> FGT region of interest (box around the predicted FGT
grown by the stage-2 checkpoint's margin, default 10 % per side, at least 64 px; the whole breast when no FGT is
found, and the JSON says so) -> crop of the full-resolution preprocessed image -> stage 2 -> lesion probability
pasted back into the ROI box (exactly zero elsewhere) -> every output mirrored back to the input's own orientation
and resolution.

Outputs for each input ``<stem>`` (in ``--output-dir``; with ``--recursive`` the input's sub-folders are mirrored
there, so equal stems in different folders do not collide; two inputs with one stem in one folder, e.g. ``a.png``
and ``a.dcm``, get ``a_png`` / ``a_dcm``): the files of :data:`mammo.inference.outputs.OUTPUT_FILES`, listed with
their dtypes and values by ``--help`` and in the README. For a folder, ``predictions.csv`` (one row per input,
:data:`mammo.inference.outputs.CSV_COLUMNS`) and ``summary.json`` (counts, failures, density distribution, timings)
are written too, and a summary is printed.

Safety: an input that cannot be read is skipped with its reason and the rest go on (exit status 1 at the end);
files that are not images (no image suffix and no image magic bytes, e.g. ``notes.txt``) are listed as
``not_image`` (reported, not a failure); hidden files are ignored. Inputs are never written to (an output path that
would equal an input is refused). Each record says what made it (``provenance``: the input file's size, time and
SHA-256, and the settings that change the outputs; the weights are its ``checkpoints``). Without ``--overwrite``, an
input whose ``<stem>.json`` exists is skipped as ``exists`` when that record came from the same file (same SHA-256)
with the same weights and settings (its row in ``predictions.csv`` is filled from that JSON); otherwise (another file
of that name, other weights or settings, a record of an older version without provenance) its outputs are not
touched and it is a ``conflict`` whose reason names the difference (exit status 1). An existing ``predictions.csv`` /
``summary.json`` is kept and the new one gets a timestamped name unless ``--overwrite``. One run at a time per output
folder: a run holds the lock file ``<output-dir>/.cascade_inference.lock`` (its process id, host and start time;
rank 0 holds it for all the processes of a torchrun run) and a second run is refused before any model loads; a lock
left by a process that no longer runs on this host is taken over with a note. A broken link in the input folder is
an input that failed ("broken link to <target>"). An output folder that cannot be written is refused before any
model loads.

Speed: images go through the networks in groups of ``--batch-size`` (``Cascade.run_batch``: stage 1 on the group's
letterboxed images at once, then stage 2 on their ROI crops); while the networks run on one group, a background
thread reads the next group and another writes the previous group's outputs (PNG encoding, the figure;
``--prefetch 1``, the default). ``--no-visualization`` skips the slowest output.
The default ``--backend auto`` runs both networks under ONNX Runtime on a CPU (the export cached beside the
checkpoint, see :mod:`mammo.weights.runners`) and under torch with float16 autocast on CUDA; ``.onnx`` files
exported by ``onnx_backend.py`` are accepted as weights.

Exit status: 0 every input done (or skipped as ``exists`` / ``not_image``; a ``warning`` counts as done), 1 some inputs
failed, were rejected as not a mammogram (``mammo.inference.quality``) or conflict with existing outputs (each is
reported with its reason; the others were processed), 2 usage, checkpoint, output folder (not writable, in use) or
display error.

This module (the command line of ``cascade_inference.py``) only parses the command line and wires the modules that
do the work: :mod:`mammo.cascade.load` (loading the cascade), :mod:`mammo.inference.listing` (the inputs and their
torchrun shares), :mod:`mammo.inference.record` (the per-image measurements and the JSON record with its schema),
:mod:`mammo.inference.outputs` (the PNG / JSON / CSV files and the figure) and :mod:`mammo.inference.predict`
(running the cascade on files and folders with background reading and writing, the summary, the viewer wiring).
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time
from pathlib import Path

from mammo.weights import checkpoints
from mammo.cli import common
from mammo.inference import predict
from mammo.cascade import load
from mammo.inference import folder_lock, listing
from mammo.weights import release
from mammo.inference import outputs
from mammo.inference import probability
from mammo.inference import record as records
from mammo.weights import runners
from mammo.cascade import checks




def _outputs_epilog(width: int = 78) -> str:
    """The output files (``outputs.OUTPUT_FILES``, ``outputs.FOLDER_FILES``) as the text after the flags in --help."""
    lines = ["outputs, per input <stem> (in --output-dir):"]
    for _, pattern, text in (*outputs.OUTPUT_FILES, *((None, *row) for row in outputs.FOLDER_FILES)):
        if pattern == outputs.FOLDER_FILES[0][0]:
            lines.append("outputs of a folder run (--image-dir), beside them:")
        lines.append(f"  {pattern}")
        lines += textwrap.wrap(text, width, initial_indent="      ", subsequent_indent="      ")
    lines.append("each record's status: ok, warning (check before use: quality.reasons) or rejected (not a "
                 "mammogram);")
    lines.append("exit status: 0 all done (warnings included), 1 some inputs failed, were rejected or conflict with")
    lines.append("  existing outputs, 2 a usage error or an output folder that cannot be written, 130 interrupted")
    return "\n".join(lines)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The command line of the inference script (see the module docstring)."""
    parser = common.ArgumentParser(description="Run the two-stage mammogram cascade on an image or a folder.",
                                add_help=add_help, parents=[common.runtime_parser("device", "backend", "amp", "tta")],
                                epilog=_outputs_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    # checkpoints
    parser.add_argument("--stage1-weights", type=str, default=None,
                        help="stage-1 (tissue) checkpoint .pth, model file .safetensors, or .onnx (run by ONNX "
                             "Runtime) (default: --checkpoint-dir's, else the shipped weights/stage1.safetensors)")
    parser.add_argument("--stage2-weights", type=str, default=None,
                        help="stage-2 (lesion) checkpoint .pth, model file .safetensors, or .onnx (run by ONNX "
                             "Runtime) (default: --checkpoint-dir's, else the shipped weights/stage2.safetensors)")
    parser.add_argument("--checkpoint-dir", type=str, default=None,
                        help="folder holding best_stage1.pth and best_stage2.pth (directly or in stage1/ and stage2/); "
                             "used for a stage whose --stageN-weights is not given (default: none; a stage given "
                             f"no weights runs the shipped default model in weights/, or ${release.WEIGHTS_DIR_ENV})")
    # inputs and outputs
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--image", type=str, default=None, help="one mammogram file (default: %(default)s)")
    source.add_argument("--image-dir", type=str, default=None, help="a folder of mammograms (default: %(default)s)")
    parser.add_argument("--recursive", action="store_true", help="also read the sub-folders of --image-dir")
    parser.add_argument("--output-dir", type=str, default="predictions", help="where outputs go (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing outputs (default: skip those images)")
    # the model run
    parser.add_argument("--threshold", type=common.probability, default=None,
                        help="lesion probability threshold in (0, 1) for the reported components (default: the "
                             "stage-2 model's lesion_threshold when it carries one, else "
                             f"{release.DEFAULT_LESION_THRESHOLD})")
    parser.add_argument("--min-lesion-area", type=common.positive_int, default=None,
                        help="smallest lesion component reported, in pixels (default: the stage-2 model's "
                             f"min_lesion_area when it carries one, else {release.DEFAULT_MIN_LESION_AREA_PX})")
    parser.add_argument("--adaptive-clahe", action="store_true",
                        help="when stage 1 is unsure (mean confidence < cascade.ADAPTIVE_CLAHE_CONFIDENCE), re-run it "
                             "with the stronger CLAHE and keep the more confident result (reported per image)")
    parser.add_argument("--no-anatomy", dest="anatomy", action="store_false",
                        help="keep stage 1's own tissue map: do not reconcile it with the anatomy rules (one breast, "
                             "one pectoral muscle at the top of an MLO view, none on a CC view)")
    parser.add_argument("--batch-size", type=common.positive_int, default=1,
                        help="images per network call: stage 1 runs on the group's letterboxed images at once, then "
                             "stage 2 on their ROI crops (more memory, faster on a GPU) (default: %(default)s)")
    parser.add_argument("--prefetch", type=int, default=1, choices=(0, 1),
                        help="1: read the next image and write the previous one's outputs in background threads while "
                             "the network runs; 0: all in turn (default: %(default)s)")
    parser.add_argument("--prob-encoding", type=str, default="uint8", choices=tuple(probability.PROB_ENCODINGS),
                        help="<stem>_cancer_prob.png: uint8 = round(p x 255), uint16 = round(p x 65535) "
                             "(default: %(default)s)")
    parser.add_argument("--no-visualization", action="store_true", help="skip <stem>_visualization.png (faster)")
    parser.add_argument("--color-map", action="store_true",
                        help="also write <stem>_tissue_seg_color.png, the tissue map as plain RGB (the indexed "
                             "<stem>_tissue_seg.png already shows these colours in image viewers)")
    parser.add_argument("--no-dicom-seg", action="store_true",
                        help="skip <stem>_seg.dcm, the DICOM Segmentation written for each DICOM input")
    # interactive viewer
    parser.add_argument("--interactive", action="store_true",
                        help="open the OpenCV viewer over the inputs instead of writing all outputs (needs a display)")
    return parser


# ----------------------------------------------------------------------------------------------------- printing
def _print_summary(summary: dict, csv_path: Path | None, summary_path: Path | None) -> None:
    counts = summary["counts"]
    print("\nSummary")
    print(f"  inputs: {summary['inputs']}  " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    if summary["dense_percent"]:
        d = summary["dense_percent"]
        cats = ", ".join(f"{k}: {v}" for k, v in summary["dense_categories"].items())
        left_out = "; rejected images left out" if summary["rejected"] else ""
        print(f"  percent density (dense pixels / breast): mean {d['mean']:.1f} %, median {d['median']:.1f} % (range "
              f"{d['min']:.1f}-{d['max']:.1f} %); categories {cats}{left_out}")
    if summary["records_summarised"]["made_now"] + summary["records_summarised"]["kept"]:
        print(f"  images with lesion candidates (p >= {summary['lesion_threshold']:g}): "
              f"{summary['images_with_lesion_candidates']}")
    if summary["mean_s_per_processed_image"] is not None:
        print(f"  time: {summary['elapsed_s']:.1f} s in all, {summary['mean_s_per_processed_image']:.2f} s per "
              f"processed image ({summary['device']}, {summary['backend']})")
    kept = summary["records_summarised"]["kept"]
    if kept:
        print(f"  these figures cover {summary['records_summarised']['made_now']} record(s) made now and {kept} kept "
              "(made before from the same files, weights and settings)")
    for entry in summary["failed"]:
        print(f"  FAILED {entry['input']}: {entry['reason']}")
    for entry in summary["rejected"]:
        print(f"  REJECTED {entry['input']}: {entry['reason']}")
    for entry in summary["warnings"]:
        print(f"  WARNING {entry['input']}: {entry['reason']}")
    for entry in summary["conflicts"]:
        print(f"  CONFLICT {entry['input']}: {entry['reason']}")
    for entry in summary["not_images"]:
        print(f"  not an image, skipped: {entry['input']}")
    if csv_path:
        print(f"  table: {csv_path}")
    if summary_path:
        print(f"  summary: {summary_path}")


# --------------------------------------------------------------------------------------------------------- main
def _resolve_weights(args) -> tuple[Path, Path]:
    """The two stage files from ``--stageN-weights`` or ``--checkpoint-dir``, else the shipped default model
    (``release.default_weights``; its header is read to check it), checked cheaply (no weights loaded).

    Raises:
        checks.UserInputError / FileNotFoundError: a missing, empty or wrong kind of file, a file given as
            ``--checkpoint-dir``, or no way to find a stage (the message names the missing shipped file).
        release.WeightsFileError: a shipped file that is damaged or holds the other stage.
    """
    if args.checkpoint_dir and not Path(args.checkpoint_dir).exists():
        raise checks.UserInputError(
            f"--checkpoint-dir {args.checkpoint_dir} does not exist; pass the folder holding best_stage1.pth and "
            "best_stage2.pth (the training's checkpoint folder), or the files with --stage1-weights / --stage2-weights")
    if args.checkpoint_dir and not Path(args.checkpoint_dir).is_dir():
        raise checks.UserInputError(
            f"--checkpoint-dir {args.checkpoint_dir} is {checks.describe(args.checkpoint_dir)}, not a folder; "
            "pass the folder holding best_stage1.pth and best_stage2.pth, or the files with --stage1-weights / "
            "--stage2-weights")
    paths = []
    for stage in (1, 2):
        given = getattr(args, f"stage{stage}_weights")
        if given:
            paths.append(checks.checkpoint_file(given, f"--stage{stage}-weights", stage, allow_onnx=True))
        elif args.checkpoint_dir:
            paths.append(checkpoints.find_checkpoint(args.checkpoint_dir, stage))
        elif release.default_weights(stage).is_file():
            paths.append(release.default_weights(stage))
            release.read_settings(paths[-1], stage)
        else:
            raise FileNotFoundError(f"no stage-{stage} checkpoint: pass --stage{stage}-weights FILE or "
                                    f"--checkpoint-dir DIR ({release.missing_default_note(stage)})")
    return paths[0], paths[1]


def _shipped_weights_notes(args, paths: tuple[Path, Path]) -> list[str]:
    """The lines saying which stages run the shipped default model (``release.default_weights_note``): one line for
    both when their provenance is the same (it is printed once per run), else one per stage."""
    notes = [release.default_weights_note(path, stage) for stage, path in enumerate(paths, 1)
             if not getattr(args, f"stage{stage}_weights") and not args.checkpoint_dir]
    if len(notes) == 2 and notes[0].partition(" (")[2] == notes[1].partition(" (")[2]:
        first, _, details = notes[0].partition(" (")
        return [f"{first} + {release.display_path(paths[1])} ({details}"]
    return notes


def _torchrun_context():
    """This process's ``distributed.DistContext`` when torchrun started several, else None. ``distributed`` (and with
    it torch) is imported only then: a single process on the ONNX Runtime route never loads torch.

    Raises:
        ValueError: torchrun's variables are inconsistent (``distributed.env_context``).
    """
    if os.environ.get("WORLD_SIZE", "1").strip() in ("", "1"):
        return None
    from mammo.core import distributed

    return distributed.env_context()


def _process_device(device: str, ctx) -> tuple[str, int | None]:
    """This process's device and CPU threads. Under torchrun: ``cuda:<LOCAL_RANK>`` where a GPU is asked for (or
    ``auto`` finds one), and on the CPU an equal share of the cores per process on this machine (torchrun's
    ``LOCAL_WORLD_SIZE``), so that the processes do not oversubscribe the cores. A single process (``ctx`` None):
    unchanged."""
    if ctx is None:
        return device, None
    import torch

    if device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{ctx.local_rank}", None
    local = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))
    threads = max(1, runners.available_cores() // max(1, local))
    torch.set_num_threads(threads)
    return ("cpu" if device == "auto" else device), threads

def _claim_output_dir(output_dir: Path, ctx) -> tuple[folder_lock.FolderLock | None, str | None]:
    """``(lock, problem)``: rank 0 (or the single process) takes the output folder's lock; under torchrun the outcome
    is sent to every rank, so that all stop when it is refused and none of them asks for the lock (the processes of
    one torchrun run are one run). ``problem``: the one-line refusal, or None."""
    lock, problem = None, None
    if ctx is None or ctx.rank == 0:
        try:
            lock = folder_lock.lock_output_dir(output_dir)
        except checks.UserInputError as error:
            problem = str(error)
    if ctx is not None:
        from mammo.core import distributed

        problem = distributed.broadcast_object(problem, ctx)
    return lock, problem


def _input_problem(args: argparse.Namespace) -> str | None:
    """Why ``--image`` / ``--image-dir`` / ``--output-dir`` cannot be used (the usage error's message), or None."""
    if not args.image and not args.image_dir:
        return "pass --image FILE or --image-dir DIR"
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        return f"--output-dir {output_dir} is a file, not a folder; choose a folder (it is created if missing)"
    try:
        checks.writable_folder(output_dir, "--output-dir")  # below a file, read-only: refused before any work
    except checks.UserInputError as error:
        return str(error)
    if args.image:
        source = Path(args.image)
        if not source.is_file():
            hint = " (a folder: use --image-dir)" if source.is_dir() else ""
            return f"--image {source} is not a file{hint}"
        if not listing.looks_like_image(source):
            return (f"--image {source} is {checks.describe(source)}, not a mammogram; pass a PNG, JPEG, TIFF, BMP, "
                    "PGM or DICOM file")
    else:
        source = Path(args.image_dir)
        if not source.is_dir():
            return f"--image-dir {source} is not a folder"
        if output_dir.resolve() == source.resolve():
            return (f"--output-dir {output_dir} is the input folder; outputs would mix with the inputs. Choose another "
                    "folder")
    return None


def _list_items(args: argparse.Namespace, source: Path, output_dir: Path) -> list[listing.InputItem] | None:
    """The run's inputs: ``--image`` alone, or the files of ``--image-dir``; None (after saying so on stderr) when the
    folder holds no image file."""
    if args.image:
        return [listing.InputItem(source, source.name, output_dir, source.stem)]
    items = listing.list_inputs(source, args.recursive, output_dir)
    if not any(item.status == "pending" for item in items):
        print(f"error: no image files in {source}" + ("" if args.recursive else " (sub-folders need --recursive)"),
              file=sys.stderr)
        return None
    return items


def _settings(args: argparse.Namespace, loaded: load.LoadedCascade) -> dict:
    """The run's settings that change its outputs (``record.run_settings``), as each record's provenance holds them."""
    return records.run_settings(loaded, threshold=args.threshold, min_area_px=args.min_lesion_area,
                                prob_encoding=args.prob_encoding)


def _mark_existing(args: argparse.Namespace, mine: list[listing.InputItem], loaded: load.LoadedCascade) -> None:
    """Judge the inputs whose record exists (``listing.mark_existing``; not with ``--overwrite``) and say so: one
    line per input skipped (stdout), not touched or failed (stderr, with the reason)."""
    if args.overwrite:
        return
    for item in listing.mark_existing(mine, loaded.identities, _settings(args, loaded)):
        if listing.verdict(item) == "rejected":
            print(f"{item.relative}: outputs exist, skipped; REJECTED: {listing.verdict_reason(item)}", file=sys.stderr)
        elif item.status == "exists":
            print(f"{item.relative}: outputs exist, skipped (same file, weights and settings; pass --overwrite to "
                  "redo)")
        elif item.status == "conflict":
            print(f"{item.relative}: NOT TOUCHED: {item.reason}", file=sys.stderr)
        else:
            print(f"{item.relative}: FAILED: {item.reason}", file=sys.stderr)


def _run(args: argparse.Namespace, items: list[listing.InputItem], loaded: load.LoadedCascade,
         ctx) -> tuple[list[listing.InputItem], float, bool]:
    """Process this process's share of ``items`` (all of them without torchrun) and, under torchrun (``ctx``: the
    process group already made, gloo), gather every rank's on rank 0.

    Returns:
        ``(items, elapsed_s, reports)``: ``reports`` is True where this process prints and writes the run's report
        (``items`` then the whole run in input order), False on the other ranks (``items`` their own share).
    """
    protected = {item.path.resolve() for item in items}
    own = listing.shard(items, ctx.rank, ctx.world_size) if ctx is not None else list(enumerate(items))
    mine = [item for _, item in own]
    _mark_existing(args, mine, loaded)
    start = time.perf_counter()
    predict.process(mine, loaded, threshold=args.threshold, min_area_px=args.min_lesion_area,
                    prob_encoding=args.prob_encoding, visualization=not args.no_visualization,
                    overwrite=args.overwrite, batch_size=args.batch_size, prefetch=bool(args.prefetch),
                    protected=protected, dicom_seg=not args.no_dicom_seg,
                    color_map=args.color_map)
    elapsed = time.perf_counter() - start
    if ctx is None:
        return items, elapsed, True
    from mammo.core import distributed

    shards = distributed.gather_objects((own, elapsed), ctx)
    distributed.cleanup(ctx)
    if not ctx.is_main:
        return mine, elapsed, False
    return listing.merge_shards([part for part, _ in shards]), max(seconds for _, seconds in shards), True


def _report_run(args: argparse.Namespace, items: list[listing.InputItem], elapsed: float,
                loaded: load.LoadedCascade, output_dir: Path) -> None:
    """Print one image's findings, or write a folder's ``predictions.csv`` and ``summary.json`` and print it."""
    if args.image:
        item = items[0]
        if item.record is not None and item.status in ("ok", "warning"):
            print("\n".join(f"  {line}" for line in item.record["findings"]))
            print(f"  outputs in {item.out_dir} ({item.stem}_*)")
        return
    summary = predict.summarize(items, elapsed, loaded, threshold=args.threshold, batch_size=args.batch_size,
                                prefetch=bool(args.prefetch), arguments=dict(vars(args)),
                                settings=_settings(args, loaded))
    csv_path = outputs.write_csv(outputs.free_name(output_dir / "predictions.csv", args.overwrite), items)
    summary_path = outputs.write_json(outputs.free_name(output_dir / "summary.json", args.overwrite), summary)
    _print_summary(summary, csv_path, summary_path)


def _load_and_run(args: argparse.Namespace, paths: tuple[Path, Path], device: str, threads: int | None,
                  ctx) -> int:
    """Load the cascade, run it on the inputs and report (the output folder already locked); the exit status."""
    output_dir = Path(args.output_dir)
    source = Path(args.image) if args.image else Path(args.image_dir)
    try:
        shipped = _shipped_weights_notes(args, paths)
        loaded = load.load_cascade(*paths, device=device, backend=args.backend, tta=args.tta,
                                   adaptive_clahe=args.adaptive_clahe, amp=args.amp, threads=threads,
                                   anatomy=args.anatomy)
        lesion = release.resolve_lesion_settings(loaded.cascade.stage2_checkpoint, args.threshold,
                                                 args.min_lesion_area)
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        return common.usage_error(str(error))
    args.threshold, args.min_lesion_area, from_model = lesion.threshold, lesion.min_area_px, list(lesion.from_model)
    if ctx is None or ctx.rank == 0:
        for line in shipped:
            print(line)
        if from_model:
            values = {"lesion_threshold": args.threshold, "min_lesion_area": args.min_lesion_area}
            print("using the stage-2 model's " + " and ".join(f"{key} {values[key]:g}" for key in from_model)
                  + " (--threshold / --min-lesion-area override it)")
    for note in loaded.notes:
        print(f"note: {note}", file=sys.stderr)

    items = _list_items(args, source, output_dir)
    if items is None:
        return 2
    if args.interactive:
        return predict.interactive(items, loaded, threshold=args.threshold, adaptive_clahe=args.adaptive_clahe,
                                   save_dir=args.output_dir)
    items, elapsed, reports = _run(args, items, loaded, ctx)
    if reports:
        _report_run(args, items, elapsed, loaded, output_dir)
    return 1 if any(listing.verdict(item) in ("failed", "conflict", "rejected") for item in items) else 0


@common.interruptible("cascade_inference.py", "finished images are kept, run it again to continue (they are skipped)")
def main(args: argparse.Namespace | None = None) -> int:
    """Run inference as the command line asks; returns 0 (all done), 1 (some inputs failed or conflict with existing
    outputs) or 2 (usage error, an output folder that cannot be written or is in use)."""
    args = get_args_parser().parse_args() if args is None else args
    problem = _input_problem(args)
    if problem is not None:
        return common.usage_error(problem)
    try:
        ctx = _torchrun_context()
    except ValueError as error:
        return common.usage_error(str(error))
    if ctx is not None and args.interactive:
        return common.usage_error("--interactive opens one window: run it without torchrun")
    device, threads = _process_device(args.device, ctx)
    try:
        paths = _resolve_weights(args)
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        return common.usage_error(str(error))
    if ctx is not None:
        from mammo.core import distributed

        ctx = distributed.init_distributed("cpu", backend="gloo")  # the ranks exchange only small objects
    lock, problem = _claim_output_dir(Path(args.output_dir), ctx)  # before any model loads
    if problem is not None:
        if ctx is not None:
            distributed.cleanup(ctx)
        return common.usage_error(problem) if ctx is None or ctx.rank == 0 else 2
    try:
        return _load_and_run(args, paths, device, threads, ctx)
    finally:
        if lock is not None:
            lock.release()


if __name__ == "__main__":
    sys.exit(main())
