"""Per-example support memories: composing them equals encoding at once; descriptors; per-query supports."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model import InvalidInputError
from model.similarity import latent_descriptor, most_similar
from model.support import SupportMemory, compose, split_shots

from bench.synthetic import square_scene


def test_composed_parts_equal_the_memory_encoded_at_once(tiny_model, scenes):
    """compose(per-example memories) has the same K/V and gives the same masks as encode_support of the set."""
    images, masks = map(list, zip(*scenes[:3]))
    at_once = tiny_model.encode_support(images, masks, use_cache=False)
    parts = tiny_model.encode_examples(images, masks, use_cache=False)
    assert [p.num_shots for p in parts] == [1, 1, 1]
    composed = compose(parts)
    assert composed.num_shots == 3 and list(composed.kv) == list(at_once.kv)
    for name, (k, v) in at_once.kv.items():
        torch.testing.assert_close(composed.kv[name][0], k, atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(composed.kv[name][1], v, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(composed.descriptors, at_once.descriptors, atol=1e-4, rtol=1e-3)
    query = [scenes[4][0]]
    a, b = tiny_model.segment(query, at_once)[0], tiny_model.segment(query, composed)[0]
    np.testing.assert_allclose(a.probability, b.probability, atol=1 / 255)
    assert (a.mask != b.mask).mean() < 0.001


def test_a_subset_composes_from_cached_parts_without_encoding(tiny_model, scenes, monkeypatch):
    """Once parts are cached, any subset of them is composed with no UNet or VAE pass."""
    images, masks = map(list, zip(*scenes[:4]))
    tiny_model.support_cache.clear()
    tiny_model.encode_examples(images, masks)
    calls = []
    monkeypatch.setattr(tiny_model, "support_kv_torch", lambda *a: calls.append(a))
    again = tiny_model.encode_examples([images[3], images[1]], [masks[3], masks[1]])
    assert calls == [] and all(p.num_shots == 1 for p in again)
    subset = compose(again)
    monkeypatch.undo()
    reference = compose(split_shots(tiny_model.encode_support([images[3], images[1]], [masks[3], masks[1]], use_cache=False)))
    for name, (k, _) in reference.kv.items():
        torch.testing.assert_close(subset.kv[name][0], k, atol=1e-4, rtol=1e-3)


def test_parts_are_cached_and_evicted_on_their_own(tiny_model, scenes):
    """Each part is its own cache entry, bounded by bytes like any memory (a copy, not a view of the batch)."""
    images, masks = map(list, zip(*scenes[:3]))
    tiny_model.support_cache.clear()
    parts = tiny_model.encode_examples(images, masks)
    assert len(tiny_model.support_cache) == 3
    assert tiny_model.support_cache.nbytes == sum(p.nbytes for p in parts)
    one = parts[0].nbytes
    for name, (k, _) in parts[0].kv.items():
        assert k.untyped_storage().nbytes() == k.numel() * k.element_size(), name  # owns its storage
    tiny_model.support_cache.max_bytes = 2 * one
    tiny_model.support_cache.put("other", parts[0])
    assert len(tiny_model.support_cache) == 2
    tiny_model.support_cache.max_bytes = 2 << 30


def test_compose_refuses_memories_of_another_unet_and_empty_lists(tiny_model, scenes):
    """A typed error for nothing to compose and for parts whose layers differ."""
    image, mask = scenes[0]
    part = tiny_model.encode_examples([image], [mask], use_cache=False)[0]
    with pytest.raises(InvalidInputError, match="at least one"):
        compose([])
    alien = SupportMemory(kv={"other.attn1": next(iter(part.kv.values()))}, num_shots=1)
    with pytest.raises(InvalidInputError, match="another UNet"):
        compose([part, alien])
    assert compose([part]) is part


def test_descriptors_rank_the_same_scene_first(tiny_model):
    """A query's descriptor is closest to the support example showing the same picture."""
    scenes = [square_scene(i, (96, 128)) for i in range(6)]
    parts = tiny_model.encode_examples([s[0] for s in scenes], [s[1] for s in scenes], use_cache=False)
    pool = torch.cat([p.descriptors for p in parts])
    assert pool.shape == (6, 64)
    torch.testing.assert_close(pool.norm(dim=1), torch.ones(6))
    query = tiny_model.describe_images([scenes[4][0]])[0]
    assert most_similar(query, pool, 3)[0] == 4
    assert most_similar(query, pool, 10) == sorted(range(6), key=lambda i: -float(pool[i] @ query))


def test_similarity_inputs_are_checked():
    """Shape mismatches and k < 1 are typed errors."""
    with pytest.raises(InvalidInputError, match="do not match"):
        most_similar(np.zeros(4), np.zeros((3, 5)), 1)
    with pytest.raises(InvalidInputError, match="k >= 1"):
        most_similar(np.zeros(4), np.zeros((3, 4)), 0)
    with pytest.raises(InvalidInputError, match="latents"):
        latent_descriptor(torch.zeros(4, 8, 8))


def test_each_query_gets_its_own_supports_in_one_batch(tiny_model, scenes):
    """segment_many_encoded with per-query memories equals segmenting each query alone with its memory."""
    images, masks = map(list, zip(*scenes[:4]))
    parts = tiny_model.encode_examples(images, masks, use_cache=False)
    queries = tiny_model.encode_queries([scenes[4][0], scenes[5][0], scenes[4][0]])
    chosen = [{"x": compose(parts[:2])}, {"x": compose(parts[2:])}, {"x": parts[1]}]
    batched = tiny_model.segment_many_encoded(queries, chosen, batch_size=8)
    for i, memories in enumerate(chosen):
        alone = tiny_model.segment([[scenes[4][0], scenes[5][0], scenes[4][0]][i]], memories["x"])[0]
        np.testing.assert_allclose(batched[i]["x"].probability, alone.probability, atol=1 / 255)
    with pytest.raises(InvalidInputError, match="for 2 queries"):
        tiny_model.segment_many_encoded(queries, chosen[:2])
