"""Real-scale rehearsal: the product, run as a user runs it, on random weights of the real SD 2.1 architecture.

    python -m bench.bench_real_scale                       # fp32 then bf16, 512 px, this machine's CPUs
    python -m bench.bench_real_scale --dtype bf16 --bulk 8 --resolution 384

It writes (once) a folder with the exact layout of the official ModelScope release
(weight/stable-diffusion-2-1-ref8inchannels-tag4inchannels/ with model_index.json, scheduler, tokenizer,
text_encoder, vae and a unet with conv_in_ref; weight/incontext/unet; weight/coco_fold0/unet) filled with
random weights built from ../shared/data/sd21-config, then starts the README's one command
(`python _wsgi.py`, embedded Redis and workers) with DIFFEWS_MODEL=<that folder> and measures: start to
/health with live workers, peak RSS, a click with 1 label x 5 shots and with 3 labels (cold: supports
encoded; warm: from the support memory), a bulk of N tasks, a LoRA fine-tune, promotion, the hot swap to
the new version, and a full fine-tune in a second start (TRAIN_MODE=full; killed and reported as not
fitting if the process passes --max-rss-gb). Random weights: the figures are time and memory, never quality.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import requests
from PIL import Image

from .scenarios import SHARED, Row, print_table, write_csv

REPO = Path(__file__).resolve().parents[1]
BASE = "weight/stable-diffusion-2-1-ref8inchannels-tag4inchannels"
LABELS = ("road", "car", "sky")


def write_release(root: Path, config_dir: Path = SHARED / "data" / "sd21-config") -> Path:
    """The official release's layout with random SD 2.1 weights (fp32 safetensors); skipped if already complete."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from model.unet_ref import add_conv_in_ref_by_surgery

    base = root / BASE
    done = root / ".complete"
    if done.is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    torch.manual_seed(0)
    base.mkdir(parents=True)
    for part in ("scheduler", "tokenizer"):
        shutil.copytree(config_dir / part, base / part)
    shutil.copy(config_dir / "model_index.json", base / "model_index.json")
    started = time.perf_counter()
    AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae")).save_pretrained(base / "vae")
    text_config = CLIPTextConfig.from_pretrained(config_dir / "text_encoder")
    CLIPTextModel(text_config).save_pretrained(base / "text_encoder", safe_serialization=True)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir / "unet"))
    add_conv_in_ref_by_surgery(unet)  # random conv_in_ref, saved with the weights and declared in config.json
    unet.save_pretrained(base / "unet", safe_serialization=True)
    for name in ("incontext", "coco_fold0"):  # same random weights: hard links, not 3.5 GB more each
        folder = root / "weight" / name / "unet"
        folder.mkdir(parents=True)
        for file in (base / "unet").iterdir():
            os.link(file, folder / file.name)
    done.write_text(f"{time.perf_counter() - started:.0f} s\n")
    return root


