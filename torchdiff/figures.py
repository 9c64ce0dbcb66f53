"""The figures table: one row per tensor, one column per figure (arrays, not objects).

The engine fills a ``Figures`` table; analyses, renderers, the monitor and the policy
gates read its columns. A ``TensorDiff`` is a view of one row, made on demand (and
cached), so a checkpoint of 20,000 tensors costs 20,000 objects only when someone
iterates over them. Group figures (layers, roles, dtypes, the whole model) come from
one mechanism, ``GroupSums``: segment sums of the pair columns, then ``compute()``
(torchmetrics' update / compute split), so a thread, a rank or a caller can merge
partial sums before computing.

Definitions: docs/METRICS.md ("Group figures").
"""

from __future__ import annotations

import functools
import gc
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from torchdiff.names import PARAMETER, SCOPES, is_float_storage, layer_of
from torchdiff.results import NAN, NEG_INF, POS_INF, PairMetrics, TensorDiff, TensorStats, values_per_element
from torchdiff.status import CHANGED, RETYPED, STATUSES, UNCHANGED

#: Per-side columns: float64 moments and int64 counts (NaN / 0 where the side is absent).
SIDE_FLOATS = ("mean", "std", "min", "max", "mean_abs", "rms")
SIDE_INTS = ("numel", "nbytes", "zero_count", "nan_count", "inf_count")
#: Pair columns (NaN / 0 where the pair was not measured: added, removed, reshaped).
PAIR_FLOATS = ("l2", "norm_old", "norm_new", "dot", "max_abs", "mean_abs_diff")
PAIR_INTS = ("count", "changed_count")
#: Key order of the JSON items (TensorStats.to_dict, PairMetrics.to_dict).
_SIDE_KEYS = ("shape", "dtype", "numel", "nbytes", "mean", "std", "min", "max", "mean_abs", "rms", "zero_fraction",
              "nan_count", "inf_count")
_PAIR_KEYS = ("equal", "l2", "rel_l2", "nmse", "cosine", "rmse", "max_abs", "mean_abs_diff", "changed_fraction")


class Side:
    """The columns of one side: ``present`` (bool), shapes, dtypes and the figures."""

    __slots__ = ("present", "shape", "dtype") + SIDE_FLOATS + SIDE_INTS

    def __init__(self, n: int):
        self.present = np.zeros(n, dtype=bool)
        self.shape: list[tuple[int, ...] | None] = [None] * n
        self.dtype: list[str | None] = [None] * n
        for f in SIDE_FLOATS:
            setattr(self, f, np.full(n, np.nan))
        for f in SIDE_INTS:
            setattr(self, f, np.zeros(n, dtype=np.int64))

    def set(self, i: int, s: TensorStats) -> None:
        self.present[i] = True
        self.shape[i], self.dtype[i] = tuple(s.shape), s.dtype
        for f in SIDE_FLOATS + SIDE_INTS:
            getattr(self, f)[i] = getattr(s, f)

    def values(self, idx: np.ndarray | None = None) -> np.ndarray:
        """Values measured per row (of rows ``idx``): numel, 2·numel for a complex tensor
        (TensorStats.values)."""
        numel = self.numel if idx is None else self.numel[idx]
        dtypes = self.dtype if idx is None else [self.dtype[i] for i in idx.tolist()]
        if not any(d is not None and "complex" in d for d in dtypes):
            return numel
        return numel * np.array([values_per_element(d) for d in dtypes], dtype=np.int64)

    @property
    def norm(self) -> np.ndarray:
        """‖x‖ of the finite values: rms · sqrt(finite count)."""
        finite = self.values() - self.nan_count - self.inf_count
        with np.errstate(invalid="ignore"):
            return np.where(finite > 0, self.rms * np.sqrt(finite), 0.0)


