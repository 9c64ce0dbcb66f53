"""Manifests: ``torchdiff hash`` / ``torchdiff.fingerprint`` and ``torchdiff verify``.

References: figures against float64 NumPy, hashes against xxhash over NumPy's bytes,
files written by safetensors/torch/numpy themselves; the big-file bit flip in a
module-scoped 100 MB checkpoint written once."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
import torch
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import torchdiff
from torchdiff.cli import main
from torchdiff.manifest import ROUNDING, Manifest, distance, fingerprint, record, sample_positions, verify
from helpers import run  # noqa: E402 - tests/ is on sys.path


def reference(t: torch.Tensor) -> dict:
    """Figures in float64 NumPy over the finite values."""
    x = t.detach().reshape(-1)
    if x.dtype == torch.bool:
        x = x.to(torch.uint8)
    a = x.to(torch.float64).numpy()
    finite = a[np.isfinite(a)]
    return {"norm": float(np.linalg.norm(finite)), "sum": float(finite.sum()),
            "min": float(finite.min()) if finite.size else None, "max": float(finite.max()) if finite.size else None,
            "nan_count": int(np.isnan(a).sum()), "inf_count": int(np.isinf(a).sum())}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
                                   torch.int8, torch.uint8, torch.bool])
@pytest.mark.parametrize("shape", [(0,), (), (7,), (33, 129), (3, 4097)])
def test_figures_and_hash_against_numpy(dtype, shape):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g) * 3
    t = x.to(dtype) if dtype != torch.bool else x > 0
    r = record("t", t)
    ref = reference(t)
    assert r.dtype == torchdiff.formats.dtype_name(dtype) and r.shape == tuple(shape)
    assert r.nbytes == t.numel() * t.element_size()
    expected = xxhash.xxh3_128(t.contiguous().reshape(-1).view(torch.uint8).numpy() if t.numel() else b"").hexdigest()
    assert r.hash == expected
    # float32 accumulation: relative error well under the documented ROUNDING allowance
    assert r.norm == pytest.approx(ref["norm"], rel=1e-6, abs=1e-12)
    assert r.sum == pytest.approx(ref["sum"], rel=1e-6, abs=1e-6 * max(ref["norm"], 1.0) * math.sqrt(max(t.numel(), 1)))
    assert (r.min, r.max) == (ref["min"], ref["max"])
    positions = sample_positions(t.numel())
    assert list(r.sample) == [float(v) for v in t.reshape(-1).to(torch.float64)[positions].tolist()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("offset", [0.0, 10.0])
def test_rounding_allowance_holds_on_large_tensors(dtype, offset):
    """ROUNDING bounds the figures' relative error: norm against float64, and the sum's
    error against ‖x‖·√n (the scale the lower bound divides it by)."""
    g = torch.Generator().manual_seed(2)
    t = (torch.randn(3 * 2**20 + 17, generator=g) + offset).to(dtype)
    r = record("t", t)
    ref = reference(t)
    assert abs(r.norm - ref["norm"]) <= ROUNDING / 10 * ref["norm"]
    assert abs(r.sum - ref["sum"]) / math.sqrt(t.numel()) <= ROUNDING / 10 * ref["norm"]


def test_nonfinite_counted_and_left_out():
    t = torch.tensor([1.0, float("nan"), -2.0, float("inf"), float("-inf"), 3.0])
    r = record("t", t)
    assert (r.nan_count, r.inf_count) == (1, 2)
    assert (r.norm, r.sum, r.min, r.max) == (math.sqrt(14.0), 2.0, -2.0, 3.0)
    allnan = record("n", torch.full((5,), float("nan")))
    assert (allnan.norm, allnan.sum, allnan.min, allnan.max, allnan.nan_count) == (0.0, 0.0, None, None, 5)


def test_infinities_of_both_signs_are_counted_without_a_numpy_warning():
    """+inf and -inf in one block (inf - inf = nan inside the fast path's sums) and in the
    tail: counted and left out, and nothing printed (numpy's "invalid value encountered
    in reduce" reached stderr)."""
    import warnings

    g = torch.Generator().manual_seed(6)
    for n, where in ((64 * 3, (5, 9)), (64 * 2 + 7, (130, 132))):
        t = torch.randn(n, generator=g)
        t[where[0]], t[where[1]] = math.inf, -math.inf
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            r = record("t", t)
        kept = t[torch.isfinite(t)].double()
        assert (r.nan_count, r.inf_count) == (0, 2)
        assert r.norm == pytest.approx(float(kept.norm()), rel=1e-12)
        assert r.sum == pytest.approx(float(kept.sum()), rel=1e-9, abs=1e-12)


def test_sample_positions():
    assert sample_positions(5) == [0, 1, 2, 3, 4]
    p = sample_positions(10**9)
    assert len(p) == 64 and p == sorted(set(p)) and 0 <= p[0] and p[-1] < 10**9
    assert p[0] == int(math.fmod(0.5 * 0.6180339887498949, 1.0) * 10**9) or p[0] in [
        int(math.fmod((j + 0.5) * 0.6180339887498949, 1.0) * 10**9) for j in range(64)]


@pytest.fixture(scope="module")
def state():
    g = torch.Generator().manual_seed(0)
    return {"emb.weight": torch.randn(64, 16, generator=g), "fc.weight": torch.randn(32, 16, generator=g),
            "fc.bias": torch.randn(32, generator=g), "steps": torch.tensor([3, 4, 5])}


def test_same_manifest_from_every_format(tmp_path, state):
    """safetensors (hashed from the mapped span), torch .pt, numpy .npz and a live state_dict agree."""
    save_file(state, tmp_path / "a.safetensors")
    torch.save(state, tmp_path / "a.pt")
    np.savez(tmp_path / "a.npz", **{k: v.numpy() for k, v in state.items()})
    def records(source):
        return sorted(fingerprint(source).to_dict()["tensors"], key=lambda r: r["name"])

    live = records(state)
    for name in ("a.safetensors", "a.pt", "a.npz"):
        assert records(tmp_path / name) == live, name


def test_hash_cli_writes_a_manifest_and_verify_passes(tmp_path, capsys, state):
    save_file(state, tmp_path / "a.safetensors")
    code, out, err = run(capsys, "hash", tmp_path / "a.safetensors", "-o", tmp_path / "m.json")
    assert (code, out, err) == (0, "", "")
    data = json.loads((tmp_path / "m.json").read_text())
    assert data["format"] == "torchdiff-manifest" and data["hash"] == "xxh3_128"
    assert sorted(r["name"] for r in data["tensors"]) == sorted(state)
    code, out, _ = run(capsys, "verify", tmp_path / "m.json", tmp_path / "a.safetensors")
    assert code == 0 and out.strip() == "verify: 4 tensors: 4 bitwise equal, 0 accepted, 0 mismatching -> OK"
    code, out, _ = run(capsys, "hash", tmp_path / "a.safetensors")  # no -o: the manifest on stdout
    assert code == 0 and json.loads(out) == data


def test_missing_extra_shape_dtype_named(tmp_path, capsys, state):
    save_file(state, tmp_path / "a.safetensors")
    other = dict(state)
    del other["fc.bias"]
    other["new.weight"] = torch.zeros(2)
    other["fc.weight"] = state["fc.weight"][:16].contiguous()
    other["emb.weight"] = state["emb.weight"].double()
    save_file(other, tmp_path / "b.safetensors")
    run(capsys, "hash", tmp_path / "a.safetensors", "-o", tmp_path / "m.json")
    code, out, _ = run(capsys, "verify", tmp_path / "m.json", tmp_path / "b.safetensors")
    assert code == 1
    lines = out.splitlines()
    assert any(line.startswith("  ! fc.bias: missing: in the manifest (float32 [32]), not in ") for line in lines)
    assert any(line.startswith("  ! new.weight: extra: in ") and line.endswith("(float32 [2]), not in the manifest")
               for line in lines)
    assert "  ! fc.weight: shape: [32, 16] -> [16, 16]" in lines
    assert any(line.startswith("  ! emb.weight: dtype: float32 -> float64; rel_l2 ≥ 0, ≈ 0 from 64 samples")
               for line in lines)
    assert lines[-1] == "verify: 4 tensors: 1 bitwise equal, 0 accepted, 4 mismatching -> FAILED"


def test_manifest_against_manifest_and_json_output(tmp_path, capsys, state):
    other = dict(state)
    other["fc.bias"] = state["fc.bias"] + 1.0
    fingerprint(state).save(tmp_path / "a.json")
    fingerprint(other).save(tmp_path / "b.json")
    code, out, _ = run(capsys, "verify", tmp_path / "a.json", tmp_path / "b.json", "--output", "json")
    items = json.loads(out)
    assert code == 1 and items[0]["ok"] is False and items[0]["mismatches"] == 1
    assert (items[0]["manifest"], items[0]["checked"]) == (str(tmp_path / "a.json"), str(tmp_path / "b.json"))
    bad = items[1]
    assert (bad["path"], bad["kind"], bad["type"]) == ("fc.bias", "bytes", "verify_mismatch")
    a, b = state["fc.bias"].double(), other["fc.bias"].double()
    exact = float((b - a).norm() / a.norm())  # every value sampled (32 ≤ 64): exact
    assert bad["rel_l2_estimate"] == pytest.approx(exact, rel=1e-6)  # divided by the float32-summed norm
    assert exact / (1 + ROUNDING) - 1e-6 <= bad["rel_l2_lower"] <= exact  # ÷ ‖A‖(1 + ROUNDING)


def test_tolerance_accepts_close_and_rejects_far(tmp_path, capsys, state):
    g = torch.Generator().manual_seed(5)
    w = state["emb.weight"]
    close = dict(state, **{"emb.weight": w + 1e-5 * torch.randn(w.shape, generator=g)})
    save_file(close, tmp_path / "close.safetensors")
    fingerprint(state).save(tmp_path / "m.json")
    true = float((close["emb.weight"].double() - w.double()).norm() / w.double().norm())
    code, out, _ = run(capsys, "verify", tmp_path / "m.json", tmp_path / "close.safetensors",
                       "--tolerance", "rel_l2=1e-4")
    assert code == 0 and "[accepted: --tolerance rel_l2=0.0001: lower bound and estimate ≤ 0.0001]" in out
    code, out, _ = run(capsys, "verify", tmp_path / "m.json", tmp_path / "close.safetensors",
                       "--tolerance", f"rel_l2={true / 10}")
    assert code == 1 and "over --tolerance" in out
    # an fp16 copy: a dtype finding, accepted when its values are within the tolerance
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    assert not verify(tmp_path / "m.json", half).ok
    accepted = verify(tmp_path / "m.json", half, tolerance="rel_l2=1e-2")
    assert accepted.ok and {f.kind for f in accepted.findings} == {"dtype"}
    assert not verify(tmp_path / "m.json", half, tolerance="rel_l2=1e-7").ok


@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 3000), seed=st.integers(0, 2**31 - 1), sparse=st.booleans(),
       scale=st.sampled_from([1e-6, 1e-3, 1.0, 100.0]))
