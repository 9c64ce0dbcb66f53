"""``compare_series(checkpoints, ...) -> SeriesReport``: ordered checkpoints C1 C2 ... CN.

One pass over the data (docs/SERIES.md):

- every checkpoint is opened once (headers only); every tensor of every checkpoint is
  materialised once, in batches of tensor names (all N versions of a name together,
  bounded by ``BATCH_BYTES``);
- the engine measures each consecutive pair (C_t, C_t+1) from those in-memory values,
  so each step is an ordinary Comparison and the pair analyses run on it unchanged;
- the series figures are Gram-type sums per layer, accumulated in float64 on the
  engine's device and chunked along the element axis (``workspace`` bytes of float64):
  ‖θ_i‖² and the exact pairwise squared distances ‖θ_i − θ_j‖² (differences taken
  element by element, never as ‖a‖² + ‖b‖² − 2⟨a,b⟩), from which every norm, update,
  cosine between checkpoints or between successive updates, distance from the first
  checkpoint and task-vector cosine follows by polarisation without cancellation;
  with a base, the sign-conflict counts of the task vectors θ_i − θ_base;
- Adam state (exp_avg, exp_avg_sq, step) is reduced per parameter when the gradient
  analysis runs;
- device results stay on the device until the end: one host synchronisation for the
  series figures, one per engine run;
- under torchrun (the CLI), each tensor name belongs to one rank (a layer's tensors
  together), which reads, measures and accumulates it; step partials, Gram sums and
  Adam sums are gathered once on rank 0 (docs/DISTRIBUTED.md, "series").

The series analyses are the modules in ``torchdiff.analyses`` that define
``analyze_series(series, options) -> AnalysisResult``; the others run per step.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from torchdiff import distributed, formats
from torchdiff.analyses import ANALYSES, analysis_names
from torchdiff.analyses._training import (
    AdamPlan, adam_sums, build_adam_plan, layer_key, natural_key, short_labels,
)
from torchdiff.engine import Engine, resolve_device, torch_threads
from torchdiff.errors import CorruptFileError, UsageError
from torchdiff.figures import Comparison, Figures, without_gc
from torchdiff.dequant import dequantize_checkpoint
from torchdiff.formats.base import Checkpoint, TensorHandle, check_unchanged
from torchdiff.names import (
    OPTIMIZER_STATE, SCOPES, TRAINING_STATE, compile_pattern, is_float_storage, optimizer_param, roles_over,
)
from torchdiff.pairing import (
    WRAPPER_SEGMENTS, Dropped, Pair, annotate, check_selected, compile_filters, drop_prefix, pair_metadata,
)
from torchdiff.pipeline import (
    CORE_OPTIONS, Options, directory_notes, pairing_result, build_report, make_options, open_checkpoint, unknown_option,
)
from torchdiff.report import SeriesReport
from torchdiff.results import AnalysisResult, MetadataDiff, TensorStats
from torchdiff.units import count, counted

#: Analyses a series runs when none is named.
SERIES_DEFAULT = ("convergence_analysis", "similarity_matrix")
#: Tensor bytes (all versions of the names in a batch) materialised at once.
BATCH_BYTES = 256 << 20
#: float64 workspace of the Gram pass, per device type.
WORKSPACE_BYTES = {"cpu": 32 << 20, "cuda": 512 << 20}
_MAX_CHUNK = 1 << 22  # sign counts are float32 matmuls: exact below 2**24 per chunk
#: Why a tensor tied to another in every checkpoint (one storage in a .pt) is left out of
#: the series figures: its values are counted once, at the tensor it is tied to.
TIED = "tied to another tensor: counted once, there"
SORTS = ("given", "natural")


def series_analysis_names() -> list[str]:
    """Analyses with a series form, in text-output order."""
    return [n for n in analysis_names if hasattr(ANALYSES[n], "analyze_series")]


# ---- what the pass measures -------------------------------------------------------------

@dataclass
class SeriesData:
    """Everything the series pass measured; the input of ``analyze_series``.

    Rows ``0..N-1`` of ``nsq``/``dist2`` are the checkpoints in series order; with a base
    that is not one of them, row N is the base. Figures cover the *series tensors*:
    floating-point tensors present with one shape in every checkpoint (and the base),
    optimizer state excluded; per layer (torchdiff.names.layer_of), summed over the
    layer's tensors.
    """

    labels: tuple[str, ...]  # short display labels
    names: tuple[str, ...]  # the checkpoints as given (paths)
    metadata: tuple[dict, ...]
    layers: tuple[str, ...]
    layer_params: np.ndarray  # (L,) elements
    layer_tensors: np.ndarray  # (L,) tensors
    nsq: np.ndarray  # (L, M) ‖θ_i‖²
    dist2: np.ndarray  # (L, M, M) ‖θ_i − θ_j‖²
    nonfinite: np.ndarray  # (L,) element positions left out (non-finite in some checkpoint)
    steps: tuple[Comparison, ...]
    device: str
    order: str = "given"
    base_row: int | None = None
    base_label: str | None = None
    sign_conflicts: np.ndarray | None = None  # (L, N, N) #{τ_i·τ_j < 0}
    sign_both: np.ndarray | None = None  # (L, N, N) #{τ_i ≠ 0 and τ_j ≠ 0}
    sign_any_conflict: np.ndarray | None = None  # (L,) #{some τ_i > 0 and some τ_j < 0}
    sign_multi: np.ndarray | None = None  # (L,) #{at least two τ_i ≠ 0}
    adam: tuple[dict | None, ...] = ()  # per checkpoint: {"plan": AdamPlan, "sums": {key: (n, Σv̂, Σm̂², Σd²)}}
    step_states: tuple[dict, ...] = ()  # per step: {analysis: its per-run state}
    dropped: tuple[str, ...] = ()  # --common-only: tensors not in every checkpoint
    left_out: dict[str, list[str]] = field(default_factory=dict)
    #: per step: the ``pairing`` section (what was dropped from the names of its two
    #: checkpoints, as a pair comparison says it), or None
    step_pairing: tuple[AnalysisResult | None, ...] = ()
    #: what was dropped from the names of a base that is not a series checkpoint
    base_pairing: tuple[str, ...] = ()
    #: quantized weights read as the values they stand for: scheme -> weight names
    dequantized: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.labels)

    def tensor_stats(self, i: int) -> dict[str, TensorStats]:
        """Per-tensor statistics of checkpoint i (from the step comparisons)."""
        out: dict[str, TensorStats] = {}
        if i < len(self.steps):
            for d in self.steps[i].diffs:
                if d.old is not None:
                    out[d.name] = d.old
        elif i > 0:
            for d in self.steps[i - 1].diffs:
                if d.new is not None:
                    out[d.name] = d.new
        return out


# ---- entry point -----------------------------------------------------------------------------

@without_gc
def compare_series(
    checkpoints: Sequence[Any] | Mapping[str, Any], *, analyses: Sequence[str] = (),
    sort: str | None = None, base: Any = None, lr: float | None = None, device: str = "auto",
    stats: bool = False, quantization_analysis: bool = False, sort_by_change_magnitude: bool = False,
    show_layer_impact: bool = False, architecture_comparison: bool = False, memory_analysis: bool = False,
    anomaly_detection: bool = False, change_summary: bool = False, convergence_analysis: bool = False,
    gradient_analysis: bool = False, similarity_matrix: bool = False,
    epsilon: float = 0.0, ignore_keys_regex: str | None = None, path: str | None = None, format: str | None = None,
    recursive: bool = False, unsafe_pickle: bool = False, scope: str = "params",
    histograms: int = 0, spectra: int = 0, raw: bool = False, revision: str | None = None,
    map: str = "auto", map_heads: str | None = None, sort_key: str | None = None, layer_pattern: str | None = None, quantization_top_k: int = 10,
    fail_on_anomaly: str | None = None, plateau_threshold: float = 1e-3, plateau_steps: int = 2,
    cross_layer: bool = False, common_only: bool = False, process_group: Any = None,
    progress: Callable[[int], None] | None = None,
    **unknown: Any,
) -> SeriesReport:
    """Compare ordered checkpoints C1 C2 ... CN in one pass.

    Args:
        checkpoints: paths, state_dicts or nn.Modules in training order, or a mapping
            label → source.
        analyses: analysis names or flags. Series analyses (convergence, gradient,
            similarity) run over the whole series; the others run on each consecutive
            pair. None named: convergence and similarity.
        sort: ``None``/``"given"`` keeps the order; ``"natural"`` sorts by the numbers in
            the labels (epoch_2 before epoch_10).
        base: a checkpoint for task vectors τ_i = θ_i − θ_base (similarity matrix).
        common_only: compare only the tensors every checkpoint holds. Without it a
            checkpoint that lacks tensors the others hold is refused (UsageError naming
            the file and the tensors): leaving them out would move every figure.
        lr: the learning rate, when the checkpoints do not record it (gradient analysis).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        process_group: not supported for series (a UsageError when given; docs/DISTRIBUTED.md).
        progress: called with the number of elements measured after each batch.
        The other keywords: as ``torchdiff.compare``; pair analyses (stats, layer impact,
        anomalies, architecture...) run on each consecutive pair, and
        ``quantization_analysis`` (it transforms a pair) is refused. ``histograms`` and
        ``spectra`` are accepted and have no effect (a series report draws neither).

    Returns:
        A SeriesReport; ``print`` it for text, ``to_dict()`` for JSON. Under
        ``torchrun -m torchdiff series`` every rank measures the tensors it owns and
        rank 0 gets the report; the other ranks get None (docs/DISTRIBUTED.md).

    Example:
        >>> import torch, torchdiff.series as S
        >>> run = [{"w": torch.full((4,), v)} for v in (1.0, 1.5, 1.75, 1.875)]
        >>> report = S.compare_series(run, analyses=["convergence_analysis"])
        >>> report.analysis("convergence_analysis").headline["status"]
        'converging'
    """
    if unknown:
        raise UsageError(unknown_option(next(iter(unknown)), [*CORE_OPTIONS, *_known_options(), "sort", "base", "lr"]))
    if process_group is not None:
        raise UsageError("compare_series does not take process_group= (series runs in one process; "
                         "docs/DISTRIBUTED.md)")
    given = {k: v for k, v in locals().items()
             if k not in ("checkpoints", "analyses", "sort", "base", "lr", "device", "progress", "unknown",
                          "common_only")}
    options = _series_options(analyses, sort, base, lr, device, given)
    options["common_only"] = bool(common_only)
    labels, sources = _sources(checkpoints)
    if len(sources) < 2:
        raise UsageError(f"a series takes two or more checkpoints (got {len(sources)})")
    if options.sort == "natural":
        order = sorted(range(len(labels)), key=lambda i: natural_key(labels[i]))
        labels = [labels[i] for i in order]
        sources = [sources[i] for i in order]
    for source in list(sources) + ([options.base] if options.base is not None else []):
        if isinstance(source, (str, os.PathLike)):
            formats.check_exists(source)
    engine = Engine(resolve_device(options.device), options.epsilon)
    opened: dict[Any, Checkpoint] = {}
    try:
        ckpts = [_open(s, options, opened) for s in sources]
        base_ckpt = _open(options.base, options, opened) if options.base is not None else None
        data = _measure(labels, ckpts, base_ckpt, options, engine, progress)
        # No figure from a file that changed while it was read (docs/SECURITY.md).
        check_unchanged({path: state for ckpt in opened.values() for path, state in ckpt.files.items()})
    finally:
        for ckpt in opened.values():
            ckpt.close()
    if data is None:  # under torchrun, a rank other than 0: it measured its share, rank 0 reports
        return None
    return _build(data, options, base_ckpt.name if base_ckpt is not None else None)


def _series_options(analyses, sort, base, lr, device, kwargs) -> Options:
    extra = dict(kwargs)
    extra["device"] = device
    if sort is not None:
        extra["sort"] = sort
    if base is not None:
        extra["base"] = base
    if lr is not None:
        extra["lr"] = lr
    for key in ("sort", "base", "lr"):
        if key in extra and key not in _known_options():
            raise UsageError(f"--{key} needs the analysis that defines it (not installed)")
    from torchdiff.analyses import FLAGS

    named = bool(analyses) or any(v for k, v in extra.items() if k in FLAGS or k in ANALYSES)
    for name in list(analyses) + [k for k, v in extra.items() if v and k in FLAGS]:
        module = ANALYSES.get(FLAGS.get(name, name))
        if module is not None and getattr(module, "PAIR_ONLY", False):
            raise UsageError(f"--{module.FLAG.replace('_', '-')} compares two checkpoints (torchdiff OLD NEW), "
                             "not a series")
    if not named:  # none named: the series defaults (plus any an option switches on)
        analyses = [n for n in SERIES_DEFAULT if n in ANALYSES]
    options = make_options(analyses, **extra)
    sort_value = options.get("sort")
    if sort_value in (None, "", "given"):
        options["sort"] = "given"
    elif sort_value != "natural":
        raise UsageError(f"--sort {sort_value!r}: use natural (numbers in names: epoch_2 before epoch_10) "
                         "or given (the order on the command line)")
    if "lr" in options:
        try:
            options["lr"] = float(options["lr"] or 0.0)
        except (TypeError, ValueError):
            raise UsageError(f"--lr must be a number, got {options['lr']!r}") from None
        if not math.isfinite(options["lr"]) or options["lr"] < 0:
            raise UsageError(f"--lr must be a positive number, got {options['lr']}")
    options.setdefault("base", None)
    compile_pattern(options.get("layer_pattern"))
    return options


def _known_options() -> set[str]:
    from torchdiff.analyses import FLAGS, options_defaults

    return set(options_defaults()) | set(FLAGS)


def _sources(checkpoints) -> tuple[list[str], list[Any]]:
    if isinstance(checkpoints, (str, os.PathLike)):
        raise UsageError("compare_series takes a list of checkpoints (paths, state_dicts or modules), not one path")
    if isinstance(checkpoints, Mapping):
        return [str(k) for k in checkpoints], list(checkpoints.values())
    sources = list(checkpoints)
    labels = [os.fspath(s) if isinstance(s, (str, os.PathLike)) else f"#{i}" for i, s in enumerate(sources)]
    return labels, sources


def _open(source: Any, options: Options, opened: dict[Any, Checkpoint]) -> Checkpoint:
    """Open a source once: the same file (or object) given twice is one Checkpoint."""
    key = ("path", os.path.realpath(os.fspath(source))) if isinstance(source, (str, os.PathLike)) \
        else ("object", id(source))
    if key not in opened:
        opened[key] = open_checkpoint(source, options)
    return opened[key]


# ---- the pass ------------------------------------------------------------------------------

class _Pass:
    """The series pass: batches of tensor names, each materialised once per checkpoint."""

    def __init__(self, labels, ckpts, base_ckpt, options, engine, progress):
        self.labels = list(labels)
        self.short = short_labels(self.labels)
        self.options = options
        self.engine = engine
        self.device = engine.device
        self.progress = progress
        # unique checkpoints (a file given twice, or the base inside the series, is one)
        self.uniq: list[Checkpoint] = []
        index: dict[int, int] = {}
        for c in ckpts + ([base_ckpt] if base_ckpt is not None else []):
            if id(c) not in index:
                index[id(c)] = len(self.uniq)
                self.uniq.append(c)
        self.rows = [index[id(c)] for c in ckpts]  # series index -> unique checkpoint
        self.n = len(ckpts)
        self.base_row: int | None = None
        if base_ckpt is not None:
            u = index[id(base_ckpt)]
            self.base_row = self.rows.index(u) if u in self.rows else self.n
            if self.base_row == self.n:
                self.rows.append(u)
        self.m = len(self.rows)
        # quantized weights with scale companions, packed GPTQ/AWQ codes: the values they
        # stand for, as the pair comparison reads them (--raw: the stored codes)
        self.dequantized: dict[str, set[str]] = {}  # scheme -> weight names
        if not options.get("raw"):
            for i, ckpt in enumerate(self.uniq):
                self.uniq[i], found = dequantize_checkpoint(ckpt)
                for name, det in found.items():
                    self.dequantized.setdefault(det.scheme, set()).add(name)
        # one name per tensor across the series, by the pair comparison's rule: the base
        # (when not a series checkpoint) next to the first checkpoint, then series order
        order = self.rows[self.n:] + self.rows[: self.n]
        self.uniq, self.names_dropped = pair_series(self.uniq, order)

    def run(self) -> SeriesData:
        options = self.options
        keep = compile_filters(options.ignore_keys_regex, options.path)
        ckpts = [self.uniq[u] for u in self.rows[: self.n]]
        names: list[str] = []
        seen: set[str] = set()
        for c in ckpts:
            for name in c.tensors:
                if name not in seen and keep(name):
                    seen.add(name)
                    names.append(name)
        check_selected(names, ckpts[0], ckpts[1], options.ignore_keys_regex, options.path, *ckpts[2:])
        self.roles = roles_over([{n: (h.storage_dtype, len(h.shape)) for n, h in c.tensors.items()}
                                 for c in ckpts])
        # Tensors in --scope some checkpoint lacks: refused unless --common-only, which
        # drops them from every pair and says so in the header. Others (the optimizer
        # state a run's first checkpoint has not made yet) are out of the series figures
        # anyway: the per-step comparisons show them added or removed.
        self.dropped: list[str] = []
        # the series figures follow the model's trajectory: never optimizer or training
        # state, whatever --scope (docs/SERIES.md); a checkpoint is refused only for those
        in_scope = SCOPES[options.scope] - {OPTIMIZER_STATE, TRAINING_STATE}
        for label, c in zip(self.labels, ckpts):
            missing = [n for n in names if n not in c.tensors and self.roles[n] in in_scope]
            if missing and not options.get("common_only"):
                shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
                raise UsageError(f"{label}: lacks {counted(len(missing), 'tensor')} in --scope {options.scope} other "
                                 f"checkpoints of the series hold: {shown} (--common-only compares the tensors "
                                 "every checkpoint holds)")
            if options.get("common_only"):
                missing = [n for n in names if n not in c.tensors]
            self.dropped += [n for n in missing if n not in self.dropped]
        if self.dropped:
            dropped = set(self.dropped)
            names = [n for n in names if n not in dropped]
        # series tensors (in scope, names.SCOPES) and their layers
        left_out: dict[str, list[str]] = {"not in every checkpoint": [], "shape differs": [], "not floating point": [],
                                          TIED: []}
        series_names: list[str] = []
        for name in names:
            if self.roles[name] not in in_scope:
                continue
            hs = [self.uniq[u].tensors.get(name) for u in self.rows]
            if any(h is None for h in hs):
                left_out["not in every checkpoint"].append(name)
            elif len({tuple(h.shape) for h in hs}) > 1:
                left_out["shape differs"].append(name)
            elif not all(h.dtype.is_floating_point or h.dtype.is_complex for h in hs):
                left_out["not floating point"].append(name)  # as read: dequantized codes are floats
            elif all(h.tied_to is not None for h in hs):  # lm_head.weight sharing wte.weight's storage
                left_out[TIED].append(name)
            else:
                series_names.append(name)
        layers: list[str] = []
        layer_index: dict[str, int] = {}
        self.layer_of: dict[str, int] = {}
        for name in series_names:
            layer = layer_key(name, options)
            if layer not in layer_index:
                layer_index[layer] = len(layers)
                layers.append(layer)
            self.layer_of[name] = layer_index[layer]
        L, M, dev = len(layers), self.m, self.device
        f64 = torch.float64
        self.acc_nsq = torch.zeros(L, M, dtype=f64, device=dev)
        self.acc_d2 = torch.zeros(L, M, M, dtype=f64, device=dev)
        self.acc_bad = torch.zeros(L, dtype=f64, device=dev)
        if self.base_row is not None:
            self.acc_conf = torch.zeros(L, self.n, self.n, dtype=f64, device=dev)
            self.acc_both = torch.zeros(L, self.n, self.n, dtype=f64, device=dev)
            self.acc_any = torch.zeros(L, dtype=f64, device=dev)
            self.acc_multi = torch.zeros(L, dtype=f64, device=dev)
        layer_params = np.zeros(L)
        layer_tensors = np.zeros(L)
        for name in series_names:
            layer_params[self.layer_of[name]] += _numel(self.uniq[self.rows[0]].tensors[name])
            layer_tensors[self.layer_of[name]] += 1
        chunk = WORKSPACE_BYTES.get(dev.type, WORKSPACE_BYTES["cpu"]) // (8 * max(M, 1))
        largest = int(layer_params.max()) if L else 1  # no bigger workspace than the largest layer
        self.chunk = max(1, min(chunk, _MAX_CHUNK, largest))
        self.work = torch.empty(M, self.chunk, dtype=f64, device=dev) if L else None
        # Adam state
        want_adam = "gradient_analysis" in options.analyses
        self.plans: dict[int, AdamPlan] = {}
        if want_adam:
            for u in sorted(set(self.rows[: self.n])):
                c = self.uniq[u]
                plan = build_adam_plan([(n_, tuple(h.shape), is_float_storage(h.storage_dtype))
                                        for n_, h in c.tensors.items()], c.metadata)
                if plan is not None:
                    self.plans[u] = plan
        self.adam_sums: dict[int, dict[str, tuple[float, ...]]] = {u: {} for u in self.plans}
        # per-step analyses: each step has its own state, prepared on its two checkpoints
        self.step_diffs: list[list] = [[] for _ in range(self.n - 1)]
        pair_names = [a for a in options.analyses if not hasattr(ANALYSES[a], "analyze_series")]
        self.step_states = [{a: {} for a in pair_names} for _ in range(self.n - 1)]
        self.step_hooks = []
        for t, state in enumerate(self.step_states):
            hooks = []
            for a in pair_names:
                module = ANALYSES[a]
                prepare = getattr(module, "prepare", None)
                if prepare is not None:
                    old, new = prepare(ckpts[t], ckpts[t + 1], options, state[a])
                    if old is not ckpts[t] or new is not ckpts[t + 1]:
                        raise UsageError(f"--{module.FLAG.replace('_', '-')} transforms the checkpoints of a pair "
                                         "before measuring them; compare two checkpoints for it (torchdiff OLD NEW)")
                hooks += getattr(module, "hooks", None) and module.hooks(options, state[a]) or []
            self.step_hooks.append(hooks)
        series_set = set(series_names)
        # under torchrun: every name goes to one rank (docs/DISTRIBUTED.md, "series");
        # each rank reads, measures and accumulates only the names it owns
        self.ctx = distributed.active()
        self.mine: set[str] | None = None
        if self.ctx is not None:
            self.mine = self._owned(names, want_adam)
            distributed.TIMINGS.clear()
            distributed.TIMINGS.update(names=len(names), owned=len(self.mine))
            self.step_parts: list[list] = [[] for _ in range(self.n - 1)]  # (Partials, pairs before, slots before)
            self.step_pairs: list[list[Pair]] = [[] for _ in range(self.n - 1)]
            distributed.share(self.ctx, lambda: [self._batch(b, series_set) for b in self._batches(names)],
                              "exchange of series figures")
            if not self._gather(L, M):
                return None
        else:
            for batch in self._batches(names):
                self._batch(batch, series_set)
        # the one synchronisation for the series figures
        nsq = self.acc_nsq.cpu().numpy()
        dist2 = self.acc_d2.cpu().numpy()
        dist2 = (dist2 + dist2.transpose(0, 2, 1)) / 2
        for k in range(M):
            dist2[:, k, k] = 0.0
        data = SeriesData(
            labels=tuple(self.short), names=tuple(self.labels),
            metadata=tuple(dict(c.metadata) for c in ckpts), layers=tuple(layers),
            layer_params=layer_params, layer_tensors=layer_tensors, nsq=nsq, dist2=dist2,
            nonfinite=self.acc_bad.cpu().numpy(), steps=self._comparisons(ckpts, keep),
            device=str(dev), order=options.sort, base_row=self.base_row,
            left_out={k: v for k, v in left_out.items() if v}, step_states=tuple(self.step_states),
            dropped=tuple(self.dropped), step_pairing=tuple(self._pairing(t) for t in range(self.n - 1)),
            base_pairing=self._base_pairing() + directory_notes(self.uniq),
            dequantized={scheme: tuple(sorted(names)) for scheme, names in sorted(self.dequantized.items())},
        )
        if self.base_row is not None:
            data.base_label = self.uniq[self.rows[self.base_row]].name
            data.sign_conflicts = self.acc_conf.cpu().numpy()
            data.sign_both = self.acc_both.cpu().numpy()
            data.sign_any_conflict = self.acc_any.cpu().numpy()
            data.sign_multi = self.acc_multi.cpu().numpy()
        if want_adam:
            data.adam = tuple(
                {"plan": self.plans[u], "sums": self.adam_sums[u]} if u in self.plans else None
                for u in self.rows[: self.n]
            )
        return data

    # -- names --

    def _step_dropped(self, t: int) -> Dropped:
        """What was dropped from the names of step t's two checkpoints (old, new)."""
        a, b = (self.names_dropped[u] for u in self.rows[t: t + 2])
        return Dropped(a.old_prefix, b.old_prefix, a.old_wrappers, b.old_wrappers, (a.stored[0], b.stored[0]))

    def _pairing(self, t: int) -> AnalysisResult | None:
        """Step t's ``pairing`` section, the pair comparison's own (``side=old, new`` where
        both checkpoints' names were shortened); None where nothing was dropped."""
        dropped = self._step_dropped(t)
        if not dropped:
            return None
        old, new = (Checkpoint(name=self.labels[k], format="", tensors={}) for k in (t, t + 1))
        return pairing_result(old, new, dropped)

    def _base_pairing(self) -> tuple[str, ...]:
        """Notes on what was dropped from the names of a base outside the series (no step
        shows it)."""
        if self.base_row is None or self.base_row < self.n:
            return ()
        base = self.uniq[self.rows[self.base_row]]
        dropped = self.names_dropped[self.rows[self.base_row]]
        notes = []
        if dropped.old_prefix:
            notes.append(f"the base's names paired with the prefix {dropped.old_prefix!r} dropped ({base.name})")
        if dropped.old_wrappers:
            shown = ", ".join(f"{s}." for s in dropped.old_wrappers)
            made_by = " and ".join(WRAPPER_SEGMENTS[s] for s in dropped.old_wrappers)
            notes.append(f"the base's names paired with {shown} dropped ({base.name}): the names {made_by} "
                         "gives a model it wraps")
        return tuple(notes)

    # -- batching --

    def _units(self, names: list[str]) -> list[list[str]]:
        """Names in order; the tensors of one optimizer state index stay together."""
        units: list[list[str]] = []
        last_key = None
        for name in names:
            opt = optimizer_param(name)
            key = opt[0] if opt is not None else None
            if key is not None and key == last_key:
                units[-1].append(name)
            else:
                units.append([name])
            last_key = key
        return units

    def _batches(self, names: list[str]):
        batch: list[str] = []
        size = 0
        for unit in self._units(names):
            unit_bytes = sum(h.nbytes for n in unit for c in self.uniq if (h := c.tensors.get(n)) is not None)
            if batch and size + unit_bytes > BATCH_BYTES:
                yield batch
                batch, size = [], 0
            batch += unit
            size += unit_bytes
        if batch:
            yield batch

    def _batch(self, batch: list[str], series_set: set[str]) -> None:
        cache: dict[tuple[int, str], torch.Tensor] = {}

        def value(u: int, name: str) -> torch.Tensor:
            key = (u, name)
            t = cache.get(key)
            if t is None:
                h = self.uniq[u].tensors[name]
                t = h.materialize()
                if tuple(t.shape) != tuple(h.shape):
                    raise CorruptFileError(f"tensor {name!r}: header says shape {list(h.shape)}, "
                                           f"data has {list(t.shape)}")
                cache[key] = t
            return t

        def in_memory(u: int, name: str) -> TensorHandle | None:
            h = self.uniq[u].tensors.get(name)
            if h is None:
                return None
            return TensorHandle(name=name, shape=tuple(h.shape), dtype=h.dtype, nbytes=h.nbytes,
                                materialize=lambda: value(u, name), storage_dtype=h.storage_dtype, mapped=False)

        # 1. each consecutive pair through the engine
        done = 0
        nonfinite: set[str] = set()  # names with NaN/Inf in some checkpoint (from the engine's counts)
        mine = self.mine
        for t in range(self.n - 1):
            pairs = []
            for name in batch:
                a = in_memory(self.rows[t], name)
                b = in_memory(self.rows[t + 1], name)
                if a is not None or b is not None:
                    pairs.append(Pair(name, a, b, self.roles.get(name, "parameter")))
                    if mine is None or name in mine:
                        done += sum(h.numel for h in (a, b) if h is not None)
            if mine is not None:  # under torchrun: the owned pairs' partial figures
                nonfinite |= self._measure_share(t, pairs)
                continue
            diffs = self.engine.run(pairs, hooks=self.step_hooks[t]) if pairs else []
            for d in diffs:
                if any(s is not None and (s.nan_count or s.inf_count) for s in (d.old, d.new)):
                    nonfinite.add(d.name)
            self.step_diffs[t] += diffs
        # 2. the Gram pass, layer by layer
        by_layer: dict[int, list[str]] = {}
        for name in batch:
            if name in series_set and (mine is None or name in mine):
                by_layer.setdefault(self.layer_of[name], []).append(name)
        # torch on one thread on the CPU, as in the engine's pass (docs/ENGINE.md, "Threads"):
        # with a core busy, two threads took 6.3-8.4 s for a 3-checkpoint GPT-2 series, one 3.5-4.1 s
        with torch_threads(1 if self.device.type == "cpu" else None):
            for layer, names in by_layer.items():
                self._gram(layer, [([_flat(value(u, name)) for u in self.rows], name in nonfinite)
                                   for name in names])
        # 3. Adam moments
        pending = []
        batch_set = set(batch)
        for u, plan in self.plans.items():
            for p in plan.params:
                if p.exp_avg not in batch_set or p.exp_avg_sq not in batch_set:
                    continue
                if mine is not None and p.exp_avg not in mine:
                    continue
                if p.step is not None and p.step in batch_set:
                    step: Any = value(u, p.step).to(self.device)
                elif p.step_value is not None:
                    step = p.step_value
                else:
                    continue
                m = value(u, p.exp_avg).to(self.device)
                v = value(u, p.exp_avg_sq).to(self.device)
                pending.append((u, p, m.numel(), adam_sums(m, v, step, p.beta1, p.beta2, p.eps)))
        if pending:
            sums = torch.stack([s for *_, s in pending]).cpu().tolist()
            for (u, p, n, _), s in zip(pending, sums):
                self.adam_sums[u][p.key] = (float(n), *s)
        if self.progress is not None:
            self.progress(done)

    # -- under torchrun (docs/DISTRIBUTED.md, "series") --

    def _owned(self, names: list[str], want_adam: bool) -> set[str]:
        """The names this rank measures. One unit (one rank) each: the tensors of one
        layer of the series figures (its Gram sums then come from one rank, accumulated
        in the single-process order), the tensors of one optimizer state index, the
        (exp_avg, exp_avg_sq, step) of one Adam parameter, and what a step hook needs
        together; units are balanced by bytes over every checkpoint."""
        keys: list[list] = []
        for name in names:
            k: list = []
            if name in self.layer_of:
                k.append(("layer", self.layer_of[name]))
            opt = optimizer_param(name)
            if opt is not None:
                k.append(("optimizer", opt[0]))
            keys.append(k)
        index = {name: i for i, name in enumerate(names)}
        if want_adam:
            for plan in self.plans.values():
                for p in plan.params:
                    for member in (p.exp_avg, p.exp_avg_sq, p.step):
                        if member in index:
                            keys[index[member]].append(("adam", p.exp_avg))
        for t, hooks in enumerate(self.step_hooks):
            if not hooks:
                continue
            old, new = self.uniq[self.rows[t]], self.uniq[self.rows[t + 1]]
            for name in names:
                pair = Pair(name, old.tensors.get(name), new.tensors.get(name), self.roles.get(name, "parameter"))
                keys[index[name]] += [key for h in hooks for key in distributed.colocation_keys(h, pair)]
        sizes = [sum(h.nbytes for c in self.uniq if (h := c.tensors.get(name)) is not None) for name in names]
        owner = distributed.grouped_owners(keys, sizes, self.ctx.world)
        return {name for name, o in zip(names, owner) if o == self.ctx.rank}

    def _measure_share(self, t: int, pairs: list[Pair]) -> set[str]:
        """Step t's owned pairs of this batch through ``Engine.measure`` (partial figures
        under the step's global ids); returns the owned names with NaN/Inf."""
        old, new = self.uniq[self.rows[t]], self.uniq[self.rows[t + 1]]
        step_pairs = self.step_pairs[t]
        before = len(step_pairs)
        slots = sum((p.old is not None) + (p.new is not None) for p in step_pairs)
        # rank 0 merges over the checkpoints' own lazy handles (headers; values only if a
        # value-derived figure were missing), not over this batch's in-memory values
        step_pairs += [Pair(p.name, old.tensors.get(p.name), new.tensors.get(p.name), p.role) for p in pairs]
        owned = [i for i, p in enumerate(pairs) if p.name in self.mine]
        if not owned:
            return set()
        part = self.engine.measure(pairs, owned, self.step_hooks[t])
        self.step_parts[t].append((part, before, slots))
        first, slot_name = 0, {}
        for p in pairs:
            for k in range((p.old is not None) + (p.new is not None)):
                slot_name[first + k] = p.name
            first += (p.old is not None) + (p.new is not None)
        return {slot_name[k] for k, v in part.exact_side.items() if v.nan_count or v.inf_count}

    def _gather(self, L: int, M: int) -> bool:
        """Every rank's figures to rank 0 (one exchange): step partials, merged there in
        rank order (``Engine.merge``, the compare path's); the Gram sums, added (each
        layer's come from its one owner, the others' are exact zeros); the Adam sums.
        True on rank 0, which then holds every figure; False on the others."""
        ctx = self.ctx
        parts = [distributed.combine(p) for p in self.step_parts]
        gram = [self.acc_nsq, self.acc_d2, self.acc_bad]
        if self.base_row is not None:
            gram += [self.acc_conf, self.acc_both, self.acc_any, self.acc_multi]
        adam = [[u, j, *self.adam_sums[u][p.key]] for u in sorted(self.plans)
                for j, p in enumerate(self.plans[u].params) if p.key in self.adam_sums[u]]
        flat = np.concatenate([g.detach().cpu().numpy().reshape(-1) for g in gram]
                              + [np.asarray(adam, dtype=np.float64).reshape(-1)])
        gathered = distributed.gather_parts(ctx, parts, flat, "gather of series figures")
        if gathered is None:
            return False
        for t in range(self.n - 1):
            self.step_diffs[t] = list(self.engine.merge(self.step_pairs[t], [got[0][t] for got in gathered]))
        width = sum(g.numel() for g in gram)
        total = sum(got[1][:width] for got in gathered)  # rank order; one non-zero term a layer
        pos = 0
        for g in gram:
            g.copy_(torch.from_numpy(total[pos:pos + g.numel()].reshape(g.shape)))
            pos += g.numel()
        for got in gathered:
            for row in got[1][width:].reshape(-1, 6):
                u, j = int(row[0]), int(row[1])
                self.adam_sums[u][self.plans[u].params[j].key] = (float(row[2]), float(row[3]), float(row[4]),
                                                                   float(row[5]))
        return True

    def _gram(self, layer: int, tensors: list[tuple[list[torch.Tensor], bool]]) -> None:
        """Stream the layer's tensors (all rows side by side) through the workspace.

        ``tensors``: (the versions in row order, whether some series version holds
        NaN/Inf). A chunk is masked only when one of its tensors does (or always on the
        base row when the base is not a series checkpoint: the engine did not count it).
        """
        work, C = self.work, self.chunk
        pos = 0
        mask = False
        for versions, nonfinite in tensors:
            n = versions[0].numel()
            start = 0
            while start < n:
                take = min(C - pos, n - start)
                for r, v in enumerate(versions):
                    work[r, pos:pos + take].copy_(v[start:start + take])
                pos += take
                start += take
                mask = mask or nonfinite
                if pos == C:
                    self._reduce(layer, work, mask)
                    pos, mask = 0, False
        if pos:
            self._reduce(layer, work[:, :pos], mask)

    def _reduce(self, layer: int, x: torch.Tensor, mask: bool) -> None:
        bad = None
        if mask:
            bad = ~torch.isfinite(x).all(0)
        elif self.base_row is not None and self.base_row == self.n:
            bad = ~torch.isfinite(x[self.base_row])
        if bad is not None:
            self.acc_bad[layer] += bad.sum()
            x.masked_fill_(bad.unsqueeze(0), 0.0)
        d = torch.cdist(x.unsqueeze(0), x.unsqueeze(0), compute_mode="donot_use_mm_for_euclid_dist")[0]
        self.acc_d2[layer] += d * d
        self.acc_nsq[layer] += (x * x).sum(1)
        if self.base_row is not None:
            tau = x[: self.n] - x[self.base_row]
            pos = (tau > 0).to(torch.float32)
            neg = (tau < 0).to(torch.float32)
            cross = pos @ neg.T
            self.acc_conf[layer] += (cross + cross.T).to(torch.float64)
            nz = pos + neg
            self.acc_both[layer] += (nz @ nz.T).to(torch.float64)
            self.acc_any[layer] += (pos.amax(0) * neg.amax(0)).sum()
            self.acc_multi[layer] += (nz.sum(0) >= 2).sum()

    def _comparisons(self, ckpts: list[Checkpoint], keep) -> tuple[Comparison, ...]:
        out = []
        for t in range(self.n - 1):
            old, new = ckpts[t], ckpts[t + 1]
            meta = tuple(MetadataDiff(k, s, a, b) for k, s, a, b in pair_metadata(old.metadata, new.metadata, keep))
            diffs = self.step_diffs[t]
            # ties and stored bytes from the checkpoints' own handles (the engine measured
            # in-memory copies): a tied weight counts once, as in a pair's comparison
            figures = annotate([Pair(d.name, old.tensors.get(d.name), new.tensors.get(d.name), d.role) for d in diffs],
                               Figures.from_diffs(diffs))
            out.append(Comparison(
                old_name=self.labels[t], new_name=self.labels[t + 1], old_format=old.format, new_format=new.format,
                figures=figures, metadata_diffs=meta, old_metadata=dict(old.metadata),
                new_metadata=dict(new.metadata), device=str(self.device), epsilon=self.options.epsilon,
                scope=self.options.scope, layer_pattern=self.options.get("layer_pattern"),
                stored_names=self._step_dropped(t).stored,
            ))
        return tuple(out)


