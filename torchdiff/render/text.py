"""The text form: a summary line, the seed's diff lines, the summary again, then one
section per analysis (tabulate).

Reading rules (docs/OUTPUT.md has them in full):

- the verdict first: one summary line before the tensor lines and the same line after;
  ``top`` limits the tensor lines (``… and M more``); metadata lines follow the tensors
  and collapse to a count beyond :data:`METADATA_LINES`;
- width: no line wider than the terminal (``COLUMNS``, else the terminal, else
  :data:`DEFAULT_WIDTH`) except one holding a single long tensor name: tensor lines
  wrap after a comma, headlines and notes wrap, tables elide long names in the middle
  (``layers.1…fc1.weight``) and, when still too wide, print one row per line;
- numbers for people: floats with 4 significant digits, exact whole numbers (0, 1,
  a count) as integers with thousands separators, byte sizes in B/KB/MB/GB;
- order: with ``--sort-by-change-magnitude`` every table with a tensor or layer column
  follows the report's order (a table ranked by its own figure, with a ``rank``
  column, keeps its rank), and ``--stats`` lines keep the sort key visible.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import sys
import textwrap
from typing import Any

from tabulate import tabulate

from torchdiff.results import (
    ADDED, CHANGED, NEW_ALL_ZERO, OLD_ALL_ZERO, REMOVED, RESHAPED, RETYPED, UNCHANGED, AnalysisResult, TensorDiff,
)
from torchdiff.units import counted, human_bytes, number

_COLORS = {"~": "\033[33m", "+": "\033[32m", "-": "\033[31m"}
_RESET = "\033[0m"

#: Width when neither COLUMNS nor a terminal says (a pipe, a file, a test).
DEFAULT_WIDTH = 120
#: Metadata lines printed before they collapse to a count (JSON lists every one).
METADATA_LINES = 10
#: A table name cell is never elided below this many characters.
MIN_NAME = 16
_NAME_COLUMNS = ("tensor", "layer", "name", "path", "file", "checkpoint", "group")
#: Titles of the tables that list every tensor or layer by name, the ones that follow
#: --sort-by-change-magnitude's order. Other tables keep their own order, even when it
#: happens to be alphabetical (the largest tensors, all of one size; the anomalies,
#: by severity).
LISTED_BY_NAME = frozenset({"Tensors", "Diagonal", "Layers", "Per layer", "Bytes by layer"})
_SORT = "sort_by_change_magnitude"
_DEQUANTIZED = "dequantized"


def use_color(no_color: bool = False, stream=None) -> bool:
    """Colour only on a terminal, and never with --no-color or NO_COLOR set."""
    stream = stream if stream is not None else sys.stdout
    if no_color or os.environ.get("NO_COLOR"):
        return False
    return bool(getattr(stream, "isatty", lambda: False)())


def terminal_width() -> int:
    """``COLUMNS`` if set, else the terminal's width, else :data:`DEFAULT_WIDTH`."""
    return max(shutil.get_terminal_size((DEFAULT_WIDTH, 24)).columns, 40)


def printable(text: Any) -> str:
    """``text`` with non-printing characters escaped (``\\n``, ``\\x1b``, ``\\u202e``): a
    name or string from a file can neither start a line of its own nor drive the terminal.
    JSON and YAML output carry the exact strings."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def num(x: Any) -> str:
    """A figure for text output: :func:`torchdiff.units.number` (4 significant digits,
    whole numbers with thousands separators); anything else as :func:`printable`."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return printable(x)
    return number(x)


def size(x: Any) -> str:
    """A byte count (int) in B/KB/MB/GB; anything else as :func:`num`."""
    if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x):
        return human_bytes(x)
    return num(x)


def _is_bytes(header: str) -> bool:
    h = header.lower()
    return h == "bytes" or h.startswith("bytes_") or h.endswith("_bytes") or h in ("size", "stored")


