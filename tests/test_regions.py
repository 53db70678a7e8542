"""Masks as polygons and boxes in percent coordinates, read back by the backend's own rasteriser."""

from __future__ import annotations

import numpy as np
import pytest

from backend.core.annotations import label_masks, mask_regions
from backend.core.label_config import Control, parse_label_config
from backend.worker.regions import POLYGON_TOLERANCE_PX, boxes, mask_regions_for, polygons

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <PolygonLabels name="poly" toName="image"><Label value="shape"/></PolygonLabels>
  <RectangleLabels name="box" toName="image"><Label value="shape"/></RectangleLabels>
</View>"""


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def _shapes(h: int = 90, w: int = 140) -> np.ndarray:
    """A disc, a tilted ellipse-like blob and a rectangle with a hole: three parts on a non-square image."""
    yy, xx = np.mgrid[:h, :w]
    mask = (yy - 30) ** 2 + (xx - 30) ** 2 < 18**2
    mask |= ((xx - 95) * 0.8 + (yy - 25) * 0.5) ** 2 / 25**2 + ((yy - 25) * 0.9 - (xx - 95) * 0.3) ** 2 / 10**2 < 1
    mask[60:85, 60:120] = True
    mask[68:76, 80:95] = False  # a hole: Label Studio polygons cannot have one, it is filled
    return mask


def _read_back(regions: list[dict], config) -> np.ndarray:
    return label_masks(mask_regions(regions, config))["shape"]


def test_polygons_round_trip_at_the_default_tolerance():
    """Rasterised again by backend.core.annotations, the polygons cover the mask with IoU >= 0.95 (holes filled)."""
    config = parse_label_config(CONFIG)
    mask = _shapes()
    regions = mask_regions_for(config.outputs[0], "image", "shape", mask, 0.7)
    assert len(regions) == 3 and all(r["type"] == "polygonlabels" for r in regions)
    assert regions[0]["value"]["closed"] and regions[0]["value"]["polygonlabels"] == ["shape"]
    back = _read_back(regions, config)
    filled = mask.copy()
    filled[68:76, 80:95] = True
    assert _iou(back, filled) >= 0.95
    boundary = (mask & ~np.pad(mask, 1)[2:, 1:-1] | mask & ~np.pad(mask, 1)[:-2, 1:-1]
                | mask & ~np.pad(mask, 1)[1:-1, 2:] | mask & ~np.pad(mask, 1)[1:-1, :-2]).sum()
    assert sum(len(r["value"]["points"]) for r in regions) < boundary / 3  # simplified, not every boundary pixel


def test_polygon_points_are_percent_of_the_original_size():
    """A rectangle 20..60 x 10..30 of a 200x100 image has its corners at 10/30 % and 10/29 %."""
    mask = np.zeros((100, 200), bool)
    mask[10:30, 20:60] = True
    [points] = polygons(mask)
    xs, ys = sorted({p[0] for p in points}), sorted({p[1] for p in points})
    assert xs == [10.0, 29.5] and ys == [10.0, 29.0]
    assert POLYGON_TOLERANCE_PX == 0.5


def test_boxes_one_per_part_above_the_minimum_area():
    config = parse_label_config(CONFIG)
    mask = _shapes()
    mask[0:2, 0:2] = True  # a 4-pixel speck: no box
    found = boxes(mask)
    assert len(found) == 3
    regions = mask_regions_for(config.outputs[1], "image", "shape", mask, 0.5)
    assert [r["type"] for r in regions] == ["rectanglelabels"] * 3
    disc = min(found, key=lambda b: b["x"])
    assert disc["x"] == pytest.approx(100 * 13 / 140) and disc["width"] == pytest.approx(100 * 35 / 140)
    back = _read_back(regions, config)
    assert back[60:85, 60:120].all() and not back[50, 5]


def test_empty_mask_gives_no_polygon_or_box():
    control = Control("poly", "polygon", "image", ("shape",))
    assert mask_regions_for(control, "image", "shape", np.zeros((10, 10), bool), 0.0) == []
    assert boxes(np.zeros((10, 10), bool)) == []


def test_config_with_several_outputs_gets_each(tiny_model):
    """Brush, polygon and rectangle controls carrying one label: every one gets its kind of region."""
    from backend.worker.segmenter import label_regions

    config = parse_label_config(CONFIG.replace("</View>", '<BrushLabels name="tag" toName="image">'
                                                          '<Label value="shape"/></BrushLabels></View>'))
    regions = label_regions(config, "shape", _shapes(), 0.5)
    assert sorted({r["type"] for r in regions}) == ["brushlabels", "polygonlabels", "rectanglelabels"]
    assert {r["from_name"] for r in regions} == {"poly", "box", "tag"}


def test_boxes_skip_specks_and_fragments_inside_a_larger_box():
    """Sky-like mask: one large part, 20 small pieces (each over the minimum area but under 5 % of the large
    one), and a piece inside the large part's box: one box. Two objects of similar size: two boxes."""
    mask = np.zeros((300, 400), bool)
    mask[10:120, 10:390] = True  # the sky
    mask[40:60, 100:140] = False  # a hole...
    mask[45:55, 110:130] = True  # ...with a piece of sky seen through it: inside the large box
    for i in range(20):
        mask[200 + (i // 10) * 30 : 205 + (i // 10) * 30, 10 + (i % 10) * 38 : 20 + (i % 10) * 38] = True  # 50 px each
    assert 50 > 0.0002 * mask.size
    [sky] = boxes(mask)
    assert sky["width"] == pytest.approx(95.0) and sky["height"] == pytest.approx(110 / 3)
    two = np.zeros((100, 200), bool)
    two[10:50, 10:60] = True
    two[20:70, 120:150] = True  # 1500 px against 2000 px: an object, not a fragment
    assert len(boxes(two)) == 2


def test_boxes_are_capped_per_label_largest_first():
    """1-px stripes of similar size would give one box each: at most MAX_BOXES_PER_LABEL, the largest first."""
    from backend.worker.regions import MAX_BOXES_PER_LABEL

    mask = np.zeros((400, 1200), bool)
    mask[:, ::2] = True  # 600 stripes of 400 px
    mask[:, 0] = False
    mask[:300, 0] = True  # ... and one shorter one
    found = boxes(mask)
    assert len(found) == MAX_BOXES_PER_LABEL and all(b["height"] == pytest.approx(100.0) for b in found)
