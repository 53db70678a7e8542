"""Admin routes: a project's versions and pin, its status, bulk pre-labeling, and job inspection."""

from __future__ import annotations

import json
import re

from flask import Blueprint, jsonify, request
from redis import Redis
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus

from ..core.bulk import Progress
from ..core.catalog import submit
from ..core.context import resolve_project
from ..core.errors import BadRequest, Conflict, NotFound
from ..core.example_health import ExampleHealth
from ..core.failures import job_failures
from ..core.ledger import DeliveryLedger
from ..core.queues import live_workers, queue_lengths, running_jobs
from ..core.refresh import pending_refresh, pin
from ..core.registry import MAX_LISTED, VersionRegistry
from ..core.train_queue import claim_training_lock
from ..core.triggers import backfill_state
from ..core.versions import base_version, current_version
from .bodies import json_body
from .state import web_state

admin = Blueprint("admin", __name__)

JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
"""The job ids RQ accepts (it refuses others with a ValueError)."""


@admin.get("/projects/<int:pid>/versions")
def project_versions(pid: int):
    backend = web_state().backend
    project = backend.store.require_project(pid)
    offset, limit = page_args(MAX_LISTED)
    registry = VersionRegistry(backend.redis, backend.store)
    everything = registry.list(pid)
    return jsonify(
        base=base_version(backend.settings), current=current_version(backend.settings, project),
        active=project.get("active_version"), pinned=project.get("pinned_version"),
        total=len(everything), offset=offset, limit=limit, versions=everything[offset:offset + limit],
    )


def page_args(most: int) -> tuple[int, int]:
    """?offset= and ?limit= of a listing (0 and `most` by default); BadRequest naming a bad one."""
    values = {}
    for name, default, high in (("offset", 0, 10**9), ("limit", most, most)):
        raw = request.args.get(name, str(default))
        if not raw.isdigit() or not (name == "offset" or 1 <= int(raw)) or int(raw) > high:
            raise BadRequest(f"?{name}= must be a whole number {'from 0' if name == 'offset' else f'from 1 to {high}'}, "
                             f"got {raw!r}")
        values[name] = int(raw)
    return values["offset"], values["limit"]


@admin.post("/projects/<int:pid>/pin")
def pin_version(pid: int):
    backend = web_state().backend
    backend.store.require_project(pid)
    body = json_body()
    if "version" not in body or not (body["version"] is None or isinstance(body["version"], str)):
        raise BadRequest('body must be {"version": "<name>"} to pin (or roll back), or {"version": null} to unpin')
    return jsonify(**pin(backend.redis, backend.settings, backend.store, pid, body["version"]))


@admin.get("/status/<int:pid>")
def status(pid: int):
    backend = web_state().backend
    redis, settings, store = backend.redis, backend.settings, backend.store
    project = store.require_project(pid)
    context = resolve_project(settings, store, pid)
    progress = Progress(redis, pid)
    health = ExampleHealth(redis)
    return jsonify(
        project=pid,
        model_version=context.model_version,
        revision=context.revision,
        examples=health.usable_counts(store.label_counts(pid), pid),
        unusable_examples=health.unusable(pid),
        annotation_errors=store.errors(pid),
        label_studio_api=context.ls_url or None,
        backfill=backfill_state(project, context),
        backfilled=bool(project.get("backfilled")),
        deliveries=DeliveryLedger(redis, pid, context.model_version).counts(),
        progress=progress.read(),
        failures=progress.failures(),
        job_failures=job_failures(redis, pid),
        training=json.loads(project["last_training"]) if project.get("last_training") else None,
        training_request=json.loads(project["training_request"]) if project.get("training_request") else None,
        refresh=pending_refresh(redis, pid),
        webhook_auth=project.get("webhook_auth") if settings.auth_enabled else "basic auth is off",
        queues=queue_lengths(redis),
        running=running_jobs(redis),
        workers=live_workers(redis),
    )


@admin.post("/prelabel/<int:pid>")
def prelabel(pid: int):
    backend = web_state().backend
    backend.store.require_project(pid)
    context = resolve_project(backend.settings, backend.store, pid)
    if not context.has_api:
        raise BadRequest("pre-labeling posts predictions through the Label Studio API: set LABEL_STUDIO_URL and "
                         "LABEL_STUDIO_API_KEY (a Personal Access Token) for the web process and the workers")
    job = submit(backend.redis, backend.settings, "list-tasks", context.to_job(), meta={"project": pid})
    return jsonify(status="queued", job=job.id, model_version=context.model_version), 202


@admin.get("/jobs/<job_id>")
def job_status(job_id: str):
    job = _fetch_job(web_state().backend.redis, job_id)
    status = job.get_status()
    info = {"id": job.id, "status": str(status.value if hasattr(status, "value") else status),
            "meta": job.get_meta(), "func": job.func_name, "enqueued_at": _iso(job.enqueued_at),
            "started_at": _iso(job.started_at), "ended_at": _iso(job.ended_at)}
    if status == JobStatus.FAILED:
        result = job.latest_result()
        info["error"] = ((result.exc_string if result else "") or "").strip().splitlines()[-1:] or ["failed"]
    return jsonify(info)


@admin.post("/jobs/<job_id>/retry")
def job_retry(job_id: str):
    backend = web_state().backend
    job = _fetch_job(backend.redis, job_id)
    meta = job.get_meta()
    if meta.get("kind") == "train" and job.get_status() == JobStatus.FAILED:  # one training run per project
        holder = claim_training_lock(backend.redis, backend.settings, int(meta["project"]), job.id)
        if holder is not None:
            raise Conflict(f"training job {holder} of project {meta['project']} is queued or running; retry {job_id} "
                           "after it ends")
    try:
        job.requeue()
    except InvalidJobOperation as exc:
        raise BadRequest(f"job {job_id} cannot be retried: {exc}") from None
    return jsonify(id=job.id, status="queued"), 202


def _iso(value) -> str | None:
    return value.isoformat() if value else None


def _fetch_job(redis: Redis, job_id: str) -> Job:
    if not JOB_ID.fullmatch(job_id):
        raise BadRequest(f"job id must be 1 to 128 letters, digits, '_' or '-', got {job_id[:40]!r}")
    try:
        return Job.fetch(job_id, connection=redis)
    except NoSuchJobError:
        raise NotFound(f"no job {job_id!r} (finished jobs are kept for an hour, failed ones for a week)") from None
