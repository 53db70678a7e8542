"""Learning curve on CamVid: fine-tune the tiny model on the first n labeled frames, evaluate few-shot on val.

    python -m bench.bench_learning_curve                     # n = 5 10 25 50, 1- and 5-shot, CPU
    python -m bench.bench_learning_curve --n 5 25 --steps 200 --episodes 100
    python -m bench.bench_learning_curve --train-seeds 0 1 2     # mean and sd over three training runs per n

Compares against the predictors that know nothing of the query (copy the support masks, all foreground,
empty: model.scoring.BASELINES, on the same val episodes), (a) the untrained model (the tiny model as shipped: pre-trained on synthetic
episodes only, no real picture), (b) a supervised baseline of about the same size (a diffusers
UNet2DModel on space-to-depth pixels, trained with cross-entropy on the same frames for the same
number of steps, with the same augmentation; it predicts a class map and ignores the supports) and
(c) at one n, the same fine-tuning started from a freshly initialised tiny UNet (what synthetic
pre-training is worth).

"First n frames" are in file order by default (CamVid's first 62 train frames are one dusk sequence,
while val is a daytime one); `--order random` takes them from a seeded shuffle of the train split
instead, as a project using Label Studio's random task sampling would label them.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import UNet2DModel

from model import DiffewS
from model.data import Sample, load_label_map
from model.evaluate import episodes, evaluate, format_table
from model.scoring import BASELINES
from model.images import rgb_to_tensor
from model.train import TrainConfig, colour_change, finetune, flip_scale_crop, recolour

from .scenarios import SHARED, Row, print_table, write_csv

VOID = "\0void"  # key of the ignore mask while it travels through the augmentation with the class masks


class SupervisedBaseline(torch.nn.Module):
    """A per-pixel classifier of about DiffewS-tiny UNet size: a UNet2DModel at 1/4 resolution, logits upsampled."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        # Space-to-depth by 4 (48 channels at 32x32 for a 128px frame) keeps the cost per step near the
        # few-shot model's, which runs its UNet on 1/8-resolution latents.
        self.unet = UNet2DModel(in_channels=3 * 16, out_channels=num_classes, block_out_channels=(32, 64, 64),
                                layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                                up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=8)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.unet(F.pixel_unshuffle(images, 4), 0).sample
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def class_map(image_shape: tuple[int, ...], masks: dict[str, np.ndarray], ignore: np.ndarray | None, classes: list[str]) -> torch.Tensor:
    """Per-pixel class index: k for classes[k], len(classes) for no listed class, -100 (ignored) for void."""
    target = torch.full(image_shape[:2], len(classes), dtype=torch.long)
    for k, c in enumerate(classes):
        if c in masks:
            target[torch.tensor(masks[c])] = k
    if ignore is not None:
        target[torch.tensor(ignore)] = -100
    return target


