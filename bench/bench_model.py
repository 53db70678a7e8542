"""Queries/s and peak memory of DiffewS inference: naive (release-style) vs support memory reused vs reused + batched.

    python -m bench.bench_model                 # tiny model on CPU (and SD 2.1 random weights if a GPU is present)
    python -m bench.bench_model --arch sd21 --device cuda --dtype bfloat16 float32

With --labels L (3 by default) it also compares, per shot count, L labels per query segmented by the
per-label loop against one UNet batch of (query, label) pairs across labels (segment_many), with the
share of mask pixels on which the two disagree.
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from model import DiffewS, DiffewSConfig
from model.unet_ref import add_conv_in_ref_by_surgery

from .scenarios import SHARED, Row, peak_memory, print_table, timed, write_csv

MODES = ("naive", "reused", "reused+batched")


def build_model(arch: str, device: torch.device, dtype: torch.dtype, resolution: int) -> DiffewS:
    """The tiny model, or the exact SD 2.1 architecture (from shared/data/sd21-config) with random weights."""
    if arch == "tiny":
        return DiffewS.tiny(resolution=resolution, device=device, dtype=dtype)
    config_dir = SHARED / "data" / "sd21-config"
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae"))
    add_conv_in_ref_by_surgery(unet)
    embeds = torch.randn(1, 2, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(0))
    config = DiffewSConfig(resolution=resolution, trained=False, name="sd21-random")
    return DiffewS(vae, unet, embeds, config, device=device, dtype=dtype, source=str(config_dir))


def synthetic_set(n: int, resolution: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """n random RGB images of the working size with a rectangle mask each."""
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8) for _ in range(n)]
    masks = []
    for _ in range(n):
        m = np.zeros((resolution, resolution), bool)
        y, x = rng.integers(0, resolution // 2, 2)
        m[y : y + resolution // 3, x : x + resolution // 3] = True
        masks.append(m)
    return images, masks


def run_mode(model: DiffewS, mode: str, shots: int, queries: list[np.ndarray], batch: int, repeats: int) -> dict:
    """Time one mode over all queries; returns queries/s, seconds and peak memory."""
    sup_images, sup_masks = synthetic_set(shots, model.config.resolution, seed=1)
    model.support_cache.clear()

    if mode == "naive":  # as released: support pass recomputed for every query, batch 1

        def work() -> None:
            for q in queries:
                memory = model.encode_support(sup_images, sup_masks, use_cache=False)
                model.segment([q], memory, batch_size=1)
    else:
        memory = model.encode_support(sup_images, sup_masks)
        size = 1 if mode == "reused" else batch

        def work() -> None:
            model.segment(queries, memory, batch_size=size)

    work()  # warm-up
    with peak_memory(model.device) as mem:
        seconds = timed(work, model.device, repeats)
    best = min(seconds)
    return {"queries_per_s": len(queries) / best, "s_per_query": best / len(queries),
            "median_s": statistics.median(seconds), **mem}


def run_labels(model: DiffewS, shots: int, queries: list[np.ndarray], labels: int, batch: int, repeats: int) -> list[dict]:
    """Several labels per query: the per-label loop (each label's memory against the encoded queries) vs one
    batch of (query, label) pairs across labels (segment_many); figures per mode, with the masks' agreement."""
    memories = {}
    for j in range(labels):
        images, masks = synthetic_set(shots, model.config.resolution, seed=10 + j)
        memories[f"label{j}"] = model.encode_support(images, masks)
    results: dict[str, list] = {}

    def per_label() -> None:
        encoded = model.encode_queries(queries, batch_size=batch)
        outs = {label: model.segment_encoded(encoded, memory, batch_size=batch) for label, memory in memories.items()}
        results["per-label loop"] = [{label: outs[label][i] for label in memories} for i in range(len(queries))]

    def across_labels() -> None:
        results["batched across labels"] = model.segment_many(queries, memories, batch_size=batch)

    figures = []
    for mode, work in (("per-label loop", per_label), ("batched across labels", across_labels)):
        work()  # warm-up
        with peak_memory(model.device) as mem:
            seconds = timed(work, model.device, repeats)
        pairs = len(queries) * labels
        figures.append({"mode": mode, "pairs_per_s": pairs / min(seconds), "queries_per_s": len(queries) / min(seconds), **mem})
    loop, batched = results["per-label loop"], results["batched across labels"]
    differing = np.mean([(a[label].mask != b[label].mask).mean() for a, b in zip(loop, batched) for label in a])
    for f in figures:
        f["mask_pixels_differing"] = float(differing)
    return figures


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["tiny", "sd21"], nargs="+", default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", nargs="+", default=None, help="float32, bfloat16, float16")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--labels", type=int, default=3, help="labels per query in the across-labels comparison (0: skip)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES,
                        help="which ways to time (reused alone is a warm click: query encode, UNet, decode)")
    parser.add_argument("--compile", nargs="+", choices=["no", "yes"], default=["no"],
                        help="run each setting without and/or with torch.compile of the UNet and VAE")
    parser.add_argument("--csv", type=Path, default=Path("bench/results/model.csv"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    archs = args.arch or (["tiny", "sd21"] if device.type == "cuda" else ["tiny"])
    dtypes = args.dtype or (["float32", "bfloat16"] if device.type == "cuda" else ["float32"])
    print(f"# bench_model on {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else platform.processor() or 'cpu'}, "
          f"{torch.get_num_threads()} threads), torch {torch.__version__}, {args.queries} queries of "
          f"{args.resolution}x{args.resolution}, batch {args.batch}", flush=True)

    rows: list[Row] = []
    settings = [(arch, dtype_name, compiled) for arch in archs for dtype_name in dtypes for compiled in args.compile]
    for arch, dtype_name, compiled in settings:
        try:
            model = build_model(arch, device, getattr(torch, dtype_name), args.resolution)
            if compiled == "yes":
                model.compile()
        except Exception as exc:  # one row per failed scenario, not a crash of the whole run
            rows.append(Row(f"{arch} build", {"dtype": dtype_name, "compile": compiled}, error=repr(exc)))
            continue
        queries, _ = synthetic_set(args.queries, args.resolution, seed=2)
        for shots in args.shots:
            naive_qps = None
            for mode in args.modes:
                params = {"arch": arch, "dtype": dtype_name, "compile": compiled, "shots": shots, "mode": mode}
                try:
                    figures = run_mode(model, mode, shots, queries, args.batch, args.repeats)
                except Exception as exc:
                    rows.append(Row(f"{arch}/{shots}-shot/{mode}", params, error=repr(exc)))
                    continue
                naive_qps = figures["queries_per_s"] if mode == "naive" else naive_qps
                if naive_qps:
                    figures["speedup_vs_naive"] = figures["queries_per_s"] / naive_qps
                rows.append(Row(f"{arch}/{shots}-shot/{mode}", params, figures))
                print_table(rows[-1:], ["queries_per_s", "speedup_vs_naive", "peak_mib"])
            if args.labels:
                for figures in run_labels(model, shots, queries, args.labels, args.batch, args.repeats):
                    mode = figures.pop("mode")
                    params = {"arch": arch, "dtype": dtype_name, "compile": compiled, "shots": shots,
                              "mode": f"{args.labels} labels, {mode}"}
                    rows.append(Row(f"{arch}/{shots}-shot/{args.labels} labels/{mode}", params, figures))
                    print_table(rows[-1:], ["pairs_per_s", "mask_pixels_differing", "peak_mib"])
        del model
    print()
    print_table(rows, ["queries_per_s", "s_per_query", "speedup_vs_naive", "pairs_per_s", "mask_pixels_differing",
                       "peak_mib", "peak_over_start_mib"])
    write_csv(rows, args.csv)
    return rows


if __name__ == "__main__":
    main()
