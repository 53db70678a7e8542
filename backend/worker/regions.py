"""Predicted masks as Label Studio regions: brush RLEs, polygons (mask contours) or boxes (one per component).

Contours and components come from OpenCV (opencv-python-headless, already required by label-studio-sdk):
`findContours` traces the outer boundary of each part and `approxPolyDP` simplifies it (Douglas-Peucker),
which is the well-tested pair for this; scikit-image would add a second imaging stack for the same result.
Coordinates are percent of the original image, as Label Studio stores them; a vertex at pixel index x is
x / width * 100 (the convention our own rasteriser, backend.core.annotations, reads back).
"""

from __future__ import annotations

import logging
import uuid

import cv2
import numpy as np

from ..core.errors import BackendError
from ..core.label_config import Control
from ..core.rle import mask_to_rle

POLYGON_TOLERANCE_PX = 0.5
"""Douglas-Peucker tolerance: the simplified polygon strays at most this far from the traced contour (at 1 px a
disc of radius 18 px read back with IoU 0.947, at 0.5 px 0.967; vertex count still falls by about two thirds)."""
MIN_REGION_SHARE = 0.0002
"""Parts smaller than this share of the image (and under MIN_REGION_PX) get no polygon or box: specks."""
MIN_REGION_PX = 16
BOX_MIN_SHARE_OF_LARGEST = 0.05
"""A part smaller than this share of the label's largest part gets no box (fragments and noise, not objects)."""
MAX_BOXES_PER_LABEL = 50
"""Most boxes one label's mask gives, largest parts first (1-px stripes of equal parts gave 540-1500)."""

logger = logging.getLogger(__name__)


def _region(control: Control, image_name: str, kind: str, mask_shape: tuple[int, int], value: dict,
            score: float) -> dict:
    height, width = mask_shape
    return {
        "id": uuid.uuid4().hex[:10],
        "from_name": control.name,
        "to_name": image_name,
        "type": kind,
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "value": value,
        "score": round(float(score), 4),
        "readonly": False,
    }


MAX_MASK_RUNS = 1_000_000
"""Most runs (changes between inside and outside, row-major) a brush mask may have: about 3 MB of RLE. A mask
of natural shapes at 4000x3000 has tens of thousands; a 1-pixel comb has 12 million (89 MB of JSON, a minute)."""


class MaskTooFragmented(BackendError):
    """A predicted mask too fragmented to send as a brush region, even smoothed."""

    status = 422


def runs(mask: np.ndarray) -> int:
    """Runs of a mask's RLE (counted in milliseconds, before any encoding)."""
    flat = mask.reshape(-1).view(np.uint8)
    return int(np.count_nonzero(flat[1:] != flat[:-1])) + 1


def bounded(mask: np.ndarray, max_runs: int = MAX_MASK_RUNS) -> np.ndarray:
    """The mask itself, or smoothed (5x5 median: structures under 3 px go) when it has more than `max_runs` runs;
    MaskTooFragmented when even that is too many."""
    if runs(mask) <= max_runs:
        return mask
    smooth = cv2.medianBlur(mask.astype(np.uint8) * 255, 5) > 127
    count = runs(smooth)
    if count > max_runs:
        raise MaskTooFragmented(f"the predicted mask has {count} runs even smoothed, more than {max_runs}: too "
                                "fragmented to send as a brush region")
    logger.warning("a predicted mask of %d runs was smoothed to %d (more than %d)", runs(mask), count, max_runs)
    return smooth


def _min_area(shape: tuple[int, int]) -> float:
    return max(MIN_REGION_PX, MIN_REGION_SHARE * shape[0] * shape[1])


def polygons(mask: np.ndarray, tolerance: float = POLYGON_TOLERANCE_PX) -> list[list[list[float]]]:
    """Outer contours of the mask's parts, simplified, as [[x%, y%], ...]; a part's holes are filled
    (Label Studio polygons have none), parts under the minimum area are dropped."""
    height, width = mask.shape
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    out = []
    for contour in contours:
        if cv2.contourArea(contour) + len(contour) < _min_area(mask.shape):  # area counts the boundary too
            continue
        simple = cv2.approxPolyDP(contour, tolerance, closed=True)[:, 0, :]
        if len(simple) < 3:
            continue
        out.append([[100.0 * x / width, 100.0 * y / height] for x, y in simple.tolist()])
    return out


def boxes(mask: np.ndarray) -> list[dict[str, float]]:
    """One box per object-sized part of the mask: {x, y, width, height} in percent, largest part first.

    A part gets a box if it is above the minimum area, at least BOX_MIN_SHARE_OF_LARGEST of the label's largest
    part, and its box is not inside a larger part's box (a fragment of the same object). Each box is then
    something to check, not a speck: a sky mask broken by trees and poles gives its large pieces, not 20 boxes.
    At most MAX_BOXES_PER_LABEL boxes.
    """
    height, width = mask.shape
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    parts = sorted(stats[1:count].tolist(), key=lambda s: -s[4])
    if not parts:
        return []
    floor = max(_min_area(mask.shape), BOX_MIN_SHARE_OF_LARGEST * parts[0][4])
    kept: list[list[int]] = []
    for x, y, w, h, area in parts:
        if area < floor or any(x >= kx and y >= ky and x + w <= kx + kw and y + h <= ky + kh for kx, ky, kw, kh, _ in kept):
            continue
        kept.append([x, y, w, h, area])
        if len(kept) == MAX_BOXES_PER_LABEL:
            break
    return [{"x": 100.0 * x / width, "y": 100.0 * y / height, "width": 100.0 * w / width, "height": 100.0 * h / height,
             "rotation": 0} for x, y, w, h, _ in kept]


def mask_regions_for(control: Control, image_name: str, label: str, mask: np.ndarray, score: float) -> list[dict]:
    """The regions of one label's mask in what `control` asks for: one brush, polygons or boxes."""
    if control.kind == "brush":
        mask = bounded(mask)
        return [_region(control, image_name, "brushlabels", mask.shape,
                        {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [label]}, score)]
    if control.kind == "polygon":
        return [_region(control, image_name, "polygonlabels", mask.shape,
                        {"points": points, "closed": True, "polygonlabels": [label]}, score)
                for points in polygons(mask)]
    return [_region(control, image_name, "rectanglelabels", mask.shape, {**box, "rectanglelabels": [label]}, score)
            for box in boxes(mask)]
