"""The command line and its outputs as a new user meets them (a sweep of README.md's
contract): tables that keep their own order, lines that fit, --top everywhere text is
printed, labels with their numbers, notes where an analysis cannot run, and one line on
stderr for an unreadable input. Figures are checked against float64 NumPy."""

from __future__ import annotations

import builtins
import io
import math
import os
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import torchdiff
from torchdiff.render.text import render_series_text, render_text, wrap
from helpers import run  # noqa: E402 - tests/ is on sys.path


def section(text: str, title: str) -> list[str]:
    """The body rows of one text table (after its header and dash rule)."""
    block = text.split(f"  {title}\n", 1)[1].split("\n\n")[0].splitlines()
    return [line for line in block[2:] if not line.startswith("  note:") and not line.startswith("  …")]


def save(path, tensors):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


# ---- tables in an order of their own keep it under --sort-by-change-magnitude ---------------


@pytest.fixture
def ranked_pair(tmp_path):
    """a.weight: the largest tensor, barely changed, gains a NaN (critical); b.weight:
    half its size, zeroed (high, rel_l2 = 1): sorted by change b comes first, while
    'Largest tensors' and 'Anomalies' list a first (by size, by severity) — alphabetical
    by chance."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(32, 8, generator=g), torch.randn(16, 8, generator=g)
    a2 = a + 1e-3 * torch.randn(32, 8, generator=g)
    a2[0, 0] = float("nan")
    old = save(tmp_path / "old.safetensors", {"a.weight": a, "b.weight": b})
    new = save(tmp_path / "new.safetensors", {"a.weight": a2, "b.weight": torch.zeros(16, 8)})
    return old, new


def test_top_tables_keep_their_order_under_the_sort(capsys, ranked_pair):
    code, out, _ = run(capsys, *ranked_pair, "--sort-by-change-magnitude", "--memory-analysis",
                       "--anomaly-detection")
    assert code == 0
    lines = [line for line in out.splitlines() if line.startswith("  ~ ")]
    assert lines[0].startswith("  ~ b.weight") and lines[1].startswith("  ~ a.weight")  # the sort ran
    largest = [row.split()[0] for row in section(out, "Largest tensors")]
    sizes = {"a.weight": np.zeros((32, 8), np.float32).nbytes, "b.weight": np.zeros((16, 8), np.float32).nbytes}
    assert largest == sorted(sizes, key=lambda n: -sizes[n])  # largest first, as the title says
    severities = [row.split()[0] for row in section(out, "Anomalies")]
    order = ["critical", "high", "medium", "low", "info"]
    assert severities[0] == "critical" and severities == sorted(severities, key=order.index)


def test_tables_listed_by_name_still_follow_the_sort(capsys, ranked_pair):
    out = run(capsys, *ranked_pair, "--sort-by-change-magnitude", "--similarity-matrix")[1]
    assert [row.split()[0] for row in section(out, "Diagonal")] == ["b.weight", "a.weight"]


# ---- every line fits the width ----------------------------------------------------------------


def test_summary_totals_and_series_lines_fit(tmp_path, capsys):
    g = torch.Generator().manual_seed(1)
    base = {f"blocks.{i}.w": torch.randn(4, 4, generator=g) for i in range(3)}
    paths = []
    for t in range(3):
        state = {k: v + 0.1 * t * torch.randn(4, 4, generator=g) for k, v in base.items()}
        state["blocks.0.w"] = state["blocks.0.w"].to(torch.float16 if t else torch.float32)
        paths.append(save(tmp_path / f"c{t}.safetensors", state))
    width = 50
    report = torchdiff.compare(str(paths[0]), str(paths[1]), stats=True, change_summary=True)
    text = render_text(report, width=width)
    assert "retyped" in text.splitlines()[0] or "retyped" in text.splitlines()[1]
    assert max(map(len, text.splitlines())) <= width
    one = torchdiff.inspect(str(paths[0]))
    assert max(map(len, render_text(one, width=40).splitlines()[-2:])) <= 40  # the totals line wraps
    series = torchdiff.compare_series([str(p) for p in paths], change_summary=True, similarity_matrix=True)
    lines = render_series_text(series, width=width).splitlines()
    assert max(map(len, lines)) <= width, [line for line in lines if len(line) > width]


def test_a_size_never_parts_from_its_unit():
    line = "  note: params in changed tensors: 19,210 of 19,210; bytes 76.84 KB->76.84 KB, 1.2 MB"
    for width in range(30, len(line)):
        parts = wrap(line, width, indent="      ")
        assert not any(re.search(r"\d$", a) and re.match(r"\s*(B|KB|MB|GB|TB)\b", b)
                       for a, b in zip(parts, parts[1:])), parts
        assert " ".join(p.strip() for p in parts) == " ".join(line.split())


def test_narrow_tables_elide_names_in_their_groups():
    from torchdiff.render.text import table_lines

    name = "model.layers.0.post_attention_layernorm.weight"
    rows = [(name, "none", 32, 32, 1.0, 1.0)]
    headers = ("tensor", "scheme", "bits_old", "max_err_over_rms", "p95_abs_err", "compression")
    lines = table_lines(headers, rows, 60)
    assert max(map(len, lines)) <= 60
    assert any("…" in line for line in lines)


# ---- --top reaches the series text --------------------------------------------------------------


def test_series_text_honours_top(tmp_path, capsys):
    g = torch.Generator().manual_seed(2)
    base = {f"layers.{i}.w": torch.randn(4, 4, generator=g) for i in range(5)}
    paths = [save(tmp_path / f"s{t}.safetensors",
                  {k: v + 0.05 * t * torch.randn(4, 4, generator=g) for k, v in base.items()}) for t in range(3)]
    code, out, _ = run(capsys, "series", *paths, "--similarity-matrix", "--top", "2")
    assert code == 0
    rows = section(out, "Per layer")
    assert len(rows) == 2 and "… and 3 more rows (--top 0 lists every row)" in out
    assert run(capsys, "series", *paths, "--top", "-1")[0] == 2


# ---- counts read as numbers, labels say what their numbers mean -----------------------------------


def test_stats_line_counts_have_separators():
    old = torch.linspace(-1, 1, 3000)
    new = old.clone()
    new[:1500] = float("nan")
    report = torchdiff.compare({"w": old}, {"w": new}, stats=True)
    expected = int(np.isnan(new.numpy()).sum())
    assert f"nan_count=0->{expected:,}" in str(report)
    plain = str(torchdiff.compare({"w": old}, {"w": new}))
    assert f"nan=0->{expected:,}" in plain


@pytest.fixture
def scale_findings():
    """Eight 2-D weights of rms ≈ 0.1 in one role; one shrunk by 1e-6 and one holding a
    value beyond the float16 range."""
    g = torch.Generator().manual_seed(3)
    old = {f"layers.{i}.fc.weight": 0.1 * torch.randn(16, 8, generator=g) for i in range(8)}
    new = {k: v.clone() for k, v in old.items()}
    new["layers.2.fc.weight"] *= 1e-6
    new["layers.5.fc.weight"][0, 0] = 7e4
    return old, new


def test_anomaly_rules_read_right(scale_findings):
    old, new = scale_findings
    report = torchdiff.compare(old, new, anomaly_detection=True, fail_on_anomaly="critical")
    result = report.analysis("anomaly_detection")
    by = {(f["type"], f["tensor"]): f for f in result.data["anomalies"]}
    vanishing = by[("vanishing", "layers.2.fc.weight")]
    # the robust z of log10 rms within the role, from float64 NumPy
    rms = {k: math.sqrt(np.mean(v.double().numpy() ** 2)) for k, v in new.items()}
    logs = np.log10(list(rms.values()))
    med = np.median(logs)
    mad = max(np.median(np.abs(logs - med)), 0.1)
    z = 0.6745 * (math.log10(rms["layers.2.fc.weight"]) - med) / mad
    assert vanishing["figure"] == "robust_z" and vanishing["value"] == pytest.approx(z, rel=1e-6)
    assert vanishing["rule"].endswith("and the factor is ≤ 1/10×")
    overflow = by[("fp16_overflow", "layers.5.fc.weight")]
    assert overflow["value"] == int((new["layers.5.fc.weight"].abs() > 65504).sum()) == 1
    assert overflow["rule"].startswith("1 finite value beyond the float16 range (±65,504)")
    assert result.notes[0] == "--fail-on-anomaly critical: 0 findings at or above critical on the new side"


# ---- analyses that need two checkpoints say so in inspect -------------------------------------------


def test_inspect_says_what_needs_two_checkpoints(tmp_path, capsys):
    path = save(tmp_path / "one.safetensors", {"a.weight": torch.randn(4, 4), "b.bias": torch.zeros(4)})
    code, out, _ = run(capsys, "inspect", path, "--similarity-matrix", "--sort-by-change-magnitude")
    assert code == 0
    assert "similarity_matrix:\n  note: cosine similarity needs two checkpoints" in out
    assert "sort_by_change_magnitude:\n  note: sorting by change needs two checkpoints" in out
    assert "sort_key=" not in out  # nothing was sorted by rel_l2


def test_similarity_layer_rows_label_an_undefined_cosine():
    g = torch.Generator().manual_seed(4)
    old = {"norm.bias": torch.zeros(8), "fc.weight": torch.randn(4, 4, generator=g)}
    new = {"norm.bias": torch.randn(8, generator=g), "fc.weight": torch.randn(4, 4, generator=g)}
    report = torchdiff.compare(old, new, similarity_matrix=True)
    rows = dict((r[0], r) for r in report.analysis("similarity_matrix").tables[0].rows)
    a, b = old["fc.weight"].double().numpy().ravel(), new["fc.weight"].double().numpy().ravel()
    assert rows["fc"][2] == pytest.approx(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)), rel=1e-6)
    assert rows["norm"][2:] == ("old all zero", "n/a", "")
    text = str(report)
    per_layer = section(text, "Per layer")
    assert not any("nan" in row.split() or "??" in row for row in per_layer)


# ---- errors: one line, the documented exit code -----------------------------------------------------


def test_an_unreadable_input_is_one_line_not_an_internal_error(tmp_path, capsys, monkeypatch):
    """A reader that lets the filesystem's PermissionError through (root cannot be refused
    by chmod, so the refusal is simulated at open)."""
    path = tmp_path / "locked.pt"
    torch.save({"w": torch.ones(3)}, str(path))
    real_open, real_os_open = builtins.open, os.open

    def refuse(file, *args, **kwargs):
        if str(file).endswith("locked.pt"):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    def refuse_fd(file, *args, **kwargs):
        if str(file).endswith("locked.pt"):
            raise PermissionError(13, "Permission denied", str(file))
        return real_os_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refuse)
    monkeypatch.setattr(io, "open", refuse)
    monkeypatch.setattr(os, "open", refuse_fd)
    code, out, err = run(capsys, path, path)
    assert code == 2 and out == ""
    assert err == f"torchdiff: error: {path}: cannot read (Permission denied)\n"


def test_a_misspelt_command_is_named_before_any_lookup(tmp_path, capsys, monkeypatch):
    path = save(tmp_path / "m.safetensors", {"w": torch.ones(2)})
    import torchdiff.formats.hub as hub

    def no_hub(*args, **kwargs):
        raise AssertionError("looked up on the Hub")

    monkeypatch.setattr(hub, "resolve", no_hub)
    code, out, err = run(capsys, "insepct", path)
    assert code == 2 and out == ""
    assert err == "torchdiff: error: 'insepct' is no file: did you mean the command 'inspect'? (see torchdiff --help)\n"
    code, out, _ = run(capsys, "compare", path, path)  # the default command, named
    assert code == 0 and out == "1 tensor: 0 changed, 0 added, 0 removed, 1 unchanged\n"


# ---- units at the edges of their ranges ---------------------------------------------------------


@pytest.mark.parametrize("nbytes, text", [(999.5, "999.5 B"), (999.96, "1 KB"), (999_950, "1 MB"),
                                          (999_949, "999.9 KB"), (999_999_999, "1 GB"), (76_840, "76.84 KB"),
                                          (60, "60 B"), (1e15, "1,000 TB")])
def test_a_size_rounds_into_the_next_unit(nbytes, text):
    from torchdiff.units import human_bytes

    assert human_bytes(nbytes) == text
    value, unit = text.replace(",", "").split()
    scale = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}[unit]
    assert float(value) * scale == pytest.approx(nbytes, rel=5e-4)  # the printed size is the size


@pytest.mark.parametrize("x, text", [(9999.5, "1.000e+04"), (-9999.7, "-1.000e+04"), (9999.4, "9999"),
                                     (0.99995, "1.000"), (12345.6, "1.235e+04")])
def test_a_figure_that_rounds_to_ten_thousand(x, text):
    from torchdiff.units import number

    assert number(x) == text
    assert float(text) == pytest.approx(x, rel=5e-4)


def test_pair_flags_given_to_inspect_are_never_silent(tmp_path, capsys):
    """inspect --brief printed nothing at all and --epsilon changed nothing, both silently."""
    path = save(tmp_path / "one.safetensors", {"w": torch.ones(4)})
    code, out, err = run(capsys, "inspect", path, "--brief", "--epsilon", "0.1")
    assert code == 0
    assert err.splitlines() == [
        "torchdiff: warning: --epsilon applies to two checkpoints (torchdiff OLD NEW) and does nothing on inspect",
        "torchdiff: warning: --brief applies to two checkpoints (torchdiff OLD NEW) and does nothing on inspect"]


def test_a_trained_norm_shift_is_not_vanishing_beside_norm_scales():
    """A 4-block model fine-tuned in its last block: that block's LayerNorm biases moved
    off zero (rms 0.01) while the others stay zero. Their role has one non-zero member, so
    the peers are the kind: norm shifts are ~0 by design, and compared with the norm scales
    (~1) they read as 100× too small, a false 'vanishing'."""
    g = torch.Generator().manual_seed(6)
    old, new = {}, {}
    for i in range(4):
        for ln in ("ln_1", "ln_2"):
            old[f"h.{i}.{ln}.weight"] = torch.ones(32)
            old[f"h.{i}.{ln}.bias"] = torch.zeros(32)
            new[f"h.{i}.{ln}.weight"] = 1 + (0.01 * torch.randn(32, generator=g) if i == 3 else torch.zeros(32))
            new[f"h.{i}.{ln}.bias"] = 0.01 * torch.randn(32, generator=g) if i == 3 else torch.zeros(32)
    scales = [math.sqrt(np.mean(v.double().numpy() ** 2)) for k, v in new.items() if k.endswith("weight")]
    shift = math.sqrt(np.mean(new["h.3.ln_1.bias"].double().numpy() ** 2))
    assert shift <= np.median(scales) / 10  # beside the scales it would cross the 10× factor
    report = torchdiff.compare(old, new, anomaly_detection=True)
    found = [(f["type"], f["tensor"]) for f in report.analysis("anomaly_detection").data["anomalies"]]
    assert not [f for f in found if f[0] in ("vanishing", "exploding")], found
