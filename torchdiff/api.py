"""The public entry points: ``compare``, ``inspect``, ``differs``, ``load`` (and
``compare_series`` from torchdiff.series). Each takes explicit keyword-only options, so
an editor completes them; an unknown keyword is a UsageError naming the closest one.
The pipeline behind them is torchdiff.pipeline.
"""

from __future__ import annotations

import os
from inspect import signature
from typing import Any, Callable, Sequence

from torchdiff import formats, mapping
from torchdiff.engine import Engine, bytes_equal, resolve_device
from torchdiff.errors import CorruptFileError, UsageError
from torchdiff.formats.base import Checkpoint
from torchdiff.pairing import check_selected, compile_filters, pair, pair_metadata
from torchdiff.pipeline import (
    check_paths, compare_checkpoints, make_options, open_checkpoint, opened, resolve, resolved,
    unknown_option,
)
from torchdiff.figures import without_gc
from torchdiff.report import Report


def _reject(unknown: dict[str, Any], entry: Callable[..., Any]) -> None:
    """A UsageError for a misspelt keyword, naming the closest parameter of ``entry``
    (its own: ``differs`` does not suggest ``stats``)."""
    if unknown:
        names = [n for n in signature(entry).parameters if n not in ("progress", "unknown")]
        raise UsageError(unknown_option(next(iter(unknown)), names))


def _options(analyses, given: dict[str, Any]):
    """Resolved options from the explicit keyword parameters of an entry point."""
    given = {k: v for k, v in given.items() if k not in ("old", "new", "source", "analyses", "progress", "unknown")}
    return make_options(analyses, **given)


@without_gc
def compare(
    old: Any, new: Any, *, analyses: Sequence[str] = (),
    stats: bool = False, quantization_analysis: bool = False, sort_by_change_magnitude: bool = False,
    show_layer_impact: bool = False, architecture_comparison: bool = False, memory_analysis: bool = False,
    anomaly_detection: bool = False, change_summary: bool = False, convergence_analysis: bool = False,
    gradient_analysis: bool = False, similarity_matrix: bool = False,
    epsilon: float = 0.0, ignore_keys_regex: str | None = None, path: str | None = None, format: str | None = None,
    recursive: bool = False, device: str = "auto", unsafe_pickle: bool = False, scope: str = "params",
    histograms: int = 0, spectra: int = 0, raw: bool = False, revision: str | None = None,
    map: str = "auto", map_heads: str | None = None, sort_key: str | None = None, layer_pattern: str | None = None, quantization_top_k: int = 10,
    fail_on_anomaly: str | None = None, plateau_threshold: float = 1e-3, plateau_steps: int = 2,
    lr: float = 0.0, cross_layer: bool = False, base: Any = None, sort: str | None = None,
    process_group: Any = None, progress: Callable[[int], None] | None = None, **unknown: Any,
) -> Report:
    """Compare two checkpoints.

    Args:
        old: a path (any supported format, a sharded index, a directory with ``recursive``),
            a state_dict (nested dicts allowed), an ``nn.Module``, or a Checkpoint.
        new: the same, for the other side.
        analyses: analysis names or flags to run (``"quantization_analysis"``,
            ``"show_layer_impact"``...); each is also a boolean keyword (``stats=True``).
        epsilon: |Δ| ≤ epsilon counts as unchanged.
        ignore_keys_regex: leave out tensors and metadata whose name matches.
        path: keep only names containing this substring.
        format: force a reader (``safetensors``, ``torch``, ``numpy``, ``matlab``, ``gguf``, ``sharded``).
        recursive: compare two directories file by file.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        unsafe_pickle: allow pickles that need code (runs code from the file: trusted files only).
        raw: compare stored values: int8/fp8 weights with scale companions are not dequantized
            (by default they are, and a ``dequantized`` item lists them).
        revision: branch, tag or commit of a Hugging Face Hub id given as ``old``/``new``.
        map: cross-format pairing: ``auto`` (a known name family on each side, e.g. HF ↔ GGUF),
            ``none``, a family name, or a YAML rule file (docs/MAPPING.md).
        map_heads: ``"HEADS,KV_HEADS"`` for rules whose head counts no metadata gives.
        scope: what the global, layer and summary figures cover: ``params`` (trainable
            parameters, the default), ``model`` (plus buffers and counters) or ``all``
            (plus optimizer state and training state: RNG states, 0-d losses). Tensor lines always list every tensor.
        histograms: value histograms of the k most-changed tensors, in ``d.extras["histogram"]``
            (docs/REPORT.md; the CLI's --report/--plots set 12).
        spectra: singular values of Δ for the K most-changed matrices, in ``d.extras["spectrum"]``.
        sort_key, layer_pattern, quantization_top_k, fail_on_anomaly, plateau_threshold,
        plateau_steps, lr, cross_layer, base, sort: the analyses' options (README, "Flags").
        process_group: a torch.distributed group (or True for the default one) when the
            tensors are DTensors sharded over it (FSDP2, tensor parallel): every rank of the
            group calls compare, reduces its local shards, and gets the same Report;
            parameters are never gathered (docs/DISTRIBUTED.md).
        progress: called with the number of elements done after each block.

    Returns:
        A Report: iterate it for TensorDiffs, ``print`` it for text, ``to_dict()`` for JSON.
        Under torchrun (``torchrun -m torchdiff``), None on ranks other than 0.

    Example:
        >>> import torch, torchdiff
        >>> old = {"w": torch.ones(3)}
        >>> report = torchdiff.compare(old, {"w": torch.tensor([1.0, 1.0, 2.0])})
        >>> [(d.name, d.status, round(d.metrics.rel_l2, 4)) for d in report]
        [('w', 'changed', 0.5774)]
    """
    _reject(unknown, compare)
    options = _options(analyses, locals())
    engine = Engine(resolve_device(options.device), options.epsilon)
    with opened(old, new, options) as (old_ckpt, new_ckpt):
        return compare_checkpoints(old_ckpt, new_ckpt, options, engine, progress)


