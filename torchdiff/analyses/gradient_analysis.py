"""--gradient-analysis: gradient size and flow per layer, from Adam state, else from updates and the learning rate.

Sources, first available (docs/analyses/gradient_analysis.md):

- ``adam_state``: the checkpoint holds torch Adam/AdamW state (``P.state.K.exp_avg``,
  ``exp_avg_sq``, ``step``; ``P.param_groups.G.lr/betas/eps/params``). State index K is
  mapped to a parameter name by param_groups order against the model tensors' order,
  with a shape check (_training.build_adam_plan). With m̂ = exp_avg/(1 − β1^t),
  v̂ = exp_avg_sq/(1 − β2^t) and d = m̂/(√v̂ + ε), per layer: gradient RMS √(Σv̂/n),
  signal-to-noise √(Σm̂²/Σv̂), Adam's step RMS lr·√(Σd²/n), and the step/weight ratio
  lr·√(Σd²)/‖θ‖. ``norm`` = √(Σv̂) over all parameters.
- ``sgd_implied``: no Adam state but a learning rate (``--lr``, else the old checkpoint's
  ``lr``/``learning_rate``/param group lr): ĝ = −Δθ/(lr·k), k = the difference of the
  checkpoints' ``step`` values when both record one, else 1; for SGD with momentum μ
  (the checkpoint's param group) ĝ = −Δθ·(1−μ)/((1−dampening)·lr·k). ``norm`` = ‖ĝ‖.
- ``update_statistics``: neither, or the state of an adaptive optimizer (RMSprop,
  Adagrad, ...: its Δθ/lr is no gradient) without ``--lr``: the update itself per layer
  (rms of Δθ, ‖Δθ‖/‖θ‖), labelled as updates, not gradients. ``norm`` = ‖Δθ‖.

Flow: a layer's gradient RMS (update/weight ratio for update statistics) divided by the
median over layers. Flags: vanishing when flow < 0.01, exploding when flow > 100 or the
figure is not finite. ``flow_health`` = healthy (no flag), vanishing, exploding or mixed.
"""

from __future__ import annotations

import math
from typing import Any

from torchdiff.analyses._training import (
    AdamPlan, OptimizerKind, adam_sums, build_adam_plan, layer_key, lr_from_metadata, median_or_nan,
    optimizer_kind, safe_div, step_from_metadata,
)
from torchdiff.figures import group, summary_mask
from torchdiff.names import is_float_storage
from torchdiff.errors import UsageError
from torchdiff.results import AnalysisResult, Table
from torchdiff.units import count, counted, number

NAME = "gradient_analysis"
FLAG = "gradient_analysis"
OPTIONS: dict[str, tuple[Any, str]] = {
    "lr": (0.0, "gradient: learning rate for ĝ = −Δθ/lr when the checkpoints record none (0 = unknown)"),
}
ENABLED_BY = ("lr",)

FLOW_VANISHING = 0.01
FLOW_EXPLODING = 100.0
ADAM, SGD, UPDATES = "adam_state", "sgd_implied", "update_statistics"
_STASH = "plans"  # per-run state key, set by prepare()


def validate(options) -> None:
    try:
        lr = float(options.get("lr") or 0.0)
    except (TypeError, ValueError):
        raise UsageError(f"--lr must be a number, got {options.get('lr')!r}") from None
    if not math.isfinite(lr) or lr < 0:
        raise UsageError(f"--lr must be a positive number, got {lr}")
    options["lr"] = lr


def flow_rule() -> str:
    return (f"flow = layer figure / median over layers; vanishing if flow < {FLOW_VANISHING:g}, "
            f"exploding if flow > {FLOW_EXPLODING:g} or not finite")


# ---- pair: Adam moments through an engine hook -----------------------------------------

def _plan_of(ckpt) -> AdamPlan | None:
    specs = [(name, tuple(h.shape), is_float_storage(h.storage_dtype)) for name, h in ckpt.tensors.items()]
    return build_adam_plan(specs, ckpt.metadata)


