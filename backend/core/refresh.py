"""AUTO_REFRESH: predictions that follow the project's supports and version, debounced, with no action.

Label Studio asks the backend for a prediction when a task is opened only if the task has none, so after
label edits or a promotion its stored predictions would stay stale. Each change is counted here; the first
one schedules a refresh job REFRESH_DELAY_S later, and REFRESH_AFTER_CHANGES changes (or a version change)
start one at once. The job lists the unlabeled tasks and queues, through the delivery ledger, those whose
prediction is missing or older than the project's revision (backend.worker.bulk_jobs.refresh_project).
"""

from __future__ import annotations

import time

from redis import Redis

from .catalog import submit
from .context import ProjectContext, resolve_project
from .keys import PREFIX
from .registry import VersionRegistry
from .settings import Settings
from .store import SupportStore
from .versions import base_version, current_version

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
            redis.hset(counter, "due_at", time.time())
            return {"refresh": "queued"}
        return {"refresh": "queued earlier"}
    if redis.set(later, 1, nx=True, ex=ttl):
        submit(redis, settings, "refresh", context.project, reason, meta={"project": context.project},
               delay_s=settings.refresh_delay_s)
        redis.hset(counter, "due_at", time.time() + settings.refresh_delay_s)
        return {"refresh": f"in {settings.refresh_delay_s:g} s"}
    return {"refresh": "scheduled earlier"}


def pending_refresh(redis: Redis, pid: int) -> dict | None:
    """The refresh waiting to run for a project (/status): why, how many changes it covers and in how many seconds
    it starts (0: queued now); None when none waits."""
    counter, _, _ = _keys(pid)
    fields = {k.decode(): v.decode() for k, v in redis.hgetall(counter).items()}
    if "changes" not in fields:
        return None
    changes = int(fields["changes"])
    due_in = max(0.0, float(fields.get("due_at", 0)) - time.time())
    return {"reason": fields.get("reason", ""), "changes": "version change" if changes >= VERSION_CHANGED else changes,
            "starts_in_s": round(due_in, 1), "tasks": "every unlabeled task whose prediction is missing, older than "
            "the project's labels or of another version (listed when it starts)"}


def pin(redis: Redis, settings: Settings, store: SupportStore, pid: int, version: str | None) -> dict:
    """Pin a project to a version (None: unpin) and, when that changes the version it predicts with, refresh its
    tasks' predictions (the web route and the CLI both pin through here)."""
    before = current_version(settings, store.project(pid))
    VersionRegistry(redis, store).pin(pid, version, base_version(settings))
    current = current_version(settings, store.project(pid))
    refresh = {}
    if current != before:  # the project's tasks should now show the pinned version's predictions
        refresh = request_refresh(redis, settings, resolve_project(settings, store, pid), VERSION_CHANGED,
                                  f"pinned {current}")
    return {"project": pid, "pinned": version, "current": current, **refresh}


def start_refresh(redis: Redis, pid: int) -> int:
    """Called as a refresh job starts: the changes it covers are cleared (later ones schedule the next run)."""
    counter, later, now = _keys(pid)
    pipe = redis.pipeline()
    pipe.hget(counter, "changes")
    pipe.delete(counter, later, now)
    return int(pipe.execute()[0] or 0)
