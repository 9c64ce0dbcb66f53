"""Frozen result types: plain Python numbers and tuples, never tensors.

Every figure here is defined in docs/METRICS.md (the "Metric definitions" of DESIGN.md).
The figures of a whole comparison live in columns (torchdiff.figures); a TensorDiff is
a view of one row. The Report family that renders itself is torchdiff.report.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from torchdiff.status import ADDED, CHANGED, PRESENT, REMOVED, RESHAPED, RETYPED, STATUSES, UNCHANGED

#: How non-finite floats are written in JSON/YAML (JSON has no NaN/Infinity literals).
NAN, POS_INF, NEG_INF = "NaN", "Infinity", "-Infinity"
#: The label of a tensor (or group) whose old side is all zero, where rel_l2 would be ∞
#: (TensorDiff.old_all_zero): tensor lines and top tables print it instead.
OLD_ALL_ZERO = "old all zero"
#: The label of a tensor whose new side is all zero and the old is not: its rel_l2 is 1
#: and its cosine undefined (TensorDiff.new_all_zero); tensor lines print it, not NaN.
NEW_ALL_ZERO = "new all zero"

__all__ = ["NAN", "NEG_INF", "NEW_ALL_ZERO", "OLD_ALL_ZERO", "POS_INF",
           "ADDED", "CHANGED", "PRESENT", "REMOVED", "RESHAPED", "RETYPED", "STATUSES", "UNCHANGED",
           "AnalysisResult", "MetadataDiff", "PairMetrics", "Table", "TensorDiff", "TensorStats"]


def values_per_element(dtype: str | None) -> int:
    """2 for a complex storage dtype (measured as its real view, docs/METRICS.md), else 1."""
    return 2 if dtype is not None and "complex" in dtype else 1


@dataclass(frozen=True, slots=True)
class TensorStats:
    """Statistics of one side of one tensor.

    Moments are over the finite values only; ``nan_count``/``inf_count`` count the rest.
    A tensor without finite values has ``nan`` moments.
    """

    shape: tuple[int, ...]
    dtype: str
    numel: int
    nbytes: int
    mean: float
    std: float
    min: float
    max: float
    mean_abs: float
    rms: float
    zero_count: int
    nan_count: int
    inf_count: int

    @property
    def values(self) -> int:
        """The values measured: ``numel``, 2·numel for a complex tensor (its real view, over
        which the moments and the zero/NaN/Inf counts are taken)."""
        return self.numel * values_per_element(self.dtype)

    @property
    def finite_count(self) -> int:
        return self.values - self.nan_count - self.inf_count

    @property
    def zero_fraction(self) -> float:
        return self.zero_count / self.values if self.numel else 0.0

    @property
    def norm(self) -> float:
        """L2 norm of the finite values: rms · sqrt(finite_count)."""
        return self.rms * math.sqrt(self.finite_count) if self.finite_count else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "dtype": self.dtype,
            "numel": self.numel,
            "nbytes": self.nbytes,
            "mean": self.mean,
            "std": self.std,
            "min": self.min,
            "max": self.max,
            "mean_abs": self.mean_abs,
            "rms": self.rms,
            "zero_fraction": self.zero_fraction,
            "nan_count": self.nan_count,
            "inf_count": self.inf_count,
        }


@dataclass(frozen=True, slots=True)
class PairMetrics:
    """Difference metrics of one tensor pair of equal shape (Δ = new − old).

    Computed over the positions where both sides are finite (``numel`` of them).
    """

    numel: int
    equal: bool
    l2: float
    norm_old: float
    norm_new: float
    dot: float
    max_abs: float
    mean_abs_diff: float
    changed_count: int

    @property
    def rel_l2(self) -> float:
        if self.norm_old > 0:
            return self.l2 / self.norm_old
        return math.inf if self.l2 > 0 else 0.0

    @property
    def nmse(self) -> float:
        r = self.rel_l2
        return r * r  # a product, as the columns compute it (pow() may differ by one ulp)

    @property
    def cosine(self) -> float:
        """As the columns compute it (torchdiff.figures.cosine_of): NaN when ⟨A,B⟩ is NaN or
        left float64's range, never clipped to ±1 from NaN."""
        dot, denom = self.dot, self.norm_old * self.norm_new
        if dot != dot or dot in (math.inf, -math.inf):
            return math.nan
        if denom == 0:
            # Both zero: identical direction by convention; one zero (or the product
            # underflowed): undefined.
            return 1.0 if self.norm_old == self.norm_new == 0 else math.nan
        if self.l2 == 0:
            return 1.0  # A = B: exactly, where ⟨A,B⟩/(‖A‖‖A‖) may round below 1
        q = dot / denom if denom != math.inf else dot / self.norm_old / self.norm_new
        return q if q != q else max(-1.0, min(1.0, q))

    @property
    def rmse(self) -> float:
        return self.l2 / math.sqrt(self.numel) if self.numel else 0.0

    @property
    def changed_fraction(self) -> float:
        return self.changed_count / self.numel if self.numel else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "equal": self.equal,
            "l2": self.l2,
            "rel_l2": self.rel_l2,
            "nmse": self.nmse,
            "cosine": self.cosine,
            "rmse": self.rmse,
            "max_abs": self.max_abs,
            "mean_abs_diff": self.mean_abs_diff,
            "changed_fraction": self.changed_fraction,
        }


