"""Tied weights are one tensor (issue 18): found from shared storage (.pt, live modules),
from safetensors' dropped duplicates and from ``tie_word_embeddings`` in config.json;
reported as tied, never as added or removed, and counted once. Stored bytes count each
storage once, as the file holds it."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file, save_model

import torchdiff
from torchdiff import formats
from torchdiff.formats.base import stored_bytes


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(10, 4)
        self.mid = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight


def test_pt_shared_storage_is_tied(tmp_path):
    w = torch.randn(10, 4)
    path = tmp_path / "t.pt"
    torch.save({"emb.weight": w, "head.weight": w, "other": w.clone()}, path)
    ckpt = formats.load(path)
    assert ckpt.tensors["head.weight"].tied_to == "emb.weight"
    assert ckpt.tensors["emb.weight"].tied_to is None and ckpt.tensors["other"].tied_to is None
    assert ckpt.params == 80  # 40 + 40: the tied copy counts once
    assert ckpt.stored_nbytes == 2 * 40 * 4


def test_a_transposed_view_is_the_same_parameter(tmp_path):
    """``{"big": b, "tr": b.t()}`` holds 24 parameters, not 48: the transpose views the same
    elements of the same storage. Its Δ counted twice in the global figures and in layer
    shares (0.5 each). A slice views other elements and is no tie; a flattening views the same elements and is one."""
    torch.manual_seed(0)
    b = torch.randn(6, 4)
    c = b + 0.1 * torch.randn(6, 4)
    views = lambda t: {"big": t, "tr": t.t(), "perm": t.unsqueeze(0).permute(2, 0, 1), "rows": t[:3],
                       "flat": t.reshape(-1)}
    torch.save(views(b), tmp_path / "a.pt")
    torch.save(views(c), tmp_path / "b.pt")
    for source in (tmp_path / "a.pt", views(b)):
        ckpt = formats.from_object(source) if isinstance(source, dict) else formats.load(source)
        assert {k: h.tied_to for k, h in ckpt.tensors.items()} == {
            "big": None, "tr": "big", "perm": "big", "rows": None, "flat": "big"}
    report = torchdiff.compare(tmp_path / "a.pt", tmp_path / "b.pt", show_layer_impact=True)
    d = (c - b).double()
    shares = {row[0]: row[5] for row in report.analysis("layer_impact").tables[0].rows}
    total = d.square().sum() + d[:3].square().sum()  # big and rows
    assert shares["big"] == pytest.approx(float(d.square().sum() / total), rel=1e-5)
    assert set(shares) == {"big", "rows"}


def test_pt_views_of_one_storage_are_not_tied_but_share_bytes(tmp_path):
    big = torch.arange(100_000, dtype=torch.float32)
    path = tmp_path / "slice.pt"
    torch.save({"b": big[:10], "c": big[10:20]}, path)
    ckpt = formats.load(path)
    assert ckpt.tensors["c"].tied_to is None  # another offset: another tensor
    assert ckpt.tensors["b"].nbytes == 40
    assert stored_bytes(ckpt.tensors.values()) == {"b": 400_000, "c": 0}  # torch.save wrote the whole storage


def test_memory_analysis_counts_each_stored_storage_once(tmp_path):
    w = torch.randn(100, 10)
    tied, sliced = tmp_path / "tied.pt", tmp_path / "slice.pt"
    torch.save({"emb.weight": w, "head.weight": w}, tied)
    torch.save({"b": torch.zeros(100_000)[:10]}, sliced)
    a = torchdiff.inspect(str(tied), analyses=["memory_analysis"]).analysis("memory_analysis")
    assert a.data["sides"]["new"]["bytes"] == 4000  # once, not 8000
    assert a.data["sides"]["new"]["float_params"] == 1000
    a = torchdiff.inspect(str(sliced), analyses=["memory_analysis"]).analysis("memory_analysis")
    assert a.data["sides"]["new"]["bytes"] == 400_000  # the stored storage, not the 40-byte view


def test_live_module_ties_by_data_ptr():
    ckpt = formats.from_object(Tied())
    assert ckpt.tensors["head.weight"].tied_to == "emb.weight"
    assert ckpt.params == 40 + 16 + 4  # emb (= head) + mid.weight + mid.bias


def test_safetensors_dropped_duplicate_pairs_as_tied(tmp_path):
    model = Tied()
    st, pt = tmp_path / "m.safetensors", tmp_path / "m.pt"
    save_model(model, str(st))  # drops one of the tied names, records it in __metadata__
    assert len(load_file(str(st))) == 3
    torch.save(model.state_dict(), pt)
    for old, new in ((st, pt), (pt, st)):
        report = torchdiff.compare(str(old), str(new), analyses=["architecture_comparison"])
        assert {d.status for d in report} == {"unchanged"}
        assert len(report) == 4
        tied = [d for d in report if d.extras.get("tied_to")]
        assert len(tied) == 1
        arch = report.analysis("architecture_comparison")
        assert arch.data["params_old"] == arch.data["params_new"] == 60
        assert arch.headline["loadable"] == "strict"


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A tiny GPT-2 saved by transformers (model.safetensors without lm_head.weight) and
    the same weights as a pytorch_model.bin state_dict (lm_head sharing wte's storage)."""
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("gpt2")
    cfg = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    model.save_pretrained(root / "st")
    (root / "pt").mkdir()
    torch.save(model.state_dict(), root / "pt" / "pytorch_model.bin")
    (root / "pt" / "config.json").write_text((root / "st" / "config.json").read_text())
    return root, model.num_parameters()


