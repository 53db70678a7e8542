"""Checks of a project's human labels (leave one out, run by backend.worker.label_checks): the stored report, and
one check job per project at a time."""

from __future__ import annotations

import json

from redis import Redis

from .catalog import submit
from .context import ProjectContext
from .keys import PREFIX
from .queues import job_alive
from .settings import Settings

SUSPICIOUS = 0.4
"""An annotation is counted suspicious when its suspicion (model.label_checks.LabelCheck) reaches this (precision and
recall on corrupted CamVid annotations in docs/annotator-workflow.md)."""


def _report_key(pid: int) -> str:
    return f"{PREFIX}:label-checks:{pid}"


def _job_key(pid: int) -> str:
    return f"{PREFIX}:label-checks-job:{pid}"


def stored_report(redis: Redis, pid: int) -> dict | None:
    """The project's last label-check report, or None."""
    raw = redis.get(_report_key(pid))
    return json.loads(raw) if raw else None


def save_report(redis: Redis, pid: int, report: dict) -> None:
    """Keep a finished report (it replaces the previous one)."""
    redis.set(_report_key(pid), json.dumps(report))


def request_check(redis: Redis, settings: Settings, context: ProjectContext | int) -> tuple[str, bool]:
    """Queue a check of the project's labels unless one is queued or running; (job id, whether it was queued now).
    Given a project id instead of its context, the worker resolves the project with its own settings."""
    pid = context if isinstance(context, int) else context.project
    key = _job_key(pid)
    current = (redis.get(key) or b"").decode()
    if current and job_alive(redis)(current):
        return current, False
    job = submit(redis, settings, "label-checks", context if isinstance(context, int) else context.to_job(),
                 meta={"project": pid})
    redis.set(key, job.id, ex=settings.train_timeout_s + 600)
    return job.id, True


def suspicious(report: dict) -> list[dict]:
    """The report's checks whose suspicion reaches SUSPICIOUS, most suspicious first."""
    return [check for check in report.get("checks", []) if check["suspicion"] >= SUSPICIOUS]


def suspicious_tasks(report: dict) -> list[int]:
    """The tasks holding a suspicious annotation, each once, the most suspicious first."""
    return list(dict.fromkeys(check["task_id"] for check in sorted(suspicious(report), key=lambda c: -c["suspicion"])))