class Figures(Sequence[TensorDiff]):
    """Every tensor's figures as columns; also a sequence of TensorDiff views.

    Columns: ``names``, ``status``, ``role`` (lists of str); ``old`` and ``new``
    (``Side``); ``measured``, ``equal`` (bool) and the ``PAIR_FLOATS``/``PAIR_INTS``
    arrays of the difference; ``extras`` (row -> what engine hooks returned).
    """

    def __init__(self, names: Sequence[str], status: Sequence[str], roles: Sequence[str] | None = None):
        n = len(names)
        self.names = list(names)
        self.status = list(status)
        self.role = list(roles) if roles is not None else [PARAMETER] * n
        self.old = Side(n)
        self.new = Side(n)
        self.measured = np.zeros(n, dtype=bool)
        self.equal = np.zeros(n, dtype=bool)
        for f in PAIR_FLOATS:
            setattr(self, f, np.full(n, np.nan))
        for f in PAIR_INTS:
            setattr(self, f, np.zeros(n, dtype=np.int64))
        self.extras: dict[int, dict[str, Any]] = {}
        #: False when only per-side statistics were kept (the monitor's keep="stats"):
        #: group figures then take norms from the sides, and ‖Δ‖, ⟨A,B⟩ are unknown (NaN).
        self.values_kept = True
        self._views: list[TensorDiff | None] = [None] * n
        self._index: dict[str, int] | None = None

    @classmethod
    def from_diffs(cls, diffs: Iterable[TensorDiff]) -> "Figures":
        diffs = list(diffs)
        fig = cls([d.name for d in diffs], [d.status for d in diffs], [d.role for d in diffs])
        for i, d in enumerate(diffs):
            fig.set_row(i, d.old, d.new, d.metrics)
            if d.extras:
                fig.extras[i] = dict(d.extras)
        return fig

    def set_row(self, i: int, old: TensorStats | None, new: TensorStats | None, m: PairMetrics | None) -> None:
        if old is not None:
            self.old.set(i, old)
        if new is not None:
            self.new.set(i, new)
        if m is not None:
            self.measured[i] = True
            self.equal[i] = m.equal
            self.count[i] = m.numel
            self.changed_count[i] = m.changed_count
            for f in ("l2", "norm_old", "norm_new", "dot", "max_abs", "mean_abs_diff"):
                getattr(self, f)[i] = getattr(m, f)
        self._views[i] = None

    def set_extras(self, i: int, extras: Mapping[str, Any]) -> None:
        """Add to row ``i``'s extras (what hooks return); its TensorDiff view is rebuilt."""
        self.extras.setdefault(i, {}).update(extras)
        self._views[i] = None

    # ---- Sequence[TensorDiff] --------------------------------------------------------

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        view = self._views[i]
        if view is None:
            view = self._views[i] = self._make(i)
        return view

    def __iter__(self) -> Iterator[TensorDiff]:
        for i in range(len(self.names)):
            yield self[i]

    def index(self, name: str) -> int:  # type: ignore[override]
        if self._index is None:
            self._index = {n: i for i, n in enumerate(self.names)}
        return self._index[name]

    def _side(self, side: Side, i: int) -> TensorStats | None:
        if not side.present[i]:
            return None
        return TensorStats(
            shape=side.shape[i], dtype=side.dtype[i], numel=int(side.numel[i]), nbytes=int(side.nbytes[i]),
            mean=float(side.mean[i]), std=float(side.std[i]), min=float(side.min[i]), max=float(side.max[i]),
            mean_abs=float(side.mean_abs[i]), rms=float(side.rms[i]), zero_count=int(side.zero_count[i]),
            nan_count=int(side.nan_count[i]), inf_count=int(side.inf_count[i]),
        )

    def _make(self, i: int) -> TensorDiff:
        metrics = None
        if self.measured[i]:
            metrics = PairMetrics(
                numel=int(self.count[i]), equal=bool(self.equal[i]), l2=float(self.l2[i]),
                norm_old=float(self.norm_old[i]), norm_new=float(self.norm_new[i]), dot=float(self.dot[i]),
                max_abs=float(self.max_abs[i]), mean_abs_diff=float(self.mean_abs_diff[i]),
                changed_count=int(self.changed_count[i]),
            )
        return TensorDiff(self.names[i], self.status[i], self._side(self.old, i), self._side(self.new, i),
                          metrics, self.extras.get(i, {}), self.role[i])

    # ---- derived columns ---------------------------------------------------------------

    @property
    def params(self) -> np.ndarray:
        """Elements of each tensor (the new side's, else the old side's)."""
        return np.where(self.new.present, self.new.numel, self.old.numel)

    def rel_l2(self) -> np.ndarray:
        """‖Δ‖/‖A‖ per row (as PairMetrics.rel_l2: ∞ if ‖A‖ = 0 < ‖Δ‖; NaN if unmeasured)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.norm_old > 0, self.l2 / np.where(self.norm_old > 0, self.norm_old, 1.0),
                            np.where(self.l2 > 0, np.inf, np.where(np.isnan(self.l2), np.nan, 0.0)))

    def old_all_zero(self) -> np.ndarray:
        """Rows whose old side is all zero while the new is not (TensorDiff.old_all_zero)."""
        with np.errstate(invalid="ignore"):
            return (self.measured & self.old.present & (self.norm_old == 0) & (self.l2 > 0)
                    & (self.old.nan_count == 0) & (self.old.inf_count == 0))

    def cosine(self) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return cosine_of(self.dot, self.norm_old, self.norm_new, self.l2)

    def float_pairs(self) -> np.ndarray:
        """Rows measured with a float storage dtype on both sides."""
        return self.measured & np.array([is_float_storage(a) and is_float_storage(b)
                                         for a, b in zip(self.old.dtype, self.new.dtype)], dtype=bool)

    def float_sides(self) -> np.ndarray:
        """Rows present on both sides with a float storage dtype on each."""
        both = self.old.present & self.new.present
        return both & np.array([is_float_storage(a) and is_float_storage(b) if ok else False
                                for a, b, ok in zip(self.old.dtype, self.new.dtype, both)], dtype=bool)

    def in_scope(self, scope: str) -> np.ndarray:
        roles = SCOPES[scope]
        return np.array([r in roles for r in self.role], dtype=bool)

    def items(self, rows: Sequence[int], one_sided: bool = False) -> list[dict[str, Any]]:
        """The JSON items of ``rows``, built from the columns, JSON-safe (non-finite floats
        as the strings of results.NAN/POS_INF/NEG_INF): each equals
        ``finite_json(self[i].to_dict())``, or with ``one_sided`` (inspect) the item
        ``{"type": "tensor", "path": name, **new side}``. One pass per column, then one
        dict display per row (the keys written out: a third faster than ``dict(zip())``):
        no per-value Python."""
        rows = list(rows)
        if not rows:
            return []
        idx = np.asarray(rows, dtype=np.int64)
        names = [self.names[i] for i in rows]
        sides = {}
        for label, side in (("old", self.old), ("new", self.new)):
            if one_sided and label == "old":
                continue
            numel, values = side.numel[idx], side.values(idx)
            with np.errstate(divide="ignore", invalid="ignore"):
                zero_fraction = np.where(numel > 0, side.zero_count[idx] / np.maximum(values, 1), 0.0)
            shapes = [side.shape[i] for i in rows]
            columns = [[list(shape) if shape is not None else None for shape in shapes],
                       [side.dtype[i] for i in rows], numel.tolist(), side.nbytes[idx].tolist()]
            columns += [_json(getattr(side, f)[idx]) for f in ("mean", "std", "min", "max", "mean_abs", "rms")]
            columns += [_json(zero_fraction), side.nan_count[idx].tolist(), side.inf_count[idx].tolist()]
            dicts = [{"shape": shape, "dtype": dtype, "numel": numel, "nbytes": nbytes, "mean": mean, "std": std,
                      "min": lo, "max": hi, "mean_abs": mean_abs, "rms": rms, "zero_fraction": zero,
                      "nan_count": nan, "inf_count": inf}
                     for shape, dtype, numel, nbytes, mean, std, lo, hi, mean_abs, rms, zero, nan, inf in zip(*columns)]
            sides[label] = (side.present[idx], dicts)
        if one_sided:
            present, dicts = sides["new"]
            return [{"type": "tensor", "path": name, **(d if here else {})}
                    for name, d, here in zip(names, dicts, present.tolist())]
        count = self.count[idx]
        l2 = self.l2[idx]
        rel = self.rel_l2()[idx]
        with np.errstate(divide="ignore", invalid="ignore"):
            rmse = np.where(count > 0, l2 / np.sqrt(np.maximum(count, 1)), 0.0)
            changed = np.where(count > 0, self.changed_count[idx] / np.maximum(count, 1), 0.0)
        pair_columns = [self.equal[idx].tolist(), _json(l2), _json(rel), _json(rel * rel), _json(self.cosine()[idx]),
                        _json(rmse), _json(np.where(count > 0, self.max_abs[idx], 0.0)),
                        _json(self.mean_abs_diff[idx]), _json(changed)]
        (old_present, old_dicts), (new_present, new_dicts) = sides["old"], sides["new"]
        types = [f"tensor_{self.status[i]}" for i in rows]
        # Every row as if measured with both sides (the common case) ...
        out = [{"type": kind, "path": name, "old": old, "new": new, "equal": equal, "l2": l2, "rel_l2": rel,
                "nmse": nmse, "cosine": cosine, "rmse": rmse, "max_abs": max_abs, "mean_abs_diff": mad,
                "changed_fraction": changed}
               for kind, name, old, new, equal, l2, rel, nmse, cosine, rmse, max_abs, mad, changed
               in zip(types, names, old_dicts, new_dicts, *pair_columns)]
        # ... then the others (a side absent, not measured) without the keys they lack.
        measured = self.measured[idx]
        for j in np.flatnonzero(~(measured & old_present & new_present)).tolist():
            item = {"type": types[j], "path": names[j]}
            if old_present[j]:
                item["old"] = old_dicts[j]
            if new_present[j]:
                item["new"] = new_dicts[j]
            if measured[j]:
                item.update((k, out[j][k]) for k in _PAIR_KEYS)
            out[j] = item
        nonfinite_moved = np.flatnonzero(measured & ((self.old.nan_count[idx] != self.new.nan_count[idx])
                                                     | (self.old.inf_count[idx] != self.new.inf_count[idx])))
        for j in nonfinite_moved.tolist():
            i = rows[j]
            for key in ("nan", "inf"):
                a, b = int(getattr(self.old, f"{key}_count")[i]), int(getattr(self.new, f"{key}_count")[i])
                if a != b:
                    out[j][f"{key}_count_change"] = [a, b]
        return out

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATUSES, 0)
        for s in self.status:
            out[s] = out.get(s, 0) + 1
        return out

    def status_mask(self, *statuses: str) -> np.ndarray:
        return np.array([s in statuses for s in self.status], dtype=bool)


def without_gc(func):
    """Run ``func`` with Python's cyclic garbage collector paused.

    A checkpoint of 20,000 tensors means hundreds of thousands of small objects; the
    collector rescanning them on every allocation burst cost 0.55 s of a 0.63 s load
    (benchmarks/bench_engine.py row 5). A run creates no cycles that must be freed
    before it ends; the collector resumes afterwards. Building the JSON items of such
    a report (``Report.to_dict``) and ``torchdiff.load`` (0.49 s -> 0.06 s for 20,000
    tensors) are paused too.
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return func(*args, **kwargs)
        finally:
            if was_enabled:
                gc.enable()

    return wrapper


