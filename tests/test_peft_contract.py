"""The peft conventions model/adapters.py relies on, named in one place (peft is `>=0.13` for users, exact in
constraints.txt): an upgrade that changes one fails here, not in a version that silently loads without its adapter."""

from __future__ import annotations

import warnings

import torch

from model import DiffewS
from model.adapters import adapter_parameters, adapter_state, add_adapter, lora_config, remove_adapter


def test_adapter_parameters_are_named_lora_and_by_adapter():
    """adapter_parameters finds an adapter's weights by "lora_" and ".<name>." in the parameter names."""
    model = DiffewS.tiny(resolution=64)
    add_adapter(model, lora_config(4), "v_one")
    names = [n for n, _ in model.unet.named_parameters() if "lora_" in n]
    assert names and all(".v_one." in n for n in names)
    assert len(adapter_parameters(model, "v_one")) == len(names)
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in adapter_parameters(model, "v_one"))


def test_a_second_adapter_warns_with_the_text_add_adapter_silences():
    """peft warns when a second adapter joins a UNet; add_adapter filters that warning by its text."""
    model = DiffewS.tiny(resolution=64)
    add_adapter(model, lora_config(4), "v_one")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.unet.add_adapter(lora_config(4), adapter_name="v_raw")
    texts = [str(w.message) for w in caught]
    assert texts and texts[0].startswith("Already found a `peft_config` attribute"), texts
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        add_adapter(model, lora_config(4), "v_two")
    assert [str(w.message) for w in caught] == []


def test_adapter_state_round_trips_and_removal_drops_the_weights():
    """An adapter's state (peft's keys) loads back into another UNet as the same weights; remove_adapter deletes
    them and the config entry."""
    model = DiffewS.tiny(resolution=64)
    add_adapter(model, lora_config(4), "v_one")
    for p in adapter_parameters(model, "v_one"):
        p.data.normal_()
    state = adapter_state(model, "v_one")
    other = DiffewS.tiny(resolution=64)
    add_adapter(other, lora_config(4), "v_one", state)
    assert all(torch.equal(state[k], v) for k, v in adapter_state(other, "v_one").items())
    remove_adapter(other, "v_one")
    assert "v_one" not in getattr(other.unet, "peft_config", {})
    assert not [n for n, _ in other.unet.named_parameters() if ".v_one." in n]
