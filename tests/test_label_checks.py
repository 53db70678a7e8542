"""Checks of human labels: a wrong annotation ranks first by the matcher's leave-one-out disagreement, and the
backend runs, stores and pages the check (web and CLI)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import requests

from backend.__main__ import main as backend_main
from model.data import make_sample
from model.errors import InvalidInputError
from model.label_checks import check_labels, ranking_auroc
from model.matcher import Matcher

from bench.synthetic import annotation_event, square_scene

SIZE = (96, 128)


@pytest.fixture(scope="module")
def matcher() -> Matcher:
    return Matcher.from_pretrained("effnet-lite0", resolution=64)


def _wrong(seed: int) -> np.ndarray:
    """The square's mask moved to the opposite corner (a shifted annotation that misses the square)."""
    _, mask = square_scene(seed, SIZE)
    return np.roll(mask, (SIZE[0] // 2, SIZE[1] // 2), axis=(0, 1)) & ~mask


def test_the_wrong_annotation_ranks_first(matcher):
    """Five right squares and one annotation off the square: the off one has the lowest IoU and ranks first, with a
    region around where they disagree; every annotation is checked once with other samples as supports."""
    samples = []
    for seed in range(6):
        image, mask = square_scene(seed, SIZE)
        samples.append(make_sample(image, {"square": _wrong(seed) if seed == 3 else mask}, 64))
    seen = []
    checks = check_labels(matcher, samples, shots=3, on_sample=lambda done, total: seen.append((done, total)))
    assert [c.index for c in checks][0] == 3 and sorted(c.index for c in checks) == list(range(6))
    assert checks[0].iou < 0.2 and checks[0].suspicion > 0.3 > max(c.suspicion for c in checks[1:])
    assert checks[0].region is not None and all(3 not in c.supports or c.index != 3 for c in checks)
    assert all(len(c.supports) == 3 and c.index not in c.supports for c in checks)
    assert seen[-1] == (6, 6)
    random_pick = check_labels(matcher, samples, shots=3, choose="random", seed=1)
    assert random_pick[0].index == 3


def test_bad_arguments_are_refused(matcher):
    image, mask = square_scene(0, SIZE)
    sample = make_sample(image, {"square": mask}, 64)
    with pytest.raises(InvalidInputError, match="shots must be at least 1"):
        check_labels(matcher, [sample, sample], shots=0)
    with pytest.raises(InvalidInputError, match="choose must be"):
        check_labels(matcher, [sample, sample], choose="best")
    with pytest.raises(InvalidInputError, match="working resolution 64"):
        check_labels(matcher, [make_sample(image, {"square": mask}, 32)] * 2)
    assert check_labels(matcher, [sample]) == []  # nothing to compare a lone annotation with


def test_ranking_auroc():
    assert ranking_auroc([0.9, 0.8, 0.1, 0.2], [True, True, False, False]) == 1.0
    assert ranking_auroc([0.5, 0.5], [True, False]) == 0.5
    assert np.isnan(ranking_auroc([0.1, 0.2], [True, True]))


@pytest.fixture
def checking_client(settings, redis, matcher):
    """The app and a worker on all queues serving the matcher at 64 px."""
    from backend.web.app import create_app

    from .conftest import serving

    on = settings.replace(model_spec="", matcher_resolution=64, max_shots=3)
    with serving(on, redis, matcher):
        yield create_app(on, redis).test_client()


def _finish(client, job_id: str) -> dict:
    deadline = time.monotonic() + 120
    while (state := client.get(f"/jobs/{job_id}").json)["status"] not in ("finished", "failed"):
        assert time.monotonic() < deadline, state
        time.sleep(0.2)
    return state


def test_label_checks_endpoint_queues_stores_and_pages(checking_client, redis, settings, monkeypatch, capsys):
    """The first GET queues a check (202); once done the report lists the wrong annotation first with its task and
    region; a second GET at the same revision queues nothing; a new example makes the report stale; the CLI runs a
    check and prints the table, the wrong annotation first."""
    client = checking_client
    assert client.post("/setup", json={"project": "1.1", "schema": annotation_event(1, 1, *square_scene(0))["project"]
                                       ["label_config"]}).status_code == 200
    for seed in range(5):
        image, mask = square_scene(seed, SIZE)
        client.post("/webhook", json=annotation_event(10 + seed, 100 + seed, image, _wrong(seed) if seed == 2 else mask))
    first = client.get("/projects/1/label-checks")
    assert first.status_code == 202 and first.json["status"] == "checking" and first.json["queued"] is True
    again = client.get("/projects/1/label-checks")
    assert again.json["job"] == first.json["job"] and again.json["queued"] is False  # one check at a time
    done = _finish(client, first.json["job"])
    assert done["status"] == "finished" and done["result"]["checked"] == 5  # the job's return value, as JSON
    ready = client.get("/projects/1/label-checks?limit=2")
    assert ready.status_code == 200 and ready.json["status"] == "ready" and not ready.json["stale"]
    assert "job" not in ready.json and ready.json["total"] == 5 and len(ready.json["checks"]) == 2
    top = ready.json["checks"][0]
    assert (top["annotation_id"], top["task_id"], top["label"]) == (12, 102, "square")
    assert top["iou"] < 0.2 and set(top["region"]) == {"x", "y", "width", "height"}
    assert ready.json["report"]["suspicious"] >= 1
    image, mask = square_scene(9, SIZE)
    client.post("/webhook", json=annotation_event(30, 130, image, mask))
    stale = client.get("/projects/1/label-checks")
    assert stale.status_code == 200 and stale.json["stale"] and stale.json["queued"]
    assert client.get("/projects/1/label-checks?limit=0").status_code == 400
    assert client.get("/projects/2/label-checks").status_code == 404
    _finish(client, stale.json["job"])
    monkeypatch.setenv("REDIS_URL", f"unix://{redis.socket_file}")
    monkeypatch.setenv("MODEL_DIR", str(settings.model_dir))
    assert backend_main(["check-labels", "--project", "1", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "6 masks of 6 labeled images checked" in out, out
    table = out.split("region (% of image)\n")[1].splitlines()
    assert len(table) == 3 and table[0].split()[:3] == ["12", "102", "square"], out
    assert backend_main(["check-labels", "--project", "5"]) == 2  # no such project: one line, exit status 2


def test_too_few_labeled_images_fail_the_check_saying_why(checking_client):
    client = checking_client
    client.post("/webhook", json=annotation_event(10, 100, *square_scene(0, SIZE)))
    job = client.get("/projects/1/label-checks").json["job"]
    state = _finish(client, job)
    assert state["status"] == "failed" and "checks need at least 3" in state["error"][0]


def test_suspicious_annotations_are_held_until_confirmed(settings, redis, matcher):
    """HOLD_SUSPICIOUS_LABELS: the check holds the wrong annotation (out of the support index and training, still
    stored); confirming releases it for good; a later check does not hold it again; an edit clears the confirmation."""
    from backend.core.store import SupportStore
    from backend.web.app import create_app

    from .conftest import serving

    on = settings.replace(model_spec="", matcher_resolution=64, max_shots=3, hold_suspicious_labels=True)
    with serving(on, redis, matcher):
        client = create_app(on, redis).test_client()
        for seed in range(5):
            image, mask = square_scene(seed, SIZE)
            client.post("/webhook", json=annotation_event(10 + seed, 100 + seed, image, _wrong(seed) if seed == 2 else mask))
        store = SupportStore(redis, on.model_dir)
        revision = store.revision(1)
        _finish(client, client.get("/projects/1/label-checks").json["job"])
        report = client.get("/projects/1/label-checks").json["report"]
        assert report["held"] == [12] and store.held(1) == {12} and store.revision(1) > revision
        status = client.get("/status/1").json
        assert status["held_examples"] == [12] and status["examples"] == {"square": 4}
        assert 12 in store.annotation_ids(1) and 12 not in {e.annotation_id for e in store.select(1, "square", 9, "newest")}
        assert client.post("/projects/1/label-checks/12/confirm").json == {"confirmed": 12, "held": []}
        assert client.get("/status/1").json["examples"] == {"square": 5}
        assert client.post("/projects/1/label-checks/99/confirm").status_code == 404
        assert client.post("/projects/7/label-checks/12/confirm").status_code == 404
        _finish(client, client.get("/projects/1/label-checks?refresh=1").json["job"])
        assert client.get("/projects/1/label-checks").json["report"]["held"] == [] and store.held(1) == set()
        image, _ = square_scene(2, SIZE)
        client.post("/webhook", json=annotation_event(12, 102, image, _wrong(2)[::-1].copy(), action="ANNOTATION_UPDATED"))
        assert store.confirmed(1) == set()  # edited: a later check may hold it again


def test_suspicious_and_check_view_data():
    from backend.core.label_checks import suspicious_tasks
    from backend.core.review_view import CHECK_VIEW_MAX_TASKS, check_view_data

    report = {"checks": [{"task_id": 7, "suspicion": 0.5}, {"task_id": 3, "suspicion": 0.9},
                         {"task_id": 7, "suspicion": 0.95}, {"task_id": 4, "suspicion": 0.1}]}
    assert suspicious_tasks(report) == [7, 3]  # each task once, the most suspicious first; 4 is below the bar
    items = check_view_data([7, 3])["filters"]["items"]
    assert [i["value"] for i in items] == [7, 3] and {i["operator"] for i in items} == {"equal"}
    assert [i["value"] for i in check_view_data([])["filters"]["items"]] == [0]  # matches no task (ids start at 1)
    assert len(check_view_data(list(range(1, 500)))["filters"]["items"]) == CHECK_VIEW_MAX_TASKS


@pytest.mark.label_studio
def test_label_check_tab_in_label_studio_lists_the_suspicious_tasks(label_studio, live_backend, matcher):
    """Against the real Label Studio: a check of five labels, one off its square, makes the tab "DiffewS: labels to
    re-check" list exactly the tasks the report calls suspicious (the wrong one among them); a later report with
    nothing suspicious, applied on request, empties the same tab."""
    from backend.core.label_checks import save_report, stored_report, suspicious_tasks
    from backend.core.review_view import CHECK_VIEW_TITLE

    from bench.ls_harness import brush_result, create_project, wait_for
    from bench.synthetic import CONFIG_XML

    backend = live_backend(model=matcher, model_spec="", matcher_resolution=64, max_shots=3)
    scenes = [square_scene(seed, SIZE) for seed in range(6)]
    pid, tasks = create_project(label_studio, CONFIG_XML, [image for image, _ in scenes])
    for seed, (task, (_, mask)) in enumerate(zip(tasks[:5], scenes)):
        label_studio.request("POST", f"/api/tasks/{task['id']}/annotations",
                             json={"result": brush_result(_wrong(seed) if seed == 2 else mask)})
    label_studio.request("POST", "/api/ml", json={"url": backend.url, "project": pid, "title": "DiffewS"})
    wait_for(lambda: backend.get(f"/status/{pid}")["examples"].get("square") == 5, 60, "backfilled examples")

    def tab() -> list[dict]:
        return [v for v in label_studio.json("GET", f"/api/dm/views?project={pid}") if v["data"].get("title") == CHECK_VIEW_TITLE]

    def listed(view: dict) -> list[int]:
        return [t["id"] for t in label_studio.json("GET", f"/api/tasks?view={view['id']}&project={pid}")["tasks"]]

    job = requests.get(f"{backend.url}/projects/{pid}/label-checks", timeout=30).json()["job"]
    done = wait_for(lambda: (j := backend.get(f"/jobs/{job}"))["status"] in ("finished", "failed") and j, 120, "the check")
    assert done["status"] == "finished" and done["result"]["checked"] == 5, done
    suspects = suspicious_tasks(stored_report(backend.redis, pid))
    assert tasks[2]["id"] in suspects and len(suspects) < 5, suspects
    [view] = tab()
    assert done["result"]["check_view"] == view["id"] and done["result"]["check_view_tasks"] == len(suspects)
    assert sorted(listed(view)) == sorted(suspects)

    save_report(backend.redis, pid, {**stored_report(backend.redis, pid), "checks": []})
    job = requests.post(f"{backend.url}/projects/{pid}/review-view", timeout=30).json()["job"]
    done = wait_for(lambda: (j := backend.get(f"/jobs/{job}"))["status"] in ("finished", "failed") and j, 60, "the views")
    assert done["status"] == "finished" and done["result"]["check_view_action"] == "updated", done
    assert [v["id"] for v in tab()] == [view["id"]] and listed(view) == []


def test_a_check_whose_tab_cannot_be_made_still_stores_its_report(settings, redis, matcher):
    """Label Studio unreachable when the check ends: the report is stored and the job says why the tab was not made."""
    from backend.web.app import create_app

    from .conftest import serving
    from bench.ls_harness import free_port

    on = settings.replace(model_spec="", matcher_resolution=64, max_shots=3,
                          label_studio_url=f"http://127.0.0.1:{free_port()}", label_studio_api_key="a-legacy-token")
    with serving(on, redis, matcher):
        client = create_app(on, redis).test_client()
        for seed in range(3):
            client.post("/webhook", json=annotation_event(10 + seed, 100 + seed, *square_scene(seed, SIZE)))
        done = _finish(client, client.get("/projects/1/label-checks").json["job"])
        assert done["status"] == "finished" and "check_view" not in done["result"], done
        assert "Label Studio at http://127.0.0.1" in done["result"]["check_view_error"]
        assert client.get("/projects/1/label-checks").json["report"]["checked"] == 3
