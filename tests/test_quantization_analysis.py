"""--quantization-analysis against float64 NumPy references and hand-derived bounds.

Golden text outputs: tests/golden/*.txt; regenerate with TORCHDIFF_UPDATE_GOLDEN=1.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import torchdiff
from torchdiff.analyses import quantization_analysis as qa
from torchdiff.cli import main
from torchdiff.formats.base import Checkpoint, TensorHandle

from helpers import check_golden
F8 = getattr(torch, "float8_e4m3fn", None)


def analysis(old, new, **kwargs):
    report = torchdiff.compare(old, new, quantization_analysis=True, **kwargs)
    return report, report.analysis("quantization_analysis")


def rows(result, title="Tensors"):
    table = next(t for t in result.tables if t.title == title)
    return {r["tensor"]: r for r in table.records()} if "tensor" in table.headers else table.records()


def quantize_rows(w: np.ndarray, qmax: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """The test's own symmetric per-row int8 quantizer (float64 maths)."""
    scale = (np.abs(w.astype(np.float64)).max(axis=1) / qmax).astype(np.float32)
    q = np.clip(np.rint(w.astype(np.float64) / scale.astype(np.float64)[:, None]), -qmax, qmax).astype(np.int8)
    return q, scale


def p95_ref(x: np.ndarray) -> float:
    return float(np.percentile(np.abs(x), 95, method="inverted_cdf"))


# ---- SQNR of an fp16 cast ------------------------------------------------------------


def test_fp16_cast_of_gaussian_has_the_predicted_sqnr():
    n = 1 << 20
    a = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    _, result = analysis({"w": torch.from_numpy(a)}, {"w": torch.from_numpy(a).half()})
    measured = result.headline["sqnr_db"]

    # Nominal: rounding error uniform in ±|x|·2^-11 → SQNR = 3·2^22 = (2^11·√3)².
    nominal = 20 * math.log10(2**11 * math.sqrt(3))
    # Derived bracket: x in a binade [2^e, 2^(e+1)) has ulp 2^(e-10) and error variance
    # ulp²/12, i.e. between x²/(3·2^22)·(1/4) and x²/(3·2^22): SQNR ∈ [nominal, nominal + 20·log10 2].
    assert nominal <= measured <= nominal + 20 * math.log10(2)

    # Expected value for N(0,1): E[x²] = 1 over E[err²] = Σ_e P(binade e)·ulp_e²/12 (subnormals:
    # spacing 2^-24); sampling error of n draws bounds the tolerance (5σ, signal and noise terms).
    def mass(lo, hi):
        return math.erf(hi / math.sqrt(2)) - math.erf(lo / math.sqrt(2))

    bins = [(mass(2.0**e, 2.0 ** (e + 1)), 2.0 ** (e - 10)) for e in range(-14, 16)]
    bins.append((mass(0.0, 2.0**-14), 2.0**-24))
    e2 = sum(p * u * u / 12 for p, u in bins)
    e4 = sum(p * u**4 / 80 for p, u in bins)
    expected = -10 * math.log10(e2)
    sigma = math.sqrt(2 / n) + math.sqrt(e4 - e2 * e2) / e2 / math.sqrt(n)
    assert abs(measured - expected) <= 10 * math.log10(1 + 5 * sigma)

    # And the figure itself against a float64 NumPy evaluation of 20·log10(‖A‖/‖Δ‖).
    a64 = a.astype(np.float64)
    delta = a.astype(np.float16).astype(np.float64) - a64
    assert measured == pytest.approx(20 * math.log10(np.linalg.norm(a64) / np.linalg.norm(delta)), abs=1e-6)
    assert result.headline["compression"] == 0.5
    assert result.headline["precision_loss"] == "minimal"
    assert rows(result)["w"]["scheme"] == "cast float32 → float16"


# ---- int8 per-channel round trip --------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(out_dim=st.integers(1, 12), in_dim=st.integers(2, 48), seed=st.integers(0, 2**32 - 1),
       layout=st.sampled_from(["weight_scale", "weight.scale", "weight_scale_2d"]))
