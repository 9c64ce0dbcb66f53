"""--memory-analysis: exact bytes against sums computed here from the tensors
(numel × NumPy itemsize), optimizer state counted apart, estimates against their
formulas worked by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import torchdiff
from torchdiff.analyses import memory_analysis
from torchdiff.cli import main
from truth_models import finetuned, pretrained, training_checkpoint

NAME = "memory_analysis"
ITEMSIZE = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2, torch.float64: 8, torch.int8: 1,
            torch.int64: 8, torch.uint8: 1, torch.bool: 1}


def nbytes(tensors) -> int:
    return sum(int(np.prod(t.shape, dtype=np.int64)) * ITEMSIZE[t.dtype] for t in tensors)


def run(old, new=None):
    if new is None:
        return torchdiff.inspect(old, analyses=[NAME]).analysis(NAME)
    return torchdiff.compare(old, new, analyses=[NAME]).analysis(NAME)


def mb(x: float) -> str:
    """Reference text of a size (docs/OUTPUT.md): powers of 1000, 4 significant digits."""
    for unit, power in (("TB", 12), ("GB", 9), ("MB", 6), ("KB", 3)):
        if abs(x) >= 10 ** power:
            return f"{x / 10 ** power:.4g} {unit}"
    return f"{x:g} B"


def test_headline_sizes_read_in_units_worked_by_hand(tmp_path, capsys):
    """19,210 float32 values: 76,840 B -> "76.84 KB" (it printed 0.07684MB); half of it in
    float16: 38,420 B, a delta of -38.42 KB; JSON keeps the bytes."""
    old = {"w": torch.zeros(19210)}
    new = {"w": torch.zeros(19210, dtype=torch.float16)}
    a = run(old, new)
    assert (a.headline["old"], a.headline["new"], a.headline["delta"]) == ("76.84 KB", "38.42 KB", "-38.42 KB")
    assert (a.data["old_bytes"], a.data["new_bytes"], a.data["delta_bytes"]) == (76840, 38420, -38420)
    assert run(new, old).headline["delta"] == "+38.42 KB"
    assert run(old, old).headline["delta"] == "0 B"
    assert run({"w": torch.zeros(15)}).headline["size"] == "60 B"
    # estimates: inference 76,840 × 1.2 = 92,208 B; training 19,210 × 16 = 307,360 B
    assert (run(old).headline["inference_est"], run(old).headline["training_est"]) == ("92.21 KB", "307.4 KB")
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(old, str(a))
    save_file(new, str(b))
    assert main([str(a), str(b), "--memory-analysis"]) == 0
    out = capsys.readouterr().out
    assert "memory_analysis: old=76.84 KB, new=38.42 KB, delta=-38.42 KB, inference_est=46.1 KB" in out
    # the per-dtype table: byte columns in units as well (each side's dtype on its own row)
    dtype_table = out[out.index("Bytes by dtype"):out.index("Bytes by layer")].splitlines()
    assert dtype_table[1].split() == ["dtype", "bytes_old", "bytes_new"]
    assert [line.split() for line in dtype_table[3:5]] == [["float16", "0", "B", "38.42", "KB"],
                                                           ["float32", "76.84", "KB", "0", "B"]]
    assert main([str(a), str(b), "--memory-analysis", "--output", "json"]) == 0
    (item,) = [i for i in json.loads(capsys.readouterr().out) if i["type"] == NAME]
    assert item["bytes_by_dtype"] == [{"dtype": "float16", "bytes_old": 0, "bytes_new": 38420},
                                      {"dtype": "float32", "bytes_old": 76840, "bytes_new": 0}]
    assert (item["old"], item["old_bytes"]) == ("76.84 KB", 76840)


def test_pair_bytes_per_side_dtype_and_layer():
    old = pretrained()
    new = {k: v.to(torch.bfloat16) for k, v in finetuned().items()}
    new["extra.weight"] = torch.zeros(100, 10, dtype=torch.float16)
    a = run(old, new)
    b_old, b_new = nbytes(old.values()), nbytes(new.values())
    assert (a.data["old_bytes"], a.data["new_bytes"], a.data["delta_bytes"]) == (b_old, b_new, b_new - b_old)
    assert a.headline["old"] == mb(b_old) and a.headline["new"] == mb(b_new)
    assert a.headline["delta"] == "-" + mb(b_old - b_new)
    assert all(not v.endswith("MB") or " " in v for v in a.headline.values())  # "0.1444MB" no more
    assert a.data["sides"]["new"]["bytes_by_dtype"]["float16"] == {"tensors": 1, "params": 1000, "bytes": 2000}
    assert a.data["sides"]["new"]["bytes_by_dtype"]["bfloat16"]["bytes"] == nbytes(finetuned().values()) // 2
    layer2 = nbytes(v for k, v in old.items() if k.startswith("layers.2."))
    assert a.data["sides"]["old"]["bytes_by_layer"]["layers.2"] == layer2
    assert a.data["sides"]["new"]["bytes_by_layer"]["extra"] == 2000
    largest = a.data["sides"]["new"]["largest"][0]
    assert largest["bytes"] == max(nbytes([v]) for v in new.values())


def test_training_checkpoint_counts_optimizer_separately(tmp_path):
    ckpt = training_checkpoint()
    path = tmp_path / "train.pt"
    torch.save(ckpt, path)
    a = run(str(path))
    model = nbytes(ckpt["model"].values())
    opt_tensors = [t for s in ckpt["optimizer"]["state"].values() for t in s.values()]
    opt = nbytes(opt_tensors)
    new = a.data["sides"]["new"]
    assert (new["model_bytes"], new["optimizer_bytes"], new["bytes"]) == (model, opt, model + opt)
    assert new["optimizer_tensors"] == len(opt_tensors) == 3 * len(ckpt["model"])
    states = ckpt["optimizer"]["state"].values()
    assert new["optimizer_bytes_by_slot"] == {
        slot: nbytes(s[slot] for s in states) for slot in ("exp_avg", "exp_avg_sq", "step")}
    assert a.headline["size"] == mb(model + opt)
    assert a.headline["model"] == mb(model) and a.headline["optimizer"] == mb(opt)
    # the estimates are about the model only
    p = sum(v.numel() for v in ckpt["model"].values())
    assert new["estimates"]["training_bytes"] == 16 * p
    assert new["estimates"]["inference_bytes"] == pytest.approx(model * 1.2)
    assert any(n.startswith(f"optimizer state found: {len(opt_tensors)} tensors") for n in a.notes)
    assert new["bytes_by_layer"]["(optimizer state)"] == opt


@pytest.mark.parametrize("dtype, per_param", [(torch.float32, 16), (torch.bfloat16, 16), (torch.float16, 16),
                                              (torch.float64, 32)])
def test_training_estimate_formula(dtype, per_param):
    sd = {k: v.to(dtype) for k, v in finetuned().items()}
    sd["buf.num_batches_tracked"] = torch.tensor(5)  # non-float: kept as stored
    a = run(sd)
    p = sum(v.numel() for k, v in sd.items() if v.is_floating_point())
    est = a.data["sides"]["new"]["estimates"]
    assert est["training_bytes_per_param"] == per_param
    assert est["training_bytes"] == per_param * p + 8
    if dtype in (torch.bfloat16, torch.float16):
        assert "fp32 master 4" in est["training_formula"]


def test_what_if_table_and_fits():
    rows = {r["dtype"]: r for r in run(finetuned()).data["what_if"]}
    p = sum(v.numel() for v in finetuned().values())
    assert rows["float32"]["weights_bytes"] == 4 * p
    assert rows["int8"]["weights_bytes"] == p
    assert rows["int4"]["weights_bytes"] == pytest.approx(p * (0.5 + 2 / 128))
    assert rows["int8"]["training_bytes"] is None
    assert rows["bfloat16"]["inference_fits_gb"] == [8, 16, 24, 40, 80]
    # a 7e9-parameter model, by hand: fp16 weights 14e9 B, inference 16.8e9 B ≤ 16 GiB (17.18e9 B)
    big = {"float_params": 7_000_000_000, "non_float_bytes": 0}
    w = {r["dtype"]: r for r in memory_analysis._what_if(big)}
    assert w["float16"]["inference_bytes"] == pytest.approx(16.8e9)
    assert w["float16"]["inference_fits_gb"] == [16, 24, 40, 80]
    assert w["float32"]["inference_fits_gb"] == [40, 80]           # 33.6e9 B > 24 GiB
    assert w["float32"]["training_fits_gb"] == []                  # 112e9 B > 80 GiB
    assert w["int4"]["inference_fits_gb"] == [8, 16, 24, 40, 80]   # 4.33e9 B


@settings(max_examples=20, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(sorted(ITEMSIZE, key=str)),
                          st.lists(st.integers(0, 9), min_size=0, max_size=3)), min_size=1, max_size=6))
def test_bytes_match_reference_for_any_dtypes_and_shapes(specs):
    sd = {f"t{i}.weight": torch.zeros(shape, dtype=dtype) for i, (dtype, shape) in enumerate(specs)}
    a = run(sd)
    assert a.data["new_bytes"] == nbytes(sd.values())
    by_dtype = {}
    for t in sd.values():
        name = str(t.dtype).replace("torch.", "")
        by_dtype[name] = by_dtype.get(name, 0) + nbytes([t])
    assert {k: v["bytes"] for k, v in a.data["sides"]["new"]["bytes_by_dtype"].items()} == by_dtype


def test_cli_text_and_json(tmp_path, capsys):
    old, new = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(pretrained(), str(old))
    save_file({k: v.half() for k, v in finetuned().items()}, str(new))
    assert main([str(old), str(new), "--memory-analysis"]) == 0
    out = capsys.readouterr().out
    b = nbytes(pretrained().values())
    assert f"memory_analysis: old={mb(b)}, new={mb(b // 2)}, delta=-{mb(b - b // 2)}, inference_est=" in out
    assert "What if" in out and "Adam training" in out
    assert main([str(old), str(new), "--memory-analysis", "--output", "json"]) == 0
    (item,) = [i for i in json.loads(capsys.readouterr().out) if i["type"] == NAME]
    assert (item["old_bytes"], item["new_bytes"]) == (b, b // 2)
    assert [r["dtype"] for r in item["what_if"]] == ["float32", "bfloat16", "float16", "int8", "int4"]


def test_training_state_is_neither_model_nor_optimizer(tmp_path):
    """A saved RNG state (uint8 bytes) and nanoGPT's 0-d best_val_loss are the training
    loop's state: counted in bytes and their own row, never as the model's weights or
    parameters (architecture params likewise)."""
    fc = torch.randn(4, 4)
    rng = torch.get_rng_state()
    torch.save({"model": {"fc.weight": fc}, "rng_state": rng, "best_val_loss": torch.tensor(3.2)}, tmp_path / "a.pt")
    report = torchdiff.inspect(tmp_path / "a.pt", analyses=["memory_analysis", "architecture_comparison"])
    info = report.analysis("memory_analysis").data["sides"]["new"]
    assert info["model_bytes"] == 64 and info["training_state_bytes"] == rng.numel() + 4
    assert info["bytes"] == 64 + rng.numel() + 4
    assert info["bytes_by_layer"]["(training state)"] == rng.numel() + 4
    assert report.analysis("architecture_comparison").headline["params"] == 16
    assert {d.name: d.role for d in report}["rng_state"] == "training_state"
