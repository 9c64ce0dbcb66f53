"""Pure batched torch reductions. No I/O, no printing.

The fast path works on *row blocks*: a 2-D tensor whose rows are segments of
tensors (a whole small tensor, or a slice of a large one). Every reduction runs
along dim 1, so one call serves many tensors, and per-row partial results are
merged per tensor in float64 on the host (Chan et al.'s pairwise formula for the
centred second moment). The exact path (``exact_side``/``exact_pair``) upcasts a
whole tensor to float64 with masks for NaN/Inf; the engine uses it for tensors
whose fast partials are not finite, and tests use it as a second reference.

Row partial layout (columns):
    side: SUM, MIN, MAX, SUM_ABS, NONZERO, M2   (M2 = Σ(x − row mean)²)
    pair: DSQ, DMAX, DSUM_ABS, CHANGED          (Δ = b − a; CHANGED = #{|Δ| > ε})
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

SUM, MIN, MAX, SUM_ABS, NONZERO, M2 = range(6)
SIDE_WIDTH = 6
DSQ, DMAX, DSUM_ABS, CHANGED = range(4)
PAIR_WIDTH = 4


_WIDE = {torch.float64, torch.int64, torch.int32} | {
    dt for dt in (getattr(torch, "uint32", None), getattr(torch, "uint64", None)) if dt is not None
}


@functools.lru_cache(maxsize=None)
def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 for float64 and wide integers (exactness), float32 for everything else."""
    return torch.float64 if any(d in _WIDE for d in dtypes) else torch.float32


def side_rows(x: torch.Tensor, work: torch.Tensor) -> list[torch.Tensor]:
    """Per-row partials of one side. ``x`` and ``work`` are [k, L]; ``work`` is clobbered."""
    length = x.shape[1]
    total = x.sum(1)
    lo = x.amin(1)
    hi = x.amax(1)
    torch.abs(x, out=work)
    sum_abs = work.sum(1)
    torch.sign(work, out=work)
    nonzero = work.sum(1)
    torch.sub(x, (total / length).unsqueeze(1), out=work)
    work.mul_(work)
    m2 = work.sum(1)
    return [total, lo, hi, sum_abs, nonzero, m2]


def pair_rows(a: torch.Tensor, b: torch.Tensor, epsilon: float, work: torch.Tensor, delta: torch.Tensor) -> list[torch.Tensor]:
    """Per-row partials of Δ = b − a. ``work`` and ``delta`` are [k, L] scratch."""
    torch.sub(b, a, out=delta)
    torch.mul(delta, delta, out=work)
    dsq = work.sum(1)
    delta.abs_()
    dmax = delta.amax(1)
    dsum_abs = delta.sum(1)
    if epsilon > 0:
        delta.sub_(_floor_to(epsilon, delta.dtype)).clamp_(min=0)
    delta.sign_()
    changed = delta.sum(1)
    return [dsq, dmax, dsum_abs, changed]


def _floor_to(epsilon: float, dtype: torch.dtype) -> float:
    """The largest value of ``dtype`` that is ≤ ``epsilon``.

    For |Δ| held in ``dtype``, |Δ| > epsilon ⟺ |Δ| > this value, whereas rounding
    epsilon to nearest (what ``sub_(epsilon)`` does) can miss a |Δ| just above it.
    """
    e = torch.tensor(epsilon, dtype=dtype)
    if float(e) > epsilon:
        e = torch.nextafter(e, torch.zeros((), dtype=dtype))
    return float(e)


@dataclass(slots=True)
class SideTotals:
    """Merged statistics of one side of one tensor (finite values only)."""

    count: int
    mean: float
    m2: float
    min: float
    max: float
    sum_abs: float
    zero_count: int
    nan_count: int = 0
    inf_count: int = 0

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count else math.nan

    @property
    def sumsq(self) -> float:
        return self.m2 + self.count * self.mean * self.mean

    @property
    def rms(self) -> float:
        return math.sqrt(self.sumsq / self.count) if self.count else math.nan

    @property
    def mean_abs(self) -> float:
        return self.sum_abs / self.count if self.count else math.nan


