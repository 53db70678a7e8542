"""backend/core/annotations.py: annotation results -> per-label masks (the configs: tests/test_label_config.py)."""

from __future__ import annotations

import numpy as np
import pytest

from backend.core.annotations import label_masks, mask_regions
from backend.core.errors import BadRequest
from backend.core.label_config import parse_label_config
from backend.core.rle import mask_to_rle

CONFIG = """
<View>
  <Image name="img" value="$image"/>
  <BrushLabels name="tag" toName="img"><Label value="car"/><Label value="road"/></BrushLabels>
  <PolygonLabels name="poly" toName="img"><Label value="car"/></PolygonLabels>
  <RectangleLabels name="box" toName="img"><Label value="road"/><Label value="sky"/></RectangleLabels>
</View>
"""


def brush(label: str, mask: np.ndarray, from_name: str = "tag") -> dict:
    """A brushlabels region as Label Studio stores it."""
    h, w = mask.shape
    return {"from_name": from_name, "to_name": "img", "type": "brushlabels", "original_width": w,
            "original_height": h, "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [label]}}


def test_brush_polygon_rectangle_union_per_label():
    """Brush, polygon and rectangle regions rasterise at the original size and unite per label."""
    config = parse_label_config(CONFIG)
    car = np.zeros((20, 40), bool)
    car[2:5, 3:9] = True
    result = [
        brush("car", car),
        {"from_name": "poly", "to_name": "img", "type": "polygonlabels", "original_width": 40, "original_height": 20,
         "value": {"points": [[50, 50], [75, 50], [75, 100], [50, 100]], "polygonlabels": ["car"]}},
        {"from_name": "box", "to_name": "img", "type": "rectanglelabels", "original_width": 40, "original_height": 20,
         "value": {"x": 0, "y": 0, "width": 25, "height": 50, "rotation": 0, "rectanglelabels": ["road"]}},
        {"from_name": "box", "to_name": "img", "type": "rectanglelabels", "original_width": 40, "original_height": 20,
         "value": {"x": 0, "y": 0, "width": 5, "height": 5, "rectanglelabels": ["sky"]}},
        {"from_name": "box", "to_name": "img", "type": "rectanglelabels", "original_width": 40, "original_height": 20,
         "value": {"x": 0, "y": 0, "width": 5, "height": 5, "rectanglelabels": ["tree"]}},  # in no control
        {"from_name": "other", "type": "choices", "value": {"choices": ["x"]}},
    ]
    masks = label_masks(mask_regions(result, config))
    assert set(masks) == {"car", "road", "sky"}
    assert masks["car"][2:5, 3:9].all() and masks["car"][10:20, 20:30].all() and not masks["car"][15, 5]
    assert masks["road"][:10, :10].all() and masks["road"].sum() == pytest.approx(11 * 11, abs=25)


def test_rotated_rectangle():
    """A rectangle rotated 90 degrees about its top-left corner lands left of and below that corner."""
    config = parse_label_config(CONFIG)
    region = {"from_name": "box", "to_name": "img", "type": "rectanglelabels", "original_width": 100, "original_height": 100,
              "value": {"x": 50, "y": 10, "width": 20, "height": 10, "rotation": 90, "rectanglelabels": ["road"]}}
    mask = label_masks(mask_regions([region], config))["road"]
    ys, xs = np.nonzero(mask)
    assert 39 <= xs.min() <= 41 and xs.max() <= 51 and 9 <= ys.min() <= 11 and 29 <= ys.max() <= 31


@pytest.mark.parametrize(
    "region,message",
    [
        ({"from_name": "tag", "type": "brushlabels", "original_width": 5, "original_height": 4,
          "value": {"format": "rle", "rle": mask_to_rle(np.ones((4, 4), bool)), "brushlabels": ["car"]}},
         "RLE declares 64 values but a 5x4 image needs 80"),
        ({"from_name": "tag", "type": "brushlabels", "original_width": 4, "original_height": 4,
          "value": {"format": "rle", "rle": [1], "brushlabels": ["car"]}}, "at least 4 integers"),
        ({"from_name": "tag", "type": "brushlabels", "value": {"format": "rle", "rle": [], "brushlabels": ["car"]}},
         "original_width"),
        ({"from_name": "poly", "type": "polygonlabels", "original_width": 4, "original_height": 4,
          "value": {"points": [[1, 2]], "polygonlabels": ["car"]}}, "at least 3"),
        ({"from_name": "box", "type": "rectanglelabels", "original_width": 4, "original_height": 4,
          "value": {"x": "a", "rectanglelabels": ["road"]}}, "numeric x"),
        ("not a dict", "must be an object"),
    ],
    ids=["rle-wrong-length", "rle-too-short", "no-size", "polygon-2-points", "rect-not-numeric", "not-object"],
)
def test_bad_regions(region, message):
    """Malformed regions raise BadRequest naming the region and the problem."""
    with pytest.raises(BadRequest, match=message):
        mask_regions([region], parse_label_config(CONFIG))


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"value": ["car"]}, "value is list, not an object"),
        ({"value": {"format": "rle", "rle": [], "brushlabels": [["car"]]}}, "labels [['car']] name no label"),
        ({"value": {"format": "rle", "rle": [], "brushlabels": ["bus"]}}, "labels ['bus'] name no label"),
        ({"from_name": "other"}, "from_name 'other' is no mask control"),
    ],
    ids=["value-list", "nested-labels", "unknown-label", "unknown-control"],
)
def test_skipped_regions_say_why(change, reason):
    """A mask region that cannot be used is skipped with its reason; an annotation with no usable one is refused
    naming it (so /status's annotation_errors shows it), instead of being stored as nothing."""
    from backend.core.store import Example

    region = {**brush("car", np.ones((4, 4), bool)), **change}
    skipped: list[str] = []
    assert mask_regions([region], parse_label_config(CONFIG), skipped=skipped) == [] and reason in skipped[0]
    with pytest.raises(BadRequest, match="no usable mask region: result\\[0\\]"):
        Example.from_annotation({"id": 1, "result": [region]}, {"id": 2, "data": {"image": "x.png"}},
                                parse_label_config(CONFIG))


def test_non_mask_regions_are_not_reported():
    """Regions of other controls (a classification, say) are no mask regions: nothing to report."""
    skipped: list[str] = []
    choice = {"from_name": "weather", "type": "choices", "value": {"choices": ["sunny"]}}
    assert mask_regions([choice], parse_label_config(CONFIG), skipped=skipped) == [] and skipped == []


@pytest.mark.parametrize("value, cancelled", [(True, True), (False, False), (None, False)])
def test_was_cancelled_takes_booleans(value, cancelled):
    """was_cancelled true gives no example, false or absent one; anything else is refused naming it."""
    from backend.core.store import Example

    annotation = {"id": 1, "result": [brush("car", np.ones((4, 4), bool))], "was_cancelled": value}
    example = Example.from_annotation(annotation, {"id": 2, "data": {"image": "x.png"}}, parse_label_config(CONFIG))
    assert (example is None) == cancelled
    with pytest.raises(BadRequest, match="was_cancelled must be true or false, got 'no'"):
        Example.from_annotation({**annotation, "was_cancelled": "no"}, {"id": 2, "data": {"image": "x.png"}},
                                parse_label_config(CONFIG))