# ---- group figures ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GroupFigures:
    """The figures of a group of tensors, from sums over its members k (docs/METRICS.md):

    l2 = ‖Δ_g‖ = sqrt(Σ‖Δ_k‖²); rel_l2 = ‖Δ_g‖/‖A_g‖ (∞ if ‖A_g‖ = 0 < ‖Δ_g‖);
    cosine = Σ⟨A_k,B_k⟩/(‖A_g‖‖B_g‖); rotation = 1 − cosine, evaluated as
    (‖Δ_g‖² − (‖A_g‖ − ‖B_g‖)²)/(2‖A_g‖‖B_g‖) where that is the better conditioned
    (``by_norms``), else from Σ⟨A_k,B_k⟩; share = ‖Δ_g‖²/total ‖Δ‖² (set by
    ``GroupSums.compute``); norm_change = (‖B_g‖ − ‖A_g‖)/‖A_g‖.
    ``tensors`` and ``params`` count every member; the sums cover the ``measured`` ones.
    """

    tensors: int
    params: int
    measured: int
    changed: int
    dsq: float
    old_sq: float
    new_sq: float
    dot: float
    share: float = math.nan
    elements: int = 0  # Σ elements compared (the measured members)
    changed_elements: int = 0  # Σ elements with |Δ| > ε

    @property
    def changed_fraction(self) -> float:
        """Share of the compared elements that changed (0 when none was compared)."""
        return self.changed_elements / self.elements if self.elements else 0.0

    @property
    def l2(self) -> float:
        return math.sqrt(self.dsq)

    @property
    def norm_old(self) -> float:
        return math.sqrt(self.old_sq)

    @property
    def norm_new(self) -> float:
        return math.sqrt(self.new_sq)

    @property
    def rel_l2(self) -> float:
        return rel_of(self.dsq, self.old_sq)

    @property
    def cosine(self) -> float:
        return cosine_of(self.dot, self.norm_old, self.norm_new, self.dsq)

    @property
    def old_all_zero(self) -> bool:
        """The group's old side is all zero (‖A_g‖ = 0) and Δ is not: rel_l2 is ∞, ‖Δ_g‖
        measures the change (as TensorDiff.old_all_zero for one tensor)."""
        return self.old_sq == 0 and self.dsq > 0

    @property
    def rotation(self) -> float:
        a, b = self.norm_old, self.norm_new
        if a == 0 or b == 0:
            return 0.0 if a == b else math.nan
        if by_norms(self.l2, a, b):
            return min(2.0, max(0.0, (self.dsq - (a - b) ** 2) / (2 * a * b)))
        cos = self.cosine  # the direct ⟨A,B⟩: the norms would cancel
        return cos if cos != cos else 1.0 - cos

    @property
    def norm_change(self) -> float:
        if self.old_sq > 0:
            return (self.norm_new - self.norm_old) / self.norm_old
        return math.inf if self.new_sq > 0 else 0.0

    @property
    def rel_l2_lower_bound(self) -> float:
        """|‖B‖ − ‖A‖|/‖A‖ ≤ rel_l2 (triangle inequality): what statistics alone bound."""
        return abs(self.norm_change)

    def to_dict(self) -> dict[str, Any]:
        return {"tensors": self.tensors, "params": self.params, "l2": self.l2, "rel_l2": self.rel_l2,
                "cosine": self.cosine, "share": self.share, "rotation": self.rotation,
                "norm_old": self.norm_old, "norm_new": self.norm_new, "norm_change": self.norm_change}


