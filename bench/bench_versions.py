"""Size on disk, load (hot-swap) time and memory of a fine-tuned version: an adapter or a UNet over the shared
base, against the naive way (every version loaded as a whole model with its own base, as before).

    python -m bench.bench_versions                                   # tiny, and SD 2.1 if the release folder exists
    python -m bench.bench_versions --arch sd21 --release /tmp/diffews-real-scale/release

The SD 2.1 release folder is the random-weight one bench_real_scale writes (the exact architecture).
"""

from __future__ import annotations

import argparse
import gc
import shutil
import tempfile
import time
from pathlib import Path

import torch

from model import DiffewS
from model.adapters import TRAIN_ADAPTER
from model.train import add_lora
from model.versions import attach_version, load_version, save_version, trainable_copy

from .scenarios import Row, print_table, write_csv


def tensors(model: DiffewS) -> dict[int, int]:
    """data_ptr -> bytes of every parameter and buffer the model holds (VAE, UNet with adapters, decoder copy)."""
    out = {}
    for module in (model.vae, model.unet, model.decode_vae):
        if module is None:
            continue
        for t in [*module.parameters(), *module.buffers()]:
            out[t.data_ptr()] = t.numel() * t.element_size()
    return out


def new_mb(model: DiffewS, before: dict[int, int]) -> float:
    """Memory of the tensors `model` holds that were not held before it was loaded (RSS is no measure here:
    the allocator reuses pages freed by the save)."""
    return sum(size for ptr, size in tensors(model).items() if ptr not in before) / 2**20


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def make_versions(host: DiffewS, root: Path, spec: dict, rank: int) -> dict[str, Path]:
    """A LoRA version (rank `rank`, nonzero B) and a full version of `host`, saved under `root`."""
    lora = trainable_copy(host, "lora")
    add_lora(lora, rank)
    with torch.no_grad():
        for name, param in lora.unet.named_parameters():
            if f"lora_B.{TRAIN_ADAPTER}." in name:
                param.normal_(std=1e-3)
    return {"lora": save_version(lora, root, "v-lora", base=spec, parent=None, mode="lora", summary={}),
            "full": save_version(host, root, "v-full", base=spec, parent=None, mode="full", summary={})}


def measure(arch: str, host: DiffewS, spec: dict, rank: int, root: Path) -> list[Row]:
    folders = make_versions(host, root, spec, rank)
    rows = []
    for mode, folder in folders.items():
        params = {"arch": arch, "dtype": str(host.dtype).removeprefix("torch."), "version": mode}
        for way in ("shared base", "naive: whole model"):
            gc.collect()
            before = tensors(host)
            started = time.perf_counter()
            model = attach_version(host, folder) if way == "shared base" else load_version(folder, dtype=host.dtype)
            seconds = time.perf_counter() - started
            grown = new_mb(model, before)
            rows.append(Row(f"{arch} {mode} version, {way}", {**params, "way": way},
                            {"disk_mb": folder_mb(folder), "load_s": seconds, "new_tensors_mb": grown}))
            print_table(rows[-1:], ["disk_mb", "load_s", "new_tensors_mb"])
            if way == "shared base" and model.adapter:
                from model.adapters import remove_adapter

                remove_adapter(model, model.adapter)
            del model
    return rows


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=["tiny", "sd21"], choices=["tiny", "sd21"])
    parser.add_argument("--release", type=Path, default=Path("/tmp/diffews-real-scale/release"))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--csv", type=Path, default=Path("bench/results/versions.csv"))
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    rows: list[Row] = []
    for arch in args.arch:
        if arch == "sd21" and not (args.release / "weight").is_dir():
            rows.append(Row(f"{arch}", {"arch": arch}, error=f"no release folder at {args.release}: run bench_real_scale"))
            continue
        root = Path(tempfile.mkdtemp(prefix=f"versions-{arch}-"))
        try:
            if arch == "tiny":
                host, spec = DiffewS.tiny(resolution=256, device="cpu", dtype=dtype), {"spec": "tiny"}
            else:
                host = DiffewS.from_pretrained(args.release, device="cpu", dtype=dtype)
                spec = {"spec": str(args.release), "unet": None}
            rows += measure(arch, host, spec, args.rank, root)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    print()
    print_table(rows, ["disk_mb", "load_s", "new_tensors_mb"])
    write_csv(rows, args.csv)
    return rows


if __name__ == "__main__":
    main()
