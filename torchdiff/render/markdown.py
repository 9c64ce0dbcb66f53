"""--output markdown: a summary fit for a pull-request comment or $GITHUB_STEP_SUMMARY.

Sections, each only when it has something to say: a title (the two checkpoints, or the
series), the summary line, the policy's verdict and rule table (``--policy``), the
anomalies at or above ``ANOMALY_SHOWN`` on the new side, the most changed tensors (at
most ``TOP_TENSORS``, by rel_l2), then every other analysis' headline and tables folded
in a ``<details>`` block. Names are code spans; ``|`` is escaped inside tables.
"""

from __future__ import annotations

import re
from typing import Any

from torchdiff.render.text import _headline_value, num, printable, summary_line
from torchdiff.results import OLD_ALL_ZERO
from torchdiff.units import counted, stated

TOP_TENSORS = 10
ANOMALY_SHOWN = ("critical", "high")


#: Characters that would format or break a table cell's text (a tensor named ``*x*`` or
#: ``<script>``): escaped with a backslash (GitHub-flavoured markdown).
_SPECIAL = re.compile(r"([\\`*\[\]<>|~])")


def _escaped(text: str) -> str:
    return _SPECIAL.sub(r"\\\1", printable(text)).replace("\n", " ")


def _cell(value: Any) -> str:
    if isinstance(value, str):  # names and labels: shown as they are, never as markup
        return _escaped(value)
    text = num(value) if value is not None else ""
    return text.replace("|", "\\|").replace("\n", " ")


def _code(name: str) -> str:
    text = printable(name).replace("`", "'")
    return f"`{text}`".replace("|", "\\|")


def table(headers, rows) -> list[str]:
    """A GitHub-flavoured markdown table (cells already formatted)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _steps(report) -> list[tuple[str | None, Any]]:
    if hasattr(report, "steps"):
        return [(f"{report.labels[t]} → {report.labels[t + 1]}", s) for t, s in enumerate(report.steps)]
    return [(None, report)]


def render_markdown(report) -> str:
    series = hasattr(report, "steps")
    lines: list[str] = []
    if series:
        lines.append(f"## torchdiff series: {len(report.checkpoints)} checkpoints")
        lines.append("")
        lines += [f"- {label}: {summary_line(step)}" for label, step in _steps(report)]
    elif _inspect(report):
        lines.append(f"## torchdiff inspect: {_code(report.comparison.new_name)}")
        lines.append("")
        lines.append(inspect_line(report))
    else:
        comp = report.comparison
        lines.append(f"## torchdiff: {_code(comp.old_name)} → {_code(comp.new_name)}")
        lines.append("")
        lines.append(summary_line(report))
    policy = _find(report, "policy")
    if policy is not None:
        lines += [""] + policy_section(policy)
    lines += anomaly_section(report)
    if not series and not _inspect(report):
        lines += top_tensors(report)
    others = [(label, a) for label, a in _analyses(report) if a.name != "policy"]
    if others:
        lines += ["", "<details><summary>Analyses</summary>", ""]
        for label, a in others:
            head = ", ".join(f"{a.text_keys.get(k, k)}={_headline_value(k, v)}" for k, v in a.headline.items())
            lines.append(f"**{a.name}**{' (' + label + ')' if label else ''}: {_escaped(head)}")
            lines.append("")
            for t in a.tables:
                if t.rows:
                    lines.append(f"*{t.title}*")
                    lines.append("")
                    lines += table(t.headers, [[_cell(v) for v in row] for row in t.rows])
                    lines.append("")
        lines.append("</details>")
    return "\n".join(lines) + "\n"


def _inspect(report) -> bool:
    return getattr(getattr(report, "comparison", None), "mode", "") == "inspect"


def inspect_line(report) -> str:
    """One checkpoint: its tensors, parameters and bytes (as the text form's last line)."""
    sides = [d.new for d in report]
    return (f"{counted(len(sides), 'tensor')}, {counted(sum(s.numel for s in sides), 'parameter')}, "
            f"{counted(sum(s.nbytes for s in sides), 'byte')}")


def _analyses(report) -> list[tuple[str | None, Any]]:
    if hasattr(report, "steps"):
        out = [(label, a) for label, step in _steps(report) for a in step.analyses]
        return out + [(None, a) for a in report.series_analyses]
    return [(None, a) for a in report.analyses]


def _find(report, name: str):
    for _, a in _analyses(report):
        if a.name == name:
            return a
    return None


def policy_section(a) -> list[str]:
    h = a.headline
    verdict = "**PASS**" if h["status"] == "pass" else "**FAIL**"
    lines = [f"### Policy: {verdict} ({h['rules'] - h['failed']} of {h['rules']} rules pass)", ""]
    rows = []
    for r in a.data["results"]:
        names = [_code(o["tensor"]) + (f" ({o['step']})" if o.get("step") else "") for o in r["offenders"]]
        shown = ", ".join(names[:5]) + (f" +{len(names) - 5} more" if len(names) > 5 else "")
        rows.append([_cell(r["rule"]), f"`{r['condition']}`", _cell(stated(r["threshold"])), _cell(r["selected"]),
                     _cell(r["measured"]), "pass" if r["passed"] else "**FAIL**", shown])
    lines += table(("rule", "condition", "threshold", "selected", "measured", "result", "offenders"), rows)
    return lines


def anomaly_section(report) -> list[str]:
    rows = []
    for label, a in _analyses(report):
        if a.name != "anomaly_detection":
            continue
        for f in a.data.get("anomalies", ()):
            if f["severity"] in ANOMALY_SHOWN and f["side"] in ("new", "both"):
                rows.append([f["severity"], f["type"], _code(f["tensor"]), _cell(f["figure"]), _cell(f["value"]),
                             _cell(f["threshold"])] + ([label] if label else []))
    if not rows:
        return []
    headers = ["severity", "type", "tensor", "figure", "value", "threshold"]
    if hasattr(report, "steps"):
        headers.append("step")
    return ["", f"### Anomalies ({', '.join(ANOMALY_SHOWN)})", ""] + table(headers, rows)


def top_tensors(report) -> list[str]:
    changed = [d for d in report if d.is_difference]
    if not changed:
        return []
    from torchdiff.analyses.sort_by_change_magnitude import change_key

    # the one "most changed" order: zero-initialised tensors (rel_l2 = ∞) after the measured, by ‖Δ‖
    measured = sorted((d for d in changed if d.metrics is not None), key=lambda d: change_key(d, "rel_l2"))
    rows = [[_code(d.name), d.status, OLD_ALL_ZERO, _cell(d.metrics.max_abs), "n/a"] if d.old_all_zero else
            [_code(d.name), d.status, _cell(d.metrics.rel_l2), _cell(d.metrics.max_abs), _cell(d.metrics.cosine)]
            for d in measured[:TOP_TENSORS]]
    rows += [[_code(d.name), d.status, "", "", ""] for d in changed if d.metrics is None][:TOP_TENSORS]
    lines = ["", f"### Most changed tensors (top {min(len(measured), TOP_TENSORS)} by rel_l2"
                 f"{f' of {len(measured)}' if len(measured) > TOP_TENSORS else ''})", ""]
    return lines + table(("tensor", "status", "rel_l2", "max_abs", "cosine"), rows)
