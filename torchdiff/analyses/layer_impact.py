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
counters, optimizer state and training state such as a saved RNG state or
``best_val_loss`` are left out, so Adam's step counters cannot top the table, and a note
counts them per role); a tied weight (``lm_head.weight`` sharing ``wte.weight``'s values) counts once,
in the layer of the tensor it is tied to. The sums cover the rows of
torchdiff.figures.summary_mask (float pairs of equal shape, dequantized codes), the rows
of the global figures. The figures come from torchdiff.figures.layer_groups (GroupSums,
the one aggregation). A layer's tensors outside those rows count in ``tensors`` and
``params`` only, and a note says why, per reason: added, removed, reshaped, or not
floating point (integer/bool values such as ``num_batches_tracked``). When every share
is 0, the note says whether nothing changed or ‖Δ‖ = 0 over the positions finite on both
sides while tensors differ (NaN/Inf counts, such as ``nan 0->64``, or their status).

Rows are in natural layer order (``layers.2`` before ``layers.10``); the bar draws the
share, 20 characters = 100 %. JSON and YAML carry the same rows under ``layers``.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from torchdiff.figures import layer_groups, layer_members, summary_mask, tied_copies
from torchdiff.names import ROLES, compile_pattern, is_float_storage
from torchdiff.results import AnalysisResult, Table
from torchdiff.status import ADDED, REMOVED, RESHAPED, UNCHANGED
from torchdiff.units import count, counted

NAME = "layer_impact"
FLAG = "show_layer_impact"
OPTIONS: dict[str, tuple[Any, str]] = {
    "layer_pattern": (None, "with --show-layer-impact: REGEX naming a tensor's layer (its first match, or group 1)"),
}

BAR_WIDTH = 20
_EIGHTHS = "▏▎▍▌▋▊▉"
#: Why a tensor of a layer has no Δ in the figures, in the order the note lists them.
NOT_FLOAT = "not floating point (integer/bool values)"
NOT_MEASURED = "not measured"
UNMEASURED_REASONS = (ADDED, REMOVED, RESHAPED, NOT_FLOAT, NOT_MEASURED)
_LISTED = 5  # names per list in a note


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


def _listed(items: list[str]) -> str:
    return ", ".join(items[:_LISTED]) + (f" (+{count(len(items) - _LISTED)} more)" if len(items) > _LISTED else "")


def unmeasured_reason(fig, i: int) -> str:
    """Why row ``i`` (a member of its layer) adds nothing to the figures: ``added``,
    ``removed``, ``reshaped`` (no Δ between the sides), ``not floating point`` (integer or
    bool values on a side, e.g. BatchNorm's ``num_batches_tracked``: no Δ summed), else
    ``not measured``."""
    status = fig.status[i]
    if status in (ADDED, REMOVED, RESHAPED):
        return status
    if not (is_float_storage(fig.old.dtype[i]) and is_float_storage(fig.new.dtype[i])):
        return NOT_FLOAT
    return NOT_MEASURED


def unmeasured_note(fig, members: np.ndarray, summed: np.ndarray, layer) -> str | None:
    """The layer members outside the summed rows, per reason then per layer:
    ``added: layers.1 (1); not floating point (integer/bool values): bn1 (1)``."""
    by_reason: dict[str, dict[str, int]] = {}
    for i in np.flatnonzero(members & ~summed):
        layers = by_reason.setdefault(unmeasured_reason(fig, int(i)), {})
        name = layer(fig.names[i])
        layers[name] = layers.get(name, 0) + 1
    if not by_reason:
        return None
    parts = [f"{reason}: " + ", ".join(f"{n} ({count(k)})" for n, k in sorted(by_reason[reason].items(),
                                                                               key=lambda kv: natural_key(kv[0])))
             for reason in UNMEASURED_REASONS if reason in by_reason]
    return "counted in tensors and params, not in the figures: " + "; ".join(parts)


def no_change_note(fig, members: np.ndarray) -> str:
    """The note when every share is 0 (Σ‖Δ‖² = 0 over the summed rows).

    The figures cover the positions finite on both sides (docs/METRICS.md), so a tensor
    that gained NaN/Inf but kept its finite values has ‖Δ‖ = 0 and still changed; so has
    an added, removed, reshaped or retyped tensor. "No tensor changed" only when every
    member is unchanged; otherwise the note names the tensors whose NaN/Inf counts differ
    (``nan 0->64``) and those of any other status.
    """
    nonfinite, other = [], []
    for i in np.flatnonzero(members):
        both = fig.old.present[i] and fig.new.present[i]
        counts = [f"{label} {count(int(a[i]))}->{count(int(b[i]))}" for label, a, b in (
            ("nan", fig.old.nan_count, fig.new.nan_count), ("inf", fig.old.inf_count, fig.new.inf_count))
            if both and a[i] != b[i]]
        if counts:
            nonfinite.append(f"{fig.names[i]} ({', '.join(counts)})")
        elif fig.status[i] != UNCHANGED:
            other.append(f"{fig.names[i]} ({fig.status[i]})")
    if not nonfinite and not other:
        return "no tensor changed: every share is 0"
    text = "every share is 0: ‖Δ‖ = 0 over the positions finite on both sides, yet tensors differ"
    if nonfinite:
        text += f"; NaN/Inf counts changed: {_listed(nonfinite)}"
    if other:
        text += f"; otherwise: {_listed(other)}"
    return text


def analyze(comparison, options, state: dict) -> AnalysisResult:
    if comparison.mode == "inspect":  # one checkpoint: nothing moved, and the note says so
        return AnalysisResult(NAME, {}, {}, (), ("layer impact needs two checkpoints (torchdiff OLD NEW)",))
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
    members = layer_members(fig, comparison.scope)  # the layers' tensors (layer_groups)
    summed = fig.measured & summary_mask(fig, comparison.scope)  # the rows their figures sum
    unmeasured = unmeasured_note(fig, members, summed, comparison.layer)
    if unmeasured:
        notes.append(unmeasured)
    copies = [(fig.names[i], fig.extras[i]["tied_to"]["new"] or fig.extras[i]["tied_to"]["old"])
              for i in np.flatnonzero(tied_copies(fig) & in_scope)]
    if copies:
        listed = ", ".join(f"{a} -> {b}" for a, b in copies[:5]) + (f" (+{len(copies) - 5} more)"
                                                                     if len(copies) > 5 else "")
        notes.append(f"tied weights count once, in the layer of the tensor they are tied to: {listed}")
    left = [fig.role[i] for i in np.flatnonzero(~in_scope)]
    if left:
        by_role = ", ".join(f"{r.replace('_', ' ')} {count(left.count(r))}" for r in ROLES if r in left)
        notes.append(f"scope {comparison.scope}: {counted(len(left), 'tensor')} of other roles ({by_role}) not in the "
                     "figures; --scope all includes them")
    if total == 0:
        notes.append(no_change_note(fig, members))
    notes.append(f"share = ‖Δ_layer‖² / Σ‖Δ‖²; rotation = 1 − cos(old, new); bar: share, {BAR_WIDTH} characters = 100 %")
    data = {"ranking": ranked, "layer_pattern": options.get("layer_pattern"), "scope": comparison.scope}
    return AnalysisResult(NAME, headline, data, tables=(Table("Layers", headers, tuple(rows)),), notes=tuple(notes))
