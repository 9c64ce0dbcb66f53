"""Layer grouping (torchdiff.layers), hand-checked names."""

from __future__ import annotations

import pytest

from torchdiff.names import block_index, layer_of


@pytest.mark.parametrize("name, layer", [
    ("transformer.h.3.attn.c_attn.weight", "transformer.h.3"),
    ("model.layers.12.mlp.up_proj.weight", "model.layers.12"),
    ("encoder.layer.5.output.dense.bias", "encoder.layer.5"),
    ("blk.7.attn_q.weight", "blk.7"),
    ("0.weight", "0"),                       # nn.Sequential: the module prefix
    ("lm_head.weight", "lm_head"),
    ("weight", "weight"),
    ("lstm.weight_hh_l1", "lstm.l1"),        # torch.nn.LSTM's stacked layers
    ("bias_ih_l0_reverse", "l0"),
    ("gru.weight_hr_l2", "gru.l2"),
])
def test_default_layers(name, layer):
    assert layer_of(name) == layer


def test_pattern_overrides_and_block_index():
    assert layer_of("model.layers.12.mlp.w", r"(model\.layers)\.\d+") == "model.layers"
    assert block_index("transformer.h.3") == 3 and block_index("lm_head") is None
