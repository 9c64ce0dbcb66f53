"""PyTorch Lightning adapter: a Callback that runs a CheckpointMonitor and logs its figures.

>>> from torchdiff.integrations.lightning import TorchDiffCallback    # doctest: +SKIP
>>> trainer = lightning.Trainer(callbacks=[TorchDiffCallback(every=100)])  # doctest: +SKIP

``TorchDiffCallback`` subclasses ``lightning.pytorch.Callback`` (the ``lightning``
package) when it is installed, else ``pytorch_lightning.Callback``;
``PLTorchDiffCallback`` always subclasses ``pytorch_lightning.Callback`` (for a
``pytorch_lightning.Trainer`` when both packages are installed). The framework is
imported when one of these names is first used, not when this module is.

The monitor is created at ``on_train_start`` (the model is on its device, and
sharded, by then) and consulted at ``on_train_batch_end`` with ``trainer.global_step``
(optimizer steps, so gradient accumulation is counted right). With one process, or
DDP (every rank holds the whole model), it lives on global rank zero only, which under
DDP broadcasts the figures at its report steps (the other ranks follow the same
``every`` rule), so that ``trainer.callback_metrics`` has them on every rank
(EarlyStopping and ModelCheckpoint run on every rank). Under an
FSDP2 strategy (``ModelParallelStrategy``: parameters are DTensors) it is created on
every rank with the process group (``integrations.monitor_group``): each rank
snapshots and reduces its own shards, and every rank takes part in each comparison's
collectives and gets the same figures. At each report the figures
(``MonitorRecord.scalars()``: update rel_l2, per-layer rel_l2, counts, the analyses'
headline figures) go, from global rank zero only, to every logger of the trainer at
that step (``trainer.loggers``; or ``pl_module.log_dict`` with ``log_with="log_dict"``,
on every rank under DDP or FSDP2), and into ``trainer.callback_metrics`` (on every rank).
``on_report`` runs on global rank zero only.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from torchdiff.callbacks import CheckpointMonitor, MonitorRecord
from torchdiff.errors import MissingDependencyError, UsageError
from torchdiff.integrations import finite_figures, monitor_group
from torchdiff.integrations import monitor_options as monitor_options_of
from torchdiff.report import Report

_FLAVOURS = {"lightning": "lightning.pytorch", "pytorch_lightning": "pytorch_lightning"}
_CLASSES: dict[str, type] = {}


class _TorchDiffCallbackMixin:
    """The framework-independent part; see the module docstring.

    Args:
        every: report every this many optimizer steps.
        reference, analyses, keep, device: as ``CheckpointMonitor``.
        on_report: called as ``on_report(step, report)`` after each report.
        log: send the figures to the trainer's loggers.
        log_tensors: include per-tensor rel_l2 (one metric per tensor: many for a big model).
        log_with: ``"loggers"`` (default): ``logger.log_metrics(figures, step=global_step)``
            for each of ``trainer.loggers``, once per report, and the figures put in
            ``trainer.callback_metrics`` (for EarlyStopping/ModelCheckpoint ``monitor=``);
            ``"log_dict"``: ``pl_module.log_dict(on_step=True)`` — Lightning then repeats
            the last value at every step until the epoch ends.
        prog_bar: with ``log_with="log_dict"``, show the figures in the progress bar too.
        **monitor_options: any other ``CheckpointMonitor`` keyword (``include_buffers``,
            ``save_dir``, ``keep_reports``, ``epsilon``, analysis options...).
    """

    def __init__(self, every: int = 100, reference: str = "previous", analyses: Iterable[str] = (),
                 keep: str = "cpu", device: Any = None, on_report=None, *, log: bool = True,
                 log_tensors: bool = False, log_with: str = "loggers", prog_bar: bool = False,
                 **monitor_options: Any) -> None:
        super().__init__()
        if log_with not in ("loggers", "log_dict"):
            raise UsageError(f"log_with must be 'loggers' or 'log_dict', got {log_with!r}")
        self.monitor_options = monitor_options_of(every, reference, analyses, keep, device, **monitor_options)
        self.on_report = on_report
        self.log_figures = log
        self.log_tensors = log_tensors
        self.log_with = log_with
        self.prog_bar = prog_bar
        self.monitor: CheckpointMonitor | None = None
        self.sharded = False  # the monitor runs on every rank with a process group (FSDP2)
        self._replicas = False  # DDP: rank zero monitors and broadcasts its figures to the other ranks
        self._steps: tuple[int, int | None] | None = None  # ranks without a monitor: (start, last report)

    @property
    def history(self) -> list[MonitorRecord]:
        return self.monitor.history if self.monitor is not None else []

    @property
    def last_report(self) -> Report | None:
        return self.monitor.last_report if self.monitor is not None else None

    def on_train_start(self, trainer, pl_module) -> None:
        group = monitor_group(pl_module, self.monitor_options)
        self.sharded = group is not None
        # DDP (replicas): rank zero monitors alone and, at its report steps, broadcasts the
        # figures, so that every rank has them (EarlyStopping / ModelCheckpoint(monitor=...)
        # read trainer.callback_metrics on every rank and agree through a collective)
        self._replicas = not self.sharded and int(getattr(trainer, "world_size", 1)) > 1
        self.monitor, self._steps = None, None
        if not (self.sharded or trainer.is_global_zero):
            self._steps = (int(trainer.global_step), None)
            return
        options = dict(self.monitor_options, process_group=group)
        self.monitor = CheckpointMonitor(pl_module, start_step=int(trainer.global_step),
                                         on_report=self.on_report if trainer.is_global_zero else None, **options)

    def _due(self, step: int) -> bool:
        """Whether rank zero's monitor reports at ``step`` (CheckpointMonitor.__call__'s rule)."""
        start, last = self._steps
        return step % self.monitor_options["every"] == 0 and step != last and step != start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = int(trainer.global_step)
        if self.monitor is None:  # a DDP rank: rank zero's figures, at its report steps
            if self._steps is None or not self._due(step):
                return
            self._steps = (self._steps[0], step)
            if not (self.log_figures and self._replicas):
                return
            scalars = trainer.strategy.broadcast(None, src=0)
        else:
            report = self.monitor(step)  # sharded: every rank, same step, same collectives
            if report is None or not self.log_figures:
                return
            scalars = self.monitor.history[-1].scalars(tensors=self.log_tensors)
            if self._replicas:
                scalars = trainer.strategy.broadcast(scalars, src=0)
        if self.log_with == "log_dict":
            # sharded or replicas: every rank logs the same values (usable as a monitor= key on every rank)
            finite = finite_figures(scalars, "the Lightning loggers") if trainer.is_global_zero else \
                {k: v for k, v in scalars.items() if math.isfinite(v)}
            pl_module.log_dict(finite, on_step=True, on_epoch=False, prog_bar=self.prog_bar,
                               logger=True, rank_zero_only=not (self.sharded or self._replicas))
        elif trainer.is_global_zero:
            finite = finite_figures(scalars, "the Lightning loggers")
            for logger in trainer.loggers:
                logger.log_metrics(finite, step=step)
        # every figure, NaN and ∞ too, for EarlyStopping / ModelCheckpoint(monitor="torchdiff/global_rel_l2")
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in scalars.items()})


def _build(flavour: str) -> type:
    if flavour in _CLASSES:
        return _CLASSES[flavour]
    try:
        if flavour == "lightning":
            from lightning.pytorch import Callback
        else:
            from pytorch_lightning import Callback
    except ImportError:
        raise MissingDependencyError(
            f"torchdiff.integrations.lightning needs {_FLAVOURS[flavour]} (pip install "
            f"{'lightning' if flavour == 'lightning' else 'pytorch-lightning'})"
        ) from None
    name = "TorchDiffCallback" if flavour == "lightning" else "PLTorchDiffCallback"
    cls = type(name, (_TorchDiffCallbackMixin, Callback), {
        "__module__": __name__, "__qualname__": name, "__doc__": _TorchDiffCallbackMixin.__doc__,
    })
    _CLASSES[flavour] = cls
    return cls


def __getattr__(name: str) -> type:
    if name == "TorchDiffCallback":
        try:
            cls = _build("lightning")
        except MissingDependencyError:
            try:
                cls = _build("pytorch_lightning")
            except MissingDependencyError:
                raise MissingDependencyError(
                    "TorchDiffCallback needs PyTorch Lightning (pip install lightning)"
                ) from None
        globals()["TorchDiffCallback"] = cls
        return cls
    if name == "PLTorchDiffCallback":
        cls = _build("pytorch_lightning")
        globals()["PLTorchDiffCallback"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["PLTorchDiffCallback", "TorchDiffCallback"]
