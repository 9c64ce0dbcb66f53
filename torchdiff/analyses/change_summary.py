"""--change-summary: counts, global rel_l2 and cosine, top tensors and layers, change patterns.

Counts in tensors and parameters, bytes, global rel_l2 and cosine, the share of
parameters changed, top tensors and layers, and change patterns with their evidence.

Model tensors only (optimizer state is counted apart). Patterns: only biases/norms
changed, embeddings frozen, only the last k blocks changed, a low-rank update (the
effective rank of Δ of 2-D weights, from an SVD this analysis' hook computes in the
engine's pass), uniform drift. Formulas, thresholds and the SVD's cost:
docs/analyses/change_summary.md.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np
import torch

from torchdiff.analyses.sort_by_change_magnitude import change_key
from torchdiff.names import SCOPES, block_index, kind, layer_of
from torchdiff.figures import Comparison, group, layer_groups, stored_nbytes, summary_mask, tied_copies
from torchdiff.results import (
    ADDED, CHANGED, OLD_ALL_ZERO, REMOVED, RETYPED, STATUSES, UNCHANGED, AnalysisResult, Table,
)
from torchdiff.units import count, counted, human_bytes, number

NAME = "change_summary"
FLAG = "change_summary"
OPTIONS: dict = {}

TOP = 5                       # rows of the top-tensors and top-layers tables
ENERGY = 0.99                 # effective rank: fewest singular values holding 99% of ‖Δ‖²
LOW_RANK_FRACTION = 1 / 8     # low-rank update: rank99 ≤ max(1, min(m, n) / 8)
LOW_RANK_MIN_DIM = 16         # ... on matrices with min(m, n) ≥ 16
EXACT_MAX_DIM = 256           # exact spectrum when min(m, n) ≤ 256, else a randomized sketch
SKETCH = 64                   # sketch width (columns of the Gaussian test matrix)
GRAM_CHUNK = 1 << 20          # elements per float64 chunk of the exact Gram matrix
HELD_MAX = 1 << 24            # a Δ of at most this many elements is formed once for every pass
POWER_ITERATIONS = 0          # subspace iterations of the sketch (each adds 2 products)
UNIFORM_CHANGED = 0.9         # uniform drift: ≥ 90% of model tensors changed ...
UNIFORM_CV = 0.25             # ... and the coefficient of variation of their rel_l2 ≤ 0.25
UNIFORM_MIN = 3               # ... over at least 3 tensors
FROZEN_EMBED_LAYERS = 2       # embeddings frozen: identical while weight matrices changed in ≥ 2 layers
PATTERNS = ("only_biases_norms", "embeddings_frozen", "last_k_blocks", "low_rank", "uniform_drift")


# ---- the hook: effective rank of Δ ---------------------------------------------------


class _RankHook:
    name = NAME

    def __init__(self, scope: str = "params"):
        self.roles = SCOPES[scope]

    def wants(self, pair) -> bool:
        if pair.kind != "common" or len(pair.old.shape) != 2 or pair.role not in self.roles:
            return False
        if not (pair.old.dtype.is_floating_point and pair.new.dtype.is_floating_point):
            return False
        return min(pair.old.shape) >= LOW_RANK_MIN_DIM and kind(pair.name, 2) == "weight"

    def __call__(self, pair, old: torch.Tensor, new: torch.Tensor) -> dict[str, Any] | None:
        return delta_rank(new, old)


def delta_rank(new: torch.Tensor, old: torch.Tensor | None = None) -> dict[str, Any] | None:
    """Energy rank of a 2-D Δ = new − old (Δ = new when ``old`` is None): the fewest
    singular values whose squares hold ENERGY of ‖Δ‖_F².

    With Δ m × n, k = min(m, n) and A = Δ oriented k × N (Δ itself when m ≤ n, else Δᵀ),
    A is read as pieces A[:, J] of about GRAM_CHUNK elements (J a range of Δ's longer
    dimension; a piece is new − old over that range), and every product below is a sum
    over pieces. A Δ of at most HELD_MAX elements is formed once and its pieces serve
    every pass (the inputs are file mappings whose pages the engine has released: each
    pass over them reads the file again); a larger one is formed piece by piece in each
    pass, so that the memory beyond the inputs is one piece plus k × k or N × SKETCH
    matrices:

    - exact when k ≤ EXACT_MAX_DIM: σ² = eigenvalues of the k × k Gram matrix
      A Aᵀ = Σ_J A[:, J] A[:, J]ᵀ, in float64 (cost m·n·k multiply-adds plus a k³
      eigensolve);
    - else a randomized range finder (Halko, Martinsson & Tropp 2011): Y = A Ω =
      Σ_J A[:, J] Ω[J] with Ω an N × SKETCH Gaussian (seeded), POWER_ITERATIONS subspace
      iterations, Q = qr(Y), σ² = eigenvalues of (QᵀA)(QᵀA)ᵀ = Σ_J (QᵀA[:, J])(QᵀA[:, J])ᵀ
      (cost ≈ (2 + 2·POWER_ITERATIONS) matrix products of m·n·SKETCH). The sketch's
      top-r energy is at most Δ's, so a rank found by it is an upper bound of the true
      rank; ``rank99`` is None when the sketch holds < ENERGY of ‖Δ‖² (the rank is above
      SKETCH).

    None when Δ = 0. The rank does not depend on Δ's scale: Δ / max|Δ| is measured, so
    that an update of magnitude 1e-25 (squares 1e-50: zero in float32) is not taken for
    no update.
    """
    m, n = new.shape
    wide = m <= n
    k, big = (m, n) if wide else (n, m)
    step = max(1, GRAM_CHUNK // max(1, k))

    def formed():
        """(j0, A[:, j0:j0 + step]) over A's N columns."""
        for j0 in range(0, big, step):
            if wide:
                yield j0, new[:, j0:j0 + step] if old is None else new[:, j0:j0 + step] - old[:, j0:j0 + step]
            else:
                yield j0, (new[j0:j0 + step] if old is None else new[j0:j0 + step] - old[j0:j0 + step]).T

    held = list(formed()) if old is not None and k * big <= HELD_MAX else None

    def pieces(scale: float = 1.0, dtype: torch.dtype | None = None):
        """(j0, A[:, j0:j0 + step] / scale) over A's N columns."""
        for j0, d in held if held is not None else formed():
            if dtype is not None:
                d = d.to(dtype)
            yield j0, (d / scale if scale != 1.0 else d)

    peak = max((float(p.abs().amax()) for _, p in pieces()), default=0.0)  # non-finite when Δ holds NaN/Inf
    if not math.isfinite(peak):
        return {"rank99": None, "method": "skipped: non-finite values"}
    if peak == 0:
        return None
    device = new.device
    if k <= EXACT_MAX_DIM:
        gram = torch.zeros(k, k, dtype=torch.float64, device=device)
        for _, p in pieces(peak, torch.float64):
            gram += p @ p.T
        s2 = torch.linalg.eigvalsh(gram).flip(0).clamp(min=0)
        total = float(gram.trace())
        method, width = "exact", k
    else:
        total = sum(float(torch.linalg.vector_norm(p, dtype=torch.float64)) ** 2 for _, p in pieces(peak))
        dtype = new.dtype if old is None else torch.promote_types(new.dtype, old.dtype)
        gen = torch.Generator(device=device).manual_seed(0)
        omega = torch.randn(big, SKETCH, generator=gen, device=device, dtype=dtype)
        q = torch.linalg.qr(sum(p @ omega[j0:j0 + p.shape[1]] for j0, p in pieces(peak))).Q
        for _ in range(POWER_ITERATIONS):
            z = torch.cat([p.T @ q for _, p in pieces(peak)])  # Aᵀ Q, N × SKETCH
            q = torch.linalg.qr(sum(p @ z[j0:j0 + p.shape[1]] for j0, p in pieces(peak))).Q
        bbt = torch.zeros(SKETCH, SKETCH, dtype=torch.float64, device=device)
        for _, p in pieces(peak):
            b = (q.T @ p).to(torch.float64)
            bbt += b @ b.T
        s2 = torch.linalg.eigvalsh(bbt).flip(0).clamp(min=0)
        method, width = "randomized", SKETCH
    if total <= 0:
        return None
    energy = torch.cumsum(s2, 0) / total
    captured = float(energy[-1])
    reached = (energy >= ENERGY).nonzero()
    rank = int(reached[0]) + 1 if reached.numel() else None
    return {"rank99": rank, "min_dim": k, "method": method, "width": width, "captured": min(captured, 1.0)}