def _shape(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _arrow(a: Any, b: Any) -> str:
    return f"{num(a)}->{num(b)}"


def tensor_line(d: TensorDiff, stats: bool, sort_key: str | None = None, dequantized: bool = False,
                new_name: str | None = None) -> tuple[str, str]:
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
        parts.append(f"dtype={d.old.dtype}->{d.new.dtype}" + (" (dequantized)" if dequantized else ""))
    elif dequantized:
        parts.append("dequantized")
    zero = d.old_all_zero
    if zero:
        parts.append(OLD_ALL_ZERO)
    if stats:
        o, n = d.old, d.new
        if sort_key is not None and d.metrics is not None:
            value = getattr(d.metrics, sort_key)
            parts.append(f"{sort_key}={num(value)}" if not (zero and not math.isfinite(value))
                         else f"l2={num(d.metrics.l2)}")  # what the sort used for it
        parts += [f"mean={_arrow(o.mean, n.mean)}", f"std={_arrow(o.std, n.std)}"]
        if o.min != n.min:
            parts.append(f"min={_arrow(o.min, n.min)}")
        if o.max != n.max:
            parts.append(f"max={_arrow(o.max, n.max)}")
        for field in ("nan_count", "inf_count"):
            if getattr(o, field) or getattr(n, field):
                parts.append(f"{field}={_arrow(getattr(o, field), getattr(n, field))}")
    elif d.metrics is not None:
        m = d.metrics
        if zero:
            parts += [f"l2={num(m.l2)}", f"max_abs={num(m.max_abs)}"]
        elif d.new_all_zero:  # the cosine is undefined (‖new‖ = 0)
            parts += [NEW_ALL_ZERO, f"rel_l2={num(m.rel_l2)}", f"max_abs={num(m.max_abs)}"]
        else:
            parts += [f"rel_l2={num(m.rel_l2)}", f"max_abs={num(m.max_abs)}", f"cosine={num(m.cosine)}"]
        if d.extras.get("below_float64_resolution"):  # int64 beyond 2**53: the bytes say changed
            parts.append("integers differ below float64's resolution (figures in float64)")
        # The figures cover finite positions only: say when NaN/Inf appeared or went.
        parts += [f"{key}={_arrow(a, b)}" for key, (a, b) in d.nonfinite_change.items()]
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
    parts = [f"{c[CHANGED]:,} changed", f"{c[ADDED]:,} added", f"{c[REMOVED]:,} removed"]
    if c[RESHAPED]:
        parts.append(f"{c[RESHAPED]:,} reshaped")
    if c[RETYPED]:
        parts.append(f"{c[RETYPED]:,} retyped")
    parts.append(f"{c[UNCHANGED]:,} unchanged")
    meta = len(report.comparison.metadata_diffs)
    line = f"{counted(total, 'tensor')}: " + ", ".join(parts)
    if meta:
        line += f"; {meta:,} metadata value{'s differ' if meta != 1 else ' differs'}"
    return line


#: A size and its unit (``4.592 KB``): one word for :func:`wrap`.
_SIZE = re.compile(r"(\d) (B|KB|MB|GB|TB)\b")
_GLUE = "\u00a0"  # no-break space: textwrap breaks at ASCII whitespace only; printable() escapes it in names


def wrap(line: str, width: int, indent: str = "    ") -> list[str]:
    """``line`` wrapped at spaces to ``width``; continuation lines start with ``indent``.
    A single word longer than the width (a long name) stays whole on its own line, and a
    size stays on one line with its unit."""
    if len(line) <= width:
        return [line]
    lead = line[: len(line) - len(line.lstrip())]
    parts = textwrap.wrap(_SIZE.sub(rf"\1{_GLUE}\2", line), width, initial_indent="",
                          subsequent_indent=lead + indent, break_long_words=False, break_on_hyphens=False)
    return [part.replace(_GLUE, " ") for part in parts] or [line]


def elide(text: str, limit: int) -> str:
    """``text`` cut in the middle to ``limit`` characters (``layers.1…fc1.weight``)."""
    if len(text) <= limit:
        return text
    if limit < 3:
        return text[:limit]
    keep = limit - 1
    head = keep // 2
    return text[:head] + "…" + text[len(text) - (keep - head):]


def analysis_section(a: AnalysisResult, width: int | None = None, rank=None, top: int | None = None) -> list[str]:
    """The headline, tables and notes of one analysis.

    ``rank`` (a function of a table row's name cell, or None) orders the rows of the
    tables listed by name (:data:`LISTED_BY_NAME`); ``top`` (``--top``) keeps the first
    rows of the tables with a tensor or layer column.
    """
    width = width or terminal_width()
    labels = {k: a.text_keys.get(k, k) for k in a.headline}
    head = ", ".join(f"{labels[k]}={_headline_value(k, v)}" if labels[k] else _headline_value(k, v)
                     for k, v in a.headline.items())
    lines = wrap(f"{a.name}: {head}" if head else f"{a.name}:", width)
    for table in a.tables:
        if not table.rows:
            continue
        lines.append("")
        lines.append(f"  {table.title}")
        lines += table_lines(table.headers, table.rows, width, rank if table.title in LISTED_BY_NAME else None, top)
    for note in a.notes:
        lines += wrap(f"  note: {printable(note)}", width, indent="      ")
    return lines


def table_lines(headers, rows, width: int, rank=None, top: int | None = None) -> list[str]:
    """A tabulate table indented by two, fitted to ``width``.

    With ``rank``, a table listed by name (rows in alphabetical order of their tensor or
    layer column) follows the report's order instead; a table in an order of its own
    (ranked, top-N) keeps it. With ``top``, a table with a tensor or layer column shows
    its first ``top`` rows, then ``… and M more rows``. Too wide: a long text column (a formula, evidence) wraps
    inside its cells; then the name column is elided in the middle (down to
    :data:`MIN_NAME` characters) when that alone makes it fit; else the columns wrap
    into groups, each led by the whole name column.
    """
    headers = tuple(headers)
    rows = list(rows)
    lowered = [h.lower() for h in headers]
    name_col = next((i for i, h in enumerate(lowered) if h in ("tensor", "layer")), None)
    if rank is not None and name_col is not None and len(rows) > 1:
        names = [str(r[name_col]) for r in rows]
        if names == sorted(names) or names == sorted(names, key=_natural):  # listed by name, not ranked
            rows.sort(key=lambda r: rank(str(r[name_col])))
    more = len(rows) - top if top and name_col is not None and len(rows) > top else 0
    if not more:
        return _laid_out(headers, rows, width)
    if "rank" in lowered:  # the table ranks its rows (layer impact: by share): the top ranks, in its order
        r = lowered.index("rank")
        kept = set(sorted(range(len(rows)), key=lambda i: (not _is_number(rows[i][r]), rows[i][r]
                                                           if _is_number(rows[i][r]) else 0, i))[:top])
        rows = [row for i, row in enumerate(rows) if i in kept]
    else:  # the first rows, in the table's (or the report's) order
        rows = rows[:top]
    return _laid_out(headers, rows, width) + [f"  … and {counted(more, 'more row')} (--top 0 lists every row)"]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _laid_out(headers: tuple, rows: list, width: int) -> list[str]:
    """``table_lines``' layout of rows already in their order (see there)."""
    lowered = [h.lower() for h in headers]
    formats = [size if _is_bytes(h) else num for h in headers]
    cells = [[f(v) for f, v in zip(formats, row)] for row in rows]
    candidates = [i for i, h in enumerate(lowered) if h in _NAME_COLUMNS] or [0]
    col = candidates[0]  # the tensor (or layer, or other name) column: elided, then leading each group

    plain = _plain("".join(headers)) and all(_plain("".join(r)) for r in cells)  # a row at a time

    def render(columns, body, limits=None) -> list[str]:
        if plain and not limits:
            return ["  " + line for line in simple_table([headers[i] for i in columns],
                                                         [[r[i] for i in columns] for r in body])]
        text = tabulate([[r[i] for i in columns] for r in body], headers=[headers[i] for i in columns],
                        tablefmt="simple", disable_numparse=True,
                        maxcolwidths=[limits.get(i) for i in columns] if limits else None)
        return ["  " + line for line in text.splitlines()]

    def widest(lines: list[str]) -> int:
        return max(len(line) for line in lines)

    every = list(range(len(headers)))
    out = render(every, cells)
    if widest(out) <= width:
        return out
    widths = _column_widths(out)
    # A text column holding long prose (wider than half the line) wraps inside its cells.
    limits = {}
    for i in every:
        if i != col and widths[i] > width // 2 and any(" " in r[i] for r in cells):
            limits[i] = max(20, width - (sum(widths) - widths[i]) - 2 * len(every) - 2)
    if limits:
        out = render(every, cells, limits)
        if widest(out) <= width:
            return out
        widths = _column_widths(out)
    over = widest(out) - width
    longest = max(len(r[col]) for r in cells)
    limit = max(MIN_NAME, longest - over, len(headers[col]))
    if limit < longest:
        elided = [[elide(c, limit) if i == col else c for i, c in enumerate(r)] for r in cells]
        attempt = render(every, elided, limits)
        if widest(attempt) <= width:
            return attempt
    # Wrap: groups of columns that fit, each led by the name column: whole, unless the name
    # beside the widest other column is too wide (a narrow terminal): then elided to fit.
    room = width - 4 - max((widths[i] for i in every if i != col), default=0)
    limit = max(MIN_NAME, room, len(headers[col]))
    if widths[col] > room and limit < longest:
        cells = [[elide(c, limit) if i == col else c for i, c in enumerate(r)] for r in cells]
        widths[col] = max(len(headers[col]) + 2, max(len(r[col]) for r in cells))
    groups: list[list[int]] = []
    current = [col]
    used = 2 + widths[col]
    for i in every:
        if i == col:
            continue
        if used + 2 + widths[i] > width and len(current) > 1:
            groups.append(current)
            current, used = [col], 2 + widths[col]
        current.append(i)
        used += 2 + widths[i]
    groups.append(current)
    out = []
    for n, group in enumerate(groups):
        if n:
            out.append("")
        out += render(group, cells, limits)
    return out


def _plain(cell: str) -> bool:
    """Printable ASCII: one character, one column; nothing tabulate would reinterpret."""
    return cell.isascii() and cell.isprintable()


def simple_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    """The lines of ``tabulate(rows, headers, tablefmt="simple", disable_numparse=True)``
    for cells of printable ASCII (``_plain``), without tabulate's per-cell type
    detection: 1,000,000 cells in 0.3 s instead of 4 s. Cells are stripped (headers
    are not) and left-aligned; a column is as wide as its widest cell, and at least its header plus
    2; lines end without spaces. tests/test_text_output.py checks it against tabulate
    itself (hypothesis)."""
    rows = [[c.strip() for c in r] for r in rows]
    widths = [len(h) + 2 for h in headers]
    for j in range(len(headers)):
        widest = max((len(r[j]) for r in rows), default=0)
        if widest > widths[j]:
            widths[j] = widest
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip(), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines).splitlines()  # as tabulate's text: lines right-stripped, no last empty line


