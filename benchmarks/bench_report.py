"""The HTML report: page size and load time, and the chart-library choice (docs/REPORT.md).

Every figure is measured in this run, in a headless Chromium (Debian's package):

1. torchdiff's page (hand-written SVG/JS, data embedded once) for a 7B-like report
   (32 blocks × 9 tensors + 3: 291 tensor names) and a 20,000-tensor report; size in
   bytes, and the page's own render time (``performance.now()`` when its script ends,
   from navigation start) beside a blank page's, both median of ``--runs`` loads;
2. the same charts of the 7B-like report (layer share and rel_l2 bars, the layer ×
   module heatmap, 12 overlaid histograms + 12 Δ histograms) as (a) plotly with
   plotly.js embedded once, (b) matplotlib SVGs inlined in one page; size and load.

Values do not matter for the page, only the number of tensors, layers and charts, so
the tensors are small (the 7B-like names and layout, 16 × 16 weights).

    python benchmarks/bench_report.py --runs 3
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torchdiff  # noqa: E402
from torchdiff.render.html import payload, render_html  # noqa: E402

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-default-apps", "--virtual-time-budget=20000"]


def seven_b_like(seed: int):
    g = torch.Generator().manual_seed(seed)
    sd = {"model.embed_tokens.weight": torch.randn(32, 16, generator=g)}
    for i in range(32):
        p = f"model.layers.{i}."
        for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            sd[p + n + ".weight"] = torch.randn(16, 16, generator=g)
        sd[p + "input_layernorm.weight"] = torch.randn(16, generator=g)
        sd[p + "post_attention_layernorm.weight"] = torch.randn(16, generator=g)
    sd["model.norm.weight"] = torch.randn(16, generator=g)
    sd["lm_head.weight"] = torch.randn(32, 16, generator=g)
    return sd


def many(seed: int, n: int = 20000):
    g = torch.Generator().manual_seed(seed)
    return {f"blocks.{i // 200}.unit.{i % 200}.weight": torch.randn(8, generator=g) for i in range(n)}


def drift(sd, seed: int):
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in sd.items()}


def load(page: Path, work: Path) -> tuple[float, float]:
    """(render ms reported by the page, wall seconds of the whole headless run)."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    started = time.perf_counter()
    proc = subprocess.run([exe, *FLAGS, f"--user-data-dir={work / 'profile'}", "--dump-dom", page.as_uri()],
                          capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - started
    m = re.search(r'data-render-ms="([0-9.]+)"', proc.stdout)
    return (float(m.group(1)) if m else float("nan")), wall


def median_load(page: Path, work: Path, runs: int) -> tuple[float, float]:
    got = [load(page, work) for _ in range(runs)]
    return statistics.median(g[0] for g in got), statistics.median(g[1] for g in got)


MARK = "<script>document.body.setAttribute('data-render-ms', String(Math.round(performance.now())));</script>"


def plotly_page(data: dict, out: Path) -> None:
    import plotly.graph_objects as go

    figs = []
    rows = data["layers"]["rows"]
    labels = [r["layer"] for r in rows]
    figs.append(go.Figure(go.Bar(x=[r["share"] for r in rows], y=labels, orientation="h")))
    figs.append(go.Figure(go.Bar(x=[r["rel_l2"] for r in rows], y=labels, orientation="h")))
    hm = data["heatmap"]
    figs.append(go.Figure(go.Heatmap(z=hm["rel_l2"], x=hm["columns"], y=hm["rows"])))
    for h in data["histograms"]:
        f = go.Figure()
        f.add_bar(y=h["old"], name="old", opacity=0.5)
        f.add_bar(y=h["new"], name="new", opacity=0.5)
        f.update_layout(barmode="overlay")
        figs.append(f)
        figs.append(go.Figure(go.Bar(y=h["delta"])))
    parts = [f.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, f in enumerate(figs)]
    out.write_text("<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>" + "".join(parts) + MARK
                   + "</body></html>")


def matplotlib_page(report, data: dict, out: Path, work: Path) -> int:
    from torchdiff.render.plots import write_plots

    written = write_plots(report, work / "mpl", data=data)
    svgs = [Path(p).read_text() for p in written if p.endswith(".svg")]
    body = "".join(re.sub(r"^<\?xml[^>]*>\s*(<!DOCTYPE[^>]*>)?", "", s) for s in svgs)
    out.write_text("<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>" + body + MARK + "</body></html>")
    return len(svgs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench_report_"))
    results = {}
    blank = work / "blank.html"
    blank.write_text("<!DOCTYPE html><html><body>" + MARK + "</body></html>")
    results["blank page"] = {"bytes": blank.stat().st_size, "render_ms_wall_s": median_load(blank, work, args.runs)}

    base = seven_b_like(0)
    report7 = torchdiff.compare(base, drift(base, 1), device="cpu", histograms=12, show_layer_impact=True,
                                anomaly_detection=True)
    page7 = work / "report_7b.html"
    page7.write_text(render_html(report7))
    results["torchdiff 7B-like (291 tensors)"] = {"bytes": page7.stat().st_size,
                                                  "render_ms_wall_s": median_load(page7, work, args.runs)}
    big = many(2)
    t = time.perf_counter()
    report20 = torchdiff.compare(big, drift(big, 3), device="cpu", histograms=12, show_layer_impact=True)
    page20 = work / "report_20k.html"
    t = time.perf_counter()
    page20.write_text(render_html(report20))
    write_s = time.perf_counter() - t
    results["torchdiff 20,000 tensors"] = {"bytes": page20.stat().st_size, "write_s": write_s,
                                           "render_ms_wall_s": median_load(page20, work, args.runs)}
    data7 = payload(report7)
    try:
        pp = work / "plotly_7b.html"
        plotly_page(data7, pp)
        results["plotly (plotly.js embedded once), same charts"] = {
            "bytes": pp.stat().st_size, "render_ms_wall_s": median_load(pp, work, args.runs)}
    except ImportError:
        results["plotly"] = "not installed (pip install plotly)"
    mp = work / "mpl_7b.html"
    t = time.perf_counter()
    n = matplotlib_page(report7, data7, mp, work)
    results[f"matplotlib SVG inlined ({n} SVGs), same charts"] = {
        "bytes": mp.stat().st_size, "draw_s": time.perf_counter() - t,
        "render_ms_wall_s": median_load(mp, work, args.runs)}
    print(json.dumps(results, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
