"""Label Studio brush RLE: encoder and decoder for the editor's RGBA bit-stream format.

Written by hand because the SDK's codec (label_studio_sdk.converter.brush) builds Python bit strings
character by character (seconds for a 12-megapixel mask) and asserts on bad input. This one finds
runs with numpy and packs bits with np.packbits; tests check it against the SDK in both directions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RLE_SIZES = (3, 4, 8, 16)
"""Bit widths of the four run-count sizes the editor and the SDK use."""
WORD_SIZE = 8
"""Bits per value: the RGBA bytes."""
HEADER_BITS = 32 + 5 + 4 * 4
MAX_COUNT = 1 << RLE_SIZES[-1]
"""Longest run one record can hold (65536 values)."""


class RLEError(ValueError):
    """An RLE that cannot be decoded, or whose length does not match the image it claims to cover."""


def _size_index(counts: np.ndarray) -> np.ndarray:
    """Smallest k with count <= 2**RLE_SIZES[k], per count."""
    limits = np.array([1 << s for s in RLE_SIZES])
    return np.searchsorted(limits, counts, side="left")


def _runs(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(run values, run lengths) of a 1-D array."""
    if values.size == 0:
        return values[:0], np.zeros(0, np.int64)
    starts = np.concatenate([[0], np.flatnonzero(values[1:] != values[:-1]) + 1])
    lengths = np.diff(np.append(starts, values.size))
    return values[starts], lengths


