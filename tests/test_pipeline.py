"""DiffewS inference: shapes, sizes, order independence, support reuse, batching and bad inputs."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from model import DiffewS, InvalidInputError, SupportNotSetError
from model.pipeline import _postprocess

from bench.synthetic import square_scene


def test_shapes_dtypes_and_original_size(tiny_model, scenes):
    """Masks come back as bool at each query's own size, with a score in [0, 1] and a map at R x R."""
    images, masks = zip(*scenes[:2])
    memory = tiny_model.encode_support(list(images), list(masks))
    assert memory.num_shots == 2
    for layer, (k, v) in memory.kv.items():
        assert k.shape == v.shape and k.shape[0] == 1 and k.dtype == torch.float32, layer
    queries = [s[0] for s in scenes[2:]]
    outs = tiny_model.segment(queries, memory)
    assert len(outs) == len(queries)
    for out, query in zip(outs, queries):
        assert out.mask.shape == query.shape[:2] and out.mask.dtype == bool
        assert out.probability.shape == (64, 64) and out.probability.dtype == np.float32
        assert 0.0 <= out.score <= 1.0 and 0.0 <= out.threshold <= 0.25


def test_latent_and_token_shapes(tiny_model):
    """Query latents are [B,4,R/8,R/8]; each layer stores N*L tokens (L = that layer's h*w)."""
    image, mask = square_scene(0)
    queries = tiny_model.encode_queries([image, image, image])
    assert queries.latents.shape == (3, 4, 8, 8)
    memory = tiny_model.encode_support([image, image], [mask, mask], use_cache=False)
    tokens = {k.shape[1] for k, _ in memory.kv.values()}
    assert tokens == {2 * 64, 2 * 16}  # 8x8 and 4x4 latent levels, two shots each


def test_shot_order_does_not_matter(tiny_model, scenes):
    """Permuting the shots leaves the predicted maps unchanged (attention over a concatenation)."""
    images, masks = map(list, zip(*scenes[:3]))
    query = [scenes[4][0]]
    a = tiny_model.segment(query, tiny_model.encode_support(images, masks, use_cache=False))[0]
    order = [2, 0, 1]
    b = tiny_model.segment(
        query, tiny_model.encode_support([images[i] for i in order], [masks[i] for i in order], use_cache=False)
    )[0]
    np.testing.assert_allclose(a.probability, b.probability, atol=2 / 255)
    assert (a.mask != b.mask).mean() < 0.01


def test_cached_memory_equals_recomputed(tiny_model, scenes):
    """A cache hit returns the stored memory, and its masks equal those of a fresh encoding."""
    images, masks = map(list, zip(*scenes[:2]))
    tiny_model.support_cache.clear()
    first = tiny_model.encode_support(images, masks)
    again = tiny_model.encode_support([i.copy() for i in images], [m.copy() for m in masks])
    assert again is first and tiny_model.support_cache.hits >= 1
    fresh = tiny_model.encode_support(images, masks, use_cache=False)
    assert fresh is not first
    for name in first.kv:
        torch.testing.assert_close(first.kv[name][0], fresh.kv[name][0])
    queries = [s[0] for s in scenes[2:5]]
    for a, b in zip(tiny_model.segment(queries, first), tiny_model.segment(queries, fresh)):
        np.testing.assert_array_equal(a.mask, b.mask)


def test_batch_equals_single_calls(tiny_model, scenes):
    """A batch of B queries gives the same masks as B calls of one query each."""
    images, masks = map(list, zip(*scenes[:2]))
    memory = tiny_model.encode_support(images, masks)
    queries = [s[0] for s in scenes]
    batched = tiny_model.segment(queries, memory, batch_size=4)
    for query, out in zip(queries, batched):
        single = tiny_model.segment([query], memory, batch_size=1)[0]
        np.testing.assert_allclose(single.probability, out.probability, atol=1.5 / 255)
        assert (single.mask != out.mask).mean() < 0.01
        assert abs(single.score - out.score) < 1e-2


def test_segment_many_matches_segment(tiny_model, scenes):
    """Several labels' memories against shared query encodings give each label's own result."""
    mem_a = tiny_model.encode_support([scenes[0][0]], [scenes[0][1]])
    mem_b = tiny_model.encode_support([scenes[1][0]], [~scenes[1][1]])
    queries = [scenes[3][0], scenes[4][0]]
    many = tiny_model.segment_many(queries, {"a": mem_a, "b": mem_b})
    for label, mem in (("a", mem_a), ("b", mem_b)):
        for i, out in enumerate(tiny_model.segment(queries, mem)):
            np.testing.assert_array_equal(many[i][label].mask, out.mask)


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_segment_many_batches_labels_with_different_shot_counts(tiny_model, scenes, batch_size):
    """Labels of 1, 2 and 2 shots, pairs batched across labels in any batch size: the per-label loop's masks."""
    memories = {"one": tiny_model.encode_support([scenes[0][0]], [scenes[0][1]]),
                "two": tiny_model.encode_support([scenes[1][0], scenes[2][0]], [scenes[1][1], scenes[2][1]]),
                "inverse": tiny_model.encode_support([scenes[1][0], scenes[5][0]], [~scenes[1][1], ~scenes[5][1]])}
    queries = [scenes[3][0], scenes[4][0], scenes[5][0]]
    many = tiny_model.segment_many(queries, memories, batch_size=batch_size)
    assert [list(out) for out in many] == [["one", "two", "inverse"]] * 3
    for label, memory in memories.items():
        for i, out in enumerate(tiny_model.segment(queries, memory, batch_size=1)):
            np.testing.assert_allclose(many[i][label].probability, out.probability, atol=1.5 / 255)
            assert (many[i][label].mask != out.mask).mean() < 0.001 and many[i][label].mask.shape == out.mask.shape


