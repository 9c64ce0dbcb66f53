"""Report -> text | json | yaml. ``to_items`` is the single source of JSON and YAML."""

from __future__ import annotations

import math
from typing import Any

from torchdiff.errors import UsageError

output_formats = ["json", "text", "yaml"]

# How non-finite floats are written in JSON/YAML (JSON has no NaN/Infinity literals).
NAN, POS_INF, NEG_INF = "NaN", "Infinity", "-Infinity"


def finite_json(value: Any) -> Any:
    """Replace non-finite floats by the documented strings, recursively."""
    if isinstance(value, float):  # numpy.float64 too (a float subclass YAML cannot represent)
        if math.isnan(value):
            return NAN
        if math.isinf(value):
            return POS_INF if value > 0 else NEG_INF
        return float(value)
    if isinstance(value, dict):
        return {str(k): finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return finite_json(item())
        except (TypeError, ValueError):
            pass
    return str(value)


def to_items(report) -> list[dict[str, Any]]:
    """The top-level list of JSON/YAML: one object per reported item, each with
    ``type`` and ``path``: differing tensors (in output order), differing metadata,
    then one object per analysis. In inspect mode every tensor is an item."""
    items: list[dict[str, Any]] = []
    inspect = report.comparison.mode == "inspect"
    for d in report.ordered_diffs():
        if inspect:
            item = {"type": "tensor", "path": d.name, **d.new.to_dict()}
            items.append(item)
        elif d.is_difference:
            item = d.to_dict()
            m = d.metrics
            if m is not None and m.norm_old == 0 and m.l2 > 0:
                item["old_all_zero"] = True  # rel_l2 is inf and cosine NaN by definition; l2 measures it
            tied = d.extras.get("tied_to")
            if tied:
                item["tied_to"] = tied
            items.append(item)
    for m in report.comparison.metadata_diffs:
        items.append(m.to_dict())
    for a in report.analyses:
        items.append(a.to_dict())
    return finite_json(items)


def render(report, fmt: str = "text", color: bool = False, indent: int | None = 2) -> str:
    """Render a Report; other report kinds (a series) bring their own ``render``."""
    if getattr(report, "comparison", None) is None:
        return report.render(fmt, color=color, indent=indent)
    if fmt == "text":
        from torchdiff.render.text import render_text

        return render_text(report, color=color)
    if fmt == "json":
        import json

        return json.dumps(to_items(report), indent=indent, allow_nan=False, ensure_ascii=False)
    if fmt == "yaml":
        try:
            import yaml
        except ImportError:
            raise UsageError("--output yaml needs PyYAML (pip install pyyaml)") from None
        return yaml.safe_dump(to_items(report), sort_keys=False, allow_unicode=True)
    raise UsageError(f"unknown --output {fmt!r} (choose from {', '.join(output_formats)})")


def scalars(report) -> dict[str, float]:
    """A flat dict of named figures, ready for any metrics logger.

    Keys: ``torchdiff/<figure>`` for global figures, ``torchdiff/rel_l2/<tensor>``
    per changed tensor, and ``torchdiff/<analysis>/<key>`` for numeric headline
    figures of the analyses.
    """
    comp = report.comparison
    out: dict[str, float] = {}
    counts = comp.counts()
    for status, n in counts.items():
        out[f"torchdiff/{status}"] = float(n)
    dsq = old_sq = new_sq = dot = 0.0
    measured = 0
    for d in comp.diffs:
        m = d.metrics
        if m is None:
            continue
        if d.is_difference:
            out[f"torchdiff/rel_l2/{d.name}"] = m.rel_l2
        if d.extras.get("tied_to") and all(d.extras["tied_to"].values()):
            continue  # tied on both sides: a copy of another tensor, whose values are already summed
        measured += 1
        dsq += m.l2**2
        old_sq += m.norm_old**2
        new_sq += m.norm_new**2
        dot += m.dot
    if measured:  # global figures only when some pair of equal shape was measured
        out["torchdiff/global_l2"] = math.sqrt(dsq)
        out["torchdiff/global_rel_l2"] = math.sqrt(dsq / old_sq) if old_sq > 0 else (math.inf if dsq else 0.0)
        denom = math.sqrt(old_sq * new_sq)
        out["torchdiff/global_cosine"] = dot / denom if denom > 0 else math.nan
    for a in report.analyses:
        for key, value in a.headline.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"torchdiff/{a.name}/{key}"] = float(value)
    return out
