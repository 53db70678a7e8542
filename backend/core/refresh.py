"""AUTO_REFRESH: predictions that follow the project's supports and version, debounced, with no action.

Label Studio asks the backend for a prediction when a task is opened only if the task has none, so after
label edits or a promotion its stored predictions would stay stale. Each change is counted here; the first
one schedules a refresh job REFRESH_DELAY_S later, and REFRESH_AFTER_CHANGES changes (or a version change)
start one at once. The job lists the unlabeled tasks and queues, through the delivery ledger, those whose
prediction is missing or older than the project's revision (backend.worker.jobs.refresh_project).
"""

from __future__ import annotations

from redis import Redis

from .catalog import submit
from .context import ProjectContext
from .keys import PREFIX
from .settings import Settings

VERSION_CHANGED = 10**6
"""The change count of a promotion or a pin: the refresh starts at once."""


def _keys(pid: int) -> tuple[str, str, str]:
    base = f"{PREFIX}:refresh:{pid}"
    return base, f"{base}:later", f"{base}:now"


def request_refresh(redis: Redis, settings: Settings, context: ProjectContext, changes: int, reason: str) -> dict:
    """Count `changes` for the project and make sure a refresh is scheduled; returns what was done (for answers)."""
    if not settings.auto_refresh or changes <= 0:
        return {}
    if not context.has_api:
        return {"refresh": "off: no Label Studio API access to post predictions"}
    counter, later, now = _keys(context.project)
    pipe = redis.pipeline()
    pipe.hincrby(counter, "changes", changes)
    pipe.hset(counter, "reason", reason)
    total = int(pipe.execute()[0])
    ttl = int(settings.refresh_delay_s) + 3600  # flags outlive their job's wait, and expire if it never ran
    if total >= settings.refresh_after_changes:
        if redis.set(now, 1, nx=True, ex=ttl):
            submit(redis, settings, "refresh", context.project, reason, meta={"project": context.project})
            return {"refresh": "queued"}
        return {"refresh": "queued earlier"}
    if redis.set(later, 1, nx=True, ex=ttl):
        submit(redis, settings, "refresh", context.project, reason, meta={"project": context.project},
               delay_s=settings.refresh_delay_s)
        return {"refresh": f"in {settings.refresh_delay_s:g} s"}
    return {"refresh": "scheduled earlier"}


def start_refresh(redis: Redis, pid: int) -> int:
    """Called as a refresh job starts: the changes it covers are cleared (later ones schedule the next run)."""
    counter, later, now = _keys(pid)
    pipe = redis.pipeline()
    pipe.hget(counter, "changes")
    pipe.delete(counter, later, now)
    return int(pipe.execute()[0] or 0)
