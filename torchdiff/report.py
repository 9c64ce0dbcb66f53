"""The Report family: what ``compare``, ``inspect``, ``compare_series`` and the monitor
return. Every member has the same surface:

- iteration and ``len`` (a Report's TensorDiffs in output order; a SeriesReport's step
  Reports); a Report's ``name in report``, ``report[name]`` and ``delta(name)``;
- ``analysis(name)``, ``analyses``, ``has_differences``;
- ``records(level)`` plain rows and ``to_pandas(level)``;
- ``scalars()`` with one naming scheme (torchdiff.figures.scalars);
- ``to_dict()`` (the single source of JSON and YAML), ``to_json()``, ``to_yaml()``,
  and ``str()`` for text.

This module sits above render (it renders itself through it); render and the results
below never import it.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterator

from torchdiff import access
from torchdiff.errors import MissingDependencyError, UsageError
from torchdiff.figures import Comparison, Figures, layer_records, records, scalars, without_gc
from torchdiff.names import layer_of
from torchdiff.render import finite_json, render, to_items
from torchdiff.results import AnalysisResult, TensorDiff


def _dataframe(rows: list[dict[str, Any]]):
    try:
        import pandas as pd
    except ImportError:
        raise MissingDependencyError("to_pandas needs pandas (pip install pandas)") from None
    return pd.DataFrame(rows)


def find_analysis(analyses, name: str) -> AnalysisResult | None:
    """The first of ``analyses`` named ``name`` (or the analysis a flag name stands for:
    ``show_layer_impact``); None when it did not run; a UsageError naming the closest
    analysis for a name close to one but none (``layer_impactt``). Every report kind
    (Report, SeriesReport, MonitorRecord) looks analyses up here."""
    from torchdiff.analyses import FLAGS, analysis_names

    name = FLAGS.get(name, name)
    for a in analyses:
        if a.name == name:
            return a
    known = set(analysis_names) | {a.name for a in analyses}
    close = difflib.get_close_matches(name, sorted(known), n=1)
    if name not in known and close:
        raise UsageError(f"no analysis named {name!r} (did you mean {close[0]!r}?)")
    return None


class _Family:
    """What every report kind shares, given ``to_dict``, ``records`` and ``analyses``."""

    analyses: tuple[AnalysisResult, ...]

    def analysis(self, name: str) -> AnalysisResult | None:
        """The first analysis of that name (a series: its own, then each step's in order),
        None when it did not run. A flag name stands for its analysis (``show_layer_impact``);
        a name close to an analysis' name but none (``layer_impactt``) is a UsageError
        naming it, not a silent None."""
        return find_analysis(self.analyses, name)

    def to_json(self, indent: int | None = 2) -> str:
        return render(self, "json", indent=indent)

    def to_yaml(self) -> str:
        return render(self, "yaml")

    def to_pandas(self, level: str = "tensor"):
        """``records(level)`` as a pandas DataFrame (pandas imported here)."""
        return _dataframe(self.records(level))  # type: ignore[attr-defined]

    def to_html(self, path, command: str | None = None) -> str:
        """A self-contained HTML report of this report at ``path`` (docs/REPORT.md); returns the path."""
        from torchdiff.render.html import write_html

        return write_html(self, path, command=command)

    def __str__(self) -> str:
        return render(self, "text", color=False)

    def _repr_pretty_(self, printer, cycle: bool) -> None:
        """IPython and Jupyter show the text form (``repr`` stays one line)."""
        printer.text(str(self))


@dataclass(frozen=True, eq=False, repr=False)
class Report(_Family):
    """A comparison (or an inspection) plus the analyses that ran on it.

    Iterates over the TensorDiffs in output order; ``report["name"]`` is one of them.
    """

    comparison: Comparison
    analyses: tuple[AnalysisResult, ...] = ()
    order: tuple[str, ...] | None = None  # tensor names in output order (sorting)
    stats: bool = False

    @property
    def kind(self) -> str:
        return "inspect" if self.comparison.mode == "inspect" else "compare"

    def __repr__(self) -> str:
        c = self.comparison
        sides = repr(c.new_name) if self.kind == "inspect" else f"{c.old_name!r} -> {c.new_name!r}"
        counts = ", ".join(f"{n} {s}" for s, n in c.counts().items() if n)
        return f"<Report {self.kind} {sides}: {len(self)} tensors{': ' if counts else ''}{counts}>"

    @property
    def figures(self) -> Figures:
        return self.comparison.figures

    def __iter__(self) -> Iterator[TensorDiff]:
        return iter(self.ordered_diffs())

    def __len__(self) -> int:
        return len(self.comparison.figures)

    def __contains__(self, name: object) -> bool:
        """Whether ``name`` is a tensor of this report (``"fc.weight" in report``)."""
        try:
            self.figures.index(name)  # type: ignore[arg-type]
        except (KeyError, TypeError):
            return False
        return True

    def __getitem__(self, name: str) -> TensorDiff:
        """The TensorDiff of ``name``; UnknownTensorError (a UsageError and a KeyError)
        naming the closest names when absent."""
        if isinstance(name, str) and name in self:
            return self.figures[self.figures.index(name)]
        raise access.unknown_tensor(self, name, f"no tensor named {name!r} in this report")

    def row_order(self) -> list[int] | None:
        """Row numbers of the figures table in output order (None: table order)."""
        return self._row_order()

    def delta(self, name: str, old: Any = None, new: Any = None, *, raw: bool = False,
              format: str | None = None):
        """Δ = new − old of one tensor as a CPU tensor, read again from the sources
        (torchdiff.access.delta: by default the report's own paths)."""
        return access.delta(self, name, old, new, raw=raw, format=format)

    def _row_order(self) -> list[int] | None:
        if self.order is None:
            return None
        return [self.figures.index(n) for n in self.order]

    def ordered_diffs(self) -> list[TensorDiff]:
        rows = self._row_order()
        fig = self.figures
        return list(fig) if rows is None else [fig[i] for i in rows]

    @property
    def has_differences(self) -> bool:
        return self.comparison.has_differences

    def _layer(self):
        return partial(layer_of, pattern=self.comparison.layer_pattern)

    def records(self, level: str = "tensor") -> list[dict[str, Any]]:
        """Plain rows: one per tensor (``level="tensor"``, every tensor in output order) or
        per layer (``"layer"``: the tensors in scope, as the global figures)."""
        if level == "tensor":
            rows = records(self.figures, self._row_order(), self._layer())
            if self.kind == "inspect":  # one side: plain statistic names, no pair columns
                drop = {"status"} | {k for k in rows[0] if k.startswith("old_")} if rows else set()
                drop |= {"l2", "rel_l2", "nmse", "cosine", "rmse", "max_abs", "mean_abs_diff", "changed_fraction"}
                rows = [{k.removeprefix("new_"): v for k, v in r.items() if k not in drop} for r in rows]
            return rows
        if level == "layer":
            return layer_records(self.figures, self.comparison.scope, self._layer())
        raise UsageError(f"a Report's level is tensor or layer, got {level!r}")

    def scalars(self, tensors: bool = True) -> dict[str, float]:
        """A flat dict of named figures for any metrics logger (torchdiff.figures.scalars)."""
        return scalars(self.figures, self.comparison.scope, self._layer(), self.analyses, tensors=tensors)

    @without_gc
    def to_dict(self) -> list[dict[str, Any]]:
        return to_items(self)


@dataclass(frozen=True, eq=False, repr=False)
class SeriesReport(_Family):
    """The result of ``compare_series``: one Report per consecutive pair, plus the series
    analyses. Iterates over the step Reports."""

    checkpoints: tuple[str, ...]
    labels: tuple[str, ...]
    steps: tuple[Report, ...]
    series_analyses: tuple[AnalysisResult, ...]
    order: str = "given"
    base: str | None = None
    notes: tuple[str, ...] = ()

    kind = "series"

    def __repr__(self) -> str:
        return f"<SeriesReport {len(self.checkpoints)} checkpoints, {len(self.steps)} steps, order {self.order}>"

    @property
    def analyses(self) -> tuple[AnalysisResult, ...]:  # type: ignore[override]
        """The series analyses, then every step's (so a CI gate tripped in any step is seen)."""
        return self.series_analyses + tuple(a for step in self.steps for a in step.analyses)

    def step_analysis(self, name: str, step: int) -> AnalysisResult | None:
        return self.steps[step].analysis(name)

    @property
    def has_differences(self) -> bool:
        return any(step.has_differences for step in self.steps)

    def __iter__(self) -> Iterator[Report]:
        return iter(self.steps)

    def __len__(self) -> int:
        """The number of steps, as iteration yields (one fewer than the checkpoints)."""
        return len(self.steps)

    def records(self, level: str = "step") -> list[dict[str, Any]]:
        """Plain rows: ``"step"`` one per step (its global figures and counts), ``"layer"``
        one per (step, layer), ``"tensor"`` one per (step, tensor)."""
        if level not in ("step", "layer", "tensor"):
            raise UsageError(f"a SeriesReport's level is step, layer or tensor, got {level!r}")
        rows = []
        for t, step in enumerate(self.steps):
            base = {"step": t, "old": self.labels[t], "new": self.labels[t + 1]}
            if level == "step":
                layer = step.records("layer")
                s = step.scalars(tensors=False)
                rows.append({**base, **{k.removeprefix("torchdiff/"): v for k, v in s.items()
                                        if "/" not in k.removeprefix("torchdiff/")}, "layers": len(layer)})
            else:
                rows += [{**base, **r} for r in step.records(level)]
        return rows

    def scalars(self, tensors: bool = False) -> dict[str, float]:
        """The last step's scalars (as a Report's), plus the series analyses' numeric
        headline figures as ``torchdiff/<analysis>/<key>``."""
        out = self.steps[-1].scalars(tensors=tensors) if self.steps else {}
        for a in self.series_analyses:
            for key, value in a.headline.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    out[f"torchdiff/{a.name}/{key}"] = float(value)
        return out

    def to_dict(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = [{
            "type": "series", "path": "", "checkpoints": list(self.checkpoints), "order": self.order,
            "base": self.base, "notes": list(self.notes),
        }]
        for t, step in enumerate(self.steps):
            comp = step.comparison
            items.append({
                "type": "series_step", "path": f"{self.labels[t]} -> {self.labels[t + 1]}", "step": t,
                "old": comp.old_name, "new": comp.new_name, "has_differences": step.has_differences,
                "counts": comp.counts(), "metadata_changed": len(comp.metadata_diffs),
            })
            for a in step.analyses:
                items.append({**a.to_dict(), "step": t})
        for a in self.series_analyses:
            items.append(a.to_dict())
        return finite_json(items)

    def render(self, fmt: str = "text", color: bool = False, indent: int | None = 2) -> str:
        return render(self, fmt, color=color, indent=indent)
