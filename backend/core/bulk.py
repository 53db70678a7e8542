"""Bulk pre-annotation: which tasks need a prediction (through the ledger), their batches, and progress."""

from __future__ import annotations

import time
import uuid

from redis import Redis

from .catalog import submit
from .context import ProjectContext
from .keys import PREFIX
from .ledger import QUEUED, DeliveryLedger, bulk_may_take
from .queues import job_alive
from .settings import Settings


class Progress:
    """A project's bulk pre-annotation progress in Redis (shared by all workers and the status endpoint)."""

    def __init__(self, redis: Redis, pid: int):
        self.redis = redis
        self.pid = pid
        self.key = f"{PREFIX}:progress:{pid}"
        self.failed_key = f"{PREFIX}:failed:{pid}"

    def start(self, version: str, revision: int, *, total: int, skipped: int) -> None:
        """Begin a run, or extend the unfinished one of the same version and revision."""
        current = self.read()
        same = current.get("version") == version and current.get("revision") == revision
        finished = current.get("done", 0) + current.get("failed", 0) >= current.get("total", 0)
        pipe = self.redis.pipeline()
        if not same or finished:
            pipe.delete(self.key, self.failed_key)
            pipe.hset(self.key, mapping={"version": version, "revision": revision, "started_at": time.time(),
                                         "total": 0, "done": 0, "skipped": 0})
        pipe.hincrby(self.key, "total", total)
        pipe.hincrby(self.key, "skipped", skipped)
        pipe.hset(self.key, "updated_at", time.time())
        pipe.execute()

    def mark_done(self, task_id: int) -> None:
        """Count a delivered prediction (a task that failed before and now succeeded leaves the failures)."""
        pipe = self.redis.pipeline()
        pipe.hdel(self.failed_key, task_id)
        pipe.hincrby(self.key, "done", 1)
        pipe.hset(self.key, "updated_at", time.time())
        pipe.execute()

    def mark_failed(self, task_id: int, message: str) -> None:
        """Record a task that could not be predicted or delivered, with why (until it succeeds)."""
        pipe = self.redis.pipeline()
        pipe.hset(self.failed_key, task_id, message)
        pipe.hset(self.key, mapping={"last_error": message, "updated_at": time.time()})
        pipe.execute()

    def read(self) -> dict:
        """Current counters, with numbers as numbers; "failed" counts the tasks failing now."""
        raw = {k.decode(): v.decode() for k, v in self.redis.hgetall(self.key).items()}
        if raw:
            raw["failed"] = int(self.redis.hlen(self.failed_key))
        for name in ("total", "done", "failed", "skipped", "revision"):
            if name in raw:
                raw[name] = int(raw[name])
        for name in ("started_at", "updated_at"):
            if name in raw:
                raw[name] = float(raw[name])
        return raw

    def in_flight(self, stale_s: float) -> bool:
        """True while the current run has tasks neither done nor failed and moved within the last `stale_s` seconds
        (a run whose workers died stops counting as in flight)."""
        current = self.read()
        unfinished = current.get("done", 0) + current.get("failed", 0) < current.get("total", 0)
        return unfinished and time.time() - current.get("updated_at", 0.0) < stale_s

    def failures(self) -> dict[int, str]:
        """Tasks that failed in the current run, with their messages."""
        return {int(k): v.decode() for k, v in self.redis.hgetall(self.failed_key).items()}


def held_predictions(tasks: list[dict], version: str) -> dict[int, list[int]]:
    """Task id -> ids of the predictions of `version` Label Studio sent with each task."""
    held = {}
    for task in tasks:
        predictions = task.get("predictions") or []
        held[int(task["id"])] = [p["id"] for p in predictions if isinstance(p, dict) and p.get("model_version") == version
                                 and isinstance(p.get("id"), int) and not isinstance(p.get("id"), bool)]
    return held


def held_answers(tasks: list[dict], version: str) -> dict[int, dict]:
    """Task id -> the prediction of `version` Label Studio sent with the task (result, score, model_version), for
    answering a task that already holds one (Label Studio asks for such a task only from its Test button)."""
    answers = {}
    for task in tasks:
        for p in task.get("predictions") or []:
            if isinstance(p, dict) and p.get("model_version") == version and isinstance(p.get("result"), list):
                answers[int(task["id"])] = {"result": p["result"], "score": p.get("score"), "model_version": version}
                break
    return answers


def queue_bulk(redis: Redis, settings: Settings, context: ProjectContext, tasks: list[dict],
               held: dict[int, list[int]] | None = None, drop_other_versions: bool = False) -> dict:
    """Claim the tasks that lack a current prediction of the context's version and queue them in batches.

    `held` is what Label Studio stores (task id -> prediction ids of the version), when known: a
    prediction the ledger did not know is recorded instead of redone, a missing one is redone, and
    duplicates are collapsed into one. Tasks queued or running in another job are skipped. With
    `drop_other_versions` (unlabeled tasks only), posting deletes the tasks' other versions' predictions.
    """
    ledger = DeliveryLedger(redis, context.project, context.model_version)
    entries = ledger.entries()
    seeded = 0
    if held is not None:
        seeded = ledger.seed({t: ids[0] for t, ids in held.items() if len(ids) == 1 and t not in entries},
                             context.revision)
        entries = ledger.entries() if seeded else entries
    counts = None if held is None else {t: len(ids) for t, ids in held.items()}
    may_take = bulk_may_take(context.revision, counts, job_alive(redis))
    by_id = {int(t["id"]): t for t in tasks}
    candidates = [t for t in by_id if may_take(t, entries.get(t))]
    jobs, queued_ids = [], []
    for start in range(0, len(candidates), settings.bulk_batch_size):
        job_id = f"bulk-{context.project}-{uuid.uuid4().hex[:12]}"
        claims = ledger.claim(candidates[start : start + settings.bulk_batch_size], job_id, context.revision,
                              may_take, state=QUEUED)
        if not claims:
            continue
        batch = [by_id[c.task_id] for c in claims]
        submit(redis, settings, "prelabel-batch", context.to_job(), batch, drop_other_versions, job_id=job_id,
               meta={"project": context.project, "tasks": len(batch)})
        jobs.append(job_id)
        queued_ids += [c.task_id for c in claims]
    queued = len(queued_ids)
    skipped = len(by_id) - queued
    Progress(redis, context.project).start(context.model_version, context.revision, total=queued, skipped=skipped)
    return {"queued_tasks": queued, "skipped": skipped, "recorded_from_label_studio": seeded, "jobs": jobs,
            "model_version": context.model_version, "queued_ids": queued_ids}
