"""Sweep of the non-PyTorch formats, quantized checkpoints and cross-format pairing, on
files written by the real libraries (transformers' save_pretrained, gguf's GGUFWriter and
gguf.quants, numpy, safetensors). References are independent of torchdiff: values decoded
by ``gguf.quants.dequantize`` or read by ``np.load``, figures recomputed in float64 NumPy,
byte counts from ``gguf.GGUFReader``."""

from __future__ import annotations

import io
import json
import math
import pickle
import zipfile

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import torchdiff
from helpers import run  # noqa: E402 - tests/ is on sys.path

gguf = pytest.importorskip("gguf")


def items(capsys, *argv):
    code, out, err = run(capsys, *argv, "--output", "json")
    assert code == 0 and err == "", err
    return json.loads(out)


def item(found, kind):
    return next(i for i in found if i["type"] == kind)


# ---- a tiny Llama: transformers' save_pretrained, and llama.cpp's GGUF of it ------------------

HEADS, KV_HEADS = 4, 2


def permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py, LlamaModel.permute (ggml-org/llama.cpp), as the converter applies it."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama(folder, *, tie: bool, qtype=None) -> tuple[dict[str, np.ndarray], int]:
    """An HF LlamaForCausalLM (model.safetensors) and its GGUF (model.gguf) named and
    permuted as llama.cpp's converter does; a tied model's GGUF has no output.weight.
    Returns the HF state_dict and the model's parameter count (a tied weight once)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                                   tie_word_embeddings=tie)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.05)
    model.save_pretrained(str(folder))
    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    w = gguf.GGUFWriter(str(folder / "model.gguf"), "llama")
    w.add_block_count(2)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_context_length(256)
    for name, data in sd.items():
        if tie and name == "lm_head.weight":
            continue
        if name.endswith("q_proj.weight"):
            data = permute(data, HEADS, HEADS)
        if name.endswith("k_proj.weight"):
            data = permute(data, HEADS, KV_HEADS)
        target = table.get_name(name, try_suffixes=(".weight", ".bias"))
        if data.ndim == 2 and qtype is not None:
            q = gguf.quants.quantize(np.ascontiguousarray(data), qtype)
            w.add_tensor(target, q, raw_shape=q.shape, raw_dtype=qtype)
        else:
            w.add_tensor(target, np.ascontiguousarray(data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sd, sum(p.numel() for p in model.parameters())


def test_tied_head_of_a_gguf_counts_once_through_the_mapping(tmp_path, capsys):
    """llama.cpp writes a tied model's embedding once (no output.weight): the mapping
    compares lm_head.weight with token_embd.weight, and that stand-in is a tied copy,
    counted once in parameters and bytes, as the HF side's dropped lm_head.weight is.
    (It counted the embedding twice: params 82,240->90,432, new bytes 16 KB too many.)"""
    sd, params = llama(tmp_path, tie=True)
    stored = sum(int(t.n_bytes) for t in gguf.GGUFReader(str(tmp_path / "model.gguf")).tensors)
    hf, gg = tmp_path / "model.safetensors", tmp_path / "model.gguf"
    for old, new in ((hf, gg), (gg, hf)):
        found = items(capsys, old, new, "--architecture-comparison", "--memory-analysis")
        assert not [i for i in found if i["type"].startswith("tensor_")], "an F32 GGUF of the same weights"
        arch = item(found, "architecture_comparison")
        assert (arch["params_old"], arch["params_new"]) == (params, params)
        memory = item(found, "memory_analysis")
        assert memory["old_bytes" if old == gg else "new_bytes"] == stored
        assert item(found, "mapping")["tied"] == 1
    report = torchdiff.compare(str(hf), str(gg))
    assert len(report) == len(sd) and {d.status for d in report} == {"unchanged"}


def test_gguf_q8_0_of_a_gqa_llama_against_float64(tmp_path, capsys):
    """Each pair's rel_l2 and the pooled SQNR through the mapping (Q/K un-permuted,
    grouped K heads) against gguf.quants.dequantize and float64 NumPy, compared in the
    GGUF layout (a row permutation keeps every norm)."""
    sd, _ = llama(tmp_path, tie=False, qtype=gguf.GGMLQuantizationType.Q8_0)
    found = items(capsys, tmp_path / "model.safetensors", tmp_path / "model.gguf", "--quantization-analysis")
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    decoded = {t.name: np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float64)
               for t in gguf.GGUFReader(str(tmp_path / "model.gguf")).tensors}
    lines = {i["path"]: i for i in found if i["type"].startswith("tensor_")}
    signal = noise = 0.0
    for name, a in sd.items():
        a = a.astype(np.float64)
        heads = (HEADS, HEADS) if "q_proj" in name else (HEADS, KV_HEADS) if "k_proj" in name else None
        delta = decoded[table.get_name(name, try_suffixes=(".weight", ".bias"))] - (permute(a, *heads) if heads else a)
        signal, noise = signal + (a * a).sum(), noise + (delta * delta).sum()
        rel = np.linalg.norm(delta) / np.linalg.norm(a)
        got = lines[name]["rel_l2"] if name in lines else 0.0
        assert got == pytest.approx(rel, rel=1e-6, abs=1e-12), name
    qa = item(found, "quantization_analysis")
    assert qa["sqnr_db"] == pytest.approx(10 * math.log10(signal / noise), abs=1e-6)
    assert qa["precision_loss"] == "minimal"


# ---- GGUF key/values ----------------------------------------------------------------------------


def kv_gguf(path, freq_base: float, tokens: list[str]) -> None:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_rope_freq_base(freq_base)
    w.add_token_list(tokens)  # longer than the 64 items kept as a list: a digest
    w.add_tensor("blk.0.attn_norm.weight", np.ones(8, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_two_gguf_files_differing_in_key_values_differ(tmp_path, capsys):
    """Equal tensors, another rope base and one token changed: two differences (exit 1
    with --exit-code), not an identical file (it was exit 0, every tensor unchanged)."""
    tokens = [f"tok{i}" for i in range(100)]
    kv_gguf(tmp_path / "a.gguf", 10000.0, tokens)
    kv_gguf(tmp_path / "b.gguf", 500000.0, tokens[:-1] + ["other"])
    kv_gguf(tmp_path / "c.gguf", 10000.0, tokens)
    found = items(capsys, tmp_path / "a.gguf", tmp_path / "b.gguf")
    changed = {i["path"]: (i["old"], i["new"]) for i in found if i["type"] == "metadata_changed"}
    assert set(changed) == {"llama.rope.freq_base", "tokenizer.ggml.tokens"}
    assert changed["llama.rope.freq_base"] == (10000.0, 500000.0)
    old_tokens, new_tokens = changed["tokenizer.ggml.tokens"]
    assert old_tokens.startswith("<array: 100 STRING sha256:") and new_tokens.startswith("<array: 100 STRING sha256:")
    assert run(capsys, tmp_path / "a.gguf", tmp_path / "b.gguf", "--exit-code")[0] == 1
    assert run(capsys, tmp_path / "a.gguf", tmp_path / "c.gguf", "--exit-code")[0] == 0


def test_gguf_key_values_are_not_compared_against_another_format(tmp_path, capsys):
    """Against an HF checkpoint the GGUF header has no counterpart: no metadata item,
    and the mapping section counts what it left out (every key but the two header counts)."""
    llama(tmp_path, tie=False)
    fields = gguf.GGUFReader(str(tmp_path / "model.gguf")).fields
    found = items(capsys, tmp_path / "model.safetensors", tmp_path / "model.gguf")
    assert [i["type"] for i in found] == ["mapping"]
    assert item(found, "mapping")["header_keys_not_compared"] == {"new": len(fields) - 2}


# ---- GGUF types against gguf.quants.dequantize ------------------------------------------------


def _k_blocks(qtype, rows: int, cols: int, rng) -> np.ndarray:
    """Random blocks of a K-quant type (gguf-py cannot quantize them) with finite fp16 scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    at = {"Q2_K": (size - 4, size - 2), "Q4_K": (0, 2), "Q5_K": (0, 2)}.get(qtype.name, (size - 2,))
    for offset in at:
        raw[:, :, offset:offset + 2] = scale
    return raw.reshape(rows, -1)


