"""Anatomy that holds on every mammogram, whatever stage 1 says: the rules that reconcile its tissue map with it.

Stage 1 learns appearance; on mammograms unlike its training data it can make errors no radiologist would: a
detector strip or a burned-in label called breast, the pectoral muscle spread over half the breast, a muscle on a
CC view. These are facts of anatomy and acquisition, so they are rules here, not training data:

1. :func:`one_breast`: the breast (adipose, FGT, pectoral) is one connected region. Every other non-background
   component (detector strips, labels, markers) becomes background, and holes inside the breast are breast.
2. :func:`pectoral_on_mlo`: on an MLO view the pectoral muscle is at most one region, against the chest wall at the
   top of the image (each row's muscle runs from the chest wall, without holes; a band down the chest wall is a muscle
   too), and at most :data:`MAX_PECTORAL_FRACTION` of the breast (an oversized one is cut where it runs too far
   down).
3. :func:`pectoral_on_cc`: on a CC view the muscle is usually not seen; at most a thin crescent against the chest wall
   (:data:`MAX_CC_CRESCENT_WIDTH_FRACTION` of the breast's width, :data:`MAX_CC_PECTORAL_FRACTION` of its area).

A pixel a rule takes from a class gets the most probable class still allowed there (the argmax of stage 1's
probabilities over the allowed classes). Every rule that changed the map adds a note saying what and how much.

Frame: the orientation-normalised image of :func:`mammo.imaging.preprocess` (chest wall on the LEFT, the breast
widest there). The view comes from :func:`view_of` (DICOM ``ViewPosition``, a view code in the file name, or the
image itself; the result says which won).

Adding a fact (the nipple on the skin line, the skin line itself): write a function ``(AnatomyState) -> str | None``
that edits ``state.classes`` through :meth:`AnatomyState.reassign` and returns its note, and add it to
:data:`BREAST_RULES` (facts of the breast alone) or :data:`VIEW_RULES` (facts that depend on the view).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import cv2
import numpy as np

from mammo.core.labels import ADIPOSE, BACKGROUND, FGT, PECTORAL

#: Largest share of the breast the pectoral muscle may take on an MLO view. The muscle covers 10-12 % of the breast
#: pixels of the CSAW-S MLO masks (../shared/FINDINGS.md) and about 10-25 % of an MLO view in general (issue 19);
#: 30 % leaves room for large muscles and small breasts while ruling out "the upper half of the breast".
MAX_PECTORAL_FRACTION = 0.30

#: The muscle must start in the top part of the breast on an MLO view: its top row within this fraction of the
#: breast's height from the breast's top (the muscle enters the image at the top, against the chest wall).
PECTORAL_TOP_FRACTION = 0.25

#: On a CC view: the widest row of an allowed pectoral crescent, as a fraction of the breast's width, and its largest
#: share of the breast. A CC view shows at most a sliver of muscle at the chest wall (often none); the acceptance of
#: issue 19 asks for <= 1 % of the breast.
MAX_CC_CRESCENT_WIDTH_FRACTION = 0.05
MAX_CC_PECTORAL_FRACTION = 0.01

#: A gap of at most this share of the breast's height between rows of the muscle is bridged (the network's muscle can
#: start a little away from the chest wall in a few rows; the muscle itself is continuous).
GAP_FRACTION = 0.05

#: A region counts as touching the chest wall when it reaches within this fraction of the breast's width from the
#: breast's chest-wall (left) edge (a thin strip of skin or fat may lie between the muscle and the image edge).
CHEST_WALL_TOLERANCE_FRACTION = 0.10

#: With no view given: MLO when stage 1's pectoral region at the top of the chest wall holds at least this share of
#: the breast (a CC view shows none or a sliver, see :data:`MAX_CC_PECTORAL_FRACTION`), else CC.
MLO_EVIDENCE_FRACTION = 0.02

#: View codes of the ACR / DICOM vocabulary (DICOM PS3.16 CID 4014) grouped by the rule set they take: views with the
#: pectoral muscle in the upper image (MLO and its variants, ML, LM), and cranio-caudal views (CC, XCCL, XCCM, FB).
MLO_CODES = ("MLO", "ML", "LM", "LMO", "SIO")
CC_CODES = ("CC", "XCCL", "XCCM", "FB")
_VIEW_IN_NAME = re.compile(r"(?:^|[^A-Za-z])(" + "|".join(MLO_CODES + CC_CODES) + r")(?=$|[^A-Za-z])",
                           re.IGNORECASE)


@dataclass(frozen=True)
class View:
    """The view a map is read as: ``name`` "MLO" or "CC" (the rule set), ``source`` where it came from
    ("dicom ViewPosition", "file name", "image")."""

    name: str
    source: str


def view_from_text(text: str | None) -> str | None:
    """"MLO" or "CC" from a DICOM ``ViewPosition`` value or a file name (``P105_R_CM_MLO``, ``0_R-CC``,
    ``Calc-Training_P_00005_RIGHT_CC``); None when no view code stands alone in it (``002_0`` says nothing)."""
    if not text:
        return None
    found = _VIEW_IN_NAME.findall(str(text))
    if not found:
        return None
    code = found[-1].upper()
    return "MLO" if code in MLO_CODES else "CC"


def view_of(classes: np.ndarray, *, view_position: str | None = None, file_name: str | None = None) -> View:
    """The view of a mammogram, from the most reliable source at hand: DICOM ``ViewPosition``, then a view code in the
    file name, then the image (stage 1's pectoral evidence against the chest wall, :data:`MLO_EVIDENCE_FRACTION`).

    Args:
        classes: ``(H, W)`` uint8 stage-1 classes in the orientation-normalised frame.
    """
    for text, source in ((view_position, "dicom ViewPosition"), (file_name, "file name")):
        name = view_from_text(text)
        if name:
            return View(name, source)
    breast = classes != BACKGROUND
    region = _chest_wall_pectoral(classes == PECTORAL, breast)
    share = region.sum() / max(int(breast.sum()), 1)
    return View("MLO" if share >= MLO_EVIDENCE_FRACTION else "CC", "image")


@dataclass
class AnatomyState:
    """The map being reconciled: ``classes`` ``(H, W)`` uint8 and ``probs`` ``(4, H, W)`` float (stage 1's softmax at
    the same size), the view, and the notes of the rules that changed something."""

    classes: np.ndarray
    probs: np.ndarray
    view: View
    notes: list[str] = field(default_factory=list)
    changed_px: dict[str, int] = field(default_factory=dict)

    @property
    def breast(self) -> np.ndarray:
        return self.classes != BACKGROUND

    def reassign(self, where: np.ndarray, allowed: tuple[int, ...]) -> int:
        """Give the pixels of ``where`` the most probable class of ``allowed``; returns how many changed class."""
        if not where.any():
            return 0
        sub = self.probs[list(allowed)][:, where]
        new = np.asarray(allowed, np.uint8)[sub.argmax(axis=0)]
        changed = int((self.classes[where] != new).sum())
        self.classes[where] = new
        return changed


def _components(mask: np.ndarray, connectivity: int = 8) -> tuple[int, np.ndarray, np.ndarray]:
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=connectivity)
    return count, labels, stats


def _percent(part: int, whole: int) -> str:
    return f"{100.0 * part / max(whole, 1):.1f} %"


def one_breast(state: AnatomyState) -> str | None:
    """Keep the largest connected non-background region as the breast; everything else is background, and holes in
    the breast (pixels of background enclosed by it) become the most probable breast class."""
    breast = state.breast
    count, labels, stats = _components(breast)
    if count <= 1:
        return None
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    outside = breast & (labels != largest)
    removed = int(outside.sum())
    state.classes[outside] = BACKGROUND
    kept = labels == largest
    # holes: background components that do not touch the image border
    count_bg, labels_bg, stats_bg = _components(~kept, connectivity=4)
    h, w = kept.shape
    holes = np.zeros_like(kept)
    for index in range(1, count_bg):
        x, y, bw, bh = stats_bg[index, :4]
        if x > 0 and y > 0 and x + bw < w and y + bh < h:
            holes |= labels_bg == index
    filled = state.reassign(holes, (ADIPOSE, FGT, PECTORAL))
    state.changed_px["one_breast"] = removed + filled
    if not removed and not filled:
        return None
    parts = []
    if removed:
        parts.append(f"{count - 2} region(s) apart from the breast ({removed} px, e.g. detector edges or labels) set "
                     "to background")
    if filled:
        parts.append(f"{filled} px of holes inside the breast filled")
    return "anatomy: " + "; ".join(parts)


def _chest_wall_tolerance_px(breast: np.ndarray) -> int:
    """How far from the breast's chest-wall edge a region may start and still touch the chest wall, pixels
    (:data:`CHEST_WALL_TOLERANCE_FRACTION` of the breast's width, at least 1)."""
    cols = np.flatnonzero(breast.any(axis=0))
    return max(1, int(round(CHEST_WALL_TOLERANCE_FRACTION * (cols[-1] - cols[0] + 1))))


def _chest_wall_pectoral(pectoral: np.ndarray, breast: np.ndarray) -> np.ndarray:
    """The pectoral component that touches the chest wall (left) in the top part of the breast; empty if none."""
    if not pectoral.any() or not breast.any():
        return np.zeros_like(pectoral)
    rows = np.flatnonzero(breast.any(axis=1))
    top, height = rows[0], rows[-1] - rows[0] + 1
    wall = int(np.flatnonzero(breast.any(axis=0))[0]) + _chest_wall_tolerance_px(breast)
    count, labels, stats = _components(pectoral)
    best, best_area = 0, 0
    for index in range(1, count):
        x, y, _, _, area = stats[index]
        if x <= wall and y <= top + PECTORAL_TOP_FRACTION * height and area > best_area:
            best, best_area = index, area
    return labels == best if best else np.zeros_like(pectoral)


def _row_starts(breast: np.ndarray) -> np.ndarray:
    """Each row's chest-wall column: the breast's leftmost pixel in the row (the image width in a row without one)."""
    has = breast.any(axis=1)
    return np.where(has, breast.argmax(axis=1), breast.shape[1])


def _rows_from_chest_wall(region: np.ndarray, breast: np.ndarray, tolerance_px: int, max_gap: int) -> np.ndarray:
    """The region as a muscle: each row from the chest wall (the breast's edge in that row) to the region's last pixel
    in it, when the region starts within ``tolerance_px`` of the chest wall; holes in a row are muscle. Runs of at
    most ``max_gap`` rows without muscle are bridged (the width of the row below); the muscle ends at a longer gap."""
    h, w = region.shape
    starts = _row_starts(breast)
    widths = np.zeros(h, np.int64)
    for y in np.flatnonzero(region.any(axis=1)):
        columns = np.flatnonzero(region[y])
        if columns[0] - starts[y] <= tolerance_px:
            widths[y] = columns[-1] + 1 - starts[y]
    rows = np.flatnonzero(widths > 0)
    if rows.size == 0:
        return np.zeros_like(region)
    end = rows[-1]
    for upper, lower in zip(rows[:-1], rows[1:]):
        if lower - upper > max_gap + 1:  # a long gap: what lies below it is not this muscle
            end = upper
            break
        widths[upper + 1:lower] = widths[lower]
    widths[end + 1:] = 0
    columns = np.arange(w)[None, :]
    return (columns >= starts[:, None]) & (columns < starts[:, None] + widths[:, None])


def _capped_from_top(region: np.ndarray, max_area_px: float) -> np.ndarray:
    """The region's rows from the top down while its area stays within ``max_area_px`` (the muscle enters the image at
    the top: an oversized one is cut where it runs too far down the chest wall)."""
    cumulative = np.cumsum(region.sum(axis=1))
    return region & (cumulative <= max_area_px)[:, None]


def pectoral_on_mlo(state: AnatomyState) -> str | None:
    """On an MLO view: one muscle region at the top of the chest wall, each row running from the chest wall without
    holes, at most :data:`MAX_PECTORAL_FRACTION` of the breast; other pectoral pixels become adipose or FGT."""
    if state.view.name != "MLO":
        return None
    pectoral, breast = state.classes == PECTORAL, state.breast
    if not pectoral.any():
        return None
    keep = _chest_wall_pectoral(pectoral, breast)
    if keep.any():
        gap = max(1, int(GAP_FRACTION * np.count_nonzero(breast.any(axis=1))))
        keep = _rows_from_chest_wall(keep, breast, _chest_wall_tolerance_px(breast), gap) & breast
    breast_px = int(breast.sum())
    if keep.any():
        keep = _capped_from_top(keep, MAX_PECTORAL_FRACTION * breast_px)
    before = int(pectoral.sum())
    changed = state.reassign(pectoral & ~keep, (ADIPOSE, FGT))
    state.classes[keep] = PECTORAL
    state.changed_px["pectoral"] = changed + int((keep & ~pectoral).sum())
    if not changed:
        return None
    return (f"anatomy (MLO, view from {state.view.source}): stage 1 called {_percent(before, breast_px)} of the breast "
            f"pectoral; kept {_percent(int(keep.sum()), breast_px)} as one muscle at the top of the chest wall")


def pectoral_on_cc(state: AnatomyState) -> str | None:
    """On a CC view: pectoral only as a thin crescent against the chest wall (:data:`MAX_CC_CRESCENT_WIDTH_FRACTION`,
    :data:`MAX_CC_PECTORAL_FRACTION`), else none."""
    if state.view.name != "CC":
        return None
    pectoral, breast = state.classes == PECTORAL, state.breast
    if not pectoral.any():
        return None
    cols = np.flatnonzero(breast.any(axis=0))
    left, width = int(cols[0]), int(cols[-1] - cols[0] + 1)
    breast_px = int(breast.sum())
    keep = np.zeros_like(pectoral)
    count, labels, stats = _components(pectoral)
    for index in range(1, count):
        x, _, w, _, area = stats[index]
        if (x <= left + max(1, CHEST_WALL_TOLERANCE_FRACTION * width) and w <= MAX_CC_CRESCENT_WIDTH_FRACTION * width
                and keep.sum() + area <= MAX_CC_PECTORAL_FRACTION * breast_px):
            keep |= labels == index
    before = int(pectoral.sum())
    changed = state.reassign(pectoral & ~keep, (ADIPOSE, FGT))
    state.changed_px["pectoral"] = changed
    if not changed:
        return None
    return (f"anatomy (CC, view from {state.view.source}): stage 1 called {_percent(before, breast_px)} of the breast "
            f"pectoral; kept {_percent(int(keep.sum()), breast_px)} (a CC view shows at most a crescent)")


#: The rules, in the order they run: those of the breast first (the others measure the breast, and the view is read
#: from the reconciled breast), then those that depend on the view.
BREAST_RULES: tuple[Callable[[AnatomyState], str | None], ...] = (one_breast,)
VIEW_RULES: tuple[Callable[[AnatomyState], str | None], ...] = (pectoral_on_mlo, pectoral_on_cc)
RULES = BREAST_RULES + VIEW_RULES


@dataclass
class Reconciled:
    """The result of :func:`reconcile`: ``classes`` ``(H, W)`` uint8, the ``view`` used, the ``notes`` of the rules
    that overruled stage 1, and ``changed_fraction``: the share of the breast pixels whose class a rule changed."""

    classes: np.ndarray
    view: View
    notes: list[str]
    changed_fraction: float


def reconcile(probs: np.ndarray, *, view_position: str | None = None, file_name: str | None = None) -> Reconciled:
    """Stage 1's probabilities -> a tissue map that obeys :data:`RULES` (the breast rules, then the view rules).

    Args:
        probs: ``(4, H, W)`` float32 softmax of stage 1 at the map's size, orientation-normalised frame (chest wall on
            the left).
        view_position: DICOM ``ViewPosition`` when known. file_name: the input's name (view codes such as MLO, CC).

    Returns:
        :class:`Reconciled`; ``classes`` is ``probs.argmax(0)`` where no rule applied.
    """
    classes = probs.argmax(axis=0).astype(np.uint8)
    state = AnatomyState(classes, probs, View("CC", "unknown"))
    notes = [note for note in (rule(state) for rule in BREAST_RULES) if note]
    state.view = view_of(state.classes, view_position=view_position, file_name=file_name)
    notes += [note for note in (rule(state) for rule in VIEW_RULES) if note]
    breast_px = max(int(state.breast.sum()), 1)
    return Reconciled(state.classes, state.view, notes, sum(state.changed_px.values()) / breast_px)
