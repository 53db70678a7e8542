"""The Label Studio ML backend protocol: /health, /setup, /predict, /webhook and /versions.

Label Studio ML backends usually subclass label-studio-ml's LabelStudioMLBase (setup, predict, fit,
model_version). Its PyPI release (1.0.9) does not work with Label Studio 1.23, so this backend serves the
protocol itself; MLBackend keeps that interface's names, and the routes only parse and answer.
"""

from __future__ import annotations

import logging
import uuid

from flask import Blueprint, Response, jsonify, request
from rq.results import Result

from ..core.admission import admit_click, click_started
from ..core.bulk import held_answers, slim_task
from ..core.catalog import GRACE_S, submit
from ..core.context import ProjectContext, resolve_project
from ..core.errors import BadRequest, ServiceUnavailable
from ..core.keys import PREFIX
from ..core.label_config import parse_label_config
from ..core.ls_schema import PredictBody, SetupBody, checked
from ..core.prompts import interactive_regions, parse_prompts, prompt_passes
from ..core.queues import QUEUE_CLICK, live_workers, ping, require_redis, server_time
from ..core.registry import MAX_LISTED, VersionRegistry
from ..core.review_view import queue_review_view
from ..core.services import Backend
from ..core.store import parse_project_id
from ..core.triggers import WEBHOOK_BODY_TTL_S, handle_event, queue_backfill, rejected_webhooks, webhook_auth_due
from ..core.versions import base_version, describe_model, uses_matcher
from .bodies import json_body
from .clicks import answer, answer_bulk, answer_interactive, late, wait
from .state import web_state

logger = logging.getLogger(__name__)

protocol = Blueprint("protocol", __name__)

