"""Folder throughput of ``cascade_inference.py`` against a plain single-network tool, and whole-process peak RSS.

Part 5 of issue 13, measured by ``mammo/cli/benchmark.py`` (its ``folder_throughput`` section; the root
``benchmark.py`` is its face). Kept apart from ``mammo/bench/speed.py``, which times networks and the cascade
*inside* one process: everything here runs whole processes, as a user does, and that module would pass 700 lines
with it.

The method:

- Two input folders hold ``n`` (at least :data:`MIN_FOLDER_IMAGES`) and :data:`SMALL_FOLDER_IMAGES` copies (hard
  links where the file system allows) of one full-field 16-bit mammogram (:func:`make_folders`).
- Each contender runs as a fresh process on each folder, writing into a fresh output folder: the cascade
  (``cascade_inference.py --image-dir ... --checkpoint-dir ...`` with every default output: tissue maps, FGT mask,
  lesion probability, figure, JSON, ``predictions.csv``, ``summary.json``), once with its default ``--backend`` and
  once per explicit backend of ``runners.BACKENDS`` (``"auto"`` is no backend of its own: it picks one of them), and
  the plain tool ``scripts/plain_segmenter.py`` (read, 8 bit, ``smp.Unet("resnet34")`` 512 x 512 eager, class map
  written at full size).
- Time per image = (t_n - t_small) / (n - small), seconds of wall time of whole processes, so Python start-up,
  imports, checkpoint loading (and any ONNX export) cancel out (:func:`per_image_seconds`). Start-up =
  t_small - small x per image.
- The runs are interleaved (every cascade backend on ``n``, the plain tool on ``n``, then the same on ``small``),
  ``repeats`` rounds after one untimed warm-up round on the small folder (file cache, bytecode, the ``.onnx`` export
  kept beside the checkpoint); each round gives one per-image time per contender, and the median over rounds is
  reported, so all contenders see the same machine load.
- Peak RSS of each process is its own high-water mark (``VmHWM`` of ``/proc/self/status``, read by a tiny wrapper at
  exit, :data:`RSS_WRAPPER`); ``getrusage(RUSAGE_CHILDREN)`` is not used, as it is the maximum over all children,
  and Linux counts the parent's memory in a child started by ``fork`` + ``exec``.

Targets (:data:`TARGETS`, from issue 13): per-image time of the cascade with its default backend and every default
output at most 0.8 x the plain tool's (stretch 0.6 x), on this machine's CPU; peak RSS of one whole
``cascade_inference.py --image`` process on a 2944 x 1920 16-bit image under ``--backend onnxruntime`` at most
1.0 GB (10^9 bytes). Reported by the benchmark, never asserted by a test.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from mammo import imaging
from mammo.weights import runners

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # mammo/bench/ -> the checkout
CASCADE_SCRIPT = PROJECT_ROOT / "cascade_inference.py"
PLAIN_SCRIPT = PROJECT_ROOT / "scripts" / "plain_segmenter.py"

#: Issue 13's targets: folder per-image time of the cascade (default backend, every default output) over the plain
#: tool's, at most 0.8 (stretch 0.6); peak RSS, GB (10^9 bytes), of one inference of a 2944 x 1920 16-bit image
#: under ``--backend onnxruntime``.
TARGETS = {"folder_over_plain_max": 0.8, "folder_over_plain_stretch_max": 0.6, "peak_rss_onnxruntime_gb_max": 1.0}

DEFAULT_FOLDER_IMAGES = 12  # n, images of the large folder (issue 13: n >= 12)
MIN_FOLDER_IMAGES = 12
SMALL_FOLDER_IMAGES = 2  # images of the small folder
DEFAULT_FOLDER_REPEATS = 2  # timed rounds
PLAIN_SIZE = 512  # the plain tool's network input, pixels (square)
MEMORY_IMAGE_SIZE = (2944, 1920)  # H x W of the memory test (the NYU full-field image's own size)

#: ``--quick``: 3 images, the plain tool at 64 px, one round, no warm-up round (numbers mean nothing).
QUICK = {"folder_images": 3, "plain_size": 64, "repeats": 1}

#: Runs a script as ``__main__`` (``runpy``) and writes the process's own peak RSS, bytes, to a file at exit:
#: ``python -c RSS_WRAPPER SCRIPT RSS_FILE ARGS...``. Standard library only, so it adds no memory of its own.
RSS_WRAPPER = r"""
import runpy
import sys
script, rss_file = sys.argv[1], sys.argv[2]
sys.argv = [script] + sys.argv[3:]
try:
    runpy.run_path(script, run_name="__main__")
