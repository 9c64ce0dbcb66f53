"""Dequantization of stored weights with scale / zero-point companions, headers only.

A quantized export stores a weight ``W`` as integer (or float8) codes plus companions:
``W_scale`` / ``W.scale`` / ``W_scale_inv`` (``weight_scale`` for ``*.weight``), an
optional zero point ``W_zero_point`` / ``W.zero_point`` / ``W_zp``, or bitsandbytes'
``<module>.SCB``. :func:`dequantize_checkpoint` folds the companions into their weight:
the weight's handle then materialises B = (q − zero_point) · scale (÷ 127 for SCB),
lazily, in the engine's single pass, and its ``nbytes`` counts the companions' bytes.
The scale layouts (per tensor, per channel, per block) are those of
docs/analyses/quantization_analysis.md.

``compare`` applies it to both sides by default (:func:`dequantize_pair`), so that a
quantized export compared with its float original measures the values the codes stand
for, and says so (:func:`dequantized_result`); ``raw=True`` (``--raw``) compares the
stored codes. --quantization-analysis always dequantizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch

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


# ---- prepare: detect companions, wrap weights with dequantizing handles ------------


@dataclass(frozen=True, slots=True)
class Detected:
    """What prepare() found for one weight on one side."""

    scheme: str
    companions: tuple[str, ...]
    error: str | None = None  # why it could not be dequantized


def fit_scale(wshape: tuple[int, ...], sshape: tuple[int, ...]):
    """How a scale (or zero point) of shape ``sshape`` maps onto a weight of ``wshape``.

    Returns ``(granularity, expand)`` where ``expand(scale)`` broadcasts against the
    weight, or an error string.
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
        if all(sd > 0 for sd in sshape):
            blocks = [-(-wd // sd) for sd, wd in zip(sshape, wshape)]
            if all(-(-wd // b) == sd for b, sd, wd in zip(blocks, sshape, wshape)):
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


def _detect(name: str, handle: TensorHandle, tensors: dict[str, TensorHandle]):
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
    fitted = fit_scale(tuple(handle.shape), tuple(scale.shape))
    if isinstance(fitted, str):
        return Detected(f"{storage} + scale", tuple(companions), fitted), None
    granularity, expand = fitted
    zero, zexpand = None, None
    if zero_name is not None:
        zfit = fit_scale(tuple(handle.shape), tuple(tensors[zero_name].shape))
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


def dequantize_checkpoint(ckpt: Checkpoint) -> tuple[Checkpoint, dict[str, Detected]]:
    """Fold companions into their weights (headers only; values dequantize lazily).

    Idempotent: a checkpoint this function returned is returned as it is, with what was
    found in it the first time.
    """
    if _FOUND in ckpt.info:
        return ckpt, ckpt.info[_FOUND]
    found: dict[str, Detected] = {}
    replaced: dict[str, TensorHandle] = {}
    for name, handle in ckpt.tensors.items():
        if not handle.shape or (handle.dtype.is_floating_point and handle.dtype not in _QUANT_WEIGHT_DTYPES):
            continue
        hit = _detect(name, handle, ckpt.tensors)
        if hit is None:
            continue
        detected, wrapped = hit
        if wrapped is None:  # cannot dequantize: keep the raw codes, count the companions' bytes
            wrapped = replace(handle, nbytes=handle.nbytes + sum(ckpt.tensors[c].nbytes for c in detected.companions))
        found[name] = detected
        replaced[name] = wrapped
    if not found:
        return ckpt, found
    folded = {c for d in found.values() for c in d.companions} - set(found)
    tensors = {n: replaced.get(n, h) for n, h in ckpt.tensors.items() if n not in folded}
    return Checkpoint(name=ckpt.name, format=ckpt.format, tensors=tensors, metadata=ckpt.metadata,
                      info={**ckpt.info, _FOUND: found}, files=ckpt.files, ties=dict(ckpt.ties)), found




def dequantize_pair(old: Checkpoint, new: Checkpoint, options) -> tuple[Checkpoint, Checkpoint]:
    """Both sides dequantized; what was found is kept in ``options["dequantized"]``
    (``{"old": {name: Detected}, "new": {...}}``) for :func:`dequantized_result`."""
    old, found_old = dequantize_checkpoint(old)
    new, found_new = dequantize_checkpoint(new)
    options[NAME] = {"old": found_old, "new": found_new}
    return old, new


def dequantized_result(options) -> AnalysisResult | None:
    """The item saying which weights were compared as dequantized values (None: none)."""
    state = options.get(NAME) or {}
    done = {side: sorted(n for n, det in (state.get(side) or {}).items() if det.error is None)
            for side in ("old", "new")}
    kept = {side: sorted(n for n, det in (state.get(side) or {}).items() if det.error is not None)
            for side in ("old", "new")}
    names = sorted(set(done["old"]) | set(done["new"]))
    if not names and not any(kept.values()):
        return None
    notes = ["values compared after dequantization: (q − zero_point) · scale with each weight's companions "
             "folded into it; --raw compares the stored codes"]
    for side in ("old", "new"):
        for n in kept[side]:
            notes.append(f"{side} {n}: compared as stored ({state[side][n].error})")
    return AnalysisResult(NAME, {"weights": len(names)},
                          {"old": done["old"], "new": done["new"],
                           "schemes": {n: det.scheme for side in ("old", "new")
                                       for n, det in (state.get(side) or {}).items()},
                           "not_dequantized": {side: kept[side] for side in ("old", "new")}},
                          notes=tuple(notes))
