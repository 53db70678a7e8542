"""Credentials go only where they belong; basic auth reaches Label Studio's webhook; Redis exposure is warned about."""

from __future__ import annotations

import base64
import http.server
import io
import threading

import pytest
import requests
from PIL import Image

from bench.synthetic import CONFIG_XML, annotation_event, square_scene
from bench.ls_harness import brush_result, create_project, wait_for


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(square_scene(3)[0]).save(buf, format="PNG")
    return buf.getvalue()


class Recorder:
    """An HTTP server on 127.0.0.1 that serves a PNG for any path and records each request's Authorization."""

    def __init__(self):
        self.seen: list[tuple[str, str | None]] = []
        body, seen = _png(), self.seen

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                seen.append((self.path, self.headers.get("Authorization")))
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.fixture
def hosts():
    made = [Recorder(), Recorder()]
    yield made
    for host in made:
        host.close()


def _predict_upload(client) -> requests.Response:
    """Two support examples (data URIs), then a click on a task whose image lives in Label Studio."""
    for i in range(2):
        client.post("/webhook", json=annotation_event(10 + i, 100 + i, *square_scene(i)))
    return client.post("/predict", json={"project": "1.1", "label_config": CONFIG_XML,
                                         "tasks": [{"id": 7, "data": {"image": "/data/upload/1/a.png"}}]})


def test_configured_label_studio_wins_over_setup_hostname(redis, settings, tiny_model, hosts, worker):
    """LABEL_STUDIO_URL set: /setup's hostname and token are not kept, the key never leaves for that host."""

    from backend.web.app import create_app
    from backend.worker.runtime import get_context

    ls, attacker = hosts
    configured = settings.replace(label_studio_url=ls.url, label_studio_api_key="key-of-ls")
    get_context().settings = configured
    client = create_app(configured, redis).test_client()
    client.post("/setup", json={"project": "1.1", "schema": CONFIG_XML, "hostname": attacker.url, "access_token": "t"})
    assert "hostname" not in client.get("/status/1").json and client.get("/status/1").json["label_studio_api"] == ls.url
    assert _predict_upload(client).status_code == 200
    assert attacker.seen == [] and ("/data/upload/1/a.png", "Token key-of-ls") in ls.seen
    assert {auth for _, auth in ls.seen} == {"Token key-of-ls"}


def test_setup_cannot_move_a_known_project_to_another_host(client, worker, hosts, caplog):
    """Without LABEL_STUDIO_URL: the first /setup's host is kept; a later one naming another host is ignored."""
    ls, attacker = hosts
    client.post("/setup", json={"project": "1.1", "schema": CONFIG_XML, "hostname": ls.url, "access_token": "tok-ls"})
    client.post("/setup", json={"project": "1.1", "schema": CONFIG_XML, "hostname": attacker.url,
                                "access_token": "tok-attacker"})
    assert "ignored" in caplog.text and attacker.url in caplog.text
    assert client.get("/status/1").json["label_studio_api"] == ls.url
    assert _predict_upload(client).status_code == 200
    assert attacker.seen == [] and ("/data/upload/1/a.png", "Token tok-ls") in ls.seen
    assert {auth for _, auth in ls.seen} == {"Token tok-ls"}


def test_rejected_webhooks_are_counted_in_health(redis, tmp_path):
    """With basic auth on, webhooks without it get 401 and /health counts them with the fix."""
    from backend.web.app import create_app
    from backend.core.settings import Settings

    client = create_app(Settings(model_dir=tmp_path, basic_auth_user="u", basic_auth_pass="p"), redis).test_client()
    assert client.post("/webhook", json={"action": "ANNOTATION_CREATED"}).status_code == 401
    rejected = client.get("/health").json["rejected_webhooks"]
    assert rejected["count"] == 1 and "Authorization: Basic" in rejected["fix"]


def test_health_warns_about_a_redis_without_persistence(client, redis):
    """CONFIG says no AOF and no snapshots: /health says what that means."""
    redis.config_set("save", "")
    try:
        assert any("keeps no data over a restart" in w for w in client.get("/health").json["warnings"])
    finally:
        redis.config_set("save", "3600 1")


@pytest.mark.label_studio
def test_basic_auth_is_added_to_label_studios_webhook(label_studio, live_backend):
    """BASIC_AUTH on: the backend adds its header to the webhook Label Studio made, so annotations arrive."""
    backend = live_backend(basic_auth_user="ls", basic_auth_pass="secret-pass")
    auth = ("ls", "secret-pass")
    scenes = [square_scene(i) for i in range(3)]
    pid, tasks = create_project(label_studio, CONFIG_XML, [image for image, _ in scenes])
    ml = label_studio.json("POST", "/api/ml", json={"url": backend.url, "project": pid, "title": "DiffewS",
                                                    "auth_method": "BASIC_AUTH", "basic_auth_user": auth[0],
                                                    "basic_auth_pass": auth[1]})
    assert ml["auth_method"] == "BASIC_AUTH"
    # Label Studio makes the webhook after /setup answered; the job that adds the header looks again shortly.
    status = wait_for(lambda: ((s := requests.get(f"{backend.url}/status/{pid}", auth=auth, timeout=10).json())
                      .get("webhook_auth") or "").startswith("added") and s, 60, "the header on the webhook")
    [hook] = label_studio.json("GET", f"/api/webhooks/?project={pid}")
    expected = "Basic " + base64.b64encode(b"ls:secret-pass").decode()
    assert hook["headers"]["Authorization"] == expected and status["webhook_auth"].startswith("added")
    label_studio.request("POST", f"/api/tasks/{tasks[0]['id']}/annotations", json={"result": brush_result(scenes[0][1])})
    wait_for(lambda: requests.get(f"{backend.url}/status/{pid}", auth=auth, timeout=10).json()["examples"], 30,
             "the annotation through the authenticated webhook")
    assert requests.get(f"{backend.url}/health", timeout=10).json()["rejected_webhooks"] is None


