"""The Label Studio ML backend protocol over HTTP (Flask). Routes parse, validate, enqueue and report."""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid

from flask import Flask, jsonify, request
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus
from rq.results import Result

from .admission import ClickSlots, admit_click, click_started
from .bodies import annotation_ids, json_body, tasks_of, text_field
from .bulk import Progress
from .clicks import GRACE_S, answer, answer_bulk, answer_interactive, late, wait
from .context import resolve_project
from .errors import BackendError, BadRequest, NotFound, Overloaded, ServiceUnavailable
from .interactive import interactive_regions, parse_prompts
from .events import (
    backfill_state,
    count_rejected_webhook,
    queue_backfill,
    record_annotations,
    rejected_webhooks,
    webhook_auth_due,
)
from .label_config import parse_label_config
from .ledger import DeliveryLedger
from .queues import (
    QUEUE_HIGH,
    enqueue,
    live_workers,
    persistence,
    ping,
    queue_lengths,
    redis_url_warning,
    require_redis,
    running_jobs,
    server_time,
)
from .registry import VersionRegistry
from .services import Backend
from .settings import Settings
from .store import SupportStore, parse_project_id
from .versions import base_version, current_version, describe_model

logger = logging.getLogger(__name__)

ANNOTATION_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED")


def startup_warnings(settings: Settings, redis: Redis) -> list[str]:
    """What an operator should fix: an exposed Redis, one that forgets everything on restart."""
    warnings = [w for w in (redis_url_warning(settings.redis_url),) if w]
    if persistence(redis) == "none":
        warnings.append("Redis keeps no data over a restart (no AOF, no RDB snapshots): projects and examples are "
                        "then re-registered on Label Studio's next /setup or webhook and re-read by the backfill, "
                        "but turn on appendonly to keep them")
    return warnings


