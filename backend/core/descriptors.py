"""Image descriptors of support examples in Redis: computed once by any worker, read by all (no torch here)."""

from __future__ import annotations

import hashlib

import numpy as np
from redis import Redis

from .keys import PREFIX

DESCRIPTOR_DTYPE = np.float32


def image_field(task_id: int, url: str) -> str:
    """The hash field of one task image (a task whose image URL changes gets a new descriptor)."""
    return f"{task_id}:{hashlib.sha256(url.encode()).hexdigest()[:12]}"


class DescriptorStore:
    """One Redis hash per project and descriptor space (a base model's VAE at one working resolution)."""

    def __init__(self, redis: Redis):
        self.redis = redis

    @staticmethod
    def key(pid: int, space: str) -> str:
        return f"{PREFIX}:descriptors:{pid}:{space}"

    def get_many(self, pid: int, space: str, fields: list[str]) -> list[np.ndarray | None]:
        """The stored descriptor of each field, or None where there is none yet."""
        raw = self.redis.hmget(self.key(pid, space), fields) if fields else []
        return [np.frombuffer(r, dtype=DESCRIPTOR_DTYPE).copy() if r else None for r in raw]

    def put_many(self, pid: int, space: str, descriptors: dict[str, np.ndarray]) -> None:
        """Store descriptors by field."""
        if descriptors:
            self.redis.hset(self.key(pid, space), mapping={f: np.asarray(d, DESCRIPTOR_DTYPE).tobytes()
                                                            for f, d in descriptors.items()})
