"""The text form: the seed's diff lines, then one section per analysis (tabulate)."""

from __future__ import annotations

import math
import os
import sys
from typing import Any

from tabulate import tabulate

from torchdiff.results import (
    ADDED, CHANGED, REMOVED, RESHAPED, RETYPED, UNCHANGED, AnalysisResult, TensorDiff,
)

_COLORS = {"~": "\033[33m", "+": "\033[32m", "-": "\033[31m"}
_RESET = "\033[0m"


def use_color(no_color: bool = False, stream=None) -> bool:
    """Colour only on a terminal, and never with --no-color or NO_COLOR set."""
    stream = stream if stream is not None else sys.stdout
    if no_color or os.environ.get("NO_COLOR"):
        return False
    return bool(getattr(stream, "isatty", lambda: False)())


def printable(text: Any) -> str:
    """``text`` with non-printing characters escaped (``\\n``, ``\\x1b``, ``\\u202e``): a
    name or string from a file can neither start a line of its own nor drive the terminal.
    JSON and YAML output carry the exact strings."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def num(x: Any) -> str:
    """A figure for text output: 4 decimals in [1e-3, 1e5), else 4 significant digits."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return printable(x)
    if isinstance(x, int):
        return str(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0.0"
    if 1e-3 <= abs(x) < 1e5:
        return f"{x:.4f}"
    return f"{x:.3e}"


def _shape(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _arrow(a: Any, b: Any) -> str:
    return f"{num(a)}->{num(b)}"


def tensor_line(d: TensorDiff, stats: bool, new_name: str | None = None) -> tuple[str, str]:
    """(marker, text) of one tensor line; ``new_name``: the new side's name when a
    mapping paired it under another."""
    if new_name is not None:
        d = _Named(f"{d.name} (new: {new_name})", d)
    if d.status == ADDED:
        return "+", f"{printable(d.name)}: shape={_shape(d.new.shape)}, dtype={d.new.dtype}"
    if d.status == REMOVED:
        return "-", f"{printable(d.name)}: shape={_shape(d.old.shape)}, dtype={d.old.dtype}"
    if d.status == RESHAPED:
        parts = [f"shape={_shape(d.old.shape)}->{_shape(d.new.shape)}"]
        if d.old.dtype != d.new.dtype:
            parts.append(f"dtype={d.old.dtype}->{d.new.dtype}")
        if stats:
            parts += [f"mean={_arrow(d.old.mean, d.new.mean)}", f"std={_arrow(d.old.std, d.new.std)}"]
        return "~", f"{printable(d.name)}: " + ", ".join(parts)
    parts = []
    if d.status == RETYPED:
        parts.append(f"dtype={d.old.dtype}->{d.new.dtype}")
    if stats:
        o, n = d.old, d.new
        parts += [f"mean={_arrow(o.mean, n.mean)}", f"std={_arrow(o.std, n.std)}"]
        if o.min != n.min:
            parts.append(f"min={_arrow(o.min, n.min)}")
        if o.max != n.max:
            parts.append(f"max={_arrow(o.max, n.max)}")
        for field in ("nan_count", "inf_count"):
            if getattr(o, field) or getattr(n, field):
                parts.append(f"{field}={getattr(o, field)}->{getattr(n, field)}")
    else:
        m = d.metrics
        parts += [f"rel_l2={num(m.rel_l2)}", f"max_abs={num(m.max_abs)}", f"cosine={num(m.cosine)}"]
        # The figures cover finite positions only: say when NaN/Inf appeared or went.
        parts += [f"{key}={a}->{b}" for key, (a, b) in d.nonfinite_change.items()]
    return "~", f"{printable(d.name)}: " + ", ".join(parts)


class _Named:
    """A TensorDiff shown under another label."""

    def __init__(self, name: str, d: TensorDiff) -> None:
        self.name, self._d = name, d

    def __getattr__(self, key: str) -> Any:
        return getattr(self._d, key)


def summary_line(report) -> str:
    c = report.comparison.counts()
    total = sum(c.values())
    parts = [f"{c[CHANGED]} changed", f"{c[ADDED]} added", f"{c[REMOVED]} removed"]
    if c[RESHAPED]:
        parts.append(f"{c[RESHAPED]} reshaped")
    if c[RETYPED]:
        parts.append(f"{c[RETYPED]} retyped")
    parts.append(f"{c[UNCHANGED]} unchanged")
    meta = len(report.comparison.metadata_diffs)
    line = f"{total} tensors: " + ", ".join(parts)
    if meta:
        line += f"; {meta} metadata value{'s' if meta != 1 else ''} differ"
    return line


def analysis_section(a: AnalysisResult) -> list[str]:
    labels = {k: a.text_keys.get(k, k) for k in a.headline}
    head = ", ".join(f"{labels[k]}={_headline_value(v)}" if labels[k] else _headline_value(v)
                     for k, v in a.headline.items())
    lines = [f"{a.name}: {head}" if head else f"{a.name}:"]
    for table in a.tables:
        if not table.rows:
            continue
        lines.append("")
        lines.append(f"  {table.title}")
        body = tabulate([[num(v) for v in row] for row in table.rows], headers=table.headers,
                        tablefmt="simple", disable_numparse=True)
        lines += ["  " + line for line in body.splitlines()]
    for note in a.notes:
        lines.append(f"  note: {printable(note)}")
    return lines


def _headline_value(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_headline_value(x) for x in v) + "]"
    if isinstance(v, str):
        return printable(v)
    return num(v)


def inspect_table(report) -> list[str]:
    rows = []
    for d in report.ordered_diffs():
        s = d.new
        rows.append([printable(d.name), _shape(s.shape), s.dtype, s.numel, num(s.mean), num(s.std), num(s.min),
                     num(s.max), s.nan_count, s.inf_count])
    body = tabulate(rows, headers=["name", "shape", "dtype", "params", "mean", "std", "min", "max", "nan", "inf"],
                    tablefmt="simple", disable_numparse=True)
    total = sum(d.new.numel for d in report.ordered_diffs())
    nbytes = sum(d.new.nbytes for d in report.ordered_diffs())
    return body.splitlines() + [f"{len(rows)} tensors, {total} parameters, {nbytes} bytes"]


def render_text(report, color: bool = False) -> str:
    lines: list[str] = []
    comp = report.comparison
    if comp.mode == "inspect":
        lines += inspect_table(report)
    else:
        from torchdiff.render import mapped_names

        renamed = mapped_names(report)
        for d in report.ordered_diffs():
            if d.status == UNCHANGED:
                continue
            marker, text = tensor_line(d, report.stats, renamed.get(d.name, {}).get("path_new"))
            lines.append(_paint(f"  {marker} {text}", marker, color))
        for m in comp.metadata_diffs:
            if m.status == "changed":
                lines.append(_paint(f"  ~ {printable(m.key)}: {_meta(m.old)}->{_meta(m.new)}", "~", color))
            elif m.status == "added":
                lines.append(_paint(f"  + {printable(m.key)}: {_meta(m.new)}", "+", color))
            else:
                lines.append(_paint(f"  - {printable(m.key)}: {_meta(m.old)}", "-", color))
        lines.append(summary_line(report))
    for a in report.analyses:
        lines.append("")
        lines += analysis_section(a)
    return "\n".join(lines)


def render_series_text(series) -> str:
    """A SeriesReport: one summary line per step, notes, each step's analyses, then the
    series analyses."""
    head = f"series: {len(series.checkpoints)} checkpoints, order {series.order}"
    if series.base is not None:
        head += f", base {series.base}"
    lines = [head]
    labels = series.labels
    for t, step in enumerate(series.steps):
        lines.append(f"  {labels[t]} -> {labels[t + 1]}: {summary_line(step)}")
    for note in series.notes:
        lines.append(f"  note: {note}")
    for t, step in enumerate(series.steps):
        if step.analyses:
            lines += ["", f"{labels[t]} -> {labels[t + 1]}"]
            for a in step.analyses:
                lines += ["  " + line if line else line for line in analysis_section(a)]
    for a in series.series_analyses:
        lines.append("")
        lines += analysis_section(a)
    return "\n".join(lines)


def _meta(v: Any) -> str:
    if isinstance(v, float):
        return repr(v)
    return printable(v)


def _paint(line: str, marker: str, color: bool) -> str:
    return f"{_COLORS[marker]}{line}{_RESET}" if color else line
