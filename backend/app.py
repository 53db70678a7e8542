"""The Label Studio ML backend protocol over HTTP (Flask). Routes parse, validate, enqueue and report."""

from __future__ import annotations

import hmac
import logging
import time
from dataclasses import dataclass

from flask import Flask, Response, jsonify, request
from redis import Redis
from redis.exceptions import RedisError
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus
from rq.results import Result

from .bulk import Progress, enqueue_batches
from .errors import BackendError, BadRequest, MediaError, NotFound, PredictionTimeout, ServiceUnavailable
from .label_config import parse_label_config
from .queues import QUEUE_HIGH, enqueue, live_workers, ping, queue_lengths, require_redis
from .registry import VersionRegistry
from .settings import Settings
from .store import Example, SupportStore, parse_project_id
from .versions import base_version, current_version, describe_model

logger = logging.getLogger(__name__)

ANNOTATION_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED")


@dataclass
class Backend:
    """What every request handler needs; nothing in it is per-process state a request relies on."""

    settings: Settings
    redis: Redis
    store: SupportStore


def _json_body() -> dict:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object (Content-Type: application/json)")
    return body


def create_app(settings: Settings | None = None, redis: Redis | None = None) -> Flask:
    """Build the Flask app; with no arguments, settings come from the environment."""
    from .queues import connect

    settings = settings or Settings.from_env()
    redis = redis if redis is not None else connect(settings)
    backend = Backend(settings, redis, SupportStore(redis, settings.model_dir))
    app = Flask(__name__)
    app.config["BACKEND"] = backend

    @app.errorhandler(BackendError)
    def _backend_error(exc: BackendError):
        return jsonify(error=exc.message, status=exc.status), exc.status

    @app.errorhandler(RedisError)
    def _redis_error(exc: RedisError):
        return jsonify(error=f"Redis is unavailable ({exc}); start Redis or fix REDIS_URL", status=503), 503

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
        )

    @app.post("/setup")
    def setup():
        body = _json_body()
        pid = parse_project_id(body.get("project"))
        config_xml = body.get("schema") or body.get("label_config") or ""
        parse_label_config(config_xml)
        require_redis(redis)
        backend.store.register_project(
            pid, config_xml, hostname=body.get("hostname") or "", access_token=body.get("access_token") or ""
        )
        if backend.store.claim_flag(pid, "backfill_queued"):  # read existing annotations once, in a worker
            enqueue(redis, QUEUE_HIGH, "backend.jobs.backfill_if_needed", args=(pid,), timeout_s=settings.job_timeout_s,
                    meta={"project": pid})
        return jsonify(model_version=current_version(settings, backend.store.project(pid)))

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
        tasks = body.get("tasks")
        if not isinstance(tasks, list) or not tasks or not all(isinstance(t, dict) and "id" in t for t in tasks):
            raise BadRequest("'tasks' must be a non-empty list of task objects with an 'id'")
        pid = parse_project_id(body.get("project") or tasks[0].get("project"))
        require_redis(redis)
        project = backend.store.project(pid)
        config_xml = body.get("label_config") or (project or {}).get("label_config", "")
        config = parse_label_config(config_xml)
        if project is None or project.get("label_config") != config_xml:
            backend.store.register_project(pid, config_xml)
        version = current_version(settings, backend.store.project(pid))
        if len(tasks) > settings.sync_max_tasks:
            return _queue_bulk(backend, pid, tasks, config.image_key, version)
        if live_workers(redis)[QUEUE_HIGH] == 0:
            raise ServiceUnavailable(
                "no worker is running on the predict-high queue: start one with `python -m backend worker`"
            )
        slim = [{"id": t["id"], "data": {config.image_key: (t.get("data") or {}).get(config.image_key)}} for t in tasks]
        job = enqueue(redis, QUEUE_HIGH, "backend.jobs.predict_tasks", args=(pid, slim, config_xml),
                      timeout_s=settings.job_timeout_s, at_front=True, meta={"project": pid, "tasks": len(tasks)})
        outcome = _wait(job, settings.predict_wait_s)
        if outcome is None:
            job.meta["post_results"] = True
            job.save_meta()
            outcome = _wait(job, 2.0)  # it may have finished while the flag was being set
            if outcome is None:
                raise PredictionTimeout(
                    f"prediction job {job.id} is still running after {settings.predict_wait_s:.0f} s; its predictions "
                    f"will be posted through the Label Studio API when it finishes (see /jobs/{job.id})"
                )
        if outcome.type != Result.Type.SUCCESSFUL:
            raise ServiceUnavailable(f"prediction job {job.id} failed: {(outcome.exc_string or '').strip().splitlines()[-1:]}")
        value = outcome.return_value
        if value["failures"]:  # Label Studio keeps all or nothing of a batch: say what failed, store nothing
            details = "; ".join(f"task {tid}: {msg}" for tid, msg in value["failures"].items())
            raise MediaError(f"no predictions stored: {details}")
        return jsonify(results=value["predictions"], model_version=version)

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
        project = backend.store.require_project(pid)
        project_payload = body.get("project") if isinstance(body.get("project"), dict) else {}
        config_xml = project_payload.get("label_config") or project["label_config"]
        if config_xml != project["label_config"]:
            parse_label_config(config_xml)
            backend.store.register_project(pid, config_xml)
        if action == "START_TRAINING":
            from .training import enqueue_training

            return jsonify(action=action, **enqueue_training(redis, settings, pid, "START_TRAINING"))
        if action == "ANNOTATIONS_DELETED":
            ids = [int(a["id"]) for a in body.get("annotations") or [] if isinstance(a, dict) and "id" in a]
            removed = backend.store.remove(pid, ids)
            return jsonify(status="ok", action=action, removed=removed, revision=backend.store.revision(pid))
        return jsonify(_record_annotations(backend, pid, action, body, config_xml))

    @app.get("/status/<int:pid>")
    def status(pid: int):
        project = backend.store.require_project(pid)
        progress = Progress(redis, pid)
        return jsonify(
            project=pid,
            model_version=current_version(settings, project),
            revision=backend.store.revision(pid),
            examples=backend.store.label_counts(pid),
            backfilled=bool(project.get("backfilled")),
            progress=progress.read(),
            failures=progress.failures(),
            queues=queue_lengths(redis),
            workers=live_workers(redis),
        )

    @app.post("/prelabel/<int:pid>")
    def prelabel(pid: int):
        backend.store.require_project(pid)
        job = enqueue(redis, QUEUE_HIGH, "backend.jobs.prelabel_project", args=(pid,), timeout_s=settings.job_timeout_s,
                      meta={"project": pid})
        return jsonify(status="queued", job=job.id), 202

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
    """Block until the job has a result or `seconds` pass."""
    deadline = time.monotonic() + seconds
    while (remaining := deadline - time.monotonic()) > 0:
        result = job.latest_result(timeout=max(1, min(2, int(remaining))))
        if result is not None:
            return result
    return None


