"""Ingest jobs: reading a project's annotations from Label Studio (backfill and reconcile), webhook bodies too
large for the web, caching new examples' files and encoding their supports, and securing the project's webhook."""

from __future__ import annotations

import base64
import json
import logging
from urllib.parse import urlparse

from ..core.context import ProjectContext
from ..core.errors import BackendError, BadRequest
from ..core.ingest import ingest
from ..core.ls_schema import int_id
from ..core.queues import server_time
from ..core.refresh import request_refresh
from ..core.services import Backend
from ..core.triggers import BACKFILL_RETRY_S, WEBHOOK_BODY_TTL_S, handle_event, reconcile_due
from .ls_client import ONCE
from .runtime import WorkerContext, get_context, report_progress

logger = logging.getLogger(__name__)


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
