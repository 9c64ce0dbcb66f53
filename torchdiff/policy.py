"""CI policies: rules over tensor groups, checked on a finished Report (``--policy FILE``).

A policy is a YAML file with a ``rules`` list; each rule has a ``name``, an optional
selector (``select``/``exclude``: a glob over tensor names, ``re:REGEX``,
``layer:GLOB`` or ``role:ROLE``) and exactly one condition. ``load(path)`` validates
the file before any checkpoint is read (every problem is a PolicyError: one line,
exit 2); ``Policy.evaluate(report)`` measures each rule on the report's public surface
(its TensorDiffs, its figures table and ``report.analysis(name)``) and returns one ``policy``
AnalysisResult, failed when a rule fails (exit 1). Schema and examples: docs/POLICY.md.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np

from torchdiff.errors import PolicyError
from torchdiff.figures import group, summary_mask
from torchdiff.names import ROLES
from torchdiff.results import ADDED, CHANGED, REMOVED, RETYPED, UNCHANGED, AnalysisResult, Table, TensorDiff
from torchdiff.units import stated

NAME = "policy"
SEVERITIES = ("info", "low", "medium", "high", "critical")  # torchdiff.analyses.anomaly_detection's
CONVERGED = ("converging", "plateaued")  # convergence_analysis statuses `converging: true` accepts
OFFENDERS_SHOWN = 3  # names in the text table's offenders column (JSON lists them all)

# condition -> (kind of value, what it measures). Kinds: "true" (only `true`), "bool",
# "number" (≥ 0), "cosine" ([-1, 1]), "real" (any finite number), "severity".
CONDITIONS: dict[str, str] = {
    "unchanged": "bool",
    "max_rel_l2": "number",
    "max_abs": "number",
    "min_cosine": "cosine",
    "min_sqnr_db": "real",
    "max_changed_fraction": "number",
    "no_nonfinite": "true",
    "same_dtype": "true",
    "same_shape": "true",
    "max_share": "number",
    "no_anomaly": "severity",
    "converging": "true",
}
RULE_KEYS = ("name", "select", "exclude", "allow_empty", *CONDITIONS)
TOP_KEYS = ("rules",)
SERIES_ONLY = ("converging",)
WHOLE_REPORT = ("converging",)  # conditions that take no selector


# ---- the file ----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Selector:
    """One ``select``/``exclude`` entry, compiled."""

    text: str
    kind: str  # glob | re | layer | role
    pattern: Any

    def matches(self, d: TensorDiff, layer: Callable[[str], str]) -> bool:
        if self.kind == "glob":
            return fnmatch.fnmatchcase(d.name, self.pattern)
        if self.kind == "re":
            return self.pattern.search(d.name) is not None
        if self.kind == "layer":
            return fnmatch.fnmatchcase(layer(d.name), self.pattern)
        return d.role == self.pattern


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    condition: str
    value: Any
    select: tuple[Selector, ...] = ()
    exclude: tuple[Selector, ...] = ()
    allow_empty: bool = False

    def selects(self, d: TensorDiff, layer: Callable[[str], str]) -> bool:
        chosen = not self.select or any(s.matches(d, layer) for s in self.select)
        return chosen and not any(s.matches(d, layer) for s in self.exclude)

    @property
    def selector_text(self) -> str:
        text = ", ".join(s.text for s in self.select) or "*"
        if self.exclude:
            text += " except " + ", ".join(s.text for s in self.exclude)
        return text


@dataclass(frozen=True, slots=True)
class Policy:
    """A loaded policy: its rules, and the analyses they read."""

    rules: tuple[Rule, ...]
    path: str = "<policy>"

    @property
    def analyses(self) -> tuple[str, ...]:
        needed = []
        if any(r.condition == "no_anomaly" for r in self.rules):
            needed.append("anomaly_detection")
        if any(r.condition == "min_sqnr_db" for r in self.rules):
            needed.append("quantization_analysis")
        if any(r.condition == "converging" for r in self.rules):
            needed.append("convergence_analysis")
        return tuple(needed)

    def evaluate(self, report) -> AnalysisResult:
        return evaluate(self, report)

    def apply(self, report):
        """The report with the policy's result appended to its analyses."""
        result = self.evaluate(report)
        if hasattr(report, "series_analyses"):
            return dataclasses.replace(report, series_analyses=report.series_analyses + (result,))
        return dataclasses.replace(report, analyses=report.analyses + (result,))


