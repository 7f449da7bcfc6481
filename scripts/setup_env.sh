#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv, install requirements.txt, then the package itself
# (editable, pyproject.toml: its mammo-* entry points).
#
# Idempotent: a stamp file holds the hash of requirements.txt and pyproject.toml, so a second call with both unchanged
# returns in a second. Set MAMMO_VENV to use another folder, PYTHON to use another interpreter (default python3.11,
# then python3).
#
# Why opencv-python is reinstalled: albumentations pulls opencv-python-headless and the viewer needs opencv-python (with a GUI);
# both wheels install the same cv2/ package, and whichever pip writes last wins. Reinstalling opencv-python (same
# pinned version, no dependencies) after the requirements makes the result deterministic: cv2 is the GUI build.
set -euo pipefail
usage() {
    echo "usage: bash scripts/setup_env.sh   (no arguments; environment: MAMMO_VENV [.venv], PYTHON [python3.11, python3])"
}
case "${1:-}" in
    '') ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: setup_env.sh takes no arguments, got '$1'" >&2; usage >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
venv="${MAMMO_VENV:-.venv}"
python_bin="${PYTHON:-$(command -v python3.11 || command -v python3)}"
stamp="$venv/.requirements.sha256"
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
echo "[setup] creating $venv with $python_bin and installing requirements.txt (first run: several minutes)" >&2
"$python_bin" -m venv "$venv"
# Some machines' global pip configuration names local index folders that do not hold every package; pip then
# prints one "WARNING: Location ... is ignored" line per package. They are harmless, so they are filtered out here.
quiet_pip() {
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@" 2> >(grep -v "^WARNING: Location '" >&2)
}
quiet_pip -r requirements.txt
gui_cv=$(grep -E '^opencv-python==' requirements.txt)
quiet_pip --force-reinstall --no-deps "$gui_cv"
# The package itself, editable (its dependencies are the ones just installed): adds the mammo-* entry points.
quiet_pip --no-deps --no-build-isolation -e .
"$venv/bin/python" - <<'PY'
import cv2
gui = [line.strip() for line in cv2.getBuildInformation().splitlines() if line.strip().startswith("GUI:")]
print(f"[setup] OpenCV {cv2.__version__} ({gui[0] if gui else 'GUI: unknown'})")
PY
echo "$want" > "$stamp"