def jpeg_uri(image: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def camvid(n: int) -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """n CamVid val frames with their road, car and sky masks."""
    data = SHARED / "data" / "camvid"
    classes = [c.strip().lower() for c in (data / "classes.txt").read_text().splitlines()]
    frames = []
    for path in sorted((data / "val" / "images").glob("*.jpg"))[:n]:
        labels = np.asarray(Image.open(data / "val" / "labels" / f"{path.stem}.png"))
        frames.append((np.asarray(Image.open(path).convert("RGB")), {c: labels == classes.index(c) for c in LABELS}))
    return frames


def label_config(labels: tuple[str, ...]) -> str:
    inner = "".join(f'<Label value="{label}"/>' for label in labels)
    return f'<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">{inner}</BrushLabels></View>'


def annotation(aid: int, task: int, project: int, image_uri: str, masks: dict[str, np.ndarray]) -> dict:
    from backend.core.rle import mask_to_rle

    regions = []
    for label, mask in masks.items():
        h, w = mask.shape
        regions.append({"id": f"r{label}", "from_name": "tag", "to_name": "image", "type": "brushlabels",
                        "original_width": w, "original_height": h,
                        "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [label]}})
    return {"action": "ANNOTATION_CREATED",
            "annotation": {"id": aid, "task": task, "result": regions, "was_cancelled": False, "ground_truth": False},
            "task": {"id": task, "data": {"image": image_uri}, "project": project}, "project": {"id": project}}


class RssWatch:
    """Samples a process's RSS every 0.2 s; `peak()` since the last `reset()`, in GiB."""

    def __init__(self, pid: int, limit_gb: float | None = None):
        self.proc = psutil.Process(pid)
        self.limit_gb = limit_gb
        self.over = False
        self._peak = 0
        self.overall = 0
        """Peak RSS in bytes over the process's whole life (never reset)."""
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            try:
                rss = self.proc.memory_info().rss
            except psutil.Error:
                return
            self._peak = max(self._peak, rss)
            self.overall = max(self.overall, rss)
            if self.limit_gb and rss > self.limit_gb * 2**30 and not self.over:
                self.over = True
                self.proc.send_signal(signal.SIGKILL)  # would not fit: stop before the machine swaps or kills others

    def now(self) -> float:
        return self.proc.memory_info().rss / 2**30

    def peak(self) -> float:
        return self._peak / 2**30

    def reset(self) -> None:
        self._peak = 0

    def stop(self) -> None:
        self._stop.set()


class Backend:
    """`python _wsgi.py` with the given environment, as the README's one command starts it."""

    def __init__(self, env: dict[str, str], workdir: Path, limit_gb: float | None):
        from bench.ls_harness import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(workdir / f"backend-{self.port}.log", "w")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "_wsgi.py", "--host", "127.0.0.1", "--port", str(self.port)],
                                     cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.rss = RssWatch(self.proc.pid, limit_gb)

    def wait_healthy(self, timeout: float = 1800) -> float:
        """Seconds from start until /health says UP with a live worker on every queue."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"backend exited with {self.proc.returncode}; see {self.log.name}")
            try:
                health = requests.get(f"{self.url}/health", timeout=5).json()
                if health["status"] == "UP" and health["workers"] and all(n > 0 for n in health["workers"].values()):
                    return time.perf_counter() - self.started
            except (requests.RequestException, ValueError):
                pass
            time.sleep(0.5)
        raise TimeoutError("backend not healthy in time")

    def post(self, path: str, body: dict, timeout: float = 3600) -> tuple[dict, float]:
        started = time.perf_counter()
        r = requests.post(f"{self.url}{path}", json=body, timeout=timeout)
        if r.status_code >= 400:
            raise RuntimeError(f"POST {path}: {r.status_code} {r.text[:300]}")
        return r.json(), time.perf_counter() - started

    def job(self, job_id: str, timeout: float = 7200) -> tuple[dict, dict[str, float]]:
        """Wait for a job; returns its last status and the seconds spent in each meta stage (polled every 0.5 s)."""
        stages: dict[str, float] = {}
        last, since = None, time.perf_counter()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return {"status": "process died", "meta": {}}, stages
            info = requests.get(f"{self.url}/jobs/{job_id}", timeout=30).json()
            stage = info.get("meta", {}).get("stage")
            if stage != last:
                if last is not None:
                    stages[last] = stages.get(last, 0) + time.perf_counter() - since
                last, since = stage, time.perf_counter()
            if info["status"] in ("finished", "failed"):
                if last is not None:
                    stages[last] = stages.get(last, 0) + time.perf_counter() - since
                return info, stages
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} did not end in time")

    def stop(self) -> None:
        self.rss.stop()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def click(backend: Backend, project: int, labels: tuple[str, ...], image: np.ndarray, task: int) -> tuple[dict, float]:
    body = {"tasks": [{"id": task, "data": {"image": jpeg_uri(image)}}], "project": f"{project}.1",
            "label_config": label_config(labels)}
    return backend.post("/predict", body)


def rehearse(release: Path, dtype: str, args: argparse.Namespace, workdir: Path) -> list[Row]:
    """One full rehearsal at one DIFFEWS_DTYPE; a Row per measured step."""
    rows: list[Row] = []
    params = {"dtype": dtype, "resolution": args.resolution or 512, "threads": args.threads}
    model_dir = workdir / f"model-{dtype}"
    shutil.rmtree(model_dir, ignore_errors=True)
    env = {**os.environ, "DIFFEWS_MODEL": str(release), "DIFFEWS_DTYPE": dtype, "MODEL_DIR": str(model_dir),
           "PYTHONUNBUFFERED": "1", "PREDICT_WAIT_S": "3600", "JOB_TIMEOUT_S": "7200", "TRAIN_TIMEOUT_S": "7200",
           "SYNC_MAX_TASKS": str(max(1, args.bulk)), "TRAIN_STEPS": str(args.train_steps), "TRAIN_EVERY": "0",
           "SCORE_EPISODES": str(args.score_episodes), "MAX_SHOTS": "5", "TRAIN_MODE": "lora", "TRAIN_SEED": "0",
           "OMP_NUM_THREADS": str(args.threads), "JOB_HEARTBEAT_TTL_S": "120"}
    env.pop("REDIS_URL", None)
    if args.resolution:
        env["DIFFEWS_RESOLUTION"] = str(args.resolution)

    def row(name: str, **figures) -> None:
        rows.append(Row(name, params, {k: round(v, 2) if isinstance(v, float) else v for k, v in figures.items()}))
        print(f"[{dtype}] {name}: {rows[-1].figures}", flush=True)

    frames = camvid(6 + args.bulk + 4)
    examples, queries = frames[:6], frames[6:]
    backend = Backend(env, workdir, args.max_rss_gb)
    try:
        row("start to /health with live workers", seconds=backend.wait_healthy(), rss_gb=backend.rss.now())
        backend.post("/setup", {"project": "1.1", "schema": label_config(LABELS[:1])})
        backend.post("/setup", {"project": "2.1", "schema": label_config(LABELS)})
        started = time.perf_counter()
        for i, (image, masks) in enumerate(examples):
            uri = jpeg_uri(image)
            backend.post("/webhook", annotation(100 + i, 10 + i, 1, uri, {"road": masks["road"]}))
            if i < 5:
                backend.post("/webhook", annotation(200 + i, 30 + i, 2, uri, masks))
        row("store 11 labeled examples (webhooks)", seconds=time.perf_counter() - started)
        for project, labels, name in ((1, LABELS[:1], "click, 1 label x 5 shots"), (2, LABELS, "click, 3 labels x 5 shots")):
            backend.rss.reset()
            out, cold = click(backend, project, labels, queries[0][0], 900 + project)
            _, warm = click(backend, project, labels, queries[1][0], 910 + project)
            regions = len(out["results"][0]["result"])
            row(name, cold_s=cold, warm_s=warm, regions=regions, peak_rss_gb=backend.rss.peak())
        backend.rss.reset()
        if not args.bulk:
            return rows
        tasks = [{"id": 1000 + i, "data": {"image": jpeg_uri(image)}} for i, (image, _) in enumerate(queries[2:2 + args.bulk])]
        out, seconds = backend.post("/predict", {"tasks": tasks, "project": "1.1", "label_config": label_config(LABELS[:1])})
        row(f"bulk of {len(tasks)} tasks, 1 label x 5 shots (one /predict)", seconds=seconds,
            tasks_per_s=len(tasks) / seconds, predictions=len(out["results"]), peak_rss_gb=backend.rss.peak())
        if args.train:
            train_and_swap(backend, model_dir, "lora", row)
    except Exception as exc:  # noqa: BLE001 - the table says what broke; the rest of the run goes on
        rows.append(Row("rehearsal stopped", params, error=f"{type(exc).__name__}: {exc}"))
        print(f"[{dtype}] stopped: {exc}", flush=True)
    finally:
        row("whole run", peak_rss_gb=backend.rss.overall / 2**30)
        backend.stop()
    if args.full and args.train:
        backend = Backend({**env, "TRAIN_MODE": "full"}, workdir, args.max_rss_gb)
        try:
            row("second start (page cache warm), TRAIN_MODE=full", seconds=backend.wait_healthy())
            train_and_swap(backend, model_dir, "full", row)
        except Exception as exc:  # noqa: BLE001
            rows.append(Row("full fine-tune", params, error=f"{type(exc).__name__}: {exc}"))
        finally:
            backend.stop()
    return rows


def train_and_swap(backend: Backend, model_dir: Path, mode: str, row) -> None:
    """START_TRAINING on project 1, then the first click on the new version (forced by a pin if kept back)."""
    backend.rss.reset()
    before = backend.rss.now()
    queued, _ = backend.post("/webhook", {"action": "START_TRAINING", "project": {"id": 1}})
    info, stages = backend.job(queued["job"])
    if backend.rss.over:
        row(f"{mode} fine-tune", fits="no: killed past --max-rss-gb", peak_rss_gb=backend.rss.peak())
        return
    if info["status"] != "finished":
        raise RuntimeError(f"{mode} training {info['status']}: {info.get('error')}")
    meta = info["meta"]
    version = meta["version"]
    size = folder_mb(model_dir / "versions" / "1" / version)
    row(f"{mode} fine-tune, {meta.get('steps', '?')} steps", train_s=stages.get("training", 0.0),
        score_s=stages.get("scoring", 0.0), version_mb=size, rss_before_gb=before, peak_rss_gb=backend.rss.peak())
    row(f"{mode}: promotion", promoted=bool(meta.get("promoted")), decision=str(meta.get("decision"))[:80])
    if not meta.get("promoted"):
        backend.post("/projects/1/pin", {"version": version})  # random weights: force the swap to measure it
    frames = camvid(3)
    backend.rss.reset()
    out, first = click(backend, 1, LABELS[:1], frames[2][0], 990)
    _, again = click(backend, 1, LABELS[:1], frames[1][0], 991)
    row(f"{mode}: hot swap (first click on {version})", first_click_s=first, next_click_s=again,
        served=out["model_version"] == version, rss_after_gb=backend.rss.now(), peak_rss_gb=backend.rss.peak())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--release", type=Path, default=Path("/tmp/diffews-real-scale/release"),
                        help="where the random-weight release folder is written (about 5.6 GB, kept for reruns)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/diffews-real-scale/run"))
    parser.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--resolution", type=int, default=None, help="DIFFEWS_RESOLUTION (default: the model's 512)")
    parser.add_argument("--bulk", type=int, default=20, help="tasks in the bulk step")
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--score-episodes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--train", action=argparse.BooleanOptionalAction, default=True,
                        help="the LoRA fine-tune, promotion and hot swap (--no-train: clicks and bulk only)")
    parser.add_argument("--full", action=argparse.BooleanOptionalAction, default=True,
                        help="also a full fine-tune in a second start (TRAIN_MODE=full)")
    parser.add_argument("--max-rss-gb", type=float, default=21.0,
                        help="kill the backend and report 'did not fit' past this RSS (the machine has 24 GB)")
    parser.add_argument("--csv", type=Path, default=Path("bench/results/real_scale.csv"))
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    release = write_release(args.release)
    print(f"release folder ready in {time.perf_counter() - started:.0f} s: {release} "
          f"({folder_mb(release / BASE):.0f} MB base pipeline)", flush=True)
    rows = []
    for dtype in args.dtype:
        rows += rehearse(release, dtype, args, args.workdir)
    write_csv(rows, args.csv)
    print_table([Row(r.scenario, r.params, {"result": ", ".join(f"{k} {v}" for k, v in r.figures.items())}, r.error)
                 for r in rows], ["result"])
    (args.workdir / "rows.json").write_text(json.dumps([r.__dict__ for r in rows], indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
