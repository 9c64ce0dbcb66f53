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
    pair: DSQ, DMAX, DSUM_ABS, CHANGED          (Δ = b − a; CHANGED = #{|Δ| > ε}; ⟨a, b⟩ is no row
                                                partial: derived from the norms, or summed on the exact path)
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


# complex128's real view is float64 (complex tensors are measured as their real view)
_WIDE = {torch.float64, torch.complex128, torch.int64, torch.int32} | {
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
    """Per-row partials of Δ = b − a. ``work`` and ``delta`` are [k, L] scratch. ⟨a, b⟩ is
    not summed here: it is derived from the norms, and the few pairs where that is
    ill-conditioned (figures.by_norms) are read again on the exact path, which sums it
    directly (two more passes over every block cost 13-15 %)."""
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
    """Merged statistics of one side of one tensor (finite values only).

    ``m2`` is in units of ``scale``², ``sum_abs`` in units of ``abs_scale``: powers of
    two, 1 unless the exact path scaled float64 values whose squares would leave float64
    (beyond about 1e144, or below 1e-144), so std and rms stay finite and exact.
    """

    count: int
    mean: float
    m2: float
    min: float
    max: float
    sum_abs: float
    zero_count: int
    nan_count: int = 0
    inf_count: int = 0
    scale: float = 1.0
    abs_scale: float = 1.0

    @property
    def std(self) -> float:
        return self.scale * math.sqrt(self.m2 / self.count) if self.count else math.nan

    @property
    def rms(self) -> float:
        """sqrt(Σx²/m) = sqrt(std² + mean²), within [|mean|, max |x|] (rounding kept in)."""
        if not self.count:
            return math.nan
        if self.scale == 1.0:
            rms = math.sqrt((self.m2 + self.count * self.mean * self.mean) / self.count)
        else:
            rms = math.hypot(self.std, self.mean)  # without squaring: no overflow
        return min(max(rms, abs(self.mean)), self._abs_max)

    @property
    def mean_abs(self) -> float:
        """Σ|x|/m, within the range of |x| (a constant's is its |value| exactly)."""
        if not self.count:
            return math.nan
        mean_abs = self.abs_scale * (self.sum_abs / self.count)
        lowest = 0.0 if self.min <= 0 <= self.max else min(abs(self.min), abs(self.max))
        return min(max(mean_abs, lowest), self._abs_max)

    @property
    def _abs_max(self) -> float:
        return max(abs(self.min), abs(self.max))


@dataclass(slots=True)
class PairTotals:
    """Difference totals of one pair. ``dsq`` is in units of ``scale``², ``dsum_abs`` of
    ``scale``, ``sumsq_old`` of ``scale_old``², ``sumsq_new`` of ``scale_new``² and ``dot``
    (⟨A,B⟩; NaN where not measured) of ``scale_old · scale_new`` (see SideTotals)."""

    count: int
    dsq: float
    dmax: float
    dsum_abs: float
    changed: int
    sumsq_old: float
    sumsq_new: float
    dot: float = math.nan
    scale: float = 1.0
    scale_old: float = 1.0
    scale_new: float = 1.0


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
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
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


# Float64 values beyond these magnitudes are scaled by a power of two on the exact path
# (exact: the scaled figures have the same bits), so their squares and sums of 2^64 of
# them neither overflow (|x| > 2^511 ≈ 7e153 squares to inf) nor underflow.
_SCALE_ABOVE, _SCALE_BELOW = 2.0**480, 2.0**-480


def _scale_of(largest: float) -> float:
    """1, or the power of two just above ``largest`` when its square would leave float64."""
    if not math.isfinite(largest) or _SCALE_BELOW <= largest <= _SCALE_ABOVE or largest == 0:
        return 1.0
    return math.ldexp(1.0, math.frexp(largest)[1])


def exact_side(x: torch.Tensor) -> SideTotals:
    """Float64 statistics of one tensor with NaN/Inf masked out (the reference path)."""
    x = _as_float64(x)
    nan = torch.isnan(x)
    inf = torch.isinf(x)
    finite = x[~(nan | inf)]
    count = finite.numel()
    if count == 0:
        return SideTotals(0, math.nan, 0.0, math.nan, math.nan, 0.0, 0, int(nan.sum()), int(inf.sum()))
    lo, hi = float(finite.min()), float(finite.max())
    zero_count = int((finite == 0).sum())
    abs_scale = _scale_of(max(abs(lo), abs(hi)))
    mean = float((finite / abs_scale).mean()) * abs_scale if abs_scale != 1.0 else float(finite.mean())
    mean = min(max(mean, lo), hi)  # a constant's mean is its value, exactly
    dev = finite - mean  # ±inf only where the deviation itself exceeds float64
    scale = _scale_of(float(dev.abs().max()))
    if scale != 1.0:
        dev = dev / scale
    return SideTotals(
        count=count,
        mean=mean,
        m2=float((dev * dev).sum()),
        min=lo,
        max=hi,
        sum_abs=float((finite.abs() / abs_scale).sum()) if abs_scale != 1.0 else float(finite.abs().sum()),
        zero_count=zero_count,
        nan_count=int(nan.sum()),
        inf_count=int(inf.sum()),
        scale=scale,
        abs_scale=abs_scale,
    )


def exact_pair(a: torch.Tensor, b: torch.Tensor, epsilon: float) -> PairTotals:
    """Float64 difference metrics over the positions where both sides are finite."""
    a = _as_float64(a)
    b = _as_float64(b)
    both = torch.isfinite(a) & torch.isfinite(b)
    a, b = a[both], b[both]
    delta = (b - a).abs()  # +inf only where |Δ| itself exceeds float64
    dmax = float(delta.max()) if delta.numel() else 0.0
    scale, scale_old, scale_new = (_scale_of(float(v.abs().max())) if v.numel() else 1.0 for v in (delta, a, b))
    changed = int((delta > epsilon).sum())
    if scale != 1.0:
        delta = delta / scale
    if scale_old != 1.0:
        a = a / scale_old
    if scale_new != 1.0:
        b = b / scale_new
    return PairTotals(
        count=a.numel(),
        dsq=float((delta * delta).sum()),
        dmax=dmax,
        dsum_abs=float(delta.sum()),
        changed=changed,
        sumsq_old=float((a * a).sum()),
        sumsq_new=float((b * b).sum()),
        dot=float((a * b).sum()),
        scale=scale,
        scale_old=scale_old,
        scale_new=scale_new,
    )


def _as_float64(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1)
    if x.is_complex():
        x = torch.view_as_real(x).reshape(-1)
    return x.to(torch.float64)
