"""Support store: projects, their accepted annotations (Redis) and cached images and masks (disk)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from redis import Redis
from redis.exceptions import WatchError

from .annotations import DEFAULT_MAX_PIXELS, mask_regions
from .errors import BadRequest, NotFound
from .example_health import forget
from .keys import PREFIX
from .label_config import LabelConfig
from .supports import SupportIndex

VERSION_CHOICES = ("active_version", "pinned_version")
"""Project fields that say which version a project predicts with (also kept on disk: save_choices)."""

logger = logging.getLogger(__name__)


@dataclass
class Example:
    """One accepted annotation with mask regions: the support examples it gives, one per label."""

    annotation_id: int
    task_id: int
    image_url: str
    regions: list[dict]
    labels: list[str]
    ground_truth: bool = False
    updated_at: float = field(default_factory=time.time)

    @classmethod
    def from_annotation(cls, annotation: dict, task: dict, config: LabelConfig,
                        max_pixels: int = DEFAULT_MAX_PIXELS) -> Example | None:
        """The example an accepted annotation gives, or None (cancelled, or no mask regions of brush labels);
        BadRequest naming why when mask regions were there but none was usable."""
        cancelled = annotation.get("was_cancelled")
        if cancelled is not None and not isinstance(cancelled, bool):
            raise BadRequest(f"was_cancelled must be true or false, got {cancelled!r}")
        if cancelled:
            return None
        skipped: list[str] = []
        regions = mask_regions(annotation.get("result") or [], config, max_pixels, skipped)
        if not regions:
            if skipped:
                raise BadRequest("no usable mask region: " + "; ".join(skipped[:5]))
            return None
        try:
            annotation_id, task_id = int(annotation["id"]), int(task["id"])
        except (KeyError, TypeError, ValueError):
            raise BadRequest("annotation and task need integer ids") from None
        data = task.get("data")
        url = data.get(config.image_key) if isinstance(data, dict) else None
        if not isinstance(url, str) or not url:
            raise BadRequest(f"task {task_id} has no image URL under data.{config.image_key}")
        return cls(
            annotation_id=annotation_id, task_id=task_id, image_url=url, regions=regions,
            labels=sorted({label for r in regions for label in r["labels"]}),
            ground_truth=bool(annotation.get("ground_truth")),
        )

    def same_content(self, other: Example) -> bool:
        """True if both give the same support examples (only the time they were recorded differs)."""
        return {**asdict(self), "updated_at": 0} == {**asdict(other), "updated_at": 0}

    @property
    def image_id(self) -> str:
        """Short hash of the example's task and image URL: examples of one image share it."""
        return hashlib.sha256(f"{self.task_id}\n{self.image_url}".encode()).hexdigest()[:16]

    @property
    def stamp(self) -> str:
        """Short content hash of the regions: mask files are named by it, so an update never reads a stale mask."""
        return hashlib.sha256(json.dumps(self.regions, sort_keys=True).encode()).hexdigest()[:12]


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename (readers never see half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def parse_project_id(value: object) -> int:
    """Project id from Label Studio's "<id>.<created_unix>" string, an int, or a project object."""
    if isinstance(value, dict):
        value = value.get("id")
    if isinstance(value, bool):
        raise BadRequest(f"project must be an id or '<id>.<timestamp>', got {value!r}")
    head = value.split(".", 1)[0] if isinstance(value, str) else ""
    if isinstance(value, int):
        pid = value
    elif head.isascii() and head.isdigit():
        pid = int(head)
    else:
        raise BadRequest(f"project must be an id or '<id>.<timestamp>', got {value!r}")
    if pid <= 0:
        raise BadRequest(f"project id must be positive, got {pid}")
    return pid


class SupportStore:
    """Per-project metadata and support examples in Redis; image and mask files under MODEL_DIR."""

    def __init__(self, redis: Redis, model_dir: Path):
        self.redis = redis
        self.model_dir = Path(model_dir)
        self.index = SupportIndex(redis)

    # ---- keys and paths ---------------------------------------------------------------------

    @staticmethod
    def project_key(pid: int) -> str:
        """The Redis hash holding a project's record."""
        return f"{PREFIX}:project:{pid}"

    _project_key = project_key

    @staticmethod
    def _examples_key(pid: int) -> str:
        return f"{PREFIX}:examples:{pid}"

    @staticmethod
    def _errors_key(pid: int) -> str:
        return f"{PREFIX}:ingest-errors:{pid}"

    @staticmethod
    def _held_key(pid: int) -> str:
        return f"{PREFIX}:held:{pid}"

    @staticmethod
    def _confirmed_key(pid: int) -> str:
        return f"{PREFIX}:confirmed:{pid}"

    def project_dir(self, pid: int) -> Path:
        """Folder of a project's cached images and masks."""
        return self.model_dir / "projects" / str(pid)

    def image_path(self, pid: int, task_id: int, url: str) -> Path:
        """Where a task's image bytes are cached: by task and URL, so a task whose image changes is fetched anew."""
        return self.project_dir(pid) / "images" / f"{task_id}-{hashlib.sha256(url.encode()).hexdigest()[:12]}.bin"

    def mask_path(self, pid: int, example: Example, label: str) -> Path:
        """Where one label's mask of an example is cached (PNG, named by the regions' content hash)."""
        tag = hashlib.sha256(label.encode()).hexdigest()[:8]
        return self.project_dir(pid) / "masks" / f"{example.annotation_id}-{tag}-{example.stamp}.png"

    # ---- projects ---------------------------------------------------------------------------

    def register_project(self, pid: int, label_config: str, *, hostname: str = "", access_token: str = "") -> None:
        """Record (or refresh) a project's labeling config and the Label Studio it lives in."""
        fields = {"label_config": label_config, "updated_at": time.time()}
        if hostname:
            fields["hostname"] = hostname
        if access_token:
            fields["access_token"] = access_token
        pipe = self.redis.pipeline()
        pipe.hset(self._project_key(pid), mapping=fields)
        pipe.hsetnx(self._project_key(pid), "created_at", time.time())
        pipe.sadd(f"{PREFIX}:projects", pid)
        if pipe.execute()[1]:  # new to this Redis (or Redis lost it): the version choices written on disk come back
            from .registry import VersionRegistry  # the registry builds on this store

            VersionRegistry(self.redis, self).restore_choices(pid)

    def choices_path(self, pid: int) -> Path:
        """Where a project's active and pinned versions are kept on disk (beside its version folders)."""
        return self.model_dir / "versions" / str(pid) / "choices.json"

    def save_choices(self, pid: int) -> None:
        """Write the project's active and pinned versions to disk (they outlive a Redis that loses its data)."""
        project = self.project(pid) or {}
        choices = {k: project[k] for k in VERSION_CHOICES if project.get(k)}
        write_atomic(self.choices_path(pid), json.dumps(choices).encode())

    def restore_choice(self, pid: int, field: str, name: str) -> None:
        """Set one version choice unless the project's record has one (the registry checks the name first)."""
        self.redis.hsetnx(self._project_key(pid), field, name)

    def project(self, pid: int) -> dict[str, str] | None:
        """A project's stored fields, or None if this backend has never seen it (or Redis lost it: a job that
        finishes after a flush may write a field, but only /setup or a webhook registers a labeling config)."""
        data = {k.decode(): v.decode() for k, v in self.redis.hgetall(self._project_key(pid)).items()}
        return data if "label_config" in data else None

    def require_project(self, pid: int) -> dict[str, str]:
        """A project's stored fields; NotFound naming the fix if it was never connected."""
        project = self.project(pid)
        if project is None:
            raise NotFound(f"unknown project {pid}: connect this backend to it in Label Studio first (it calls /setup)")
        return project

    def set_project_field(self, pid: int, name: str, value: str | float | int) -> None:
        """Set one field of a project's record."""
        self.redis.hset(self._project_key(pid), name, value)

    def delete_project_field(self, pid: int, name: str) -> None:
        """Remove one field of a project's record."""
        self.redis.hdel(self._project_key(pid), name)

    def incr_project_field(self, pid: int, name: str, by: int) -> int:
        """Add `by` to a numeric project field; returns the new value."""
        return int(self.redis.hincrby(self._project_key(pid), name, by))

    def claim_flag(self, pid: int, name: str) -> bool:
        """Set a project flag if unset; True for the one caller that set it (a once-only trigger)."""
        return bool(self.redis.hsetnx(self._project_key(pid), name, time.time()))

    def projects(self) -> list[int]:
        """Ids of every project this backend knows."""
        return sorted(int(p) for p in self.redis.smembers(f"{PREFIX}:projects"))

    def revision(self, pid: int) -> int:
        """Support-set revision: bumped by every change to a project's examples."""
        return int(self.redis.hget(self._project_key(pid), "revision") or 0)

    # ---- examples ---------------------------------------------------------------------------

    def upsert(self, pid: int, example: Example) -> bool:
        """Add or replace the example of an annotation; False (and no new revision) if it is unchanged."""
        current = self.get(pid, example.annotation_id)
        if current is not None and example.same_content(current):
            return False
        self.ensure_index(pid)
        pipe = self.redis.pipeline()
        pipe.hset(self._examples_key(pid), str(example.annotation_id), json.dumps(asdict(example)))
        pipe.hincrby(self._project_key(pid), "revision", 1)
        if current is not None:
            self.index.drop(pipe, pid, current.annotation_id, current.labels, current.image_id)
        self.index.add(pipe, pid, example.annotation_id, example.labels, example.ground_truth, example.updated_at,
                       example.image_id)
        forget(pipe, pid, [example.annotation_id])  # edited: tried afresh
        pipe.srem(self._held_key(pid), example.annotation_id)  # and no longer held or confirmed: a person changed it
        pipe.srem(self._confirmed_key(pid), example.annotation_id)
        pipe.execute()
        if current is not None:
            for label in current.labels:  # masks of the replaced regions are never read again
                if label not in example.labels or current.stamp != example.stamp:
                    self.mask_path(pid, current, label).unlink(missing_ok=True)
            if current.image_url != example.image_url:  # the task's image changed
                self._drop_unused_image(pid, current)
        return True

    def _drop_unused_image(self, pid: int, gone: Example) -> None:
        """Delete the cached image of an example's task unless another example still uses that image (the support
        index's image set: no example is read)."""
        if not self.redis.scard(self.index.image_key(pid, gone.image_id)):
            self.image_path(pid, gone.task_id, gone.image_url).unlink(missing_ok=True)

    def remove(self, pid: int, annotation_ids: list[int], reason: str | None = None) -> int:
        """Remove the examples of these annotations (and their mask files); returns how many were removed.

        With a `reason`, it is recorded as their ingestion error in the same transaction (a reader never sees
        the example gone without why); without one, their errors are cleared.
        """
        if not annotation_ids:
            return 0
        keys = [str(a) for a in annotation_ids]
        existing = [self.get(pid, a) for a in annotation_ids]
        self.ensure_index(pid)
        pipe = self.redis.pipeline(transaction=True)
        for example in filter(None, existing):
            self.index.drop(pipe, pid, example.annotation_id, example.labels, example.image_id)
        if reason is None:
            pipe.hdel(self._errors_key(pid), *keys)
        else:
            pipe.hset(self._errors_key(pid), mapping={k: reason for k in keys})
        forget(pipe, pid, annotation_ids)
        pipe.srem(self._held_key(pid), *keys)
        pipe.srem(self._confirmed_key(pid), *keys)
        pipe.hdel(self._examples_key(pid), *keys)
        removed = pipe.execute()[-1]
        if removed:
            self.redis.hincrby(self._project_key(pid), "revision", 1)
        for example in filter(None, existing):
            for label in example.labels:
                self.mask_path(pid, example, label).unlink(missing_ok=True)
            self._drop_unused_image(pid, example)
        return int(removed)

    def get(self, pid: int, annotation_id: int) -> Example | None:
        """The example of one annotation, or None."""
        raw = self.redis.hget(self._examples_key(pid), str(annotation_id))
        return Example(**json.loads(raw)) if raw else None

    def annotation_ids(self, pid: int) -> set[int]:
        """Ids of the annotations a project has examples of."""
        return {int(k) for k in self.redis.hkeys(self._examples_key(pid))}

    def examples(self, pid: int) -> list[Example]:
        """Every example of a project, oldest first."""
        raw = self.redis.hvals(self._examples_key(pid))
        return sorted((Example(**json.loads(r)) for r in raw), key=lambda e: (e.updated_at, e.annotation_id))

    # ---- examples held back by a label check ------------------------------------------------

    def held(self, pid: int) -> set[int]:
        """Annotation ids kept out of support sets and training until a person confirms or edits them."""
        return {int(a) for a in self.redis.smembers(self._held_key(pid))}

    def confirmed(self, pid: int) -> set[int]:
        """Annotation ids a person confirmed after a label check (never held again unless edited)."""
        return {int(a) for a in self.redis.smembers(self._confirmed_key(pid))}

    def hold(self, pid: int, annotation_ids: list[int]) -> list[int]:
        """Keep these examples out of support sets (the index) and training, unless confirmed or already held; they
        stay stored. Returns the ids newly held."""
        self.ensure_index(pid)
        skip = self.held(pid) | self.confirmed(pid)
        newly = [e for e in (self.get(pid, a) for a in dict.fromkeys(annotation_ids)) if e is not None and e.annotation_id not in skip]
        if newly:
            pipe = self.redis.pipeline(transaction=True)
            for e in newly:
                self.index.drop(pipe, pid, e.annotation_id, e.labels, e.image_id)
                pipe.sadd(self._held_key(pid), e.annotation_id)
            pipe.hincrby(self._project_key(pid), "revision", 1)
            pipe.execute()
        return [e.annotation_id for e in newly]

    def confirm(self, pid: int, annotation_id: int) -> bool:
        """A person says the annotation is right: it is released (back in support sets and training) and never held
        again unless edited; False when the project has no such example."""
        example = self.get(pid, annotation_id)
        if example is None:
            return False
        was_held = bool(self.redis.sismember(self._held_key(pid), annotation_id))
        pipe = self.redis.pipeline(transaction=True)
        pipe.sadd(self._confirmed_key(pid), annotation_id)
        pipe.srem(self._held_key(pid), annotation_id)
        if was_held:
            self.index.add(pipe, pid, example.annotation_id, example.labels, example.ground_truth, example.updated_at,
                           example.image_id)
            pipe.hincrby(self._project_key(pid), "revision", 1)
        pipe.execute()
        return True

    def label_counts(self, pid: int) -> dict[str, int]:
        """Number of examples per label (from the index: no example is read)."""
        self.ensure_index(pid)
        return self.index.counts(pid)

    def label_revisions(self, pid: int) -> dict[str, int]:
        """Label -> revision of its support set, bumped by every change to that label's examples."""
        self.ensure_index(pid)
        return self.index.revisions(pid)

    def select(self, pid: int, label: str, k: int, policy: str) -> list[Example]:
        """At most k examples of `label` by policy, reading only those k records (see supports.POLICIES).

        ground_truth_first: ground-truth annotations first, then the newest; newest: most recently
        updated first; oldest: the first labeled first. Ties break on annotation id.
        """
        self.ensure_index(pid)
        ids = self.index.select(pid, label, k, policy)
        raw = self.redis.hmget(self._examples_key(pid), [str(a) for a in ids]) if ids else []
        return [Example(**json.loads(r)) for r in raw if r]

    def pool(self, pid: int, label: str) -> list[Example]:
        """Every example of `label`, oldest first: what the similar policy chooses from."""
        self.ensure_index(pid)
        ids = self.redis.zrange(self.index.all_key(pid, label), 0, -1)
        raw = self.redis.hmget(self._examples_key(pid), [str(int(m)) for m in ids]) if ids else []
        return [Example(**json.loads(r)) for r in raw if r]

    def ensure_index(self, pid: int) -> None:
        """Build the project's support index from its examples if it has none (data older than the index)."""
        if self.redis.exists(self.index.built_key(pid)):
            return
        while True:
            with self.redis.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(self._examples_key(pid))  # an example written meanwhile restarts the build
                    examples = [Example(**json.loads(r)) for r in pipe.hvals(self._examples_key(pid))]
                    labels = list(self.index.revisions(pid))
                    pipe.multi()
                    self.index.clear(pipe, pid, labels, [e.image_id for e in examples])
                    held = self.held(pid)
                    for e in examples:
                        if e.annotation_id not in held:
                            self.index.add(pipe, pid, e.annotation_id, e.labels, e.ground_truth, e.updated_at,
                                           e.image_id)
                    pipe.set(self.index.built_key(pid), 1)
                    pipe.execute()
                    return
                except WatchError:
                    continue

    # ---- annotations that could not be used -------------------------------------------------

    def record_errors(self, pid: int, errors: dict[str, str]) -> None:
        """Remember why these annotations (id -> message) gave no support example."""
        if errors:
            self.redis.hset(self._errors_key(pid), mapping=errors)

    def clear_errors(self, pid: int, annotation_ids: list[int]) -> None:
        """Forget the errors of annotations that are now usable (or gone)."""
        if annotation_ids:
            self.redis.hdel(self._errors_key(pid), *[str(a) for a in annotation_ids])

    def errors(self, pid: int) -> dict[str, str]:
        """Annotation id -> why it gave no support example."""
        return {k.decode(): v.decode() for k, v in self.redis.hgetall(self._errors_key(pid)).items()}

    # ---- files ------------------------------------------------------------------------------

    def save_mask(self, pid: int, example: Example, label: str, mask: np.ndarray) -> Path:
        """Write one label's mask of an example as a 1-bit PNG, atomically."""
        import io

        buf = io.BytesIO()
        Image.fromarray(mask).convert("1").save(buf, format="PNG")
        path = self.mask_path(pid, example, label)
        write_atomic(path, buf.getvalue())
        return path
