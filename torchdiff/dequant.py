"""Dequantization of stored weights with scale / zero-point companions, headers only.

A quantized export stores a weight ``W`` as integer (or float8) codes plus companions:
``W_scale`` / ``W.scale`` / ``W_scale_inv`` (``weight_scale`` for ``*.weight``), an
optional zero point ``W_zero_point`` / ``W.zero_point`` / ``W_zp``, or bitsandbytes'
``<module>.SCB``. :func:`dequantize_checkpoint` folds the companions into their weight:
the weight's handle then materialises B = (q − zero_point) · scale (÷ 127 for SCB),
lazily, in the engine's single pass, and its ``nbytes`` counts the companions' bytes.
The scale layouts (per tensor, per channel, per block: :func:`fit_scale`,
:func:`block_size`) are those of docs/analyses/quantization_analysis.md.

GPTQ and AWQ checkpoints store ``<module>.qweight`` (int32 words, each packing
32/bits codes) with ``<module>.scales``, ``<module>.qzeros`` and (GPTQ)
``<module>.g_idx``: :func:`dequantize_checkpoint` unpacks them into ``<module>.weight``
([out, in], the float model's name and layout), see :func:`_packed`. A layout it cannot
unpack is kept as stored, with the reason (packed codes compared as int32 integers).

``compare`` applies it to both sides by default (:func:`dequantize_pair`), so that a
quantized export compared with its float original measures the values the codes stand
for, and says so (:func:`dequantized_result`); ``raw=True`` (``--raw``) compares the
stored codes. --quantization-analysis always dequantizes.
"""

from __future__ import annotations

import bisect
import json
import math
import os
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any, Callable

import torch

from torchdiff.errors import CorruptFileError
from torchdiff.formats.base import Checkpoint, TensorHandle
from torchdiff.results import AnalysisResult

#: The item (and options key) saying which weights were compared dequantized.
NAME = "dequantized"
_FOUND = "dequantized"  # Checkpoint.info key: what dequantize_checkpoint found

_QUANT_WEIGHT_DTYPES = {torch.int8, torch.uint8, torch.int16} | {
    dt for dt in (getattr(torch, n, None) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                                    "float8_e5m2fnuz")) if dt is not None
}
_SCALE_SUFFIXES = ("_scale", ".scale", "_scale_inv", ".scale_inv")
_ZERO_SUFFIXES = ("_zero_point", ".zero_point", "_zp", ".zp")
_BNB4_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")
#: What a weight's scale companion is looked for as (messages).
LOOKED_FOR = "W_scale, W.scale, W_scale_inv, W.scale_inv, <module>.SCB"
#: GPTQ / AWQ: ``<module>.qweight`` (int32 words of packed codes) and its companions.
_PACKED = "qweight"
_PACKED_COMPANIONS = ("qzeros", "scales", "g_idx")
#: AutoAWQ's GEMM packing: nibble i of a word holds column 8·word + _AWQ_ORDER[i].
_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_WORDS = {torch.int32} | ({torch.uint32} if hasattr(torch, "uint32") else set())  # dtypes of packed words
_CONFIG_BYTES = 1 << 20  # a config.json larger than this is not a model config


# ---- prepare: detect companions, wrap weights with dequantizing handles ------------


@dataclass(frozen=True, slots=True)
class Detected:
    """What prepare() found for one weight on one side."""

    scheme: str
    companions: tuple[str, ...]
    error: str | None = None  # why it could not be dequantized
    stored_as: str | None = None  # the stored codes' name when the weight is renamed (GPTQ qweight -> weight)
    params: int | None = None  # weights the codes stand for, when not the handle's numel (packed codes)


