"""RQ job functions (enqueued by dotted path; they run in workers, which hold the model).

Every job that predicts receives a ProjectContext (as a dict) and predicts, labels and delivers with
exactly that model version; every delivery goes through the ledger (backend.core.ledger).
"""

from __future__ import annotations

import base64
import json
import logging
import time
from urllib.parse import urlparse

from redis import Redis
from rq import get_current_job

from ..core.admission import click_ended, record_click_seconds
from ..core.bulk import Progress, cancelled_batch_key, held_predictions, queue_bulk, slim_task
from ..core.catalog import submit
from ..core.context import ProjectContext, resolve_project
from ..core.errors import BackendError, BadRequest, DeadlinePassed, error_record
from ..core.ingest import ingest
from ..core.ledger import VIA_POSTED, VIA_RETURNED, Claim, DeliveryLedger, click_may_take, own_may_take
from ..core.prompts import parse_prompts, prompt_passes
from ..core.queues import job_alive, server_time
from ..core.refresh import request_refresh, start_refresh
from ..core.services import Backend
from ..core.store import int_id
from ..core.triggers import BACKFILL_RETRY_S, WEBHOOK_BODY_TTL_S, handle_event, reconcile_due
from .ls_client import ONCE, LabelStudioRefused, LabelStudioUnavailable
from .runtime import WorkerContext, get_context, report_progress

logger = logging.getLogger(__name__)


# ---- support examples ------------------------------------------------------------------------


def ensure_backfilled(ctx: WorkerContext, context: ProjectContext) -> dict | None:
    """Once per project, read its existing annotations from Label Studio (the backend may be added late).

    Returns the backfill's report, or None when nothing was run. A backfill that cannot reach Label
    Studio is recorded in the project (shown by /status) and tried again after BACKFILL_RETRY_S.
    """
    store, pid = ctx.store, context.project
    project = store.require_project(pid)
    if project.get("backfilled") or not context.has_api:
        return None
    now = server_time(ctx.redis)  # one clock for every worker machine
    if now - float(project.get("backfill_tried_at") or 0) < BACKFILL_RETRY_S:
        return None
    store.set_project_field(pid, "backfill_tried_at", now)
    return _read_or_record_failure(ctx, context)


def _read_or_record_failure(ctx: WorkerContext, context: ProjectContext) -> dict | None:
    """backfill_project, or None with the failure recorded for /status (the next try reads again)."""
    try:
        return backfill_project(ctx, context)
    except Exception as exc:  # Label Studio unreachable or refusing: predict from what is stored, retry later
        message = f"{type(exc).__name__}: {exc}"
        logger.warning("project %s: reading annotations from Label Studio failed (%s)", context.project, message)
        ctx.store.set_project_field(context.project, "backfill_error", message)
        report_progress(backfill_error=message)
        return None


def backfill_project(ctx: WorkerContext, context: ProjectContext) -> dict:
    """Compare the project's examples with the annotations Label Studio holds: new and changed ones are stored,
    those it no longer holds are removed (so a webhook that was refused or missed loses nothing)."""
    pid, config, store = context.project, context.config, ctx.store
    known = store.annotation_ids(pid)  # read first: an example a webhook adds during the listing is never removed
    pairs = [(annotation, task) for task in ctx.api(context).tasks(pid, only_annotated=True)
             for annotation in task.get("annotations") or []]
    report = ingest(store, pid, config, pairs, ctx.settings.max_image_pixels)
    held = {aid for annotation, _ in pairs if (aid := int_id(annotation.get("id") if isinstance(annotation, dict) else None))}
    gone = sorted(known - held - set(report.removed))
    if gone and store.remove(pid, gone):
        report.removed.extend(gone)
    summary = {**report.as_dict(), "annotations": len(pairs)}
    now = server_time(ctx.redis)
    if not store.require_project(pid).get("backfilled"):
        store.set_project_field(pid, "backfilled", now)
    for name, value in (("reconciled_at", now), ("backfill_annotations", len(pairs)),
                        ("backfill_errors", len(report.errors))):
        store.set_project_field(pid, name, value)
    store.delete_project_field(pid, "backfill_error")
    request_refresh(ctx.redis, ctx.settings, context, len(report.stored) + len(report.removed), "backfill")
    report_progress(**summary)
    logger.info("project %s: read %d annotations from Label Studio: %s", pid, len(pairs), summary)
    return summary


