"""Queueing fine-tuning: one training job per project at a time, under a Redis lock that outlives no job."""

from __future__ import annotations

import logging
import time

from redis import Redis

from .catalog import submit
from .context import ProjectContext
from .queues import job_alive
from .registry import TRAIN_LOCK_KEY
from .settings import Settings

logger = logging.getLogger(__name__)

_SWAP_LOCK = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3]) end"
"""Replace a lock only if it still holds the value seen (one of two concurrent takers wins)."""



def enqueue_training(redis: Redis, settings: Settings, context: ProjectContext, reason: str) -> dict:
    """Queue one training job for a project unless one is queued or running; says which."""
    pid = context.project
    lock = TRAIN_LOCK_KEY.format(pid=pid)
    job_id = f"train-{pid}-{int(time.time() * 1000)}"
    if not redis.set(lock, job_id, nx=True, ex=settings.train_timeout_s + 600):
        existing = (redis.get(lock) or b"").decode()
        if job_alive(redis)(existing):
            return {"status": "already queued or running", "job": existing}
        # The lock's job is gone (its worker was killed, or it failed without releasing): take the lock over.
        logger.warning("project %s: training lock of %s outlived its job; taking it over", pid, existing or "?")
        if not redis.eval(_SWAP_LOCK, 1, lock, existing, job_id, settings.train_timeout_s + 600):
            return {"status": "already queued or running", "job": (redis.get(lock) or b"").decode()}
    submit(redis, settings, "train", context.to_job(), reason, job_id=job_id, meta={"project": pid, "reason": reason})
    return {"status": "queued", "job": job_id}
