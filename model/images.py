"""Turn user images and masks (PIL, arrays, bytes, paths) into the tensors DiffewS expects."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InvalidInputError

ImageInput = Union[Image.Image, np.ndarray, bytes, str, os.PathLike]
"""An image: PIL image, HxW / HxWx{1,3,4} array (uint8, uint16, bool or float in [0,1]), encoded bytes or a path."""

MaskInput = Union[Image.Image, np.ndarray, bytes, str, os.PathLike]
"""A mask: HxW array or single-band image; any non-zero pixel is foreground."""


def _open(source: bytes | str | os.PathLike, what: str) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        img.load()
    except FileNotFoundError:
        raise InvalidInputError(f"{what}: no such file {source!s}") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidInputError(f"{what}: cannot decode as an image ({exc})") from None
    return img


def _pil_to_uint8(img: Image.Image) -> np.ndarray:
    """Any PIL mode -> HxWx3 uint8 RGB; 16/32-bit and float modes are rescaled, alpha is dropped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img).astype(np.float64)
        # 16-bit sources are stored in 'I' modes; their full range is 0..65535.
        arr = arr / 65535.0 if arr.max(initial=0) > 255 or img.mode.startswith("I;16") else arr / 255.0
        return _float_to_rgb(arr)
    if img.mode == "F":
        arr = np.asarray(img).astype(np.float64)
        return _float_to_rgb(arr if arr.max(initial=0) <= 1.0 else arr / 255.0)
    return np.asarray(img.convert("RGB"))


def _float_to_rgb(arr: np.ndarray) -> np.ndarray:
    gray = (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)


def _array_to_uint8(arr: np.ndarray, what: str) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise InvalidInputError(f"{what}: expected an HxW, HxWx1, HxWx3 or HxWx4 array, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        out = arr
    elif arr.dtype == np.uint16:
        out = (arr.astype(np.float64) / 65535.0 * 255.0 + 0.5).astype(np.uint8)
    elif arr.dtype == np.bool_:
        out = arr.astype(np.uint8) * 255
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise InvalidInputError(f"{what}: float array contains NaN or infinity")
        out = (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    else:
        raise InvalidInputError(f"{what}: unsupported array dtype {arr.dtype} (use uint8, uint16, bool or float)")
    if out.ndim == 2:
        out = np.repeat(out[..., None], 3, axis=-1)
    return np.ascontiguousarray(out[..., :3])


def to_rgb(image: ImageInput, what: str = "image") -> np.ndarray:
    """Any accepted image -> HxWx3 uint8 RGB, EXIF orientation applied; InvalidInputError otherwise."""
    if isinstance(image, (bytes, str, os.PathLike)):
        image = _open(image, what)
    if isinstance(image, Image.Image):
        if image.width == 0 or image.height == 0:
            raise InvalidInputError(f"{what}: zero-size image {image.width}x{image.height}")
        rgb = _pil_to_uint8(ImageOps.exif_transpose(image))
    elif isinstance(image, np.ndarray):
        rgb = _array_to_uint8(image, what)
    else:
        raise InvalidInputError(f"{what}: expected a PIL image, numpy array, bytes or path, got {type(image).__name__}")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise InvalidInputError(f"{what}: zero-size image {rgb.shape[1]}x{rgb.shape[0]}")
    return rgb


def _mask_band(mask: Image.Image) -> np.ndarray:
    """The band that holds the mask: alpha when it varies (a cut-out), else the grey level of the colours."""
    if mask.mode in ("RGBA", "LA", "PA") or (mask.mode == "P" and "transparency" in mask.info):
        alpha = np.asarray(mask.convert("RGBA").getchannel("A"))
        if alpha.min() != alpha.max():
            return alpha
        mask = mask.convert("RGB")  # opaque everywhere: the mask is drawn in the colours
    if mask.mode in ("RGB", "P", "CMYK"):
        return np.asarray(mask.convert("L"))
    return np.asarray(mask)


def to_mask(mask: MaskInput, what: str = "mask") -> np.ndarray:
    """Any accepted mask -> HxW bool (non-zero = foreground), EXIF orientation applied."""
    if isinstance(mask, (bytes, str, os.PathLike)):
        mask = _open(mask, what)
    if isinstance(mask, Image.Image):
        mask = ImageOps.exif_transpose(mask)
        arr = _mask_band(mask)
    elif isinstance(mask, np.ndarray):
        arr = mask
    else:
        raise InvalidInputError(f"{what}: expected a PIL image, numpy array, bytes or path, got {type(mask).__name__}")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise InvalidInputError(f"{what}: expected an HxW mask, got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InvalidInputError(f"{what}: zero-size mask {arr.shape[1]}x{arr.shape[0]}")
    return arr != 0


def resize_rgb(rgb: np.ndarray, size: int) -> np.ndarray:
    """HxWx3 uint8 -> size x size x 3 uint8, PIL bilinear straight to a square (as the release does)."""
    return np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR))


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """HxW bool -> size x size bool as the release resizes masks (torch `interpolate(mode="nearest")`:
    source index floor(i * in / out)); a mask that nearest drops keeps every cell it touches."""
    small = _nearest(mask, size)
    if not small.any() and mask.any():
        # Objects thinner than one working-resolution cell vanish under nearest (the release then trains on an
        # empty support); keep every touched cell instead.
        small = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.BOX)) > 0
    return small


