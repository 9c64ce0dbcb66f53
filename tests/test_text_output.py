"""Text output that reads first time (issue 18): the verdict first, a bounded number of
lines, nothing wider than the terminal, numbers for people, one order everywhere, and
zero-initialised tensors labelled instead of inf/nan."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import torchdiff
from torchdiff.render.text import elide, num, table_lines
from torchdiff.units import count, human_bytes, number
from helpers import run  # noqa: E402 - tests/ is on sys.path


LONG = "model.decoder.layers.{}.self_attention.query_key_value.weight"


@pytest.fixture
def many(tmp_path):
    """30 changed tensors with long names, two zero-initialised biases."""
    g = torch.Generator().manual_seed(0)
    old, new = {}, {}
    for i in range(30):
        w = torch.randn(8, 4, generator=g)
        old[LONG.format(i)] = w
        new[LONG.format(i)] = w + 0.01 * (i + 1) * torch.randn(8, 4, generator=g)
    old["model.decoder.norm.bias"] = torch.zeros(8)
    new["model.decoder.norm.bias"] = torch.full((8,), 0.5)
    old["model.decoder.final.bias"] = torch.zeros(4)
    new["model.decoder.final.bias"] = torch.full((4,), 0.1)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(old, str(a))
    save_file(new, str(b))
    return a, b


# ---- verdict first ------------------------------------------------------------------------


def test_summary_before_and_after_the_tensor_lines(capsys, many):
    out = run(capsys, *many)[1].splitlines()
    summary = "32 tensors: 32 changed, 0 added, 0 removed, 0 unchanged"
    assert out[0] == summary and out[-1] == summary
    assert sum(line.startswith("  ~ ") for line in out) == 32


def test_top_limits_tensor_lines(capsys, many):
    out = run(capsys, *many, "--top", "5", "--sort-by-change-magnitude")[1].splitlines()
    tensor_lines = [line for line in out if line.startswith("  ~ ")]
    assert len(tensor_lines) == 5
    assert "  … and 27 more (--top 0 lists every tensor)" in out
    report = torchdiff.compare(str(many[0]), str(many[1]), sort_by_change_magnitude=True)
    first = max((d for d in report if d.name.startswith("model.decoder.layers")), key=lambda d: d.metrics.rel_l2)
    assert tensor_lines[0].startswith(f"  ~ {first.name}: rel_l2=")  # the largest change first
    full = run(capsys, *many, "--top", "0")[1]
    assert "more (--top" not in full
    code, _, err = run(capsys, *many, "--top", "-1")
    assert code == 2 and "--top must be a whole number ≥ 0" in err


def test_metadata_follows_the_tensors_and_collapses(capsys, tmp_path):
    old = {"w": torch.ones(2), "loops": {f"fit_loop.k{i:02d}": i for i in range(20)}, "loss": 0.9617278575897217}
    new = {"w": torch.full((2,), 2.0), "loops": {f"fit_loop.k{i:02d}": i + 1 for i in range(20)},
           "loss": 0.43060144782066345}
    torch.save(old, tmp_path / "a.ckpt")
    torch.save(new, tmp_path / "b.ckpt")
    out = run(capsys, tmp_path / "a.ckpt", tmp_path / "b.ckpt")[1].splitlines()
    assert out[1].startswith("  ~ w: ")  # tensors first
    meta = [line for line in out if line.startswith("  ~ loops.") or line.startswith("  ~ loss")]
    assert len(meta) == 10
    assert "  … and 11 more metadata values (--output json lists every one)" in out
    items = json.loads(run(capsys, tmp_path / "a.ckpt", tmp_path / "b.ckpt", "-o", "json")[1])
    assert sum(i["type"] == "metadata_changed" for i in items) == 21
    out = run(capsys, tmp_path / "a.ckpt", tmp_path / "b.ckpt", "--ignore-keys-regex", "loops")[1]
    assert "  ~ loss: 0.9617->0.4306" in out.splitlines()


# ---- width ------------------------------------------------------------------------------------


def test_no_line_wider_than_the_terminal(capsys, many, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    code, out, _ = run(capsys, *many, "--all", "--stats")
    assert code == 0
    wide = [line for line in out.splitlines() if len(line) > 120]
    assert wide == []
    monkeypatch.setenv("COLUMNS", "80")
    out = run(capsys, *many, "--quantization-analysis", "--show-layer-impact")[1]
    # at 80 columns only a line of a 63-character tensor name (or its table column) may be wider
    name_width = len(LONG.format(10))
    for line in out.splitlines():
        if len(line) > 80:
            assert any(LONG.format(i) in line for i in range(30)) or line.startswith(("  tensor ", "  ---")), line
            assert len(line) - name_width <= 80 - 20, line


def test_wide_tables_elide_names_in_the_middle_or_wrap():
    rows = [(f"encoder.layers.{i}.attention.output.dense.weight", i, 0.5) for i in range(3)]
    lines = table_lines(("tensor", "count", "value"), rows, width=50)
    assert max(len(x) for x in lines) <= 50
    assert any("…" in x for x in lines)
    rows = [(f"t{i}", *range(12)) for i in range(2)]
    headers = ("tensor",) + tuple(f"column_{k}" for k in range(12))
    lines = table_lines(headers, rows, width=60)
    assert max(len(x) for x in lines) <= 60
    assert sum(x.startswith("  tensor ") for x in lines) >= 2  # wrapped into groups, each led by the names


@given(st.text(min_size=0, max_size=80), st.integers(2, 60))
def test_elide_keeps_both_ends(text, limit):
    out = elide(text, limit)
    assert len(out) <= limit
    if len(text) <= limit:
        assert out == text
    else:
        head, _, tail = out.partition("…")
        assert text.startswith(head) and text.endswith(tail)


# ---- numbers --------------------------------------------------------------------------------


@pytest.mark.parametrize("value, text", [
    (0.0, "0"), (1.0, "1"), (0, "0"), (1, "1"), (0.5, "0.5"), (0.9617278575897217, "0.9617"),
    (0.99999, "1.000"), (2.085e-5, "2.085e-05"), (12345.6, "1.235e+04"), (172288, "172,288"),
    (236288.0, "236,288"), (math.inf, "inf"), (math.nan, "nan"), (-0.25, "-0.25"),
])
def test_num(value, text):
    assert num(value) == text


@given(st.floats(allow_nan=False, allow_infinity=False, min_value=-1e12, max_value=1e12))
def test_num_has_at_most_4_significant_digits(x):
    text = num(x).replace(",", "").lstrip("-")
    if x != int(x):
        mantissa = text.split("e")[0].replace(".", "").lstrip("0")
        assert len(mantissa) <= 4
    assert float(text) == pytest.approx(abs(x), rel=1e-3, abs=1e-300)


@pytest.mark.parametrize("value, text", [
    (0.0123456, "+0.01235"), (-0.0123456, "-0.01235"), (0.0, "0"), (3, "+3"), (-1500, "-1,500"),
    (math.inf, "+inf"), (-math.inf, "-inf"), (2e-5, "+2.000e-05"),
])
def test_signed_number(value, text):
    """A trend or a delta in an analysis' note (convergence: ``recent trend +0.01235``)."""
    assert number(value, signed=True) == text


