"""The HTTP protocol: every route, its errors, and predictions through a real worker."""

from __future__ import annotations

import time

import pytest
from rq import Queue

from backend.core.rle import rle_to_mask

from .waits import wait_idle
from bench.synthetic import CONFIG_XML, annotation_event, png_data_uri, square_scene

SETUP = {"project": "1.1795549122", "schema": CONFIG_XML, "hostname": "http://localhost:8080",
         "access_token": "abc", "extra_params": None}


def _setup(client) -> dict:
    response = client.post("/setup", json=SETUP)
    assert response.status_code == 200, response.json
    return response.json


def test_health_reports_tiny_model_and_redis(client):
    """/health answers without the model: tiny and untrained, said plainly; Redis ok; no worker is DEGRADED."""
    body = client.get("/health").json
    assert body["status"] == "DEGRADED" and body["model_class"] == "DiffewS" and body["redis"] == "ok"
    assert set(body["queues_without_workers"]) == set(body["workers"]) and "no live worker on queue" in body["warnings"][0]
    assert body["model"]["spec"] == "tiny" and body["model"]["trained"] is False
    assert "untrained on real pictures" in body["model"]["warning"]
    assert body["model"]["version"] == "diffews-tiny-r64-untrained"


def test_health_is_up_with_a_worker_on_every_queue(client, worker):
    """With a live worker on every queue /health says UP and names no idle queue."""
    body = client.get("/health").json
    assert body["status"] == "UP" and body["queues_without_workers"] == [] and not any(
        "no live worker" in w for w in body["warnings"])


def test_setup_returns_string_version_and_registers(client):
    """/setup answers a non-empty string model_version and remembers the project."""
    body = _setup(client)
    assert body["model_version"] == "diffews-tiny-r64-untrained"
    status = client.get("/status/1").json
    assert status["project"] == 1 and status["examples"] == {} and status["revision"] == 0
    assert client.get("/versions").json == {"versions": ["diffews-tiny-r64-untrained"]}


@pytest.mark.parametrize(
    "payload,status,message",
    [
        ("not json", 400, "JSON object"),
        ({**SETUP, "schema": "<View><Image name='i' value='$x'/></View>"}, 400, "no <BrushLabels>"),
        ({**SETUP, "project": "abc"}, 400, "project must be"),
        ({**SETUP, "schema": "<View"}, 400, "not valid XML"),
    ],
    ids=["malformed-json", "no-brush", "bad-project", "bad-xml"],
)
def test_setup_bad_input(client, payload, status, message):
    """Malformed /setup bodies get a 4xx naming what was wrong."""
    kwargs = {"data": payload, "content_type": "application/json"} if isinstance(payload, str) else {"json": payload}
    response = client.post("/setup", **kwargs)
    assert response.status_code == status and message in response.json["error"]


