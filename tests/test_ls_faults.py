"""Label Studio failing while predictions are posted: reported where users look, resumed, never duplicated.

The backend reaches the real Label Studio through FaultyProxy, which answers 500 or 401, stores and then
answers 500, or refuses connections, on demand.
"""

from __future__ import annotations

import pytest
import requests

from bench.synthetic import CONFIG_XML, square_scene
from .ls_proxy import FAIL_401, FAIL_500, STORE_THEN_500, FaultyProxy
from bench.ls_harness import brush_result, create_project, wait_for

pytestmark = pytest.mark.label_studio


@pytest.fixture
def proxy(label_studio):
    made = FaultyProxy(label_studio.url)
    yield made
    made.close()


def _project(label_studio, backend, n_tasks: int = 5) -> tuple[int, list[int]]:
    scenes = [square_scene(i) for i in range(n_tasks)]
    pid, tasks = create_project(label_studio, CONFIG_XML, [image for image, _ in scenes])
    for task, (_, mask) in zip(tasks[:2], scenes):
        label_studio.request("POST", f"/api/tasks/{task['id']}/annotations", json={"result": brush_result(mask)})
    label_studio.request("POST", "/api/ml", json={"url": backend.url, "project": pid, "title": "DiffewS"})
    wait_for(lambda: backend.get(f"/status/{pid}")["examples"].get("square") == 2, 60, "the backfill")
    return pid, [t["id"] for t in tasks[2:]]


def _counts(label_studio, tasks: list[int]) -> list[int]:
    return [len(label_studio.predictions(t)) for t in tasks]


@pytest.mark.parametrize("fault,message", [(FAIL_500, "HTTP 500"), (FAIL_401, "refused LABEL_STUDIO_API_KEY (HTTP 401")],
                         ids=["500", "401"])
def test_failed_posts_are_reported_and_resume_when_label_studio_recovers(label_studio, live_backend, proxy, fault,
                                                                         message):
    """Posting fails: /status shows the failures and why; once Label Studio answers again the retry posts one each."""
    backend = live_backend(label_studio_url=proxy.url, bulk_batch_size=8)
    pid, tasks = _project(label_studio, backend)
    proxy.fault(fault, "POST", "/api/predictions")
    assert requests.post(f"{backend.url}/prelabel/{pid}", timeout=10).status_code == 202
    status = wait_for(lambda: (s := backend.get(f"/status/{pid}"))["progress"].get("failed") == len(tasks) and s, 60,
                      "the failures to be recorded")
    assert message in status["progress"]["last_error"] and set(map(int, status["failures"])) == set(tasks)
    assert _counts(label_studio, tasks) == [0] * len(tasks)
    proxy.accept()  # Label Studio is back
    wait_for(lambda: _counts(label_studio, tasks) == [1] * len(tasks), 90, "the scheduled retry to post them")
    # the worker marks a task done just after Label Studio stores it: give /status that moment
    status = wait_for(lambda: (s := backend.get(f"/status/{pid}"))["failures"] == {} and s, 10,
                      "the failures to be cleared")
    assert status["progress"]["failed"] == 0 and _counts(label_studio, tasks) == [1] * len(tasks)


def test_refused_connections_then_recovery(label_studio, live_backend, proxy):
    """Label Studio unreachable (connection refused) during a batch: retried later, one prediction each."""
    backend = live_backend(label_studio_url=proxy.url, bulk_batch_size=8)
    pid, tasks = _project(label_studio, backend)
    proxy.fault(FAIL_500, "POST", "/api/predictions")  # the listing passes, then every post fails ...
    requests.post(f"{backend.url}/prelabel/{pid}", timeout=10)
    wait_for(lambda: proxy.hits > 0, 60, "the first post")
    proxy.refuse()  # ... and Label Studio goes away entirely
    wait_for(lambda: backend.get(f"/status/{pid}")["progress"].get("failed") == len(tasks), 60, "the failures")
    proxy.accept()
    wait_for(lambda: _counts(label_studio, tasks) == [1] * len(tasks), 90, "the retry after recovery")


