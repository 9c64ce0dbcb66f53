"""Analyses on a real Hugging Face GPT-2 state dict (the legacy-pickle fixture), whose
uint8 causal masks (``attn.bias``) and -1e4 constants (``attn.masked_bias``) are module
buffers: they must not be counted as trainable weights or dilute update ratios."""

from __future__ import annotations

import os

import pytest
import torch

import torchdiff


@pytest.fixture
def gpt2_pair(fixtures_dir, tmp_path):
    path = os.path.join(fixtures_dir, "tiny_gpt2_real.bin")
    sd = torch.load(path, weights_only=True)
    g = torch.Generator().manual_seed(0)
    tuned = {k: (v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() and "masked_bias" not in k
                 else v) for k, v in sd.items()}
    out = tmp_path / "tuned.pt"
    torch.save(tuned, out)
    return path, str(out), sd


def test_masks_are_not_trainable_weights_in_memory_estimates(gpt2_pair):
    old, new, sd = gpt2_pair
    report = torchdiff.compare(old, new, memory_analysis=True, device="cpu")
    data = report.analysis("memory_analysis").to_dict()
    def expected(tensors):  # Adam fp32: 16 B per float parameter, integer buffers as stored
        float_params = sum(v.numel() for v in tensors if v.is_floating_point())
        mask_bytes = sum(v.numel() * v.element_size() for v in tensors if not v.is_floating_point())
        assert mask_bytes > 0
        return float_params * 16 + mask_bytes

    # The real file ties lm_head.weight to wte (one storage): counted once. The tuned copy
    # adds noise to each tensor separately, which unties them.
    unique = {v.data_ptr(): v for v in sd.values()}.values()
    assert data["sides"]["old"]["estimates"]["training_bytes"] == expected(unique)
    assert data["sides"]["new"]["estimates"]["training_bytes"] == expected(sd.values())


def test_buffers_do_not_make_layers_look_vanishing(gpt2_pair):
    old, new, _ = gpt2_pair
    report = torchdiff.compare(old, new, gradient_analysis=True, device="cpu")
    result = report.analysis("gradient_analysis")
    assert result.headline["flow_health"] == "healthy"