def _natural(name: str) -> list:
    """Sort key reading numbers as numbers (``layers.9`` before ``layers.10``)."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def _column_widths(lines: list[str]) -> list[int]:
    """Column widths of a tabulate "simple" table, read off its dash rule."""
    rule = next(line for line in lines if line.strip().startswith("-"))
    return [len(dashes) for dashes in rule.split()]


def _headline_value(key: str, v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_headline_value(key, x) for x in v) + "]"
    if isinstance(v, str):
        return printable(v)
    return size(v) if _is_bytes(key) else num(v)


def inspect_table(report, width: int | None = None, top: int | None = None) -> list[str]:
    fig = report.figures
    order = _rows(report)
    s = fig.new  # every tensor is present on the one side; the rows shown, from the columns
    shown = order[:top] if top else order
    figures = [getattr(s, f)[shown].tolist() for f in ("numel", "mean", "std", "min", "max", "nan_count", "inf_count")]
    rows = [[printable(fig.names[i]), _shape(s.shape[i]), s.dtype[i], *values]
            for i, *values in zip(shown, *figures)]
    lines = table_lines(["name", "shape", "dtype", "params", "mean", "std", "min", "max", "nan", "inf"], rows,
                        width or terminal_width())
    lines = [line[2:] for line in lines]
    if top and len(order) > top:
        lines.append(f"… and {len(order) - top:,} more (--top 0 lists every tensor)")
    from torchdiff.figures import stored_nbytes, tied_side

    # values, parameters and bytes as the file holds them: a tied weight once, each storage once;
    # parameters are the trainable ones (role parameter), not buffers, optimizer or training state
    once = ~tied_side(fig, "new")
    total, nbytes = int(fig.new.numel[once].sum()), int(stored_nbytes(fig, "new").sum())
    params = int(fig.new.numel[once & fig.in_scope("params")].sum())
    held = counted(params, "parameter") + (f" ({counted(total, 'value')} in all)" if params != total else "")
    return lines + wrap(f"{counted(len(order), 'tensor')}, {held}, {human_bytes(nbytes)}", width or terminal_width())


def _rows(report) -> list[int]:
    """Row numbers of the figures table in output order."""
    order = report.row_order()
    return list(range(len(report.figures))) if order is None else order


def _ranker(report):
    """A sort key for table rows by name: a tensor's place in the report's order, a
    layer's by its first tensor; None when the report is not sorted."""
    if report.order is None or report.analysis(_SORT) is None:
        return None
    from torchdiff.names import layer_of

    place: dict[str, int] = {}
    for i, name in enumerate(report.order):
        place.setdefault(name, i)
        place.setdefault(layer_of(name), i)
    end = len(place)
    return lambda name: (place.get(name, end), name)


