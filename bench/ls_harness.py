"""Start a real Label Studio 1.23.2 (from .ls-venv) and this backend on 127.0.0.1: the harness of the end-to-end
tests, the backend benchmarks and the documentation's screenshot (it lives here, not in tests/, so that neither
bench/ nor docs/ imports the test suite).

Label Studio runs as a user gets it: legacy tokens off (its default since 1.23); the API is reached with
a Personal Access Token made the way the UI makes one (log in, POST /api/token/).
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
LS_BIN = Path(os.environ.get("LABEL_STUDIO_BIN", REPO / ".ls-venv" / "bin" / "label-studio"))
ADMIN = ("admin@example.com", "e2e-password-123")


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
    """Label Studio with its default token settings (legacy tokens off) and local ML backends allowed."""
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO", "DJANGO"))},
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "LABEL_STUDIO_USERNAME": ADMIN[0],
        "LABEL_STUDIO_PASSWORD": ADMIN[1],
        "ML_BLOCK_LOCAL_IP": "false",
        "SSRF_PROTECTION_ENABLED": "false",
        "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
        "COLLECT_ANALYTICS": "false",
    }
    log = data_dir / "label-studio.log"
    proc = subprocess.Popen(
        [str(LS_BIN), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port),
         "--data-dir", str(data_dir)],
        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=data_dir,
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health", 240, proc, log)
    return proc, url


def personal_access_token(ls_url: str) -> str:
    """Log in as the admin and create a Personal Access Token, as Account & Settings does."""
    session = requests.Session()
    session.get(f"{ls_url}/user/login/", timeout=30)
    login = session.post(f"{ls_url}/user/login/", timeout=30, allow_redirects=False,
                         data={"email": ADMIN[0], "password": ADMIN[1], "csrfmiddlewaretoken": session.cookies["csrftoken"]},
                         headers={"Referer": f"{ls_url}/user/login/"})
    if login.status_code != 302:
        raise RuntimeError(f"Label Studio login failed: {login.status_code} {login.text[:300]}")
    made = session.post(f"{ls_url}/api/token/", timeout=30,
                        headers={"X-CSRFToken": session.cookies["csrftoken"], "Referer": f"{ls_url}/"})
    if made.status_code != 201:
        raise RuntimeError(f"creating a Personal Access Token failed: {made.status_code} {made.text[:300]}")
    return made.json()["token"]


class LabelStudioClient:
    """Plain HTTP calls to Label Studio with a PAT, exchanged for short-lived access tokens as needed."""

    def __init__(self, url: str, pat: str):
        self.url = url
        self.pat = pat
        self._access = ""
        self._expires = 0.0
        self._lock = threading.Lock()

    def _bearer(self, fresh: bool = False) -> str:
        # Renewed 60 s before it expires: a request with an expired token is answered 401 and logged by Label
        # Studio as an error, which the end-to-end tests count as a complaint.
        with self._lock:
            if fresh or not self._access or time.time() > self._expires - 60:
                r = requests.post(f"{self.url}/api/token/refresh/", json={"refresh": self.pat}, timeout=30)
                r.raise_for_status()
                self._access = r.json()["access"]
                payload = self._access.split(".")[1]
                self._expires = float(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["exp"])
            return self._access

    def request(self, method: str, path: str, *, ok: bool = True, **kwargs) -> requests.Response:
        """Call Label Studio; with ok=True a non-2xx answer fails the test with its body."""
        for fresh in (False, True):
            response = requests.request(method, self.url + path, timeout=120,
                                        headers={"Authorization": f"Bearer {self._bearer(fresh)}"}, **kwargs)
            if response.status_code != 401:
                break
        if ok:
            assert response.status_code < 300, f"{method} {path}: {response.status_code} {response.text[:500]}"
        return response

    def json(self, method: str, path: str, **kwargs):
        """Call Label Studio and return the JSON body."""
        return self.request(method, path, **kwargs).json()

    def predictions(self, task_id: int) -> list[dict]:
        """Every stored prediction of a task."""
        return self.json("GET", f"/api/predictions?task={task_id}")


def start_backend(data_dir: Path, ls_url: str, api_key: str,
                  extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """`python _wsgi.py` (embedded Redis + in-process workers, tiny model) pointed at Label Studio."""
    port = free_port()
    env = {
        **os.environ,
        "MODEL_DIR": str(data_dir),
        "DIFFEWS_MODEL": "tiny",
        "DIFFEWS_TINY_RESOLUTION": "64",
        "LABEL_STUDIO_URL": ls_url,
        "LABEL_STUDIO_API_KEY": api_key,
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


def brush_result(mask, label: str = "square") -> list[dict]:
    """An annotation result with one brush region of `label` over `mask` (H, W bool)."""
    from backend.core.rle import mask_to_rle

    h, w = mask.shape
    return [{"from_name": "tag", "to_name": "image", "type": "brushlabels", "original_width": w, "original_height": h,
             "image_rotation": 0, "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [label]}}]


def create_project(client: LabelStudioClient, config_xml: str, images: list) -> tuple[int, list[dict]]:
    """A project whose tasks are these images (H, W, 3 uint8), uploaded as PNG files; returns (id, tasks by id)."""
    project = client.json("POST", "/api/projects", json={"title": "diffews e2e", "label_config": config_xml})
    return project["id"], import_images(client, project["id"], images)


def import_images(client: LabelStudioClient, project: int, images: list, name: str = "scene") -> list[dict]:
    """Upload images (H, W, 3 uint8) into a project as PNG tasks; returns the tasks they became, by id."""
    import io

    from PIL import Image

    listing = f"/api/tasks?project={project}&page_size=1000"
    before = {t["id"] for t in client.json("GET", listing)["tasks"]}
    files = []
    for i, image in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        files.append((f"file{i}", (f"{name}{i}.png", buf.getvalue(), "image/png")))
    client.request("POST", f"/api/projects/{project}/import", files=files)
    return sorted((t for t in client.json("GET", listing)["tasks"] if t["id"] not in before), key=lambda t: t["id"])


def wait_for(predicate, seconds: float, what: str):
    """Poll `predicate` until it returns something truthy; fail naming `what` after `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {seconds:.0f} s waiting for {what}")
