"""The job catalog: every kind of job, with its function, queue, timeout, retries and TTLs, in one table.

Every enqueue goes through `submit`, so this table is the one place a queue or a timeout is chosen, and
"what happens when a worker dies in the middle of X" is answered by X's row: a job with retries goes back
to its queue after RETRY_INTERVALS_S (see backend.worker.rq_worker.InProcessWorker); one without fails and
stays in the failed registry for FAILURE_TTL_S, retryable through POST /jobs/<id>/retry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from redis import Redis
from rq.job import Job

from .queues import QUEUE_BULK, QUEUE_CLICK, QUEUE_INGEST, QUEUE_TRAIN, RETRY_INTERVALS_S, enqueue
from .settings import Settings

GRACE_S = 5.0
"""/predict waits this long past a job's deadline: the worker decides by the deadline, the web reads its decision."""


@dataclass(frozen=True)
class JobKind:
    """One kind of job: what runs, where, for how long, and how often it is tried again."""

    name: str
    func: str
    """Dotted path of the job function (imported by workers only: the web never loads it)."""
    queue: str
    timeout_s: Callable[[Settings], int]
    retries: int = 0
    at_front: bool = False
    """Jump the queue (a user is waiting)."""
    ttl_s: Callable[[Settings], int | None] = lambda settings: None
    """Longest the job may wait in its queue before RQ drops it (None: no limit)."""


def _job_timeout(settings: Settings) -> int:
    return settings.job_timeout_s


def _click_ttl(settings: Settings) -> int:
    return int(settings.predict_wait_s + GRACE_S) + 1


ON_FAILURE = "backend.core.failures.record_job_failure"
"""Every failed try of every kind is kept for the project's /status (backend.core.failures)."""

_INGEST, _CLICKS, _BULK = "backend.worker.ingest_jobs", "backend.worker.click_jobs", "backend.worker.bulk_jobs"
KINDS: dict[str, JobKind] = {kind.name: kind for kind in (
    # Clicks: a person waits for the answer; after the deadline nobody does, so no retry and a queue TTL.
    JobKind("click", f"{_CLICKS}.predict_tasks", QUEUE_CLICK, _job_timeout, at_front=True, ttl_s=_click_ttl),
    JobKind("smart-tool", f"{_CLICKS}.predict_interactive", QUEUE_CLICK, _job_timeout, at_front=True, ttl_s=_click_ttl),
    # Ingest: everything that reads from Label Studio or caches files, off the click queue.
    JobKind("backfill", f"{_INGEST}.backfill_if_needed", QUEUE_INGEST, _job_timeout, retries=2),
    JobKind("large-webhook", f"{_INGEST}.ingest_large_webhook", QUEUE_INGEST, _job_timeout, retries=2),
    JobKind("cache-examples", f"{_INGEST}.ingest_examples", QUEUE_INGEST, _job_timeout, retries=2),
    JobKind("secure-webhook", f"{_INGEST}.secure_webhook", QUEUE_INGEST, lambda settings: 60, retries=3),
    JobKind("review-view", "backend.worker.review_view.sync_review_view", QUEUE_INGEST, lambda settings: 60, retries=3),
    JobKind("list-tasks", f"{_BULK}.prelabel_project", QUEUE_INGEST, _job_timeout, retries=2),
    JobKind("list-tasks-cli", f"{_BULK}.prelabel_request", QUEUE_INGEST, _job_timeout, retries=2),
    JobKind("confirm-returned", f"{_CLICKS}.confirm_returned", QUEUE_INGEST, lambda settings: 120, retries=2),
    # AUTO_REFRESH: list the unlabeled tasks and queue the stale ones (debounced: backend.core.refresh).
    JobKind("refresh", f"{_BULK}.refresh_project", QUEUE_INGEST, _job_timeout, retries=2),
    # Bulk: batches post through the API; retried through a Label Studio outage of up to ~17 minutes.
    JobKind("prelabel-batch", f"{_BULK}.prelabel_batch", QUEUE_BULK, _job_timeout, retries=len(RETRY_INTERVALS_S)),
    # A preview predicts a few tasks and posts nothing; ahead of queued batches (someone waits for it).
    JobKind("prelabel-preview", "backend.worker.preview.preview_prelabel", QUEUE_BULK, _job_timeout, at_front=True),
    # Training holds a per-project lock (backend.core.train_queue); a failed run is retried by a person.
    JobKind("train", "backend.worker.training.train_project", QUEUE_TRAIN, lambda settings: settings.train_timeout_s),
    # Label checks predict every labeled image from the others: long work, beside training (one per project).
    JobKind("label-checks", "backend.worker.label_checks.check_project_labels", QUEUE_TRAIN,
            lambda settings: settings.train_timeout_s),
)}


def submit(redis: Redis, settings: Settings, kind: str, *args, job_id: str | None = None,
           meta: dict | None = None, delay_s: float = 0.0) -> Job:
    """Enqueue a job of a catalog kind with the arguments given, after `delay_s` seconds if given (KeyError for
    a kind not in the catalog)."""
    spec = KINDS[kind]
    return enqueue(redis, spec.queue, spec.func, args=args, timeout_s=spec.timeout_s(settings), job_id=job_id,
                   meta={"kind": kind, **(meta or {})}, retries=spec.retries, at_front=spec.at_front,
                   ttl_s=spec.ttl_s(settings), on_failure=ON_FAILURE, delay_s=delay_s)
