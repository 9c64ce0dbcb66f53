"""Report -> one self-contained HTML file (``--report FILE.html``; docs/REPORT.md).

The page is three inline parts: a stylesheet, a JSON data payload
(``<script type="application/json" id="torchdiff-data">``, built by ``payload``) and a
small hand-written script (report.js beside this module) that draws every chart as
SVG from the payload. Nothing is fetched at view time: a Content-Security-Policy of
``default-src 'none'`` (the script allowed by its SHA-256 hash) makes any request
fail. Every number in the page is a number of the payload, and every number of the
payload is a number of ``report.to_dict()`` (the JSON output) or a group sum defined
in docs/REPORT.md, with the formula beside it. The payload is built from the columns of
the figures table (torchdiff.figures), never from a TensorDiff per tensor: 20,000
tensors make one page in a fraction of a second (docs/REPORT.md, "Size, speed").
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from torchdiff.figures import (GroupFigures, GroupSums, cosine_of, global_figures, layer_members, rel_of,
                               stored_nbytes, summary_mask, tied_copies, without_gc)
from torchdiff.names import layer_of, module_type
from torchdiff.render import finite_json
from torchdiff.status import ADDED, REMOVED, RESHAPED

SCHEMA = "torchdiff-report/1"
_HERE = Path(__file__).parent

#: Layers the layer charts and the heatmap draw at most: those of largest share of ‖Δ‖²
#: (20,000 one-tensor layers drew a chart 320,000 pixels tall); --show-layer-impact lists all.
LAYER_ROWS = 200


def _finite_or(value: float, default: float) -> float:
    return value if math.isfinite(value) else default


#: Module-type columns of the layer × module heatmap, in display order.
MODULE_TYPES = ("attn_q", "attn_k", "attn_v", "attn_qkv", "attn_o", "mlp_up", "mlp_gate", "mlp_gate_up",
                "mlp_down", "norm", "embedding", "head", "other")

#: Figure -> (formula, where it is defined). Shown beside the figure in the page.
FORMULAS: dict[str, tuple[str, str]] = {
    "l2": ("‖Δ‖ = ‖new − old‖", "docs/METRICS.md#per-pair"),
    "rel_l2": ("‖Δ‖ / ‖old‖", "docs/METRICS.md#per-pair"),
    "cosine": ("⟨old, new⟩ / (‖old‖ ‖new‖)", "docs/METRICS.md#per-pair"),
    "max_abs": ("max |Δ|", "docs/METRICS.md#per-pair"),
    "changed_fraction": ("#{|Δ| > ε} / numel", "docs/METRICS.md#per-pair"),
    "share": ("‖Δ_layer‖² / Σ‖Δ‖²", "docs/analyses/layer_impact.md"),
    "layer_rel_l2": ("‖Δ_g‖ / ‖old_g‖ over the tensors of the group", "docs/REPORT.md#group-figures"),
    "layer_cosine": ("Σ⟨old, new⟩ / (‖old_g‖ ‖new_g‖)", "docs/REPORT.md#group-figures"),
    "layer_changed_fraction": ("Σ #{|Δ| > ε} / Σ numel", "docs/REPORT.md#group-figures"),
    "sqnr_db": ("20 · log10(‖old‖ / ‖Δ‖)", "docs/analyses/quantization_analysis.md"),
    "global_rel_l2": ("sqrt(Σ‖Δ‖²) / sqrt(Σ‖old‖²)", "docs/METRICS.md"),
    "global_cosine": ("Σ⟨old, new⟩ / sqrt(Σ‖old‖² · Σ‖new‖²)", "docs/METRICS.md"),
    "update_norm": ("u_t = ‖θ_{t+1} − θ_t‖", "docs/analyses/convergence_analysis.md"),
    "rel_update": ("r_t = u_t / ‖θ_t‖", "docs/analyses/convergence_analysis.md"),
    "similarity": ("cos(θ_i, θ_j)", "docs/analyses/similarity_matrix.md"),
    "task_cosine": ("cos(τ_i, τ_j), τ_i = θ_i − θ_base", "docs/analyses/similarity_matrix.md"),
    "histogram": ("64 fixed bins over [min, max] of both sides; Δ over [−max|Δ|, max|Δ|]",
                  "docs/REPORT.md#histograms"),
    "spectrum": ("singular values of Δ reshaped to [rows, rest]", "docs/REPORT.md#spectra"),
}


# ---- the payload --------------------------------------------------------------------------------

#: Tensors the Quantization section's "SQNR per tensor" bars show (report.js: the lowest
#: finite SQNR first, 60 of them); the payload carries those only: every tensor's SQNR
#: is in the tensor table's sqnr_db column.
QUANT_TENSORS_SHOWN = 60

#: Payload keys whose values come JSON-safe from the columns (non-finite floats already
#: strings): ``payload`` does not walk them again.
_ENCODED = ("layers", "heatmap", "quantization", "anomalies", "tensors")


def _sqnr(norm: float, l2: float) -> float:
    if l2 == 0:
        return math.inf
    if norm == 0:
        return -math.inf
    return 20 * math.log10(norm / l2)


_DIGITS = re.compile(r"(\d+)")


def _natural(name: str) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in _DIGITS.split(name) if p)


def _floats(values: Any) -> list:
    """A float column as the JSON output writes it: Python floats, non-finite ones as
    "NaN", "Infinity", "-Infinity" (one pass, no per-value recursion)."""
    values = np.asarray(values, dtype=np.float64)
    out = values.tolist()
    for k in np.flatnonzero(~np.isfinite(values)).tolist():
        out[k] = finite_json(out[k])
    return out


def _group_columns(groups: list[GroupFigures]) -> dict[str, list]:
    """The figures of each group (a layer, or a layer × module cell), JSON-safe, as
    columns: tensors, params, measured, l2, rel_l2, cosine, changed_fraction, sqnr_db —
    GroupFigures' own formulas (figures.rel_of, figures.cosine_of) on arrays of its sums
    (docs/REPORT.md, "Group figures")."""
    n = len(groups)
    sums = np.array([(g.dsq, g.old_sq, g.new_sq, g.dot) for g in groups], dtype=np.float64).reshape(n, 4)
    elements = np.array([g.elements for g in groups], dtype=np.int64)
    changed = np.array([g.changed_elements for g in groups], dtype=np.int64)
    dsq, old_sq, new_sq, dot = sums.T
    l2, norm_old, norm_new = np.sqrt(dsq), np.sqrt(old_sq), np.sqrt(new_sq)
    with np.errstate(divide="ignore", invalid="ignore"):
        changed_fraction = np.where(elements > 0, changed / np.maximum(elements, 1), 0.0)
    return {
        "tensors": [g.tensors for g in groups], "params": [g.params for g in groups],
        "measured": (elements > 0).tolist(), "l2": _floats(l2),
        "rel_l2": _floats(rel_of(dsq, old_sq)), "cosine": _floats(cosine_of(dot, norm_old, norm_new, dsq)),
        "changed_fraction": _floats(changed_fraction),
        "sqnr_db": _floats([_sqnr(a, b) for a, b in zip(norm_old.tolist(), l2.tolist())]),
    }


@without_gc
def payload(report, command: str | None = None) -> dict[str, Any]:
    """The report's data as the page embeds it (JSON-able, non-finite floats as strings).
    Built with the cyclic garbage collector paused (figures.without_gc): tens of
    thousands of rows are small containers that would trigger it again and again."""
    import sys

    __version__ = getattr(sys.modules.get("torchdiff"), "__version__", None)  # the package, imported before us
    if getattr(report, "comparison", None) is None:
        data = _series_payload(report)
    else:
        data = _compare_payload(report)
    data = {"schema": SCHEMA, "torchdiff": __version__, "command": command, **data,
            "formulas": {k: {"formula": f, "doc": doc} for k, (f, doc) in FORMULAS.items()}}
    tensors = data.pop("tensors")
    # The per-tensor and per-layer parts are built JSON-safe from the columns (20,000 rows
    # stay cheap); the rest (summary, verdicts, histograms, ...) is small.
    data = {k: v if k in _ENCODED else finite_json(v) for k, v in data.items()}
    data["tensors"] = tensors
    return data


def _verdicts(analyses: Iterable) -> list[dict[str, Any]]:
    return [{"analysis": a.name, "headline": dict(a.headline), "failed": a.failed} for a in analyses]


def _file_bytes(name: str) -> int | None:
    try:
        if os.path.isfile(name):
            return os.path.getsize(name)
        if os.path.isdir(name):
            return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(name) for f in fs)
    except OSError:
        return None
    return None


#: A name component that is a number (``layers.3.mlp``: ``3``), split as names.parts splits.
_NUMBER_PART = re.compile(r"(?<![^.:/])\d+(?![^.:/])")


def _module_types(names: list[str]) -> list[str]:
    """``names.module_type`` of each name, asked once per shape of name: module_type never
    reads a component that is a number (a block index), so ``layers.3.mlp.up_proj.weight``
    and ``layers.17.mlp.up_proj.weight`` share one answer (a test pins it across the name
    families). 20,000 names cost 0.2 s asked one by one."""
    by_shape: dict[str, str] = {}
    out = []
    for name in names:
        key = _NUMBER_PART.sub("0", name)
        kind = by_shape.get(key)
        if kind is None:
            kind = by_shape[key] = module_type(name)
        out.append(kind)
    return out


def _table_order(fig) -> list[int]:
    """Rows in the one "most changed" order (sort_by_change_magnitude.order with its
    default key, from the columns): changed and retyped tensors by change_key, then
    added, removed and reshaped ones by size, then the rest by name."""
    from torchdiff.analyses.sort_by_change_magnitude import change_keys

    n = len(fig)
    names, status = fig.names, fig.status
    keys = change_keys(fig, range(n))
    measured = [i for _, i in sorted((k, i) for i, k in enumerate(keys) if k is not None)]
    params = fig.params.tolist()
    structural = sorted((i for i in range(n) if keys[i] is None and status[i] in (ADDED, REMOVED, RESHAPED)),
                        key=lambda i: (-params[i], names[i]))
    rest = sorted((i for i in range(n) if keys[i] is None and status[i] not in (ADDED, REMOVED, RESHAPED)),
                  key=names.__getitem__)
    return measured + structural + rest


def _shape_text(shape: tuple) -> str:
    return "×".join(map(str, shape)) or "scalar"


def _pair_columns(fig, rows: list[int]) -> tuple[list[str], list[str]]:
    """The shape and dtype cells of ``rows``: ``a``, ``a → b``, ``+ b`` (added) or ``a −``
    (removed)."""
    shape_texts: dict[tuple, str] = {}

    def shape(s):
        text = shape_texts.get(s)
        if text is None:
            text = shape_texts[s] = _shape_text(s)
        return text

    old, new = fig.old, fig.new
    old_present, new_present = old.present.tolist(), new.present.tolist()
    shapes, dtypes = [], []
    for i in rows:
        a_shape = shape(old.shape[i]) if old_present[i] else None
        b_shape = shape(new.shape[i]) if new_present[i] else None
        shapes.append(_pair(a_shape, b_shape))
        dtypes.append(_pair(old.dtype[i] if old_present[i] else None, new.dtype[i] if new_present[i] else None))
    return shapes, dtypes


def _pair(a, b) -> str:
    if a is None:
        return f"+ {b}"
    if b is None:
        return f"{a} −"
    return a if a == b else f"{a} → {b}"


def _compare_payload(report) -> dict[str, Any]:
    """The compare / inspect payload, built from the columns of the Figures table (no
    TensorDiff per tensor)."""
    from torchdiff.histograms import rank_keys

    comp = report.comparison
    fig = comp.figures
    inspect = comp.mode == "inspect"
    n = len(fig)
    names = fig.names
    output_rows = report.row_order()
    output_rows = list(range(n)) if output_rows is None else output_rows
    # The analyses' JSON items, as report.to_dict() writes them, for the three the page reads.
    last = {a.name: a for a in report.analyses}
    layer_impact = None if inspect else report.analysis("layer_impact")  # inspect: only its note
    pattern = None
    if layer_impact is not None:
        pattern = layer_impact.data.get("layer_pattern")
    total = global_figures(fig, comp.scope) if fig.values_kept else None  # report.scalars()' global figures

    summary = {
        "mode": comp.mode, "old": comp.old_name, "new": comp.new_name, "old_format": comp.old_format,
        "new_format": comp.new_format, "device": comp.device, "epsilon": comp.epsilon,
        "old_file_bytes": _file_bytes(comp.old_name) if not inspect else None,
        "new_file_bytes": _file_bytes(comp.new_name),
        # as the files hold them: each storage once, a tied weight's parameters once
        "old_tensor_bytes": int(stored_nbytes(fig, "old").sum()),
        "new_tensor_bytes": int(stored_nbytes(fig, "new").sum()),
        "tensors": n, "params": int(fig.params[~tied_copies(fig)].sum()),
        "counts": comp.counts(), "metadata_changed": len(comp.metadata_diffs),
        "global_l2": total.l2 if total is not None else None,
        "global_rel_l2": total.rel_l2 if total is not None else None,
        "global_cosine": total.cosine if total is not None else None,
    }

    quant = None
    if "quantization_analysis" in last:
        item = last["quantization_analysis"].to_dict()
        quant = {k: finite_json(item[k])
                 for k in (*_QUANT_HEADLINE, "schemes", "most_sensitive", "tensors") if k in item}
    layer_keys = [layer_of(name, pattern) for name in names]
    kinds = _module_types(names)

    # Layers, and the layer × module-type grid: group sums of the per-tensor figures.
    # Rows and sums as layer_groups (docs/REPORT.md): tensors in scope, a tied copy once.
    layer_rows: list[dict[str, Any]] = []
    out_layers = heatmap = None
    if not inspect or quant is not None:  # one checkpoint draws no layer charts (its SQNR bars aside)
        members = layer_members(fig, comp.scope)
        summed = summary_mask(fig, comp.scope)
        layers = GroupSums().update(fig, layer_keys, members, summed).compute()
        shares = {}
        if layer_impact is not None:
            shares = {r["layer"]: finite_json(r["share"]) for r in last["layer_impact"].to_dict()["layers"]}
        natural = {name: _natural(name) for name in layers}
        ordered = sorted(layers, key=natural.__getitem__)
        total_layers = len(ordered)
        if total_layers > LAYER_ROWS:  # the charts draw the layers of largest share (docs/REPORT.md)
            kept = set(sorted(ordered, key=lambda name: (-_finite_or(layers[name].share, -1.0),
                                                         natural[name]))[:LAYER_ROWS])
            ordered = [name for name in ordered if name in kept]
        groups = [layers[name] for name in ordered]
        layer_columns = _group_columns(groups)
        raw_share = [g.share for g in groups]
        # The share is layer_impact's own figure when it ran (the same number as its JSON).
        share = [shares[name] if name in shares else s for name, s in zip(ordered, _floats(raw_share))]
        layer_rows = [{"layer": name, "tensors": t, "params": p, "measured": m, "l2": l2, "rel_l2": rel, "cosine": cos,
                       "changed_fraction": cf, "sqnr_db": sq, "share": sh}
                      for name, t, p, m, l2, rel, cos, cf, sq, sh
                      in zip(ordered, *(layer_columns[k] for k in ("tensors", "params", "measured", "l2", "rel_l2",
                                                                   "cosine", "changed_fraction", "sqnr_db")), share)]
        out_layers = {"rows": layer_rows, "share_source": "layer_impact" if layer_impact is not None else "group sums"}
        if total_layers > len(ordered):
            out_layers["total"] = total_layers
        if layer_impact is not None:
            out_layers["top_layer"] = finite_json(layer_impact.headline["top_layer"])
            out_layers["top_share"] = finite_json(layer_impact.headline["top_share"])
        elif layer_rows and sum(g.dsq for g in layers.values()) > 0:
            top = min(range(len(ordered)), key=lambda j: (-raw_share[j], natural[ordered[j]]))
            out_layers["top_layer"], out_layers["top_share"] = ordered[top], finite_json(raw_share[top])
        if not inspect:
            heatmap = _heatmap(fig, layer_keys, kinds, members, summed, ordered, layer_columns)

    # Every tensor, as columns + rows (compact for 20,000 tensors).
    if inspect:
        columns = ["name", "layer", "module", "shape", "dtype", "params", "mean", "std", "min", "max", "rms",
                   "zero_fraction", "nan_count", "inf_count"]
        rows = _inspect_rows(fig, output_rows, layer_keys, kinds)
    else:
        columns = ["name", "layer", "module", "status", "shape", "dtype", "params", "l2", "rel_l2", "cosine",
                   "max_abs", "changed_fraction"] + (["sqnr_db"] if quant is not None else [])
        # The table opens in the one "most changed" order (sort_by_change_magnitude.order:
        # zero-initialised tensors by ‖Δ‖ among the rest, not ∞ first); a click sorts by a column.
        sqnr = {t["tensor"]: t["sqnr_db"] for t in quant.get("tensors", [])} if quant is not None else None
        rows = _compare_rows(fig, _table_order(fig), layer_keys, kinds, sqnr)

    # Histograms and spectra, most changed first (top_changed's order), then the others.
    histograms, spectra = [], []
    pictured = [i for i in output_rows if fig.extras.get(i)]
    keys = dict(zip(pictured, rank_keys(fig, pictured, inspect=inspect)))
    for i in pictured:
        extras = fig.extras[i]
        if extras.get("histogram"):
            histograms.append((i, {"tensor": names[i], **extras["histogram"]}))
        if extras.get("spectrum"):
            spectra.append((i, {"tensor": names[i], **extras["spectrum"]}))

    def by_rank(entry):
        key = keys[entry[0]]
        return (1,) if key is None else (0, key)

    out: dict[str, Any] = {
        "kind": "inspect" if inspect else "compare",
        "summary": summary,
        "verdicts": _verdicts(report.analyses),
        "layers": None if inspect else out_layers,
        "heatmap": None if inspect else heatmap,
        "histograms": [h for _, h in sorted(histograms, key=by_rank)],
        "spectra": [s for _, s in sorted(spectra, key=by_rank)],
        "quantization": _quantization(quant, layer_rows) if quant is not None else None,
        "anomalies": (finite_json(last["anomaly_detection"].to_dict().get("anomalies", []))
                      if "anomaly_detection" in last else None),
        "series": None,
        "tensors": {"columns": columns, "rows": rows},
    }
    return out


def _heatmap(fig, layer_keys: list[str], kinds: list[str], members: np.ndarray, summed: np.ndarray,
             row_names: list[str], layer_columns: dict[str, list]) -> dict[str, Any]:
    """The layer × module-type grid of rel_l2, cosine and changed_fraction (None where no
    tensor of that type in that layer was measured): GroupSums over (layer, module type).
    Where every layer holds one module type (many layers of one tensor each) a cell is its
    layer, summed over the same rows in the same order: the layer's figures are reused."""
    kinds_of: dict[str, set[str]] = {}
    for i in np.flatnonzero(members).tolist():
        kinds_of.setdefault(layer_keys[i], set()).add(kinds[i])
    if all(len(found) == 1 for found in kinds_of.values()):
        cell_of = [(layer, next(iter(kinds_of[layer]))) for layer in row_names]
        figures = layer_columns
    else:
        index: dict[str, tuple[str, str]] = {}
        cell_keys = []
        for layer, kind in zip(layer_keys, kinds):
            key = f"{layer}\x00{kind}"
            index.setdefault(key, (layer, kind))
            cell_keys.append(key)
        cells = GroupSums().update(fig, cell_keys, members, summed).compute()
        cell_of = [index[key] for key in cells]
        figures = _group_columns(list(cells.values()))
    present = {kind for _, kind in cell_of}
    columns = [k for k in MODULE_TYPES if k in present]
    columns += sorted(present - set(columns))
    grid = {key: [[None] * len(columns) for _ in row_names] for key in ("rel_l2", "cosine", "changed_fraction")}
    col_index = {c: j for j, c in enumerate(columns)}
    row_index = {r: i for i, r in enumerate(row_names)}
    for j, (layer, kind) in enumerate(cell_of):
        if not figures["measured"][j]:
            continue
        r, c = row_index[layer], col_index[kind]
        for name in grid:
            grid[name][r][c] = figures[name][j]
    return {"rows": row_names, "columns": columns, **grid}