def hooks(options, state: dict) -> list:
    return [_RankHook(options.get("scope", "params"))]


# ---- the summary -------------------------------------------------------------------------


def _patterns(model, paired) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    moved = [d for d in paired if d.status in (CHANGED, RETYPED)]
    kinds = {d.name: kind(d.name, len((d.new or d.old).shape)) for d in model}
    if moved and all(kinds[d.name] in ("bias", "norm") for d in moved):
        params = sum(d.params for d in moved)
        found.append({"pattern": "only_biases_norms", "changed_tensors": len(moved), "changed_params": params,
                      "evidence": f"all {count(len(moved))} changed tensors ({count(params)} params) are biases or "
                                  f"normalisation parameters; {count(len(paired) - len(moved))} other tensors "
                                  "unchanged"})
    embeds = [d for d in paired if kinds[d.name] == "embedding"]
    moved_weights = [d for d in moved if kinds[d.name] == "weight"]
    weight_layers = {layer_of(d.name) for d in moved_weights}
    if embeds and len(weight_layers) >= FROZEN_EMBED_LAYERS and all(d.status == UNCHANGED for d in embeds):
        found.append({"pattern": "embeddings_frozen", "tensors": [d.name for d in embeds],
                      "evidence": f"{counted(len(embeds), 'embedding tensor')} identical "
                                  f"({', '.join(d.name for d in embeds[:3])}) "
                                  f"while {counted(len(moved_weights), 'weight matrix', 'weight matrices')} in "
                                  f"{count(len(weight_layers))} layers changed "
                                  f"(pattern needs ≥ {FROZEN_EMBED_LAYERS} layers)"})
    stacks: dict[str, dict[int, bool]] = defaultdict(dict)
    for d in model:
        layer = layer_of(d.name)
        idx = block_index(layer)
        if idx is None:
            continue
        stack = stacks[layer.rsplit(".", 1)[0]]
        stack[idx] = stack.get(idx, False) or d.status != UNCHANGED
    for name, blocks in sorted(stacks.items()):
        order = sorted(blocks)
        changed = [i for i in order if blocks[i]]
        if len(order) < 2 or not changed or len(changed) == len(order):
            continue
        k = len(changed)
        if changed == order[-k:]:
            found.append({"pattern": "last_k_blocks", "stack": name, "k": k, "blocks": len(order),
                          "changed_blocks": changed,
                          "evidence": f"in {name}.*, only the last {count(k)} of {count(len(order))} blocks changed "
                                      f"({', '.join(str(i) for i in changed)})"})
    low = []
    for d in moved:
        r = d.extras.get(NAME)
        if not r or r.get("rank99") is None:
            continue
        limit = max(1, int(r["min_dim"] * LOW_RANK_FRACTION))
        if r["rank99"] <= limit:
            low.append({"path": d.name, "shape": list(d.new.shape), "rank99": r["rank99"], "limit": limit,
                        "method": r["method"], "captured": r["captured"]})
    if low:
        found.append({"pattern": "low_rank", "tensors": low,
                      "evidence": "; ".join(f"{e['path']} {e['shape']}: Δ has {ENERGY:.0%} of its energy in "
                                            f"{count(e['rank99'])} singular values (≤ {count(e['limit'])} = min dim/"
                                            f"{round(1 / LOW_RANK_FRACTION)}, {e['method']} spectrum)" for e in low)})
    rels = [d.metrics.rel_l2 for d in moved]
    # every rel_l2 finite: a tensor that moved off all zeros (LoRA's B) is no uniform drift
    if (paired and len(rels) >= UNIFORM_MIN and len(moved) / len(paired) >= UNIFORM_CHANGED
            and all(math.isfinite(r) for r in rels)):
        mean = sum(rels) / len(rels)
        cv = math.sqrt(sum((x - mean) ** 2 for x in rels) / len(rels)) / mean if mean > 0 else math.inf
        if cv <= UNIFORM_CV:
            found.append({"pattern": "uniform_drift", "cv": cv, "mean_rel_l2": mean, "tensors": len(rels),
                          "evidence": f"{count(len(moved))} of {count(len(paired))} tensors changed with rel_l2 "
                                      f"{number(mean)} on average, coefficient of variation {number(cv)} "
                                      f"≤ {UNIFORM_CV:g}"})
    return found


