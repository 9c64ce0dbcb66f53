"""Regression tests of known follow-up bugs, each against an independent reference
(float64 NumPy, hand counts, files written by the real libraries)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import torchdiff
from torchdiff.cli import main
from torchdiff.results import OLD_ALL_ZERO


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _strict_json(text: str):
    """JSON as a strict parser reads it: a NaN or Infinity literal is an error."""
    def refuse(literal):
        raise ValueError(f"non-JSON literal {literal}")
    return json.loads(text, parse_constant=refuse)


def _section(out: str, title: str) -> list[str]:
    """The lines of one text table: from its title to the next note, title or headline
    (a wide table wraps into column groups separated by blank lines: all are kept)."""
    lines = out.splitlines()
    block = []
    for line in lines[lines.index(f"  {title}") + 1:]:
        if line.startswith("  note:") or (line and not line.startswith(" ")) or _is_title(line):
            break
        block.append(line)
    return block


def _is_title(line: str) -> bool:
    return line in {f"  {t}" for t in ("Schemes", "Most sensitive", "Tensors", "Storage", "Bytes by dtype",
                                        "Bytes by layer", "Largest tensors", "Estimates", "What if")}


# ---- 1. quantization analysis: an old side all zero prints no inf/nan --------------------------------


@pytest.fixture
def zero_bias_pair(tmp_path):
    """An fp16 cast of a model whose bias was zero-initialised and then trained, and
    whose ``gate.weight`` was zeroed (pruned): safetensors files written by the library."""
    g = torch.Generator().manual_seed(0)
    old = {"zb.weight": torch.randn(16, 16, generator=g), "zb.bias": torch.zeros(16),
           "gate.weight": torch.randn(8, 16, generator=g)}
    new = {"zb.weight": old["zb.weight"].half(), "zb.bias": 0.01 * torch.randn(16, generator=g),
           "gate.weight": torch.zeros(8, 16)}
    save_file(old, tmp_path / "old.safetensors")
    save_file(new, tmp_path / "new.safetensors")
    return tmp_path / "old.safetensors", tmp_path / "new.safetensors", old, new


def test_quantization_tables_label_an_old_side_all_zero(zero_bias_pair, capsys):
    """``zb.bias`` was zero on the old side: its Tensors row printed sqnr -inf, rel_l2 inf,
    cosine nan, max_err_over_rms inf (docs/METRICS.md: no top table prints them). Now it
    reads ``old all zero`` and ``n/a``, p95 |Δ| still measured, in text and JSON alike."""
    a, b, old, new = zero_bias_pair
    result = torchdiff.compare(a, b, quantization_analysis=True).analysis("quantization_analysis")
    tensors = result.tables[2]
    row = dict(zip(tensors.headers, next(r for r in tensors.rows if r[0] == "zb.bias")))
    assert (row["sqnr_db"], row["rel_l2"], row["cosine"], row["max_err_over_rms"]) == (OLD_ALL_ZERO, "n/a", "n/a",
                                                                                         "n/a")
    delta = np.sort(np.abs(new["zb.bias"].double().numpy()))  # nearest-rank p95: the ⌈0.95·16⌉-th smallest
    assert row["p95_abs_err"] == pytest.approx(delta[math.ceil(0.95 * delta.size) - 1], rel=1e-6)

    code, out, _ = run(capsys, a, b, "--quantization-analysis")
    assert code == 0
    bias_rows = [line.split() for title in ("Schemes", "Most sensitive", "Tensors") for line in _section(out, title)
                 if line.split()[:1] == ["zb.bias"]]
    assert len(bias_rows) == 2  # the Tensors table wraps into two column groups; not ranked as sensitive
    assert not {"inf", "-inf", "nan"} & {cell for r in bias_rows for cell in r}, bias_rows
    assert "old all zero" in " ".join(_section(out, "Tensors"))
    code, out, _ = run(capsys, a, b, "--quantization-analysis", "-o", "json")
    item = next(i for i in _strict_json(out) if i["type"] == "quantization_analysis")
    (json_row,) = [r for r in item["tensors"] if r["tensor"] == "zb.bias"]
    assert json_row["sqnr_db"] == OLD_ALL_ZERO and json_row["cosine"] == "n/a"


def test_quantization_schemes_row_of_an_old_side_all_zero(tmp_path):
    """A Schemes row whose every tensor is zero on the old side (Σ‖A‖² = 0 < Σ‖Δ‖²) printed
    ``-inf``: it reads ``old all zero``; the other rows keep the pooled float64 SQNR."""
    g = torch.Generator().manual_seed(1)
    old = {"w": torch.randn(32, 8, generator=g), "b": torch.zeros(8)}
    new = {"w": old["w"].bfloat16(), "b": torch.randn(8, generator=g)}
    save_file(old, tmp_path / "a.safetensors")
    save_file(new, tmp_path / "b.safetensors")
    result = torchdiff.compare(tmp_path / "a.safetensors", tmp_path / "b.safetensors",
                               quantization_analysis=True).analysis("quantization_analysis")
    schemes = {r[0]: dict(zip(result.tables[0].headers, r)) for r in result.tables[0].rows}
    assert schemes["none"]["sqnr_db"] == OLD_ALL_ZERO
    a64, b64 = old["w"].double().numpy(), new["w"].double().numpy()
    ref = 10 * math.log10((a64**2).sum() / ((b64 - a64) ** 2).sum())
    assert schemes["cast float32 → bfloat16"]["sqnr_db"] == pytest.approx(ref, rel=1e-6)


def test_quantization_sqnr_of_a_new_side_all_zero_is_exactly_zero(zero_bias_pair):
    """A zeroed tensor has Δ = −A, so ‖A‖/‖Δ‖ = 1 and SQNR = 0 dB exactly; the engine's two
    sums of ‖A‖² differ in their last bits and printed a tiny SQNR (6.35e-08, -3.04e-07)."""
    a, b, old, _ = zero_bias_pair
    result = torchdiff.compare(a, b, quantization_analysis=True).analysis("quantization_analysis")
    tensors = result.tables[2]
    row = dict(zip(tensors.headers, next(r for r in tensors.rows if r[0] == "gate.weight")))
    a64 = old["gate.weight"].double().numpy()
    assert row["sqnr_db"] == 20 * math.log10(np.linalg.norm(a64) / np.linalg.norm(-a64)) == 0.0


# ---- 2. inspect --show-layer-impact says it needs two checkpoints -----------------------------------


def test_inspect_layer_impact_says_it_needs_two_checkpoints(tmp_path, capsys):
    save_file({"layers.0.w": torch.ones(2, 2)}, tmp_path / "a.safetensors")
    code, out, err = run(capsys, "inspect", tmp_path / "a.safetensors", "--show-layer-impact")
    assert code == 0 and err == ""
    assert "layer_impact:\n  note: layer impact needs two checkpoints (torchdiff OLD NEW)" in out
    code, out, _ = run(capsys, "inspect", tmp_path / "a.safetensors", "--show-layer-impact", "-o", "json")
    (item,) = [i for i in _strict_json(out) if i["type"] == "layer_impact"]
    assert item["notes"] == ["layer impact needs two checkpoints (torchdiff OLD NEW)"]


# ---- 3. counts and their nouns --------------------------------------------------------------------


def test_change_summary_counts_one_tensor_that_gained_nan(tmp_path):
    old = {"a.weight": torch.ones(4, 4), "b.weight": torch.ones(4)}
    new = {"a.weight": torch.ones(4, 4), "b.weight": torch.ones(4)}
    new["a.weight"][0, :2] = float("nan")  # hand count: one tensor, 2 NaN
    save_file(old, tmp_path / "a.safetensors")
    save_file(new, tmp_path / "b.safetensors")
    notes = torchdiff.compare(tmp_path / "a.safetensors", tmp_path / "b.safetensors",
                              change_summary=True).analysis("change_summary").notes
    assert any(n.startswith("1 tensor gained or lost NaN/Inf") and "a.weight (nan 0->2)" in n for n in notes)
    assert not any("(s)" in n for n in notes)


def test_scope_notes_count_their_tensors(tmp_path):
    """The scope notes of layer impact and quantization analysis said ``1 tensor(s)``."""
    sd = {"fc.weight": torch.ones(3, 3), "bn.num_batches_tracked": torch.tensor(3)}
    torch.save(sd, tmp_path / "a.pt")
    torch.save({**sd, "fc.weight": torch.full((3, 3), 2.0)}, tmp_path / "b.pt")
    report = torchdiff.compare(tmp_path / "a.pt", tmp_path / "b.pt", show_layer_impact=True,
                               quantization_analysis=True)
    notes = [n for a in ("layer_impact", "quantization_analysis") for n in report.analysis(a).notes]
    assert any(n.startswith("scope params: 1 tensor of other roles (counter 1)") for n in notes)
    assert not any("(s)" in n for n in notes)


def test_github_counts_one_finding(tmp_path, capsys):
    g = torch.Generator().manual_seed(2)
    save_file({"a.weight": torch.randn(4, 4, generator=g), "b.weight": torch.randn(4, 4, generator=g)},
              tmp_path / "a.safetensors")
    save_file({"a.weight": torch.full((4, 4), 0.5), "b.weight": torch.full((4, 4), 0.25)},
              tmp_path / "b.safetensors")  # both constant: two high findings
    _, out, _ = run(capsys, tmp_path / "a.safetensors", tmp_path / "b.safetensors", "-o", "github",
                    "--fail-on-anomaly", "high")
    assert out.splitlines()[-1].endswith("; --fail-on-anomaly high: 2 findings at or above -> failed")


# ---- 4. "… and 1 more row" --------------------------------------------------------------------------


def test_top_says_one_more_row(tmp_path, capsys):
    g = torch.Generator().manual_seed(3)
    old = {f"layers.{i}.w": torch.randn(6, 4, generator=g) for i in range(3)}
    new = {k: v + 0.01 * torch.randn(6, 4, generator=g) for k, v in old.items()}
    save_file(old, tmp_path / "a.safetensors")
    save_file(new, tmp_path / "b.safetensors")
    out = run(capsys, tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--show-layer-impact",
              "--top", "2")[1].splitlines()
    assert "  … and 1 more row (--top 0 lists every row)" in out
    assert not any("more rows" in line for line in out)


# ---- 5. memory analysis: a tied copy is no "largest tensor" ------------------------------------------


def test_memory_largest_leaves_tied_copies_out(tmp_path, capsys):
    """torch.save of a model whose head is tied to its embedding stores both names on one
    storage; the dtype and layer tables count ``lm_head.weight`` 0 B, and "Largest
    tensors" listed it at 16.38 KB."""

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(64, 64)
            self.fc = torch.nn.Linear(64, 32)
            self.lm_head = torch.nn.Linear(64, 64, bias=False)
            self.lm_head.weight = self.embed.weight

    torch.manual_seed(0)
    model = Tied()
    torch.save(model.state_dict(), tmp_path / "a.pt")
    with torch.no_grad():
        model.fc.weight.add_(0.01)
    sd = model.state_dict()
    torch.save(sd, tmp_path / "b.pt")
    result = torchdiff.compare(tmp_path / "a.pt", tmp_path / "b.pt", memory_analysis=True).analysis("memory_analysis")
    largest = result.data["sides"]["new"]["largest"]
    # reference: the tensors with storages of their own, by bytes (numel · element size)
    own = {n: t.numel() * t.element_size() for n, t in sd.items() if n != "lm_head.weight"}
    assert [(e["path"], e["bytes"]) for e in largest] == sorted(own.items(), key=lambda kv: (-kv[1], kv[0]))
    assert result.data["sides"]["new"]["bytes_by_layer"]["lm_head"] == 0
    out = run(capsys, tmp_path / "a.pt", tmp_path / "b.pt", "--memory-analysis")[1]
    assert not any(line.split()[:1] == ["lm_head.weight"] for line in _section(out, "Largest tensors"))


