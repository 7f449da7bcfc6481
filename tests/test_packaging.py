"""The house: import layers (import-linter), the linter (ruff), the package's metadata and entry points, the root.

Each test runs the project's own tools on the checkout, so a new upward import, a lint error, a dependency added to
one list but not the other, or a Python file left at the root fails CI with a message that names it.
"""

from __future__ import annotations

import ast
import importlib
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
BIN = Path(sys.executable).parent

#: The root files that hold Python (issue 18: the command-line scripts and the design card's three modules).
ROOT_SCRIPTS = {"prepare_to_train": "mammo.cli.prepare", "cascade_segmentation_model": "mammo.cli.train",
                "cascade_inference": "mammo.cli.infer", "evaluate": "mammo.cli.evaluate",
                "benchmark": "mammo.cli.benchmark", "onnx_backend": "mammo.cli.onnx_backend"}
ROOT_MODULES = {"models", "losses", "datasets"}

#: Size limits of the package's code (issue 18): lines per module, lines per function (argument parsers excepted).
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 600, 80


def _tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        found = shutil.which(name)
        if found is None:
            pytest.fail(f"{name} is not installed beside {sys.executable}; run bash scripts/setup_env.sh")
        return found
    return str(path)


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([_tool("lint-imports"), "--no-cache"], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={"PYTHONPATH": str(cwd), "PATH": str(BIN), "HOME": str(cwd)})


def test_import_layers_are_kept():
    done = _lint_imports(ROOT)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_an_upward_import_breaks_the_layers_with_both_module_names(tmp_path):
    """The contract is not vacuous: a copy of the package where the leaf helpers import the command line fails, and
    the report names both modules."""
    shutil.copytree(ROOT / "mammo", tmp_path / "mammo", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    leaf = tmp_path / "mammo" / "core" / "labels.py"
    leaf.write_text(leaf.read_text(encoding="utf-8") + "\nfrom mammo.cli import common  # upward\n", encoding="utf-8")
    done = _lint_imports(tmp_path)
    assert done.returncode != 0
    assert "mammo.core.labels" in done.stdout and "mammo.cli.common" in done.stdout


def test_the_package_never_imports_a_root_file(tmp_path):
    shutil.copytree(ROOT / "mammo", tmp_path / "mammo", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "datasets.py").write_text("X = 1\n", encoding="utf-8")
    leaf = tmp_path / "mammo" / "data" / "tables.py"
    leaf.write_text(leaf.read_text(encoding="utf-8") + "\nimport datasets  # a root face\n", encoding="utf-8")
    done = _lint_imports(tmp_path)
    assert done.returncode != 0 and "mammo.data.tables" in done.stdout and "datasets" in done.stdout


def test_ruff_finds_nothing():
    done = subprocess.run([_tool("ruff"), "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def _requirement_names(lines) -> dict[str, str]:
    pairs = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            name = re.split(r"[<>=!~\[ ;]", line, maxsplit=1)[0].lower()
            pairs[name] = line
    return pairs


def test_pyproject_dependencies_are_requirements_txt():
    """requirements.txt (what CI installs) = the package's dependencies + its test extra, pin for pin."""
    required = _requirement_names((ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines())
    project = PYPROJECT["project"]
    declared = _requirement_names(project["dependencies"] + project["optional-dependencies"]["test"])
    assert declared == required


@pytest.mark.parametrize("name,target", sorted(PYPROJECT["project"]["scripts"].items()))
def test_entry_points_call_the_root_scripts_main(name, target):
    module_name, _, function = target.partition(":")
    module = importlib.import_module(module_name)
    face = next(root for root, package in ROOT_SCRIPTS.items() if package == module_name)
    assert importlib.import_module(face).main is getattr(module, function)
    script = BIN / name
    if not script.exists():
        pytest.skip(f"{name} is not installed (pip install -e . adds it; scripts/setup_env.sh does)")
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(f"usage: {name}")


def test_only_the_scripts_and_the_design_cards_modules_hold_python_at_the_root():
    found = {path.stem for path in ROOT.glob("*.py")}
    assert found == set(ROOT_SCRIPTS) | ROOT_MODULES


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_modules_and_functions_stay_small():
    too_long = []
    for path in sorted((ROOT / "mammo").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        where = path.relative_to(ROOT).as_posix()
        if text.count("\n") > MAX_MODULE_LINES:
            too_long.append(f"{where}: {text.count(chr(10))} lines")
        for node in _functions(ast.parse(text)):
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_FUNCTION_LINES and node.name != "get_args_parser":
                too_long.append(f"{where}:{node.lineno} {node.name}: {lines} lines")
    assert not too_long, "split these:\n" + "\n".join(too_long)


def test_no_function_below_the_scripts_takes_the_argparse_namespace():
    """Below mammo/cli/ functions take values (issue 18): no parameter annotated argparse.Namespace, no import of
    argparse outside the command lines."""
    found = []
    for path in sorted((ROOT / "mammo").rglob("*.py")):
        if path.parent.name == "cli":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import) and any(alias.name == "argparse" for alias in node.names):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} imports argparse")
    assert not found, "\n".join(found)