def test_embedded_redis_files_are_private(tmp_path):
    """The embedded Redis keeps /setup's Label Studio token: its folder is 0700 and every file in it 0600."""
    import stat

    from backend.core.queues import connect, embedded_db, stop_embedded
    from backend.core.settings import Settings
    from backend.core.store import SupportStore

    settings = Settings(model_dir=tmp_path)
    folder = embedded_db(settings).parent
    folder.mkdir(parents=True)
    (folder / "left-by-an-older-version.aof").write_text("x")
    (folder / "left-by-an-older-version.aof").chmod(0o644)
    redis = connect(settings)
    try:
        SupportStore(redis, tmp_path).register_project(1, "<View/>", hostname="http://ls", access_token="secret-token")
        redis.bgrewriteaof()  # a rewrite makes new files: they must be private too
        wait_for(lambda: redis.info("persistence")["aof_rewrite_in_progress"] == 0, 20, "the AOF rewrite")
        assert (folder / "appendonly.aof").stat().st_size > 0
    finally:
        stop_embedded()
    modes = {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.rglob("*")]}
    assert modes["."] == 0o700
    assert all(mode & 0o077 == 0 for mode in modes.values()), modes


@pytest.mark.label_studio
def test_annotations_whose_webhooks_were_refused_are_read_back_at_the_next_setup(label_studio, live_backend):
    """A webhook without the header (made before BASIC_AUTH was on) is refused: the annotation created and the one
    deleted meanwhile reach the support set once Label Studio's next /setup ran (header added, reconcile queued);
    /health's hint says so, since the backend has API access."""
    backend = live_backend(basic_auth_user="ls", basic_auth_pass="secret-pass")
    auth = ("ls", "secret-pass")

    def status() -> dict:
        return requests.get(f"{backend.url}/status/{pid}", auth=auth, timeout=10).json()

    scenes = [square_scene(i) for i in range(3)]
    pid, tasks = create_project(label_studio, CONFIG_XML, [image for image, _ in scenes])
    first = label_studio.json("POST", f"/api/tasks/{tasks[0]['id']}/annotations", json={"result": brush_result(scenes[0][1])})
    ml = label_studio.json("POST", "/api/ml", json={"url": backend.url, "project": pid, "title": "DiffewS",
                                                    "auth_method": "BASIC_AUTH", "basic_auth_user": auth[0],
                                                    "basic_auth_pass": auth[1]})
    wait_for(lambda: (status().get("webhook_auth") or "").startswith("added"), 60, "the header on the webhook")
    wait_for(lambda: status()["examples"] == {"square": 1}, 60, "the backfill")
    [hook] = label_studio.json("GET", f"/api/webhooks/?project={pid}")
    label_studio.request("PATCH", f"/api/webhooks/{hook['id']}/", json={"headers": {}})  # as before BASIC_AUTH

    second = label_studio.json("POST", f"/api/tasks/{tasks[1]['id']}/annotations", json={"result": brush_result(scenes[1][1])})
    label_studio.request("DELETE", f"/api/annotations/{first['id']}")
    health = wait_for(lambda: (h := requests.get(f"{backend.url}/health", timeout=10).json())["rejected_webhooks"] and h,
                      30, "the refused webhooks to be counted")
    assert "adds the header" in health["rejected_webhooks"]["fix"], health["rejected_webhooks"]
    before = status()
    assert before["examples"] == {"square": 1}  # the refused webhooks changed nothing

    # Saving the model's settings (the form sends every field): Label Studio sends /health and /setup
    label_studio.request("PATCH", f"/api/ml/{ml['id']}", json={"url": backend.url, "project": pid, "title": "DiffewS", "auth_method":
                                                                "BASIC_AUTH", "basic_auth_user": auth[0],
                                                                "basic_auth_pass": auth[1]})
    wait_for(lambda: status()["backfill"]["reconciled_at"] > before["backfill"]["reconciled_at"], 60,
             "the reconcile the /setup queued")
    after = status()
    assert after["examples"] == {"square": 1} and after["revision"] > before["revision"]
    [hook] = label_studio.json("GET", f"/api/webhooks/?project={pid}")
    assert hook["headers"]["Authorization"].startswith("Basic ")
    from backend.core.store import SupportStore

    kept = SupportStore(backend.redis, backend.settings.model_dir).annotation_ids(pid)
    assert kept == {second["id"]}, kept
