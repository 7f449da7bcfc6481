"""File helpers shared by every module: atomic writing (checkpoints, PNGs, CSVs, JSON, archives), file hashes,
JSON-safe values.

A file is written to a temporary name in its destination folder, flushed to disk, given the permissions a normal
``open(path, "w")`` would give (``0o666`` minus the umask; ``mkstemp`` alone makes owner-only files), and moved
into place with ``os.replace``. A crash or an error mid-write therefore never leaves a truncated file under the
final name, and the previous file (if any) stays intact. Temporary names start with ``.tmp_`` (hidden, and easy to
sweep after a crash: see :data:`TEMPORARY_PREFIX`).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Iterator

#: Every temporary file written here starts with this; a file so named is never a finished output.
TEMPORARY_PREFIX = ".tmp_"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, overwrite: bool = True) -> Iterator[BinaryIO]:
    """Open a binary stream whose content replaces ``path`` atomically when the ``with`` block ends without error.

    Args:
        path: destination file; its parent folders are created.
        overwrite: when False and ``path`` exists, raise ``FileExistsError`` before writing anything.

    Raises:
        FileExistsError: ``overwrite`` is False and the file exists (the message says how to allow it).
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} exists; not overwritten (remove it or ask for overwriting)")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f"{TEMPORARY_PREFIX}{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, overwrite: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_writer`); returns the path."""
    with atomic_writer(path, overwrite) as stream:
        stream.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, overwrite: bool = True) -> Path:
    """Write ``text`` as UTF-8 to ``path`` atomically (see :func:`atomic_writer`); returns the path."""
    return atomic_write_bytes(path, text.encode("utf-8"), overwrite)


#: Seconds after its last change from which a file's digest is remembered (see :func:`file_sha256`). Ours: far
#: above any file-system time-stamp granularity.
SHA256_SETTLED_S = 2.0

#: Digests already computed in this process, by file identity (see :func:`file_sha256`).
_SHA256_BY_IDENTITY: dict[tuple, str] = {}


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Full hex SHA-256 of a file's bytes, read in chunks of ``chunk_bytes`` (checkpoint identities, cache keys).

    Remembered per process by the file's identity (device, inode, size, modification time): loading a stage hashes
    its checkpoint for the ONNX export cache and again for the run's report, and a 118 MB checkpoint need be read
    once. A file replaced (the suite's writers replace atomically: a new inode) or rewritten is hashed anew; a file
    changed less than :data:`SHA256_SETTLED_S` ago is always hashed, since file-system time stamps are coarse (a few
    ms on Linux) and two same-size writes within one tick would otherwise look alike. (As for ``make``, a same-size
    rewrite whose old time stamp is put back on purpose is not noticed.)
    """
    stat = os.stat(path)
    identity = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if identity in _SHA256_BY_IDENTITY:
        return _SHA256_BY_IDENTITY[identity]
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(chunk_bytes), b""):
            digest.update(block)
    if time.time() - stat.st_mtime > SHA256_SETTLED_S:
        _SHA256_BY_IDENTITY[identity] = digest.hexdigest()
    return digest.hexdigest()


def json_safe(value):
    """``value`` with plain JSON types only: NaN / inf -> None, NumPy scalars -> Python, tuples -> lists, keys -> str.

    Strict JSON has no NaN or infinity; writing them as ``null`` keeps every report readable by any JSON parser.
    """
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # NumPy scalar or 0-d array
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
