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

from model import DiffewSError, VersionInfo, check_version_name, is_version_folder
from redis import Redis
from redis.exceptions import RedisError

from .errors import NotFound, VersionUnavailable
from .keys import PREFIX
from .store import VERSION_CHOICES, SupportStore

logger = logging.getLogger(__name__)

STALE_TEMP_S = 6 * 3600
"""A temporary version folder untouched this long belongs to a save that crashed (a save takes minutes)."""
TRAIN_LOCK_KEY = PREFIX + ":training:{pid}"
"""Holds the id of a project's queued or running training job (no duplicates)."""
REJECTED_KEY = f"{PREFIX}:versions-rejected"
"""Version files refused when read (path relative to MODEL_DIR -> why), for /health."""
REJECTED_STAMP_KEY = f"{PREFIX}:versions-rejected-stamp"
"""Refused version folder -> the stamp (file names, sizes, times) it was refused at: not checked again until it
changes (checking hashes every file, and every registry miss looks at the folders)."""
MAX_LISTED = 1000
"""The most versions one page of a version list holds."""


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
        """The registry record of a version folder: what version.json says, its path relative to MODEL_DIR.

        DiffewSError when the folder may not be served: outside MODEL_DIR/versions/<project>, named otherwise than
        its version, over a base version that is not a sibling folder's name, or with a file whose size or
        SHA-256 differs from what version.json recorded (checked here, once, so that every worker agrees).
        """
        root = self.store.model_dir.resolve()
        folder = Path(folder).resolve()
        if not folder.is_relative_to(self.root.resolve()) or folder.parent.parent != self.root.resolve():
            raise DiffewSError(f"{folder} is not a folder MODEL_DIR/versions/<project>/<name>")
        if folder.name != info.name:
            raise DiffewSError(f"{folder}: its version.json names it {info.name!r}, not its folder's name")
        if "version" in info.base:
            check_version_name(info.base["version"])
        info.verify_files(folder)
        decision = info.summary.get("decision") or {}
        project = info.project if info.project is not None else _int_or_none(folder.parent.name)
        return {"name": info.name, "project": project, "parent": info.parent, "mode": info.mode,
                "created_at": info.created_at, "scores": info.summary.get("cv_mean_iou", info.summary.get("held_out_miou", {})),
                "evidence": info.summary.get("evidence"),
                "promoted": bool(decision.get("promoted", False)), "decision": decision or None,
                "checked_files": len(info.files), "path": str(folder.relative_to(root))}

    def add(self, folder: Path) -> dict:
        """Record a new version whose folder is complete on disk (DiffewSError if record() refuses it)."""
        record = self.record(VersionInfo.read(folder), folder)
        self.redis.hset(self.key, record["name"], json.dumps(record))
        return record

    def rebuild(self) -> int:
        """Record every version folder under MODEL_DIR/versions that Redis lacks, and restore lost choices.

        Returns how many records were added. Unreadable or refused folders are logged, named in /health
        (rejected()) and skipped.
        """
        added = self._record_folders()
        for pid in self.store.projects():
            self.restore_choices(pid)
        return added

    def _record_folders(self) -> int:
        """Record the version folders Redis lacks (removing stale temporaries); how many were added."""
        added = 0
        gone = [path for path in self.rejected() if not (self.store.model_dir / path).exists()]
        if gone:  # a refused file that was deleted is no longer reported
            self.redis.hdel(REJECTED_KEY, *gone)
            self.redis.hdel(REJECTED_STAMP_KEY, *gone)
        for folder in sorted(self.root.glob("*/*")):
            if folder.name.startswith("."):
                if ".tmp-" in folder.name and time.time() - folder.stat().st_mtime > STALE_TEMP_S:
                    shutil.rmtree(folder, ignore_errors=True)  # a save that crashed before its rename
                    logger.warning("removed the unfinished version folder %s", folder)
                continue
            if not is_version_folder(folder) or self.redis.hexists(self.key, folder.name):
                continue  # a recorded version's files were checked when it was recorded
            relative, stamp = self._relative(folder), _stamp(folder)
            if self.redis.hget(REJECTED_STAMP_KEY, relative) == stamp.encode():
                continue  # refused as it is now
            try:
                record = self.record(VersionInfo.read(folder), folder)
            except DiffewSError as exc:
                self.reject(folder, str(exc))
                self.redis.hset(REJECTED_STAMP_KEY, relative, stamp)
                continue
            self.redis.hdel(REJECTED_KEY, relative)
            self.redis.hdel(REJECTED_STAMP_KEY, relative)
            added += int(self.redis.hsetnx(self.key, record["name"], json.dumps(record)))
        if added:
            logger.info("version registry: %d versions recorded again from %s", added, self.root)
        return added

    def _relative(self, path: Path) -> str:
        return str(Path(path).relative_to(self.store.model_dir))

    def reject(self, path: Path, why: str) -> None:
        """Log a version file that is not used and keep why for /health."""
        logger.warning("%s not used: %s", path, why)
        self.redis.hset(REJECTED_KEY, self._relative(path), why[:500])

    def rejected(self) -> dict[str, str]:
        """Version files refused when read (path relative to MODEL_DIR -> why)."""
        return {k.decode(): v.decode() for k, v in self.redis.hgetall(REJECTED_KEY).items()}

    def restore_choices(self, pid: int) -> None:
        """Set the project's active and pinned versions from its choices.json where its record has none; a choice
        that is not a valid name, or an active version that is not one of the project's, is refused and named."""
        path = self.store.choices_path(pid)
        try:
            if path.stat().st_size > 4096:
                raise ValueError(f"{path.stat().st_size} bytes, more than a choices file holds")
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            self.reject(path, f"cannot read ({exc}); version choices kept in Redis only")
            return
        if not isinstance(data, dict):
            self.reject(path, "not a JSON object")
            return
        for field in VERSION_CHOICES:
            name = data.get(field)
            if name is None:
                continue
            try:
                check_version_name(name)
                if field == "active_version" and (self.get(name) or {}).get("project") != pid:
                    raise DiffewSError(f"active version {name!r} is not a version of project {pid}")
            except DiffewSError as exc:
                self.reject(path, f"{field}: {exc}")
                continue
            self.store.restore_choice(pid, field, name)

    def lost_choices(self) -> list[str]:
        """Projects that predict with the base although one of their versions was promoted: their choice was lost
        with both Redis and choices.json (a pin or promotion restores it)."""
        lost = []
        for pid in self.store.projects():
            project = self.store.project(pid) or {}
            if project.get("active_version") or project.get("pinned_version"):
                continue
            promoted = [v["name"] for v in self.list(pid) if v.get("promoted")]
            if promoted:
                lost.append(f"project {pid} predicts with the base, but {promoted[-1]} was promoted: its version "
                            f"choice is lost (Redis and {self._relative(self.store.choices_path(pid))}); pin it again "
                            f"(POST /projects/{pid}/pin)")
        return lost

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

    def list(self, project: int | None = None, *, offset: int = 0, limit: int | None = None) -> list[dict]:
        """Versions (of one project), oldest first; `limit` of them from `offset`."""
        items = [json.loads(v) for v in self.redis.hvals(self.key)]
        if project is not None:
            items = [v for v in items if v.get("project") == project]
        items.sort(key=lambda v: v.get("created_at", 0))
        return items[offset:] if limit is None else items[offset:offset + limit]

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


def _stamp(folder: Path) -> str:
    """Name, size and modification time of each file of a folder: it changes when any file does."""
    files = sorted((p.name, p.stat()) for p in folder.iterdir() if p.is_file())
    return ";".join(f"{name}:{st.st_size}:{st.st_mtime_ns}" for name, st in files)


def _int_or_none(text: str) -> int | None:
    return int(text) if text.isdigit() else None
