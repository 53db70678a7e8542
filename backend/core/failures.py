"""Job failures a project's /status shows: every failed try of any job kind, recorded by RQ's failure callback.

A worker whose settings differ from the web process's (another Label Studio, no credential) fails its jobs;
without this record the web would answer "queued" and nothing would say why nothing arrives.
"""

from __future__ import annotations

import json
from types import TracebackType

from redis import Redis
from rq.job import Job

from .bulk import Progress
from .keys import PREFIX
from .queues import server_time

KEPT = 20
"""Failures kept per project (the newest)."""


def failures_key(pid: int) -> str:
    return f"{PREFIX}:job-failures:{pid}"


ABANDONED = ("the worker {worker} running it stopped before it finished (killed, out of memory or its machine "
             "lost), and its heartbeat expired")


def failure_message(exc_type: type[BaseException] | None, exc_value: BaseException | None, worker: str | None) -> str:
    """One line saying why a job failed; RQ's AbandonedJobError carries no message, so it is said here."""
    name = exc_type.__name__ if exc_type else "Error"
    text = str(exc_value or "").strip()
    if name == "AbandonedJobError" and not text:
        text = ABANDONED.format(worker=worker or "(unknown)")
    return f"{name}: {text}"[:500]


def record_job_failure(job: Job, connection: Redis, exc_type: type[BaseException] | None,
                       exc_value: BaseException | None, traceback: TracebackType | None) -> None:
    """RQ on_failure callback (set on every job by backend.core.catalog): keep the failure for /status."""
    pid = (job.meta or {}).get("project")
    if not isinstance(pid, int):
        return
    kind = job.meta.get("kind", "?")
    message = failure_message(exc_type, exc_value, job.worker_name)
    entry = {"job": job.id, "kind": kind, "error": message, "at": server_time(connection),
             "will_retry": bool(job.retries_left)}
    pipe = connection.pipeline()
    pipe.lpush(failures_key(pid), json.dumps(entry))
    pipe.ltrim(failures_key(pid), 0, KEPT - 1)
    pipe.execute()
    if kind == "prelabel-batch":  # its tasks show as failing in the project's bulk progress too
        progress = Progress(connection, pid)
        for task in job.args[1] if len(job.args) > 1 else []:
            progress.mark_failed(int(task["id"]), message)


def job_failures(redis: Redis, pid: int) -> list[dict]:
    """The project's recent job failures, newest first."""
    return [json.loads(raw) for raw in redis.lrange(failures_key(pid), 0, -1)]