def pair_series(ckpts: list[Checkpoint], order: Sequence[int]) -> tuple[list[Checkpoint], list[Dropped]]:
    """Every checkpoint under the names the series pairs by, and what was dropped from
    each one's names (a ``Dropped`` of one side: ``old_prefix``, ``old_wrappers``,
    ``stored[0]``: short name -> the name the file stores).

    The pair comparison's rule (:func:`torchdiff.pairing.drop_prefix`: a container
    prefix where one of the two is a PyTorch pickle or DCP, wrapper segments between any
    formats) is applied to each two checkpoints next to each other in ``order``
    (indices into ``ckpts``), over and over until no name changes: a checkpoint takes the
    short names a neighbour pairs it by and passes them on, so every checkpoint holds
    one name per tensor (two .pt files followed by a safetensors export all drop
    ``model.``). Each drop only shortens names, so this ends; neighbours that hold the
    same names (nothing pairs more) or were checked as they are now are passed over. Two
    one-array ``.npy`` files named by their stems are a pair's rule only, not followed
    here. The views share the checkpoints' handles (closing stays with the originals).
    """
    views = list(ckpts)
    prefixes = [""] * len(views)
    wrappers: list[tuple[str, ...]] = [()] * len(views)
    neighbours = [(u, v) for u, v in zip(order, order[1:]) if u != v]
    version = [0] * len(views)  # how many times each checkpoint's names changed
    checked: set[tuple[int, int, int, int]] = set()  # (u, v, versions): drop_prefix ran on them as they are
    changed = True
    while changed:  # forward, then backward: a name change travels the whole series in one sweep
        changed = False
        for u, v in neighbours + neighbours[::-1]:
            if (u, v, version[u], version[v]) in checked or views[u].tensors.keys() == views[v].tensors.keys():
                continue  # checked as they are, or the same names: nothing pairs more
            old, new, found = drop_prefix(views[u], views[v])
            if found and not found.single:
                for k, view, prefix, segments in ((u, old, found.old_prefix, found.old_wrappers),
                                                  (v, new, found.new_prefix, found.new_wrappers)):
                    if list(view.tensors) != list(views[k].tensors):
                        views[k] = view
                        version[k] += 1
                        prefixes[k] += prefix
                        wrappers[k] = tuple(s for s in WRAPPER_SEGMENTS if s in wrappers[k] or s in segments)
                        changed = True
            checked.add((u, v, version[u], version[v]))  # as compare: one drop_prefix a pair
    dropped = []
    for ckpt, view, prefix, segments in zip(ckpts, views, prefixes, wrappers):
        stored = {short: name for name, short in zip(ckpt.tensors, view.tensors) if short != name}
        dropped.append(Dropped(old_prefix=prefix, old_wrappers=segments, stored=(stored, {})))
    return views, dropped


