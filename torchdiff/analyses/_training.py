"""Helpers shared by the training analyses (convergence, gradient, similarity) and
``torchdiff.series``: optimizer-state detection, the Adam state → parameter mapping,
Adam moment sums, least-squares trends, robust outliers, text shading. No I/O.

Not an analysis: the registry in ``analyses/__init__`` does not list it.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from torchdiff.names import (
    OPTIMIZER_STATE_NAME, PARAM_GROUP_NAME, PARAMETER, in_scope, is_averaged_copy, is_float_storage, layer_of,
    optimizer_prefixes, role,
)
from torchdiff.units import count, counted, number

# ---- optimizer state ----------------------------------------------------------------



def is_model_tensor(name: str, dtype: str, ndim: int, scope: str = "params") -> bool:
    """A float tensor in ``scope`` (names.SCOPES): what the training analyses measure."""
    return is_float_storage(dtype) and in_scope(role(name, dtype, ndim), scope)


def lr_from_metadata(metadata: Mapping[str, Any]) -> float | None:
    """The learning rate a checkpoint records: ``lr``, ``learning_rate``, else the first
    param group's ``lr``."""
    for key in ("lr", "learning_rate"):
        value = metadata.get(key)
        if _is_number(value) and value > 0:
            return float(value)
    for key in sorted(metadata):
        m = PARAM_GROUP_NAME.match(str(key))
        if m and m["key"] == "lr" and _is_number(metadata[key]) and metadata[key] > 0:
            return float(metadata[key])
    return None


#: torch.optim optimizers by what their state_dict holds: a per-parameter state field
#: only that optimizer keeps, else a param-group key only it has; first match wins
#: (RMSprop with momentum also keeps a momentum_buffer, NAdam an exp_avg_sq).
_OPTIMIZER_FIELDS = (("square_avg", "RMSprop"), ("sum", "Adagrad"), ("acc_delta", "Adadelta"),
                     ("exp_inf", "Adamax"), ("mu_product", "NAdam"), ("step_size", "Rprop"),
                     ("exp_avg_sq", "Adam/AdamW"), ("ax", "ASGD"), ("momentum_buffer", "SGD"))
_OPTIMIZER_GROUP_KEYS = (("centered", "RMSprop"), ("lr_decay", "Adagrad"), ("rho", "Adadelta"),
                         ("amsgrad", "Adam/AdamW"), ("nesterov", "SGD"))
#: optimizers whose step divides by a running statistic of the gradient (or takes its sign):
#: their Δθ/lr is no gradient
ADAPTIVE_OPTIMIZERS = frozenset({"RMSprop", "Adagrad", "Adadelta", "Adamax", "NAdam", "Rprop", "Adam/AdamW"})


@dataclass(frozen=True)
class OptimizerKind:
    """Which torch optimizer a checkpoint's state_dict comes from, and the evidence."""

    name: str  # "RMSprop", "SGD", ...
    evidence: str  # "state field square_avg", "param-group key nesterov"
    momentum: float = 0.0  # the first param group's momentum (0 when none)
    dampening: float = 0.0  # SGD's dampening

    @property
    def adaptive(self) -> bool:
        return self.name in ADAPTIVE_OPTIMIZERS


def optimizer_kind(names: Iterable[str], metadata: Mapping[str, Any]) -> OptimizerKind | None:
    """The torch optimizer whose state a checkpoint holds (tensor ``names`` and its
    ``metadata``), by the table above; None when it holds no optimizer state."""
    from torchdiff.names import optimizer_param

    fields = {found[1] for found in map(optimizer_param, names) if found is not None}
    group: dict[str, Any] = {}
    for key in sorted(metadata, key=str):
        m = PARAM_GROUP_NAME.match(str(key))
        if m and m["group"] == "0":
            group.setdefault(m["key"], metadata[key])
    name = next(((n, f"state field {f}") for f, n in _OPTIMIZER_FIELDS if f in fields), None) \
        or next(((n, f"param-group key {k}") for k, n in _OPTIMIZER_GROUP_KEYS if k in group), None)
    if name is None:
        return None
    momentum = group.get("momentum")
    dampening = group.get("dampening")
    return OptimizerKind(*name, momentum=float(momentum) if _is_number(momentum) else 0.0,
                         dampening=float(dampening) if _is_number(dampening) else 0.0)


