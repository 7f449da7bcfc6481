"""Command-line pieces every script shares: the runtime flags (one parent parser), argument types, usage errors.

Each script builds its parser as ``cli.ArgumentParser(..., parents=[cli.runtime_parser("device", "amp")])``,
naming the runtime flags it takes; each flag is defined once, here, with one meaning everywhere. A script whose
default differs says so with ``parser.set_defaults`` (``evaluate.py`` runs on the CPU unless told otherwise).

Flags by name (:data:`RUNTIME_FLAGS`):

=================  ===================================================================================
name               flags
=================  ===================================================================================
``device``         ``--device`` auto | cpu | cuda | cuda:N (default auto)
``backend``        ``--backend`` auto | torch | onnxruntime (default auto: ``runners.resolve_backend``)
``amp``            ``--amp`` automatic mixed precision
``threads``        ``--threads`` CPU threads (default: all cores this process may use)
``tta``            ``--tta`` horizontal-flip test-time augmentation
``seed``           ``--seed`` (default 42)
``deterministic``  ``--deterministic`` deterministic algorithms only
``workers``        ``--num-workers`` (default 4) and ``--worker-start-method``
=================  ===================================================================================

Every script's ``main`` is wrapped by :func:`interruptible`: Ctrl-C ends it with one line on stderr and exit status
130, not a traceback.
"""

from __future__ import annotations

import argparse
import functools
import re
import sys

from mammo.weights import release
from mammo.weights.runners import BACKENDS

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def device_name(text: str) -> str:
    """argparse type of ``--device``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    Raises:
        argparse.ArgumentTypeError: anything else (:class:`ArgumentParser` turns it into a one-line usage error).
    """
    if not _DEVICE.match(text):
        raise argparse.ArgumentTypeError(f"device must be auto, cpu, cuda or cuda:N, not {text!r}")
    return text


def probability(text: str) -> float:
    """argparse type of the lesion probability threshold: in (0, 1), the one range of every script
    (``release.valid_lesion_threshold``)."""
    value = float(text)
    if not release.valid_lesion_threshold(value):
        raise argparse.ArgumentTypeError(f"threshold must be in (0, 1), got {text}")
    return value


def positive_int(text: str) -> int:
    """argparse type of an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _add_device(group) -> None:
    group.add_argument("--device", type=device_name, default="auto",
                       help="where the networks run: auto = CUDA if available else CPU, cpu, cuda or cuda:N; under "
                            "torchrun each training process uses cuda:<LOCAL_RANK> (default: %(default)s)")


def _add_backend(group) -> None:
    group.add_argument("--backend", type=str, default="auto", choices=BACKENDS,
                       help="network runtime: auto = ONNX Runtime on the CPU when installed (a .pth is exported once, "
                            "the .onnx kept beside it or in ~/.cache/mammo_cascade/onnx), torch with float16 "
                            "autocast on CUDA; torch or onnxruntime (CPU only) force one (default: %(default)s)")


def _add_amp(group) -> None:
    group.add_argument("--amp", action="store_true",
                       help="automatic mixed precision on the torch backend: float16 on CUDA (with gradient scaling "
                            "when training), bfloat16 on the CPU; --backend auto on CUDA turns it on")


def _add_threads(group) -> None:
    group.add_argument("--threads", type=int, default=None,
                       help="CPU threads (default: all cores this process may use)")


def _add_tta(group) -> None:
    group.add_argument("--tta", action="store_true",
                       help="test-time augmentation: average each network with its horizontally mirrored run")


def _add_seed(group) -> None:
    group.add_argument("--seed", type=int, default=42,
                       help="random seed (data split, initialisation, order, augmentation, synthetic data); each "
                            "training process adds its rank (default: %(default)s)")


def _add_deterministic(group) -> None:
    group.add_argument("--deterministic", action="store_true",
                       help="deterministic algorithms only (bit-exact repeat runs on the CPU; on CUDA the few "
                            "non-deterministic kernels, e.g. bilinear upsampling's backward, warn instead)")


def _add_workers(group) -> None:
    group.add_argument("--num-workers", type=int, default=4,
                       help="DataLoader worker processes per training process (default: %(default)s)")
    group.add_argument("--worker-start-method", default="default", choices=("default", "spawn", "fork", "forkserver"),
                       help="how DataLoader workers are started; default = the platform's (spawn on Windows and "
                            "macOS, fork on Linux) (default: %(default)s)")


#: Runtime flag names -> the function that adds them to an argument group.
RUNTIME_FLAGS = {"device": _add_device, "backend": _add_backend, "amp": _add_amp, "threads": _add_threads,
                 "tta": _add_tta, "seed": _add_seed, "deterministic": _add_deterministic, "workers": _add_workers}


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose command-line mistakes (an unknown flag, a bad value, a missing required
    flag) are one line on stderr, ``error: <what> (see <script> --help)``, and exit code 2, as every other user
    mistake in the suite; argparse's own handler prints the whole usage block first."""

    def error(self, message: str):
        """Print the one-line error and exit with status 2 (``argparse``'s code for a usage error)."""
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def runtime_parser(*names: str) -> argparse.ArgumentParser:
    """A parent parser (``add_help=False``) holding the named runtime flags in a group "runtime".

    Args:
        names: keys of :data:`RUNTIME_FLAGS`, in the order the flags should appear in ``--help``.

    Raises:
        ValueError: an unknown name.
    """
    unknown = [name for name in names if name not in RUNTIME_FLAGS]
    if unknown:
        raise ValueError(f"unknown runtime flag(s) {unknown}; known: {sorted(RUNTIME_FLAGS)}")
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("runtime")
    for name in names:
        RUNTIME_FLAGS[name](group)
    return parser


def usage_error(message: str) -> int:
    """Print ``error: <message>`` on stderr and return exit code 2 (a user's mistake, as argparse uses)."""
    print(f"error: {message}", file=sys.stderr)
    return 2


#: Exit status of a run stopped by Ctrl-C: 128 + SIGINT (2), what a shell reports for a process ended by that signal.
EXIT_INTERRUPTED = 130


def interruptible(script: str, kept: str = "finished outputs are kept, run it again to continue"):
    """Decorator of a script's ``main(args=None)``: Ctrl-C (``KeyboardInterrupt``) ends the run with one line on
    stderr, ``interrupted: <script> stopped; <kept>``, and returns :data:`EXIT_INTERRUPTED` (130) instead of a
    traceback. The wrapped function keeps ``main``'s name, docstring and ``main(args=None)`` call (the entry points
    of pyproject.toml call it without arguments).

    Args:
        script: the script's name as users run it (``prepare_to_train.py``).
        kept: what stays of the interrupted run and how to go on (e.g. "... run it again with --resume").
    """
    def decorate(main):
        @functools.wraps(main)
        def wrapper(args: argparse.Namespace | None = None) -> int:
            try:
                return main(args)
            except KeyboardInterrupt:
                lead = "\n" if sys.stderr.isatty() else ""  # after the terminal's "^C" or a progress bar
                print(f"{lead}interrupted: {script} stopped; {kept}", file=sys.stderr)
                return EXIT_INTERRUPTED
        return wrapper
    return decorate
