"""Against the real Label Studio 1.23.2 (PAT, legacy tokens off): smart tools and polygon predictions."""

from __future__ import annotations

import pytest

from backend.worker.regions import polygons
from backend.core.rle import rle_to_mask

from bench.synthetic import square_scene
from bench.ls_harness import brush_result, create_project, wait_for
from .test_interactive import POLYGON_XML, SMART_XML

pytestmark = pytest.mark.label_studio
SIZE = (60, 80)


def _connect(label_studio, backend, config: str, results: list[list[dict]]) -> tuple[int, list[int]]:
    """A project of 4 tasks whose first two carry `results`, connected as an interactive backend."""
    scenes = [square_scene(i, SIZE) for i in range(4)]
    pid, tasks = create_project(label_studio, config, [image for image, _ in scenes])
    for task, result in zip(tasks, results):
        label_studio.request("POST", f"/api/tasks/{task['id']}/annotations", json={"result": result})
    ml = label_studio.json("POST", "/api/ml", json={"url": backend.url, "project": pid, "title": "DiffewS",
                                                     "is_interactive": True})
    wait_for(lambda: backend.get(f"/status/{pid}")["examples"].get("square") == 2, 60, "the backfill")
    return ml["id"], [t["id"] for t in tasks]


def test_smart_rectangle_and_keypoint_through_label_studio(label_studio, live_backend):
    backend = live_backend()
    scenes = [square_scene(i, SIZE) for i in range(2)]
    ml_id, tasks = _connect(label_studio, backend, SMART_XML, [brush_result(mask) for _, mask in scenes])
    box = {"type": "rectanglelabels", "original_width": SIZE[1], "original_height": SIZE[0],
           "value": {"x": 0, "y": 0, "width": 50, "height": 50, "rectanglelabels": ["square"]}}
    answer = label_studio.json("POST", f"/api/ml/{ml_id}/interactive-annotating",
                               json={"task": tasks[2], "context": {"result": [box]}})
    assert "errors" not in answer, answer
    regions = answer["data"]["result"]  # Label Studio hands the editor the backend's one prediction
    assert regions, answer
    for region in regions:
        mask = rle_to_mask(region["value"]["rle"], region["original_width"], region["original_height"])
        assert region["type"] == "brushlabels" and not mask[30:, :].any() and not mask[:, 40:].any()
    _, truth = square_scene(2, SIZE)
    rows, cols = truth.nonzero()
    point = {"type": "keypointlabels", "is_positive": True, "original_width": SIZE[1], "original_height": SIZE[0],
             "value": {"x": 100 * (cols.mean() + 0.5) / SIZE[1], "y": 100 * (rows.mean() + 0.5) / SIZE[0],
                       "width": 1, "keypointlabels": ["square"]}}
    answer = label_studio.json("POST", f"/api/ml/{ml_id}/interactive-annotating",
                               json={"task": tasks[2], "context": {"result": [point]}})
    assert "errors" not in answer and answer["data"]["result"], answer
    [kept] = answer["data"]["result"]
    assert rle_to_mask(kept["value"]["rle"], SIZE[1], SIZE[0])[int(rows.mean()), int(cols.mean())]
    assert label_studio.predictions(tasks[2]) == []  # smart answers are shown in the editor, never stored


def test_polygon_project_predictions_are_stored(label_studio, live_backend):
    backend = live_backend()
    results = []
    for i in range(2):
        _, mask = square_scene(i, SIZE)
        results.append([{"from_name": "poly", "to_name": "image", "type": "polygonlabels", "original_width": SIZE[1],
                         "original_height": SIZE[0], "value": {"points": points, "polygonlabels": ["square"]}}
                        for points in polygons(mask)])
    _, tasks = _connect(label_studio, backend, POLYGON_XML, results)
    label_studio.json("GET", f"/api/tasks/{tasks[2]}")  # opening the task asks the backend (one click)
    [prediction] = wait_for(lambda: label_studio.predictions(tasks[2]), 60, "the click's prediction")
    assert prediction["result"] and {r["type"] for r in prediction["result"]} == {"polygonlabels"}
    assert all(len(r["value"]["points"]) >= 3 for r in prediction["result"])


def test_a_smart_tool_before_any_example_tells_the_annotator_why(label_studio, live_backend):
    """Label Studio passes on only the status line of a failed answer; the reason rides in its phrase, so the
    editor's error says what to do instead of "422 Client Error: UNPROCESSABLE ENTITY"."""
    backend = live_backend()
    pid, tasks = create_project(label_studio, SMART_XML, [square_scene(0, SIZE)[0]])
    ml = label_studio.json("POST", "/api/ml", json={"url": backend.url, "project": pid, "title": "DiffewS",
                                                     "is_interactive": True})
    box = {"type": "rectanglelabels", "original_width": SIZE[1], "original_height": SIZE[0],
           "value": {"x": 0, "y": 0, "width": 50, "height": 50, "rectanglelabels": ["square"]}}
    answer = label_studio.json("POST", f"/api/ml/{ml['id']}/interactive-annotating",
                               json={"task": tasks[0]["id"], "context": {"result": [box]}})
    [error] = answer["errors"]
    assert error.startswith("422 Client Error: ") and "no usable support examples of 'square' yet" in error, error
    assert "label a few images with it first" in error