def render_text(report, color: bool = False, top: int | None = None, width: int | None = None) -> str:
    """The text form of a Report (see the module docstring).

    Args:
        report: the Report.
        color: ANSI colours on the tensor lines.
        top: print at most this many tensor lines (0 or None: all), then ``… and M more``.
        width: the line width; None reads the terminal (``COLUMNS``).
    """
    width = width or terminal_width()
    lines: list[str] = []
    comp = report.comparison
    sort = report.analysis(_SORT)
    sort_key = sort.headline.get("sort_key") if sort is not None else None
    deq = report.analysis(_DEQUANTIZED)
    dequantized = set(deq.data.get("old", ())) | set(deq.data.get("new", ())) if deq is not None else set()
    if comp.mode == "inspect":
        lines += inspect_table(report, width, top)
    else:
        from torchdiff.render import mapped_names

        renamed = mapped_names(report)
        summary = summary_line(report)
        fig = report.figures
        changed = [i for i in _rows(report) if fig.status[i] != UNCHANGED]
        if changed or comp.metadata_diffs:
            lines += wrap(summary, width)
        shown = changed[:top] if top else changed
        for d in (fig[i] for i in shown):  # a TensorDiff view only for the lines printed
            marker, text = tensor_line(d, report.stats, sort_key, d.name in dequantized,
                                       renamed.get(d.name, {}).get("path_new"))
            for line in wrap(f"  {marker} {text}", width, indent="    "):
                lines.append(_paint(line, marker, color))
        if len(shown) < len(changed):
            lines.append(f"  … and {len(changed) - len(shown):,} more (--top 0 lists every tensor)")
        metadata = list(comp.metadata_diffs)
        for m in metadata[:METADATA_LINES] if len(metadata) > METADATA_LINES + 1 else metadata:
            if m.status == "changed":
                a, b = _meta(m.old), _meta(m.new)
                if a == b:  # equal at 4 significant digits: show every digit
                    a, b = printable(repr(m.old)), printable(repr(m.new))
                line, marker = f"  ~ {printable(m.key)}: {a}->{b}", "~"
            elif m.status == "added":
                line, marker = f"  + {printable(m.key)}: {_meta(m.new)}", "+"
            else:
                line, marker = f"  - {printable(m.key)}: {_meta(m.old)}", "-"
            lines += [_paint(part, marker, color) for part in wrap(line, width, indent="    ")]
        if len(metadata) > METADATA_LINES + 1:
            lines.append(f"  … and {len(metadata) - METADATA_LINES:,} more metadata values "
                         "(--output json lists every one)")
        lines += wrap(summary, width)
    rank = _ranker(report)
    for a in report.analyses:
        lines.append("")
        lines += analysis_section(a, width, rank, top)
    return "\n".join(lines)


