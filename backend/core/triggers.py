"""What annotation webhooks and /setup trigger: support examples, auto pre-label and training, backfill, webhook auth."""

from __future__ import annotations

import logging

from redis import Redis
from redis.exceptions import RedisError

from .catalog import submit
from .context import ProjectContext, resolve_project
from .errors import BadRequest
from .ingest import ingest
from .keys import PREFIX
from .ls_schema import (
    AnnotationEvent,
    AnnotationsCreatedEvent,
    AnnotationsDeletedEvent,
    ProjectPayload,
    TasksCreatedEvent,
    WebhookEvent,
    checked,
    int_id,
)
from .queues import require_redis, server_time
from .refresh import request_refresh
from .services import Backend
from .settings import Settings
from .store import parse_project_id
from .train_queue import enqueue_training

logger = logging.getLogger(__name__)

REJECTED_WEBHOOKS_KEY = f"{PREFIX}:rejected-webhooks"


def count_rejected_webhook(redis: Redis) -> None:
    """Count a webhook refused for missing basic auth (Label Studio itself logs nothing about it)."""
    try:
        pipe = redis.pipeline()
        pipe.hincrby(REJECTED_WEBHOOKS_KEY, "count", 1)
        pipe.hset(REJECTED_WEBHOOKS_KEY, "last_at", server_time(redis))
        pipe.execute()
    except RedisError:
        pass


def rejected_webhooks(redis: Redis, settings: Settings | None = None) -> dict | None:
    """Webhook calls refused for missing basic auth, with what to do about them."""
    raw = {k.decode(): v.decode() for k, v in redis.hgetall(REJECTED_WEBHOOKS_KEY).items()}
    if not raw:
        return None
    if settings is not None and settings.label_studio_url and settings.label_studio_api_key:
        fix = ("the backend adds the header 'Authorization: Basic ...' to a project's webhook through the Label Studio "
               "API at the project's next /setup (Label Studio sends one when the model is saved in Settings -> Model "
               "or predictions are retrieved); the annotations refused meanwhile are read back from Label Studio by "
               "the reconcile that /setup then queues (/status/<project> -> backfill.reconciled_at)")
    else:
        fix = ("add the header 'Authorization: Basic <base64 user:pass>' to the project's webhook (Project -> Settings "
               "-> Webhooks), or give the backend LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY: it then adds the header "
               "itself and reads back the annotations whose webhooks were refused")
    return {"count": int(raw["count"]), "last_at": float(raw["last_at"]), "fix": fix}


BACKFILL_RETRY_S = 60
"""A backfill or reconcile is queued at most this often per project (clicks ask again while one has not succeeded)."""


def _refused_at(redis: Redis) -> float | None:
    raw = redis.hget(REJECTED_WEBHOOKS_KEY, "last_at")
    return float(raw) if raw is not None else None


def reconcile_due(redis: Redis, settings: Settings, project: dict[str, str]) -> str | None:
    """Why the project's stored examples should be compared with the annotations Label Studio holds now, or None."""
    if not project.get("backfilled"):
        return "first read of the project's annotations"
    last = float(project.get("reconciled_at") or project["backfilled"])
    refused = _refused_at(redis)
    if refused is not None and refused > last:
        return "webhooks were refused since the last comparison"
    if settings.reconcile_interval_s and server_time(redis) - last >= settings.reconcile_interval_s:
        return f"every RECONCILE_INTERVAL_S ({settings.reconcile_interval_s:g} s)"
    return None


def queue_backfill(backend: Backend, context: ProjectContext) -> str | None:
    """Queue reading the project's annotations from Label Studio when one is due (see reconcile_due): until a
    first read succeeded, after refused webhooks, and every RECONCILE_INTERVAL_S. Returns why, if queued.

    At most one per project, cause (first read, refusals, interval) and BACKFILL_RETRY_S.
    """
    if not context.has_api:
        return None
    why = reconcile_due(backend.redis, backend.settings, backend.store.project(context.project) or {})
    if why is None:
        return None
    cause = why.split(" ")[0]
    if backend.redis.set(f"{PREFIX}:backfill-queued:{context.project}:{cause}", 1, nx=True, ex=BACKFILL_RETRY_S):
        submit(backend.redis, backend.settings, "backfill", context.to_job(), meta={"project": context.project,
                                                                                     "why": why})
        return why
    return None


def webhook_auth_due(backend: Backend, pid: int) -> bool:
    """True unless the webhook had our header when last checked, after the last refused webhook (a webhook
    whose header was removed since is checked again), or a check ran in the last minute."""
    project = backend.store.project(pid) or {}
    refused = _refused_at(backend.redis)
    if project.get("webhook_auth", "").startswith(("added", "already")) and (
            refused is None or refused <= float(project.get("webhook_auth_at") or 0)):
        return False
    return backend.redis.set(f"{PREFIX}:webhook-auth-check:{pid}:{refused}", 1, nx=True, ex=60) is True


def backfill_state(project: dict[str, str], context: ProjectContext) -> dict:
    """Whether the project's existing annotations were read from Label Studio (and when they were last compared
    with what it holds), and if not, why."""
    if project.get("backfilled"):
        return {"done": True, "at": float(project["backfilled"]), "annotations": int(project.get("backfill_annotations", 0)),
                "errors": int(project.get("backfill_errors", 0)),
                "reconciled_at": float(project.get("reconciled_at") or project["backfilled"]),
                "reconcile_error": project.get("backfill_error") or None}
    if not context.has_api:
        reason = "no Label Studio API access: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY to read existing annotations"
    else:
        reason = project.get("backfill_error") or "queued"
    return {"done": False, "reason": reason}


