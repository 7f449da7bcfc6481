"""The interactive viewer: pure key handling, drawing, saving, the no-display message, and a real window under Xvfb.

The window tests need Xvfb (``apt-get install -y xvfb``; ``xdotool`` too for the real key-press test) and skip with
that reason when it is absent. They start their own Xvfb server on a free display number.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from mammo.weights import checkpoints
from mammo import imaging
from mammo.inference import viewer
from mammo.inference.viewer import KEY_ESC, ViewerState, ViewItem, handle_key, render

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _item(index: int = 0, height: int = 300, width: int = 200) -> ViewItem:
    image = np.tile(np.linspace(30, 220, width).astype(np.uint8), (height, 1))
    classes = np.zeros((height, width), np.uint8)
    classes[height // 6:5 * height // 6, : 3 * width // 4] = 1
    classes[height // 3:2 * height // 3, width // 10: width // 2] = 2
    prob = np.zeros((height, width), np.float32)
    prob[2 * height // 5: 8 * height // 15, width // 5: 2 * width // 5] = 0.7  # inside the FGT block
    return ViewItem(name=f"image{index}.png", stem=f"image{index}", image=image, tissue_classes=classes,
                    lesion_prob=prob, roi_box=(height // 3 - 10, 10, 2 * height // 3 + 10, width // 2 + 10),
                    roi_source="fgt", density_percent=25.0, density_category="A")


# ------------------------------------------------------------------------------------------------- key handling
def test_navigation_clamps_at_both_ends():
    state = ViewerState(count=3)
    state, action = handle_key(state, "n")
    assert (state.index, action) == (1, "navigate")
    state, action = handle_key(state, viewer.KEY_RIGHT.__iter__().__next__())
    assert (state.index, action) == (2, "navigate")
    state, action = handle_key(state, " ")
    assert (state.index, action, state.message) == (2, "redraw", "last image")
    for key in ("p", "b", 65361):
        state, action = handle_key(state, key)
    assert (state.index, action, state.message) == (0, "redraw", "first image")


def test_toggles_threshold_clahe_save_help_and_quit():
    start = ViewerState(count=2)
    state, action = handle_key(start, "t")
    assert not state.show_tissue and state.show_fgt and state.show_lesion and action == "redraw"
    state, _ = handle_key(state, ord("f"))
    state, _ = handle_key(state, "l")
    assert (state.show_tissue, state.show_fgt, state.show_lesion) == (False, False, False)
    state, _ = handle_key(handle_key(handle_key(state, "t")[0], "f")[0], "l")
    assert (state.show_tissue, state.show_fgt, state.show_lesion) == (True, True, True)
    state, action = handle_key(start, "+")
    assert state.threshold == 0.55 and action == "redraw"
    for _ in range(20):
        state, _ = handle_key(state, "=")
    assert state.threshold == viewer.THRESHOLD_MAX
    for _ in range(30):
        state, _ = handle_key(state, 65364)  # down arrow
    assert state.threshold == viewer.THRESHOLD_MIN
    state, action = handle_key(start, "c")
    assert state.adaptive_clahe and action == "recompute"
    assert handle_key(state, "c")[0].adaptive_clahe is False
    assert handle_key(start, "s") == (start, "save")
    assert handle_key(start, "?")[1] == "help"
    assert handle_key(start, "q")[1] == "quit" and handle_key(start, KEY_ESC)[1] == "quit"
    assert handle_key(start, -1) == (start, "none") and handle_key(start, "x") == (start, "none")
    assert start == ViewerState(count=2)  # pure: the input state never changes


# ------------------------------------------------------------------------------------------------------ drawing
def _red(view: np.ndarray) -> np.ndarray:
    return (view[..., 2] == 255) & (view[..., 1] == 0) & (view[..., 0] == 0)


def test_render_draws_the_overlays_that_are_on():
    item = _item()
    state = ViewerState(count=1, threshold=0.5)
    view = render(state, item)
    assert view.dtype == np.uint8 and view.shape == (300 + viewer.STATUS_BAR_PX, viewer.MIN_VIEW_WIDTH_PX, 3)
    body = view[viewer.STATUS_BAR_PX:, :200]
    red = _red(body)
    assert red.sum() > 50  # the lesion contour
    ys, xs = np.nonzero(red)
    assert 110 <= ys.min() and ys.max() <= 165 and 35 <= xs.min() and xs.max() <= 85  # around the lesion block
    no_lesion = render(replace(state, show_lesion=False), item)[viewer.STATUS_BAR_PX:, :200]
    assert not _red(no_lesion).any()
    above = render(replace(state, threshold=0.75), item)[viewer.STATUS_BAR_PX:, :200]
    assert not _red(above).any()  # the lesion (0.7) is below a 0.75 threshold
    plain = render(replace(state, show_tissue=False, show_fgt=False, show_lesion=False), item)
    gray = np.repeat(item.image[..., None], 3, axis=2)
    assert np.array_equal(plain[viewer.STATUS_BAR_PX:, :200], gray)  # nothing drawn over the image
    tissue = render(replace(state, show_fgt=False, show_lesion=False), item)[viewer.STATUS_BAR_PX:, :200]
    assert not np.array_equal(tissue[100], gray[100]) and np.array_equal(tissue[5], gray[5])  # only tissue is tinted


def test_render_shrinks_large_images_and_shows_errors():
    big = _item(height=2944, width=1920)
    view = render(ViewerState(), big)
    assert view.shape[0] == viewer.MAX_VIEW_HW[0] + viewer.STATUS_BAR_PX and view.shape[1] == round(1920 * 900 / 2944)
    error = render(ViewerState(), ViewItem(name="bad.png", stem="bad", error="ImageReadError: file is empty"))
    assert error.dtype == np.uint8 and error.ndim == 3 and error.any()


def test_save_view_never_overwrites(tmp_path):
    view = render(ViewerState(), _item())
    first = viewer.save_view(view, tmp_path, "image0")
    second = viewer.save_view(view, tmp_path, "image0")
    assert (first.name, second.name) == ("image0_view.png", "image0_view_2.png")
    assert np.array_equal(imaging.read_image(first).pixels.shape, view.shape[:2])


def test_no_display_gives_a_clear_message_and_exit_2(monkeypatch, tmp_path, capsys):
    if not sys.platform.startswith("linux"):
        pytest.skip("the DISPLAY check applies to Linux")
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    problem = viewer.display_problem()
    assert problem is not None and "DISPLAY" in problem and "xvfb" in problem
    calls = []
    assert viewer.run_viewer(lambda i, a: calls.append(i) or _item(i), ViewerState(count=1), save_dir=tmp_path) == 2
    assert "--interactive" in capsys.readouterr().err and calls == []


# ------------------------------------------------------------------------------------------------ under Xvfb
@pytest.fixture
def xvfb_display(monkeypatch):
    """Start Xvfb on a free display number and point DISPLAY at it."""
    if shutil.which("Xvfb") is None:
        pytest.skip("Xvfb not installed (apt-get install xvfb)")
    read_fd, write_fd = os.pipe()
    process = subprocess.Popen(["Xvfb", "-displayfd", str(write_fd), "-screen", "0", "1280x1024x24",
                                "-nolisten", "tcp"],
                               pass_fds=(write_fd,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write_fd)
    try:
        with os.fdopen(read_fd) as stream:
            number = stream.readline().strip()
        if not number:
            pytest.skip("Xvfb did not start")
        _wait_until_accepting(process, number)
        monkeypatch.setenv("DISPLAY", f":{number}")
        monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
        yield f":{number}"
    finally:
        process.terminate()
        process.wait(timeout=10)


def _wait_until_accepting(process: subprocess.Popen, number: str, timeout: float = 15.0) -> None:
    """Block until Xvfb's Unix socket for display ``number`` accepts a connection.

    The display number arrives on ``-displayfd`` as soon as Xvfb has chosen it; a CI run showed a Qt client started
    right after that failing with "could not connect to display" once. Connecting to the socket (the path in
    /tmp/.X11-unix, then the Linux abstract name of the same path) is what an X client does first.
    """
    path = f"/tmp/.X11-unix/X{number}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"Xvfb :{number} exited with code {process.returncode} right after starting")
        for address in (path, "\0" + path):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(address)
                    return
                except OSError:
                    pass
        time.sleep(0.05)
    pytest.fail(f"Xvfb :{number} did not accept connections on {path} within {timeout:.0f} s")


def _run_child(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh Python with the project and this folder importable.

    Every window is opened in a child process: Qt binds a process to the first display it reaches and ends the
    process when that display goes away, so windows must not be opened inside the pytest process. A child that Qt
    aborts before drawing anything because it "could not connect to display" is started once more: that is the
    virtual display's start-up, not the viewer (the viewer's own no-display path is tested above).
    """
    prelude = f"import sys; sys.path[:0] = [{str(PROJECT_ROOT)!r}, {str(Path(__file__).parent)!r}]\n"
    command = [sys.executable, "-c", prelude + code, *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0 and "could not connect to display" in done.stderr:
        time.sleep(1.0)
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    return done


def test_viewer_window_with_a_key_source_saves_the_expected_views(xvfb_display, tmp_path):
    code = (
        "import json, test_viewer\nfrom mammo.inference import viewer\n"
        "computed = []\n"
        "def compute(index, adaptive):\n"
        "    computed.append([index, adaptive])\n"
        "    return test_viewer._item(index)\n"
        "keys = ['t', 'l', '+', 's', 'n', 'c', 's', 'n', 'q', 's']  # the last 's' comes after quitting\n"
        "rc = viewer.run_viewer(compute, viewer.ViewerState(count=2), save_dir=sys.argv[1], key_source=keys)\n"
        "print('COMPUTED', json.dumps(computed))\n"
        "sys.exit(rc)\n"
    )
    done = _run_child(code, str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "Viewer keys:" in done.stdout and done.stdout.count("saved view:") == 2
    computed = [line for line in done.stdout.splitlines() if line.startswith("COMPUTED")][0]
    assert computed == "COMPUTED [[0, false], [1, false], [1, true]]"  # cached: each (image, CLAHE) computed once
    expected_state = ViewerState(count=2, show_tissue=False, show_lesion=False, threshold=0.55,
                                 message="threshold 0.55")
    saved = cv2.imread(str(tmp_path / "image0_view.png"), cv2.IMREAD_COLOR)
    assert np.array_equal(saved, render(expected_state, _item(0)))  # the saved view is the drawn state
    second = cv2.imread(str(tmp_path / "image1_view.png"), cv2.IMREAD_COLOR)
    expected2 = render(replace(expected_state, index=1, adaptive_clahe=True, message="adaptive CLAHE on"), _item(1))
    assert np.array_equal(second, expected2)


def test_real_key_presses_with_xdotool(xvfb_display, tmp_path):
    if shutil.which("xdotool") is None:
        pytest.skip("xdotool not installed (apt-get install xdotool)")
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[2]);"
        "import test_viewer; from mammo.inference import viewer;"
        "sys.exit(viewer.run_viewer(lambda i, a: test_viewer._item(i), viewer.ViewerState(count=2),"
        " save_dir=sys.argv[3], window_name='xdotool viewer test'))"
    )
    process = subprocess.Popen([sys.executable, "-c", script, str(PROJECT_ROOT), str(Path(__file__).parent),
                                str(tmp_path)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        found = subprocess.run(["xdotool", "search", "--sync", "--name", "xdotool viewer test"], capture_output=True,
                               text=True, timeout=60)
        window = found.stdout.split()[0]
        subprocess.run(["xdotool", "windowfocus", "--sync", window], check=True, timeout=30)
        for key in ("s", "n", "s", "q"):
            subprocess.run(["xdotool", "key", key], check=True, timeout=30)
            time.sleep(0.4)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image0_view.png", "image1_view.png"]
    assert stdout.count("saved view:") == 2


def test_interactive_inference_under_xvfb(xvfb_display, tmp_path, tissue_dir):
    """cascade_inference --interactive end to end: real checkpoints, a real window, keys from a list."""
    import torch

    from mammo.nn.models import build_model, default_model_config

    folder = tmp_path / "checkpoints"
    for stage, classes, size in ((1, 4, (128, 64)), (2, 1, (64, 64))):
        torch.manual_seed(stage)
        config = default_model_config(classes, encoder_name="resnet18", encoder_weights=None)
        checkpoints.save_checkpoint(checkpoints.make_checkpoint(stage=stage, model=build_model(config),
                                                        model_config=config,
                                                        preprocess_config=dict(imaging.DEFAULT_PREPROCESS),
                                                        input_size=size), folder / f"best_stage{stage}.pth")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name in sorted(p.name for p in (tissue_dir / "fgt_seg").glob("*.png"))[:2]:
        shutil.copy(tissue_dir / "fgt_seg" / name, inputs / name)
    out = tmp_path / "out"
    code = (
        "import cascade_inference as ci\nfrom mammo.inference import viewer\n"
        "original = viewer.run_viewer\n"
        "viewer.run_viewer = lambda *a, **k: original(*a, **{**k, 'key_source': ['c', 's', 'n', 'l', 's', 'q']})\n"
        "sys.exit(ci.main(ci.get_args_parser().parse_args(sys.argv[1:])))\n"
    )
    done = _run_child(code, "--checkpoint-dir", str(folder), "--image-dir", str(inputs), "--output-dir", str(out),
                      "--device", "cpu", "--interactive")
    assert done.returncode == 0, done.stderr
    saved = sorted(p.name for p in out.iterdir())
    assert len(saved) == 2 and all(name.endswith("_view.png") for name in saved)
    assert "Viewer keys:" in done.stdout
    first = cv2.imread(str(out / saved[0]), cv2.IMREAD_COLOR)
    assert first.shape[0] == 900 + viewer.STATUS_BAR_PX  # a 960x480 mammogram shrunk to the 900-row view