def test_lower_bound_never_exceeds_the_true_rel_l2(n, seed, sparse, scale):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, generator=g, dtype=torch.float64).float()
    delta = torch.randn(n, generator=g, dtype=torch.float64).float() * scale
    if sparse:
        delta = delta * (torch.rand(n, generator=g) < 0.01)
    b = a + delta
    true = float((b.double() - a.double()).norm() / a.double().norm())
    figs = distance(record("x", a), record("x", b))
    assert figs["rel_l2_lower"] <= true
    if n <= 64:  # every value sampled: exact but for ‖A‖'s float32 block-sum rounding
        assert figs["rel_l2_estimate"] == pytest.approx(true, rel=1e-6)


# ---- one bit in 100 MB --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A 100 MB float32 checkpoint (25 tensors of 4 MB), its manifest, and a copy with one bit flipped."""
    d = tmp_path_factory.mktemp("big")
    g = torch.Generator().manual_seed(3)
    tensors = {f"layers.{i}.weight": torch.randn(1024, 1024, generator=g) for i in range(25)}
    save_file(tensors, d / "a.safetensors")
    flipped = d / "b.safetensors"
    shutil.copyfile(d / "a.safetensors", flipped)
    with open(d / "a.safetensors", "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    begin = 8 + n + header["layers.17.weight"]["data_offsets"][0] + 4 * 123_457  # one element's low byte
    with open(flipped, "r+b") as f:
        f.seek(begin)
        byte = f.read(1)[0]
        f.seek(begin)
        f.write(bytes([byte ^ 0x01]))  # the lowest mantissa bit
    return d


def test_one_bit_flip_in_100mb_is_caught_and_named(big, capsys):
    code, _, _ = run(capsys, "hash", big / "a.safetensors", "-o", big / "m.json")
    assert code == 0
    code, out, _ = run(capsys, "verify", big / "m.json", big / "b.safetensors")
    assert code == 1
    lines = out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("  ! layers.17.weight: bytes: bytes differ; rel_l2 ≥ ")
    assert lines[1] == "verify: 25 tensors: 24 bitwise equal, 0 accepted, 1 mismatching -> FAILED"
    a = load_file(big / "a.safetensors")["layers.17.weight"]
    b = load_file(big / "b.safetensors")["layers.17.weight"]
    assert int((a != b).sum()) == 1  # the file really differs in one element


# ---- casts ---------------------------------------------------------------------------------------

def test_bf16_cast_passes_with_allow_cast_and_fails_without(tmp_path, capsys, state):
    save_file(state, tmp_path / "fp32.safetensors")
    cast = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}
    save_file(cast, tmp_path / "bf16.safetensors")
    run(capsys, "hash", tmp_path / "fp32.safetensors", "--cast", "bfloat16", "-o", tmp_path / "m.json")
    code, out, _ = run(capsys, "verify", tmp_path / "m.json", tmp_path / "bf16.safetensors")
    assert code == 1 and "  ! fc.bias: dtype: float32 -> bfloat16; " in out
    code, out, _ = run(capsys, "verify", tmp_path / "m.json", tmp_path / "bf16.safetensors", "--allow-cast")
    assert code == 0, out
    assert out.splitlines()[-1] == "verify: 4 tensors: 1 bitwise equal, 3 accepted, 0 mismatching -> OK"
    assert "[accepted: --allow-cast: equal after the cast to bfloat16]" in out
    # one bf16 value one step off: not the cast of the original, refused even with --allow-cast
    wrong = dict(cast)
    w = cast["fc.weight"].clone()
    w.view(torch.int16)[0, 0] += 1
    wrong["fc.weight"] = w
    save_file(wrong, tmp_path / "bf16_wrong.safetensors")
    code, out, _ = run(capsys, "verify", tmp_path / "m.json", tmp_path / "bf16_wrong.safetensors", "--allow-cast")
    assert code == 1 and "--allow-cast: the manifest's bfloat16 fingerprint differs" in out


