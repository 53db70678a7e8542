"""Bulk pre-annotation: which tasks need a prediction (through the ledger), their batches, and progress."""

from __future__ import annotations

import time
import uuid

from redis import Redis
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus

from .catalog import submit
from .context import ProjectContext
from .keys import PREFIX
from .ledger import DELIVERED, QUEUED, DeliveryLedger, MayTake, bulk_may_take
from .queues import job_alive
from .settings import Settings


MAX_PREVIEW = 100
"""Most tasks one pre-labeling preview predicts."""


class Progress:
    """A project's bulk pre-annotation progress in Redis (shared by all workers and the status endpoint)."""

    def __init__(self, redis: Redis, pid: int):
        self.redis = redis
        self.pid = pid
        self.key = f"{PREFIX}:progress:{pid}"
        self.failed_key = f"{PREFIX}:failed:{pid}"
        self.jobs_key = f"{PREFIX}:progress-jobs:{pid}"

    def start(self, version: str, revision: int) -> None:
        """Begin a run, or go on with the unfinished one of the same version and revision."""
        current = self.read()
        if current.get("version") == version and current.get("revision") == revision and current.get("state") == "running":
            return
        pipe = self.redis.pipeline()
        pipe.delete(self.key, self.failed_key, self.jobs_key)
        pipe.hset(self.key, mapping={"version": version, "revision": revision, "started_at": time.time(),
                                     "updated_at": time.time(), "total": 0, "done": 0, "skipped": 0, "cancelled": 0})
        pipe.execute()

    def add(self, tasks: int = 0, *, skipped: int = 0, job: str | None = None) -> None:
        """Count a batch job's tasks into the run (before the job is queued, so it never finishes uncounted), or
        tasks skipped."""
        pipe = self.redis.pipeline()
        pipe.hincrby(self.key, "total", tasks)
        pipe.hincrby(self.key, "skipped", skipped)
        pipe.hset(self.key, "updated_at", time.time())
        if job is not None:
            pipe.sadd(self.jobs_key, job)
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

    def mark_cancelled(self, task_ids: list[int]) -> None:
        """Count tasks whose batches were dropped by a cancel (they leave the failures: nobody retries them)."""
        pipe = self.redis.pipeline()
        if task_ids:
            pipe.hdel(self.failed_key, *task_ids)
        pipe.hincrby(self.key, "cancelled", len(task_ids))
        pipe.hset(self.key, mapping={"cancelled_at": time.time(), "updated_at": time.time()})
        pipe.execute()

    def jobs(self) -> list[str]:
        """Ids of the current run's batch jobs."""
        return sorted(j.decode() for j in self.redis.smembers(self.jobs_key))

    def read(self) -> dict:
        """Current counters, with numbers as numbers; "failed" counts the tasks failing now; "state" is running,
        finished or cancelled; "eta_s" estimates the seconds left from the rate so far (while running)."""
        raw = {k.decode(): v.decode() for k, v in self.redis.hgetall(self.key).items()}
        if not raw:
            return raw
        raw["failed"] = int(self.redis.hlen(self.failed_key))
        for name in ("total", "done", "failed", "skipped", "revision", "cancelled"):
            raw[name] = int(raw.get(name, 0))
        for name in ("started_at", "updated_at", "cancelled_at"):
            if name in raw:
                raw[name] = float(raw[name])
        ended = raw["done"] + raw["failed"] + raw["cancelled"]
        left = max(0, raw["total"] - ended)
        raw["state"] = "running" if left else "cancelled" if "cancelled_at" in raw else "finished"
        elapsed = raw.get("updated_at", 0.0) - raw.get("started_at", 0.0)
        if left and raw["done"] + raw["failed"] and elapsed > 0:
            raw["eta_s"] = round(left * elapsed / (raw["done"] + raw["failed"]), 1)
        return raw

    def in_flight(self, stale_s: float) -> bool:
        """True while the current run has tasks neither done, failed nor cancelled and moved within the last
        `stale_s` seconds (a run whose workers died stops counting as in flight)."""
        current = self.read()
        return current.get("state") == "running" and time.time() - current.get("updated_at", 0.0) < stale_s

    def failures(self) -> dict[int, str]:
        """Tasks that failed in the current run, with their messages."""
        return {int(k): v.decode() for k, v in self.redis.hgetall(self.failed_key).items()}


