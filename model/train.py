"""Episodic fine-tuning of DiffewS on labeled images (full UNet or LoRA), resumable and seeded."""

from __future__ import annotations

import contextlib
import json
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .data import Sample
from .errors import DiffewSError, InvalidInputError
from .images import mask_to_tensor, rgb_to_tensor
from .pipeline import DiffewS

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
"""Attention projections that get LoRA adapters (self- and cross-attention)."""


@dataclass
class TrainConfig:
    """Fine-tuning settings; defaults are the published recipe except where noted."""

    steps: int = 1000
    """Episodes drawn, one forward and backward pass each; optimizer updates are steps / grad_accum."""
    max_shots: int = 5
    """Episodes draw k ~ U{1..max_shots} supports (the paper's multi-shot training)."""
    lr: float | None = None
    """AdamW learning rate; None = 1e-5 (published) for SD-family weights, 1e-3 for the tiny UNet and versions of it."""
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    grad_accum: int = 1
    """Episodes per optimizer update. The released run used 4; 1 here so that a short run on few labels
    (the backend's TRAIN_STEPS episodes) makes as many updates as it draws episodes."""
    mode: str = "full"
    """"full" trains the whole UNet; "lora" trains adapters on the attention projections only."""
    lora_rank: int = 8
    augment: bool = False
    """Horizontal flips and scale-crops applied identically to image and masks, and one colour change (brightness,
    contrast, channel gains) shared by all pictures of an episode; latents are then encoded per step."""
    seed: int = 42
    mixed_precision: str = "auto"
    """"auto" (bf16 autocast on CUDA, none on CPU), "bf16", "fp16" or "no"."""
    gradient_checkpointing: bool = False
    checkpoint_every: int = 0
    """Save a resumable training state every this many steps (0 = only at the end)."""

    def __post_init__(self) -> None:
        for name in ("steps", "max_shots", "grad_accum"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.mode not in ("full", "lora"):
            raise InvalidInputError(f"mode must be 'full' or 'lora', got {self.mode!r}")
        if self.mixed_precision not in ("auto", "bf16", "fp16", "no"):
            raise InvalidInputError(f"mixed_precision must be auto, bf16, fp16 or no, got {self.mixed_precision!r}")


@dataclass
class TrainResult:
    """What a run did: steps, the loss per step, the data it saw."""

    steps: int
    losses: list[float] = field(default_factory=list)
    images: int = 0
    labels: dict[str, int] = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    @property
    def final_loss(self) -> float:
        """Mean loss over the last tenth of the run."""
        tail = self.losses[-max(1, len(self.losses) // 10) :]
        return float(np.mean(tail)) if tail else float("nan")


class EpisodeSampler:
    """Draws (label, query index, support indices) episodes from samples, seeded."""

    def __init__(self, samples: Sequence[Sample], max_shots: int, seed: int):
        self.by_label: dict[str, list[int]] = {}
        for i, sample in enumerate(samples):
            for label, mask in sample.masks.items():
                if mask.any():
                    self.by_label.setdefault(label, []).append(i)
        self.labels = sorted(label for label, idx in self.by_label.items() if len(idx) >= 2)
        if not self.labels:
            raise InvalidInputError(
                "no label has foreground in two or more images: an episode needs a query and at least one support"
            )
        self.max_shots = max_shots
        self.rng = random.Random(seed)

    def sample(self) -> tuple[str, int, list[int]]:
        """One episode: a label, a query image and k distinct support images of that label."""
        label = self.rng.choice(self.labels)
        pool = self.by_label[label]
        query = self.rng.choice(pool)
        others = [i for i in pool if i != query]
        k = self.rng.randint(1, min(self.max_shots, len(others)))
        return label, query, self.rng.sample(others, k)


def validate_samples(samples: Sequence[Sample]) -> None:
    """InvalidInputError for an empty set, an image without masks, or masks of another size."""
    if not samples:
        raise InvalidInputError("the training set is empty")
    for sample in samples:
        if not sample.masks:
            raise InvalidInputError(f"{sample.name or 'a sample'}: image without any mask")
        for label, mask in sample.masks.items():
            if mask.shape != sample.image.shape[:2]:
                raise InvalidInputError(
                    f"{sample.name or 'a sample'}: mask {label!r} is {mask.shape} but the image is {sample.image.shape[:2]}"
                )


def flip_scale_crop(image: np.ndarray, masks: dict[str, np.ndarray], rng: random.Random) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Flip and scale-crop image and masks identically (crop of 70-100% of the side, resized back)."""
    from PIL import Image

    size = image.shape[0]
    if rng.random() < 0.5:
        image, masks = image[:, ::-1], {k: m[:, ::-1] for k, m in masks.items()}
    side = int(size * rng.uniform(0.7, 1.0))
    y, x = rng.randint(0, size - side), rng.randint(0, size - side)
    box = (x, y, x + side, y + side)
    image = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((size, size), Image.BILINEAR, box=box))
    masks = {
        k: np.asarray(Image.fromarray(np.ascontiguousarray(m).astype(np.uint8) * 255).resize((size, size), Image.NEAREST, box=box)) > 127
        for k, m in masks.items()
    }
    return image, masks


def colour_change(rng: random.Random) -> np.ndarray:
    """One episode's colour change: [contrast, brightness, gain_r, gain_g, gain_b]."""
    return np.array([rng.uniform(0.7, 1.3), rng.uniform(0.6, 1.4), *(rng.uniform(0.8, 1.2) for _ in range(3))])


def recolour(image: np.ndarray, change: np.ndarray) -> np.ndarray:
    """Apply a colour change to a uint8 RGB picture.

    Written out (five numpy operations) rather than taken from torchvision's ColorJitter: torchvision
    is not a dependency, and the change must be drawn once per episode and applied to every picture
    of it, so that supports and query keep matching while their absolute colours move (the model
    must then use the supports instead of remembering how a class looked in the training pictures).
    """
    x = image.astype(np.float32) / 255
    x = ((x - 0.5) * change[0] + 0.5) * change[1] * change[2:]
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)


class _LatentCache:
    """Posterior (mean, std) of every image and mask, encoded once by the frozen VAE."""

    def __init__(self, model: DiffewS, samples: Sequence[Sample], batch: int = 8):
        self.model = model
        pixels = torch.stack([rgb_to_tensor(s.image) for s in samples])
        self.images = self._encode(pixels, batch)
        keys = [(i, label) for i, s in enumerate(samples) for label in s.masks]
        masks = torch.stack([mask_to_tensor(samples[i].masks[label]) for i, label in keys])
        mean, std = self._encode(masks, batch)
        self.masks = {key: (mean[j], std[j]) for j, key in enumerate(keys)}

    @torch.no_grad()
    def _encode(self, pixels: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [posterior(self.model, chunk) for chunk in pixels.split(batch)]
        return torch.cat([m for m, _ in parts]), torch.cat([s for _, s in parts])


@torch.no_grad()
def posterior(model: DiffewS, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior (mean, std) in the scaled latent space inference uses (x scaling_factor)."""
    dist = model.vae.encode(pixels.to(model.device, model.dtype)).latent_dist
    scale = model.vae.config.scaling_factor
    return dist.mean * scale, dist.std * scale


def _sample_latent(mean: torch.Tensor, std: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    noise = torch.randn(mean.shape, generator=gen, device="cpu").to(mean.device, mean.dtype)
    return (mean + std * noise)


@contextlib.contextmanager
def _fusion_snapshot_ctx(state, snapshot) -> Iterator[None]:
    saved = (state.mode, state.bank)
    state.mode, state.bank = snapshot
    try:
        yield
    finally:
        state.mode, state.bank = saved


def enable_gradient_checkpointing(model: DiffewS) -> None:
    """Gradient checkpointing whose recomputation sees the KV-fusion mode and bank of the original pass."""
    from torch.utils.checkpoint import checkpoint

    state = model.fusion

    def checkpoint_fn(function, *args, **kwargs):
        snapshot = (state.mode, state.bank)

        def context_fn():
            return contextlib.nullcontext(), _fusion_snapshot_ctx(state, snapshot)

        return checkpoint(function, *args, use_reentrant=False, context_fn=context_fn, **kwargs)

    model.unet.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_fn)


def add_lora(model: DiffewS, rank: int) -> None:
    """Attach trainable LoRA adapters (peft) to the UNet's attention projections."""
    from peft import LoraConfig

    model.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS))


def lora_state_dict(model: DiffewS) -> dict[str, torch.Tensor]:
    """The UNet's LoRA adapter weights (what a LoRA version stores)."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model.unet).items()}


def _trainable(model: DiffewS, config: TrainConfig) -> list[torch.nn.Parameter]:
    if config.mode == "lora":
        if not getattr(model.unet, "peft_config", None):
            add_lora(model, config.lora_rank)
        params = [p for n, p in model.unet.named_parameters() if "lora_" in n]
        for p in params:
            p.requires_grad_(True)
        return params
    model.unet.requires_grad_(True)
    return list(model.unet.parameters())


def _autocast(model: DiffewS, config: TrainConfig):
    choice = config.mixed_precision
    if choice == "auto":
        choice = "bf16" if model.device.type == "cuda" else "no"
    if choice == "no":
        return contextlib.nullcontext()
    return torch.autocast(model.device.type, dtype=torch.bfloat16 if choice == "bf16" else torch.float16)


def finetune(
    model: DiffewS,
    samples: Sequence[Sample],
    config: TrainConfig,
    *,
    state_dir: str | Path | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Episodic fine-tuning: loss MSE(-UNet(z_q), z_mq) with gradients through the support K/V.

    `state_dir` holds a resumable state (weights, optimizer, scheduler, RNGs, losses); a run finds
    and continues it. `on_step(step, loss)` reports progress. The model is left in eval mode.
    """
    validate_samples(samples)
    sampler = EpisodeSampler(samples, config.max_shots, config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    aug_rng = random.Random(config.seed + 1)
    params = _trainable(model, config)
    lr = config.lr if config.lr is not None else (1e-3 if model.config.family == "tiny" else 1e-5)
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=config.weight_decay)
    updates = math.ceil(config.steps / config.grad_accum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: max(0.0, 1.0 - u / updates))  # linear decay
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    cache = None if config.augment else _LatentCache(model, samples)
    result = TrainResult(steps=0, images=len(samples), config={**asdict(config), "lr": lr},
                         labels={label: len(idx) for label, idx in sampler.by_label.items()})
    state_path = Path(state_dir) if state_dir else None
    if state_path is not None and (state_path / "state.json").is_file():
        _load_state(model, optimizer, scheduler, sampler, gen, aug_rng, result, state_path)

    model.unet.train()
    try:
        while result.steps < config.steps:
            label, query, supports = sampler.sample()
            z_s, z_ms, z_q, target = _episode_latents(model, samples, cache, label, query, supports, gen, config, aug_rng)
            with _autocast(model, config):
                bank = model.support_kv_torch(z_s, z_ms)
                pred = model.predict_mask_latents_torch(z_q, bank)
            loss = F.mse_loss(pred.float(), target.float())
            (loss / config.grad_accum).backward()
            result.steps += 1
            result.losses.append(float(loss.detach()))
            if result.steps % config.grad_accum == 0 or result.steps == config.steps:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if on_step is not None:
                on_step(result.steps, result.losses[-1])
            if state_path is not None and config.checkpoint_every and result.steps % config.checkpoint_every == 0:
                _save_state(model, optimizer, scheduler, sampler, gen, aug_rng, result, state_path)
    finally:
        model.unet.eval()
        model.unet.requires_grad_(False)
        if config.gradient_checkpointing:
            model.unet.disable_gradient_checkpointing()
    model.support_cache.clear()  # memories encoded by the old weights are stale
    if state_path is not None:
        _save_state(model, optimizer, scheduler, sampler, gen, aug_rng, result, state_path)
    return result


def _episode_latents(model, samples, cache, label, query, supports, gen, config, aug_rng):
    """(z_s [k,4,h,w], z_ms, z_q [1,4,h,w], z_mq target), sampled from the VAE posteriors."""
    if cache is not None:
        z_s = torch.stack([_sample_latent(*_pick(cache.images, i), gen) for i in supports])
        z_ms = torch.stack([_sample_latent(*cache.masks[(i, label)], gen) for i in supports])
        z_q = _sample_latent(*_pick(cache.images, query), gen)[None]
        target = _sample_latent(*cache.masks[(query, label)], gen)[None]
        return z_s, z_ms, z_q, target
    images, masks = [], []
    change = colour_change(aug_rng)
    for i in [*supports, query]:
        image, m = flip_scale_crop(samples[i].image, {label: samples[i].masks[label]}, aug_rng)
        images.append(rgb_to_tensor(recolour(image, change)))
        masks.append(mask_to_tensor(np.ascontiguousarray(m[label])))
    zi = _sample_latent(*posterior(model, torch.stack(images)), gen)
    zm = _sample_latent(*posterior(model, torch.stack(masks)), gen)
    return zi[:-1], zm[:-1], zi[-1:], zm[-1:]


def _pick(pair: tuple[torch.Tensor, torch.Tensor], i: int) -> tuple[torch.Tensor, torch.Tensor]:
    return pair[0][i], pair[1][i]


def trainable_state(model: DiffewS, params_mode: str) -> dict[str, torch.Tensor]:
    """The weights a run changes: LoRA adapters, or the whole UNet."""
    if params_mode == "lora":
        return lora_state_dict(model)
    return {k: v.detach().cpu().contiguous() for k, v in model.unet.state_dict().items()}


def _save_state(model, optimizer, scheduler, sampler, gen, aug_rng, result, path: Path) -> None:
    """Write a resumable training state (safetensors weights + torch optimizer state of plain tensors)."""
    path.mkdir(parents=True, exist_ok=True)
    mode = result.config["mode"]
    save_file(trainable_state(model, mode), path / "weights.tmp.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "generator": gen.get_state()}, path / "optimizer.tmp.pt")
    (path / "state.tmp.json").write_text(json.dumps({
        "steps": result.steps, "losses": result.losses, "sampler_rng": _rng_state(sampler.rng),
        "aug_rng": _rng_state(aug_rng),
    }))
    for name in ("weights.safetensors", "optimizer.pt", "state.json"):  # state.json last: it marks completeness
        (path / name.replace(".", ".tmp.", 1)).replace(path / name)


def _rng_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _restore_rng(rng: random.Random, saved: list) -> None:
    version, internal, gauss = saved
    rng.setstate((version, tuple(internal), gauss))


def _load_state(model, optimizer, scheduler, sampler, gen, aug_rng, result, path: Path) -> None:
    state = json.loads((path / "state.json").read_text())
    weights = load_file(path / "weights.safetensors")
    if result.config["mode"] == "lora":
        from peft.utils import set_peft_model_state_dict

        set_peft_model_state_dict(model.unet, weights)
    else:
        model.unet.load_state_dict(weights)
    # Our own file of plain tensors and numbers (written by _save_state), so weights_only loading suffices.
    opt = torch.load(path / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    gen.set_state(opt["generator"])
    _restore_rng(sampler.rng, state["sampler_rng"])
    _restore_rng(aug_rng, state["aug_rng"])
    result.steps = state["steps"]
    result.losses = list(state["losses"])


def main(argv: list[str] | None = None) -> int:
    """`python -m model.train`: fine-tune on a label-map dataset split and write a version folder."""
    import argparse

    from tqdm import tqdm

    from .data import load_label_map
    from .versions import load_model_or_version, save_version

    parser = argparse.ArgumentParser(description="Episodic fine-tuning of DiffewS on a label-map dataset")
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="train")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N images")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--resolution", type=int, default=None, help="working resolution (default: the model's)")
    parser.add_argument("--out", required=True, help="folder of versions; the new one is written inside it")
    parser.add_argument("--name", required=True)
    parser.add_argument("--steps", type=int, default=1000,
                        help="episodes drawn (one forward and backward pass each); optimizer updates are "
                             "steps / --grad-accum")
    parser.add_argument("--grad-accum", type=int, default=1,
                        help="episodes per optimizer update (the released recipe: 4)")
    parser.add_argument("--max-shots", type=int, default=5, help="episodes draw k ~ U{1..max-shots} supports")
    parser.add_argument("--mode", choices=["full", "lora"], default="full")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--augment", action="store_true",
                        help="flips, scale-crops and one colour change per episode (recommended with few images)")
    parser.add_argument("--state-dir", default=None, help="resumable training state (continues a killed run)")
    args = parser.parse_args(argv)
    try:
        config = TrainConfig(steps=args.steps, grad_accum=args.grad_accum, max_shots=args.max_shots, mode=args.mode,
                             lr=args.lr, seed=args.seed, augment=args.augment,
                             checkpoint_every=100 if args.state_dir else 0)
        model = load_model_or_version(args.model, resolution=args.resolution)
        _, samples = load_label_map(args.data, args.split, model.config.resolution, limit=args.limit)
    except DiffewSError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    print(f"seed {args.seed}; {len(samples)} images; {config.steps} episodes, "
          f"{math.ceil(config.steps / config.grad_accum)} optimizer updates", flush=True)
    with tqdm(total=config.steps, desc="fine-tune") as bar:
        def on_step(step: int, loss: float) -> None:
            bar.n = step
            bar.set_postfix(loss=f"{loss:.4f}")
            bar.refresh()

        result = finetune(model, samples, config, state_dir=args.state_dir, on_step=on_step)
    base = {"version": args.model} if (Path(args.model) / "version.json").is_file() else {"spec": args.model}
    path = save_version(model, args.out, args.name, base=base, parent=args.model, mode=args.mode,
                        summary={"steps": result.steps, "final_loss": result.final_loss, "images": result.images,
                                 "labels": result.labels})
    print(f"wrote {path} (final loss {result.final_loss:.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
