"""SUPPORT_POLICY=similar: for each query, the K examples of a label whose pictures are most like it.

A label's pool is all its examples with one descriptor each (from the VAE latent of the example's image,
kept in Redis so that any worker computes it once); a worker holds each pool at the label's current
revision. The chosen examples' memories are per-example parts (cached by the model, bounded in bytes) and
are composed for the query, so a pool of any size is never encoded as a whole.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from model import DiffewS, SupportMemory, compose, most_similar

from ..core.descriptors import DescriptorStore, image_field
from ..core.store import Example, SupportStore

logger = logging.getLogger(__name__)

ExampleLoader = Callable[[Example, str], "tuple[np.ndarray, np.ndarray] | None"]
"""(example, label) -> its RGB image and mask, or None when it cannot be used (the reason is recorded)."""


@dataclass
class LabelPool:
    """A label's usable examples at one revision and their descriptors, row for row."""

    revision: int
    examples: list[Example]
    descriptors: np.ndarray


class SimilarSupports:
    """The pools and per-example memories of one worker process (shared by its segmenters)."""

    def __init__(self, store: SupportStore):
        self.store = store
        self.descriptor_store = DescriptorStore(store.redis)
        self._pools: dict[tuple[str, int, str], LabelPool] = {}
        self._parts: dict[tuple[str, int, str, int, str], str] = {}
        """(version, project, label, annotation, regions stamp) -> the model's cache key of that example's memory."""

    def pool(self, model: DiffewS, pid: int, label: str, revision: int, load: ExampleLoader) -> LabelPool:
        """The label's pool at `revision`: from this process's memory, else read, missing descriptors computed."""
        space = model.descriptor_space
        slot = (space, pid, label)
        cached = self._pools.get(slot)
        if cached is not None and cached.revision == revision:
            return cached
        examples = self.store.pool(pid, label)
        fields = [image_field(e.task_id, e.image_url) for e in examples]
        found = self.descriptor_store.get_many(pid, space, fields)
        missing = [i for i, d in enumerate(found) if d is None]
        computed: dict[str, np.ndarray] = {}
        for start in range(0, len(missing), 16):
            chunk = missing[start : start + 16]
            loaded = {i: load(examples[i], label) for i in chunk}
            usable = [i for i in chunk if loaded[i] is not None]
            if usable:
                rows = model.describe_images([loaded[i][0] for i in usable]).numpy()
                for i, row in zip(usable, rows):
                    found[i] = row
                    computed[fields[i]] = row
        self.descriptor_store.put_many(pid, space, computed)
        keep = [i for i, d in enumerate(found) if d is not None]
        dim = len(found[keep[0]]) if keep else 0
        pool = LabelPool(revision, [examples[i] for i in keep],
                         np.stack([found[i] for i in keep]) if keep else np.zeros((0, dim), np.float32))
        self._pools[slot] = pool
        kept = {(e.annotation_id, e.stamp) for e in pool.examples}
        for key in [k for k in self._parts if k[1:3] == (pid, label) and k[3:] not in kept]:
            del self._parts[key]  # examples gone from the label: their memories are never asked for again
        return pool

    def choose(self, model: DiffewS, version: str, pid: int, label: str, revision: int, queries: torch.Tensor,
               shots: int, load: ExampleLoader) -> list[SupportMemory | None] | None:
        """For each query descriptor (rows of `queries`), the memory of the `shots` most similar usable examples
        (None for a query whose chosen examples all failed to load); None when the label has no usable example.
        Queries choosing the same examples share one memory."""
        pool = self.pool(model, pid, label, revision, load)
        if not pool.examples:
            return None
        chosen = [tuple(most_similar(q, pool.descriptors, min(shots, len(pool.examples)))) for q in queries]
        parts = self._parts_of(model, version, pid, label, pool, sorted({i for c in chosen for i in c}), load)
        composed: dict[tuple[int, ...], SupportMemory | None] = {}
        for choice in chosen:
            if choice not in composed:
                usable = [parts[i] for i in choice if parts.get(i) is not None]
                composed[choice] = compose(usable) if usable else None
        return [composed[c] for c in chosen]

    def _parts_of(self, model: DiffewS, version: str, pid: int, label: str, pool: LabelPool, rows: list[int],
                  load: ExampleLoader) -> dict[int, SupportMemory | None]:
        """The per-example memories of pool rows: cached ones with no I/O, the others loaded and encoded together."""
        parts: dict[int, SupportMemory | None] = {}
        missing = []
        for i in rows:
            example = pool.examples[i]
            cache_key = self._parts.get((version, pid, label, example.annotation_id, example.stamp))
            parts[i] = model.support_cache.get(cache_key) if cache_key else None
            if parts[i] is None:
                missing.append(i)
        loaded = {i: load(pool.examples[i], label) for i in missing}
        usable = [i for i in missing if loaded[i] is not None]
        if usable:
            encoded = model.encode_examples([loaded[i][0] for i in usable], [loaded[i][1] for i in usable])
            for i, memory in zip(usable, encoded):
                example = pool.examples[i]
                self._parts[(version, pid, label, example.annotation_id, example.stamp)] = memory.key
                parts[i] = memory
        return parts
