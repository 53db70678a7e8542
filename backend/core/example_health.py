"""Support examples that cannot be used now (their image could not be fetched, or their mask not read).

Such an example is skipped without another fetch until its next try, which backs off (RETRY_S); /status counts
it apart from the usable ones. Any success, edit or removal of the example forgets the failure.
"""

from __future__ import annotations

import json

from redis import Redis
from redis.client import Pipeline

from .keys import PREFIX
from .queues import server_time

RETRY_S = (30, 120, 600, 3600)
"""Seconds until the next try after the 1st, 2nd, 3rd and later failures."""


def unusable_key(pid: int) -> str:
    """Hash: annotation id -> {labels, tries, retry_at, message} of the project's unusable examples."""
    return f"{PREFIX}:unusable:{pid}"


def forget(pipe: Pipeline, pid: int, annotation_ids: list[int]) -> None:
    """Queue on `pipe`: forget the failures of these examples (edited or removed)."""
    if annotation_ids:
        pipe.hdel(unusable_key(pid), *[str(a) for a in annotation_ids])


class ExampleHealth:
    """Failures of a project's examples in Redis, shared by every worker (times on Redis's clock)."""

    def __init__(self, redis: Redis):
        self.redis = redis

    def blocked(self, pid: int, annotation_id: int) -> str | None:
        """Why the example is skipped now (its next try is still ahead), or None when it may be tried."""
        raw = self.redis.hget(unusable_key(pid), str(annotation_id))
        if raw is None:
            return None
        record = json.loads(raw)
        wait = record["retry_at"] - server_time(self.redis)
        return f"{record['message']} (next try in {wait:.0f} s)" if wait > 0 else None

    def failed(self, pid: int, annotation_id: int, labels: list[str], message: str) -> float:
        """Record one more failure; returns the seconds until the next try."""
        raw = self.redis.hget(unusable_key(pid), str(annotation_id))
        tries = (json.loads(raw)["tries"] if raw else 0) + 1
        wait = RETRY_S[min(tries, len(RETRY_S)) - 1]
        record = {"labels": labels, "tries": tries, "retry_at": server_time(self.redis) + wait, "message": message}
        self.redis.hset(unusable_key(pid), str(annotation_id), json.dumps(record))
        return wait

    def recovered(self, pid: int, annotation_id: int) -> None:
        """The example loaded: forget its failures."""
        self.redis.hdel(unusable_key(pid), str(annotation_id))

    def unusable(self, pid: int) -> dict[str, dict]:
        """Annotation id -> its failure record (labels, tries, retry_at, message)."""
        return {k.decode(): json.loads(v) for k, v in self.redis.hgetall(unusable_key(pid)).items()}

    def usable_counts(self, counts: dict[str, int], pid: int) -> dict[str, int]:
        """Per-label example counts less the unusable examples."""
        out = dict(counts)
        for record in self.unusable(pid).values():
            for label in record["labels"]:
                if label in out:
                    out[label] -= 1
        return {label: n for label, n in out.items() if n > 0}
