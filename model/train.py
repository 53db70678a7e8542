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
from peft.utils import set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from .adapters import TRAIN_ADAPTER, add_adapter, adapter_parameters, lora_config, trainable_state
from .data import Sample
from .errors import DiffewSError, InvalidInputError
from .images import mask_to_tensor, rgb_to_tensor
from .matcher import Matcher
from .pipeline import DiffewS
from .unet_weights import plain_unet_state
from .versions import load_model_or_version, save_version, trainable_copy


@dataclass
class TrainConfig:
    """Fine-tuning settings; defaults are the published recipe except where noted."""

    steps: int = 1000
    """Episodes drawn, one forward and backward pass each; optimizer updates are steps / grad_accum."""
    max_shots: int = 5
    """Episodes draw k ~ U{1..max_shots} supports (the paper's multi-shot training)."""
    lr: float | None = None
    """AdamW learning rate; None = default_lr: 1e-5 (published) for a full SD UNet, 1e-4 for SD LoRA adapters,
    1e-3 for the tiny UNet and versions of it."""
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    grad_accum: int = 1
    """Episodes per optimizer update. The released run used 4; 1 here so that a short run on few labels
    (the backend's TRAIN_STEPS episodes) makes as many updates as it draws episodes."""
    mode: str = "full"
    """"full" trains the whole UNet; "lora" trains adapters on the attention projections only."""
    lora_rank: int = 8
    tuned_blocks: int | None = None
    """The matcher: its backbone's last blocks trained with its head (None: matcher_train.DEFAULT_TUNED_BLOCKS where
    the backbone can train them; 0: the head only)."""
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
        if self.tuned_blocks is not None and self.tuned_blocks < 0:
            raise InvalidInputError(f"tuned_blocks must be >= 0, got {self.tuned_blocks}")
        if self.mode not in ("full", "lora"):
            raise InvalidInputError(f"mode must be 'full' or 'lora', got {self.mode!r}")
        if self.mixed_precision not in ("auto", "bf16", "fp16", "no"):
            raise InvalidInputError(f"mixed_precision must be auto, bf16, fp16 or no, got {self.mixed_precision!r}")


@dataclass
class TrainResult:
    """What a run did: steps, the loss per step, the data it saw, and the float32 master weights it trained."""

    steps: int
    losses: list[float] = field(default_factory=list)
    images: int = 0
    labels: dict[str, int] = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    weights: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    """The trained weights in float32 (the adapter, or the whole UNet): what a version saves."""

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
    """VAE posterior (mean, std) in the scaled latent space inference uses (x scaling_factor), in the UNet's dtype."""
    dist = model.vae.encode(pixels.to(model.device, model.vae.dtype)).latent_dist
    scale = model.vae.config.scaling_factor
    return (dist.mean * scale).to(model.dtype), (dist.std * scale).to(model.dtype)


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
    """Attach a trainable float32 LoRA adapter (TRAIN_ADAPTER) to the UNet's attention projections and run with it."""
    add_adapter(model, lora_config(rank), TRAIN_ADAPTER)
    model.adapter = TRAIN_ADAPTER


def default_lr(family: str, mode: str) -> float:
    """The learning rate a run uses unless told: the published 1e-5 for a full SD UNet, 1e-4 for LoRA adapters
    (diffusers' LoRA recipes), 1e-3 for the tiny model."""
    if family == "tiny":
        return 1e-3
    return 1e-4 if mode == "lora" else 1e-5


def master_model(model: DiffewS, config: TrainConfig) -> DiffewS:
    """The model whose float32 weights a run trains: `model` itself when they are float32 already (its adapter,
    or its float32 UNet), else a float32 copy of its UNet over model's VAE and prompt embedding.

    Training bf16 or fp16 weights in place would round most AdamW updates away (an update below half a
    bf16 step is lost); the master copy keeps them, and the trained weights go back to `model` at the end.
    """
    if config.mode == "lora":
        if model.adapter is None:
            add_lora(model, config.lora_rank)
        return model
    if model.adapter is not None:
        raise InvalidInputError("full fine-tuning of a model that runs with a LoRA adapter: take "
                                "model.versions.trainable_copy(model, 'full') first (it merges the adapter)")
    if model.unet.dtype == torch.float32:
        return model
    return trainable_copy(model, "full")


