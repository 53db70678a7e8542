"""backend/core/payloads.py: fields of Label Studio's bodies are checked, and a bad one is named."""

from __future__ import annotations

import pytest

from backend.core.errors import BadRequest
from backend.core.payloads import annotation_ids, tasks_of, text_field


def test_text_field():
    assert text_field({"schema": "<View/>"}, "schema") == "<View/>"
    assert text_field({}, "schema") == "" and text_field({"schema": None}, "schema") == ""
    with pytest.raises(BadRequest, match="'schema' must be a string, got int"):
        text_field({"schema": 3}, "schema")


def test_tasks_of_accepts_tasks_with_integer_ids():
    tasks = [{"id": 5, "data": {"image": "x"}}, {"id": "6", "predictions": []}]
    assert tasks_of({"tasks": tasks}) is tasks


@pytest.mark.parametrize("body, says", [
    ({}, "'tasks' must be a non-empty list"),
    ({"tasks": []}, "'tasks' must be a non-empty list"),
    ({"tasks": {"id": 1}}, "'tasks' must be a non-empty list"),
    ({"tasks": [{"id": 1}, {"id": "x"}]}, "tasks[1] must be an object with an integer 'id'"),
    ({"tasks": [{"id": True}]}, "tasks[0] must be an object with an integer 'id'"),
    ({"tasks": ["5"]}, "tasks[0] must be an object"),
    ({"tasks": [{"id": 1, "data": "image.png"}]}, "tasks[0].data must be an object"),
    ({"tasks": [{"id": 1, "predictions": {"id": 2}}]}, "tasks[0].predictions must be a list"),
])
def test_tasks_of_names_the_bad_field(body, says):
    with pytest.raises(BadRequest) as caught:
        tasks_of(body)
    assert says in caught.value.message and caught.value.status == 400


def test_annotation_ids():
    assert annotation_ids([{"id": 3}, {"id": "4"}]) == [3, 4] and annotation_ids([]) == []
    with pytest.raises(BadRequest, match="needs an 'annotations' list"):
        annotation_ids({"id": 3})
    with pytest.raises(BadRequest, match=r"annotations\[1\].id must be an integer"):
        annotation_ids([{"id": 3}, {"id": 2.5}])
