"""What a tensor's name says: its layer, its role, its module type and its naming family.

The one home of these facts (docs/ARCHITECTURE.md, "One table for one fact"): every
analysis, render, the monitor and the policy gates ask here; nothing else guesses from
names. Pure functions on names, dtype names and shapes; no tensor maths, no I/O.

- ``layer_of(name)``: the first numbered block (``h.3``, ``layers.12``, ``blk.7``), else a
  recurrent layer (``lstm.l1``), else the module prefix, else the name.
- ``role(name, dtype, ndim)``: ``parameter`` | ``buffer`` | ``counter`` |
  ``optimizer_state`` | ``quant_companion`` | ``training_state`` (RNG states, 0-d
  losses and metrics); ``roles(specs)`` decides them for a whole checkpoint, where a
  tensor's neighbours help (``W`` + ``W_scale``); ``roles_over`` for checkpoints
  compared in order (the newest holding a name decides).
- ``module_type(name)``: ``attn_q`` ... ``mlp_down``, ``norm``, ``embedding``, ``head``, ``other``.
- ``family(names)``: ``gguf`` | ``megatron`` | ``timm`` | ``lightning`` | ``nanogpt`` | ``hf`` | ``torch``.
- ``is_float_storage(dtype)``: whether values are real numbers measured as floats.
- ``optimizer_param(name)``: (parameter key, state field) of an optimizer-state tensor.
- ``is_averaged_copy(component)``: whether a name component names an EMA/SWA copy.

tests/test_names.py pins the answers for HF, timm, Lightning, nanoGPT, GGUF, Megatron
and DCP/FSDP names.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Iterable, Mapping, Sequence

from torchdiff.errors import UsageError

# ---- roles ------------------------------------------------------------------------

PARAMETER = "parameter"
BUFFER = "buffer"
COUNTER = "counter"
OPTIMIZER_STATE = "optimizer_state"
QUANT_COMPANION = "quant_companion"
#: The training loop's own state, neither the model nor the optimizer: RNG states,
#: losses and metrics saved as tensors.
TRAINING_STATE = "training_state"
ROLES = (PARAMETER, BUFFER, COUNTER, OPTIMIZER_STATE, QUANT_COMPANION, TRAINING_STATE)

#: ``--scope``: which roles the summary, global and layer figures cover (training state: ``all`` only).
SCOPES: dict[str, frozenset[str]] = {
    "params": frozenset({PARAMETER}),
    "model": frozenset({PARAMETER, BUFFER, COUNTER, QUANT_COMPANION}),
    "all": frozenset(ROLES),
}
scope_names = list(SCOPES)

#: Path components under which everything is optimizer state.
OPTIMIZER_ROOTS = frozenset({"optimizer", "optimizers", "optimizer_state", "optimizer_states", "optim",
                             "opt_state", "optim_state"})
#: Per-parameter state fields of torch optimizers (Adam/AdamW, SGD, RMSprop, Adagrad, ...).
OPTIMIZER_FIELDS = frozenset({
    "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step", "momentum_buffer", "square_avg",
    "acc_delta", "sum", "grad_avg", "mu_product", "eta", "ax", "prev", "step_size", "state_sum",
    "exp_inf",
})
#: Module buffers: statistics, masks, constants (masked_bias: HF GPT-2's -1e4).
BUFFER_LEAVES = frozenset({"running_mean", "running_var", "masked_bias", "position_ids", "inv_freq",
                           "token_type_ids", "causal_mask"})
#: Integer counters: they grow by one per step, whatever the model learns.
COUNTER_LEAVES = frozenset({"num_batches_tracked", "n_averaged"})
#: Leaves that only quantization companions carry (bitsandbytes, GPTQ/AWQ, fp8, torch.ao).
_COMPANION_LEAVES = frozenset({"SCB", "absmax", "quant_map", "nested_absmax", "nested_quant_map", "qzeros",
                               "scales", "g_idx", "zero_point", "weight_scale", "weight_scale_inv",
                               "weight_zero_point", "input_scale", "scale_inv", "quant_state"})
#: RNG states saved as tensors (``torch.get_rng_state()``: uint8 bytes, any dtype accepted):
#: a name component that says rng (``rng``, ``rng_state``, ``cpu_rng_state``,
#: ``cuda_rng_states``...), as the leaf or as the key above a device's state (``rng_state.cuda``).
#: accelerate's save_state names them after the seeding call (``torch_manual_seed``,
#: ``torch_cuda_manual_seed``, ``numpy_random_seed``, ``xm_seed``): a component ending in ``seed``.
_RNG_PART = re.compile(r"^(?:[a-z0-9]+_)*(?:rng(?:_states?)?|seed)$", re.IGNORECASE)
#: Roots of a training checkpoint under which every tensor is the loop's own state:
#: Lightning's ``callbacks`` (ModelCheckpoint's ``best_k_models`` scores, ``kth_value``,
#: ``current_score``; EarlyStopping's ``best_score``).
TRAINING_ROOTS = frozenset({"callbacks"})
#: Losses and metrics a training loop saves as 0-d tensors (nanoGPT's ``best_val_loss``;
#: Lightning's ModelCheckpoint / EarlyStopping ``best_model_score``, ``best_score``); a
#: tensor with dimensions under these names is left a parameter.
METRIC_LEAVES = frozenset({"loss", "train_loss", "val_loss", "eval_loss", "best_loss", "best_val_loss",
                           "best_model_score", "best_score"})
#: Suffixes that make ``W<suffix>`` a companion of ``W`` when ``W`` is stored quantized.
COMPANION_SUFFIXES = ("_scale", ".scale", "_scale_inv", ".scale_inv", "_zero_point", ".zero_point", "_zp", ".zp")

_SPLIT = re.compile(r"[.:/]")
# DCP / FSDP get_state_dict: optim.state.<fully qualified parameter name>.<field>
_FQN_STATE = re.compile(r"^(?P<opt>(?:.*\.)?(?:optim|optimizer|optimizer_state|optim_state)\.)state\."
                        r"(?P<fqn>.+)\.(?P<field>\w+)$")
# torch's Optimizer.state_dict(): [prefix]state.<index>.<field> and metadata
# [prefix]param_groups.<group>.<key>; the prefix ends at a separator (``optimizer.``, or
# ``optimizer.bin:`` when -r names tensors after their file).
OPTIMIZER_STATE_NAME = re.compile(r"^(?P<opt>(?:.+[.:/])?)state\.(?P<idx>\d+)\.(?P<field>\w+)$")
PARAM_GROUP_NAME = re.compile(r"^(?P<opt>(?:.+[.:/])?)param_groups\.(?P<group>\d+)\.(?P<key>\w+)$")


@lru_cache(maxsize=65536)
def parts(name: str) -> tuple[str, ...]:
    """Name components split at ``.``, ``:`` and ``/``."""
    return tuple(p for p in _SPLIT.split(name) if p)


@lru_cache(maxsize=65536)
def optimizer_param(name: str) -> tuple[str, str] | None:
    """(parameter key, state field) of an optimizer-state tensor name, else None.

    ``optimizer.state.3.exp_avg`` -> ``("optimizer.state.3", "exp_avg")`` (torch numbers
    parameters; the gradient analysis maps numbers to names);
    ``optim.state.model.fc.weight.exp_avg`` -> ``("model.fc.weight", "exp_avg")`` (DCP,
    FSDP's get_state_dict: the parameter's own name). A name with an optimizer root
    component (``optimizer_states.0...``) is optimizer state whatever its leaf. A leaf
    such as ``exp_avg`` alone (``encoder.norm_stats.exp_avg``) is not enough.
    """
    if "state." not in name and "opt" not in name.lower():  # no state path, no optimizer root
        return None
    m = _FQN_STATE.match(name)
    if m and m["field"] in OPTIMIZER_FIELDS and not m["fqn"].isdigit():
        return m["fqn"], m["field"]
    m = OPTIMIZER_STATE_NAME.match(name)
    if m and m["field"] in OPTIMIZER_FIELDS:
        return f"{m['opt']}state.{m['idx']}", m["field"]
    ps = parts(name)
    if any(p.lower() in OPTIMIZER_ROOTS for p in ps[:-1]):
        return ".".join(ps[:-1]), ps[-1]
    return None


def _leaf(name: str) -> str:
    """The last component of ``name`` (the name itself when it has none)."""
    leaf = name.rpartition(".")[2]
    if leaf and ":" not in leaf and "/" not in leaf:
        return leaf
    ps = parts(name)
    return ps[-1] if ps else name


def optimizer_prefixes(names: Iterable[str], metadata: Mapping[str, Any] = {}) -> tuple[str, ...]:
    """Prefixes under which a checkpoint holds torch optimizer state (``"optimizer."``,
    ``""`` for a bare optimizer state_dict), longest first; from tensor names
    ``P.state.K.FIELD`` and metadata keys ``P.param_groups.G.KEY``."""
    found: set[str] = set()
    for key in metadata:
        m = PARAM_GROUP_NAME.match(str(key))
        if m:
            found.add(m["opt"])
    for name in names:
        m = OPTIMIZER_STATE_NAME.match(name)
        if m and m["field"] in OPTIMIZER_FIELDS:
            found.add(m["opt"])
    return tuple(sorted(found, key=len, reverse=True))


def is_optimizer_state(name: str) -> bool:
    return optimizer_param(name) is not None


#: A name component of an averaged copy of the model that no optimizer steps: an EMA
#: (``ema``, ``model_ema``, timm's ``state_dict_ema``), SWA (``swa_model``),
#: ``averaged_model``, ``shadow``.
_AVERAGED = re.compile(r"^(?:.*_)?(?:ema|swa)(?:_.*)?$|^averaged|^shadow", re.IGNORECASE)


def is_averaged_copy(component: str) -> bool:
    """Whether one name component (``model_ema``, ``swa_model``, ``shadow``) names an
    averaged copy of the model (EMA, SWA): its tensors have the parameters' shapes, but no
    optimizer steps them (the gradient analysis maps optimizer state past them)."""
    return _AVERAGED.search(component) is not None


@lru_cache(maxsize=65536)
def role(name: str, dtype: str | None = None, ndim: int | None = None) -> str:
    """The role of one tensor from its own name (and dtype and ndim, when known).

    ``training_state``: a name component that says rng (any dtype, any shape), or a 0-d
    tensor whose leaf is a loss or metric (``best_val_loss``; ``ndim`` must be known to
    be 0, so a name alone never decides it). ``logit_scale`` (CLIP's 0-d temperature) and
    ``loss_fn.weight`` (leaf ``weight``) stay parameters.

    ``roles()`` is the same with a checkpoint's other names as context, which also finds
    ``W_scale`` companions of a quantized ``W``.
    """
    opt = optimizer_param(name)
    leaf = _leaf(name)
    if opt is not None:
        return OPTIMIZER_STATE  # its step counter too: the optimizer's, not the model's
    low = name.lower()
    if ((("rng" in low or "seed" in low) and any(_RNG_PART.match(p) for p in parts(name)))
            or (ndim == 0 and leaf in METRIC_LEAVES) or _root(name) in TRAINING_ROOTS):
        return TRAINING_STATE
    if leaf in COUNTER_LEAVES:
        return COUNTER
    if leaf in BUFFER_LEAVES:
        return BUFFER
    if dtype in ("bool", "uint8") and leaf == "bias" and (ndim or 0) >= 2:
        return BUFFER  # HF GPT-2's causal masks: attn.bias of shape [1, 1, n, n]
    if leaf in _COMPANION_LEAVES:
        return QUANT_COMPANION
    return PARAMETER


def _root(name: str) -> str:
    """The first component of a name, after the ``<file>:`` prefix -r gives it (a
    Lightning callback's key may hold ``:`` and ``/`` itself: only the first ``.`` ends it)."""
    head = name.split(".", 1)[0]
    if ":" in head:
        head = head.rsplit(":", 1)[1]
    elif ":" in name and "{" not in name.split(":", 1)[0]:
        head = name.split(":", 1)[1].split(".", 1)[0]
    return head


def roles(specs: Mapping[str, tuple[str, int]], names: Iterable[str] | None = None) -> dict[str, str]:
    """Roles for a checkpoint: ``specs`` maps name -> (storage dtype name, ndim); only
    ``names`` (default: every name of ``specs``) are decided.

    As ``role()``, plus: ``W<suffix>`` (``_scale``, ``.zero_point``...) is a
    quantization companion when ``W`` is stored in a non-float (or float8) dtype; so is
    a module's scalar ``M.scale`` beside its ``M.zero_point`` (a torch.ao quantized
    module's or QuantStub's output quantization: one scale, one zero point).
    """
    out = {name: role(name, *specs[name]) for name in (specs if names is None else names)}
    for name in out:
        if out[name] != PARAMETER or not name.endswith(COMPANION_SUFFIXES):
            continue
        if name.endswith(".scale") and specs[name][1] <= 1 and name[:-5] + "zero_point" in specs:
            out[name] = QUANT_COMPANION
            continue
        for suffix in COMPANION_SUFFIXES:
            if name.endswith(suffix):
                base = specs.get(name[: -len(suffix)])
                if base is not None and (not is_float_storage(base[0]) or base[0].startswith("float8")):
                    out[name] = QUANT_COMPANION
                break
    return out


def roles_over(checkpoints: Sequence[Mapping[str, tuple[str, int]]]) -> dict[str, str]:
    """Roles over checkpoints compared in order (old to new), each given as its ``specs``
    (see :func:`roles`): a name's role is the one the newest checkpoint holding it gives
    it, with that checkpoint's other names as context (an added ``W_scale`` beside the
    new side's int8 ``W`` is a quantization companion). The one rule of compare, series
    and policies."""
    out: dict[str, str] = {}
    for specs in reversed(checkpoints):
        if not out:
            out = roles(specs)
        else:
            out.update(roles(specs, [n for n in specs if n not in out]))
    return out


def in_scope(tensor_role: str, scope: str) -> bool:
    return tensor_role in SCOPES[scope]


def check_scope(scope: str) -> str:
    if scope not in SCOPES:
        raise UsageError(f"unknown --scope {scope!r} (choose from {', '.join(scope_names)})")
    return scope


# ---- dtypes ---------------------------------------------------------------------------

_INT_STORAGE = re.compile(r"^(q?u?int\d*|bool|I\d+|sparse bool|sparse u?int\d*)$")
_FLOAT_STORAGE = re.compile(
    r"^(sparse )?(float\d*|bfloat16|float8_\w+|complex\d*|half|double)$"  # torch / numpy names
    r"|^(F64|F32|F16|BF16|Q\d\w*|IQ\d\w*|TQ\d\w*|MXFP4)$"  # GGUF: plain floats and block-quantized
)


@lru_cache(maxsize=1024)
def is_float_storage(dtype: Any) -> bool:
    """Whether a storage dtype holds real values measured as floats: float*, bfloat16,
    float8_*, complex* (measured as real pairs), and GGUF's float and block-quantized
    types (dequantized). Integers, bool and anything unknown are not."""
    text = str(dtype).removeprefix("torch.")
    return _FLOAT_STORAGE.match(text) is not None


_TORCH_QUANTIZED = re.compile(r"^(torch\.)?q(u)?int\d+(x\d+)?$")


def is_quantized_storage(dtype: Any) -> bool:
    """Whether a storage dtype is one of torch.ao's quantized dtypes (qint8, quint8,
    qint32, quint4x2, quint2x4): a weight stored as codes with its own scale and zero
    point, read dequantized. A weight all the same (architecture's family evidence)."""
    return _TORCH_QUANTIZED.match(str(dtype)) is not None


# ---- layers -------------------------------------------------------------------------

_RNN_LAYER = re.compile(r"^(?:weight|bias)_(?:ih|hh|hr)_(l\d+)(?:_reverse)?$")


#: A numbered component of a slash-separated name: ``layer_0`` (TensorFlow BERT),
#: ``layers_3``, ``TransformerBlock_0`` (Flax's auto-named submodules).
_NUMBERED = re.compile(r"^[A-Za-z]\w*?_(\d+)$")


def _separator(name: str) -> str:
    """``/`` for a name written with slashes and no dot (TensorFlow, Keras, Flax and JAX
    names saved to ``.npz``: ``params/Dense_0/kernel``), else ``.``."""
    return "/" if "/" in name and "." not in name else "."


def _block(part: str, sep: str) -> str | None:
    """The block number a name component stands for: its digits (``3``); with ``/``
    names also a numbered component's (``layer_3``); else None."""
    if part.isdigit():
        return part
    m = _NUMBERED.match(part) if sep == "/" else None
    return m.group(1) if m else None


@lru_cache(maxsize=65536)
def _default_layer(name: str) -> str:
    sep = _separator(name)
    ps = name.split(sep)
    for i, part in enumerate(ps[:-1]):
        if i > 0 and _block(part, sep) is not None:
            return sep.join(ps[: i + 1])
    rnn = _RNN_LAYER.match(ps[-1])
    if rnn:  # torch.nn.LSTM/GRU/RNN: weight_ih_l0, bias_hh_l1_reverse -> layer l0, l1
        return sep.join(ps[:-1] + [rnn.group(1)])
    if len(ps) > 1:
        return sep.join(ps[:-1])
    return name


def compile_pattern(pattern: "str | re.Pattern[str] | None") -> "re.Pattern[str] | None":
    if not pattern:
        return None
    if isinstance(pattern, re.Pattern):
        return pattern
    try:
        return re.compile(pattern)
    except re.error as e:
        raise UsageError(f"--layer-pattern {pattern!r} is not a valid regex ({e})") from None


def layer_of(name: str, pattern: "re.Pattern[str] | str | None" = None) -> str:
    """The layer of a tensor.

    ``pattern`` (``--layer-pattern``) overrides: the layer is the regex's first match
    (group 1 if it has groups).
    """
    if pattern is not None:
        m = compile_pattern(pattern).search(name)
        if m is not None:
            return m.group(1) if m.re.groups else m.group(0)
    return _default_layer(name)


def block_index(layer: str) -> int | None:
    """The block number of a numbered layer name (``h.3`` -> 3, ``bert/encoder/layer_3``
    -> 3), else None."""
    sep = _separator(layer)
    block = _block(layer.rsplit(sep, 1)[-1], sep)
    return int(block) if block is not None else None


def block_stack(layer: str) -> str:
    """The stack a numbered layer belongs to: the layer less its block number
    (``encoder.layer.5`` -> ``encoder.layer``, ``bert/encoder/layer_3`` -> ``bert/encoder``).
    ``encoder.layer.*`` and ``decoder.layer.*`` are two stacks."""
    return layer.rsplit(_separator(layer), 1)[0]


@lru_cache(maxsize=65536)
def pattern(name: str) -> str:
    """The name with numeric components as ``*``: ``layers.3.fc1.weight`` ->
    ``layers.*.fc1.weight`` (``params/layers_3/mlp/kernel`` -> ``params/layers_*/mlp/kernel``);
    tensors of one pattern do one job in different blocks."""
    sep = _separator(name)
    return sep.join(_pattern_part(p, sep) for p in name.split(sep))


def _pattern_part(part: str, sep: str) -> str:
    block = _block(part, sep)
    return part if block is None else part[: len(part) - len(block)] + "*"


# ---- structure ------------------------------------------------------------------------

_NORM = re.compile(r"norm|^(ln|bn)(_?[a-z0-9]*)$")
_EMBED = re.compile(r"emb|^(wte|wpe|shared|tok_embeddings|token_embd)$")
_POSITION = re.compile(r"pos|position|wpe|token_type")
_ATTENTION = re.compile(
    r"attn|attention|^(q|k|v|o|qkv|query|key|value|wq|wk|wv|wo|q_proj|k_proj|v_proj|o_proj|out_proj|c_attn)$"
)
_RNN_LEAF = re.compile(r"^(weight|bias)_(ih|hh)_l\d+(_reverse)?$")
_RNN_PART = re.compile(r"^(lstm|gru|rnn)\w*$")


@lru_cache(maxsize=65536)
def kind(name: str, ndim: int) -> str:
    """Structural kind: ``optimizer`` | ``buffer`` (buffers, counters and training state:
    tensors no optimizer moves) | ``norm`` (1-D parameters of a normalisation) | ``bias`` |
    ``embedding`` | ``weight`` (≥ 2-D) | ``other``."""
    r = role(name, None, ndim)
    if r == OPTIMIZER_STATE:
        return "optimizer"
    if r in (BUFFER, COUNTER, TRAINING_STATE):
        return "buffer"
    ps = [p.lower() for p in parts(name)] or [name.lower()]
    leaf, owners = ps[-1], ps[:-1]
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
    """Whether a tensor belongs to an attention module: a component saying attention
    (``attn``, ``q_proj``...), or nn.MultiheadAttention's ``in_proj_*``. A normalisation's
    tensor is not, even when its name says where it sits (Llama's
    ``post_attention_layernorm``, Whisper's ``self_attn_layer_norm``, GGUF's ``attn_norm``)."""
    ps = [p.lower() for p in parts(name)]
    if len(ps) > 1 and _NORM.search(ps[-2]):
        return False
    return any(_ATTENTION.search(p) for p in ps[:-1]) or (bool(ps) and ps[-1].startswith("in_proj"))


def is_recurrent(name: str) -> bool:
    ps = [p.lower() for p in parts(name)]
    return bool(ps) and (_RNN_LEAF.match(ps[-1]) is not None or any(_RNN_PART.match(p) for p in ps[:-1]))


MODULE_TYPES = ("attn_q", "attn_k", "attn_v", "attn_o", "attn_qkv", "mlp_gate", "mlp_up", "mlp_gate_up",
                "mlp_down", "norm", "embedding", "head", "other")

# The module component -> type, across HF (llama, GPT-2, BERT, T5), nanoGPT, timm,
# GGUF (llama.cpp) and Megatron-core names. Matched on the lower-cased component.
_MODULE_TABLE: dict[str, str] = {
    **dict.fromkeys(("q_proj", "q", "query", "wq", "attn_q", "q_lin"), "attn_q"),
    **dict.fromkeys(("k_proj", "k", "key", "wk", "attn_k", "k_lin"), "attn_k"),
    **dict.fromkeys(("v_proj", "v", "value", "wv", "attn_v", "v_lin"), "attn_v"),
    **dict.fromkeys(("o_proj", "out_proj", "o", "wo", "attn_output", "linear_proj", "out_lin", "dense_out"),
                    "attn_o"),
    **dict.fromkeys(("qkv_proj", "qkv", "c_attn", "query_key_value", "linear_qkv", "wqkv", "attn_qkv",
                     "in_proj"), "attn_qkv"),
    **dict.fromkeys(("gate_proj", "w1", "ffn_gate", "gate"), "mlp_gate"),
    **dict.fromkeys(("up_proj", "w3", "ffn_up", "c_fc", "fc1", "lin1", "dense_h_to_4h", "intermediate",
                     "wi", "wi_0", "wi_1"), "mlp_up"),
    **dict.fromkeys(("gate_up_proj", "linear_fc1"), "mlp_gate_up"),
    **dict.fromkeys(("down_proj", "w2", "ffn_down", "fc2", "lin2", "dense_4h_to_h", "linear_fc2"), "mlp_down"),
    **dict.fromkeys(("lm_head", "output", "head", "classifier", "score", "output_layer"), "head"),
    **dict.fromkeys(("wte", "wpe", "embed_tokens", "word_embeddings", "position_embeddings",
                     "token_type_embeddings", "tok_embeddings", "token_embd", "embeddings", "embedding",
                     "embed", "shared", "patch_embed", "pos_embed", "cls_token"), "embedding"),
}
_MLP_PARENT = re.compile(r"^(mlp|ffn|feed_forward|feedforward|ff)$")


@lru_cache(maxsize=65536)
def module_type(name: str) -> str:
    """The kind of module a tensor belongs to (one of ``MODULE_TYPES``); the columns
    of the report's layer × module heatmap."""
    ps = [p.lower() for p in parts(name)] or [name.lower()]
    leaf, owners = ps[-1], ps[:-1]
    if leaf.startswith("in_proj"):  # torch.nn.MultiheadAttention: in_proj_weight / in_proj_bias
        return "attn_qkv"
    if leaf in ("cls_token", "pos_embed"):
        return "embedding"
    for i in range(len(owners) - 1, -1, -1):
        p = owners[i]
        if _NORM.search(p) or p in ("ln_f", "final_layernorm"):
            return "norm"
        found = _MODULE_TABLE.get(p)
        if found == "attn_o" or p == "c_proj" or p == "dense":
            parent = owners[i - 1] if i else ""
            if _MLP_PARENT.match(parent) or parent == "output" and p == "dense" and "attention" not in owners:
                return "mlp_down"  # GPT-2 mlp.c_proj; BERT layer.N.output.dense
            if p in ("c_proj", "dense") and not any(_ATTENTION.search(o) for o in owners[:i]):
                continue
            return "attn_o"
        if found == "embedding" and p == "output":
            continue
        if found is not None:
            return found
    if leaf in _MODULE_TABLE and _MODULE_TABLE[leaf] in ("embedding", "head"):
        return _MODULE_TABLE[leaf]
    return "other"


FAMILIES = ("gguf", "megatron", "timm", "lightning", "nanogpt", "hf", "torch")
_GGUF = re.compile(r"^(blk\.\d+\.|token_embd\.|output_norm\.|output\.weight$|rope_freqs\.)")
_MEGATRON = re.compile(r"(^|\.)(decoder|encoder)\.layers\.\d+\.(self_attention|mlp)\.|language_model\.")
_TIMM = re.compile(r"^(blocks\.\d+\.|stages\.\d+\.|patch_embed\.|cls_token$|pos_embed$|stem\.)")
_LIGHTNING = re.compile(r"^(state_dict\.|optimizer_states\.|lr_schedulers\.|loops\.)")
_HF = re.compile(r"(^|\.)(model\.layers\.\d+|h\.\d+\.(attn|mlp)|encoder\.layer\.\d+|decoder\.layers\.\d+"
                 r"|model\.decoder\.|embed_tokens|word_embeddings|lm_head)\b")


def family(names: Iterable[str], shapes: Mapping[str, tuple[int, ...]] | None = None) -> str:
    """The naming family of a checkpoint's tensor names (one of ``FAMILIES``).

    GPT-2 names are shared by Hugging Face (Conv1D, weight [in, out]) and nanoGPT
    (Linear, [out, in]); with ``shapes`` the ``c_attn`` weight's layout decides.
    """
    names = list(names)
    counts = dict.fromkeys(FAMILIES, 0)
    for n in names:
        if _GGUF.search(n):
            counts["gguf"] += 1
        elif _LIGHTNING.search(n):
            counts["lightning"] += 1
        elif _MEGATRON.search(n):
            counts["megatron"] += 1
        elif _TIMM.search(n):
            counts["timm"] += 1
        elif _HF.search(n):
            counts["hf"] += 1
    best = max(FAMILIES, key=lambda f: counts[f])
    if counts[best] == 0:
        return "torch"
    if best == "hf" and shapes:
        for n in names:
            if n.endswith("attn.c_attn.weight") and len(shapes.get(n, ())) == 2:
                rows, cols = shapes[n]
                if rows == 3 * cols:
                    return "nanogpt"
                break
    return best
