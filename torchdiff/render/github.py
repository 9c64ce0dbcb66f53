"""--output github: GitHub Actions workflow commands.

One ``::error title=torchdiff policy: RULE::...`` per failed policy rule, one
``::error title=torchdiff anomaly: TYPE::...`` per anomaly on the new side at or above
``--fail-on-anomaly``'s severity (critical without it), then one
``::notice title=torchdiff::...`` with the summary (and the policy's and the anomaly
gate's verdicts).
Values are escaped as the runner expects (``%``, CR, LF; also ``:`` and ``,`` in
properties): https://docs.github.com/actions/reference/workflow-commands-for-github-actions
"""

from __future__ import annotations

from typing import Any

from torchdiff.render.markdown import _analyses, _inspect, _steps, inspect_line
from torchdiff.render.text import num, printable, summary_line
from torchdiff.units import counted, stated

OFFENDERS_SHOWN = 5


def escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def command(kind: str, title: str, message: str) -> str:
    return f"::{kind} title={escape_property(title)}::{escape_data(message)}"


def _v(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else num(value) if value is not None else "none"


def render_github(report) -> str:
    lines: list[str] = []
    verdict = ""
    for label, a in _analyses(report):
        if a.name == "policy":
            for r in a.data["results"]:
                if r["passed"]:
                    continue
                names = [printable(o["tensor"]) + (f" ({o['step']})" if o.get("step") else "")
                         for o in r["offenders"]]
                shown = ", ".join(names[:OFFENDERS_SHOWN]) + (
                    f" +{len(names) - OFFENDERS_SHOWN} more" if len(names) > OFFENDERS_SHOWN else "")
                message = (f"{r['condition']} {stated(r['threshold'])} on {r['select']}: measured {_v(r['measured'])}"
                           + (f"; offenders: {shown}" if shown else ""))
                lines.append(command("error", f"torchdiff policy: {r['rule']}", message))
            h = a.headline
            verdict = f"; policy {h['status']} ({h['rules'] - h['failed']} of {h['rules']} rules pass)"
        elif a.name == "anomaly_detection":
            from torchdiff.analyses.anomaly_detection import SEVERITIES

            gate = (a.data.get("fail_on_anomaly") or {}).get("severity", "critical")  # --fail-on-anomaly, else critical
            for f in a.data.get("anomalies", ()):
                if SEVERITIES.index(f["severity"]) >= SEVERITIES.index(gate) and f["side"] in ("new", "both"):
                    where = f" ({label})" if label else ""
                    lines.append(command("error", f"torchdiff anomaly: {f['type']}",
                                         f"{printable(f['tensor'])}{where}: {f['figure']}={num(f['value'])} "
                                         f"(threshold {num(f['threshold'])}), severity {f['severity']}"))
            tripped = a.data.get("fail_on_anomaly")
            if tripped is not None:
                verdict += (f"; --fail-on-anomaly {tripped['severity']}: {counted(tripped['count'], 'finding')} "
                            "at or above" + (" -> failed" if tripped["tripped"] else ""))
    if hasattr(report, "steps"):
        summary = "; ".join(f"{label}: {summary_line(step)}" for label, step in _steps(report))
    elif _inspect(report):
        summary = f"{printable(report.comparison.new_name)}: {inspect_line(report)}"
    else:
        summary = summary_line(report)
    lines.append(command("notice", "torchdiff", summary + verdict))
    return "\n".join(lines)
