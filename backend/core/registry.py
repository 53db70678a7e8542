"""The version registry: fine-tuned versions (Redis records, folders under MODEL_DIR), promotion and pins.

The version folders are the truth: the Redis records are rebuilt from their version.json files by every
process at start (and on a miss), and each project's active and pinned choices are also written to
`versions/<project>/choices.json`, so a Redis that lost its data loses no version and no choice.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from pathlib import Path

from model import DiffewSError, VersionInfo, is_version_folder
from redis import Redis
from redis.exceptions import RedisError

from .errors import NotFound, VersionUnavailable
from .keys import PREFIX
from .store import SupportStore

logger = logging.getLogger(__name__)

STALE_TEMP_S = 6 * 3600
"""A temporary version folder untouched this long belongs to a save that crashed (a save takes minutes)."""
TRAIN_LOCK_KEY = PREFIX + ":training:{pid}"
"""Holds the id of a project's queued or running training job (no duplicates)."""


class VersionRegistry:
    """Version records: name -> {path (relative to MODEL_DIR), project, parent, mode, decision, summary}."""

    def __init__(self, redis: Redis, store: SupportStore):
        self.redis = redis
        self.store = store
        self.key = f"{PREFIX}:versions"

    @property
    def root(self) -> Path:
        """The folder holding every project's version folders (versions/<project>/<name>)."""
        return self.store.model_dir / "versions"

    def record(self, info: VersionInfo, folder: Path) -> dict:
        """The registry record of a version folder: what version.json says, its path relative to MODEL_DIR."""
        root = self.store.model_dir.resolve()
        folder = Path(folder).resolve()
        decision = info.summary.get("decision") or {}
        project = info.project if info.project is not None else _int_or_none(folder.parent.name)
        return {"name": info.name, "project": project, "parent": info.parent, "mode": info.mode,
                "created_at": info.created_at, "scores": info.summary.get("cv_mean_iou", info.summary.get("held_out_miou", {})),
                "evidence": info.summary.get("evidence"),
                "promoted": bool(decision.get("promoted", False)), "decision": decision or None,
                "path": str(folder.relative_to(root)) if folder.is_relative_to(root) else str(folder)}

    def add(self, folder: Path) -> dict:
        """Record a new version whose folder is complete on disk."""
        record = self.record(VersionInfo.read(folder), folder)
        self.redis.hset(self.key, record["name"], json.dumps(record))
        return record

    def rebuild(self) -> int:
        """Record every version folder under MODEL_DIR/versions that Redis lacks, and restore lost choices.

        Returns how many records were added. Unreadable folders are logged and skipped.
        """
        added = self._record_folders()
        for pid in self.store.projects():
            self.store.restore_choices(pid)
        return added

    def _record_folders(self) -> int:
        """Record the version folders Redis lacks (removing stale temporaries); how many were added."""
        added = 0
        for folder in sorted(self.root.glob("*/*")):
            if folder.name.startswith("."):
                if ".tmp-" in folder.name and time.time() - folder.stat().st_mtime > STALE_TEMP_S:
                    shutil.rmtree(folder, ignore_errors=True)  # a save that crashed before its rename
                    logger.warning("removed the unfinished version folder %s", folder)
                continue
            if not is_version_folder(folder):
                continue
            try:
                record = self.record(VersionInfo.read(folder), folder)
            except DiffewSError as exc:
                logger.warning("version folder %s skipped: %s", folder, exc)
                continue
            added += int(self.redis.hsetnx(self.key, record["name"], json.dumps(record)))
        if added:
            logger.info("version registry: %d versions recorded again from %s", added, self.root)
        return added

    def rebuild_at_start(self) -> None:
        """rebuild(), or a warning when Redis cannot be reached yet (a later miss rebuilds)."""
        try:
            self.rebuild()
        except RedisError as exc:
            logger.warning("version registry not rebuilt at start: Redis unavailable (%s)", exc)

    def get(self, name: str) -> dict | None:
        """A version's record (rebuilt from the folders if Redis lacks it), or None."""
        raw = self.redis.hget(self.key, name)
        if raw is None and self._record_folders():
            raw = self.redis.hget(self.key, name)
        return json.loads(raw) if raw else None

    def next_name(self, pid: int, base: str) -> str:
        """The name of a project's next version over `base`: one past every number on disk or in Redis.

        A fine-tuned version is trained, so "-untrained" of the tiny base's name is not carried over
        (diffews-tiny-r256-p1-v1); versions named with it earlier still count.
        """
        stem = base.removesuffix("-untrained")
        pattern = re.compile(f"(?:{re.escape(stem)}|{re.escape(base)})" + re.escape(f"-p{pid}-v") + r"(\d+)$")
        names = [v["name"] for v in self.list(pid)]
        folder = self.root / str(pid)
        if folder.is_dir():
            names += [p.name for p in folder.iterdir()]
        numbers = [int(m.group(1)) for n in names if (m := pattern.match(n))]
        return f"{stem}-p{pid}-v{max(numbers, default=0) + 1}"

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
        self.store.save_choices(pid)

    def pin(self, pid: int, name: str | None, base: str) -> None:
        """Pin a project to a version (the base, or one of its own), or unpin with None."""
        if name is None:
            self.store.delete_project_field(pid, "pinned_version")
        else:
            info = self.get(name)
            if name != base and (info is None or info.get("project") != pid):
                raise NotFound(f"project {pid} has no version {name!r}; see GET /projects/{pid}/versions")
            self.store.set_project_field(pid, "pinned_version", name)
        self.store.save_choices(pid)


def _int_or_none(text: str) -> int | None:
    return int(text) if text.isdigit() else None
