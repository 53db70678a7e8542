"""The Label Studio ML backend protocol over HTTP (Flask). Routes parse, validate, enqueue and report."""

from __future__ import annotations

import hmac
import json
import logging
import time
from dataclasses import dataclass

from flask import Flask, Response, jsonify, request
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus
from rq.results import Result

from .admission import ClickSlots, admit_click
from .bulk import Progress, held_predictions, queue_bulk
from .context import ProjectContext, resolve_project
from .errors import BackendError, BadRequest, MediaError, NotFound, Overloaded, PredictionTimeout, ServiceUnavailable
from .ingest import ingest
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
    server_time,
)
from .registry import VersionRegistry
from .settings import Settings
from .store import SupportStore, parse_project_id
from .versions import base_version, current_version, describe_model

logger = logging.getLogger(__name__)

ANNOTATION_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED")
GRACE_S = 5.0
"""/predict waits this long past a job's deadline: the worker decides by the deadline, the web reads its decision."""


@dataclass
class Backend:
    """What every request handler needs; nothing in it is per-process state a request relies on."""

    settings: Settings
    redis: Redis
    store: SupportStore


def startup_warnings(settings: Settings, redis: Redis) -> list[str]:
    """What an operator should fix: an exposed Redis, one that forgets everything on restart."""
    warnings = [w for w in (redis_url_warning(settings.redis_url),) if w]
    if persistence(redis) == "none":
        warnings.append("Redis keeps no data over a restart (no AOF, no RDB snapshots): projects and examples are "
                        "then re-registered on Label Studio's next /setup or webhook and re-read by the backfill, "
                        "but turn on appendonly to keep them")
    return warnings


def _json_body() -> dict:
    try:
        body = request.get_json(silent=True)
    except RecursionError:
        raise BadRequest("request body is JSON nested too deeply") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object (Content-Type: application/json)")
    return body


def _text_field(body: dict, name: str) -> str:
    """An optional string field of a body ("" when absent or null); BadRequest naming it otherwise."""
    value = body.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadRequest(f"'{name}' must be a string, got {type(value).__name__}")
    return value


