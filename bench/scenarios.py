"""Shared benchmark helpers: scenario records, timing, peak memory and the table printer."""

from __future__ import annotations

import csv
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import torch

SHARED = Path(os.environ.get("DIFFEWS_SHARED", Path(__file__).resolve().parents[2] / "shared"))
"""The team's shared folder (configs, CamVid); benchmarks may read it, tests never do."""


@dataclass
class Row:
    """One benchmark result: a scenario's name and parameters, its figures, or its error."""

    scenario: str
    params: dict
    figures: dict = field(default_factory=dict)
    error: str = ""


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict]:
    """Measure peak memory of the block in MiB: CUDA allocator peak, or process RSS sampled every 5 ms on CPU."""
    out: dict = {}
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        yield out
        torch.cuda.synchronize()
        out["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        return
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            stop.wait(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        out["peak_mib"] = peak[0] / 2**20
        out["peak_over_start_mib"] = (peak[0] - base) / 2**20


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> list[float]:
    """Wall-clock seconds of `repeats` calls of fn (after the caller's warm-up), synchronising CUDA."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def matcher_on_camvid(parser, csv: str, resolution: int = 384) -> None:
    """Add the options every matcher-on-CamVid bench shares: --data, --resolution, --backbone, --csv."""
    parser.add_argument("--data", default=str(SHARED / "data" / "camvid"))
    parser.add_argument("--resolution", type=int, default=resolution)
    parser.add_argument("--backbone", default="effnet-lite0")
    parser.add_argument("--csv", default=csv)


def print_table(rows: Sequence[Row], columns: Sequence[str]) -> None:
    """Print rows as a Markdown table: scenario, its params, then the named figures (or the error)."""
    param_keys = list(dict.fromkeys(k for r in rows for k in r.params))
    header = ["scenario", *param_keys, *columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r.scenario, *(str(r.params.get(k, "")) for k in param_keys)]
        if r.error:
            cells += [f"ERROR: {r.error}"] + [""] * (len(columns) - 1)
        else:
            cells += [_fmt(r.figures.get(c, "")) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    print("\n".join(lines), flush=True)


def write_csv(rows: Sequence[Row], path: Path) -> None:
    """One CSV row per scenario, params and figures flattened, errors kept."""
    flat = [{"scenario": r.scenario, **r.params, **r.figures, "error": r.error} for r in rows]
    keys = list(dict.fromkeys(k for row in flat for k in row))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(flat)


def _fmt(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


__all__ = ["Row", "SHARED", "asdict", "peak_memory", "print_table", "timed", "write_csv"]