def test_num_is_the_units_number():
    """The renderer and the analyses' strings share one format (torchdiff.units)."""
    for x in (0.0, 1, 19210, 19210.0, 0.9617278575897217, 0.99999, 2.085e-5, 12345.6, math.nan, -math.inf):
        assert num(x) == number(x)
    assert count(19210) == "19,210"


@pytest.mark.parametrize("nbytes, text", [
    (0, "0 B"), (60, "60 B"), (999, "999 B"), (1000, "1 KB"), (76840, "76.84 KB"), (1234567, "1.235 MB"),
    (4_000_000_000, "4 GB"), (400_000, "400 KB"),
])
def test_sizes(nbytes, text):
    assert human_bytes(nbytes) == text


def test_inspect_counts_and_sizes(capsys, tmp_path):
    save_file({"emb": torch.zeros(1000, 172)}, str(tmp_path / "m.safetensors"))
    out = run(capsys, "inspect", tmp_path / "m.safetensors")[1].splitlines()
    assert out[-1] == "1 tensor, 172,000 parameters, 688 KB"
    assert "172,000" in out[2]


def test_inspect_counts_parameters_apart_from_other_state(capsys, tmp_path):
    """A training checkpoint: the parameters are the model's trainable tensors; buffers,
    counters, optimizer moments and training state are values, counted apart."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "rng_state": torch.get_rng_state()},
               tmp_path / "train.pt")
    out = run(capsys, "inspect", tmp_path / "train.pt")[1].splitlines()
    params = sum(p.numel() for p in model.parameters())  # 15 + 6
    values = params + 3 + 3 + 1 + 2 * params + 4 + torch.get_rng_state().numel()  # + running stats, counters
    assert out[-1].startswith(f"{7 + 3 * 4 + 1} tensors, {params:,} parameters ({values:,} values in all), ")


# ---- order --------------------------------------------------------------------------------


def test_stats_keep_the_sort_key_visible(capsys, many):
    out = run(capsys, *many, "--stats", "--sort-by-change-magnitude", "--sort-key", "max_abs")[1]
    lines = [line for line in out.splitlines() if line.startswith("  ~ ")]
    keys = [float(line.split("max_abs=")[1].split(",")[0]) for line in lines]
    assert keys == sorted(keys, reverse=True) and len(keys) == 32


def test_tables_follow_the_sort(capsys, many):
    report = torchdiff.compare(str(many[0]), str(many[1]), analyses=["sort_by_change_magnitude",
                                                                     "quantization_analysis", "show_layer_impact"])
    text = str(report)
    order = [d.name for d in report]
    section = text.split("  Tensors\n", 1)[1].split("\n\n")[0].splitlines()[2:]
    listed = [line.split()[0] for line in section if line.startswith("  model")]
    assert listed == [n for n in order if n in listed] and len(listed) == 32
    layers = text.split("layer_impact:", 1)[1].split("  Layers\n", 1)[1].splitlines()[2:]
    names = [line.split()[0] for line in layers if line.startswith("  model")]
    from torchdiff.names import layer_of

    first = {}
    for i, n in enumerate(order):
        first.setdefault(layer_of(n), i)
    assert names == sorted(names, key=lambda layer: first[layer])


# ---- zero-initialised tensors ---------------------------------------------------------------


def test_a_tensor_zeroed_is_labelled_without_a_nan_cosine():
    """‖new‖ = 0: rel_l2 = ‖Δ‖/‖old‖ = 1 exactly, the cosine undefined: the line says so."""
    report = torchdiff.compare({"p.weight": torch.full((4,), 0.5)}, {"p.weight": torch.zeros(4)})
    assert report["p.weight"].new_all_zero and not report["p.weight"].old_all_zero
    assert str(report).splitlines()[1] == "  ~ p.weight: new all zero, rel_l2=1, max_abs=0.5"


def test_zero_initialised_tensors_are_labelled(capsys, many):
    out = run(capsys, *many)[1].splitlines()
    line = next(x for x in out if x.startswith("  ~ model.decoder.norm.bias"))
    assert line == "  ~ model.decoder.norm.bias: old all zero, l2=1.414, max_abs=0.5"  # ‖0.5·1₈‖ = √2
    assert not any("inf" in x or "nan" in x for x in out if x.startswith("  ~ "))
    items = {i["path"]: i for i in json.loads(run(capsys, *many, "-o", "json")[1])}
    item = items["model.decoder.norm.bias"]
    assert item["old_all_zero"] is True and item["rel_l2"] == "Infinity" and item["cosine"] == "NaN"
    assert "old_all_zero" not in items[LONG.format(0)]


def test_zero_initialised_tensors_sort_after_the_measured_by_l2(many):
    report = torchdiff.compare(str(many[0]), str(many[1]), sort_by_change_magnitude=True)
    names = [d.name for d in report]
    assert names[-2:] == ["model.decoder.norm.bias", "model.decoder.final.bias"]  # l2 √2 > 0.2


def test_zero_initialised_tensors_never_reach_most_sensitive(many):
    report = torchdiff.compare(str(many[0]), str(many[1]), analyses=["quantization_analysis"])
    table = next(t for t in report.analysis("quantization_analysis").tables if t.title == "Most sensitive")
    assert all(math.isfinite(row[3]) for row in table.rows)
    assert not any("bias" in row[1] for row in table.rows)


_CELL = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=12) | st.sampled_from(
    ["", "True", "False", "1", "-3.5e-07", "1,234", " x ", "nan", "inf", "0x1f", "2.0"])


@given(st.integers(1, 5).flatmap(lambda n: st.tuples(
    st.lists(_CELL, min_size=n, max_size=n), st.lists(st.lists(_CELL, min_size=n, max_size=n), max_size=6))))
@settings(max_examples=300, deadline=None)
def test_simple_table_is_tabulates_simple_format(table):
    """The fast path for tables of printable ASCII writes what tabulate writes."""
    from tabulate import tabulate

    from torchdiff.render.text import simple_table

    headers, rows = table
    assert simple_table(headers, rows) == tabulate(rows, headers=headers, tablefmt="simple",
                                                   disable_numparse=True).splitlines()


def test_markdown_most_changed_puts_zero_initialised_tensors_after_the_measured(capsys, tmp_path):
    """The markdown table ranks as --sort-by-change-magnitude: a zero-initialised bias
    (rel_l2 = ∞) after the weight, labelled, not an ``inf`` at the top."""
    save_file({"fc.bias": torch.zeros(4), "fc.weight": torch.ones(4, 4)}, str(tmp_path / "a.safetensors"))
    save_file({"fc.bias": torch.full((4,), 0.1), "fc.weight": torch.full((4, 4), 1.5)}, str(tmp_path / "b.safetensors"))
    out = run(capsys, tmp_path / "a.safetensors", tmp_path / "b.safetensors", "-o", "markdown")[1]
    rows = [line for line in out.splitlines() if line.startswith("| `fc.")]
    assert [r.split("`")[1] for r in rows] == ["fc.weight", "fc.bias"]
    assert "old all zero" in rows[1] and "inf" not in out


def test_the_summary_agrees_in_number_with_its_metadata_count(capsys, tmp_path):
    torch.save({"w": torch.ones(2), "epoch": 1}, tmp_path / "a.pt")
    torch.save({"w": torch.ones(2), "epoch": 2}, tmp_path / "b.pt")
    torch.save({"w": torch.ones(2), "epoch": 3, "lr": 0.1}, tmp_path / "c.pt")
    assert run(capsys, tmp_path / "a.pt", tmp_path / "b.pt")[1].splitlines()[0].endswith("; 1 metadata value differs")
    assert run(capsys, tmp_path / "a.pt", tmp_path / "c.pt")[1].splitlines()[0].endswith("; 2 metadata values differ")


def test_counts_of_one_are_singular(capsys, tmp_path):
    from torchdiff.units import counted

    assert [counted(n, "tensor") for n in (0, 1, 2, 20000)] == ["0 tensors", "1 tensor", "2 tensors", "20,000 tensors"]
    assert (counted(1, "matrix", "matrices"), counted(2, "matrix", "matrices")) == ("1 matrix", "2 matrices")
    save_file({"w": torch.ones(3)}, tmp_path / "a.safetensors")
    save_file({"w": torch.full((3,), 2.0)}, tmp_path / "b.safetensors")
    out = run(capsys, tmp_path / "a.safetensors", tmp_path / "b.safetensors")[1].splitlines()
    assert out[0] == "1 tensor: 1 changed, 0 added, 0 removed, 0 unchanged"
    assert run(capsys, "inspect", tmp_path / "a.safetensors")[1].splitlines()[-1] == "1 tensor, 3 parameters, 12 B"
    out = run(capsys, "inspect", tmp_path / "a.safetensors", "-o", "markdown")[1]
    assert "1 tensor, 3 parameters, 12 bytes" in out


def test_top_bounds_the_tables_of_tensors_and_layers_too(capsys, tmp_path):
    """--top N kept N tensor lines, but every analysis table still listed each tensor or
    layer (161,896 lines of --all for 20,000 tensors). Now a table with a tensor or layer
    column shows N rows: its N best ranks where it ranks them (layer impact, by share)."""
    g = torch.Generator().manual_seed(3)
    old = {f"layers.{i}.w": torch.randn(6, 4, generator=g) for i in range(10)}
    new = {k: v + 0.01 * (i + 1) * torch.randn(6, 4, generator=g) for i, (k, v) in enumerate(old.items())}
    save_file(old, tmp_path / "a.safetensors")
    save_file(new, tmp_path / "b.safetensors")
    out = run(capsys, tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--show-layer-impact",
              "--top", "3")[1].splitlines()
    head = out.index("  Layers")
    rows = [line.split() for line in out[head + 3: head + 6]]
    dsq = {f"layers.{i}": float(((new[f"layers.{i}.w"].double() - old[f"layers.{i}.w"].double()) ** 2).sum())
           for i in range(10)}
    assert {r[0] for r in rows} == set(sorted(dsq, key=lambda k: -dsq[k])[:3])  # the 3 largest shares
    assert out[head + 6] == "  … and 7 more rows (--top 0 lists every row)"
    full = run(capsys, tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--show-layer-impact")[1]
    assert "more rows" not in full and all(f"layers.{i} " in full for i in range(10))
