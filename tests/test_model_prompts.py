"""model/prompts.py: box and point prompts: crop and paste geometry, component selection, segmentation inside a box."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from model import InvalidInputError
from model.images import to_rgb
from model.prompts import (Box, Point, box_around, box_of_mask, crop, paste, point_inside, segment_box,
                           segment_points, select_components)

from bench.synthetic import square_scene


def test_box_clipping_and_margin_at_borders():
    """Rounded outwards, clipped to a non-square image; the margin never leaves the image."""
    shape = (40, 100)
    box = Box.clipped(-5.2, 30.5, 20.1, 55, shape)
    assert box == Box(0, 30, 21, 40)
    wide = box.widened(0.1, shape)
    assert wide == Box(0, 26, 25, 40)
    with pytest.raises(InvalidInputError, match="outside the 100x40 image"):
        Box.clipped(120, 0, 130, 10, shape)


def test_crop_then_paste_puts_pixels_back_and_clears_outside_the_box():
    rng = np.random.default_rng(0)
    mask = rng.random((30, 50)) > 0.5
    around, keep = Box(10, 5, 40, 25), Box(14, 8, 36, 20)
    pasted = paste(crop(mask, around), around, keep, mask.shape)
    inside = np.zeros_like(mask)
    inside[8:20, 14:36] = True
    np.testing.assert_array_equal(pasted, mask & inside)
    with pytest.raises(InvalidInputError, match="does not fit the crop box"):
        paste(mask[:3, :3], around, keep, mask.shape)


def test_box_and_point_of_a_mask():
    mask = np.zeros((20, 30), bool)
    mask[4:10, 6:20] = True
    assert box_of_mask(mask) == Box(6, 4, 20, 10) and box_of_mask(~np.ones_like(mask)) is None
    p = point_inside(mask)
    assert mask[int(p.y), int(p.x)] and 6 <= p.y <= 7 and 8 <= p.x <= 17  # 3 px from the border (ties: first)
    assert point_inside(np.zeros_like(mask)) is None
    assert box_around(Point(0, 0), (20, 30)) == Box(0, 0, 5, 5)


def _two_blobs() -> np.ndarray:
    mask = np.zeros((20, 40), bool)
    mask[2:8, 2:8] = True
    mask[10:18, 25:35] = True
    return mask


def test_positive_point_keeps_its_component_or_the_nearest():
    mask = _two_blobs()
    left = select_components(mask, [Point(4, 4)])
    assert left[2:8, 2:8].all() and not left[10:18, 25:35].any()
    touching = select_components(mask, [Point(8.2, 5)])  # one pixel right of the left blob
    assert touching[2:8, 2:8].all() and touching.sum() == 36
    nearest = select_components(mask, [Point(39, 19)])  # on no blob: the nearest one
    assert nearest[10:18, 25:35].all() and nearest.sum() == 80
    both = select_components(mask, [Point(4, 4), Point(30, 14)])
    np.testing.assert_array_equal(both, mask)


def test_negative_point_removes_its_component():
    mask = _two_blobs()
    kept = select_components(mask, [Point(30, 14, positive=False)])
    assert kept[2:8, 2:8].all() and not kept[10:18, 25:35].any()
    assert select_components(mask, [Point(30, 14), Point(30, 14, positive=False)]).sum() == 0
    np.testing.assert_array_equal(select_components(mask, [Point(20, 1, positive=False)]), mask)  # on background


def test_segment_box_is_zero_outside_the_box(tiny_model):
    image, mask = square_scene(1, (60, 90))
    memory = tiny_model.encode_support(*zip(*[square_scene(i, (60, 90)) for i in (2, 3)]))
    box = box_of_mask(mask)
    segmented, score = segment_box(tiny_model, image, memory, box)
    assert segmented.shape == mask.shape and 0.0 <= score <= 1.0
    outside = np.ones_like(mask)
    outside[box.y0 : box.y1, box.x0 : box.x1] = False
    assert not segmented[outside].any()


def test_segment_box_on_an_exif_rotated_image(tiny_model):
    """Coordinates are those of the image as shown (EXIF applied): the box lands on the rotated pixels."""
    image, _ = square_scene(4, (40, 70))
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(image).save(buffer, format="JPEG", exif=exif, quality=95)
    shown = to_rgb(buffer.getvalue())
    assert shown.shape[:2] == (70, 40)
    memory = tiny_model.encode_support([image], [square_scene(4, (40, 70))[1]])
    segmented, _ = segment_box(tiny_model, shown, memory, Box(5, 40, 30, 65))
    assert segmented.shape == (70, 40) and not segmented[:40].any() and not segmented[:, 30:].any()


def test_segment_points_keeps_the_pointed_component(tiny_model):
    image, mask = square_scene(6, (64, 64))
    memory = tiny_model.encode_support(*zip(*[square_scene(i, (64, 64)) for i in (7, 8)]))
    whole = tiny_model.segment([image], memory)[0].mask
    p = point_inside(mask)
    kept, _ = segment_points(tiny_model, image, memory, [p])
    assert kept.sum() <= whole.sum() and (not whole.any() or kept.any())
    np.testing.assert_array_equal(kept, select_components(whole, [p]) if whole.any() else kept)
