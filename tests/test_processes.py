"""`python -m backend processes start | status | stop`: the production recipe as one command, tried as written."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import requests

from bench.ls_harness import wait_for

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "backend", "processes", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def test_start_lists_serves_and_stops_every_process(tmp_path):
    """Redis, gunicorn and a worker start detached; /health is UP with a worker on every queue; status lists
    them; a second start is refused; stop ends every one and leaves no pid file."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_URL", "BASIC_AUTH", "LABEL_STUDIO"))}
    env.update(MODEL_DIR=str(tmp_path), DIFFEWS_MODEL="tiny", DIFFEWS_TINY_RESOLUTION="64")
    web, redis_port = _free_port(), _free_port()
    started = _cli(env, "start", "--bind", f"127.0.0.1:{web}", "--redis-port", str(redis_port), "--web-workers", "1")
    try:
        assert started.returncode == 0, started.stderr
        health = wait_for(lambda: _health(web), 90, "the web process and the worker")
        assert health["status"] == "UP" and set(health["workers"].values()) == {1}, health
        listing = _cli(env, "status")
        assert listing.returncode == 0, listing.stdout
        names = [line.split()[0] for line in listing.stdout.splitlines()]
        assert names == ["redis", "web", "worker-1"] and listing.stdout.count("running") == 3, listing.stdout
        again = _cli(env, "start", "--bind", f"127.0.0.1:{web}", "--redis-port", str(redis_port))
        assert again.returncode == 2 and "already running" in again.stderr
        pids = [int(p.read_text()) for p in (tmp_path / "run").glob("*.pid")]
    finally:
        stopped = _cli(env, "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.splitlines() == ["stopped web", "stopped worker-1", "stopped redis"], stopped.stdout
    assert not any(_alive(pid) for pid in pids) and not list((tmp_path / "run").glob("*.pid"))
    assert (tmp_path / "logs" / "worker-1.log").stat().st_size > 0


def _health(port: int) -> dict | None:
    try:
        health = requests.get(f"http://127.0.0.1:{port}/health", timeout=5).json()
    except (requests.RequestException, ValueError):
        return None
    return health if health.get("workers", {}).get("predict-high") else None


def test_an_exposed_address_without_basic_auth_is_refused(tmp_path):
    """--bind on every interface without BASIC_AUTH_* starts nothing and says what to set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_URL", "BASIC_AUTH"))}
    env.update(MODEL_DIR=str(tmp_path), DIFFEWS_MODEL="tiny")
    refused = _cli(env, "start", "--bind", "0.0.0.0:9090")
    assert refused.returncode == 2 and "BASIC_AUTH_USER and BASIC_AUTH_PASS" in refused.stderr
    assert not (tmp_path / "run").exists()
    from backend.core.settings import Settings
    from backend.processes import exposure_error

    secured = Settings(model_dir=tmp_path, basic_auth_user="u", basic_auth_pass="p")
    assert exposure_error("0.0.0.0:9090", secured) is None
    assert exposure_error("[::1]:9090", Settings(model_dir=tmp_path)) is None
