"""--anomaly-detection: NaN/Inf, zero/constant tensors, dead units, exploding/vanishing, frozen, fp16 overflow.

Every check runs on both sides (in ``inspect`` mode, on the one file); each finding
names its tensor, the side it was seen on, the figure, the threshold it crossed and
a severity. Formulas and thresholds: docs/analyses/anomaly_detection.md.

Figures from the engine's pass: nan/inf counts, zero count, min/max, rms, status.
Figures from this analysis' hook (the same pass, whole tensors): row norms of
weights with ≥ 2 dimensions (dead units) and the count of finite |x| > 65504
(fp16 overflow).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np
import torch

from torchdiff.errors import UsageError
from torchdiff.figures import Comparison, tied_copies
from torchdiff.names import is_float_storage, is_optimizer_state, kind, pattern
from torchdiff.results import CHANGED, RETYPED, UNCHANGED, AnalysisResult, Table, TensorStats
from torchdiff.units import count, counted, number

NAME = "anomaly_detection"
FLAG = "anomaly_detection"
OPTIONS: dict = {
    "fail_on_anomaly": (None, "exit 1 when an anomaly at or above SEVERITY (info|low|medium|high|critical) "
                              "is found on the new side (runs --anomaly-detection)"),
}
ENABLED_BY = ("fail_on_anomaly",)

SEVERITIES = ("info", "low", "medium", "high", "critical")
_RANK = {s: i for i, s in enumerate(SEVERITIES)}
# Fixed order of finding types (ties in the headline, table order within a severity).
TYPES = ("nan_inf", "exploding", "all_zero", "constant", "dead_units", "vanishing", "fp16_overflow", "frozen")

FP16_MAX = 65504.0            # largest finite float16
DEAD_REL = 1e-6               # dead row: ‖row‖ ≤ DEAD_REL · ‖W‖_F / sqrt(rows)
DEAD_SHARE_MEDIUM = 0.05      # dead-unit severity: share ≥ 0.05 medium, ≥ 0.5 high, else low
DEAD_SHARE_HIGH = 0.5
Z_THRESHOLD = 3.5             # robust z of log10 rms (Iglewicz & Hoaglin's outlier cut)
Z_MIN_FACTOR = 10.0           # ... and at least 10× away from the group median rms
MAD_FLOOR = 0.1               # decades: floor of the MAD so near-identical groups do not divide by ~0
MIN_GROUP = 4                 # fewest tensors in a role group for a z-score
EXPLODING_RMS = 1e3           # absolute guards on weights (not buffers, not optimizer state)
VANISHING_RMS = 1e-8
GROWTH_FACTOR = 10.0          # pair mode: rms_new / rms_old ≥ 10 exploding, ≤ 1/10 vanishing
FROZEN_MAJORITY = 0.5         # frozen: unchanged while ≥ half of the weight parameters changed
HEADLINE_AFFECTED = 10        # names shown in the headline's affected=[...]
NEW_STATE = ("new", "both")   # sides of the findings the headline, the counts and the gate count


def validate(options) -> None:
    value = options.get("fail_on_anomaly")
    if value is None:
        return
    text = str(value).strip().lower()
    if text not in _RANK:
        raise UsageError(f"--fail-on-anomaly must be one of {', '.join(SEVERITIES)} (got {value!r})")
    options["fail_on_anomaly"] = text


# ---- the hook: figures that need the values -------------------------------------------


class _ValueHook:
    """Dead rows and fp16 overflow counts, per side."""

    name = NAME

    def wants(self, pair) -> bool:
        if is_optimizer_state(pair.name):
            return False
        if all(h is None or h.tied_to is not None for h in (pair.old, pair.new)):
            return False  # a tied copy: its values are measured, and flagged, at the tensor it is tied to
        return any(h is not None and h.dtype.is_floating_point and h.numel > 0 for h in (pair.old, pair.new))

    def __call__(self, pair, old: torch.Tensor | None, new: torch.Tensor | None) -> dict[str, Any]:
        return {"old": _side_figures(old, pair.old), "new": _side_figures(new, pair.new)}


_CHUNK = 1 << 22  # elements per slice of a large tensor: bounded temporaries (16 MB of float32)


def _side_figures(t: torch.Tensor | None, handle) -> dict[str, Any] | None:
    """One pass for min/max (fp16 range), one for row norms; one host sync; a counting
    pass only when a value lies outside the float16 range. Large tensors are walked in
    slices of whole rows, so the temporaries stay at ``_CHUNK`` elements, whatever the
    tensor's size."""
    if t is None or handle is None or not handle.dtype.is_floating_point or t.numel() == 0:
        return None
    figures: list[torch.Tensor] = []
    check_overflow = handle.storage_dtype != "float16"  # a float16 tensor cannot hold |x| > 65504 (it is inf)
    if check_overflow:
        figures += list(torch.aminmax(t))  # NaN propagates: then count
    rows = t.shape[0] if t.ndim >= 2 else 0
    if rows:
        # Row norms of W / max|W|, compared in those units (the typical norm scaled back in
        # float64): squares of weights near 1e-30 underflow in float32 and those of weights
        # near 1e30 overflow, either of which made every row of a healthy weight look dead.
        matrix = t.reshape(rows, -1)
        step = max(1, _CHUNK // max(1, matrix.shape[1]))
        peak = torch.stack([torch.where(torch.isfinite(c), c.abs(), 0).amax() for c in matrix.split(step)]).amax()
        scale = peak.clamp(min=torch.finfo(t.dtype).tiny)
        norms = torch.cat([torch.linalg.vector_norm(c / scale, dim=1) for c in matrix.split(step)])  # ≤ sqrt(cols)
        finite = torch.isfinite(norms)
        typical = torch.sqrt((torch.where(finite, norms, 0) ** 2).sum() / finite.sum().clamp(min=1))
        dead = (finite & (norms <= DEAD_REL * typical)).sum()
        figures += [dead, typical.to(torch.float64) * scale.to(torch.float64)]
    values = torch.stack([f.to(torch.float64) for f in figures]).tolist() if figures else []
    out: dict[str, Any] = {}
    if check_overflow:
        lo, hi = values[0], values[1]
        inside = math.isfinite(lo) and math.isfinite(hi) and max(-lo, hi) <= FP16_MAX
        out["fp16_overflow"] = 0 if inside else int(sum(
            int((torch.isfinite(c) & (c.abs() > FP16_MAX)).sum()) for c in t.reshape(-1).split(_CHUNK)))
        values = values[2:]
    if rows:
        out["dead_rows"] = int(values[0])
        out["rows"] = rows
        out["typical_row_norm"] = float(values[1])
    return out


def hooks(options, state: dict) -> list:
    return [_ValueHook()]


# ---- findings ----------------------------------------------------------------------------


def _finding(type_: str, tensor: str, side: str, severity: str, figure: str, value: float, threshold: float,
             rule: str) -> dict[str, Any]:
    return {"type": type_, "tensor": tensor, "side": side, "severity": severity, "figure": figure,
            "value": value, "threshold": threshold, "rule": rule}


def _sides(d):
    for side in ("old", "new"):
        s = getattr(d, side)
        if s is not None:
            yield side, s


def _eligible_weight(name: str, s: TensorStats) -> bool:
    return is_float_storage(s.dtype) and s.numel >= 2 and kind(name, len(s.shape)) not in ("optimizer", "buffer")


def _value_findings(comp: Comparison) -> list[dict[str, Any]]:
    """NaN/Inf, all-zero, constant, dead units, fp16 overflow: one tensor side at a time."""
    found = []
    for d in comp.diffs:
        extras = d.extras.get(NAME) or {}
        for side, s in _sides(d):
            nonfinite = s.nan_count + s.inf_count
            if nonfinite:
                found.append(_finding(
                    "nan_inf", d.name, side, "critical", "nonfinite_count", nonfinite, 0,
                    f"nan={count(s.nan_count)}, inf={count(s.inf_count)} of {count(s.numel)} values; "
                    "any non-finite value is critical"))
            if not is_float_storage(s.dtype) or s.numel < 2:
                continue
            k = kind(d.name, len(s.shape))
            if k == "optimizer":
                continue
            other = d.old if side == "new" else None  # for "became" rules, pair mode only
            if s.zero_count == s.values:
                became = other is not None and other.zero_count < other.values
                severity = "high" if len(s.shape) >= 2 or became else "info"
                why = ("a weight with ≥ 2 dimensions is all zero" if len(s.shape) >= 2 else
                       "was not all zero on the old side" if became else
                       "1-D all-zero tensors (biases, norm shifts, running means) are usual at initialisation")
                found.append(_finding("all_zero", d.name, side, severity, "zero_fraction", 1.0, 1.0,
                                      f"zero_fraction = 1; {why}"))
                continue
            if nonfinite == 0 and s.min == s.max:
                became = other is not None and other.min != other.max
                severity = "high" if len(s.shape) >= 2 else "medium" if became else "info"
                why = ("a weight with ≥ 2 dimensions holds one value" if len(s.shape) >= 2 else
                       "was not constant on the old side" if became else
                       "1-D constant tensors (norm scales, layer scales) are usual at initialisation")
                found.append(_finding("constant", d.name, side, severity, "max - min", 0.0, 0.0,
                                      f"every value = {number(s.min)}; {why}"))
                continue
            figs = extras.get(side) if isinstance(extras, dict) else None
            if not figs:
                continue
            if figs.get("fp16_overflow"):
                over = figs["fp16_overflow"]
                found.append(_finding("fp16_overflow", d.name, side, "medium", "count |x| > 65504", over, FP16_MAX,
                                      f"{counted(over, 'finite value')} beyond the float16 range (±{number(FP16_MAX)}): "
                                      "a cast to float16 makes " + ("it" if over == 1 else "them") + " inf"))
            dead, rows = figs.get("dead_rows", 0), figs.get("rows", 0)
            if dead and k in ("weight", "embedding"):
                share = dead / rows
                severity = "high" if share >= DEAD_SHARE_HIGH else "medium" if share >= DEAD_SHARE_MEDIUM else "low"
                cut = {"high": DEAD_SHARE_HIGH, "medium": DEAD_SHARE_MEDIUM, "low": 0.0}[severity]
                found.append(_finding(
                    "dead_units", d.name, side, severity, "dead_row_share", share, cut,
                    f"{count(dead)} of {counted(rows, 'row')} {'has' if dead == 1 else 'have'} ‖row‖ ≤ "
                    f"{DEAD_REL:g} × typical row norm "
                    f"{number(figs['typical_row_norm'])} (= ‖W‖/sqrt(rows)); severity by share: "
                    f"≥ {DEAD_SHARE_HIGH:g} high, ≥ {DEAD_SHARE_MEDIUM:g} medium, else low"))
    return found


def _peer_kind(name: str, ndim: int) -> str:
    """The kind a tensor's scale is compared within when its role has too few members:
    ``names.kind``, with a normalisation's shifts (bias, ~0 at initialisation) apart from
    its scales (weight, ~1): a trained LayerNorm bias is not "vanishing" beside them."""
    k = kind(name, ndim)
    if k != "norm":
        return k
    leaf = name.rsplit(".", 1)[-1].lower()
    return "norm shift" if leaf == "bias" or leaf.endswith("_bias") else "norm scale"


def _scale_findings(comp: Comparison) -> list[dict[str, Any]]:
    """Exploding / vanishing: robust z-score of log10 rms within a role, absolute guards, growth."""
    found = []
    for side in ("old", "new"):
        entries = []
        for d in comp.diffs:
            s = getattr(d, side)
            if s is None or not _eligible_weight(d.name, s) or s.zero_count == s.values:
                continue
            if not (math.isfinite(s.rms) and s.rms > 0):
                continue
            entries.append((d.name, s, math.log10(s.rms)))
        by_role: dict[str, list] = defaultdict(list)
        by_kind: dict[tuple, list] = defaultdict(list)
        for e in entries:
            by_role[pattern(e[0])].append(e)
            by_kind[(_peer_kind(e[0], len(e[1].shape)), len(e[1].shape))].append(e)
        centre: dict[int, tuple[float, float]] = {}  # id(group) -> (median, MAD): once a group, not a member
        for name, s, log_rms in entries:
            group, label = by_role[pattern(name)], f"role {pattern(name)!r}"
            if len(group) < MIN_GROUP:
                k = (_peer_kind(name, len(s.shape)), len(s.shape))
                group, label = by_kind[k], f"all {k[1]}-D {k[0]} tensors"
            hit = None
            if len(group) >= MIN_GROUP:
                if id(group) not in centre:
                    logs = sorted(g[2] for g in group)
                    med = _median(logs)
                    centre[id(group)] = med, max(_median(sorted(abs(x - med) for x in logs)), MAD_FLOOR)
                med, mad = centre[id(group)]
                z = 0.6745 * (log_rms - med) / mad
                factor = 10 ** (log_rms - med)
                if abs(z) > Z_THRESHOLD and (factor >= Z_MIN_FACTOR or factor <= 1 / Z_MIN_FACTOR):
                    type_ = "exploding" if z > 0 else "vanishing"
                    hit = _finding(
                        type_, name, side, "high" if z > 0 else "medium", "robust_z", z,
                        Z_THRESHOLD if z > 0 else -Z_THRESHOLD,
                        f"rms={number(s.rms)} is {number(factor)}× the median rms {number(10 ** med)} of {label} "
                        f"(n={count(len(group))}); z = 0.6745·(log10 rms − median)/max(MAD, {MAD_FLOOR:g}), "
                        f"flagged when |z| > {Z_THRESHOLD:g} and the factor is "
                        + (f"≥ {Z_MIN_FACTOR:g}×" if z > 0 else f"≤ 1/{Z_MIN_FACTOR:g}×"))
            if hit is None and s.rms > EXPLODING_RMS:
                hit = _finding("exploding", name, side, "high", "rms", s.rms, EXPLODING_RMS,
                               f"rms={number(s.rms)} > absolute guard {number(EXPLODING_RMS)}")
            if hit is None and s.rms < VANISHING_RMS:
                hit = _finding("vanishing", name, side, "medium", "rms", s.rms, VANISHING_RMS,
                               f"0 < rms={number(s.rms)} < absolute guard {VANISHING_RMS:g}")
            if hit is not None:
                found.append(hit)
    if comp.mode == "pair":
        for d in comp.diffs:
            if d.old is None or d.new is None:
                continue
            if not (_eligible_weight(d.name, d.old) and _eligible_weight(d.name, d.new)):
                continue
            a, b = d.old.rms, d.new.rms
            if not (math.isfinite(a) and math.isfinite(b) and a > 0 and b > 0):
                continue
            growth = b / a
            if growth >= GROWTH_FACTOR or growth <= 1 / GROWTH_FACTOR:
                up = growth > 1
                found.append(_finding(
                    "exploding" if up else "vanishing", d.name, "new", "high" if up else "medium", "rms_growth",
                    growth, GROWTH_FACTOR if up else 1 / GROWTH_FACTOR,
                    f"rms {number(a)} -> {number(b)} (×{number(growth)}); flagged when the ratio is "
                    f"≥ {GROWTH_FACTOR:g} or ≤ 1/{GROWTH_FACTOR:g}"))
    return found


def _frozen_findings(comp: Comparison) -> list[dict[str, Any]]:
    if comp.mode != "pair":
        return []
    eligible = [d for d in comp.diffs if d.old is not None and d.new is not None and d.metrics is not None
                and _eligible_weight(d.name, d.new)]
    total = sum(d.params for d in eligible)
    moved = sum(d.params for d in eligible if d.status in (CHANGED, RETYPED))
    if not total:
        return []
    share = moved / total
    if share < FROZEN_MAJORITY:
        return []
    return [_finding("frozen", d.name, "both", "low", "changed_param_share", share, FROZEN_MAJORITY,
                     f"identical while {share:.1%} of the weight parameters changed "
                     f"(flagged when ≥ {FROZEN_MAJORITY:.0%})")
            for d in eligible if d.status == UNCHANGED]


def _median(sorted_values: list[float]) -> float:
    n = len(sorted_values)
    mid = n // 2
    return sorted_values[mid] if n % 2 else (sorted_values[mid - 1] + sorted_values[mid]) / 2


def _merge_sides(findings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One finding per (type, tensor): seen on both sides -> side "both" (new side's figure)."""
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for f in findings:
        key = (f["type"], f["tensor"])
        prev = merged.get(key)
        if prev is None:
            merged[key] = f
            continue
        # the more severe finding wins; at equal severity the new side's, else the first criterion's
        if _RANK[f["severity"]] != _RANK[prev["severity"]]:
            keep = f if _RANK[f["severity"]] > _RANK[prev["severity"]] else prev
        else:
            keep = f if (f["side"] == "new" and prev["side"] == "old") else prev
        sides = {prev["side"], f["side"]}
        merged[key] = {**keep, "side": "both" if sides >= {"old", "new"} or "both" in sides else keep["side"]}
    return list(merged.values())


def analyze(comparison: Comparison, options, state: dict) -> AnalysisResult:
    findings = _merge_sides(_value_findings(comparison) + _scale_findings(comparison) + _frozen_findings(comparison))
    copies = {comparison.figures.names[i] for i in np.flatnonzero(tied_copies(comparison.figures))}
    findings = [f for f in findings if f["tensor"] not in copies]  # a tied weight's findings once, at its target
    findings.sort(key=lambda f: (-_RANK[f["severity"]], TYPES.index(f["type"]), f["tensor"]))
    # The new state (side new or both; in inspect mode, the one file) is what the headline,
    # the counts and the gate describe: a finding seen only on the old side is listed, not
    # counted (a fresh model's LayerNorm, ones and zeros, at the monitor's reference step).
    current = [f for f in findings if f["side"] in NEW_STATE]
    old_only = len(findings) - len(current)
    headline: dict[str, Any]
    if current:
        top = current[0]
        affected = [f["tensor"] for f in current if f["type"] == top["type"] and f["severity"] == top["severity"]]
        shown = affected[:HEADLINE_AFFECTED]
        if len(affected) > HEADLINE_AFFECTED:
            shown.append(f"+{count(len(affected) - HEADLINE_AFFECTED)} more")
        headline = {"anomaly_type": top["type"], "severity": top["severity"], "affected": shown,
                    "findings": len(current)}
    else:
        headline = {"anomaly_type": "none", "severity": "none", "affected": [], "findings": 0}
    counts = {s: sum(1 for f in current if f["severity"] == s) for s in reversed(SEVERITIES)}
    data: dict[str, Any] = {"anomalies": findings, "severity_counts": counts, "old_only": old_only,
                            "thresholds": _thresholds()}
    notes = []
    gate = options.get("fail_on_anomaly")
    failed = False
    if gate is not None:
        tripped = [f for f in current if _RANK[f["severity"]] >= _RANK[gate]]
        failed = bool(tripped)
        data["fail_on_anomaly"] = {"severity": gate, "tripped": failed, "count": len(tripped)}
        notes.append(f"--fail-on-anomaly {gate}: {counted(len(tripped), 'finding')} at or above {gate} on the new side"
                     + (" -> exit 1" if failed else ""))
    if comparison.mode == "pair":
        notes.append("side: where the finding was seen (old, new or both); findings= and --fail-on-anomaly count "
                     "new and both"
                     + (f"; {count(old_only)} seen on the old side only: listed, not counted" if old_only else ""))
    rows = tuple((f["severity"], f["type"], f["tensor"], f["side"], f["figure"], f["value"], f["threshold"])
                 for f in findings)
    table = Table("Anomalies", ("severity", "type", "tensor", "side", "figure", "value", "threshold"), rows)
    return AnalysisResult(NAME, headline, data, (table,), tuple(notes), failed=failed,
                          text_keys={"anomaly_type": "type"})


def _thresholds() -> dict[str, float]:
    return {"fp16_max": FP16_MAX, "dead_rel": DEAD_REL, "dead_share_medium": DEAD_SHARE_MEDIUM,
            "dead_share_high": DEAD_SHARE_HIGH, "z_threshold": Z_THRESHOLD, "z_min_factor": Z_MIN_FACTOR,
            "mad_floor_decades": MAD_FLOOR, "min_group": MIN_GROUP, "exploding_rms": EXPLODING_RMS,
            "vanishing_rms": VANISHING_RMS, "growth_factor": GROWTH_FACTOR, "frozen_majority": FROZEN_MAJORITY}
