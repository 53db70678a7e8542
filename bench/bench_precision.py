"""What the working precision (DIFFEWS_DTYPE) costs in accuracy: bf16 and fp16 against fp32 on the same inputs.

    python -m bench.bench_precision                          # tiny (trained) and SD 2.1 architecture (random), CPU
    python -m bench.bench_precision --arch sd21 --device cuda --resolution 512

Per precision: the largest difference of the predicted mask latent (-UNet(z_q)) from fp32's, the largest
difference of the decoded probability map, the mean IoU of the masks with fp32's masks, and seconds per
query. The decode and the threshold run in fp32 in every row (as the pipeline does); "fp16" computes the
fused self-attention in fp32. On a CPU bf16 and fp16 are emulated: their speed there says nothing of a GPU.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from model.pipeline import DTYPES
from model.scoring import episode_iou

from .bench_model import build_model, synthetic_set
from .scenarios import Row, print_table, write_csv

COLUMNS = ["latent_max_abs_diff", "prob_max_abs_diff", "mask_iou_vs_fp32", "s_per_query"]


@torch.inference_mode()
def run(arch: str, device: torch.device, resolution: int, shots: int, queries: int) -> list[Row]:
    """One row per precision, each against the fp32 model built from the same weights."""
    sup_images, sup_masks = synthetic_set(shots, resolution, seed=1)
    query_images, _ = synthetic_set(queries, resolution, seed=2)
    reference: dict | None = None
    rows = []
    for name, dtype in DTYPES.items():
        torch.manual_seed(0)  # the SD 2.1 build draws random weights: the same ones for every precision
        model = build_model(arch, device, dtype, resolution)
        start = time.perf_counter()
        memory = model.encode_support(sup_images, sup_masks, use_cache=False)
        encoded = model.encode_queries(query_images)
        bank = memory.to(model.device, model.dtype).kv
        latents = torch.cat([model.predict_mask_latents_torch(encoded.latents[i : i + 1], bank) for i in range(queries)])
        outputs = model.segment_encoded(encoded, memory)
        seconds = (time.perf_counter() - start) / queries
        result = {"latents": latents.float().cpu(), "prob": np.stack([o.probability for o in outputs]),
                  "masks": [o.mask for o in outputs]}
        if reference is None:
            reference = result
        figures = {
            "latent_max_abs_diff": float((result["latents"] - reference["latents"]).abs().max()),
            "prob_max_abs_diff": float(np.abs(result["prob"] - reference["prob"]).max()),
            "mask_iou_vs_fp32": float(np.mean([episode_iou(a, b, np.ones_like(a)) for a, b in zip(result["masks"], reference["masks"])])),
            "s_per_query": seconds,
        }
        rows.append(Row(f"{arch} {name}", {"arch": arch, "dtype": name, "resolution": resolution, "shots": shots},
                        figures))
        print_table(rows[-1:], COLUMNS)
        del model
    return rows


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", choices=["tiny", "sd21"], default=["tiny", "sd21"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--shots", type=int, default=2)
    parser.add_argument("--queries", type=int, default=4)
    parser.add_argument("--csv", default="bench/results/precision.csv")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(f"# bench_precision: {args.shots}-shot, {args.queries} queries at {args.resolution} px on {device}", flush=True)
    rows = [row for arch in args.arch for row in run(arch, device, args.resolution, args.shots, args.queries)]
    print()
    print_table(rows, COLUMNS)
    write_csv(rows, Path(args.csv))
    return rows


if __name__ == "__main__":
    main()
