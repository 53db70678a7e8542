"""Checks that need a CUDA GPU (bench/gpu_check.sh runs them there; skipped everywhere else)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model import DiffewS
from model.train import TrainConfig, finetune
from model.unet_weights import plain_unet_state

from .test_train import shape_task

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _changed_share(before: dict, after: dict) -> float:
    changed = sum(int((before[k].float().cpu() != after[k].float().cpu()).sum()) for k in before)
    return changed / sum(v.numel() for v in before.values())


def test_bf16_fine_tuning_on_cuda_keeps_fp32_masters():
    """Served in bf16 on CUDA with bf16 autocast: the masters move like an fp32 run's, losses agree."""
    config = TrainConfig(steps=6, seed=0, lr=1e-5)
    runs = {}
    for dtype, precision in ((torch.float32, "no"), (torch.bfloat16, "bf16")):
        model = DiffewS.tiny(resolution=64, device="cuda", dtype=dtype)
        start = {k: v.float().clone() for k, v in plain_unet_state(model.unet).items()}
        result = finetune(model, shape_task(4, 0), TrainConfig(**{**config.__dict__, "mixed_precision": precision}))
        assert model.unet.dtype == dtype
        runs[dtype] = (_changed_share(start, result.weights), result.losses)
    (share32, losses32), (share16, losses16) = runs[torch.float32], runs[torch.bfloat16]
    assert share32 > 0.95 and abs(share16 - share32) < 0.02, (share32, share16)
    np.testing.assert_allclose(losses16, losses32, rtol=0.1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_attention_matches_fp32_on_cuda(dtype):
    """KV-fusion attention in bf16/fp16 on CUDA gives the fp32 masks (IoU >= 0.98) and close maps."""
    samples = shape_task(3, 5)
    outs = {}
    for d in (torch.float32, dtype):
        model = DiffewS.tiny(resolution=64, device="cuda", dtype=d)
        memory = model.encode_support([samples[1].image, samples[2].image],
                                      [samples[1].masks["disc"], samples[2].masks["disc"]])
        outs[d] = model.segment([samples[0].image], memory)[0]
    a, b = outs[torch.float32], outs[dtype]
    iou = (a.mask & b.mask).sum() / max(1, (a.mask | b.mask).sum())
    assert iou >= 0.98, iou
    assert np.abs(a.probability - b.probability).max() < 0.05


def test_segment_on_cuda_matches_cpu():
    """The same model and inputs on CUDA and on the CPU (fp32) give the same masks and maps within 1e-3."""
    samples = shape_task(3, 7)
    outs = []
    for device in ("cpu", "cuda"):
        model = DiffewS.tiny(resolution=64, device=device, dtype=torch.float32)
        memory = model.encode_support([samples[1].image], [samples[1].masks["disc"]])
        outs.append(model.segment([samples[0].image], memory)[0])
    np.testing.assert_allclose(outs[0].probability, outs[1].probability, atol=1e-3)
    assert (outs[0].mask != outs[1].mask).mean() < 0.001
