"""Interactive OpenCV viewer over cascade results (``cascade_inference.py --interactive``).

One window shows the current mammogram with its overlays: tissue classes (colour), the FGT outline with the ROI box
(cyan), and the lesion contours at the current threshold (red), plus a status bar. Keys (printed in the terminal at
start, :data:`KEY_GUIDE`):

==================  ==========================================================
``n`` / space / ->  next image
``p`` / ``b`` / <-  previous image
``t``               tissue overlay on / off
``f``               FGT outline and ROI box on / off
``l``               lesion contours on / off
``+`` / ``=`` / up  lesion threshold + 0.05 (at most 0.95)
``-`` / down        lesion threshold - 0.05 (at least 0.05)
``c``               adaptive CLAHE on / off (re-runs the cascade on the image)
``s``               save the current view as PNG
``h`` / ``?``       print this guide again
``q`` / Esc         quit (closing the window also quits)
==================  ==========================================================

What lives here: the viewer's state and items (:class:`ViewerState`, :class:`ViewItem`), the keys
(:data:`KEY_GUIDE`, :func:`handle_key`, :func:`key_guide_text`), drawing (:func:`render`), :func:`save_view`,
:func:`display_problem` and :func:`run_viewer`. The viewer knows nothing of the cascade: it is given a ``compute``
function, which :func:`mammo.inference.predict.interactive` wires to the cascade.

The key handling is a pure function, :func:`handle_key` (state, key) -> (new state, action), and drawing is
:func:`render` (state, item) -> BGR image, so both are tested without a window. :func:`run_viewer` owns the
window; ``key_source`` replaces the keyboard with a sequence of keys (tests drive a real window under Xvfb with it).

Needs a display and the GUI build of OpenCV (``opencv-python``; see requirements.txt). Without one,
:func:`run_viewer` prints why and returns 2 instead of letting Qt abort the process. Headless machines can use a
virtual display: ``apt-get install xvfb`` then ``xvfb-run -a python cascade_inference.py ... --interactive``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable

import cv2
import numpy as np

from mammo import imaging

#: Keys and what they do, printed at start and with ``h``.
KEY_GUIDE = (
    ("n, space, right arrow", "next image"),
    ("p, b, left arrow", "previous image"),
    ("t", "tissue overlay on/off"),
    ("f", "FGT outline + ROI box on/off"),
    ("l", "lesion contours on/off"),
    ("+, =, up arrow", "lesion threshold +0.05"),
    ("-, down arrow", "lesion threshold -0.05"),
    ("c", "adaptive CLAHE on/off (re-runs the cascade)"),
    ("s", "save the current view (PNG)"),
    ("h, ?", "print this guide"),
    ("q, Esc", "quit"),
)

# Arrow key codes returned by cv2.waitKeyEx: X11 keysyms (Qt and GTK backends on Linux) and Windows virtual keys.
KEY_LEFT = {65361, 2424832}
KEY_UP = {65362, 2490368}
KEY_RIGHT = {65363, 2555904}
KEY_DOWN = {65364, 2621440}
KEY_ESC = 27

#: Threshold step and limits of the ``+`` / ``-`` keys (probability units).
THRESHOLD_STEP, THRESHOLD_MIN, THRESHOLD_MAX = 0.05, 0.05, 0.95

#: Tissue colours (RGB) of classes 0..3 when the caller gives none (:data:`mammo.inference.outputs.TISSUE_COLORS_RGB`).
DEFAULT_TISSUE_COLORS_RGB = ((0, 0, 0), (240, 200, 60), (220, 40, 150), (60, 120, 255))

#: Largest rendered view (height, width) in pixels; bigger images are shrunk for display (and saved views).
MAX_VIEW_HW = (900, 1400)
#: Height of the status bar above the image and the smallest view width (narrow images are padded), pixels.
STATUS_BAR_PX = 62
MIN_VIEW_WIDTH_PX = 560


@dataclass(frozen=True)
class ViewerState:
    """What the viewer shows. Immutable: :func:`handle_key` returns a new one.

    Attributes:
        index: current image, 0-based.
        count: number of images.
        show_tissue, show_fgt, show_lesion: overlay switches.
        threshold: lesion probability threshold of the contours, in (0, 1).
        adaptive_clahe: run the cascade with adaptive CLAHE ("auto") rather than without.
        message: one line shown in the status bar (last action's result).
    """

    index: int = 0
    count: int = 1
    show_tissue: bool = True
    show_fgt: bool = True
    show_lesion: bool = True
    threshold: float = 0.5
    adaptive_clahe: bool = False
    message: str = ""


@dataclass
class ViewItem:
    """One image's results as the viewer needs them (all arrays at the input's resolution and orientation).

    Attributes:
        name: shown in the status bar. stem: used to name saved views.
        image: ``(H, W)`` uint8 grayscale image.
        tissue_classes: ``(H, W)`` uint8 classes 0..3.
        lesion_prob: ``(H, W)`` float32 in [0, 1].
        roi_box: ``(y0, x0, y1, x1)`` half-open, pixels. roi_source: "fgt", "breast" or "image".
        density_percent, density_category: from :mod:`mammo.core.metrics`.
        adaptive_clahe_used: whether the stronger CLAHE result was kept.
        error: set (and the arrays None) when the image could not be processed.
    """

    name: str
    stem: str
    image: np.ndarray | None = None
    tissue_classes: np.ndarray | None = None
    lesion_prob: np.ndarray | None = None
    roi_box: tuple[int, int, int, int] = (0, 0, 0, 0)
    roi_source: str = ""
    density_percent: float = 0.0
    density_category: str = ""
    adaptive_clahe_used: bool = False
    error: str | None = None


def _key_char(key: int) -> str:
    return chr(key) if 0 <= key < 0x110000 and key not in (-1,) else ""


def handle_key(state: ViewerState, key: int | str) -> tuple[ViewerState, str]:
    """Apply one key press to the viewer state (pure: no window, no I/O).

    Args:
        state: the current state.
        key: a code from ``cv2.waitKeyEx`` (-1 = no key) or a one-character string.

    Returns:
        ``(new_state, action)``; action is one of ``"none"`` (nothing to do), ``"redraw"`` (overlay or threshold
        changed), ``"navigate"`` (another image), ``"recompute"`` (adaptive CLAHE switched: run the cascade again),
        ``"save"``, ``"help"`` or ``"quit"``.
    """
    if isinstance(key, str):
        key = ord(key) if len(key) == 1 else -1
    if key is None or key < 0:
        return state, "none"
    char = _key_char(key) if key < 0x10000 else ""
    if key == KEY_ESC or char == "q":
        return state, "quit"
    if key in KEY_RIGHT or char in ("n", " "):
        if state.index + 1 >= state.count:
            return replace(state, message="last image"), "redraw"
        return replace(state, index=state.index + 1, message=""), "navigate"
    if key in KEY_LEFT or char in ("p", "b"):
        if state.index == 0:
            return replace(state, message="first image"), "redraw"
        return replace(state, index=state.index - 1, message=""), "navigate"
    if char == "t":
        return replace(state, show_tissue=not state.show_tissue, message=""), "redraw"
    if char == "f":
        return replace(state, show_fgt=not state.show_fgt, message=""), "redraw"
    if char == "l":
        return replace(state, show_lesion=not state.show_lesion, message=""), "redraw"
    if key in KEY_UP or char in ("+", "="):
        value = min(THRESHOLD_MAX, round(state.threshold + THRESHOLD_STEP, 2))
        return replace(state, threshold=value, message=f"threshold {value:.2f}"), "redraw"
    if key in KEY_DOWN or char in ("-", "_"):
        value = max(THRESHOLD_MIN, round(state.threshold - THRESHOLD_STEP, 2))
        return replace(state, threshold=value, message=f"threshold {value:.2f}"), "redraw"
    if char == "c":
        on = not state.adaptive_clahe
        return replace(state, adaptive_clahe=on, message=f"adaptive CLAHE {'on' if on else 'off'}"), "recompute"
    if char == "s":
        return state, "save"
    if char in ("h", "?"):
        return state, "help"
    return state, "none"


def key_guide_text() -> str:
    """The key guide as printed in the terminal."""
    width = max(len(keys) for keys, _ in KEY_GUIDE)
    lines = ["Viewer keys:"] + [f"  {keys:<{width}}  {what}" for keys, what in KEY_GUIDE]
    return "\n".join(lines)


def render(state: ViewerState, item: ViewItem, tissue_colors_rgb=DEFAULT_TISSUE_COLORS_RGB,
           max_hw: tuple[int, int] = MAX_VIEW_HW) -> np.ndarray:
    """Draw the current view: the image (shrunk to fit ``max_hw``), the overlays switched on, and a status bar.

    Args:
        state: switches, threshold and position.
        item: the image's results.
        tissue_colors_rgb: colours of classes 0..3.
        max_hw: largest image area drawn, pixels (the status bar is added above it).

    Returns:
        ``(h + STATUS_BAR_PX, max(w, MIN_VIEW_WIDTH_PX), 3)`` uint8 BGR image (``h, w``: the image shrunk to fit
        ``max_hw``; narrow images are padded on the right).
    """
    if item.error is not None or item.image is None:
        canvas = np.zeros((360, 900, 3), np.uint8)
        _put_lines(canvas, [f"{state.index + 1}/{state.count}  {item.name}", "could not be processed:"]
                   + _wrap(item.error or "no image", 100), top=30)
        return canvas
    height, width = item.image.shape
    scale = min(1.0, max_hw[0] / height, max_hw[1] / width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    gray = cv2.resize(item.image, size, interpolation=cv2.INTER_AREA) if scale < 1 else item.image
    view = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    classes = (cv2.resize(item.tissue_classes, size, interpolation=cv2.INTER_NEAREST) if scale < 1
               else item.tissue_classes)
    if state.show_tissue:
        palette = np.array([c[::-1] for c in tissue_colors_rgb], np.uint8)  # BGR
        colored = palette[np.clip(classes, 0, len(palette) - 1)]
        tissue = classes > 0
        blended = cv2.addWeighted(view, 0.6, colored, 0.4, 0.0)
        view[tissue] = blended[tissue]
    if state.show_fgt:
        fgt = (classes == 2).astype(np.uint8)
        contours, _ = cv2.findContours(fgt, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(view, contours, -1, (0, 255, 0), 1, cv2.LINE_AA)
        y0, x0, y1, x1 = (int(round(v * scale)) for v in item.roi_box)
        cv2.rectangle(view, (x0, y0), (max(x0, x1 - 1), max(y0, y1 - 1)), (255, 255, 0), 1)
    lesion_count = 0
    if item.lesion_prob is not None:
        mask_full = (item.lesion_prob >= state.threshold).astype(np.uint8)
        lesion_count = cv2.connectedComponents(mask_full, connectivity=8)[0] - 1
        if state.show_lesion and lesion_count:
            mask = cv2.resize(mask_full, size, interpolation=cv2.INTER_NEAREST) if scale < 1 else mask_full
            contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(view, contours, -1, (0, 0, 255), 2, cv2.LINE_AA)
    if view.shape[1] < MIN_VIEW_WIDTH_PX:  # room for the status text beside narrow images
        view = cv2.copyMakeBorder(view, 0, 0, 0, MIN_VIEW_WIDTH_PX - view.shape[1], cv2.BORDER_CONSTANT,
                                  value=(40, 40, 40))
    bar = np.zeros((STATUS_BAR_PX, view.shape[1], 3), np.uint8)
    clahe = "on" + (" (used)" if item.adaptive_clahe_used else " (not used)") if state.adaptive_clahe else "off"
    onoff = {True: "on", False: "off"}
    lines = [f"{state.index + 1}/{state.count}  {item.name}",
             f"density {item.density_percent:.1f}% ({item.density_category}) | ROI {item.roi_source} | "
             f"lesions {lesion_count} at p >= {state.threshold:.2f}",
             f"[t]issue {onoff[state.show_tissue]} [f]gt {onoff[state.show_fgt]} [l]esion {onoff[state.show_lesion]} "
             f"[c]lahe {clahe}  {state.message}"]
    _put_lines(bar, lines, top=16, scale=0.45)
    return np.ascontiguousarray(np.vstack([bar, view]))


def _wrap(text: str, width: int) -> list[str]:
    return [text[i:i + width] for i in range(0, len(text), width)] or [""]


def _put_lines(canvas: np.ndarray, lines: list[str], top: int, scale: float = 0.5) -> None:
    for i, line in enumerate(lines):
        cv2.putText(canvas, line, (6, top + i * int(40 * scale + 2)), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255),
                    1, cv2.LINE_AA)


def save_view(view: np.ndarray, save_dir: str | os.PathLike, stem: str) -> Path:
    """Save a rendered view as ``<stem>_view.png`` in ``save_dir`` (``_view_2``, ``_view_3``... if taken)."""
    save_dir = Path(save_dir)
    path, counter = save_dir / f"{stem}_view.png", 1
    while path.exists():
        counter += 1
        path = save_dir / f"{stem}_view_{counter}.png"
    return imaging.write_png(path, view, overwrite=False)


def display_problem() -> str | None:
    """Why no OpenCV window can open here, or None when one can.

    Checks the OpenCV build (the headless wheel has no GUI), ``DISPLAY`` / ``WAYLAND_DISPLAY`` on Linux, and then
    opens a window in a child process (Qt aborts the whole process when it cannot reach the display, so the
    probe must not run in this one).
    """
    gui = [line.split(":", 1)[1].strip() for line in cv2.getBuildInformation().splitlines()
           if line.strip().startswith("GUI:")]
    if gui and gui[0].upper() == "NONE":
        return ("this OpenCV build has no GUI (opencv-python-headless); reinstall the GUI build: "
                "scripts/setup_env.sh, or pip install --force-reinstall --no-deps opencv-python==" + cv2.__version__)
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return ("no display: DISPLAY is not set. Run it on a desktop, over 'ssh -X', or on a virtual display "
                "('apt-get install xvfb', then 'xvfb-run -a python cascade_inference.py ... --interactive'); "
                "without --interactive every result is written as files")
    probe = "import cv2; cv2.namedWindow('probe'); cv2.waitKey(1); cv2.destroyAllWindows()"
    try:
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return "opening a test window did not finish within 60 s (is the display reachable?)"
    if done.returncode != 0:
        detail = (done.stderr.strip().splitlines() or ["no message"])[0]
        return (f"cannot open a window on display {os.environ.get('DISPLAY', '?')!r}: {detail}. Check the display, "
                "or use 'xvfb-run -a ...' for a virtual one")
    return None


def _cached_items(compute: Callable[[int, bool], ViewItem]) -> Callable[[ViewerState], ViewItem]:
    """``item_for(state)``: the :class:`ViewItem` of the state's image and adaptive CLAHE switch, computed once per
    ``(index, adaptive_clahe)``; an exception in ``compute`` becomes an error card (the viewer survives one bad file).
    """
    cache: dict[tuple[int, bool], ViewItem] = {}

    def item_for(current: ViewerState) -> ViewItem:
        key = (current.index, current.adaptive_clahe)
        if key not in cache:
            try:
                cache[key] = compute(*key)
            except Exception as error:  # shown in the window: the viewer must survive one bad file
                cache[key] = ViewItem(name=f"image {current.index + 1}", stem=f"image{current.index + 1}",
                                      error=f"{type(error).__name__}: {error}")
        return cache[key]

    return item_for


def run_viewer(compute: Callable[[int, bool], ViewItem], state: ViewerState, *, save_dir: str | os.PathLike,
               key_source: Iterable[int | str] | None = None, window_name: str = "Mammogram cascade",
               tissue_colors_rgb=DEFAULT_TISSUE_COLORS_RGB, print_fn: Callable[[str], None] = print,
               check_display: bool = True, poll_ms: int = 50) -> int:
    """Open the viewer window and run it until the user quits.

    Args:
        compute: ``compute(index, adaptive_clahe) -> ViewItem``; called when an image is first shown (results are
            cached per ``(index, adaptive_clahe)``). An exception becomes an error card, not a crash.
        state: the initial state (``count`` = number of images).
        save_dir: where ``s`` saves views.
        key_source: keys to use instead of the keyboard (each still drawn in the real window); the viewer quits
            when they run out. None = the keyboard.
        window_name: the window's title.
        tissue_colors_rgb: class colours.
        print_fn: where the key guide and messages go.
        check_display: run :func:`display_problem` first.
        poll_ms: keyboard polling interval in milliseconds.

    Returns:
        0 after quitting, 2 when no window can be opened (the reason is printed to stderr).
    """
    if state.count < 1:
        print("viewer: no images to show", file=sys.stderr)
        return 2
    if check_display:
        problem = display_problem()
        if problem:
            print(f"error: --interactive: {problem}", file=sys.stderr)
            return 2
    print_fn(key_guide_text())
    item_for = _cached_items(compute)
    keys = iter(key_source) if key_source is not None else None
    cv2.namedWindow(window_name, cv2.WINDOW_NORMAL | cv2.WINDOW_KEEPRATIO)
    try:
        view, needs_draw = None, True
        while True:
            if needs_draw:
                item = item_for(state)
                view = render(state, item, tissue_colors_rgb)
                cv2.imshow(window_name, view)
                needs_draw = False
            if keys is not None:
                cv2.waitKey(1)
                key = next(keys, None)
                if key is None:
                    break
            else:
                key = cv2.waitKeyEx(poll_ms)
                if key == -1:
                    if cv2.getWindowProperty(window_name, cv2.WND_PROP_VISIBLE) < 1:
                        break
                    continue
            state, action = handle_key(state, key)
            if action == "quit":
                break
            if action == "save":
                path = save_view(view, save_dir, item.stem)
                print_fn(f"saved view: {path}")
                state = replace(state, message=f"saved {path.name}")
            elif action == "help":
                print_fn(key_guide_text())
            needs_draw = action != "none" or needs_draw
            if action == "save":
                needs_draw = True
    finally:
        cv2.destroyWindow(window_name)
        cv2.waitKey(1)
    return 0
