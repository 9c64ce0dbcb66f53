"""--sort-by-change-magnitude: order every output (text, JSON, YAML) by how much each tensor changed.

The order (docs/analyses/sort_by_change_magnitude.md):

1. changed and retyped tensors by ``--sort-key`` (default ``rel_l2``; ``--sort-key`` alone
   switches sorting on), most changed first: largest first for rel_l2, l2, max_abs and
   nmse; smallest first for cosine (the least aligned direction is the largest change);
   an undefined key (NaN: a cosine with one all-zero side) counts as the most changed;
   ties by name; a tensor whose old side is all zero (zero-initialised: rel_l2 = ∞,
   cosine undefined) follows the measured ones, ordered by ‖Δ‖ (l2), largest first;
2. then added, removed and reshaped tensors (no Δ to measure) by parameter count,
   largest first, ties by name;
3. then unchanged tensors by name (not printed, but a Report iterates them).

The analysis adds one line, ``sort_by_change_magnitude: sort_key=rel_l2, order=largest first``,
so that the order of the output says what it was sorted by.
"""

from __future__ import annotations

import difflib
import math
from typing import Sequence

import numpy as np

from torchdiff.errors import UsageError
from torchdiff.results import ADDED, CHANGED, REMOVED, RESHAPED, RETYPED, AnalysisResult

NAME = "sort_by_change_magnitude"
FLAG = "sort_by_change_magnitude"

#: sort key -> True when larger means more changed.
SORT_KEYS: dict[str, bool] = {"rel_l2": True, "l2": True, "max_abs": True, "nmse": True, "cosine": False}
sort_keys = sorted(SORT_KEYS)

DEFAULT_KEY = "rel_l2"
OPTIONS = {
    "sort_key": (None, "sort by " + " | ".join(SORT_KEYS) + f" (default {DEFAULT_KEY}; implies "
                 "--sort-by-change-magnitude); most changed first, so cosine sorts smallest first"),
}
ENABLED_BY = ("sort_key",)


def _key(options) -> str:
    key = options.get("sort_key")
    return DEFAULT_KEY if key is None else key


def validate(options) -> None:
    key = _key(options)
    if key not in SORT_KEYS:
        close = difflib.get_close_matches(str(key), sort_keys, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise UsageError(f"--sort-key {key!r} is not a sort key (choose from {', '.join(sort_keys)}{hint})")


def change_key(d, key: str = DEFAULT_KEY) -> tuple:
    """The sort key of a measured tensor (smaller sorts first), by ``key``: an undefined
    key first, then the measured ones, most changed first, then zero-initialised tensors
    (TensorDiff.old_all_zero: rel_l2 = ∞, cosine undefined) by ‖Δ‖, largest first; ties
    by name. The one order of "most changed" (change_summary's top tensors, markdown;
    ``change_keys`` is the same over a Figures table's columns: the report, --plots)."""
    return _rank(d.name, getattr(d.metrics, key), d.metrics.l2, d.old_all_zero, key)


def _rank(name: str, value: float, l2: float, old_all_zero: bool, key: str) -> tuple:
    if old_all_zero and key not in ("l2", "max_abs"):
        return (2, -l2, name)
    if math.isnan(value):
        return (0, 0.0, name)  # undefined: most changed
    return (1, -value if SORT_KEYS[key] else value, name)


def pair_rel_l2(fig, idx: np.ndarray) -> np.ndarray:
    """rel_l2 of rows ``idx`` of a Figures table as PairMetrics.rel_l2 gives it, value for
    value: ‖Δ‖/‖A‖, ∞ when ‖A‖ = 0 < ‖Δ‖, else 0 (NaN only where ‖A‖ > 0 and ‖Δ‖ is NaN)."""
    l2, norm_old = fig.l2[idx], fig.norm_old[idx]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(norm_old > 0, l2 / np.where(norm_old > 0, norm_old, 1.0), np.where(l2 > 0, np.inf, 0.0))


def change_keys(fig, rows: Sequence[int]) -> list[tuple | None]:
    """``change_key(d, "rel_l2")`` of each of ``rows`` of a Figures table, from its columns
    (no TensorDiff is made: 20,000 tensors in a report); None for a row that is not a
    changed or retyped tensor with pair figures."""
    idx = np.asarray(list(rows), dtype=np.int64)
    if idx.size == 0:
        return []
    names, status = fig.names, fig.status
    measured = fig.measured[idx].tolist()
    zero = fig.old_all_zero()[idx].tolist()
    l2, rel = fig.l2[idx].tolist(), pair_rel_l2(fig, idx).tolist()
    return [_rank(names[i], rel[j], l2[j], zero[j], "rel_l2")
            if measured[j] and status[i] in (CHANGED, RETYPED) else None
            for j, i in enumerate(idx.tolist())]


def order(comparison, options) -> list[str]:
    """Every tensor name, most changed first (see the module docstring)."""
    key = _key(options)
    measured = [d for d in comparison.diffs if d.status in (CHANGED, RETYPED) and d.metrics is not None]
    measured.sort(key=lambda d: change_key(d, key))
    seen = {d.name for d in measured}
    structural = [d for d in comparison.diffs if d.status in (ADDED, REMOVED, RESHAPED) and d.name not in seen]
    structural.sort(key=lambda d: (-d.params, d.name))
    seen.update(d.name for d in structural)
    rest = sorted((d for d in comparison.diffs if d.name not in seen), key=lambda d: d.name)
    return [d.name for d in measured + structural + rest]


def analyze(comparison, options, state: dict) -> AnalysisResult:
    key = _key(options)
    if comparison.mode != "pair":  # inspect: no change to sort by; the table stays in name order
        return AnalysisResult(NAME, {}, notes=("sorting by change needs two checkpoints (torchdiff OLD NEW); "
                                               "inspect lists tensors by name",))
    return AnalysisResult(NAME, {"sort_key": key, "order": "largest first" if SORT_KEYS[key] else "smallest first"})