def test_gguf_types_decode_as_gguf_dequantize_and_measure_in_float64(tmp_path, capsys):
    T = gguf.GGMLQuantizationType
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "llama")
    floats = {}
    for qtype in (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.TQ1_0, T.TQ2_0, T.MXFP4, T.BF16):
        x = rng.standard_normal((3, 256)).astype(np.float32)
        floats[f"t.{qtype.name}"] = x
        q = gguf.quants.quantize(x, qtype)
        w.add_tensor(f"t.{qtype.name}", q, raw_shape=q.shape, raw_dtype=qtype)
    for qtype in (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K):
        raw = _k_blocks(qtype, 3, 256, rng)
        floats[f"t.{qtype.name}"] = (gguf.quants.dequantize(raw, qtype) * 1.01).astype(np.float32)
        w.add_tensor(f"t.{qtype.name}", raw, raw_shape=raw.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    save_file({k: torch.from_numpy(v) for k, v in floats.items()}, str(tmp_path / "f.safetensors"))
    reader = gguf.GGUFReader(str(tmp_path / "q.gguf"))
    with torchdiff.load(str(tmp_path / "q.gguf")) as ckpt:
        for t in reader.tensors:
            np.testing.assert_array_equal(ckpt[t.name].float().numpy(), gguf.quants.dequantize(t.data, t.tensor_type))
    found = items(capsys, tmp_path / "f.safetensors", tmp_path / "q.gguf", "--quantization-analysis")
    rows = {r["tensor"]: r for r in item(found, "quantization_analysis")["tensors"]}
    for t in reader.tensors:
        a = floats[t.name].astype(np.float64)
        delta = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float64) - a
        assert rows[t.name]["sqnr_db"] == pytest.approx(20 * math.log10(np.linalg.norm(a) / np.linalg.norm(delta)),
                                                        abs=1e-5), t.name
        assert rows[t.name]["bits_new"] == 8 * int(t.n_bytes) / a.size
        k = math.ceil(0.95 * a.size)
        assert rows[t.name]["p95_abs_err"] == pytest.approx(np.sort(np.abs(delta).ravel())[k - 1], rel=1e-6)


