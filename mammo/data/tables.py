"""Reading tables (CSV and XLSX): the one place where every cell read from a table is normalised.

Every reader of a table in the suite goes through :func:`read_table` (the workspace tables read by training and
evaluation via ``datasets.read_tissue_table`` / ``datasets.read_lesion_table``, the stage-2 crop table, the CBIS-DDSM
description CSVs, the Mini-DDSM spreadsheets, the earlier tables ``workspace.table_conflict`` compares with), and
every cell it returns has passed through :func:`normalise_cell`, so that what a person typed, an editor saved or
another operating system wrote cannot change what the suite does:

============  =================================================================================================
kind          what a cell becomes
============  =================================================================================================
``text``      surrounding whitespace (spaces, tabs, newlines, non-breaking spaces) removed; NaN / None -> ""
``label``     ``text``, lower case (``" Mass "`` -> ``mass``)
``upper``     ``text``, upper case (``" dm"`` -> ``DM``)
``split``     ``label``; must then be one of :data:`SPLITS` or empty (:func:`read_table` names the file, the row,
              the value and the allowed values otherwise: never a silent new split)
``path``      newlines / tabs removed anywhere, whitespace stripped, ``\\`` -> ``/``, leading ``./`` removed;
              the empty markers :data:`EMPTY_PATH_MARKERS` (Mini-DDSM writes ``-`` for "no contour") -> ""
``paths``     several ``path`` values joined by ``;`` (merged lesion masks), each cleaned, empty ones dropped
``laterality`` ``L`` / ``R`` for left / right in any case or spelling (``left``, ``R``), else ``upper``
``view``      ``upper`` (``cc`` -> ``CC``)
============  =================================================================================================

Column names are normalised too (:func:`normalise_header`: ``" ROI mask file path"`` -> ``roi_mask_file_path``).
The kind of each column of the suite's own tables is :data:`COLUMN_KINDS`; other columns are ``text``.

Paths named in a table are resolved by :func:`resolve_path` (relative to the table's folder; an extension that
differs from the file on disk only in case, ``A.PNG`` for ``A.png``, finds the file: :func:`existing_path`), and
:func:`check_table_files` refuses, in one line, a table naming files that do not exist or are not images.
"""

from __future__ import annotations

import difflib
import os
import re
import zipfile
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from mammo import imaging

#: The values a ``split`` cell may hold (after normalising), besides an empty cell (= not assigned).
SPLITS = ("train", "val", "test")

#: Path cells that mean "no file" (Mini-DDSM writes ``-`` for "no contour"; spreadsheets export NaN as text).
EMPTY_PATH_MARKERS = frozenset({"-", "nan", "NaN", "None"})

#: The cell kinds of :func:`normalise_cell`.
CELL_KINDS = ("text", "label", "upper", "split", "path", "paths", "laterality", "view")

#: Kinds of the columns of the suite's tables (workspace tables, the stage-2 crop table); other columns: ``text``.
COLUMN_KINDS = {
    "image_file_path": "path", "label_file_path": "path", "roi_mask_file_path": "paths",
    "original_image_file_path": "path", "original_roi_mask_file_path": "paths",
    "split": "split", "source": "label", "laterality": "laterality", "view": "view", "pathology": "upper",
    "abnormality": "label", "acquisition": "upper", "augmentation": "label",
}

#: Separator of several paths in one ``paths`` cell.
PATH_SEPARATOR = ";"

#: Suffixes of image formats that always start with a magic number (so a file without it is not such an image).
_MAGIC_SUFFIXES = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".tif": "tiff", ".tiff": "tiff", ".bmp": "bmp",
                   ".pgm": "pgm"}
_LATERALITY = {"L": "L", "LEFT": "L", "R": "R", "RIGHT": "R"}
_SPREADSHEET_SUFFIXES = (".xlsx", ".xlsm", ".xls")


class TableError(ValueError):
    """A table cannot be used: one line naming the file, what is wrong (the row and value where it is one cell)
    and the fix."""


# ----------------------------------------------------------------------------------------------------------------
# Cells and column names
# ----------------------------------------------------------------------------------------------------------------
def normalise_cell(value: object, kind: str = "text") -> str:
    """Normalise one cell read from a CSV or XLSX table (see the module docstring for each ``kind``).

    Args:
        value: the cell as read (str, or NaN / None / a number from a spreadsheet).
        kind: one of :data:`CELL_KINDS`.

    Returns:
        The normalised text ("" for an empty cell).

    Raises:
        ValueError: ``kind == "split"`` and the value is not one of :data:`SPLITS` or empty (the message gives the
            value and the allowed values; :func:`read_table` adds the file and the row), or an unknown ``kind``.
    """
    if kind not in CELL_KINDS:
        raise ValueError(f"unknown cell kind {kind!r}; known: {CELL_KINDS}")
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    text = str(value)
    if kind == "paths":
        parts = (normalise_cell(part, "path") for part in text.split(PATH_SEPARATOR))
        return PATH_SEPARATOR.join(part for part in parts if part)
    if kind == "path":
        text = re.sub(r"[\r\n\t]+", "", text).strip().replace("\\", "/")
        if text in EMPTY_PATH_MARKERS:
            return ""
        while text.startswith("./"):
            text = text[2:]
        return text
    text = text.strip()
    if kind in ("label", "split"):
        text = text.lower()
    elif kind in ("upper", "view"):
        text = text.upper()
    elif kind == "laterality":
        text = _LATERALITY.get(text.upper(), text.upper())
    if kind == "split" and text not in SPLITS + ("",):
        raise ValueError(f"split {str(value)!r} is not one of {', '.join(SPLITS)} or an empty cell"
                         + _split_suggestion(text))
    return text


