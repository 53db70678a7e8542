"""The active-learning loop, measured: label the tasks the model scores worst, or random ones, and watch mIoU.

    python -m bench.bench_active_loop                      # CamVid train frames as the project, tiny model, 128 px

An annotator plays on a project of `--tasks` CamVid frames: `--start` frames are labeled, the rest are tasks.
Each round every unlabeled task is predicted as the backend does (per label, the `--shots` newest labeled
examples holding it; the task's score is its weakest mask's), then the annotator labels `--k` more tasks: the
lowest-scored ones ("active") or random ones ("random"), same seed for both orders. Optionally every
`--finetune-every` rounds the model is fine-tuned on the labeled frames. Reported per round: labels spent and
mIoU on the tasks still unlabeled, for both orders, with the copy-support baseline from the same supports beside
it (a query-blind predictor: what the supports alone are worth), mean and spread over `--seeds`.
"""

from __future__ import annotations

import argparse
import random
import statistics

import numpy as np

from model import DiffewS, TrainConfig, finetune, trainable_copy
from model.data import load_label_map
from model.scoring import Tally, copy_support

from .scenarios import SHARED, Row, print_table

ORDERS = ("active", "random")


def predict_all(model: DiffewS, samples: list, labeled: list[int], unlabeled: list[int], classes: list[str],
                shots: int) -> tuple[dict[int, float], Tally, Tally]:
    """Task scores (weakest mask), and the model's and copy-support's tallies over the unlabeled tasks."""
    memories, support_masks = {}, {}
    for c in classes:
        holding = [i for i in reversed(labeled) if c in samples[i].masks][:shots]  # newest first
        if holding:
            memories[c] = model.encode_support([samples[i].image for i in holding], [samples[i].masks[c] for i in holding])
            support_masks[c] = [samples[i].masks[c] for i in holding]
    queries = model.encode_queries([samples[i].image for i in unlabeled])
    outputs = model.segment_many_encoded(queries, memories)
    scores, tally, copies = {}, Tally(), Tally()
    for task, per_label in zip(unlabeled, outputs):
        sample = samples[task]
        valid = sample.valid
        found = [out.score for out in per_label.values() if out.mask.any()]
        scores[task] = min(found, default=0.0)
        for c, out in per_label.items():
            truth = sample.masks.get(c, np.zeros(sample.image.shape[:2], bool))
            tally.add(c, out.probability > out.threshold, truth, valid)
            copies.add(c, copy_support(support_masks[c], truth.shape), truth, valid)
    return scores, tally, copies


def miou(tally: Tally) -> float:
    per_class = tally.per_class()
    return float(np.mean(list(per_class.values()))) if per_class else float("nan")


def run_order(base: DiffewS, samples: list, classes: list[str], order: str, seed: int, args) -> list[dict]:
    """One annotator's session: per round, labels spent and mIoU of the model and of copy-support."""
    rng = random.Random(seed)
    tasks = list(range(len(samples)))
    rng.shuffle(tasks)
    labeled, unlabeled = tasks[: args.start], tasks[args.start :]
    model, rounds = base, []
    for r in range(args.rounds + 1):
        if args.finetune_every and r and r % args.finetune_every == 0:
            model = trainable_copy(base, "full")
            finetune(model, [samples[i] for i in labeled], TrainConfig(steps=args.finetune_steps, seed=seed, max_shots=args.shots))
        scores, tally, copies = predict_all(model, samples, labeled, unlabeled, classes, args.shots)
        rounds.append({"round": r, "labels": len(labeled), "miou": miou(tally), "copy_miou": miou(copies)})
        if r == args.rounds:
            break
        if order == "active":
            chosen = sorted(unlabeled, key=lambda t: (scores[t], t))[: args.k]
        else:
            chosen = random.Random(seed * 1000 + r).sample(unlabeled, args.k)
        labeled += chosen
        unlabeled = [t for t in unlabeled if t not in chosen]
    return rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED / "data" / "camvid"))
    parser.add_argument("--split", default="train")
    parser.add_argument("--tasks", type=int, default=40)
    parser.add_argument("--start", type=int, default=2)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--finetune-every", type=int, default=0, help="fine-tune on the labeled frames every n rounds")
    parser.add_argument("--finetune-steps", type=int, default=100)
    args = parser.parse_args()
    from model.versions import load_model_or_version

    model = load_model_or_version(args.model, resolution=args.resolution)
    classes, samples = load_label_map(args.data, args.split, model.config.resolution, limit=args.tasks)
    results = {(order, seed): run_order(model, samples, classes, order, seed, args) for seed in args.seeds for order in ORDERS}
    rows = []
    for r in range(args.rounds + 1):
        figures = {"labels": results[(ORDERS[0], args.seeds[0])][r]["labels"]}
        for order in ORDERS:
            values = [results[(order, s)][r]["miou"] for s in args.seeds]
            copies = [results[(order, s)][r]["copy_miou"] for s in args.seeds]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            figures[f"{order}_miou"] = f"{statistics.mean(values):.2f} ± {spread:.2f}"
            figures[f"{order}_copy_miou"] = f"{statistics.mean(copies):.2f}"
        rows.append(Row("active-learning loop", {"round": r, "k": args.k, "tasks": args.tasks}, figures))
    print_table(rows, ["labels", "active_miou", "random_miou", "active_copy_miou", "random_copy_miou"])


if __name__ == "__main__":
    main()