# ---- .npz members -----------------------------------------------------------------------------


def _npz_with_members(path, readme: bytes, extra: np.ndarray) -> None:
    np.savez(path, w=np.ones(3, np.float32))
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("readme.txt", readme)
        z.writestr("state.pkl", pickle.dumps({"step": 1}))
        buf = io.BytesIO()
        np.save(buf, extra)
        z.writestr("extra", buf.getvalue())  # an array without the .npy suffix: np.load reads it


def test_npz_members_are_read_as_numpy_reads_them_never_skipped_silently(tmp_path, capsys):
    """A member without ``.npy`` holding an array is an array (np.load reads it; it was
    skipped); other members are metadata values from the zip directory (size, CRC-32), so
    a changed README shows and a pickle is never unpickled (they were skipped silently)."""
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    _npz_with_members(a, b"v1", np.arange(4.0))
    _npz_with_members(b, b"v2 notes", np.arange(4.0) + 1)
    with torchdiff.load(str(a)) as ckpt:
        np.testing.assert_array_equal(ckpt["extra"].numpy(), np.load(a)["extra"])
        assert sorted(ckpt.info["numpy"]["skipped_members"]) == ["readme.txt", "state.pkl"]
    found = items(capsys, a, b)
    assert {i["path"] for i in found if i["type"] == "tensor_changed"} == {"extra"}
    readme = next(i for i in found if i["path"] == "readme.txt")
    crc = zipfile.ZipFile(a).getinfo("readme.txt").CRC
    assert readme["type"] == "metadata_changed" and readme["old"] == f"<zip member: 2 bytes crc32:{crc:08x}>"
    assert not [i for i in found if i["path"] == "state.pkl"], "the same pickle bytes on both sides"


def test_npz_with_two_arrays_of_one_name_is_refused(tmp_path, capsys):
    path = tmp_path / "dup.npz"
    np.savez(path, w=np.ones(3))
    with zipfile.ZipFile(path, "a") as z:
        buf = io.BytesIO()
        np.save(buf, np.zeros(3))
        z.writestr("w", buf.getvalue())
    code, out, err = run(capsys, "inspect", path)
    assert code == 2 and out == ""
    assert err == (f"torchdiff: error: {path}: the archive holds two arrays named 'w' ('w.npy' and 'w'); "
                   "one would hide the other (re-save the file)\n")