class MLBackend:
    """Answers Label Studio like a LabelStudioMLBase: setup, predict, fit and model_version."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.settings, self.redis, self.store = backend.settings, backend.redis, backend.store

    def model_version(self, pid: int) -> str:
        """The version the project predicts with now."""
        return resolve_project(self.settings, self.store, pid).model_version

    def setup(self, raw: dict) -> dict:
        """Register a project (config, and the Label Studio host and token unless configured here)."""
        body = checked(SetupBody, raw)
        pid = parse_project_id(body.project)
        config_xml = body.schema_xml or body.label_config
        parse_label_config(config_xml)
        hostname, access_token = body.hostname, body.access_token
        require_redis(self.redis)
        if self.settings.label_studio_url and self.settings.label_studio_api_key:
            hostname = access_token = ""  # the configured Label Studio wins; /setup's host and token are not kept
        else:
            known = (self.store.project(pid) or {}).get("hostname", "")
            if hostname and known and hostname.rstrip("/") != known.rstrip("/"):
                logger.warning("project %s: /setup asked to move its Label Studio from %s to %s; ignored (set "
                               "LABEL_STUDIO_URL to change it)", pid, known, hostname)
                hostname = access_token = ""
        self.store.register_project(pid, config_xml, hostname=hostname, access_token=access_token)
        context = resolve_project(self.settings, self.store, pid, config_xml)
        queue_backfill(self.backend, context)
        if self.settings.auth_enabled and context.has_api and webhook_auth_due(self.backend, pid):
            # Label Studio creates its webhook without our basic auth: add the header through its API.
            submit(self.redis, self.settings, "secure-webhook", context.to_job(), request.host, meta={"project": pid})
        queue_review_view(self.backend, context, request.host)
        return {"model_version": context.model_version}

    def predict(self, raw: dict) -> Response | tuple[Response, int]:
        """Predictions of a /predict body: waited for (a click or a smart tool) or queued (many tasks)."""
        body = checked(PredictBody, raw)
        tasks = [task.model_dump() for task in body.tasks]
        pid = parse_project_id(body.project or tasks[0].get("project"))
        require_redis(self.redis)
        context = resolve_project(self.settings, self.store, pid, body.label_config or None)
        queue_backfill(self.backend, context)  # clicks never backfill: they predict from what is stored
        image_key = context.config.image_key
        slim = [{**slim_task(t, image_key),
                 "predictions": [{"id": p.get("id"), "model_version": p.get("model_version")}
                                 for p in t.get("predictions") or [] if isinstance(p, dict)]} for t in tasks]
        smart = interactive_regions(body.params)
        if smart is not None:  # a smart tool: refined regions for one task, returned only
            if len(tasks) != 1:
                raise BadRequest(f"an interactive request (params.context) takes exactly one task, got {len(tasks)}")
            # a malformed or oversized prompt is a 400 now, not a failed job
            cost = prompt_passes(parse_prompts(smart, context.config, self.settings.max_prompts))
            kind, args = "smart-tool", (context.to_job(), slim[0], smart)
        elif (held := held_answers(tasks, context.model_version)) and len(held) == len(tasks):
            # every task holds a prediction of this version (Label Studio's Test button sends such a task): answer
            # with what it holds; Label Studio never stores the answer for a task that holds one
            return jsonify(results=[held[int(t["id"])] for t in tasks], model_version=context.model_version,
                           skipped={int(t["id"]): "Label Studio holds a prediction of this version" for t in tasks})
        elif len(tasks) > self.settings.sync_max_tasks:
            return answer_bulk(self.backend, context, slim)
        else:
            kind, args, cost = "click", (context.to_job(), slim), 1
        return self._click(context, kind, args, len(tasks), smart is not None, cost)

    def _click(self, context: ProjectContext, kind: str, args: tuple, tasks: int, smart: bool, cost: int) -> Response:
        workers = live_workers(self.redis)[QUEUE_CLICK]
        if workers == 0:
            raise ServiceUnavailable(
                f"no worker is running on the {QUEUE_CLICK} queue: start one with `python -m backend worker`")
        now = server_time(self.redis)
        admit_click(self.redis, self.settings, workers, now, cost)
        with web_state().slots.take():
            deadline = now + self.settings.predict_wait_s
            job_id = f"click-{context.project}-{uuid.uuid4().hex[:12]}"
            click_started(self.redis, job_id, deadline, cost)
            job = submit(self.redis, self.settings, kind, *args, deadline, job_id=job_id,
                         meta={"project": context.project, "tasks": tasks})
            outcome = wait(job, deadline + GRACE_S - server_time(self.redis))
        if outcome is None:
            raise late(job, context, self.settings.predict_wait_s, posts_later=not smart)
        if outcome.type != Result.Type.SUCCESSFUL:
            raise ServiceUnavailable(f"prediction job {job.id} failed: {(outcome.exc_string or '').strip().splitlines()[-1:]}")
        if smart:
            return answer_interactive(job, outcome.return_value, context, self.settings.predict_wait_s)
        return answer(job, outcome.return_value, context, self.settings.predict_wait_s)

    def fit(self, body: dict) -> dict:
        """A webhook event: annotations stored or removed as support examples, or a training run queued."""
        return handle_event(self.backend, body)


def ml_backend() -> MLBackend:
    """The MLBackend of the app handling the request."""
    return MLBackend(web_state().backend)


@protocol.get("/health")
def health():
    state = web_state()
    redis, settings = state.backend.redis, state.backend.settings
    redis_state = ping(redis)
    up = redis_state == "ok"
    workers = live_workers(redis) if up else {}
    idle = [queue for queue, count in workers.items() if count == 0]
    unserved = [f"no live worker on queue {', '.join(idle)}: its jobs wait until one starts "
                f"(python -m backend worker --queues {' '.join(idle)})"] if idle else []
    return jsonify(
        status="UP" if up and not idle else "DEGRADED",
        model_class="Matcher" if uses_matcher(settings) else "DiffewS",
        model=describe_model(settings),
        redis=redis_state,
        workers=workers,
        queues_without_workers=idle,
        rejected_webhooks=rejected_webhooks(redis, settings) if up else None,
        rejected_version_files=VersionRegistry(redis, state.backend.store).rejected() if up else None,
        warnings=unserved + (state.warnings() if up else []),
    )


@protocol.post("/setup")
def setup():
    return jsonify(ml_backend().setup(json_body()))


@protocol.post("/predict")
def predict():
    return ml_backend().predict(json_body())


@protocol.post("/webhook")
def webhook():
    backend = web_state().backend
    size = request.content_length or 0
    if size > backend.settings.webhook_inline_bytes:  # Label Studio waits 1 s: parse and ingest it in a job
        key = f"{PREFIX}:webhook-body:{uuid.uuid4().hex}"
        backend.redis.set(key, request.get_data(), ex=WEBHOOK_BODY_TTL_S)
        job = submit(backend.redis, backend.settings, "large-webhook", key, meta={"bytes": size})
        return jsonify(status="queued", job=job.id, bytes=size), 202
    return jsonify(ml_backend().fit(json_body()))


@protocol.get("/versions")
def versions():
    backend = web_state().backend
    # the newest MAX_LISTED: GET /projects/<id>/versions pages through a project's own
    names = [base_version(backend.settings)] + [v["name"] for v in VersionRegistry(backend.redis, backend.store).list()[-MAX_LISTED:]]
    return jsonify(versions=names)
