"""Start a real Label Studio 1.23.2 (from .ls-venv) and this backend on 127.0.0.1 for end-to-end tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
LS_BIN = Path(os.environ.get("LABEL_STUDIO_BIN", REPO / ".ls-venv" / "bin" / "label-studio"))
TOKEN = "e2e-legacy-token-0123456789"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, seconds: float, proc: subprocess.Popen, log: Path) -> None:
    """Poll `url` until it answers 200; fail with the process log if it dies or time runs out."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up in {seconds:.0f} s:\n{log.read_text()[-3000:]}")


def start_label_studio(data_dir: Path) -> tuple[subprocess.Popen, str]:
    """Label Studio with a legacy token enabled and local ML backends allowed; returns (process, url)."""
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO", "DJANGO"))},
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "LABEL_STUDIO_USERNAME": "admin@example.com",
        "LABEL_STUDIO_PASSWORD": "e2e-password-123",
        "LABEL_STUDIO_USER_TOKEN": TOKEN,
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "ML_BLOCK_LOCAL_IP": "false",
        "SSRF_PROTECTION_ENABLED": "false",
        "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
        "COLLECT_ANALYTICS": "false",
    }
    log = data_dir / "label-studio.log"
    proc = subprocess.Popen(
        [str(LS_BIN), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port),
         "--data-dir", str(data_dir), "--enable-legacy-api-token"],
        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=data_dir,
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health", 240, proc, log)
    return proc, url


def start_backend(data_dir: Path, ls_url: str, extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """`python _wsgi.py` (embedded Redis + in-process worker, tiny model) pointed at Label Studio."""
    port = free_port()
    env = {
        **os.environ,
        "MODEL_DIR": str(data_dir),
        "DIFFEWS_MODEL": "tiny",
        "DIFFEWS_TINY_RESOLUTION": "64",
        "LABEL_STUDIO_URL": ls_url,
        "LABEL_STUDIO_API_KEY": TOKEN,
        "PYTHONUNBUFFERED": "1",
        **(extra_env or {}),
    }
    env.pop("REDIS_URL", None)
    log = data_dir / "backend.log"
    proc = subprocess.Popen([sys.executable, "_wsgi.py", "--host", "127.0.0.1", "--port", str(port)], env=env,
                            cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health", 60, proc, log)
    return proc, url


def stop(proc: subprocess.Popen) -> None:
    """Terminate a server process and wait for it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
