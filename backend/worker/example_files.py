"""The disk cache of support examples: task images fetched once, masks rasterised once (no model needed)."""

from __future__ import annotations

import logging

import numpy as np
from PIL import Image

from ..core.annotations import label_masks
from ..core.store import Example, SupportStore, write_atomic
from .media import MediaFetcher

logger = logging.getLogger(__name__)


class ExampleFiles:
    """Images and masks of a project's examples under MODEL_DIR, filled on first use."""

    def __init__(self, store: SupportStore, fetcher: MediaFetcher):
        self.store = store
        self.fetcher = fetcher

    def image_bytes(self, pid: int, task_id: int, url: str) -> bytes:
        """A task's image, from the disk cache or fetched (and then cached, if the disk lets us)."""
        path = self.store.image_path(pid, task_id, url)
        if path.is_file():
            return path.read_bytes()
        data = self.fetcher.fetch(url, task_id)
        try:
            write_atomic(path, data)
        except OSError as exc:  # MODEL_DIR full or read-only: the prediction still has its bytes
            logger.warning("project %s: cannot cache the image of task %s (%s); using it uncached", pid, task_id, exc)
        return data

    def example_mask(self, pid: int, example: Example, label: str) -> np.ndarray:
        """One label's mask of an example, from the disk cache or rasterised from its regions."""
        path = self.store.mask_path(pid, example, label)
        if path.is_file():
            return np.asarray(Image.open(path).convert("L")) > 0
        mask = label_masks(example.regions)[label]
        try:
            self.store.save_mask(pid, example, label, mask)
        except OSError as exc:
            logger.warning("project %s: cannot cache a mask of annotation %s (%s)", pid, example.annotation_id, exc)
        return mask

    def prepare(self, pid: int, example: Example) -> None:
        """Cache an example's image and masks on disk (ingestion after a webhook)."""
        self.image_bytes(pid, example.task_id, example.image_url)
        for label in example.labels:
            self.example_mask(pid, example, label)
