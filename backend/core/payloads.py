"""Fields of Label Studio's request bodies, checked: BadRequest naming the field that is wrong."""

from __future__ import annotations

from .errors import BadRequest
from .store import int_id


def text_field(body: dict, name: str) -> str:
    """An optional string field of a body ("" when absent or null); BadRequest naming it otherwise."""
    value = body.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadRequest(f"'{name}' must be a string, got {type(value).__name__}")
    return value


def tasks_of(body: dict) -> list[dict]:
    """The tasks of a /predict body, each with an integer id; BadRequest naming the first bad one."""
    tasks = body.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise BadRequest("'tasks' must be a non-empty list of task objects with an 'id'")
    for i, task in enumerate(tasks):
        if not isinstance(task, dict) or int_id(task.get("id")) is None:
            raise BadRequest(f"tasks[{i}] must be an object with an integer 'id', got {task!r:.80}")
        if not isinstance(task.get("data") or {}, dict):
            raise BadRequest(f"tasks[{i}].data must be an object")
        if not isinstance(task.get("predictions") or [], list):
            raise BadRequest(f"tasks[{i}].predictions must be a list")
    return tasks


def annotation_ids(annotations: object) -> list[int]:
    """Integer ids of an ANNOTATIONS_DELETED payload; BadRequest naming a bad one."""
    if not isinstance(annotations, list):
        raise BadRequest("ANNOTATIONS_DELETED needs an 'annotations' list of {\"id\": <int>}")
    ids = []
    for i, item in enumerate(annotations):
        value = int_id(item.get("id")) if isinstance(item, dict) else None
        if value is None:
            raise BadRequest(f"annotations[{i}].id must be an integer, got {item!r:.80}")
        ids.append(value)
    return ids
