"""--similarity-matrix: cosine similarity between tensors (pair) or whole checkpoints (series), task vectors.

Pair (docs/analyses/similarity_matrix.md): the diagonal of the old × new tensor
matrix, cos(A_k, B_k) for every tensor of equal shape, per tensor and per layer; with
``--cross-layer``, the full old × new cosine matrix of each group of same-shaped
tensors (one normalised matmul per group, through an engine hook), and the tensors
whose best match is another tensor (a moved or permuted layer).

Series (``analyze_series``): the N×N cosine and relative distance between whole
checkpoints and per layer; with ``--base B`` the task vectors τ_i = θ_i − θ_B, their
cosines and sign-conflict rates.

Outliers: cosines whose rotation x = log10(1 − cos) exceeds median(x) + 3·1.4826·MAD(x)
and 1 − cos ≥ 0.01. Moved: best cosine ≥ 0.5 and ≥ the same-name cosine + 0.1.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from torchdiff.analyses._training import (
    OUTLIER_MIN_ROTATION, OUTLIER_Z, SHADES, cosine_from_sq, cosine_outliers, layer_key, safe_div, shade,
    shade_legend, shade_scale,
)
from torchdiff.figures import GroupSums, tied_copies
from torchdiff.names import SCOPES, is_float_storage, roles_over
from torchdiff.results import NEW_ALL_ZERO, OLD_ALL_ZERO, AnalysisResult, Table
from torchdiff.units import number

NAME = "similarity_matrix"
FLAG = "similarity_matrix"
OPTIONS: dict[str, tuple[Any, str]] = {
    "cross_layer": (False, "similarity: cosine between every pair of same-shaped tensors across layers (pair)"),
    "base": (None, "similarity (series): base checkpoint for task vectors τ_i = θ_i − θ_base"),
}
ENABLED_BY = ("cross_layer", "base")

MOVED_MIN_COSINE = 0.5
MOVED_MARGIN = 0.1
TEXT_TENSORS = 40  # per-tensor table in text up to this many tensors, else the lowest ones
TEXT_MATRIX = 12  # numeric matrix in text up to this size
TEXT_HEATMAP = 40  # shaded heatmap in text up to this size
_STASH = "groups"  # per-run state key, set by prepare()


def outlier_rule() -> str:
    return (f"outlier: log10(1 − cos) > median + {OUTLIER_Z:g}·1.4826·MAD and 1 − cos ≥ {OUTLIER_MIN_ROTATION:g}")


def _dims(n: int) -> str:
    """The text form ``(n,n)``; JSON carries ``[n, n]`` (data overrides the headline)."""
    return f"({n},{n})"


# ---- pair: the cross-layer hook ------------------------------------------------------------

def prepare(old, new, options, state: dict):
    """With --cross-layer, plans the groups of same-shaped tensors for the hook (headers
    only; the checkpoints are returned unchanged)."""
    if not options.get("cross_layer"):
        return old, new
    from torchdiff.pairing import compile_filters

    keep = compile_filters(options.get("ignore_keys_regex"), options.get("path"))
    role_of = roles_over([{n: (h.storage_dtype, len(h.shape)) for n, h in c.tensors.items()} for c in (old, new)])
    in_scope = SCOPES[options.get("scope", "params")]
    groups: dict[tuple[int, ...], list[str]] = {}
    for name, a in old.tensors.items():
        b = new.tensors.get(name)
        if b is None or not keep(name) or tuple(a.shape) != tuple(b.shape) or a.numel < 2:
            continue
        if not (is_float_storage(a.storage_dtype) and is_float_storage(b.storage_dtype)) or role_of[name] not in in_scope:
            continue
        if a.dtype.is_complex != b.dtype.is_complex:
            continue  # the engine measures them as reshaped: their real views differ
        # a complex tensor is measured as its real view [..., 2] (docs/METRICS.md): it shares
        # a group only with complex tensors of its shape
        groups.setdefault((*a.shape, 2) if a.dtype.is_complex else tuple(a.shape), []).append(name)
    state[_STASH] = [names for names in groups.values() if len(names) >= 2]
    return old, new


class _CrossLayerHook:
    """Keeps the unit vectors of a group's tensors until the group is complete, then
    computes its old × new cosine matrix as one matmul: U_old · U_newᵀ."""

    name = NAME

    def __init__(self, groups: list[list[str]]):
        self.groups = groups
        self.member = {name: g for g, names in enumerate(groups) for name in names}
        self.slots: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}

    def wants(self, pair) -> bool:
        return pair.name in self.member and pair.kind == "common"

    def __call__(self, pair, old, new):
        g = self.member[pair.name]
        slot = self.slots.setdefault(g, {})
        slot[pair.name] = (_unit(old), _unit(new))
        if len(slot) < len(self.groups[g]):
            return None
        names = self.groups[g]
        u_old = torch.stack([slot[n][0] for n in names])
        u_new = torch.stack([slot[n][1] for n in names])
        cos = (u_old @ u_new.T).clamp_(-1, 1)
        dead_old = ~torch.isfinite(u_old).all(1)
        dead_new = ~torch.isfinite(u_new).all(1)
        cos[dead_old, :] = math.nan
        cos[:, dead_new] = math.nan
        del self.slots[g]
        return {"group": g, "shape": list(pair.old.shape), "names": list(names), "cosine": cos.tolist()}


def _unit(t: torch.Tensor) -> torch.Tensor:
    """t/‖t‖ flattened in float32 (NaN for a zero or non-finite tensor)."""
    v = t.reshape(-1).to(torch.float32)
    norm = torch.linalg.vector_norm(v.to(torch.float64)).to(torch.float32)
    return torch.where(norm > 0, v / norm, torch.full_like(v, math.nan))


def hooks(options, state: dict):
    groups = state.get(_STASH)
    if not options.get("cross_layer") or not groups:
        return []
    return [_CrossLayerHook(groups)]


# ---- pair -----------------------------------------------------------------------------------

def analyze(comparison, options, state: dict) -> AnalysisResult:
    if comparison.mode != "pair":
        return AnalysisResult(NAME, {}, notes=("cosine similarity needs two checkpoints (torchdiff OLD NEW), or a "
                                               "series (torchdiff series C1 C2 ... --similarity-matrix)",))
    fig = comparison.figures
    mask = fig.measured & fig.in_scope(comparison.scope) & ~tied_copies(fig)  # a tied weight once
    keys = [layer_key(n, options) for n in fig.names]
    layers = GroupSums().update(fig, keys, mask).compute()
    cosine, rel = fig.cosine(), fig.rel_l2()
    tensors = [(fig.names[i], fig.old.shape[i], float(cosine[i]), float(rel[i])) for i in np.flatnonzero(mask)]
    lowest: dict[str, float] = {}  # each layer's lowest finite tensor cosine
    for i in np.flatnonzero(mask & np.isfinite(cosine)).tolist():
        lowest[keys[i]] = min(lowest.get(keys[i], math.inf), float(cosine[i]))
    notes: list[str] = []
    if options.get("base") is not None:
        notes.append("--base (task vectors) applies to torchdiff series C1 C2 ... --base B")
    if not tensors:
        return AnalysisResult(NAME, {"dimensions": _dims(0)}, data={"dimensions": [0, 0]},
                              notes=tuple(notes) + ("no tensors of equal shape",))
    cosines = [t[2] for t in tensors]
    finite = [c for c in cosines if math.isfinite(c)]
    outliers = [tensors[i][0] for i in cosine_outliers(cosines)]
    lo, hi = shade_scale(finite)
    layer_rows, per_layer = [], []
    for layer, g in layers.items():
        count, dot, o2, n2, cmin = g.tensors, g.dot, g.old_sq, g.new_sq, lowest.get(layer, math.inf)
        c = cosine_from_sq(o2, n2, o2 + n2 - 2 * dot)
        layer_rows.append(_layer_row(layer, int(count), c, cmin, o2, n2, lo, hi))
        per_layer.append({"layer": layer, "tensors": int(count), "cosine": c,
                          "min_cosine": cmin if math.isfinite(cmin) else math.nan})
    headline: dict[str, Any] = {
        "dimensions": _dims(len(tensors)),
        "mean_similarity": float(np.mean(finite)) if finite else math.nan,
        "min_similarity": min(finite) if finite else math.nan,
        "outliers": outliers,
    }
    data: dict[str, Any] = {
        "mode": "pair", "dimensions": [len(tensors), len(tensors)],
        "diagonal": [{"path": n, "shape": list(s), "cosine": c, "rel_l2": r} for n, s, c, r in tensors],
        "per_layer": per_layer, "shade_scale": [lo, hi],
    }
    # lowest first; an undefined cosine (a side all zero: docs/METRICS.md) after the measured ones
    ordered = sorted(tensors, key=lambda t: (not math.isfinite(t[2]), t[2] if math.isfinite(t[2]) else 0.0, t[0]))
    shown = tensors if len(tensors) <= TEXT_TENSORS else ordered[:TEXT_TENSORS // 2]

    def row(n, s, c, r):
        if not math.isfinite(c):  # labelled, not nan/inf (as every top table)
            c, r = (OLD_ALL_ZERO, "n/a") if math.isinf(r) else ("undefined (a side all zero)", r)
            return n, "[" + ", ".join(map(str, s)) + "]", c, r, ""
        return n, "[" + ", ".join(map(str, s)) + "]", c, r, shade(c, lo, hi)

    tensor_table = Table(
        "Diagonal" if len(tensors) <= TEXT_TENSORS else "Lowest cosine",
        ("tensor", "shape", "cosine", "rel_l2", "shade"), tuple(row(*t) for t in shown),
    )
    tables = [Table("Per layer", ("layer", "tensors", "cosine", "min_cosine", "shade"), tuple(layer_rows)),
              tensor_table]
    if len(tensors) > TEXT_TENSORS:
        data["lowest_cosine"] = [t[0] for t in shown]
    if options.get("cross_layer"):
        exact = {n: c for n, _, c, _ in tensors}
        groups, moved, heat = _cross_layer(comparison, exact)
        headline["cross_layer_groups"] = len(groups)
        headline["moved"] = len(moved)
        data["cross_layer"] = groups
        data["cross_layer_cosine"] = "per group in cross_layer: cosine[i][j] = cos(old names[i], new names[j])"
        data["moved"] = moved
        tables += heat
        if moved:
            tables.append(Table("Moved", ("old", "best_new", "cosine", "same_name_cosine"),
                                tuple((m["old"], m["new"], m["cosine"], m["same_name_cosine"]) for m in moved)))
        notes.append(f"moved: best cross-layer cosine ≥ {MOVED_MIN_COSINE:g} and ≥ same-name cosine + "
                     f"{MOVED_MARGIN:g}; cross-layer cosines in float32, diagonal exact")
    notes.append(f"shades on [{number(lo)}, {number(hi)}]: {shade_legend(lo, hi)}")
    notes.append(outlier_rule())
    return AnalysisResult(NAME, headline, data=data, tables=tuple(tables), notes=tuple(notes))


def _layer_row(layer: str, count: int, c: float, cmin: float, old_sq: float, new_sq: float, lo: float,
               hi: float) -> tuple:
    """A row of the per-layer table: an undefined cosine is labelled, as in the diagonal
    (a layer whose old or new side is all zero), never ``nan`` with a ``??`` shade."""
    if math.isfinite(c):
        return layer, count, c, cmin if math.isfinite(cmin) else "n/a", shade(c, lo, hi)
    label = OLD_ALL_ZERO if old_sq == 0 else NEW_ALL_ZERO if new_sq == 0 else "undefined"
    return layer, count, label, cmin if math.isfinite(cmin) else "n/a", ""


def _cross_layer(comparison, exact: dict[str, float]):
    groups, moved, heat = [], [], []
    for d in comparison.diffs:
        e = d.extras.get(NAME)
        if not e:
            continue
        names, cos = e["names"], np.array(e["cosine"], dtype=np.float64)
        for i, n in enumerate(names):
            if n in exact:
                cos[i, i] = exact[n]
        groups.append({"shape": e["shape"], "names": names, "cosine": cos.tolist()})
        for i, n in enumerate(names):
            row = cos[i]
            if not np.isfinite(row).any():
                continue
            j = int(np.nanargmax(row))
            same = row[i]
            if j != i and row[j] >= MOVED_MIN_COSINE and (not math.isfinite(same) or row[j] >= same + MOVED_MARGIN):
                moved.append({"old": n, "new": names[j], "cosine": float(row[j]), "same_name_cosine": float(same)})
        k = len(names)
        if k <= TEXT_HEATMAP:
            lo, hi = shade_scale(cos.ravel())
            rows = tuple((f"[{i}] {n}", *(shade(v, lo, hi) for v in cos[i])) for i, n in enumerate(names))
            shape = "×".join(map(str, e["shape"]))
            title = f"old \\ new, shape {shape}, shades {number(lo)}..{number(hi)}"
            heat.append(Table("Cross layer cosine", (title, *map(str, range(k))), rows))
    return groups, moved, heat


# ---- series -----------------------------------------------------------------------------------

def _matrices(nsq: np.ndarray, d2: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    cos = np.empty((n, n))
    rel = np.empty((n, n))
    norm = np.sqrt(np.maximum(nsq, 0.0))
    for i in range(n):
        for j in range(n):
            cos[i, j] = cosine_from_sq(nsq[i], nsq[j], d2[i, j]) if i != j else (1.0 if nsq[i] > 0 else math.nan)
            rel[i, j] = safe_div(math.sqrt(max(d2[i, j], 0.0)), norm[i])
    return cos, rel


def _off_diagonal(m: np.ndarray) -> np.ndarray:
    n = m.shape[0]
    vals = m[~np.eye(n, dtype=bool)]
    return vals[np.isfinite(vals)]


def _mean_measured(values: np.ndarray) -> float:
    """The mean of the values that are not NaN (a checkpoint all zero has no cosine), NaN
    when none is (without NumPy's "mean of empty slice" warning on stderr)."""
    measured = values[~np.isnan(values)]
    return float(measured.mean()) if measured.size else math.nan


def analyze_series(series, options) -> AnalysisResult:
    n = series.n
    labels = series.labels
    if not series.layers:
        return AnalysisResult(NAME, {"dimensions": _dims(n)}, data={"dimensions": [n, n]},
                              notes=("no floating-point tensors common to every checkpoint",))
    nsq = series.nsq.sum(0)
    d2 = series.dist2.sum(0)
    cos, rel = _matrices(nsq[:n], d2[:n, :n], n)
    off = _off_diagonal(cos)
    row_mean = [_mean_measured(np.delete(cos[i], i)) for i in range(n)]
    outliers = [labels[i] for i in cosine_outliers(row_mean)]
    headline: dict[str, Any] = {
        "dimensions": _dims(n),
        "mean_similarity": float(off.mean()) if off.size else math.nan,
        "min_similarity": float(off.min()) if off.size else math.nan,
        "outliers": outliers,
    }
    per_layer, layer_rows = [], []
    for li, layer in enumerate(series.layers):
        lc, lr = _matrices(series.nsq[li, :n], series.dist2[li, :n, :n], n)
        lo_ = _off_diagonal(lc)
        per_layer.append({"layer": layer, "params": int(series.layer_params[li]), "cosine": lc.tolist(),
                          "rel_distance": lr.tolist()})
        layer_rows.append((layer, int(series.layer_params[li]), float(lo_.mean()) if lo_.size else math.nan,
                           float(lo_.min()) if lo_.size else math.nan, float(lc[0, n - 1]), float(lr[0, n - 1])))
    lo, hi = shade_scale(off)
    data: dict[str, Any] = {
        "mode": "series", "dimensions": [n, n], "checkpoints": list(series.names), "labels": list(labels),
        "cosine": cos.tolist(),
        "rel_distance": rel.tolist(), "mean_cosine_to_others": row_mean, "per_layer": per_layer,
        "cosine_heatmap": {"scale": [lo, hi], "shades": SHADES},
    }
    tables: list[Table] = []
    index_headers = tuple(str(i) for i in range(n))
    row_label = [f"[{i}] {lab}" for i, lab in enumerate(labels)]
    if n <= TEXT_MATRIX:
        tables.append(Table("Cosine", ("checkpoint", *index_headers),
                            tuple((row_label[i], *map(float, cos[i])) for i in range(n))))
        tables.append(Table("Rel distance", ("checkpoint", *index_headers),
                            tuple((row_label[i], *map(float, rel[i])) for i in range(n))))
    if n <= TEXT_HEATMAP:
        tables.append(Table("Cosine heatmap", ("checkpoint", *index_headers),
                            tuple((row_label[i], *(shade(v, lo, hi) if i != j else "  " for j, v in enumerate(cos[i])))
                                  for i in range(n))))
    tables.append(Table("Per layer", ("layer", "params", "mean_cosine", "min_cosine", "first_last_cosine",
                                      "first_last_rel_distance"), tuple(layer_rows)))
    notes = [f"heatmap shades on [{number(lo)}, {number(hi)}]: {shade_legend(lo, hi)}",
             "rel_distance[i][j] = ‖θ_j − θ_i‖/‖θ_i‖ (row i is the reference)", outlier_rule()]
    if n > TEXT_MATRIX:
        notes.insert(0, f"{n}×{n} matrices in JSON (--output json); text shows the heatmap")
    if options.get("cross_layer"):
        notes.append("--cross-layer applies to a pair: torchdiff OLD NEW --similarity-matrix --cross-layer")
    if series.base_row is not None:
        _task_vectors(series, headline, data, tables, notes)
    return AnalysisResult(NAME, headline, data=data, tables=tuple(tables), notes=tuple(notes))


def _task_vectors(series, headline, data, tables, notes) -> None:
    n, b = series.n, series.base_row
    d2 = series.dist2.sum(0)
    nsq_base = float(series.nsq[:, b].sum())
    rows = [i for i in range(n) if d2[i, b] > 0]
    k = len(rows)
    tcos = np.full((k, k), math.nan)
    conflict = np.full((k, k), math.nan)
    conf = series.sign_conflicts.sum(0)
    both = series.sign_both.sum(0)
    for a, i in enumerate(rows):
        for c, j in enumerate(rows):
            dot = (d2[i, b] + d2[j, b] - d2[i, j]) / 2
            tcos[a, c] = max(-1.0, min(1.0, dot / math.sqrt(d2[i, b] * d2[j, b])))
            conflict[a, c] = safe_div(conf[i, j], both[i, j]) if both[i, j] > 0 else math.nan
        tcos[a, a] = 1.0
    multi = float(series.sign_multi.sum())
    rate = float(series.sign_any_conflict.sum()) / multi if multi > 0 else math.nan
    off = _off_diagonal(tcos)
    headline["task_vectors"] = k
    headline["mean_task_cosine"] = float(off.mean()) if off.size else math.nan
    headline["sign_conflict_rate"] = rate
    labels = [series.labels[i] for i in rows]
    norms = [math.sqrt(max(d2[i, b], 0.0)) for i in rows]
    data["task_vectors"] = {
        "base": series.base_label, "checkpoints": [series.names[i] for i in rows], "norm": norms,
        "rel_norm": [safe_div(x, math.sqrt(nsq_base)) for x in norms],
        "cosine": tcos.tolist(), "pairwise_sign_conflict": conflict.tolist(),
        "sign_conflict_rate": rate, "elements_with_two_or_more_nonzero": multi,
    }
    headers = ("task vector", "norm", "rel_norm", *map(str, range(k)))
    data["task_vector_cosine"] = tcos.tolist()
    data["pairwise_sign_conflict"] = conflict.tolist()
    tables.append(Table("Task vector cosine", headers,
                        tuple((f"[{a}] {labels[a]}", norms[a], data["task_vectors"]["rel_norm"][a],
                               *map(float, tcos[a])) for a in range(k))))
    tables.append(Table("Pairwise sign conflict", ("task vector", *map(str, range(k))),
                        tuple((f"[{a}] {labels[a]}", *map(float, conflict[a])) for a in range(k))))
    skipped = [series.labels[i] for i in range(n) if i not in rows]
    if skipped:
        notes.append(f"no task vector for {', '.join(skipped)} (equal to the base)")
    notes.append("task vectors τ_i = θ_i − θ_base; sign conflict of τ_i, τ_j = share of positions, among those where "
                 "both are non-zero, where their signs differ; sign_conflict_rate = share of positions, among those "
                 "where ≥ 2 task vectors are non-zero, where some are > 0 and some < 0")
