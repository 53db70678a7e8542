"""Admin routes: a project's versions and pin, its status, bulk pre-labeling, and job inspection."""

from __future__ import annotations

import json
import re

from flask import Blueprint, jsonify, request
from redis import Redis
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus

from ..core.bulk import MAX_PREVIEW, Progress, cancel_bulk
from ..core.catalog import submit
from ..core.context import resolve_project
from ..core.errors import BadRequest, Conflict, NotFound
from ..core.ls_schema import checked
from ..core.example_health import ExampleHealth
from ..core.failures import job_failures
from ..core.label_checks import request_check, stored_report
from ..core.ledger import DeliveryLedger
from ..core.queues import live_workers, queue_lengths, running_jobs
from ..core.refresh import pending_refresh, pin
from ..core.registry import MAX_LISTED, VersionRegistry
from ..core.review_view import queue_review_view
from ..core.train_queue import claim_training_lock
from ..core.triggers import backfill_state
from ..core.versions import base_version, current_version
from .bodies import PinBody, json_body
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
    body = checked(PinBody, json_body())
    return jsonify(**pin(backend.redis, backend.settings, backend.store, pid, body.version))


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
        held_examples=sorted(store.held(pid)),
        training=json.loads(project["last_training"]) if project.get("last_training") else None,
        training_request=json.loads(project["training_request"]) if project.get("training_request") else None,
        refresh=pending_refresh(redis, pid),
        webhook_auth=project.get("webhook_auth") if settings.auth_enabled else "basic auth is off",
        queues=queue_lengths(redis),
        running=running_jobs(redis),
        workers=live_workers(redis),
    )


@admin.post("/prelabel/<int:pid>")
@admin.post("/projects/<int:pid>/prelabel")
def prelabel(pid: int):
    backend = web_state().backend
    backend.store.require_project(pid)
    context = resolve_project(backend.settings, backend.store, pid)
    if not context.has_api:
        raise BadRequest("pre-labeling posts predictions through the Label Studio API: set LABEL_STUDIO_URL and "
                         "LABEL_STUDIO_API_KEY (a Personal Access Token) for the web process and the workers")
    if "preview" in request.args:
        raw = request.args["preview"]
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_PREVIEW:
            raise BadRequest(f"?preview= must be a number of tasks from 1 to {MAX_PREVIEW}, got {raw[:40]!r}")
        job = submit(backend.redis, backend.settings, "prelabel-preview", pid, int(raw), meta={"project": pid})
        return jsonify(status="queued", job=job.id, preview=int(raw), model_version=context.model_version,
                       result=f"/jobs/{job.id}"), 202
    job = submit(backend.redis, backend.settings, "list-tasks", context.to_job(), meta={"project": pid})
    return jsonify(status="queued", job=job.id, model_version=context.model_version), 202


@admin.get("/projects/<int:pid>/label-checks")
def label_checks(pid: int):
    """The last check of the project's labels, most suspicious first (paged); a new check is queued when there is
    none, when the examples changed since (?refresh=1 forces one), answering 202 until one exists."""
    backend = web_state().backend
    backend.store.require_project(pid)
    offset, limit = page_args(MAX_LISTED)
    report = stored_report(backend.redis, pid)
    revision = backend.store.revision(pid)
    context = resolve_project(backend.settings, backend.store, pid)
    stale = report is None or report["revision"] != revision or report["model_version"] != context.model_version
    answer: dict = {"project": pid, "revision": revision, "model_version": context.model_version, "stale": stale}
    if stale or request.args.get("refresh") == "1":
        answer["job"], answer["queued"] = request_check(backend.redis, backend.settings, context)
    if report is None:
        return jsonify(status="checking", **answer), 202
    checks = report.pop("checks")
    return jsonify(status="ready", **answer, report=report, total=len(checks), offset=offset, limit=limit,
                   checks=checks[offset:offset + limit])


@admin.post("/projects/<int:pid>/label-checks/<int:annotation_id>/confirm")
def confirm_label(pid: int, annotation_id: int):
    """A person confirms an annotation a label check doubted: it is used again and never held again unless edited."""
    store = web_state().backend.store
    store.require_project(pid)
    if not store.confirm(pid, annotation_id):
        raise NotFound(f"project {pid} has no example from annotation {annotation_id}")
    return jsonify(confirmed=annotation_id, held=sorted(store.held(pid)))


@admin.post("/projects/<int:pid>/review-view")
def review_view(pid: int):
    """Create or update the project's review view in Label Studio now."""
    backend = web_state().backend
    backend.store.require_project(pid)
    context = resolve_project(backend.settings, backend.store, pid)
    if not backend.settings.review_view or not context.has_api:
        raise BadRequest("the review view is made through the Label Studio API: set LABEL_STUDIO_URL and "
                         "LABEL_STUDIO_API_KEY (a Personal Access Token), and leave REVIEW_VIEW on")
    job = queue_review_view(backend, context, request.host, force=True)
    return jsonify(status="queued", job=job, model_version=context.model_version), 202


@admin.delete("/projects/<int:pid>/prelabel")
def cancel_prelabel(pid: int):
    backend = web_state().backend
    backend.store.require_project(pid)
    return jsonify(**cancel_bulk(backend.redis, pid))


@admin.get("/jobs/<job_id>")
def job_status(job_id: str):
    job = _fetch_job(web_state().backend.redis, job_id)
    status = job.get_status()
    info = {"id": job.id, "status": str(status.value if hasattr(status, "value") else status),
            "meta": job.get_meta(), "func": job.func_name, "enqueued_at": _iso(job.enqueued_at),
            "started_at": _iso(job.started_at), "ended_at": _iso(job.ended_at)}
    if status == JobStatus.FINISHED:
        info["result"] = json.loads(json.dumps(job.return_value(), default=str))  # what the job returned, as JSON
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
