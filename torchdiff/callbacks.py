"""Training-loop monitor: snapshot the model every N steps and compare through the engine.

>>> import torch, torchdiff.callbacks as tc
>>> model = torch.nn.Linear(4, 2)
>>> monitor = tc.CheckpointMonitor(model, every=2)
>>> with torch.no_grad():
...     _ = model.weight.add_(0.1)
>>> monitor.step() is None      # step 1: nothing to do (no host sync either)
True
>>> report = monitor.step()     # step 2: compared with the snapshot of step 0
>>> record = monitor.history[-1]
>>> (record.step, record.reference_step, record.total.rel_l2 > 0)
(2, 0, True)

The comparison is the CLI's: the two sides become Checkpoints through
``formats.from_object`` and go through ``api.compare_checkpoints`` with the same
Engine, options and analyses. Between report steps ``step()`` only counts (a
Python int): no tensor is touched, so there is no host synchronisation.

Memory (see docs/CALLBACKS.md): ``keep="cpu"`` holds one copy of the model's
state in host memory (pinned when the model is on CUDA, plus a reused pinned
staging copy of the live state for the comparison); ``keep="device"`` holds one
copy on the model's device; ``keep="stats"`` holds only per-tensor statistics
(a few hundred bytes a tensor) — then the figures that need both sides' values
(l2, rel_l2, cosine, max_abs, changed_fraction) are not available.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch

from torchdiff import formats, pipeline
from torchdiff.engine import Engine, resolve_device
from torchdiff.errors import MissingDependencyError, TorchDiffError, UsageError
from torchdiff.formats.base import Checkpoint, mark_ties, module_ties
from torchdiff.names import layer_of, role
from torchdiff.figures import Comparison, Figures, GroupFigures, group, nonfinite_values, scalars_of, summary_mask
from torchdiff.report import Report, find_analysis
from torchdiff.results import TensorDiff, TensorStats
from torchdiff.status import ADDED, CHANGED, REMOVED, RESHAPED, RETYPED, UNCHANGED

KEEP_MODES = ("cpu", "device", "stats")
REFERENCES = ("previous", "initial")
#: Analyses that run with ``keep="stats"``: they need one checkpoint's values (the
#: live model's, as ``torchdiff inspect`` does), not both sides'.
STATS_ANALYSES = ("stats", "memory_analysis", "anomaly_detection", "architecture_comparison")

OnReport = Callable[[int, Report], Any]


# ---- figures kept in the history ----------------------------------------------------

#: The update of one tensor, one layer, or the whole model between two snapshots: the
#: group figures of torchdiff.figures (‖Δ‖ and ⟨A, B⟩ are NaN with ``keep="stats"``).
UpdateFigures = GroupFigures


@dataclass(frozen=True, slots=True)
class MonitorRecord:
    """What one report step measured: the light entry of ``CheckpointMonitor.history``.

    ``total`` and ``layers`` cover the tensors in the monitor's ``scope`` (trainable
    parameters by default) with a float dtype and the same shape on both sides, as a
    Report's global figures; ``tensors`` covers every such pair of any role. With
    ``reference="previous"``, ``total.rel_l2`` is the convergence analysis's
    r_t = ‖θ_t − θ_{t−every}‖/‖θ_{t−every}‖.
    """

    step: int
    reference_step: int
    keep: str
    total: GroupFigures | None
    layers: Mapping[str, GroupFigures]
    tensors: Mapping[str, GroupFigures]
    counts: Mapping[str, int]
    analyses: tuple = ()
    report: Report | None = None
    nonfinite: int = 0  # NaN/±∞ values of the live state over the tensors ``total`` covers

    @property
    def exact(self) -> bool:
        """False with keep="stats": only statistics-based figures are known."""
        return self.keep != "stats"

    def analysis(self, name: str):
        """As ``Report.analysis``: None when it did not run, a UsageError on a typo."""
        return find_analysis(self.analyses, name)

    def scalars(self, tensors: bool = False) -> dict[str, float]:
        """A flat dict for a metrics logger, in the naming scheme of every report
        (torchdiff.figures.scalars_of); per-tensor figures with ``tensors=True``."""
        return scalars_of(self.counts, self.total, self.layers, self.tensors if tensors else None,
                          self.analyses, exact=self.exact, nonfinite=self.nonfinite)

    def records(self, level: str = "layer") -> list[dict[str, Any]]:
        """Plain rows of this step: ``"global"`` one, ``"layer"`` one per layer,
        ``"tensor"`` one per tensor."""
        return history_records([self], level)

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step, "reference_step": self.reference_step, "keep": self.keep,
            "total": self.total.to_dict() if self.total is not None else None,
            "layers": {k: v.to_dict() for k, v in self.layers.items()},
            "counts": dict(self.counts),
        }


def record_of(step: int, reference_step: int, report: Report, keep: str = "cpu",
              layer_pattern: str | None = None, keep_report: bool = False,
              tensor_figures: bool = True) -> MonitorRecord:
    """The MonitorRecord of a Report (``keep="stats"`` reports carry no pair metrics);
    ``tensor_figures=False`` leaves ``record.tensors`` empty (layers and total only).
    Every figure comes from torchdiff.figures.GroupSums over the report's table."""
    fig = report.figures
    scope = report.comparison.scope
    mask = summary_mask(fig, scope)
    total = group(fig, "all", mask)["all"] if mask.any() else None
    layers = group(fig, lambda n: layer_of(n, layer_pattern), mask) if mask.any() else {}
    tensors: dict[str, GroupFigures] = {}
    if tensor_figures:  # every pair of one shape, any role and dtype
        pairs = fig.old.present & fig.new.present & fig.status_mask(CHANGED, UNCHANGED, RETYPED)
        tensors = group(fig, lambda n: n, pairs) if pairs.any() else {}
    return MonitorRecord(
        step=step, reference_step=reference_step, keep=keep, total=total, layers=layers, tensors=tensors,
        counts=report.comparison.counts(), analyses=tuple(report.analyses),
        report=report if keep_report else None, nonfinite=nonfinite_values(fig, scope),
    )


