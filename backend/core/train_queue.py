"""Queueing fine-tuning: one training job per project at a time, under a Redis lock that outlives no job."""

from __future__ import annotations

import json
import logging
import time

from redis import Redis

from .catalog import submit
from .context import ProjectContext
from .queues import job_alive
from .registry import TRAIN_LOCK_KEY
from .settings import Settings
from .store import SupportStore

logger = logging.getLogger(__name__)

_SWAP_LOCK = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3]) end"
"""Replace a lock only if it still holds the value seen (one of two concurrent takers wins)."""


def claim_training_lock(redis: Redis, settings: Settings, pid: int, job_id: str) -> str | None:
    """Take the project's training lock for `job_id`: None when taken, else the id of the live job holding it.

    A lock whose job is gone (its worker was killed, or it failed without releasing) is taken over.
    """
    lock, ttl = TRAIN_LOCK_KEY.format(pid=pid), settings.train_timeout_s + 600
    if redis.set(lock, job_id, nx=True, ex=ttl):
        return None
    existing = (redis.get(lock) or b"").decode()
    if existing != job_id and job_alive(redis)(existing):
        return existing
    logger.warning("project %s: training lock of %s outlived its job; taking it over", pid, existing or "?")
    if redis.eval(_SWAP_LOCK, 1, lock, existing, job_id, ttl):
        return None
    return (redis.get(lock) or b"").decode()


def enqueue_training(redis: Redis, settings: Settings, context: ProjectContext, reason: str) -> dict:
    """Queue one training job for a project unless one is queued or running; says which."""
    pid = context.project
    job_id = f"train-{pid}-{int(time.time() * 1000)}"
    holder = claim_training_lock(redis, settings, pid, job_id)
    answer = {"status": "queued", "job": job_id}
    if holder is not None:
        answer = {"status": "already queued or running", "job": holder}
        logger.info("project %s: training request (%s) refused: %s is queued or running", pid, reason, holder)
    else:
        submit(redis, settings, "train", context.to_job(), reason, job_id=job_id, meta={"project": pid, "reason": reason})
    record = {**answer, "reason": reason, "at": time.time()}
    if holder is not None:
        record["why"] = f"one training per project at a time: {holder} is queued or running"
    redis.hset(SupportStore.project_key(pid), "training_request", json.dumps(record))  # /status: the last request and its fate
    return answer
