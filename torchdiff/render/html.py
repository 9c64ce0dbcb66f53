"""Report -> one self-contained HTML file (``--report FILE.html``; docs/REPORT.md).

The page is three inline parts: a stylesheet, a JSON data payload
(``<script type="application/json" id="torchdiff-data">``, built by ``payload``) and a
small hand-written script (report.js beside this module) that draws every chart as
SVG from the payload. Nothing is fetched at view time: a Content-Security-Policy of
``default-src 'none'`` (the script allowed by its SHA-256 hash) makes any request
fail. Every number in the page is a number of the payload, and every number of the
payload is a number of ``report.to_dict()`` (the JSON output) or a group sum defined
in docs/REPORT.md, with the formula beside it.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

from torchdiff.figures import GroupFigures, GroupSums, layer_members, stored_nbytes, summary_mask, tied_copies
from torchdiff.names import layer_of, module_type
from torchdiff.render import finite_json

SCHEMA = "torchdiff-report/1"
_HERE = Path(__file__).parent

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

def _group_row(g: GroupFigures) -> dict[str, Any]:
    """A layer's (or a layer × module cell's) figures, from the one aggregation
    (figures.GroupSums; docs/REPORT.md, "Group figures")."""
    return {
        "tensors": g.tensors, "params": g.params, "measured": g.elements > 0, "l2": g.l2, "rel_l2": g.rel_l2,
        "cosine": g.cosine, "changed_fraction": g.changed_fraction, "sqnr_db": _sqnr(g.norm_old, g.l2),
    }


def _sqnr(norm: float, l2: float) -> float:
    if l2 == 0:
        return math.inf
    if norm == 0:
        return -math.inf
    return 20 * math.log10(norm / l2)


def _natural(name: str) -> tuple:
    import re

    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name) if p)


def payload(report, command: str | None = None) -> dict[str, Any]:
    """The report's data as the page embeds it (JSON-able, non-finite floats as strings)."""
    import sys

    __version__ = getattr(sys.modules.get("torchdiff"), "__version__", None)  # the package, imported before us
    if getattr(report, "comparison", None) is None:
        data = _series_payload(report)
    else:
        data = _compare_payload(report)
    data = {"schema": SCHEMA, "torchdiff": __version__, "command": command, **data,
            "formulas": {k: {"formula": f, "doc": doc} for k, (f, doc) in FORMULAS.items()}}
    tensors = data.pop("tensors")  # its rows are already encoded (_finite): 20,000 rows stay cheap
    data = finite_json(data)
    data["tensors"] = tensors
    return data


def _finite(x: Any) -> Any:
    """A float as the JSON output writes it (non-finite as "NaN", "Infinity", "-Infinity")."""
    if isinstance(x, float) and not math.isfinite(x):
        return finite_json(x)
    return x


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