def step_from_metadata(metadata: Mapping[str, Any]) -> float | None:
    for key in ("step", "global_step", "iteration", "iter"):
        value = metadata.get(key)
        if _is_number(value):
            return float(value)
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class AdamParam:
    """One parameter's Adam state in a checkpoint."""

    key: str  # "optimizer.state.3"
    index: int
    shape: tuple[int, ...]
    exp_avg: str
    exp_avg_sq: str
    step: str | None  # tensor name of the step counter, if it is a tensor
    step_value: float | None  # the step when stored as a number (older torch)
    lr: float | None
    beta1: float
    beta2: float
    eps: float
    param: str | None = None  # mapped model tensor name


@dataclass
class AdamPlan:
    """Adam state of one checkpoint, mapped to parameter names (from headers only)."""

    params: list[AdamParam]
    notes: list[str] = field(default_factory=list)
    mapped: bool = True

    def by_tensor(self) -> dict[str, tuple[AdamParam, str]]:
        """tensor name -> (param, field) for exp_avg, exp_avg_sq and step tensors."""
        out: dict[str, tuple[AdamParam, str]] = {}
        for p in self.params:
            out[p.exp_avg] = (p, "exp_avg")
            out[p.exp_avg_sq] = (p, "exp_avg_sq")
            if p.step is not None:
                out[p.step] = (p, "step")
        return out