def test_allow_cast_needs_the_recorded_cast_or_the_wider_side(tmp_path, capsys, state):
    fingerprint(state).save(tmp_path / "m.json")  # no --cast
    cast = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}
    r = verify(tmp_path / "m.json", cast, allow_cast=True)
    assert not r.ok
    assert r.mismatches[0].detail.endswith("--allow-cast: the manifest has no bfloat16 fingerprint for this tensor "
                                           "(write it with torchdiff hash --cast bfloat16)")
    # the other way round: a bf16 manifest, an exact fp32 upcast checked against it
    up = {k: v.float() if v.is_floating_point() else v for k, v in cast.items()}
    assert verify(fingerprint(cast), up, allow_cast=True).ok
    assert not verify(fingerprint(cast), up).ok
    # a bf16 manifest against a second manifest of the fp32 values: the checked side lacks the cast
    r = verify(fingerprint(cast), fingerprint(up), allow_cast=True)
    assert r.mismatches[0].detail.endswith("the checked side has no bfloat16 fingerprint for this tensor (verify a "
                                           "checkpoint, which is cast as it is read, or write the checked manifest "
                                           "with torchdiff hash --cast bfloat16)")
    assert verify(fingerprint(cast), fingerprint(up, casts=["bfloat16"]), allow_cast=True).ok
    # hash --cast to a wider dtype records nothing, and says so
    save_file({k: v.contiguous() for k, v in cast.items()}, tmp_path / "bf16.safetensors")
    code, _, err = run(capsys, "hash", tmp_path / "bf16.safetensors", "--cast", "float32", "-o", tmp_path / "c.json")
    floats = sum(v.is_floating_point() for v in cast.values())
    assert code == 0 and err == (f"torchdiff: warning: --cast float32 not recorded for {floats} tensor(s) stored "
                                 "narrower (bfloat16): casts narrow, never widen; hash the float32 checkpoint with "
                                 "--cast bfloat16 instead\n")


