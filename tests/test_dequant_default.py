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
