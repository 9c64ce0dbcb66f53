"""Pairing names across wrappers: nn.DataParallel / DDP's ``module.`` and torch.compile's
``_orig_mod.`` are dropped from the side that has them when the other has none and
that pairs more names; the report says so. Truth by construction: the same weights
saved with and without the wrapper."""

from __future__ import annotations

import json

import pytest
import torch

import torchdiff
from torchdiff.cli import main
from torchdiff.formats.base import Checkpoint, tensor_handle
from torchdiff.pairing import drop_prefix, dropped_wrappers, pair


def _model_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"embed.weight": torch.randn(8, 4, generator=g), "blocks.0.fc.weight": torch.randn(4, 4, generator=g),
            "blocks.0.fc.bias": torch.randn(4, generator=g), "head.weight": torch.randn(3, 4, generator=g)}


@pytest.mark.parametrize("old,new,want", [
    (["module.a", "module.b.c"], ["a", "b.c"], (("module",), ())),
    (["a"], ["_orig_mod.a"], ((), ("_orig_mod",))),
    (["module._orig_mod.a", "module._orig_mod.b"], ["a", "b"], (("module", "_orig_mod"), ())),
    (["model._orig_mod.x", "model._orig_mod.y", "iter"], ["model.x", "model.y"], (("_orig_mod",), ())),  # nanoGPT
    (["module.a"], ["module.a"], ((), ())),  # both wrapped: already paired
    (["module.a"], ["b.module.c"], ((), ())),  # the other side has the segment too
    (["enc.module.w", "w"], ["w"], ((), ())),  # dropping would meet a name held: nothing gained
    (["x.module"], ["x"], ((), ())),  # a last component is a tensor's own name, never a wrapper
    (["a", "b"], ["c", "d"], ((), ())),
    ([], [], ((), ())),
    (["module.a", "module.b"], ["_orig_mod.a", "_orig_mod.b"], (("module",), ("_orig_mod",))),  # DDP vs compiled
    (["module.a", "b"], ["_orig_mod.a", "b"], (("module",), ("_orig_mod",))),
])
def test_dropped_wrappers(old, new, want):
    assert dropped_wrappers(old, new) == want


def test_ddp_and_compiled_checkpoints_pair_with_plain_ones(write_pt, capsys):
    a, b = _model_state(0), _model_state(1)
    ddp = write_pt("ddp.pt", {f"module.{k}": v for k, v in a.items()})
    compiled = write_pt("nanogpt.pt", {"model": {f"_orig_mod.{k}": v for k, v in b.items()}, "iter_num": 2000})
    plain = write_pt("plain.pt", {"model": a, "iter_num": 1000})
    report = torchdiff.compare(ddp, write_pt("a.pt", a))
    assert {d.status for d in report} == {"unchanged"} and len(report) == len(a)
    assert report.analysis("pairing").headline == {"dropped_wrapper": "module.", "wrapper_side": "old"}
    report = torchdiff.compare(plain, compiled)
    by_name = {d.name: d for d in report}
    assert sorted(by_name) == sorted(f"model.{k}" for k in a)
    for k in a:  # every figure is the one of the same tensors without the wrapper
        m = by_name[f"model.{k}"].metrics
        d64 = b[k].double() - a[k].double()
        assert m.l2 == pytest.approx(float(d64.norm()), rel=1e-6)
        assert m.max_abs == pytest.approx(float(d64.abs().max()), rel=1e-6)
    pairing = report.analysis("pairing")
    assert pairing.data == {"new_wrappers": ["_orig_mod."]}
    assert pairing.notes == (f"paired names with _orig_mod. dropped from the new side ({compiled}): the names "
                             "torch.compile gives a model it wraps",)
    assert main([str(plain), str(compiled), "-o", "json"]) in (0, 1)
    items = json.loads(capsys.readouterr().out)
    item = next(i for i in items if i["type"] == "pairing")
    assert item["dropped_wrapper"] == "_orig_mod." and item["wrapper_side"] == "new"
    assert not any(i["type"] in ("tensor_added", "tensor_removed") for i in items)


def test_a_tie_the_file_dropped_follows_the_wrapper():
    """A tied name the file does not hold (safetensors' save_model drops duplicates) is
    renamed with the names it is tied to."""
    w = torch.ones(3, 2)
    old = Checkpoint("old", "safetensors", {"module.wte.weight": tensor_handle("module.wte.weight", w)},
                     ties={"module.lm_head.weight": "module.wte.weight"})
    new = Checkpoint("new", "safetensors", {n: tensor_handle(n, w.clone()) for n in ("wte.weight", "lm_head.weight")})
    old2, new2, dropped = drop_prefix(old, new)
    assert dropped.old_wrappers == ("module",) and not dropped.new_wrappers
    assert list(old2.tensors) == ["wte.weight"] and old2.ties == {"lm_head.weight": "wte.weight"}
    pairs = {p.name: p for p in pair(old2, new2)}
    assert set(pairs) == {"wte.weight", "lm_head.weight"}
    assert pairs["lm_head.weight"].old.tied_to == "wte.weight"


def test_a_lightning_checkpoint_pairs_with_the_exported_weights(write_pt, tmp_path):
    """Lightning keeps the model under ``state_dict`` (and ``model.`` below it when the
    LightningModule holds ``self.model``): a training checkpoint's container key."""
    from safetensors.torch import save_file

    a, b = _model_state(0), _model_state(1)
    ckpt = write_pt("epoch=3.ckpt", {"epoch": 3, "global_step": 300, "state_dict": {f"model.{k}": v for k, v in a.items()},
                                     "optimizer_states": [], "hyper_parameters": {"lr": 1e-3}})
    save_file(b, str(tmp_path / "export.safetensors"))
    report = torchdiff.compare(ckpt, tmp_path / "export.safetensors")
    assert sorted(d.name for d in report) == sorted(a) and {d.status for d in report} == {"changed"}
    assert report.analysis("pairing").headline == {"dropped_prefix": "state_dict.model.", "side": "old"}