def backfill_if_needed(context: dict) -> dict | None:
    """The "backfill" job: the first read of a project's annotations, or a later comparison when one is due."""
    ctx, project = get_context(), ProjectContext.from_job(context)
    stored = ctx.store.require_project(project.project)
    if not stored.get("backfilled"):
        return ensure_backfilled(ctx, project)
    if not project.has_api or reconcile_due(ctx.redis, ctx.settings, stored) is None:
        return None
    return _read_or_record_failure(ctx, project)


def ingest_large_webhook(body_key: str) -> dict:
    """A webhook body too large to ingest within Label Studio's 1 s: parsed and handled here, like /webhook."""
    ctx = get_context()
    raw = ctx.redis.get(body_key)
    if raw is None:
        raise BadRequest(f"webhook body {body_key} is gone (kept {WEBHOOK_BODY_TTL_S} s)")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        body = None
    if not isinstance(body, dict):
        ctx.redis.delete(body_key)
        raise BadRequest("webhook body is not a JSON object")
    outcome = handle_event(Backend(ctx.settings, ctx.redis, ctx.store), body)
    ctx.redis.delete(body_key)
    report_progress(**{k: v for k, v in outcome.items() if k in ("action", "stored", "removed", "unchanged")})
    return outcome


def ingest_examples(context: dict, annotation_ids: list[int]) -> dict:
    """Cache the images and masks of freshly stored examples on disk, so predictions need no download; then encode
    their labels' support sets (SUPPORT_POLICY=similar: describe their pools), so the next click does not wait."""
    ctx, project = get_context(), ProjectContext.from_job(context)
    files, pid = ctx.example_files(project), project.project
    done, failed, labels = 0, {}, set()
    for annotation_id in annotation_ids:
        example = ctx.store.get(pid, annotation_id)
        if example is None:
            continue
        try:
            files.prepare(pid, example)
            done += 1
        except BadRequest as exc:  # a mask that does not decode: the example can never be used
            failed[annotation_id] = f"removed: {exc.message}"
            ctx.store.remove(pid, [annotation_id], reason=failed[annotation_id])
            continue
        except BackendError as exc:  # the image could not be fetched now: kept, tried again when predicting
            failed[annotation_id] = f"image not cached: {exc.message}"
        labels.update(example.labels)  # of the examples still stored
    ctx.store.record_errors(pid, {str(a): m for a, m in failed.items()})
    prepared = {"described": 0, "encoded": 0}
    labels = sorted(labels)
    if done and labels:  # the next click finds its supports ready in this process (a worker serves every queue)
        segmenter = ctx.segmenter(project)
        if ctx.settings.support_policy == "similar":
            prepared["described"] = segmenter.describe_pools(pid, labels)
        else:
            prepared["encoded"] = len(segmenter.supports(pid, project.config, labels))
    report_progress(done=done, failed=failed, **prepared)
    return {"done": done, "failed": failed, **prepared}


def secure_webhook(context: dict, backend_host: str) -> str:
    """Add our basic-auth header to the project's webhook(s) at `backend_host`; records and returns what it did."""
    ctx, project = get_context(), ProjectContext.from_job(context)
    settings = ctx.settings
    expected = "Basic " + base64.b64encode(f"{settings.basic_auth_user}:{settings.basic_auth_pass}".encode()).decode()
    api = ctx.api(project)
    hooks = api.call("listing the project's webhooks",
                     lambda: list(api.client.webhooks.list(project=project.project, request_options=ONCE)))
    ours = [h for h in hooks if urlparse(h.url).netloc == backend_host and urlparse(h.url).path.rstrip("/").endswith("/webhook")]
    if not ours:  # Label Studio makes it just after the /setup that queued this: RQ retries the job shortly
        state = f"no webhook to {backend_host}/webhook in the project yet; looking again"
        ctx.store.set_project_field(project.project, "webhook_auth", state)
        raise BackendError(state)
    else:
        changed = []
        for hook in ours:
            headers = dict(hook.headers or {}) if isinstance(hook.headers, dict) else {}
            if headers.get("Authorization") != expected:
                api.call(f"adding basic auth to webhook {hook.id}",
                         lambda: api.client.webhooks.update(hook.id, headers={**headers, "Authorization": expected},
                                                            request_options=ONCE))
                changed.append(hook.id)
        state = f"added basic auth to webhook(s) {changed}" if changed else "already set on the project's webhook"
    ctx.store.set_project_field(project.project, "webhook_auth", state)
    ctx.store.set_project_field(project.project, "webhook_auth_at", server_time(ctx.redis))
    logger.info("project %s: %s", project.project, state)
    return state


# ---- clicks: /predict ------------------------------------------------------------------------


