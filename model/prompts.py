"""Where to look: a box or points given with a query narrow what the support set says to segment.

Boxes crop the query (with a margin) so a small object fills the working resolution; points keep or remove
connected components of the predicted mask. Coordinates are pixels of the query as oriented (EXIF applied).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np

from .errors import InvalidInputError

if TYPE_CHECKING:
    from .pipeline import DiffewS
    from .support import SupportMemory

BOX_MARGIN = 0.1
"""Context kept around a box on each side, as a share of its width and height (at least MIN_MARGIN_PX)."""
MIN_MARGIN_PX = 4
POINT_BOX = 0.2
"""Side of the box segmented around a positive point that hits an empty mask, as a share of the shorter side."""


@dataclass(frozen=True)
class Box:
    """A pixel box: columns x0 <= x < x1, rows y0 <= y < y1."""

    x0: int
    y0: int
    x1: int
    y1: int

    @classmethod
    def clipped(cls, x0: float, y0: float, x1: float, y1: float, shape: tuple[int, int]) -> Box:
        """The box rounded outwards and clipped to an image of `shape` (H, W); InvalidInputError if empty."""
        h, w = shape
        box = cls(max(0, int(np.floor(x0))), max(0, int(np.floor(y0))), min(w, int(np.ceil(x1))), min(h, int(np.ceil(y1))))
        if box.x1 <= box.x0 or box.y1 <= box.y0:
            raise InvalidInputError(f"box ({x0:.1f}, {y0:.1f})-({x1:.1f}, {y1:.1f}) lies outside the {w}x{h} image")
        return box

    def widened(self, margin: float, shape: tuple[int, int]) -> Box:
        """The box grown by `margin` of its size on each side (at least MIN_MARGIN_PX), clipped to the image."""
        dx = max(MIN_MARGIN_PX, round(margin * (self.x1 - self.x0)))
        dy = max(MIN_MARGIN_PX, round(margin * (self.y1 - self.y0)))
        return Box.clipped(self.x0 - dx, self.y0 - dy, self.x1 + dx, self.y1 + dy, shape)


@dataclass(frozen=True)
class Point:
    """A pixel (column x, row y); positive keeps what is under it, negative removes it."""

    x: float
    y: float
    positive: bool = True


def crop(image: np.ndarray, box: Box) -> np.ndarray:
    """The pixels of `box` (rows y0:y1, columns x0:x1)."""
    return image[box.y0 : box.y1, box.x0 : box.x1]


def paste(mask_crop: np.ndarray, crop_box: Box, keep: Box, shape: tuple[int, int]) -> np.ndarray:
    """A full-size mask: `mask_crop` (the mask of `crop_box`) put back in place, cleared outside `keep`."""
    if mask_crop.shape != (crop_box.y1 - crop_box.y0, crop_box.x1 - crop_box.x0):
        raise InvalidInputError(f"mask of {mask_crop.shape} does not fit the crop box {crop_box}")
    full = np.zeros(shape, dtype=bool)
    full[crop_box.y0 : crop_box.y1, crop_box.x0 : crop_box.x1] = mask_crop
    inside = np.zeros(shape, dtype=bool)
    inside[keep.y0 : keep.y1, keep.x0 : keep.x1] = True
    return full & inside


def box_of_mask(mask: np.ndarray) -> Box | None:
    """The tightest box around a mask's pixels, or None for an empty mask."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    return Box(int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1)


def point_inside(mask: np.ndarray) -> Point | None:
    """A deterministic point well inside a mask: its pixel farthest from the background (None if empty)."""
    if not mask.any():
        return None
    inner = cv2.distanceTransform(np.pad(mask, 1).astype(np.uint8), cv2.DIST_L2, 3)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(inner)), mask.shape)
    return Point(float(x), float(y))


def box_around(point: Point, shape: tuple[int, int], share: float = POINT_BOX) -> Box:
    """A square box of `share` of the shorter side centred on `point`, clipped to the image."""
    half = max(MIN_MARGIN_PX, share * min(shape) / 2)
    return Box.clipped(point.x - half, point.y - half, point.x + half + 1, point.y + half + 1, shape)


def _components(mask: np.ndarray) -> np.ndarray:
    count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    return labels


def _component_at(labels: np.ndarray, point: Point) -> int:
    """The component under the point or touching it (its 3x3 neighbourhood); 0 if none."""
    h, w = labels.shape
    x, y = min(max(int(point.x), 0), w - 1), min(max(int(point.y), 0), h - 1)
    if labels[y, x]:
        return int(labels[y, x])
    window = labels[max(0, y - 1) : y + 2, max(0, x - 1) : x + 2]
    found = window[window > 0]
    return int(np.bincount(found).argmax()) if found.size else 0


def _nearest_component(labels: np.ndarray, point: Point) -> int:
    rows, cols = np.nonzero(labels)
    if rows.size == 0:
        return 0
    nearest = int(np.argmin((cols - point.x) ** 2 + (rows - point.y) ** 2))
    return int(labels[rows[nearest], cols[nearest]])


def select_components(mask: np.ndarray, points: Sequence[Point]) -> np.ndarray:
    """Keep the components under (or touching) positive points, or the nearest one if a point hits none;
    remove those under negative points. With negatives only, everything else of the mask stays."""
    labels = _components(mask)
    positives = [p for p in points if p.positive]
    keep: set[int] = set()
    for p in positives:
        keep.add(_component_at(labels, p) or _nearest_component(labels, p))
    drop = {_component_at(labels, p) for p in points if not p.positive} - {0}
    if positives:
        chosen = np.isin(labels, sorted(keep - {0}))
    else:
        chosen = mask.astype(bool).copy()
    return chosen & ~np.isin(labels, sorted(drop))


def segment_box(model: DiffewS, rgb: np.ndarray, memory: SupportMemory, box: Box,
                margin: float = BOX_MARGIN) -> tuple[np.ndarray, float]:
    """Segment only inside `box`: the crop (box plus margin) at the working resolution, pasted back, zero
    outside the box. Returns the full-size mask and the crop's score."""
    shape = rgb.shape[:2]
    around = box.widened(margin, shape)
    [out] = model.segment([np.ascontiguousarray(crop(rgb, around))], memory)
    return paste(out.mask, around, box, shape), out.score


def segment_points(model: DiffewS, rgb: np.ndarray, memory: SupportMemory,
                   points: Sequence[Point]) -> tuple[np.ndarray, float]:
    """Segment the whole query, then keep / remove components by the points (select_components). Where the
    mask is empty everywhere, each positive point gets a box of POINT_BOX around it segmented instead."""
    [out] = model.segment([rgb], memory)
    mask = out.mask
    if not mask.any():
        shape = rgb.shape[:2]
        looks = [segment_box(model, rgb, memory, box_around(p, shape))[0] for p in points if p.positive]
        mask = np.logical_or.reduce(looks) if looks else mask
    return (select_components(mask, points) if mask.any() else mask), out.score
