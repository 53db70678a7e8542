"""Exactly one prediction per (task, model_version) in a real Label Studio, on every delivery path.

The backend runs in-process on a real HTTP port (LiveBackend) with real RQ workers and Redis; Label Studio
1.23.2 calls it as it calls any ML backend, with a Personal Access Token and legacy tokens off.
"""

from __future__ import annotations

import time

import pytest
import requests

from backend.core.ledger import DeliveryLedger

from bench.synthetic import CONFIG_XML, square_scene
from bench.ls_harness import brush_result, create_project, wait_for

pytestmark = pytest.mark.label_studio

VERSION = "diffews-tiny-r64-untrained"
SIZES = [(48, 64), (64, 48), (40, 56), (56, 40), (44, 60), (60, 44), (50, 50), (52, 48)]


class SlowModel:
    """The tiny model, taking `delay` seconds longer to segment (a stand-in for a big GPU batch)."""

    def __init__(self, model, delay: float):
        self._model, self.delay = model, delay

    def __getattr__(self, name):
        return getattr(self._model, name)

    def segment_many_encoded(self, *args, **kwargs):
        time.sleep(self.delay)
        return self._model.segment_many_encoded(*args, **kwargs)


def _project(label_studio, backend, n_tasks: int = 6, labeled: int = 2) -> tuple[int, list[dict], list]:
    """A project of n_tasks images whose first `labeled` are annotated, connected to `backend`."""
    scenes = [square_scene(i, SIZES[i % len(SIZES)]) for i in range(n_tasks)]
    pid, tasks = create_project(label_studio, CONFIG_XML, [image for image, _ in scenes])
    for task, (_, mask) in zip(tasks[:labeled], scenes):
        label_studio.request("POST", f"/api/tasks/{task['id']}/annotations", json={"result": brush_result(mask)})
    label_studio.request("POST", "/api/ml", json={"url": backend.url, "project": pid, "title": "DiffewS"})
    wait_for(lambda: backend.get(f"/status/{pid}")["examples"].get("square") == labeled, 60, "backfilled examples")
    return pid, tasks, scenes


def _ours(label_studio, task_id: int) -> list[dict]:
    return [p for p in label_studio.predictions(task_id) if p["model_version"] == VERSION]


def _open(label_studio, task_id: int) -> None:
    """What opening a task in the labeling view does: GET /api/tasks/<id> (Label Studio calls /predict)."""
    label_studio.request("GET", f"/api/tasks/{task_id}")


def _retrieve(label_studio, pid: int, task_ids: list[int]) -> None:
    """Data Manager: select tasks, Actions -> Retrieve Predictions."""
    label_studio.request("POST", f"/api/dm/actions?id=retrieve_tasks_predictions&project={pid}",
                         json={"selectedItems": {"all": False, "included": task_ids}})


def _prelabel_and_wait(backend, pid: int) -> dict:
    r = requests.post(f"{backend.url}/prelabel/{pid}", timeout=30)
    assert r.status_code == 202, r.text
    job = wait_for(lambda: (j := backend.get(f"/jobs/{r.json()['job']}"))["status"] in ("finished", "failed") and j,
                   60, "the task listing")
    assert job["status"] == "finished", job
    wait_for(lambda: backend.get(f"/status/{pid}")["queues"]["predict-bulk"] == 0
             and backend.get(f"/status/{pid}")["deliveries"]["queued"] == 0
             and backend.get(f"/status/{pid}")["deliveries"]["delivering"] == 0, 120, "bulk jobs to drain")
    return backend.get(f"/status/{pid}")


def _review_views(label_studio, pid: int) -> list[dict]:
    from backend.core.review_view import VIEW_TITLE

    return [v for v in label_studio.json("GET", f"/api/dm/views?project={pid}") if v["data"].get("title") == VIEW_TITLE]