def _nearest(mask: np.ndarray, size: int) -> np.ndarray:
    # torch itself, not index arithmetic: its float scale rounding is what the release's masks went through
    tensor = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.uint8))[None, None]
    return torch.nn.functional.interpolate(tensor, size=(size, size), mode="nearest")[0, 0].numpy().astype(bool)


def rgb_to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> [3,H,W] float32 in [-1, 1] (ToTensor then Normalize(0.5, 0.5))."""
    return torch.tensor(rgb).permute(2, 0, 1).float().div(255.0).sub(0.5).div(0.5)


def mask_to_tensor(mask: np.ndarray) -> torch.Tensor:
    """HxW bool -> [3,H,W] float32 in {-1, +1}: white foreground on black, three channels."""
    m = torch.tensor(mask).float().mul(2.0).sub(1.0)
    return m.unsqueeze(0).expand(3, -1, -1).contiguous()


def mask_of_image(mask: MaskInput, rgb: np.ndarray, what: str) -> np.ndarray:
    """`to_mask(mask)` checked to have the size of its image `rgb`; InvalidInputError naming `what` otherwise."""
    binary = to_mask(mask, what)
    if binary.shape != rgb.shape[:2]:
        raise InvalidInputError(
            f"{what} is {binary.shape[1]}x{binary.shape[0]} but its image is {rgb.shape[1]}x{rgb.shape[0]}"
        )
    return binary


def support_examples(images: Sequence[ImageInput], masks: Sequence[MaskInput]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Checked support examples: (HxWx3 uint8 RGB, HxW bool mask of that size, not empty) per image;
    InvalidInputError naming what is wrong."""
    if isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
        raise InvalidInputError("support images must be a sequence (list or tuple) of images")
    if isinstance(masks, (str, bytes)) or not isinstance(masks, Sequence):
        raise InvalidInputError("support masks must be a sequence (list or tuple) of masks")
    if len(images) == 0:
        raise InvalidInputError("a support set needs at least one image and mask (got N = 0)")
    if len(images) != len(masks):
        raise InvalidInputError(f"got {len(images)} support images but {len(masks)} masks")
    pairs = []
    for i, (image, mask) in enumerate(zip(images, masks)):
        rgb = to_rgb(image, f"support image {i}")
        binary = mask_of_image(mask, rgb, f"support mask {i}")
        if not binary.any():
            raise InvalidInputError(f"support mask {i} is empty: a support example needs at least one foreground pixel")
        pairs.append((rgb, binary))
    return pairs


def query_images(images: Sequence[ImageInput]) -> list[np.ndarray]:
    """Checked query images as HxWx3 uint8 RGB; InvalidInputError for anything but a non-empty sequence of images."""
    if isinstance(images, (str, bytes)) or not isinstance(images, Sequence) or len(images) == 0:
        raise InvalidInputError("queries must be a non-empty sequence (list or tuple) of images")
    return [to_rgb(image, f"query image {i}") for i, image in enumerate(images)]