@without_gc
def differs(old: Any, new: Any, *, epsilon: float = 0.0, ignore_keys_regex: str | None = None,
            path: str | None = None, format: str | None = None, recursive: bool = False,
            device: str = "auto", unsafe_pickle: bool = False, map: str = "auto", map_heads: str | None = None,
            revision: str | None = None, **unknown: Any) -> bool:
    """Whether two checkpoints differ, as cheaply as possible (--quiet, --brief).

    Names, shapes, dtypes and metadata first; then each common tensor's bytes,
    stopping at the first difference; the engine measures only pairs whose bytes
    differ (their values may still be equal: -0.0 vs 0.0, or within --epsilon).
    """
    _reject(unknown, differs)
    options = make_options((), epsilon=epsilon, ignore_keys_regex=ignore_keys_regex, path=path, format=format,
                           recursive=recursive, device=device, unsafe_pickle=unsafe_pickle, map=map,
                           map_heads=map_heads, revision=revision)
    engine = Engine(resolve_device(options.device), options.epsilon)
    with opened(old, new, options) as (old_ckpt, new_ckpt):
        for ckpt in (old_ckpt, new_ckpt):  # -r: an unreadable file is an error here (no report to list it)
            for message in ckpt.info.get("unreadable", {}).values():
                raise CorruptFileError(message)
        keep = compile_filters(options.ignore_keys_regex, options.path)
        old_ckpt, new_ckpt, _ = mapping.apply_mapping(old_ckpt, new_ckpt, options.map, heads=options.map_heads)
        pairs = pair(old_ckpt, new_ckpt, keep)
        check_selected(pairs, old_ckpt, new_ckpt, options.ignore_keys_regex, options.path)
        if pair_metadata(old_ckpt.metadata, new_ckpt.metadata, keep):
            return True
        if any(p.kind != "common" or p.retyped for p in pairs):
            return True
        found = False
        for p in pairs:
            if not bytes_equal(p.old.materialize(), p.new.materialize()):
                if engine.run([p])[0].is_difference:
                    found = True
                    break
        formats.check_unchanged({**old_ckpt.files, **new_ckpt.files})
        return found


@without_gc
def inspect(
    source: Any, *, analyses: Sequence[str] = (),
    stats: bool = False, quantization_analysis: bool = False, sort_by_change_magnitude: bool = False,
    show_layer_impact: bool = False, architecture_comparison: bool = False, memory_analysis: bool = False,
    anomaly_detection: bool = False, change_summary: bool = False, convergence_analysis: bool = False,
    gradient_analysis: bool = False, similarity_matrix: bool = False,
    epsilon: float = 0.0, ignore_keys_regex: str | None = None, path: str | None = None, format: str | None = None,
    recursive: bool = False, device: str = "auto", unsafe_pickle: bool = False, scope: str = "params",
    histograms: int = 0, spectra: int = 0, raw: bool = False, revision: str | None = None,
    map: str = "auto", map_heads: str | None = None, sort_key: str | None = None, layer_pattern: str | None = None, quantization_top_k: int = 10,
    fail_on_anomaly: str | None = None, plateau_threshold: float = 1e-3, plateau_steps: int = 2,
    lr: float = 0.0, cross_layer: bool = False, base: Any = None, sort: str | None = None,
    process_group: Any = None, progress: Callable[[int], None] | None = None, **unknown: Any,
) -> Report:
    """One checkpoint: every tensor's statistics, plus the analyses that make sense for one
    file (memory, anomalies, architecture). The Report is one-sided: every tensor's status
    is ``present``, its figures are ``d.new``, and ``has_differences`` is False.

    Args: as ``compare``, for one source; analyses that need two checkpoints say so in a note.
    """
    _reject(unknown, inspect)
    options = _options(analyses, locals())
    local = resolve(source, options)
    check_paths(local, local, options)
    engine = Engine(resolve_device(options.device), options.epsilon)
    ckpt = resolved(open_checkpoint(local, options), source, local)
    try:
        empty = Checkpoint(name="", format=ckpt.format, tensors={})
        return compare_checkpoints(empty, ckpt, options, engine, mode="inspect")
    finally:
        ckpt.close()


@without_gc
def load(source: Any, format: str | None = None, *, unsafe_pickle: bool = False, **unknown: Any) -> Checkpoint:
    """Open one checkpoint lazily: names, shapes and dtypes now, a tensor's bytes when
    ``ckpt[name]`` reads it. Use it as a context manager (``with torchdiff.load(p) as ckpt:``)
    to close its files.

    Args:
        source: a path, as ``compare`` takes it (torchdiff.formats.load), or a state_dict
            or ``nn.Module`` (a view of its tensors, no copy).
        format: force a reader, as ``compare(format=...)``.
        unsafe_pickle: allow pickles that need code (runs code from the file: trusted files only).
    """
    _reject(unknown, load)
    if isinstance(source, (str, os.PathLike)):
        return formats.load(source, format, unsafe_pickle=unsafe_pickle)
    return formats.from_object(source)