finally:
    peak = None
    try:
        with open("/proc/self/status") as status:
            peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    with open(rss_file, "w") as out:
        out.write(str(peak))
"""


# ------------------------------------------------------------------------------------------------------ processes
def child_env(threads: int) -> dict:
    """The environment of every measured process: this one's, with ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` =
    ``threads`` (the same for all contenders) and the project on ``PYTHONPATH``."""
    env = dict(os.environ)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT)] + paths)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def run_measured(script: Path, args: list[str], rss_file: Path, env: dict, timeout_s: float = 3600) -> dict:
    """Run ``python script args...`` as a whole process (through :data:`RSS_WRAPPER`) in the project folder.

    Returns:
        ``{"seconds": wall time of the process, from start to exit, "peak_rss_bytes": its own peak RSS}``.

    Raises:
        RuntimeError: the process failed (status and the tail of its stderr in the message).
    """
    command = [sys.executable, "-c", RSS_WRAPPER, str(script), str(rss_file), *args]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    seconds = time.perf_counter() - start
    if proc.returncode != 0 or not rss_file.is_file():
        raise RuntimeError(f"{script.name} {' '.join(args)} failed with status {proc.returncode}: "
                           f"{proc.stderr[-2000:]}")
    return {"seconds": seconds, "peak_rss_bytes": int(rss_file.read_text())}


def per_image_seconds(seconds_n: float, seconds_small: float, n: int, small: int = SMALL_FOLDER_IMAGES) -> float:
    """Time per image by difference: ``(seconds_n - seconds_small) / (n - small)`` (start-up cancels out).

    Raises:
        ValueError: ``n <= small``.
    """
    if n <= small:
        raise ValueError(f"the large folder needs more images than the small one ({small}), got {n}")
    return (seconds_n - seconds_small) / (n - small)


# ---------------------------------------------------------------------------------------------------------- inputs
def link_or_copy(source: Path, target: Path) -> Path:
    """``target`` as a hard link to ``source`` (same bytes, no space), a copy where linking is refused; a ``target``
    that already is ``source`` is kept."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and os.path.samefile(source, target):
        return target
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
    return target


def make_folders(image: Path, counts: tuple[int, ...], work: Path) -> dict[int, Path]:
    """One folder per count under ``work``, holding that many copies of ``image`` (``<stem>_000<suffix>`` ...)."""
    folders = {}
    for count in counts:
        folder = work / f"images_{count}"
        for index in range(count):
            link_or_copy(image, folder / f"{image.stem}_{index:03d}{image.suffix}")
        folders[count] = folder
    return folders


def checkpoint_dir(stage_paths: dict[str, Path], work: Path) -> Path:
    """A ``--checkpoint-dir`` under ``work`` holding ``best_stage1.pth`` / ``best_stage2.pth`` (links to
    ``stage_paths["stage1"]`` / ``["stage2"]``), so a kept ONNX export lands there, not beside a user's files."""
    folder = work / "folder_checkpoints"
    for name, path in stage_paths.items():
        link_or_copy(Path(path), folder / f"best_{name}.pth")
    return folder


def explicit_backends() -> list[str]:
    """The backends ``cascade_inference.py --backend`` takes now (``runners.BACKENDS``) less ``"auto"``."""
    return [backend for backend in runners.BACKENDS if backend != "auto"]


# ----------------------------------------------------------------------------------------------------- measurement
ArgsFn = Callable[[Path, Path], list[str]]  # (input folder, output folder) -> a process's arguments