# ---- tensor-parallel shards ---------------------------------------------------------------------

def test_two_way_tp_split_verifies_against_the_unsplit_manifest(tmp_path, capsys, state):
    fingerprint(state).save(tmp_path / "m.json")
    ranks = []
    for r in range(2):
        part = {"emb.weight": state["emb.weight"][:, 8 * r:8 * (r + 1)].contiguous(),   # column split
                "fc.weight": state["fc.weight"][16 * r:16 * (r + 1)].contiguous(),      # row split
                "fc.bias": state["fc.bias"][16 * r:16 * (r + 1)].contiguous(),
                "steps": state["steps"]}                                                # replicated
        save_file(part, tmp_path / f"rank{r}.safetensors")
        ranks.append(tmp_path / f"rank{r}.safetensors")
    code, out, _ = run(capsys, "verify", tmp_path / "m.json", *ranks, "--shards")
    assert code == 0, out
    code, out, _ = run(capsys, "verify", tmp_path / "m.json", *reversed(ranks), "--shards")  # wrong rank order
    assert code == 1 and "  ! fc.weight: bytes: bytes differ" in out
    code, out, err = run(capsys, "verify", tmp_path / "m.json", *ranks)
    assert code == 2 and "several rank files need --shards" in err
    # rank-suffixed names in one file
    one = {}
    for r in range(2):
        one[f"fc.weight.rank{r}"] = state["fc.weight"][16 * r:16 * (r + 1)].contiguous()
        one[f"fc.bias_tp{r}"] = state["fc.bias"][16 * r:16 * (r + 1)].contiguous()
    one["emb.weight"] = state["emb.weight"]
    one["steps"] = state["steps"]
    save_file(one, tmp_path / "suffixed.safetensors")
    code, out, _ = run(capsys, "verify", tmp_path / "m.json", tmp_path / "suffixed.safetensors", "--shards")
    assert code == 0, out


