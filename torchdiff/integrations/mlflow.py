"""MLflow adapter: log a Report's figures and its JSON to the active run.

>>> import mlflow, torchdiff                                       # doctest: +SKIP
>>> from torchdiff.integrations.mlflow import log_report           # doctest: +SKIP
>>> mlflow.set_tracking_uri("sqlite:///mlflow.db")                 # doctest: +SKIP
>>> with mlflow.start_run():                                       # doctest: +SKIP
...     log_report(torchdiff.compare("old.safetensors", "new.safetensors"))

A comparison logged to MLflow in-process: the JSON artifact is the CLI's ``--output
json`` list, and the metrics are ``report.scalars()`` plus ``torchdiff/total_changes``
(= the length of that list). MLflow is imported when a function here is called, never
before.

Tracking store: MLflow 3 refuses a plain ``./mlruns`` folder unless
``MLFLOW_ALLOW_FILE_STORE=true``; give it a SQLite store instead
(``mlflow.set_tracking_uri("sqlite:///mlflow.db")`` or ``MLFLOW_TRACKING_URI``).
:func:`sqlite_tracking` does that when nothing else is configured.

Figures MLflow cannot store (NaN, ±∞: a tensor whose old side is all zero has an
infinite rel_l2) are not logged as metrics: ``log_report`` warns with their names and
values and sets the run tag ``torchdiff.dropped_metrics``; the JSON artifact keeps them.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from typing import Any, Callable, Mapping

from torchdiff.errors import MissingDependencyError
from torchdiff.units import counted

#: MLflow metric names may hold alphanumerics, ``_ - . : /`` and spaces, up to 250 chars.
_BAD_CHARS = re.compile(r"[^A-Za-z0-9_\-. :/]")
_MAX_NAME = 250


def _mlflow():
    try:
        import mlflow
    except ImportError:
        raise MissingDependencyError("torchdiff.integrations.mlflow needs MLflow (pip install mlflow)") from None
    return mlflow


def metric_name(key: str) -> str:
    """``key`` with every character MLflow refuses replaced by ``_``, cut to 250 chars."""
    name = _BAD_CHARS.sub("_", key)
    return name[:_MAX_NAME]


def sqlite_tracking(path: str = "mlflow.db") -> str:
    """Point MLflow at a SQLite store (``sqlite:///<path>``) unless a tracking URI is
    configured (``MLFLOW_TRACKING_URI``); returns the URI in use."""
    mlflow = _mlflow()
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return mlflow.get_tracking_uri()
    uri = f"sqlite:///{os.path.abspath(path)}"
    mlflow.set_tracking_uri(uri)
    return uri


def non_finite(scalars: Mapping[str, float]) -> dict[str, float]:
    """The figures of ``scalars`` that are NaN or ±∞ (what :func:`metrics_of` leaves out)."""
    return {k: float(v) for k, v in scalars.items() if not math.isfinite(float(v))}


def metrics_of(scalars: Mapping[str, float], prefix: str = "") -> dict[str, float]:
    """MLflow-safe names for the finite figures of ``scalars`` (NaN and ±∞ are left
    out: MLflow stores ∞ as the largest double and NaN as a missing point; see
    :func:`non_finite`). Names that collide after sanitising get a ``_2``, ``_3``...
    suffix."""
    out: dict[str, float] = {}
    for key, value in scalars.items():
        value = float(value)
        if not math.isfinite(value):
            continue
        name = metric_name(prefix + key)
        if name in out:
            n = 2
            while f"{name[: _MAX_NAME - 4]}_{n}" in out:
                n += 1
            name = f"{name[: _MAX_NAME - 4]}_{n}"
        out[name] = value
    return out


def log_report(report, artifact_file: str | None = "torchdiff.json", step: int | None = None,
               scalars: Mapping[str, float] | None = None, prefix: str = "") -> dict[str, float]:
    """Log a Report to the active MLflow run (one is started if none is active, as
    ``mlflow.log_metrics`` does).

    Args:
        report: a ``torchdiff.Report`` (from ``compare``, or a monitor's ``on_report``).
        artifact_file: where the JSON (the CLI's ``--output json``) goes in the run's
            artifacts; None to skip it.
        step: the metrics' step (a training step for a monitor's reports).
        scalars: the figures to log; default ``report.scalars()`` plus
            ``torchdiff/total_changes``.
        prefix: prepended to every metric name.

    Returns:
        The metrics logged, by their MLflow names. Figures that are NaN or ±∞ are not
        among them: a warning names each with its value (MLflow stores ∞ as the largest
        double and NaN as a gap, either of which would read as a figure), and the run tag
        ``torchdiff.dropped_metrics`` lists them; the JSON artifact keeps them.
    """
    mlflow = _mlflow()
    if scalars is None:
        items = report.to_dict()
        scalars = {**report.scalars(), "torchdiff/total_changes": float(len(items))}
    metrics = metrics_of(scalars, prefix)
    dropped = non_finite(scalars)
    if dropped:
        listed = ", ".join(f"{prefix}{k}={v}" for k, v in dropped.items())
        warnings.warn(f"torchdiff: {counted(len(dropped), 'figure')} not logged to MLflow, which cannot store NaN or "
                      f"infinity as a metric (an infinite rel_l2 means the old side was all zero): {listed}",
                      stacklevel=2)
        mlflow.set_tag("torchdiff.dropped_metrics", listed[:5000])
    if metrics:
        mlflow.log_metrics(metrics, step=step)
    if artifact_file:
        mlflow.log_text(report.to_json(), artifact_file)
    return metrics


def report_logger(artifact_dir: str | None = "torchdiff", tensors: bool = False,
                  monitor=None) -> Callable[[int, Any], None]:
    """An ``on_report(step, report)`` for ``CheckpointMonitor`` that logs each report:
    figures at ``step`` (the monitor's record scalars when ``monitor`` is given —
    per-layer update figures included — else ``report.scalars()``) and the JSON as
    ``<artifact_dir>/step_XXXXXXXX.json`` (None: no artifact)."""

    def on_report(step: int, report) -> None:
        scalars = None
        if monitor is not None and monitor.history and monitor.history[-1].step == step:
            scalars = monitor.history[-1].scalars(tensors=tensors)
        artifact = f"{artifact_dir}/step_{step:08d}.json" if artifact_dir else None
        log_report(report, artifact_file=artifact, step=step, scalars=scalars)

    return on_report


__all__ = ["log_report", "metric_name", "metrics_of", "non_finite", "report_logger", "sqlite_tracking"]
