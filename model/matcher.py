"""The matcher: few-shot segmentation by nearest-neighbour matching of frozen pretrained features.

Each query pixel's best cosine similarity to the supports' foreground pixels minus its best cosine to their
background pixels, through a calibrated sigmoid, upsampled along the image's edges (guided filter). Same
contract as DiffewS (support memories, queries, outputs), so the backend serves either without branching.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
from copy import deepcopy
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .backbones import FeatureBackbone, load_backbone
from .errors import InvalidCheckpointError, InvalidInputError
from .matcher_config import BLOCKS_NAME, DEFAULT_BACKBONE, HEAD_NAME, MatcherConfig, is_matcher_folder
from .images import ImageInput, MaskInput, query_images, resize_mask, resize_rgb, support_examples
from .outputs import QueryBatch, SegmentationOutput, mask_output
from .similarity import latent_descriptor
from .support import SupportCache, SupportMemory, compose

logger = logging.getLogger(__name__)

DEFAULT_SUPPORT_CACHE_BYTES = 512 << 20
"""Bytes of support vectors kept (effnet-lite0: about 1 MB per example at the defaults)."""
DESCRIPTOR_GRID = 2
"""The matcher's image descriptors: its features average-pooled to 2 x 2 cells (model.similarity)."""


def cell_indices(cover: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices of the foreground cells (covered half or more; for an object smaller than that, its most
    covered cells) and of the background cells (not covered at all) of a [h, w] or flat cover map."""
    cover = cover.flatten()
    fg = torch.nonzero(cover >= 0.5).flatten()
    if len(fg) == 0 and cover.max() > 0:
        fg = torch.nonzero(cover >= cover.max() * 0.5).flatten()
    return fg, torch.nonzero(cover == 0).flatten()


def best_match(queries: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """[..., n, D] unit query vectors against [m, D] unit vectors -> [..., n] best cosine (-1 where m is 0: a
    support with no background cell matches nothing there)."""
    if len(vectors) == 0:
        return queries.new_full(queries.shape[:-1], -1.0)
    return (queries @ vectors.T).amax(dim=-1)


def hypercolumn(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Feature maps of several strides -> [B, D, h, w] at the finest: each unit-normalised per pixel, resized,
    concatenated and scaled to unit length."""
    size = maps[0].shape[-2:]
    parts = [F.normalize(F.interpolate(m, size=size, mode="bilinear", align_corners=False) if m.shape[-2:] != size
                         else m, dim=1) for m in maps]
    return torch.cat(parts, dim=1) / math.sqrt(len(parts))


def box_filter(x: torch.Tensor, r: int) -> torch.Tensor:
    """Mean over (2r+1)^2 windows, shrinking at the borders; [B, C, H, W]."""
    return F.avg_pool2d(x, 2 * r + 1, stride=1, padding=r, count_include_pad=False)


def guided_upsample(low: torch.Tensor, guide: torch.Tensor, r: int, eps: float) -> torch.Tensor:
    """[B, 1, h, w] map -> [B, 1, H, W] following the edges of the [B, 1, H, W] guide (He et al.'s guided filter
    on the bilinear upsampling). Written here: no installed library has a torch guided filter (OpenCV's is in
    the contrib build only), and it is ten lines of box filters."""
    up = F.interpolate(low, size=guide.shape[-2:], mode="bilinear", align_corners=False)
    if r == 0:
        return up
    mean_i, mean_p = box_filter(guide, r), box_filter(up, r)
    cov = box_filter(guide * up, r) - mean_i * mean_p
    var = box_filter(guide * guide, r) - mean_i * mean_i
    a = cov / (var + eps)
    b = mean_p - a * mean_i
    return box_filter(a, r) * guide + box_filter(b, r)


class ProjectionHead(nn.Module):
    """A linear projection of the frozen features (1x1 convolution), the part fine-tuning trains."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_dim, out_dim, 1, bias=False)
        with torch.no_grad():  # start as the identity on the first out_dim channels: the training-free matcher
            self.proj.weight.zero_()
            eye = torch.eye(out_dim, in_dim)
            self.proj.weight.copy_(eye[:, :, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Matcher:
    """A few-shot segmenter that matches query features against support features; no training needed."""

    suggested_min_score = 0.5
    """Masks scoring below this are better left out of a pre-annotation (fewer pixels to correct; chosen on CamVid
    train episodes by bench.bench_thresholds, reported on val in docs/annotator-workflow.md)."""

    def __init__(self, backbone: FeatureBackbone, config: MatcherConfig | None = None, *,
                 head: ProjectionHead | None = None, device: torch.device | str | None = "cpu",
                 support_cache_bytes: int = DEFAULT_SUPPORT_CACHE_BYTES, source: str = ""):
        self.config = config or MatcherConfig(backbone=backbone.name)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = torch.float32
        self.backbone = backbone.to(self.device)
        self.head = head.to(self.device).eval().requires_grad_(False) if head is not None else None
        self.support_cache = SupportCache(support_cache_bytes)
        self.source = source or self.config.backbone
        self.adapter: str | None = None
        """Versions of the matcher are whole (a head and the backbone's tuned blocks), never adapters."""
        self._lock = threading.RLock()
        self._weights_id = self._identify()

    def _identify(self) -> str:
        """Names the backbone weights that make this matcher's features: its fingerprint and its tuned blocks."""
        ident = self.backbone.fingerprint()
        if self.config.tuned_blocks:
            digest = hashlib.sha256()
            for tensor in self.backbone.tuned_state(self.config.tuned_blocks).values():
                digest.update(tensor.detach().float().cpu().numpy().tobytes())
            ident += f"+{self.config.tuned_blocks}:{digest.hexdigest()[:16]}"
        return ident

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, spec: str | os.PathLike = DEFAULT_BACKBONE, *, resolution: int | None = None,
                        device: torch.device | str | None = "cpu", backbone: FeatureBackbone | None = None,
                        **kwargs) -> Matcher:
        """A backbone name ("effnet-lite0", "hf:facebook/dinov2-small") or a saved matcher folder (a version);
        `backbone` reuses one already loaded (it must be the one the folder names)."""
        folder = Path(spec)
        if is_matcher_folder(folder):
            config = MatcherConfig.load(folder)
            head = _load_head(folder, config)
            if backbone is not None and backbone.name != config.backbone:
                raise InvalidCheckpointError(f"{folder} was trained over backbone {config.backbone!r}, not {backbone.name!r}")
            backbone = _load_blocks(folder, config, backbone or load_backbone(config.backbone))
        elif folder.is_dir() and not str(spec).startswith("hf:"):
            raise InvalidCheckpointError(f"{folder} is not a matcher folder (no matcher_config.json); a DiffewS "
                                         "checkpoint or version is served with DIFFEWS_MODEL, not as the matcher")
        else:
            backbone = load_backbone(str(spec))
            config, head = MatcherConfig(backbone=backbone.name), None
        if resolution is not None:
            config = replace(config, resolution=resolution)
        return cls(backbone, config, head=head, device=device, source=str(spec), **kwargs)

    def with_head(self, head: ProjectionHead | None, config: MatcherConfig | None = None, *,
                  backbone: FeatureBackbone | None = None) -> Matcher:
        """A matcher with another head (a version) over the same backbone, or over `backbone` (one whose last
        config.tuned_blocks blocks were fine-tuned), with its own support cache."""
        out = Matcher.__new__(Matcher)
        out.__dict__.update(self.__dict__)
        out.head = head.to(self.device).eval().requires_grad_(False) if head is not None else None
        head_dim = head.proj.out_channels if head is not None else None
        out.config = config or replace(self.config, head_dim=head_dim)
        if backbone is not None:
            out.backbone = backbone.to(self.device).eval().requires_grad_(False)
        out.support_cache = SupportCache(self.support_cache.max_bytes)
        out._weights_id = out._identify()
        return out

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write matcher_config.json and, if there is one, the head's weights (safetensors)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.head is not None:
            save_file({k: v.detach().float().cpu().contiguous() for k, v in self.head.state_dict().items()},
                      folder / HEAD_NAME)
        if self.config.tuned_blocks:
            save_file({k: v.detach().float().cpu().contiguous()
                       for k, v in self.backbone.tuned_state(self.config.tuned_blocks).items()}, folder / BLOCKS_NAME)
        self.config.save(folder)

    def describe(self) -> dict:
        """A JSON-ready summary: name, backbone, resolution, device, head."""
        return {"name": self.config.name, "family": "matcher", "source": self.source, "trained": True,
                "backbone": self.config.backbone, "resolution": self.config.resolution,
                "threshold_ratio": self.config.threshold_ratio, "device": str(self.device), "dtype": "float32",
                "head_dim": self.config.head_dim, "tuned_blocks": self.config.tuned_blocks,
                "max_vectors": self.config.max_vectors}

    @property
    def descriptor_space(self) -> str:
        """Names the descriptors this matcher gives (its backbone at its resolution): equal names compare."""
        return f"matcher:{self._weights_id}:{self.config.resolution}:{DESCRIPTOR_GRID}"

    # ---- features -----------------------------------------------------------------------

    def _pixels(self, rgbs: Sequence[np.ndarray]) -> torch.Tensor:
        arr = np.stack([resize_rgb(r, self.config.resolution) for r in rgbs])  # [B, R, R, 3]
        return torch.from_numpy(arr).to(self.device).permute(0, 3, 1, 2).float().div(255.0)

    def backbone_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, R, R] in [0, 1] -> [B, D, R/s, R/s]: every tapped map unit-normalised, resized to the finest
        stride, concatenated and scaled to unit length (the head, if any, is not applied)."""
        return hypercolumn(self.backbone.features(pixels))

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Backbone features through the head (if any), unit length per pixel: [B, D', h, w]."""
        if self.head is not None:
            features = self.head(features)
        return F.normalize(features, dim=1)

    # ---- support memory -----------------------------------------------------------------

    def _prepare(self, images: Sequence[ImageInput], masks: Sequence[MaskInput]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        pairs = support_examples(images, masks)
        return [rgb for rgb, _ in pairs], [resize_mask(mask, self.config.resolution) for _, mask in pairs]

    def _model_digest(self) -> hashlib._Hash:
        """The part of every example key that names this model (backbone weights, resolution, bound, head weights)."""
        digest = hashlib.sha256(f"{self.descriptor_space}:{self.config.max_vectors}:{self.config.head_dim}".encode())
        if self.head is not None:
            digest.update(self.head.proj.weight.detach().cpu().numpy().tobytes())
        return digest

    @staticmethod
    def _key(model_digest: hashlib._Hash, rgb: np.ndarray, mask: np.ndarray) -> str:
        digest = model_digest.copy()
        for part in (rgb, mask):
            digest.update(str(part.shape).encode())
            digest.update(np.ascontiguousarray(part).tobytes())
        return digest.hexdigest()

    def _example_memory(self, features: torch.Tensor, mask: np.ndarray, key: str) -> SupportMemory:
        """One example's memory: at most max_vectors foreground and background vectors of its [D, h, w] features."""
        h, w = features.shape[-2:]
        cover = F.adaptive_avg_pool2d(torch.from_numpy(mask).float()[None, None], (h, w))[0, 0].flatten()
        flat = features.flatten(1).T  # [h*w, D]
        generator = torch.Generator().manual_seed(int(key[:8], 16))
        picked = [idx[torch.randperm(len(idx), generator=generator)[: self.config.max_vectors].sort().values]
                  for idx in cell_indices(cover)]
        fg, bg = (flat[idx.to(flat.device)][None].contiguous() for idx in picked)  # [1, n, D]
        share = torch.tensor([float(mask.mean())])
        # SupportMemory holds (K, V) pairs per entry; the matcher's entries are keys only, so V has no channels
        kv = {"fg": (fg, fg.new_zeros(1, fg.shape[1], 0)), "bg": (bg, bg.new_zeros(1, bg.shape[1], 0))}
        return SupportMemory(kv=kv, num_shots=1, key=key, shares=share)

    @torch.inference_mode()
    def encode_examples(self, images: Sequence[ImageInput], masks: Sequence[MaskInput], *, use_cache: bool = True,
                        batch_size: int = 8) -> list[SupportMemory]:
        """One single-shot memory per (image, mask), each cached by content; compose() joins any subset."""
        rgbs, bins = self._prepare(images, masks)
        model_digest = self._model_digest()  # hashed once per call, not once per example
        keys = [self._key(model_digest, r, m) for r, m in zip(rgbs, bins)]
        found = [self.support_cache.get(k) if use_cache else None for k in keys]
        missing = [i for i, m in enumerate(found) if m is None]
        for start in range(0, len(missing), batch_size):
            chunk = missing[start : start + batch_size]
            with self._lock:
                raw = self.backbone_features(self._pixels([rgbs[i] for i in chunk]))
                projected = self.project(raw)
            descriptors = latent_descriptor(raw, DESCRIPTOR_GRID)
            for j, i in enumerate(chunk):
                memory = self._example_memory(projected[j], bins[i], keys[i])
                memory.descriptors = descriptors[j : j + 1]
                found[i] = memory
                if use_cache:
                    self.support_cache.put(keys[i], memory)
        return found

    def encode_support(self, images: Sequence[ImageInput], masks: Sequence[MaskInput], *, use_cache: bool = True,
                       batch_size: int = 8) -> SupportMemory:
        """Encode N support examples into one memory (their vectors laid end to end)."""
        return compose(self.encode_examples(images, masks, use_cache=use_cache, batch_size=batch_size))

    @torch.inference_mode()
    def describe_images(self, images: Sequence[ImageInput], *, batch_size: int = 8) -> torch.Tensor:
        """[N, D] image descriptors (model.similarity) from the backbone's pooled features."""
        return self.encode_queries(images, batch_size=batch_size).descriptors

    # ---- queries ------------------------------------------------------------------------

    @torch.inference_mode()
    def encode_queries(self, images: Sequence[ImageInput], *, batch_size: int = 8) -> QueryBatch:
        """Backbone features of query images (reusable across labels and support memories)."""
        rgbs = query_images(images)
        sizes = [(r.shape[0], r.shape[1]) for r in rgbs]
        pixels = self._pixels(rgbs)
        with self._lock:
            feats = torch.cat([self.backbone_features(chunk) for chunk in pixels.split(batch_size)])
        guides = pixels.mean(dim=1, keepdim=True)  # [B, 1, R, R] grey
        return QueryBatch(latents=feats, sizes=sizes, guides=guides, grid=DESCRIPTOR_GRID)

    def _probability(self, queries: QueryBatch, index: torch.Tensor, memory: SupportMemory) -> torch.Tensor:
        """[n, R, R] probabilities of the queries at `index` against one memory."""
        memory.check()
        fg, bg = memory.kv["fg"][0][0].to(self.device), memory.kv["bg"][0][0].to(self.device)
        q = self.project(queries.latents[index])  # [n, D', h, w]
        n, d, h, w = q.shape
        flat = q.flatten(2).transpose(1, 2)  # [n, h*w, D']
        difference = best_match(flat, fg) - best_match(flat, bg)
        logit = ((difference - self.config.bias) / self.config.temperature).view(n, 1, h, w)
        guides = queries.guides[index] if queries.guides is not None else None
        if guides is not None:
            scale = guides.shape[-1] / w
            logit = guided_upsample(logit, guides, round(self.config.guide_radius * scale / 8), self.config.guide_eps)
        else:
            size = self.config.resolution
            logit = F.interpolate(logit, size=(size, size), mode="bilinear", align_corners=False)
        return torch.sigmoid(logit)[:, 0]

    @torch.inference_mode()
    def segment_encoded(self, queries: QueryBatch, support: SupportMemory, *, threshold_ratio: float | None = None,
                        batch_size: int = 8, generator: torch.Generator | None = None) -> list[SegmentationOutput]:
        """Segment already-encoded queries with one support memory."""
        outputs = self.segment_many_encoded(queries, {"": support}, threshold_ratio=threshold_ratio, batch_size=batch_size)
        return [out[""] for out in outputs]

    def segment(self, images: Sequence[ImageInput], support: SupportMemory, *, threshold_ratio: float | None = None,
                batch_size: int = 8, generator: torch.Generator | None = None) -> list[SegmentationOutput]:
        """Segment query images with one support memory: one mask per image, at its original size."""
        return self.segment_encoded(self.encode_queries(images, batch_size=batch_size), support,
                                    threshold_ratio=threshold_ratio, batch_size=batch_size)

    @torch.inference_mode()
    def segment_many(self, images: Sequence[ImageInput], supports: Mapping[str, SupportMemory], *,
                     threshold_ratio: float | None = None, batch_size: int = 8) -> list[dict[str, SegmentationOutput]]:
        """Segment query images against several labelled support memories (each query encoded once)."""
        return self.segment_many_encoded(self.encode_queries(images, batch_size=batch_size), supports,
                                         threshold_ratio=threshold_ratio, batch_size=batch_size)

    @torch.inference_mode()
    def segment_many_encoded(self, queries: QueryBatch,
                             supports: Mapping[str, SupportMemory] | Sequence[Mapping[str, SupportMemory]], *,
                             threshold_ratio: float | None = None, batch_size: int = 8) -> list[dict[str, SegmentationOutput]]:
        """Segment encoded queries with one memory per label shared by all, or one mapping per query."""
        threshold = 0.5 if threshold_ratio is None else threshold_ratio
        if not 0.0 < threshold < 1.0:
            raise InvalidInputError(f"threshold_ratio must be in (0, 1), got {threshold}")
        per_query = [supports] * len(queries) if isinstance(supports, Mapping) else list(supports)
        if len(per_query) != len(queries):
            raise InvalidInputError(f"got support memories for {len(per_query)} queries, but {len(queries)} queries")
        groups: dict[tuple[str, int], tuple[SupportMemory, list[int]]] = {}  # queries sharing a memory share a pass
        for i, memories in enumerate(per_query):
            for label, memory in memories.items():
                groups.setdefault((label, id(memory)), (memory, []))[1].append(i)
        outputs: list[dict[str, SegmentationOutput]] = [{} for _ in range(len(queries))]
        with self._lock:
            for (label, _), (memory, members) in groups.items():
                share = float(memory.shares.mean()) if memory.shares is not None and len(memory.shares) else None
                for start in range(0, len(members), batch_size):
                    chunk = members[start : start + batch_size]
                    probs = self._probability(queries, torch.tensor(chunk), memory)
                    for i, prob in zip(chunk, probs):
                        outputs[i][label] = mask_output(prob, threshold, queries.sizes[i], share, score="sharpness")
        return [{label: out[label] for label in memories} for out, memories in zip(outputs, per_query)]


def _read_weights(path: Path, missing: str) -> dict[str, torch.Tensor]:
    """A version's safetensors file; InvalidCheckpointError saying `missing` if it is absent, or naming it if damaged."""
    if not path.is_file():
        raise InvalidCheckpointError(missing)
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise InvalidCheckpointError(f"{path}: cannot read ({exc})") from None


def _load_head(folder: Path, config: MatcherConfig) -> ProjectionHead | None:
    if config.head_dim is None:
        return None
    path = folder / HEAD_NAME
    weights = _read_weights(path, f"{folder}: matcher_config.json names a head of {config.head_dim} but {HEAD_NAME} "
                                  "is missing")
    weight = weights.get("proj.weight")
    if weight is None or weight.ndim != 4 or weight.shape[0] != config.head_dim:
        raise InvalidCheckpointError(f"{path}: expected proj.weight of {config.head_dim} output channels")
    head = ProjectionHead(weight.shape[1], weight.shape[0])
    head.load_state_dict(weights)
    return head


def _load_blocks(folder: Path, config: MatcherConfig, backbone: FeatureBackbone) -> FeatureBackbone:
    """`backbone` as is, or a copy of it with the version's tuned blocks (the shared one is never changed)."""
    if not config.tuned_blocks:
        return backbone
    path = folder / BLOCKS_NAME
    weights = _read_weights(path, f"{folder}: matcher_config.json names {config.tuned_blocks} tuned backbone blocks "
                                  f"but {BLOCKS_NAME} is missing")
    try:
        backbone.check_tuned(config.tuned_blocks)
    except InvalidInputError as exc:
        raise InvalidCheckpointError(f"{folder}: {exc}") from None
    expected = {k: v.shape for k, v in backbone.tuned_state(config.tuned_blocks).items()}
    shapes = {k: v.shape for k, v in weights.items()}
    if shapes != expected:
        wrong = sorted(set(shapes) ^ set(expected)) or sorted(k for k in shapes if shapes[k] != expected[k])
        raise InvalidCheckpointError(f"{path}: does not fit the last {config.tuned_blocks} blocks of backbone "
                                     f"{config.backbone!r} (first mismatch: {wrong[0]})")
    tuned = deepcopy(backbone)
    tuned.load_state_dict(weights, strict=False)  # exactly the tuned blocks' keys, checked above
    return tuned
