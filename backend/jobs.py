"""RQ job functions (enqueued by dotted path; they run in workers, which hold the model)."""

from __future__ import annotations

import logging
import time

from rq import get_current_job

from .bulk import Progress, enqueue_batches
from .errors import BackendError
from .label_config import parse_label_config
from .store import Example
from .versions import current_version
from .worker import WorkerContext, get_context, report_progress

logger = logging.getLogger(__name__)


def _config(ctx: WorkerContext, pid: int, label_config: str | None = None):
    return parse_label_config(label_config or ctx.store.require_project(pid)["label_config"])


def ensure_backfilled(ctx: WorkerContext, pid: int) -> int:
    """Once per project, read its existing annotations from Label Studio (the backend may be added late)."""
    project = ctx.store.require_project(pid)
    if project.get("backfilled"):
        return 0
    if ctx.api_or_none(pid) is None:
        return 0
    try:
        return backfill_project(pid)
    except Exception as exc:  # Label Studio unreachable or refusing: predict from what is stored, retry next time
        logger.warning("project %s: backfill from Label Studio failed (%s: %s)", pid, type(exc).__name__, exc)
        report_progress(backfill_error=f"{type(exc).__name__}: {exc}")
        return 0


def backfill_if_needed(project_id: int) -> int:
    """Job form of ensure_backfilled, queued by /setup."""
    return ensure_backfilled(get_context(), project_id)


def backfill_project(project_id: int) -> int:
    """Read the project's existing annotations through the Label Studio API into the support store."""
    ctx = get_context()
    config = _config(ctx, project_id)
    api = ctx.api(project_id)
    added = 0
    for task in api.tasks(project_id, only_annotated=True):
        for annotation in task.get("annotations") or []:
            example = Example.from_annotation(annotation, task, config)
            if example is not None:
                ctx.store.upsert(project_id, example)
                added += 1
        report_progress(examples_added=added)
    ctx.store.set_project_field(project_id, "backfilled", time.time())
    logger.info("project %s: backfilled %d examples from Label Studio", project_id, added)
    return added


def ingest_examples(project_id: int, annotation_ids: list[int]) -> dict:
    """Cache the images and masks of freshly stored examples on disk, so predictions need no download."""
    ctx = get_context()
    files = ctx.example_files(project_id)
    done, failed = 0, {}
    for annotation_id in annotation_ids:
        example = ctx.store.get(project_id, annotation_id)
        if example is None:
            continue
        try:
            files.prepare(project_id, example)
            done += 1
        except BackendError as exc:
            failed[annotation_id] = exc.message
    report_progress(done=done, failed=failed)
    return {"done": done, "failed": failed}


def predict_tasks(project_id: int, tasks: list[dict], label_config: str | None = None) -> dict:
    """Predict a few tasks for /predict: {"predictions": [...per task or None], "failures": {...}}.

    If the web process stopped waiting (job meta post_results), predictions are posted through the API.
    """
    ctx = get_context()
    ensure_backfilled(ctx, project_id)
    config = _config(ctx, project_id, label_config)
    predictions, failures = ctx.segmenter(project_id).predict(project_id, tasks, config)
    out = {
        "predictions": [predictions.get(int(t["id"])) for t in tasks],
        "failures": {f.task_id: f.message for f in failures},
    }
    job = get_current_job()
    if job is not None and job.get_meta(refresh=True).get("post_results"):
        posted = _post(ctx, project_id, predictions)
        out["posted"] = posted
    return out


def _post(ctx: WorkerContext, pid: int, predictions: dict[int, dict]) -> int:
    api = ctx.api(pid)
    for task_id, prediction in predictions.items():
        api.create_prediction(task_id, prediction["result"], prediction["score"], prediction["model_version"])
    return len(predictions)


def prelabel_project(project_id: int, task_ids: list[int] | None = None) -> dict:
    """List the project's tasks (or take `task_ids`) and enqueue bulk batches for those not yet predicted."""
    ctx = get_context()
    ensure_backfilled(ctx, project_id)
    config = _config(ctx, project_id)
    version = current_version(ctx.settings, ctx.store.project(project_id))  # no model needed to list tasks
    revision = ctx.store.revision(project_id)
    wanted = set(task_ids or [])
    tasks = []
    for task in ctx.api(project_id).tasks(project_id):
        if wanted and int(task["id"]) not in wanted:
            continue
        if task.get("annotations") and not wanted:
            continue  # already labeled by a person: nothing to pre-label
        tasks.append({"id": int(task["id"]), "data": {config.image_key: (task.get("data") or {}).get(config.image_key)}})
    return enqueue_batches(ctx.redis, ctx.settings, project_id, tasks, version, revision)


def prelabel_batch(project_id: int, tasks: list[dict], version: str, revision: int) -> dict:
    """Predict a batch of tasks and post each prediction through the Label Studio API (idempotent)."""
    ctx = get_context()
    progress = Progress(ctx.redis, project_id)
    todo = [t for t in tasks if not progress.is_done(version, revision, int(t["id"]))]
    report_progress(total=len(tasks), skipped=len(tasks) - len(todo), done=0)
    if not todo:
        return {"posted": 0, "skipped": len(tasks), "failed": {}}
    config = _config(ctx, project_id)
    segmenter = ctx.segmenter(project_id)
    if segmenter.model_version != version:
        logger.info("project %s: model version changed %s -> %s; predicting with the new one", project_id, version, segmenter.model_version)
    predictions, failures = segmenter.predict(project_id, todo, config)
    api = ctx.api(project_id)
    posted = 0
    for task_id, prediction in predictions.items():
        api.create_prediction(task_id, prediction["result"], prediction["score"], prediction["model_version"])
        progress.mark_done(version, revision, task_id)
        posted += 1
        report_progress(done=posted)
    for failure in failures:
        progress.mark_failed(failure.task_id, failure.message)
    return {"posted": posted, "skipped": len(tasks) - len(todo), "failed": {f.task_id: f.message for f in failures}}