def test_loadability_is_judged_on_the_names_the_files_store(write_pt):
    """Pairing drops ``module.``; load_state_dict would not: the architecture analysis
    says the names differ as stored (renames), and that they load once renamed."""
    a = _model_state(0)
    report = torchdiff.compare(write_pt("ddp.pt", {f"module.{k}": v for k, v in a.items()}), write_pt("a.pt", a),
                               analyses=["architecture_comparison"])
    arch = report.analysis("architecture_comparison")
    assert arch.headline["loadable"] == "incompatible" and arch.headline["loadable_after_renames"] == "strict"
    assert arch.data["renames"] == [{"old": f"module.{k}", "new": k} for k in sorted(a)]
    assert arch.data["rename_rules"] == [{"old_prefix": "module", "new_prefix": "", "count": len(a)}]
    assert arch.data["loadable_detail"]["unexpected"] == sorted(a)


def test_a_container_and_a_wrapper_together_pair_with_plain_weights(write_pt):
    """nanoGPT-style ``{"model": compiled.state_dict()}`` and ``{"model": ddp.state_dict()}``
    against the plain state_dict, whose own names start with ``model.`` (an HF
    ``LlamaForCausalLM``: ``model.layers...``, ``lm_head.weight``): ``model.`` is dropped,
    then the wrapper segment; float64 reference for every figure."""
    a = {f"model.{k}": v for k, v in _model_state(0).items()} | {"lm_head.weight": torch.ones(3, 4)}
    b = {k: v + 0.5 for k, v in a.items()}
    plain = write_pt("plain.pt", b)
    for wrapper in ("_orig_mod", "module"):
        wrapped = write_pt(f"{wrapper}.pt", {"model": {f"{wrapper}.{k}": v for k, v in a.items()},
                                             "iter_num": 3, "best_val_loss": 3.2})
        report = torchdiff.compare(wrapped, plain)
        by_name = {d.name: d for d in report}
        assert sorted(by_name) == sorted(a), wrapper
        for k in a:
            d64 = b[k].double() - a[k].double()
            assert by_name[k].metrics.l2 == pytest.approx(float(d64.norm()), rel=1e-6)
        assert report.analysis("pairing").headline == {"dropped_prefix": "model.", "side": "old",
                                                       "dropped_wrapper": f"{wrapper}.", "wrapper_side": "old"}


def test_a_tied_weight_one_file_dropped_pairs_with_its_target(write_pt, tmp_path):
    """save_pretrained writes each tied weight once, whichever it is (BERT's
    cls.predictions.decoder.weight and .bias, T5's embed_tokens, Whisper's proj_out),
    config.json or not; a .bin of the same model holds both names on one storage. The
    .bin's tie says which tensor the missing name is: the same model compares equal."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    emb, bias = torch.randn(10, 4, generator=g), torch.randn(10, generator=g)
    state = {"embeddings.word.weight": emb, "cls.predictions.bias": bias, "cls.transform.weight": torch.randn(4, 4),
             "cls.predictions.decoder.weight": emb, "cls.predictions.decoder.bias": bias}
    binary = write_pt("pytorch_model.bin", state)
    kept = {k: v.clone() for k, v in state.items() if "decoder" not in k}
    save_file(kept, str(tmp_path / "model.safetensors"))
    for old, new in ((binary, tmp_path / "model.safetensors"), (tmp_path / "model.safetensors", binary)):
        report = torchdiff.compare(old, new, analyses=["change_summary"])
        assert {d.name: d.status for d in report} == dict.fromkeys(state, "unchanged")
        assert not report.has_differences
        tied = {d.name: d.extras["tied_to"] for d in report if "tied_to" in d.extras}
        assert tied == {"cls.predictions.decoder.weight": {"old": "embeddings.word.weight",
                                                           "new": "embeddings.word.weight"},
                        "cls.predictions.decoder.bias": {"old": "cls.predictions.bias", "new": "cls.predictions.bias"}}
        counts = report.analysis("change_summary").data["param_counts"]
        assert counts["unchanged"] == 40 + 10 + 16  # each tied weight once


def test_a_ddp_checkpoint_pairs_with_a_compiled_one_both_sides_named(write_pt):
    """Each side drops its own wrapper (they were 2 added + 2 removed): the section names
    both sides, a note each; the figures are those of the unwrapped tensors."""
    a, b = _model_state(0), _model_state(1)
    ddp = write_pt("ddp.pt", {f"module.{k}": v for k, v in a.items()})
    compiled = write_pt("compiled.pt", {f"_orig_mod.{k}": v for k, v in b.items()})
    report = torchdiff.compare(ddp, compiled)
    assert sorted(d.name for d in report) == sorted(a) and {d.status for d in report} == {"changed"}
    for d in report:
        assert d.metrics.l2 == pytest.approx(float((b[d.name].double() - a[d.name].double()).norm()), rel=1e-6)
    pairing = report.analysis("pairing")
    assert pairing.headline == {"dropped_wrapper": "module., _orig_mod.", "wrapper_side": "old, new"}
    assert pairing.data == {"old_wrappers": ["module."], "new_wrappers": ["_orig_mod."]}
    assert len(pairing.notes) == 2 and "from the old side" in pairing.notes[0] and "from the new side" in pairing.notes[1]
