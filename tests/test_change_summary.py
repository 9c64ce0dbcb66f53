"""--change-summary on pairs with known truth (tests/truth_models.py): a clean
fine-tune (no pattern), a rank-4 LoRA merge (low_rank), only biases/norms trained,
only the last two blocks trained, a uniform shrink. Global figures and effective
ranks are recomputed here in float64 NumPy."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import torchdiff
from torchdiff.analyses.change_summary import delta_rank
from torchdiff.cli import main
from truth_models import finetuned, lora_merge, pretrained, training_checkpoint

NAME = "change_summary"


def run(old, new):
    return torchdiff.compare(old, new, analyses=[NAME]).analysis(NAME)


def rank99(delta: np.ndarray) -> int:
    s = np.linalg.svd(delta.astype(np.float64), compute_uv=False)
    energy = np.cumsum(s**2) / np.sum(s**2)
    return int(np.argmax(energy >= 0.99)) + 1


def global_figures(old: dict, new: dict) -> tuple[float, float]:
    dsq = osq = nsq = dot = 0.0
    for k in old:
        a, b = old[k].double().numpy().ravel(), new[k].double().numpy().ravel()
        dsq += np.sum((b - a) ** 2)
        osq += np.sum(a * a)
        nsq += np.sum(b * b)
        dot += np.sum(a * b)
    return math.sqrt(dsq / osq), dot / math.sqrt(osq * nsq)


def test_clean_finetune_pair_has_no_pattern():
    pre, fine = pretrained(), finetuned()
    a = run(pre, fine)
    rel, cos = global_figures(pre, fine)
    assert a.headline["patterns"] == []
    assert a.headline["layers_changed"] == 7  # embed, layers.0-3, norm_f, head
    assert a.headline["magnitude"] == pytest.approx(rel, rel=1e-6)  # engine: float32 rows, float64 merge
    assert a.data["global_cosine"] == pytest.approx(cos, abs=1e-9)
    assert a.data["tensor_counts"]["changed"] == len(fine)
    assert a.data["changed_param_fraction"] == 1.0
    assert [r[0] for r in next(t for t in a.tables if t.title == "Counts").rows] == ["changed"]


def test_lora_rank4_merge_is_low_rank_and_nothing_else():
    pre = pretrained()
    target = "layers.2.attn.q_proj.weight"
    new = lora_merge(pre, target, rank=4)
    report = torchdiff.compare(pre, new, analyses=[NAME])
    a = report.analysis(NAME)
    assert a.headline["patterns"] == ["low_rank"]
    assert a.headline["layers_changed"] == 1
    (evidence,) = a.data["pattern_evidence"]
    (t,) = evidence["tensors"]
    expected = rank99((new[target] - pre[target]).numpy())
    assert t["path"] == target and t["rank99"] == expected and expected <= 4
    assert t["method"] == "exact" and t["limit"] == 4
    rel, _ = global_figures(pre, new)
    assert f"change_summary: layers_changed=1, magnitude={rel:.4g}, patterns=[low_rank]" in str(report)


def test_only_biases_and_norms_changed():
    pre, fine = pretrained(), finetuned()
    new = {k: (fine[k] if (k.endswith(".bias") or "norm" in k) else v) for k, v in pre.items()}
    a = run(pre, new)
    assert a.headline["patterns"] == ["only_biases_norms"]
    moved = [k for k in pre if not torch.equal(pre[k], new[k])]
    assert a.data["pattern_evidence"][0]["changed_tensors"] == len(moved)


def test_last_two_blocks_changed_with_embeddings_frozen():
    pre, fine = pretrained(), finetuned()
    trained = ("layers.2.", "layers.3.", "norm_f.", "head.")
    new = {k: (fine[k] if k.startswith(trained) else v) for k, v in pre.items()}
    a = run(pre, new)
    assert a.headline["patterns"] == ["embeddings_frozen", "last_k_blocks"]
    last = a.data["pattern_evidence"][1]
    assert (last["stack"], last["k"], last["blocks"], last["changed_blocks"]) == ("layers", 2, 4, [2, 3])
    assert a.headline["layers_changed"] == 4


def test_uniform_shrink_is_uniform_drift():
    pre = pretrained()
    a = run(pre, {k: v * 0.99 for k, v in pre.items()})
    assert a.headline["patterns"] == ["uniform_drift"]
    assert a.data["pattern_evidence"][0]["cv"] < 1e-4
    assert a.headline["magnitude"] == pytest.approx(0.01, rel=1e-5)


def test_tensors_moving_off_all_zeros_are_no_uniform_drift():
    """LoRA adapters after a few steps: the lora_A matrices moved by about the same
    rel_l2, the lora_B matrices (initialised to zero) by an infinite one. That is the
    opposite of a uniform drift, though the finite rel_l2 alone look uniform."""
    g = torch.Generator().manual_seed(0)
    old, new = {}, {}
    for i in range(4):
        a = torch.randn(8, 64, generator=g)
        old[f"layers.{i}.q.lora_A.weight"], new[f"layers.{i}.q.lora_A.weight"] = a, a * 0.99
        old[f"layers.{i}.q.lora_B.weight"] = torch.zeros(64, 8)
        new[f"layers.{i}.q.lora_B.weight"] = 1e-3 * torch.randn(64, 8, generator=g)
    assert "uniform_drift" not in run(old, new).headline["patterns"]
    # the A matrices alone do drift uniformly
    only_a = {k: v for k, v in old.items() if "lora_A" in k}
    assert run(only_a, {k: new[k] for k in only_a}).headline["patterns"] == ["uniform_drift"]


def test_training_checkpoints_leave_optimizer_state_out(tmp_path):
    old = training_checkpoint()
    new = training_checkpoint()
    new["model"] = {k: v * 0.99 for k, v in new["model"].items()}
    for s in new["optimizer"]["state"].values():
        s["exp_avg"] = s["exp_avg"] * 3
    paths = []
    for i, ck in enumerate((old, new)):
        paths.append(tmp_path / f"t{i}.pt")
        torch.save(ck, paths[-1])
    a = run(str(paths[0]), str(paths[1]))
    assert a.data["tensor_counts"]["changed"] == len(old["model"])
    # optimizer moments are their own group (Adam's step tensors are counters), not summarised
    assert a.data["other_roles"]["optimizer_state"]["changed"] == len(old["optimizer"]["state"])
    assert a.headline["magnitude"] == pytest.approx(0.01, rel=1e-5)


def test_inspect_says_it_needs_two_checkpoints():
    a = torchdiff.inspect(finetuned(), analyses=[NAME]).analysis(NAME)
    assert a.notes == ("a change summary needs two checkpoints (torchdiff OLD NEW)",) and not a.headline


@settings(max_examples=20, deadline=None)
@given(m=st.integers(16, 48), n=st.integers(16, 48), r=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_exact_rank_matches_numpy(m, n, r, seed):
    g = torch.Generator().manual_seed(seed)
    delta = torch.randn(m, r, generator=g, dtype=torch.float64) @ torch.randn(r, n, generator=g, dtype=torch.float64)
    got = delta_rank(delta)
    assert got["method"] == "exact" and got["rank99"] == rank99(delta.numpy()) <= r


def test_randomized_rank_on_a_large_matrix():
    g = torch.Generator().manual_seed(0)
    low = torch.randn(300, 3, generator=g) @ torch.randn(3, 320, generator=g)
    got = delta_rank(low)
    assert got["method"] == "randomized" and got["rank99"] == rank99(low.numpy())
    full = torch.randn(300, 320, generator=g)
    got = delta_rank(full)
    assert got["method"] == "randomized" and got["rank99"] is None and got["captured"] < 0.99


def test_randomized_path_finds_lora_in_a_wide_model():
    g = torch.Generator().manual_seed(1)
    old = {"proj.weight": torch.randn(320, 288, generator=g) * 0.02, "other.weight": torch.randn(288, 288, generator=g)}
    new = lora_merge(old, "proj.weight", rank=4)
    new["other.weight"] = old["other.weight"] + 1e-3 * torch.randn(288, 288, generator=g)
    a = run(old, new)
    assert a.headline["patterns"] == ["low_rank"]
    (t,) = a.data["pattern_evidence"][0]["tensors"]
    expected = rank99((new["proj.weight"] - old["proj.weight"]).numpy())
    assert (t["path"], t["method"], t["rank99"]) == ("proj.weight", "randomized", expected)


def test_cli_json(tmp_path, capsys):
    old, new = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    pre = pretrained()
    save_file(pre, str(old))
    save_file(lora_merge(pre, "layers.0.mlp.fc1.weight", rank=2), str(new))
    assert main([str(old), str(new), "--change-summary", "--output", "json"]) == 0
    (item,) = [i for i in json.loads(capsys.readouterr().out) if i["type"] == NAME]
    assert item["patterns"] == ["low_rank"] and item["layers_changed"] == 1
    assert item["pattern_evidence"][0]["tensors"][0]["rank99"] <= 2


def test_nonfinite_delta_is_skipped_not_guessed():
    pre = pretrained()
    new = lora_merge(pre, "layers.1.attn.v_proj.weight", rank=2)
    new["layers.1.attn.v_proj.weight"][0, 0] = float("nan")
    assert delta_rank(new["layers.1.attn.v_proj.weight"] - pre["layers.1.attn.v_proj.weight"]) == {
        "rank99": None, "method": "skipped: non-finite values"}
    a = run(pre, new)
    assert a.headline["patterns"] == []
    assert any(n.startswith("low-rank check skipped for 1 tensor whose") for n in a.notes)


# ---- issue 18: zero-initialised tensors in the top tables; numbers in the notes ----------------


def _zero_init_pair():
    """Two weights that move, two biases and a one-bias layer ("gate") that start at zero (the
    zero-initialised tensors of a from-scratch model), and one frozen weight."""
    g = torch.Generator().manual_seed(5)
    old = {"a.weight": torch.randn(16, 16, generator=g), "b.weight": torch.randn(16, 16, generator=g),
           "a.bias": torch.zeros(16), "b.bias": torch.zeros(16), "gate.bias": torch.zeros(4),
           "c.weight": torch.randn(8, 8, generator=g)}
    new = {k: v.clone() for k, v in old.items()}
    new["a.weight"] += 0.10 * torch.randn(16, 16, generator=g)
    new["b.weight"] += 0.02 * torch.randn(16, 16, generator=g)
    new["a.bias"] = 0.01 * torch.randn(16, generator=g)
    new["b.bias"] = 0.30 * torch.randn(16, generator=g)
    new["gate.bias"] = 0.05 * torch.randn(4, generator=g)
    return old, new


def _np_l2(old, new, k) -> float:
    return float(np.linalg.norm(new[k].double().numpy() - old[k].double().numpy()))


def _np_rel(old, new, k) -> float:
    return _np_l2(old, new, k) / float(np.linalg.norm(old[k].double().numpy()))


def test_zero_initialised_tensors_follow_the_measured_ones_by_l2_and_are_labelled():
    """Issue 18: tensors whose old side is all zero have rel_l2 = inf and cosine = nan; they
    sorted to the top of "Top tensors" with inf/nan. They follow the measured tensors, by ‖Δ‖,
    labelled ``old all zero`` (the order of --sort-by-change-magnitude)."""
    old, new = _zero_init_pair()
    a = run(old, new)
    top = next(t for t in a.tables if t.title == "Top tensors")
    measured = sorted(["a.weight", "b.weight"], key=lambda k: -_np_rel(old, new, k))
    zero = sorted(["a.bias", "b.bias", "gate.bias"], key=lambda k: -_np_l2(old, new, k))
    assert [r[0] for r in top.rows] == (measured + zero)[:5] == ["a.weight", "b.weight", "b.bias", "gate.bias",
                                                                   "a.bias"]
    rows = {r[0]: dict(zip(top.headers, r)) for r in top.rows}
    for k in measured:
        assert rows[k]["rel_l2"] == pytest.approx(_np_rel(old, new, k), rel=1e-6)
    for k in zero:
        assert (rows[k]["rel_l2"], rows[k]["cosine"]) == ("old all zero", "n/a")
        assert rows[k]["l2"] == pytest.approx(_np_l2(old, new, k), rel=1e-6)
    for table in a.tables:  # no inf or nan in any top table
        for row in table.rows:
            assert not any(isinstance(v, float) and not math.isfinite(v) for v in row), (table.title, row)
    layers = {r[0]: r for r in next(t for t in a.tables if t.title == "Top layers").rows}
    assert layers["gate"][2] == "old all zero"  # a layer that is all zero on the old side
    assert layers["a"][2] == pytest.approx(
        math.sqrt(_np_l2(old, new, "a.weight") ** 2 + _np_l2(old, new, "a.bias") ** 2)
        / float(np.linalg.norm(old["a.weight"].double().numpy())), rel=1e-6)
    text = str(torchdiff.compare(old, new, analyses=[NAME]))
    section = text[text.index("Top tensors"):text.index("Top layers")]
    assert "inf" not in section and "nan" not in section and "old all zero" in section


def test_notes_write_counts_and_bytes_for_people():
    """Counts with thousands separators, bytes in B/KB/MB/GB, floats to 4 significant digits
    (the notes printed ``params ... 36106 of 36106``, ``bytes 144424->144424``); JSON keeps
    the numbers."""
    pre, fine = pretrained(), finetuned()
    a = run(pre, fine)
    p = sum(v.numel() for v in pre.values())
    b = sum(v.numel() * 4 for v in pre.values())
    assert (p, b) == (36106, 144424)
    rel, cos = global_figures(pre, fine)
    note = a.notes[0]
    assert f"= {rel:.4g}, global cosine = {cos:.4g}," in note
    assert f"over {len(pre)} same-shape tensors; params in changed tensors: 36,106 of 36,106 (fraction 1); " in note
    assert note.endswith("; bytes 144.4 KB->144.4 KB")
    assert (a.data["bytes_old"], a.data["bytes_new"]) == (144424, 144424)
    assert a.data["param_counts"]["changed"] == 36106


@pytest.mark.parametrize("shape", [(40, 300), (300, 40), (300, 320), (320, 300)])
def test_rank_read_in_slices_equals_the_whole(monkeypatch, shape):
    """Δ = new − old is read in pieces of GRAM_CHUNK elements (never formed whole): with
    tiny pieces the rank, the energy captured and the method are those of one piece, on
    tall and wide matrices, exact (min dim 40) and randomized (min dim 300)."""
    import torchdiff.analyses.change_summary as cs

    g = torch.Generator().manual_seed(sum(shape))
    old = torch.randn(*shape, generator=g)
    new = old + torch.randn(shape[0], 5, generator=g) @ torch.randn(5, shape[1], generator=g) * 1e-2
    whole = delta_rank(new - old)
    monkeypatch.setattr(cs, "GRAM_CHUNK", 700)  # a few rows or columns a piece
    sliced = delta_rank(new, old)
    assert sliced["rank99"] == whole["rank99"] == rank99((new - old).double().numpy())
    assert sliced["method"] == whole["method"] and sliced["captured"] == pytest.approx(whole["captured"], abs=1e-6)


def test_tensors_that_gained_nonfinite_values_are_named():
    """Figures cover positions finite on both sides: a weight that gained NaN keeps
    magnitude 0 there, and the summary says which tensors gained or lost NaN/Inf."""
    g = torch.Generator().manual_seed(0)
    old = {"a.weight": torch.randn(4, 4, generator=g), "b.weight": torch.randn(4, 4, generator=g)}
    new = {k: v.clone() for k, v in old.items()}
    new["a.weight"][0, :3] = float("nan")
    new["b.weight"][1, 1] = float("inf")
    a = torchdiff.compare(old, new, change_summary=True).analysis("change_summary")
    assert a.data["nonfinite_changed"] == [{"tensor": "a.weight", "nan": [0, 3]}, {"tensor": "b.weight", "inf": [0, 1]}]
    assert any(n.startswith("2 tensors gained or lost NaN/Inf") and "a.weight (nan 0->3)" in n for n in a.notes)
    clean = torchdiff.compare(old, old, change_summary=True).analysis("change_summary")
    assert "nonfinite_changed" not in clean.data
