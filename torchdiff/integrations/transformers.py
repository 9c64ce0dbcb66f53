"""Hugging Face transformers adapter: a TrainerCallback that runs a CheckpointMonitor.

>>> from torchdiff.integrations.transformers import TorchDiffCallback, add_callback  # doctest: +SKIP
>>> trainer = Trainer(model=model, args=args, train_dataset=data)                    # doctest: +SKIP
>>> add_callback(trainer, TorchDiffCallback(every=100))                              # doctest: +SKIP

- ``on_train_begin``: the monitor is created on the world-process-zero (snapshot of
  the model as training starts).
- ``on_step_end``: ``monitor(state.global_step)``; at a report step it asks the
  Trainer to log (``control.should_log``), and ``on_log`` adds the figures
  (``MonitorRecord.scalars()``) to that log entry and to ``state.log_history``.
  Reporting callbacks (MLflow, W&B, TensorBoard) placed *before* this one in the
  Trainer's list see the entry before the figures are added: ``add_callback``
  puts this callback first so that every reporter receives them.
- ``on_save``: writes the report of the checkpoint's step (the CLI's ``--output
  json``) into the checkpoint folder as ``torchdiff.json``; at a save step that is not
  a report step it compares the live model with the reference without recording it
  (``monitor.compare()``), so the history keeps its regular interval
  (``report_on_save=False`` to skip those).

transformers is imported when ``TorchDiffCallback`` is first used, not when this
module is.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

from torchdiff.callbacks import CheckpointMonitor, MonitorRecord
from torchdiff.errors import MissingDependencyError
from torchdiff.integrations import monitor_options as monitor_options_of
from torchdiff.report import Report

_CLASS: list[type] = []


class _TorchDiffCallbackMixin:
    """The framework-independent part; see the module docstring.

    Args:
        every: report every this many optimizer steps (``state.global_step``).
        reference, analyses, keep, device: as ``CheckpointMonitor``.
        on_report: called as ``on_report(step, report)`` after each report.
        log: add the figures to the Trainer's logs.
        log_tensors: include per-tensor rel_l2 (one metric per tensor).
        report_on_save: at a checkpoint save off the ``every`` grid, compare anyway (not
            recorded in the history) for the checkpoint's ``torchdiff.json``.
        json_on_save: write ``torchdiff.json`` into each checkpoint folder.
        **monitor_options: any other ``CheckpointMonitor`` keyword.
    """

    def __init__(self, every: int = 100, reference: str = "previous", analyses: Iterable[str] = (),
                 keep: str = "cpu", device: Any = None, on_report=None, *, log: bool = True,
                 log_tensors: bool = False, report_on_save: bool = True, json_on_save: bool = True,
                 **monitor_options: Any) -> None:
        super().__init__()
        self.monitor_options = monitor_options_of(every, reference, analyses, keep, device, **monitor_options)
        self.on_report = on_report
        self.log_figures = log
        self.log_tensors = log_tensors
        self.report_on_save = report_on_save
        self.json_on_save = json_on_save
        self.monitor: CheckpointMonitor | None = None
        self._pending: dict[str, float] = {}

    @property
    def history(self) -> list[MonitorRecord]:
        return self.monitor.history if self.monitor is not None else []

    @property
    def last_report(self) -> Report | None:
        return self.monitor.last_report if self.monitor is not None else None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero or model is None:
            return
        self.monitor = CheckpointMonitor(model, start_step=int(state.global_step), on_report=self.on_report,
                                         **self.monitor_options)

    def on_step_end(self, args, state, control, **kwargs):
        if self.monitor is None:
            return
        if self.monitor(int(state.global_step)) is not None:
            self._queue()
            if self.log_figures:
                control.should_log = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self._pending:
            return
        if logs is not None:
            logs.update(self._pending)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(self._pending)
        self._pending = {}

    def on_save(self, args, state, control, **kwargs):
        if self.monitor is None:
            return
        step = int(state.global_step)
        last = self.monitor.history[-1].step if self.monitor.history else None
        if last == step:
            report = self.monitor.last_report
        elif self.report_on_save and step != self.monitor.reference_step:
            report = self.monitor.compare()  # not recorded: the history keeps its interval
        else:
            report = None
        if self.json_on_save and report is not None:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")
            if os.path.isdir(folder):
                with open(os.path.join(folder, "torchdiff.json"), "w", encoding="utf-8") as f:
                    f.write(report.to_json())

    def _queue(self) -> None:
        if self.log_figures:
            self._pending.update(self.monitor.history[-1].scalars(tensors=self.log_tensors))


def _build() -> type:
    if _CLASS:
        return _CLASS[0]
    try:
        from transformers import TrainerCallback
    except ImportError:
        raise MissingDependencyError(
            "torchdiff.integrations.transformers needs transformers (pip install transformers)"
        ) from None
    cls = type("TorchDiffCallback", (_TorchDiffCallbackMixin, TrainerCallback), {
        "__module__": __name__, "__qualname__": "TorchDiffCallback", "__doc__": _TorchDiffCallbackMixin.__doc__,
    })
    _CLASS.append(cls)
    return cls


def add_callback(trainer, callback=None, **kwargs: Any):
    """Put a TorchDiffCallback first in ``trainer``'s callbacks (so reporting callbacks
    see its figures); builds one from ``kwargs`` when ``callback`` is None. Returns it."""
    if callback is None:
        callback = _build()(**kwargs)
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback


def __getattr__(name: str) -> type:
    if name == "TorchDiffCallback":
        cls = _build()
        globals()["TorchDiffCallback"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["TorchDiffCallback", "add_callback"]
