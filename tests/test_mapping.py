"""Cross-format pairing (torchdiff.mapping, docs/MAPPING.md).

References are independent of the code under test: the GGUF files are written by gguf's
own GGUFWriter with llama.cpp's permutation (examples/make_llama_gguf.py holds
convert_hf_to_gguf.py's ``permute`` as the converter applies it), quantized values are
decoded by ``gguf.quants.dequantize`` and SQNR computed in float64 NumPy, and each fused
or interleaved layout is built here from its split twin by plain concatenation.
"""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import torchdiff
from torchdiff.mapping import MappingError, apply_mapping, builtin, load_rules, parse_rules
from torchdiff.mapping.transforms import permute_rope, unpermute_rope
from helpers import run  # noqa: E402 - tests/ is on sys.path

gguf = pytest.importorskip("gguf")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
import make_llama_gguf as ml  # noqa: E402

sys.path.pop(0)

CONFIG = ml.CONFIG
N_HEAD, N_KV = CONFIG["num_attention_heads"], CONFIG["num_key_value_heads"]


def items(capsys, *argv):
    code, out, err = run(capsys, *argv, "--output", "json")
    assert code == 0, err
    return json.loads(out)


def mapping_item(found):
    return next(i for i in found if i["type"] == "mapping")


# ---- the rope permutation ------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(heads=st.integers(1, 6), half=st.integers(1, 5), cols=st.integers(0, 4), seed=st.integers(0, 2**16))
def test_permute_rope_is_llama_cpp_permute_and_unpermute_inverts_it(heads, half, cols, seed):
    rows = heads * 2 * half
    shape = (rows, cols) if cols else (rows,)
    x = np.random.default_rng(seed).standard_normal(shape)
    reference = ml.permute(x, heads, heads)  # convert_hf_to_gguf.py's formula, in NumPy
    permuted = permute_rope(torch.from_numpy(x), heads)
    np.testing.assert_array_equal(permuted.numpy(), reference)
    np.testing.assert_array_equal(unpermute_rope(torch.from_numpy(reference), heads).numpy(), x)


# ---- HF <-> GGUF written by the real writer ----------------------------------------------------


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    sd = ml.llama_state_dict(seed=3)
    hf = ml.save_hf(str(d / "hf"), sd)
    f32 = str(d / "f32.gguf")
    ml.save_gguf(f32, sd)
    return d, sd, hf, f32


def test_hf_and_its_f32_gguf_compare_identical_after_mapping(llama, capsys):
    d, sd, hf, f32 = llama
    for old, new in ((hf, f32), (f32, hf)):
        found = items(capsys, old, new)
        assert [i["type"] for i in found] == ["mapping"], "every tensor unchanged: only the mapping item"
        m = mapping_item(found)
        assert (m["name"], m["mapped"], m["unmapped_old"], m["unmapped_new"]) == ("gguf", len(sd), 0, 0)
        assert m["transforms"] == {"unpermute_rope": 2 * CONFIG["num_hidden_layers"]}
        pairs = {p["path"]: p["path_new"] for p in m["pairs"]}
        if old == hf:
            assert pairs["model.layers.1.self_attn.k_proj.weight"] == "blk.1.attn_k.weight"
            assert m["source_side"] == "new"
        else:
            assert pairs["blk.1.attn_k.weight"] == "model.layers.1.self_attn.k_proj.weight"
            assert m["source_side"] == "old"
    report = torchdiff.compare(hf, f32)
    assert {d.status for d in report} == {"unchanged"} and len(report) == len(sd)
    code, out, _ = run(capsys, hf, f32)
    assert code == 0
    assert f"{len(sd)} tensors: 0 changed, 0 added, 0 removed, {len(sd)} unchanged" in out
    assert "mapping: name=gguf, families=hf->gguf, mapped=21" in out