_SUMS = ("tensors", "params", "measured", "changed", "dsq", "old_sq", "new_sq", "dot", "elements", "changed_elements")


class GroupSums:
    """Segment sums of the figures over groups of tensors: the one aggregation.

    ``update(figures, keys, mask)`` adds the rows where ``mask`` holds to the group
    ``keys[i]``; ``merge(other)`` adds another GroupSums (a thread's, a rank's);
    ``compute()`` gives each group's ``GroupFigures``, with shares of the total ‖Δ‖²,
    in first-seen group order.
    """

    def __init__(self) -> None:
        self._sums: dict[str, np.ndarray] = {}

    def update(self, fig: Figures, keys: Sequence[str] | str, mask: np.ndarray | None = None,
               sum_mask: np.ndarray | None = None) -> "GroupSums":
        """Add the rows in ``mask``; their pair figures are summed where they were
        measured (and ``sum_mask`` holds, e.g. float pairs only)."""
        n = len(fig)
        mask = np.ones(n, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
        rows = np.flatnonzero(mask)
        if rows.size == 0:
            return self
        if isinstance(keys, str):
            labels, inverse = [keys], np.zeros(rows.size, dtype=np.int64)
        else:
            index: dict[str, int] = {}
            inverse = np.fromiter((index.setdefault(keys[i], len(index)) for i in rows), np.int64, rows.size)
            labels = list(index)
        measured = fig.measured[rows] if sum_mask is None else fig.measured[rows] & np.asarray(sum_mask)[rows]
        moved = np.array([fig.status[i] not in (UNCHANGED,) for i in rows], dtype=bool)

        def pair(col: np.ndarray) -> np.ndarray:
            return np.where(measured, col[rows], 0.0)

        if fig.values_kept:
            dsq, old_sq, new_sq, dot = pair(fig.l2) ** 2, pair(fig.norm_old) ** 2, pair(fig.norm_new) ** 2, pair(fig.dot)
        else:  # statistics only: norms from each side, the difference unknown
            both = fig.old.present[rows] & fig.new.present[rows]
            old_sq = np.where(both, fig.old.norm[rows], 0.0) ** 2
            new_sq = np.where(both, fig.new.norm[rows], 0.0) ** 2
            dsq = dot = np.full(rows.size, np.nan)
        columns = {
            "tensors": np.ones(rows.size), "params": fig.params[rows].astype(np.float64),
            "measured": measured.astype(np.float64), "changed": moved.astype(np.float64),
            "dsq": dsq, "old_sq": old_sq, "new_sq": new_sq, "dot": dot,
            "elements": pair(fig.count), "changed_elements": pair(fig.changed_count),
        }
        k = len(labels)
        block = np.stack([np.bincount(inverse, weights=columns[f], minlength=k) for f in _SUMS], 1)
        for label, row in zip(labels, block):
            if label in self._sums:
                self._sums[label] += row
            else:
                self._sums[label] = row
        return self

    def merge(self, other: "GroupSums") -> "GroupSums":
        for label, row in other._sums.items():
            self._sums[label] = self._sums[label] + row if label in self._sums else row.copy()
        return self

    def __len__(self) -> int:
        return len(self._sums)

    def compute(self) -> dict[str, GroupFigures]:
        if not self._sums:
            return {}
        rows = np.stack(list(self._sums.values())).tolist()  # Python floats: one conversion, not one per figure
        total = sum(row[4] for row in rows)
        return {label: GroupFigures(int(t), int(p), int(m), int(c), dsq, old_sq, new_sq, dot,
                                    dsq / total if total > 0 else 0.0, int(e), int(ce))
                for label, (t, p, m, c, dsq, old_sq, new_sq, dot, e, ce) in zip(self._sums, rows)}


def group(fig: Figures, key: Callable[[str], str] | str, mask: np.ndarray | None = None,
          sum_mask: np.ndarray | None = None) -> dict[str, GroupFigures]:
    """``GroupSums`` in one call: ``key`` maps a name to its group, or is one label for all."""
    keys = key if isinstance(key, str) else [key(n) for n in fig.names]
    return GroupSums().update(fig, keys, mask, sum_mask).compute()


def summary_mask(fig: Figures, scope: str) -> np.ndarray:
    """The rows global and layer figures cover: same-shape float pairs in ``scope``
    (measured pairs; with statistics only, tensors of one shape on both sides)."""
    both = fig.float_pairs() if fig.values_kept else fig.float_sides()
    wanted = fig.in_scope(scope) & fig.status_mask(CHANGED, UNCHANGED, RETYPED)
    copies = tied_copies(fig)
    mask = both & wanted & ~copies
    for i, extras in fig.extras.items():  # sparse: rows pairing.annotate marked
        if extras.get("dequantized") and fig.measured[i] and not copies[i]:
            mask[i] = wanted[i]  # integer codes measured as their dequantized float values
    return mask


def tied_side(fig: Figures, side: str) -> np.ndarray:
    """Rows whose ``side`` ("old", "new") is a tied copy of another tensor
    (pairing.annotate's ``tied_to``): its parameters count once, at that tensor."""
    mask = np.zeros(len(fig), dtype=bool)
    for i, extras in fig.extras.items():
        if (extras.get("tied_to") or {}).get(side):
            mask[i] = True
    return mask


def tied_copies(fig: Figures) -> np.ndarray:
    """Rows that are a tied copy on every side that holds them (both sides of a pair;
    the one side in ``inspect``): the same values as the row they are tied to, which is
    where they count."""
    old, new = tied_side(fig, "old"), tied_side(fig, "new")
    return (old | ~fig.old.present) & (new | ~fig.new.present) & (old | new)


def stored_nbytes(fig: Figures, side: str) -> np.ndarray:
    """Bytes the file holds for each row's ``side`` (0 where absent), each storage once:
    a tied copy or a second view of one storage 0, a saved slice its whole storage
    (pairing.annotate's ``stored_nbytes``), else the tensor's own bytes."""
    column = getattr(fig, side)
    out = np.where(column.present, column.nbytes, 0).astype(np.int64)
    for i, extras in fig.extras.items():
        found = (extras.get("stored_nbytes") or {}).get(side)
        if found is not None:
            out[i] = found
    return out


def layer_members(fig: Figures, scope: str) -> np.ndarray:
    """The rows a layer holds (its ``tensors`` and ``params``): the tensors in ``scope``,
    a tied copy left to the layer of the tensor it is tied to."""
    return fig.in_scope(scope) & ~tied_copies(fig)


def layer_groups(fig: Figures, scope: str, layer: Callable[[str], str]) -> dict[str, GroupFigures]:
    """The layers, as --show-layer-impact, the HTML report and ``layer_records`` show
    them: each holds its ``layer_members``, with pair figures summed over ``summary_mask``."""
    return group(fig, layer, layer_members(fig, scope), sum_mask=summary_mask(fig, scope))


def global_figures(fig: Figures, scope: str = "params") -> GroupFigures | None:
    """The whole model's figures over ``summary_mask``; None when no such pair was measured."""
    mask = summary_mask(fig, scope)
    if not mask.any():
        return None
    return group(fig, "all", mask)["all"]


def nonfinite_values(fig: Figures, scope: str) -> int:
    """NaN and ±∞ values on the new side of the tensors the global figures cover
    (``summary_mask``): the figures leave those positions out, so a model gone NaN would
    read as unchanged without this count beside them."""
    mask = summary_mask(fig, scope)
    return int((fig.new.nan_count[mask] + fig.new.inf_count[mask]).sum())


def scalars(fig: Figures, scope: str, layer: Callable[[str], str],
            analyses: Iterable[Any] = (), tensors: bool = True) -> dict[str, float]:
    """A Report's flat figures for a metrics logger (``scalars_of``): totals and layers
    over ``summary_mask``, and each changed tensor with ``tensors=True``."""
    mask = summary_mask(fig, scope)
    total = group(fig, "all", mask)["all"] if mask.any() else None
    layers = group(fig, layer, mask) if mask.any() else {}
    per_tensor = None
    if tensors:
        moved = fig.measured & ~fig.status_mask(UNCHANGED)
        per_tensor = group(fig, lambda n: n, moved) if moved.any() else {}
    return scalars_of(fig.counts(), total, layers, per_tensor, analyses, exact=fig.values_kept,
                      nonfinite=nonfinite_values(fig, scope))


def scalars_of(counts: Mapping[str, int], total: GroupFigures | None, layers: Mapping[str, GroupFigures],
               tensors: Mapping[str, GroupFigures] | None, analyses: Iterable[Any] = (),
               exact: bool = True, nonfinite: int | None = None) -> dict[str, float]:
    """The one naming scheme of flat figures, for every report kind and the monitor:

    - ``torchdiff/<status>``: tensors per status;
    - ``torchdiff/global_l2``, ``torchdiff/global_rel_l2``, ``torchdiff/global_cosine``
      (when values were kept), ``torchdiff/param_norm`` = ‖B‖ and
      ``torchdiff/param_norm_change`` = (‖B‖ − ‖A‖)/‖A‖, over the tensors in scope;
    - ``torchdiff/nonfinite_values``: NaN and ±∞ values of the new side over the same
      tensors (``nonfinite_values``), which the figures above leave out;
    - ``torchdiff/layer_rel_l2/<layer>`` (or ``torchdiff/layer_norm_change/<layer>``
      when only statistics were kept);
    - ``torchdiff/rel_l2/<tensor>`` (or ``norm_change``) for the tensors given;
    - ``torchdiff/<analysis>/<key>`` for the analyses' numeric headline figures.
    """
    out: dict[str, float] = {f"torchdiff/{s}": float(n) for s, n in counts.items()}
    if total is not None:
        if exact:
            out["torchdiff/global_l2"] = total.l2
            out["torchdiff/global_rel_l2"] = total.rel_l2
            out["torchdiff/global_cosine"] = total.cosine
        out["torchdiff/param_norm"] = total.norm_new
        out["torchdiff/param_norm_change"] = total.norm_change
    if nonfinite is not None:
        out["torchdiff/nonfinite_values"] = float(nonfinite)
    key = "rel_l2" if exact else "norm_change"
    for name, f in layers.items():
        out[f"torchdiff/layer_{key}/{name}"] = getattr(f, key)
    for name, f in (tensors or {}).items():
        out[f"torchdiff/{key}/{name}"] = getattr(f, key)
    for a in analyses:
        for k, value in a.headline.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"torchdiff/{a.name}/{k}"] = float(value)
    return out