def _trainable(model: DiffewS, mode: str) -> list[torch.nn.Parameter]:
    if mode == "lora":
        params = adapter_parameters(model, model.adapter)
        for p in params:
            p.requires_grad_(True)
        return params
    model.unet.requires_grad_(True)
    return list(model.unet.parameters())


def _autocast(model: DiffewS, config: TrainConfig) -> contextlib.AbstractContextManager:
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

    The trained weights are float32 whatever dtype `model` serves in (master_model); at the end `model`
    runs with them in its own dtype, and `result.weights` holds them in float32. `state_dir` holds a
    resumable state (weights, optimizer, scheduler, RNGs, losses); a run finds and continues it.
    `on_step(step, loss)` reports progress. The model is left in eval mode.
    """
    if isinstance(model, Matcher):  # the matcher trains its projection head
        from .matcher_train import finetune_head

        return finetune_head(model, samples, config, on_step=on_step)
    validate_samples(samples)
    sampler = EpisodeSampler(samples, config.max_shots, config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    aug_rng = random.Random(config.seed + 1)
    master = master_model(model, config)
    params = _trainable(master, config.mode)
    lr = config.lr if config.lr is not None else default_lr(model.config.family, config.mode)
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=config.weight_decay)
    updates = math.ceil(config.steps / config.grad_accum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: max(0.0, 1.0 - u / updates))  # linear decay
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(master)
    cache = None if config.augment else _LatentCache(master, samples)
    result = TrainResult(steps=0, images=len(samples), config={**asdict(config), "lr": lr},
                         labels={label: len(idx) for label, idx in sampler.by_label.items()})
    state_path = Path(state_dir) if state_dir else None
    if state_path is not None and (state_path / "state.json").is_file():
        _load_state(master, optimizer, scheduler, sampler, gen, aug_rng, result, state_path)

    # Mixed precision, accumulation and the resumable state are written out here rather than taken from
    # accelerate's Accelerator: its AcceleratorState is one per process and refuses a second mixed-precision
    # setting ("already been initialized and cannot be changed"), while one worker process runs trainings
    # with different settings, beside predictions in other threads; and its save_state restores only the
    # global RNGs, not this run's own generators (episode sampler, latent noise, augmentation).
    master.unet.train()
    try:
        while result.steps < config.steps:
            label, query, supports = sampler.sample()
            z_s, z_ms, z_q, target = _episode_latents(master, samples, cache, label, query, supports, gen, config, aug_rng)
            with _autocast(master, config):
                bank = master.support_kv_torch(z_s, z_ms)
                pred = master.predict_mask_latents_torch(z_q, bank)
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
                _save_state(master, optimizer, scheduler, sampler, gen, aug_rng, result, state_path)
    finally:
        master.unet.eval()
        master.unet.requires_grad_(False)
        if config.gradient_checkpointing:
            master.unet.disable_gradient_checkpointing()
    if state_path is not None:
        _save_state(master, optimizer, scheduler, sampler, gen, aug_rng, result, state_path)
    result.weights = trainable_state(master, config.mode)
    if master is not model:  # the float32 masters go back into the serving weights, in the serving dtype
        with model._lock, torch.no_grad():
            for name, tensor in plain_unet_state(model.unet).items():
                tensor.copy_(result.weights[name])
    model.support_cache.clear()  # memories encoded by the old weights are stale
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
        set_peft_model_state_dict(model.unet, weights, adapter_name=model.adapter)
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
        if args.mode == "full" and model.adapter is not None:  # a LoRA version: train its merged weights
            model = trainable_copy(model, "full")
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
    path = save_version(model, args.out, args.name, base=base, parent=args.model, mode=args.mode, weights=result.weights,
                        summary={"steps": result.steps, "final_loss": result.final_loss, "images": result.images,
                                 "labels": result.labels})
    print(f"wrote {path} (final loss {result.final_loss:.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