def test_without_the_unpermutation_q_and_k_differ(llama, capsys, tmp_path):
    """The permutation matters: a plain renaming (the rules without unpermute_rope)
    finds Q and K changed, everything else identical."""
    d, sd, hf, f32 = llama
    rules = tmp_path / "names-only.yaml"
    rules.write_text("mapping: names-only\nsource: gguf\ntarget: hf\ndetect: {source: ['^blk\\.']}\nnames: gguf\n")
    found = items(capsys, hf, f32, "--map", rules)
    changed = sorted(i["path"] for i in found if i["type"] == "tensor_changed")
    assert changed == sorted(n for n in sd if n.endswith(("q_proj.weight", "k_proj.weight")))


def test_map_none_pairs_by_name_only(llama, capsys):
    d, sd, hf, f32 = llama
    found = items(capsys, hf, f32, "--map", "none")
    kinds = [i["type"] for i in found]
    assert kinds.count("tensor_removed") == len(sd) and kinds.count("tensor_added") == len(sd)
    assert "mapping" not in kinds


def test_quiet_mode_pairs_through_the_mapping(llama, capsys):
    d, sd, hf, f32 = llama
    assert run(capsys, "-q", hf, f32)[0] == 0
    assert run(capsys, "-q", hf, f32, "--map", "none")[0] == 1