def _contenders(ckpt_dir: Path, backends: list[str], plain_size: int) -> dict[str, tuple[Path, ArgsFn]]:
    """label -> (script, function(folder, out_dir) -> its arguments). Cascade labels: "default" and backend names."""
    def cascade_args(flag: str | None):
        extra = ["--backend", flag] if flag else []
        return lambda folder, out: ["--image-dir", str(folder), "--output-dir", str(out),
                                    "--checkpoint-dir", str(ckpt_dir), *extra]

    contenders = {"default": (CASCADE_SCRIPT, cascade_args(None))}
    contenders.update({backend: (CASCADE_SCRIPT, cascade_args(backend)) for backend in backends})
    contenders["plain"] = (PLAIN_SCRIPT, lambda folder, out: [str(folder), str(out), "--size", str(plain_size)])
    return contenders


def _check_outputs(label: str, out: Path, count: int) -> str | None:
    """Raise unless the run wrote all ``count`` images; the backend the cascade ran with (``summary.json``; where it
    records ``"auto"``, the backend ``runners.resolve_backend`` picks for the CPU)."""
    if label == "plain":
        written = len(list(out.glob("*_seg.png")))
        if written != count:
            raise RuntimeError(f"plain tool wrote {written} of {count} class maps in {out}")
        return None
    summary = json.loads((out / "summary.json").read_text())
    done = summary["counts"].get("ok", 0)
    if done != count:
        raise RuntimeError(f"cascade ({label}) finished {done} of {count} images in {out}: {summary['counts']}")
    backend = summary.get("backend")
    if backend == "auto" and hasattr(runners, "resolve_backend"):  # a summary that records the flag, not its choice
        backend = runners.resolve_backend("auto", "cpu")
    return backend


def _contender_entry(by_count: dict[int, list[dict]], n: int, small: int) -> dict:
    """One contender's figures from its :func:`run_measured` results on the ``n`` and ``small`` folders, round by
    round: per-image milliseconds (median and runs), wall seconds, start-up seconds and peak RSS bytes (see
    :func:`measure_folder_throughput`)."""
    t_n = [r["seconds"] for r in by_count[n]]
    t_small = [r["seconds"] for r in by_count[small]]
    per_image = [per_image_seconds(a, b, n, small) for a, b in zip(t_n, t_small)]
    entry = {"per_image_ms": 1e3 * statistics.median(per_image), "per_image_runs_ms": [1e3 * p for p in per_image],
             "seconds_n_runs": t_n, "seconds_small_runs": t_small,
             "startup_seconds": statistics.median(b - small * p for b, p in zip(t_small, per_image)),
             "peak_rss_n_bytes": max(r["peak_rss_bytes"] for r in by_count[n]),
             "peak_rss_small_bytes": max(r["peak_rss_bytes"] for r in by_count[small])}
    entry["peak_rss_bytes"] = max(entry["peak_rss_n_bytes"], entry["peak_rss_small_bytes"])
    return entry


