"""KV-fusion self-attention: installation, equality with a plain reference, order independence."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from model.attention import FusionMode, FusionState, KVFusionAttnProcessor, bank_per_sample, install_kv_fusion
from model.tiny import TINY_UNET_CONFIG
from diffusers import UNet2DConditionModel


def reference_fused_attention(attn, query_states, support_states):
    """Plain attention of each query over cat(K_q, K_s1..K_sN), written out without SDPA."""
    b, _, _ = query_states.shape
    q = attn.to_q(query_states)
    ks = attn.to_k(support_states).reshape(1, -1, q.shape[-1]).expand(b, -1, -1)
    vs = attn.to_v(support_states).reshape(1, -1, q.shape[-1]).expand(b, -1, -1)
    k = torch.cat([attn.to_k(query_states), ks], dim=1)
    v = torch.cat([attn.to_v(query_states), vs], dim=1)
    heads, d = attn.heads, q.shape[-1] // attn.heads
    split = lambda t: t.view(b, -1, heads, d).transpose(1, 2)  # noqa: E731
    weights = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(d), dim=-1)
    out = (weights @ split(v)).transpose(1, 2).reshape(b, -1, heads * d)
    return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(**TINY_UNET_CONFIG).eval()


def test_install_puts_fusion_on_attn1_only(unet):
    """Every attn1 gets a KV-fusion processor sharing one state; every attn2 keeps AttnProcessor2_0."""
    state = install_kv_fusion(unet)
    procs = unet.attn_processors
    attn1 = {k: p for k, p in procs.items() if ".attn1." in k}
    attn2 = {k: p for k, p in procs.items() if ".attn2." in k}
    assert len(attn1) == len(attn2) == 7
    assert all(isinstance(p, KVFusionAttnProcessor) and p.state is state for p in attn1.values())
    assert all(type(p) is AttnProcessor2_0 for p in attn2.values())


@pytest.mark.parametrize("shots,batch", [(1, 1), (1, 3), (2, 1), (3, 2), (5, 4)])
def test_fusion_equals_reference_N_B(unet, shots, batch):
    """The processor's output equals explicit attention over cat(K_q, K_s...) for N shots and B queries."""
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    state = FusionState()
    proc = KVFusionAttnProcessor("layer", state)
    gen = torch.Generator().manual_seed(shots * 10 + batch)
    support = torch.randn(shots, 16, attn.to_q.in_features, generator=gen)
    query = torch.randn(batch, 16, attn.to_q.in_features, generator=gen)
    with torch.no_grad():
        state.mode = FusionMode.RECORD
        own = proc(attn, support)
        assert state.bank["layer"][0].shape == (1, shots * 16, attn.to_k.out_features)
        state.mode = FusionMode.FUSE
        fused = proc(attn, query)
        expected = reference_fused_attention(attn, query, support)
        state.mode = FusionMode.OFF
        plain = proc(attn, support)
    torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(own, plain)  # the support pass is ordinary self-attention
    assert not torch.allclose(fused, proc(attn, query))  # fusion really changes the output


def test_fusion_accepts_per_sample_bank(unet):
    """A bank with batch B (one support set per query, as in training) fuses sample by sample."""
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    state = FusionState(mode=FusionMode.FUSE)
    proc = KVFusionAttnProcessor("layer", state)
    gen = torch.Generator().manual_seed(3)
    supports = torch.randn(2, 16, attn.to_q.in_features, generator=gen)
    queries = torch.randn(2, 16, attn.to_q.in_features, generator=gen)
    with torch.no_grad():
        state.bank["layer"] = (attn.to_k(supports), attn.to_v(supports))
        both = proc(attn, queries)
        for i in range(2):
            expected = reference_fused_attention(attn, queries[i : i + 1], supports[i : i + 1])
            torch.testing.assert_close(both[i : i + 1], expected, atol=1e-5, rtol=1e-5)


def test_bank_per_sample_groups_recorded_shots_by_sample(unet):
    """Supports of B episodes recorded in one pass and regrouped fuse like B separate recordings."""
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    state = FusionState()
    proc = KVFusionAttnProcessor("layer", state)
    gen = torch.Generator().manual_seed(4)
    shots, batch = 2, 3
    supports = torch.randn(batch * shots, 16, attn.to_q.in_features, generator=gen)  # sample-major
    queries = torch.randn(batch, 16, attn.to_q.in_features, generator=gen)
    with torch.no_grad():
        state.mode = FusionMode.RECORD
        proc(attn, supports)
        state.bank = bank_per_sample(state.bank, batch)
        assert state.bank["layer"][0].shape == (batch, shots * 16, attn.to_k.out_features)
        state.mode = FusionMode.FUSE
        together = proc(attn, queries)
        for i in range(batch):
            expected = reference_fused_attention(attn, queries[i : i + 1], supports[i * shots : (i + 1) * shots])
            torch.testing.assert_close(together[i : i + 1], expected, atol=1e-5, rtol=1e-5)


def test_fusion_errors_name_the_layer(unet):
    """A missing bank entry or a bank of the wrong batch raises an error naming the layer."""
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    state = FusionState(mode=FusionMode.FUSE)
    proc = KVFusionAttnProcessor("down.attn1", state)
    x = torch.randn(3, 16, attn.to_q.in_features)
    with pytest.raises(KeyError, match="down.attn1"):
        proc(attn, x)
    state.bank["down.attn1"] = (torch.zeros(2, 4, attn.to_k.out_features),) * 2
    with pytest.raises(ValueError, match="support bank has batch 2, query batch is 3"):
        proc(attn, x)
    with pytest.raises(ValueError, match="self-attention"):
        proc(attn, x, encoder_hidden_states=x)
