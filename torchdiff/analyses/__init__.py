"""The analyses: one module each, one name everywhere.

Each module in this package satisfies the ``Analysis`` protocol below. Per-run state
(what ``prepare`` found, for its ``hooks`` and ``analyze``) lives in the ``state`` dict
the orchestrator gives each analysis for one run, never in the options, which stay
the resolved user options.

An analysis appears here (and as a CLI flag) only once its module exists.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Protocol


class Analysis(Protocol):
    """What every module in torchdiff.analyses defines.

    Required:
        NAME: the analysis name (JSON ``type``, key in ``ANALYSES``).
        FLAG: its CLI flag without dashes (``layer_impact`` is ``show_layer_impact``).
        OPTIONS: ``{option: (default, help)}`` of the extra options it reads (may be empty).
        analyze(comparison, options, state) -> AnalysisResult | None: a pure function of
            the Comparison (its Figures table, what its hooks stored in
            ``TensorDiff.extras[NAME]``, and its own ``state``).

    Optional (looked up with getattr):
        validate(options): raise UsageError before any I/O (may normalise its own options).
        prepare(old, new, options, state) -> (old, new): a transform of the two
            Checkpoints before pairing (e.g. dequantization); records what it found in ``state``.
        hooks(options, state) -> list[engine.Hook]: per-tensor value access in the engine's pass.
        order(comparison, options) -> list[str]: tensor names in output order.
        analyze_series(series, options) -> AnalysisResult: the series form.
        ENABLED_BY: option names that switch the analysis on when set (not None/False),
            e.g. ``--fail-on-anomaly`` runs anomaly_detection.
        SERIES_ONLY: True when the analysis has no per-pair form.
    """

    NAME: str
    FLAG: str
    OPTIONS: dict[str, tuple[Any, str]]

    def analyze(self, comparison: Any, options: Any, state: dict) -> Any: ...

# Fixed text-output order of sections; (name, module).
_REGISTRY: tuple[tuple[str, str], ...] = (
    ("stats", "stats"),
    ("sort_by_change_magnitude", "sort_by_change_magnitude"),
    ("change_summary", "change_summary"),
    ("architecture_comparison", "architecture_comparison"),
    ("memory_analysis", "memory_analysis"),
    ("quantization_analysis", "quantization_analysis"),
    ("layer_impact", "layer_impact"),
    ("anomaly_detection", "anomaly_detection"),
    ("convergence_analysis", "convergence_analysis"),
    ("gradient_analysis", "gradient_analysis"),
    ("similarity_matrix", "similarity_matrix"),
)


def _load() -> dict[str, ModuleType]:
    found: dict[str, ModuleType] = {}
    for name, module in _REGISTRY:
        try:
            found[name] = importlib.import_module(f"{__name__}.{module}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{module}":
                raise
    return found


ANALYSES: dict[str, ModuleType] = _load()  # each module satisfies Analysis
analysis_names: list[str] = list(ANALYSES)  # in text-output order
FLAGS: dict[str, str] = {module.FLAG: name for name, module in ANALYSES.items()}  # flag -> name


def options_defaults() -> dict[str, tuple[object, str]]:
    out: dict[str, tuple[object, str]] = {}
    for module in ANALYSES.values():
        out.update(getattr(module, "OPTIONS", {}))
    return out
