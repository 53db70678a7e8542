"""Design points of the matcher on CamVid val (model.evaluate's episodes): a table per setting.

    python -m bench.tune_matcher --data ../shared/data/camvid --episodes 200 --resolution 256
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from model.data import load_label_map
from model.evaluate import evaluate
from model.matcher import Matcher

VARIANTS = {
    "default": {},
    "bilinear (no guided filter)": {"guide_radius": 0},
    "guide radius 8": {"guide_radius": 8},
    "bias +0.05": {"bias": 0.05},
    "bias -0.05": {"bias": -0.05},
    "max 256 vectors": {"max_vectors": 256},
    "max 512 vectors": {"max_vectors": 512},
    "max 4096 vectors": {"max_vectors": 4096},
}
"""Name -> MatcherConfig fields changed from the default."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--backbones", nargs="+", default=["effnet-lite0"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    args = parser.parse_args()
    print("| backbone | variant | 1-shot mIoU | 5-shot mIoU | copy support 1 / 5 |")
    print("|---|---|---|---|---|")
    for backbone in args.backbones:
        base = Matcher.from_pretrained(backbone, resolution=args.resolution)
        classes, samples = load_label_map(args.data, "val", args.resolution)
        for name in args.variants:
            model = base.with_head(None, replace(base.config, **VARIANTS[name]))
            scores = [evaluate(model, samples, classes, shots=k, episode_count=args.episodes, seed=args.seed,
                               baselines=True) for k in (1, 5)]
            copy = [next(b.miou for b in r.baselines if b.predictor == "copy support") for r in scores]
            print(f"| {backbone} | {name} | {scores[0].miou:.2f} | {scores[1].miou:.2f} | {copy[0]:.2f} / {copy[1]:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