def analyze(comparison: Comparison, options, state: dict) -> AnalysisResult:
    if comparison.mode == "inspect":
        return AnalysisResult(NAME, {}, {}, (), ("a change summary needs two checkpoints (torchdiff OLD NEW)",))
    fig = comparison.figures
    in_scope = fig.in_scope(comparison.scope)
    summarised = summary_mask(fig, comparison.scope)
    model = [fig[i] for i in np.flatnonzero(in_scope)]
    others = [fig[i] for i in np.flatnonzero(~in_scope)]
    paired = [fig[i] for i in np.flatnonzero(summarised)]
    tensor_counts = {s: 0 for s in STATUSES}
    param_counts = {s: 0 for s in STATUSES}
    copies = tied_copies(fig)
    for i, d in zip(np.flatnonzero(in_scope).tolist(), model):
        tensor_counts[d.status] += 1
        param_counts[d.status] += 0 if copies[i] else d.params  # a tied weight's parameters once
    old_bytes = int(stored_nbytes(fig, "old")[in_scope].sum())  # each storage once, as the file holds it
    new_bytes = int(stored_nbytes(fig, "new")[in_scope].sum())
    total = group(fig, "all", summarised).get("all") if summarised.any() else None
    numel = int(fig.count[summarised].sum())
    g = {"l2": total.l2 if total else 0.0, "rel_l2": total.rel_l2 if total else 0.0,
         "cosine": total.cosine if total else 1.0,
         "changed_element_fraction": int(fig.changed_count[summarised].sum()) / numel if numel else 0.0}
    total_params = sum(d.params for d in paired)
    moved_params = sum(d.params for d in paired if d.status in (CHANGED, RETYPED))

    layer_figures = layer_groups(fig, comparison.scope, comparison.layer)
    layer_rows = [{"layer": name, "rel_l2": f.rel_l2, "energy_share": f.share, "changed_tensors": f.changed,
                   "params": f.params} for name, f in layer_figures.items()]
    layers_changed = sum(1 for r in layer_rows if r["changed_tensors"])
    top_layers = sorted((r for r in layer_rows if r["changed_tensors"]),
                        key=lambda r: (-r["energy_share"], r["layer"]))[:TOP]
    moved = [d for d in paired if d.status in (CHANGED, RETYPED)]
    # most changed first, zero-initialised tensors after the measured ones by ‖Δ‖: the
    # order of --sort-by-change-magnitude (its one sort key)
    top_tensors = sorted(moved, key=change_key)[:TOP]
    patterns = _patterns(model, paired)

    headline = {"layers_changed": layers_changed, "magnitude": g["rel_l2"],
                "patterns": [p["pattern"] for p in patterns]}
    data: dict[str, Any] = {
        "tensor_counts": tensor_counts, "param_counts": param_counts,
        "bytes_old": old_bytes, "bytes_new": new_bytes,
        "global_l2": g["l2"], "global_rel_l2": g["rel_l2"], "global_cosine": g["cosine"],
        "changed_param_fraction": moved_params / total_params if total_params else 0.0,
        "changed_element_fraction": g["changed_element_fraction"],
        "layers": len(layer_rows),
        "scope": comparison.scope,
        "pattern_evidence": patterns,
        "thresholds": {"energy": ENERGY, "low_rank_fraction": LOW_RANK_FRACTION, "low_rank_min_dim": LOW_RANK_MIN_DIM,
                       "exact_max_dim": EXACT_MAX_DIM, "sketch": SKETCH, "uniform_changed": UNIFORM_CHANGED,
                       "uniform_cv": UNIFORM_CV, "frozen_embed_layers": FROZEN_EMBED_LAYERS},
    }
    by_role: dict[str, list] = defaultdict(list)
    for d in others:
        by_role[d.role].append(d)
    if by_role:  # buffers, counters, optimizer state: their own groups, counted, not summarised
        data["other_roles"] = {r: {s: sum(1 for d in ds if d.status == s) for s in STATUSES} for r, ds in by_role.items()}
    counts_rows = tuple((s, tensor_counts[s], param_counts[s]) for s in STATUSES if tensor_counts[s])
    tables = (
        Table("Counts", ("status", "tensors", "params"), counts_rows),
        Table("Top tensors", ("tensor", "rel_l2", "l2", "cosine", "changed_fraction"),
              tuple(_top_tensor_row(d) for d in top_tensors)),
        Table("Top layers", ("layer", "energy_share", "rel_l2", "changed_tensors", "params"),
              tuple((r["layer"], r["energy_share"],
                     OLD_ALL_ZERO if layer_figures[r["layer"]].old_all_zero else r["rel_l2"],
                     r["changed_tensors"], r["params"]) for r in top_layers)),
    )
    notes = [f"magnitude = global rel_l2 = sqrt(Σ‖Δ‖² / Σ‖old‖²) = {number(g['rel_l2'])}, global cosine = "
             f"{number(g['cosine'])}, over {count(len(paired))} same-shape tensors; params in changed tensors: "
             f"{count(moved_params)} of {count(total_params)} (fraction {number(data['changed_param_fraction'])}); "
             f"fraction of elements changed: {number(g['changed_element_fraction'])}; "
             f"bytes {human_bytes(old_bytes)}->{human_bytes(new_bytes)}"]
    notes += [f"{p['pattern']}: {p['evidence']}" for p in patterns]
    for r, c in data.get("other_roles", {}).items():
        notes.append(f"{r.replace('_', ' ')} not summarised (--scope {comparison.scope}): "
                     f"{counted(sum(c.values()), 'tensor')} ({count(c[CHANGED])} changed, {count(c[ADDED])} added, {count(c[REMOVED])} removed)")
    nonfinite = [(d.name, d.nonfinite_change) for d in model]
    nonfinite = [(n, c) for n, c in nonfinite if c]
    if nonfinite:  # the figures cover positions finite on both sides: say what they leave out
        data["nonfinite_changed"] = [{"tensor": n, **{k: list(v) for k, v in c.items()}} for n, c in nonfinite]
        shown = ", ".join(f"{n} (" + ", ".join(f"{k} {count(a)}->{count(b)}" for k, (a, b) in c.items()) + ")"
                          for n, c in nonfinite[:3])
        notes.append(f"{counted(len(nonfinite), 'tensor')} gained or lost NaN/Inf, which the figures above leave out "
                     f"(they cover positions finite on both sides): {shown}" + (" ..." if len(nonfinite) > 3 else ""))
    skipped = [d.name for d in moved if str((d.extras.get(NAME) or {}).get("method", "")).startswith("skipped")]
    if skipped:
        notes.append(f"low-rank check skipped for {counted(len(skipped), 'tensor')} whose Δ holds NaN/Inf: "
                     + ", ".join(skipped[:3]) + (" ..." if len(skipped) > 3 else ""))
    if not any(d.extras.get(NAME) for d in moved) and any(len(d.new.shape) == 2 for d in moved):
        notes.append(f"low-rank check: no changed 2-D weight with min dim ≥ {LOW_RANK_MIN_DIM}")
    return AnalysisResult(NAME, headline, data, tables, tuple(notes))


def _top_tensor_row(d) -> tuple:
    """A row of the top-tensors table. A tensor whose old side is all zero (rel_l2 ∞,
    cosine undefined: TensorDiff.old_all_zero) shows the label ``old all zero`` and
    ``n/a`` instead; its ‖Δ‖ (l2) measures the change."""
    m = d.metrics
    if d.old_all_zero:
        return (d.name, OLD_ALL_ZERO, m.l2, "n/a", m.changed_fraction)
    return (d.name, m.rel_l2, m.l2, m.cosine, m.changed_fraction)