def test_int8_symmetric_per_channel_round_trip_matches_hand_computation(out_dim, in_dim, seed, layout):
    w = np.random.default_rng(seed).standard_normal((out_dim, in_dim)).astype(np.float32)
    q, scale = quantize_rows(w)
    scale_t = torch.from_numpy(scale)
    if layout == "weight_scale_2d":
        layout, scale_t = "weight_scale", scale_t[:, None]
    new = {"fc.weight": torch.from_numpy(q), f"fc.{layout}": scale_t, "fc.bias": torch.ones(out_dim)}
    report, result = analysis({"fc.weight": torch.from_numpy(w), "fc.bias": torch.ones(out_dim)}, new)

    assert [d.name for d in report] == ["fc.weight", "fc.bias"]  # the scale was folded into the weight
    row = rows(result)["fc.weight"]
    # Hand computation in float64: B = q · scale per row.
    a = w.astype(np.float64)
    delta = q.astype(np.float64) * scale.astype(np.float64)[:, None] - a
    ref_sqnr = 20 * math.log10(np.linalg.norm(a) / np.linalg.norm(delta))
    # torchdiff dequantizes in float32 (one rounding, |err| ≤ 2^-24·|B|) and sums float32 rows:
    # relative error of ‖Δ‖ ≤ 2^-24·(‖A‖/‖Δ‖ + n). Twice that, in dB: 20·log10(1 + rtol).
    rtol = 2 * 2.0**-24 * (np.linalg.norm(a) / np.linalg.norm(delta) + w.size)
    assert row["sqnr_db"] == pytest.approx(ref_sqnr, abs=20 * math.log10(1 + rtol) + 1e-9)
    assert row["rel_l2"] == pytest.approx(np.linalg.norm(delta) / np.linalg.norm(a), rel=rtol)
    assert row["max_err_over_rms"] == pytest.approx(np.abs(delta).max() / np.sqrt((a * a).mean()), rel=rtol)
    assert row["p95_abs_err"] == pytest.approx(p95_ref(delta), rel=rtol, abs=1e-12)
    # Per-row bound of a symmetric quantizer: |Δ| ≤ scale/2.
    assert (np.abs(delta) <= scale.astype(np.float64)[:, None] / 2 * (1 + 1e-6)).all()
    # Compression exact: int8 codes + one float32 scale per row, over float32.
    assert Fraction(result.headline["compression"]).limit_denominator(10**9) == Fraction(
        out_dim * in_dim + 4 * out_dim + 4 * out_dim, 4 * out_dim * in_dim + 4 * out_dim)
    assert row["compression"] == (out_dim * in_dim + 4 * out_dim) / (4 * out_dim * in_dim)
    assert row["bits_new"] == 8 * (out_dim * in_dim + 4 * out_dim) / (out_dim * in_dim)
    assert row["scheme"] == ("int8 per-tensor" if out_dim == 1 else "int8 per-channel")  # one row: one scale
    assert result.data["unquantized"] == ["fc.bias"]


def test_hand_computed_two_by_two():
    w = torch.tensor([[1.0, -0.5], [0.3, 0.2]])
    # Row 0: scale 1/127, q = [127, rint(-63.5) = -64]; row 1: scale 0.3/127, q = [127, rint(84.67) = 85].
    q = torch.tensor([[127, -64], [127, 85]], dtype=torch.int8)
    scale = torch.tensor([1 / 127, 0.3 / 127], dtype=torch.float32)
    _, result = analysis({"w": w}, {"w": q, "w_scale": scale})
    s = scale.double()
    b = torch.tensor([[1.0 * 127 * s[0], -64 * s[0]], [127 * s[1], 85 * s[1]]], dtype=torch.float64)
    delta = b - w.double()
    row = rows(result)["w"]
    assert row["rel_l2"] == pytest.approx(float(delta.norm() / w.double().norm()), rel=1e-6)
    assert row["max_err_over_rms"] == pytest.approx(float(delta.abs().max() / w.double().pow(2).mean().sqrt()), rel=1e-6)


# ---- compression ratios --------------------------------------------------------------------


CASTS = [(torch.float32, torch.float16, Fraction(1, 2)), (torch.float32, torch.bfloat16, Fraction(1, 2)),
         (torch.float16, torch.float32, Fraction(2)), (torch.float64, torch.float32, Fraction(1, 2))]
if F8 is not None:
    CASTS.append((torch.float32, F8, Fraction(1, 4)))


@pytest.mark.parametrize("old_dtype,new_dtype,ratio", CASTS, ids=lambda v: str(v).replace("torch.", ""))
def test_cast_compression_is_exact(tmp_path, old_dtype, new_dtype, ratio):
    w = torch.randn(24, 40, generator=torch.Generator().manual_seed(1)).to(old_dtype)
    save_file({"w": w, "b": torch.zeros(24, dtype=old_dtype)}, tmp_path / "old.safetensors")
    save_file({"w": w.to(new_dtype), "b": torch.zeros(24, dtype=old_dtype)}, tmp_path / "new.safetensors")
    _, result = analysis(tmp_path / "old.safetensors", tmp_path / "new.safetensors")
    w_row = rows(result)["w"]
    assert Fraction(w_row["compression"]) == ratio
    bits = 8 * torch.empty((), dtype=old_dtype).element_size()
    assert w_row["bits_old"] == bits and Fraction(w_row["bits_new"]) == bits * ratio
    nbytes = bits // 8
    total = (960 * ratio * nbytes + 24 * nbytes) / (984 * nbytes)
    assert Fraction(result.headline["compression"]).limit_denominator(10**6) == total
    assert w_row["scheme"].startswith("cast ")
    assert result.data["unquantized"] == ["b"]