def test_support_memory_lifecycle(tiny_model, scenes):
    """A released memory raises SupportNotSetError; to() and subsample() keep shapes consistent."""
    image, mask = scenes[0]
    memory = tiny_model.encode_support([image] * 4, [mask] * 4, use_cache=False)
    half = memory.subsample(2, torch.Generator().manual_seed(0))
    for name, (k, v) in memory.kv.items():
        assert half.kv[name][0].shape[1] == k.shape[1] // 2 == half.kv[name][1].shape[1]
    assert memory.subsample(4) is memory
    assert memory.to("cpu") is memory
    assert memory.to(dtype=torch.float64).kv[name][0].dtype == torch.float64
    assert memory.nbytes > 0
    memory.release()
    with pytest.raises(SupportNotSetError, match="released"):
        tiny_model.segment([image], memory)
    with pytest.raises(InvalidInputError, match="shots >= 1"):
        half.subsample(0)


def test_token_subsampling_config_changes_output(scenes):
    """support_token_shots (paper Tab. 6) subsamples at query time: output differs from no subsampling."""
    from dataclasses import replace

    model = DiffewS.tiny(resolution=64)
    images, masks = map(list, zip(*scenes[:4]))
    memory = model.encode_support(images, masks)
    full = model.segment([scenes[5][0]], memory)[0]
    model.config = replace(model.config, support_token_shots=1)
    sub = model.segment([scenes[5][0]], memory, generator=torch.Generator().manual_seed(0))[0]
    assert not np.allclose(full.probability, sub.probability)


def test_postprocess_threshold_and_score():
    """Threshold = ratio x peak; score = mean margin above it inside the mask over the room above it;
    empty or full masks score 0."""
    prob = torch.zeros(4, 4)
    prob[:2, :2] = 0.8
    prob[0, 0] = 0.4
    out = _postprocess(prob, torch.tensor(0.8), 0.25, (8, 8))
    assert out.threshold == pytest.approx(0.2)
    assert out.mask.shape == (8, 8) and out.mask[:4, :4].all() and out.mask.sum() == 16
    assert out.score == pytest.approx(((0.4 - 0.2) + 3 * (0.8 - 0.2)) / 4 / 0.8)
    empty = _postprocess(torch.zeros(4, 4), torch.tensor(0.0), 0.25, (3, 5))
    assert empty.score == 0.0 and not empty.mask.any()
    full = _postprocess(torch.full((4, 4), 0.5), torch.tensor(0.5), 0.25, (4, 4))
    assert full.mask.all() and full.score == 0.0


def test_score_counts_the_mask_area_against_the_supports():
    """With the supports' mean foreground share, the margin is multiplied by exp(-|log(share / support share)|):
    a mask of the supports' size keeps its margin, one twice or half that size keeps half of it."""
    prob = torch.zeros(4, 4)
    prob[:2, :2] = 0.8  # a quarter of the map
    margin = _postprocess(prob, torch.tensor(0.8), 0.25, (4, 4)).score
    assert _postprocess(prob, torch.tensor(0.8), 0.25, (4, 4), 0.25).score == pytest.approx(margin)
    assert _postprocess(prob, torch.tensor(0.8), 0.25, (4, 4), 0.5).score == pytest.approx(margin / 2)
    assert _postprocess(prob, torch.tensor(0.8), 0.25, (4, 4), 0.125).score == pytest.approx(margin / 2)


def test_memories_carry_their_masks_shares(tiny_model, scenes):
    """Each shot's foreground share travels with its memory through compose, split and device moves."""
    from model.support import compose, split_shots

    images, masks = map(list, zip(*scenes[:3]))
    memory = tiny_model.encode_support(images, masks, use_cache=False)
    assert memory.shares.shape == (3,) and all(0 < float(v) < 1 for v in memory.shares)
    parts = split_shots(memory)
    torch.testing.assert_close(compose(parts).shares, memory.shares)
    assert memory.to("cpu", torch.float64).shares is memory.shares