def prepare(old, new, options, state: dict):
    """Finds the Adam state of both sides (headers only) for the hook; changes nothing."""
    state[_STASH] = {"old": _plan_of(old), "new": _plan_of(new)}
    return old, new


class _AdamHook:
    """Reduces each parameter's (exp_avg, exp_avg_sq, step) once all three have passed.

    The engine hands tensors one name at a time; the first ones of a state index wait
    here (one index at a time in torch's order) until the last arrives.
    """

    name = NAME

    def __init__(self, plans: dict[str, AdamPlan | None]):
        self.index = {side: plan.by_tensor() for side, plan in plans.items() if plan is not None}
        self.pending: dict[tuple[str, str], dict[str, Any]] = {}

    def wants(self, pair) -> bool:
        return any(pair.name in idx for idx in self.index.values())

    def __call__(self, pair, old, new):
        out = {}
        for side, tensor in (("old", old), ("new", new)):
            entry = self.index.get(side, {}).get(pair.name)
            if entry is None or tensor is None:
                continue
            p, field = entry
            slot = self.pending.setdefault((side, p.key), {})
            slot[field] = tensor
            need = {"exp_avg", "exp_avg_sq"} | ({"step"} if p.step is not None else set())
            if not need <= set(slot):
                continue
            del self.pending[(side, p.key)]
            step = slot["step"] if p.step is not None else p.step_value
            m, v = slot["exp_avg"], slot["exp_avg_sq"]
            if step is None or m.shape != v.shape:
                continue
            out[side] = {"key": p.key, "numel": m.numel(),
                         "sums": adam_sums(m, v, step, p.beta1, p.beta2, p.eps).tolist()}
        return out or None


def hooks(options, state: dict):
    plans = state.get(_STASH) or {}
    if not any(plans.values()):
        return []
    return [_AdamHook(plans)]


# ---- figures --------------------------------------------------------------------------

def _flows(values: dict[str, float]) -> tuple[dict[str, float], dict[str, str]]:
    med = median_or_nan(v for v in values.values() if v > 0)
    flows, flags = {}, {}
    for layer, v in values.items():
        flow = safe_div(v, med) if math.isfinite(med) and med > 0 else math.nan
        flows[layer] = flow
        if not math.isfinite(v):
            flags[layer] = "exploding"
        elif math.isfinite(flow) and flow > FLOW_EXPLODING:
            flags[layer] = "exploding"
        elif math.isfinite(flow) and flow < FLOW_VANISHING:
            flags[layer] = "vanishing"
    return flows, flags


def _health(flags: dict[str, str]) -> str:
    kinds = set(flags.values())
    if not kinds:
        return "healthy"
    return kinds.pop() if len(kinds) == 1 else "mixed"


