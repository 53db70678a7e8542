"""DiffewS one-step few-shot segmentation (OI2M) with reusable support memory."""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file

from .attention import FusionMode, KVBank, install_kv_fusion
from .checkpoint import load_components, quiet_diffusers, tiny_components
from .config import EMBEDS_NAME, DiffewSConfig
from .errors import InvalidInputError
from .images import (ImageInput, MaskInput, mask_to_tensor, query_images, resize_mask, resize_rgb, rgb_to_tensor,
                     support_examples)
from .outputs import QueryBatch, SegmentationOutput, mask_output
from .similarity import descriptor_space, latent_descriptor
from .support import SupportCache, SupportMemory, split_shots
from .tiny import TINY_RESOLUTION
from .unet_ref import reference_input

logger = logging.getLogger(__name__)

DEFAULT_SUPPORT_CACHE_BYTES = 2 << 30
"""Bytes of support K/V kept in the cache (SD 2.1 at 512: about 46 MB per shot in bf16, 92 MB in fp32)."""
TIMESTEP = 1
"""The release always runs the UNet at t = 1 (alpha_bar = 0, so the prediction is -UNet(z))."""


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (SD 2.1 attention overflows in plain fp16), float32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""Names of the working precisions (DIFFEWS_DTYPE); the VAE decode and thresholding always run in float32."""


def parse_dtype(name: str | None, device: torch.device | str | None = None) -> torch.dtype:
    """"fp32", "bf16", "fp16" (also "float32", "bfloat16", "float16"), or "auto"/None: default_dtype(device)."""
    if name in (None, "", "auto"):
        return default_dtype(torch.device(device) if device is not None else default_device())
    aliases = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
    key = aliases.get(str(name).lower(), str(name).lower())
    if key not in DTYPES:
        raise InvalidInputError(f"dtype must be auto, fp32, bf16 or fp16, got {name!r}")
    return DTYPES[key]


def _content_key(parts: Sequence[np.ndarray], extra: str) -> str:
    digest = hashlib.sha256(extra.encode())
    for part in parts:
        digest.update(str(part.shape).encode())
        digest.update(np.ascontiguousarray(part).tobytes())
    return digest.hexdigest()


class DiffewS:
    """A DiffewS few-shot segmenter: encode a support set once, then segment any number of queries."""

    suggested_min_score = 0.0
    """Every mask is kept: no threshold has been measured with the official weights (see Matcher's)."""

    def __init__(
        self,
        vae: AutoencoderKL,
        unet: UNet2DConditionModel,
        prompt_embeds: torch.Tensor,
        config: DiffewSConfig | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        support_cache_bytes: int = DEFAULT_SUPPORT_CACHE_BYTES,
        source: str = "",
    ):
        self.config = config or DiffewSConfig()
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = dtype or default_dtype(self.device)
        self.source = source
        with quiet_diffusers():
            # In reduced precision the decode runs on a float32 copy of the VAE (the decoded map is thresholded
            # relative to its peak, where bf16's 8-bit mantissa would move the mask edge).
            self.decode_vae = None
            if self.dtype != torch.float32:
                self.decode_vae = copy.deepcopy(vae).to(self.device, torch.float32).eval().requires_grad_(False)
                self.decode_vae.encoder = None  # decode() needs post_quant_conv and the decoder only
            self.vae = vae.to(self.device, self.dtype).eval().requires_grad_(False)
            self.unet = unet.to(self.device, self.dtype).eval().requires_grad_(False)
        self.prompt_embeds = prompt_embeds.to(self.device, self.dtype)
        self.fusion = install_kv_fusion(self.unet, upcast=self.dtype == torch.float16)
        self.support_cache = SupportCache(support_cache_bytes)
        self.adapter: str | None = None
        """The peft adapter of `unet` this model runs with (a LoRA version), or None for the UNet's own weights."""
        self._lock = threading.RLock()

    @classmethod
    def sharing(cls, host: DiffewS, *, unet: UNet2DConditionModel | None = None, adapter: str | None = None,
                config: DiffewSConfig | None = None, dtype: torch.dtype | None = None, source: str = "") -> DiffewS:
        """A model over `host`'s VAE, float32 decoder and prompt embedding, with host's UNet run through a named
        LoRA `adapter`, or with another `unet` (a full version's, or a training copy) in `dtype`.

        Models sharing one UNet share its lock: each pass activates its own adapter under that lock.
        """
        model = copy.copy(host)  # every attribute shared (a new one cannot be forgotten); what differs is set below
        model.config = config or host.config
        model.source = source or host.source
        model.support_cache = SupportCache(host.support_cache.max_bytes)
        model.adapter = adapter
        if unet is not None:
            model.dtype = dtype or host.dtype
            with quiet_diffusers():
                model.unet = unet.to(model.device, model.dtype).eval().requires_grad_(False)
            model.fusion = install_kv_fusion(model.unet, upcast=model.dtype == torch.float16)
            model._lock = threading.RLock()
        model.prompt_embeds = host.prompt_embeds.to(model.device, model.dtype)
        return model

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        spec: str | os.PathLike,
        *,
        unet: str | os.PathLike | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        support_cache_bytes: int = DEFAULT_SUPPORT_CACHE_BYTES,
        channels_last: bool = False,
        compile: bool = False,
    ) -> DiffewS:
        """Load from "tiny", a DiffewS/SD 2.x/ModelScope folder or a hub id; `unet` overrides the UNet folder."""
        parts = load_components(spec, unet)
        model = cls(
            parts.vae, parts.unet, parts.prompt_embeds, parts.config, device=device, dtype=dtype,
            support_cache_bytes=support_cache_bytes, source=parts.source,
        )
        if not parts.config.trained:
            logger.warning("model %r is not trained on real segmentation labels: fine-tune it before use", str(spec))
        if channels_last:
            model.enable_channels_last()
        if compile:
            model.compile()
        return model

    @classmethod
    def tiny(cls, *, resolution: int = TINY_RESOLUTION, device: torch.device | str | None = "cpu", pretrained: bool = True,
             **kwargs) -> DiffewS:
        """The tiny model (never trained on real pictures) at the given working resolution.

        Its UNet is pre-trained on synthetic episodes (see model/tiny.py); `pretrained=False` gives the
        freshly initialised one instead.
        """
        parts = tiny_components(pretrained=pretrained)
        config = replace(parts.config, resolution=resolution)
        return cls(parts.vae, parts.unet, parts.prompt_embeds, config, device=device, source="tiny", **kwargs)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write vae/, unet/ (with conv_in_ref, safetensors), the empty-prompt embedding and diffews_config.json."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self.vae.save_pretrained(folder / "vae", safe_serialization=True)
            self.unet.save_pretrained(folder / "unet", safe_serialization=True)
        save_file({"prompt_embeds": self.prompt_embeds.detach().float().cpu().contiguous()}, folder / EMBEDS_NAME)
        self.config.save(folder)

    def enable_channels_last(self) -> None:
        """Store conv weights channels-last (faster convolutions on recent GPUs)."""
        for module in (self.unet, self.vae, self.decode_vae):
            if module is not None:
                module.to(memory_format=torch.channels_last)

    def compile(self, mode: str | None = None) -> None:
        """Compile the UNet and VAE forwards in place with torch.compile (first calls are slow)."""
        self.unet.compile(mode=mode)
        (self.decode_vae or self.vae).decoder.compile(mode=mode)
        self.vae.encoder.compile(mode=mode)

    def describe(self) -> dict:
        """A JSON-ready summary: name, source, trained or not, resolution, device, dtype."""
        return {
            "name": self.config.name,
            "source": self.source,
            "trained": self.config.trained,
            "resolution": self.config.resolution,
            "threshold_ratio": self.config.threshold_ratio,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "unet_parameters": sum(p.numel() for p in self.unet.parameters()),
        }

    # ---- tensor-level API (working resolution) --------------------------------------------

    def encode_latents_torch(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, R, R] in [-1, 1] -> VAE posterior mean x scaling_factor, [B, 4, R/8, R/8]."""
        pixels = pixels.to(self.device, self.vae.dtype)  # a model sharing another's VAE may run its UNet in another dtype
        return (self.vae.encode(pixels).latent_dist.mean * self.vae.config.scaling_factor).to(self.dtype)

    def _unet(self, sample: torch.Tensor) -> torch.Tensor:
        if getattr(self.unet, "peft_config", None):  # a UNet carrying LoRA versions: run with this model's own
            activate_adapter(self.unet, self.adapter)
        embeds = self.prompt_embeds.expand(sample.shape[0], -1, -1)
        return self.unet(sample, TIMESTEP, encoder_hidden_states=embeds, return_dict=False)[0]

    def support_kv_torch(self, image_latents: torch.Tensor, mask_latents: torch.Tensor) -> KVBank:
        """Support pass: cat([z_s, z_ms]) through conv_in_ref and the UNet, recording every attn1's K/V."""
        if image_latents.shape != mask_latents.shape:
            raise InvalidInputError(
                f"support image latents {tuple(image_latents.shape)} and mask latents {tuple(mask_latents.shape)} differ"
            )
        with self._lock:
            self.fusion.bank = {}
            self.fusion.mode = FusionMode.RECORD
            try:
                with reference_input(self.unet):
                    self._unet(torch.cat([image_latents, mask_latents], dim=1))  # [N, 8, h, w]
                return self.fusion.bank
            finally:
                self.fusion.mode = FusionMode.OFF
                self.fusion.bank = {}

    def predict_mask_latents_torch(self, query_latents: torch.Tensor, bank: KVBank) -> torch.Tensor:
        """Query pass with KV fusion: z_mq_hat = -UNet(z_q), [B, 4, h, w]."""
        with self._lock:
            self.fusion.bank = bank
            self.fusion.mode = FusionMode.FUSE
            try:
                return -self._unet(query_latents)
            finally:
                self.fusion.mode = FusionMode.OFF
                self.fusion.bank = {}

    def decode_probability_torch(self, mask_latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask latents -> (probability [B, R, R] in [0, 1], peak [B]) exactly as the release quantises them."""
        vae = self.decode_vae or self.vae
        decoded = vae.decode(mask_latents.float() / vae.config.scaling_factor).sample.float()
        # clip -> [0, 1] -> x255 -> uint8 by truncation -> [0, 1], as the release's image saving does
        image = ((decoded.clamp(-1, 1) + 1) / 2 * 255).to(torch.uint8).float() / 255
        return image.mean(dim=1), image.amax(dim=(1, 2, 3))

    # ---- support memory ---------------------------------------------------------------------

    def _prepare_support(self, images: Sequence[ImageInput], masks: Sequence[MaskInput]) -> tuple[np.ndarray, np.ndarray]:
        size = self.config.resolution
        pairs = support_examples(images, masks)
        return np.stack([resize_rgb(rgb, size) for rgb, _ in pairs]), np.stack([resize_mask(m, size) for _, m in pairs])

    def _encode_prepared(self, rgbs: np.ndarray, bins: np.ndarray, key: str, batch_size: int) -> SupportMemory:
        """Prepared support images and masks at the working resolution -> their memory, with descriptors."""
        pixels = torch.stack([rgb_to_tensor(r) for r in rgbs])  # [N, 3, R, R]
        mask_pixels = torch.stack([mask_to_tensor(m) for m in bins])  # [N, 3, R, R]
        both = torch.cat([pixels, mask_pixels])  # [2N, 3, R, R]: one VAE pass for images and masks
        latents = torch.cat([self.encode_latents_torch(chunk) for chunk in both.split(batch_size)])
        n = len(rgbs)
        bank = self.support_kv_torch(latents[:n], latents[n:])
        shares = torch.from_numpy(bins.reshape(n, -1).mean(axis=1).astype(np.float32))
        return SupportMemory(kv=bank, num_shots=n, key=key, descriptors=latent_descriptor(latents[:n]), shares=shares)

    def _support_key(self, parts: Sequence[np.ndarray]) -> str:
        return _content_key(parts, f"{self.config.resolution}:{self.dtype}")

    @torch.inference_mode()
    def encode_support(
        self, images: Sequence[ImageInput], masks: Sequence[MaskInput], *, use_cache: bool = True, batch_size: int = 8
    ) -> SupportMemory:
        """Encode N support images with their masks into a reusable SupportMemory (cached by content)."""
        rgbs, bins = self._prepare_support(images, masks)
        key = self._support_key([rgbs, bins])
        if use_cache and (cached := self.support_cache.get(key)) is not None:
            return cached
        memory = self._encode_prepared(rgbs, bins, key, batch_size)
        if use_cache:
            self.support_cache.put(key, memory)
        return memory

    @torch.inference_mode()
    def encode_examples(
        self, images: Sequence[ImageInput], masks: Sequence[MaskInput], *, use_cache: bool = True, batch_size: int = 8
    ) -> list[SupportMemory]:
        """One single-shot memory per (image, mask), each cached by its own content: support.compose() makes the
        memory of any subset of them, equal to encode_support() of that subset, without encoding anything again."""
        rgbs, bins = self._prepare_support(images, masks)
        keys = [self._support_key([rgb[None], mask[None]]) for rgb, mask in zip(rgbs, bins)]
        found = [self.support_cache.get(key) if use_cache else None for key in keys]
        missing = [i for i, memory in enumerate(found) if memory is None]
        for start in range(0, len(missing), batch_size):
            chunk = missing[start : start + batch_size]
            encoded = self._encode_prepared(rgbs[chunk], bins[chunk], "", batch_size)
            for i, part in zip(chunk, split_shots(encoded)):
                part.key = keys[i]
                found[i] = part
                if use_cache:
                    self.support_cache.put(keys[i], part)
        return found

    @property
    def descriptor_space(self) -> str:
        """Names the descriptors this model gives (its VAE at its working resolution): models sharing a VAE share it."""
        resolution = self.config.resolution
        cached = self.__dict__.get("_descriptor_space")
        if cached is None or cached[0] != resolution:
            cached = (resolution, descriptor_space(self.vae, resolution))
            self.__dict__["_descriptor_space"] = cached
        return cached[1]

    @torch.inference_mode()
    def describe_images(self, images: Sequence[ImageInput], *, batch_size: int = 8) -> torch.Tensor:
        """[N, D] descriptors (model.similarity) of images, as their support or query encoding would give them."""
        return self.encode_queries(images, batch_size=batch_size).descriptors

    # ---- queries ----------------------------------------------------------------------------

    @torch.inference_mode()
    def encode_queries(self, images: Sequence[ImageInput], *, batch_size: int = 8) -> QueryBatch:
        """Encode query images once (reusable across several support memories)."""
        rgbs = query_images(images)
        sizes = [(r.shape[0], r.shape[1]) for r in rgbs]
        pixels = torch.stack([rgb_to_tensor(resize_rgb(r, self.config.resolution)) for r in rgbs])
        latents = torch.cat([self.encode_latents_torch(chunk) for chunk in pixels.split(batch_size)])
        return QueryBatch(latents=latents, sizes=sizes)

    @torch.inference_mode()
    def segment_encoded(
        self,
        queries: QueryBatch,
        support: SupportMemory,
        *,
        threshold_ratio: float | None = None,
        batch_size: int = 8,
        generator: torch.Generator | None = None,
    ) -> list[SegmentationOutput]:
        """Segment already-encoded queries with one support memory."""
        ratio = self._checked_ratio(threshold_ratio)
        bank = self._bank(support, generator)
        outputs = self._segment_pairs(queries, [{"": bank}] * len(queries), ratio, batch_size,
                                      [{"": _mean_share(support)}] * len(queries))
        return [out[""] for out in outputs]

    def _checked_ratio(self, threshold_ratio: float | None) -> float:
        ratio = self.config.threshold_ratio if threshold_ratio is None else threshold_ratio
        if not 0.0 < ratio < 1.0:
            raise InvalidInputError(f"threshold_ratio must be in (0, 1), got {ratio}")
        return ratio

    def _bank(self, support: SupportMemory, generator: torch.Generator | None = None) -> KVBank:
        """A memory's K/V on this model's device and dtype, token-subsampled if the config says so."""
        support.check()
        if self.config.support_token_shots is not None:
            support = support.subsample(self.config.support_token_shots, generator)
        return support.to(self.device, self.dtype).kv

    def _segment_pairs(self, queries: QueryBatch, banks: Sequence[Mapping[str, KVBank]], ratio: float,
                       batch_size: int, shares: Sequence[Mapping[str, float | None]]) -> list[dict[str, SegmentationOutput]]:
        """Every (query, label) pair through the UNet in batches of `batch_size`, one decode per pair; `banks[i]`
        holds query i's bank per label, `shares[i]` its supports' mean foreground share per label (for the score).

        A batch whose samples all use one bank uses it as is ([1, tokens, C], shared by every sample); any other
        batch gets one bank row per sample. Samples of one batch need as many support tokens each, so pairs are
        grouped by that count.
        """
        groups: dict[tuple[int, ...], list[tuple[int, str]]] = {}
        for i, per_label in enumerate(banks):
            for label, bank in per_label.items():
                groups.setdefault(tuple(k.shape[1] for k, _ in bank.values()), []).append((i, label))
        outputs: list[dict[str, SegmentationOutput]] = [{} for _ in queries.sizes]
        for pairs in groups.values():
            pairs.sort(key=lambda pair: (pair[1], pair[0]))  # label-major: a label's queries share batches
            for start in range(0, len(pairs), batch_size):
                chunk = pairs[start : start + batch_size]
                z_q = queries.latents[[i for i, _ in chunk]]
                chunk_banks = [banks[i][label] for i, label in chunk]
                if all(b is chunk_banks[0] for b in chunk_banks):
                    bank = chunk_banks[0]
                else:
                    bank = {name: (torch.cat([b[name][0] for b in chunk_banks]), torch.cat([b[name][1] for b in chunk_banks]))
                            for name in chunk_banks[0]}
                prob, peak = self.decode_probability_torch(self.predict_mask_latents_torch(z_q, bank))
                for (i, label), p, k in zip(chunk, prob, peak):
                    outputs[i][label] = _postprocess(p, k, ratio, queries.sizes[i], shares[i].get(label))
        return outputs

    def segment(
        self,
        images: Sequence[ImageInput],
        support: SupportMemory,
        *,
        threshold_ratio: float | None = None,
        batch_size: int = 8,
        generator: torch.Generator | None = None,
    ) -> list[SegmentationOutput]:
        """Segment query images with one support memory: one mask per image, at its original size."""
        queries = self.encode_queries(images, batch_size=batch_size)
        return self.segment_encoded(
            queries, support, threshold_ratio=threshold_ratio, batch_size=batch_size, generator=generator
        )

    @torch.inference_mode()
    def segment_many(
        self,
        images: Sequence[ImageInput],
        supports: Mapping[str, SupportMemory],
        *,
        threshold_ratio: float | None = None,
        batch_size: int = 8,
    ) -> list[dict[str, SegmentationOutput]]:
        """Segment query images against several labelled support memories: each query encoded once, and
        (query, label) pairs batched together through the UNet, each sample attending to its own label's
        supports; one decode per pair."""
        queries = self.encode_queries(images, batch_size=batch_size)
        return self.segment_many_encoded(queries, supports, threshold_ratio=threshold_ratio, batch_size=batch_size)

    @torch.inference_mode()
    def segment_many_encoded(
        self,
        queries: QueryBatch,
        supports: Mapping[str, SupportMemory] | Sequence[Mapping[str, SupportMemory]],
        *,
        threshold_ratio: float | None = None,
        batch_size: int = 8,
    ) -> list[dict[str, SegmentationOutput]]:
        """Segment encoded queries with one memory per label shared by all, or (a sequence, one mapping per
        query) with each query's own memories, e.g. the examples most similar to it; batched either way."""
        ratio = self._checked_ratio(threshold_ratio)
        per_query = [supports] * len(queries) if isinstance(supports, Mapping) else list(supports)
        if len(per_query) != len(queries):
            raise InvalidInputError(f"got support memories for {len(per_query)} queries, but {len(queries)} queries")
        banks: dict[int, KVBank] = {}  # one bank per distinct memory, so that shared memories stay shared
        for memories in per_query:
            for memory in memories.values():
                if id(memory) not in banks:
                    banks[id(memory)] = self._bank(memory)
        outputs = self._segment_pairs(queries, [{label: banks[id(m)] for label, m in memories.items()} for memories in per_query],
                                      ratio, batch_size,
                                      [{label: _mean_share(m) for label, m in memories.items()} for memories in per_query])
        return [{label: out[label] for label in memories} for out, memories in zip(outputs, per_query)]


_ACTIVE_ADAPTER = "_diffews_active_adapter"
"""Attribute on a UNet naming the adapter it was last switched to (absent: unknown)."""


def activate_adapter(unet: UNet2DConditionModel, adapter: str | None) -> None:
    """Run `unet` through one of its peft adapters, or through none (its own weights).

    Switching walks every module (about 8 ms for SD 2.1 on a CPU core), so it is skipped when the UNet runs
    with `adapter` already; adding or deleting an adapter (model.adapters) forgets what is active.
    """
    if unet.__dict__.get(_ACTIVE_ADAPTER, ...) == adapter:
        return
    if adapter is None:
        unet.disable_adapters()
    elif adapter not in unet.peft_config:
        raise InvalidInputError(f"the UNet has no adapter {adapter!r} (it has {sorted(unet.peft_config)})")
    else:
        unet.enable_adapters()
        unet.set_adapter(adapter)
    unet.__dict__[_ACTIVE_ADAPTER] = adapter


def forget_active_adapter(unet: UNet2DConditionModel) -> None:
    """Say the UNet's active adapter is unknown (peft switches to an adapter it adds)."""
    unet.__dict__.pop(_ACTIVE_ADAPTER, None)


def _mean_share(memory: SupportMemory) -> float | None:
    """The supports' mean foreground share, or None for a memory made without masks' shares."""
    return float(memory.shares.mean()) if memory.shares is not None and len(memory.shares) else None


def _postprocess(prob: torch.Tensor, peak: torch.Tensor, ratio: float, size: tuple[int, int],
                 support_share: float | None = None) -> SegmentationOutput:
    """Threshold a [R, R] decoded map at ratio * peak (the release's relative threshold), then mask_output."""
    return mask_output(prob, float(ratio * peak), size, support_share)
