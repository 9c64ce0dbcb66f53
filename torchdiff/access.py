"""Per-tensor access to a Report: its TensorDiff by name, and Δ = new − old as a tensor.

``Report.__getitem__`` (``report["head.weight"]``) and ``Report.delta`` call these.

A Report holds figures, never tensors: ``delta`` reads the one tensor again from each
side (lazily: only that tensor's bytes), from the sources given or else from the paths
the report was made from, dequantized as ``compare`` measured it unless ``raw=True``.
"""

from __future__ import annotations

import difflib
import os
from typing import Any

import torch

from torchdiff.errors import InputNotFoundError, UnknownTensorError, UsageError


def tensor_diff(report, name: str):
    """The TensorDiff of ``name`` (UnknownTensorError naming the closest names when absent)."""
    fig = report.figures
    if isinstance(name, str) and name in report:
        return fig[fig.index(name)]
    raise unknown_tensor(report, name, f"{name!r} is not a tensor of this report")


def unknown_tensor(report, name: Any, what: str) -> UnknownTensorError:
    """The error for a name the report lacks: ``what``, the tensor count and the closest names."""
    names = report.figures.names
    if not isinstance(name, str):
        return UnknownTensorError(f"a Report is indexed by tensor name, got {type(name).__name__} {name!r} "
                                  "(list(report)[i] is the i-th tensor in output order)")
    close = difflib.get_close_matches(name, names, n=3)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return UnknownTensorError(f"{what} ({len(names)} tensors{hint})")


def delta(report, name: str, old: Any = None, new: Any = None, *, raw: bool = False,
          format: str | None = None) -> torch.Tensor:
    """Δ = new − old of one tensor, as a CPU tensor (float32, or float64 when a side is).

    Args:
        report: the Report (for the name check and, by default, the sources).
        name: the tensor's name.
        old, new: the sources compared (paths, state_dicts, nn.Modules); default the
            report's own paths (``report.comparison.old_name`` / ``new_name``).
        raw: the stored values, not dequantized (as ``compare(raw=True)``).
        format: force the reader, as ``compare(format=...)``.

    Raises:
        UnknownTensorError: ``name`` is not in the report (a UsageError and a KeyError).
        UsageError: the tensor is on one side only, or its shape changed.
        InputNotFoundError: a source is gone and none was given.
    """
    d = tensor_diff(report, name)
    if d.old is None or d.new is None:
        raise UsageError(f"{name!r} is {d.status}: Δ needs the tensor on both sides")
    if tuple(d.old.shape) != tuple(d.new.shape):
        raise UsageError(f"{name!r} is reshaped ({list(d.old.shape)} -> {list(d.new.shape)}): Δ needs one shape")
    a = _read(old if old is not None else _source(report.comparison.old_name), name, raw, format)
    b = _read(new if new is not None else _source(report.comparison.new_name), name, raw, format)
    dtype = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    return b.to(dtype) - a.to(dtype)


def _source(name: str) -> str:
    if not name or not os.path.exists(name):
        raise InputNotFoundError(f"{name or '<memory>'}: the report's source is not a path that exists "
                                 "(pass old= and new= to delta)")
    return name


def _read(source: Any, name: str, raw: bool, format: str | None) -> torch.Tensor:
    from torchdiff import formats
    from torchdiff.dequant import dequantize_checkpoint
    from torchdiff.pairing import tied_handle

    if isinstance(source, (str, os.PathLike)):
        ckpt = formats.load(source, format)
    else:
        ckpt = formats.from_object(source)
    try:
        if not raw:
            ckpt, _ = dequantize_checkpoint(ckpt)
        handle = ckpt.tensors.get(name) or tied_handle(ckpt, name)
        if handle is None:
            raise UsageError(f"{ckpt.name}: no tensor {name!r}")
        return handle.materialize().detach().clone()  # a copy: the file's mapping closes below
    finally:
        ckpt.close()


__all__ = ["UnknownTensorError", "delta", "tensor_diff", "unknown_tensor"]