def build_adam_plan(tensors: Sequence[tuple[str, tuple[int, ...], bool]],
                    metadata: Mapping[str, Any]) -> AdamPlan | None:
    """Find Adam/AdamW state (``P.state.K.exp_avg`` / ``exp_avg_sq`` / ``step``) and map
    each state index K to a model tensor name.

    The mapping (documented in docs/analyses/gradient_analysis.md): torch numbers
    parameters in ``param_groups[0].params + param_groups[1].params + ...`` order, which
    is ``model.parameters()`` order, which is the model's state_dict order without its
    buffers. So the indices are walked in that order against the checkpoint's
    non-optimizer floating tensors in file order; a tensor whose shape differs from the
    state's shape is skipped (a buffer) and named in a note; the known buffers
    (running_mean, running_var, num_batches_tracked) are skipped up front.

    Args:
        tensors: (name, shape, is_float) of every tensor, in checkpoint order.
        metadata: the checkpoint's non-tensor values (param_groups hyper-parameters).

    Returns:
        None when the checkpoint holds no Adam state.
    """
    by_name = fqn_adam_plan(tensors, metadata)
    if by_name is not None:
        return by_name
    names = [t[0] for t in tensors]
    shapes = {t[0]: tuple(t[1]) for t in tensors}
    prefixes = optimizer_prefixes(names, metadata)
    if not prefixes:
        return None
    fields: dict[tuple[str, int], dict[str, str]] = {}
    for name in names:
        m = OPTIMIZER_STATE_NAME.match(name)
        if m and m["opt"] in prefixes:
            fields.setdefault((m["opt"], int(m["idx"])), {})[m["field"]] = name
    notes: list[str] = []
    params: list[AdamParam] = []
    candidates = [
        (name, tuple(shape)) for name, shape, is_float in tensors
        if is_float and role(name, None, len(shape)) == PARAMETER
    ]
    mapped_all = True
    for opt in prefixes:
        indices = sorted(k[1] for k in fields if k[0] == opt and {"exp_avg", "exp_avg_sq"} <= set(fields[k]))
        if not indices:
            continue
        groups = _param_groups(opt, metadata)
        order = [i for g in groups for i in g["params"]] or sorted(k[1] for k in fields if k[0] == opt)
        group_of = {i: g for g in groups for i in g["params"]}
        if any(opt + f"state.{i}.max_exp_avg_sq" in shapes for i in indices):
            notes.append(f"{opt}state has max_exp_avg_sq (amsgrad): step sizes use exp_avg_sq, not its running max")
        wants = [shapes.get(fields[(opt, idx)]["exp_avg"]) if "exp_avg" in fields.get((opt, idx), {}) else None
                 for idx in order]
        # an averaged copy (EMA, SWA: names.is_averaged_copy) has the parameters' shapes:
        # the walk tries the names without it first
        trained = [c for c in candidates if not any(is_averaged_copy(part) for part in c[0].split("."))]
        walked = _walk(order, wants, trained) if len(trained) < len(candidates) else None
        if walked is None or len(walked[0]) < len(order):  # no averaged copy, or the model is only there
            walked = _walk(order, wants, candidates)
        mapping, skipped = walked
        if skipped:
            shown = ", ".join(skipped[:5]) + (f" (+{count(len(skipped) - 5)} more)" if len(skipped) > 5 else "")
            notes.append(f"state→parameter mapping skipped {counted(len(skipped), 'tensor')} whose shapes match no "
                         f"state (taken as buffers): {shown}")
        if len(mapping) < len(order):
            mapped_all = False
        for idx in indices:
            f = fields[(opt, idx)]
            g = group_of.get(idx, {})
            betas = g.get("betas")
            beta1, beta2 = (float(betas[0]), float(betas[1])) if isinstance(betas, (list, tuple)) and len(betas) == 2 \
                else (0.9, 0.999)
            step_value = metadata.get(f"{opt}state.{idx}.step")
            params.append(AdamParam(
                key=f"{opt}state.{idx}", index=idx, shape=shapes[f["exp_avg"]], exp_avg=f["exp_avg"],
                exp_avg_sq=f["exp_avg_sq"], step=f.get("step"),
                step_value=float(step_value) if _is_number(step_value) else None,
                lr=float(g["lr"]) if _is_number(g.get("lr")) else None,
                beta1=beta1, beta2=beta2, eps=float(g["eps"]) if _is_number(g.get("eps")) else 1e-8,
                param=mapping.get(idx) if mapped_all else None,
            ))
        if not groups:
            notes.append(f"no {opt}param_groups in the checkpoint: betas=(0.9, 0.999), eps=1e-8 assumed, lr unknown")
    if not params:
        return None
    if not mapped_all:
        notes.append("optimizer state could not be matched to parameter names by order and shape; "
                     "figures are per state index, and update_ratio (step / ‖θ‖) is nan where no parameter was matched")
    return AdamPlan(params, notes, mapped_all)


def _walk(order: Sequence[int], wants: Sequence[tuple[int, ...] | None],
          candidates: Sequence[tuple[str, tuple[int, ...]]]) -> tuple[dict[int, str], list[str]]:
    """Map the state indices of ``order`` (the shapes of their exp_avg: ``wants``) to
    ``candidates`` in order, skipping a candidate of another shape (a buffer); (index ->
    name as far as the walk got, the names skipped)."""
    ptr, skipped = 0, []
    mapping: dict[int, str] = {}
    for idx, want in zip(order, wants):
        while ptr < len(candidates) and want is not None and candidates[ptr][1] != want:
            skipped.append(candidates[ptr][0])
            ptr += 1
        if ptr >= len(candidates):
            break
        mapping[idx] = candidates[ptr][0]
        ptr += 1
    return mapping, skipped


