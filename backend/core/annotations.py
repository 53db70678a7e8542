"""Label Studio annotation results -> per-label masks (brush RLE, polygons, rectangles)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
from PIL import Image, ImageDraw

from .errors import BadRequest
from .label_config import LabelConfig
from .rle import RLEError, declared_length, rle_to_mask

INLINE_DECODE_BYTES = 256 << 10
"""Brush RLEs up to this size are decoded in full when an annotation arrives (a few hundred ms at most);
larger ones are decoded by the ingestion job, which drops the example if the RLE is broken."""
DEFAULT_MAX_PIXELS = 80_000_000


def _size(region: dict, where: str) -> tuple[int, int]:
    try:
        width, height = int(region["original_width"]), int(region["original_height"])
    except (KeyError, TypeError, ValueError):
        raise BadRequest(f"{where}: needs integer original_width and original_height") from None
    if width <= 0 or height <= 0:
        raise BadRequest(f"{where}: original size {width}x{height} is empty")
    return width, height


MASK_REGION_TYPES = ("brushlabels", "polygonlabels", "rectanglelabels")
"""Region types that carry masks: one whose control the config lacks is reported as skipped, not ignored."""


def mask_regions(result: Iterable[dict], config: LabelConfig, max_pixels: int = DEFAULT_MAX_PIXELS,
                 skipped: list[str] | None = None) -> list[dict]:
    """The mask-able regions of an annotation result, checked and reduced to what rasterising needs.

    Keeps brush, polygon and rectangle regions on the brush's image whose label is a brush label. The
    declared size must be within `max_pixels`; a brush RLE must declare W*H*4 values, be no longer than
    such an RLE can be, and (up to INLINE_DECODE_BYTES) decode in full. Mask regions left out (an unknown
    control or label, a value that is not an object, labels that are not names) are described in `skipped`.
    """
    if not isinstance(result, list):
        raise BadRequest("annotation result must be a list of regions")
    controls = {c.name: c for c in config.mask_controls}
    skipped = skipped if skipped is not None else []
    regions = []
    for i, region in enumerate(result):
        if not isinstance(region, dict):
            raise BadRequest(f"result[{i}] must be an object")
        from_name = region.get("from_name")
        control = controls.get(from_name) if isinstance(from_name, str) else None
        if control is None:
            if region.get("type") in MASK_REGION_TYPES:
                skipped.append(f"result[{i}]: from_name {from_name!r} is no mask control of the labeling config")
            continue
        where = f"result[{i}] ({control.name})"
        value = region.get("value")
        if not isinstance(value, dict):
            skipped.append(f"{where}: value is {type(value).__name__}, not an object")
            continue
        kind = region.get("type")
        named = value.get(kind if isinstance(kind, str) else "", value.get(f"{control.kind}labels")) or []
        if not isinstance(named, list):
            raise BadRequest(f"{where}: labels must be a list of label names")
        labels = [lb for lb in named if isinstance(lb, str) and lb in config.labels]
        if not labels:
            skipped.append(f"{where}: labels {named!r} name no label of the config ({', '.join(config.labels)})")
            continue
        width, height = _size(region, where)
        if width * height > max_pixels:
            raise BadRequest(f"{where}: original size {width}x{height} exceeds MAX_IMAGE_PIXELS={max_pixels}")
        kept = {"kind": control.kind, "labels": labels, "width": width, "height": height}
        if control.kind == "brush":
            rle = value.get("rle")
            if value.get("format", "rle") != "rle" or not isinstance(rle, list):
                raise BadRequest(f"{where}: brush value needs format 'rle' and an 'rle' list")
            try:
                n = declared_length(rle)
            except RLEError as exc:
                raise BadRequest(f"{where}: {exc}") from None
            if n != width * height * 4:
                raise BadRequest(
                    f"{where}: RLE declares {n} values but a {width}x{height} image needs {width * height * 4} (W*H*4)"
                )
            if len(rle) > 2 * n + 16:  # even all-literal records take under 2 bytes a value
                raise BadRequest(f"{where}: RLE of {len(rle)} bytes is longer than any encoding of {n} values")
            if len(rle) <= INLINE_DECODE_BYTES:
                try:
                    rle_to_mask(rle, width, height)
                except RLEError as exc:
                    raise BadRequest(f"{where}: {exc}") from None
            kept["rle"] = rle
        elif control.kind == "polygon":
            points = value.get("points")
            if not isinstance(points, list) or len(points) < 3 or not all(
                isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(c, (int, float)) for c in p) for p in points
            ):
                raise BadRequest(f"{where}: polygon needs at least 3 [x, y] points in percent")
            kept["points"] = [[float(x), float(y)] for x, y in points]
        else:
            try:
                kept["rect"] = [float(value[k]) for k in ("x", "y", "width", "height")]
                kept["rotation"] = float(value.get("rotation", 0) or 0)
            except (KeyError, TypeError, ValueError):
                raise BadRequest(f"{where}: rectangle needs numeric x, y, width, height in percent") from None
        regions.append(kept)
    return regions


def _polygon(points: list[list[float]], width: int, height: int) -> np.ndarray:
    canvas = Image.new("1", (width, height), 0)
    # rounded to 1e-6 px: a vertex written as x / width * 100 must land back on pixel x, not 1e-14 short of it
    xy = [(round(x / 100.0 * width, 6), round(y / 100.0 * height, 6)) for x, y in points]
    ImageDraw.Draw(canvas).polygon(xy, fill=1, outline=1)
    return np.asarray(canvas, dtype=bool)


def _rectangle(rect: list[float], rotation: float, width: int, height: int) -> np.ndarray:
    x, y, w, h = rect[0] / 100 * width, rect[1] / 100 * height, rect[2] / 100 * width, rect[3] / 100 * height
    # Label Studio rotates rectangles about their top-left corner, clockwise in degrees.
    c, s = math.cos(math.radians(rotation)), math.sin(math.radians(rotation))
    corners = [(x + dx * c - dy * s, y + dx * s + dy * c) for dx, dy in ((0, 0), (w, 0), (w, h), (0, h))]
    canvas = Image.new("1", (width, height), 0)
    ImageDraw.Draw(canvas).polygon(corners, fill=1, outline=1)
    return np.asarray(canvas, dtype=bool)


def region_mask(region: dict) -> np.ndarray:
    """One checked region (from mask_regions) -> HxW bool mask at its original size."""
    width, height = region["width"], region["height"]
    if region["kind"] == "brush":
        try:
            return rle_to_mask(region["rle"], width, height)
        except RLEError as exc:
            raise BadRequest(f"brush region: {exc}") from None
    if region["kind"] == "polygon":
        return _polygon(region["points"], width, height)
    return _rectangle(region["rect"], region["rotation"], width, height)


def label_masks(regions: Iterable[dict]) -> dict[str, np.ndarray]:
    """Union of the regions' masks per label; BadRequest if regions of one annotation disagree on size."""
    masks: dict[str, np.ndarray] = {}
    for region in regions:
        mask = region_mask(region)
        for label in region["labels"]:
            if label in masks:
                if masks[label].shape != mask.shape:
                    raise BadRequest(f"regions of label {label!r} have different image sizes {masks[label].shape} and {mask.shape}")
                masks[label] |= mask
            else:
                masks[label] = mask.copy()
    return masks