def test_click_retrieve_prelabel_and_label_edit_leave_one_each(label_studio, live_backend):
    """Open two tasks, Retrieve on a selection (bulk), pre-label, edit a label, pre-label again: one each.

    And the review tab: connecting names the ML backend after the version and makes the tab "weakest predictions
    first"; tasks opened afterwards are still predicted; after pre-labeling the tab holds the unlabeled tasks, lowest
    score first; asking again updates the same tab."""
    backend = live_backend(sync_max_tasks=2)
    pid, tasks, scenes = _project(label_studio, backend, n_tasks=7)
    unlabeled = [t["id"] for t in tasks[2:]]
    [view] = wait_for(lambda: _review_views(label_studio, pid), 60, "the review view")
    [ml] = label_studio.json("GET", f"/api/ml?project={pid}")
    assert ml["title"] == VERSION and label_studio.json("GET", f"/api/projects/{pid}")["model_version"] == VERSION
    for tid in unlabeled[:2]:
        _open(label_studio, tid)
        [prediction] = _ours(label_studio, tid)  # returned by /predict and stored by Label Studio itself
        assert prediction["result"] and all(r["type"] == "brushlabels" for r in prediction["result"])
    _retrieve(label_studio, pid, unlabeled[1:4])  # 2 lack one > SYNC_MAX_TASKS: bulk jobs post them
    wait_for(lambda: all(_ours(label_studio, t) for t in unlabeled[2:4]), 60, "bulk predictions of the selection")
    status = _prelabel_and_wait(backend, pid)
    assert status["progress"]["total"] == 1  # only the one task nobody predicted yet
    first = {t: _ours(label_studio, t) for t in unlabeled}
    assert all(len(p) == 1 for p in first.values()), {t: len(p) for t, p in first.items()}
    scores = {t: p[0]["score"] for t, p in first.items()}
    assert len(set(scores.values())) > 2, scores  # an order to check, not ties
    listed = [t["id"] for t in label_studio.json("GET", f"/api/tasks?view={view['id']}&project={pid}")["tasks"]]
    assert sorted(listed) == sorted(unlabeled) and [scores[t] for t in listed] == sorted(scores.values()), (listed, scores)
    assert requests.post(f"{backend.url}/projects/{pid}/review-view", timeout=30).status_code == 202

    # Edit a label: the support set changes, pre-labeling again replaces every stale prediction.
    [annotation] = label_studio.json("GET", f"/api/tasks/{tasks[0]['id']}/annotations")
    revision = backend.get(f"/status/{pid}")["revision"]
    moved = scenes[0][1][::-1].copy()
    label_studio.request("PATCH", f"/api/annotations/{annotation['id']}", json={"result": brush_result(moved)})
    wait_for(lambda: backend.get(f"/status/{pid}")["revision"] > revision, 30, "the edited label")
    status = _prelabel_and_wait(backend, pid)
    assert status["progress"]["total"] == len(unlabeled) and status["progress"]["failed"] == 0
    second = {t: _ours(label_studio, t) for t in unlabeled}
    assert all(len(p) == 1 for p in second.values()), {t: len(p) for t, p in second.items()}
    assert all(second[t][0]["id"] != first[t][0]["id"] for t in unlabeled)  # replaced, not added

    # Retrieve Predictions on everything: Label Studio asks only for what lacks one; nothing is duplicated.
    _retrieve(label_studio, pid, [t["id"] for t in tasks])
    time.sleep(1)
    assert all(len(_ours(label_studio, t["id"])) <= 1 for t in tasks)
    assert all(len(_ours(label_studio, t)) == 1 for t in unlabeled)


@pytest.mark.parametrize("delay", [3.0, 7.0], ids=["done-in-grace", "done-after-web-gave-up"])
def test_click_past_its_deadline_is_posted_once_never_returned(label_studio, live_backend, tiny_model, delay):
    """A click job that outlives PREDICT_WAIT_S: the worker posts it through the API; /predict returns none."""
    backend = live_backend(model=SlowModel(tiny_model, delay), predict_wait_s=1.0)
    pid, tasks, _ = _project(label_studio, backend, n_tasks=3)
    tid = tasks[2]["id"]
    started = time.monotonic()
    _open(label_studio, tid)  # Label Studio gets a 504 and stores nothing from the answer
    assert time.monotonic() - started < 1.0 + 5.0 + 2.0
    [prediction] = wait_for(lambda: _ours(label_studio, tid), 30, "the posted prediction")
    ledger = DeliveryLedger(backend.redis, pid, VERSION)
    # the worker records the delivery just after Label Studio stored the prediction
    entry = wait_for(lambda: (e := ledger.get(tid)) is not None and e.state == "delivered" and e, 10,
                     "the delivery recorded")
    assert (entry.state, entry.via, entry.ls_id) == ("delivered", "posted", prediction["id"])
    _open(label_studio, tid)  # it holds one now: no new /predict
    time.sleep(delay + 1)
    assert len(_ours(label_studio, tid)) == 1


