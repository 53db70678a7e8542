"""Bulk jobs: pre-labeling a project (listing, then batches that post), and AUTO_REFRESH, which re-predicts what
went stale. This module owns the refresh chain, end to end:

1. A change arrives: a label created, edited or deleted (webhook, backend.core.triggers), tasks created, a backfill
   or reconcile that found changes (backend.worker.ingest_jobs), a promotion or pin (backend.worker.training,
   backend.core.refresh.pin). The support store bumps the project's revision.
2. backend.core.refresh.request_refresh counts the change; the first schedules a "refresh" job REFRESH_DELAY_S
   later, REFRESH_AFTER_CHANGES changes or a version change start it at once (debounce).
3. refresh_project (here) waits while the previous run's batches are in flight, clears the counted changes and
   lists the project through prelabel_project: unlabeled tasks whose prediction of the current version is missing
   or older than the revision are queued in batches (backend.core.bulk.queue_bulk, through the delivery ledger).
4. prelabel_batch predicts and posts each batch through a Delivery (backend.worker.delivery): one prediction per
   task and version; a batch Label Studio could not take is retried by RQ, what was posted stays recorded.
"""

from __future__ import annotations

import logging

from redis import Redis

from ..core.bulk import Progress, cancelled_batch_key, held_predictions, queue_bulk, slim_task
from ..core.catalog import submit
from ..core.context import ProjectContext, resolve_project
from ..core.errors import BackendError
from ..core.ledger import DeliveryLedger, own_may_take
from ..core.queues import job_alive
from ..core.refresh import start_refresh
from .delivery import Delivered, Delivery
from .ingest_jobs import ensure_backfilled
from .ls_client import LabelStudioUnavailable
from .runtime import current_job_id, get_context, report_progress

logger = logging.getLogger(__name__)


def prelabel_project(context: dict, task_ids: list[int] | None = None) -> dict:
    """List the project's tasks (or take `task_ids`) and queue batches for those without a current prediction.

    Listing the unlabeled tasks (no `task_ids`), unless KEEP_OLD_PREDICTIONS, each keeps only the current
    version's prediction: the batches delete other versions' once theirs is posted, and here they go from tasks
    whose current one is already stored.
    """
    ctx, project = get_context(), ProjectContext.from_job(context)
    ensure_backfilled(ctx, project)
    image_key = project.config.image_key
    wanted = set(task_ids or [])
    tasks, listed = [], []
    api = ctx.api(project)
    for task in api.tasks(project.project):
        if wanted and int(task["id"]) not in wanted:
            continue
        if task.get("annotations") and not wanted:
            continue  # already labeled by a person: nothing to pre-label
        listed.append(task)
        tasks.append(slim_task(task, image_key))
    drop = not ctx.settings.keep_old_predictions and not wanted  # chosen tasks may be labeled: never touched
    held = held_predictions(listed, project.model_version)
    out = queue_bulk(ctx.redis, ctx.settings, project, tasks, held, drop_other_versions=drop)
    if drop:
        out["deleted_old_versions"] = _drop_other_versions(api, ctx.redis, project, listed, held,
                                                           set(out.pop("queued_ids")))
    else:
        out.pop("queued_ids")
    return out


def _drop_other_versions(api, redis: Redis, project: ProjectContext, listed: list[dict], held: dict[int, list[int]],
                         queued: set[int]) -> int:
    """Delete other versions' predictions of unlabeled tasks that hold exactly one current one and are not
    queued (a queued task's batch deletes them after posting), and their deliveries from those versions' ledgers;
    returns how many were deleted."""
    deleted = 0
    for task in listed:
        tid = int(task["id"])
        if task.get("annotations") or tid in queued or len(held.get(tid, [])) != 1:
            continue
        for prediction in task.get("predictions") or []:
            if isinstance(prediction, dict) and prediction.get("model_version") != project.model_version \
                    and isinstance(prediction.get("id"), int):
                api.delete_prediction(prediction["id"])
                DeliveryLedger(redis, project.project, prediction["model_version"]).deleted(tid)
                deleted += 1
    return deleted