def _q6_k_bytes(rows: int, cols: int, seed: int) -> np.ndarray:
    """Valid Q6_K blocks: random 6-bit quants and scales, a small positive f16 ``d`` per
    block (gguf-py dequantizes K-quants but cannot quantize them)."""
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q6_K]
    raw = np.random.default_rng(seed).integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    raw[..., -2:] = np.frombuffer(np.float16(2e-4).tobytes(), dtype=np.uint8)
    return raw.reshape(rows, cols // block * size)


def _sqnr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return 10 * math.log10(float(np.sum(a * a)) / float(np.sum((b - a) ** 2)))


def test_quantized_gguf_sqnr_through_the_mapping_equals_dequantize(tmp_path, capsys):
    sd = ml.llama_state_dict(seed=5)
    h, inter = CONFIG["hidden_size"], CONFIG["intermediate_size"]
    kraw = _q6_k_bytes(h, inter, seed=1)
    kvalues = gguf.quants.dequantize(kraw, gguf.GGMLQuantizationType.Q6_K)
    assert kvalues.shape == (h, inter)
    # the float model's down_proj near its Q6_K values, so the SQNR is a quantization's
    noise = np.random.default_rng(2).standard_normal(kvalues.shape).astype(np.float32) * 1e-3
    sd["model.layers.1.mlp.down_proj.weight"] = torch.from_numpy(kvalues + noise)
    hf = ml.save_hf(str(tmp_path / "hf"), sd)
    path = str(tmp_path / "q.gguf")
    written = ml.save_gguf(path, sd, types={"blk.0.attn_q.weight": "Q8_0", "blk.1.ffn_down.weight": ("Q6_K", kraw)})
    q8 = gguf.quants.dequantize(written["blk.0.attn_q.weight"], gguf.GGMLQuantizationType.Q8_0)
    # a row permutation leaves norms alone: SQNR(W, unpermute(B)) = SQNR(permute(W), B)
    expected = {
        "model.layers.0.self_attn.q_proj.weight": _sqnr(ml.permute(sd["model.layers.0.self_attn.q_proj.weight"]
                                                                   .numpy(), N_HEAD, N_HEAD), q8),
        "model.layers.1.mlp.down_proj.weight": _sqnr(sd["model.layers.1.mlp.down_proj.weight"].numpy(), kvalues),
    }
    found = items(capsys, hf, path, "--quantization-analysis")
    q = next(i for i in found if i["type"] == "quantization_analysis")
    rows = {r["tensor"]: r for r in q["tensors"]}
    for name, value in expected.items():
        assert rows[name]["sqnr_db"] == pytest.approx(value, abs=1e-6), name
    assert rows["model.layers.0.self_attn.q_proj.weight"]["scheme"] == "GGUF Q8_0"
    assert rows["model.layers.1.mlp.down_proj.weight"]["scheme"] == "GGUF Q6_K"
    retyped = {i["path"]: i for i in found if i["type"] == "tensor_retyped"}
    assert set(retyped) == set(expected)
    assert retyped["model.layers.0.self_attn.q_proj.weight"]["path_new"] == "blk.0.attn_q.weight"
    changed = [i for i in found if i["type"] == "tensor_changed"]
    assert changed == [], "every F32 tensor is identical through the mapping"


def test_tied_head_is_reported_tied_not_removed(tmp_path, capsys):
    sd = ml.llama_state_dict(seed=7, lm_head=False)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()  # a state_dict of a tied model
    hf = ml.save_hf(str(tmp_path / "hf"), sd)
    path = str(tmp_path / "tied.gguf")
    ml.save_gguf(path, {k: v for k, v in sd.items() if k != "lm_head.weight"})  # llama.cpp omits output
    found = items(capsys, hf, path)
    m = mapping_item(found)
    assert m["tied"] == 1 and m["unmapped_old"] == 0 and m["unmapped_new"] == 0
    assert m["tied_names"] == [{"head": "lm_head.weight", "embedding": "token_embd.weight", "missing_on": "new"}]
    assert [i["type"] for i in found] == ["mapping"], "the head compares equal to the embedding it is tied to"
    code, out, _ = run(capsys, hf, path)
    assert "tied: lm_head.weight is absent on the new side; compared with its embedding token_embd.weight" in out


def test_a_head_the_hf_file_dropped_pairs_with_the_ggufs_output(tmp_path, capsys):
    """An HF model saved with tie_word_embeddings (save_pretrained writes no lm_head) against
    a GGUF that stores output.weight (a copy of the embedding): the GGUF's head pairs with
    the HF side's tied head, the embedding's values, in both directions (it was 'added')."""
    sd = ml.llama_state_dict(seed=7, lm_head=False)
    hf = ml.save_hf(str(tmp_path / "hf"), sd, config={**CONFIG, "tie_word_embeddings": True})
    path = str(tmp_path / "with_output.gguf")
    ml.save_gguf(path, {**sd, "lm_head.weight": sd["model.embed_tokens.weight"].clone()})
    for a, b in ((hf, path), (path, hf)):
        found = items(capsys, a, b)
        m = mapping_item(found)
        assert m["unmapped_old"] == 0 and m["unmapped_new"] == 0
        assert [i["type"] for i in found] == ["mapping"], "every tensor, the head included, compares equal"


def test_unmapped_tensors_show_as_added_and_removed(llama, tmp_path, capsys):
    d, sd, hf, f32 = llama
    extra = dict(sd)
    extra["model.layers.0.self_attn.extra_gate.weight"] = torch.ones(3)
    old = ml.save_hf(str(tmp_path / "hf"), extra)
    found = items(capsys, old, f32)
    assert [(i["type"], i["path"]) for i in found if i["type"].startswith("tensor")] == [
        ("tensor_removed", "model.layers.0.self_attn.extra_gate.weight")]
    m = mapping_item(found)
    assert m["unmapped_old_names"] == ["model.layers.0.self_attn.extra_gate.weight"] and m["unmapped_new"] == 0


def test_same_family_comparisons_have_no_mapping(llama, capsys):
    d, sd, hf, f32 = llama
    found = items(capsys, hf, hf)
    assert found == []


# ---- a rule file reproduces the built-in family --------------------------------------------------


LLAMA_RULES = r"""
mapping: my-llama
source: gguf
target: hf
detect: {source: ['^blk\.\d+\.']}
rules:
  - {match: '^token_embd\.weight$', name: model.embed_tokens.weight}
  - {match: '^output_norm\.weight$', name: model.norm.weight}
  - {match: '^output\.weight$', name: lm_head.weight}
  - match: '^blk\.(\d+)\.attn_q\.weight$'
    name: 'model.layers.\1.self_attn.q_proj.weight'
    transforms: [{unpermute_rope: {heads: 4}}]
  - match: '^blk\.(\d+)\.attn_k\.weight$'
    name: 'model.layers.\1.self_attn.k_proj.weight'
    transforms: [{unpermute_rope: {heads: llama.attention.head_count_kv}}]
  - {match: '^blk\.(\d+)\.attn_v\.weight$', name: 'model.layers.\1.self_attn.v_proj.weight'}
  - {match: '^blk\.(\d+)\.attn_output\.weight$', name: 'model.layers.\1.self_attn.o_proj.weight'}
  - {match: '^blk\.(\d+)\.attn_norm\.weight$', name: 'model.layers.\1.input_layernorm.weight'}
  - {match: '^blk\.(\d+)\.ffn_norm\.weight$', name: 'model.layers.\1.post_attention_layernorm.weight'}
  - {match: '^blk\.(\d+)\.ffn_(gate|up|down)\.weight$', name: 'model.layers.\1.mlp.\2_proj.weight'}
tied: {head: lm_head.weight, embedding: model.embed_tokens.weight}
"""


def test_a_rule_file_reproduces_the_builtin_gguf_family(tmp_path, capsys):
    sd = ml.llama_state_dict(seed=11)
    hf = ml.save_hf(str(tmp_path / "hf"), sd)
    path = str(tmp_path / "q.gguf")
    ml.save_gguf(path, sd, types={"blk.1.attn_k.weight": "Q8_0", "blk.0.ffn_up.weight": "Q8_0"})
    rules = tmp_path / "llama.yaml"
    rules.write_text(LLAMA_RULES)
    builtin_items = items(capsys, hf, path, "--quantization-analysis")
    file_items = items(capsys, hf, path, "--quantization-analysis", "--map", rules)
    named_items = items(capsys, hf, path, "--quantization-analysis", "--map", "gguf")
    strip = ("name", "description", "evidence", "rule_file", "notes")
    a, b = mapping_item(builtin_items), mapping_item(file_items)
    assert {k: v for k, v in a.items() if k not in strip} == {k: v for k, v in b.items() if k not in strip}
    assert [i for i in builtin_items if i["type"] != "mapping"] == [i for i in file_items if i["type"] != "mapping"]
    assert named_items == builtin_items
    assert b["rule_file"] == str(rules) and b["name"] == "my-llama"
    assert len([i for i in file_items if i["type"] == "tensor_retyped"]) == 2


def test_builtin_families_load_and_are_packaged():
    import configparser

    names = torchdiff.mapping.builtin_names()
    assert {"gguf", "hf-gpt2-nanogpt", "fused-split", "megatron-hf"} <= set(names)
    for n in names:
        assert builtin(n).rules or builtin(n).names
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    assert "mapping/rules/*.yaml" in cfg["options.package_data"]["torchdiff"]


# ---- fused and split layouts ---------------------------------------------------------------


def _split_llama(seed=13):
    return {k: v for k, v in ml.llama_state_dict(seed=seed).items()}


def _fused(sd):
    out = {}
    for k, v in sd.items():
        if ".self_attn.q_proj." in k:
            p = k.replace("q_proj", "{}")
            out[p.format("qkv_proj")] = torch.cat([sd[p.format(x)] for x in ("q_proj", "k_proj", "v_proj")])
        elif ".mlp.gate_proj." in k:
            p = k.replace("gate_proj", "{}")
            out[p.format("gate_up_proj")] = torch.cat([sd[p.format(x)] for x in ("gate_proj", "up_proj")])
        elif not any(s in k for s in (".k_proj.", ".v_proj.", ".up_proj.")):
            out[k] = v
    return out


@pytest.mark.parametrize("fused_first", [True, False])
def test_fused_checkpoint_against_its_split_twin_is_identical(tmp_path, capsys, fused_first):
    sd = _split_llama()
    split = str(tmp_path / "split.safetensors")
    fused = str(tmp_path / "fused.safetensors")
    save_file(sd, split)
    save_file(_fused(sd), fused)
    old, new = (fused, split) if fused_first else (split, fused)
    found = items(capsys, old, new)
    assert [i["type"] for i in found] == ["mapping"]
    m = mapping_item(found)
    assert m["name"] == "fused-split" and m["mapped"] == len(sd)
    assert m["transforms"] == {"split": 4}
    pairs = {p["path"]: p["path_new"] for p in m["pairs"]}
    hd = CONFIG["hidden_size"] // N_HEAD
    q, kv = N_HEAD * hd, N_KV * hd
    key = f"model.layers.0.self_attn.qkv_proj.weight[{q}:{q + kv}]"
    if fused_first:
        assert pairs[key] == "model.layers.0.self_attn.k_proj.weight"
    else:
        assert pairs["model.layers.0.self_attn.k_proj.weight"] == key


def test_a_changed_piece_of_a_fused_tensor_is_found_in_its_split_name(tmp_path, capsys):
    sd = _split_llama()
    fused = _fused(sd)
    fused["model.layers.1.self_attn.qkv_proj.weight"][-1, 0] += 1.0  # the last row belongs to v_proj
    save_file(sd, str(tmp_path / "split.safetensors"))
    save_file(fused, str(tmp_path / "fused.safetensors"))
    found = items(capsys, tmp_path / "split.safetensors", tmp_path / "fused.safetensors")
    changed = [(i["path"], i["path_new"]) for i in found if i["type"] == "tensor_changed"]
    hd = CONFIG["hidden_size"] // N_HEAD
    start = (N_HEAD + N_KV) * hd
    assert changed == [("model.layers.1.self_attn.v_proj.weight",
                        f"model.layers.1.self_attn.qkv_proj.weight[{start}:{start + N_KV * hd}]")]


# ---- Megatron's grouped-query interleaving ------------------------------------------------------


def _megatron(sd, heads=N_HEAD, kv=N_KV):
    """Megatron-Core names; linear_qkv per query group: that group's query heads, then its
    key head, then its value head."""
    hd = CONFIG["hidden_size"] // heads
    per = heads // kv
    out = {"embedding.word_embeddings.weight": sd["model.embed_tokens.weight"],
           "decoder.final_layernorm.weight": sd["model.norm.weight"], "output_layer.weight": sd["lm_head.weight"]}
    for i in range(CONFIG["num_hidden_layers"]):
        p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        q, k, v = (sd[p + f"self_attn.{x}_proj.weight"] for x in "qkv")
        rows = []
        for g in range(kv):
            rows += [q[g * per * hd:(g + 1) * per * hd], k[g * hd:(g + 1) * hd], v[g * hd:(g + 1) * hd]]
        out[m + "self_attention.linear_qkv.weight"] = torch.cat(rows)
        out[m + "self_attention.linear_qkv.layer_norm_weight"] = sd[p + "input_layernorm.weight"]
        out[m + "self_attention.linear_proj.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[m + "mlp.linear_fc1.weight"] = torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]])
        out[m + "mlp.linear_fc1.layer_norm_weight"] = sd[p + "post_attention_layernorm.weight"]
        out[m + "mlp.linear_fc2.weight"] = sd[p + "mlp.down_proj.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def test_megatron_linear_qkv_with_heads_from_flag_or_config(tmp_path, capsys):
    sd = ml.llama_state_dict(seed=17)
    hf_plain = str(tmp_path / "plain.safetensors")
    save_file(sd, hf_plain)  # no config.json beside it
    hf = ml.save_hf(str(tmp_path / "hf"), sd)  # with config.json
    meg = str(tmp_path / "megatron.safetensors")
    save_file(_megatron(sd), meg)
    for argv in ((meg, hf_plain, "--map-heads", "4,2"), (meg, hf), (hf, meg)):
        found = items(capsys, *argv)
        assert [i["type"] for i in found] == ["mapping"], argv
        m = mapping_item(found)
        assert m["name"] == "megatron-hf" and m["mapped"] == len(sd)
        assert m["transforms"] == {"megatron_qkv": 2, "split": 2}
    code, out, err = run(capsys, meg, hf_plain, "--map", "megatron-hf")
    assert code == 2
    assert err.strip().endswith(
        "megatron_qkv heads not found in the metadata (looked for map.heads, config.num_attention_heads; "
        "pass --map-heads HEADS,KV_HEADS)")
    # wrong head counts interleave wrongly: found as changed, not hidden
    found = items(capsys, meg, hf_plain, "--map-heads", "8,4")
    assert any(i["type"] == "tensor_changed" for i in found)
    # head counts that do not fit: no mapping, and the output says why
    found = items(capsys, meg, hf_plain, "--map-heads", "4,4")
    m = mapping_item(found)
    assert m["name"] == "none" and m["mapped"] == 0
    assert any(e.startswith("not used: megatron-hf: ") and "megatron_qkv with heads=4, kv_heads=4" in e
               for e in m["evidence"])
    assert sum(i["type"] == "tensor_removed" for i in found) == len(_megatron(sd))


# ---- HF GPT-2 (Conv1D) and nanoGPT (Linear) -------------------------------------------------------


def _gpt2(n=16, layers=2, vocab=50, ctx=8, seed=19):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    hf = {"wte.weight": r(vocab, n), "wpe.weight": r(ctx, n), "ln_f.weight": r(n), "ln_f.bias": r(n)}
    for i in range(layers):
        p = f"h.{i}."
        hf.update({p + "ln_1.weight": r(n), p + "ln_1.bias": r(n), p + "ln_2.weight": r(n), p + "ln_2.bias": r(n),
                   p + "attn.c_attn.weight": r(n, 3 * n), p + "attn.c_attn.bias": r(3 * n),
                   p + "attn.c_proj.weight": r(n, n), p + "attn.c_proj.bias": r(n),
                   p + "mlp.c_fc.weight": r(n, 4 * n), p + "mlp.c_fc.bias": r(4 * n),
                   p + "mlp.c_proj.weight": r(4 * n, n), p + "mlp.c_proj.bias": r(n)})
    nano = {}
    for k, v in hf.items():
        conv = k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))
        nano["transformer." + k] = v.t().contiguous() if conv else v
    nano["lm_head.weight"] = hf["wte.weight"]
    return hf, nano


def test_hf_gpt2_conv1d_against_nanogpt_linear(tmp_path, capsys):
    hf, nano = _gpt2()
    save_file(hf, str(tmp_path / "hf.safetensors"))
    torch.save(nano, str(tmp_path / "nano.pt"))
    found = items(capsys, tmp_path / "hf.safetensors", tmp_path / "nano.pt")
    assert [i["type"] for i in found] == ["mapping"]
    m = mapping_item(found)
    assert m["name"] == "hf-gpt2-nanogpt" and m["families"] == "hf-gpt2->nanogpt"
    assert m["transforms"] == {"transpose": 4 * 2} and m["tied"] == 1 and m["mapped"] == len(nano)
    assert any(e.startswith("old is hf-gpt2: h.0.attn.c_attn.weight [16, 48]") for e in m["evidence"])


# ---- hostile rule files: one line, exit 2 ---------------------------------------------------------


def _hostile(tmp_path, text):
    p = tmp_path / "rules.yaml"
    p.write_text(text)
    return p


def test_bad_regex_is_one_line_exit_2(llama, tmp_path, capsys):
    d, sd, hf, f32 = llama
    rules = _hostile(tmp_path, "rules:\n  - match: 'blk\\.(\\d+'\n    name: x\n")
    code, out, err = run(capsys, hf, f32, "--map", rules)
    assert (code, out) == (2, "")
    assert err == (f"torchdiff: error: {rules}: rule 1: bad regex 'blk\\.(\\d+' "
                   "(missing ), unterminated subpattern at position 5)\n")


def test_transform_that_does_not_fit_is_one_line_exit_2(llama, tmp_path, capsys):
    d, sd, hf, f32 = llama
    rules = _hostile(tmp_path, "names: gguf\nrules:\n  - match: '^blk\\.0\\.attn_q\\.weight$'\n"
                               "    transforms: [{unpermute_rope: {heads: 3}}]\n")
    code, out, err = run(capsys, hf, f32, "--map", rules)
    assert (code, out) == (2, "")
    assert err == (f"torchdiff: error: {rules}: rule 1 ('^blk\\.0\\.attn_q\\.weight$') does not fit "
                   "blk.0.attn_q.weight (shape [32, 32]): unpermute_rope with heads=3: 32 rows are not a multiple "
                   "of 2·heads = 6\n")


def test_split_sizes_that_do_not_add_up_are_one_line_exit_2(tmp_path, capsys):
    sd = _split_llama()
    save_file(sd, str(tmp_path / "split.safetensors"))
    save_file(_fused(sd), str(tmp_path / "fused.safetensors"))
    rules = _hostile(tmp_path, "rules:\n  - match: '^(.*)\\.gate_up_proj\\.weight$'\n"
                               "    name: ['\\1.gate_proj.weight', '\\1.up_proj.weight']\n"
                               "    transforms: [{split: {dim: 0, sizes: [256, 200]}}]\n")
    code, out, err = run(capsys, tmp_path / "fused.safetensors", tmp_path / "split.safetensors", "--map", rules)
    assert code == 2 and err.count("\n") == 1
    assert err.endswith("does not fit model.layers.0.mlp.gate_up_proj.weight (shape [512, 32]): split sizes "
                        "[256, 200] do not add up to dimension 0 of shape [512, 32] (512)\n")


def test_cycle_is_one_line_exit_2(tmp_path, capsys):
    a = {"x.weight": torch.ones(2), "y.weight": torch.zeros(2)}
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(a, str(tmp_path / "b.safetensors"))
    rules = _hostile(tmp_path, "rules:\n  - {match: '^x\\.weight$', name: y.weight}\n"
                               "  - {match: '^y\\.weight$', name: x.weight}\n")
    code, out, err = run(capsys, tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--map", rules)
    assert (code, out) == (2, "")
    assert err == (f"torchdiff: error: {rules}: the rules form a cycle: x.weight -> y.weight -> x.weight "
                   "(each rule's output is another rule's input; rename each tensor once)\n")


@pytest.mark.parametrize("text, message", [
    ("rules: 3\n", "'rules' must be a list of rules"),
    ("rules:\n  - match: a\n    transforms: [rotate]\n",
     "rule 1 ('a'): unknown transform 'rotate' (known: concat, dtype, megatron_qkv, permute_rope, reshape, split, "
     "transpose, unpermute_rope)"),
    ("rules:\n  - match: '(a)'\n    name: '\\2'\n", "rule 1 ('(a)'): name '\\2' refers to group \\2, the regex has 1"),
    ("rules:\n  - match: a\n    name: [b, c]\n", "rule 1 ('a'): the transforms produce 1 tensor but 'name' lists 2"),
    ("rules: [\n", "not a valid YAML rule file"),
    ("rulez: []\n", "unknown key 'rulez'"),
])
def test_malformed_rule_files_are_refused_before_reading_checkpoints(tmp_path, capsys, text, message):
    rules = _hostile(tmp_path, text)
    code, out, err = run(capsys, tmp_path / "missing-a.pt", tmp_path / "missing-b.pt", "--map", rules)
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_map_option_errors(capsys, tmp_path):
    code, _, err = run(capsys, "a.pt", "b.pt", "--map", tmp_path / "nope.yaml")
    assert code == 2 and "no such rule file" in err
    code, _, err = run(capsys, "a.pt", "b.pt", "--map-heads", "4,x")
    assert code == 2 and err == "torchdiff: error: --map-heads '4,x': give HEADS or HEADS,KV_HEADS (positive whole numbers)\n"


def test_apply_mapping_is_lazy_and_leaves_inputs_alone():
    """Nothing is read while mapping; the inputs' handles are not modified."""
    from torchdiff.formats import from_object

    reads = []
    sd = _split_llama()
    old = from_object(_fused(sd))
    new = from_object(sd)
    for h in old.tensors.values():
        read = h.materialize
        h.materialize = (lambda read=read, name=h.name: reads.append(name) or read())
    before = {k: (h.name, h.shape) for k, h in old.tensors.items()}
    mo, mn, report = apply_mapping(old, new, "auto")
    assert reads == [] and report.name == "fused-split"
    assert {k: (h.name, h.shape) for k, h in old.tensors.items()} == before
    piece = mo.tensors["model.layers.0.mlp.gate_up_proj.weight[256:512]"]
    assert torch.equal(piece.materialize(), sd["model.layers.0.mlp.up_proj.weight"])
    assert reads == ["model.layers.0.mlp.gate_up_proj.weight"]


def test_parse_rules_rejects_a_detect_entry_with_a_bad_shape():
    with pytest.raises(MappingError, match=r"shape term 'd\+1' is not an integer, a symbol, k\*symbol or _"):
        parse_rules({"detect": {"source": [{"match": "a", "shape": ["d+1"]}]}, "rules": [{"match": "a"}]}, "r.yaml")
    with pytest.raises(MappingError, match="no such rule file"):
        load_rules("/nonexistent/rules.yaml")


def test_two_tensors_onto_one_name_is_one_line_exit_2(tmp_path, capsys):
    save_file({"a.weight": torch.ones(2), "b.weight": torch.zeros(2)}, str(tmp_path / "old.safetensors"))
    save_file({"c.weight": torch.ones(2)}, str(tmp_path / "new.safetensors"))
    rules = _hostile(tmp_path, "rules:\n  - {match: '^(a|b)\\.weight$', name: c.weight}\n")
    code, out, err = run(capsys, tmp_path / "old.safetensors", tmp_path / "new.safetensors", "--map", rules)
    assert (code, out) == (2, "")
    assert err == (f"torchdiff: error: {rules}: a.weight and b.weight both map to c.weight "
                   "(one tensor of the other side can pair with one tensor only)\n")


def test_concat_rule_joins_split_tensors_onto_the_fused_name(tmp_path, capsys):
    sd = _split_llama()
    save_file(sd, str(tmp_path / "split.safetensors"))
    save_file(_fused(sd), str(tmp_path / "fused.safetensors"))
    rules = _hostile(tmp_path, (
        "source: split\ntarget: fused\nrules:\n"
        "  - match: '^(.*)\\.q_proj\\.weight$'\n"
        "    with: ['\\1.k_proj.weight', '\\1.v_proj.weight']\n"
        "    name: '\\1.qkv_proj.weight'\n"
        "    transforms: [concat]\n"
        "  - match: '^(.*)\\.gate_proj\\.weight$'\n"
        "    with: ['\\1.up_proj.weight']\n"
        "    name: '\\1.gate_up_proj.weight'\n"
        "    transforms: [{concat: {dim: 0}}]\n"))
    found = items(capsys, tmp_path / "split.safetensors", tmp_path / "fused.safetensors", "--map", rules)
    assert [i["type"] for i in found] == ["mapping"]
    m = mapping_item(found)
    assert m["transforms"] == {"concat": 4} and m["source_side"] == "old"
    pairs = {p["path"]: p["path_new"] for p in m["pairs"]}
    joined = "+".join(f"model.layers.0.self_attn.{x}_proj.weight" for x in "qkv")
    assert pairs[joined] == "model.layers.0.self_attn.qkv_proj.weight"


def test_tied_head_either_way_round(tmp_path, capsys):
    """GGUF old without output.weight against HF new with lm_head: the pair is named
    after the head, the GGUF side's embedding stands in for it."""
    sd = ml.llama_state_dict(seed=23, lm_head=False)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    hf = ml.save_hf(str(tmp_path / "hf"), sd)
    path = str(tmp_path / "tied.gguf")
    ml.save_gguf(path, {k: v for k, v in sd.items() if k != "lm_head.weight"})
    found = items(capsys, path, hf)
    m = mapping_item(found)
    assert [i["type"] for i in found] == ["mapping"]
    assert m["tied_names"] == [{"head": "lm_head.weight", "embedding": "token_embd.weight", "missing_on": "old"}]
    assert {"path": "lm_head.weight", "path_new": "lm_head.weight", "transforms": [],
            "tied": "old side: token_embd.weight"} in m["pairs"]
    sd2 = dict(sd)
    sd2["lm_head.weight"] = sd["lm_head.weight"] + 1  # not in fact tied: the values say so
    changed = [i for i in items(capsys, path, ml.save_hf(str(tmp_path / "hf2"), sd2)) if i["type"] == "tensor_changed"]
    assert [(i["path"], i["path_new"], i["tied"]) for i in changed] == [
        ("lm_head.weight", "lm_head.weight", "old side: token_embd.weight")]