def test_fp32_to_int8_per_tensor_is_a_quarter_plus_the_scale():
    n = 4096
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(2))
    s = w.abs().max() / 127
    q = torch.round(w / s).to(torch.int8)
    _, result = analysis({"w": w}, {"w": q, "w.scale": s.reshape(1)})
    assert result.headline["compression"] == (n + 4) / (4 * n)
    assert rows(result)["w"]["scheme"] == "int8 per-tensor"


# ---- layouts -----------------------------------------------------------------------------------


def _layouts():
    g = torch.Generator().manual_seed(3)
    old, new, expect = {}, {}, {}

    w = torch.randn(6, 10, generator=g)  # bitsandbytes int8: B = CB · SCB / 127
    scb = w.abs().amax(1)
    old["bnb.weight"] = w
    new["bnb.weight"] = torch.round(w * 127 / scb[:, None]).to(torch.int8)
    new["bnb.SCB"], new["bnb.weight_format"] = scb, torch.tensor(0, dtype=torch.uint8)
    expect["bnb.weight"] = new["bnb.weight"].double() * scb.double()[:, None] / 127

    w = torch.rand(5, 7, generator=g) * 2 - 0.5  # asymmetric uint8 with zero points, [out, 1]
    lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    scale = (hi - lo) / 255
    zp = torch.round(-lo / scale)
    old["asym.weight"] = w
    new["asym.weight"] = torch.clamp(torch.round(w / scale) + zp, 0, 255).to(torch.uint8)
    new["asym.weight_scale"], new["asym.weight_zero_point"] = scale, zp.to(torch.int32)
    expect["asym.weight"] = (new["asym.weight"].double() - zp.double()) * scale.double()

    if F8 is not None:  # fp8 with a block-wise scale_inv (3×4 blocks, uneven edges)
        w = torch.randn(7, 10, generator=g)
        blocks = torch.tensor([[w[i:i + 3, j:j + 4].abs().max() / 448 for j in range(0, 10, 4)]
                               for i in range(0, 7, 3)])
        full = blocks.repeat_interleave(3, 0).repeat_interleave(4, 1)[:7, :10]
        old["fp8.weight"] = w
        new["fp8.weight"] = (w / full).to(F8)
        new["fp8.weight_scale_inv"] = blocks
        expect["fp8.weight"] = new["fp8.weight"].double() * full.double()

    w = torch.randn(4, 4, generator=g)  # a scale that fits no layout
    old["bad.weight"], new["bad.weight"], new["bad.weight_scale"] = w, w.to(torch.int8), torch.ones(3)
    w = torch.randn(4, 4, generator=g)  # int8 with no scale at all
    old["raw.weight"], new["raw.weight"] = w, w.to(torch.int8)
    old["steps"] = new["steps"] = torch.tensor([3, 4])  # an integer buffer
    old["only_old.bias"], new["only_new.bias"] = torch.ones(3), torch.ones(2)
    return old, new, expect


def test_layouts_are_detected_folded_and_dequantized():
    old, new, expect = _layouts()
    report, result = analysis(old, new)
    names = {d.name for d in report}
    assert not names & {"bnb.SCB", "bnb.weight_format", "asym.weight_scale", "asym.weight_zero_point",
                        "fp8.weight_scale_inv", "bad.weight_scale"}
    measured = rows(result)
    assert measured["bnb.weight"]["scheme"] == "int8 per-channel (bitsandbytes SCB)"
    assert measured["asym.weight"]["scheme"] == "uint8 per-channel + zero point"
    if F8 is not None:
        assert measured["fp8.weight"]["scheme"] == "float8_e4m3fn block 3×4 (scale_inv)"
    for name, b in expect.items():
        a = old[name].double()
        assert measured[name]["rel_l2"] == pytest.approx(float((b - a).norm() / a.norm()), rel=1e-5)
        nbytes = sum(t.numel() * t.element_size() for k, t in new.items() if k.startswith(name.split(".")[0] + "."))
        diff = next(d for d in report if d.name == name)
        assert diff.new.nbytes == nbytes  # companions' bytes count in the weight
    failed = {f["path"]: f["reason"] for f in result.data["not_dequantized"]}
    assert "fits no layout of weight shape [4, 4]" in failed["bad.weight"]
    assert failed["raw.weight"].startswith("int8 values without a scale companion")
    assert "bad.weight" not in measured and "raw.weight" not in measured
    assert result.data["integer_tensors"] == ["steps"]
    assert result.data["only_old"] == ["only_old.bias"] and result.data["only_new"] == ["only_new.bias"]
    assert any(n.startswith("not dequantized (1), int8 values without a scale companion") for n in result.notes)
    assert result.data["companions"]["bnb.weight"] == ["bnb.SCB", "bnb.weight_format"]