def _queue_bulk(backend: Backend, pid: int, tasks: list[dict], image_key: str, version: str) -> tuple[Response, int]:
    """Too many tasks for one synchronous answer: queue bulk jobs that post through the API; LS stores nothing now."""
    if not (backend.settings.label_studio_url and backend.settings.label_studio_api_key) and not (
        backend.store.project(pid) or {}
    ).get("access_token"):
        raise BadRequest(
            f"{len(tasks)} tasks exceed SYNC_MAX_TASKS={backend.settings.sync_max_tasks} and bulk predictions need "
            "LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY to be posted back; set them or select fewer tasks"
        )
    slim = [{"id": int(t["id"]), "data": {image_key: (t.get("data") or {}).get(image_key)}} for t in tasks]
    queued = enqueue_batches(backend.redis, backend.settings, pid, slim, version, backend.store.revision(pid))
    body = {
        "results": [],
        "status": "queued",
        "message": (
            f"{queued['queued_tasks']} tasks queued for background pre-annotation ({queued['skipped']} already done); "
            f"predictions appear in Label Studio as workers post them. Progress: /status/{pid}"
        ),
        **queued,
    }
    return jsonify(body), 202


def _record_annotations(backend: Backend, pid: int, action: str, body: dict, config_xml: str) -> dict:
    """Store or replace the support examples of annotation events; queue their caching. Redis writes only."""
    config = parse_label_config(config_xml)
    annotations = body.get("annotation")
    tasks = body.get("task")
    if action == "ANNOTATIONS_CREATED":
        if not isinstance(annotations, list) or not isinstance(tasks, list):
            raise BadRequest("ANNOTATIONS_CREATED needs 'annotation' and 'task' lists")
        by_id = {t.get("id"): t for t in tasks if isinstance(t, dict)}
        pairs = [(a, by_id.get(a.get("task"))) for a in annotations if isinstance(a, dict)]
    else:
        if not isinstance(annotations, dict) or not isinstance(tasks, dict):
            raise BadRequest(f"{action} needs 'annotation' and 'task' objects")
        pairs = [(annotations, tasks)]
    examples, dropped = [], []
    for annotation, task in pairs:
        if task is None:
            raise BadRequest(f"annotation {annotation.get('id')} refers to a task missing from the payload")
        example = Example.from_annotation(annotation, task, config)  # validates everything before anything is written
        if example is None:
            dropped.append(int(annotation.get("id", 0)))
        else:
            examples.append(example)
    for example in examples:
        backend.store.upsert(pid, example)
    removed = backend.store.remove(pid, [d for d in dropped if d and backend.store.get(pid, d)])
    job_id = None
    if examples:
        job = enqueue(backend.redis, QUEUE_HIGH, "backend.jobs.ingest_examples", args=(pid, [e.annotation_id for e in examples]),
                      timeout_s=backend.settings.job_timeout_s, meta={"project": pid})
        job_id = job.id
    out = {"status": "ok", "action": action, "stored": len(examples), "removed": removed,
           "revision": backend.store.revision(pid), "job": job_id}
    out.update(_maybe_prelabel(backend, pid, config.labels))
    out.update(_maybe_train(backend, pid, len(examples)))
    return out


def _maybe_train(backend: Backend, pid: int, new_examples: int) -> dict:
    """With TRAIN_EVERY=m, queue fine-tuning once m new examples arrived since the last trigger."""
    every = backend.settings.train_every
    if every <= 0 or not new_examples:
        return {}
    count = backend.store.incr_project_field(pid, "new_since_train", new_examples)
    if count < every:
        return {}
    backend.store.set_project_field(pid, "new_since_train", 0)
    from .training import enqueue_training

    return {"training": enqueue_training(backend.redis, backend.settings, pid, f"{count} new annotations")}


def _maybe_prelabel(backend: Backend, pid: int, labels: tuple[str, ...]) -> dict:
    """Once every label has PRELABEL_MIN_EXAMPLES examples, queue "pre-label the rest" (once per project)."""
    need = backend.settings.prelabel_min_examples
    if need <= 0:
        return {}
    counts = backend.store.label_counts(pid)
    if any(counts.get(label, 0) < need for label in labels):
        return {}
    if not backend.store.claim_flag(pid, "prelabel_triggered"):
        return {}
    job = enqueue(backend.redis, QUEUE_HIGH, "backend.jobs.prelabel_project", args=(pid,),
                  timeout_s=backend.settings.job_timeout_s, meta={"project": pid})
    return {"prelabel_job": job.id}
