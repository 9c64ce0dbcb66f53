"""--convergence-analysis: whether training is settling: update sizes, their trend, oscillation, plateau.

For a pair: the relative update r = ‖θ_new − θ_old‖/‖θ_old‖, globally and per layer
(a trend needs three or more checkpoints: ``torchdiff series``). For a series
(``analyze_series``): per step t and per layer the update u_t = ‖θ_{t+1} − θ_t‖,
r_t = u_t/‖θ_t‖, the trend (least-squares slope of ln r_t per checkpoint interval, with
R²), the cosine between successive updates, the distance from the first checkpoint, and
a status decided by the rules below (docs/analyses/convergence_analysis.md).

Status rules, first match wins (thresholds printed beside the label):
  diverging    non-finite values; or an update larger than the weights (max r_t > 1);
               or ‖θ_last‖/‖θ_first‖ > 10
  plateaued    r_t < plateau_threshold (1e-3) for the last plateau_steps (2) steps
  diverging    recent trend > +0.1 (r grows > 10 %/interval)
  oscillating  mean cosine between successive recent updates < −0.2
  converging   recent trend < −0.05 (r shrinks > 5 %/interval)
  steady       none of these: updates of constant relative size
The recent window is the last half of the steps, at least 3 (all steps when fewer).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from torchdiff.analyses._training import (
    fit_line, safe_div,
)
from torchdiff.figures import group, summary_mask
from torchdiff.errors import UsageError
from torchdiff.names import OPTIMIZER_STATE, TRAINING_STATE
from torchdiff.results import AnalysisResult, Table
from torchdiff.units import count, counted, number

NAME = "convergence_analysis"
FLAG = "convergence_analysis"
OPTIONS: dict[str, tuple[Any, str]] = {
    "sort": (None, "series order: natural sorts by the numbers in the names (epoch_2 before epoch_10); "
                   "default: as given"),
    "plateau_threshold": (1e-3, "convergence: relative update r_t under which a step is flat"),
    "plateau_steps": (2, "convergence: consecutive flat steps that make a plateau"),
}

DIVERGE_REL_UPDATE = 1.0
DIVERGE_GROWTH = 10.0
DIVERGE_TREND = 0.1
OSCILLATE_COSINE = -0.2
CONVERGE_TREND = -0.05
FIT_R2_FOR_PROJECTION = 0.9
FIT_POINTS_FOR_PROJECTION = 3  # a line through two points has R² = 1 whatever they are
#: Roles never measured for convergence, whatever --scope: the optimizer's state and the
#: training loop's (step counters, moments, RNG states) are not the weights that settle;
#: a series leaves them out too (torchdiff.series).
NOT_WEIGHTS = (OPTIMIZER_STATE, TRAINING_STATE)


def validate(options) -> None:
    try:
        options["plateau_threshold"] = float(options.get("plateau_threshold", 1e-3))
    except (TypeError, ValueError):
        raise UsageError(f"--plateau-threshold must be a number, got {options.get('plateau_threshold')!r}") from None
    if not options["plateau_threshold"] > 0:
        raise UsageError("--plateau-threshold must be > 0")
    try:
        steps = options.get("plateau_steps", 2)
        if isinstance(steps, float) and not steps.is_integer():
            raise ValueError
        options["plateau_steps"] = int(steps)
    except (TypeError, ValueError):
        raise UsageError(f"--plateau-steps must be a whole number, got {options.get('plateau_steps')!r}") from None
    if options["plateau_steps"] < 1:
        raise UsageError("--plateau-steps must be ≥ 1")


def rules_text(options) -> str:
    return (f"rules (first match): diverging if non-finite values, max r_t > {DIVERGE_REL_UPDATE:g} or "
            f"‖θ_last‖/‖θ_first‖ > {DIVERGE_GROWTH:g}; "
            f"plateaued if r_t < {options['plateau_threshold']:g} for the last {options['plateau_steps']} steps; "
            f"diverging if recent trend > +{DIVERGE_TREND:g}; "
            f"oscillating if mean successive-update cosine < {OSCILLATE_COSINE:g}; "
            f"converging if recent trend < {CONVERGE_TREND:g}; else steady")


def _rules(options) -> dict[str, float]:
    return {
        "diverge_rel_update": DIVERGE_REL_UPDATE, "diverge_growth": DIVERGE_GROWTH, "diverge_trend": DIVERGE_TREND,
        "plateau_threshold": options["plateau_threshold"], "plateau_steps": options["plateau_steps"],
        "oscillate_cosine": OSCILLATE_COSINE, "converge_trend": CONVERGE_TREND,
    }


# ---- figures from norms and pairwise distances ------------------------------------------

def figures(nsq: np.ndarray, dist2: np.ndarray) -> dict[str, Any]:
    """Per-step figures from ‖θ_i‖² (N,) and ‖θ_i − θ_j‖² (N, N)."""
    n = len(nsq)
    norm = np.sqrt(np.maximum(nsq, 0.0))
    u2 = np.array([dist2[t, t + 1] for t in range(n - 1)])
    u = np.sqrt(np.maximum(u2, 0.0))
    r = np.array([safe_div(u[t], norm[t]) for t in range(n - 1)])
    cos = [math.nan]
    for t in range(1, n - 1):
        # ⟨Δ_{t-1}, Δ_t⟩ = (‖θ_{t+1} − θ_{t-1}‖² − u_{t-1}² − u_t²)/2
        denom = u[t - 1] * u[t]
        dot = (dist2[t - 1, t + 1] - u2[t - 1] - u2[t]) / 2
        cos.append(max(-1.0, min(1.0, dot / denom)) if denom > 0 else math.nan)
    dist_first = np.sqrt(np.maximum(dist2[0, 1:], 0.0))
    rel_first = np.array([safe_div(d, norm[0]) for d in dist_first])
    steps = n - 1
    window = steps if steps < 3 else max(3, math.ceil(steps / 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        log_r = np.where(r > 0, np.log(np.where(r > 0, r, 1.0)), np.nan)
    log_r[~np.isfinite(log_r)] = np.nan
    x = np.arange(steps, dtype=np.float64)
    trend = fit_line(x, log_r) if steps >= 2 else None
    recent = fit_line(x[-window:], log_r[-window:]) if steps >= 2 else None
    recent_cos = [c for c in cos[-window:] if math.isfinite(c)]
    return {
        "norm": norm, "update_norm": u, "rel_update": r, "update_cosine": np.array(cos),
        "distance_from_first": dist_first, "rel_distance_from_first": rel_first,
        "growth": safe_div(norm[-1], norm[0]) if norm[0] > 0 else math.nan,
        "trend": trend, "recent": recent, "window": window,
        "recent_cosine": float(np.mean(recent_cos)) if recent_cos else math.nan,
    }


def decide(fig: dict[str, Any], nonfinite: float, options) -> tuple[str, str]:
    """(status, reason) by the rules in the module docstring."""
    r = fig["rel_update"]
    steps = len(r)
    if nonfinite:
        return "diverging", counted(int(nonfinite), "non-finite value position")
    finite_r = [(v, t) for t, v in enumerate(r) if math.isfinite(v)]
    if finite_r:
        rmax, tmax = max(finite_r)
        if rmax > DIVERGE_REL_UPDATE:
            return "diverging", f"rel_update {number(rmax)} > {DIVERGE_REL_UPDATE:g} at step {tmax}"
    growth = fig["growth"]
    if math.isfinite(growth) and growth > DIVERGE_GROWTH:
        return "diverging", f"weight norm grew {number(growth)}× > {DIVERGE_GROWTH:g}×"
    if steps < 2:
        return "undetermined", "a trend needs ≥ 3 checkpoints"
    k, thr = options["plateau_steps"], options["plateau_threshold"]
    if steps >= k and all(math.isfinite(v) and v < thr for v in r[-k:]):
        return "plateaued", f"rel_update < {thr:g} for the last {counted(k, 'step')} (last {number(r[-1])})"
    recent = fig["recent"]
    if recent is not None and recent.slope > DIVERGE_TREND:
        return "diverging", f"recent trend {number(recent.slope, signed=True)} > +{DIVERGE_TREND:g}"
    cos = fig["recent_cosine"]
    if math.isfinite(cos) and cos < OSCILLATE_COSINE:
        return "oscillating", f"mean successive-update cosine {number(cos)} < {OSCILLATE_COSINE:g}"
    if recent is not None and recent.slope < CONVERGE_TREND:
        return "converging", f"recent trend {number(recent.slope, signed=True)} < {CONVERGE_TREND:g}"
    if recent is None:
        return "undetermined", "no finite relative updates to fit"
    return "steady", f"recent trend {number(recent.slope, signed=True)} within [{CONVERGE_TREND:g}, +{DIVERGE_TREND:g}]"


def _f(x: Any) -> float:
    return float(x) if x is not None else math.nan


# ---- pair -------------------------------------------------------------------------------

def analyze(comparison, options, state: dict) -> AnalysisResult | None:
    """Pair mode: r = ‖Δθ‖/‖θ_old‖ globally and per layer (the weights in --scope)."""
    if comparison.mode != "pair":
        return AnalysisResult(NAME, {"status": "undetermined"},
                              notes=("convergence needs two checkpoints (torchdiff OLD NEW), and a trend three or "
                                     "more (torchdiff series C1 C2 C3 ...)",))
    fig = comparison.figures
    # the global figures' rows (a tied weight once), without optimizer and training state
    mask = summary_mask(fig, comparison.scope) & np.array([r not in NOT_WEIGHTS for r in fig.role], dtype=bool)
    layers = group(fig, comparison.layer, mask) if mask.any() else {}
    if not layers:
        return AnalysisResult(NAME, {"status": "undetermined"},
                              notes=("no floating-point parameters in both checkpoints",))
    nonfinite = int((fig.new.nan_count[mask] + fig.new.inf_count[mask]).sum())
    u2 = sum(g.dsq for g in layers.values())
    o2 = sum(g.old_sq for g in layers.values())
    n2 = sum(g.new_sq for g in layers.values())
    nsq = np.array([o2, n2])
    dist2 = np.array([[0.0, u2], [u2, 0.0]])
    fig = figures(nsq, dist2)
    status, reason = decide(fig, nonfinite, options)
    rows, per_layer = [], []
    for layer, g in layers.items():
        params, lu2, lo2, ln2 = g.params, g.dsq, g.old_sq, g.new_sq
        r = safe_div(math.sqrt(lu2), math.sqrt(lo2))
        rows.append((layer, int(params), r, math.sqrt(lu2), math.sqrt(lo2)))
        per_layer.append({"layer": layer, "params": int(params), "rel_update": r, "update_norm": math.sqrt(lu2),
                          "norm_old": math.sqrt(lo2), "norm_new": math.sqrt(ln2)})
    headline = {"status": status, "rel_update": float(fig["rel_update"][0]),
                "update_norm": float(fig["update_norm"][0]), "weight_norm": float(fig["norm"][0])}
    return AnalysisResult(
        NAME, headline,
        data={"mode": "pair", "reason": reason, "rules": _rules(options), "per_layer": per_layer,
              "trend": None},
        tables=(Table("Per layer", ("layer", "params", "rel_update", "update_norm", "weight_norm"), tuple(rows)),),
        notes=(f"status {status}: {reason}",
               "for a trend: torchdiff series C1 C2 C3 ... --convergence-analysis",
               rules_text(options)),
    )


# ---- series -----------------------------------------------------------------------------

def analyze_series(series, options) -> AnalysisResult:
    """Series mode: the figures of each step and layer, a trend, and a status."""
    n = series.n
    labels = series.labels
    nsq_l = series.nsq[:, :n]
    d2_l = series.dist2[:, :n, :n]
    if not series.layers:
        return AnalysisResult(NAME, {"status": "undetermined"},
                              notes=("no floating-point parameters common to every checkpoint",))
    fig = figures(nsq_l.sum(0), d2_l.sum(0))
    bad = float(series.nonfinite.sum())
    status, reason = decide(fig, bad, options)
    steps = n - 1
    per_step, step_rows = [], []
    for t in range(steps):
        c = fig["update_cosine"][t]
        per_step.append({
            "step": t, "old": series.names[t], "new": series.names[t + 1],
            "update_norm": float(fig["update_norm"][t]), "rel_update": float(fig["rel_update"][t]),
            "update_cosine": float(c), "distance_from_first": float(fig["distance_from_first"][t]),
            "rel_distance_from_first": float(fig["rel_distance_from_first"][t]),
            "weight_norm": float(fig["norm"][t + 1]),
        })
        step_rows.append((f"{labels[t]} -> {labels[t + 1]}", float(fig["update_norm"][t]), float(fig["rel_update"][t]),
                          float(c) if math.isfinite(c) else "", float(fig["distance_from_first"][t]),
                          float(fig["rel_distance_from_first"][t])))
    per_layer, layer_rows = [], []
    for li, layer in enumerate(series.layers):
        lf = figures(nsq_l[li], d2_l[li])
        ls, lreason = decide(lf, float(series.nonfinite[li]), options)
        rec = lf["recent"]
        per_layer.append({
            "layer": layer, "params": int(series.layer_params[li]), "status": ls, "reason": lreason,
            "rel_update": [float(v) for v in lf["rel_update"]],
            "update_norm": [float(v) for v in lf["update_norm"]],
            "update_cosine": [float(v) for v in lf["update_cosine"]],
            "rel_distance_from_first": [float(v) for v in lf["rel_distance_from_first"]],
            "trend": _f(lf["trend"].slope if lf["trend"] else None),
            "recent_trend": _f(rec.slope if rec else None), "recent_r2": _f(rec.r2 if rec else None),
        })
        layer_rows.append((layer, int(series.layer_params[li]), float(lf["rel_update"][-1]),
                           _f(rec.slope if rec else None), _f(rec.r2 if rec else None),
                           lf["recent_cosine"], float(lf["rel_distance_from_first"][-1]), ls))
    trend, recent = fig["trend"], fig["recent"]
    headline = {
        "status": status,
        "rel_update": float(fig["rel_update"][-1]),
        "trend": _f(trend.slope if trend else None),
        "fit_r2": _f(trend.r2 if trend else None),
        "recent_trend": _f(recent.slope if recent else None),
        "update_cosine": fig["recent_cosine"],
        "drift": float(fig["rel_distance_from_first"][-1]),
        "steps": steps,
    }
    notes = [f"status {status}: {reason}"]
    data: dict[str, Any] = {
        "mode": "series", "reason": reason, "rules": _rules(options), "recent_window": fig["window"],
        "recent_fit_r2": _f(recent.r2 if recent else None), "weight_growth": fig["growth"],
        "checkpoints": list(series.names), "per_step": per_step, "per_layer": per_layer,
    }
    if steps < 2:
        notes.append("a trend needs ≥ 3 checkpoints")
    thr = options["plateau_threshold"]
    r_last = float(fig["rel_update"][-1])
    if (status == "converging" and recent is not None and recent.r2 >= FIT_R2_FOR_PROJECTION
            and recent.points >= FIT_POINTS_FOR_PROJECTION and math.isfinite(r_last) and r_last > thr):
        intervals = math.ceil((math.log(thr) - math.log(r_last)) / recent.slope)
        data["intervals_to_plateau"] = intervals
        notes.append(f"projection: about {counted(intervals, 'more checkpoint interval')} until r_t < {thr:g}, assuming "
                     f"ln r_t keeps falling linearly at the recent trend {number(recent.slope, signed=True)}/interval "
                     f"(fit over the last {count(recent.points)} steps, R²={number(recent.r2)}) and the same spacing")
    notes.append(rules_text(options))
    return AnalysisResult(
        NAME, headline, data=data,
        tables=(
            Table("Per step", ("step", "update_norm", "rel_update", "update_cosine", "distance_from_first",
                               "rel_distance"), tuple(step_rows)),
            Table("Per layer", ("layer", "params", "rel_update", "recent_trend", "recent_r2", "update_cosine",
                                "drift", "status"), tuple(layer_rows)),
        ),
        notes=tuple(notes),
    )