def test_retrieve_twice_while_queued_queues_once(label_studio, live_backend, tiny_model):
    """Retrieve Predictions twice while the first bulk jobs are still queued or running: nothing twice."""
    backend = live_backend(model=SlowModel(tiny_model, 1.0), sync_max_tasks=1, bulk_batch_size=1)
    pid, tasks, _ = _project(label_studio, backend, n_tasks=6)
    unlabeled = [t["id"] for t in tasks[2:]]
    _retrieve(label_studio, pid, unlabeled)
    _retrieve(label_studio, pid, unlabeled)
    progress = backend.get(f"/status/{pid}")["progress"]
    assert progress["total"] == len(unlabeled) and progress["skipped"] == len(unlabeled)
    wait_for(lambda: all(_ours(label_studio, t) for t in unlabeled), 60, "bulk predictions")
    time.sleep(1.5)
    assert [len(_ours(label_studio, t)) for t in unlabeled] == [1] * len(unlabeled)


def test_duplicates_already_in_label_studio_are_collapsed(label_studio, live_backend):
    """Two stored predictions of the version on one task (an older backend's): pre-labeling leaves one."""
    backend = live_backend()
    pid, tasks, _ = _project(label_studio, backend, n_tasks=4)
    tid = tasks[3]["id"]
    for _ in range(2):
        label_studio.request("POST", "/api/predictions",
                             json={"task": tid, "result": [], "score": 0.1, "model_version": VERSION})
    _prelabel_and_wait(backend, pid)
    [kept] = _ours(label_studio, tid)
    assert kept["result"] and len(_ours(label_studio, tasks[2]["id"])) == 1


def test_click_takes_over_a_queued_bulk_task(label_studio, live_backend, tiny_model):
    """Opening a task whose bulk job is still queued answers at once; the bulk job then skips it."""
    backend = live_backend(model=SlowModel(tiny_model, 1.5), sync_max_tasks=1, bulk_batch_size=1)
    pid, tasks, _ = _project(label_studio, backend, n_tasks=6)
    unlabeled = [t["id"] for t in tasks[2:]]
    _retrieve(label_studio, pid, unlabeled)
    last = unlabeled[-1]
    assert DeliveryLedger(backend.redis, pid, VERSION).get(last).state == "queued"
    _open(label_studio, last)
    [prediction] = _ours(label_studio, last)
    assert DeliveryLedger(backend.redis, pid, VERSION).get(last).via == "returned"
    wait_for(lambda: all(_ours(label_studio, t) for t in unlabeled), 60, "bulk predictions")
    time.sleep(2)
    assert [len(_ours(label_studio, t)) for t in unlabeled] == [1] * len(unlabeled)
    assert _ours(label_studio, last)[0]["id"] == prediction["id"]


