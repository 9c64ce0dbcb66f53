"""--show-layer-impact: which layers moved most, with their share of the update and rotation.

Tensors are grouped into layers by torchdiff.layers.layer_of (numbered blocks such as
``h.3``, ``layers.12``, ``encoder.layer.5``, ``blk.7``, else the module prefix;
``--layer-pattern REGEX`` overrides). For a layer g, over its tensors k of equal shape
on both sides (docs/analyses/layer_impact.md):

- ‖Δ_g‖ = sqrt(Σ_k ‖Δ_k‖²), ‖A_g‖ = sqrt(Σ_k ‖A_k‖²), ‖B_g‖ likewise;
- rel_l2_g = ‖Δ_g‖ / ‖A_g‖ (∞ when ‖A_g‖ = 0 < ‖Δ_g‖);
- share_g = ‖Δ_g‖² / Σ_all ‖Δ_k‖² (the layers' shares sum to 1);
- rotation_g = 1 − cos(A_g, B_g) = 1 − Σ_k⟨A_k,B_k⟩ / (‖A_g‖‖B_g‖), evaluated as
  (‖Δ_g‖² − (‖A_g‖ − ‖B_g‖)²) / (2‖A_g‖‖B_g‖), the same value without cancellation;
- rank: by ‖Δ_g‖, largest first, ties by layer name; params count every tensor of the layer.

Rows are in natural layer order (``layers.2`` before ``layers.10``); the bar draws the
share, 20 characters = 100 %. JSON and YAML carry the same rows under ``layers``.
"""

from __future__ import annotations

import math
import re
from typing import Any

from torchdiff.layers import compile_pattern, layer_of
from torchdiff.results import AnalysisResult, Table

NAME = "layer_impact"
FLAG = "show_layer_impact"
OPTIONS: dict[str, tuple[Any, str]] = {
    "layer_pattern": (None, "with --show-layer-impact: REGEX naming a tensor's layer (its first match, or group 1)"),
}

BAR_WIDTH = 20
_EIGHTHS = "▏▎▍▌▋▊▉"


def validate(options) -> None:
    compile_pattern(options.get("layer_pattern"))


def bar(share: float, width: int = BAR_WIDTH) -> str:
    """A horizontal bar of ``share`` (0..1), ``width`` characters for 1, in eighths."""
    if not share > 0:
        return ""
    eighths = round(min(share, 1.0) * width * 8)
    full, rest = divmod(eighths, 8)
    return "█" * full + (_EIGHTHS[rest - 1] if rest else "")


def natural_key(name: str) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name) if p)


def rotation(dsq: float, asq: float, bsq: float) -> float:
    """1 − cos(A, B) from ‖Δ‖², ‖A‖², ‖B‖² (NaN when a side is all zero)."""
    a, b = math.sqrt(asq), math.sqrt(bsq)
    if a == 0 or b == 0:
        return 0.0 if a == b else math.nan
    return min(2.0, max(0.0, (dsq - (a - b) ** 2) / (2 * a * b)))


def analyze(comparison, options) -> AnalysisResult | None:
    if comparison.mode == "inspect":
        return None  # one checkpoint: nothing moved
    pattern = compile_pattern(options.get("layer_pattern"))
    groups: dict[str, dict[str, float]] = {}
    for d in comparison.diffs:
        g = groups.setdefault(layer_of(d.name, pattern),
                              {"tensors": 0, "params": 0, "dsq": 0.0, "asq": 0.0, "bsq": 0.0, "unmeasured": 0})
        g["tensors"] += 1
        g["params"] += d.params
        m = d.metrics
        if m is None:
            g["unmeasured"] += 1
            continue
        g["dsq"] += m.l2**2
        g["asq"] += m.norm_old**2
        g["bsq"] += m.norm_new**2
    total = sum(g["dsq"] for g in groups.values())
    ranked = sorted(groups, key=lambda n: (-groups[n]["dsq"], natural_key(n)))
    rank = {name: i + 1 for i, name in enumerate(ranked)}
    headers = ("layer", "tensors", "params", "l2", "rel_l2", "share", "rotation", "rank", "bar")
    rows = []
    for name in sorted(groups, key=natural_key):
        g = groups[name]
        l2 = math.sqrt(g["dsq"])
        norm_old = math.sqrt(g["asq"])
        rel = l2 / norm_old if norm_old > 0 else (math.inf if l2 > 0 else 0.0)
        share = g["dsq"] / total if total > 0 else 0.0
        rows.append((name, int(g["tensors"]), int(g["params"]), l2, rel, share,
                     rotation(g["dsq"], g["asq"], g["bsq"]), rank[name], bar(share)))
    top = ranked[0] if ranked else None
    headline = {
        "top_layer": top if top is not None and total > 0 else "none",
        "top_share": groups[top]["dsq"] / total if top is not None and total > 0 else 0.0,
        "l2": math.sqrt(total),
    }
    notes = []
    unmeasured = [(n, int(groups[n]["unmeasured"])) for n in sorted(groups, key=natural_key) if groups[n]["unmeasured"]]
    if unmeasured:
        listed = ", ".join(f"{n} ({k})" for n, k in unmeasured)
        notes.append(f"added, removed or reshaped tensors count in params, not in the figures: {listed}")
    if total == 0:
        notes.append("no tensor changed: every share is 0")
    notes.append(f"share = ‖Δ_layer‖² / Σ‖Δ‖²; rotation = 1 − cos(old, new); bar: share, {BAR_WIDTH} characters = 100 %")
    data = {"ranking": ranked, "layer_pattern": options.get("layer_pattern")}
    return AnalysisResult(NAME, headline, data, tables=(Table("Layers", headers, tuple(rows)),), notes=tuple(notes))
