"""Running the cascade on files: one image, a folder with background reading and writing, the viewer.

What lives here: one file -> :func:`run_image` (a :class:`mammo.inference.record.Prediction`) or
:func:`predict_image` (its record only); a folder's inputs (listed by :mod:`mammo.inference.listing`) ->
:func:`process` (groups of images per network call, the next group read and the last one written in background
threads, one progress line per input in input order, a bad file failing alone) and :func:`summarize`
(``summary.json``); :func:`interactive` wires the OpenCV viewer (:mod:`mammo.inference.viewer`) to the cascade.

The cascade is loaded by :mod:`mammo.cascade.load`; the record and its measurements are :mod:`mammo.inference.record`;
the files written and the figure are :mod:`mammo.inference.outputs`; the command line is ``cascade_inference.py``
(:mod:`mammo.cli.infer`).
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from mammo import imaging
from mammo.core import metrics
from mammo.inference import viewer
from mammo.inference.outputs import TISSUE_COLORS_RGB, density_text, display_image, write_outputs
from mammo.cascade.load import LoadedCascade, with_adaptive_clahe
from mammo.inference.listing import InputItem, input_identity, verdict, verdict_reason
from mammo.inference.record import Prediction, build_prediction


# ---------------------------------------------------------------------------------------------------- one image
def _timed_read(path: Path) -> tuple[imaging.MammogramImage, float]:
    start = time.perf_counter()
    image = imaging.read_image(path)
    return image, time.perf_counter() - start


def run_image(loaded: LoadedCascade, path: str | os.PathLike, *, threshold: float = 0.5, min_area_px: int = 1,
              image: imaging.MammogramImage | None = None, read_s: float | None = None,
              relative_path: str | None = None, prob_encoding: str = "uint8",
              identity: dict | None = None) -> Prediction:
    """Run the cascade on one file and build its record (the arrays are kept for
    :func:`mammo.inference.outputs.write_outputs`).

    Args:
        loaded: from :func:`mammo.cascade.load.load_cascade`.
        path: the input file.
        threshold: lesion probability threshold for the components.
        min_area_px: smallest component reported, pixels.
        image: the file already read (prefetching); read here when None.
        read_s: seconds the read took (when ``image`` is given).
        relative_path: the input's name as reported (default: the file name).
        prob_encoding: the ``cancer_prob`` PNG encoding recorded (see
            :data:`mammo.inference.probability.PROB_ENCODINGS`).
        identity: the file's size, time and SHA-256 (``listing.input_identity``) for the record's ``provenance``;
            taken here when None.

    Raises:
        imaging.ImageReadError: the file cannot be read. OSError: its bytes cannot be read for the SHA-256.
    """
    path = Path(path)
    if image is None:
        image, read_s = _timed_read(path)
    if identity is None:
        identity = input_identity(path)
    start = time.perf_counter()
    result = loaded.cascade(image.pixels, name=path.name, view_position=image.view_position)
    return build_prediction(loaded, path, image, result, read_s=read_s or 0.0, cascade_s=time.perf_counter() - start,
                            threshold=threshold, min_area_px=min_area_px, relative_path=relative_path,
                            prob_encoding=prob_encoding, input_identity=identity)


def predict_image(loaded: LoadedCascade, path: str | os.PathLike, **kwargs) -> dict:
    """Run the cascade on one file and return its JSON record (no file written). See :func:`run_image`."""
    return run_image(loaded, path, **kwargs).record


def _report(item: InputItem, index: int, total: int) -> None:
    """One input's progress line: its density, ROI and lesions on stdout (read warnings on stderr), or why it failed."""
    if item.status == "failed":
        print(f"[{index + 1}/{total}] {item.relative}: FAILED, skipped: {item.reason}", file=sys.stderr, flush=True)
        return
    record = item.record
    if item.status == "rejected":  # not a mammogram: no numbers to print
        print(f"[{index + 1}/{total}] {item.relative}: REJECTED: {item.reason}", file=sys.stderr, flush=True)
        return
    verdict = f"WARNING ({item.reason}); " if item.status == "warning" else ""
    print(f"[{index + 1}/{total}] {item.relative}: {verdict}density {density_text(record['density'])}, "
          f"ROI from {record['roi']['source']}, "
          f"{record['lesions']['count']} lesion candidate(s), max p {record['lesions']['max_probability']:.2f}"
          f"{', adaptive CLAHE used' if record['preprocessing']['adaptive_clahe_used'] else ''}"
          f" ({item.seconds:.2f} s)", flush=True)
    for note in record["input"]["notes"]:
        if note.startswith("warning: ") or "converted" in note:
            print(f"    {item.relative}: {note}", file=sys.stderr, flush=True)
    for note in (record.get("anatomy") or {}).get("notes", []):
        print(f"    {item.relative}: {note}", flush=True)


