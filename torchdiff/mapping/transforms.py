"""The transforms of the rule language: each maps a list of tensors to a list of tensors.

Every transform has two halves that must agree: ``shapes`` computes the output shapes
from the input shapes without reading a value (so a rule that does not fit a tensor is
refused before any I/O on tensor data), and ``apply`` does the work on torch tensors,
one rule application (one source tensor, or the few a ``concat`` joins) at a time.

Parameters that name head counts accept a number, a metadata key, or a list of keys
(the first one present wins); see docs/MAPPING.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

Shape = tuple[int, ...]


class Misfit(ValueError):
    """A transform that does not fit the shapes it is given (message: what and why)."""


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass(frozen=True)
class Transform:
    """One step of a rule: ``kind`` and its parameters, as the rule file gives them
    (head counts possibly still metadata keys: ``bind`` resolves them)."""

    kind: str
    params: dict

    def describe(self, params: dict | None = None) -> str:
        """``kind(param=value, ...)``, with ``params`` (the bound values) when given."""
        params = self.params if params is None else params
        if not params:
            return self.kind
        inner = ", ".join(f"{k}={_short(v)}" for k, v in params.items())
        return f"{self.kind}({inner})"


def _short(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(str(x) for x in v) + "]"
    return str(v)


# ---- shape functions (inputs -> outputs, or Misfit) ---------------------------------


def _one(kind: str, shapes: Sequence[Shape]) -> Shape:
    if len(shapes) != 1:
        raise Misfit(f"{kind} takes one tensor, got {len(shapes)}")
    return shapes[0]


def _transpose_dims(shape: Shape, params: dict) -> tuple[int, int]:
    dims = params.get("dims", [-2, -1])
    if len(shape) < 2:
        raise Misfit(f"transpose needs at least 2 dimensions, shape {list(shape)} has {len(shape)}")
    a, b = dims
    for d in (a, b):
        if not -len(shape) <= d < len(shape):
            raise Misfit(f"transpose dims {list(dims)} do not exist in shape {list(shape)}")
    return a, b


def shapes_of(t: Transform, shapes: Sequence[Shape], params: dict, target: Sequence[Shape] | None) -> list[Shape]:
    """Output shapes of ``t`` (with bound ``params``) applied to tensors of ``shapes``.

    ``target`` holds the shapes of the tensors the outputs pair with, used where a rule
    leaves sizes to them (``split`` without ``sizes``)."""
    kind = t.kind
    if kind == "transpose":
        shape = _one(kind, shapes)
        a, b = _transpose_dims(shape, params)
        out = list(shape)
        out[a], out[b] = out[b], out[a]
        return [tuple(out)]
    if kind in ("permute_rope", "unpermute_rope"):
        shape = _one(kind, shapes)
        heads = params["heads"]
        if not shape:
            raise Misfit(f"{kind} needs at least 1 dimension, got a scalar")
        if shape[0] % (2 * heads):
            raise Misfit(f"{kind} with heads={heads}: {shape[0]} rows are not a multiple of 2·heads = {2 * heads}")
        return [shape]
    if kind == "split":
        shape = _one(kind, shapes)
        dim = params.get("dim", 0)
        if not -len(shape) <= dim < len(shape):
            raise Misfit(f"split dim {dim} does not exist in shape {list(shape)}")
        groups = params.get("groups", 1)
        sizes = split_sizes(shape, params, target)
        if shape[dim] % groups or sum(sizes) * groups != shape[dim]:
            raise Misfit(f"split sizes {list(sizes)}{f' × {groups} groups' if groups != 1 else ''} "
                         f"do not add up to dimension {dim} of shape {list(shape)} ({shape[dim]})")
        out = []
        for s in sizes:
            o = list(shape)
            o[dim] = s * groups
            out.append(tuple(o))
        return out
    if kind == "megatron_qkv":
        shape = _one(kind, shapes)
        heads, kv = params["heads"], params["kv_heads"]
        if heads % kv:
            raise Misfit(f"megatron_qkv: heads={heads} is not a multiple of kv_heads={kv}")
        if not shape or shape[0] % (heads + 2 * kv):
            raise Misfit(f"megatron_qkv with heads={heads}, kv_heads={kv}: shape {list(shape)} has rows that "
                         f"are not a multiple of heads + 2·kv_heads = {heads + 2 * kv}")
        hd = shape[0] // (heads + 2 * kv)
        rest = tuple(shape[1:])
        return [(heads * hd,) + rest, (kv * hd,) + rest, (kv * hd,) + rest]
    if kind == "concat":
        dim = params.get("dim", 0)
        if not shapes:
            raise Misfit("concat takes at least one tensor")
        first = shapes[0]
        if not -len(first) <= dim < len(first):
            raise Misfit(f"concat dim {dim} does not exist in shape {list(first)}")
        d = dim % len(first)
        for s in shapes[1:]:
            if len(s) != len(first) or any(x != y for i, (x, y) in enumerate(zip(s, first)) if i != d):
                raise Misfit(f"concat along dim {dim}: shapes {[list(x) for x in shapes]} differ elsewhere")
        out = list(first)
        out[d] = sum(s[d] for s in shapes)
        return [tuple(out)]
    if kind == "reshape":
        shape = _one(kind, shapes)
        return [_reshaped(shape, params["shape"])]
    if kind == "dtype":
        return [_one(kind, shapes)]
    raise Misfit(f"unknown transform {kind!r}")  # the loader refuses these first


def split_sizes(shape: Shape, params: dict, target: Sequence[Shape] | None) -> list[int]:
    sizes = params.get("sizes")
    if sizes is not None:
        return list(sizes)
    if not target:
        raise Misfit("split without sizes takes them from the other side's tensors, which are missing")
    dim = params.get("dim", 0)
    groups = params.get("groups", 1)
    if any(len(s) != len(shape) for s in target):
        raise Misfit(f"split without sizes: the other side's shapes {[list(s) for s in target]} do not have "
                     f"{len(shape)} dimensions")
    if any(s[dim] % groups for s in target):
        raise Misfit(f"split without sizes: the other side's shapes are not a multiple of {groups} groups")
    return [s[dim] // groups for s in target]


def _reshaped(shape: Shape, new: Sequence[int]) -> Shape:
    numel = math.prod(shape)
    new = list(new)
    if new.count(-1) > 1:
        raise Misfit(f"reshape {new}: at most one -1")
    if -1 in new:
        known = math.prod(d for d in new if d != -1)
        if known == 0 or numel % known:
            raise Misfit(f"reshape {new} does not fit shape {list(shape)} ({numel} elements)")
        new[new.index(-1)] = numel // known
    if math.prod(new) != numel:
        raise Misfit(f"reshape {new} does not fit shape {list(shape)} ({numel} elements)")
    return tuple(new)


# ---- the work ---------------------------------------------------------------------


def permute_rope(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's ``LlamaModel.permute`` (convert_hf_to_gguf.py): the rows of each head,
    Hugging Face's two rotary halves, interleaved in pairs (GGML's rope layout)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rope(w: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of :func:`permute_rope`: GGUF's interleaved rows back to HF's halves."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def apply(t: Transform, tensors: list[torch.Tensor], params: dict, target: Sequence[Shape] | None) -> list[torch.Tensor]:
    kind = t.kind
    if kind == "transpose":
        a, b = _transpose_dims(tuple(tensors[0].shape), params)
        return [tensors[0].transpose(a, b)]
    if kind == "permute_rope":
        return [permute_rope(tensors[0], params["heads"])]
    if kind == "unpermute_rope":
        return [unpermute_rope(tensors[0], params["heads"])]
    if kind == "split":
        x = tensors[0]
        dim = params.get("dim", 0)
        groups = params.get("groups", 1)
        sizes = split_sizes(tuple(x.shape), params, target)
        if groups == 1:
            return list(torch.split(x, sizes, dim=dim))
        d = dim % x.ndim
        grouped = x.reshape(*x.shape[:d], groups, x.shape[d] // groups, *x.shape[d + 1:])
        parts = torch.split(grouped, sizes, dim=d + 1)
        return [p.reshape(*x.shape[:d], groups * s, *x.shape[d + 1:]) for p, s in zip(parts, sizes)]
    if kind == "megatron_qkv":
        x = tensors[0]
        heads, kv = params["heads"], params["kv_heads"]
        hd = x.shape[0] // (heads + 2 * kv)
        per = heads // kv
        grouped = x.reshape(kv, (per + 2) * hd, *x.shape[1:])
        q, k, v = torch.split(grouped, [per * hd, hd, hd], dim=1)
        rest = tuple(x.shape[1:])
        return [q.reshape((heads * hd,) + rest), k.reshape((kv * hd,) + rest), v.reshape((kv * hd,) + rest)]
    if kind == "concat":
        return [torch.cat(tensors, dim=params.get("dim", 0))]
    if kind == "reshape":
        return [tensors[0].reshape(_reshaped(tuple(tensors[0].shape), params["shape"]))]
    if kind == "dtype":
        return [tensors[0].to(_DTYPES[params["dtype"]])]
    raise Misfit(f"unknown transform {kind!r}")


# ---- what the loader checks about each transform's parameters ---------------------------------

#: kind -> (allowed parameter names, required ones, inputs -> outputs arity: "1:1", "1:n", "n:1")
KINDS: dict[str, tuple[frozenset, frozenset, str]] = {
    "transpose": (frozenset({"dims"}), frozenset(), "1:1"),
    "permute_rope": (frozenset({"heads"}), frozenset({"heads"}), "1:1"),
    "unpermute_rope": (frozenset({"heads"}), frozenset({"heads"}), "1:1"),
    "split": (frozenset({"dim", "sizes", "groups"}), frozenset(), "1:n"),
    "megatron_qkv": (frozenset({"heads", "kv_heads"}), frozenset({"heads", "kv_heads"}), "1:3"),
    "concat": (frozenset({"dim"}), frozenset(), "n:1"),
    "reshape": (frozenset({"shape"}), frozenset({"shape"}), "1:1"),
    "dtype": (frozenset({"dtype"}), frozenset({"dtype"}), "1:1"),
}
#: parameters that may name metadata keys instead of numbers
HEAD_PARAMS = ("heads", "kv_heads")
dtype_names = sorted(_DTYPES)
