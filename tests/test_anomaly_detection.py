"""--anomaly-detection on checkpoints with known truth (tests/truth_models.py).

Each defect is injected into a copy of a really fine-tuned small transformer; the
analysis must find exactly that defect, and nothing on the clean pair. Reference
figures are computed here with NumPy in float64, independently of torchdiff.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import torchdiff
from torchdiff.cli import main
from truth_models import finetuned, pretrained

NAME = "anomaly_detection"


def run(old, new=None, **kwargs):
    if new is None:
        return torchdiff.inspect(old, analyses=[NAME], **kwargs).analysis(NAME)
    return torchdiff.compare(old, new, analyses=[NAME], **kwargs).analysis(NAME)


def found(result) -> set[tuple[str, str]]:
    return {(f["type"], f["tensor"]) for f in result.data["anomalies"]}


def save(tmp_path, name, sd) -> str:
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return str(path)


# ---- the clean fine-tune pair: nothing ---------------------------------------------------


def test_clean_finetune_pair_has_no_anomaly():
    result = run(pretrained(), finetuned())
    assert result.data["anomalies"] == []
    assert dict(result.headline) == {"anomaly_type": "none", "severity": "none", "affected": [], "findings": 0}
    assert not result.failed


@pytest.mark.parametrize("which", [pretrained, finetuned])
def test_clean_single_checkpoint_has_no_anomaly(which):
    assert run(which()).data["anomalies"] == []


# ---- injected truth --------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_in_one_tensor_is_the_one_critical_finding(value):
    bad = finetuned()
    target = "layers.1.mlp.fc1.weight"
    bad[target][3, 5] = value
    bad[target][7, 1] = value
    result = run(pretrained(), bad)
    assert found(result) == {("nan_inf", target)}
    (f,) = result.data["anomalies"]
    assert (f["severity"], f["side"], f["value"]) == ("critical", "new", int(np.sum(~np.isfinite(bad[target].numpy()))))
    assert dict(result.headline) == {"anomaly_type": "nan_inf", "severity": "critical", "affected": [target],
                                     "findings": 1}
    report = torchdiff.compare(pretrained(), bad, analyses=[NAME])
    assert f"anomaly_detection: type=nan_inf, severity=critical, affected=[{target}], findings=1" in str(report)


def test_an_all_zero_complex_weight_is_all_zero():
    """A complex tensor's zeros are counted over its real view (2·numel values)."""
    zero = {"fc.weight": torch.zeros(4, 4, dtype=torch.complex64)}
    assert ("all_zero", "fc.weight") in found(run(zero))
    half = {"fc.weight": torch.complex(torch.zeros(4, 4), torch.ones(4, 4))}  # real parts zero only
    assert ("all_zero", "fc.weight") not in found(run(half))


def test_zeroed_layer_is_found_and_nothing_else():
    bad = finetuned()
    bad["layers.2.mlp.fc1.weight"].zero_()
    bad["layers.2.mlp.fc1.bias"].zero_()
    result = run(pretrained(), bad)
    assert found(result) == {("all_zero", "layers.2.mlp.fc1.weight"), ("all_zero", "layers.2.mlp.fc1.bias")}
    assert {f["severity"] for f in result.data["anomalies"]} == {"high"}  # the bias *became* zero
    # one file: a zero 2-D weight is high, a zero 1-D bias alone is only informative
    single = run(bad)
    severities = {f["tensor"]: f["severity"] for f in single.data["anomalies"]}
    assert severities == {"layers.2.mlp.fc1.weight": "high", "layers.2.mlp.fc1.bias": "info"}


def _robust_z(sd: dict, target: str, group: list[str]) -> float:
    logs = np.array([np.log10(np.sqrt(np.mean(sd[n].double().numpy() ** 2))) for n in group])
    med = np.median(logs)
    mad = max(np.median(np.abs(logs - med)), 0.1)
    own = np.log10(np.sqrt(np.mean(sd[target].double().numpy() ** 2)))
    return 0.6745 * (own - med) / mad