def _compare_payload(report) -> dict[str, Any]:
    comp = report.comparison
    fig = comp.figures
    inspect = comp.mode == "inspect"
    diffs = list(report.ordered_diffs())
    # The analyses' JSON items, as report.to_dict() writes them (without its per-tensor items).
    by_type = {a.name: finite_json(a.to_dict()) for a in report.analyses}
    scalars = report.scalars()
    layer_impact = report.analysis("layer_impact")
    pattern = None
    if layer_impact is not None:
        pattern = layer_impact.data.get("layer_pattern")

    summary = {
        "mode": comp.mode, "old": comp.old_name, "new": comp.new_name, "old_format": comp.old_format,
        "new_format": comp.new_format, "device": comp.device, "epsilon": comp.epsilon,
        "old_file_bytes": _file_bytes(comp.old_name) if not inspect else None,
        "new_file_bytes": _file_bytes(comp.new_name),
        # as the files hold them: each storage once, a tied weight's parameters once
        "old_tensor_bytes": int(stored_nbytes(fig, "old").sum()), "new_tensor_bytes": int(stored_nbytes(fig, "new").sum()),
        "tensors": len(fig), "params": int(fig.params[~tied_copies(fig)].sum()),
        "counts": comp.counts(), "metadata_changed": len(comp.metadata_diffs),
        "global_l2": scalars.get("torchdiff/global_l2"), "global_rel_l2": scalars.get("torchdiff/global_rel_l2"),
        "global_cosine": scalars.get("torchdiff/global_cosine"),
    }

    # Layers, and the layer × module-type grid: group sums of the per-tensor figures.
    layer_keys = [layer_of(n, pattern) for n in fig.names]
    kinds = [module_type(n) for n in fig.names]
    module_of, layer_name = dict(zip(fig.names, kinds)), dict(zip(fig.names, layer_keys))
    # Rows and sums as layer_groups (docs/REPORT.md): tensors in scope, a tied copy once.
    members = layer_members(fig, comp.scope)
    summed = summary_mask(fig, comp.scope)
    layers = GroupSums().update(fig, layer_keys, members, summed).compute()
    cell_keys = [f"{layer}\x00{kind}" for layer, kind in zip(layer_keys, kinds)]
    cells = {tuple(key.split("\x00")): g
             for key, g in GroupSums().update(fig, cell_keys, members, summed).compute().items()}
    layer_rows = []
    shares = {}
    if layer_impact is not None:
        shares = {r["layer"]: r["share"] for r in by_type["layer_impact"]["layers"]}
    for name in sorted(layers, key=_natural):
        row = {"layer": name, **_group_row(layers[name])}
        # The share is layer_impact's own figure when it ran (the same number as its JSON).
        row["share"] = shares.get(name, layers[name].share)
        layer_rows.append(row)
    columns = [k for k in MODULE_TYPES if any(c[1] == k for c in cells)]
    columns += sorted({c[1] for c in cells} - set(columns))
    row_names = [r["layer"] for r in layer_rows]
    grid = {key: [[None] * len(columns) for _ in row_names] for key in ("rel_l2", "cosine", "changed_fraction")}
    col_index = {c: j for j, c in enumerate(columns)}
    row_index = {r: i for i, r in enumerate(row_names)}
    for (layer, kind), g in cells.items():
        f = _group_row(g)
        if not f["measured"]:
            continue
        for key in grid:
            grid[key][row_index[layer]][col_index[kind]] = f[key]

    # Every tensor, as columns + rows (compact for 20,000 tensors).
    quant = by_type.get("quantization_analysis")
    sqnr = {t["tensor"]: t["sqnr_db"] for t in quant.get("tensors", [])} if quant else {}
    if inspect:
        cols = ["name", "layer", "module", "shape", "dtype", "params", "mean", "std", "min", "max", "rms",
                "zero_fraction", "nan_count", "inf_count"]
        rows = []
        for d in diffs:
            s = d.new
            rows.append([d.name, layer_name[d.name], module_of[d.name], list(s.shape), s.dtype, s.numel,
                         *map(_finite, (s.mean, s.std, s.min, s.max, s.rms, s.zero_fraction)), s.nan_count,
                         s.inf_count])
    else:
        cols = ["name", "layer", "module", "status", "shape", "dtype", "params", "l2", "rel_l2", "cosine",
                "max_abs", "changed_fraction"] + (["sqnr_db"] if quant else [])
        rows = []
        # The table opens in the one "most changed" order (sort_by_change_magnitude.order:
        # zero-initialised tensors by ‖Δ‖ among the rest, not ∞ first); a click sorts by a column.
        from torchdiff.analyses.sort_by_change_magnitude import order

        position = {name: i for i, name in enumerate(order(comp, {}))}
        for d in sorted(diffs, key=lambda d: position.get(d.name, len(position))):
            shape = _pair_text(d, lambda s: "×".join(map(str, s.shape)) or "scalar")
            dtype = _pair_text(d, lambda s: s.dtype)
            m = d.metrics
            row = [d.name, layer_name[d.name], module_of[d.name], d.status, shape, dtype, d.params]
            if m is not None:
                row += map(_finite, (m.l2, m.rel_l2, m.cosine, m.max_abs, m.changed_fraction))
            else:
                row += [None] * 5
            if quant:
                row.append(sqnr.get(d.name))  # already JSON-encoded (from the analysis item)
            rows.append(row)

    histograms, spectra = [], []
    for d in diffs:
        h = d.extras.get("histogram")
        if h:
            histograms.append({"tensor": d.name, **h})
        s = d.extras.get("spectrum")
        if s:
            spectra.append({"tensor": d.name, **s})
    rank = {n: i for i, n in enumerate(_top_order(comp.diffs, inspect))}
    histograms.sort(key=lambda h: rank.get(h["tensor"], len(rank)))
    spectra.sort(key=lambda h: rank.get(h["tensor"], len(rank)))

    out: dict[str, Any] = {
        "kind": "inspect" if inspect else "compare",
        "summary": summary,
        "verdicts": _verdicts(report.analyses),
        "layers": {"rows": layer_rows, "share_source": "layer_impact" if layer_impact is not None else "group sums"},
        "heatmap": {"rows": row_names, "columns": columns, **grid},
        "histograms": histograms,
        "spectra": spectra,
        "quantization": _quantization(quant, layer_rows) if quant else None,
        "anomalies": by_type["anomaly_detection"].get("anomalies", []) if "anomaly_detection" in by_type else None,
        "series": None,
    }
    if layer_impact is not None:
        out["layers"]["top_layer"] = layer_impact.headline["top_layer"]
        out["layers"]["top_share"] = layer_impact.headline["top_share"]
    elif layer_rows and sum(g.dsq for g in layers.values()) > 0:
        top = min(layer_rows, key=lambda r: (-r["share"], _natural(r["layer"])))
        out["layers"]["top_layer"], out["layers"]["top_share"] = top["layer"], top["share"]
    if inspect:  # one checkpoint: nothing moved, no layer figures to draw
        out["layers"] = out["heatmap"] = None
    out["tensors"] = {"columns": cols, "rows": rows}
    return out


def _top_order(diffs, inspect: bool) -> list[str]:
    from torchdiff.histograms import top_changed

    return top_changed(list(diffs), len(diffs), inspect=inspect)


def _pair_text(d, fn) -> str:
    a = fn(d.old) if d.old is not None else None
    b = fn(d.new) if d.new is not None else None
    if a is None:
        return f"+ {b}"
    if b is None:
        return f"{a} −"
    return a if a == b else f"{a} → {b}"


def _quantization(item: dict[str, Any], layer_rows: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("compression", "precision_loss", "sqnr_db", "sqnr_db_quantized", "bits_per_weight_old",
            "bits_per_weight_new", "quantized_tensors", "precision_loss_thresholds_db", "bytes_old", "bytes_new")
    return {
        "headline": {k: item.get(k) for k in keys if k in item},
        "schemes": item.get("schemes", []),
        "most_sensitive": item.get("most_sensitive", []),
        "tensors": [{"tensor": t["tensor"], "scheme": t.get("scheme"), "sqnr_db": t.get("sqnr_db")}
                    for t in item.get("tensors", [])],
        "layers": [{"layer": r["layer"], "sqnr_db": r["sqnr_db"]} for r in layer_rows if r["measured"]],
    }


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
