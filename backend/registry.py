"""The version registry: fine-tuned versions (Redis records, folders under MODEL_DIR), promotion and pins."""

from __future__ import annotations

import json
from pathlib import Path

from redis import Redis

from .errors import NotFound, VersionUnavailable
from .store import PREFIX, SupportStore

TRAIN_LOCK_KEY = PREFIX + ":training:{pid}"
"""Holds the id of a project's queued or running training job (no duplicates)."""


class VersionRegistry:
    """Version records: name -> {path (relative to MODEL_DIR), project, parent, mode, decision, summary}."""

    def __init__(self, redis: Redis, store: SupportStore):
        self.redis = redis
        self.store = store
        self.key = f"{PREFIX}:versions"

    def add(self, info: dict, folder: Path) -> dict:
        """Record a new version whose folder is complete on disk; its path is stored relative to MODEL_DIR."""
        root = self.store.model_dir.resolve()
        folder = Path(folder).resolve()
        info = {**info, "path": str(folder.relative_to(root)) if folder.is_relative_to(root) else str(folder)}
        self.redis.hset(self.key, info["name"], json.dumps(info))
        return info

    def get(self, name: str) -> dict | None:
        """A version's record, or None."""
        raw = self.redis.hget(self.key, name)
        return json.loads(raw) if raw else None

    def folder(self, name: str) -> Path:
        """The folder of a registered version on this machine; VersionUnavailable naming it if missing."""
        info = self.get(name)
        if info is None:
            raise VersionUnavailable(
                f"model version {name!r} is not registered in this backend's Redis, and this worker's own weights "
                "are another version: give the web process and every worker the same DIFFEWS_MODEL, DIFFEWS_UNET "
                "and DIFFEWS_TINY_RESOLUTION"
            )
        path = self.store.model_dir / info["path"]  # an absolute path (older records) stays absolute
        if not path.is_dir():
            raise VersionUnavailable(
                f"model version {name!r}: its folder {path.resolve()} is missing on this worker; every web process "
                f"and worker must share MODEL_DIR (here {self.store.model_dir.resolve()}), e.g. one volume"
            )
        return path

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