def adam_layers(entries: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per-layer Adam figures from per-parameter sums.

    Each entry: layer, n, sum_vhat, sum_mhat2, sum_d2, lr (None if unknown), weight_sq
    (None if unknown), and optionally observed_u2 / observed_w2 (an update seen between
    two checkpoints).
    """
    acc: dict[str, dict[str, float]] = {}
    for e in entries:
        a = acc.setdefault(e["layer"], {"params": 0.0, "vhat": 0.0, "mhat2": 0.0, "step2": 0.0, "w2": 0.0,
                                        "lr_known": True, "w_known": True, "ou2": 0.0, "ow2": 0.0, "observed": False})
        a["params"] += e["n"]
        a["vhat"] += e["sum_vhat"]
        a["mhat2"] += e["sum_mhat2"]
        if e.get("lr") is None:
            a["lr_known"] = False
        else:
            a["step2"] += e["lr"] ** 2 * e["sum_d2"]
        if e.get("weight_sq") is None:
            a["w_known"] = False
        else:
            a["w2"] += e["weight_sq"]
        if e.get("observed_u2") is not None:
            a["observed"] = True
            a["ou2"] += e["observed_u2"]
            a["ow2"] += e["observed_w2"]
    out = {}
    for layer, a in acc.items():
        n = a["params"]
        out[layer] = {
            "params": int(n),
            "grad_rms": math.sqrt(a["vhat"] / n) if n else math.nan,
            "grad_norm": math.sqrt(max(a["vhat"], 0.0)),
            "snr": math.sqrt(safe_div(a["mhat2"], a["vhat"])) if a["vhat"] > 0 else math.nan,
            "step_rms": math.sqrt(a["step2"] / n) if a["lr_known"] and n else math.nan,
            "update_ratio": safe_div(math.sqrt(a["step2"]), math.sqrt(a["w2"]))
            if a["lr_known"] and a["w_known"] else math.nan,
            "observed_update_ratio": safe_div(math.sqrt(a["ou2"]), math.sqrt(a["ow2"])) if a["observed"] else math.nan,
            "_vhat": a["vhat"], "_mhat2": a["mhat2"], "_step2": a["step2"] if a["lr_known"] else math.nan,
        }
    return out


def _adam_result(layers: dict[str, dict[str, float]], extra_headline: dict[str, Any], notes: list[str],
                 data: dict[str, Any], extra_tables: tuple = ()) -> AnalysisResult:
    flows, flags = _flows({k: v["grad_rms"] for k, v in layers.items()})
    vhat = sum(v["_vhat"] for v in layers.values())
    mhat2 = sum(v["_mhat2"] for v in layers.values())
    step2 = sum(v["_step2"] for v in layers.values())
    n = sum(v["params"] for v in layers.values())
    rows, per_layer = [], []
    for layer, v in layers.items():
        rows.append((layer, v["params"], v["grad_rms"], v["snr"], v["step_rms"], v["update_ratio"], flows[layer],
                     flags.get(layer, "")))
        per_layer.append({"layer": layer, **{k: x for k, x in v.items() if not k.startswith("_")},
                          "flow": flows[layer], "flag": flags.get(layer)})
    headline = {
        "source": ADAM, "flow_health": _health(flags), "norm": math.sqrt(max(vhat, 0.0)),
        "grad_rms": math.sqrt(vhat / n) if n else math.nan,
        "snr": math.sqrt(safe_div(mhat2, vhat)) if vhat > 0 else math.nan,
        "step_rms": math.sqrt(step2 / n) if n and math.isfinite(step2) else math.nan,
        **extra_headline,
    }
    notes = list(notes) + [
        "grad_rms = √(Σv̂/n) with v̂ = exp_avg_sq/(1−β2^t); snr = √(Σm̂²/Σv̂) (1: the same gradient every step; "
        "about √((1−β1)/(1+β1)) for pure noise); step_rms = lr·rms(m̂/(√v̂+ε)); update_ratio = that step / ‖θ‖",
        flow_rule(),
    ]
    return AnalysisResult(
        NAME, headline, data={**data, "per_layer": per_layer},
        tables=extra_tables + (Table("Per layer", ("layer", "params", "grad_rms", "snr", "step_rms", "update_ratio",
                                                   "flow", "flag"), tuple(rows)),),
        notes=tuple(notes),
    )


def update_layers(u2: dict[str, float], w2: dict[str, float], params: dict[str, float],
                  scale: float | None) -> dict[str, dict[str, float]]:
    """Per-layer update figures; ``scale`` (lr·k, see _implied) turns them into SGD-implied gradients."""
    out = {}
    for layer in u2:
        n = params[layer]
        rms = math.sqrt(u2[layer] / n) if n else math.nan
        fig = {"params": int(n), "update_rms": rms, "update_norm": math.sqrt(max(u2[layer], 0.0)),
               "update_ratio": safe_div(math.sqrt(max(u2[layer], 0.0)), math.sqrt(max(w2[layer], 0.0)))}
        if scale is not None:
            fig["grad_rms"] = rms / scale
            fig["grad_norm"] = fig["update_norm"] / scale
        out[layer] = fig
    return out


def _update_result(layers: dict[str, dict[str, float]], scale: float | None, lr: float | None, k: float,
                   notes: list[str], data: dict[str, Any], extra_tables: tuple = ()) -> AnalysisResult:
    sgd = scale is not None
    key = "grad_rms" if sgd else "update_ratio"
    flows, flags = _flows({layer: v[key] for layer, v in layers.items()})
    u2 = sum(v["update_norm"] ** 2 for v in layers.values())
    rows, per_layer = [], []
    for layer, v in layers.items():
        if sgd:
            rows.append((layer, v["params"], v["grad_rms"], v["grad_norm"], v["update_ratio"], flows[layer],
                         flags.get(layer, "")))
        else:
            rows.append((layer, v["params"], v["update_rms"], v["update_ratio"], flows[layer], flags.get(layer, "")))
        per_layer.append({"layer": layer, **v, "flow": flows[layer], "flag": flags.get(layer)})
    norm = math.sqrt(u2) / scale if sgd else math.sqrt(u2)
    headline: dict[str, Any] = {"source": SGD if sgd else UPDATES, "flow_health": _health(flags), "norm": norm}
    if sgd:
        headline.update({"lr": lr, "steps_between": k})
        headers = ("layer", "params", "grad_rms", "grad_norm", "update_ratio", "flow", "flag")
    else:
        notes = list(notes) + ["update statistics, not gradients: norm = ‖Δθ‖, flow from update/weight ratios"]
        headers = ("layer", "params", "update_rms", "update_ratio", "flow", "flag")
    notes = list(notes) + [flow_rule()]
    return AnalysisResult(NAME, headline, data={**data, "per_layer": per_layer},
                          tables=extra_tables + (Table("Per layer", headers, tuple(rows)),), notes=tuple(notes))


# ---- pair -----------------------------------------------------------------------------

def _specs(comparison, side: str):
    return [(d.name, tuple(getattr(d, side).shape), is_float_storage(getattr(d, side).dtype))
            for d in comparison.diffs if getattr(d, side) is not None]


def analyze(comparison, options, state: dict) -> AnalysisResult | None:
    sums: dict[str, dict[str, tuple]] = {"old": {}, "new": {}}
    for d in comparison.diffs:
        e = d.extras.get(NAME)
        if e:
            for side, val in e.items():
                sums[side][val["key"]] = (val["numel"], *val["sums"])
    metadata = {"old": comparison.old_metadata, "new": comparison.new_metadata}
    for side in ("new", "old"):
        if not sums[side]:
            continue
        plan = build_adam_plan(_specs(comparison, side), metadata[side])
        if plan is None:
            continue
        by_name = {d.name: d for d in comparison.diffs}
        entries = []
        for p in plan.params:
            if p.key not in sums[side]:
                continue
            n, vhat, mhat2, d2 = sums[side][p.key]
            diff = by_name.get(p.param) if p.param else None
            stats = getattr(diff, side) if diff is not None else None
            entry = {"layer": layer_key(p.param, options) if p.param else p.key, "n": n, "sum_vhat": vhat,
                     "sum_mhat2": mhat2, "sum_d2": d2, "lr": p.lr,
                     "weight_sq": stats.norm ** 2 if stats is not None else None}
            if diff is not None and diff.metrics is not None:
                entry["observed_u2"] = diff.metrics.l2 ** 2
                entry["observed_w2"] = diff.metrics.norm_old ** 2
            entries.append(entry)
        if not entries:
            continue
        notes = list(plan.notes)
        notes.insert(0, f"from the {side} checkpoint's optimizer state ({counted(len(entries), 'parameter')})")
        return _adam_result(adam_layers(entries), {}, notes, {"mode": comparison.mode, "side": side})
    if comparison.mode != "pair":
        return AnalysisResult(NAME, {"source": "none"},
                              notes=("no optimizer state in the checkpoint: gradients need Adam state, "
                                     "or two checkpoints and a learning rate",))
    fig = comparison.figures
    # Optimizer state, buffers and counters are not parameters that a gradient moves.
    mask = summary_mask(fig, "params")  # the global figures' rows: a tied weight once
    layers = group(fig, comparison.layer, mask) if mask.any() else {}
    u2 = {layer: g.dsq for layer, g in layers.items()}
    w2 = {layer: g.old_sq for layer, g in layers.items()}
    params = {layer: float(g.params) for layer, g in layers.items()}
    if not u2:
        return AnalysisResult(NAME, {"source": "none"}, notes=("no floating-point parameters in both checkpoints",))
    kind = _kind(comparison.old_metadata, comparison.new_metadata,
                 _specs(comparison, "old"), _specs(comparison, "new"))
    lr, k, scale, notes = _implied(options, comparison.old_metadata, comparison.new_metadata, kind)
    return _update_result(update_layers(u2, w2, params, scale), scale, lr, k, notes, {"mode": "pair"})


def _kind(old_meta, new_meta, old_specs, new_specs) -> OptimizerKind | None:
    """The optimizer the old checkpoint's state comes from, else the new one's."""
    return (optimizer_kind((spec[0] for spec in old_specs), old_meta)
            or optimizer_kind((spec[0] for spec in new_specs), new_meta))


def _implied(options, old_meta, new_meta, kind: OptimizerKind | None
             ) -> tuple[float | None, float, float | None, list[str]]:
    """(lr, k, scale, notes) of ĝ = −Δθ/scale; scale None: update statistics.

    scale = lr·k, times (1 − dampening)/(1 − μ) for SGD with momentum μ (its buffer
    approaches g·(1 − dampening)/(1 − μ), and Δθ = −lr·Σ buffer). An adaptive optimizer
    (RMSprop, Adagrad, Adam without readable moments...) divides each step by its own
    gradient statistics: −Δθ/lr is no gradient, so update statistics, unless --lr asks.
    """
    lr, k, notes = _lr_and_steps(options, old_meta, new_meta)
    if lr is None:
        return None, k, None, notes + ["no optimizer state the analysis reads and no learning rate "
                                       "(give --lr for SGD-implied gradients)"]
    if kind is not None and kind.adaptive and not options.get("lr"):
        return None, k, None, [
            f"the checkpoints hold {kind.name} optimizer state ({kind.evidence}): an adaptive optimizer scales "
            "each step by its own gradient statistics, so −Δθ/lr is no gradient (--lr forces ĝ = −Δθ/(lr·k))"]
    scale = lr * k
    formula = "−Δθ/(lr·k)"
    if kind is not None and kind.adaptive:
        meaning = f"a scaled update, not the gradient ({kind.name} is adaptive: {kind.evidence})"
    elif kind is not None and 0 < kind.momentum < 1:
        scale *= (1 - kind.dampening) / (1 - kind.momentum)
        formula = "−Δθ·(1−μ)/((1−dampening)·lr·k)"
        meaning = (f"the mean gradient of SGD with momentum μ={number(kind.momentum)}, "
                   f"dampening={number(kind.dampening)} ({kind.evidence}), once its momentum buffer has built up "
                   "(the buffer approaches g·(1−dampening)/(1−μ))")
    elif kind is not None and kind.name == "SGD":
        meaning = f"the mean gradient over the k steps (SGD without momentum: {kind.evidence})"
    else:
        meaning = ("the SGD-implied mean gradient; for momentum or adaptive optimizers (Adam) it is a scaled update, "
                   "not the gradient")
    notes.append(f"ĝ = {formula} with lr={number(lr)}, k={number(k)}: {meaning}")
    return lr, k, scale, notes


def _lr_and_steps(options, old_meta, new_meta) -> tuple[float | None, float, list[str]]:
    notes = []
    lr = float(options.get("lr") or 0.0) or None
    if lr is not None:
        notes.append(f"lr={number(lr)} from --lr")
    else:
        lr = lr_from_metadata(old_meta) or None
        if lr is not None:
            notes.append(f"lr={number(lr)} recorded in the old checkpoint")
            lr_new = lr_from_metadata(new_meta)
            if lr_new is not None and lr_new != lr:  # a schedule moved it: ĝ is off by up to their ratio
                notes.append(f"lr changed between the checkpoints ({number(lr)} -> {number(lr_new)}): ĝ divides by "
                             "the old one; steps taken at the new lr make ĝ off by up to their ratio")
    s_old, s_new = step_from_metadata(old_meta), step_from_metadata(new_meta)
    k: float = 1
    if s_old is not None and s_new is not None and s_new > s_old:
        k = s_new - s_old
        k = int(k) if float(k).is_integer() else k
        if lr is not None:
            notes.append(f"k={number(k)} optimizer steps between the checkpoints (their step values)")
    elif lr is not None:
        notes.append("k=1: the checkpoints record no step counts; if they are k steps apart, divide ĝ by k")
    return lr, k, notes


# ---- series -----------------------------------------------------------------------------

def analyze_series(series, options) -> AnalysisResult:
    n = series.n
    labels = series.labels
    adam = [a for a in series.adam if a]
    if adam and any(a["sums"] for a in adam):
        rows, per_ckpt, last = [], [], None
        for i in range(n):
            a = series.adam[i] if i < len(series.adam) else None
            if not a or not a["sums"]:
                continue
            stats = series.tensor_stats(i)
            entries = []
            for p in a["plan"].params:
                if p.key not in a["sums"]:
                    continue
                cnt, vhat, mhat2, d2 = a["sums"][p.key]
                s = stats.get(p.param) if p.param else None
                entries.append({"layer": layer_key(p.param, options) if p.param else p.key, "n": cnt,
                                "sum_vhat": vhat, "sum_mhat2": mhat2, "sum_d2": d2, "lr": p.lr,
                                "weight_sq": s.norm ** 2 if s is not None else None})
            layers = adam_layers(entries)
            result = _adam_result(layers, {}, [], {})
            h = result.headline
            rows.append((labels[i], h["norm"], h["grad_rms"], h["snr"], h["step_rms"], h["flow_health"]))
            per_ckpt.append({"checkpoint": series.names[i], **h})
            last = (i, layers, a["plan"].notes)
        i, layers, plan_notes = last
        notes = [f"per-layer table: {labels[i]}, the last checkpoint with optimizer state"] + list(plan_notes)
        missing = [labels[j] for j in range(n) if not (series.adam[j] and series.adam[j]["sums"])]
        if missing:
            notes.append(f"no Adam state in: {', '.join(missing)}")
        table = Table("Per checkpoint", ("checkpoint", "norm", "grad_rms", "snr", "step_rms", "flow_health"),
                      tuple(rows))
        return _adam_result(layers, {"checkpoints": len(rows)}, notes,
                            {"mode": "series", "per_checkpoint": per_ckpt}, (table,))
    # no optimizer state: updates between consecutive checkpoints
    rows, per_step = [], []
    layers_last, scale_last, lr_last, k_last, notes_last = None, None, None, 1.0, []
    for t in range(n - 1):
        u2 = {layer: float(series.dist2[li, t, t + 1]) for li, layer in enumerate(series.layers)}
        w2 = {layer: float(series.nsq[li, t]) for li, layer in enumerate(series.layers)}
        params = {layer: float(series.layer_params[li]) for li, layer in enumerate(series.layers)}
        kind = _kind(series.metadata[t], series.metadata[t + 1], [(name,) for name in series.tensor_stats(t)],
                     [(name,) for name in series.tensor_stats(t + 1)])
        lr, k, scale, notes = _implied(options, series.metadata[t], series.metadata[t + 1], kind)
        layers = update_layers(u2, w2, params, scale)
        res = _update_result(layers, scale, lr, k, [], {})
        h = res.headline
        u = math.sqrt(sum(u2.values()))
        rows.append((f"{labels[t]} -> {labels[t + 1]}", u, h["norm"] if scale else "", lr if scale else "", k if scale else "",
                     h["flow_health"]))
        per_step.append({"step": t, "old": series.names[t], "new": series.names[t + 1], "update_norm": u, **h})
        layers_last, scale_last, lr_last, k_last, notes_last = layers, scale, lr, k, notes
    if layers_last is None or not series.layers:
        return AnalysisResult(NAME, {"source": "none"},
                              notes=("no floating-point parameters common to every checkpoint",))
    notes = [f"per-layer table: the last step, {labels[n - 2]} -> {labels[n - 1]}"] + notes_last
    table = Table("Per step", ("step", "update_norm", "grad_norm", "lr", "k", "flow_health"), tuple(rows))
    return _update_result(layers_last, scale_last, lr_last, k_last, notes,
                          {"mode": "series", "per_step": per_step}, (table,))