def load(path: str | os.PathLike, *, series: bool = False) -> Policy:
    """Read and validate a policy file; every problem raises PolicyError naming the file."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise PolicyError(f"{path}: no such policy file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PolicyError(f"{path}: cannot read the policy ({type(e).__name__}: {e})") from None
    import yaml

    try:
        data = yaml.load(text, Loader=_loader(yaml))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise PolicyError(f"{path}: not valid YAML ({where}{problem})") from None
    return parse(data, path, series=series)


def _loader(yaml):
    """PyYAML's SafeLoader, refusing a key given twice in one mapping: safe_load keeps
    the last silently, so a rule with two ``select`` lines would gate only the second."""

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden
                    continue
                key = self.construct_object(key_node, deep=deep)
                if isinstance(key, str) and key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"the key {key!r} is given twice in one mapping", key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return Loader


def parse(data: Any, path: str = "<policy>", *, series: bool = False) -> Policy:
    """A Policy from the parsed YAML (a dict with a ``rules`` list)."""
    if not isinstance(data, dict):
        raise PolicyError(f"{path}: a policy is a mapping with a 'rules' list (got {_kind(data)})")
    for key in data:
        if key not in TOP_KEYS:
            raise PolicyError(f"{path}: unknown key {key!r}{_suggest(key, TOP_KEYS)}")
    rules = data.get("rules")
    if not isinstance(rules, list) or not rules:
        raise PolicyError(f"{path}: 'rules' must be a non-empty list of rules (got {_kind(rules)})")
    parsed, names = [], set()
    for i, item in enumerate(rules, 1):
        rule = _rule(item, f"{path}: rule {i}", series)
        if rule.name in names:
            raise PolicyError(f"{path}: rule {i}: the name {rule.name!r} is used by an earlier rule")
        names.add(rule.name)
        parsed.append(rule)
    return Policy(tuple(parsed), path)


def _rule(item: Any, where: str, series: bool) -> Rule:
    if not isinstance(item, dict):
        raise PolicyError(f"{where}: a rule is a mapping with a name and one condition (got {_kind(item)})")
    for key in item:
        if key not in RULE_KEYS:
            raise PolicyError(f"{where}: unknown key {key!r}{_suggest(str(key), RULE_KEYS)}")
    name = item.get("name")
    if not isinstance(name, str) or not name.strip():
        raise PolicyError(f"{where}: 'name' must be a non-empty string")
    where = f"{where} ({name!r})"
    conditions = [k for k in item if k in CONDITIONS]
    if len(conditions) != 1:
        found = ", ".join(conditions) if conditions else "none"
        raise PolicyError(f"{where}: give exactly one condition (found: {found}; "
                          f"conditions: {', '.join(CONDITIONS)})")
    condition = conditions[0]
    if condition in SERIES_ONLY and not series:
        raise PolicyError(f"{where}: {condition} needs a series of checkpoints (torchdiff series ...)")
    value = _value(condition, item[condition], where)
    if condition in WHOLE_REPORT and ("select" in item or "exclude" in item):
        raise PolicyError(f"{where}: {condition} is about the whole run and takes no select/exclude")
    allow_empty = item.get("allow_empty", False)
    if not isinstance(allow_empty, bool):
        raise PolicyError(f"{where}: allow_empty must be true or false, got {allow_empty!r}")
    return Rule(name=name, condition=condition, value=value,
                select=_selectors(item.get("select"), where, "select"),
                exclude=_selectors(item.get("exclude"), where, "exclude"), allow_empty=allow_empty)


def _value(condition: str, value: Any, where: str) -> Any:
    kind = CONDITIONS[condition]
    if kind == "true":
        if value is not True:
            raise PolicyError(f"{where}: {condition} takes only true (got {value!r}; remove the rule to turn it off)")
        return True
    if kind == "bool":
        if not isinstance(value, bool):
            raise PolicyError(f"{where}: {condition} must be true or false, got {value!r}")
        return value
    if kind == "severity":
        if not isinstance(value, str) or value.lower() not in SEVERITIES:
            raise PolicyError(f"{where}: {condition} must be one of {', '.join(SEVERITIES)}, got {value!r}")
        return value.lower()
    number = _number(value)  # PyYAML reads 1e-3 (no dot) as text: numbers in text are accepted
    if number is None:
        raise PolicyError(f"{where}: {condition} must be a number, got {value!r}")
    if kind == "number" and number < 0:
        raise PolicyError(f"{where}: {condition} must be ≥ 0, got {value!r}")
    if kind == "cosine" and not -1 <= number <= 1:
        raise PolicyError(f"{where}: {condition} must be between -1 and 1, got {value!r}")
    return number


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def _selectors(value: Any, where: str, key: str) -> tuple[Selector, ...]:
    if value is None:
        return ()
    items = value if isinstance(value, list) else [value]
    if not items:  # an empty list is not "no selector": it would select every tensor
        raise PolicyError(f"{where}: {key} is an empty list (give a pattern, or remove {key})")
    out = []
    for text in items:
        if not isinstance(text, str) or not text:
            raise PolicyError(f"{where}: {key} takes a pattern or a list of patterns (got {text!r})")
        out.append(_selector(text, where, key))
    return tuple(out)


def _selector(text: str, where: str, key: str) -> Selector:
    prefix, colon, rest = text.partition(":")
    if colon and prefix == "re":
        try:
            return Selector(text, "re", re.compile(rest))
        except re.error as e:
            raise PolicyError(f"{where}: {key} {text!r} is not a valid regex ({e})") from None
    if colon and prefix == "layer":
        return Selector(text, "layer", rest)
    if colon and prefix == "role":
        if rest not in ROLES:
            raise PolicyError(f"{where}: {key} {text!r}: unknown role (roles: {', '.join(ROLES)})")
        return Selector(text, "role", rest)
    return Selector(text, "glob", text)


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", str: "text"}.get(type(value), type(value).__name__)


def _suggest(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else f" (keys: {', '.join(known)})"


# ---- evaluation ---------------------------------------------------------------------------------

def _steps(report) -> list[tuple[str | None, Any]]:
    """(step label, Report) pairs: one for a comparison, one per step for a series."""
    if hasattr(report, "steps"):
        return [(f"{report.labels[t]} -> {report.labels[t + 1]}", step) for t, step in enumerate(report.steps)]
    return [(None, report)]


def _sqnr_db(d: TensorDiff) -> float:
    m = d.metrics
    if m.l2 == 0:
        return math.inf
    if m.norm_old == 0:
        return -math.inf
    return 20.0 * math.log10(m.norm_old / m.l2)


# Per-tensor conditions: condition -> (figure of one TensorDiff or None when it has none,
# passes(figure, value), how the rule's measured figure combines the tensors' ("max"/"min")).
_PER_TENSOR: dict[str, tuple[Callable[[TensorDiff], Any], Callable[[Any, Any], bool], str]] = {
    "max_rel_l2": (lambda d: d.metrics.rel_l2 if d.metrics else None, lambda f, v: f <= v, "max"),
    "max_abs": (lambda d: d.metrics.max_abs if d.metrics else None, lambda f, v: f <= v, "max"),
    "min_cosine": (lambda d: d.metrics.cosine if d.metrics else None, lambda f, v: f >= v, "min"),
    "min_sqnr_db": (lambda d: _sqnr_db(d) if d.metrics else None, lambda f, v: f >= v, "min"),
    "max_changed_fraction": (lambda d: d.metrics.changed_fraction if d.metrics else None, lambda f, v: f <= v, "max"),
}


# Conditions that read the quantization analysis' figure (after dequantization) when it
# measured the tensor: condition -> its column in that analysis' "Tensors" table.
_DEQUANTIZED = {"min_sqnr_db": "sqnr_db", "max_rel_l2": "rel_l2", "min_cosine": "cosine"}


def _dequantized(step) -> dict[str, dict[str, Any]]:
    """Per-tensor rows of the quantization analysis (dequantized figures), when it ran."""
    a = step.analysis("quantization_analysis") if hasattr(step, "analysis") else None
    if a is None:
        return {}
    for t in a.tables:
        if t.title == "Tensors":
            return {r["tensor"]: r for r in t.records()}
    return {}


def _why_not_same(d: TensorDiff) -> str | None:
    """Why an ``unchanged`` offender is not what the rule wants, beyond its rel_l2: the
    status when it is not plain changed/unchanged (a bf16 copy of equal values is
    ``retyped float32 -> bfloat16``, rel_l2 0, and not bitwise equal)."""
    if d.status == RETYPED:
        return f"retyped {d.old.dtype} -> {d.new.dtype}"
    return None if d.status in (UNCHANGED, CHANGED) else d.status


def _why_no_figure(d: TensorDiff) -> str:
    return {ADDED: "added", REMOVED: "removed"}.get(d.status, d.status)


def evaluate(policy: Policy, report) -> AnalysisResult:
    """Each rule's outcome on ``report`` (a Report or a series' report)."""
    results = [_evaluate_rule(rule, report) for rule in policy.rules]
    failed = [r for r in results if not r["passed"]]
    headline = {"status": "fail" if failed else "pass", "rules": len(results), "failed": len(failed)}
    if failed:
        headline["failed_rules"] = [r["rule"] for r in failed]
    rows = []
    for r in results:
        names = [o["tensor"] + (f" ({o['step']})" if o.get("step") else "") for o in r["offenders"]]
        shown = ", ".join(names[:OFFENDERS_SHOWN]) + (f" +{len(names) - OFFENDERS_SHOWN} more"
                                                      if len(names) > OFFENDERS_SHOWN else "")
        rows.append((r["rule"], r["condition"], stated(r["threshold"]), r["selected"], r["measured"],
                     "PASS" if r["passed"] else "FAIL", shown))
    table = Table("Rules", ("rule", "condition", "threshold", "selected", "measured", "result", "offenders"),
                  tuple(rows))
    notes = (f"policy {policy.path}: {len(results) - len(failed)} of {len(results)} rules pass"
             + (" -> exit 1" if failed else ""),)
    return AnalysisResult(NAME, headline, {"policy": policy.path, "results": results}, (table,), notes,
                          failed=bool(failed))


def _evaluate_rule(rule: Rule, report) -> dict[str, Any]:
    out: dict[str, Any] = {"rule": rule.name, "condition": rule.condition, "threshold": rule.value,
                           "select": rule.selector_text}
    if rule.condition == "converging":
        a = report.analysis("convergence_analysis") if hasattr(report, "analysis") else None
        status = a.headline.get("status", "undetermined") if a is not None else "undetermined"
        out.update(selected=0, measured=status, passed=status in CONVERGED, offenders=[])
        return out
    offenders: list[dict[str, Any]] = []
    figures: list[float] = []
    selected_names: set[str] = set()
    for label, step in _steps(report):
        diffs = [d for d in step if rule.selects(d, step.comparison.layer)]
        selected_names.update(d.name for d in diffs)
        figure = _check(rule, step, diffs, label, offenders)
        if figure is not None:
            figures.append(figure)
    out["selected"] = len(selected_names)
    if rule.condition == "no_anomaly" and any(step.analysis("anomaly_detection") is None for _, step in _steps(report)):
        out.update(measured="anomaly_detection did not run", passed=False, offenders=[])
        return out
    if not selected_names and rule.condition != "no_anomaly" and not rule.allow_empty:
        out.update(measured="no tensor selected", passed=False, offenders=[])
        return out
    if rule.condition in _PER_TENSOR:  # worst first, tensors without a figure before all
        sign = -1.0 if _PER_TENSOR[rule.condition][2] == "max" else 1.0
        offenders.sort(key=lambda o: (o["figure"] is not None, sign * o["figure"] if o["figure"] is not None
                                      and not math.isnan(o["figure"]) else -math.inf))
    out["measured"] = _combine(rule.condition, figures)
    out["passed"] = not offenders
    out["offenders"] = offenders
    return out


def _combine(condition: str, figures: list[float]) -> Any:
    if not figures:
        return None
    if condition in _PER_TENSOR:
        return min(figures) if _PER_TENSOR[condition][2] == "min" else max(figures)
    if condition == "max_share":
        return max(figures)
    return sum(figures)  # counts


def _offender(name: str, figure: Any, label: str | None, why: str | None = None) -> dict[str, Any]:
    o: dict[str, Any] = {"tensor": name, "figure": figure}
    if why:
        o["why"] = why
    if label:
        o["step"] = label
    return o


def _check(rule: Rule, step, diffs: list[TensorDiff], label: str | None, offenders: list) -> float | None:
    """Add this step's offenders; return the step's measured figure (None: nothing measured)."""
    c, v = rule.condition, rule.value
    if c in _PER_TENSOR:
        get, ok, how = _PER_TENSOR[c]
        deq = _dequantized(step) if c in _DEQUANTIZED else {}
        found = []
        for d in diffs:
            f = deq[d.name][_DEQUANTIZED[c]] if d.name in deq else get(d)
            if f is None:
                offenders.append(_offender(d.name, None, label, f"no figure: {_why_no_figure(d)}"))
                continue
            found.append(f)
            if math.isnan(f) or not ok(f, v):
                why = None
                if d.old_all_zero and c in ("max_rel_l2", "min_cosine", "min_sqnr_db"):
                    # rel_l2 = ‖Δ‖/0 = ∞ and cosine undefined by definition: say so, and how to gate it
                    why = "old side all zero (zero-initialised): relative figures are undefined; gate it with max_abs"
                offenders.append(_offender(d.name, f, label, why))
        if not found:
            return None
        clean = [f for f in found if not math.isnan(f)]
        if len(clean) < len(found):
            return math.nan
        return min(clean) if how == "min" else max(clean)
    if c == "unchanged":
        count = 0
        for d in diffs:
            same = d.status == UNCHANGED and d.metrics is not None and d.metrics.equal
            if same != v:
                count += 1
                figure = d.metrics.rel_l2 if d.metrics is not None else None
                offenders.append(_offender(d.name, figure, label, _why_not_same(d)))
        return count
    if c == "no_nonfinite":
        total = 0
        for d in diffs:
            if d.new is not None and (d.new.nan_count or d.new.inf_count):
                n = d.new.nan_count + d.new.inf_count
                total += n
                offenders.append(_offender(d.name, n, label, f"nan={d.new.nan_count}, inf={d.new.inf_count}"))
        return total
    if c in ("same_dtype", "same_shape"):
        count = 0
        for d in diffs:
            if d.old is None or d.new is None:
                count += 1
                offenders.append(_offender(d.name, None, label, _why_no_figure(d)))
                continue
            a, b = (d.old.dtype, d.new.dtype) if c == "same_dtype" else (list(d.old.shape), list(d.new.shape))
            if a != b:
                count += 1
                offenders.append(_offender(d.name, f"{a} -> {b}", label))
        return count
    if c == "max_share":  # the rows and sums of --show-layer-impact's share (figures.GroupSums)
        fig = step.figures
        if not fig.values_kept:
            offenders.append(_offender("*", None, label, "statistics only: the report holds no ‖Δ‖"))
            return math.nan
        summed = summary_mask(fig, step.comparison.scope)
        row = {name: i for i, name in enumerate(fig.names)}
        chosen = np.zeros(len(fig), dtype=bool)
        chosen[[row[d.name] for d in diffs]] = True
        total = group(fig, "all", summed)["all"].dsq if summed.any() else 0.0
        share = group(fig, "all", summed & chosen)["all"].dsq / total if total > 0 and (summed & chosen).any() else 0.0
        if share > v:
            moved = summed & chosen & (fig.l2 > 0)  # a tensor that did not move takes no share
            top = sorted(np.flatnonzero(moved).tolist(), key=lambda i: (-fig.l2[i], fig.names[i]))
            for i in top[:OFFENDERS_SHOWN]:
                offenders.append(_offender(fig.names[i], float(fig.l2[i]) ** 2 / total, label, "its own share"))
        return share
    if c == "no_anomaly":
        from torchdiff.analyses.anomaly_detection import NEW_STATE  # the sides the analysis counts

        a = step.analysis("anomaly_detection")
        rank = SEVERITIES.index(v)
        names = {d.name for d in diffs}
        count = 0
        for f in (a.data.get("anomalies", ()) if a is not None else ()):
            if f["side"] not in NEW_STATE or SEVERITIES.index(f["severity"]) < rank:
                continue
            if (rule.select or rule.exclude) and f["tensor"] not in names:
                continue
            count += 1
            offenders.append(_offender(f["tensor"], f["value"], label, f"{f['type']}, {f['severity']}"))
        return count
    raise AssertionError(c)