def _compare_rows(fig, order: list[int], layer_keys: list[str], kinds: list[str],
                  sqnr: dict[str, Any] | None) -> list[list]:
    """The tensor table's rows in ``order``, from the columns: the figures as the JSON
    output writes them (PairMetrics' formulas, value for value); None where not measured."""
    from torchdiff.analyses.sort_by_change_magnitude import pair_rel_l2

    idx = np.asarray(order, dtype=np.int64)
    names, status = fig.names, fig.status
    shapes, dtypes = _pair_columns(fig, order)
    params = fig.params[idx].tolist()
    measured = fig.measured[idx].tolist()
    count = fig.count[idx]
    with np.errstate(divide="ignore", invalid="ignore"):  # PairMetrics.changed_fraction
        changed = np.where(count > 0, fig.changed_count[idx] / np.maximum(count, 1), 0.0)
    figures = zip(_floats(fig.l2[idx]), _floats(pair_rel_l2(fig, idx)), _floats(fig.cosine()[idx]),
                  _floats(fig.max_abs[idx]), _floats(changed))
    none = [None] * 5
    rows = []
    for i, shape, dtype, p, m, values in zip(order, shapes, dtypes, params, measured, figures):
        name = names[i]
        row = [name, layer_keys[i], kinds[i], status[i], shape, dtype, p, *(values if m else none)]
        if sqnr is not None:
            row.append(sqnr.get(name))  # already JSON-encoded (from the analysis item)
        rows.append(row)
    return rows


