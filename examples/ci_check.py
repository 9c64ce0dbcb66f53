"""A CI gate: compare a baseline and a candidate checkpoint, fail through the exit code.

    python examples/ci_check.py BASELINE CANDIDATE [--fail-on-anomaly high] [--max-rel-l2 X]
                                [--allow-architecture-change] [--fail-on-any-change] [--json FILE]

Exit codes: 0 the candidate passes; 1 it fails a check (each failure is printed);
2 bad usage or an unreadable checkpoint (as the torchdiff CLI).

Checks:
- architecture: a tensor added, removed, reshaped or retyped fails (unless
  ``--allow-architecture-change``), read from the Report rather than from the JSON;
- anomalies: a finding on the candidate at or above ``--fail-on-anomaly``
  (default high; ``none`` to skip) — NaN/Inf, exploding or dead tensors...;
- drift: the global relative change ‖Δ‖/‖baseline‖ above ``--max-rel-l2``;
- ``--fail-on-any-change``: any difference at all (an "unchanged weights" gate).

In a GitHub Actions step::

    - run: python examples/ci_check.py models/baseline.safetensors models/candidate.safetensors --json model_diff.json
"""

from __future__ import annotations

import argparse
import sys

import torchdiff
from torchdiff.analyses import ANALYSES
from torchdiff.errors import TorchDiffError
from torchdiff.results import ADDED, REMOVED, RESHAPED, RETYPED

SEVERITIES = ("info", "low", "medium", "high", "critical")


def check(baseline: str, candidate: str, fail_on_anomaly: str = "high", max_rel_l2: float | None = None,
          allow_architecture_change: bool = False, fail_on_any_change: bool = False):
    """Return (report, failures): the comparison and one line per failed check."""
    analyses = []
    options = {}
    if fail_on_anomaly != "none" and "anomaly_detection" in ANALYSES:
        analyses.append("anomaly_detection")
        options["fail_on_anomaly"] = fail_on_anomaly
    report = torchdiff.compare(baseline, candidate, analyses=analyses, **options)
    failures: list[str] = []
    if not allow_architecture_change:
        for d in report:
            if d.status == RETYPED:  # the dtype changed, the shape did not
                failures.append(f"architecture: {d.name} retyped ({d.old.dtype} -> {d.new.dtype})")
            elif d.status in (ADDED, REMOVED, RESHAPED):
                side_old = list(d.old.shape) if d.old else None
                side_new = list(d.new.shape) if d.new else None
                failures.append(f"architecture: {d.name} {d.status} ({side_old} -> {side_new})")
    anomalies = report.analysis("anomaly_detection")
    if anomalies is not None and anomalies.failed:
        failures.append(f"anomalies at or above {fail_on_anomaly}: "
                        + ", ".join(f"{k}={v}" for k, v in anomalies.headline.items()))
    scalars = report.scalars()
    rel = scalars.get("torchdiff/global_rel_l2", 0.0)
    if max_rel_l2 is not None and not rel <= max_rel_l2:
        failures.append(f"drift: global rel_l2 {rel:.6g} > {max_rel_l2:g}")
    if fail_on_any_change and report.has_differences:
        counts = report.comparison.counts()
        failures.append("changed: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n and s != "unchanged"))
    return report, failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("baseline")
    parser.add_argument("candidate")
    parser.add_argument("--fail-on-anomaly", default="high", choices=SEVERITIES + ("none",))
    parser.add_argument("--max-rel-l2", type=float, default=None)
    parser.add_argument("--allow-architecture-change", action="store_true")
    parser.add_argument("--fail-on-any-change", action="store_true")
    parser.add_argument("--json", default=None, help="write the comparison (the CLI's --output json) here")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0) and 2
    try:
        report, failures = check(args.baseline, args.candidate, args.fail_on_anomaly, args.max_rel_l2,
                                 args.allow_architecture_change, args.fail_on_any_change)
    except TorchDiffError as e:
        print(f"ci_check: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(report.to_json())
    counts = report.comparison.counts()
    rel = report.scalars().get("torchdiff/global_rel_l2", 0.0)
    print(f"{args.baseline} -> {args.candidate}: {counts['changed']} changed, {counts['added']} added, "
          f"{counts['removed']} removed, {counts['reshaped']} reshaped; global rel_l2={rel:.6g}")
    for line in failures:
        print(f"FAIL {line}")
    print("FAILED" if failures else "PASSED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
