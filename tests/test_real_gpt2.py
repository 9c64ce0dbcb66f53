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
    def expected(items):  # Adam fp32: 16 B per parameter; buffers (masks, masked_bias) as stored
        buffers = [v for k, v in items if not v.is_floating_point() or k.endswith("masked_bias")]
        params = sum(v.numel() for k, v in items if v.is_floating_point() and not k.endswith("masked_bias"))
        assert buffers
        return params * 16 + sum(v.numel() * v.element_size() for v in buffers)

    # The real file ties lm_head.weight to wte (one storage): counted once. The tuned copy
    # adds noise to each tensor separately, which unties them.
    unique = {v.data_ptr(): (k, v) for k, v in sd.items()}.values()
    assert data["sides"]["old"]["estimates"]["training_bytes"] == expected(unique)
    assert data["sides"]["new"]["estimates"]["training_bytes"] == expected(sd.items())


def test_buffers_do_not_make_layers_look_vanishing(gpt2_pair):
    old, new, _ = gpt2_pair
    report = torchdiff.compare(old, new, gradient_analysis=True, device="cpu")
    result = report.analysis("gradient_analysis")
    assert result.headline["flow_health"] == "healthy"
