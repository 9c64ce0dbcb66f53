"""Report -> one PNG and one SVG per chart, via matplotlib (``--plots DIR``; docs/REPORT.md).

The charts are those of the HTML report, drawn from the same payload
(``torchdiff.render.html.payload``), so every plotted number is a number of the page
and of the JSON. File names are stable (the chart's name, then the tensor's name for
per-tensor charts, characters outside ``[A-Za-z0-9._-]`` replaced by ``_``), so a
paper's figure keeps its name from run to run. SVGs carry no date and a fixed hash
salt: the same report gives the same bytes.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

from torchdiff.errors import MissingDependencyError, UsageError

DPI = 150
_SAFE = re.compile(r"[^A-Za-z0-9._-]")


def _num(v: Any) -> float:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    return {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}.get(v, math.nan)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise MissingDependencyError("--plots needs matplotlib (pip install 'torchdiff[report]' or matplotlib)") from None
    matplotlib.use("Agg", force=True)
    matplotlib.rcParams["svg.hashsalt"] = "torchdiff"
    import matplotlib.pyplot as plt

    return plt


def safe_name(text: str) -> str:
    return _SAFE.sub("_", text)[:120]


def write_plots(report, directory: str | os.PathLike, data: dict[str, Any] | None = None) -> list[str]:
    """Write every chart of ``report`` into ``directory`` (created if absent) as
    NAME.png and NAME.svg; returns the paths written, in order."""
    from torchdiff.render.html import payload

    plt = _pyplot()
    directory = os.fspath(directory)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--plots {directory}: cannot create the folder ({e.strerror or e})") from None
    data = data if data is not None else payload(report)
    written: list[str] = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        for ext in ("png", "svg"):
            path = os.path.join(directory, f"{name}.{ext}")
            try:
                fig.savefig(path, dpi=DPI, metadata={"Date": None} if ext == "svg" else {"Software": "torchdiff"})
            except OSError as e:
                plt.close(fig)
                raise UsageError(f"--plots {path}: cannot write ({e.strerror or e})") from None
            written.append(path)
        plt.close(fig)

    def bars(name: str, labels: list[str], values: list[Any], xlabel: str, color: str) -> None:
        vals = [_num(v) for v in values]
        finite = [v for v in vals if math.isfinite(v)]
        top = max(finite, default=1.0)
        shown = [v if math.isfinite(v) else (top if v > 0 else 0.0) for v in vals]
        fig, ax = plt.subplots(figsize=(6.4, 0.8 + 0.22 * len(labels)))
        ax.barh(range(len(labels)), shown, color=color)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(xlabel)
        save(fig, name)

    def heat(name: str, rows: list, cols: list, matrix: list, label: str, log: bool = False,
             cmap: str = "viridis") -> None:
        import numpy as np

        m = np.array([[math.nan if v is None else _num(v) for v in r] for r in matrix], dtype=float)
        if log:
            with np.errstate(divide="ignore", invalid="ignore"):
                m = np.where(m > 0, np.log10(np.where(np.isfinite(m), m, np.nan)), np.nan)
            label = f"log10 {label}"
        fig, ax = plt.subplots(figsize=(1.8 + 0.4 * len(cols), 1.4 + 0.22 * len(rows)))
        im = ax.imshow(np.ma.masked_invalid(m), aspect="auto", cmap=cmap, interpolation="nearest")
        ax.set_xticks(range(len(cols)), [str(c) for c in cols], rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(rows)), [str(r) for r in rows], fontsize=7)
        fig.colorbar(im, ax=ax, label=label)
        save(fig, name)

    def lines(name: str, xlabels: list[str], values: list[Any], ylabel: str, log: bool = False) -> None:
        fig, ax = plt.subplots(figsize=(6.4, 3.2))
        ys = [_num(v) for v in values]
        ax.plot(range(len(ys)), ys, marker="o")
        ax.set_xticks(range(len(xlabels)), xlabels, rotation=30, ha="right", fontsize=7)
        if log and any(y > 0 for y in ys if math.isfinite(y)):
            ax.set_yscale("log")
        ax.set_ylabel(ylabel)
        save(fig, name)

    layers = data.get("layers")
    if layers and layers["rows"]:
        labels = [r["layer"] for r in layers["rows"]]
        bars("layer_share", labels, [r["share"] for r in layers["rows"]], "share of ‖Δ‖²", "#4b6fb5")
        bars("layer_rel_l2", labels, [r["rel_l2"] for r in layers["rows"]], "rel_l2", "#e0742b")
    hm = data.get("heatmap")
    if hm and hm["columns"]:
        heat("layer_module_rel_l2", hm["rows"], hm["columns"], hm["rel_l2"], "rel_l2", log=True)
        heat("layer_module_cosine", hm["rows"], hm["columns"], hm["cosine"], "cosine", cmap="viridis_r")
        heat("layer_module_changed_fraction", hm["rows"], hm["columns"], hm["changed_fraction"], "changed fraction")
    for i, h in enumerate(data.get("histograms", []), 1):
        import numpy as np

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 2.8))
        lo, hi = _num(h["range"][0]), _num(h["range"][1])
        edges = np.linspace(lo, hi, h["bins"] + 1) if hi > lo else np.linspace(lo - 0.5, hi + 0.5, h["bins"] + 1)
        for side, color in (("old", "#3b6fd8"), ("new", "#e0742b")):
            if side in h:
                ax1.stairs(h[side], edges, fill=True, alpha=0.5, color=color, label=side)
        ax1.set_title(f"{h['tensor']}: values", fontsize=8)
        ax1.legend(fontsize=7)
        if "delta" in h:
            d = _num(h["delta_range"][1])
            ax2.stairs(h["delta"], np.linspace(-d, d, h["bins"] + 1) if d > 0 else np.linspace(-0.5, 0.5, h["bins"] + 1),
                       fill=True, color="#2f9a6a")
            ax2.set_yscale("symlog")
            ax2.set_title("Δ = new − old", fontsize=8)
        else:
            ax2.axis("off")
        save(fig, f"hist_{i:02d}_{safe_name(h['tensor'])}")
    for i, s in enumerate(data.get("spectra", []), 1):
        if not s.get("singular_values"):
            continue
        fig, ax = plt.subplots(figsize=(5, 3))
        sv = s["singular_values"]
        ax.semilogy(range(1, len(sv) + 1), [_num(v) for v in sv], marker=".")
        ax.set_xlabel("index")
        ax.set_ylabel("σ of Δ")
        ax.set_title(f"{s['tensor']} ({s['method']})", fontsize=8)
        save(fig, f"spectrum_{i:02d}_{safe_name(s['tensor'])}")
    q = data.get("quantization")
    if q and q["layers"]:
        bars("sqnr_layers", [r["layer"] for r in q["layers"]], [r["sqnr_db"] for r in q["layers"]], "SQNR (dB)",
             "#7a5cc4")
    series = data.get("series")
    if series:
        conv = series.get("convergence")
        if conv:
            xl = [f"{series['labels'][t]}→{series['labels'][t + 1]}" for t in conv["steps"]]
            lines("series_update_norm", xl, conv["update_norm"], "update norm ‖θ_{t+1} − θ_t‖")
            lines("series_rel_update", xl, conv["rel_update"], "rel_update", log=True)
            if conv["layers"]:
                matrix = [[r[i] for r in conv["layer_rel_update"]] for i in range(len(conv["steps"]))]
                heat("series_step_layer_rel_update", xl, conv["layers"], matrix, "rel_update", log=True)
        sim = series.get("similarity")
        if sim and sim.get("cosine"):
            heat("series_similarity", sim["labels"], sim["labels"], sim["cosine"], "cosine")
            if sim.get("task_vector_cosine"):
                heat("series_task_vector_cosine", sim["labels"], sim["labels"], sim["task_vector_cosine"], "cosine")
    return written
