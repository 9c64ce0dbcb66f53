"""What a tensor is, read off its name and shape: shared by architecture_comparison,
memory_analysis, anomaly_detection and change_summary.

Pure functions on names, shapes and dtype names; no tensor maths, no I/O.

- ``is_optimizer_state(name)``: a component is an optimizer root (``optimizer``,
  ``optimizer_states``, ``optim``...) or the leaf is a known optimizer slot
  (``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``...).
- ``kind(name, ndim)``: ``optimizer`` | ``buffer`` (BatchNorm running stats) | ``norm``
  (1-D parameters of a normalisation module) | ``bias`` | ``embedding`` (2-D, name says
  embedding) | ``weight`` (≥ 2-D) | ``other``.
- ``role(name)``: the name with every numeric component replaced by ``*``
  (``layers.3.fc1.weight`` -> ``layers.*.fc1.weight``): tensors of one role sit in
  different blocks and do the same job.
"""

from __future__ import annotations

import re
from functools import lru_cache

OPTIMIZER_ROOTS = frozenset({"optimizer", "optimizers", "optimizer_state", "optimizer_states", "optim", "opt_state"})
OPTIMIZER_SLOTS = frozenset({"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg",
                             "acc_delta", "exp_inf"})
# Module buffers, not parameters; masked_bias is the -1e4 constant of Hugging Face GPT-2.
BUFFER_LEAVES = frozenset({"running_mean", "running_var", "num_batches_tracked", "masked_bias"})

_SPLIT = re.compile(r"[.:/]")
_NORM = re.compile(r"norm|^(ln|bn)(_?[a-z0-9]*)$")
_EMBED = re.compile(r"emb|^(wte|wpe|shared|tok_embeddings)$")
_POSITION = re.compile(r"pos|position|wpe|token_type")
_ATTENTION = re.compile(
    r"attn|attention|^(q|k|v|o|qkv|query|key|value|wq|wk|wv|wo|q_proj|k_proj|v_proj|o_proj|out_proj|c_attn)$"
)
_RNN_LEAF = re.compile(r"^(weight|bias)_(ih|hh)_l\d+(_reverse)?$")
_RNN_PART = re.compile(r"^(lstm|gru|rnn)\w*$")


@lru_cache(maxsize=65536)
def parts(name: str) -> tuple[str, ...]:
    return tuple(p for p in _SPLIT.split(name) if p)


def is_optimizer_state(name: str) -> bool:
    ps = parts(name)
    if not ps:
        return False
    return ps[-1] in OPTIMIZER_SLOTS or any(p.lower() in OPTIMIZER_ROOTS for p in ps)


def is_float_dtype(dtype: str) -> bool:
    """Storage dtype names: float*, bfloat16, float8_*, and GGUF block types count as float."""
    return not dtype.startswith(("int", "uint", "bool", "complex"))


@lru_cache(maxsize=65536)
def kind(name: str, ndim: int) -> str:
    if is_optimizer_state(name):
        return "optimizer"
    ps = [p.lower() for p in parts(name)] or [name.lower()]
    leaf, owners = ps[-1], ps[:-1]
    if leaf in BUFFER_LEAVES:
        return "buffer"
    if ndim == 1 and any(_NORM.search(p) for p in owners):
        return "norm"
    if leaf == "bias" or leaf.endswith("_bias"):
        return "bias" if ndim <= 1 else "weight"
    if ndim == 2 and any(_EMBED.search(p) for p in ps):
        return "embedding"
    if ndim >= 2:
        return "weight"
    return "other"


def is_position_embedding(name: str) -> bool:
    return any(_POSITION.search(p.lower()) for p in parts(name))


def is_attention(name: str) -> bool:
    ps = [p.lower() for p in parts(name)]
    return any(_ATTENTION.search(p) for p in ps[:-1]) or (bool(ps) and ps[-1].startswith("in_proj"))


def is_recurrent(name: str) -> bool:
    ps = [p.lower() for p in parts(name)]
    return bool(ps) and (_RNN_LEAF.match(ps[-1]) is not None or any(_RNN_PART.match(p) for p in ps[:-1]))


@lru_cache(maxsize=65536)
def role(name: str) -> str:
    return ".".join("*" if p.isdigit() else p for p in name.split("."))


def mb(nbytes: float) -> str:
    """Bytes as megabytes (10^6 bytes) for text: 4 significant digits, 1 decimal from 100 MB."""
    value = nbytes / 1e6
    if abs(value) >= 100:
        return f"{value:.1f}MB"
    return f"{value:.4g}MB"