def fqn_adam_plan(tensors: Sequence[tuple[str, tuple[int, ...], bool]],
                  metadata: Mapping[str, Any]) -> AdamPlan | None:
    """Adam state keyed by parameter name, as FSDP/DCP's ``get_state_dict`` saves it
    (``P.state.<fqn>.exp_avg``, ``P.param_groups.G.params`` a list of fqns; flattened,
    ``P.param_groups.<fqn>.lr``, ``.betas``, ``.eps`` per parameter): each fqn maps
    to the model tensor named ``<fqn>``, else to ``<P><fqn>`` with P the prefix most
    fqns pair through (``model.`` when the model's state_dict sits under ``model``: then
    ``norm.weight`` is ``model.norm.weight``, not ``model.block.norm.weight``), else to
    the one tensor named ``<prefix>.<fqn>`` of the state's shape. None when no state is
    keyed so (see :func:`build_adam_plan` for torch's numbered state)."""
    from torchdiff.names import optimizer_param

    shapes = {t[0]: tuple(t[1]) for t in tensors}
    state: dict[tuple[str, str], dict[str, str]] = {}
    for name in shapes:
        found = optimizer_param(name)
        if found is None or _NUMBERED.fullmatch(found[0]):
            continue
        fqn, field_name = found
        opt = name[: len(name) - len(f"state.{fqn}.{field_name}")]  # "optim."
        state.setdefault((opt, fqn), {})[field_name] = name
    state = {k: f for k, f in state.items() if {"exp_avg", "exp_avg_sq"} <= set(f)}
    if not state:
        return None
    by_suffix: dict[str, list[str]] = {}  # every dotted suffix of a model tensor's name -> those names
    for n in shapes:
        if optimizer_param(n) is None:
            dotted = n.split(".")
            for k in range(len(dotted)):
                by_suffix.setdefault(".".join(dotted[k:]), []).append(n)
    group_of: dict[tuple[str, str], dict[str, Any]] = {}
    for opt in {opt for opt, _ in state}:
        for g in _param_groups(opt, metadata, numbered=False):
            for fqn in g["params"]:
                group_of[(opt, fqn)] = g
    matched = {key: [n for n in by_suffix.get(key[1], []) if shapes[n] == shapes[f["exp_avg"]]]
               for key, f in state.items()}
    prefixes = Counter(n[: len(n) - len(fqn)] for (_, fqn), ns in matched.items() for n in ns)
    common = prefixes.most_common(1)[0][0] if prefixes else ""
    params: list[AdamParam] = []
    unmapped: list[str] = []
    for i, ((opt, fqn), f) in enumerate(state.items()):
        # a group listing the fqn; else the flattened layout (torchtitan, OLMo-core:
        # flatten_optimizer_state_dict=True), each hyper-parameter under P.param_groups.<fqn>.<key>
        group = group_of.get((opt, fqn)) or {
            key: metadata[f"{opt}param_groups.{fqn}.{key}"] for key in ("lr", "betas", "eps")
            if f"{opt}param_groups.{fqn}.{key}" in metadata}
        shape = shapes[f["exp_avg"]]
        matches = matched[(opt, fqn)]
        param = (fqn if fqn in matches else common + fqn if common + fqn in matches
                 else matches[0] if len(matches) == 1 else None)
        if param is None:
            unmapped.append(fqn)
        betas = group.get("betas")
        beta1, beta2 = (float(betas[0]), float(betas[1])) if isinstance(betas, (list, tuple)) and len(betas) == 2 \
            else (0.9, 0.999)
        step_value = metadata.get(f"{opt}state.{fqn}.step")
        params.append(AdamParam(
            key=f"{opt}state.{fqn}", index=i, shape=shape, exp_avg=f["exp_avg"], exp_avg_sq=f["exp_avg_sq"],
            step=f.get("step"), step_value=float(step_value) if _is_number(step_value) else None,
            lr=float(group["lr"]) if _is_number(group.get("lr")) else None, beta1=beta1, beta2=beta2,
            eps=float(group["eps"]) if _is_number(group.get("eps")) else 1e-8, param=param,
        ))
    notes = []
    if unmapped:
        shown = ", ".join(unmapped[:5]) + (f" (+{count(len(unmapped) - 5)} more)" if len(unmapped) > 5 else "")
        notes.append(f"optimizer state left unmapped for {counted(len(unmapped), 'parameter name')} (no model tensor "
                     f"of its shape): {shown}")
    return AdamPlan(params, notes, not unmapped)


