"""Click latency and bulk throughput per CPU core: the matcher against DiffewS (tiny, and the SD 2.1 architecture
with random weights), in one run. A click is one 960x720 query against one label's 5 support examples.

    python -m bench.bench_click                      # one core (torch.set_num_threads(1))
    python -m bench.bench_click --threads 2 --skip-sd21

warm: the label's support memory is cached (every click after the first); cold: the supports are encoded again
(the first click after new labels, and the naive way: encoding the supports on every click). bulk: tasks/s over 8
queries in one call, supports warm.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from model import DiffewS
from model.matcher import Matcher

from .bench_model import build_model
from .scenarios import Row, print_table, write_csv

QUERY_SIZE = (720, 960)
SHOTS = 5


def _images(n: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    h, w = QUERY_SIZE
    images, masks = [], []
    for _ in range(n):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        mask = np.zeros((h, w), bool)
        y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
        mask[y : y + h // 3, x : x + w // 3] = True
        image[mask] = rng.integers(150, 255, 3, dtype=np.uint8)
        images.append(image)
        masks.append(mask)
    return images, masks


def measure(model, repeats: int) -> dict:
    """Seconds of a cold click, of a warm click (median), and bulk tasks/s with warm supports."""
    sup_images, sup_masks = _images(SHOTS, 1)
    queries, _ = _images(8, 2)

    def click(query: np.ndarray) -> None:
        memory = model.encode_support(sup_images, sup_masks)
        model.segment_many_encoded(model.encode_queries([query]), {"label": memory})

    model.support_cache.clear()
    start = time.perf_counter()
    click(queries[0])
    cold_first = time.perf_counter() - start
    warm = []
    for i in range(repeats):
        start = time.perf_counter()
        click(queries[1 + i % 7])
        warm.append(time.perf_counter() - start)
    cold = []
    for i in range(max(1, repeats // 2)):
        model.support_cache.clear()
        start = time.perf_counter()
        click(queries[1 + i % 7])
        cold.append(time.perf_counter() - start)
    memory = model.encode_support(sup_images, sup_masks)
    start = time.perf_counter()
    model.segment_many_encoded(model.encode_queries(queries), {"label": memory})
    bulk = len(queries) / (time.perf_counter() - start)
    return {"cold_first_s": cold_first, "cold_s": statistics.median(cold), "warm_s": statistics.median(warm),
            "bulk_tasks_per_s": bulk}


def _all_cells(resolution: int) -> Matcher:
    model = Matcher.from_pretrained("effnet-lite0", resolution=resolution)
    return model.with_head(None, replace(model.config, max_vectors=4096))


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--skip-sd21", action="store_true", help="leave out the SD 2.1 architecture (minutes per click)")
    parser.add_argument("--csv", default="bench/results/click.csv")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    scenarios = [(f"matcher effnet-lite0 r{r}", lambda r=r: Matcher.from_pretrained("effnet-lite0", resolution=r))
                 for r in (256, 384, 512)]
    scenarios.append(("matcher effnet-lite0 r384, every support cell (max_vectors 4096)", lambda: _all_cells(384)))
    scenarios += [(f"matcher {b} r384", lambda b=b: Matcher.from_pretrained(b, resolution=384))
                  for b in ("effnet-lite1", "effnet-lite2")]
    scenarios.append(("DiffewS tiny r256", lambda: DiffewS.tiny(resolution=256)))
    if not args.skip_sd21:
        scenarios.append(("DiffewS SD 2.1 arch (random weights) r384",
                          lambda: build_model("sd21", torch.device("cpu"), torch.float32, 384)))
    rows = []
    for name, build in scenarios:
        row = Row(name, {"threads": args.threads, "shots": SHOTS})
        try:
            model = build()
            repeats = 2 if "SD 2.1" in name else args.repeats
            row.figures = measure(model, repeats)
        except Exception as exc:  # a failed scenario is a row with its error
            row.error = f"{type(exc).__name__}: {exc}"
        rows.append(row)
        print(f"{name}: {row.figures or row.error}", flush=True)
    print_table(rows, ["warm_s", "cold_s", "cold_first_s", "bulk_tasks_per_s"])
    write_csv(rows, Path(args.csv))
    return rows


if __name__ == "__main__":
    main()