@dataclass(slots=True)
class PairTotals:
    count: int
    dsq: float
    dmax: float
    dsum_abs: float
    changed: int
    sumsq_old: float
    sumsq_new: float


def merge_side(rows: np.ndarray, lengths: np.ndarray, ids: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """Merge per-row side partials into per-tensor totals (vectorised, float64).

    Args:
        rows: [R, SIDE_WIDTH] float64 partials.
        lengths: [R] elements per row.
        ids: [R] tensor index of each row, in [0, n).
        n: number of tensors.
    """
    count = np.bincount(ids, weights=lengths, minlength=n)
    total = np.bincount(ids, weights=rows[:, SUM], minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count
        row_mean = rows[:, SUM] / lengths
        spread = rows[:, M2] + lengths * (row_mean - mean[ids]) ** 2
    m2 = np.bincount(ids, weights=spread, minlength=n)
    lo = np.full(n, np.inf)
    hi = np.full(n, -np.inf)
    with np.errstate(invalid="ignore"):
        np.minimum.at(lo, ids, rows[:, MIN])
        np.maximum.at(hi, ids, rows[:, MAX])
    return {
        "count": count,
        "mean": mean,
        "m2": m2,
        "min": lo,
        "max": hi,
        "sum_abs": np.bincount(ids, weights=rows[:, SUM_ABS], minlength=n),
        "zero": count - np.bincount(ids, weights=rows[:, NONZERO], minlength=n),
    }


def merge_pair(rows: np.ndarray, ids: np.ndarray, n: int) -> dict[str, np.ndarray]:
    dmax = np.full(n, -np.inf)
    with np.errstate(invalid="ignore"):
        np.maximum.at(dmax, ids, rows[:, DMAX])
    return {
        "dsq": np.bincount(ids, weights=rows[:, DSQ], minlength=n),
        "dmax": dmax,
        "dsum_abs": np.bincount(ids, weights=rows[:, DSUM_ABS], minlength=n),
        "changed": np.bincount(ids, weights=rows[:, CHANGED], minlength=n),
    }


def exact_side(x: torch.Tensor) -> SideTotals:
    """Float64 statistics of one tensor with NaN/Inf masked out (the reference path)."""
    x = _as_float64(x)
    nan = torch.isnan(x)
    inf = torch.isinf(x)
    finite = x[~(nan | inf)]
    count = finite.numel()
    if count == 0:
        return SideTotals(0, math.nan, 0.0, math.nan, math.nan, 0.0, 0, int(nan.sum()), int(inf.sum()))
    mean = finite.mean()
    return SideTotals(
        count=count,
        mean=float(mean),
        m2=float(((finite - mean) ** 2).sum()),
        min=float(finite.min()),
        max=float(finite.max()),
        sum_abs=float(finite.abs().sum()),
        zero_count=int((finite == 0).sum()),
        nan_count=int(nan.sum()),
        inf_count=int(inf.sum()),
    )


def exact_pair(a: torch.Tensor, b: torch.Tensor, epsilon: float) -> PairTotals:
    """Float64 difference metrics over the positions where both sides are finite."""
    a = _as_float64(a)
    b = _as_float64(b)
    both = torch.isfinite(a) & torch.isfinite(b)
    a, b = a[both], b[both]
    delta = (b - a).abs()
    return PairTotals(
        count=a.numel(),
        dsq=float((delta * delta).sum()),
        dmax=float(delta.max()) if delta.numel() else 0.0,
        dsum_abs=float(delta.sum()),
        changed=int((delta > epsilon).sum()),
        sumsq_old=float((a * a).sum()),
        sumsq_new=float((b * b).sum()),
    )


def _as_float64(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1)
    if x.is_complex():
        x = torch.view_as_real(x).reshape(-1)
    return x.to(torch.float64)