def create_app(settings: Settings | None = None, redis: Redis | None = None) -> Flask:
    """Build the Flask app; with no arguments, settings come from the environment."""
    from .queues import connect

    settings = settings or Settings.from_env()
    redis = redis if redis is not None else connect(settings)
    backend = Backend(settings, redis, SupportStore(redis, settings.model_dir))
    VersionRegistry(redis, backend.store).rebuild_at_start()  # version folders are the truth; Redis may have lost them
    app = Flask(__name__)
    app.config["BACKEND"] = backend
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    slots = ClickSlots(settings.predict_concurrency)
    checked = {"at": float("-inf"), "value": []}

    @app.errorhandler(BackendError)
    def _backend_error(exc: BackendError):
        response = jsonify(error=exc.message, status=exc.status)
        response.status_code = exc.status
        if isinstance(exc, Overloaded):
            response.headers["Retry-After"] = str(exc.retry_after)
        return response

    @app.errorhandler(RedisConnectionError)
    @app.errorhandler(RedisTimeoutError)
    def _redis_down(exc: RedisError):
        return jsonify(error=f"Redis is unavailable ({exc}); start Redis or fix REDIS_URL", status=503), 503

    @app.errorhandler(RedisError)
    def _redis_error(exc: RedisError):
        logger.exception("Redis refused a command")
        return jsonify(error=f"Redis refused a command ({type(exc).__name__}: {exc})", status=500), 500

    @app.errorhandler(413)
    def _too_large(exc):
        return jsonify(error=f"request body exceeds MAX_REQUEST_BYTES={settings.max_request_bytes}", status=413), 413

    @app.errorhandler(404)
    def _not_found(exc):
        return jsonify(error=f"no route {request.method} {request.path}", status=404), 404

    @app.errorhandler(405)
    def _bad_method(exc):
        return jsonify(error=f"{request.method} is not allowed on {request.path}", status=405), 405

    @app.before_request
    def _basic_auth():
        if not settings.auth_enabled or request.path == "/health":
            return None
        auth = request.authorization
        user_ok = auth is not None and hmac.compare_digest((auth.username or "").encode(), settings.basic_auth_user.encode())
        pass_ok = auth is not None and hmac.compare_digest((auth.password or "").encode(), settings.basic_auth_pass.encode())
        if user_ok and pass_ok:
            return None
        if request.path == "/webhook":  # Label Studio logs nothing when its webhook is refused: count it here
            count_rejected_webhook(redis)
        response = jsonify(error="wrong or missing basic auth credentials (BASIC_AUTH_USER / BASIC_AUTH_PASS)", status=401)
        response.status_code = 401
        response.headers["WWW-Authenticate"] = 'Basic realm="diffews"'
        return response

    @app.get("/health")
    def health():
        redis_state = ping(redis)
        workers = live_workers(redis) if redis_state == "ok" else {}
        return jsonify(
            status="UP" if redis_state == "ok" else "DEGRADED",
            model_class="DiffewS",
            model=describe_model(settings),
            redis=redis_state,
            workers=workers,
            rejected_webhooks=rejected_webhooks(redis) if redis_state == "ok" else None,
            warnings=warnings() if redis_state == "ok" else [],
        )

    def warnings() -> list[str]:
        """startup_warnings, read from Redis at most every 30 s (its CONFIG does not change under load)."""
        if time.monotonic() - checked["at"] > 30:
            checked.update(at=time.monotonic(), value=startup_warnings(settings, redis))
        return checked["value"]

    @app.post("/setup")
    def setup():
        body = json_body()
        pid = parse_project_id(body.get("project"))
        config_xml = text_field(body, "schema") or text_field(body, "label_config")
        parse_label_config(config_xml)
        hostname, access_token = text_field(body, "hostname"), text_field(body, "access_token")
        require_redis(redis)
        if settings.label_studio_url and settings.label_studio_api_key:
            hostname = access_token = ""  # the configured Label Studio wins; /setup's host and token are not kept
        else:
            known = (backend.store.project(pid) or {}).get("hostname", "")
            if hostname and known and hostname.rstrip("/") != known.rstrip("/"):
                logger.warning("project %s: /setup asked to move its Label Studio from %s to %s; ignored (set "
                               "LABEL_STUDIO_URL to change it)", pid, known, hostname)
                hostname = access_token = ""
        backend.store.register_project(pid, config_xml, hostname=hostname, access_token=access_token)
        context = resolve_project(settings, backend.store, pid, config_xml)
        queue_backfill(backend, context)
        if settings.auth_enabled and context.has_api and webhook_auth_due(backend, pid):
            # Label Studio creates its webhook without our basic auth: add the header through its API.
            enqueue(redis, QUEUE_HIGH, "backend.jobs.secure_webhook", args=(context.to_job(), request.host),
                    timeout_s=60, retries=3, meta={"project": pid})
        return jsonify(model_version=context.model_version)

    @app.get("/versions")
    def versions():
        names = [base_version(settings)] + [v["name"] for v in VersionRegistry(redis, backend.store).list()]
        return jsonify(versions=names)

    @app.get("/projects/<int:pid>/versions")
    def project_versions(pid: int):
        project = backend.store.require_project(pid)
        return jsonify(
            base=base_version(settings), current=current_version(settings, project),
            active=project.get("active_version"), pinned=project.get("pinned_version"),
            versions=VersionRegistry(redis, backend.store).list(pid),
        )

    @app.post("/projects/<int:pid>/pin")
    def pin_version(pid: int):
        backend.store.require_project(pid)
        body = json_body()
        if "version" not in body or not (body["version"] is None or isinstance(body["version"], str)):
            raise BadRequest('body must be {"version": "<name>"} to pin (or roll back), or {"version": null} to unpin')
        VersionRegistry(redis, backend.store).pin(pid, body["version"], base_version(settings))
        return jsonify(project=pid, pinned=body["version"], current=current_version(settings, backend.store.project(pid)))

    @app.post("/predict")
    def predict():
        body = json_body()
        tasks = tasks_of(body)
        pid = parse_project_id(body.get("project") or tasks[0].get("project"))
        require_redis(redis)
        context = resolve_project(settings, backend.store, pid, text_field(body, "label_config") or None)
        image_key = context.config.image_key
        slim = [{"id": int(t["id"]), "data": {image_key: (t.get("data") or {}).get(image_key)},
                 "predictions": [{"id": p.get("id"), "model_version": p.get("model_version")}
                                 for p in t.get("predictions") or [] if isinstance(p, dict)]} for t in tasks]
        smart = interactive_regions(body)
        if smart is not None:  # a smart tool: refined regions for one task, returned only (see interactive.py)
            if len(tasks) != 1:
                raise BadRequest(f"an interactive request (params.context) takes exactly one task, got {len(tasks)}")
            parse_prompts(smart, context.config)  # a malformed prompt is a 400 now, not a failed job
            func, args = "backend.jobs.predict_interactive", (context.to_job(), slim[0], smart)
        elif len(tasks) > settings.sync_max_tasks:
            return answer_bulk(backend, context, slim)
        else:
            func, args = "backend.jobs.predict_tasks", (context.to_job(), slim)
        workers = live_workers(redis)[QUEUE_HIGH]
        if workers == 0:
            raise ServiceUnavailable(
                "no worker is running on the predict-high queue: start one with `python -m backend worker`"
            )
        now = server_time(redis)
        admit_click(redis, settings, workers, now)
        with slots.take():
            deadline = now + settings.predict_wait_s
            job_id = f"click-{pid}-{uuid.uuid4().hex[:12]}"
            click_started(redis, job_id, deadline)
            job = enqueue(redis, QUEUE_HIGH, func, args=(*args, deadline),
                          timeout_s=settings.job_timeout_s, at_front=True, job_id=job_id,
                          ttl_s=int(settings.predict_wait_s + GRACE_S) + 1, meta={"project": pid, "tasks": len(tasks)})
            outcome = wait(job, deadline + GRACE_S - server_time(redis))
        if outcome is None:
            raise late(job, context, settings.predict_wait_s, posts_later=smart is None)
        if outcome.type != Result.Type.SUCCESSFUL:
            raise ServiceUnavailable(f"prediction job {job.id} failed: {(outcome.exc_string or '').strip().splitlines()[-1:]}")
        if smart is not None:
            return answer_interactive(job, outcome.return_value, context, settings.predict_wait_s)
        return answer(job, outcome.return_value, context, settings.predict_wait_s)

    @app.post("/webhook")
    def webhook():
        body = json_body()
        action = body.get("action")
        if not isinstance(action, str):
            raise BadRequest("webhook body needs an 'action' string")
        if action not in (*ANNOTATION_EVENTS, "ANNOTATIONS_DELETED", "START_TRAINING"):
            return jsonify(status="ignored", action=action)
        pid = parse_project_id(body.get("project"))
        require_redis(redis)
        project_payload = body.get("project") if isinstance(body.get("project"), dict) else {}
        payload_config = text_field(project_payload, "label_config")
        known = backend.store.project(pid) is not None
        if not known and not payload_config:
            backend.store.require_project(pid)  # 404 naming the fix
        context = resolve_project(settings, backend.store, pid, payload_config or None)
        if not known:  # Redis lost it (restarted without persistence): the event's project re-registers it
            logger.warning("project %s was unknown (Redis empty?); registered from the webhook payload", pid)
            queue_backfill(backend, context)
        if action == "START_TRAINING":
            from .training import enqueue_training

            return jsonify(action=action, **enqueue_training(redis, settings, context, "START_TRAINING"))
        if action == "ANNOTATIONS_DELETED":
            ids = annotation_ids(body.get("annotations"))
            removed = backend.store.remove(pid, ids)
            return jsonify(status="ok", action=action, removed=removed, revision=backend.store.revision(pid))
        return record_annotations(backend, context, action, body)

    @app.get("/status/<int:pid>")
    def status(pid: int):
        project = backend.store.require_project(pid)
        context = resolve_project(settings, backend.store, pid)
        progress = Progress(redis, pid)
        return jsonify(
            project=pid,
            model_version=context.model_version,
            revision=context.revision,
            examples=backend.store.label_counts(pid),
            annotation_errors=backend.store.errors(pid),
            label_studio_api=context.ls_url or None,
            backfill=backfill_state(project, context),
            backfilled=bool(project.get("backfilled")),
            deliveries=DeliveryLedger(redis, pid, context.model_version).counts(),
            progress=progress.read(),
            failures=progress.failures(),
            training=json.loads(project["last_training"]) if project.get("last_training") else None,
            webhook_auth=project.get("webhook_auth") if settings.auth_enabled else "basic auth is off",
            queues=queue_lengths(redis),
            running=running_jobs(redis),
            workers=live_workers(redis),
        )

    @app.post("/prelabel/<int:pid>")
    def prelabel(pid: int):
        backend.store.require_project(pid)
        context = resolve_project(settings, backend.store, pid)
        if not context.has_api:
            raise BadRequest("pre-labeling posts predictions through the Label Studio API: set LABEL_STUDIO_URL and "
                             "LABEL_STUDIO_API_KEY (a Personal Access Token) for the web process and the workers")
        job = enqueue(redis, QUEUE_HIGH, "backend.jobs.prelabel_project", args=(context.to_job(),),
                      timeout_s=settings.job_timeout_s, retries=2, meta={"project": pid})
        return jsonify(status="queued", job=job.id, model_version=context.model_version), 202

    @app.get("/jobs/<job_id>")
    def job_status(job_id: str):
        job = _fetch_job(redis, job_id)
        status = job.get_status()
        info = {"id": job.id, "status": str(status.value if hasattr(status, "value") else status),
                "meta": job.get_meta(), "func": job.func_name, "enqueued_at": _iso(job.enqueued_at),
                "started_at": _iso(job.started_at), "ended_at": _iso(job.ended_at)}
        if status == JobStatus.FAILED:
            result = job.latest_result()
            info["error"] = ((result.exc_string if result else "") or "").strip().splitlines()[-1:] or ["failed"]
        return jsonify(info)

    @app.post("/jobs/<job_id>/retry")
    def job_retry(job_id: str):
        job = _fetch_job(redis, job_id)
        try:
            job.requeue()
        except InvalidJobOperation as exc:
            raise BadRequest(f"job {job_id} cannot be retried: {exc}") from None
        return jsonify(id=job.id, status="queued"), 202

    return app


def _iso(value) -> str | None:
    return value.isoformat() if value else None


def _fetch_job(redis: Redis, job_id: str) -> Job:
    try:
        return Job.fetch(job_id, connection=redis)
    except NoSuchJobError:
        raise NotFound(f"no job {job_id!r} (finished jobs are kept for an hour, failed ones for a week)") from None