def _inspect_rows(fig, order: list[int], layer_keys: list[str], kinds: list[str]) -> list[list]:
    """inspect's table rows in ``order``: the one side's statistics, from the columns."""
    idx = np.asarray(order, dtype=np.int64)
    side = fig.new
    numel = side.numel[idx]
    with np.errstate(divide="ignore", invalid="ignore"):  # TensorStats.zero_fraction
        zero_fraction = np.where(numel > 0, side.zero_count[idx] / np.maximum(side.values(idx), 1), 0.0)
    stats = zip(*(_floats(getattr(side, f)[idx]) for f in ("mean", "std", "min", "max", "rms")), _floats(zero_fraction),
                side.nan_count[idx].tolist(), side.inf_count[idx].tolist())
    return [[fig.names[i], layer_keys[i], kinds[i], list(side.shape[i]), side.dtype[i], k, *values]
            for i, k, values in zip(order, numel.tolist(), stats)]


_QUANT_HEADLINE = ("compression", "precision_loss", "sqnr_db", "sqnr_db_quantized", "bits_per_weight_old",
                   "bits_per_weight_new", "quantized_tensors", "precision_loss_thresholds_db", "bytes_old", "bytes_new")


def _quantization(item: dict[str, Any], layer_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The Quantization section from the analysis item (JSON-safe): its headline, schemes
    and most sensitive tensors, SQNR per layer (the group sums) and the tensors the
    per-tensor bars show (``QUANT_TENSORS_SHOWN``, in the item's order)."""
    tensors = item.get("tensors", [])
    finite = [j for j, t in enumerate(tensors) if _is_finite_number(t.get("sqnr_db"))]
    shown = set(sorted(finite, key=lambda j: tensors[j]["sqnr_db"])[:QUANT_TENSORS_SHOWN])  # stable, as the page
    return {
        "headline": {k: item.get(k) for k in _QUANT_HEADLINE if k in item},
        "schemes": item.get("schemes", []),
        "most_sensitive": item.get("most_sensitive", []),
        "tensors": [{"tensor": t["tensor"], "scheme": t.get("scheme"), "sqnr_db": t.get("sqnr_db")}
                    for j, t in enumerate(tensors) if j in shown],
        "layers": [{"layer": r["layer"], "sqnr_db": r["sqnr_db"]} for r in layer_rows if r["measured"]],
    }


def _is_finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _series_payload(report) -> dict[str, Any]:
    items = report.to_dict()
    head = items[0]
    by_type = {it["type"]: it for it in items if "step" not in it}
    steps = [it for it in items if it["type"] == "series_step"]
    conv = by_type.get("convergence_analysis")
    sim = by_type.get("similarity_matrix")
    series: dict[str, Any] = {"labels": list(report.labels), "checkpoints": list(report.checkpoints),
                              "steps": [{"path": s["path"], "counts": s["counts"]} for s in steps]}
    if conv is not None:
        per_step = conv.get("per_step", [])
        series["convergence"] = {
            "status": conv.get("status"), "reason": conv.get("reason"), "trend": conv.get("trend"),
            "steps": [s["step"] for s in per_step],
            "update_norm": [s["update_norm"] for s in per_step],
            "rel_update": [s["rel_update"] for s in per_step],
            "update_cosine": [s["update_cosine"] for s in per_step],
            "rel_distance_from_first": [s["rel_distance_from_first"] for s in per_step],
            "layers": [r["layer"] for r in conv.get("per_layer", [])],
            "layer_rel_update": [r["rel_update"] for r in conv.get("per_layer", [])],
            "layer_status": [r.get("status") for r in conv.get("per_layer", [])],
        }
    if sim is not None:
        tv = sim.get("task_vectors")
        series["similarity"] = {
            "labels": sim.get("labels"), "cosine": sim.get("cosine"), "rel_distance": sim.get("rel_distance"),
            "mean_similarity": sim.get("mean_similarity"),
            "task_vector_cosine": sim.get("task_vector_cosine"), "base": tv.get("base") if tv else None,
            "mean_task_cosine": sim.get("mean_task_cosine"), "sign_conflict_rate": sim.get("sign_conflict_rate"),
        }
    last = report.steps[-1].comparison if report.steps else None
    summary = {
        "mode": "series", "checkpoints": list(report.checkpoints), "order": head.get("order"),
        "base": head.get("base"), "notes": head.get("notes", []),
        "file_bytes": [_file_bytes(c) for c in report.checkpoints],
        "tensors": len(last.diffs) if last is not None else 0,
    }
    return {"kind": "series", "summary": summary, "verdicts": _verdicts(report.series_analyses),
            "layers": None, "heatmap": None, "tensors": None, "histograms": [], "spectra": [],
            "quantization": None, "anomalies": None, "series": series}


# ---- the page ---------------------------------------------------------------------------------------

def _asset(name: str) -> str:
    return (_HERE / name).read_text(encoding="utf-8")


def _script_json(data: Any) -> str:
    """JSON safe inside <script>: no '</', no '<!--', no U+2028/9 surprises."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def render_html(report, command: str | None = None) -> str:
    """The whole page as a string."""
    data = payload(report, command)
    script = _asset("report.js")
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    csp = f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; img-src data:"
    kind = data["kind"]
    s = data["summary"]
    title = (f"torchdiff: {s.get('old')} → {s.get('new')}" if kind == "compare"
             else f"torchdiff inspect: {s.get('new')}" if kind == "inspect"
             else f"torchdiff series: {len(s.get('checkpoints', []))} checkpoints")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{csp}\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{html.escape(title)}</title>\n<style>\n{_asset('report.css')}</style>\n</head>\n<body>\n"
        f"<header><h1>{html.escape(title)}</h1><nav id=\"nav\"></nav></header>\n"
        "<main id=\"main\"><noscript>This report draws its charts with JavaScript; the data is in the "
        "torchdiff-data block of this file.</noscript></main>\n"
        "<div id=\"errors\" hidden></div>\n"
        f"<script type=\"application/json\" id=\"torchdiff-data\">{_script_json(data)}</script>\n"
        f"<script>{script}</script>\n</body>\n</html>\n"
    )


def write_html(report, path: str | os.PathLike, command: str | None = None) -> str:
    """Write the report page to ``path`` (a compare/inspect Report or a SeriesReport);
    returns the path. Written to a temporary file first, then renamed into place."""
    from torchdiff.errors import UsageError

    path = os.fspath(path)
    text = render_html(report, command)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise UsageError(f"--report {path}: cannot write ({e.strerror or e})") from None
    return path


def read_payload(text: str) -> dict[str, Any]:
    """The data payload of a page written by ``write_html`` (for tests and tools)."""
    start = text.index('<script type="application/json" id="torchdiff-data">')
    start = text.index(">", start) + 1
    end = text.index("</script>", start)
    return json.loads(text[start:end])