_NUMBERED = re.compile(r"(?:.+[.:/])?state\.\d+")


def _param_groups(opt: str, metadata: Mapping[str, Any], numbered: bool = True) -> list[dict[str, Any]]:
    groups: dict[int, dict[str, Any]] = {}
    for key, value in metadata.items():
        m = PARAM_GROUP_NAME.match(str(key))
        if m and m["opt"] == opt:
            groups.setdefault(int(m["group"]), {})[m["key"]] = value
    out = []
    for g in sorted(groups):
        group = groups[g]
        params = group.get("params")
        if not numbered:  # parameter names (get_state_dict)
            group["params"] = [str(p) for p in params] if isinstance(params, list) else []
        else:
            group["params"] = [int(i) for i in params] if isinstance(params, list) and all(
                isinstance(i, int) or str(i).isdigit() for i in params) else []
        out.append(group)
    return out


ADAM_CHUNK = 1 << 20


def adam_sums(m: torch.Tensor, v: torch.Tensor, step: torch.Tensor | float, beta1: float, beta2: float,
              eps: float) -> torch.Tensor:
    """Float64 sums of one parameter's bias-corrected Adam moments (no host sync).

    With m̂ = exp_avg/(1 − β1^t), v̂ = exp_avg_sq/(1 − β2^t) and the per-element step
    direction d = m̂/(√v̂ + ε), returns the device tensor [Σ v̂, Σ m̂², Σ d²]. Chunked, so
    the float64 workspace stays bounded whatever the tensor's size.
    """
    m = m.reshape(-1)
    v = v.reshape(-1)
    dev = m.device
    t = torch.as_tensor(step, dtype=torch.float64, device=dev).reshape(())
    bc1 = 1 - torch.pow(torch.tensor(beta1, dtype=torch.float64, device=dev), t)
    bc2 = 1 - torch.pow(torch.tensor(beta2, dtype=torch.float64, device=dev), t)
    out = torch.zeros(3, dtype=torch.float64, device=dev)
    for start in range(0, m.numel(), ADAM_CHUNK):
        mh = m[start:start + ADAM_CHUNK].to(torch.float64) / bc1
        vh = v[start:start + ADAM_CHUNK].to(torch.float64) / bc2
        d = mh / (vh.sqrt() + eps)
        out += torch.stack([vh.sum(), (mh * mh).sum(), (d * d).sum()])
    return out


# ---- figures --------------------------------------------------------------------------

@dataclass(frozen=True)
class Fit:
    """Least-squares line y = slope·x + intercept and its R²."""

    slope: float
    intercept: float
    r2: float
    points: int


