"""backend/core/failures.py: job failures as /status shows them, each saying what happened."""

from __future__ import annotations

from rq import Queue
from rq.exceptions import AbandonedJobError

from backend.core.failures import failure_message, job_failures, record_job_failure


def test_an_abandoned_job_says_its_worker_stopped():
    """RQ's AbandonedJobError has no message: the failure names the worker and what happened to it."""
    message = failure_message(AbandonedJobError, AbandonedJobError(), "worker-7")
    assert message.startswith("AbandonedJobError: the worker worker-7 running it stopped before it finished")
    assert failure_message(ValueError, ValueError("bad value"), None) == "ValueError: bad value"


def test_failures_are_recorded_per_project(redis):
    """The failure callback keeps the job, its kind, the message and whether it will be retried."""
    job = Queue("ingest", connection=redis).enqueue("builtins.print", meta={"project": 3, "kind": "refresh"})
    job.worker_name = "w1"
    record_job_failure(job, redis, AbandonedJobError, AbandonedJobError(), None)
    [entry] = job_failures(redis, 3)
    assert entry["job"] == job.id and entry["kind"] == "refresh" and "worker w1 running it stopped" in entry["error"]
    assert entry["will_retry"] is False and job_failures(redis, 4) == []
