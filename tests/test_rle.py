"""Brush RLE codec: SDK test vectors, round trips both ways against label_studio_sdk, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle, encode_rle, mask2rle

from backend.core.rle import RLEError, declared_length, decode, encode, mask_to_rle, rle_to_mask

VALUES = [1, 1, 1, 1, 2, 3, 5, 6, 7, 8, 4, 4, 4, 4, 4, 4, 4, 4]
SDK_STYLE = [0, 0, 0, 18, 57, 27, 252, 96, 32, 1, 0, 6, 0, 40, 0, 192, 3, 128, 17, 56, 32]
GROUPED = [0, 0, 0, 18, 57, 27, 252, 96, 34, 129, 1, 130, 131, 3, 132, 78, 8]


def test_encoder_matches_the_literal_grouping_vector():
    """encode() gives the documented literal-grouping bytes for the SDK test input."""
    assert encode(VALUES) == GROUPED


@pytest.mark.parametrize("rle", [SDK_STYLE, GROUPED], ids=["one-record-per-literal", "grouped-literals"])
def test_both_literal_styles_decode(rle):
    """Both the SDK's and the editor's literal styles decode to the input."""
    assert decode(rle).tolist() == VALUES


def test_round_trip_against_sdk_random():
    """Random run-structured arrays: ours -> SDK decode and SDK encode -> ours both round-trip."""
    rng = np.random.default_rng(0)
    for _ in range(30):
        runs = rng.integers(0, 4, rng.integers(1, 400)).astype(np.uint8)
        values = np.repeat(runs, rng.integers(1, 40, runs.size))
        assert (decode_rle(encode(values)) == values).all()
        assert (decode(encode_rle(values)) == values).all()


def test_long_runs_and_long_literals():
    """Runs over 65536 values split correctly; literal blocks over 65536 values too."""
    values = np.concatenate([np.zeros(70000, np.uint8), np.full(140000, 255, np.uint8)])
    assert (decode(encode(values)) == values).all()
    noise = np.random.default_rng(1).integers(0, 256, 70000).astype(np.uint8)
    assert (decode(encode(noise)) == noise).all()
    assert (decode_rle(encode(noise[:3000])) == noise[:3000]).all()


def test_mask_round_trip_with_sdk_mask2rle():
    """mask_to_rle agrees with the SDK's mask2rle decoding; rle_to_mask reads SDK output."""
    mask = np.zeros((37, 53), bool)
    mask[5:20, 10:40] = True
    mask[30, :] = True
    ours = mask_to_rle(mask)
    assert (decode_rle(ours).reshape(37, 53, 4)[..., 3] > 0).tolist() == mask.tolist()
    sdk = mask2rle(mask.astype(np.uint8) * 255)
    assert (rle_to_mask(sdk, 53, 37) == mask).all()
    assert declared_length(ours) == 37 * 53 * 4


def test_large_mask_is_exact():
    """A 4000x3000 mask round-trips exactly (speed is in bench/, not asserted here)."""
    yy, xx = np.mgrid[:3000, :4000]
    mask = (yy - 1500) ** 2 + (xx - 2000) ** 2 < 1000**2
    assert (rle_to_mask(mask_to_rle(mask), 4000, 3000) == mask).all()


@pytest.mark.parametrize(
    "rle,message",
    [
        ([0, 0, 1], "shorter than its 53-bit header"),
        ([0, 0, 0, 18, 57, 27, 252, 96, 32], "ends early"),
        ([0, 0, 0, 18, 57, 27, 252, 96, 32, 1, 0, 6, 0, 40, 0, 192, 3, 128, 17, 56, 300], "0..255"),
        (["a", "b"], "list of integers"),
        ([0, 0, 0, 2, 49, 27, 252, 96, 0, 0], "word size 7"),
        (encode(list(range(100)))[:30], "inside a literal block"),
    ],
    ids=["short-header", "truncated", "byte-out-of-range", "not-ints", "word-size", "truncated-literal"],
)
def test_bad_rle(rle, message):
    """Broken RLEs raise RLEError with the reason."""
    with pytest.raises(RLEError, match=message):
        decode(rle)


def test_wrong_length_for_image():
    """An RLE whose value count is not W*H*4 is refused, naming both numbers."""
    rle = mask_to_rle(np.ones((4, 4), bool))
    with pytest.raises(RLEError, match="declares 64 values but 80 are expected for a 5x4 image"):
        rle_to_mask(rle, 5, 4)
    with pytest.raises(RLEError, match="at least 4 integers"):
        declared_length([1, 2])
    with pytest.raises(RLEError, match="0..255"):
        encode([1, 256])
