"""Singular values of Δ for the top-K changed matrices (``--spectra K``; docs/REPORT.md,
"Spectra").

A tensor of two or more dimensions is read as the matrix Δ = (new − old) reshaped to
[shape[0], rest] (a conv kernel [out, in, kh, kw] becomes [out, in·kh·kw]); Δ is formed
in the compute dtype, as the engine forms it. With k = min(m, n):

- k ≤ ``EXACT_MAX_DIM``: every singular value, ``torch.linalg.svdvals`` in float64
  (cost O(m·n·k));
- else the top ``SKETCH`` values from a randomized SVD, ``torch.svd_lowrank(Δ, q=SKETCH,
  niter=POWER_ITERATIONS)`` in the compute dtype (Halko, Martinsson & Tropp 2011; cost
  ≈ (2 + 2·niter) products of m·n·SKETCH). Its values are at most the true ones.

Figures, with E = ‖Δ‖_F² (exact, from Δ) and σ₁ ≥ σ₂ ≥ … the values found:

- ``energy[r]`` = Σ_{i ≤ r} σ_i² / E, the energy captured by rank r, for r in ``RANKS``
  up to the number of values found;
- ``rank90`` / ``rank99``: the fewest values holding 90 % / 99 % of E (None when the
  values found hold less: the rank is above ``SKETCH``);
- ``effective_rank`` = exp(−Σ p_i ln p_i), p_i = σ_i / Σσ (Roy & Vetterli 2007), over the
  values found (exact only when ``method`` is ``exact``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

EXACT_MAX_DIM = 512
SKETCH = 64
POWER_ITERATIONS = 2
RANKS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
KEEP_VALUES = 128  # singular values stored for the chart


def spectrum(delta: torch.Tensor) -> dict[str, Any] | None:
    """The figures above for one Δ (None when Δ = 0)."""
    m = delta.reshape(delta.shape[0], -1)
    energy_total = float(torch.linalg.vector_norm(m.to(torch.float64)) ** 2)
    out: dict[str, Any] = {"shape": list(m.shape)}
    if not math.isfinite(energy_total):
        return {**out, "method": "skipped: non-finite values"}
    if energy_total == 0:
        return None
    k = min(m.shape)
    if k <= EXACT_MAX_DIM:
        s = torch.linalg.svdvals(m.to(torch.float64))
        method = "exact"
    else:
        devices = [m.device] if m.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # seeded, leaving the caller's RNG as it was
            torch.manual_seed(0)
            _, s, _ = torch.svd_lowrank(m, q=SKETCH, niter=POWER_ITERATIONS)
        s = s.to(torch.float64)
        method = "randomized"
    s = s.cpu()
    s2 = s * s
    captured = torch.cumsum(s2, 0) / energy_total
    values = s.tolist()
    cap = captured.tolist()

    def rank_at(level: float) -> int | None:
        for i, c in enumerate(cap):
            if c >= level:
                return i + 1
        return None

    p = s / s.sum()
    p = p[p > 0]
    effective = float(torch.exp(-(p * p.log()).sum()))
    return {
        **out,
        "method": method,
        "values_found": len(values),
        "energy_total": energy_total,
        "singular_values": values[:KEEP_VALUES],
        "energy": {str(r): min(cap[r - 1], 1.0) for r in RANKS if r <= len(cap)},
        "rank90": rank_at(0.90),
        "rank99": rank_at(0.99),
        "effective_rank": effective,
    }


class SpectrumHook:
    """An engine Hook: ``spectrum(new − old)`` for the named pairs."""

    name = "spectrum"

    def __init__(self, names: set[str]):
        self.names = names

    def wants(self, pair) -> bool:
        return pair.name in self.names and pair.kind == "common"

    def __call__(self, pair, old: torch.Tensor | None, new: torch.Tensor | None) -> dict[str, Any] | None:
        if old is None or new is None or old.ndim < 2:
            return None
        return spectrum(new - old)