# ---- quantized safetensors --------------------------------------------------------------------


def test_quantization_without_measurable_weights_has_no_sqnr_and_schemes_add_up(tmp_path, capsys):
    """int8 codes without a scale: precision_loss unknown and sqnr_db NaN (it read inf, the
    figure of the float tensors left alone, which says lossless), and the Schemes table
    has a row for the weights it could not measure, so its bytes add up to the totals."""
    torch.manual_seed(0)
    fp = {"layer.weight": torch.randn(64, 32) * 0.05, "layer.bias": torch.randn(64) * 0.05}
    codes = torch.round(fp["layer.weight"] / (fp["layer.weight"].abs().amax(1, keepdim=True) / 127)).to(torch.int8)
    save_file(fp, str(tmp_path / "fp.safetensors"))
    save_file({"layer.weight": codes, "layer.bias": fp["layer.bias"]}, str(tmp_path / "q.safetensors"))
    found = items(capsys, tmp_path / "fp.safetensors", tmp_path / "q.safetensors", "--quantization-analysis")
    qa = item(found, "quantization_analysis")
    assert qa["precision_loss"] == "unknown" and qa["sqnr_db"] == "NaN"
    schemes = {s["scheme"]: s for s in qa["schemes"]}
    assert set(schemes) == {"float32 → int8 (not dequantized)", "none"}
    assert schemes["float32 → int8 (not dequantized)"]["bytes_new"] == 64 * 32
    assert sum(s["bytes_old"] for s in qa["schemes"]) == qa["bytes_old"] == 4 * (64 * 32 + 64)
    assert sum(s["bytes_new"] for s in qa["schemes"]) == qa["bytes_new"] == 64 * 32 + 4 * 64
    assert sum(s["params"] for s in qa["schemes"]) == qa["params"]


def test_fp8_block_scale_inv_against_float64(tmp_path, capsys):
    """float8_e4m3fn weights with 128×128 ``weight_scale_inv`` blocks (the last partial):
    SQNR, bits per weight and compression against a float64 dequantization."""
    torch.manual_seed(1)
    w = torch.randn(200, 300) * 0.05
    blocks = torch.empty(2, 3)
    q = torch.empty_like(w)
    for i in range(2):
        for j in range(3):
            tile = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            blocks[i, j] = tile.abs().max() / 448
            q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = tile / blocks[i, j]
    codes = q.to(torch.float8_e4m3fn)
    save_file({"m.weight": w}, str(tmp_path / "fp.safetensors"))
    save_file({"m.weight": codes, "m.weight_scale_inv": blocks}, str(tmp_path / "fp8.safetensors"))
    found = items(capsys, tmp_path / "fp.safetensors", tmp_path / "fp8.safetensors", "--quantization-analysis")
    qa = item(found, "quantization_analysis")
    scale = np.repeat(np.repeat(blocks.double().numpy(), 128, 0), 128, 1)[:200, :300]
    a = w.double().numpy()
    delta = codes.double().numpy() * scale - a
    assert qa["sqnr_db"] == pytest.approx(20 * math.log10(np.linalg.norm(a) / np.linalg.norm(delta)), abs=1e-6)
    assert qa["compression"] == (200 * 300 + 4 * 6) / (4 * 200 * 300)
    assert qa["schemes"][0]["scheme"] == "float8_e4m3fn block 128×128 (scale_inv)"


# ---- --map errors -----------------------------------------------------------------------------


def test_map_gguf_without_a_gguf_side_names_the_option(tmp_path, capsys):
    """One line naming --map gguf (it named the rule file's install path and "the GGUF
    file" when neither side was one), exit 2."""
    save_file({"a": torch.ones(2)}, str(tmp_path / "a.safetensors"))
    save_file({"a": torch.zeros(2)}, str(tmp_path / "b.safetensors"))
    code, out, err = run(capsys, tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--map", "gguf")
    assert code == 2 and out == ""
    assert err.startswith("torchdiff: error: --map gguf: neither ") and err.count("\n") == 1
