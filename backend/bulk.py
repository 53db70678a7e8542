"""Bulk pre-annotation bookkeeping: per-project progress and the set of tasks already predicted."""

from __future__ import annotations

import time

from redis import Redis

from .queues import QUEUE_BULK, enqueue
from .settings import Settings
from .store import PREFIX

DONE_TTL_S = 90 * 24 * 3600
"""Seconds the set of predicted task ids of one (version, revision) is kept."""


class Progress:
    """A project's bulk pre-annotation progress in Redis (shared by all workers and the status endpoint)."""

    def __init__(self, redis: Redis, pid: int):
        self.redis = redis
        self.pid = pid
        self.key = f"{PREFIX}:progress:{pid}"

    def _done_key(self, version: str, revision: int) -> str:
        return f"{PREFIX}:done:{self.pid}:{version}:{revision}"

    def start(self, version: str, revision: int, *, total: int, skipped: int) -> None:
        """Begin (or extend) a run: counters reset when the version or revision changed."""
        current = self.read()
        same = current.get("version") == version and current.get("revision") == revision
        pipe = self.redis.pipeline()
        if not same:
            pipe.delete(self.key, f"{PREFIX}:failed:{self.pid}")
            pipe.hset(self.key, mapping={"version": version, "revision": revision, "started_at": time.time(),
                                         "total": 0, "done": 0, "failed": 0, "skipped": 0})
        pipe.hincrby(self.key, "total", total)
        pipe.hincrby(self.key, "skipped", skipped)
        pipe.hset(self.key, "updated_at", time.time())
        pipe.execute()

    def is_done(self, version: str, revision: int, task_id: int) -> bool:
        """True if this task already has a posted prediction of this version and revision."""
        return bool(self.redis.sismember(self._done_key(version, revision), task_id))

    def mark_done(self, version: str, revision: int, task_id: int) -> None:
        """Record a posted prediction (counted once, however often a batch is retried)."""
        key = self._done_key(version, revision)
        if self.redis.sadd(key, task_id):
            pipe = self.redis.pipeline()
            pipe.expire(key, DONE_TTL_S)
            pipe.hincrby(self.key, "done", 1)
            pipe.hset(self.key, "updated_at", time.time())
            pipe.execute()

    def mark_failed(self, task_id: int, message: str) -> None:
        """Record a task that could not be predicted, with why."""
        if self.redis.hset(f"{PREFIX}:failed:{self.pid}", task_id, message):
            self.redis.hincrby(self.key, "failed", 1)
        self.redis.hset(self.key, mapping={"last_error": message, "updated_at": time.time()})

    def read(self) -> dict:
        """Current counters, with numbers as numbers."""
        raw = {k.decode(): v.decode() for k, v in self.redis.hgetall(self.key).items()}
        for name in ("total", "done", "failed", "skipped", "revision"):
            if name in raw:
                raw[name] = int(raw[name])
        for name in ("started_at", "updated_at"):
            if name in raw:
                raw[name] = float(raw[name])
        return raw

    def failures(self) -> dict[int, str]:
        """Tasks that failed in the current run, with their messages."""
        raw = self.redis.hgetall(f"{PREFIX}:failed:{self.pid}")
        return {int(k): v.decode() for k, v in raw.items()}


def enqueue_batches(redis: Redis, settings: Settings, pid: int, tasks: list[dict], version: str, revision: int) -> dict:
    """Split tasks into bulk jobs on predict-bulk, skipping those already predicted for this version and revision."""
    progress = Progress(redis, pid)
    todo = [t for t in tasks if not progress.is_done(version, revision, int(t["id"]))]
    progress.start(version, revision, total=len(todo), skipped=len(tasks) - len(todo))
    jobs = []
    for start in range(0, len(todo), settings.bulk_batch_size):
        batch = todo[start : start + settings.bulk_batch_size]
        job = enqueue(redis, QUEUE_BULK, "backend.jobs.prelabel_batch", args=(pid, batch, version, revision),
                      timeout_s=settings.job_timeout_s, retries=2, meta={"project": pid, "tasks": len(batch)})
        jobs.append(job.id)
    return {"queued_tasks": len(todo), "skipped": len(tasks) - len(todo), "jobs": jobs}
