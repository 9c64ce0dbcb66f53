"""TensorBoard adapter: a Report's scalars (global, per tensor, per layer) and its
histograms of updates, through ``torch.utils.tensorboard``.

>>> from torch.utils.tensorboard import SummaryWriter               # doctest: +SKIP
>>> from torchdiff.integrations.tensorboard import log_report, report_logger
>>> log_report(torchdiff.compare(a, b, histograms=8), SummaryWriter("runs/x"), step=0)  # doctest: +SKIP
>>> monitor = CheckpointMonitor(model, every=100, histograms=8,     # doctest: +SKIP
...                             on_report=report_logger(SummaryWriter("runs/x")))

What is logged: torchdiff.integrations._figures (docs/REPORT.md, "Trackers"). The
histograms are written raw (``add_histogram_raw``) from torchdiff's own fixed bins;
their min/max are the outer edges of the outermost non-empty bins, ``sum_squares`` of
an update is ‖Δ‖² and its ``sum`` is n·(mean_new − mean_old). The tensorboard package
is imported when a function here is called, never before.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from torchdiff.errors import MissingDependencyError
from torchdiff.integrations import _figures


def _writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise MissingDependencyError(
            "torchdiff.integrations.tensorboard needs TensorBoard (pip install tensorboard)") from None
    return SummaryWriter


def log_report(report, writer, step: int | None = None, *, tensors: bool = True, histograms: bool = True,
               prefix: str = "") -> dict[str, float]:
    """Log ``report`` to TensorBoard.

    Args:
        report: a ``torchdiff.Report``.
        writer: a ``SummaryWriter``, or a log directory (a writer is opened and closed here).
        step: the global step of every value.
        tensors: also the per-tensor ``torchdiff/rel_l2/<tensor>`` scalars.
        histograms: also the histograms the report holds (see the module doc).
        prefix: prepended to every tag.

    Returns:
        The scalars logged, by tag.
    """
    own = isinstance(writer, (str, os.PathLike))
    if own:
        writer = _writer_class()(log_dir=os.fspath(writer))
    else:
        _writer_class()
    try:
        values = {prefix + k: v for k, v in _figures.scalars(report, tensors=tensors).items()}
        for tag, value in values.items():
            writer.add_scalar(tag, value, global_step=step)
        if histograms:
            for h in _figures.histograms(report):
                if h.num == 0:
                    continue
                writer.add_histogram_raw(prefix + h.tag, min=h.min, max=h.max, num=h.num, sum=h.sum,
                                         sum_squares=h.sum_squares, bucket_limits=h.edges[1:],
                                         bucket_counts=h.counts, global_step=step)
        writer.flush()
    finally:
        if own:
            writer.close()
    return values


def report_logger(writer, *, tensors: bool = False, histograms: bool = True,
                  prefix: str = "") -> Callable[[int, Any], None]:
    """An ``on_report(step, report)`` for ``CheckpointMonitor`` that logs each report at its step."""

    def on_report(step: int, report) -> None:
        log_report(report, writer, step=step, tensors=tensors, histograms=histograms, prefix=prefix)

    return on_report


__all__ = ["log_report", "report_logger"]