def test_webhook_stores_replaces_and_removes(client, worker, settings):
    """Created, updated, cancelled and deleted annotations add, replace and remove support examples."""
    _setup(client)
    image, mask = square_scene(0)
    r = client.post("/webhook", json=annotation_event(10, 100, image, mask))
    assert r.status_code == 200 and r.json["stored"] == 1 and r.json["revision"] == 1
    r = client.post("/webhook", json=annotation_event(11, 101, *square_scene(1), label="other"))
    wait_idle(client)
    assert client.get("/status/1").json["examples"] == {"square": 1, "other": 1}
    assert any((settings.model_dir / "projects" / "1" / "masks").iterdir())  # ingestion cached masks on disk
    r = client.post("/webhook", json=annotation_event(11, 101, *square_scene(1), action="ANNOTATION_UPDATED"))
    assert client.get("/status/1").json["examples"] == {"square": 2}
    r = client.post("/webhook", json=annotation_event(11, 101, *square_scene(1), action="ANNOTATION_UPDATED", cancelled=True))
    assert r.json["removed"] == 1 and client.get("/status/1").json["examples"] == {"square": 1}
    r = client.post("/webhook", json={"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 10}], "project": {"id": 1}})
    assert r.json["removed"] == 1 and client.get("/status/1").json["examples"] == {}


def test_webhook_bulk_created(client):
    """ANNOTATIONS_CREATED pairs each annotation with its task from the lists."""
    _setup(client)
    events = [annotation_event(20 + i, 200 + i, *square_scene(i)) for i in range(3)]
    payload = {"action": "ANNOTATIONS_CREATED", "annotation": [e["annotation"] for e in events],
               "task": [e["task"] for e in events], "project": events[0]["project"]}
    r = client.post("/webhook", json=payload)
    assert r.status_code == 200 and r.json["stored"] == 3


def test_webhook_errors_keep_what_is_stored(client):
    """Unknown project 404, RLE of the wrong length 400, and the stored example survives both."""
    _setup(client)
    image, mask = square_scene(0)
    assert client.post("/webhook", json=annotation_event(10, 100, image, mask)).status_code == 200
    bad = annotation_event(10, 100, image, mask, action="ANNOTATION_UPDATED")
    bad["annotation"]["result"][0]["original_width"] += 1
    r = client.post("/webhook", json=bad)
    assert r.status_code == 400 and "RLE declares" in r.json["error"]
    other = annotation_event(12, 102, image, mask, project=7)
    del other["project"]["label_config"]  # nothing to register it from
    r = client.post("/webhook", json=other)
    assert r.status_code == 404 and "unknown project 7" in r.json["error"]
    assert client.get("/status/1").json["examples"] == {"square": 1}
    assert client.post("/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 1}}).json["status"] == "ignored"
    assert client.post("/webhook", json={"project": 1}).status_code == 400


def test_predict_end_to_end_with_worker(client, worker):
    """Two labeled images -> /predict returns brush regions at the image's size, with scores and version."""
    _setup(client)
    for i in range(2):
        client.post("/webhook", json=annotation_event(10 + i, 100 + i, *square_scene(i)))
    query, _ = square_scene(5, (70, 50))
    r = client.post("/predict", json={"tasks": [{"id": 300, "data": {"image": png_data_uri(query)}}],
                                      "project": "1.1795549122", "label_config": CONFIG_XML, "params": {"context": None}})
    assert r.status_code == 200, r.json
    [prediction] = r.json["results"]
    assert prediction["model_version"] == "diffews-tiny-r64-untrained"
    assert 0.0 <= prediction["score"] <= 1.0
    assert prediction["result"], "the square was found"
    for region in prediction["result"]:
        assert region["type"] == "brushlabels" and region["value"]["brushlabels"] == ["square"]
        assert (region["original_width"], region["original_height"]) == (50, 70)
        assert region["from_name"] == "tag" and region["to_name"] == "image"
        assert rle_to_mask(region["value"]["rle"], 50, 70).any()
        assert prediction["score"] <= region["score"]


def test_predict_errors(client, worker):
    """Bad tasks, an undecodable image and no support examples each get a 4xx saying so."""
    _setup(client)
    base = {"project": "1.1", "label_config": CONFIG_XML}
    assert client.post("/predict", json={**base, "tasks": []}).status_code == 400
    r = client.post("/predict", json={**base, "tasks": [{"id": 1, "data": {"image": png_data_uri(square_scene(0)[0])}}]})
    assert r.status_code == 422 and "no support examples" in r.json["error"]
    client.post("/webhook", json=annotation_event(10, 100, *square_scene(0)))
    r = client.post("/predict", json={**base, "tasks": [{"id": 1, "data": {"image": "data:image/png;base64,aGVsbG8="}}]})
    assert r.status_code == 422 and "task 1" in r.json["error"] and "not a decodable image" in r.json["error"]
    r = client.post("/predict", json={**base, "tasks": [{"id": 2, "data": {"image": "file:///etc/passwd"}}]})
    assert r.status_code == 422 and "unsupported URL scheme" in r.json["error"]
    r = client.post("/predict", json={**base, "label_config": "<View/>", "tasks": [{"id": 1}]})
    assert r.status_code == 400 and "BrushLabels" in r.json["error"]


def test_predict_without_worker_says_so(client):
    """With no worker on predict-high, /predict answers 503 naming the command to start one."""
    _setup(client)
    r = client.post("/predict", json={"project": "1.1", "label_config": CONFIG_XML, "tasks": [{"id": 1, "data": {}}]})
    assert r.status_code == 503 and "python -m backend worker" in r.json["error"]


def test_large_predict_is_queued_not_left_empty(client, redis, settings):
    """More than SYNC_MAX_TASKS tasks: 202 with an empty list per task (LS stores nothing) and bulk jobs queued."""
    _setup(client)
    tasks = [{"id": i, "data": {"image": f"/data/upload/1/{i}.png"}} for i in range(5)]
    r = client.post("/predict", json={"project": "1.1", "label_config": CONFIG_XML, "tasks": tasks})
    assert r.status_code == 202 and r.json["results"] == [[]] * 5 and r.json["queued_tasks"] == 5
    assert len(r.json["jobs"]) == 3 and Queue("predict-bulk", connection=redis).count == 3
    assert client.get("/status/1").json["progress"]["total"] == 5


def test_basic_auth(redis, tmp_path):
    """With BASIC_AUTH_*, wrong credentials get 401 everywhere but /health."""
    from backend.web.app import create_app
    from backend.core.settings import Settings

    app = create_app(Settings(model_dir=tmp_path, basic_auth_user="u", basic_auth_pass="p"), redis)
    client = app.test_client()
    assert client.get("/health").status_code == 200
    r = client.post("/setup", json=SETUP, headers={"Authorization": "Basic dTp3cm9uZw=="})  # u:wrong
    assert r.status_code == 401 and "basic auth" in r.json["error"]
    assert client.post("/setup", json=SETUP).status_code == 401
    assert client.post("/setup", json=SETUP, headers={"Authorization": "Basic dTpw"}).status_code == 200  # u:p


def test_redis_down(tmp_path):
    """Redis unreachable: /health says so (200, DEGRADED), other routes answer 503 with a message."""
    from redis import Redis

    from backend.web.app import create_app
    from backend.core.settings import Settings

    dead = Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    client = create_app(Settings(model_dir=tmp_path, redis_url="redis://127.0.0.1:1"), dead).test_client()
    body = client.get("/health").json
    assert body["status"] == "DEGRADED" and body["redis"].startswith("unavailable")
    r = client.post("/setup", json=SETUP)
    assert r.status_code == 503 and "Redis" in r.json["error"]
    assert client.get("/status/1").status_code == 503


def test_failed_job_is_visible_and_retryable(client, redis, worker):
    """A job that fails in the worker shows as failed with its error, and POST /jobs/<id>/retry requeues it."""
    from backend.core.queues import enqueue

    # The CLI's pre-label job for a project this backend never saw, without the catalog's retries.
    job = enqueue(redis, "ingest", "backend.worker.bulk_jobs.prelabel_request", args=(99,), timeout_s=60)
    deadline = time.monotonic() + 20
    while job.get_status() != "failed" and time.monotonic() < deadline:
        time.sleep(0.05)
    info = client.get(f"/jobs/{job.id}").json
    assert info["status"] == "failed" and "label config is empty" in info["error"][0]
    r = client.post(f"/jobs/{job.id}/retry")
    assert r.status_code == 202 and r.json["status"] == "queued"
    assert client.get("/jobs/nope").status_code == 404
    assert client.post("/jobs/nope/retry").status_code == 404


def test_unknown_route_and_method(client):
    """Unknown routes and methods answer JSON errors."""
    assert client.get("/nope").json["error"].startswith("no route")
    assert client.get("/predict").status_code == 405


def test_gunicorn_entry_requires_redis_url():
    """`gunicorn _wsgi:app` without REDIS_URL refuses to start, saying why."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    out = subprocess.run([sys.executable, "-c", "import _wsgi"], capture_output=True, text=True, env=env)
    assert out.returncode != 0 and "gunicorn needs REDIS_URL" in out.stderr


def test_unchanged_annotation_keeps_the_revision(client):
    """Label Studio re-sending an annotation as it is (an update with no change) bumps no revision."""
    _setup(client)
    image, mask = square_scene(0)
    assert client.post("/webhook", json=annotation_event(10, 100, image, mask)).json["revision"] == 1
    again = client.post("/webhook", json=annotation_event(10, 100, image, mask, action="ANNOTATION_UPDATED")).json
    assert again["revision"] == 1 and again["unchanged"] == 1 and again["stored"] == 0
    changed = client.post("/webhook", json=annotation_event(10, 100, image, ~mask, action="ANNOTATION_UPDATED")).json
    assert changed["revision"] == 2 and changed["stored"] == 1


def test_bulk_event_with_a_bad_annotation_stores_the_rest(client):
    """ANNOTATIONS_CREATED with one malformed annotation: the others are stored, the bad one is reported."""
    _setup(client)
    events = [annotation_event(20 + i, 200 + i, *square_scene(i)) for i in range(3)]
    events[1]["annotation"]["result"][0]["value"]["rle"] = events[1]["annotation"]["result"][0]["value"]["rle"][:2]
    payload = {"action": "ANNOTATIONS_CREATED", "annotation": [e["annotation"] for e in events],
               "task": [e["task"] for e in events], "project": events[0]["project"]}
    r = client.post("/webhook", json=payload)
    assert r.status_code == 200 and r.json["stored"] == 2 and list(r.json["errors"]) == ["21"]
    status = client.get("/status/1").json
    assert status["examples"] == {"square": 2} and "21" in status["annotation_errors"]
    fixed = annotation_event(21, 201, *square_scene(1), action="ANNOTATION_UPDATED")
    assert client.post("/webhook", json=fixed).json["stored"] == 1
    assert client.get("/status/1").json["annotation_errors"] == {}


def test_status_says_why_there_is_no_backfill(client):
    """Without Label Studio API access, /status says the backfill cannot run and what to set."""
    client.post("/setup", json={**SETUP, "hostname": "", "access_token": ""})
    backfill = client.get("/status/1").json["backfill"]
    assert backfill["done"] is False and "LABEL_STUDIO_API_KEY" in backfill["reason"]


def test_cli_refuses_to_start_a_second_embedded_redis(tmp_path, monkeypatch, capsys):
    """`python -m backend status` with no REDIS_URL and no running backend under MODEL_DIR: exit 2, saying what to set."""
    from backend.__main__ import main

    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("MODEL_DIR", str(tmp_path))
    for command in (["status", "--project", "1"], ["prelabel", "--project", "1"], ["pin", "--project", "1", "--version", "none"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert f"MODEL_DIR={tmp_path}" in err and "REDIS_URL" in err
    assert not (tmp_path / "redis").exists()


def test_cli_joins_the_running_backends_embedded_redis(tmp_path, monkeypatch, capsys):
    """With a backend's embedded Redis running under MODEL_DIR, the CLI uses it (same projects)."""
    import json

    from backend.__main__ import main
    from backend.core.queues import connect, stop_embedded
    from backend.core.settings import Settings
    from backend.core.store import SupportStore

    settings = Settings(model_dir=tmp_path)
    SupportStore(connect(settings), tmp_path).register_project(3, CONFIG_XML)
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("MODEL_DIR", str(tmp_path))
    try:
        assert main(["status", "--project", "3"]) == 0
        assert json.loads(capsys.readouterr().out)["revision"] == 0
    finally:
        stop_embedded()
    assert main(["status", "--project", "3"]) == 2  # stopped: nothing to join, and nothing started


def test_error_messages_ride_in_the_status_line(client):
    """4xx answers carry their message as the HTTP reason phrase too (Label Studio shows only the status line),
    reduced to one line of printable ASCII and bounded."""
    from backend.web.app import reason_phrase

    r = client.get("/jobs/a.b")
    assert r.status_code == 400 and r.status.split(" ", 1)[1] == reason_phrase(r.json["error"])
    assert reason_phrase("caf\u00e9\nline two\r") == "caf  line two"
    assert len(reason_phrase("x" * 1000)) == 300 and reason_phrase("x" * 1000).endswith("...")
    assert reason_phrase("\n") == "error"


def test_a_task_holding_a_prediction_is_answered_with_it(client, worker):
    """A task that already holds a prediction of the current version (Label Studio's Test button sends one) is
    answered with that prediction rather than an empty one, and nothing is predicted or recorded again."""
    _setup(client)
    client.post("/webhook", json=annotation_event(10, 100, *square_scene(0)))
    held = {"id": 77, "model_version": "diffews-tiny-r64-untrained", "score": 0.42,
            "result": [{"type": "brushlabels", "from_name": "tag", "to_name": "image", "value": {"brushlabels": ["square"]}}]}
    task = {"id": 300, "data": {"image": png_data_uri(square_scene(5)[0])}, "predictions": [held]}
    r = client.post("/predict", json={"tasks": [task], "project": "1.1795549122", "label_config": CONFIG_XML})
    assert r.status_code == 200, r.json
    assert r.json["results"] == [{"result": held["result"], "score": 0.42, "model_version": held["model_version"]}]
    assert r.json["skipped"] == {"300": "Label Studio holds a prediction of this version"}
    assert client.get("/status/1").json["deliveries"]["delivered"] == 0