def _split_suggestion(text: str) -> str:
    """`` (did you mean 'val'?)`` for a near miss (``validation``, ``tarin``), else ""."""
    for split in SPLITS:
        if text.startswith(split) or (len(text) >= 3 and split.startswith(text)):
            return f" (did you mean {split!r}?)"
    close = difflib.get_close_matches(text, SPLITS, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def normalise_header(name: object) -> str:
    """A column name as the suite uses it: stripped, lower case, runs of spaces / underscores -> ``_``
    (``"ROI mask file path "`` -> ``roi_mask_file_path``; ``"breast_density"`` stays)."""
    return re.sub(r"[\s_]+", "_", str(name).strip().lower())


def normalise_split_name(value: object, what: str = "--split") -> str:
    """A split asked for on the command line (``" Val"`` -> ``val``).

    Raises:
        ValueError: not one of :data:`SPLITS` (the message names ``what``, the value and the allowed values).
    """
    try:
        return normalise_cell(value, "split")
    except ValueError as error:
        raise ValueError(f"{what}: {error}") from None


# ----------------------------------------------------------------------------------------------------------------
# Reading a table
# ----------------------------------------------------------------------------------------------------------------
def read_table(path: str | os.PathLike, required: Iterable[str] = (), *, kinds: dict[str, str] | None = None,
               what: str = "table", fix: str = "", allow_empty: bool = False) -> pd.DataFrame:
    """Read a CSV (or XLSX / XLS: first sheet) table with every header and cell normalised.

    Args:
        path: the table file. CSVs are read as UTF-8 (a byte-order mark is dropped), every cell as text.
        required: column names (as :func:`normalise_header` gives them) the table must have.
        kinds: column name -> cell kind (:func:`normalise_cell`); default :data:`COLUMN_KINDS`. Columns not listed
            are ``text``.
        what: what the messages call the table (``"tissue table"``).
        fix: the advice appended to the messages about the file as a whole (missing, wrong kind, columns).
        allow_empty: accept a table with a header and no rows.

    Returns:
        DataFrame of str (no NaN), columns renamed by :func:`normalise_header`, in the file's order.

    Raises:
        FileNotFoundError: no such file.
        TableError: a folder, an empty or binary file, an unreadable file, a CSV that cannot be parsed, duplicate
            or missing columns, no rows (unless ``allow_empty``), or a ``split`` cell that is not one of
            :data:`SPLITS` or empty (the file, the row, the value and the allowed values are named).
    """
    path = Path(path)
    advice = f"; {fix}" if fix else ""
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} not found{advice}")
    if path.is_dir():
        raise TableError(f"{what} {path} is a folder, not a table file{advice}")
    kinds = COLUMN_KINDS if kinds is None else kinds
    frame = _read_frame(path, what, advice)
    columns = [normalise_header(c) for c in frame.columns]
    doubled = sorted({c for c in columns if columns.count(c) > 1})
    if doubled:
        raise TableError(f"{what} {path} has the column(s) {doubled} more than once (names are compared without case "
                         "and spaces); rename or remove the extra ones")
    frame.columns = columns
    missing = [c for c in required if c not in columns]
    if missing:
        raise TableError(f"{what} {path} lacks column(s) {missing}; found {columns}. Expected at least "
                         f"{list(required)}{advice}")
    if len(frame) == 0 and not allow_empty:
        raise TableError(f"{what} {path} has a header but no rows{advice}")
    for column in columns:
        kind = kinds.get(column, "text")
        values = []
        for row, value in enumerate(frame[column].tolist()):
            try:
                values.append(normalise_cell(value, kind))
            except ValueError as error:
                raise TableError(f"{what} {path}, row {row + 2} (the header is row 1), column {column!r}: {error}; "
                                 "fix the cell (case and surrounding spaces do not matter; leave it empty to let "
                                 "training split by patient)") from None
        frame[column] = values
    return frame.reset_index(drop=True)


