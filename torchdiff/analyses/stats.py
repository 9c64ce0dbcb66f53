"""--stats: per-side statistics of each changed tensor, in the tensor lines.

The figures are the engine's (docs/METRICS.md); this analysis adds no section of its
own, it switches the text form of tensor lines to ``mean=a->b, std=c->d`` (plus
min/max where they changed).
"""

from __future__ import annotations

NAME = "stats"
FLAG = "stats"
OPTIONS: dict = {}


def analyze(comparison, options, state: dict):
    return None
