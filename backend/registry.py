"""Fine-tuned model versions known to the backend (Redis), which one each project uses, and pins."""

from __future__ import annotations

import json

from redis import Redis

from .errors import NotFound
from .store import PREFIX, SupportStore

TRAIN_LOCK_KEY = PREFIX + ":training:{pid}"
"""Holds the id of a project's queued or running training job (no duplicates)."""


class VersionRegistry:
    """Version records: name -> {path, project, parent, mode, scores, promoted, summary}."""

    def __init__(self, redis: Redis, store: SupportStore):
        self.redis = redis
        self.store = store
        self.key = f"{PREFIX}:versions"

    def add(self, info: dict) -> None:
        """Record a new version (its folder is already complete on disk)."""
        self.redis.hset(self.key, info["name"], json.dumps(info))

    def get(self, name: str) -> dict | None:
        """A version's record, or None."""
        raw = self.redis.hget(self.key, name)
        return json.loads(raw) if raw else None

    def list(self, project: int | None = None) -> list[dict]:
        """All versions (of one project), oldest first."""
        items = [json.loads(v) for v in self.redis.hvals(self.key)]
        if project is not None:
            items = [v for v in items if v.get("project") == project]
        return sorted(items, key=lambda v: v.get("created_at", 0))

    def promote(self, pid: int, name: str) -> None:
        """Make `name` the project's active version (workers switch on their next job)."""
        self.store.set_project_field(pid, "active_version", name)

    def pin(self, pid: int, name: str | None, base: str) -> None:
        """Pin a project to a version (the base, or one of its own), or unpin with None."""
        if name is None:
            self.store.delete_project_field(pid, "pinned_version")
            return
        info = self.get(name)
        if name != base and (info is None or info.get("project") != pid):
            raise NotFound(f"project {pid} has no version {name!r}; see GET /projects/{pid}/versions")
        self.store.set_project_field(pid, "pinned_version", name)