def create_app(settings: Settings | None = None, redis: Redis | None = None) -> Flask:
    """Build the Flask app; with no arguments, settings come from the environment."""
    from .queues import connect

    settings = settings or Settings.from_env()
    redis = redis if redis is not None else connect(settings)
    backend = Backend(settings, redis, SupportStore(redis, settings.model_dir))
    app = Flask(__name__)
    app.config["BACKEND"] = backend
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    slots = ClickSlots(settings.predict_concurrency)

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
            _count_rejected_webhook(redis)
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
            rejected_webhooks=_rejected_webhooks(redis) if redis_state == "ok" else None,
            warnings=startup_warnings(settings, redis) if redis_state == "ok" else [],
        )

    @app.post("/setup")
    def setup():
        body = _json_body()
        pid = parse_project_id(body.get("project"))
        config_xml = _text_field(body, "schema") or _text_field(body, "label_config")
        parse_label_config(config_xml)
        hostname, access_token = _text_field(body, "hostname"), _text_field(body, "access_token")
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
        _queue_backfill(backend, context)
        if settings.auth_enabled and context.has_api and _webhook_auth_due(backend, pid):
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
        body = _json_body()
        if "version" not in body or not (body["version"] is None or isinstance(body["version"], str)):
            raise BadRequest('body must be {"version": "<name>"} to pin (or roll back), or {"version": null} to unpin')
        VersionRegistry(redis, backend.store).pin(pid, body["version"], base_version(settings))
        return jsonify(project=pid, pinned=body["version"], current=current_version(settings, backend.store.project(pid)))

    @app.post("/predict")
    def predict():
        body = _json_body()
        tasks = _tasks(body)
        pid = parse_project_id(body.get("project") or tasks[0].get("project"))
        require_redis(redis)
        context = resolve_project(settings, backend.store, pid, _text_field(body, "label_config") or None)
        image_key = context.config.image_key
        slim = [{"id": int(t["id"]), "data": {image_key: (t.get("data") or {}).get(image_key)},
                 "predictions": [{"id": p.get("id"), "model_version": p.get("model_version")}
                                 for p in t.get("predictions") or [] if isinstance(p, dict)]} for t in tasks]
        if len(tasks) > settings.sync_max_tasks:
            return _queue_bulk(backend, context, slim)
        workers = live_workers(redis)[QUEUE_HIGH]
        if workers == 0:
            raise ServiceUnavailable(
                "no worker is running on the predict-high queue: start one with `python -m backend worker`"
            )
        admit_click(redis, settings, workers)
        with slots.take():
            deadline = server_time(redis) + settings.predict_wait_s
            job = enqueue(redis, QUEUE_HIGH, "backend.jobs.predict_tasks", args=(context.to_job(), slim, deadline),
                          timeout_s=settings.job_timeout_s, at_front=True,
                          ttl_s=int(settings.predict_wait_s + GRACE_S) + 1, meta={"project": pid, "tasks": len(tasks)})
            outcome = _wait(job, deadline + GRACE_S - server_time(redis))
        if outcome is None:
            raise _late(job, context, settings.predict_wait_s)
        if outcome.type != Result.Type.SUCCESSFUL:
            raise ServiceUnavailable(f"prediction job {job.id} failed: {(outcome.exc_string or '').strip().splitlines()[-1:]}")
        return _answer(job, outcome.return_value, context, settings.predict_wait_s)

    @app.post("/webhook")
    def webhook():
        body = _json_body()
        action = body.get("action")
        if not isinstance(action, str):
            raise BadRequest("webhook body needs an 'action' string")
        if action not in (*ANNOTATION_EVENTS, "ANNOTATIONS_DELETED", "START_TRAINING"):
            return jsonify(status="ignored", action=action)
        pid = parse_project_id(body.get("project"))
        require_redis(redis)
        project_payload = body.get("project") if isinstance(body.get("project"), dict) else {}
        payload_config = _text_field(project_payload, "label_config")
        known = backend.store.project(pid) is not None
        if not known and not payload_config:
            backend.store.require_project(pid)  # 404 naming the fix
        context = resolve_project(settings, backend.store, pid, payload_config or None)
        if not known:  # Redis lost it (restarted without persistence): the event's project re-registers it
            logger.warning("project %s was unknown (Redis empty?); registered from the webhook payload", pid)
            _queue_backfill(backend, context)
        if action == "START_TRAINING":
            from .training import enqueue_training

            return jsonify(action=action, **enqueue_training(redis, settings, context, "START_TRAINING"))
        if action == "ANNOTATIONS_DELETED":
            ids = _annotation_ids(body.get("annotations"))
            removed = backend.store.remove(pid, ids)
            return jsonify(status="ok", action=action, removed=removed, revision=backend.store.revision(pid))
        return _record_annotations(backend, context, action, body)

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
            backfill=_backfill_state(project, context),
            backfilled=bool(project.get("backfilled")),
            deliveries=DeliveryLedger(redis, pid, context.model_version).counts(),
            progress=progress.read(),
            failures=progress.failures(),
            training=json.loads(project["last_training"]) if project.get("last_training") else None,
            webhook_auth=project.get("webhook_auth") if settings.auth_enabled else "basic auth is off",
            queues=queue_lengths(redis),
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


def _wait(job: Job, seconds: float) -> Result | None:
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


def _tasks(body: dict) -> list[dict]:
    """The tasks of a /predict body, each with an integer id; BadRequest naming the first bad one."""
    tasks = body.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise BadRequest("'tasks' must be a non-empty list of task objects with an 'id'")
    for i, task in enumerate(tasks):
        if not isinstance(task, dict) or _int_id(task.get("id")) is None:
            raise BadRequest(f"tasks[{i}] must be an object with an integer 'id', got {task!r:.80}")
        if not isinstance(task.get("data") or {}, dict):
            raise BadRequest(f"tasks[{i}].data must be an object")
        if not isinstance(task.get("predictions") or [], list):
            raise BadRequest(f"tasks[{i}].predictions must be a list")
    return tasks