REFRESH_WAIT_S = 5.0
"""How often a refresh looks again whether the previous refresh's batches have finished."""
REFRESH_MAX_WAITS = 60
"""Looks before a refresh runs anyway (5 min: batches stuck that long are not waited for)."""


def refresh_project(project_id: int, reason: str = "", waited: int = 0) -> dict:
    """AUTO_REFRESH: re-predict the project's unlabeled tasks whose prediction is missing or stale, with the
    version and supports current now (the changes it covers are cleared first: later ones schedule a new run).

    While the previous run's batches are still being predicted it waits (rescheduled, its changes and schedule
    flags kept, so later changes join it): at most one refresh runs and one waits, and the waiting one lists the
    tasks at the latest revision instead of posting predictions that are stale on arrival.
    """
    ctx = get_context()
    if waited < REFRESH_MAX_WAITS and Progress(ctx.redis, project_id).in_flight(ctx.settings.job_timeout_s):
        submit(ctx.redis, ctx.settings, "refresh", project_id, reason, waited + 1, meta={"project": project_id},
               delay_s=REFRESH_WAIT_S)
        return {"waiting": "the previous refresh's batches are still being predicted", "waited": waited + 1}
    changes = start_refresh(ctx.redis, project_id)
    context = resolve_project(ctx.settings, ctx.store, project_id)
    if not context.has_api:
        return {"skipped": "no Label Studio API access"}
    if not ctx.store.label_counts(project_id):
        return {"skipped": "no support examples yet"}
    report_progress(stage="listing", reason=reason, changes=changes)
    outcome = {**prelabel_project(context.to_job()), "reason": reason, "changes": changes}
    logger.info("project %s: refresh (%s) queued %s tasks", project_id, reason, outcome.get("queued_tasks"))
    return outcome


def prelabel_request(project_id: int, task_ids: list[int] | None = None) -> dict:
    """prelabel_project for a caller without the serving settings (the CLI): the worker resolves the project."""
    ctx = get_context()
    context = resolve_project(ctx.settings, ctx.store, project_id)
    if not context.has_api:
        raise BackendError("pre-labeling posts predictions through the Label Studio API: give the workers "
                           "LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (a Personal Access Token)")
    return prelabel_project(context.to_job(), task_ids)


def prelabel_batch(context: dict, tasks: list[dict], drop_other_versions: bool = False) -> dict:
    """Predict a batch of tasks and post each as its task's only prediction of the version (idempotent); with
    `drop_other_versions` (pre-labeling unlabeled tasks), as its only prediction."""
    ctx, project, job_id = get_context(), ProjectContext.from_job(context), current_job_id()
    if ctx.redis.exists(cancelled_batch_key(job_id)):  # dequeued just before a cancel dropped it (counted there)
        report_progress(cancelled=True)
        return {"posted": 0, "skipped": len(tasks), "failed": {}, "cancelled": True}
    delivery = Delivery(ctx, project, job_id, Progress(ctx.redis, project.project))
    claims = delivery.claim([int(t["id"]) for t in tasks], own_may_take(job_id, project.revision, job_alive(ctx.redis)))
    skipped = len(tasks) - len(claims)
    report_progress(total=len(tasks), skipped=skipped, done=0)
    if not claims:
        return {"posted": 0, "skipped": skipped, "failed": {}}
    run = delivery.predict(claims, tasks)
    report_progress(failed=delivery.count(Delivered.FAILED))
    ended = delivery.post(claims, run.predictions, run.revision, drop_other_versions=drop_other_versions)
    failed = delivery.reasons(Delivered.FAILED, Delivered.NOT_POSTED)
    posted = delivery.count(Delivered.POSTED)
    report_progress(done=posted, failed=len(failed))
    unreachable = [o for o in ended if o.retryable]
    if unreachable:  # RQ retries the batch later (RETRY_INTERVALS_S); what was posted stays recorded
        raise LabelStudioUnavailable(
            f"{len(unreachable)} of {len(tasks)} predictions not posted: {unreachable[0].message}")
    return {"posted": posted, "skipped": skipped, "failed": failed}