def test_hf_safetensors_and_bin_are_the_same_model(gpt2_dir, capsys):
    root, n_params = gpt2_dir
    st, pt = root / "st" / "model.safetensors", root / "pt" / "pytorch_model.bin"
    assert "lm_head.weight" not in load_file(str(st))
    report = torchdiff.compare(str(st), str(pt), analyses=["architecture_comparison", "memory_analysis"])
    assert {d.status for d in report} == {"unchanged"}
    arch = report.analysis("architecture_comparison")
    assert arch.data["params_old"] == arch.data["params_new"] == n_params  # transformers' own count
    assert arch.headline["loadable"] == "strict"
    mem = report.analysis("memory_analysis")
    assert mem.data["sides"]["old"]["bytes"] == mem.data["sides"]["new"]["bytes"] == n_params * 4
    from torchdiff.cli import main

    assert main([str(st), str(pt), "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_config_false_does_not_tie(gpt2_dir, tmp_path):
    root, _ = gpt2_dir
    config = json.loads((root / "st" / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (tmp_path / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(root / "st" / "model.safetensors"))
    save_file(tensors, str(tmp_path / "model.safetensors"))
    assert formats.load(tmp_path / "model.safetensors").ties == {}


def test_tied_item_in_json(tmp_path, capsys):
    model = Tied()
    torch.save(model.state_dict(), tmp_path / "a.pt")
    with torch.no_grad():
        model.emb.weight.add_(1.0)
    torch.save(model.state_dict(), tmp_path / "b.pt")
    from torchdiff.cli import main

    assert main([str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "-o", "json"]) == 0
    items = {i["path"]: i for i in json.loads(capsys.readouterr().out)}
    assert items["head.weight"]["tied_to"] == {"old": "emb.weight", "new": "emb.weight"}
    assert "tied_to" not in items["emb.weight"]


def test_global_figures_count_a_tied_tensor_once(tmp_path):
    model = Tied()
    torch.save(model.state_dict(), tmp_path / "a.pt")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.emb.weight.mul_(1.5)
        model.mid.weight.add_(0.1)
    torch.save(model.state_dict(), tmp_path / "b.pt")
    after = model.state_dict()
    once = [k for k in before if k != "head.weight"]  # head.weight is emb.weight
    dsq = sum(float((after[k].double() - before[k].double()).norm() ** 2) for k in once)
    osq = sum(float(before[k].double().norm() ** 2) for k in once)
    scalars = torchdiff.compare(str(tmp_path / "a.pt"), str(tmp_path / "b.pt")).scalars()
    assert scalars["torchdiff/global_rel_l2"] == pytest.approx((dsq / osq) ** 0.5, rel=1e-6)
    assert scalars["torchdiff/global_l2"] == pytest.approx(dsq ** 0.5, rel=1e-6)


def test_tied_head_counts_once_in_the_training_analyses(tmp_path):
    """lm_head.weight and wte.weight one storage in a .pt on both sides: convergence,
    gradient and change summary sum the tied update once (float64 reference) and count
    its parameters once."""
    g = torch.Generator().manual_seed(5)
    w, m = torch.randn(10, 4, generator=g), torch.randn(4, 4, generator=g)
    w2, m2 = w + 0.1 * torch.randn(10, 4, generator=g), m + 0.1 * torch.randn(4, 4, generator=g)
    for path, (e, h) in ((tmp_path / "a.pt", (w, m)), (tmp_path / "b.pt", (w2, m2))):
        torch.save({"wte.weight": e, "lm_head.weight": e, "h.0.mlp.weight": h}, path)
    u2 = float(((w2.double() - w.double()) ** 2).sum() + ((m2.double() - m.double()) ** 2).sum())
    o2 = float((w.double() ** 2).sum() + (m.double() ** 2).sum())
    report = torchdiff.compare(tmp_path / "a.pt", tmp_path / "b.pt", convergence_analysis=True,
                               gradient_analysis=True, change_summary=True, similarity_matrix=True, lr=0.1)
    conv = report.analysis("convergence_analysis").headline
    assert conv["update_norm"] == pytest.approx(math.sqrt(u2), rel=1e-6)
    assert conv["rel_update"] == pytest.approx(math.sqrt(u2 / o2), rel=1e-6)
    assert report.analysis("gradient_analysis").headline["norm"] == pytest.approx(math.sqrt(u2) / 0.1, rel=1e-6)
    summary = report.analysis("change_summary")
    assert summary.data["param_counts"]["changed"] == 40 + 16 and summary.data["tensor_counts"]["changed"] == 3
    assert summary.headline["layers_changed"] == 2  # wte (with its tied head) and h.0
    similarity = report.analysis("similarity_matrix")
    assert [r["layer"] for r in similarity.data["per_layer"]] == ["wte", "h.0"]
    assert [d["path"] for d in similarity.data["diagonal"]] == ["wte.weight", "h.0.mlp.weight"]


def test_inspect_totals_html_summary_and_anomalies_count_a_tied_weight_once(tmp_path, capsys):
    """inspect of a .pt whose head shares the embedding's storage: the totals line, the
    HTML summary and the change summary's bytes count it once (as architecture and
    memory do), and anomaly detection reports a finding of the shared values once."""
    from torchdiff.cli import main
    from torchdiff.render.html import payload

    emb = torch.zeros(6, 4)
    emb[0] = 1.0  # rows 1..5 dead: a dead_units finding on the embedding, not again on the head
    fc = torch.randn(4, 4)
    path = tmp_path / "tied.pt"
    torch.save({"wte.weight": emb, "fc.weight": fc, "lm_head.weight": emb}, path)
    assert main(["inspect", str(path)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == "3 tensors, 40 parameters, 160 B"  # 24 + 16 parameters; (24 + 16) * 4 bytes
    summary = payload(torchdiff.inspect(path))["summary"]
    assert (summary["tensors"], summary["params"], summary["new_tensor_bytes"]) == (3, 40, 160)
    found = torchdiff.inspect(path, anomaly_detection=True).analysis("anomaly_detection").data["anomalies"]
    dead = [f["tensor"] for f in found if f["type"] == "dead_units"]
    assert dead == ["wte.weight"]
    moved = {"wte.weight": emb + 1, "fc.weight": fc, "lm_head.weight": None}
    moved["lm_head.weight"] = moved["wte.weight"]
    torch.save(moved, tmp_path / "moved.pt")
    counts = torchdiff.compare(path, tmp_path / "moved.pt", change_summary=True).analysis("change_summary").data
    assert (counts["bytes_old"], counts["bytes_new"]) == (160, 160)


def test_a_module_ties_by_parameter_identity_where_storages_cannot_be_seen(monkeypatch):
    """FSDP2 shards parameters into DTensors, whose storages ``mark_shared`` cannot see:
    a tied embedding and head were two parameters (param_norm 37.6 against 29.3 on two
    ranks). An nn.Module's ties now also come from its Parameter objects."""
    import torchdiff.formats as F

    class TiedLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(5, 3)
            self.head = torch.nn.Linear(3, 5, bias=False)
            self.head.weight = self.emb.weight

    monkeypatch.setattr(F, "mark_shared", lambda *args, **kwargs: None)  # as for DTensors: no storage seen
    model = TiedLM()
    ckpt = F.from_object(model)
    assert {k: h.tied_to for k, h in ckpt.tensors.items()} == {"emb.weight": None, "head.weight": "emb.weight"}
    report = torchdiff.compare(model, model)
    w = model.emb.weight.detach().double()
    assert report.scalars()["torchdiff/param_norm"] == pytest.approx(float(w.norm()), rel=1e-6)  # counted once