def _fail(item: InputItem, error: Exception) -> None:
    """Mark ``item`` failed with a one-line reason that names the file."""
    item.status = "failed"
    if isinstance(error, imaging.ImageReadError):
        item.reason = str(error)  # already names the file
    else:
        item.reason = f"{item.path}: {type(error).__name__}: {error}"


#: Errors that mark one input as failed (the batch goes on); anything else is a bug and stops the run.
_INPUT_ERRORS = (imaging.ImageReadError, ValueError, TypeError, OSError, RuntimeError, MemoryError)


def _read_group(paths: list[Path]) -> list:
    """Read each file: a list of ``(image, seconds, identity)`` (``identity``: ``listing.input_identity``, taken just
    after the read, the bytes then in the page cache) or the exception raised for that file."""
    out = []
    for path in paths:
        try:
            image, seconds = _timed_read(path)
            out.append((image, seconds, input_identity(path)))
        except _INPUT_ERRORS as error:
            out.append(error)
    return out


class _Progress:
    """The progress lines of a folder run, printed in input order (``_report``).

    A file that fails to read is known before the image ahead of it has been written behind, so its line waits until
    that one's is out.
    """

    def __init__(self, total: int):
        self.total = total
        self.finished: dict[int, InputItem] = {}  # done items whose line waits for an earlier input's
        self.next_line = 0

    def done(self, index: int, item: InputItem) -> None:
        """``item`` (the ``index``-th pending input) is done or failed: print every line now due."""
        self.finished[index] = item
        while self.next_line in self.finished:
            _report(self.finished.pop(self.next_line), self.next_line, self.total)
            self.next_line += 1


class _Writes:
    """One group's outputs written behind the next group's network run (on ``pool``), or at once without a pool.

    ``write(prediction, item)`` writes one image's files and returns its record.
    """

    def __init__(self, write: Callable[[Prediction, InputItem], dict], progress: _Progress,
                 pool: ThreadPoolExecutor | None):
        self.write, self.progress, self.pool = write, progress, pool
        self.in_flight: list = []  # (index, item, future, start) of writes running in the background

    def _settle(self, index: int, item: InputItem, get_record: Callable[[], dict], start: float) -> None:
        try:
            item.record = get_record()
            item.status, item.seconds = item.record.get("status", "ok"), time.perf_counter() - start
            if item.status != "ok":  # the quality verdict's reasons (mammo.inference.quality)
                item.reason = "; ".join((item.record.get("quality") or {}).get("reasons", []))
        except (*_INPUT_ERRORS, FileExistsError) as error:
            _fail(item, error)
        self.progress.done(index, item)

    def submit(self, index: int, item: InputItem, prediction: Prediction, start: float) -> None:
        """Write ``item``'s outputs (in the background with a pool); ``start``: when its group began, for its time."""
        if self.pool is not None:
            self.in_flight.append((index, item, self.pool.submit(self.write, prediction, item), start))
            return
        self._settle(index, item, lambda: self.write(prediction, item), start)

    def finish(self) -> None:
        """Wait for the writes in the background and settle their items, in the order they were submitted."""
        while self.in_flight:
            index, item, future, start = self.in_flight.pop(0)
            self._settle(index, item, future.result, start)


def _predict_group(loaded: LoadedCascade, pending: list[InputItem], readable: list, progress: _Progress,
                   **options) -> list[Prediction | None]:
    """The predictions of one group's readable images (``readable``: ``(index, (image, read_s, identity))``) in one
    network call; when that fails, image by image, and an image at fault fails alone (None in its place).
    ``options``: ``threshold``, ``min_area_px`` and ``prob_encoding`` of
    :func:`mammo.inference.record.build_prediction`."""
    try:
        network_start = time.perf_counter()
        results = loaded.cascade.run_batch([image.pixels for _, (image, _, _) in readable],
                                           [pending[i].path.name for i, _ in readable],
                                           [image.view_position for _, (image, _, _) in readable])
        cascade_s = (time.perf_counter() - network_start) / max(1, len(readable))
        return [build_prediction(loaded, pending[i].path, image, result, read_s=read_s, cascade_s=cascade_s,
                                 relative_path=pending[i].relative, batch_size=len(readable), input_identity=identity,
                                 **options)
                for (i, (image, read_s, identity)), result in zip(readable, results)]
    except _INPUT_ERRORS:  # find the image at fault: run the group's images one by one
        predictions = []
        for i, (image, read_s, identity) in readable:
            try:
                predictions.append(run_image(loaded, pending[i].path, image=image, read_s=read_s,
                                             relative_path=pending[i].relative, identity=identity, **options))
            except _INPUT_ERRORS as error:
                _fail(pending[i], error)
                progress.done(i, pending[i])
                predictions.append(None)
        return predictions


