"""--report FILE.html, --plots DIR, --spectra K and the histograms behind them.

The page is opened in a real headless Chromium (Debian's package; ./scripts/setup
installs it when absent and it can): no console message, no request, every chart
drawn, a screenshot that is not blank, and the top layer's share in the page equal to
the JSON's. The data payload has a golden file; histograms and spectra are checked
against NumPy.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from helpers import GOLDEN, UPDATE_GOLDEN, one_thread  # noqa: F401  (autouse fixture)
from torchdiff import compare
from torchdiff.cli import main
from torchdiff.histograms import BINS, histogram, top_changed
from torchdiff.render.html import payload, read_payload, render_html, write_html
from torchdiff.spectra import spectrum

REPO = Path(__file__).resolve().parent.parent
HIDDEN, INTER, VOCAB, BLOCKS = 16, 32, 40, 3


# ---- checkpoints ----------------------------------------------------------------------------------

def llama_like(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {"model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=g)}
    for i in range(BLOCKS):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{name}.weight"] = torch.randn(HIDDEN, HIDDEN, generator=g) * 0.2
        sd[p + "mlp.gate_proj.weight"] = torch.randn(INTER, HIDDEN, generator=g) * 0.2
        sd[p + "mlp.up_proj.weight"] = torch.randn(INTER, HIDDEN, generator=g) * 0.2
        sd[p + "mlp.down_proj.weight"] = torch.randn(HIDDEN, INTER, generator=g) * 0.2
        sd[p + "input_layernorm.weight"] = torch.ones(HIDDEN)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(HIDDEN)
    sd["model.norm.weight"] = torch.ones(HIDDEN)
    sd["lm_head.weight"] = torch.randn(VOCAB, HIDDEN, generator=g) * 0.2
    return sd


def fine_tuned(sd: dict[str, torch.Tensor], step: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """Block 1's MLP moves most, with a rank-2 update to its down projection."""
    g = torch.Generator().manual_seed(seed + step)
    out = {}
    for k, v in sd.items():
        scale = 0.01 * step
        if "layers.1.mlp" in k:
            scale *= 8
        out[k] = v + scale * torch.randn(v.shape, generator=g)
    u = torch.randn(HIDDEN, 2, generator=g)
    w = torch.randn(2, INTER, generator=g)
    out["model.layers.1.mlp.down_proj.weight"] = sd["model.layers.1.mlp.down_proj.weight"] + 0.05 * step * (u @ w)
    return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("report")
    base = llama_like()
    paths = {"base": d / "base.safetensors"}
    save_file(base, str(paths["base"]))
    for step in (1, 2, 3):
        paths[f"step{step}"] = d / f"step{step}.safetensors"
        save_file(fine_tuned(base, step), str(paths[f"step{step}"]))
    return paths


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# ---- the browser ----------------------------------------------------------------------------------

_BROWSER_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-default-apps",
    "--disable-domain-reliability", "--disable-client-side-phishing-detection",
    "--disable-features=Translate,OptimizationHints,MediaRouter,AutofillServerCommunication",
    "--host-resolver-rules=MAP * ~NOTFOUND",  # a request the page made could not leave the machine anyway
]
# The browser's own housekeeping (update checks, clock, account probe), not the page's.
_BROWSER_HOSTS = re.compile(r"^https?://([a-z0-9-]+\.)*(google\.com|googleapis\.com|gvt1\.com|gstatic\.com)[:/]")


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no Chromium: ./scripts/setup installs Debian's chromium when run as root with apt-get "
                "(apt-get install -y chromium); the browser checks are skipped without it")


