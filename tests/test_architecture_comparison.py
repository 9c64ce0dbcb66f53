"""--architecture-comparison on checkpoints with known truth (tests/truth_models.py).

Truth by construction: a block removed, keys re-prefixed with ``model.``, a head
reshaped, a dtype cast, and small CNN / LSTM / MLP / mixed models built from real
torch modules. Parameter counts are recomputed here from the state_dicts.
"""

from __future__ import annotations

import json
import string

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

import torchdiff
from torchdiff.cli import main
from truth_models import (
    BLOCKS, HIDDEN, INTERMEDIATE, VOCAB, TinyTransformer, finetuned, pretrained, training_checkpoint,
)

NAME = "architecture_comparison"


def run(old, new=None, **kwargs):
    if new is None:
        return torchdiff.inspect(old, analyses=[NAME], **kwargs)
    return torchdiff.compare(old, new, analyses=[NAME], **kwargs)


def params(sd) -> int:
    return sum(int(v.numel()) for v in sd.values())


def test_clean_finetune_pair():
    pre, fine = pretrained(), finetuned()
    report = run(pre, fine)
    a = report.analysis(NAME)
    p = params(pre)
    assert p == 36106
    # counts with thousands separators in the headline string; JSON keeps the numbers too
    assert dict(a.headline) == {"family": "transformer->transformer", "params": "36,106->36,106", "blocks": "4->4",
                                "loadable": "strict"}
    assert (a.data["params_old"], a.data["params_new"]) == (p, p)
    assert "architecture_comparison: transformer->transformer, params=36,106->36,106, blocks=4->4, loadable=strict" \
        in str(report)
    assert a.data["added"] == a.data["removed"] == a.data["renames"] == a.data["reshaped"] == a.data["retyped"] == []
    hp = a.data["new"]["hyperparameters"]
    assert hp == {"vocab": VOCAB, "hidden": HIDDEN, "intermediate": INTERMEDIATE}
    assert any(n.startswith("heads: not inferable") for n in a.notes)
    assert a.data["new"]["blocks"] == BLOCKS
    assert a.data["new"]["family_evidence"]["transformer"]["tensors"] == 8 * BLOCKS
    attn = sum(v.numel() for k, v in fine.items() if ".attn." in k)
    assert a.data["new"]["family_evidence"]["transformer"]["share"] == pytest.approx(attn / p)
    # nothing was hashed: no rename candidates
    assert not any(d.extras.get(NAME) for d in report)


def test_block_removed():
    pre, fine = pretrained(), finetuned()
    gone = sorted(k for k in fine if k.startswith("layers.3."))
    for k in gone:
        del fine[k]
    a = run(pre, fine).analysis(NAME)
    assert a.headline["blocks"] == "4->3"
    assert a.headline["loadable"] == "partial"
    assert a.headline["params"] == f"{params(pre):,}->{params(fine):,}"
    assert sorted(a.data["removed"]) == gone
    assert a.data["added"] == a.data["renames"] == []
    assert a.data["loadable_detail"]["missing"] == gone
    assert a.data["params_delta"] == -sum(pre[k].numel() for k in gone)
    rows = {r[0]: r[1:] for r in next(t for t in a.tables if t.title == "Changed parameter groups").rows}
    assert rows == {"layers.3": (sum(pre[k].numel() for k in gone), 0, -sum(pre[k].numel() for k in gone))}


def test_reprefixed_model_is_all_renames():
    fine = finetuned()
    prefixed = {f"model.{k}": v for k, v in fine.items()}
    report = run(fine, prefixed)
    a = report.analysis(NAME)
    assert sorted((r["old"], r["new"]) for r in a.data["renames"]) == sorted((k, f"model.{k}") for k in fine)
    assert a.data["added"] == a.data["removed"] == []
    assert a.headline["loadable"] == "incompatible"
    assert a.headline["renamed"] == len(fine)
    assert a.headline["loadable_after_renames"] == "strict"
    assert a.data["rename_rules"] == [{"old_prefix": "", "new_prefix": "model", "count": len(fine)}]
    assert any("rename rule: (no prefix) -> model. for" in n for n in a.notes)


def test_reprefix_of_identical_tensors_uses_the_learnt_rule():
    torch.manual_seed(0)
    init = {k: v.clone() for k, v in TinyTransformer().state_dict().items()}  # LayerNorms: equal 0s and 1s
    prefixed = {f"encoder.{k}": v for k, v in init.items()}
    a = run(init, prefixed).analysis(NAME)
    assert sorted((r["old"], r["new"]) for r in a.data["renames"]) == sorted((k, f"encoder.{k}") for k in init)
    assert "rename_ambiguous" not in a.data


def test_changed_content_is_not_a_rename():
    fine = finetuned()
    new = {f"model.{k}": v.clone() for k, v in fine.items()}
    new["model.head.weight"] += 0.5
    a = run(fine, new).analysis(NAME)
    assert a.data["added"] == ["model.head.weight"] and a.data["removed"] == ["head.weight"]
    assert len(a.data["renames"]) == len(fine) - 1
    assert a.headline["loadable_after_renames"] == "partial"