def test_differing_replicas_are_named(tmp_path, state):
    parts = [dict(state), dict(state)]
    parts[1]["steps"] = torch.tensor([3, 4, 6])
    r = verify(fingerprint(state), parts, shards=True)
    assert not r.ok
    assert [(f.name, f.kind, f.detail) for f in r.mismatches] == [
        ("steps", "replica", "replicated on 2 ranks; rank 1's copy differs from rank 0's")]


# ---- bad input ----------------------------------------------------------------------------------

_RECORD = '{{"name": "w", "dtype": "float32", "shape": [2], "nbytes": 8, "hash": "0", "norm": {norm}, "sum": 0}}'


@pytest.mark.parametrize("text, message", [
    ("not json", "not a torchdiff manifest (JSONDecodeError: "),
    ('{"format": "other"}', 'not a torchdiff manifest (no "format": "torchdiff-manifest")'),
    ('{"format": "torchdiff-manifest", "version": 9, "hash": "xxh3_128", "tensors": []}',
     "manifest version 9 is not supported (this torchdiff reads version 1)"),
    ('{"format": "torchdiff-manifest", "version": 1, "hash": "xxh3_128", "tensors": [{"name": "a"}]}',
     "tensor record 'a' is malformed (no 'dtype' field)"),
    ('{"format": "torchdiff-manifest", "version": 1, "hash": "xxh3_128", "tensors": [' + _RECORD.format(norm='"x"')
     + ']}', "a tensor record is malformed (ValueError: 'x' is not a number)"),
    ('{"format": "torchdiff-manifest", "version": 1, "hash": "xxh3_128", "tensors": ['
     + _RECORD.format(norm=1).replace("[2]", "[-1, 2]") + ']}', "tensor record 'w' has shape [-1, 2]: a dimension below 0"),
    # a second record of one tensor: the first (tampered) one would otherwise be ignored, or hide the second
    ('{"format": "torchdiff-manifest", "version": 1, "hash": "xxh3_128", "tensors": ['
     + _RECORD.format(norm=1) + ", " + _RECORD.format(norm=2) + ']}', "two records for tensor 'w'"),
])
def test_bad_manifest_is_one_error_line(tmp_path, capsys, state, text, message):
    (tmp_path / "m.json").write_text(text)
    save_file(state, tmp_path / "a.safetensors")
    with pytest.raises(torchdiff.TorchDiffError, match="m.json: "):
        Manifest.load(tmp_path / "m.json")
    code, out, err = run(capsys, "verify", tmp_path / "m.json", tmp_path / "a.safetensors")
    assert code == 2 and out == ""
    assert err.startswith(f"torchdiff: error: {tmp_path / 'm.json'}: ") and message in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, message", [
    (["hash"], "hash takes one checkpoint (got 0)"),
    (["hash", "x.safetensors", "--cast", "int8"], "--cast 'int8' is not a float dtype"),
    (["verify", "m.json", "x", "--tolerance", "rel_l2"], "--tolerance takes KEY=VALUE (e.g. rel_l2=1e-3), got 'rel_l2'"),
    (["verify", "m.json", "x", "--tolerance", "rel_l2=-1"], "--tolerance rel_l2 must be ≥ 0"),
    (["a.safetensors", "b.safetensors", "--shards"], "--shards works with verify, not compare"),
])
def test_bad_usage_exit_2(tmp_path, capsys, monkeypatch, state, argv, message):
    monkeypatch.chdir(tmp_path)
    save_file(state, tmp_path / "x.safetensors")
    code, _, err = run(capsys, *argv)
    assert code == 2 and message in err, err


