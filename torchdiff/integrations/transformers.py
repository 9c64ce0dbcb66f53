"""Hugging Face transformers adapter: a TrainerCallback that runs a CheckpointMonitor.

>>> from torchdiff.integrations.transformers import TorchDiffCallback, add_callback  # doctest: +SKIP
>>> trainer = Trainer(model=model, args=args, train_dataset=data)                    # doctest: +SKIP
>>> add_callback(trainer, TorchDiffCallback(every=100))                              # doctest: +SKIP

- ``on_train_begin``: the monitor is created (snapshot of the model as training
  starts): on the world-process-zero alone with one process or DDP; on every rank,
  with the process group, when the parameters are DTensors (FSDP2, ``fsdp_version``
  2: ``integrations.monitor_group``), so that every rank takes part in each
  comparison's collectives. Figures are logged, and ``on_report`` and ``torchdiff.json``
  run, on the world-process-zero only. Every rank sets ``control.should_log`` at the
  same steps (the Trainer's log step all-gathers the loss: one rank asking alone would
  wait for the others forever).
- ``on_step_end``: ``monitor(state.global_step)``; at a report step it asks the
  Trainer to log (``control.should_log``), and ``on_log`` adds the figures to that
  log entry and to ``state.log_history``: by default a short set (``keys=DEFAULT_KEYS``:
  the global update, the top layer's update, the anomaly findings), ``keys="all"`` for
  every ``MonitorRecord.scalars()`` figure, or a list of groups (:data:`KEY_GROUPS`)
  and exact ``torchdiff/...`` names.
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

import math
import os
from typing import Any, Iterable

from torchdiff.callbacks import CheckpointMonitor, MonitorRecord
from torchdiff.errors import MissingDependencyError
from torchdiff.integrations import finite_figures, monitor_group
from torchdiff.integrations import monitor_options as monitor_options_of
from torchdiff.report import Report

_CLASS: list[type] = []

#: Key groups for ``keys=``: what each adds to the Trainer's log line.
KEY_GROUPS: dict[str, str] = {
    "global": "torchdiff/global_rel_l2 and torchdiff/global_cosine (torchdiff/param_norm_change with keep='stats')",
    "top_layer": "torchdiff/top_layer_rel_l2 (or top_layer_norm_change): the largest finite layer figure",
    "findings": "torchdiff/anomaly_detection/findings and every other analysis' findings count",
    "counts": "torchdiff/<status> tensor counts (changed, added, removed...)",
    "norms": "torchdiff/param_norm, torchdiff/param_norm_change, torchdiff/global_l2",
    "layers": "torchdiff/layer_rel_l2/<layer> for every layer",
    "analyses": "every numeric headline figure of the analyses that ran",
}
#: The default: three figures a training log line can carry without drowning the loss.
DEFAULT_KEYS = ("global", "top_layer", "findings")


def select_scalars(scalars: dict[str, float], keys: Any = DEFAULT_KEYS) -> dict[str, float]:
    """The figures of ``scalars`` (``MonitorRecord.scalars()``) that ``keys`` chooses:
    ``"all"``, or groups of :data:`KEY_GROUPS` and exact ``torchdiff/...`` names."""
    if keys == "all":
        return dict(scalars)
    keys = (keys,) if isinstance(keys, str) else tuple(keys)
    unknown = [k for k in keys if k not in KEY_GROUPS and not k.startswith("torchdiff/")]
    if unknown:
        raise ValueError(f"unknown keys {unknown} (groups: {', '.join(KEY_GROUPS)}; or 'all'; "
                         "or exact torchdiff/... names)")
    out: dict[str, float] = {}
    layer_prefixes = ("torchdiff/layer_rel_l2/", "torchdiff/layer_norm_change/")
    for key in keys:
        if key == "global":
            for name in ("torchdiff/global_rel_l2", "torchdiff/global_cosine"):
                if name in scalars:
                    out[name] = scalars[name]
            if "torchdiff/global_rel_l2" not in scalars and "torchdiff/param_norm_change" in scalars:
                out["torchdiff/param_norm_change"] = scalars["torchdiff/param_norm_change"]
        elif key == "top_layer":
            for prefix in layer_prefixes:
                layers = [v for k, v in scalars.items() if k.startswith(prefix) and v == v]
                # the most changed measured layer: one whose reference is all zero (∞) is not
                # measured (docs/METRICS.md, the "most changed" rule); ∞ only if all are
                measured = [v for v in layers if math.isfinite(v)] or layers
                if measured:
                    figure = prefix.split("/")[1].replace("layer_", "")
                    out[f"torchdiff/top_layer_{figure}"] = max(measured, key=abs)
        elif key == "findings":
            out.update({k: v for k, v in scalars.items() if k.endswith("/findings")})
        elif key == "counts":
            out.update({k: v for k, v in scalars.items() if k.count("/") == 1 and k[10:] in _STATUSES})
        elif key == "norms":
            out.update({k: v for k, v in scalars.items()
                        if k in ("torchdiff/param_norm", "torchdiff/param_norm_change", "torchdiff/global_l2")})
        elif key == "layers":
            out.update({k: v for k, v in scalars.items() if k.startswith(layer_prefixes)})
        elif key == "analyses":
            out.update({k: v for k, v in scalars.items() if k.count("/") == 2 and not k.startswith(layer_prefixes)
                        and not k.startswith(("torchdiff/rel_l2/", "torchdiff/norm_change/"))})
        elif key in scalars:
            out[key] = scalars[key]
    return out


_STATUSES = ("unchanged", "changed", "added", "removed", "reshaped", "retyped")


class _TorchDiffCallbackMixin:
    """The framework-independent part; see the module docstring.

    Args:
        every: report every this many optimizer steps (``state.global_step``).
        reference, analyses, keep, device: as ``CheckpointMonitor``.
        on_report: called as ``on_report(step, report)`` after each report.
        log: add the figures to the Trainer's logs.
        log_tensors: include per-tensor rel_l2 (one metric per tensor).
        keys: which figures join the Trainer's log line: :data:`DEFAULT_KEYS` (the
            global update, the top layer, the findings), ``"all"``, or groups of
            :data:`KEY_GROUPS` and exact ``torchdiff/...`` names.
        report_on_save: at a checkpoint save off the ``every`` grid, compare anyway (not
            recorded in the history) for the checkpoint's ``torchdiff.json``.
        json_on_save: write ``torchdiff.json`` into each checkpoint folder.
        **monitor_options: any other ``CheckpointMonitor`` keyword.
    """

    def __init__(self, every: int = 100, reference: str = "previous", analyses: Iterable[str] = (),
                 keep: str = "cpu", device: Any = None, on_report=None, *, log: bool = True,
                 log_tensors: bool = False, report_on_save: bool = True, json_on_save: bool = True,
                 keys: Any = DEFAULT_KEYS, **monitor_options: Any) -> None:
        super().__init__()
        select_scalars({}, keys)  # an unknown key fails here, not at the first report
        self.keys = keys
        self.monitor_options = monitor_options_of(every, reference, analyses, keep, device, **monitor_options)
        self.on_report = on_report
        self.log_figures = log
        self.log_tensors = log_tensors
        self.report_on_save = report_on_save
        self.json_on_save = json_on_save
        self.monitor: CheckpointMonitor | None = None
        self.sharded = False  # the monitor runs on every rank with a process group (FSDP2)
        self._zero = True  # this process logs (state.is_world_process_zero)
        self._steps: tuple[int, int | None] | None = None  # DDP ranks without a monitor: (start, last report)
        self._pending: dict[str, float] = {}

    @property
    def history(self) -> list[MonitorRecord]:
        return self.monitor.history if self.monitor is not None else []

    @property
    def last_report(self) -> Report | None:
        return self.monitor.last_report if self.monitor is not None else None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        group = monitor_group(model, self.monitor_options)
        self.sharded = group is not None
        self._zero = bool(state.is_world_process_zero)
        if not (self.sharded or self._zero):  # DDP: rank zero monitors; this rank only keeps the log steps
            self._steps = (int(state.global_step), None)
            return
        options = dict(self.monitor_options, process_group=group)
        self.monitor = CheckpointMonitor(model, start_step=int(state.global_step),
                                         on_report=self.on_report if self._zero else None, **options)

    def on_step_end(self, args, state, control, **kwargs):
        step = int(state.global_step)
        if self.monitor is None:
            if self._steps is not None and self._due(step):  # the steps rank zero reports at
                self._steps = (self._steps[0], step)
                if self.log_figures:
                    control.should_log = True
            return control
        if self.monitor(step) is not None:  # sharded: every rank, same step, same collectives
            if self._zero:
                self._queue()
            if self.log_figures:
                control.should_log = True
        return control

    def _due(self, step: int) -> bool:
        """Whether rank zero's monitor reports at ``step`` (CheckpointMonitor.__call__'s rule)."""
        start, last = self._steps
        every = self.monitor_options["every"]
        return step % every == 0 and step != last and step != start

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
        if self.json_on_save and report is not None and self._zero:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")
            if os.path.isdir(folder):
                with open(os.path.join(folder, "torchdiff.json"), "w", encoding="utf-8") as f:
                    f.write(report.to_json())

    def _queue(self) -> None:
        if self.log_figures:
            figures = self.monitor.history[-1].scalars(tensors=self.log_tensors)
            chosen = select_scalars(figures, self.keys)
            if self.log_tensors:
                chosen.update({k: v for k, v in figures.items() if k.startswith(("torchdiff/rel_l2/",
                                                                                  "torchdiff/norm_change/"))})
            self._pending.update(finite_figures(chosen, "the Trainer's logs"))


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


__all__ = ["DEFAULT_KEYS", "KEY_GROUPS", "TorchDiffCallback", "add_callback", "select_scalars"]