def predict_tasks(context: dict, tasks: list[dict], deadline: float) -> dict:
    """Predict the tasks of one /predict and deliver them exactly once.

    The worker alone decides how: finished before `deadline` (Redis time), the predictions go back to
    the waiting web process, which returns them to Label Studio; finished later, they are posted
    through the API. A job that starts after its deadline is dropped (its caller is gone).
    Per task the answer is a prediction, or None (failed, or being delivered by another job).
    """
    ctx, project, job_id = get_context(), ProjectContext.from_job(context), _job_id()
    out = {"model_version": project.model_version, "predictions": [None] * len(tasks), "failures": {}, "skipped": {}}
    started = time.monotonic()
    try:
        if server_time(ctx.redis) >= deadline:
            return {**out, "delivered": "dropped"}
        delivered = _predict_and_deliver(ctx, project, tasks, deadline, job_id, out)
        record_click_seconds(ctx.redis, time.monotonic() - started)
        return delivered
    finally:
        click_ended(ctx.redis, job_id)


def predict_interactive(context: dict, task: dict, regions: list[dict], deadline: float) -> dict:
    """A smart-tool request: the refined regions of one task, returned to the waiting web process only.

    Nothing is posted or recorded in the ledger: Label Studio shows the answer in the editor, and the
    annotator accepts it as an annotation. A job that starts after its deadline is dropped.
    """
    ctx, project, job_id = get_context(), ProjectContext.from_job(context), _job_id()
    started = time.monotonic()
    try:
        if server_time(ctx.redis) >= deadline:
            return {"delivered": "dropped"}
        try:
            prompts = parse_prompts(regions, project.config, ctx.settings.max_prompts)
            prediction = ctx.segmenter(project).predict_interactive(
                project.project, task, project.config, prompts, expired=lambda: server_time(ctx.redis) >= deadline)
        except DeadlinePassed as exc:  # its caller got a 504 and is gone: the remaining passes are not run
            logger.info("smart-tool job %s stopped: %s", job_id, exc.message)
            return {"delivered": "dropped"}
        except BackendError as exc:  # the web answers it with the same class, status and message
            return {"delivered": "error", **error_record(exc)}
        record_click_seconds(ctx.redis, time.monotonic() - started, prompt_passes(prompts))
        return {"delivered": "returned", "prediction": prediction}
    finally:
        click_ended(ctx.redis, job_id)


def _predict_and_deliver(ctx: WorkerContext, project: ProjectContext, tasks: list[dict], deadline: float, job_id: str,
                         out: dict) -> dict:
    ledger = DeliveryLedger(ctx.redis, project.project, project.model_version)
    held = held_predictions(tasks, project.model_version)
    wanted = [int(t["id"]) for t in tasks if not held.get(int(t["id"]))]
    claims = {c.task_id: c for c in ledger.claim(wanted, job_id, project.revision, click_may_take(job_alive(ctx.redis)))}
    for task in tasks:
        tid = int(task["id"])
        if tid not in claims:
            out["skipped"][tid] = ("Label Studio holds a prediction of this version" if held.get(tid)
                                   else "another job is delivering this task's prediction")
    run = _predict_claimed(ctx, project, ledger, claims, tasks)
    out["failures"].update({f.task_id: f.message for f in run.failures})
    if server_time(ctx.redis) < deadline:
        for tid, claim in claims.items():
            ledger.record(claim, via=VIA_RETURNED, revision=run.revision)
        out["predictions"] = [run.predictions.get(int(t["id"])) for t in tasks]
        if claims and project.has_api:  # Label Studio's Test button shows predictions without storing them
            submit(ctx.redis, ctx.settings, "confirm-returned", project.to_job(), sorted(claims),
                   meta={"project": project.project}, delay_s=ctx.settings.confirm_returned_s)
        return {**out, "delivered": "returned"}
    posted, post_failed = _post(ctx, project, ledger, claims, run.predictions, run.revision, progress=None)
    out["failures"].update(post_failed)
    return {**out, "delivered": "posted", "posted": posted}


def confirm_returned(context: dict, task_ids: list[int]) -> dict:
    """Forget returned deliveries that Label Studio did not store (its Test button answers the user only), so
    the ledger counts what Label Studio holds and the next run delivers those tasks."""
    ctx, project = get_context(), ProjectContext.from_job(context)
    ledger, api = DeliveryLedger(ctx.redis, project.project, project.model_version), ctx.api(project)
    forgotten = []
    for tid in task_ids:
        entry = ledger.get(tid)
        if entry is None or entry.via != VIA_RETURNED:
            continue  # redone or replaced meanwhile
        if not api.prediction_ids(tid, project.model_version) and ledger.forget(tid, entry):
            forgotten.append(tid)
    if forgotten:
        logger.info("project %s: %d returned predictions were not stored by Label Studio (the Test button?): %s",
                    project.project, len(forgotten), forgotten)
    return {"checked": len(task_ids), "not_stored": forgotten}