def measure_folder_throughput(image: Path, stage_paths: dict[str, Path], work: Path, *, n: int = DEFAULT_FOLDER_IMAGES,
                              repeats: int = DEFAULT_FOLDER_REPEATS, threads: int = 1, plain_size: int = PLAIN_SIZE,
                              warmup: bool = True, backends: list[str] | None = None) -> dict:
    """Folder throughput of the cascade (default backend and each explicit one) and of the plain tool.

    Args:
        image: the full-field 16-bit mammogram copied into both folders.
        stage_paths: ``{"stage1": .pth, "stage2": .pth}`` (linked into a ``--checkpoint-dir``, :func:`checkpoint_dir`).
        work: a scratch folder (inputs, outputs of each run, removed after the run is checked).
        n: images of the large folder (the small one has :data:`SMALL_FOLDER_IMAGES`).
        repeats: timed rounds; ``warmup``: one untimed round on the small folder first.
        threads: ``OMP_NUM_THREADS`` of every process (:func:`child_env`).
        plain_size: the plain tool's network size, pixels.
        backends: explicit cascade backends (default :func:`explicit_backends`).

    Returns:
        ``{"n", "n_small", "repeats", "warmup", "image", "image_size_hw", "plain": {...}, "backends":
        {"default" | name: {...}}, "order", "method"}``; every contender has ``per_image_ms`` (median over rounds
        of :func:`per_image_seconds`, milliseconds), ``per_image_runs_ms``, ``seconds_n_runs``,
        ``seconds_small_runs`` (wall seconds of whole processes), ``startup_seconds`` (median of t_small - small x
        per image), ``peak_rss_bytes`` (largest over its runs) and ``peak_rss_n_bytes`` / ``peak_rss_small_bytes``;
        each cascade entry also ``backend_flag`` (None for the default), ``resolved_backend`` (from the run's
        ``summary.json``) and ``ratio_to_plain`` (its per_image_ms / the plain tool's).

    Raises:
        RuntimeError: a process failed or did not write every image.
    """
    small = SMALL_FOLDER_IMAGES
    backends = explicit_backends() if backends is None else list(backends)
    folders = make_folders(Path(image), (n, small), work)
    ckpt_dir = checkpoint_dir(stage_paths, work)
    contenders = _contenders(ckpt_dir, backends, plain_size)
    env = child_env(threads)
    runs: dict[str, dict[int, list[dict]]] = {label: {n: [], small: []} for label in contenders}
    resolved: dict[str, str | None] = {}
    counter = iter(range(10**6))

    def run(label: str, count: int) -> dict:
        script, make_args = contenders[label]
        out = work / "runs" / f"{label}_{count}_{next(counter)}"
        result = run_measured(script, make_args(folders[count], out), work / "runs" / f"{out.name}.rss", env)
        resolved[label] = _check_outputs(label, out, count)
        shutil.rmtree(out)
        return result

    if warmup:
        for label in contenders:
            run(label, small)
    for _ in range(max(1, repeats)):
        for count in (n, small):
            for label in contenders:
                runs[label][count].append(run(label, count))

    entries = {label: _contender_entry(by_count, n, small) for label, by_count in runs.items()}
    plain = entries.pop("plain")
    plain["command"] = f"scripts/plain_segmenter.py IMAGE_DIR OUT_DIR --size {plain_size}"
    plain["model"] = f'smp.Unet("resnet34", in_channels=1, classes=4), {plain_size}x{plain_size}, torch eager, fp32'
    for label, entry in entries.items():
        flag = None if label == "default" else label
        entry.update(backend_flag=flag, resolved_backend=resolved.get(label),
                     ratio_to_plain=entry["per_image_ms"] / plain["per_image_ms"],
                     command="cascade_inference.py --image-dir IMAGE_DIR --output-dir OUT_DIR --checkpoint-dir CKPT"
                             + (f" --backend {flag}" if flag else ""))
    shape = imaging.read_image(image).pixels.shape
    return {"image": str(image), "image_size_hw": [int(shape[0]), int(shape[1])], "n": n, "n_small": small,
            "repeats": max(1, repeats), "warmup": warmup, "threads": threads,
            "order": [f"{label} x {count}" for count in (n, small) for label in contenders],
            "method": f"per image = (t_{n} - t_{small}) / ({n} - {small}) of whole-process wall times, per round; "
                      "median over rounds; contenders interleaved in each round",
            "outputs": "every default output of cascade_inference.py (no flag turning one off)",
            "plain": plain, "backends": entries}


def measure_memory(image: Path, stage_paths: dict[str, Path], work: Path, *, backend: str = "onnxruntime",
                   threads: int = 1, warmup: bool = True) -> dict:
    """Peak RSS of one whole ``cascade_inference.py --image IMAGE --backend backend`` process, bytes.

    With ``warmup`` the same command runs once untimed first, so a kept ONNX export exists (as after a user's first
    run) and the measured process does not export.

    Returns:
        ``{"backend", "image", "image_size_hw", "peak_rss_bytes", "seconds"}`` (wall seconds of the process).
    """
    ckpt_dir = checkpoint_dir(stage_paths, work)
    env = child_env(threads)
    result = {}
    for index in range(2 if warmup else 1):
        out = work / "runs" / f"memory_{backend}_{index}"
        args = ["--image", str(image), "--output-dir", str(out), "--checkpoint-dir", str(ckpt_dir),
                "--backend", backend]
        result = run_measured(CASCADE_SCRIPT, args, work / "runs" / f"{out.name}.rss", env)
        if not (out / f"{Path(image).stem}.json").is_file():
            raise RuntimeError(f"cascade ({backend}) wrote no {Path(image).stem}.json in {out}")
        shutil.rmtree(out)
    shape = imaging.read_image(image).pixels.shape
    return {"backend": backend, "image": str(image), "image_size_hw": [int(shape[0]), int(shape[1])], **result}


