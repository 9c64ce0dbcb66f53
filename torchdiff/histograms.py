"""Value histograms (and spectra) of the most-changed tensors, for ``--report`` and
``--plots`` (docs/REPORT.md, "Histograms").

Which tensors: the top ``k`` changed tensors (status changed or retyped), ranked as
``--sort-by-change-magnitude`` ranks them: rel_l2 largest first (∞ first), ties by
name. In inspect mode (one checkpoint) the ``k`` largest floating-point tensors by
element count, ties by name. Only known once the engine's figures are, so the hooks
run in a second, small engine run over those ``k`` pairs after the main pass
(``add_pictures``): the main figures read every file once, the ``k`` chosen tensors
are read once more (from the page cache in practice).

Bins (fixed, ``BINS`` = 64 by default), with ranges taken from the main figures:

- old and new values share one range [min(min_old, min_new), max(max_old, max_new)]
  (finite values only), so the two histograms overlay bin for bin;
- Δ = new − old (in the compute dtype, as the engine forms it) uses [−max|Δ|, +max|Δ|]
  (``max_abs``), symmetric about 0;
- edges = ``numpy.linspace(lo, hi, bins + 1)`` in float64; bin i holds
  e_i ≤ x < e_{i+1}, the last bin also holds x = hi: NumPy's ``histogram`` rule,
  computed in float64 so that the counts equal ``numpy.histogram``'s exactly;
  a range of zero width becomes [lo − 0.5, lo + 0.5] (NumPy's rule too);
- non-finite values are left out (Δ: positions where either side is non-finite);
  ``left_out`` counts them.

Cost: the ``k`` tensors' values once more, in chunks of ``CHUNK`` elements in float64
(memory ≈ 3 × 8 × CHUNK bytes beyond the tensors themselves).
"""

from __future__ import annotations

import heapq
import math
from typing import Any, Sequence

import numpy as np
import torch

from torchdiff.errors import UsageError
from torchdiff.names import is_float_storage

BINS = 64
TOP_K = 12
CHUNK = 1 << 22