def test_gguf_handles_count_their_real_bytes():
    # A GGUF reader's handle: dequantized float32 values, storage type Q8_0 (34 bytes per 32 weights).
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(4))
    blocks = w.reshape(-1, 32)
    d = blocks.abs().amax(1, keepdim=True) / 127
    deq = (torch.round(blocks / d) * d).reshape(8, 64)
    handle = TensorHandle("blk.0.ffn.weight", (8, 64), torch.float32, 34 * 16, lambda: deq, storage_dtype="Q8_0")
    gguf = Checkpoint(name="m.gguf", format="gguf", tensors={"blk.0.ffn.weight": handle})
    _, result = analysis({"blk.0.ffn.weight": w}, gguf)
    row = rows(result)["blk.0.ffn.weight"]
    assert row["scheme"] == "GGUF Q8_0"
    assert row["compression"] == 34 / 128 and row["bits_new"] == 8.5
    assert row["rel_l2"] == pytest.approx(float((deq.double() - w.double()).norm() / w.double().norm()), rel=1e-5)


def test_real_gguf_file(tmp_path):
    gguf = pytest.importorskip("gguf")
    pytest.importorskip("torchdiff.formats.gguf")  # the reader (the gguf extra)
    from gguf.constants import GGMLQuantizationType as Q
    from gguf.quants import quantize

    rng = np.random.default_rng(8)
    ref = {"blk.0.ffn_up.weight": rng.standard_normal((16, 64)).astype(np.float32),
           "blk.1.ffn_up.weight": rng.standard_normal((16, 64)).astype(np.float32),
           "blk.0.attn_norm.weight": np.ones(64, dtype=np.float32)}
    save_file({k: torch.from_numpy(v) for k, v in ref.items()}, tmp_path / "ref.safetensors")
    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), arch="llama")
    writer.add_tensor("blk.0.ffn_up.weight", quantize(ref["blk.0.ffn_up.weight"], Q.Q8_0), raw_dtype=Q.Q8_0)
    writer.add_tensor("blk.1.ffn_up.weight", quantize(ref["blk.1.ffn_up.weight"], Q.Q4_0), raw_dtype=Q.Q4_0)
    writer.add_tensor("blk.0.attn_norm.weight", ref["blk.0.attn_norm.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _, result = analysis(tmp_path / "ref.safetensors", tmp_path / "m.gguf")
    measured = rows(result)
    # Q8_0: 32 int8 codes + an fp16 scale per 32 weights; Q4_0: 16 bytes of nibbles + an fp16 scale.
    assert (measured["blk.0.ffn_up.weight"]["scheme"], measured["blk.0.ffn_up.weight"]["compression"]) == (
        "GGUF Q8_0", 34 / 128)
    assert (measured["blk.1.ffn_up.weight"]["scheme"], measured["blk.1.ffn_up.weight"]["bits_new"]) == (
        "GGUF Q4_0", 4.5)
    assert measured["blk.0.attn_norm.weight"]["scheme"] == "none"  # GGUF F32 is float32
    assert result.headline["quantized_tensors"] == 2


def test_fake_quantization_is_recognised():
    w = np.random.default_rng(5).standard_normal((64, 64)).astype(np.float32)
    step = np.abs(w).max() / 127
    fake = (np.rint(w / step) * step).astype(np.float32)
    _, result = analysis({"w": torch.from_numpy(w)}, {"w": torch.from_numpy(fake)})
    levels = len(np.unique(fake))
    assert levels <= 255
    assert rows(result)["w"]["scheme"] == f"fake-quant {math.ceil(math.log2(levels))}-bit grid (stored float32)"
    assert result.headline["quantized_tensors"] == 1 and result.headline["compression"] == 1.0


# ---- figures and labels -------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 3000), seed=st.integers(0, 2**32 - 1))
def test_p95_is_the_nearest_rank_percentile(n, seed):
    x = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    assert qa.p95_abs(torch.from_numpy(np.abs(x))) == p95_ref(x)


@pytest.mark.parametrize("db,label", [(math.inf, "minimal"), (40.0, "minimal"), (39.99, "low"), (30.0, "low"),
                                      (29.99, "moderate"), (20.0, "moderate"), (19.99, "high"),
                                      (-math.inf, "high"), (math.nan, "unknown")])
def test_precision_loss_thresholds(db, label):
    assert qa.precision_loss(db) == label


def test_identical_checkpoints_lose_nothing():
    sd = {"w": torch.randn(8, 8), "b": torch.randn(8)}
    _, result = analysis(sd, {k: v.clone() for k, v in sd.items()})
    assert result.headline["sqnr_db"] == math.inf
    assert result.headline["precision_loss"] == "none"
    assert result.headline["compression"] == 1.0


def test_total_pools_the_sums_and_top_k_lists_the_lowest_sqnr():
    g = torch.Generator().manual_seed(6)
    old = {f"t{i}": torch.randn(32, 32, generator=g) for i in range(5)}
    new = {k: v + (i + 1) * 1e-3 * torch.randn(32, 32, generator=g) for i, (k, v) in enumerate(old.items())}
    _, result = analysis(old, new, quantization_top_k=2)
    signal = sum(float(v.double().pow(2).sum()) for v in old.values())
    noise = sum(float((new[k].double() - v.double()).pow(2).sum()) for k, v in old.items())
    assert result.headline["sqnr_db"] == pytest.approx(10 * math.log10(signal / noise), abs=1e-4)
    assert list(rows(result, "Most sensitive")) == ["t4", "t3"]


def test_top_k_is_validated():
    with pytest.raises(torchdiff.UsageError, match="--quantization-top-k must be a whole number"):
        torchdiff.compare({}, {}, quantization_analysis=True, quantization_top_k=-1)


# ---- CLI, JSON, YAML, golden text ------------------------------------------------------------------


def make_models(tmp_path: Path) -> dict[str, Path]:
    """Small seeded checkpoints: fp32, an int8/bf16 quantized copy, a fine-tuned bf16 candidate."""
    rng = np.random.default_rng(2024)

    def t(*shape, scale=1.0):
        return torch.from_numpy((rng.standard_normal(shape) * scale).astype(np.float32))

    fp32 = {"embed.weight": t(16, 8)}
    for i in range(2):
        fp32 |= {f"layers.{i}.norm.weight": torch.ones(8), f"layers.{i}.fc1.weight": t(16, 8, scale=0.3),
                 f"layers.{i}.fc1.bias": t(16, scale=0.1), f"layers.{i}.fc2.weight": t(8, 16, scale=0.2)}
    fp32 |= {"head.weight": t(4, 8, scale=0.3), "head.bias": torch.zeros(4)}
    quantized = {}
    for name, w in fp32.items():
        if name.endswith("fc1.weight") or name.endswith("fc2.weight") or name == "head.weight":
            q, s = quantize_rows(w.numpy())
            quantized[name], quantized[name + "_scale"] = torch.from_numpy(q), torch.from_numpy(s)
        elif name == "embed.weight":
            quantized[name] = w.to(torch.bfloat16)
        else:
            quantized[name] = w
    candidate = {k: (v + (t(*v.shape, scale=0.02) if "layers.1" in k else 0)).to(torch.bfloat16)
                 for k, v in fp32.items()}
    paths = {}
    for key, sd in (("fp32", fp32), ("quantized", quantized), ("candidate", candidate)):
        paths[key] = tmp_path / f"{key}.safetensors"
        save_file(sd, paths[key])
    return paths


def run_cli(capsys, *argv) -> str:
    code = main([str(a) for a in argv] + ["--no-color"])
    out = capsys.readouterr().out
    assert code == 0
    return out


def test_golden_fp32_vs_quantized(tmp_path, capsys):
    m = make_models(tmp_path)
    text = run_cli(capsys, m["fp32"], m["quantized"], "--quantization-analysis", "--stats")
    assert "\nquantization_analysis: compression=" in text
    head = text.split("quantization_analysis: ", 1)[1].splitlines()[0]
    assert [part.split("=")[0] for part in head.split(", ")][:3] == ["compression", "precision_loss", "sqnr_db"]
    check_golden("quantization_analysis_stats.txt", text)


def test_golden_prod_vs_candidate(tmp_path, capsys):
    m = make_models(tmp_path)
    check_golden("stats_quantization_analysis.txt",
                 run_cli(capsys, m["fp32"], m["candidate"], "--stats", "--quantization-analysis"))


def test_golden_all_four_flags(tmp_path, capsys):
    m = make_models(tmp_path)
    text = run_cli(capsys, m["fp32"], m["candidate"], "--stats", "--quantization-analysis",
                   "--sort-by-change-magnitude", "--show-layer-impact")
    # Sections in the fixed order: tensor lines, sorting, quantization, layer impact.
    starts = [text.index(s) for s in (" tensors: ", "\nsort_by_change_magnitude:", "\nquantization_analysis:",
                                      "\nlayer_impact:")]
    assert starts == sorted(starts)
    check_golden("combined.txt", text)


def test_json_and_yaml_carry_the_tables(tmp_path, capsys):
    m = make_models(tmp_path)
    items = json.loads(run_cli(capsys, m["fp32"], m["quantized"], "--quantization-analysis", "--output", "json"))
    (item,) = [i for i in items if i["type"] == "quantization_analysis"]
    assert list(item)[:5] == ["type", "path", "compression", "precision_loss", "sqnr_db"]
    assert {r["tensor"] for r in item["tensors"]} >= {"layers.0.fc1.weight", "embed.weight"}
    assert item["precision_loss_thresholds_db"] == {"minimal": 40.0, "low": 30.0, "moderate": 20.0}
    assert item["sqnr_db"] == pytest.approx(json.loads(json.dumps(item))["sqnr_db"])
    as_yaml = yaml.safe_load(run_cli(capsys, m["fp32"], m["quantized"], "--quantization-analysis", "--output", "yaml"))
    (yitem,) = [i for i in as_yaml if i["type"] == "quantization_analysis"]
    assert yitem["tensors"] == item["tensors"] and yitem["compression"] == item["compression"]


def test_cli_top_k_flag(tmp_path, capsys):
    m = make_models(tmp_path)
    items = json.loads(run_cli(capsys, m["fp32"], m["quantized"], "--quantization-analysis",
                               "--quantization-top-k", "2", "--output", "json"))
    (item,) = [i for i in items if i["type"] == "quantization_analysis"]
    assert len(item["most_sensitive"]) == 2


def test_an_unquantized_change_is_not_labelled_a_precision_loss():
    g = torch.Generator().manual_seed(5)
    old = {"w": torch.randn(64, 64, generator=g)}
    new = {"w": old["w"] + 0.5 * torch.randn(64, 64, generator=g)}  # SQNR ≈ 6 dB: "high" if it were quantization
    result = torchdiff.compare(old, new, quantization_analysis=True, device="cpu").analysis("quantization_analysis")
    assert result.headline["precision_loss"] == "not_quantized"
    a, d = old["w"].double(), (new["w"] - old["w"]).double()
    assert result.headline["sqnr_db"] == pytest.approx(20 * math.log10(a.norm() / d.norm()), rel=1e-5)


def _adam_checkpoints(tmp_path: Path) -> tuple[Path, Path, list[dict[str, torch.Tensor]], list[str]]:
    """Two torch.save training checkpoints of a small conv/BN/linear model trained with
    Adam: model, optimizer state, an RNG state and a 0-d best_val_loss; also both
    flattened, as torchdiff names them, and the names of the model's parameters."""
    torch.manual_seed(11)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 4 * 4, 3))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))
    paths, flat = [], []
    for step in range(2):
        for _ in range(3):
            loss = torch.nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        ckpt = {"model": net.state_dict(), "optimizer": opt.state_dict(), "rng": torch.get_rng_state(),
                "best_val_loss": loss.detach().clone()}
        paths.append(tmp_path / f"train_{step}.pt")
        torch.save(ckpt, paths[-1])
        sd = {f"model.{k}": v.clone() for k, v in net.state_dict().items()}
        for i, st_ in opt.state_dict()["state"].items():
            sd |= {f"optimizer.state.{i}.{k}": v.clone() for k, v in st_.items()}
        flat.append(sd | {"rng": ckpt["rng"].clone(), "best_val_loss": ckpt["best_val_loss"]})
    return paths[0], paths[1], flat, [f"model.{n}" for n, _ in net.named_parameters()]


