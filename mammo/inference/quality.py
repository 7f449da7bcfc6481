"""A quality verdict per image: is this a mammogram, is the result plausible, can it be used as it is.

Every record gets ``status`` "ok", "warning" (the result should be checked before use; the reasons say why) or
"rejected" (the input is not a mammogram the cascade can read; its numbers are left out of a run's statistics and the
run exits 1). The checks and where each limit comes from:

Is this a mammogram (:func:`image_measures`, on the input scaled to 8 bit and shrunk to :data:`MEASURE_HEIGHT_PX`):

- size: a side under :data:`MIN_SIDE_PX` pixels, or a side ratio over :data:`MAX_ASPECT`, is not a mammogram
  (full-field mammograms are 2000-4000 px, the public resized sets 480-1024 px; a breast image is 1.0-2.0 times as
  high as wide). Rejected.
- contrast: a mammogram spans dark background and bright tissue. The 1st-99th percentile range under
  :data:`MIN_RANGE_8BIT` (an all-black or all-white frame) is rejected.
- one breast against a background: the pixels above the breast level (:func:`mammo.imaging.breast_threshold`) cover
  between :data:`BREAST_SHARE_LIMITS` of the frame (an image of no background, or a small object on a big canvas, is
  not a mammogram view); the largest of them holds at least :data:`MIN_LARGEST_SHARE` of all of them (labels and
  markers are small; a viewer's side panel or toolbar is a second large bright region). Rejected.
- the chest wall at a side: the breast meets the left or the right of the frame (its chest-wall edge within
  :data:`CHEST_WALL_MARGIN` of the width from it) over more of its height than it meets the top or the bottom over
  its width; a mammogram turned to landscape meets the top or the bottom instead. Rejected, with the fix.
- polarity: the frame's border is mostly background; a border brighter than the breast level on average is a
  negative (an inverted image, e.g. MONOCHROME1 read without its flag). Rejected.

Is the result plausible (from the cascade's record): when the anatomy rules (:mod:`mammo.cascade.anatomy`) changed
more than :data:`MAX_ANATOMY_CHANGE` of the breast, stage 1 did not recognise the image: warning.

Each limit was derived from what a mammogram is (above) and then checked against every real image of
``../shared/data`` (none rejected) and the constructed non-mammograms of the tests (each rejected).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from mammo import imaging

#: The statuses, from best to worst.
STATUSES = ("ok", "warning", "rejected")

#: Smallest side of a mammogram, pixels: the public resized sets are 480 px wide and more (DDSM tissue 960x480,
#: CDD-CESM and VinDr 512x512); a quarter of that leaves room for thumbnails of a usable size.
MIN_SIDE_PX = 128
#: Largest height/width (or width/height) ratio of a mammogram: breast images are 1.0-2.0 (detectors 18x24, 24x30 cm).
MAX_ASPECT = 3.0
#: The checks run on a copy this many pixels high (shrunk with area averaging): enough for regions, and fast.
MEASURE_HEIGHT_PX = 256
#: Smallest 1st-99th percentile range of a mammogram's 8-bit pixels: background is dark, tissue bright.
MIN_RANGE_8BIT = 40
#: Share of the frame the bright (breast) pixels may cover: a mammogram has background beside the breast, and the
#: breast fills a good part of the frame (measured on ../shared/data: see the tests).
BREAST_SHARE_LIMITS = (0.08, 0.97)
#: The largest bright region holds at least this share of the bright pixels: labels and markers are small, a second
#: image or a viewer's panel is not (the lowest share among the real images of ../shared/data is 0.797, a film with a
#: large label).
MIN_LARGEST_SHARE = 0.60
#: The breast's chest-wall edge lies within this share of the width from the left or right of the frame.
CHEST_WALL_MARGIN = 0.15
#: The breast meets the side opposite its chest wall over at most this share of its height (a mammogram has background
#: there; a negative image, or an image without background, is bright across).
MAX_FAR_SIDE_CONTACT = 0.80
#: A rule-changed share of the breast above this says stage 1 did not recognise the mammogram: warning.
MAX_ANATOMY_CHANGE = 0.30


@dataclass
class Verdict:
    """``status`` (one of :data:`STATUSES`), the ``reasons`` for it (plain sentences) and the ``measures`` behind it."""

    status: str = "ok"
    reasons: list[str] = field(default_factory=list)
    measures: dict = field(default_factory=dict)

    def add(self, status: str, reason: str) -> None:
        """Record a finding; the verdict is the worst status found."""
        self.reasons.append(reason)
        if STATUSES.index(status) > STATUSES.index(self.status):
            self.status = status

    def to_dict(self) -> dict:
        return {"status": self.status, "reasons": list(self.reasons), "measures": dict(self.measures)}


def _shrunk(pixels: np.ndarray) -> np.ndarray:
    image8 = imaging.scale_to_uint8(pixels, {"intensity_scaling": "bit_depth"})
    h, w = image8.shape
    if h > MEASURE_HEIGHT_PX:
        image8 = imaging.resize(image8, (MEASURE_HEIGHT_PX, max(1, round(w * MEASURE_HEIGHT_PX / h))), "area")
    return image8


def image_measures(pixels: np.ndarray) -> dict:
    """The measures of :func:`image_verdict` for an image as read (``(H, W)`` uint8 or uint16).

    Returns:
        ``range_8bit`` (1st-99th percentile range), ``breast_share`` (bright pixels / frame), ``largest_share``
        (largest bright region / bright pixels), ``side_contact`` and ``end_contact`` (the share of the breast's
        height meeting the frame's left/right margin, and of its width meeting the top/bottom margin; the larger
        side), ``border_mean`` and ``breast_level`` (8 bit).
    """
    image8 = _shrunk(pixels)
    low, high = np.percentile(image8, [1, 99])
    level = imaging.breast_threshold(image8)
    bright = image8 > level
    measures = {"range_8bit": float(high - low), "breast_level": int(level),
                "breast_share": float(bright.mean()), "largest_share": 0.0, "side_contact": 0.0, "end_contact": 0.0}
    border = np.concatenate([image8[:2].ravel(), image8[-2:].ravel(), image8[:, :2].ravel(), image8[:, -2:].ravel()])
    measures["border_mean"] = float(border.mean())
    count, labels, stats, _ = cv2.connectedComponentsWithStats(bright.astype(np.uint8), connectivity=8)
    if count <= 1:
        return measures
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    measures["largest_share"] = float(stats[largest, cv2.CC_STAT_AREA] / bright.sum())
    breast = labels == largest
    h, w = breast.shape
    margin_x, margin_y = max(1, int(CHEST_WALL_MARGIN * w)), max(1, int(CHEST_WALL_MARGIN * h))
    rows = breast.any(axis=1).sum()
    cols = breast.any(axis=0).sum()
    left, right = (breast[:, :margin_x].any(axis=1).sum() / max(rows, 1),
                   breast[:, -margin_x:].any(axis=1).sum() / max(rows, 1))
    end = max(breast[:margin_y].any(axis=0).sum(), breast[-margin_y:].any(axis=0).sum()) / max(cols, 1)
    measures["side_contact"], measures["far_side_contact"] = float(max(left, right)), float(min(left, right))
    measures["end_contact"], measures["landscape"] = float(end), bool(w > 1.15 * h)
    return measures


def image_verdict(pixels: np.ndarray) -> Verdict:
    """Whether an image as read can be a mammogram: the checks of the module docstring, each failure a reason.

    Raises:
        TypeError / ValueError: pixels that are not ``(H, W)`` uint8 / uint16 (``imaging.scale_to_uint8``).
    """
    verdict = Verdict()
    h, w = pixels.shape
    if min(h, w) < MIN_SIDE_PX:
        verdict.add("rejected", f"the image is only {w} x {h} px (W x H), under {MIN_SIDE_PX} px on a side: not a "
                                "mammogram (or a thumbnail too small to read); pass the full image")
        return verdict
    if max(h, w) > MAX_ASPECT * min(h, w):
        verdict.add("rejected", f"the image's sides are {w} x {h} px, a ratio over {MAX_ASPECT:g}: not a whole "
                                "mammogram")
        return verdict
    m = verdict.measures = image_measures(pixels)
    if m["range_8bit"] < MIN_RANGE_8BIT:
        verdict.add("rejected", f"the image is nearly uniform (its 1st-99th percentile range is {m['range_8bit']:.0f} "
                                f"of 255): no breast against a background")
        return verdict
    if m["far_side_contact"] > MAX_FAR_SIDE_CONTACT:
        verdict.add("rejected", f"the bright region meets both sides of the image over {m['far_side_contact']:.0%} of "
                                "its height: no dark background beside one breast (a negative image? A DICOM "
                                "MONOCHROME1 image is inverted on reading; invert other files before passing them)")
    low, high = BREAST_SHARE_LIMITS
    if not low <= m["breast_share"] <= high:
        verdict.add("rejected", f"bright pixels cover {m['breast_share']:.0%} of the frame; a mammogram shows one "
                                f"breast against a dark background ({low:.0%}-{high:.0%} of the frame)")
    if m["largest_share"] < MIN_LARGEST_SHARE:
        verdict.add("rejected", f"the largest bright region holds only {m['largest_share']:.0%} of the bright pixels: "
                                "more than one large object (a screenshot with panels, several images in one?)")
    if m["landscape"] and m["end_contact"] > m["side_contact"]:
        verdict.add("rejected", "the breast meets the top or bottom of the image rather than a side: a mammogram "
                                "turned by 90 degrees? Rotate it so that the chest wall is at the left or right")
    return verdict


def result_verdict(verdict: Verdict, anatomy: dict | None) -> Verdict:
    """Add the result's checks to an image verdict: the share of the breast the anatomy rules changed
    (:data:`MAX_ANATOMY_CHANGE`)."""
    if anatomy and anatomy.get("changed_fraction", 0.0) > MAX_ANATOMY_CHANGE:
        verdict.add("warning", f"the anatomy rules changed {anatomy['changed_fraction']:.0%} of the breast: stage 1 "
                               "did not recognise this mammogram well; check the tissue map before using the numbers")
    verdict.measures["anatomy_changed_fraction"] = None if not anatomy else anatomy.get("changed_fraction")
    return verdict
