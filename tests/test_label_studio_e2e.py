"""End to end against a real Label Studio 1.23.2: connect, annotate, pre-label in bulk, retrieve predictions."""

from __future__ import annotations

import io
import os
import time

import numpy as np
import pytest
import requests
from PIL import Image

from backend.rle import mask_to_rle, rle_to_mask

from .conftest import CONFIG_XML, square_scene
from .ls_server import LS_BIN, TOKEN, start_backend, start_label_studio, stop

pytestmark = pytest.mark.label_studio

if not LS_BIN.exists():
    if os.environ.get("DIFFEWS_REQUIRE_LABEL_STUDIO"):
        raise RuntimeError(f"{LS_BIN} is missing: run .ci/setup-label-studio.sh")
    pytest.skip(f"Label Studio not installed at {LS_BIN} (run .ci/setup-label-studio.sh)", allow_module_level=True)

SIZES = [(80, 96), (72, 88), (90, 64), (64, 100)]  # (H, W) of the four task images


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """A real Label Studio and this backend (one-command mode) on 127.0.0.1."""
    ls_dir = tmp_path_factory.mktemp("label-studio")
    ls_proc, ls_url = start_label_studio(ls_dir)
    backend_dir = tmp_path_factory.mktemp("backend")
    try:
        backend_proc, backend_url = start_backend(backend_dir, ls_url)
    except Exception:
        stop(ls_proc)
        raise
    yield ls_url, backend_url, backend_dir
    stop(backend_proc)
    stop(ls_proc)


def api(ls_url: str, method: str, path: str, **kwargs) -> requests.Response:
    response = requests.request(method, ls_url + path, headers={"Authorization": f"Token {TOKEN}"}, timeout=120, **kwargs)
    assert response.status_code < 300, f"{method} {path}: {response.status_code} {response.text[:500]}"
    return response


def brush_result(mask: np.ndarray) -> list[dict]:
    h, w = mask.shape
    return [{"from_name": "tag", "to_name": "image", "type": "brushlabels", "original_width": w, "original_height": h,
             "image_rotation": 0, "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": ["square"]}}]


def wait_for(predicate, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def check_prediction(prediction: dict, size: tuple[int, int]) -> None:
    """A stored prediction: our version, brushlabels regions of a config label at the image's size."""
    h, w = size
    assert prediction["model_version"] == "diffews-tiny-r64-untrained"
    assert isinstance(prediction["score"], float)
    for region in prediction["result"]:
        assert region["type"] == "brushlabels" and region["value"]["brushlabels"] == ["square"]
        assert (region["original_width"], region["original_height"]) == (w, h)
        assert rle_to_mask(region["value"]["rle"], w, h).shape == (h, w)


def test_label_studio_end_to_end(servers):
    """Project with BrushLabels, 4 images, 2 annotated; bulk pre-label and Retrieve Predictions store brush masks."""
    ls_url, backend_url, backend_dir = servers
    project = api(ls_url, "POST", "/api/projects", json={"title": "e2e", "label_config": CONFIG_XML}).json()
    pid = project["id"]
    scenes = [square_scene(i, size) for i, size in enumerate(SIZES)]
    files = []
    for i, (image, _) in enumerate(scenes):
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        files.append((f"file{i}", (f"scene{i}.png", buf.getvalue(), "image/png")))
    api(ls_url, "POST", f"/api/projects/{pid}/import", files=files)
    tasks = sorted(api(ls_url, "GET", f"/api/tasks?project={pid}&page_size=100").json()["tasks"], key=lambda t: t["id"])
    assert len(tasks) == 4 and tasks[0]["data"]["image"].startswith("/data/upload/")
    task_size = {t["id"]: SIZES[i] for i, t in enumerate(tasks)}

    # One annotation before the backend is connected (reached by backfill), one after (reached by webhook).
    api(ls_url, "POST", f"/api/tasks/{tasks[0]['id']}/annotations", json={"result": brush_result(scenes[0][1])})
    ml = api(ls_url, "POST", "/api/ml", json={"url": backend_url, "project": pid, "title": "DiffewS"}).json()
    assert ml["model_version"] == "diffews-tiny-r64-untrained"
    api(ls_url, "POST", f"/api/tasks/{tasks[1]['id']}/annotations", json={"result": brush_result(scenes[1][1])})
    wait_for(lambda: requests.get(f"{backend_url}/status/{pid}").json()["examples"].get("square") == 2, 60,
             "both annotations in the support store")

    # Bulk pre-annotation: workers post predictions for the two unlabeled tasks through the API.
    assert requests.post(f"{backend_url}/prelabel/{pid}").status_code == 202
    progress = wait_for(lambda: (p := requests.get(f"{backend_url}/status/{pid}").json()["progress"]).get("done") == 2 and p,
                        120, "bulk pre-annotation")
    assert progress["failed"] == 0 and progress["total"] == 2
    for task in tasks[2:]:
        [prediction] = api(ls_url, "GET", f"/api/predictions?task={task['id']}").json()
        check_prediction(prediction, task_size[task["id"]])

    # Retrieve Predictions in the Data Manager: one synchronous /predict for tasks without one of this version.
    api(ls_url, "POST", f"/api/dm/actions?id=retrieve_tasks_predictions&project={pid}",
        json={"selectedItems": {"all": True, "excluded": []}})
    for task in tasks:
        predictions = api(ls_url, "GET", f"/api/predictions?task={task['id']}").json()
        assert len(predictions) == 1, f"task {task['id']}: {len(predictions)} predictions"
        check_prediction(predictions[0], task_size[task["id"]])
    assert (backend_dir / "projects" / str(pid) / "images").is_dir()  # support images cached from LS with auth
