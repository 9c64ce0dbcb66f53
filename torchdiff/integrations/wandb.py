"""Weights & Biases adapter: a Report's scalars (global, per tensor, per layer), a table
of every tensor, and its histograms of updates, logged to a W&B run.

>>> import wandb, torchdiff                                         # doctest: +SKIP
>>> from torchdiff.integrations.wandb import log_report, report_logger
>>> run = wandb.init(project="ft")                                   # doctest: +SKIP
>>> log_report(torchdiff.compare(a, b, histograms=8), run, step=0)  # doctest: +SKIP
>>> monitor = CheckpointMonitor(model, every=100, histograms=8, on_report=report_logger(run))  # doctest: +SKIP

What is logged: torchdiff.integrations._figures (docs/REPORT.md, "Trackers"); the
histograms are ``wandb.Histogram(np_histogram=(counts, edges))`` from torchdiff's own
fixed bins, the table ``torchdiff/tensors`` holds name, layer, status, params and the
pair figures (non-finite figures as empty cells). Works offline (``WANDB_MODE=offline``).
wandb is imported when a function here is called, never before.
"""

from __future__ import annotations

from typing import Any, Callable

from torchdiff.errors import MissingDependencyError, UsageError
from torchdiff.integrations import _figures


def _wandb():
    try:
        import wandb
    except ImportError:
        raise MissingDependencyError("torchdiff.integrations.wandb needs wandb (pip install wandb)") from None
    return wandb


def log_report(report, run=None, step: int | None = None, *, tensors: bool = True, histograms: bool = True,
               table: bool = True, prefix: str = "") -> dict[str, float]:
    """Log ``report`` to a W&B run (``run``, else the active ``wandb.run``) in one ``run.log`` call.

    Args:
        report: a ``torchdiff.Report``.
        run: a ``wandb`` Run; None for the active one.
        step: the step of every value (None: W&B's own counter).
        tensors: also the per-tensor ``torchdiff/rel_l2/<tensor>`` scalars.
        histograms: also the histograms the report holds.
        table: also the ``torchdiff/tensors`` table.
        prefix: prepended to every key.

    Returns:
        The scalars logged, by key.

    Raises:
        UsageError: no run given and none active.
    """
    wandb = _wandb()
    run = run if run is not None else wandb.run
    if run is None:
        raise UsageError("no active W&B run: call wandb.init() first, or pass run=")
    values = {prefix + k: v for k, v in _figures.scalars(report, tensors=tensors).items()}
    data: dict[str, Any] = dict(values)
    if histograms:
        for h in _figures.histograms(report):
            data[prefix + h.tag] = wandb.Histogram(np_histogram=(h.counts, h.edges))
    if table:
        columns, rows = _figures.table(report)
        data[prefix + "torchdiff/tensors"] = wandb.Table(columns=columns, data=rows)
    run.log(data, step=step)
    return values


def report_logger(run=None, *, tensors: bool = False, histograms: bool = True, table: bool = False,
                  prefix: str = "") -> Callable[[int, Any], None]:
    """An ``on_report(step, report)`` for ``CheckpointMonitor`` that logs each report at its step."""

    def on_report(step: int, report) -> None:
        log_report(report, run, step=step, tensors=tensors, histograms=histograms, table=table, prefix=prefix)

    return on_report


__all__ = ["log_report", "report_logger"]
