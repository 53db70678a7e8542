"""backend/core/train_queue.py: one training job per project at a time, under a lock no dead job keeps."""

from __future__ import annotations

import json

from rq import Queue
from rq.job import Job, JobStatus

from backend.core.context import resolve_project
from backend.core.queues import QUEUE_TRAIN
from backend.core.registry import TRAIN_LOCK_KEY
from backend.core.store import SupportStore
from backend.core.train_queue import claim_training_lock, enqueue_training

from bench.synthetic import CONFIG_XML


def _context(settings, redis):
    store = SupportStore(redis, settings.model_dir)
    store.register_project(1, CONFIG_XML)
    return store, resolve_project(settings, store, 1)


def test_one_training_job_per_project_and_the_refusal_is_recorded(settings, redis):
    store, context = _context(settings, redis)
    first = enqueue_training(redis, settings, context, "START_TRAINING")
    assert first["status"] == "queued" and Queue(QUEUE_TRAIN, connection=redis).job_ids == [first["job"]]
    second = enqueue_training(redis, settings, context, "60 new labels")
    assert second == {"status": "already queued or running", "job": first["job"]}
    record = json.loads(store.require_project(1)["training_request"])
    assert record["reason"] == "60 new labels" and first["job"] in record["why"]
    assert Queue(QUEUE_TRAIN, connection=redis).count == 1


def test_a_lock_whose_job_is_gone_is_taken_over(settings, redis):
    """A lock held by a job that failed (or whose worker was killed) does not block the next training."""
    _, context = _context(settings, redis)
    first = enqueue_training(redis, settings, context, "START_TRAINING")
    job = Job.fetch(first["job"], connection=redis)
    job.set_status(JobStatus.FAILED)
    assert claim_training_lock(redis, settings, 1, "train-1-next") is None
    assert redis.get(TRAIN_LOCK_KEY.format(pid=1)) == b"train-1-next"
    assert claim_training_lock(redis, settings, 1, "train-1-next") is None  # its own lock: taken again
    redis.delete("rq:job:train-1-next")
    assert claim_training_lock(redis, settings, 1, "train-1-third") is None  # the holder's job no longer exists