def _int_id(value: object) -> int | None:
    """A non-negative integer id from an int or a string of ASCII digits, else None."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    return None


def _annotation_ids(annotations: object) -> list[int]:
    """Integer ids of an ANNOTATIONS_DELETED payload; BadRequest naming a bad one."""
    if not isinstance(annotations, list):
        raise BadRequest("ANNOTATIONS_DELETED needs an 'annotations' list of {\"id\": <int>}")
    ids = []
    for i, item in enumerate(annotations):
        value = _int_id(item.get("id")) if isinstance(item, dict) else None
        if value is None:
            raise BadRequest(f"annotations[{i}].id must be an integer, got {item!r:.80}")
        ids.append(value)
    return ids


def _late(job: Job, context: ProjectContext, wait_s: float) -> BackendError:
    """The error for a click job with no result by its deadline: not started (dropped) or still running."""
    if job.get_status(refresh=True) in (JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED):
        return Overloaded(f"no worker could start prediction job {job.id} within {wait_s:.0f} s; it is dropped, "
                          "nothing will be posted: try again shortly", retry_after=int(wait_s) // 4 or 1)
    if not context.has_api:
        return PredictionTimeout(f"prediction job {job.id} is still running after {wait_s:.0f} s and this backend has no "
                                 "Label Studio API access to post it later: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")
    return PredictionTimeout(f"prediction job {job.id} is still running after {wait_s:.0f} s; its predictions will be "
                             f"posted through the Label Studio API when it finishes (see /jobs/{job.id})")


def _answer(job: Job, value: dict, context: ProjectContext, wait_s: float) -> Response:
    """Turn a click job's outcome into the /predict answer: what the worker decided, never more."""
    if value["delivered"] == "dropped":
        raise Overloaded(f"prediction job {job.id} started after its {wait_s:.0f} s deadline and was dropped; try again",
                         retry_after=1)
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


def _queue_bulk(backend: Backend, context: ProjectContext, tasks: list[dict]) -> tuple[Response, int]:
    """Too many tasks for one synchronous answer: queue bulk jobs that post through the API; LS stores nothing now."""
    if not context.has_api:
        raise BadRequest(
            f"{len(tasks)} tasks exceed SYNC_MAX_TASKS={backend.settings.sync_max_tasks} and bulk predictions need "
            "LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY to be posted back; set them or select fewer tasks"
        )
    held = held_predictions(tasks, context.model_version)
    queued = queue_bulk(backend.redis, backend.settings, context, [{k: t[k] for k in ("id", "data")} for t in tasks], held)
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


REJECTED_WEBHOOKS_KEY = "dws:rejected-webhooks"


def _count_rejected_webhook(redis: Redis) -> None:
    try:
        pipe = redis.pipeline()
        pipe.hincrby(REJECTED_WEBHOOKS_KEY, "count", 1)
        pipe.hset(REJECTED_WEBHOOKS_KEY, "last_at", time.time())
        pipe.execute()
    except RedisError:
        pass


def _rejected_webhooks(redis: Redis) -> dict | None:
    """Webhook calls refused for missing basic auth, with what to do about them."""
    raw = {k.decode(): v.decode() for k, v in redis.hgetall(REJECTED_WEBHOOKS_KEY).items()}
    if not raw:
        return None
    return {"count": int(raw["count"]), "last_at": float(raw["last_at"]),
            "fix": "add the header 'Authorization: Basic <base64 user:pass>' to the project's webhook (Project -> "
                   "Settings -> Webhooks), or give the backend LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY to do it"}