def _job_id() -> str:
    job = get_current_job()
    return job.id if job is not None else f"inline-{time.time()}"


def _predict_claimed(ctx: WorkerContext, project: ProjectContext, ledger: DeliveryLedger, claims: dict[int, Claim],
                     tasks: list[dict]):
    """Predict the claimed tasks; every claim is given back if the model fails, a failed task's claim too."""
    try:
        run = ctx.segmenter(project).predict(project.project, [t for t in tasks if int(t["id"]) in claims],
                                             project.config)
    except BaseException:
        for claim in claims.values():
            ledger.release(claim)
        raise
    for failure in run.failures:
        ledger.release(claims.pop(failure.task_id))
    return run


def _post(ctx: WorkerContext, project: ProjectContext, ledger: DeliveryLedger, claims: dict[int, Claim],
          predictions: dict[int, dict], revision: int, progress: Progress | None,
          drop_other_versions: bool = False) -> tuple[int, dict[int, str]]:
    """Post each claimed prediction through the API as the task's only one of its version (and with
    `drop_other_versions`, its only one at all).

    Returns how many were posted and, per task that was not, why; its claim is given back, so the next
    run (a job retry, the next prelabel) delivers it. Once Label Studio is unavailable the remaining
    tasks are not tried: they all wait for the retry.
    """
    api = ctx.api_or_none(project)
    posted, failed = 0, {}
    down: str | None = None if api is not None else (
        "no Label Studio API access to post predictions (LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY)")
    for tid, claim in claims.items():
        if down is None:
            try:
                ls_id, dropped = api.replace_prediction(tid, predictions[tid], project.project, drop_other_versions)
            except LabelStudioUnavailable as exc:
                down = exc.message
            except LabelStudioRefused as exc:
                ledger.release(claim)
                failed[tid] = f"Label Studio refused it: {exc.message}"
                if progress is not None:
                    progress.mark_failed(tid, failed[tid])
                continue
            else:
                ledger.record(claim, via=VIA_POSTED, ls_id=ls_id, revision=revision)
                for version in dropped:  # those deliveries are gone from Label Studio: they stop counting
                    DeliveryLedger(ctx.redis, project.project, version).deleted(tid)
                posted += 1
                if progress is not None:
                    progress.mark_done(tid)
                    report_progress(done=posted)
                continue
        ledger.release(claim)
        failed[tid] = f"not posted yet: {down}"
        if progress is not None:
            progress.mark_failed(tid, failed[tid])
    if down is not None:
        logger.warning("project %s: %d predictions not posted: %s", project.project, len(failed), down)
    return posted, failed


# ---- bulk pre-annotation ---------------------------------------------------------------------


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
    ctx, project, job_id = get_context(), ProjectContext.from_job(context), _job_id()
    if ctx.redis.exists(cancelled_batch_key(job_id)):  # dequeued just before a cancel dropped it (counted there)
        report_progress(cancelled=True)
        return {"posted": 0, "skipped": len(tasks), "failed": {}, "cancelled": True}
    progress = Progress(ctx.redis, project.project)
    ledger = DeliveryLedger(ctx.redis, project.project, project.model_version)
    claims = {c.task_id: c for c in ledger.claim([int(t["id"]) for t in tasks], job_id, project.revision,
                                                 own_may_take(job_id, project.revision, job_alive(ctx.redis)))}
    skipped = len(tasks) - len(claims)
    report_progress(total=len(tasks), skipped=skipped, done=0)
    if not claims:
        return {"posted": 0, "skipped": skipped, "failed": {}}
    run = _predict_claimed(ctx, project, ledger, claims, tasks)
    failed = {f.task_id: f.message for f in run.failures}
    for failure in run.failures:
        progress.mark_failed(failure.task_id, failure.message)
    report_progress(failed=len(failed))
    posted, post_failed = _post(ctx, project, ledger, claims, run.predictions, run.revision, progress,
                                drop_other_versions)
    failed.update(post_failed)
    report_progress(done=posted, failed=len(failed))
    unreachable = [m for m in post_failed.values() if m.startswith("not posted yet")]
    if unreachable:  # RQ retries the batch later (RETRY_INTERVALS_S); what was posted stays recorded
        raise LabelStudioUnavailable(f"{len(unreachable)} of {len(tasks)} predictions not posted: {unreachable[0]}")
    return {"posted": posted, "skipped": skipped, "failed": failed}