# ---- 6. the averaged-copy rule lives in the naming module --------------------------------------------


def test_averaged_copy_rule_is_the_naming_modules():
    """STYLE: one naming module. The EMA/SWA regex lived in analyses/_training.py."""
    import torchdiff.analyses._training as training
    from torchdiff import names

    assert not hasattr(training, "_AVERAGED")
    assert training.is_averaged_copy is names.is_averaged_copy
    assert [names.is_averaged_copy(p) for p in "model_ema.layers.0.weight".split(".")] == [True, False, False, False]


def test_gradient_mapping_still_skips_an_ema_copy(tmp_path):
    """Behaviour kept: with an EMA copy stored before the model, optimizer state maps to
    the model's parameters, not the copy's (layer ``model``, not ``model_ema``)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    ckpts = []
    for step in range(2):
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
        ema = {f"model_ema.{k}": v.clone() for k, v in model.state_dict().items()}
        ckpt = {**ema, **{f"model.{k}": v.clone() for k, v in model.state_dict().items()},
                "optimizer": opt.state_dict()}
        torch.save(ckpt, tmp_path / f"s{step}.pt")
        ckpts.append(tmp_path / f"s{step}.pt")
    result = torchdiff.compare(*ckpts, gradient_analysis=True).analysis("gradient_analysis")
    (layers,) = [t for t in result.tables if t.title == "Per layer"]
    assert [r[0] for r in layers.rows] == ["model"]  # mapped to model.*, not to the EMA copy model_ema.*
    assert not any("could not be matched" in n for n in result.notes)