def process(items: list[InputItem], loaded: LoadedCascade, *, threshold: float = 0.5, min_area_px: int = 1,
            prob_encoding: str = "uint8", visualization: bool = True, overwrite: bool = False, batch_size: int = 1,
            prefetch: bool = True, protected: set = frozenset(), dicom_seg: bool = True,
            color_map: bool = False) -> None:
    """Run every pending item, ``batch_size`` images per network call; fills status / reason / record / seconds.

    ``threshold`` / ``min_area_px`` / ``prob_encoding`` go to :func:`mammo.inference.record.build_prediction`;
    ``visualization``, ``overwrite``, ``protected`` (input paths, never written), ``dicom_seg`` and ``color_map`` to
    :func:`mammo.inference.outputs.write_outputs`. Each input gets one progress line when it is done (stdout) or failed
    (stderr, with the reason), in input order.

    With ``prefetch`` a reader thread reads the next group while the networks run on this one, and a writer
    thread writes the outputs of this group (PNG encoding, the matplotlib figure) while the next one runs. At most one
    group is read ahead and one written behind, so memory stays at about three groups of images. A file that cannot
    be read fails alone; the rest of its group goes on.
    """
    pending = [item for item in items if item.status == "pending"]
    total = len(pending)
    size = max(1, int(batch_size))
    groups = [list(range(i, min(i + size, total))) for i in range(0, total, size)]
    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="read") if prefetch else None
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="write") if prefetch else None
    progress = _Progress(total)

    def write(prediction: Prediction, item: InputItem) -> dict:
        return write_outputs(prediction, item.out_dir, item.stem, threshold=threshold, prob_encoding=prob_encoding,
                             visualization=visualization, overwrite=overwrite, protected=protected,
                             dicom_seg=dicom_seg, color_map=color_map)

    def read(group: list[int]):
        paths = [pending[i].path for i in group]
        return reader.submit(_read_group, paths) if reader else None

    writes = _Writes(write, progress, writer)
    try:
        future = read(groups[0]) if groups else None
        for number, group in enumerate(groups):
            start = time.perf_counter()
            current = future.result() if future is not None else _read_group([pending[i].path for i in group])
            future = read(groups[number + 1]) if number + 1 < len(groups) else None
            readable = [(i, got) for i, got in zip(group, current) if not isinstance(got, Exception)]
            for i, got in zip(group, current):
                if isinstance(got, Exception):
                    _fail(pending[i], got)
                    progress.done(i, pending[i])
            predictions = _predict_group(loaded, pending, readable, progress, threshold=threshold,
                                         min_area_px=min_area_px, prob_encoding=prob_encoding)
            writes.finish()
            for (i, _), prediction in zip(readable, predictions):
                if prediction is not None:
                    writes.submit(i, pending[i], prediction, start)
        writes.finish()
    finally:
        for pool in (reader, writer):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)


def _distribution(values: list[float]) -> dict | None:
    """Mean, median, min and max of a run's values (None for none)."""
    if not values:
        return None
    return {"mean": round(float(np.mean(values)), 3), "median": round(float(np.median(values)), 3),
            "min": round(float(np.min(values)), 3), "max": round(float(np.max(values)), 3)}


