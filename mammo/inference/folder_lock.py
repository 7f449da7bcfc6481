"""One run per output folder: the lock file a run of ``cascade_inference.py`` holds in its ``--output-dir``.

What lives here: :data:`LOCK_NAME`, :func:`lock_output_dir` (create the folder and take its lock atomically, taking
over the lock of a process of this host that no longer runs, with a note) and :class:`FolderLock` (release it and the
folders the run created, when still empty). The processes of one torchrun run are one run: the command line
(:mod:`mammo.cli.infer`) lets rank 0 take the lock and tells the other ranks.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import sys
from pathlib import Path

from mammo.cascade.checks import UserInputError

#: The lock file a run holds in its output folder (hidden: never listed as an input); JSON with the owner's ``pid``,
#: ``host``, ``started_utc`` and ``command``.
LOCK_NAME = ".cascade_inference.lock"


def _read_owner(path: Path) -> dict | None:
    """The owner written in a lock file, or None when it cannot be read (gone, empty, not JSON)."""
    try:
        owner = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (``os.kill(pid, 0)``; True where that cannot be asked)."""
    if os.name == "nt":  # signal 0 is not a probe on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it runs, as another user
        return True
    return True


def _stale(owner: dict | None) -> bool:
    """Whether a lock's owner is a process of this host that no longer runs (its lock may be taken over)."""
    return (owner is not None and isinstance(owner.get("pid"), int) and owner.get("host") == socket.gethostname()
            and not _process_alive(owner["pid"]))


def _in_use(folder: Path, path: Path, owner: dict | None) -> str:
    """The one-line refusal of a second run into ``folder``."""
    who = (f"process {owner.get('pid')} on {owner.get('host')}, started {owner.get('started_utc')}" if owner else
           f"its lock file {path} cannot be read")
    return (f"--output-dir {folder} is in use by another run ({who}); wait for it to finish or choose another "
            f"--output-dir (if no run is using the folder, delete {path})")


def _take_over(folder: Path, path: Path, owner: dict) -> None:
    """Move aside the stale lock ``path`` of ``owner`` (a new lock of a live run, moved by a race, is put back)."""
    aside = path.with_name(f"{path.name}.{os.getpid()}.stale")
    try:
        os.replace(path, aside)
    except FileNotFoundError:  # another run took it over first
        return
    if _read_owner(aside) == owner:
        print(f"note: took over the lock of --output-dir {folder}: it was left by process {owner['pid']} on "
              f"{owner['host']} (started {owner.get('started_utc')}), which no longer runs", file=sys.stderr)
    else:
        try:
            os.link(aside, path)
        except OSError:
            pass
    aside.unlink(missing_ok=True)


class FolderLock:
    """This run's lock of its output folder (:func:`lock_output_dir`); :meth:`release` removes it."""

    def __init__(self, path: Path, owner: dict, created: list[Path]):
        self.path, self.owner, self.created = path, owner, created

    def release(self) -> None:
        """Remove the lock file (when it is still this run's) and the folders this run created, if still empty."""
        if _read_owner(self.path) == self.owner:
            self.path.unlink(missing_ok=True)
        for folder in reversed(self.created):
            try:
                folder.rmdir()
            except OSError:  # not empty: the run wrote there
                break


def lock_output_dir(folder: Path) -> FolderLock:
    """Make ``folder`` and take its lock: ``LOCK_NAME`` created atomically (``O_CREAT | O_EXCL``) with this process's
    id, host and start time. A lock of a process of this host that no longer runs is taken over with a note.

    Raises:
        UserInputError: the folder cannot be made or written, or another run holds it (one line).
    """
    created = [place for place in (folder, *folder.parents) if not place.exists()][::-1]
    path = folder / LOCK_NAME
    owner = {"pid": os.getpid(), "host": socket.gethostname(),
             "started_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
             "command": " ".join(sys.argv)[:1000]}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read_owner(path)
                if not _stale(holder):
                    raise UserInputError(_in_use(folder, path, holder)) from None
                _take_over(folder, path, holder)
                continue
            with os.fdopen(handle, "w", encoding="utf-8") as stream:
                stream.write(json.dumps(owner) + "\n")
            return FolderLock(path, owner, created)
    except OSError as error:
        raise UserInputError(f"--output-dir {folder} cannot be written ({error.strerror or error}); choose a "
                                    "folder you can write to") from None
    raise UserInputError(_in_use(folder, path, _read_owner(path)))