def _split(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split runs longer than MAX_COUNT: per piece, (source run, offset of the piece in it, piece length)."""
    pieces = -(-lengths // MAX_COUNT)
    source = np.repeat(np.arange(lengths.size), pieces)
    offset = (np.arange(source.size) - np.repeat(np.cumsum(pieces) - pieces, pieces)) * MAX_COUNT
    return source, offset, np.minimum(lengths[source] - offset, MAX_COUNT)


def encode_runs(run_values: np.ndarray, run_lengths: np.ndarray) -> list[int]:
    """Encode runs (value, length) as an LS RLE: runs of 2+ become repeat records, singletons literal blocks."""
    run_values = np.asarray(run_values, dtype=np.int64)
    run_lengths = np.asarray(run_lengths, dtype=np.int64)
    total = int(run_lengths.sum())
    single = run_lengths == 1
    offsets = np.cumsum(run_lengths) - run_lengths  # start of each run in the value stream

    # Repeat records: runs of two or more, split at MAX_COUNT.
    rep_src, rep_off, rep_len = _split(run_lengths[~single])
    rep_vals = run_values[~single][rep_src]
    rep_start = offsets[~single][rep_src] + rep_off

    # Literal records: maximal stretches of consecutive singleton runs, split at MAX_COUNT.
    single_idx = np.flatnonzero(single)
    group_break = np.flatnonzero(np.diff(single_idx) != 1) + 1
    group_first = np.concatenate([[0], group_break]) if single_idx.size else np.zeros(0, np.int64)
    group_len = np.diff(np.append(group_first, single_idx.size))
    lit_src, lit_off, lit_len = _split(group_len)
    lit_start = offsets[single_idx[group_first[lit_src] + lit_off]] if lit_len.size else np.zeros(0, np.int64)
    lit_values = run_values[single_idx]

    # Interleave both record kinds in stream order, then lay out every field (value, width).
    is_rep = np.concatenate([np.ones(rep_len.size, bool), np.zeros(lit_len.size, bool)])
    count = np.concatenate([rep_len, lit_len])
    order = np.argsort(np.concatenate([rep_start, lit_start]), kind="stable")
    is_rep, count = is_rep[order], count[order]
    kind_pos = np.concatenate([np.arange(rep_len.size), np.arange(lit_len.size)])[order]
    k = _size_index(count)
    n_fields = np.where(is_rep, 4, 3 + count)
    rec = np.repeat(np.arange(count.size), n_fields)
    idx = np.arange(rec.size) - np.repeat(np.cumsum(n_fields) - n_fields, n_fields)
    lit_value_first = np.cumsum(lit_len) - lit_len  # position of each literal record's values in lit_values
    widths = np.select(
        [idx == 0, idx == 1, idx == 2], [1, 2, np.array(RLE_SIZES)[k[rec]]], WORD_SIZE
    )
    rep_rec, pos_rec = is_rep[rec], kind_pos[rec]
    value_of_field = np.where(
        rep_rec,
        rep_vals[np.where(rep_rec, pos_rec, 0)] if rep_vals.size else 0,
        lit_values[np.where(~rep_rec, lit_value_first[np.where(~rep_rec, pos_rec, 0)] + idx - 3, 0).clip(0)]
        if lit_values.size else 0,
    )
    values = np.select([idx == 0, idx == 1, idx == 2], [rep_rec.astype(np.int64), k[rec], count[rec] - 1], value_of_field)

    header_vals = np.array([total, WORD_SIZE - 1, *(s - 1 for s in RLE_SIZES)], dtype=np.int64)
    header_widths = np.array([32, 5, 4, 4, 4, 4])
    return _pack(np.concatenate([header_vals, values]), np.concatenate([header_widths, widths])).tolist()


def _pack(values: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Concatenate each value's `width` low bits, MSB first, into bytes (last byte zero-padded)."""
    widths = widths.astype(np.int64)
    field_start = np.cumsum(widths) - widths
    bit_field = np.repeat(np.arange(widths.size), widths)
    shift = widths[bit_field] - 1 - (np.arange(bit_field.size) - field_start[bit_field])
    bits = ((values[bit_field] >> shift) & 1).astype(np.uint8)
    return np.packbits(bits)


def encode(values: Sequence[int] | np.ndarray) -> list[int]:
    """Encode a flat sequence of byte values (0..255) as an LS RLE."""
    arr = np.asarray(values)
    if arr.ndim != 1 or (arr.size and (arr.min() < 0 or arr.max() > 255)):
        raise RLEError("RLE values must be a flat sequence of integers in 0..255")
    return encode_runs(*_runs(arr.astype(np.uint8)))


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """HxW bool mask -> LS brush RLE (RGBA, all four bytes 255 where painted)."""
    if mask.ndim != 2:
        raise RLEError(f"expected an HxW mask, got shape {mask.shape}")
    # Runs of pixels are runs of RGBA bytes four times as long, so the runs are found on the mask.
    pixel_values, pixel_lengths = _runs(mask.reshape(-1).astype(np.uint8))
    return encode_runs(pixel_values.astype(np.int64) * 255, pixel_lengths * 4)


class _Bits:
    """Sequential reader of big-endian bit fields."""

    def __init__(self, data: bytes):
        self.data = data + b"\x00" * 5  # room for the last window
        self.size = len(data) * 8
        self.pos = 0

    def read(self, n: int) -> int:
        if self.pos + n > self.size:
            raise RLEError(f"RLE ends early: needed {n} more bits at bit {self.pos} of {self.size}")
        byte, off = self.pos >> 3, self.pos & 7
        window = int.from_bytes(self.data[byte : byte + 5], "big")  # 40 bits cover off + n <= 39
        self.pos += n
        return (window >> (40 - off - n)) & ((1 << n) - 1)


MAX_VALUES_PER_BIT = MAX_COUNT // 27 + 1
"""Most values a bit of RLE can stand for: one repeat record (1 + 2 + 16 + 8 bits) covers 65536 values."""


def decode(rle: Sequence[int] | np.ndarray, expected: int | None = None) -> np.ndarray:
    """Decode an LS RLE to its flat uint8 values; accepts one record per literal or grouped literals.

    `expected`: the value count the RLE must declare (checked before anything is allocated). Memory is
    bounded by the input either way: a header claiming more values than its bits can encode is refused.
    """
    try:
        arr = np.asarray(rle, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise RLEError(f"RLE must be a list of integers ({exc})") from None
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise RLEError("RLE bytes must be integers in 0..255")
    data = arr.astype(np.uint8).tobytes()
    bits = _Bits(data)
    if bits.size < HEADER_BITS:
        raise RLEError(f"RLE of {len(data)} bytes is shorter than its {HEADER_BITS}-bit header")
    num = bits.read(32)
    if expected is not None and num != expected:
        raise RLEError(f"RLE declares {num} values but {expected} are expected")
    if num > (bits.size - HEADER_BITS) * MAX_VALUES_PER_BIT:
        raise RLEError(f"RLE declares {num} values but its {len(data)} bytes cannot encode that many")
    word = bits.read(5) + 1
    sizes = [bits.read(4) + 1 for _ in range(4)]
    if word != WORD_SIZE:
        raise RLEError(f"RLE word size {word} is not supported (expected 8)")
    out = np.empty(num, dtype=np.uint8)
    unpacked: np.ndarray | None = None
    i = 0
    while i < num:
        repeat = bits.read(1)
        count = bits.read(sizes[bits.read(2)]) + 1
        j = i + count
        if j > num:
            raise RLEError(f"RLE record overruns the declared {num} values")
        if repeat:
            out[i:j] = bits.read(WORD_SIZE)
        elif count < 16:
            for t in range(i, j):
                out[t] = bits.read(WORD_SIZE)
        else:  # long literal block: slice the bit array at once
            if unpacked is None:
                unpacked = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
            end = bits.pos + count * WORD_SIZE
            if end > bits.size:
                raise RLEError(f"RLE ends early inside a literal block at bit {bits.pos}")
            out[i:j] = np.packbits(unpacked[bits.pos : end])
            bits.pos = end
        i = j
    return out


def declared_length(rle: Sequence[int]) -> int:
    """The value count an RLE's header declares (reads 4 bytes: a cheap length check before decoding)."""
    head = list(rle[:4]) if isinstance(rle, (list, tuple)) else None
    if head is None or len(head) < 4 or not all(isinstance(b, int) and 0 <= b <= 255 for b in head):
        raise RLEError("RLE must be a list of at least 4 integers in 0..255")
    return int.from_bytes(bytes(head), "big")


def rle_to_mask(rle: Sequence[int], width: int, height: int) -> np.ndarray:
    """LS brush RLE -> HxW bool mask (painted where alpha != 0); RLEError if its length is not W*H*4."""
    try:
        values = decode(rle, expected=width * height * 4)
    except RLEError as exc:
        raise RLEError(f"{exc} for a {width}x{height} image (W*H*4)") from None
    return values.reshape(height, width, 4)[..., 3] != 0
