"""Seconds per fine-tuning episode and peak memory on the SD 2.1 architecture (random weights).

    python -m bench.bench_train_step --device cuda                      # 512 px, LoRA and full, bf16 served
    python -m bench.bench_train_step --device cpu --resolution 256 --steps 2

Each row fine-tunes a model served in --dtype with fp32 master weights (bf16 autocast on CUDA), 2 shots
per episode (the release's K = 2), with and without gradient checkpointing, so LoRA against full and
checkpointing against none are compared in one run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from model.data import Sample
from model.train import TrainConfig, finetune

from .bench_model import build_model, synthetic_set
from .scenarios import Row, peak_memory, print_table, write_csv


def samples(n: int, resolution: int) -> list[Sample]:
    images, masks = synthetic_set(n, resolution, seed=3)
    return [Sample(image, {"thing": mask}, name=f"s{i}") for i, (image, mask) in enumerate(zip(images, masks))]


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="serving dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=6, help="episodes timed per row (after one warm-up episode)")
    parser.add_argument("--modes", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    parser.add_argument("--checkpointing", nargs="+", default=["no", "yes"], choices=["no", "yes"])
    parser.add_argument("--csv", type=Path, default=Path("bench/results/train_step.csv"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    data = samples(4, args.resolution)
    rows: list[Row] = []
    for mode in args.modes:
        for checkpointing in args.checkpointing:
            params = {"device": device.type, "served": str(dtype).removeprefix("torch."), "resolution": args.resolution,
                      "mode": mode, "checkpointing": checkpointing}
            try:
                model = build_model("sd21", device, dtype, args.resolution)
                config = TrainConfig(steps=args.steps + 1, max_shots=2, mode=mode, seed=0,
                                     gradient_checkpointing=checkpointing == "yes")
                times: list[float] = []
                last = [time.perf_counter()]

                def tick(step: int, loss: float) -> None:
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    now = time.perf_counter()
                    if step > 1:  # the first episode warms up kernels and allocations
                        times.append(now - last[0])
                    last[0] = now

                with peak_memory(device) as mem:
                    result = finetune(model, data, config, on_step=tick)
                figures = {"s_per_episode": float(np.median(times)), "final_loss": result.final_loss, **mem,
                           "trained_mb": sum(v.numel() * v.element_size() for v in result.weights.values()) / 2**20}
                rows.append(Row(f"{mode} step", params, figures))
            except Exception as exc:  # one row per failed setting (e.g. out of memory), not a crash
                rows.append(Row(f"{mode} step", params, error=f"{type(exc).__name__}: {exc}"[:200]))
            finally:
                model = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            print_table(rows[-1:], ["s_per_episode", "peak_mib", "trained_mb"])
    print()
    print_table(rows, ["s_per_episode", "final_loss", "peak_mib", "trained_mb"])
    write_csv(rows, args.csv)
    return rows


if __name__ == "__main__":
    main()