def test_tensor_scaled_by_1e4_is_exploding_in_pair_and_inspect_mode():
    bad = finetuned()
    target = "layers.1.mlp.fc2.weight"
    bad[target] = bad[target] * 1e4
    pair = run(pretrained(), bad)
    assert found(pair) == {("exploding", target)}
    single = run(bad)
    assert found(single) == {("exploding", target)}
    (f,) = single.data["anomalies"]
    assert f["figure"] == "robust_z"
    group = [f"layers.{i}.mlp.fc2.weight" for i in range(4)]
    assert f["value"] == pytest.approx(_robust_z(bad, target, group), rel=1e-6)
    assert f["threshold"] == 3.5 and f["severity"] == "high"


def test_tensor_scaled_down_is_vanishing():
    bad = finetuned()
    target = "layers.3.attn.v_proj.weight"
    bad[target] = bad[target] * 1e-4
    assert found(run(bad)) == {("vanishing", target)}
    assert found(run(pretrained(), bad)) == {("vanishing", target)}


def test_dead_rows_are_counted():
    bad = finetuned()
    target = "layers.0.mlp.fc1.weight"
    bad[target][[0, 5, 7]] = 0.0
    result = run(pretrained(), bad)
    assert found(result) == {("dead_units", target)}
    (f,) = result.data["anomalies"]
    assert f["value"] == pytest.approx(3 / 64) and f["severity"] == "low"


def test_frozen_tensor_while_the_rest_trained():
    bad = finetuned()
    target = "layers.0.attn.q_proj.weight"
    bad[target] = pretrained()[target]
    result = run(pretrained(), bad)
    assert found(result) == {("frozen", target)}
    assert result.data["anomalies"][0]["severity"] == "low"


def test_constant_weight_matrix():
    bad = finetuned()
    bad["layers.2.attn.o_proj.weight"].fill_(0.05)
    result = run(pretrained(), bad)
    assert found(result) == {("constant", "layers.2.attn.o_proj.weight")}
    assert result.data["anomalies"][0]["severity"] == "high"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp16_overflow_count(dtype):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(512, 512, generator=g)
    w[1, 2], w[100, 7], w[300, 300] = 7e4, -9e4, 6e4  # the last fits in float16: not an overflow
    w = w.to(dtype)
    result = run({"w": w})
    assert found(result) == {("fp16_overflow", "w")}
    expected = int(np.sum(np.abs(w.double().numpy()) > 65504.0))
    assert result.data["anomalies"][0]["value"] == expected == 2


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(2, 40), cols=st.integers(1, 40), seed=st.integers(0, 2**16), data=st.data())
def test_dead_row_count_matches_reference(rows, cols, seed, data):
    dead = data.draw(st.sets(st.integers(0, rows - 1), max_size=rows - 1))
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) + 0.1
    w[sorted(dead)] = 0.0
    result = run({"w": w})
    norms = np.linalg.norm(w.double().numpy(), axis=1)
    expected = int(np.sum(norms <= 1e-6 * np.sqrt(np.sum(norms**2) / rows)))
    hits = [f for f in result.data["anomalies"] if f["type"] == "dead_units"]
    if expected == 0:
        assert hits == []
    else:
        assert len(hits) == 1 and hits[0]["value"] == pytest.approx(expected / rows)
        assert expected == len(dead)


# ---- CI gate and CLI --------------------------------------------------------------------


@pytest.fixture
def files(tmp_path):
    bad = finetuned()
    bad["layers.1.mlp.fc1.weight"][0, 0] = float("nan")
    return {"pre": save(tmp_path, "pre.safetensors", pretrained()),
            "fine": save(tmp_path, "fine.safetensors", finetuned()),
            "nan": save(tmp_path, "nan.safetensors", bad)}