def record_annotations(backend: Backend, context: ProjectContext, action: str, body: dict) -> dict:
    """Store or replace the support examples of annotation events; queue their caching. Redis writes only."""
    if action == "ANNOTATIONS_CREATED":
        event = checked(AnnotationsCreatedEvent, body)
        by_id = {int_id(t.get("id")): t for t in event.task if isinstance(t, dict)}
        pairs = [(a, by_id.get(int_id(a.get("task"))) if isinstance(a, dict) else None) for a in event.annotation]
    else:
        single = checked(AnnotationEvent, body)
        pairs = [(single.annotation, single.task)]
    config = context.config
    report = ingest(backend.store, context.project, config, pairs, backend.settings.max_image_pixels)
    if report.errors and not (report.stored or report.unchanged or report.removed):
        raise BadRequest("; ".join(f"annotation {aid}: {msg}" for aid, msg in report.errors.items()))
    job_id = None
    if report.stored:
        job = submit(backend.redis, backend.settings, "cache-examples", context.to_job(), report.stored,
                     meta={"project": context.project})
        job_id = job.id
    out = {"status": "ok", "action": action, **report.as_dict(), "revision": backend.store.revision(context.project),
           "job": job_id}
    out.update(maybe_prelabel(backend, context, config.labels))
    out.update(maybe_train(backend, context, len(report.stored)))
    out.update(request_refresh(backend.redis, backend.settings, context, len(report.stored) + len(report.removed), action))
    return out


def maybe_train(backend: Backend, context: ProjectContext, new_examples: int) -> dict:
    """With TRAIN_EVERY=m, queue fine-tuning once m new examples arrived since the last trigger."""
    every, pid = backend.settings.train_every, context.project
    if every <= 0 or not new_examples:
        return {}
    count = backend.store.incr_project_field(pid, "new_since_train", new_examples)
    if count < every:
        return {}
    backend.store.set_project_field(pid, "new_since_train", 0)
    return {"training": enqueue_training(backend.redis, backend.settings, context, f"{count} new annotations")}


def maybe_prelabel(backend: Backend, context: ProjectContext, labels: tuple[str, ...]) -> dict:
    """Once every label has PRELABEL_MIN_EXAMPLES examples, queue "pre-label the rest" (once per project)."""
    need, pid = backend.settings.prelabel_min_examples, context.project
    if need <= 0 or not context.has_api:
        return {}
    counts = backend.store.label_counts(pid)
    if any(counts.get(label, 0) < need for label in labels):
        return {}
    if not backend.store.claim_flag(pid, "prelabel_triggered"):
        return {}
    context = resolve_project(backend.settings, backend.store, pid)  # the revision after this event
    job = submit(backend.redis, backend.settings, "list-tasks", context.to_job(), meta={"project": pid})
    return {"prelabel_job": job.id}


def predict_new_tasks(backend: Backend, context: ProjectContext, body: dict) -> dict:
    """Imported tasks get predictions with no action, as a label edit's tasks do: once the project has examples,
    their count goes to the debounced refresh, which predicts every unlabeled task without one."""
    count = len(checked(TasksCreatedEvent, body).tasks)
    if not any(backend.store.label_counts(context.project).values()):
        return {"tasks": count, "refresh": "not yet: no support examples (label a few images first)"}
    return {"tasks": count, **request_refresh(backend.redis, backend.settings, context, count, "TASKS_CREATED")}


ANNOTATION_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED")
WEBHOOK_BODY_TTL_S = 24 * 3600
"""How long the body of a webhook too large to answer inline waits in Redis for its ingest job."""


def handle_event(backend: Backend, body: dict) -> dict:
    """A webhook event: annotations stored or removed as support examples, or a training run queued."""
    settings, redis, store = backend.settings, backend.redis, backend.store
    action = checked(WebhookEvent, body).action
    if action not in (*ANNOTATION_EVENTS, "ANNOTATIONS_DELETED", "START_TRAINING", "TASKS_CREATED"):
        return {"status": "ignored", "action": action}
    pid = parse_project_id(body.get("project"))
    require_redis(redis)
    project_payload = body.get("project") if isinstance(body.get("project"), dict) else {}
    payload_config = checked(ProjectPayload, project_payload, "project").label_config
    known = store.project(pid) is not None
    if not known and not payload_config:
        store.require_project(pid)  # 404 naming the fix
    context = resolve_project(settings, store, pid, payload_config or None)
    if not known:  # Redis lost it (restarted without persistence): the event's project re-registers it
        logger.warning("project %s was unknown (Redis empty?); registered from the webhook payload", pid)
        queue_backfill(backend, context)
    if action == "START_TRAINING":
        return {"action": action, **enqueue_training(redis, settings, context, "START_TRAINING")}
    if action == "TASKS_CREATED":
        return {"status": "ok", "action": action, **predict_new_tasks(backend, context, body)}
    if action == "ANNOTATIONS_DELETED":
        removed = store.remove(pid, [ref.id for ref in checked(AnnotationsDeletedEvent, body).annotations])
        return {"status": "ok", "action": action, "removed": removed, "revision": store.revision(pid),
                **request_refresh(redis, settings, context, removed, action)}
    return record_annotations(backend, context, action, body)