def fit_line(x: Sequence[float], y: Sequence[float]) -> Fit | None:
    """OLS over the finite (x, y) points; None with fewer than two."""
    xs = np.asarray(x, dtype=np.float64)
    ys = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(xs) & np.isfinite(ys)
    xs, ys = xs[ok], ys[ok]
    if xs.size < 2 or np.ptp(xs) == 0:
        return None
    xm, ym = xs.mean(), ys.mean()
    sxx = float(((xs - xm) ** 2).sum())
    slope = float(((xs - xm) * (ys - ym)).sum() / sxx)
    intercept = float(ym - slope * xm)
    ss_tot = float(((ys - ym) ** 2).sum())
    ss_res = float(((ys - (slope * xs + intercept)) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return Fit(slope, intercept, max(0.0, min(1.0, r2)), int(xs.size))


def safe_div(a: float, b: float) -> float:
    if b == 0 or not math.isfinite(b):
        if a == 0:
            return 0.0
        return math.inf if math.isfinite(a) else math.nan
    return a / b


def cosine_from_sq(nsq_a: float, nsq_b: float, dist2: float) -> float:
    """cos(a, b) from ‖a‖², ‖b‖² and ‖a − b‖² (polarisation; exact inputs, no cancellation
    beyond that of the cosine itself)."""
    denom = math.sqrt(max(nsq_a, 0.0) * max(nsq_b, 0.0))
    if denom == 0 or not math.isfinite(denom):
        if nsq_a == 0 and nsq_b == 0:
            return 1.0
        return math.nan
    return max(-1.0, min(1.0, (nsq_a + nsq_b - dist2) / 2 / denom))


#: Robust outlier rule on rotations x = log10(1 − cos): x > median + OUTLIER_Z·1.4826·MAD
#: and 1 − cos ≥ OUTLIER_MIN_ROTATION.
OUTLIER_Z = 3.0
OUTLIER_MIN_ROTATION = 0.01


def cosine_outliers(cosines: Sequence[float]) -> list[int]:
    """Indices whose cosine is unusually low among the others (rule above)."""
    c = np.asarray(cosines, dtype=np.float64)
    ok = np.isfinite(c)
    if ok.sum() < 3:
        return []
    rot = np.log10(np.maximum(1.0 - c[ok], 1e-12))
    med = float(np.median(rot))
    mad = float(np.median(np.abs(rot - med))) * 1.4826
    limit = med + OUTLIER_Z * mad
    idx = np.flatnonzero(ok)
    return [int(i) for i, r, v in zip(idx, rot, c[ok]) if r > limit and 1.0 - v >= OUTLIER_MIN_ROTATION]


def median_or_nan(values: Iterable[float]) -> float:
    arr = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    return float(np.median(arr)) if arr.size else math.nan


# ---- text ---------------------------------------------------------------------------

SHADES = "·░▒▓█"


def shade_scale(values: Iterable[float]) -> tuple[float, float]:
    """(lo, hi) of the finite values, for ``shade``."""
    arr = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    if not arr.size:
        return (0.0, 1.0)
    return float(arr.min()), float(arr.max())


def shade(value: float, lo: float, hi: float, width: int = 2) -> str:
    """A block character for value on [lo, hi] (5 levels), ``?`` for NaN."""
    if not math.isfinite(value):
        return "?" * width
    if hi <= lo:
        level = len(SHADES) - 1
    else:
        level = int((value - lo) / (hi - lo) * len(SHADES))
        level = max(0, min(len(SHADES) - 1, level))
    return SHADES[level] * width


def shade_legend(lo: float, hi: float) -> str:
    n = len(SHADES)
    edges = [lo + (hi - lo) * k / n for k in range(1, n)]
    parts = [SHADES[0] + f" < {number(edges[0])}"]
    for k in range(1, n - 1):
        parts.append(f"{SHADES[k]} < {number(edges[k])}")
    parts.append(f"{SHADES[-1]} ≥ {number(edges[-1])} (up to {number(hi)})")
    return ", ".join(parts)


def natural_key(text: str) -> list[Any]:
    """Sort key with numbers compared as numbers: epoch_2 before epoch_10."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text) if part]


def short_labels(names: Sequence[str]) -> list[str]:
    """File names without directories when they are unique, else the names given."""
    import os

    base = [os.path.basename(n.rstrip("/")) or n for n in names]
    if len(set(base)) != len(base):
        return list(names)
    exts = {os.path.splitext(b)[1] for b in base}
    if len(exts) == 1 and exts != {""}:
        stems = [os.path.splitext(b)[0] for b in base]
        if len(set(stems)) == len(stems) and all(stems):
            return stems
    return base


def layer_key(name: str, options: Mapping[str, Any]) -> str:
    return layer_of(name, options.get("layer_pattern") or None)