def _read_frame(path: Path, what: str, advice: str) -> pd.DataFrame:
    """The raw table (all cells as text) or a :class:`TableError` naming the file and why it cannot be read."""
    try:
        if path.suffix.lower() in _SPREADSHEET_SUFFIXES:
            return pd.read_excel(path, sheet_name=0, dtype=str)
        return pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise TableError(f"{what} {path} is empty (no header, no rows){advice}") from None
    except UnicodeDecodeError:
        raise TableError(f"{what} {path} is not a text CSV file (it holds binary data{_looks_like(path)}){advice}"
                         ) from None
    except pd.errors.ParserError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TableError(f"{what} {path} cannot be parsed as CSV ({first}); check its delimiters and quotes"
                         f"{advice}") from None
    except PermissionError:
        raise TableError(f"{what} {path} cannot be read: permission denied; check its permissions") from None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:  # spreadsheets: not an Excel file, bad zip
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TableError(f"{what} {path} cannot be read ({type(error).__name__}: {first}){advice}") from None


def _looks_like(path: Path) -> str:
    """What a binary file seems to be, for messages: ": a PNG image?", ": a zip archive, ...?", or ""."""
    try:
        with open(path, "rb") as stream:
            head = stream.read(132)
    except OSError:
        return ""
    found = imaging.image_format(head)
    if found:
        return f": a {found.upper()} image?"
    if head.startswith(b"PK"):
        return ": a zip archive, spreadsheet or PyTorch checkpoint?"
    return ""


# ----------------------------------------------------------------------------------------------------------------
# Paths named in tables
# ----------------------------------------------------------------------------------------------------------------
def existing_path(path: str | os.PathLike) -> Path:
    """``path``, or the one file beside it whose name differs only in the case of the extension.

    ``images/A.PNG`` in a table finds ``images/A.png`` on a case-sensitive file system (tables written on Windows
    or macOS, by hand or by a spreadsheet). When no such file exists, or several do (``A.png`` and ``A.Png``: the
    table is ambiguous), ``path`` is returned unchanged, so the caller reports it as missing.
    """
    path = Path(path)
    if path.exists() or not path.suffix:
        return path
    try:
        names = os.listdir(path.parent)
    except OSError:
        return path
    stem, suffix = path.stem, path.suffix.lower()
    hits = [name for name in names if name != path.name and Path(name).stem == stem
            and Path(name).suffix.lower() == suffix]
    return path.parent / hits[0] if len(hits) == 1 else path


def resolve_path(root: str | os.PathLike, value: object) -> str:
    """The file a table's path cell names: the cell normalised (``path`` kind), made absolute against ``root``
    (the table's folder) when relative, and matched with :func:`existing_path`; "" for an empty cell."""
    text = normalise_cell(value, "path")
    if not text:
        return ""
    path = Path(text)
    if not path.is_absolute():
        path = Path(os.path.normpath(Path(root) / path))
    return str(existing_path(path))


def resolve_paths(root: str | os.PathLike, value: object) -> str:
    """:func:`resolve_path` of each path of a ``paths`` cell (joined by :data:`PATH_SEPARATOR`)."""
    return PATH_SEPARATOR.join(resolve_path(root, part) for part in normalise_cell(value, "paths").split(PATH_SEPARATOR)
                               if part)


def check_table_files(table: pd.DataFrame, columns: Iterable[str], source: str | os.PathLike) -> None:
    """Refuse a table that names files that do not exist, or image files that are not images, before any work.

    Cells may hold several paths joined by :data:`PATH_SEPARATOR`; empty cells mean "none". A file counts as "not
    an image" when it is empty, or when its suffix is one of a format that always starts with a magic number
    (PNG, JPEG, TIFF, BMP, PGM) and it does not start with any image format's magic number (a text file renamed
    ``.png``). DICOM files are not checked here (some lack the preamble); the readers report them.

    Raises:
        TableError: one line naming ``source``, how many files are wrong, the first five, and the fix.
    """
    missing, not_images = [], []
    for column in columns:
        for cell in table[column].fillna("").astype(str):
            for path in (p.strip() for p in cell.split(PATH_SEPARATOR) if p.strip()):
                file = Path(path)
                if not file.is_file():
                    missing.append(path)
                    continue
                try:
                    with open(file, "rb") as stream:
                        head = stream.read(132)
                except OSError as error:
                    not_images.append(f"{path} ({error.strerror or type(error).__name__})")
                    continue
                if not head:
                    not_images.append(f"{path} (empty file)")
                elif file.suffix.lower() in _MAGIC_SUFFIXES and imaging.image_format(head) is None:
                    not_images.append(f"{path} (no {_MAGIC_SUFFIXES[file.suffix.lower()].upper()} header)")
    if missing:
        raise TableError(f"{source} names {len(missing)} file(s) that do not exist: {_listed(missing)}; fix the paths "
                         "(relative paths are resolved against the table's folder) or re-run prepare_to_train.py")
    if not_images:
        raise TableError(f"{source} names {len(not_images)} file(s) that are not readable images: "
                         f"{_listed(not_images)}; replace them or remove their rows")


def _listed(items: list[str], shown: int = 5) -> str:
    return ", ".join(items[:shown]) + (f" and {len(items) - shown} more" if len(items) > shown else "")