@dataclass(frozen=True, slots=True)
class TensorDiff:
    """One tensor name across the two sides."""

    name: str
    status: str
    old: TensorStats | None
    new: TensorStats | None
    metrics: PairMetrics | None
    extras: Mapping[str, Any] = field(default_factory=dict)
    role: str = "parameter"  # torchdiff.names.ROLES

    @property
    def params(self) -> int:
        side = self.new if self.new is not None else self.old
        return side.numel if side is not None else 0

    @property
    def old_all_zero(self) -> bool:
        """The old side is all zero (every value finite and 0) and the new is not: a
        zero-initialised tensor (a bias, a LayerNorm shift). Its rel_l2 is ∞ and its cosine
        undefined by definition, so ‖Δ‖ (``l2``) measures its change: tensor lines say
        ``old all zero`` and give l2, sorting puts it after the measured tensors by l2,
        and top tables label it instead of printing ∞ and NaN (docs/METRICS.md)."""
        m, o = self.metrics, self.old
        return (m is not None and o is not None and m.norm_old == 0 and m.l2 > 0
                and o.nan_count == 0 and o.inf_count == 0)

    @property
    def new_all_zero(self) -> bool:
        """The new side is all zero (every value finite and 0) and the old is not (a
        pruned or reset tensor): rel_l2 is 1 and the cosine undefined, so tensor lines
        say ``new all zero`` and give rel_l2 and max_abs, not a NaN cosine."""
        m, n = self.metrics, self.new
        return (m is not None and n is not None and m.norm_new == 0 and m.l2 > 0
                and n.nan_count == 0 and n.inf_count == 0)

    @property
    def is_difference(self) -> bool:
        return self.status not in (UNCHANGED, PRESENT)

    @property
    def nonfinite_change(self) -> dict[str, tuple[int, int]]:
        """``{"nan": (old, new), "inf": (old, new)}`` for the counts that differ between
        the sides: the pair figures cover finite positions only, so a tensor that gained
        NaN/Inf must say so beside them."""
        if self.old is None or self.new is None:
            return {}
        out = {}
        for key in ("nan", "inf"):
            a, b = getattr(self.old, f"{key}_count"), getattr(self.new, f"{key}_count")
            if a != b:
                out[key] = (a, b)
        return out

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": f"tensor_{self.status}", "path": self.name}
        if self.old is not None:
            d["old"] = self.old.to_dict()
        if self.new is not None:
            d["new"] = self.new.to_dict()
        if self.metrics is not None:
            d.update(self.metrics.to_dict())
        for key, (a, b) in self.nonfinite_change.items():
            d[f"{key}_count_change"] = [a, b]
        return d


@dataclass(frozen=True, slots=True)
class MetadataDiff:
    """A non-tensor value (lr, epoch, loss, config entry) that differs."""

    key: str
    status: str  # changed | added | removed
    old: Any
    new: Any

    def to_dict(self) -> dict[str, Any]:
        return {"type": f"metadata_{self.status}", "path": self.key, "old": self.old, "new": self.new}


@dataclass(frozen=True, slots=True)
class Table:
    """A table for the text renderer; JSON carries the same rows as dicts."""

    title: str
    headers: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]

    def records(self) -> list[dict[str, Any]]:
        return [dict(zip(self.headers, row)) for row in self.rows]


@dataclass(frozen=True, slots=True)
class AnalysisResult:
    """What one analysis found.

    ``headline`` holds the figures of the one-line text form
    (``name: key=value, ...``); ``data`` the full JSON payload; ``tables`` and
    ``notes`` follow the headline in text output. ``text_keys`` renames headline keys
    in text only: ``{"anomaly_type": "type"}`` prints ``type=...`` where JSON keeps
    ``anomaly_type`` (``type`` and ``path`` are the item's own); ``""`` prints the value
    alone (``architecture_comparison: mlp->mlp, ...``).
    """

    name: str
    headline: Mapping[str, Any]
    data: Mapping[str, Any] = field(default_factory=dict)
    tables: tuple[Table, ...] = ()
    notes: tuple[str, ...] = ()
    failed: bool = False  # a CI gate tripped (e.g. --fail-on-anomaly): the CLI exits 1
    text_keys: Mapping[str, str] = field(default_factory=dict)  # headline key -> its text label

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": self.name, "path": ""}
        d.update(self.headline)
        d.update(self.data)
        for table in self.tables:
            key = table.title.lower().replace(" ", "_")
            d.setdefault(key, table.records())
        if self.notes:
            d["notes"] = list(self.notes)
        return d


def json_default(value: Any) -> Any:
    """Fallback encoder for metadata values (tuples, sets, dtypes, numpy scalars)."""
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return item()
        except (TypeError, ValueError):
            pass
    return str(value)


def dumps(obj: Any, indent: int | None = 2) -> str:
    return json.dumps(obj, indent=indent, default=json_default, allow_nan=False)