def _json(values: np.ndarray) -> list:
    """Floats as a JSON-safe list: NaN and ±∞ as the strings of results.NAN/POS_INF/NEG_INF."""
    out = values.astype(np.float64).tolist()
    for k in np.flatnonzero(~np.isfinite(values)).tolist():
        v = out[k]
        out[k] = NAN if v != v else (POS_INF if v > 0 else NEG_INF)
    return out


def rel_of(dsq, old_sq):
    """sqrt(dsq/old_sq), ∞ when old_sq = 0 < dsq, 0 when both are 0, NaN when dsq is
    (arrays or floats; floats in scalar arithmetic, the same IEEE operations, so the same
    bits without NumPy's per-call cost: 20,000 layer groups)."""
    if isinstance(dsq, float) and isinstance(old_sq, float):
        if dsq != dsq:
            return math.nan
        if old_sq > 0:
            return math.sqrt(dsq / old_sq)
        return math.inf if dsq > 0 else 0.0
    dsq, old_sq = np.asarray(dsq, dtype=np.float64), np.asarray(old_sq, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(old_sq > 0, np.sqrt(dsq / np.where(old_sq > 0, old_sq, 1.0)),
                       np.where(dsq > 0, np.inf, np.where(np.isnan(dsq), np.nan, 0.0)))
    return out if out.ndim else float(out)


def cosine_of(dot, norm_old, norm_new, l2=None):
    """⟨A,B⟩/(‖A‖‖B‖) clipped to [−1, 1]; 1 when both norms are 0, NaN when one is.
    NaN too where ⟨A,B⟩ is NaN or left float64's range (±inf; or ‖A‖‖B‖ underflowed
    to 0 with both norms > 0); ‖A‖‖B‖ beyond float64 is divided out one norm at a time
    (arrays or floats; floats in scalar arithmetic, as ``rel_of``). With ``l2`` = ‖Δ‖:
    exactly 1 where Δ = 0 and the norms are > 0 (A = B; ⟨A,B⟩/(‖A‖‖A‖) may round to
    0.9999999999999999)."""
    if isinstance(dot, float) and isinstance(norm_old, float) and isinstance(norm_new, float):
        denom = norm_old * norm_new
        if dot != dot or dot in (math.inf, -math.inf):
            return math.nan
        if l2 == 0 and denom > 0:
            return 1.0
        if denom > 0:
            q = dot / denom if denom != math.inf else dot / norm_old / norm_new
            return q if q != q else min(1.0, max(-1.0, q))
        return 1.0 if norm_old == norm_new == 0 else math.nan
    dot, a, b = (np.asarray(x, dtype=np.float64) for x in (dot, norm_old, norm_new))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        denom = a * b
        q = np.where(np.isinf(denom), dot / np.where(a > 0, a, 1.0) / np.where(b > 0, b, 1.0),
                     dot / np.where(denom > 0, denom, 1.0))
        out = np.where(denom > 0, np.clip(q, -1.0, 1.0), np.where((a == 0) & (b == 0), 1.0, np.nan))
        out = np.where(np.isfinite(dot), out, np.nan)
        if l2 is not None:
            out = np.where((np.asarray(l2) == 0) & (denom > 0) & np.isfinite(dot), 1.0, out)
    return out if out.ndim else float(out)


def by_norms(l2, norm_old, norm_new):
    """Whether 1 − cos is better derived from the norms, (‖Δ‖² − (‖A‖ − ‖B‖)²)/(2‖A‖‖B‖),
    than from the directly summed ⟨A,B⟩ (arrays or floats).

    With ε the relative error of the sums, the first errs by about
    ε·(‖Δ‖²/2 + |‖A‖ − ‖B‖|(‖A‖ + ‖B‖))/(‖A‖‖B‖): far below ε for nearly equal tensors
    (a fine-tuning step: 1 − cos = 5e-11 keeps 7 digits, where the direct ⟨A,B⟩ of
    float32 rows errs by 3e-8), far above it when the norms differ by orders of magnitude
    (the cancellation the direct sum avoids). The direct sum errs by at most about ε.
    """
    if isinstance(l2, float):  # Python floats overflow to inf without a warning
        return l2 * l2 / 2 + abs(norm_old - norm_new) * (norm_old + norm_new) <= norm_old * norm_new
    with np.errstate(invalid="ignore", over="ignore"):
        return l2 * l2 / 2 + np.abs(norm_old - norm_new) * (norm_old + norm_new) <= norm_old * norm_new


def records(fig: Figures, order: Sequence[int] | None, layer: Callable[[str], str]) -> list[dict[str, Any]]:
    """One plain dict per tensor, built from the columns: name, layer, role, status, shape,
    dtype, params, ``old_<stat>``/``new_<stat>`` and the pair metrics (None where a figure
    does not apply)."""
    rows_order = range(len(fig)) if order is None else order
    params = fig.params.tolist()
    rel, cos = fig.rel_l2().tolist(), fig.cosine().tolist()
    l2 = fig.l2.tolist()
    count = fig.count.tolist()
    with np.errstate(divide="ignore", invalid="ignore"):
        rmse = np.where(fig.count > 0, fig.l2 / np.sqrt(np.maximum(fig.count, 1)), 0.0).tolist()
        changed_fraction = np.where(fig.count > 0, fig.changed_count / np.maximum(fig.count, 1), 0.0).tolist()
    sides = {}
    for prefix, side in (("old", fig.old), ("new", fig.new)):
        with np.errstate(divide="ignore", invalid="ignore"):
            zero_fraction = np.where(side.numel > 0, side.zero_count / np.maximum(side.values(), 1), 0.0)
        cols = {f: getattr(side, f).tolist() for f in ("mean", "std", "min", "max", "mean_abs", "rms",
                                                       "nan_count", "inf_count")}
        cols["zero_fraction"] = zero_fraction.tolist()
        sides[prefix] = (side.present.tolist(), cols)
    stat_fields = ("mean", "std", "min", "max", "mean_abs", "rms", "zero_fraction", "nan_count", "inf_count")
    measured = fig.measured.tolist()
    max_abs, mad = fig.max_abs.tolist(), fig.mean_abs_diff.tolist()
    out = []
    for i in rows_order:
        side = fig.new if fig.new.present[i] else fig.old
        row: dict[str, Any] = {
            "name": fig.names[i], "layer": layer(fig.names[i]), "role": fig.role[i], "status": fig.status[i],
            "shape": side.shape[i], "dtype": side.dtype[i], "params": params[i],
        }
        for prefix, (present, cols) in sides.items():
            for f in stat_fields:
                row[f"{prefix}_{f}"] = cols[f][i] if present[i] else None
        if measured[i]:
            row.update(l2=l2[i], rel_l2=rel[i], nmse=rel[i] * rel[i], cosine=cos[i], rmse=rmse[i],
                       max_abs=max_abs[i] if count[i] else 0.0, mean_abs_diff=mad[i],
                       changed_fraction=changed_fraction[i])
        else:
            row.update(dict.fromkeys(("l2", "rel_l2", "nmse", "cosine", "rmse", "max_abs", "mean_abs_diff",
                                      "changed_fraction")))
        out.append(row)
    return out


def layer_records(fig: Figures, scope: str, layer: Callable[[str], str]) -> list[dict[str, Any]]:
    """One plain dict per layer of ``layer_groups``: layer, then GroupFigures.to_dict()."""
    return [{"layer": name, **f.to_dict()} for name, f in layer_groups(fig, scope, layer).items()]



# ---- the comparison ---------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """Everything the engine measured about two checkpoints (or one, ``mode="inspect"``).

    ``figures`` is the table; ``diffs`` is the same table as a sequence of TensorDiff
    views. ``scope`` (``names.SCOPES``) is what global, layer and summary figures cover.
    """

    old_name: str
    new_name: str
    old_format: str
    new_format: str
    figures: Figures
    metadata_diffs: tuple = ()
    old_metadata: Mapping[str, Any] = None  # type: ignore[assignment]
    new_metadata: Mapping[str, Any] = None  # type: ignore[assignment]
    device: str = "cpu"
    epsilon: float = 0.0
    mode: str = "pair"  # "pair": old vs new; "inspect": one checkpoint, every tensor on the new side
    scope: str = "params"
    layer_pattern: Any = None
    #: (old, new): tensor name -> the name its file stores, where pairing dropped a
    #: prefix or wrapper segment (pairing.drop_prefix); empty otherwise
    stored_names: tuple[Mapping[str, str], Mapping[str, str]] = field(default_factory=lambda: ({}, {}))

    def __post_init__(self) -> None:
        if self.old_metadata is None:
            object.__setattr__(self, "old_metadata", {})
        if self.new_metadata is None:
            object.__setattr__(self, "new_metadata", {})

    @property
    def diffs(self) -> Figures:
        return self.figures

    def __iter__(self) -> Iterator[TensorDiff]:
        return iter(self.figures)

    def by_status(self, *statuses: str) -> list[TensorDiff]:
        return [self.figures[i] for i, s in enumerate(self.figures.status) if s in statuses]

    @property
    def has_differences(self) -> bool:
        if self.mode == "inspect":
            return False
        return bool(self.metadata_diffs) or any(s != UNCHANGED for s in self.figures.status)

    def counts(self) -> dict[str, int]:
        return self.figures.counts()

    def layer(self, name: str) -> str:
        return layer_of(name, self.layer_pattern)

    def in_scope(self, d: TensorDiff) -> bool:
        return d.role in SCOPES[self.scope]