def render_series_text(series, top: int | None = None, width: int | None = None) -> str:
    """A SeriesReport: one summary line per step, notes, each step's analyses, then the
    series analyses; ``top`` and ``width`` as in :func:`render_text`."""
    width = width or terminal_width()
    head = f"series: {len(series.checkpoints)} checkpoints, order {series.order}"
    if series.base is not None:
        head += f", base {series.base}"
    lines = wrap(head, width)
    labels = series.labels
    for t, step in enumerate(series.steps):
        lines += wrap(f"  {labels[t]} -> {labels[t + 1]}: {summary_line(step)}", width)
    for note in series.notes:
        lines += wrap(f"  note: {printable(note)}", width, indent="      ")
    for t, step in enumerate(series.steps):
        if step.analyses:
            lines += ["", f"{labels[t]} -> {labels[t + 1]}"]
            for a in step.analyses:  # indented by two: laid out two columns narrower
                lines += ["  " + line if line else line for line in analysis_section(a, width - 2, top=top)]
    for a in series.series_analyses:
        lines.append("")
        lines += analysis_section(a, width, top=top)
    return "\n".join(lines)


def _meta(v: Any) -> str:
    if isinstance(v, float):
        return num(v)
    return printable(v)


def _paint(line: str, marker: str, color: bool) -> str:
    return f"{_COLORS[marker]}{line}{_RESET}" if color else line
