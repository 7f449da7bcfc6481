"""Downloaded zips and the tissue-set download: recognised by name, extracted or fetched once into the workspace.

Zips (``--zips-dir``) are recognised by name (:func:`classify_zip`): "morethantwomasks" -> Mini-DDSM part 2,
"mini" -> Mini-DDSM, "cbis" or "ddsm" -> CBIS-DDSM, "fgt" / "tissue" / "mammogram-segmentation" -> tissue set;
``--cbis-zip``, ``--mini1-zip``, ``--mini2-zip``, ``--tissue-zip`` override. :func:`extract_zip` extracts each
once into ``_extracted/`` (checked against the zip's size and mtime); members with absolute paths or ``..`` are
refused. :func:`download` fetches ``--tissue-url`` (default :data:`DEFAULT_TISSUE_URL`) once into ``_downloads/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm

from mammo.core.fileio import atomic_writer
from mammo.prepare.sources.common import PREPARER_VERSION, Report, safe_name

#: Public repository archive of the DDSM tissue-label set (Tiryaki & Kaplanoglu, IRBM 2022); GitHub serves the
#: default branch at ``archive/HEAD.zip``. Not contacted unless ``--tissue-url`` is given.
DEFAULT_TISSUE_URL = "https://github.com/tiryakiv/Mammogram-segmentation/archive/HEAD.zip"


def classify_zip(name: str) -> str | None:
    """Dataset kind of a downloaded zip from its file name, as users name them.

    Returns "mini2" (Mini-DDSM Data-MoreThanTwoMasks), "mini1" (Mini-DDSM), "cbis" (CBIS-DDSM), "tissue" (the
    DDSM tissue-label repository) or None when the name says nothing.
    """
    low = re.sub(r"[\s_\-.]+", "", name.lower())
    if "morethantwo" in low or "mini2" in low or "miniddsm2" in low:
        return "mini2"
    if "mini" in low:
        return "mini1"
    if "cbis" in low or "ddsm" in low:
        return "cbis"
    if "fgt" in low or "tissue" in low or "mammogramsegmentation" in low:
        return "tissue"
    return None


def extract_zip(zip_path: Path, cache_root: Path, kind: str, report: Report) -> Path:
    """Extract ``zip_path`` once into ``cache_root/<kind>-<stem>/`` and return that folder.

    The folder carries ``.extracted.json`` (zip path, size, mtime); when it matches, nothing is extracted again.
    Extraction goes to a temporary folder that is renamed when complete, so an interrupted extraction is never
    trusted. Members with absolute paths or ``..`` components are refused and reported.

    Raises:
        zipfile.BadZipFile: not a zip file. OSError: cannot read it or write the cache.
    """
    zip_path = zip_path.resolve()
    st = zip_path.stat()
    stamp = {"zip": str(zip_path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "version": PREPARER_VERSION}
    dest = cache_root / f"{kind}-{safe_name(zip_path.stem)}"
    marker = dest / ".extracted.json"
    if marker.is_file():
        try:
            if json.loads(marker.read_text(encoding="utf-8")) == stamp:
                return dest
        except (OSError, ValueError):
            pass
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-", dir=cache_root))
    try:
        with zipfile.ZipFile(zip_path) as zf:
            members = zf.infolist()
            for info in tqdm(members, desc=f"unzip {zip_path.name}", unit="file", disable=None):
                parts = Path(info.filename.replace("\\", "/")).parts
                if info.filename.startswith(("/", "\\")) or ".." in parts or re.match(r"^[A-Za-z]:", info.filename):
                    report.skip(kind, f"{zip_path.name}:{info.filename}", "unsafe path in zip (absolute or '..'); "
                                                                          "not extracted")
                    continue
                zf.extract(info, tmp)
        (tmp / ".extracted.json").write_text(json.dumps(stamp), encoding="utf-8")
        if dest.exists():
            shutil.rmtree(dest)  # our own stale cache of an older zip
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def download(url: str, downloads: Path, timeout_s: float = 30.0) -> Path:
    """Download ``url`` once into ``downloads/`` (atomically) and return the file.

    Raises:
        RuntimeError: the download failed (offline, unreachable, HTTP error); the message names ``--tissue-dir``.
    """
    target = downloads / f"tissue-{hashlib.sha256(url.encode('utf-8')).hexdigest()[:12]}.zip"
    if target.is_file():
        return target
    downloads.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_writer(target) as fh, urllib.request.urlopen(url, timeout=timeout_s) as resp:
            shutil.copyfileobj(resp, fh, length=1 << 20)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise RuntimeError(
            f"could not download the tissue-label archive from {url} ({exc}). This machine may be offline. "
            "Download the repository archive elsewhere (github.com/tiryakiv/Mammogram-segmentation), extract it "
            "and pass the folder holding fgt_seg/ and fgt_seg_labels/ with --tissue-dir (or put the zip in "
            "--zips-dir / give it with --tissue-zip).") from exc
    return target