def history_records(history: Iterable[MonitorRecord], level: str = "global") -> list[dict[str, Any]]:
    """The monitor's history as rows: ``level="global"`` one row per step,
    ``"layer"`` one per (step, layer), ``"tensor"`` one per (step, tensor)."""
    if level not in ("global", "layer", "tensor"):
        raise UsageError(f"history level must be global, layer or tensor, got {level!r}")
    rows = []
    for r in history:
        base = {"step": r.step, "reference_step": r.reference_step}
        if level == "global":
            total = r.total.to_dict() if r.total is not None else {}
            rows.append({**base, **total, **{k: v for k, v in r.counts.items()}})
        else:
            items = r.layers if level == "layer" else r.tensors
            for name, f in items.items():
                rows.append({**base, level: name, **f.to_dict()})
    return rows


def to_pandas(source: Report | Iterable[MonitorRecord] | list[dict[str, Any]], level: str = "tensor"):
    """A pandas DataFrame: of a Report (``report.to_pandas(level)``), of a monitor
    history (``history_records`` at ``level``: ``"global"``, ``"layer"``, ``"tensor"``),
    or of plain rows. pandas is imported here."""
    try:
        import pandas as pd
    except ImportError:
        raise MissingDependencyError("to_pandas needs pandas (pip install pandas)") from None
    if isinstance(source, Report):
        return source.to_pandas(level)
    source = list(source)
    if source and isinstance(source[0], MonitorRecord):
        return pd.DataFrame(history_records(source, level))
    return pd.DataFrame(source)


def _storage_key(t: torch.Tensor) -> tuple:
    """Tensors with one key are the same values (tied weights): one snapshot buffer."""
    return (t.device, t.dtype, t.data_ptr(), tuple(t.shape), tuple(t.stride()))


