"""DIFFEWS_DTYPE: the working precision, with the decode and the threshold always in float32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backend.core.settings import Settings
from backend.worker.runtime import load_model
from model import DiffewS, InvalidInputError
from model.pipeline import parse_dtype

from bench.synthetic import square_scene


def test_parse_dtype():
    assert parse_dtype("fp32") is torch.float32 and parse_dtype("bfloat16") is torch.bfloat16
    assert parse_dtype("FP16") is torch.float16 and parse_dtype("auto", "cpu") is torch.float32
    assert parse_dtype(None, "cpu") is torch.float32
    with pytest.raises(InvalidInputError, match="dtype must be auto, fp32, bf16 or fp16, got 'fp64'"):
        parse_dtype("fp64")


def test_setting_is_read_and_checked():
    assert Settings.from_env({"DIFFEWS_DTYPE": "bf16"}).dtype == "bf16"
    with pytest.raises(ValueError, match="DIFFEWS_DTYPE must be auto, fp32, bf16 or fp16, got 'fp64'"):
        Settings(dtype="fp64").validate()
    assert load_model(Settings(model_spec="tiny", dtype="bf16", tiny_resolution=64)).dtype is torch.bfloat16


@torch.inference_mode()
def test_reduced_precision_decodes_in_float32():
    """A bf16 model decodes mask latents with the fp32 weights: the same map as the fp32 model, to the bit."""
    fp32, bf16 = DiffewS.tiny(resolution=64), DiffewS.tiny(resolution=64, dtype=torch.bfloat16)
    assert fp32.decode_vae is None and next(bf16.decode_vae.parameters()).dtype is torch.float32
    assert next(bf16.vae.parameters()).dtype is torch.bfloat16
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    prob32, peak32 = fp32.decode_probability_torch(latents)
    prob16, peak16 = bf16.decode_probability_torch(latents)
    assert prob16.dtype is torch.float32
    torch.testing.assert_close(prob16, prob32, rtol=0, atol=0)
    torch.testing.assert_close(peak16, peak32, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_masks_match_fp32(dtype):
    """The tiny model's masks in bf16 / fp16 (fused attention upcast) overlap the fp32 masks."""
    (img_a, mask_a), (img_b, mask_b), (query, _) = (square_scene(i, (64, 64)) for i in range(3))
    masks = {}
    for d in (torch.float32, dtype):
        model = DiffewS.tiny(resolution=128, dtype=d)
        assert model.fusion.upcast is (d is torch.float16)
        memory = model.encode_support([img_a, img_b], [mask_a, mask_b])
        [out] = model.segment([query], memory)
        assert out.probability.dtype == np.float32
        masks[d] = out.mask
    a, b = masks[torch.float32], masks[dtype]
    assert (a & b).sum() / max((a | b).sum(), 1) >= 0.9
