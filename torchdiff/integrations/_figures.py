"""What the tracker adapters log (tensorboard.py, wandb.py; docs/REPORT.md, "Trackers").

- scalars: ``report.scalars()`` (counts, global l2 / rel_l2 / cosine, per changed tensor
  ``torchdiff/rel_l2/<tensor>``, the analyses' numeric headline figures), plus per layer
  ``torchdiff/layer/<layer>/{l2,rel_l2,cosine}`` from ``report.records("layer")``; only
  finite values (a tracker would store ∞ as the largest double, or refuse it);
- histograms, for each tensor the report holds histograms of (``compare(...,
  histograms=k)``, ``--report``, or a monitor built with ``histograms=k``):
  ``torchdiff/update/<tensor>`` = the counts of Δ over [−max|Δ|, max|Δ|] and
  ``torchdiff/values/<tensor>`` = the counts of the new values, with the bins of
  torchdiff.histograms (no second binning).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Histogram:
    """One histogram to log: counts over ``edges`` (len(counts) + 1 edges), plus the
    moments TensorBoard's raw histograms carry."""

    tag: str
    counts: list[int]
    edges: list[float]
    num: int
    sum: float
    sum_squares: float

    @property
    def min(self) -> float:
        """Left edge of the first non-empty bin."""
        first = next((i for i, c in enumerate(self.counts) if c), 0)
        return self.edges[first]

    @property
    def max(self) -> float:
        """Right edge of the last non-empty bin."""
        last = max((i for i, c in enumerate(self.counts) if c), default=len(self.counts) - 1)
        return self.edges[last + 1]


def scalars(report, tensors: bool = True, layers: bool = True) -> dict[str, float]:
    out = {}
    for key, value in report.scalars().items():
        if not tensors and key.startswith("torchdiff/rel_l2/"):
            continue
        out[key] = float(value)
    if layers and getattr(report, "comparison", None) is not None and report.comparison.mode != "inspect":
        for row in report.records("layer"):
            for key in ("l2", "rel_l2", "cosine"):
                out[f"torchdiff/layer/{row['layer']}/{key}"] = row[key]
    return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(float(v))}


def _edges(lo: float, hi: float, bins: int) -> list[float]:
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, bins + 1).tolist()


def histograms(report) -> list[Histogram]:
    out = []
    for d in report:
        h = d.extras.get("histogram")
        if not h:
            continue
        if "delta" in h and d.metrics is not None:
            n_old = d.old.finite_count if d.old is not None else 0
            n_new = d.new.finite_count if d.new is not None else 0
            total = d.new.mean * n_new - d.old.mean * n_old if n_old and n_new else 0.0
            out.append(Histogram(f"torchdiff/update/{d.name}", h["delta"], _edges(*h["delta_range"], h["bins"]),
                                 sum(h["delta"]), float(total), d.metrics.l2 ** 2))
        side = d.new if "new" in h else d.old
        key = "new" if "new" in h else "old"
        if key in h and side is not None:
            n = side.finite_count
            out.append(Histogram(f"torchdiff/values/{d.name}", h[key], _edges(*h["range"], h["bins"]), sum(h[key]),
                                 side.mean * n if n else 0.0, side.rms ** 2 * n if n else 0.0))
    return out


def table(report) -> tuple[list[str], list[list[Any]]]:
    """Per-tensor rows (the CLI's figures) for a tracker table; non-finite figures as None."""
    columns = ["name", "layer", "status", "params", "l2", "rel_l2", "cosine", "max_abs", "changed_fraction"]
    rows = []
    for rec in report.records():
        row = []
        for c in columns:
            v = rec.get(c)
            if isinstance(v, float) and not math.isfinite(v):
                v = None
            row.append(v)
        rows.append(row)
    return columns, rows
