"""Labeled images for training and evaluation: label-map datasets and in-memory samples."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import InvalidInputError
from .images import ImageInput, MaskInput, mask_of_image, resize_mask, resize_rgb, to_rgb

IGNORE = 255
"""Label-map value of void pixels (never foreground, never scored)."""


@dataclass
class Sample:
    """One labeled image at the working resolution: RGB [R, R, 3] uint8, masks per label [R, R] bool."""

    image: np.ndarray
    masks: dict[str, np.ndarray]
    ignore: np.ndarray | None = None
    """[R, R] bool: pixels not scored (void), or None."""
    name: str = ""

    @property
    def valid(self) -> np.ndarray:
        """[R, R] bool: the pixels that are scored (all but the void ones)."""
        return ~self.ignore if self.ignore is not None else np.ones(self.image.shape[:2], dtype=bool)


def make_sample(image: ImageInput, masks: dict[str, MaskInput], resolution: int, name: str = "") -> Sample:
    """A Sample from any accepted image and its masks; InvalidInputError for missing or mismatched masks."""
    rgb = to_rgb(image, f"{name or 'sample'} image")
    if not masks:
        raise InvalidInputError(f"{name or 'sample'}: an image without any mask cannot be used for training")
    resized = {}
    for label, mask in masks.items():
        resized[label] = resize_mask(mask_of_image(mask, rgb, f"{name or 'sample'} mask {label!r}"), resolution)
    return Sample(resize_rgb(rgb, resolution), resized, name=name)


def load_label_map(root: str | Path, split: str, resolution: int, *, limit: int | None = None) -> tuple[list[str], list[Sample]]:
    """A label-map dataset split (classes.txt, <split>/images, <split>/labels; 255 = void) as Samples.

    A class named "background" is never a few-shot target, so it gets no mask here.
    """
    root = Path(root)
    classes_file = root / "classes.txt"
    if not classes_file.is_file():
        raise InvalidInputError(f"{classes_file} is missing: expected one class name per line (label-map layout)")
    classes = [c.strip() for c in classes_file.read_text().splitlines() if c.strip()]
    images = sorted(p for p in (root / split / "images").glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not images:
        raise InvalidInputError(f"{root / split / 'images'} holds no .jpg or .png images")
    samples = []
    for path in images[:limit]:
        label_path = root / split / "labels" / f"{path.stem}.png"
        if not label_path.is_file():
            raise InvalidInputError(f"{path}: no label map {label_path}")
        label_map = np.asarray(Image.open(label_path))
        small = np.asarray(Image.fromarray(label_map).resize((resolution, resolution), Image.NEAREST))
        masks = {name: small == i for i, name in enumerate(classes) if name != "background" and (small == i).any()}
        rgb = to_rgb(path, str(path))
        if rgb.shape[:2] != label_map.shape[:2]:
            raise InvalidInputError(f"{label_path} is {label_map.shape[1]}x{label_map.shape[0]}, its image {rgb.shape[1]}x{rgb.shape[0]}")
        samples.append(Sample(resize_rgb(rgb, resolution), masks, ignore=small == IGNORE, name=path.stem))
    return [c for c in classes if c != "background"], samples
