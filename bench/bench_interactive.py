"""Time per smart-tool interaction (box, keypoint) against a plain click, support memory cached as in the backend.

    python -m bench.bench_interactive                       # tiny model on CPU
    python -m bench.bench_interactive --arch sd21 --device cuda --dtype bfloat16

Each row is the model's share of one interactive /predict (the image already decoded): a box crops the query
and segments the crop, a keypoint segments the whole query and keeps the component under it. "first" is the
first interaction on a task, which also encodes the label's supports; "again" reuses them from the cache.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from backend.core.prompts import LabelPrompt
from backend.worker.refine import refine

from .bench_model import build_model, synthetic_set
from .scenarios import Row, print_table, write_csv


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["tiny", "sd21"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--csv", default="bench/results/interactive.csv")
    args = parser.parse_args(argv)
    model = build_model(args.arch, torch.device(args.device), getattr(torch, args.dtype), args.resolution)
    images, masks = synthetic_set(args.shots, 480, seed=1)
    query = np.random.default_rng(3).integers(0, 256, (360, 480, 3), dtype=np.uint8)
    prompts = {"box (50 % of the image)": LabelPrompt(boxes=[(10, 10, 50, 50)]),
               "keypoint": LabelPrompt(points=[(40, 40, True)]),
               "box + negative keypoint": LabelPrompt(boxes=[(10, 10, 50, 50)], points=[(20, 20, False)])}
    print(f"# bench_interactive: {args.arch} at {args.resolution} px on {args.device} ({args.dtype}), "
          f"{args.shots}-shot, 480x360 query", flush=True)
    rows = []

    def timed(work) -> float:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        work()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    model.support_cache.clear()
    first = timed(lambda: refine(model, query, model.encode_support(images, masks), prompts["keypoint"]))
    rows.append(Row("keypoint, first (encodes the supports)", {"arch": args.arch}, {"s": first}))
    memory = model.encode_support(images, masks)
    click = [timed(lambda: model.segment([query], model.encode_support(images, masks))) for _ in range(args.repeats)]
    rows.append(Row("plain click (whole query, cached supports)", {"arch": args.arch}, {"s": statistics.median(click)}))
    for name, prompt in prompts.items():
        again = [timed(lambda: refine(model, query, memory, prompt)) for _ in range(args.repeats)]
        rows.append(Row(f"{name}, again", {"arch": args.arch}, {"s": statistics.median(again)}))
    print_table(rows, ["s"])
    write_csv(rows, Path(args.csv))
    return rows


if __name__ == "__main__":
    main()
