"""A quantized export against its float original compares the values the codes stand
for (issue 18): the plain comparison, the scalars and the change summary dequantize
when a scale (and zero point) companion is found, and say so; ``--raw`` compares the
stored codes. References: float64 NumPy on the dequantized values."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import torchdiff
from torchdiff.cli import main
from torchdiff.dequant import dequantize_checkpoint
from torchdiff.formats import from_object


def quantize(w: torch.Tensor, zero_point: bool):
    """int8 per-channel codes, scales (and zero points) as an exporter writes them."""
    lo, hi = w.min(dim=1).values, w.max(dim=1).values
    if zero_point:
        scale = ((hi - lo) / 255).clamp_min(1e-8)
        zp = torch.round(-128 - lo / scale).clamp(-128, 127)
        q = torch.clamp(torch.round(w / scale[:, None] + zp[:, None]), -128, 127).to(torch.int8)
        return q, scale, zp
    scale = (w.abs().max(dim=1).values / 127).clamp_min(1e-8)
    q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
    return q, scale, None


def rel_l2_ref(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(b - a) / np.linalg.norm(a))


def export(tmp_path: Path, w: torch.Tensor, zero_point: bool):
    q, scale, zp = quantize(w, zero_point)
    tensors = {"fc.weight": q, "fc.weight_scale": scale, "fc.bias": torch.ones(w.shape[0])}
    if zp is not None:
        tensors["fc.weight_zero_point"] = zp
    save_file(tensors, str(tmp_path / "int8.safetensors"))
    save_file({"fc.weight": w, "fc.bias": torch.ones(w.shape[0])}, str(tmp_path / "fp32.safetensors"))
    deq = (q.double() - (zp.double()[:, None] if zp is not None else 0)) * scale.double()[:, None]
    return tmp_path / "fp32.safetensors", tmp_path / "int8.safetensors", deq.numpy()


@pytest.mark.parametrize("zero_point", [False, True])
def test_plain_comparison_uses_dequantized_values(tmp_path, zero_point):
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    fp32, int8, deq = export(tmp_path, w, zero_point)
    report = torchdiff.compare(str(fp32), str(int8), analyses=["change_summary"])
    d = {x.name: x for x in report}["fc.weight"]
    expected = rel_l2_ref(w.numpy(), deq)
    assert expected < 0.02
    assert d.status == "retyped" and d.new.dtype == "int8"
    assert d.metrics.rel_l2 == pytest.approx(expected, rel=1e-4)
    assert len(report) == 2  # the companions are folded into the weight, not added tensors
    assert report.scalars()["torchdiff/global_rel_l2"] == pytest.approx(
        np.linalg.norm(deq - w.numpy().astype(np.float64)) / np.linalg.norm(np.concatenate(
            [w.numpy().ravel(), np.ones(16)]).astype(np.float64)), rel=1e-4)
    deq_item = report.analysis("dequantized")
    assert deq_item.data["new"] == ["fc.weight"] and deq_item.headline == {"weights": 1}
    summary = report.analysis("change_summary")
    assert summary.data["global_rel_l2"] == pytest.approx(report.scalars()["torchdiff/global_rel_l2"], rel=1e-9)


def test_raw_compares_stored_codes(tmp_path):
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(2))
    fp32, int8, _ = export(tmp_path, w, False)
    q, _, _ = quantize(w, False)
    report = torchdiff.compare(str(fp32), str(int8), raw=True)
    d = {x.name: x for x in report}["fc.weight"]
    assert d.metrics.rel_l2 == pytest.approx(rel_l2_ref(w.numpy(), q.numpy()), rel=1e-6)
    assert {x.name: x.status for x in report}["fc.weight_scale"] == "added"
    assert report.analysis("dequantized") is None


def test_cli_says_dequantized(tmp_path, capsys):
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(3))
    fp32, int8, deq = export(tmp_path, w, False)
    assert main([str(fp32), str(int8)]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "fc.weight" in x)
    assert line.startswith("  ~ fc.weight: dtype=float32->int8 (dequantized), rel_l2=")
    assert "dequantized: weights=1" in out and "--raw compares the stored codes" in out
    assert main([str(fp32), str(int8), "--raw", "-o", "json"]) == 0
    items = json.loads(capsys.readouterr().out)
    assert {i["path"] for i in items} == {"fc.weight", "fc.weight_scale"}
    assert {i["path"]: i for i in items}["fc.weight"]["rel_l2"] > 10


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 6), cols=st.integers(1, 9), seed=st.integers(0, 2**16), zp=st.booleans())
def test_dequantize_checkpoint_matches_numpy(rows, cols, seed, zp):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    q, scale, zero = quantize(w, zp)
    tensors = {"w": q, "w_scale": scale}
    if zero is not None:
        tensors["w_zero_point"] = zero
    folded, found = dequantize_checkpoint(from_object(tensors))
    assert list(folded.tensors) == ["w"] and found["w"].error is None
    ref = (q.double().numpy() - (zero.double().numpy()[:, None] if zp else 0)) * scale.double().numpy()[:, None]
    np.testing.assert_allclose(folded["w"].double().numpy(), ref, rtol=1e-6, atol=1e-7)
    again, found_again = dequantize_checkpoint(folded)  # idempotent
    assert again is folded and found_again is found


def test_ci_check_names_the_dtype_change(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    try:
        import ci_check
    finally:
        sys.path.pop(0)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"w": torch.ones(64, 32)}, str(a))
    save_file({"w": torch.ones(64, 32, dtype=torch.bfloat16)}, str(b))
    assert ci_check.main([str(a), str(b)]) == 1
    out = capsys.readouterr().out
    assert "FAIL architecture: w retyped (float32 -> bfloat16)" in out
    assert "[64, 32] -> [64, 32]" not in out


# ---- block sizes of block-wise scales (fp8 weight_scale_inv): ⌈dim/B⌉ = blocks, the last block partial ----

from torchdiff import dequant  # noqa: E402
from torchdiff.dequant import block_size, dequantize_pair, dequantized_result  # noqa: E402

F8 = getattr(torch, "float8_e4m3fn", None)


def brute_block_sizes(dim: int, blocks: int) -> list[int]:
    """Every B with ⌈dim/B⌉ = blocks (the reference: by enumeration, B ≤ dim)."""
    return [b for b in range(1, dim + 1) if -(-dim // b) == blocks]


@pytest.mark.parametrize("dim, blocks, preferred, expected", [
    (576, 5, None, 128),  # DeepSeek-V3 kv_a_proj_with_mqa: 576 rows, 5 blocks of 128 (the last 64)
    (300, 3, None, 128),  # 128 + 128 + 44, not 3 × 100
    (7168, 56, None, 128),
    (256, 2, None, 128),
    (96, 2, None, 64),  # the power of two before the even split (48)
    (300, 4, None, 75),  # no power of two in 75…99: the even split
    (7, 3, None, 3),  # one size fits
    (4096, 128, None, 32),  # groups of 32
    (300, 3, 100, 100),  # config.json's weight_block_size, when it fits
    (300, 3, 90, 128),  # ... and not when it does not
    (5, 1, None, 5),
])
def test_block_size_rule(dim, blocks, preferred, expected):
    assert block_size(dim, blocks, preferred) == expected
    assert expected in brute_block_sizes(dim, blocks)


@pytest.mark.parametrize("dim, blocks, message", [
    (310, 4, "ambiguous block size: every size from 78 to 103 splits a dimension of 310 into 4 blocks"),
    (5, 4, "no block size splits a dimension of 5 into 4 blocks"),
])
def test_block_size_refuses_what_no_rule_decides(dim, blocks, message):
    assert block_size(dim, blocks).startswith(message)


def test_block_size_against_enumeration():
    for dim in range(1, 200):
        for blocks in range(1, dim + 2):
            fits = brute_block_sizes(dim, blocks)
            got = block_size(dim, blocks)
            powers = [b for b in fits if b & (b - 1) == 0]
            if isinstance(got, str):
                assert not powers and (not fits or (len(fits) > 1 and dim % blocks)), (dim, blocks)
                continue
            assert -(-dim // got) == blocks, (dim, blocks, got)
            assert got == (powers[0] if powers else fits[0]), (dim, blocks, got)  # at most one power of two fits


def fp8_blocks(w: np.ndarray, block: tuple[int, int]):
    """The test's own block-wise fp8 quantizer: codes, scale_inv per block, and the float64
    dequantized reference (scale broadcast over whole blocks, the last ones partial)."""
    bo, bi = block
    so, si = -(-w.shape[0] // bo), -(-w.shape[1] // bi)
    scale = np.zeros((so, si), np.float32)
    for a in range(so):
        for b in range(si):
            scale[a, b] = np.abs(w[a * bo:(a + 1) * bo, b * bi:(b + 1) * bi]).max() / 448.0
    full = np.kron(scale.astype(np.float64), np.ones((bo, bi)))[:w.shape[0], :w.shape[1]]
    codes = torch.from_numpy((w / full).astype(np.float32)).to(F8)
    return codes, torch.from_numpy(scale), codes.double().numpy() * full


@pytest.mark.skipif(F8 is None, reason="no float8 in this torch")
@pytest.mark.parametrize("shape", [(576, 256), (576, 300), (200, 130)])
def test_fp8_block_scale_inv_with_partial_last_block(tmp_path, shape):
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * 0.05
    codes, scale, ref = fp8_blocks(w, (128, 128))
    name = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    save_file({name: codes, name + "_scale_inv": scale}, str(tmp_path / "fp8.safetensors"))
    save_file({name: torch.from_numpy(ref.astype(np.float32))}, str(tmp_path / "ref.safetensors"))
    save_file({name: torch.from_numpy(w)}, str(tmp_path / "float.safetensors"))
    report = torchdiff.compare(str(tmp_path / "ref.safetensors"), str(tmp_path / "fp8.safetensors"))
    d = {x.name: x for x in report}[name]
    assert d.metrics.rel_l2 == 0 and d.metrics.max_abs == 0  # the float32 reference is exact here
    assert report.analysis("dequantized").data["schemes"][name] == "float8_e4m3fn block 128×128 (scale_inv)"
    report = torchdiff.compare(str(tmp_path / "float.safetensors"), str(tmp_path / "fp8.safetensors"))
    d = {x.name: x for x in report}[name]
    assert d.metrics.rel_l2 == pytest.approx(rel_l2_ref(w, ref), rel=1e-6)


@pytest.mark.skipif(F8 is None, reason="no float8 in this torch")
def test_fp8_block_size_from_config_json(tmp_path):
    """Blocks of 100 (not a power of two): the shapes alone say 128, config.json's
    quantization_config.weight_block_size says 100."""
    w = np.random.default_rng(1).standard_normal((300, 200)).astype(np.float32)
    codes, scale, ref = fp8_blocks(w, (100, 100))
    save_file({"w": codes, "w_scale_inv": scale}, str(tmp_path / "fp8.safetensors"))
    save_file({"w": torch.from_numpy(ref.astype(np.float32))}, str(tmp_path / "ref.safetensors"))
    report = torchdiff.compare(str(tmp_path / "ref.safetensors"), str(tmp_path / "fp8.safetensors"))
    assert report.analysis("dequantized").data["schemes"]["w"] == "float8_e4m3fn block 128×128 (scale_inv)"
    assert {x.name: x for x in report}["w"].metrics.rel_l2 > 0.01
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", "quantization_config": {
        "quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [100, 100]}}))
    report = torchdiff.compare(str(tmp_path / "ref.safetensors"), str(tmp_path / "fp8.safetensors"))
    assert report.analysis("dequantized").data["schemes"]["w"] == "float8_e4m3fn block 100×100 (scale_inv)"
    assert {x.name: x for x in report}["w"].metrics.rel_l2 == 0


@pytest.mark.skipif(F8 is None, reason="no float8 in this torch")
def test_ambiguous_block_scale_is_compared_as_stored_and_said(tmp_path, capsys):
    w = torch.randn(310, 8, generator=torch.Generator().manual_seed(4))
    save_file({"w": w}, str(tmp_path / "a.safetensors"))
    save_file({"w": w.to(F8), "w_scale_inv": torch.ones(4, 1)}, str(tmp_path / "b.safetensors"))
    assert main([str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "-o", "json"]) == 0
    items = {i.get("type"): i for i in json.loads(capsys.readouterr().out)}
    note = next(n for n in items["dequantized"]["notes"] if n.startswith("new w: compared as stored"))
    assert "ambiguous block size: every size from 78 to 103 splits a dimension of 310 into 4 blocks" in note


# ---- GPTQ / AWQ packed int32 codes ---------------------------------------------------------------------

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ GEMM: nibble i of word c holds column 8c + AWQ_ORDER[i]


def pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """[n, m] codes -> [n·bits/32, m] int32: codes of rows r·pack … r·pack + pack − 1 in
    word r, the first in the lowest bits (AutoGPTQ's qweight)."""
    pack = 32 // bits
    words = np.zeros((codes.shape[0] // pack, codes.shape[1]), np.uint64)
    for j in range(pack):
        words |= codes[j::pack].astype(np.uint64) << np.uint64(bits * j)
    return words.astype(np.uint32).view(np.int32)


def pack_cols(codes: np.ndarray, bits: int, order=None) -> np.ndarray:
    """[n, m] codes -> [n, m·bits/32] int32 along columns (qzeros; AWQ's qweight with its order)."""
    pack = 32 // bits
    order = order or list(range(pack))
    words = np.zeros((codes.shape[0], codes.shape[1] // pack), np.uint64)
    for i in range(pack):
        words |= codes[:, order[i]::pack].astype(np.uint64) << np.uint64(bits * i)
    return words.astype(np.uint32).view(np.int32)


def gptq_export(w: np.ndarray, bits: int = 4, group: int = 32, act_order: bool = True, kind: str = "gptq",
                seed: int = 0, prefix: str = "model.layers.0.mlp.up_proj."):
    """The test's own asymmetric min-max group quantizer of a float weight [out, in], written
    as GPTQ v1 (AutoGPTQ: zero − 1 stored), GPTQ v2 (zero stored) or AWQ GEMM; returns the
    tensors and the float64 dequantized reference [out, in], computed from the codes (not
    from the packed words)."""
    out, inp = w.shape
    maxq = (1 << bits) - 1
    groups = inp // group
    g_idx = np.arange(inp) // group
    if act_order:  # desc_act: rows visited in a permuted order, g_idx gives each row's group
        g_idx = g_idx[np.random.default_rng(seed).permutation(inp)]
    wt = w.T.astype(np.float64)  # [in, out]
    scales = np.zeros((groups, out), np.float16)
    zeros = np.zeros((groups, out), np.int64)
    for g in range(groups):
        rows = wt[g_idx == g]
        lo, hi = np.minimum(rows.min(0), 0), np.maximum(rows.max(0), 0)
        s = ((hi - lo) / maxq).astype(np.float16)
        zeros[g] = np.clip(np.rint(-lo / s.astype(np.float64)), 0, maxq)
        scales[g] = s
    zeros[0, :3] = 0  # the zero point GPTQ v1 stores as −1 (all ones): read back mod 2^bits
    sg = scales.astype(np.float64)[g_idx]
    q = np.clip(np.rint(wt / sg) + zeros[g_idx], 0, maxq).astype(np.int64)  # [in, out]
    ref = ((q - zeros[g_idx]) * sg).T
    if kind == "awq":
        tensors = {"qweight": pack_cols(q, bits, AWQ_ORDER), "qzeros": pack_cols(zeros, bits, AWQ_ORDER)}
    else:
        stored = (zeros - 1) & maxq if kind == "gptq" else zeros
        tensors = {"qweight": pack_rows(q, bits), "qzeros": pack_cols(stored, bits),
                   "g_idx": g_idx.astype(np.int32)}
    tensors["scales"] = scales
    return {prefix + k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}, ref


@pytest.mark.parametrize("bits, act_order, kind", [(4, True, "gptq"), (4, False, "gptq"), (8, True, "gptq"),
                                                   (2, False, "gptq"), (4, True, "gptq_v2"), (4, False, "awq")])
def test_gptq_awq_unpacked_match_numpy(tmp_path, bits, act_order, kind):
    w = np.random.default_rng(bits).standard_normal((48, 64)).astype(np.float32) * 0.05
    tensors, ref = gptq_export(w, bits=bits, act_order=act_order, kind=kind)
    save_file(tensors, str(tmp_path / "q.safetensors"))
    if kind != "gptq":
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": (
            {"quant_method": "gptq", "bits": bits, "group_size": 32, "checkpoint_format": "gptq_v2"}
            if kind == "gptq_v2" else {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm"})}))
    ckpt = torchdiff.formats.load(str(tmp_path / "q.safetensors"))
    folded, found = dequantize_checkpoint(ckpt)
    name = "model.layers.0.mlp.up_proj.weight"
    assert list(folded.tensors) == [name]
    det = found[name]
    assert det.error is None and det.stored_as == "model.layers.0.mlp.up_proj.qweight"
    label = {"gptq": "GPTQ", "gptq_v2": "GPTQ v2", "awq": "AWQ"}[kind]
    assert det.scheme == f"{label} {bits}-bit " + ("g_idx" if kind != "awq" else "group 32")
    handle = folded.tensors[name]
    assert handle.shape == (48, 64) and handle.storage_dtype == f"uint{bits}"
    assert handle.nbytes == sum(t.numel() * t.element_size() for t in tensors.values())
    # (q − z) is exact and the fp16 scale exact in float32: one float32 rounding of the product
    np.testing.assert_allclose(folded[name].double().numpy(), ref, rtol=2 ** -24, atol=0)
    ckpt.close()


def test_gptq_against_its_float_original(tmp_path, capsys):
    """The tester's case: a GPTQ export pairs with the float model's <module>.weight, and
    the line, the scalars and JSON say the values were unpacked."""
    w = np.random.default_rng(5).standard_normal((32, 64)).astype(np.float32)
    tensors, ref = gptq_export(w)
    save_file(tensors, str(tmp_path / "gptq.safetensors"))
    save_file({"model.layers.0.mlp.up_proj.weight": torch.from_numpy(w)}, str(tmp_path / "float.safetensors"))
    report = torchdiff.compare(str(tmp_path / "float.safetensors"), str(tmp_path / "gptq.safetensors"))
    assert [(d.name, d.status) for d in report] == [("model.layers.0.mlp.up_proj.weight", "retyped")]
    d = next(iter(report))
    assert d.metrics.rel_l2 == pytest.approx(rel_l2_ref(w, ref), rel=1e-6)
    assert main([str(tmp_path / "float.safetensors"), str(tmp_path / "gptq.safetensors"), "--no-color"]) == 0
    out = capsys.readouterr().out
    assert "~ model.layers.0.mlp.up_proj.weight: dtype=float32->uint4 (dequantized), rel_l2=" in out
    assert ("GPTQ/AWQ packed codes unpacked into <module>.weight ([out, in], the float layout): "
            "model.layers.0.mlp.up_proj.qweight -> model.layers.0.mlp.up_proj.weight") in " ".join(out.split())


def test_packed_codes_that_cannot_be_unpacked_are_said_to_be_integers(tmp_path, capsys):
    """3-bit GPTQ (words across codes) is not unpacked: the int32 words are compared as
    integers, and the text and JSON say so."""
    prefix = "model.layers.0.mlp.up_proj."
    g = torch.Generator().manual_seed(6)
    for side in ("a", "b"):
        save_file({prefix + "qweight": torch.randint(-2**31, 2**31 - 1, (12, 32), dtype=torch.int32, generator=g),
                   prefix + "qzeros": torch.zeros(4, 3, dtype=torch.int32),
                   prefix + "scales": torch.rand(4, 32, generator=g).half(),
                   prefix + "g_idx": (torch.arange(128) // 32).int()}, str(tmp_path / f"{side}.safetensors"))
    assert main([str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "-o", "json"]) == 0
    items = json.loads(capsys.readouterr().out)
    item = next(i for i in items if i.get("type") == "dequantized")
    note = next(n for n in item["notes"] if n.startswith(f"new {prefix}qweight: compared as stored"))
    assert "3 bits per code" in note and "packed codes compared as int32 integers, not as the values they stand" in note
    assert {i["path"] for i in items if "path" in i and i.get("type", "").startswith("tensor")} == {prefix + "qweight"}


def test_raw_says_packed_codes_are_compared_as_integers():
    tensors, _ = gptq_export(np.ones((16, 64), np.float32))
    old = from_object(tensors)
    options = {}
    a, b = dequantize_pair(old, old, options, raw=True)
    assert a is old and b is old  # --raw: the stored codes
    item = dequantized_result(options)
    assert item.headline == {"weights": 0} and item.data["packed"]["new"] == ["model.layers.0.mlp.up_proj.qweight"]
    assert item.notes[1] == ("new model.layers.0.mlp.up_proj.qweight: GPTQ codes packed into int32 words, compared "
                             "as int32 integers (--raw), not as the values they stand for")


def test_integer_codes_without_a_scale_are_said(tmp_path, capsys):
    """int8 codes beside a float original with no scale found (here its scale is named
    weight_scales, which is no companion name): the default report says they are compared
    as stored, in text and JSON."""
    w = torch.randn(16, 8, generator=torch.Generator().manual_seed(7))
    q, scale, _ = quantize(w, False)
    name = "model.layers.0.mlp.up_proj.weight"
    save_file({name: w}, str(tmp_path / "a.safetensors"))
    save_file({name: q, name + "_scales": scale}, str(tmp_path / "b.safetensors"))
    assert main([str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "-o", "json"]) == 0
    items = json.loads(capsys.readouterr().out)
    item = next(i for i in items if i.get("type") == "dequantized")
    assert item["unscaled"] == [{"path": name, "side": "new", "dtype": "int8", "other": "float32",
                                 "near": [name + "_scales"]}]
    assert item["notes"] == [f"new {name}: int8 codes compared as stored with float32 values: no scale companion "
                             f"found (looked for {dequant.LOOKED_FOR}; {name}_scales not taken as its scale)"]