def _pooled_sqnr(old: dict, new: dict, names) -> float:
    """10 · log10(Σ‖A‖² / Σ‖Δ‖²) in float64 over ``names``."""
    signal = sum(float((old[n].double() ** 2).sum()) for n in names)
    noise = sum(float(((new[n].double() - old[n].double()) ** 2).sum()) for n in names)
    return 10 * math.log10(signal / noise)


def test_training_checkpoint_measures_the_scope_not_the_optimizer(tmp_path):
    """Adam state, BN running statistics, step counters, an RNG state and best_val_loss
    beside the model: the default scope (params) measures the model's parameters only,
    against a float64 reference; Adam's exp_avg_sq never ranks as most sensitive and an
    fp32 model stores 32 bits per weight. ``--scope all`` measures every float tensor."""
    a, b, (old, new), params = _adam_checkpoints(tmp_path)
    report, result = analysis(a, b)
    assert sorted(rows(result)) == sorted(params)
    assert result.headline["sqnr_db"] == pytest.approx(_pooled_sqnr(old, new, params), abs=1e-5)
    assert result.headline["bits_per_weight_old"] == result.headline["bits_per_weight_new"] == 32.0
    assert result.data["params"] == sum(old[n].numel() for n in params)
    assert result.data["checkpoint_bytes_old"] == 4 * sum(old[n].numel() for n in params)
    sensitive = rows(result, "Most sensitive")
    assert sensitive and set(sensitive) <= set(params)
    roles = dict(zip(report.figures.names, report.figures.role))
    others = sorted(r for n, r in roles.items() if n not in params)
    assert others.count("training_state") == 2 and "optimizer_state" in others
    assert (f"scope params: {len(others)} tensors of other roles (buffer 2, counter {others.count('counter')}, "
            f"optimizer state {others.count('optimizer_state')}, training state 2) left out of every figure, bytes "
            "included; --scope all includes them") in result.notes

    _, everything = analysis(a, b, scope="all")
    floats = [n for n in old if old[n].dtype.is_floating_point]
    assert sorted(rows(everything)) == sorted(floats)
    assert everything.headline["sqnr_db"] == pytest.approx(_pooled_sqnr(old, new, floats), abs=1e-5)
    assert not any("other roles" in n for n in everything.notes)
    inspected = torchdiff.inspect(b, quantization_analysis=True).analysis("quantization_analysis")
    assert inspected.headline["bits_per_weight"] == 32.0


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 3000), seed=st.integers(0, 2**32 - 1), chunk=st.integers(1, 700),
       dtype=st.sampled_from([np.float32, np.float64]), ties=st.booleans(), nonfinite=st.booleans())