def block_size(dim: int, blocks: int, preferred: int | None = None) -> int | str:
    """The block size B that splits a dimension of ``dim`` into ``blocks`` blocks, the
    last one possibly partial: ⌈dim/B⌉ = blocks. Or an error string.

    The sizes that fit form the range lo = ⌈dim/blocks⌉ … hi = ⌈dim/(blocks−1)⌉ − 1
    (blocks ≥ 2; one block: B = dim). When the range holds more than one size, the pick is,
    in order: ``preferred`` (``weight_block_size`` or ``group_size`` of the model's
    config.json) if it fits; the power of two in the range (there is at most one: hi < 2·lo),
    which is the 128 of DeepSeek-V3 / transformers' fp8 blocks and the usual group sizes;
    dim/blocks when it divides evenly; else no pick (the error names the range).
    """
    if blocks < 1 or dim < 1:
        return f"{blocks} blocks cannot cover a dimension of {dim}"
    if blocks == 1:
        return dim
    lo, hi = -(-dim // blocks), -(-dim // (blocks - 1)) - 1
    if lo > hi:
        return f"no block size splits a dimension of {dim} into {blocks} blocks"
    if preferred is not None and lo <= preferred <= hi:
        return preferred
    power = 1 << (hi.bit_length() - 1)  # the largest power of two <= hi
    if power >= lo:
        return power
    if lo == hi or dim % blocks == 0:
        return lo
    return (f"ambiguous block size: every size from {lo} to {hi} splits a dimension of {dim} into {blocks} "
            "blocks and none is a power of two (quantization_config.weight_block_size in a config.json "
            "beside the file names it)")


def fit_scale(wshape: tuple[int, ...], sshape: tuple[int, ...], block: tuple[int | None, ...] | None = None):
    """How a scale (or zero point) of shape ``sshape`` maps onto a weight of ``wshape``.

    Returns ``(granularity, expand)`` where ``expand(scale)`` broadcasts against the
    weight, or an error string. ``block``: preferred block sizes of the weight's last
    dimensions (config.json's ``weight_block_size``), see :func:`block_size`.
    """
    n = math.prod(sshape)
    if n == 1:
        return "per-tensor", lambda s: s.reshape(())
    if wshape and len(sshape) == 1 and sshape[0] == wshape[0]:
        return "per-channel", lambda s: s.reshape((wshape[0],) + (1,) * (len(wshape) - 1))
    if wshape and len(sshape) == len(wshape):
        if all(sd in (1, wd) for sd, wd in zip(sshape, wshape)):
            axes = [i for i, (sd, wd) in enumerate(zip(sshape, wshape)) if sd == wd and sd != 1]
            label = "per-channel" if axes == [0] else f"per-channel (axes {','.join(map(str, axes))})"
            return label, lambda s: s.reshape(sshape)
        preferred = (None,) * len(wshape)
        if block:
            preferred = ((None,) * len(wshape) + tuple(block))[-len(wshape):]
        blocks = [block_size(wd, sd, p) for wd, sd, p in zip(wshape, sshape, preferred)]
        bad = next((b for b in blocks if isinstance(b, str)), None)
        if bad is not None:
            return (f"scale shape {list(sshape)} fits no layout of weight shape {list(wshape)} "
                    f"(one value, one per output channel, or one per block: {bad})")

        def expand(s: torch.Tensor) -> torch.Tensor:
            for dim, b in enumerate(blocks):
                if b > 1:
                    s = s.repeat_interleave(b, dim=dim)
            return s[tuple(slice(0, wd) for wd in wshape)]

        return "block " + "×".join(map(str, blocks)), expand
    return (f"scale shape {list(sshape)} fits no layout of weight shape {list(wshape)} "
            f"(one value, one per output channel, or one per block)")


def _dequantizer(weight: TensorHandle, scale: TensorHandle, expand, zero: TensorHandle | None, zexpand,
                 divisor: float) -> Callable[[], torch.Tensor]:
    def materialize() -> torch.Tensor:
        q = weight.materialize().to(torch.float32)
        if zero is not None:
            q = q - zexpand(zero.materialize().to(torch.float32))
        out = q * expand(scale.materialize().to(torch.float32))
        return out / divisor if divisor != 1 else out

    return materialize


def _first(names, tensors) -> str | None:
    for name in names:
        if name in tensors:
            return name
    return None


def _detect(name: str, handle: TensorHandle, tensors: dict[str, TensorHandle], qconfig: dict):
    """(Detected, new handle) for a weight with companions, else None."""
    module = name.rsplit(".", 1)[0] if "." in name else ""
    prefix = f"{module}." if module else ""
    bnb4 = [name + s for s in _BNB4_SUFFIXES if name + s in tensors]
    bnb4 += [k for k in tensors if k.startswith(f"{name}.quant_state.")]
    if bnb4 and handle.dtype == torch.uint8:
        fmt = next((k.rsplit("__", 1)[-1] for k in bnb4 if "__" in k), "4-bit")
        return Detected(f"bitsandbytes {fmt}", tuple(bnb4),
                        f"bitsandbytes {fmt} packs 4-bit codes with a quant_map; its layout is not dequantized here"), None
    leaf = name.rsplit(".", 1)[-1]
    scb = _first(((f"{prefix}SCB",) if leaf == "weight" else ()) + (f"{name}.SCB",), tensors)
    scale_name = scb or _first([name + s for s in _SCALE_SUFFIXES], tensors)
    if scale_name is None:
        return None
    scale = tensors[scale_name]
    if not scale.dtype.is_floating_point or scale_name == name:
        return None
    companions = [scale_name]
    if scb and f"{prefix}weight_format" in tensors:
        companions.append(f"{prefix}weight_format")
    zero_name = None if scb else _first([name + s for s in _ZERO_SUFFIXES], tensors)
    if zero_name is not None:
        companions.append(zero_name)
    storage = handle.storage_dtype
    if handle.dtype not in _QUANT_WEIGHT_DTYPES:
        if handle.dtype.is_floating_point:
            return None  # a float tensor that happens to have a *_scale neighbour
        return Detected(f"{storage} + scale", tuple(companions),
                        f"{storage} weights with a scale are packed sub-byte codes; that layout is not dequantized here"), None
    block = _config_block(qconfig)
    fitted = fit_scale(tuple(handle.shape), tuple(scale.shape), block)
    if isinstance(fitted, str):
        return Detected(f"{storage} + scale", tuple(companions), fitted), None
    granularity, expand = fitted
    zero, zexpand = None, None
    if zero_name is not None:
        zfit = fit_scale(tuple(handle.shape), tuple(tensors[zero_name].shape), block)
        if isinstance(zfit, str):
            return Detected(f"{storage} + scale", tuple(companions), "zero point: " + zfit), None
        zero, zexpand = tensors[zero_name], zfit[1]
    if scb:
        scheme = f"{storage} per-channel (bitsandbytes SCB)"
    else:
        scheme = f"{storage} {granularity}"
        if scale_name.endswith("scale_inv"):
            scheme += " (scale_inv)"
        if zero is not None:
            scheme += " + zero point"
    wrapped = TensorHandle(
        name=name, shape=tuple(handle.shape), dtype=torch.float32,
        nbytes=handle.nbytes + sum(tensors[c].nbytes for c in companions),
        materialize=_dequantizer(handle, scale, expand, zero, zexpand, 127.0 if scb else 1.0),
        storage_dtype=storage, mapped=False,
    )
    return Detected(scheme, tuple(companions)), wrapped


# ---- the model's quantization_config (config.json beside the file) ---------------------


def _read_json(path: str) -> Any:
    try:
        if os.path.getsize(path) > _CONFIG_BYTES:
            return None
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def quantization_config(ckpt: Checkpoint) -> dict:
    """The quantization settings the checkpoint's folder states: ``quantization_config``
    of a ``config.json`` beside its first file (transformers: DeepSeek-V3's
    ``weight_block_size``, GPTQ/AWQ ``bits``, ``group_size``, ``checkpoint_format``), else
    AutoGPTQ's ``quantize_config.json``; {} when there is none (a checkpoint in memory,
    no config, one that cannot be read). Never fails."""
    files = [p for p in ckpt.files if isinstance(p, str)]
    if not files:
        return {}
    folder = files[0] if os.path.isdir(files[0]) else os.path.dirname(os.path.abspath(files[0]))
    config = _read_json(os.path.join(folder, "config.json"))
    found = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(found, dict):
        found = _read_json(os.path.join(folder, "quantize_config.json"))
    return found if isinstance(found, dict) else {}


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _config_block(qconfig: dict) -> tuple[int | None, ...] | None:
    """Preferred block sizes of a weight's last dimensions: ``weight_block_size``, else
    ``group_size`` for the last (input) dimension."""
    block = qconfig.get("weight_block_size")
    if isinstance(block, (list, tuple)) and block and all(_positive_int(b) for b in block):
        return tuple(block)
    group = _positive_int(qconfig.get("group_size"))
    return (group,) if group else None


# ---- GPTQ / AWQ: packed int32 codes ---------------------------------------------------


def _unpack(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words -> their 32/bits codes (int32, 0 … 2^bits − 1), lowest bits first,
    laid out along ``dim`` (0: [R, C] -> [R·pack, C]; 1: [R, C] -> [R, C·pack])."""
    words = words.to(torch.int32)
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    mask = (1 << bits) - 1
    if dim == 0:
        codes = torch.bitwise_right_shift(words.unsqueeze(1), shifts.view(1, -1, 1)).bitwise_and_(mask)
        return codes.reshape(words.shape[0] * shifts.numel(), words.shape[1])
    codes = torch.bitwise_right_shift(words.unsqueeze(2), shifts.view(1, 1, -1)).bitwise_and_(mask)
    return codes.reshape(words.shape[0], words.shape[1] * shifts.numel())


def _packed_dequantizer(kind: str, bits: int, in_features: int, qweight: TensorHandle, qzeros: TensorHandle,
                        scales: TensorHandle, g_idx: TensorHandle | None, group: int | None, zero_offset: int,
                        name: str) -> Callable[[], torch.Tensor]:
    def materialize() -> torch.Tensor:
        mask = (1 << bits) - 1
        if kind == "GPTQ":  # qweight [in·bits/32, out]: packed along the input dimension
            q = _unpack(qweight.materialize(), bits, 0)
            z = _unpack(qzeros.materialize(), bits, 1)
        else:  # AWQ GEMM: qweight [in, out/8], columns interleaved by _AWQ_ORDER
            cols = qweight.shape[1]
            inverse = torch.tensor([_AWQ_ORDER.index(j) for j in range(8)])
            order = (torch.arange(cols).unsqueeze(1) * 8 + inverse).reshape(-1)
            q = _unpack(qweight.materialize(), bits, 1)[:, order]
            z = _unpack(qzeros.materialize(), bits, 1)[:, order]
        z = (z + zero_offset) & mask  # GPTQ v1 stores zero − 1: read back mod 2^bits
        s = scales.materialize().to(torch.float32)
        if g_idx is not None:
            g = g_idx.materialize().to(torch.int64)
            if g.numel() and (int(g.min()) < 0 or int(g.max()) >= s.shape[0]):
                raise CorruptFileError(f"{name}: g_idx holds group {int(g.min())}…{int(g.max())}, "
                                       f"outside the {s.shape[0]} groups of its scales")
        else:
            g = torch.arange(in_features) // group
        w = q.to(torch.float32)  # [in, out]; (q − zero) is exact, one rounding for the product
        del q
        w.sub_(z.to(torch.float32)[g]).mul_(s[g])
        return w.t().contiguous()

    return materialize


def _packed(name: str, handle: TensorHandle, tensors: dict[str, TensorHandle], qconfig: dict):
    """(weight name, Detected, handle or None) for a GPTQ / AWQ ``qweight``.

    GPTQ (AutoGPTQ, GPTQModel, transformers/optimum): qweight [in·bits/32, out], the
    codes of 32/bits consecutive input rows in one int32 word, lowest bits first;
    qzeros [groups, out·bits/32] packed the same way along the output; scales
    [groups, out]; g_idx [in] the group of each input row (act-order), else row // group.
    The classic (v1) format stores zero − 1: the zero is read as (stored + 1) mod 2^bits,
    unless the config says ``checkpoint_format: gptq_v2`` (stored as is). 2, 4, 8 bits.
    AWQ (AutoAWQ GEMM): qweight [in, out/8], qzeros [groups, out/8], 4 bits, nibble i of
    a word holds column 8·word + (0, 2, 4, 6, 1, 3, 5, 7)[i]; zero stored as is.
    B[o, i] = (q[i, o] − zero[g(i), o]) · scale[g(i), o], stored as ``<module>.weight``.
    """
    module = name[: -len(_PACKED)]
    comp = tuple(module + leaf for leaf in _PACKED_COMPANIONS if module + leaf in tensors)
    target = module + "weight"

    def fail(why: str, params: int | None = None):
        return name, Detected("packed int32 (GPTQ/AWQ)", comp, f"{why}: packed codes compared as int32 integers, "
                                                               "not as the values they stand for",
                              params=params), None

    qzeros, scales, g_idx = (tensors.get(module + leaf) for leaf in _PACKED_COMPANIONS)
    if len(handle.shape) != 2:
        return fail(f"qweight of shape {list(handle.shape)} (GPTQ/AWQ store 2-D words)")
    if scales is None or not scales.dtype.is_floating_point or len(scales.shape) != 2:
        return fail(f"no float {module}scales [groups, out] beside it")
    if qzeros is None or qzeros.dtype not in _WORDS:
        return fail(f"no int32 {module}qzeros beside it")
    groups, out = scales.shape
    rows, cols = handle.shape
    method = str(qconfig.get("quant_method", "")).lower()
    if cols == out and method != "awq":
        kind = "GPTQ"
        if g_idx is not None and len(g_idx.shape) == 1 and g_idx.shape[0]:
            bits = Fraction(32 * rows, g_idx.shape[0])
        else:
            bits = Fraction(32 * qzeros.shape[1], out) if out else Fraction(0)
        if bits.denominator != 1 or int(bits) not in (2, 4, 8):
            known = g_idx.shape[0] * out if g_idx is not None and len(g_idx.shape) == 1 else None
            return fail(f"GPTQ-shaped ({rows}×{cols} words for {out} outputs) but {bits} bits per code "
                        "(2, 4 and 8 are unpacked; 3-bit packing is not)", known)
        bits = int(bits)
        in_features = rows * 32 // bits
        zero_offset = 0 if str(qconfig.get("checkpoint_format", "")).lower() == "gptq_v2" else 1
    elif cols * 8 == out and method in ("awq", ""):
        kind, bits, in_features, zero_offset = "AWQ", 4, rows, 0
        if _positive_int(qconfig.get("bits")) not in (None, 4):
            return fail(f"AWQ-shaped but the config says {qconfig.get('bits')} bits (AWQ GEMM packs 4)")
        g_idx = None  # AWQ has none
    else:
        return fail(f"qweight {list(handle.shape)} with scales {list(scales.shape)} fits neither GPTQ "
                    "([in·bits/32, out]) nor AWQ GEMM ([in, out/8])")
    params = in_features * out
    if tuple(qzeros.shape) != (groups, out * bits // 32):
        return fail(f"qzeros {list(qzeros.shape)} is not [groups, out·bits/32] = [{groups}, {out * bits // 32}]",
                    params)
    if g_idx is not None and tuple(g_idx.shape) != (in_features,):
        return fail(f"g_idx {list(g_idx.shape)} is not [in] = [{in_features}]", params)
    group = None
    if g_idx is None:
        group = block_size(in_features, groups, _positive_int(qconfig.get("group_size")))
        if isinstance(group, str):
            return fail(f"{groups} groups over {in_features} inputs: {group}", params)
    if target in tensors:
        return fail(f"{target} is also stored", params)
    version = " v2" if kind == "GPTQ" and not zero_offset else ""
    scheme = f"{kind}{version} {bits}-bit " + ("g_idx" if g_idx is not None else f"group {group}")
    companions = tuple(c for c in comp if c != module + "g_idx" or kind == "GPTQ")
    wrapped = TensorHandle(
        name=target, shape=(out, in_features), dtype=torch.float32,
        nbytes=handle.nbytes + sum(tensors[c].nbytes for c in companions),
        materialize=_packed_dequantizer(kind, bits, in_features, handle, qzeros, scales, g_idx, group,
                                        zero_offset, name),
        storage_dtype=f"uint{bits}", mapped=False, source=handle.source,
    )
    return target, Detected(scheme, companions, stored_as=name, params=params), wrapped


def _is_packed(name: str, handle: TensorHandle) -> bool:
    return (name == _PACKED or name.endswith("." + _PACKED)) and handle.dtype in _WORDS


# ---- a checkpoint, a pair ---------------------------------------------------------------


def dequantize_checkpoint(ckpt: Checkpoint) -> tuple[Checkpoint, dict[str, Detected]]:
    """Fold companions into their weights (headers only; values dequantize lazily).

    Returns the checkpoint and what was found, by weight name: the folded weight's name
    (``<module>.weight`` for a GPTQ/AWQ ``<module>.qweight``), or the stored name of one
    that could not be dequantized (kept as stored, companions' bytes counted in it).
    Idempotent: a checkpoint this function returned is returned as it is, with what was
    found in it the first time.
    """
    if _FOUND in ckpt.info:
        return ckpt, ckpt.info[_FOUND]
    qconfig: dict | None = None
    found: dict[str, Detected] = {}
    replaced: dict[str, tuple[str, TensorHandle]] = {}  # stored name -> (name, handle)
    for name, handle in ckpt.tensors.items():
        if not handle.shape or (handle.dtype.is_floating_point and handle.dtype not in _QUANT_WEIGHT_DTYPES):
            continue
        packed = _is_packed(name, handle)
        if qconfig is None:
            qconfig = quantization_config(ckpt)
        if packed:
            key, detected, wrapped = _packed(name, handle, ckpt.tensors, qconfig)
        else:
            hit = _detect(name, handle, ckpt.tensors, qconfig)
            if hit is None:
                continue
            (detected, wrapped), key = hit, name
        if wrapped is None:  # cannot dequantize: keep the raw codes, count the companions' bytes
            wrapped = replace(handle, nbytes=handle.nbytes + sum(ckpt.tensors[c].nbytes for c in detected.companions))
        found[key] = detected
        replaced[name] = (key, wrapped)
    if not found:
        return ckpt, found
    folded = {c for d in found.values() for c in d.companions} - set(replaced)
    tensors = {}
    for n, h in ckpt.tensors.items():
        if n in replaced:
            key, h = replaced[n]
            tensors[key] = h
        elif n not in folded:
            tensors[n] = h
    return Checkpoint(name=ckpt.name, format=ckpt.format, tensors=tensors, metadata=ckpt.metadata,
                      info={**ckpt.info, _FOUND: found}, _closers=ckpt._closers, files=ckpt.files,
                      ties=dict(ckpt.ties)), found


def _unscaled(old: Checkpoint, new: Checkpoint) -> list[dict]:
    """Integer tensors paired by name with float values and not dequantized: codes whose
    scale was not found, compared as stored. Each with the tensors named like a scale
    of it that were not taken as one (``W_scales``)."""
    out = []
    for side, a, other in (("old", old, new), ("new", new, old)):
        names = None
        for name, h in a.tensors.items():
            b = other.tensors.get(name)
            if b is None or h.dtype.is_floating_point or h.dtype == torch.bool or not h.shape \
                    or not b.dtype.is_floating_point:
                continue
            if names is None:
                names = sorted(a.tensors)
            near = []
            for k in names[bisect.bisect_right(names, name):]:
                if not k.startswith(name):
                    break
                if "scale" in k[len(name):].lower():
                    near.append(k)
            out.append({"path": name, "side": side, "dtype": h.storage_dtype, "other": b.storage_dtype,
                        "near": near})
    return out


def dequantize_pair(old: Checkpoint, new: Checkpoint, options, raw: bool = False) -> tuple[Checkpoint, Checkpoint]:
    """Both sides dequantized; what was found is kept in ``options["dequantized"]``
    (``{"old": {name: Detected}, "new": {...}, "unscaled": [...]}``) for
    :func:`dequantized_result`. ``raw=True``: the checkpoints are returned as they are
    (``--raw``), and only what the stored codes are is kept, so that packed GPTQ/AWQ
    words compared as integers are said to be."""
    folded_old, found_old = dequantize_checkpoint(old)
    folded_new, found_new = dequantize_checkpoint(new)
    if raw:
        options[NAME] = {"old": found_old, "new": found_new, "raw": True}
        return old, new
    options[NAME] = {"old": found_old, "new": found_new, "unscaled": _unscaled(folded_old, folded_new)}
    return folded_old, folded_new


def _list(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def dequantized_result(options) -> AnalysisResult | None:
    """The item saying which weights were compared as dequantized values, which were
    compared as stored codes and why (None: nothing to say)."""
    state = options.get(NAME) or {}
    found = {side: state.get(side) or {} for side in ("old", "new")}
    if state.get("raw"):
        packed = {side: sorted(n for n, det in found[side].items() if det.stored_as or det.scheme.startswith("packed"))
                  for side in ("old", "new")}
        if not any(packed.values()):
            return None
        notes = []
        for side in ("old", "new"):
            for n in packed[side]:
                det = found[side][n]
                stored = det.stored_as or n
                kind = "GPTQ/AWQ" if det.scheme.startswith("packed") else det.scheme.split(" ")[0]
                notes.append(f"{side} {stored}: {kind} codes packed into int32 words, compared "
                             "as int32 integers (--raw), not as the values they stand for")
        return AnalysisResult(NAME, {"weights": 0},
                              {"old": [], "new": [], "raw": True,
                               "packed": {side: [found[side][n].stored_as or n for n in packed[side]]
                                          for side in ("old", "new")}},
                              notes=tuple(notes))
    done = {side: sorted(n for n, det in found[side].items() if det.error is None) for side in ("old", "new")}
    kept = {side: sorted(n for n, det in found[side].items() if det.error is not None) for side in ("old", "new")}
    unscaled = state.get("unscaled") or []
    names = sorted(set(done["old"]) | set(done["new"]))
    if not names and not any(kept.values()) and not unscaled:
        return None
    notes = []
    if names:
        notes.append("values compared after dequantization: (q − zero_point) · scale with each weight's companions "
                     "folded into it; --raw compares the stored codes")
    renamed = {n: det.stored_as for side in ("old", "new") for n, det in found[side].items()
               if det.error is None and det.stored_as}
    if renamed:
        notes.append(f"GPTQ/AWQ packed codes unpacked into <module>.weight ([out, in], the float layout): "
                     f"{_list([f'{s} -> {n}' for n, s in sorted(renamed.items())], 3)}")
    for side in ("old", "new"):
        for n in kept[side]:
            notes.append(f"{side} {n}: compared as stored ({found[side][n].error})")
    for u in unscaled:
        near = f"; {', '.join(u['near'])} not taken as its scale" if u["near"] else ""
        notes.append(f"{u['side']} {u['path']}: {u['dtype']} codes compared as stored with {u['other']} values: "
                     f"no scale companion found (looked for {LOOKED_FOR}{near})")
    return AnalysisResult(NAME, {"weights": len(names)},
                          {"old": done["old"], "new": done["new"],
                           "schemes": {n: det.scheme for side in ("old", "new") for n, det in found[side].items()},
                           "stored_as": renamed,
                           "not_dequantized": {side: kept[side] for side in ("old", "new")},
                           "unscaled": unscaled},
                          notes=tuple(notes))