def _flat(t: torch.Tensor) -> torch.Tensor:
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.reshape(-1)


def _numel(h: TensorHandle) -> int:
    n = h.numel
    return n * 2 if h.dtype.is_complex else n


def _measure(labels, ckpts, base_ckpt, options, engine, progress) -> SeriesData:
    return _Pass(labels, ckpts, base_ckpt, options, engine, progress).run()


def _build(data: SeriesData, options: Options, base_name: str | None) -> SeriesReport:
    notes: list[str] = []
    series_results: list[AnalysisResult] = []
    pair_names: list[str] = []
    for name in options.analyses:
        module = ANALYSES[name]
        if hasattr(module, "analyze_series"):
            result = module.analyze_series(data, options)
            if result is not None:
                series_results.append(result)
        else:
            pair_names.append(name)
    step_options = Options(options)
    step_options["analyses"] = tuple(pair_names)
    steps = tuple(build_report(comp, step_options, dict(state))
                  for comp, state in zip(data.steps, data.step_states))
    if any(data.step_pairing):  # what pairing dropped: before the step's analyses, as for a pair
        steps = tuple(step if section is None else dataclasses.replace(step, analyses=(section,) + step.analyses)
                      for step, section in zip(steps, data.step_pairing))
    notes += data.base_pairing
    for scheme, names in data.dequantized.items():
        shown = ", ".join(names[:5]) + (f" (+{count(len(names) - 5)} more)" if len(names) > 5 else "")
        notes.append(f"dequantized ({scheme}): {counted(len(names), 'weight')} compared as the values their codes and "
                     f"scales stand for (--raw compares the stored codes): {shown}")
    if data.dropped:
        shown = ", ".join(data.dropped[:5]) + (f" (+{count(len(data.dropped) - 5)} more)"
                                               if len(data.dropped) > 5 else "")
        notes.insert(0, f"--common-only: {counted(len(data.dropped), 'tensor')} not in every checkpoint left out of "
                        f"every pair: {shown}")
    for reason, names in data.left_out.items():
        shown = ", ".join(names[:5]) + (f" (+{count(len(names) - 5)} more)" if len(names) > 5 else "")
        notes.append(f"{counted(len(names), 'tensor')} left out of the series figures ({reason}): {shown}")
    bad = float(data.nonfinite.sum()) if data.nonfinite.size else 0.0
    if bad:
        notes.append(f"{counted(int(bad), 'element position')} non-finite in some checkpoint, left out of the series "
                     "figures")
    return SeriesReport(
        checkpoints=data.names, labels=data.labels, steps=steps,
        series_analyses=tuple(series_results), order=data.order, base=base_name, notes=tuple(notes),
    )
