"""The import rule: web -> core <- worker. The web process serves every route without torch or backend.worker."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = r'''
import json, sys
from backend.core.settings import Settings
from backend.web.app import create_app
from bench.synthetic import CONFIG_XML, annotation_event, square_scene

app = create_app(Settings(model_dir=sys.argv[1], tiny_resolution=64, predict_wait_s=5))
client = app.test_client()
image, mask = square_scene(0)
seen, codes = set(), {}

def call(method, path, rule, body=None):
    response = client.open(path, method=method, json=body)
    seen.add(rule)
    codes[f"{method} {path}"] = response.status_code
    return response

call("GET", "/health", "/health")
call("POST", "/setup", "/setup", {"project": "1.1700000000", "schema": CONFIG_XML})
call("GET", "/versions", "/versions")
call("POST", "/webhook", "/webhook", annotation_event(11, 101, image, mask))
call("POST", "/webhook", "/webhook", {"action": "START_TRAINING", "project": {"id": 1}})
call("POST", "/webhook", "/webhook", {"action": "ANNOTATIONS_DELETED", "project": {"id": 1}, "annotations": [{"id": 11}]})
call("POST", "/predict", "/predict", {"project": "1.1700000000", "tasks": [{"id": 5, "data": {"image": "x"}}]})
call("GET", "/projects/1/versions", "/projects/<int:pid>/versions")
call("POST", "/projects/1/pin", "/projects/<int:pid>/pin", {"version": None})
call("GET", "/status/1", "/status/<int:pid>")
call("POST", "/prelabel/1", "/prelabel/<int:pid>")
call("POST", "/projects/1/prelabel?preview=0", "/projects/<int:pid>/prelabel")
call("DELETE", "/projects/1/prelabel", "/projects/<int:pid>/prelabel")
call("GET", "/projects/1/label-checks", "/projects/<int:pid>/label-checks")
call("POST", "/projects/1/review-view", "/projects/<int:pid>/review-view")
call("POST", "/projects/1/label-checks/11/confirm", "/projects/<int:pid>/label-checks/<int:annotation_id>/confirm")
job = json.loads(client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1}}).data)["job"]
call("GET", f"/jobs/{job}", "/jobs/<job_id>")
call("POST", f"/jobs/{job}/retry", "/jobs/<job_id>/retry")
rules = {r.rule for r in app.url_map.iter_rules() if r.endpoint != "static"}
print(json.dumps({"torch": "torch" in sys.modules,
                  "worker": sorted(m for m in sys.modules if m.startswith("backend.worker")),
                  "untested": sorted(rules - seen), "codes": codes}))
from backend.core.queues import stop_embedded
stop_embedded()
'''


def test_web_serves_every_route_without_torch_or_worker_modules(tmp_path):
    """Every route, Start Training included, runs in a process that never imports torch or backend.worker."""
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["untested"] == []
    assert report["torch"] is False
    assert report["worker"] == []
    codes = report["codes"]
    assert codes["POST /setup"] == 200 and codes["GET /status/1"] == 200
    assert codes["POST /webhook"] == 200  # the last webhook call: annotations deleted
    assert codes["POST /predict"] == 503  # no worker in this process: answered, not imported
    assert codes["POST /prelabel/1"] == 400  # no Label Studio API configured
    assert codes["POST /projects/1/prelabel?preview=0"] == 400 and codes["POST /projects/1/review-view"] == 400
    assert codes["DELETE /projects/1/prelabel"] == 200 and codes["GET /projects/1/label-checks"] == 202
    assert codes["POST /projects/1/label-checks/11/confirm"] == 404  # its annotation was deleted above


def test_core_imports_neither_flask_nor_torch():
    """backend.core is shared by both sides: it loads neither the web framework nor the model."""
    code = ("import sys, pkgutil, importlib, backend.core as c\n"
            "[importlib.import_module('backend.core.' + m.name) for m in pkgutil.iter_modules(c.__path__)]\n"
            "print(sorted(n for n in ('torch', 'flask', 'backend.web', 'backend.worker') if n in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_backend_uses_the_model_package_api_only():
    """The backend imports names from `model` itself (its exported API), never from its modules."""
    import ast
    import types
    from pathlib import Path

    import model

    past = []
    for path in (Path(__file__).resolve().parents[1] / "backend").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("model."):
                past.append(f"{path.name}: from {node.module}")
            if isinstance(node, ast.Import) and any(a.name.startswith("model.") for a in node.names):
                past.append(f"{path.name}: import {node.names[0].name}")
    assert past == []
    for name in model.__all__:  # every export is the object it names, not a submodule of the same name
        assert not isinstance(getattr(model, name), types.ModuleType), name
