"""--show-layer-impact: which layers moved most, with their share of the update and rotation.

Tensors are grouped into layers by torchdiff.names.layer_of (numbered blocks such as
``h.3``, ``layers.12``, ``encoder.layer.5``, ``blk.7``, else the module prefix;
``--layer-pattern REGEX`` overrides). For a layer g, over its tensors k of equal shape
on both sides (docs/analyses/layer_impact.md):

- ‖Δ_g‖ = sqrt(Σ_k ‖Δ_k‖²), ‖A_g‖ = sqrt(Σ_k ‖A_k‖²), ‖B_g‖ likewise;
- rel_l2_g = ‖Δ_g‖ / ‖A_g‖ (∞ when ‖A_g‖ = 0 < ‖Δ_g‖);
- share_g = ‖Δ_g‖² / Σ_all ‖Δ_k‖² (the layers' shares sum to 1);
- rotation_g = 1 − cos(A_g, B_g) = 1 − Σ_k⟨A_k,B_k⟩ / (‖A_g‖‖B_g‖), evaluated as
  (‖Δ_g‖² − (‖A_g‖ − ‖B_g‖)²) / (2‖A_g‖‖B_g‖), the same value without cancellation;
- rank: by ‖Δ_g‖, largest first, ties by layer name; params count every tensor of the layer.

The layers hold the tensors in ``--scope`` (trainable parameters by default: buffers,
counters and optimizer state are left out, so Adam's step counters cannot top the
table); a tied weight (``lm_head.weight`` sharing ``wte.weight``'s values) counts once,
in the layer of the tensor it is tied to. The sums cover the rows of
torchdiff.figures.summary_mask (float pairs of equal shape, dequantized codes), the rows
of the global figures. The figures come from torchdiff.figures.layer_groups (GroupSums,
the one aggregation).

Rows are in natural layer order (``layers.2`` before ``layers.10``); the bar draws the
share, 20 characters = 100 %. JSON and YAML carry the same rows under ``layers``.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from torchdiff.figures import layer_groups, tied_copies
from torchdiff.names import compile_pattern
from torchdiff.results import AnalysisResult, Table
from torchdiff.units import count

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


def analyze(comparison, options, state: dict) -> AnalysisResult | None:
    if comparison.mode == "inspect":
        return None  # one checkpoint: nothing moved
    fig = comparison.figures
    in_scope = fig.in_scope(comparison.scope)
    groups = layer_groups(fig, comparison.scope, comparison.layer)
    total = sum(g.dsq for g in groups.values())
    ranked = sorted(groups, key=lambda n: (-groups[n].dsq, natural_key(n)))
    rank = {name: i + 1 for i, name in enumerate(ranked)}
    headers = ("layer", "tensors", "params", "l2", "rel_l2", "share", "rotation", "rank", "bar")
    rows = []
    for name in sorted(groups, key=natural_key):
        g = groups[name]
        rows.append((name, g.tensors, g.params, g.l2, g.rel_l2, g.share, g.rotation, rank[name], bar(g.share)))
    top = ranked[0] if ranked else None
    headline = {
        "top_layer": top if top is not None and total > 0 else "none",
        "top_share": groups[top].share if top is not None and total > 0 else 0.0,
        "l2": math.sqrt(total),
    }
    notes = []
    unmeasured = [(n, groups[n].tensors - groups[n].measured) for n in sorted(groups, key=natural_key)
                  if groups[n].tensors > groups[n].measured]
    if unmeasured:
        listed = ", ".join(f"{n} ({count(k)})" for n, k in unmeasured)
        notes.append(f"added, removed or reshaped tensors count in params, not in the figures: {listed}")
    copies = [(fig.names[i], fig.extras[i]["tied_to"]["new"]) for i in np.flatnonzero(tied_copies(fig) & in_scope)]
    if copies:
        listed = ", ".join(f"{a} -> {b}" for a, b in copies[:5]) + (f" (+{len(copies) - 5} more)"
                                                                     if len(copies) > 5 else "")
        notes.append(f"tied weights count once, in the layer of the tensor they are tied to: {listed}")
    left = len(fig) - int(in_scope.sum())
    if left:
        notes.append(f"scope {comparison.scope}: {count(left)} tensor(s) of other roles (buffers, counters, optimizer "
                     "state) not in the figures; --scope all includes them")
    if total == 0:
        notes.append("no tensor changed: every share is 0")
    notes.append(f"share = ‖Δ_layer‖² / Σ‖Δ‖²; rotation = 1 − cos(old, new); bar: share, {BAR_WIDTH} characters = 100 %")
    data = {"ranking": ranked, "layer_pattern": options.get("layer_pattern"), "scope": comparison.scope}
    return AnalysisResult(NAME, headline, data, tables=(Table("Layers", headers, tuple(rows)),), notes=tuple(notes))