def test_p95_in_slices_is_the_whole_tensor_p95(n, seed, chunk, dtype, ties, nonfinite):
    """The radix select over slices (large tensors) returns the value of the whole-tensor
    nearest-rank percentile, with ties (many equal |Δ|, zeros) and non-finite positions."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(n).astype(dtype)
    b = (a + rng.standard_normal(n) * (rng.integers(0, 2, n) if ties else 1)).astype(dtype)
    if nonfinite:
        a[rng.integers(0, n, max(1, n // 10))] = np.nan
        b[rng.integers(0, n, max(1, n // 20))] = np.inf
    ok = np.isfinite(a) & np.isfinite(b)
    expected = p95_ref((b - a)[ok]) if ok.any() else math.nan
    got = qa.p95_abs_pair(torch.from_numpy(a), torch.from_numpy(b), chunk=chunk)
    assert (got == expected) or (math.isnan(got) and math.isnan(expected))


# ---- GPTQ / AWQ packed codes (tests/test_dequant_default.py writes them with its own NumPy packer) ----


def test_gptq_figures_match_the_float64_reference(tmp_path):
    """A GPTQ 4-bit export (act-order g_idx) against its float original: the packed
    weights are quantized tensors measured on their unpacked values; SQNR, rel_l2 and bits
    per weight against float64 NumPy over the test's own packer's codes."""
    from test_dequant_default import gptq_export

    rng = np.random.default_rng(12)
    w_up = (rng.standard_normal((32, 64)) * 0.05).astype(np.float32)
    w_down = (rng.standard_normal((64, 32)) * 0.05).astype(np.float32)
    norm = np.ones(32, np.float32)
    up, ref_up = gptq_export(w_up, prefix="mlp.up_proj.")
    down, ref_down = gptq_export(w_down, prefix="mlp.down_proj.", act_order=False, seed=1)
    save_file({"mlp.up_proj.weight": torch.from_numpy(w_up), "mlp.down_proj.weight": torch.from_numpy(w_down),
               "norm.weight": torch.from_numpy(norm)}, tmp_path / "float.safetensors")
    save_file(up | down | {"norm.weight": torch.from_numpy(norm)}, tmp_path / "gptq.safetensors")
    report, result = analysis(str(tmp_path / "float.safetensors"), str(tmp_path / "gptq.safetensors"))
    measured = rows(result)
    assert measured["mlp.up_proj.weight"]["scheme"] == "GPTQ 4-bit g_idx"
    assert measured["mlp.down_proj.weight"]["scheme"] == "GPTQ 4-bit g_idx"
    signal = noise = 0.0
    for name, w, ref, tensors in (("mlp.up_proj.weight", w_up, ref_up, up),
                                  ("mlp.down_proj.weight", w_down, ref_down, down)):
        a = w.astype(np.float64)
        signal, noise = signal + float((a ** 2).sum()), noise + float(((ref - a) ** 2).sum())
        row = measured[name]
        assert row["sqnr_db"] == pytest.approx(20 * math.log10(np.linalg.norm(a) / np.linalg.norm(ref - a)), rel=1e-6)
        assert row["rel_l2"] == pytest.approx(np.linalg.norm(ref - a) / np.linalg.norm(a), rel=1e-6)
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())  # qweight + qzeros + scales + g_idx
        assert Fraction(row["bits_new"]).limit_denominator(10**6) == Fraction(8 * nbytes, w.size)
    signal += float(norm.astype(np.float64) @ norm)
    assert result.headline["sqnr_db"] == pytest.approx(10 * math.log10(signal / noise), rel=1e-6)
    assert result.headline["quantized_tensors"] == 2
    assert result.headline["precision_loss"] == qa.precision_loss(10 * math.log10(signal / noise))
    assert result.headline["precision_loss"] not in ("minimal", "none", "not_quantized")
    assert not any(n.startswith("no quantization detected") for n in result.notes)


def test_packed_codes_not_unpacked_count_as_quantized_of_unknown_loss(tmp_path):
    """Packed words it cannot unpack (3-bit GPTQ here) against the same layout: quantized
    tensors whose precision is unknown, never 'no quantization' nor a loss label."""
    prefix = "model.layers.0.mlp.up_proj."
    g = torch.Generator().manual_seed(13)
    sides = {}
    for side in ("a", "b"):
        sides[side] = {prefix + "qweight": torch.randint(-2**31, 2**31 - 1, (12, 32), dtype=torch.int32, generator=g),
                       prefix + "qzeros": torch.zeros(4, 3, dtype=torch.int32),
                       prefix + "scales": torch.rand(4, 32, generator=g).half(),
                       prefix + "g_idx": (torch.arange(128) // 32).int(), "norm.weight": torch.ones(8)}
        save_file(sides[side], tmp_path / f"{side}.safetensors")
    _, result = analysis(str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"))
    assert result.headline["quantized_tensors"] == 1
    assert result.headline["precision_loss"] == "unknown"
    assert not any(n.startswith("no quantization detected") for n in result.notes)
    assert any(n.startswith("precision_loss unknown: 1 quantized tensor could not be dequantized")
               for n in result.notes)
    (failed,) = result.data["not_dequantized"]
    assert failed["path"] == prefix + "qweight" and "packed codes compared as int32 integers" in failed["reason"]
    # bits per weight from the packing: 128 × 32 weights in 12 × 32 words plus companions
    nbytes = sum(t.numel() * t.element_size() for k, t in sides["b"].items() if k.startswith(prefix))
    assert result.headline["bits_per_weight_new"] == pytest.approx((8 * nbytes + 32 * 8) / (128 * 32 + 8))


def test_a_scheme_both_sides_store_is_no_quantization_step(tmp_path):
    """Two int8 per-channel checkpoints (a quantized model and its fine-tune), and two GGUF
    files of one block type: the change is no precision loss, and the rows say the
    scheme is held on both sides. SQNR against float64 over the dequantized values."""
    g = torch.Generator().manual_seed(21)
    w0 = torch.randn(32, 64, generator=g)
    w1 = w0 + 0.05 * torch.randn(32, 64, generator=g)
    q0, s0 = quantize_rows(w0.numpy())
    q1, s1 = quantize_rows(w1.numpy())
    old = {"fc.weight": torch.from_numpy(q0), "fc.weight_scale": torch.from_numpy(s0)[:, None]}
    new = {"fc.weight": torch.from_numpy(q1), "fc.weight_scale": torch.from_numpy(s1)[:, None]}
    _, result = analysis(old, new)
    row = rows(result)["fc.weight"]
    a = q0.astype(np.float64) * s0.astype(np.float64)[:, None]
    b = q1.astype(np.float64) * s1.astype(np.float64)[:, None]
    assert row["scheme"] == "int8 per-channel (both sides)"
    assert row["sqnr_db"] == pytest.approx(20 * math.log10(np.linalg.norm(a) / np.linalg.norm(b - a)), rel=1e-5)
    assert result.headline["precision_loss"] == "not_quantized"  # it was "moderate": a fine-tune, no loss
    assert result.headline["quantized_tensors"] == 1
    assert any(n.startswith("no quantization step between the checkpoints: both sides store int8 per-channel")
               for n in result.notes)

    gguf = pytest.importorskip("gguf")
    from gguf.constants import GGMLQuantizationType as Q
    from gguf.quants import dequantize, quantize

    deq = []
    for i, w in enumerate((w0, w1)):
        writer = gguf.GGUFWriter(str(tmp_path / f"m{i}.gguf"), arch="llama")
        codes = quantize(w.numpy(), Q.Q4_0)
        writer.add_tensor("blk.0.ffn_up.weight", codes, raw_dtype=Q.Q4_0)
        writer.add_tensor("blk.0.attn_norm.weight", np.full(64, 1.0 + i, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        deq.append(dequantize(codes, Q.Q4_0).astype(np.float64))
    _, result = analysis(tmp_path / "m0.gguf", tmp_path / "m1.gguf")
    measured = rows(result)
    assert measured["blk.0.ffn_up.weight"]["scheme"] == "GGUF Q4_0 (both sides)"  # it was "none"
    assert measured["blk.0.attn_norm.weight"]["scheme"] == "none"
    a, b = deq
    assert measured["blk.0.ffn_up.weight"]["sqnr_db"] == pytest.approx(
        20 * math.log10(np.linalg.norm(a) / np.linalg.norm(b - a)), rel=1e-5)
    assert result.headline["precision_loss"] == "not_quantized"
    assert result.headline["quantized_tensors"] == 1