def test_stored_but_answered_500_is_not_duplicated(label_studio, live_backend, proxy):
    """Label Studio stores each prediction but answers 500: retries replace it, never add a second one."""
    backend = live_backend(label_studio_url=proxy.url, bulk_batch_size=8)
    pid, tasks = _project(label_studio, backend)
    proxy.fault(STORE_THEN_500, "POST", "/api/predictions")
    requests.post(f"{backend.url}/prelabel/{pid}", timeout=10)
    wait_for(lambda: backend.get(f"/status/{pid}")["progress"].get("failed") == len(tasks), 60,
             "the batch to give up after three tries of the first task")
    assert proxy.upstream_statuses == [201, 201, 201], "\n".join(proxy.paths)  # three posts, each stored, answered 500
    assert _counts(label_studio, tasks)[0] == 1  # ... yet each try deleted the copy of the one before
    proxy.accept()
    wait_for(lambda: backend.get(f"/status/{pid}")["progress"].get("failed") == 0
             and backend.get(f"/status/{pid}")["deliveries"]["delivered"] == len(tasks), 90, "the retry")
    assert _counts(label_studio, tasks) == [1] * len(tasks)


def test_redis_restarted_empty_recovers_from_label_studio(label_studio, live_backend):
    """Redis comes back without its data: the next webhook re-registers the project and the backfill re-reads it."""
    backend = live_backend()
    pid, tasks = _project(label_studio, backend)
    backend.redis.flushall()  # what a restart of a Redis without persistence leaves
    assert requests.get(f"{backend.url}/status/{pid}", timeout=10).status_code == 404
    label_studio.request("POST", f"/api/tasks/{tasks[0]}/annotations", json={"result": brush_result(square_scene(2)[1])})
    status = wait_for(lambda: (s := backend.get(f"/status/{pid}")).get("examples", {}).get("square") == 3 and s, 60,
                      "the project to be re-registered and backfilled")
    assert status["backfill"]["done"] and status["annotation_errors"] == {}
    # Idle workers register again at their next heartbeat (within worker_ttl - 15 s; 5 s here).
    wait_for(lambda: backend.get("/health")["workers"]["predict-high"] == 1, 30, "the click worker to register again")
    label_studio.request("GET", f"/api/tasks/{tasks[1]}")  # a click works again
    assert len(label_studio.predictions(tasks[1])) == 1


def test_download_headers_come_from_the_sdk_token_handling():
    """auth_headers reuses the SDK's private header builder (pinned here): a legacy token is sent as 'Token <key>'."""
    from backend.worker.ls_client import LabelStudioAPI

    api = LabelStudioAPI("http://127.0.0.1:9", "0123456789abcdef")  # not a JWT: no refresh, no network
    assert api.auth_headers() == {"Authorization": "Token 0123456789abcdef"}


def test_a_process_exchanges_its_token_once_per_credential(label_studio, proxy):
    """Clients made for successive jobs share one SDK client: the Personal Access Token is exchanged for an
    access token once, not once per job; a refused credential drops the cached client."""
    from backend.worker.ls_client import LabelStudioAPI, LabelStudioUnavailable

    def job() -> None:
        api = LabelStudioAPI(proxy.url, label_studio.pat)
        api.call("listing projects", lambda: next(iter(api.client.projects.list(page_size=1)), None), retry=False)

    for _ in range(3):
        job()
    refreshes = [p for p in proxy.paths if p.startswith("POST /api/token/refresh")]
    assert len(refreshes) == 1, proxy.paths
    proxy.fault(FAIL_401, "GET", "/api/projects")
    with pytest.raises(LabelStudioUnavailable, match="refused LABEL_STUDIO_API_KEY"):
        job()
    proxy.accept()
    job()
    assert len([p for p in proxy.paths if p.startswith("POST /api/token/refresh")]) == 2