class CheckpointMonitor:
    """Compare the live model with a snapshot every ``every`` steps.

    Args:
        model: the ``nn.Module`` being trained (its ``state_dict()``: parameters and
            persistent buffers; ``include_buffers=False`` for parameters only).
        every: report every this many steps (``step()`` calls, or ``monitor(step)``
            with the step divisible by ``every``).
        reference: ``"previous"`` compares with the last report's state (update per
            interval, r_t); ``"initial"`` with the state at construction (distance
            travelled).
        analyses: analysis names or flags, as ``torchdiff.compare`` (``"anomaly_detection"``...).
        device: where the engine reduces: ``"cpu"``, ``"cuda[:N]"``, ``"auto"``; default
            the model's device.
        keep: ``"cpu"``, ``"device"`` or ``"stats"`` — where the reference lives (see the
            module docstring and docs/CALLBACKS.md for the memory each costs).
        on_report: called as ``on_report(step, report)`` after each report.
        include_buffers: compare buffers (running statistics) as well as parameters.
        keep_reports: keep each full Report in its history record (``record.report``);
            by default only the last one is kept (``monitor.last_report``).
        save_dir: if set, the states at report steps (and the first reference) are also
            written there as ``step_XXXXXXXX.safetensors``, for ``series_report()`` and
            the CLI's ``torchdiff series``.
        start_step: the step number of the state at construction (resumed runs).
        tensor_history: keep per-tensor figures in each history record (``record.tensors``);
            False keeps the total and per-layer figures only (a lighter history for
            models with thousands of tensors and long runs).
        **compare_options: ``epsilon``, ``ignore_keys_regex``, ``path`` and the analyses'
            own options, as ``torchdiff.compare``.

    Raises:
        UsageError: a bad option, before any copy is made.
    """

    def __init__(self, model: torch.nn.Module, every: int = 100, reference: str = "previous",
                 analyses: Iterable[str] = (), device: str | torch.device | None = None,
                 keep: str = "cpu", on_report: OnReport | None = None, *,
                 include_buffers: bool = True, keep_reports: bool = False,
                 save_dir: str | os.PathLike | None = None, start_step: int = 0,
                 tensor_history: bool = True, process_group: Any = None, **compare_options: Any) -> None:
        if not isinstance(model, torch.nn.Module):
            raise UsageError(f"CheckpointMonitor watches an nn.Module, got a {type(model).__name__}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise UsageError(f"every must be a positive int, got {every!r}")
        if reference not in REFERENCES:
            raise UsageError(f"reference must be one of {', '.join(REFERENCES)}, got {reference!r}")
        if keep not in KEEP_MODES:
            raise UsageError(f"keep must be one of {', '.join(KEEP_MODES)}, got {keep!r}")
        if on_report is not None and not callable(on_report):
            raise UsageError("on_report must be a callable on_report(step, report)")
        for key in ("format", "recursive", "unsafe_pickle"):
            if key in compare_options:
                raise UsageError(f"option {key!r} is for files; the monitor compares the live model")
        self.model = _unwrapped(model)
        self.every = every
        self.reference = reference
        self.keep = keep
        self.on_report = on_report
        self.include_buffers = bool(include_buffers)
        self.keep_reports = bool(keep_reports)
        self.tensor_history = bool(tensor_history)
        self.save_dir = os.fspath(save_dir) if save_dir is not None else None
        self._compare_options = dict(compare_options)
        # FSDP2 / tensor parallel: snapshots hold this rank's local shards (1/N of the
        # model); compares re-wrap them as DTensors (no communication) and the engine
        # reduces local shards on each rank (torchdiff.distributed.run_sharded).
        self.process_group = process_group
        self._dtensor_specs: dict[str, tuple] = {}
        if process_group is not None and keep == "stats":
            raise UsageError("process_group= needs keep='cpu' or 'device' (keep='stats' merges no shards)")
        if process_group is not None and save_dir is not None:
            raise UsageError("save_dir= with process_group=: each rank holds only its own shards, and every rank "
                             "would write the same file (save sharded states with torch.distributed.checkpoint; "
                             "torchdiff reads DCP folders)")
        self._ties: dict[str, str] = {}  # process_group: name -> the name it is tied to (live model)
        self._reference_ties: dict[str, str] = {}
        live = self._live()
        self._model_device = next((t.device for t in live.values() if t.device.type != "cpu"), torch.device("cpu"))
        if device is None:
            device = "cuda" if self._model_device.type == "cuda" else "cpu"
            if self._model_device.type == "cuda":
                device = str(self._model_device)
        self.options = pipeline.make_options(tuple(analyses), device=str(device), **compare_options)
        self.options["process_group"] = process_group
        if keep == "stats":
            bad = [n for n in self.options.analyses if n not in STATS_ANALYSES]
            if bad:
                raise UsageError(
                    f"keep='stats' keeps no values: {', '.join(bad)} needs both sides' values "
                    f"(use keep='cpu' or 'device'; with 'stats' only {', '.join(STATS_ANALYSES)} run)"
                )
        if process_group is not None:
            _refuse_whole_tensor_analyses(live, self.options)
        threads = torch.get_num_threads()
        self.engine = Engine(resolve_device(self.options.device), self.options.epsilon)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)  # the Engine raises torch's threads; the training loop keeps its own
        self.history: list[MonitorRecord] = []
        self.last_report: Report | None = None
        self.saved: dict[int, str] = {}
        self._step = int(start_step)
        self._reference_step = self._step
        self._last_report_step: int | None = None
        # key per name (tied weights share a key), buffers per key
        self._keys: dict[str, tuple] = {}
        self._snapshot: dict[tuple, torch.Tensor] = {}
        self._staging: dict[tuple, torch.Tensor] = {}
        self._ref_stats: dict[str, TensorStats] = {}
        self._pending_reference_save = False
        if self.save_dir is not None:
            os.makedirs(self.save_dir, exist_ok=True)
        self._take_reference(live)

    # ---- public ------------------------------------------------------------------

    @property
    def step_count(self) -> int:
        """The current step (a Python int)."""
        return self._step

    @property
    def reference_step(self) -> int:
        return self._reference_step

    def step(self) -> Report | None:
        """Count one training step; every ``every`` steps compare and return the Report."""
        self._step += 1
        if self._step % self.every == 0:
            return self.report()
        return None

    def __call__(self, step: int | None = None) -> Report | None:
        """``monitor()`` is ``monitor.step()``; ``monitor(step)`` sets the step (a Python
        int, e.g. ``trainer.global_step``) and reports when it is a multiple of ``every``
        not reported yet."""
        if step is None:
            return self.step()
        self._step = int(step)
        if (self._step % self.every == 0 and self._step != self._last_report_step
                and self._step != self._reference_step):
            return self.report()
        return None

    def report(self, step: int | None = None) -> Report:
        """Compare now (at ``step``, default the current one), whatever the step count."""
        if step is not None:
            self._step = int(step)
        step = self._step
        live = self._live()
        report, new_host = self._compare(live)
        record = record_of(step, self._reference_step, report, self.keep,
                           self.options.get("layer_pattern"), self.keep_reports, self.tensor_history)
        self.history.append(record)
        self.last_report = report
        self._last_report_step = step
        if self.save_dir is not None:
            self._save(step, new_host)
        if self.reference == "previous":
            self._advance(live, report)
        if self.on_report is not None:
            self.on_report(step, report)
        return report

    def compare(self) -> Report:
        """Compare the live state with the reference now, without recording it in the
        history, calling ``on_report`` or moving the reference."""
        report, _ = self._compare(self._live())
        return report

    def reset(self) -> None:
        """Take a new reference from the live model now (history is kept)."""
        self._reference_step = self._step
        self._take_reference(self._live())

    def series_report(self, analyses: Iterable[str] | None = None, **kwargs: Any):
        """Run ``torchdiff.series.compare_series`` over the states saved in ``save_dir``,
        labelled ``step N``, in step order (default analyses: the series defaults,
        convergence and similarity across the whole run; ``kwargs`` as compare_series).

        Raises:
            TorchDiffError: ``torchdiff.series`` is not available, or nothing was saved
                (pass ``save_dir=``), or fewer than two states were saved.
        """
        try:
            from torchdiff import series
        except ModuleNotFoundError as e:
            if e.name not in ("torchdiff.series", "torchdiff"):
                raise
            raise TorchDiffError(
                "series_report needs torchdiff.series (series comparison), which this torchdiff lacks; "
                "use monitor.history for per-step figures"
            ) from None
        if self.save_dir is None:
            raise UsageError("series_report compares the saved states: create the monitor with save_dir=...")
        if len(self.saved) < 2:
            raise UsageError(f"series_report needs at least two saved states, {len(self.saved)} saved so far")
        sources = {f"step {s}": self.saved[s] for s in sorted(self.saved)}
        options = {"device": self.options.device, **self._compare_options, **kwargs}
        return series.compare_series(sources, analyses=tuple(analyses or ()), **options)

    def memory_bytes(self) -> int:
        """Bytes held by the snapshot and staging buffers."""
        return sum(t.numel() * t.element_size() for d in (self._snapshot, self._staging) for t in d.values())

    def __repr__(self) -> str:
        return (f"CheckpointMonitor(every={self.every}, reference={self.reference!r}, keep={self.keep!r}, "
                f"step={self._step}, reports={len(self.history)})")

    # ---- the live state ---------------------------------------------------------------

    def _live(self) -> dict[str, torch.Tensor]:
        if self.include_buffers:
            sd = self.model.state_dict()
            live = {k: v.detach() for k, v in sd.items() if isinstance(v, torch.Tensor)}
        else:
            live = {k: p.detach() for k, p in self.model.named_parameters()}
        wrappers = _inner_wrappers(self.model)
        if wrappers:  # a compiled (or DDP-wrapped) block inside the model: its own names
            live = _renamed(live, wrappers)
        if self.process_group is not None:
            from torchdiff.distributed import to_local

            self._ties = _module_ties(self.model, live, wrappers)
            live, self._dtensor_specs = to_local(live)
        return live

    def _host(self, live: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Host tensors of the live state for the engine (which reads host tensors):
        CPU tensors as they are; device tensors through the reused pinned staging
        buffers (keep="cpu") or a transient copy (keep="device"/"stats")."""
        out: dict[str, torch.Tensor] = {}
        devices = set()
        copied: set[tuple] = set()
        for name, t in live.items():
            if t.device.type == "cpu":
                out[name] = t
                continue
            devices.add(t.device)
            if self.keep == "cpu":
                key = _storage_key(t)
                buf = self._staging.get(key)
                if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                    buf = self._staging[key] = _empty_host(t, pin=True)
                if key not in copied:
                    buf.copy_(t, non_blocking=True)
                    copied.add(key)
                out[name] = buf
            else:
                out[name] = t.to("cpu", non_blocking=True)
        _synchronize(devices)
        return out

    # ---- reference -------------------------------------------------------------------

    def _take_reference(self, live: dict[str, torch.Tensor]) -> None:
        if self.keep == "stats":
            host = self._host(live)
            self._ref_stats = self._measure(host)
            if self.save_dir is not None:
                self._save(self._reference_step, host)
            return
        self._keys = {}
        self._reference_ties = dict(self._ties)
        copied: set[tuple] = set()
        for name, t in live.items():
            key = _storage_key(t)
            self._keys[name] = key
            buf = self._snapshot.get(key)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                if self.keep == "device":
                    buf = torch.empty(t.shape, dtype=t.dtype, device=t.device)
                else:
                    buf = _empty_host(t, pin=t.device.type == "cuda")
                self._snapshot[key] = buf
            if key not in copied:
                buf.copy_(t, non_blocking=t.device.type == "cuda")  # stream-ordered: no sync
                copied.add(key)
        for key in [k for k in self._snapshot if k not in copied]:
            del self._snapshot[key]
        self._pending_reference_save = self.save_dir is not None

    def _reference_host(self) -> dict[str, torch.Tensor]:
        snap = {name: self._snapshot[key] for name, key in self._keys.items()}
        if self.keep == "device":
            return self._host(snap)
        devices = {k[0] for k in self._keys.values() if k[0].type == "cuda"}
        _synchronize(devices)  # the non-blocking copies into the pinned snapshot are done
        return snap

    def _advance(self, live: dict[str, torch.Tensor], report: Report) -> None:
        """Make the state just compared the next reference (reference="previous")."""
        self._reference_step = self._step
        if self.keep == "stats":
            self._ref_stats = {d.name: d.new for d in report.comparison.diffs if d.new is not None}
            return
        keys = {name: _storage_key(t) for name, t in live.items()}
        if keys != self._keys or any(self._snapshot[k].shape != live[n].shape for n, k in keys.items()):
            self._take_reference(live)  # the model's tensors changed: new buffers
            return
        self._pending_reference_save = False
        done: set[tuple] = set()
        for name, key in keys.items():
            if key in done:
                continue
            done.add(key)
            t = live[name]
            if self.keep == "cpu" and t.device.type == "cuda" and key in self._staging:
                # the staging buffer holds this step's state: swap instead of copying
                self._snapshot[key], self._staging[key] = self._staging[key], self._snapshot[key]
            else:
                self._snapshot[key].copy_(t, non_blocking=t.device.type == "cuda")

    # ---- comparing -------------------------------------------------------------------

    def _compare(self, live):
        if self.keep == "stats":
            return self._report_stats(live)
        return self._report_values(live)

    def _report_values(self, live):
        old_host = self._reference_host()
        new_host = self._host(live)
        if self.save_dir is not None and self._pending_reference_save:
            self._save(self._reference_step, old_host)
            self._pending_reference_save = False
        if self.process_group is not None:
            from torchdiff.distributed import from_local

            old_host, new_host = from_local(old_host, self._dtensor_specs), from_local(new_host, self._dtensor_specs)
        old = formats.from_object(old_host, name=f"step {self._reference_step}")
        new = formats.from_object(new_host, name=f"step {self._step}")
        if self.process_group is not None:
            # DTensors re-wrapped one name at a time share no storage that from_object
            # could see: tied weights are marked from the module (the same on every rank)
            mark_ties(old.tensors, self._reference_ties)
            mark_ties(new.tensors, self._ties)
        return pipeline.compare_checkpoints(old, new, self.options, self.engine), new_host

    def _measure(self, host: dict[str, torch.Tensor], options=None) -> dict[str, TensorStats]:
        report = self._inspect(host, options)
        return {d.name: d.new for d in report.comparison.diffs}

    def _inspect(self, host, options=None) -> Report:
        if options is None:
            options = pipeline.Options(self.options)
            options["analyses"] = ()
        empty = Checkpoint(name="", format="module", tensors={})
        new = formats.from_object(host, name=f"step {self._step}")
        return pipeline.compare_checkpoints(empty, new, options, self.engine, mode="inspect")

    def _report_stats(self, live):
        """keep="stats": measure the live state (with the one-checkpoint analyses) and
        pair its statistics with the reference's."""
        host = self._host(live)
        inspected = self._inspect(host, self.options)
        new_stats = {d.name: d.new for d in inspected.comparison.diffs}
        role_of = dict(zip(inspected.figures.names, inspected.figures.role))
        # a tensor tied to another in the live model (pairing.annotate) counts once, as in the exact modes
        ties = {d.name: d.extras["tied_to"]["new"] for d in inspected.comparison.diffs
                if (d.extras.get("tied_to") or {}).get("new")}
        diffs = []
        for name, old in self._ref_stats.items():
            new = new_stats.get(name)
            if new is None:
                status = REMOVED
            elif old.shape != new.shape:
                status = RESHAPED
            elif old.dtype != new.dtype:
                status = RETYPED
            else:
                status = UNCHANGED if old == new else CHANGED
            extras = {"tied_to": {"old": ties[name], "new": ties[name]}} if name in ties else {}
            diffs.append(TensorDiff(name, status, old, new, None, extras,
                                    role_of.get(name) or role(name, old.dtype, len(old.shape))))
        for name, new in new_stats.items():
            if name not in self._ref_stats:
                diffs.append(TensorDiff(name, ADDED, None, new, None, {}, role_of[name]))
        figures = Figures.from_diffs(diffs)
        figures.values_kept = False
        comparison = Comparison(
            old_name=f"step {self._reference_step}", new_name=f"step {self._step}",
            old_format="stats", new_format="module", figures=figures, metadata_diffs=(),
            device=str(self.engine.device), epsilon=self.options.epsilon, mode="pair",
            scope=self.options.scope, layer_pattern=self.options.get("layer_pattern"),
        )
        return Report(comparison, inspected.analyses, stats=True), host

    # ---- saving ----------------------------------------------------------------------

    def _save(self, step: int, host: Mapping[str, torch.Tensor]) -> None:
        if step in self.saved:
            return
        from safetensors.torch import save_file

        seen: dict[int, tuple[str, torch.Tensor]] = {}
        tensors = {}
        metadata = {"step": str(step)}
        for name, t in host.items():
            t = t.contiguous()
            first = seen.get(t.data_ptr()) if t.numel() else None
            if first is not None and first[1].shape == t.shape and first[1].dtype == t.dtype:
                # a tied weight: written once, the dropped name recorded as safetensors'
                # save_model records it ({dropped: kept}), so readers count it once
                metadata[name] = first[0]
                continue
            if first is not None:
                t = t.clone()  # another view of one storage: safetensors refuses shared storage
            seen.setdefault(t.data_ptr(), (name, t))
            tensors[name] = t
        path = os.path.join(self.save_dir, f"step_{step:08d}.safetensors")
        save_file(tensors, path, metadata=metadata)
        self.saved[step] = path


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model a wrapper holds: torch.compile's OptimizedModule (``_orig_mod``),
    DistributedDataParallel and DataParallel (``module``). The same parameters under the
    names the model gives them, so figure names stay the same when compile or DDP is
    turned on."""
    wrappers = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, torch.nn.Module):
            model = inner
        elif isinstance(model, wrappers):
            model = model.module
        else:
            return model


#: Attributes through which a wrapper holds the module it wraps, adding a segment to the
#: names below it: torch.compile's OptimizedModule, activation checkpointing's
#: CheckpointWrapper (its state_dict drops the segment, its named_parameters keep it).
_WRAPPED_ATTRIBUTES = ("_orig_mod", "_checkpoint_wrapped_module")


def _inner_wrappers(model: torch.nn.Module) -> dict[str, str]:
    """``{module path: attribute}`` of the wrappers inside ``model`` whose attribute adds a
    segment to every name below it: a compiled block (``torch.compile(block)``:
    ``h.0._orig_mod.q.weight``), an activation-checkpointed block, a DDP or DataParallel
    sub-module (``module``)."""
    wrappers = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    out: dict[str, str] = {}
    for path, m in model.named_modules(remove_duplicate=False):
        attribute = next((a for a in _WRAPPED_ATTRIBUTES if a in m._modules), None)
        if attribute is not None:
            out[path] = attribute
        elif isinstance(m, wrappers):
            out[path] = "module"
    return out


def _plain_name(name: str, wrappers: Mapping[str, str]) -> str:
    """``name`` without the segments that ``wrappers`` (``_inner_wrappers``) add."""
    parts = name.split(".")
    kept = [p for i, p in enumerate(parts) if wrappers.get(".".join(parts[:i])) != p]
    return ".".join(kept)


def _renamed(live: dict[str, torch.Tensor], wrappers: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """``live`` under the names the model gives its tensors without the wrappers inside it
    (the names left as they are should two collide)."""
    out = {_plain_name(k, wrappers): v for k, v in live.items()}
    return out if len(out) == len(live) else live


def _module_ties(model: torch.nn.Module, live: Mapping[str, torch.Tensor],
                 wrappers: Mapping[str, str]) -> dict[str, str]:
    """``formats.base.module_ties`` of the tensors of ``live``, under their plain names:
    decided from the module's objects, so the same on every rank, whose local shard of a
    tensor may be empty."""
    rename = (lambda k: _plain_name(k, wrappers)) if wrappers else None
    return {k: t for k, t in module_ties(model, rename).items() if k in live and t in live}


def _refuse_whole_tensor_analyses(live: Mapping[str, torch.Tensor], options) -> None:
    """With a process group, the analyses that read values through engine hooks need
    whole tensors (docs/DISTRIBUTED.md, section 7): refused here, at construction,
    rather than by the first report, hours into a run."""
    from torchdiff.analyses import ANALYSES

    checkpoint = formats.from_object(dict(live), name="live")
    refused = []
    for name in options.analyses:
        module = ANALYSES[name]
        hooks = getattr(module, "hooks", None)
        if hooks is None:
            continue
        state: dict = {}
        prepare = getattr(module, "prepare", None)
        if prepare is not None:
            prepare(checkpoint, checkpoint, options, state)
        if hooks(options, state):
            refused.append(name)
    if refused:
        raise UsageError(
            f"process_group=: {', '.join(refused)} read{'s' if len(refused) == 1 else ''} whole tensors, which a "
            "rank does not hold (each holds its shards); drop "
            f"{'it' if len(refused) == 1 else 'them'} from analyses= (stats, layer_impact, sort_by_change_magnitude, "
            "memory_analysis and convergence_analysis work with a process group)"
        )


def _empty_host(t: torch.Tensor, pin: bool) -> torch.Tensor:
    if pin and torch.cuda.is_available():
        return torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return torch.empty(t.shape, dtype=t.dtype)


def _synchronize(devices: Iterable[torch.device]) -> None:
    """Wait for the copies queued on these CUDA devices (report steps only)."""
    for dev in devices:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)


__all__ = [
    "KEEP_MODES",
    "REFERENCES",
    "STATS_ANALYSES",
    "CheckpointMonitor",
    "MonitorRecord",
    "UpdateFigures",
    "history_records",
    "record_of",
    "to_pandas",
]