def test_public_api_exported():
    assert torchdiff.fingerprint is fingerprint and torchdiff.verify is verify
    assert {"fingerprint", "verify"} <= set(torchdiff.__all__)


def test_gguf_and_matlab_files_fingerprint_like_their_values(tmp_path):
    """GGUF (written by gguf.GGUFWriter; a Q8_0 tensor hashed after dequantization) and
    MATLAB v5 (scipy.io.savemat): the record equals the one of the values the reader returns."""
    gguf = pytest.importorskip("gguf")
    scipy_io = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 64)).astype(np.float32)
    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), arch="llama")
    writer.add_tensor("plain.weight", w)
    writer.add_tensor("q.weight", gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0),
                      raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    m = fingerprint(tmp_path / "m.gguf")
    assert dataclasses.replace(m["plain.weight"], storage_dtype="") == record("plain.weight", torch.from_numpy(w))
    assert m["plain.weight"].storage_dtype == ""  # a plain type: the reader names it as torch does (float32)
    q = m["q.weight"]
    assert (q.dtype, q.shape, q.storage_dtype) == ("float32", (4, 64), "Q8_0")
    deq = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0),
                                                  gguf.GGMLQuantizationType.Q8_0).reshape(4, 64).copy())
    assert q.hash == record("q", deq).hash
    scipy_io.savemat(tmp_path / "m.mat", {"w": w.astype(np.float64)})
    assert fingerprint(tmp_path / "m.mat")["w"].hash == record("w", torch.from_numpy(w.astype(np.float64))).hash


