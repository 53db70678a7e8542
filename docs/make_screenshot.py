"""Make docs/prelabeled-task.png: a real Label Studio labeling view with this backend's brush predictions.

Needs .ls-venv, Debian's chromium + chromium-driver, and a Python with selenium named by SELENIUM_PYTHON
(e.g. a throwaway venv: `python3 -m venv /tmp/sel && /tmp/sel/bin/pip install selenium==4.27.1`); none of
these are project dependencies.
Flow: 6 CamVid frames annotated (road, car) through the API -> Retrieve Predictions -> screenshot of an
unlabeled frame with the predicted brush masks. With the default tiny model the masks show the plumbing
(regions, labels, sizes, scores), not segmentation quality: set DIFFEWS_MODEL for real weights.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_backend import CONFIG, camvid_frames  # noqa: E402
from backend.core.rle import mask_to_rle  # noqa: E402
from bench.ls_harness import LabelStudioClient, personal_access_token, start_backend, start_label_studio, stop  # noqa: E402

OUT = Path(__file__).with_name("prelabeled-task.png")
BROWSER = """
import sys, time
from selenium import webdriver
from selenium.webdriver.common.by import By
ls, page, out = sys.argv[1:4]
options = webdriver.ChromeOptions()
for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,900",
             "--disable-background-networking", "--disable-component-update", "--disable-sync"):
    options.add_argument(flag)
driver = webdriver.Chrome(options=options)
try:
    driver.get(ls + "/user/login/")
    driver.find_element(By.NAME, "email").send_keys("admin@example.com")
    driver.find_element(By.NAME, "password").send_keys("e2e-password-123")
    driver.find_element(By.CSS_SELECTOR, "button[type=submit], input[type=submit]").click()
    time.sleep(3)
    driver.get(ls + page)
    time.sleep(12)
    driver.save_screenshot(out)
finally:
    driver.quit()
"""


def main() -> None:
    frames = camvid_frames(9)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "ls").mkdir()
        (tmp / "be").mkdir()
        ls_proc, ls = start_label_studio(tmp / "ls")
        client = LabelStudioClient(ls, personal_access_token(ls))
        be_proc, be = start_backend(tmp / "be", ls, client.pat, {"DIFFEWS_TINY_RESOLUTION": "256",
                                                                 "DIFFEWS_MODEL": os.environ.get("DIFFEWS_MODEL", "tiny")})
        try:
            pid = client.json("POST", "/api/projects", json={"title": "CamVid", "label_config": CONFIG})["id"]
            files = [(f"f{i}", (f"frame{i}.jpg", data, "image/jpeg")) for i, (data, _) in enumerate(frames)]
            client.request("POST", f"/api/projects/{pid}/import", files=files)
            tasks = sorted(client.json("GET", f"/api/tasks?project={pid}")["tasks"], key=lambda t: t["id"])
            client.request("POST", "/api/ml", json={"url": be, "project": pid, "title": "DiffewS"})
            for task, (_, masks) in zip(tasks[:6], frames[:6]):
                result = [{"from_name": "tag", "to_name": "image", "type": "brushlabels", "original_width": 480,
                           "original_height": 360, "value": {"format": "rle", "rle": mask_to_rle(m), "brushlabels": [k]}}
                          for k, m in masks.items() if m.any()]
                client.request("POST", f"/api/tasks/{task['id']}/annotations", json={"result": result})
            time.sleep(3)
            version = requests.get(f"{be}/projects/{pid}/versions").json()["current"]
            client.request("PATCH", f"/api/projects/{pid}", json={"model_version": version, "show_collab_predictions": True})
            client.request("POST", f"/api/dm/actions?id=retrieve_tasks_predictions&project={pid}",
                           json={"selectedItems": {"all": True, "excluded": []}})
            deadline = time.monotonic() + 300  # 9 tasks > SYNC_MAX_TASKS: bulk jobs post them through the API
            while not client.predictions(tasks[7]["id"]):
                if time.monotonic() > deadline:
                    raise RuntimeError("no prediction was posted for the task to show")
                time.sleep(1)
            python = os.environ.get("SELENIUM_PYTHON", "/tmp/sel/bin/python")
            subprocess.run([python, "-c", BROWSER, ls, f"/projects/{pid}/data?task={tasks[7]['id']}", str(OUT)], check=True)
            print(f"wrote {OUT}")
        finally:
            stop(be_proc)
            stop(ls_proc)


if __name__ == "__main__":
    main()