def validate(value: Any, option: str) -> int:
    """A count option (``histograms=k``, ``spectra=K``): a whole number ≥ 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UsageError(f"{option} must be a whole number ≥ 0, got {value!r}")
    return value


def rank_keys(fig, rows: Sequence[int], *, inspect: bool = False) -> list[tuple | None]:
    """The ranking key of each of ``rows`` (smaller first) among the tensors that may get
    pictures, None for the others (see the module doc): compare, ``change_keys`` of the
    tensors with compared elements; inspect, (−numel, name) of the floating-point ones."""
    rows = list(rows)
    if inspect:
        present, numel, dtype = fig.new.present, fig.new.numel, fig.new.dtype
        return [(-int(numel[i]), fig.names[i]) if present[i] and numel[i] > 0 and _is_float(dtype[i]) else None
                for i in rows]
    from torchdiff.analyses.sort_by_change_magnitude import change_keys

    count = fig.count
    return [key if key is not None and count[i] > 0 else None for key, i in zip(change_keys(fig, rows), rows)]


def top_changed(diffs, k: int, *, ndim: int | None = None, inspect: bool = False) -> list[str]:
    """Names of the ``k`` most-changed tensors (see the module doc) of a Figures table
    (or a sequence of TensorDiff); ``ndim``: only tensors of at least that many
    dimensions. From the columns: no TensorDiff is made for a table."""
    if k <= 0:
        return []
    from torchdiff.figures import Figures

    fig = diffs if isinstance(diffs, Figures) else Figures.from_diffs(diffs)
    rows = range(len(fig))
    if ndim is not None:
        shapes = fig.new.shape if inspect else fig.old.shape
        rows = [i for i in rows if shapes[i] is not None and len(shapes[i]) >= ndim]
    keyed = [(key, i) for key, i in zip(rank_keys(fig, rows, inspect=inspect), rows) if key is not None]
    return [fig.names[i] for _, i in heapq.nsmallest(k, keyed)]


def _is_float(dtype: str) -> bool:
    return is_float_storage(dtype)


def histogram(values: torch.Tensor, lo: float, hi: float, bins: int = BINS) -> tuple[list[int], int]:
    """Counts of the finite ``values`` in ``bins`` equal bins over [lo, hi] (NumPy's rule,
    float64), values outside the range left out; returns (counts, number left out)."""
    lo, hi = float(lo), float(hi)
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    device = values.device
    edges = torch.from_numpy(np.linspace(lo, hi, bins + 1)).to(device)  # NumPy's edges, bit for bit
    norm = bins / (hi - lo)
    counts = torch.zeros(bins, dtype=torch.int64, device=device)
    flat = values.reshape(-1)
    left_out = 0
    for start in range(0, flat.numel(), CHUNK):
        x = flat[start:start + CHUNK].to(torch.float64)
        keep = (x >= lo) & (x <= hi)  # False for NaN
        left_out += int(x.numel() - int(keep.sum()))
        x = x[keep]
        counts += _bin(x, lo, norm, edges, bins)
    return counts.tolist(), left_out


def _bin(x: torch.Tensor, lo: float, norm: float, edges: torch.Tensor, bins: int) -> torch.Tensor:
    """numpy.histogram's uniform-bin path: floor((x − lo)·norm), then corrected against
    the float64 edges so that e_i ≤ x < e_{i+1}."""
    idx = ((x - lo) * norm).floor().to(torch.int64)
    idx[idx == bins] -= 1
    idx.clamp_(0, bins - 1)
    idx -= (x < edges[idx]).to(torch.int64)
    idx += ((x >= edges[idx + 1]) & (idx != bins - 1)).to(torch.int64)
    return torch.bincount(idx, minlength=bins)


class HistogramHook:
    """An engine Hook: histograms of old, new and Δ for the named tensors.

    ``ranges`` maps a tensor name to ``(lo, hi, max_abs)``: the value range of both
    sides and max|Δ| (from the main figures).
    """

    name = "histogram"

    def __init__(self, ranges: dict[str, tuple[float, float, float]], bins: int = BINS):
        self.ranges = ranges
        self.bins = bins

    def wants(self, pair) -> bool:
        return pair.name in self.ranges

    def __call__(self, pair, old: torch.Tensor | None, new: torch.Tensor | None) -> dict[str, Any]:
        lo, hi, dmax = self.ranges[pair.name]
        out: dict[str, Any] = {"bins": self.bins, "range": [lo, hi]}
        for side, t in (("old", old), ("new", new)):
            if t is not None:
                out[side], out[f"{side}_left_out"] = histogram(t, lo, hi, self.bins)
        if old is not None and new is not None and old.shape == new.shape:
            out["delta_range"] = [-dmax, dmax]
            counts = torch.zeros(self.bins, dtype=torch.int64, device=old.device)
            a, b = old.reshape(-1), new.reshape(-1)
            left_out = 0
            for start in range(0, a.numel(), CHUNK):
                delta = b[start:start + CHUNK] - a[start:start + CHUNK]  # in the compute dtype, as max|Δ| was
                c, n = histogram(delta, -dmax, dmax, self.bins)
                counts += torch.tensor(c, dtype=torch.int64, device=old.device)
                left_out += n
            out["delta"], out["delta_left_out"] = counts.tolist(), left_out
        return out


def _ranges(fig, i: int) -> tuple[float, float, float] | None:
    """Row ``i``'s histogram ranges from the columns: (lo, hi) over the finite values of
    the sides that hold any, and max|Δ| (0 when not measured or not finite)."""
    sides = [side for side in (fig.old, fig.new)
             if side.present[i] and side.numel[i] > 0
             and side.values(np.array([i]))[0] - side.nan_count[i] - side.inf_count[i] > 0]
    if not sides:
        return None
    lo = min(float(side.min[i]) for side in sides)
    hi = max(float(side.max[i]) for side in sides)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return None
    dmax = float(fig.max_abs[i]) if fig.measured[i] else 0.0
    return lo, hi, dmax if math.isfinite(dmax) else 0.0


def add_pictures(engine, pairs: Sequence, figures, *, histograms: int = 0, spectra: int = 0,
                 inspect: bool = False, bins: int = BINS):
    """Add ``extras["histogram"]`` for the top ``histograms`` tensors and
    ``extras["spectrum"]`` for the top ``spectra`` changed matrices (torchdiff.spectra) to
    ``figures`` (the engine's Figures of ``pairs``), measured by one engine run over
    those pairs (see the module doc); returns ``figures``. Chosen from the columns: no
    TensorDiff view is made (a view made here would outlive the status inspect sets
    afterwards)."""
    hooks: list[Any] = []
    chosen: set[str] = set()
    if histograms:
        ranges = {}
        for name in top_changed(figures, histograms, inspect=inspect):
            r = _ranges(figures, figures.index(name))
            if r is not None:
                ranges[name] = r
        if ranges:
            hooks.append(HistogramHook(ranges, bins))
            chosen |= set(ranges)
    if spectra and not inspect:
        from torchdiff.spectra import SpectrumHook

        names = top_changed(figures, spectra, ndim=2)
        if names:
            hooks.append(SpectrumHook(set(names)))
            chosen |= set(names)
    if not hooks:
        return figures
    index = {p.name: i for i, p in enumerate(pairs)}
    selected = [pairs[index[n]] for n in sorted(chosen, key=index.__getitem__)]
    extra = engine.run(selected, hooks=hooks)
    for j, p in enumerate(selected):
        found = extra.extras.get(j)
        if found:
            i = index[p.name]
            figures.set_extras(i, found)
    return figures
