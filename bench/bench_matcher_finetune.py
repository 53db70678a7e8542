"""Learning curve of the matcher's fine-tuning on CamVid: a projection head and the backbone's last blocks trained
on n train frames, scored on val few-shot episodes, against the training-free matcher and copy-support on the
same episodes.

    python -m bench.bench_matcher_finetune --n 5 10 25 50 --train-seeds 0 1 2 --resolution 256
    python -m bench.bench_matcher_finetune --n 25 --tuned-blocks 0     # the head alone

Frames are drawn from the train split with each training seed (as a project labels tasks in random order).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

from model.data import load_label_map
from model.evaluate import evaluate
from model.matcher import Matcher
from model.train import TrainConfig, finetune
from model.versions import trainable_copy

from .scenarios import Row, matcher_on_camvid, print_table, write_csv


def _spread(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f}"


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[5, 10, 25, 50])
    parser.add_argument("--train-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=500, help="episodes (the backend's default for the matcher)")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--augment", action="store_true", help="episodes draw each image mirrored or not")
    parser.add_argument("--max-shots", type=int, default=5, help="training episodes draw 1 to this many supports")
    parser.add_argument("--tuned-blocks", type=int, default=None,
                        help="backbone blocks trained with the head (default: the product's; 0: the head alone)")
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0, help="seed of the val episodes")
    matcher_on_camvid(parser, "bench/results/matcher_finetune.csv", resolution=256)
    args = parser.parse_args(argv)
    base = Matcher.from_pretrained(args.backbone, resolution=args.resolution)
    classes, val = load_label_map(args.data, "val", args.resolution)
    _, train = load_label_map(args.data, "train", args.resolution)

    def score(model) -> dict[int, float]:
        return {k: evaluate(model, val, classes, shots=k, episode_count=args.episodes, seed=args.seed).miou for k in (1, 5)}

    free = {k: evaluate(base, val, classes, shots=k, episode_count=args.episodes, seed=args.seed, baselines=True)
            for k in (1, 5)}
    copy = {k: next(b.miou for b in r.baselines if b.predictor == "copy support") for k, r in free.items()}
    rows = [Row("training-free matcher", {"n": 0}, {f"{k}-shot": f"{r.miou:.2f}" for k, r in free.items()}),
            Row("copy support", {"n": 0}, {f"{k}-shot": f"{v:.2f}" for k, v in copy.items()})]
    print_table(rows, ["1-shot", "5-shot"])
    for n in args.n:
        runs, seconds = [], []
        for seed in args.train_seeds:
            frames = random.Random(seed).sample(range(len(train)), n)
            model = trainable_copy(base, "head")
            start = time.perf_counter()
            result = finetune(model, [train[i] for i in frames],
                              TrainConfig(steps=args.steps, lr=args.lr, seed=seed, augment=args.augment,
                                          max_shots=args.max_shots, tuned_blocks=args.tuned_blocks))
            seconds.append(time.perf_counter() - start)
            runs.append(score(model))
        figures = {f"{k}-shot": _spread([r[k] for r in runs]) for k in (1, 5)}
        figures |= {f"{k}-shot gain": _spread([r[k] - free[k].miou for r in runs]) for k in (1, 5)}
        figures["train_s"] = statistics.mean(seconds)
        params = {"n": n, "steps": args.steps, "augment": args.augment, "max_shots": args.max_shots,
                  "tuned_blocks": result.config["tuned_blocks"], "seeds": len(args.train_seeds)}
        rows.append(Row("fine-tuned", params, figures))
        print(f"n={n}: {figures}", flush=True)
    print_table(rows, ["1-shot", "5-shot", "1-shot gain", "5-shot gain", "train_s"])
    write_csv(rows, Path(args.csv))
    return rows


if __name__ == "__main__":
    main()
