"""The answers of /predict: waiting for a click job, reading the worker's decision, or queueing bulk work."""

from __future__ import annotations

import time

from flask import Response, jsonify
from rq.job import Job, JobStatus
from rq.results import Result

from ..core.bulk import held_predictions, queue_bulk
from ..core.context import ProjectContext
from ..core.errors import BackendError, BadRequest, MediaError, Overloaded, PredictionTimeout, error_from_record
from ..core.services import Backend

def wait(job: Job, seconds: float) -> Result | None:
    """Poll until the job has a result or `seconds` pass.

    Polling with short reads, not a blocking read: a waiting click holds a Redis connection only for
    milliseconds at a time, so many waiting clicks cannot exhaust the pool that /health and /webhook need.
    """
    deadline = time.monotonic() + seconds
    pause = 0.05
    while True:
        result = job.latest_result()
        if result is not None:
            return result
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        time.sleep(min(pause, remaining))
        pause = min(pause * 1.5, 0.5)


def late(job: Job, context: ProjectContext, wait_s: float, posts_later: bool = True) -> BackendError:
    """The error for a click job with no result by its deadline: not started (dropped) or still running."""
    if job.get_status(refresh=True) in (JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED):
        return Overloaded(f"no worker could start prediction job {job.id} within {wait_s:.0f} s; it is dropped, "
                          "nothing will be posted: try again shortly", retry_after=int(wait_s) // 4 or 1)
    if not posts_later:
        return PredictionTimeout(f"interactive job {job.id} is still running after {wait_s:.0f} s; its answer is "
                                 "dropped (nothing is posted): try again")
    if not context.has_api:
        return PredictionTimeout(f"prediction job {job.id} is still running after {wait_s:.0f} s and this backend has no "
                                 "Label Studio API access to post it later: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")
    return PredictionTimeout(f"prediction job {job.id} is still running after {wait_s:.0f} s; its predictions will be "
                             f"posted through the Label Studio API when it finishes (see /jobs/{job.id})")


def answer(job: Job, value: dict, context: ProjectContext, wait_s: float) -> Response:
    """Turn a click job's outcome into the /predict answer: what the worker decided, never more."""
    if value["delivered"] == "dropped":
        raise Overloaded(f"prediction job {job.id} started after its {wait_s:.0f} s deadline and was dropped; try again",
                         retry_after=1)
    if value["delivered"] == "error":
        raise error_from_record(value)
    if value["delivered"] == "posted":
        raise PredictionTimeout(f"prediction job {job.id} finished after {wait_s:.0f} s; its predictions were posted "
                                f"through the Label Studio API ({value.get('posted', 0)} stored)")
    failures = {int(k): v for k, v in value["failures"].items()}
    predictions = value["predictions"]
    if failures and not any(predictions):
        details = "; ".join(f"task {tid}: {msg}" for tid, msg in failures.items())
        raise MediaError(f"no predictions stored: {details}")
    # Label Studio stores each task's list of predictions: [] for a task stores nothing for it.
    return jsonify(results=[p if p else [] for p in predictions], model_version=context.model_version,
                   failures=failures, skipped=value["skipped"])


def answer_bulk(backend: Backend, context: ProjectContext, tasks: list[dict]) -> tuple[Response, int]:
    """Too many tasks for one synchronous answer: queue bulk jobs that post through the API; LS stores nothing now."""
    if not context.has_api:
        raise BadRequest(
            f"{len(tasks)} tasks exceed SYNC_MAX_TASKS={backend.settings.sync_max_tasks} and bulk predictions need "
            "LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY to be posted back; set them or select fewer tasks"
        )
    held = held_predictions(tasks, context.model_version)
    queued = queue_bulk(backend.redis, backend.settings, context, [{k: t[k] for k in ("id", "data")} for t in tasks], held)
    queued.pop("queued_ids")
    body = {
        "results": [[] for _ in tasks],  # one empty list per task: Label Studio stores nothing and logs no error
        "status": "queued",
        "message": (
            f"{queued['queued_tasks']} tasks queued for background pre-annotation ({queued['skipped']} already done or "
            f"in progress); predictions appear in Label Studio as workers post them. Progress: /status/{context.project}"
        ),
        **queued,
    }
    return jsonify(body), 202


def answer_interactive(job: Job, value: dict, context: ProjectContext, wait_s: float) -> Response:
    """A smart-tool job's outcome as /predict's answer: one prediction with the refined regions."""
    if value["delivered"] == "dropped":
        raise Overloaded(f"interactive job {job.id} started after its {wait_s:.0f} s deadline and was dropped; try again",
                         retry_after=1)
    if value["delivered"] == "error":
        raise error_from_record(value)
    return jsonify(results=[value["prediction"]], model_version=context.model_version)