def test_reshaped_head_is_incompatible():
    pre, fine = pretrained(), finetuned()
    fine["head.weight"] = torch.zeros(12, HIDDEN)
    fine["head.bias"] = torch.zeros(12)
    a = run(pre, fine).analysis(NAME)
    assert a.headline["loadable"] == "incompatible"
    assert {r["path"] for r in a.data["reshaped"]} == {"head.weight", "head.bias"}
    assert a.data["loadable_detail"]["shape_mismatch"] == ["head.bias", "head.weight"]


def test_retyped_is_loadable():
    fine = finetuned()
    half = {k: v.to(torch.bfloat16) for k, v in fine.items()}
    a = run(fine, half).analysis(NAME)
    assert a.headline["loadable"] == "strict"
    assert len(a.data["retyped"]) == len(fine)
    assert a.data["new"]["params_by_dtype"] == {"bfloat16": params(fine)}
    assert any("changed dtype" in n for n in a.notes)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3)
        self.fc = nn.Linear(32, 10)


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(32, 64, 3)
        self.attn = nn.MultiheadAttention(64, 4)


@pytest.mark.parametrize("module, family", [
    (ConvNet(), "cnn"),
    (nn.LSTM(8, 16, num_layers=2), "rnn"),
    (nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), "mlp"),
    (Mixed(), "mixed"),
    (nn.LayerNorm(8), "unknown"),
])
def test_family(module, family):
    report = run(module.state_dict())
    a = report.analysis(NAME)
    assert a.headline["family"] == family
    assert a.headline["params"] == sum(p.numel() for p in module.parameters())  # buffers are not parameters
    assert str(report).count(f"architecture_comparison: {family}, params=") == 1


def test_lstm_hyperparameters():
    a = run(nn.LSTM(8, 16, num_layers=2).state_dict()).analysis(NAME)
    hp = a.data["new"]["hyperparameters"]
    assert (hp["rnn_cell"], hp["rnn_hidden"], hp["rnn_layers"]) == ("lstm", 16, 2)


def test_training_checkpoint_heads_from_metadata_and_optimizer_apart(tmp_path):
    ckpt = training_checkpoint()
    ckpt["config"] = {"num_attention_heads": 4, "hidden_size": HIDDEN}
    path = tmp_path / "train.pt"
    torch.save(ckpt, path)
    a = run(str(path)).analysis(NAME)
    assert a.headline == {"family": "transformer", "params": params(finetuned()), "blocks": BLOCKS}
    assert a.data["new"]["hyperparameters"]["heads"] == 4
    assert a.data["new"]["hyperparameter_notes"]["heads"] == "metadata config.num_attention_heads = 4"
    n_opt = sum(len(s) for s in ckpt["optimizer"]["state"].values())
    assert any(f"{n_opt} optimizer-state tensors are not counted" in n for n in a.notes)


def test_cli_text_and_json(tmp_path, capsys):
    pre, fine = pretrained(), finetuned()
    old = tmp_path / "old.safetensors"
    new = tmp_path / "new.safetensors"
    save_file(pre, str(old))
    save_file({f"model.{k}": v for k, v in fine.items() if not k.startswith("layers.3.")}, str(new))
    assert main([str(old), str(new), "--architecture-comparison"]) == 0
    out = capsys.readouterr().out
    p_old = params(pre)
    p_new = p_old - sum(v.numel() for k, v in pre.items() if k.startswith("layers.3."))
    assert f"architecture_comparison: transformer->transformer, params={p_old:,}->{p_new:,}, blocks=4->3, " \
           "loadable=incompatible" in out
    assert main([str(old), str(new), "--architecture-comparison", "--output", "json"]) == 0
    (item,) = [i for i in json.loads(capsys.readouterr().out) if i["type"] == NAME]
    assert item["family"] == "transformer->transformer" and item["params_old"] == p_old
    # pre vs fine differ, so no rename; only layers.3 of fine moves to removed
    assert item["renames"] == []


@settings(max_examples=10, deadline=None)
@given(prefix=st.lists(st.text(string.ascii_lowercase + "_", min_size=1, max_size=6), min_size=1, max_size=3))
def test_any_prefix_is_found(prefix):
    fine = finetuned()
    head = ".".join(prefix)
    a = run(fine, {f"{head}.{k}": v for k, v in fine.items()}).analysis(NAME)
    assert len(a.data["renames"]) == len(fine)
    assert a.headline["loadable_after_renames"] == "strict"


def test_quantization_parameters_are_not_model_parameters(tmp_path):
    """A torch.ao dynamic-quantized MLP saves each Linear's output scale and zero point
    beside its weights: they are quantization parameters (names.roles), neither counted
    in params nor read as evidence of attention (a QuantStub's ``q.scale``)."""
    import warnings

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        state = dict(quantized.state_dict())
    state["q.scale"], state["q.zero_point"] = torch.tensor([0.05]), torch.tensor([3])
    torch.save(state, tmp_path / "q.pt")
    arch = torchdiff.inspect(tmp_path / "q.pt", analyses=["architecture_comparison"]).analysis("architecture_comparison")
    assert arch.headline["params"] == 16 * 8 + 8 + 8 * 4 + 4
    assert arch.headline["family"] == "mlp"  # its qint8 weight matrices are the evidence
