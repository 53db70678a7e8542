"""Would the backend promote a matcher head fine-tuned on n CamVid frames? The backend's own cross-validation
(backend.worker.training.cross_validate, then backend.core.promotion.decide) on n train frames per seed, with the
training the backend runs (Settings' TRAIN_* defaults unless given), beside the head's gain on CamVid val.

    python -m bench.bench_matcher_promotion --n 25 --seeds 0 1 2 --resolution 256

Frames are drawn from the train split with each seed, as bench.bench_matcher_finetune draws them.
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path
from types import SimpleNamespace

from backend.core.promotion import decide
from backend.core.settings import Settings
from backend.worker.training import cross_validate, train_config
from model.data import load_label_map
from model.evaluate import evaluate
from model.matcher import Matcher
from model.train import finetune
from model.versions import trainable_copy

from .scenarios import Row, matcher_on_camvid, print_table, write_csv


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=25)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="TRAIN_STEPS (default: the backend's)")
    parser.add_argument("--max-shots", type=int, default=None, help="TRAIN_MAX_SHOTS (default: the backend's)")
    parser.add_argument("--episodes", type=int, default=200, help="val episodes scoring the head's gain")
    matcher_on_camvid(parser, "bench/results/matcher_promotion.csv", resolution=256)
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in (("train_steps", args.steps), ("train_max_shots", args.max_shots)) if v is not None}
    settings = Settings(model_dir=Path(tempfile.mkdtemp()), model_spec="", matcher_resolution=args.resolution,
                        **overrides)
    base = Matcher.from_pretrained(args.backbone, resolution=args.resolution)
    classes, val = load_label_map(args.data, "val", args.resolution)
    _, train = load_label_map(args.data, "train", args.resolution)
    free = evaluate(base, val, classes, shots=1, episode_count=args.episodes, seed=0).miou
    ctx = SimpleNamespace(models=SimpleNamespace(get=lambda name: base))  # the served base is the incumbent
    rows = []
    for seed in args.seeds:
        samples = [train[i] for i in random.Random(seed).sample(range(len(train)), args.n)]
        labels = sorted({label for s in samples for label in s.masks})
        config = train_config(settings, seed, base)
        model = trainable_copy(base, settings.train_mode)
        finetune(model, samples, config)
        gain = evaluate(model, val, classes, shots=1, episode_count=args.episodes, seed=0).miou - free
        ious, folds = cross_validate(ctx, base, samples, labels, config, ["base"], settings)
        decision = decide("candidate", ious, ["base"], images=len(samples), folds=folds)
        versus = decision.evidence["versus"]["base"]
        rows.append(Row("matcher", {"n": args.n, "seed": seed, "steps": config.steps, "tuned_blocks": model.config.tuned_blocks},
                        {"cv episodes": decision.evidence["episodes"], "cv difference": versus["difference"],
                         "cv standard error": versus["standard_error"], "promoted": decision.promoted,
                         "val 1-shot gain": round(gain, 2)}))
        print(f"seed {seed}: {decision.reason}; val 1-shot gain {gain:+.2f}", flush=True)
    print_table(rows, ["cv episodes", "cv difference", "cv standard error", "promoted", "val 1-shot gain"])
    write_csv(rows, Path(args.csv))
    return rows


if __name__ == "__main__":
    main()