def open_page(page: Path, work: Path) -> dict:
    """Load ``page`` headless: its DOM after the scripts ran, the console messages and the
    URLs the browser requested (from its net log, housekeeping hosts left out)."""
    exe = chromium()
    profile, netlog = work / "profile", work / "net.json"
    proc = subprocess.run(
        [exe, *_BROWSER_FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
         f"--log-net-log={netlog}", "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=180)
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    urls = set(re.findall(r'"url":"([^"]+)"', netlog.read_text(errors="replace"))) if netlog.exists() else set()
    requests = sorted(u for u in urls if not u.startswith(("file:", "data:", "about:", "chrome"))
                      and not _BROWSER_HOSTS.match(u))
    return {"dom": proc.stdout, "console": console, "requests": requests, "returncode": proc.returncode}


def screenshot(page: Path, out: Path, work: Path, size: str = "1280,1600") -> Path:
    exe = chromium()
    subprocess.run([exe, *_BROWSER_FLAGS, f"--user-data-dir={work / 'profile-shot'}", f"--window-size={size}",
                    "--virtual-time-budget=5000", f"--screenshot={out}", page.as_uri()],
                   capture_output=True, text=True, timeout=180)
    assert out.exists(), "Chromium wrote no screenshot"
    return out


def body_attr(dom: str, name: str) -> str | None:
    m = re.search(r"<body[^>]*\s" + name + r'="([^"]*)"', dom)
    return m.group(1) if m else None


def charts(dom: str) -> list[tuple[str, str | None]]:
    """(data-chart, data-rendered) of every chart container."""
    out = []
    for tag in re.findall(r"<div[^>]*class=\"chart\"[^>]*>", dom):
        name = re.search(r'data-chart="([^"]*)"', tag)
        rendered = re.search(r'data-rendered="([^"]*)"', tag)
        out.append((name.group(1) if name else "?", rendered.group(1) if rendered else None))
    return out


@pytest.fixture(scope="module")
def compare_page(ckpts, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("page")
    page = work / "report.html"
    argv = [ckpts["base"], ckpts["step3"], "--all", "--spectra", "2", "--report", page]
    assert main([str(a) for a in argv]) == 0
    items = json.loads(subprocess_free_json([ckpts["base"], ckpts["step3"], "--all"]))
    return {"page": page, "work": work, "items": items}


def subprocess_free_json(argv) -> str:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main([str(a) for a in argv] + ["--output", "json"]) == 0
    return buf.getvalue()


def test_page_in_chromium(compare_page):
    page, work, items = compare_page["page"], compare_page["work"], compare_page["items"]
    seen = open_page(page, work)
    dom = seen["dom"]
    assert body_attr(dom, "data-ready") == "1", dom[-2000:]
    assert body_attr(dom, "data-errors") is None
    assert seen["console"] == []
    assert seen["requests"] == []
    drawn = charts(dom)
    data = read_payload(page.read_text())
    expected = 3 + 2 * len(data["histograms"]) + len(data["spectra"]) + 2  # layers, histograms, spectra, sqnr
    assert len(drawn) == expected == int(body_attr(dom, "data-charts"))
    assert all(r is not None and int(r) > 0 for _, r in drawn), drawn
    # The top layer's share shown in the page is layer_impact's, as in the JSON output.
    impact = next(it for it in items if it["type"] == "layer_impact")
    top = re.search(r'<p id="top-layer">top layer: <code>([^<]*)</code>, share <span[^>]*data-value="([^"]*)"[^>]*>([^<]*)<',
                    dom)
    assert top is not None
    assert top.group(1) == impact["top_layer"] == "model.layers.1"
    assert float(top.group(2)) == impact["top_share"]
    assert top.group(3) == f"{100 * impact['top_share']:.2f} %"
    bar = re.search(r'class="bar-value" data-label="model.layers.1" data-value="([^"]*)"[^>]*>([^<]*)<', dom)
    assert float(bar.group(1)) == impact["top_share"] and bar.group(2) == top.group(3)
    # The exact command is in the page.
    assert "--spectra 2 --report" in dom


@pytest.fixture(scope="module")
def demo_page(tmp_path_factory) -> Path:
    """The report ./scripts/demo writes, on the demo's checkpoints."""
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import make_checkpoints
    finally:
        sys.path.pop(0)
    d = tmp_path_factory.mktemp("demo")
    make_checkpoints.main(str(d))
    argv = ["step_000.safetensors", "step_200.safetensors", "--all", "--spectra", "4", "--report", "report.html",
            "--output", "json"]  # as ./scripts/demo runs it, from the folder of the files
    import contextlib
    import io

    here = os.getcwd()
    os.chdir(d)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            assert main(argv) == 0
    finally:
        os.chdir(here)
    return d / "report.html"


def test_demo_page_screenshot_not_blank(demo_page, tmp_path):
    from PIL import Image

    seen = open_page(demo_page, tmp_path)
    assert body_attr(seen["dom"], "data-ready") == "1" and seen["console"] == []
    shot = screenshot(demo_page, tmp_path / "shot.png", tmp_path)
    img = Image.open(shot).convert("RGB")
    small = np.asarray(img.resize((160, 200))).reshape(-1, 3)
    colours = len(np.unique(small, axis=0))
    assert colours > 40, f"screenshot looks blank ({colours} colours)"
    assert np.asarray(img, dtype=np.float64).std() > 20
    if UPDATE_GOLDEN:  # the README's picture: the top of the demo report, small
        img.crop((0, 0, 1280, 1600)).resize((800, 1000), Image.LANCZOS).quantize(colors=256).save(
            REPO / "docs" / "report.png", optimize=True)


def test_checker_sees_a_request(compare_page, tmp_path):
    """The browser check can fail: the same page plus one <img> from the network."""
    text = compare_page["page"].read_text()
    bad = tmp_path / "bad.html"
    bad.write_text(text.replace("<main id=\"main\">", '<main id="main"><img src="http://example.invalid/x.png">'))
    seen = open_page(bad, tmp_path)
    assert seen["console"], "a blocked request must show on the console"


def test_series_page_in_chromium(ckpts, tmp_path, capsys):
    page = tmp_path / "series.html"
    code, _, err = run_cli(["series", ckpts["step1"], ckpts["step2"], ckpts["step3"], "--base", ckpts["base"],
                            "--convergence-analysis", "--similarity-matrix", "--report", page], capsys)
    assert code == 0 and f"report written to {page}" in err
    seen = open_page(page, tmp_path)
    assert body_attr(seen["dom"], "data-ready") == "1"
    assert seen["console"] == [] and seen["requests"] == []
    names = [n for n, r in charts(seen["dom"]) if r is not None and int(r) > 0]
    assert names == ["series-update-norm", "series-rel-update", "series-step-layer", "series-similarity",
                     "series-task-vectors"]
    data = read_payload(page.read_text())
    assert data["series"]["convergence"]["status"] in seen["dom"]


def test_inspect_page_has_histograms(ckpts, tmp_path, capsys):
    page = tmp_path / "inspect.html"
    code, _, _ = run_cli(["inspect", ckpts["base"], "--anomaly-detection", "--report", page], capsys)
    assert code == 0
    data = read_payload(page.read_text())
    assert data["kind"] == "inspect" and data["anomalies"] is not None
    largest = sorted(llama_like().items(), key=lambda kv: (-kv[1].numel(), kv[0]))
    assert [h["tensor"] for h in data["histograms"]] == [k for k, _ in largest[:len(data["histograms"])]]
    h = data["histograms"][0]
    values = llama_like()[h["tensor"]].numpy().astype(np.float64)
    ref, _ = np.histogram(values, bins=BINS, range=(values.min(), values.max()))
    assert h["new"] == ref.tolist()


# ---- the payload -----------------------------------------------------------------------------------

def _close(a, b, path="") -> None:
    if isinstance(a, float) or isinstance(b, float):
        assert isinstance(a, (int, float)) and isinstance(b, (int, float)), f"{path}: {a!r} != {b!r}"
        assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9), f"{path}: {a!r} != {b!r}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def _stable(data: dict, root: Path) -> dict:
    text = json.dumps(data).replace(str(root) + "/", "")
    out = json.loads(text)
    out["torchdiff"] = "<version>"
    for key in ("old_file_bytes", "new_file_bytes"):
        out["summary"][key] = "<bytes>" if out["summary"].get(key) is not None else None
    out["summary"]["device"] = "<device>"
    return out


def test_payload_golden(ckpts):
    report = compare(ckpts["base"], ckpts["step3"], device="cpu", histograms=3, spectra=2,
                     analyses=["show_layer_impact", "anomaly_detection", "quantization_analysis"])
    data = _stable(payload(report, command="torchdiff base.safetensors step3.safetensors"), ckpts["base"].parent)
    golden = GOLDEN / "report_payload.json"
    if UPDATE_GOLDEN:
        golden.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    assert golden.exists(), "run with TORCHDIFF_UPDATE_GOLDEN=1 to write tests/golden/report_payload.json"
    _close(data, json.loads(golden.read_text()))


def test_payload_numbers_are_the_json_numbers(ckpts):
    report = compare(ckpts["base"], ckpts["step2"], device="cpu", show_layer_impact=True)
    data = payload(report)
    items = report.to_dict()
    by_path = {it["path"]: it for it in items if it["type"].startswith("tensor_")}
    cols = data["tensors"]["columns"]
    assert len(data["tensors"]["rows"]) == len(by_path)
    for row in data["tensors"]["rows"]:
        rec = dict(zip(cols, row))
        for key in ("l2", "rel_l2", "cosine", "max_abs", "changed_fraction"):
            assert rec[key] == by_path[rec["name"]][key]
    impact = next(it for it in items if it["type"] == "layer_impact")
    assert {r["layer"]: r["share"] for r in data["layers"]["rows"]} == {r["layer"]: r["share"] for r in impact["layers"]}
    for r in data["layers"]["rows"]:  # group sums = layer_impact's rel_l2 (same formula, same sums)
        ref = next(x for x in impact["layers"] if x["layer"] == r["layer"])
        assert math.isclose(r["rel_l2"], ref["rel_l2"], rel_tol=1e-12)
    # The heatmap's cells: float64 group sums over the module's tensors.
    sd_old, sd_new = llama_like(), fine_tuned(llama_like(), 2)
    hm = data["heatmap"]
    i, j = hm["rows"].index("model.layers.1"), hm["columns"].index("mlp_down")
    a = sd_old["model.layers.1.mlp.down_proj.weight"].double()
    b = sd_new["model.layers.1.mlp.down_proj.weight"].double()
    assert math.isclose(hm["rel_l2"][i][j], float((b - a).norm() / a.norm()), rel_tol=1e-5)
    assert math.isclose(hm["cosine"][i][j], float((a * b).sum() / a.norm() / b.norm()), rel_tol=1e-6)


def test_script_json_cannot_break_out(tmp_path):
    evil = "</script><script>alert(1)</script><!--"
    report = compare({evil: torch.zeros(3)}, {evil: torch.ones(3)}, device="cpu")
    text = render_html(report)
    assert "<script>alert(1)" not in text
    assert read_payload(text)["tensors"]["rows"][0][0] == evil


def test_report_to_html_writes_the_page(ckpts, tmp_path):
    report = compare(ckpts["base"], ckpts["step1"], device="cpu")
    out = write_html(report, tmp_path / "r.html")
    text = Path(out).read_text()
    assert text.startswith("<!DOCTYPE html>") and "Content-Security-Policy" in text
    assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text


# ---- histograms and spectra against NumPy -------------------------------------------------------

finite_floats = st.floats(-1e6, 1e6, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(finite_floats, st.just(float("nan")), st.just(float("inf"))), min_size=1, max_size=300),
       st.integers(1, 70))
def test_histogram_equals_numpy(values, bins):
    x = torch.tensor(values, dtype=torch.float32)
    finite = x[torch.isfinite(x)].double().numpy()
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    counts, left_out = histogram(x, lo, hi, bins)
    ref, _ = np.histogram(finite, bins=bins, range=(lo - 0.5, hi + 0.5) if lo == hi else (lo, hi))
    assert counts == ref.tolist()
    assert left_out == x.numel() - finite.size


def test_hook_histograms_equal_numpy(ckpts):
    report = compare(ckpts["base"], ckpts["step1"], device="cpu", histograms=4)
    names = top_changed(list(report.comparison.diffs), 4)
    got = {d.name: d.extras["histogram"] for d in report if "histogram" in d.extras}
    assert list(got) and sorted(got) == sorted(names)
    old, new = llama_like(), fine_tuned(llama_like(), 1)
    for name, h in got.items():
        a, b = old[name].numpy(), new[name].numpy()
        lo, hi = min(a.min(), b.min()), max(a.max(), b.max())
        assert h["range"] == [float(lo), float(hi)]
        for side, v in (("old", a), ("new", b)):
            assert h[side] == np.histogram(v.astype(np.float64), bins=BINS, range=(lo, hi))[0].tolist()
        delta = (b - a).astype(np.float64)  # float32 Δ, as the engine forms it
        m = float(np.abs(delta).max())
        assert h["delta_range"] == [-m, m]
        assert h["delta"] == np.histogram(delta, bins=BINS, range=(-m, m))[0].tolist()
        assert h["delta_left_out"] == 0 and sum(h["delta"]) == a.size


def test_top_changed_ranks_like_the_sort():
    report = compare({"a": torch.ones(4), "b": torch.zeros(4), "c": torch.ones(4), "d": torch.ones(4)},
                     {"a": torch.ones(4) * 2, "b": torch.ones(4), "c": torch.ones(4) * 1.5, "d": torch.ones(4)},
                     device="cpu")
    # zero-initialised b (rel_l2 = ∞) after the measured ones, as --sort-by-change-magnitude; d unchanged: out
    assert top_changed(list(report.comparison.diffs), 5) == ["a", "c", "b"]
    assert top_changed(list(report.comparison.diffs), 2) == ["a", "c"]


def test_spectrum_exact_equals_numpy():
    g = torch.Generator().manual_seed(3)
    delta = torch.randn(24, 40, generator=g)
    s = spectrum(delta)
    ref = np.linalg.svd(delta.double().numpy(), compute_uv=False)
    assert s["method"] == "exact"
    np.testing.assert_allclose(s["singular_values"], ref, rtol=1e-10)
    e = ref**2 / (ref**2).sum()
    assert s["rank90"] == int(np.searchsorted(np.cumsum(e), 0.90) + 1)
    np.testing.assert_allclose(s["energy"]["4"], np.cumsum(e)[3], rtol=1e-10)
    p = ref / ref.sum()
    np.testing.assert_allclose(s["effective_rank"], np.exp(-(p * np.log(p)).sum()), rtol=1e-10)


def test_spectrum_randomized_finds_a_low_rank_update():
    g = torch.Generator().manual_seed(4)
    delta = torch.randn(600, 3, generator=g) @ torch.randn(3, 700, generator=g)  # min dim > EXACT_MAX_DIM
    s = spectrum(delta)
    ref = np.linalg.svd(delta.double().numpy(), compute_uv=False)
    assert s["method"] == "randomized" and s["rank99"] <= 3
    np.testing.assert_allclose(s["singular_values"][:3], ref[:3], rtol=1e-4)


def test_report_spectra_for_the_top_matrices(ckpts):
    report = compare(ckpts["base"], ckpts["step3"], device="cpu", spectra=1)
    found = {d.name: d.extras["spectrum"] for d in report if "spectrum" in d.extras}
    assert list(found) == top_changed(list(report.comparison.diffs), 1, ndim=2)


# ---- the command line ------------------------------------------------------------------------------

def test_report_into_a_missing_folder_is_one_line(ckpts, tmp_path, capsys):
    code, out, err = run_cli([ckpts["base"], ckpts["step1"], "--report", tmp_path / "no" / "r.html"], capsys)
    assert code == 2 and out == ""
    assert err.startswith("torchdiff: error: --report") and err.count("\n") == 1


def test_report_never_overwrites_an_input(ckpts, capsys):
    before = ckpts["step1"].read_bytes()
    code, _, err = run_cli([ckpts["base"], ckpts["step1"], "--report", ckpts["step1"]], capsys)
    assert code == 2 and "is an input" in err
    assert ckpts["step1"].read_bytes() == before


def test_spectra_needs_a_report(ckpts, capsys):
    code, _, err = run_cli([ckpts["base"], ckpts["step1"], "--spectra", "3"], capsys)
    assert code == 2 and "--report" in err


def test_quiet_with_report_still_writes(ckpts, tmp_path, capsys):
    page = tmp_path / "q.html"
    code, out, err = run_cli([ckpts["base"], ckpts["step1"], "-q", "--report", page], capsys)
    assert code == 1 and out == "" and err == "" and page.exists()


def test_plots_have_stable_names_and_bytes(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    g = torch.Generator().manual_seed(0)
    old = {"h.0.attn.q_proj.weight": torch.randn(8, 8, generator=g), "h.0.ln_1.weight": torch.ones(8)}
    new = {k: v + 0.1 for k, v in old.items()}
    save_file(old, str(tmp_path / "a.safetensors"))
    save_file(new, str(tmp_path / "b.safetensors"))
    first, second = tmp_path / "p1", tmp_path / "p2"
    for d in (first, second):
        code, _, err = run_cli([tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--plots", d], capsys)
        assert code == 0 and "14 plots written" in err
    names = sorted(os.listdir(first))
    assert names == sorted(os.listdir(second))
    stems = sorted({n.rsplit(".", 1)[0] for n in names})
    assert stems == ["hist_01_h.0.ln_1.weight", "hist_02_h.0.attn.q_proj.weight", "layer_module_changed_fraction",
                     "layer_module_cosine", "layer_module_rel_l2", "layer_rel_l2", "layer_share"]
    for n in names:
        if n.endswith(".svg"):
            assert (first / n).read_bytes() == (second / n).read_bytes(), n
        else:
            assert (first / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_import_stays_lean():
    code = ("import sys, torchdiff, torchdiff.histograms, torchdiff.render.html; "
            "print(any(m in sys.modules for m in ('matplotlib', 'tensorboard', 'wandb')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.strip() == "False", proc.stderr


def test_report_to_html_method_writes_the_page(tmp_path):
    import torch

    import torchdiff

    report = torchdiff.compare({"l.w": torch.ones(4)}, {"l.w": torch.arange(4.0)}, show_layer_impact=True)
    path = report.to_html(tmp_path / "r.html")
    text = open(path, encoding="utf-8").read()
    assert text.startswith("<!DOCTYPE html>") or text.lower().startswith("<!doctype html>")
    assert "l.w" in text


def test_tensor_table_opens_most_changed_first():
    """The tensor table's rows come in the one "most changed" order: a zero-initialised
    tensor (rel_l2 = ∞ by definition) after the measured ones, by ‖Δ‖, not first; an
    unchanged tensor last (the file order here is the other way round)."""
    old = {"a.bias": torch.zeros(8), "b.weight": torch.ones(4, 4), "c.weight": torch.ones(4, 4),
           "d.weight": torch.ones(2)}
    new = {"a.bias": torch.full((8,), 0.5), "b.weight": torch.ones(4, 4) * 1.01, "c.weight": torch.ones(4, 4) * 1.5,
           "d.weight": torch.ones(2)}
    data = payload(compare(old, new, device="cpu"))
    names = [row[0] for row in data["tensors"]["rows"]]
    assert names == ["c.weight", "b.weight", "a.bias", "d.weight"]


# ---- the payload from the columns ------------------------------------------------------------------

def every_status() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A pair with every status and the awkward values: a zero-initialised bias, NaN and
    ±Inf, an all-zero tensor on both sides, an empty and a 0-d tensor, bf16 → f32, ints."""
    g = torch.Generator().manual_seed(3)
    old = {"emb.weight": torch.randn(10, 4, generator=g), "h.0.attn.q_proj.weight": torch.randn(4, 4, generator=g),
           "h.0.attn.q_proj.bias": torch.zeros(4), "h.0.mlp.fc1.weight": torch.randn(8, 4, generator=g),
           "h.0.ln.weight": torch.ones(4), "h.1.attn.q_proj.weight": torch.randn(4, 4, generator=g),
           "h.1.mlp.fc1.weight": torch.randn(8, 4, generator=g), "empty": torch.zeros(0), "scalar": torch.tensor(1.5),
           "count": torch.tensor(3), "nan.w": torch.tensor([1.0, float("nan"), 2.0]), "inf.w": torch.tensor([1.0, 2.0]),
           "same.w": torch.randn(3, generator=g), "allzero.w": torch.zeros(3), "gone.w": torch.randn(2, generator=g),
           "shape.w": torch.randn(2, 2, generator=g), "bf.w": torch.randn(4, generator=g).bfloat16()}
    new = {k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype) if v.is_floating_point() else v
           for k, v in old.items()}
    new.update({"same.w": old["same.w"].clone(), "allzero.w": torch.zeros(3),
                "h.0.attn.q_proj.bias": torch.full((4,), 0.2), "inf.w": torch.tensor([1.0, float("inf")]),
                "shape.w": torch.randn(4, generator=g), "new.w": torch.randn(5, generator=g),
                "bf.w": old["bf.w"].float() * 1.01, "count": torch.tensor(4), "emb.weight": old["emb.weight"] * 0})
    del new["gone.w"]
    return old, new


def inspect_file(path, **options):
    from torchdiff import inspect

    return inspect(str(path), device="cpu", **options)


def test_page_makes_no_object_per_tensor(ckpts, monkeypatch):
    """The histograms' choice and the whole payload read the Figures columns: no
    TensorDiff is made per tensor (for 20,000 tensors that cost seconds; docs/REPORT.md)."""
    from torchdiff.figures import Figures

    made = []
    make = Figures._make
    monkeypatch.setattr(Figures, "_make", lambda self, i: made.append(self.names[i]) or make(self, i))
    report = compare(ckpts["base"], ckpts["step3"], device="cpu", histograms=3, spectra=2, show_layer_impact=True)
    data = read_payload(render_html(report))
    assert len(data["histograms"]) == 3 and len(data["spectra"]) == 2 and len(data["tensors"]["rows"]) == 30
    data = read_payload(render_html(inspect_file(ckpts["step1"], histograms=2)))
    assert len(data["histograms"]) == 2 and len(data["tensors"]["rows"]) == 30
    assert made == []


def test_table_order_and_top_changed_are_the_sort_analysis():
    """The table's row order is sort_by_change_magnitude.order and top_changed ranks as
    its change_key does, with every status and NaN, ∞ and zero-initialised tensors."""
    from torchdiff.analyses.sort_by_change_magnitude import change_key, order

    report = compare(*every_status(), device="cpu")
    comp = report.comparison
    rows = payload(report)["tensors"]["rows"]
    assert [row[0] for row in rows] == order(comp, {})
    diffs = list(comp.diffs)
    ranked = sorted((d for d in diffs if d.status in ("changed", "retyped") and d.metrics is not None
                     and d.metrics.numel > 0), key=change_key)
    assert top_changed(comp.figures, len(diffs)) == [d.name for d in ranked]
    assert top_changed(diffs, 3) == [d.name for d in ranked[:3]]
    # each row's figures are the JSON output's, value for value (NaN and ∞ as its strings)
    items = {it["path"]: it for it in report.to_dict() if it["type"].startswith("tensor_")}
    for row in rows:
        if row[0] in items and "l2" in items[row[0]]:
            assert row[7:12] == [items[row[0]][k] for k in ("l2", "rel_l2", "cosine", "max_abs", "changed_fraction")]


def test_inspect_with_pictures_keeps_its_order_and_status(tmp_path):
    """Choosing the histograms made a TensorDiff per tensor before inspect set every
    status to present: the stale 'added' views reordered the sorted output once
    --report was given (a tensor without a histogram was sorted as an added one)."""
    path = tmp_path / "one.safetensors"
    save_file({"a.weight": torch.randn(8, 8), "b.weight": torch.randn(2, 2), "c.weight": torch.randn(4, 4),
               "steps": torch.arange(3)}, str(path))
    plain = inspect_file(path, sort_by_change_magnitude=True)
    pictured = inspect_file(path, sort_by_change_magnitude=True, histograms=1)
    assert [d.name for d in pictured] == [d.name for d in plain] == ["a.weight", "b.weight", "c.weight", "steps"]
    assert {d.status for d in pictured} == {"present"}
    assert [h["tensor"] for h in payload(pictured)["histograms"]] == ["a.weight"]


MODULE_NAMES = [
    "model.layers.3.self_attn.q_proj.weight", "model.layers.12.mlp.down_proj.weight", "model.embed_tokens.weight",
    "transformer.h.0.attn.c_attn.weight", "transformer.h.11.mlp.c_proj.weight", "transformer.h.1.attn.c_proj.bias",
    "bert.encoder.layer.5.attention.output.dense.weight", "bert.encoder.layer.5.output.dense.weight",
    "encoder/block/0/layer/1/DenseReluDense/wi_0/kernel", "encoder.block.2.layer.1.DenseReluDense.wi_1.weight",
    "blk.7.attn_q.weight", "blk.7.ffn_down.weight", "token_embd.weight", "output.weight",
    "decoder.layers.0.self_attention.linear_qkv.weight", "decoder.layers.3.mlp.linear_fc1.weight",
    "blocks.0.attn.qkv.weight", "blocks.10.mlp.fc2.weight", "0.weight", "layers.0.0.weight", "seq.2.1.norm.weight",
    "params/Dense_0/kernel", "params/layers_3/mlp/kernel", "enc:4:ln_1:weight", "transformer.layers.0.in_proj_weight",
    "optimizer.state.3.exp_avg", "model.layers.1.mlp.experts.7.w2.weight", "h.0.ln_1.weight", "norm.0.weight",
]


@pytest.mark.parametrize("name", MODULE_NAMES)
def test_module_type_never_reads_a_block_number(name):
    """The payload asks names.module_type once per name with its number components
    replaced (_module_types): valid while module_type does not read them."""
    from torchdiff.names import module_type
    from torchdiff.render.html import _NUMBER_PART, _module_types

    for number in ("0", "7", "123"):
        assert module_type(_NUMBER_PART.sub(number, name)) == module_type(name)
    assert _module_types([_NUMBER_PART.sub("9", name), name]) == [module_type(name)] * 2


def test_quantization_carries_the_tensors_its_bars_show():
    """The SQNR-per-tensor bars show the 60 lowest finite SQNR; the payload carries those,
    in the analysis' order. Every tensor's SQNR stays in the table's sqnr_db column."""
    from torchdiff.render.html import QUANT_TENSORS_SHOWN

    g = torch.Generator().manual_seed(5)
    old = {f"blocks.{i}.w": torch.randn(16, generator=g) for i in range(80)}
    new = {k: v + (0.001 * (i + 1)) * torch.randn(16, generator=g) for i, (k, v) in enumerate(old.items())}
    new["blocks.0.w"] = old["blocks.0.w"].clone()  # SQNR +∞: not drawn
    report = compare(old, new, device="cpu", quantization_analysis=True)
    data = payload(report)
    item = next(it for it in report.to_dict() if it["type"] == "quantization_analysis")
    finite = [t for t in item["tensors"] if isinstance(t["sqnr_db"], float)]
    shown = {t["tensor"] for t in sorted(finite, key=lambda t: t["sqnr_db"])[:QUANT_TENSORS_SHOWN]}
    assert [t["tensor"] for t in data["quantization"]["tensors"]] == [t["tensor"] for t in item["tensors"]
                                                                       if t["tensor"] in shown]
    assert len(shown) == QUANT_TENSORS_SHOWN == 60 and "blocks.0.w" not in shown
    cols = data["tensors"]["columns"]
    sqnr = {row[0]: row[cols.index("sqnr_db")] for row in data["tensors"]["rows"]}
    assert sqnr == {t["tensor"]: t["sqnr_db"] for t in item["tensors"]}


def test_many_layers_draw_the_largest_shares_and_say_how_many_there_are():
    """500 one-tensor layers: the charts drew a bar and a heatmap row each (20,000 such
    layers made a chart 320,000 pixels tall). They draw the LAYER_ROWS of largest share of
    ‖Δ‖², in the layers' order, and say of how many; each share is the float64 one."""
    from torchdiff.render.html import LAYER_ROWS

    g = torch.Generator().manual_seed(0)
    n = LAYER_ROWS + 300
    old = {f"m{i}.w": torch.randn(10, generator=g) for i in range(n)}
    new = {k: v + 0.01 * (1 + (i * 37) % n) * torch.randn(10, generator=g) for i, (k, v) in enumerate(old.items())}
    data = payload(compare(old, new))
    rows = data["layers"]["rows"]
    assert len(rows) == LAYER_ROWS and data["layers"]["total"] == n
    assert len(data["heatmap"]["rows"]) == LAYER_ROWS
    dsq = {k: float(((new[k].double() - old[k].double()) ** 2).sum()) for k in old}
    total = sum(dsq.values())
    expected = sorted(dsq, key=lambda k: -dsq[k])[:LAYER_ROWS]
    assert {r["layer"] + ".w" for r in rows} == set(expected)
    assert [r["layer"] for r in rows] == sorted((r["layer"] for r in rows), key=lambda s: int(s[1:]))
    for r in rows:
        assert r["share"] == pytest.approx(dsq[r["layer"] + ".w"] / total, rel=1e-5)
    few = payload(compare({"a.w": torch.ones(2)}, {"a.w": torch.full((2,), 2.0)}))
    assert "total" not in few["layers"]