# ---- image formats -------------------------------------------------------------------------


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_accepts_rgba_gray_16bit_bytes_and_pil(tiny_model):
    """RGBA, grayscale, 16-bit, float arrays, PIL images and encoded bytes all segment at their size."""
    image, mask = square_scene(1)
    memory = tiny_model.encode_support([Image.fromarray(image)], [Image.fromarray(mask.astype(np.uint8) * 255)])
    gray16 = (image[..., 0].astype(np.uint16) * 257)
    variants = [
        np.dstack([image, np.full(image.shape[:2], 255, np.uint8)]),  # RGBA array
        image[..., 0],  # grayscale array
        gray16,  # 16-bit array
        image.astype(np.float32) / 255,  # float array
        _png(Image.fromarray(gray16)),  # 16-bit PNG bytes
        _png(Image.fromarray(image).convert("P")),  # palette PNG
        Image.fromarray(image).convert("LA"),
    ]
    for out in tiny_model.segment(variants, memory):
        assert out.mask.shape == image.shape[:2]


def test_16bit_image_is_rescaled_not_clipped(tiny_model):
    """A 16-bit image gives the same preprocessing as its 8-bit version (no saturation to white)."""
    from model.images import to_rgb

    image = np.linspace(0, 255, 48 * 64, dtype=np.float64).reshape(48, 64).astype(np.uint8)
    via16 = to_rgb(_png(Image.fromarray(image.astype(np.uint16) * 257)))
    assert np.abs(via16[..., 0].astype(int) - image).max() <= 1


def test_exif_orientation_is_applied(tiny_model):
    """A JPEG tagged 'rotate 90' is segmented in its displayed orientation (H and W swapped)."""
    image, mask = square_scene(2, (40, 60))
    pil = Image.fromarray(image)
    exif = pil.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW on display
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", exif=exif)
    memory = tiny_model.encode_support([image], [mask])
    out = tiny_model.segment([buf.getvalue()], memory)[0]
    assert out.mask.shape == (60, 40)


# ---- bad inputs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "images,masks,message",
    [
        ([], [], "N = 0"),
        ([np.zeros((8, 8, 3), np.uint8)], [np.zeros((8, 8), bool)], "support mask 0 is empty"),
        ([np.zeros((8, 8, 3), np.uint8)], [np.ones((8, 9), bool)], "support mask 0 is 9x8 but its image is 8x8"),
        ([np.zeros((0, 8, 3), np.uint8)], [np.ones((0, 8), bool)], "zero-size"),
        ([b"this is not an image"], [np.ones((8, 8), bool)], "support image 0: cannot decode"),
        ([np.zeros((8, 8, 3), np.uint8)] * 2, [np.ones((8, 8), bool)], "2 support images but 1 masks"),
        ([np.zeros((8, 8, 2), np.uint8)], [np.ones((8, 8), bool)], "shape \\(8, 8, 2\\)"),
        ([np.zeros((8, 8, 3), np.int64)], [np.ones((8, 8), bool)], "dtype int64"),
        ([np.full((8, 8, 3), np.nan, np.float32)], [np.ones((8, 8), bool)], "NaN"),
        ([np.zeros((8, 8, 3), np.uint8)], [np.ones((8, 8, 3), bool)], "HxW mask"),
        ("image.png", [np.ones((8, 8), bool)], "sequence"),
        ([42], [np.ones((8, 8), bool)], "got int"),
        (["/nonexistent/image.png"], [np.ones((8, 8), bool)], "no such file"),
    ],
    ids=["N0", "empty-mask", "size-mismatch", "zero-size", "not-image-bytes", "count-mismatch",
         "two-channels", "int64", "nan", "3d-mask", "string", "int", "missing-file"],
)
def test_bad_support_inputs(tiny_model, images, masks, message):
    """Each unusable support input raises InvalidInputError naming what was wrong."""
    with pytest.raises(InvalidInputError, match=message):
        tiny_model.encode_support(images, masks)


def test_bad_queries_and_threshold(tiny_model, scenes):
    """Empty query list, undecodable query and a threshold outside (0, 1) raise InvalidInputError."""
    memory = tiny_model.encode_support([scenes[0][0]], [scenes[0][1]])
    with pytest.raises(InvalidInputError, match="non-empty"):
        tiny_model.segment([], memory)
    with pytest.raises(InvalidInputError, match="query image 1: cannot decode"):
        tiny_model.segment([scenes[1][0], b"\x89PNG broken"], memory)
    with pytest.raises(InvalidInputError, match="threshold_ratio"):
        tiny_model.segment([scenes[1][0]], memory, threshold_ratio=1.5)


def test_tiny_mask_survives_resize(tiny_model):
    """A one-pixel object in a large image still gives a non-empty working-resolution mask."""
    from model.images import resize_mask

    mask = np.zeros((1000, 1000), bool)
    mask[500, 500] = True
    assert resize_mask(mask, 64).sum() >= 1


def test_channels_last_gives_same_masks(scenes):
    """The channels_last option changes memory layout only: same maps within float tolerance."""
    a, b = DiffewS.tiny(resolution=64), DiffewS.tiny(resolution=64)
    b.enable_channels_last()
    images, masks = map(list, zip(*scenes[:2]))
    out_a = a.segment([scenes[3][0]], a.encode_support(images, masks))[0]
    out_b = b.segment([scenes[3][0]], b.encode_support(images, masks))[0]
    np.testing.assert_allclose(out_a.probability, out_b.probability, atol=2 / 255)
    assert b.describe()["unet_parameters"] == a.describe()["unet_parameters"] > 0