def test_cli_fail_on_anomaly_exit_codes(files, capsys):
    assert main([files["pre"], files["nan"], "--anomaly-detection", "--fail-on-anomaly", "critical"]) == 1
    out = capsys.readouterr().out
    assert "anomaly_detection: type=nan_inf, severity=critical, affected=[layers.1.mlp.fc1.weight]" in out
    assert main([files["pre"], files["fine"], "--anomaly-detection", "--fail-on-anomaly", "info"]) == 0
    assert "anomaly_detection: type=none, severity=none, affected=[], findings=0" in capsys.readouterr().out
    # the gate counts the new side: a broken *old* checkpoint does not fail CI
    assert main([files["nan"], files["fine"], "--fail-on-anomaly", "critical"]) == 0
    # --fail-on-anomaly alone runs the analysis, also under --quiet
    assert main([files["pre"], files["nan"], "--fail-on-anomaly=high"]) == 1
    capsys.readouterr()
    assert main(["inspect", files["nan"], "--quiet", "--fail-on-anomaly", "critical"]) == 1
    assert main(["inspect", files["fine"], "--quiet", "--fail-on-anomaly", "low"]) == 0
    assert capsys.readouterr().out == ""


def test_cli_rejects_unknown_severity(files, capsys):
    assert main([files["pre"], files["fine"], "--fail-on-anomaly", "severe"]) == 2
    err = capsys.readouterr().err
    assert "--fail-on-anomaly must be one of info, low, medium, high, critical (got 'severe')" in err


def test_cli_json_keeps_type_and_lists_findings(files, capsys):
    assert main(["inspect", files["nan"], "--anomaly-detection", "--output", "json"]) == 0
    items = json.loads(capsys.readouterr().out)
    (item,) = [i for i in items if i["type"] == NAME]
    assert item["anomaly_type"] == "nan_inf" and item["severity"] == "critical"
    (finding,) = item["anomalies"]
    assert finding == {"type": "nan_inf", "tensor": "layers.1.mlp.fc1.weight", "side": "new", "severity": "critical",
                       "figure": "nonfinite_count", "value": 1, "threshold": 0, "rule": finding["rule"]}
    assert "nan=1" in finding["rule"]


# ---- issue 18: the new state is what counts; numbers in the rules ------------------------------


def test_findings_on_the_old_side_only_are_listed_not_counted():
    """The headline, the severity counts and the gate describe the new state (side new or
    both): a finding seen only on the old side is listed with side "old", not counted."""
    target = "layers.1.mlp.fc1.weight"
    bad = finetuned()
    bad[target][0, 0] = float("nan")
    fixed = run(bad, finetuned())
    (f,) = fixed.data["anomalies"]
    assert (f["type"], f["tensor"], f["side"], f["severity"]) == ("nan_inf", target, "old", "critical")
    assert dict(fixed.headline) == {"anomaly_type": "none", "severity": "none", "affected": [], "findings": 0}
    assert fixed.data["old_only"] == 1 and sum(fixed.data["severity_counts"].values()) == 0
    text = " ".join(str(torchdiff.compare(bad, finetuned(), analyses=[NAME])).split())  # lines unwrapped
    assert "anomaly_detection: type=none, severity=none, affected=[], findings=0" in text
    assert "count new and both; 1 seen on the old side only: listed, not counted" in text
    # seen on both sides: part of the new state, counted
    both = run(bad, bad)
    assert [g["side"] for g in both.data["anomalies"]] == ["both"]
    assert (both.headline["findings"], both.data["old_only"], both.data["severity_counts"]["critical"]) == (1, 0, 1)


def test_rule_texts_write_counts_with_separators():
    """A [64, 32] weight holds 2,048 values (the rule printed ``of 2048 values``)."""
    target = "layers.1.mlp.fc1.weight"
    bad = finetuned()
    bad[target][0, 0] = float("nan")
    (f,) = run(pretrained(), bad).data["anomalies"]
    assert f["rule"] == "nan=1, inf=0 of 2,048 values; any non-finite value is critical"
    assert f["value"] == 1  # JSON keeps the number
