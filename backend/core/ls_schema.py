"""The Label Studio boundary, typed: pydantic models of what Label Studio 1.23 sends (/setup, /predict with its tasks
and smart-tool context, webhook events) and of the predictions the backend returns or posts.

Incoming models read only the fields the backend uses and keep the rest (`extra="allow"`: Label Studio sends more,
and versions add fields). `checked` turns the first validation error into a BadRequest naming the field, as
`tasks[0].data must be an object, got str`. Rules that need the project (labels of its config, box bounds, the
prompt limit) stay with their owners (backend.core.prompts, backend.core.annotations).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from .errors import BadRequest

M = TypeVar("M", bound=BaseModel)


def int_id(value: object) -> int | None:
    """A non-negative integer id from an int or a string of ASCII digits, else None."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    return None


def _integer_id(value: object) -> int:
    found = int_id(value)
    if found is None:
        raise ValueError(f"must be an integer id, got {value!r:.80}")
    return found


def _text(value: object) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {type(value).__name__}")
    return value


def _object(value: object) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"must be an object, got {type(value).__name__}")
    return value


def _list(value: object) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError(f"must be a list, got {type(value).__name__}")
    return value


def _percent(value: object) -> float:
    """A coordinate in percent of the image, 0..100 (bools, strings, huge ints and non-finite numbers refused)."""
    try:
        ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(float(value))
              and 0.0 <= float(value) <= 100.0)
    except OverflowError:  # an int beyond any float
        ok = False
    if not ok:
        raise ValueError(f"must be a number from 0 to 100 (percent of the image), got {str(value)[:40]}")
    return float(value)


def _smart_tool(value: object) -> str:
    if value not in SMART_TOOLS:
        raise ValueError(f"is not a smart tool: got {str(value)[:40]!r} ({' or '.join(SMART_TOOLS)})")
    return str(value)


SMART_TOOLS = ("keypointlabels", "rectanglelabels")
"""The region types a smart-tool request may carry."""

IntId = Annotated[int, BeforeValidator(_integer_id)]
"""A non-negative integer id, as a JSON number or a string of digits (Label Studio sends both)."""
Text = Annotated[str, BeforeValidator(_text)]
"""An optional string: absent or null reads as ""."""
Object = Annotated[dict, BeforeValidator(_object)]
"""An optional object: absent or null reads as {}."""
Items = Annotated[list, BeforeValidator(_list)]
"""An optional list: absent or null reads as []."""
Percent = Annotated[float, BeforeValidator(_percent)]


class LabelStudioBody(BaseModel):
    """A body or part of one from Label Studio: the fields read here are checked, the others kept."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)


class Task(LabelStudioBody):
    """A task as /predict and the task listings carry it."""

    id: IntId
    data: Object = {}
    predictions: Items = []
    annotations: Items = []
    project: Any = None


class SetupBody(LabelStudioBody):
    """POST /setup: the project, its labeling config, and (without LABEL_STUDIO_URL here) where to reach it."""

    project: Any = None
    schema_xml: Text = Field("", alias="schema")
    label_config: Text = ""
    hostname: Text = ""
    access_token: Text = ""


class PredictBody(LabelStudioBody):
    """POST /predict: tasks to predict; `params.context.result` makes it a smart-tool request."""

    tasks: Annotated[list[Task], Field(min_length=1, description="a non-empty list of task objects with an 'id'")]
    project: Any = None
    label_config: Text = ""
    params: Object = {}


class PromptValue(LabelStudioBody):
    """A smart-tool region's value: where (percent of the image) and which label."""

    x: Percent
    y: Percent
    width: Percent | None = None
    height: Percent | None = None
    keypointlabels: list[str] | None = None
    rectanglelabels: list[str] | None = None


class PromptRegion(LabelStudioBody):
    """A keypoint or rectangle the annotator placed with a smart tool."""

    type: Annotated[str, BeforeValidator(_smart_tool)]
    value: PromptValue
    is_positive: bool | None = None


class AnnotationRef(LabelStudioBody):
    """An annotation named by its id (ANNOTATIONS_DELETED)."""

    id: IntId


class ProjectPayload(LabelStudioBody):
    """The project object a webhook event carries."""

    label_config: Text = ""


class WebhookEvent(LabelStudioBody):
    """Any webhook event: what happened, in which project."""

    action: Annotated[str, Field(strict=True, description="the event's name as a string")]
    project: Any = None


class AnnotationEvent(WebhookEvent):
    """ANNOTATION_CREATED / ANNOTATION_UPDATED: one annotation and its task."""

    annotation: Annotated[dict, Field(description="the annotation object")]
    task: Annotated[dict, Field(description="the task object")]


class AnnotationsCreatedEvent(WebhookEvent):
    """ANNOTATIONS_CREATED (an import): annotations and their tasks."""

    annotation: Annotated[list, Field(description="a list of annotation objects")]
    task: Annotated[list, Field(description="a list of task objects")]


class AnnotationsDeletedEvent(WebhookEvent):
    """ANNOTATIONS_DELETED: the ids of the annotations gone."""

    annotations: Annotated[list[AnnotationRef], Field(description='a list of {"id": <int>}')]


class TasksCreatedEvent(WebhookEvent):
    """TASKS_CREATED: the tasks imported."""

    tasks: Annotated[list, Field(min_length=1, description="a non-empty list of tasks")]


class PredictedRegion(BaseModel):
    """One region of a prediction, as Label Studio stores and shows it."""

    id: str
    from_name: str
    to_name: str
    type: Literal["brushlabels", "polygonlabels", "rectanglelabels"]
    original_width: int = Field(gt=0)
    original_height: int = Field(gt=0)
    image_rotation: int = 0
    value: dict
    """The control's value: {"format": "rle", "rle": [...], "brushlabels": [label]}, {"points": ..., "closed": true,
    "polygonlabels": [label]} or {"x", "y", "width", "height", "rotation", "rectanglelabels": [label]} (percent)."""
    score: float = Field(ge=0.0, le=1.0)
    readonly: bool = False


class Prediction(BaseModel):
    """A prediction the backend returns from /predict or posts through the API: regions, a task score, a version."""

    result: list[PredictedRegion]
    score: float = Field(ge=0.0, le=1.0)
    model_version: str = Field(min_length=1)


def checked(model: type[M], data: object, where: str = "") -> M:
    """`data` as `model`; BadRequest naming the first field that does not fit (`where` prefixes its path)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise BadRequest(describe(exc.errors(include_url=False)[0], model, where)) from None


_MESSAGES = {"missing": "is missing", "model_type": "must be an object", "dict_type": "must be an object",
             "model_attributes_type": "must be an object", "list_type": "must be a list",
             "string_type": "must be a string", "bool_type": "must be true or false", "too_short": "must not be empty"}


def describe(error: dict, model: type[BaseModel], where: str = "") -> str:
    """One pydantic error as a sentence naming its field: `'tasks' must be ...` at the top, `a.b[0].c ...` below."""
    loc = error["loc"]
    path = where
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    top = model.model_fields.get(str(loc[0])) if loc else None
    if not where and len(loc) == 1:
        path = f"'{loc[0]}'"
        if top is not None and top.description:
            return f"{path} must be {top.description}"
    message = _MESSAGES.get(error["type"]) or str(error["msg"]).removeprefix("Value error, ")
    if error["type"] in ("model_type", "dict_type", "model_attributes_type", "list_type", "string_type"):
        message += f", got {type(error.get('input')).__name__}"
    return f"{path or 'body'} {message}"
