"""Annotations -> support examples: one service for webhooks and the backfill from Label Studio."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from .annotations import DEFAULT_MAX_PIXELS
from .errors import BadRequest
from .label_config import LabelConfig
from .store import Example, SupportStore


@dataclass
class IngestReport:
    """What one batch of annotations did to a project's support set."""

    stored: list[int] = field(default_factory=list)
    """Annotations whose example is new or changed (each bumped the revision once)."""
    unchanged: list[int] = field(default_factory=list)
    """Annotations whose example was already stored as is (no new revision)."""
    removed: list[int] = field(default_factory=list)
    """Annotations that no longer give an example (cancelled, or no mask regions left)."""
    errors: dict[str, str] = field(default_factory=dict)
    """Annotation id -> why it could not be used; the stored example of that id, if any, is kept."""

    def as_dict(self) -> dict:
        """Counts and errors for an HTTP answer or job meta."""
        return {"stored": len(self.stored), "unchanged": len(self.unchanged), "removed": len(self.removed),
                "errors": self.errors}


def _annotation_key(annotation: object) -> str:
    value = annotation.get("id") if isinstance(annotation, dict) else None
    return str(value) if isinstance(value, (int, str)) and not isinstance(value, bool) else "?"


def ingest(store: SupportStore, pid: int, config: LabelConfig, pairs: Iterable[tuple[object, object]],
           max_pixels: int = DEFAULT_MAX_PIXELS) -> IngestReport:
    """Store, replace or remove the examples of (annotation, task) pairs; a bad annotation is reported, not fatal."""
    report = IngestReport()
    for annotation, task in pairs:
        key = _annotation_key(annotation)
        try:
            if not isinstance(annotation, dict):
                raise BadRequest("annotation must be an object")
            if not isinstance(task, dict):
                raise BadRequest(f"annotation {key} refers to a task missing from the payload")
            example = Example.from_annotation(annotation, task, config, max_pixels)
        except BadRequest as exc:
            report.errors[key] = exc.message
            continue
        if example is None:
            if key.isdigit() and store.remove(pid, [int(key)]):
                report.removed.append(int(key))
            continue
        if store.upsert(pid, example):
            report.stored.append(example.annotation_id)
        else:
            report.unchanged.append(example.annotation_id)
    store.clear_errors(pid, report.stored + report.unchanged + report.removed)
    store.record_errors(pid, report.errors)
    return report