def slim_task(task: dict, image_key: str) -> dict:
    """A task as jobs receive it: its id and the image field of its data, nothing else."""
    return {"id": int(task["id"]), "data": {image_key: (task.get("data") or {}).get(image_key)}}


def bulk_rule(redis: Redis, context: ProjectContext, held: dict[int, list[int]] | None) -> MayTake:
    """ledger.bulk_may_take for the context's revision, given what Label Studio stores (`held`: task id ->
    prediction ids of the version; None when unknown)."""
    counts = None if held is None else {t: len(ids) for t, ids in held.items()}
    return bulk_may_take(context.revision, counts, job_alive(redis))


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
    may_take = bulk_rule(redis, context, held)
    by_id = {int(t["id"]): t for t in tasks}
    candidates = [t for t in by_id if may_take(t, entries.get(t))]
    progress = Progress(redis, context.project)
    progress.start(context.model_version, context.revision)
    jobs, queued_ids = [], []
    for start in range(0, len(candidates), settings.bulk_batch_size):
        job_id = f"bulk-{context.project}-{uuid.uuid4().hex[:12]}"
        claims = ledger.claim(candidates[start : start + settings.bulk_batch_size], job_id, context.revision,
                              may_take, state=QUEUED)
        if not claims:
            continue
        batch = [by_id[c.task_id] for c in claims]
        progress.add(len(batch), job=job_id)
        submit(redis, settings, "prelabel-batch", context.to_job(), batch, drop_other_versions, job_id=job_id,
               meta={"project": context.project, "tasks": len(batch)})
        jobs.append(job_id)
        queued_ids += [c.task_id for c in claims]
    queued = len(queued_ids)
    skipped = len(by_id) - queued
    progress.add(skipped=skipped)
    return {"queued_tasks": queued, "skipped": skipped, "recorded_from_label_studio": seeded, "jobs": jobs,
            "model_version": context.model_version, "queued_ids": queued_ids}


WAITING = (JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED)
"""States of a batch job that has not started: a cancel drops it."""
CANCELLED_BATCH_TTL_S = 24 * 3600


def cancelled_batch_key(job_id: str) -> str:
    """Marks a batch job dropped by a cancel: a worker that dequeued it just before skips it."""
    return f"{PREFIX}:cancelled-batch:{job_id}"


def cancel_bulk(redis: Redis, pid: int) -> dict:
    """Cancel the project's bulk run: batches not started are dropped (their tasks stay unpredicted and are taken by
    the next prelabel), a batch being predicted finishes and posts. The ledger is untouched, so nothing is posted
    twice: a dropped batch's claims belong to a job that is no longer alive, which any later run may take over."""
    progress = Progress(redis, pid)
    dropped, running, tasks = [], [], []
    for job_id in progress.jobs():
        try:
            job = Job.fetch(job_id, connection=redis)
        except NoSuchJobError:
            continue
        status = job.get_status(refresh=True)
        if status == JobStatus.STARTED:
            running.append(job_id)
            continue
        if status not in WAITING:
            continue
        redis.set(cancelled_batch_key(job_id), 1, ex=CANCELLED_BATCH_TTL_S)
        try:
            job.cancel()
        except InvalidJobOperation:
            continue
        dropped.append(job_id)
        context, batch = ProjectContext.from_job(job.args[0]), job.args[1]
        ledger = DeliveryLedger(redis, pid, context.model_version)
        tasks += [int(t["id"]) for t in batch if (entry := ledger.get(int(t["id"]))) is None
                  or entry.job != job_id or entry.state != DELIVERED]  # a retried batch may have posted some
    progress.mark_cancelled(tasks)
    return {"status": "cancelled", "dropped_batches": len(dropped), "dropped_tasks": len(tasks),
            "running_batches": running, "progress": progress.read()}
