"""Support sets: a per-label index of a project's examples in Redis, and which encoded set each label uses.

The index keeps, per (project, label), the examples ordered by time with the ground-truth ones flagged,
and a revision per label bumped by every change to that label's examples. Selecting K supports then reads
K records, and a worker that already encoded (version, project, label, revision) reads nothing at all.
Written in the same Redis transactions as the examples themselves (backend.core.store).
"""

from __future__ import annotations

from dataclasses import dataclass

from redis import Redis
from redis.client import Pipeline

from .keys import PREFIX

POLICIES = ("ground_truth_first", "newest", "oldest", "similar")
"""SUPPORT_POLICY values: ground truth first then newest; newest first; first labeled first; per query, the most
similar pictures (backend.worker.similar)."""


def member(annotation_id: int) -> str:
    """Index member of an annotation: zero-padded, so ties in time order like annotation ids do."""
    return f"{annotation_id:015d}"


class SupportIndex:
    """Per-label sorted sets of example ids (by update time, ground truth in its own set) and label revisions."""

    def __init__(self, redis: Redis):
        self.redis = redis

    @staticmethod
    def all_key(pid: int, label: str) -> str:
        return f"{PREFIX}:support:{pid}:all:{label}"

    @staticmethod
    def truth_key(pid: int, label: str) -> str:
        return f"{PREFIX}:support:{pid}:gt:{label}"

    @staticmethod
    def revisions_key(pid: int) -> str:
        return f"{PREFIX}:support-rev:{pid}"

    @staticmethod
    def image_key(pid: int, image: str) -> str:
        """The set of examples using one task image (SupportStore: a cached image goes with its last example)."""
        return f"{PREFIX}:support-image:{pid}:{image}"

    @staticmethod
    def built_key(pid: int) -> str:
        """Set once the project's index holds all its examples (see SupportStore.ensure_index); v2 added the image
        sets, so an index built before them is built again."""
        return f"{PREFIX}:support-indexed-v2:{pid}"

    def add(self, pipe: Pipeline, pid: int, annotation_id: int, labels: list[str], ground_truth: bool,
            updated_at: float, image: str) -> None:
        """Queue on `pipe`: index an example under its labels and its image, and bump the labels' revisions."""
        pipe.sadd(self.image_key(pid, image), member(annotation_id))
        for label in labels:
            pipe.zadd(self.all_key(pid, label), {member(annotation_id): updated_at})
            if ground_truth:
                pipe.zadd(self.truth_key(pid, label), {member(annotation_id): updated_at})
            pipe.hincrby(self.revisions_key(pid), label, 1)

    def drop(self, pipe: Pipeline, pid: int, annotation_id: int, labels: list[str], image: str) -> None:
        """Queue on `pipe`: remove an example from its labels' and its image's index and bump the labels' revisions."""
        pipe.srem(self.image_key(pid, image), member(annotation_id))
        for label in labels:
            pipe.zrem(self.all_key(pid, label), member(annotation_id))
            pipe.zrem(self.truth_key(pid, label), member(annotation_id))
            pipe.hincrby(self.revisions_key(pid), label, 1)

    def clear(self, pipe: Pipeline, pid: int, labels: list[str], images: list[str]) -> None:
        """Queue on `pipe`: delete the index of these labels and images (before a rebuild)."""
        keys = [k for label in labels for k in (self.all_key(pid, label), self.truth_key(pid, label))]
        keys += [self.image_key(pid, image) for image in images]
        if keys:
            pipe.delete(*keys)

    def select(self, pid: int, label: str, k: int, policy: str) -> list[int]:
        """Annotation ids of at most k examples of `label`, in policy order (see POLICIES)."""
        if k <= 0:
            return []
        if policy == "oldest":
            ids = self.redis.zrange(self.all_key(pid, label), 0, k - 1)
        elif policy == "newest":
            ids = self.redis.zrevrange(self.all_key(pid, label), 0, k - 1)
        else:
            truth = self.redis.zrevrange(self.truth_key(pid, label), 0, k - 1)
            rest = self.redis.zrevrange(self.all_key(pid, label), 0, k + len(truth) - 1) if len(truth) < k else []
            seen = set(truth)
            ids = (truth + [m for m in rest if m not in seen])[:k]
        return [int(m) for m in ids]

    def revisions(self, pid: int) -> dict[str, int]:
        """Label -> revision of its support set (every label that ever had an example)."""
        return {k.decode(): int(v) for k, v in self.redis.hgetall(self.revisions_key(pid)).items()}

    def counts(self, pid: int) -> dict[str, int]:
        """Label -> number of its examples (labels without any left out)."""
        labels = list(self.revisions(pid))
        pipe = self.redis.pipeline(transaction=False)
        for label in labels:
            pipe.zcard(self.all_key(pid, label))
        return {label: int(n) for label, n in zip(labels, pipe.execute()) if n}


@dataclass(frozen=True)
class SupportSetKey:
    """What identifies an encoded support set: version, project, label, the label's revision and the choice rule."""

    version: str
    project: int
    label: str
    revision: int
    policy: str
    shots: int


class SupportSets:
    """Which encoded support set (its memory cache key) each (version, project, label) uses now, in one process.

    A lookup with the current revision answers without any I/O; a newer revision replaces the entry and
    returns the old cache key, whose memory can then be dropped (that support set is gone for good).
    """

    def __init__(self) -> None:
        self._current: dict[tuple[str, int, str], tuple[SupportSetKey, str]] = {}

    def lookup(self, key: SupportSetKey) -> str | None:
        """The memory cache key encoded for exactly this support set, or None."""
        entry = self._current.get((key.version, key.project, key.label))
        return entry[1] if entry is not None and entry[0] == key else None

    def remember(self, key: SupportSetKey, cache_key: str) -> str | None:
        """Record the memory of a support set; returns the cache key it replaces (None if none or the same)."""
        slot = (key.version, key.project, key.label)
        previous = self._current.get(slot)
        self._current[slot] = (key, cache_key)
        return previous[1] if previous is not None and previous[1] != cache_key else None