def test_backfill_reports_a_malformed_annotation_and_runs_once(label_studio, live_backend):
    """One bad annotation among good ones: the good are stored, the bad reported, clicks never re-run it."""
    backend = live_backend()
    scenes = [square_scene(i, SIZES[i]) for i in range(4)]
    pid, tasks = create_project(label_studio, CONFIG_XML, [image for image, _ in scenes])
    bad = brush_result(scenes[1][1])
    bad[0]["original_width"] += 3  # the RLE no longer covers W*H*4 values
    made = [label_studio.json("POST", f"/api/tasks/{tasks[i]['id']}/annotations",
                              json={"result": bad if i == 1 else brush_result(scenes[i][1])}) for i in range(3)]
    label_studio.request("POST", "/api/ml", json={"url": backend.url, "project": pid, "title": "DiffewS"})
    status = wait_for(lambda: (s := backend.get(f"/status/{pid}"))["backfill"]["done"] and s, 60, "the backfill")
    assert status["examples"] == {"square": 2} and status["backfill"]["errors"] == 1
    assert list(status["annotation_errors"]) == [str(made[1]["id"])]
    assert "RLE declares" in status["annotation_errors"][str(made[1]["id"])]
    _open(label_studio, tasks[3]["id"])
    after = backend.get(f"/status/{pid}")
    assert after["backfill"]["at"] == status["backfill"]["at"] and after["revision"] == status["revision"]
    assert len(_ours(label_studio, tasks[3]["id"])) == 1


def test_the_test_button_is_not_counted_as_a_delivery(label_studio, live_backend):
    """Label Studio's Test button (/api/ml/<id>/predict/test) shows a prediction without storing it: the check
    after CONFIRM_RETURNED_S forgets it, so /status counts what Label Studio holds; an opened task stays counted."""
    backend = live_backend(confirm_returned_s=5.0)
    pid, tasks, _ = _project(label_studio, backend, n_tasks=3, labeled=2)
    [ml] = label_studio.json("GET", f"/api/ml?project={pid}")

    def delivered() -> int:
        return backend.get(f"/status/{pid}")["deliveries"]["delivered"]

    def stored() -> int:
        return sum(len(_ours(label_studio, t["id"])) for t in tasks)

    label_studio.request("POST", f"/api/ml/{ml['id']}/predict/test?random=true")
    assert (delivered(), stored()) == (1, 0)  # answered inline, recorded, but Label Studio kept nothing
    wait_for(lambda: delivered() == 0, 60, "the unstored test prediction to leave the ledger")
    unlabeled = tasks[2]["id"]
    _open(label_studio, unlabeled)
    assert (delivered(), stored()) == (1, 1)
    time.sleep(7)  # past CONFIRM_RETURNED_S: the check found it stored and kept it
    assert (delivered(), stored()) == (1, 1)


def test_cancelled_prelabel_posts_nothing_twice_and_the_next_run_completes_it(label_studio, live_backend, tiny_model):
    """DELETE /projects/<id>/prelabel while a batch is being predicted: queued batches are dropped, the running one
    posts, /status says cancelled with counts; pre-labeling again posts the rest, each task ending with one."""
    backend = live_backend(model=SlowModel(tiny_model, 2.0), bulk_batch_size=1)
    pid, tasks, _ = _project(label_studio, backend, n_tasks=7)
    unlabeled = [t["id"] for t in tasks[2:]]
    assert requests.post(f"{backend.url}/projects/{pid}/prelabel", timeout=30).status_code == 202
    ledger = DeliveryLedger(backend.redis, pid, VERSION)
    wait_for(lambda: backend.get(f"/status/{pid}")["progress"].get("total") == len(unlabeled)
             and any(e.state == "delivering" for e in ledger.entries().values()), 60, "the first batch to start")
    answer = requests.delete(f"{backend.url}/projects/{pid}/prelabel", timeout=30).json()
    assert answer["dropped_batches"] == answer["dropped_tasks"] >= 2 and len(answer["running_batches"]) <= 1
    progress = wait_for(lambda: (p := backend.get(f"/status/{pid}")["progress"])["state"] == "cancelled" and p, 60,
                        "the batch in flight to finish")
    assert progress["cancelled"] == answer["dropped_tasks"]
    assert progress["done"] + progress["cancelled"] == len(unlabeled) and progress["failed"] == 0
    counts = [len(_ours(label_studio, t)) for t in unlabeled]
    assert sorted(counts) == [0] * progress["cancelled"] + [1] * progress["done"]
    status = _prelabel_and_wait(backend, pid)
    assert status["progress"]["total"] == answer["dropped_tasks"] and status["progress"]["state"] == "finished"
    assert [len(_ours(label_studio, t)) for t in unlabeled] == [1] * len(unlabeled)

