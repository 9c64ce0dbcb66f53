"""Report -> text | json | yaml. ``to_items`` is the single source of JSON and YAML."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from torchdiff.errors import UsageError
from torchdiff.status import UNCHANGED

output_formats = ["github", "json", "markdown", "text", "yaml"]

from torchdiff.results import NAN, NEG_INF, POS_INF  # noqa: F401 - how JSON/YAML write non-finite floats


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
    """The top-level list of JSON/YAML for a compare or inspect Report: one object per
    reported item, each with ``type`` and ``path``: differing tensors (in output order),
    differing metadata, then one object per analysis. In inspect mode every tensor is an
    item."""
    fig = report.comparison.figures
    rows = report.row_order()
    if rows is None:
        rows = range(len(fig))
    inspect = report.comparison.mode == "inspect"
    if not inspect:
        rows = [i for i in rows if fig.status[i] != UNCHANGED]
    # Tensor items come JSON-safe from the columns (no per-value recursion: 100,000
    # tensors are one pass per column); metadata and analyses go through finite_json.
    items: list[dict[str, Any]] = fig.items(rows, one_sided=inspect)
    if not inspect:
        _flags(fig, rows, items)
    renamed = mapped_names(report) if not inspect else {}
    if renamed:  # paired through --map: the new side's own name after the path
        items = [{"type": it.pop("type"), "path": it["path"], **renamed[it.pop("path")], **it}
                 if it["path"] in renamed else it for it in items]
    rest = [m.to_dict() for m in report.comparison.metadata_diffs] + [a.to_dict() for a in report.analyses]
    return items + finite_json(rest)


def _flags(fig, rows, items: list[dict[str, Any]]) -> None:
    """Mark items, in place: ``old_all_zero`` where the old side is all zero (rel_l2 is
    inf and cosine NaN by definition; l2 measures the change), ``tied_to`` where the
    tensor is tied to another (pairing.annotate)."""
    if not rows:
        return
    for j in np.flatnonzero(fig.old_all_zero()[np.asarray(rows, dtype=np.int64)]).tolist():
        items[j]["old_all_zero"] = True
    if fig.extras:
        for j, i in enumerate(rows):
            tied = (fig.extras.get(i) or {}).get("tied_to")
            if tied:
                items[j]["tied_to"] = tied


def mapped_names(report) -> dict[str, dict[str, Any]]:
    """Pair name -> ``{"path_new": ..., ["tied": ...]}`` for tensors paired through a
    mapping under another name (the ``mapping`` section's ``pairs``)."""
    analysis = getattr(report, "analysis", None)
    found = analysis("mapping") if analysis is not None else None
    if found is None:
        return {}
    out = {}
    for p in found.data.get("pairs", ()):
        if p["path_new"] != p["path"] or p.get("tied"):
            out[p["path"]] = {"path_new": p["path_new"], **({"tied": p["tied"]} if p.get("tied") else {})}
    return out


def render(report, fmt: str = "text", color: bool = False, indent: int | None = 2, top: int | None = None) -> str:
    """Render any report of the Report family (torchdiff.report): JSON and YAML from its
    ``to_dict()``, text from render.text (``top``: ``--top``), markdown and github from
    render.markdown/github."""
    if fmt == "markdown":
        from torchdiff.render.markdown import render_markdown

        return render_markdown(report)
    if fmt == "github":
        from torchdiff.render.github import render_github

        return render_github(report)
    if fmt == "text":
        from torchdiff.render.text import render_series_text, render_text

        if getattr(report, "kind", "") == "series":
            return render_series_text(report, top=top)
        return render_text(report, color=color, top=top)
    if fmt == "json":
        import json

        return json.dumps(report.to_dict(), indent=indent, allow_nan=False, ensure_ascii=False)
    if fmt == "yaml":
        try:
            import yaml
        except ImportError:
            raise UsageError("--output yaml needs PyYAML (pip install pyyaml)") from None
        return yaml.safe_dump(report.to_dict(), sort_keys=False, allow_unicode=True)
    raise UsageError(f"unknown --output {fmt!r} (choose from {', '.join(output_formats)})")