# --------------------------------------------------------------------------------------------- summary and table
def summarize(results: dict) -> dict:
    """Issue 13's folder targets from ``results["folder_throughput"]`` (empty without it): value, target, met.

    ``folder_over_plain``: the default backend's per-image time over the plain tool's (<= 0.8, stretch <= 0.6; not
    met when either per-image time is not positive); ``peak_rss_onnxruntime_gb``: the ``--image`` process's peak RSS
    in GB of 10^9 bytes (<= 1.0).
    """
    folder = results.get("folder_throughput")
    if not folder:
        return {}
    summary = {}
    default = folder["backends"].get("default")
    if default:
        ratio = default["ratio_to_plain"]
        # a per-image time by difference that is not positive means noise swamped the work: judged missed
        measured = default["per_image_ms"] > 0 and folder["plain"]["per_image_ms"] > 0
        summary["folder_over_plain"] = {"value": ratio, "backend": default.get("resolved_backend") or "default",
                                        "target_max": TARGETS["folder_over_plain_max"],
                                        "stretch_max": TARGETS["folder_over_plain_stretch_max"],
                                        "met": measured and ratio <= TARGETS["folder_over_plain_max"],
                                        "stretch_met": measured and ratio <= TARGETS["folder_over_plain_stretch_max"]}
        if not measured:
            summary["folder_over_plain"]["note"] = ("a per-image time came out <= 0 (machine noise larger than the "
                                                    "work): run again with more --folder-images or --folder-repeats")
    memory = folder.get("memory_onnxruntime")
    if memory:
        gb = memory["peak_rss_bytes"] / 1e9
        summary["peak_rss_onnxruntime_gb"] = {"value": gb, "size_hw": memory["image_size_hw"],
                                              "target_max": TARGETS["peak_rss_onnxruntime_gb_max"],
                                              "met": gb <= TARGETS["peak_rss_onnxruntime_gb_max"]}
    return summary


def table_lines(results: dict) -> list[str]:
    """The folder section of the printed table (no lines without ``results["folder_throughput"]``)."""
    folder = results.get("folder_throughput")
    if not folder:
        return []
    n, small = folder["n"], folder["n_small"]
    size = "x".join(map(str, folder.get("image_size_hw", [])))
    lines = [f"folder throughput: whole processes on {n} and {small} copies of {Path(folder['image']).name} ({size}); "
             f"per image = (t_{n} - t_{small}) / {n - small}, median of {folder['repeats']} interleaved round(s):"]
    plain = folder["plain"]
    lines.append(f"  {'plain tool (smp.Unet r34, eager)':<36}{plain['per_image_ms']:8.0f} ms/image {'':<16}start-up "
                 f"{plain['startup_seconds']:5.1f} s  peak RSS {plain['peak_rss_bytes'] / 2**20:5.0f} MiB")
    for label, item in folder["backends"].items():
        resolved = item.get("resolved_backend") if label == "default" else None
        name = f"cascade {label}" + (f" ({resolved})" if resolved else "")
        lines.append(f"  {name:<36}{item['per_image_ms']:8.0f} ms/image = {item['ratio_to_plain']:5.2f} x plain  "
                     f"start-up {item['startup_seconds']:5.1f} s  peak RSS {item['peak_rss_bytes'] / 2**20:5.0f} MiB")
    memory = folder.get("memory_onnxruntime")
    if memory:
        size = "x".join(map(str, memory["image_size_hw"]))
        lines.append(f"peak RSS of one cascade_inference.py --image process, {size}"
                     f" 16-bit, --backend {memory['backend']}: {memory['peak_rss_bytes'] / 1e9:.3f} GB "
                     f"({memory['seconds']:.1f} s)")
    return lines