def summarize(items: list[InputItem], elapsed_s: float, loaded: LoadedCascade, *, threshold: float,
              batch_size: int, prefetch: bool, arguments: dict, settings: dict | None = None) -> dict:
    """The run summary (``summary.json``): counts by status, failures with reasons, density and lesion overview.

    The statistics cover exactly the records of ``items`` that hold one: those made now (``ok``) and those kept
    (``exists``: made from the same file, weights and settings, ``listing.mark_existing``), counted apart under
    ``records_summarised``; a ``conflict`` (a record made otherwise, left untouched) is listed under ``conflicts``
    and is in no statistic.

    Args:
        items: every input of the run, processed (:func:`process`) or skipped.
        elapsed_s: the run's wall time, seconds.
        loaded: the cascade that ran (its device, backend and checkpoint identities are reported).
        threshold: the lesion probability threshold the records used.
        batch_size, prefetch: how the run fed the networks (:func:`process`), reported in words.
        arguments: the run's settings as the command line gave them, recorded as they are under ``arguments``.
        settings: the settings every summarised record was made with (``record.run_settings``), under ``settings``.
    """
    counts: dict[str, int] = {}
    for item in items:
        counts[item.status] = counts.get(item.status, 0) + 1
    # the statistics describe the records of this run and the ones kept; rejected images (not mammograms) are left out
    done = [item for item in items if item.record is not None and item.record.get("status") != "rejected"]
    densities = [item.record["density"]["percent"] for item in done]
    categories = {c: sum(1 for item in done if item.record["density"]["category"] == c)
                  for c in metrics.DENSITY_CATEGORIES}
    dense = [item.record["density"]["dense_percent"] for item in done
             if item.record["density"].get("dense_percent") is not None]
    dense_categories = {c: sum(1 for item in done if item.record["density"].get("dense_category") == c)
                        for c in metrics.DENSITY_CATEGORIES}
    processed = [item.seconds for item in items
                 if item.status in ("ok", "warning", "rejected") and item.seconds is not None]
    return {
        "inputs": len(items),
        "counts": counts,
        "failed": [{"input": item.relative, "reason": item.reason} for item in items if item.status == "failed"],
        "rejected": [{"input": item.relative, "reason": verdict_reason(item)}
                     for item in items if verdict(item) == "rejected"],
        "warnings": [{"input": item.relative, "reason": verdict_reason(item)}
                     for item in items if verdict(item) == "warning"],
        "not_images": [{"input": item.relative, "reason": item.reason}
                       for item in items if item.status == "not_image"],
        "existing_outputs_kept": [item.relative for item in items if item.status == "exists"],
        "conflicts": [{"input": item.relative, "reason": item.reason} for item in items if item.status == "conflict"],
        "records_summarised": {"made_now": sum(1 for item in done if item.status != "exists"),
                               "kept": sum(1 for item in done if item.status == "exists")},
        "dense_percent": _distribution(dense),
        "dense_categories": dense_categories,
        "density_percent": _distribution(densities),
        "density_categories": categories,
        "images_overruled_by_anatomy": sum(1 for item in done if (item.record.get("anatomy") or {}).get("notes")),
        "images_with_lesion_candidates": sum(1 for item in done if item.record["lesions"]["count"] > 0),
        "lesion_threshold": threshold,
        "elapsed_s": round(elapsed_s, 3),
        "mean_s_per_processed_image": round(float(np.mean(processed)), 3) if processed else None,
        "batching": f"{batch_size} image(s) per network call"
                    + ("; the next group is read and the last one written in background threads" if prefetch else ""),
        "device": loaded.device, "backend": loaded.backend,
        "checkpoints": loaded.identities,
        "settings": None if settings is None else dict(settings),
        "arguments": dict(arguments),
    }


# --------------------------------------------------------------------------------------------------- the viewer
def interactive(items: list[InputItem], loaded: LoadedCascade, *, threshold: float = 0.5, adaptive_clahe: bool = False,
                save_dir: str | os.PathLike = "predictions", key_source=None) -> int:
    """Open the viewer (:mod:`mammo.inference.viewer`) over the pending inputs; results are computed when an image
    is shown.

    ``threshold`` and ``adaptive_clahe`` are the viewer's starting values; saved views go to ``save_dir``;
    ``key_source`` replaces the keyboard (see :func:`mammo.inference.viewer.run_viewer`). Returns the viewer's exit
    status.
    """
    entries = [item for item in items if item.status == "pending"]
    cascades = {False: with_adaptive_clahe(loaded.cascade, "off"), True: with_adaptive_clahe(loaded.cascade, "auto")}

    def compute(index: int, adaptive: bool) -> viewer.ViewItem:
        item = entries[index]
        image = imaging.read_image(item.path)
        model = LoadedCascade(cascades[adaptive], loaded.identities, loaded.device, loaded.backend)
        prediction = run_image(model, item.path, threshold=threshold, image=image, read_s=0.0,
                               relative_path=item.relative)
        result, record = prediction.result, prediction.record
        box = result.roi_box
        return viewer.ViewItem(name=item.relative, stem=item.stem, image=display_image(image.pixels),
                               tissue_classes=result.tissue_classes, lesion_prob=result.lesion_prob,
                               roi_box=(box.y0, box.x0, box.y1, box.x1), roi_source=result.roi_source,
                               density_percent=record["density"]["percent"],
                               density_category=record["density"]["category"],
                               adaptive_clahe_used=result.adaptive_clahe_used)

    state = viewer.ViewerState(count=len(entries), threshold=threshold, adaptive_clahe=bool(adaptive_clahe))
    return viewer.run_viewer(compute, state, save_dir=Path(save_dir), key_source=key_source,
                             tissue_colors_rgb=TISSUE_COLORS_RGB)