def _queue_backfill(backend: Backend, context: ProjectContext) -> None:
    """Read the project's existing annotations from Label Studio, once per project record."""
    if context.has_api and backend.store.claim_flag(context.project, "backfill_queued"):
        enqueue(backend.redis, QUEUE_HIGH, "backend.jobs.backfill_if_needed", args=(context.to_job(),),
                timeout_s=backend.settings.job_timeout_s, retries=2, meta={"project": context.project})


def _webhook_auth_due(backend: Backend, pid: int) -> bool:
    """True unless the webhook already has our header, or a check ran in the last minute."""
    project = backend.store.project(pid) or {}
    if project.get("webhook_auth", "").startswith(("added", "already")):
        return False
    return backend.redis.set(f"dws:webhook-auth-check:{pid}", 1, nx=True, ex=60) is True


def _backfill_state(project: dict[str, str], context: ProjectContext) -> dict:
    """Whether the project's existing annotations were read from Label Studio, and if not, why."""
    if project.get("backfilled"):
        return {"done": True, "at": float(project["backfilled"]), "annotations": int(project.get("backfill_annotations", 0)),
                "errors": int(project.get("backfill_errors", 0))}
    if not context.has_api:
        reason = "no Label Studio API access: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY to read existing annotations"
    else:
        reason = project.get("backfill_error") or "queued"
    return {"done": False, "reason": reason}


def _record_annotations(backend: Backend, context: ProjectContext, action: str, body: dict) -> Response | tuple:
    """Store or replace the support examples of annotation events; queue their caching. Redis writes only."""
    annotations, tasks = body.get("annotation"), body.get("task")
    if action == "ANNOTATIONS_CREATED":
        if not isinstance(annotations, list) or not isinstance(tasks, list):
            raise BadRequest("ANNOTATIONS_CREATED needs 'annotation' and 'task' lists")
        by_id = {_int_id(t.get("id")): t for t in tasks if isinstance(t, dict)}
        pairs = [(a, by_id.get(_int_id(a.get("task"))) if isinstance(a, dict) else None) for a in annotations]
    else:
        if not isinstance(annotations, dict) or not isinstance(tasks, dict):
            raise BadRequest(f"{action} needs 'annotation' and 'task' objects")
        pairs = [(annotations, tasks)]
    config = context.config
    report = ingest(backend.store, context.project, config, pairs, backend.settings.max_image_pixels)
    if report.errors and not (report.stored or report.unchanged or report.removed):
        raise BadRequest("; ".join(f"annotation {aid}: {msg}" for aid, msg in report.errors.items()))
    job_id = None
    if report.stored:
        job = enqueue(backend.redis, QUEUE_HIGH, "backend.jobs.ingest_examples", args=(context.to_job(), report.stored),
                      timeout_s=backend.settings.job_timeout_s, retries=2, meta={"project": context.project})
        job_id = job.id
    out = {"status": "ok", "action": action, **report.as_dict(), "revision": backend.store.revision(context.project),
           "job": job_id}
    out.update(_maybe_prelabel(backend, context, config.labels))
    out.update(_maybe_train(backend, context, len(report.stored)))
    return jsonify(out)


def _maybe_train(backend: Backend, context: ProjectContext, new_examples: int) -> dict:
    """With TRAIN_EVERY=m, queue fine-tuning once m new examples arrived since the last trigger."""
    every, pid = backend.settings.train_every, context.project
    if every <= 0 or not new_examples:
        return {}
    count = backend.store.incr_project_field(pid, "new_since_train", new_examples)
    if count < every:
        return {}
    backend.store.set_project_field(pid, "new_since_train", 0)
    from .training import enqueue_training

    return {"training": enqueue_training(backend.redis, backend.settings, context, f"{count} new annotations")}


def _maybe_prelabel(backend: Backend, context: ProjectContext, labels: tuple[str, ...]) -> dict:
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
    job = enqueue(backend.redis, QUEUE_HIGH, "backend.jobs.prelabel_project", args=(context.to_job(),),
                  timeout_s=backend.settings.job_timeout_s, retries=2, meta={"project": pid})
    return {"prelabel_job": job.id}