# ---- names paired as compare pairs them ---------------------------------------------------------

def _tied_model():
    g = torch.Generator().manual_seed(0)
    wte = torch.randn(16, 4, generator=g)
    return {"transformer.wte.weight": wte, "transformer.h.0.w": torch.randn(4, 4, generator=g), "lm_head.weight": wte}


def test_a_tied_weight_held_once_verifies_against_a_manifest_of_both_names(tmp_path, capsys):
    """The trainer writes a .pt (one storage, two names), inference a safetensors file
    that holds the tied weight once: as compare, verify pairs them. A missing weight
    that is not tied, or a tied one whose values differ, still fails."""
    state = _tied_model()
    torch.save(state, tmp_path / "train.pt")
    manifest = fingerprint(tmp_path / "train.pt")
    assert manifest["lm_head.weight"].tied_to == "transformer.wte.weight"
    assert Manifest.from_dict(json.loads(json.dumps(manifest.to_dict())))["lm_head.weight"].tied_to == \
        "transformer.wte.weight"
    once = {k: v.clone() for k, v in state.items() if k != "lm_head.weight"}  # save_pretrained drops the head
    save_file(once, tmp_path / "model.safetensors")
    result = verify(manifest, tmp_path / "model.safetensors")
    assert result.ok and result.equal == 2
    assert [(f.name, f.kind, f.accepted) for f in result.findings] == [("lm_head.weight", "tied", True)]
    # the other way: a manifest of the file that holds it once, the .pt with both names
    back = verify(fingerprint(tmp_path / "model.safetensors"), tmp_path / "train.pt")
    assert back.ok and [(f.name, f.kind) for f in back.findings] == [("lm_head.weight", "tied")]
    # not tied: missing is missing
    save_file({k: v for k, v in once.items() if k != "transformer.h.0.w"}, tmp_path / "short.safetensors")
    assert [(f.name, f.kind) for f in verify(manifest, tmp_path / "short.safetensors").mismatches] == [
        ("transformer.h.0.w", "missing")]
    # tied, but the values held differ: a mismatch under the manifest's name
    changed = dict(once, **{"transformer.wte.weight": once["transformer.wte.weight"] + 1})
    save_file(changed, tmp_path / "changed.safetensors")
    assert {(f.name, f.kind) for f in verify(manifest, tmp_path / "changed.safetensors").mismatches} == {
        ("transformer.wte.weight", "bytes"), ("lm_head.weight", "bytes")}


def test_container_prefixes_and_wrappers_pair_as_in_compare(tmp_path, capsys):
    """A manifest of plain weights against a training checkpoint saved as
    {"model": ddp.state_dict()} (names model.module.*): paired, and the finding says how."""
    state = {k: v.clone() for k, v in _tied_model().items() if k != "lm_head.weight"}
    save_file(state, tmp_path / "model.safetensors")
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "train.pt")
    result = verify(tmp_path / "model.safetensors", tmp_path / "train.pt")
    assert result.ok and result.equal == 2
    assert [(f.name, f.kind, f.accepted) for f in result.findings] == [("(names)", "paired", True)]
    assert "'model.'" in result.findings[0].detail and "module." in result.findings[0].detail
    code, out, _ = run(capsys, "verify", tmp_path / "model.safetensors", tmp_path / "train.pt")
    assert code == 0 and "2 bitwise equal" in out


