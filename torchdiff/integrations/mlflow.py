"""MLflow adapter: log a Report's figures and its JSON to the active run.

>>> import mlflow, torchdiff                                       # doctest: +SKIP
>>> from torchdiff.integrations.mlflow import log_report           # doctest: +SKIP
>>> with mlflow.start_run():                                       # doctest: +SKIP
...     log_report(torchdiff.compare("old.safetensors", "new.safetensors"))

The seed's MLflow example (``diffai ... --output json`` in a subprocess, then
``mlflow.log_dict`` and ``log_metric("total_changes", len(diff_data))``), done
in-process: the JSON artifact is the CLI's ``--output json`` list, and the metrics
are ``report.scalars()`` plus ``torchdiff/total_changes`` (= len of that list).
MLflow is imported when a function here is called, never before.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping

from torchdiff.errors import MissingDependencyError

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


def metrics_of(scalars: Mapping[str, float], prefix: str = "") -> dict[str, float]:
    """MLflow-safe names for the finite figures of ``scalars`` (NaN and ±∞ are left
    out: MLflow would store ∞ as the largest double). Names that collide after
    sanitising get a ``_2``, ``_3``... suffix."""
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
        The metrics logged, by their MLflow names.
    """
    mlflow = _mlflow()
    if scalars is None:
        items = report.to_dict()
        scalars = {**report.scalars(), "torchdiff/total_changes": float(len(items))}
    metrics = metrics_of(scalars, prefix)
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


__all__ = ["log_report", "metric_name", "metrics_of", "report_logger"]