def supervised_baseline(train: list[Sample], classes: list[str], steps: int, seed: int, augment: bool,
                        batch: int = 1) -> SupervisedBaseline:
    """The baseline trained with cross-entropy on the frames: `steps` updates of `batch` frames each (as
    fine-tuning makes `steps` updates of `batch` episodes).

    With augment it sees the fine-tuning's augmentation: flip, scale-crop and a colour change per frame.
    """
    torch.manual_seed(seed)
    net = SupervisedBaseline(len(classes) + 1)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / steps)  # linear decay, as fine-tuning
    rng = random.Random(seed)
    for _ in range(steps):
        pictures, targets = [], []
        for _ in range(batch):
            s = train[rng.randrange(len(train))]
            image, masks = s.image, {**s.masks, **({VOID: s.ignore} if s.ignore is not None else {})}
            if augment:
                image, masks = flip_scale_crop(image, masks, rng)
                image = recolour(image, colour_change(rng))
            pictures.append(rgb_to_tensor(image))
            ignore = masks.pop(VOID, None)
            targets.append(class_map(image.shape, masks, ignore, classes))
        loss = F.cross_entropy(net(torch.stack(pictures)), torch.stack(targets), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    return net.eval()


@torch.no_grad()
def evaluate_supervised(net: SupervisedBaseline, samples: list[Sample], classes: list[str], shots: int, count: int, seed: int) -> float:
    """mIoU (HSNet sums) of the baseline on the same episodes the few-shot model sees (supports unused)."""
    inter: dict[str, int] = {}
    union: dict[str, int] = {}
    cache: dict[int, np.ndarray] = {}
    for c, query, _ in episodes(samples, classes, shots, count, seed):
        if query not in cache:
            x = rgb_to_tensor(samples[query].image)[None]
            cache[query] = net(x).argmax(1)[0].numpy()
        pred = cache[query] == classes.index(c)
        truth = samples[query].masks[c]
        valid = samples[query].valid
        inter[c] = inter.get(c, 0) + int((pred & truth & valid).sum())
        union[c] = union.get(c, 0) + int(((pred | truth) & valid).sum())
    return float(np.mean([100.0 * inter[c] / union[c] for c in inter if union[c]]))


def averaged(runs: list[dict]) -> dict:
    """Mean of each figure over training seeds, with the sample sd of the mIoUs when there are several runs."""
    out = {key: statistics.fmean(run[key] for run in runs) for key in runs[0]}
    if len(runs) > 1:
        out.update({f"{key} sd": statistics.stdev(run[key] for run in runs) for key in runs[0] if key.endswith("mIoU")})
    return out


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(SHARED / "data" / "camvid"))
    parser.add_argument("--n", type=int, nargs="+", default=[5, 10, 25, 50])
    parser.add_argument("--steps", type=int, default=3000, help="optimizer updates per training run")
    parser.add_argument("--grad-accum", type=int, default=4,
                        help="episodes per update (the released recipe: 4); the baseline gets as many frames per update")
    parser.add_argument("--no-augment", dest="augment", action="store_false", help="fine-tune without augmentation")
    parser.add_argument("--fresh-n", type=int, default=25, help="n at which to also fine-tune a fresh UNet (0: skip)")
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0, help="seed of the val episodes and of --order random")
    parser.add_argument("--train-seeds", type=int, nargs="+", default=[0], help="one training run per seed; figures are means")
    parser.add_argument("--order", choices=["file", "random"], default="file", help="which frames are the first n")
    parser.add_argument("--per-class", action="store_true", help="also print each evaluated model's per-class IoU")
    parser.add_argument("--csv", default="bench/results/learning_curve.csv")
    args = parser.parse_args(argv)
    classes, train_all = load_label_map(args.data, "train", args.resolution, limit=max(args.n) if args.order == "file" else None)
    if args.order == "random":
        random.Random(args.seed).shuffle(train_all)
    _, val = load_label_map(args.data, "val", args.resolution)
    print(f"# learning curve: CamVid, tiny DiffewS at {args.resolution}px on CPU, {args.steps} updates of "
          f"{args.grad_accum} episodes per n, "
          f"augment {args.augment}, {args.order} order, {args.episodes} val episodes per setting, seed {args.seed}, "
          f"training seeds {args.train_seeds}", flush=True)

    def few_shot(model: DiffewS, baselines: bool = False) -> dict:
        results = [evaluate(model, val, classes, shots=k, episode_count=args.episodes, seed=args.seed,
                            baselines=baselines) for k in (1, 5)]
        if args.per_class:
            print(format_table(results), flush=True)
        figures = {f"{r.shots}-shot mIoU": r.miou for r in results}
        if baselines:  # the predictors that know nothing of the query, on the same episodes
            figures["baselines"] = {name: {f"{r.shots}-shot mIoU": b.miou for r in results for b in r.baselines
                                           if b.predictor == name} for name in BASELINES}
        return figures

    rows = []
    untrained = DiffewS.tiny(resolution=args.resolution)
    figures = few_shot(untrained, baselines=True)
    for name, scores in figures.pop("baselines").items():
        rows.append(Row(f"baseline: {name}", {"n": 0, "method": "knows nothing of the query"}, scores))
    rows.append(Row("untrained", {"n": 0, "method": "DiffewS tiny as shipped, no fine-tuning"}, figures))
    print_table(rows, ["1-shot mIoU", "5-shot mIoU"])

    def fine_tuned(n: int, pretrained: bool, seed: int) -> dict:
        start = time.perf_counter()
        model = DiffewS.tiny(resolution=args.resolution, pretrained=pretrained)
        config = TrainConfig(steps=args.steps * args.grad_accum, grad_accum=args.grad_accum, max_shots=5, seed=seed,
                             augment=args.augment)
        result = finetune(model, train_all[:n], config)
        seconds = time.perf_counter() - start  # training only, before the evaluation
        return {**few_shot(model), "final_loss": result.final_loss, "train_s": seconds}

    def supervised(n: int, seed: int) -> dict:
        net = supervised_baseline(train_all[:n], classes, args.steps, seed, args.augment, batch=args.grad_accum)
        return {f"{k}-shot mIoU": evaluate_supervised(net, val, classes, k, args.episodes, args.seed) for k in (1, 5)}

    def over_seeds(run: Callable[[int], dict]) -> dict:
        """One run per training seed, each printed as it ends, averaged."""
        runs = []
        for seed in args.train_seeds:
            runs.append(run(seed))
            print(f"  training seed {seed}: " + ", ".join(f"{k} {v:.3g}" for k, v in runs[-1].items()), flush=True)
        return averaged(runs)

    columns = ["1-shot mIoU", "5-shot mIoU", *(["1-shot mIoU sd", "5-shot mIoU sd"] if len(args.train_seeds) > 1 else []),
               "final_loss", "train_s"]

    for n in args.n:
        rows.append(Row(f"fine-tuned n={n}", {"n": n, "method": "DiffewS tiny, episodic fine-tuning"}, over_seeds(partial(fine_tuned, n, True))))
        print_table(rows[-1:], columns)
        if n == args.fresh_n:
            rows.append(Row(f"fresh UNet n={n}", {"n": n, "method": "same, from a fresh tiny UNet"}, over_seeds(partial(fine_tuned, n, False))))
            print_table(rows[-1:], columns)
        rows.append(Row(f"supervised n={n}", {"n": n, "method": "UNet2DModel, cross-entropy"}, over_seeds(partial(supervised, n))))
        print_table(rows[-1:], columns)
    print()
    print_table(rows, columns)
    write_csv(rows, Path(args.csv))
    return rows


if __name__ == "__main__":
    main()