def test_name_filters_select_what_hash_records_and_verify_checks(tmp_path, capsys):
    """--path / --ignore-keys-regex work as in compare: hash records the tensors kept,
    verify checks them on both sides (the model of a training checkpoint whose optimizer
    state moved), and a filter that keeps nothing is a usage error. Flags hash and verify
    do not use are said, one line each."""
    state = _tied_model()
    train = {"model": {k: v.clone() for k, v in state.items() if k != "lm_head.weight"},
             "optimizer": {"state": {0: {"exp_avg": torch.ones(4)}}}}
    torch.save(train, tmp_path / "a.pt")
    train["optimizer"]["state"][0]["exp_avg"] = torch.full((4,), 2.0)
    torch.save(train, tmp_path / "b.pt")
    m = fingerprint(tmp_path / "a.pt", path="model.")
    assert sorted(m.tensors) == ["model.transformer.h.0.w", "model.transformer.wte.weight"]
    assert not verify(tmp_path / "a.pt", tmp_path / "b.pt").ok
    kept = verify(tmp_path / "a.pt", tmp_path / "b.pt", ignore_keys_regex=r"^optimizer\.")
    assert kept.ok and kept.tensors == 2 and kept.equal == 2
    with pytest.raises(torchdiff.UsageError, match=r"^--path 'nomatch' selects no tensor of the 3 compared"):
        fingerprint(tmp_path / "a.pt", path="nomatch")
    code, _, err = run(capsys, "verify", tmp_path / "a.pt", tmp_path / "b.pt", "--path", "nomatch")
    assert code == 2 and "selects no tensor" in err
    code, out, err = run(capsys, "verify", tmp_path / "a.pt", tmp_path / "b.pt", "--ignore-keys-regex", "^optimizer",
                         "--stats")
    assert code == 0 and err == "torchdiff: warning: --stats does nothing on verify\n"


def test_hash_and_verify_take_unsafe_pickle_brief_and_say_what_they_ignore(tmp_path, capsys):
    """--unsafe-pickle reaches the reader (it was accepted and ignored: the file stayed
    refused); verify --brief prints one line; hash warns about --quiet; counts of one."""
    w = torch.arange(4.0)
    torch.save({"w": w}, tmp_path / "p4.pt", pickle_protocol=4, _use_new_zipfile_serialization=False)
    assert main(["hash", str(tmp_path / "p4.pt")]) == 2
    assert "--unsafe-pickle reads it" in capsys.readouterr().err
    assert main(["hash", str(tmp_path / "p4.pt"), "--unsafe-pickle", "-o", str(tmp_path / "m.json")]) == 0
    capsys.readouterr()
    m = Manifest.load(str(tmp_path / "m.json"))
    assert m["w"].sum == 6.0 and m["w"].norm == pytest.approx(math.sqrt(14.0), rel=1e-12)
    assert main(["verify", str(tmp_path / "m.json"), str(tmp_path / "p4.pt"), "--unsafe-pickle"]) == 0
    assert capsys.readouterr().out.strip() == "verify: 1 tensor: 1 bitwise equal, 0 accepted, 0 mismatching -> OK"
    save_file({"w": w + 1}, str(tmp_path / "b.safetensors"))
    assert main(["verify", str(tmp_path / "m.json"), str(tmp_path / "b.safetensors"), "--brief"]) == 1
    assert capsys.readouterr().out == f"{tmp_path / 'm.json'} and {tmp_path / 'b.safetensors'} differ\n"
    assert main(["hash", str(tmp_path / "b.safetensors"), "--quiet"]) == 0
    assert capsys.readouterr().err == "torchdiff: warning: --quiet does nothing on hash\n"
