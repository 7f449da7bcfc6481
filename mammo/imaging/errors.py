"""The one error every image reader of the package raises: :class:`ImageReadError`, naming the file and the reason."""

from __future__ import annotations

import os


class ImageReadError(Exception):
    """A mammogram (or mask) file could not be read.

    The message always names the file and the reason (missing, empty, corrupt, unsupported, ...), and where
    possible the fix. ``path`` and ``reason`` are also available as attributes.
    """

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path!r}: {reason}")

    def __reduce__(self):  # keep the exception picklable (DataLoader workers send it to the main process)
        return (type(self), (self.path, self.reason))
