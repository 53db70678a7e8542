"""Support memory (the per-layer K/V of an encoded support set) and its bounded cache."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from .attention import KVBank
from .errors import InvalidInputError, SupportNotSetError


@dataclass
class SupportMemory:
    """The stored self-attention K/V of N support shots, reusable for any number of queries.

    `kv[layer] = (K, V)`, each [1, N*L_layer, C_layer]: the N shots laid end to end on the token axis.
    """

    kv: KVBank
    num_shots: int
    key: str = ""
    descriptors: torch.Tensor | None = None
    """[N, D] float32 on the CPU: each shot's image descriptor (model.similarity), when it was encoded with one."""
    shares: torch.Tensor | None = None
    """[N] float32: each shot's foreground share of its mask at the working resolution (for the mask score)."""
    _released: bool = field(default=False, repr=False)

    @property
    def is_released(self) -> bool:
        """True once `release()` dropped the tensors."""
        return self._released

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored tensors."""
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.kv.values())

    @property
    def device(self) -> torch.device:
        """Device the tensors live on."""
        self.check()
        return next(iter(self.kv.values()))[0].device

    def check(self) -> None:
        """Raise SupportNotSetError if this memory was released or is empty."""
        if self._released or not self.kv:
            raise SupportNotSetError("support memory was released; encode the support set again")

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SupportMemory:
        """A copy on another device and/or dtype (the same object when nothing changes)."""
        self.check()
        kv = {name: (k.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype)) for name, (k, v) in self.kv.items()}
        if all(kv[n][0] is self.kv[n][0] for n in kv):
            return self
        return replace(self, kv=kv)

    def release(self) -> None:
        """Drop the tensors now; later use raises SupportNotSetError."""
        self.kv = {}
        self._released = True

    def subsample(self, shots: int, generator: torch.Generator | None = None) -> SupportMemory:
        """Randomly keep `shots` shots' worth of tokens per layer (paper Tab. 6); self if N <= shots."""
        self.check()
        if shots < 1:
            raise InvalidInputError(f"support token subsampling needs shots >= 1, got {shots}")
        if self.num_shots <= shots:
            return self
        kv = {}
        for name, (k, v) in self.kv.items():
            total = k.shape[1]
            keep = total * shots // self.num_shots
            idx = torch.randperm(total, generator=generator, device="cpu")[:keep].sort().values.to(k.device)
            kv[name] = (k.index_select(1, idx), v.index_select(1, idx))
        return replace(self, kv=kv, key=f"{self.key}:sub{shots}")


def compose(parts: Sequence[SupportMemory]) -> SupportMemory:
    """One memory holding `parts`' shots in order: every layer's K/V laid end to end on the token axis.

    Equal to encoding all their shots at once (the support pass treats each shot on its own), so a label's
    memory can be assembled from per-example memories for any subset of its examples without re-encoding.
    """
    if not parts:
        raise InvalidInputError("compose needs at least one support memory")
    for part in parts:
        part.check()
    if len(parts) == 1:
        return parts[0]
    layers = list(parts[0].kv)
    for i, part in enumerate(parts[1:], 1):
        if list(part.kv) != layers:
            raise InvalidInputError(f"support memory {i} comes from another UNet (its layers differ from memory 0's)")
    kv = {name: (torch.cat([p.kv[name][0] for p in parts], dim=1), torch.cat([p.kv[name][1] for p in parts], dim=1))
          for name in layers}
    descriptors = torch.cat([p.descriptors for p in parts]) if all(p.descriptors is not None for p in parts) else None
    shares = torch.cat([p.shares for p in parts]) if all(p.shares is not None for p in parts) else None
    key = hashlib.sha256("+".join(p.key for p in parts).encode()).hexdigest()
    return SupportMemory(kv=kv, num_shots=sum(p.num_shots for p in parts), key=key, descriptors=descriptors,
                         shares=shares)


def split_shots(memory: SupportMemory) -> list[SupportMemory]:
    """One memory per shot of `memory` (copies: each can be cached and evicted on its own)."""
    memory.check()
    n = memory.num_shots
    pieces: list[dict] = [{} for _ in range(n)]
    for name, (k, v) in memory.kv.items():
        for j, (kj, vj) in enumerate(zip(k.chunk(n, dim=1), v.chunk(n, dim=1))):
            pieces[j][name] = (kj.clone(), vj.clone())
    return [SupportMemory(kv=kv, num_shots=1, descriptors=None if memory.descriptors is None else memory.descriptors[j : j + 1],
                          shares=None if memory.shares is None else memory.shares[j : j + 1])
            for j, kv in enumerate(pieces)]


def split_tokens(memory: SupportMemory, parts: int, generator: torch.Generator | None = None) -> list[SupportMemory]:
    """`parts` memories holding disjoint random shares of every layer's support tokens (cheap support subsets)."""
    memory.check()
    if parts < 2:
        raise InvalidInputError(f"split_tokens needs parts >= 2, got {parts}")
    out: list[dict] = [{} for _ in range(parts)]
    for name, (k, v) in memory.kv.items():
        order = torch.randperm(k.shape[1], generator=generator, device="cpu")
        for j, idx in enumerate(torch.tensor_split(order, parts)):  # `parts` pieces even with fewer tokens
            idx = idx.sort().values.to(k.device)
            out[j][name] = (k.index_select(1, idx), v.index_select(1, idx))
    return [replace(memory, kv=kv, key=f"{memory.key}:part{j}of{parts}") for j, kv in enumerate(out)]


class SupportCache:
    """Least-recently-used cache of support memories keyed by content, bounded in bytes."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, SupportMemory] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0

    @property
    def nbytes(self) -> int:
        """Bytes held by all cached memories."""
        with self._lock:
            return sum(m.nbytes for m in self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> SupportMemory | None:
        """The cached memory for `key`, or None; a hit makes it the most recent."""
        with self._lock:
            memory = self._items.get(key)
            if memory is None or memory.is_released:
                self._items.pop(key, None)
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return memory

    def put(self, key: str, memory: SupportMemory) -> None:
        """Store `memory`, evicting the least recently used until the byte bound holds.

        A memory larger than the whole bound is not stored (the caller still has it).
        """
        size = memory.nbytes
        with self._lock:
            self._items.pop(key, None)
            if size > self.max_bytes:
                return
            self._items[key] = memory
            total = sum(m.nbytes for m in self._items.values())
            while total > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                total -= evicted.nbytes

    def discard(self, key: str) -> None:
        """Forget one memory (a support set that no longer exists); absent keys are fine."""
        with self._lock:
            self._items.pop(key, None)

    def clear(self) -> None:
        """Forget every cached memory (callers holding one keep theirs)."""
        with self._lock:
            self._items.clear()
