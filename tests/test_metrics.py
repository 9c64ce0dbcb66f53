"""Every per-side statistic and pair metric of DESIGN.md ("Metric definitions")
against an independent float64 NumPy reference, across dtypes, shapes, non-finite
values, zero tensors, cancellation-prone data and chunking settings."""

from __future__ import annotations

import json
import math
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safetensors.torch import save_file

import torchdiff
from torchdiff.engine import ROW, CPU_BLOCK, Engine
from torchdiff.figures import GroupSums
from torchdiff.formats import from_object
from torchdiff.pairing import pair

F8E4 = getattr(torch, "float8_e4m3fn", None)
F8E5 = getattr(torch, "float8_e5m2", None)
FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64] + [d for d in (F8E4, F8E5) if d is not None]
INTS = [torch.int8, torch.uint8, torch.int32, torch.int64]
DTYPES = FLOATS + INTS + [torch.bool]
DTYPE_IDS = [str(d).replace("torch.", "") for d in DTYPES]

# Tolerances. The engine accumulates float64, int32 and int64 in float64 and every
# other dtype in float32 (reductions.compute_dtype), over rows of at most ROW = 65536
# elements, merging the row partials in float64. torch's CPU float32 sums are cascaded,
# so a row sum has relative error ≲ a few · 2^-24 ≈ 2e-7 (even a naive sum would stay
# under n·2^-24 ≈ 4e-3 only, which this bound would catch); rtol 2e-5 leaves a margin
# of ~100 and still fails a float16/bfloat16 accumulator (2^-11, 2^-8). float64
# accumulation errs by ≲ log2(n)·2^-53 ≈ 2e-15; 1e-10 leaves a wide margin and still
# fails any float32 step (≈ 1e-7).
RTOL_F32 = 2e-5
RTOL_F64 = 1e-10


def rtol_for(*dtypes: torch.dtype) -> float:
    wide = {torch.float64, torch.int32, torch.int64}
    return RTOL_F64 if any(d in wide for d in dtypes) else RTOL_F32


# ---- the float64 NumPy reference ----------------------------------------------------


def f64(t: torch.Tensor) -> np.ndarray:
    """Exact float64 values of ``t`` as NumPy (float8/bfloat16 go through float32, exactly)."""
    t = t.detach().reshape(-1)
    if t.dtype in (torch.bfloat16, F8E4, F8E5):
        t = t.to(torch.float32)
    return t.numpy().astype(np.float64)


def ref_side(t: torch.Tensor) -> dict:
    x = f64(t)
    nan = int(np.isnan(x).sum())
    inf = int(np.isinf(x).sum())
    fin = x[np.isfinite(x)]
    out = {"numel": x.size, "nan_count": nan, "inf_count": inf, "nbytes": t.numel() * t.element_size(),
           "zero_fraction": float((x == 0).sum() / x.size) if x.size else 0.0}
    if fin.size == 0:
        out.update(mean=math.nan, std=math.nan, min=math.nan, max=math.nan, mean_abs=math.nan, rms=math.nan)
    else:
        mean = fin.mean()
        out.update(mean=mean, std=math.sqrt(((fin - mean) ** 2).mean()), min=fin.min(), max=fin.max(),
                   mean_abs=np.abs(fin).mean(), rms=math.sqrt((fin * fin).mean()))
    return out


def ref_pair(a: torch.Tensor, b: torch.Tensor, epsilon: float = 0.0) -> dict:
    fa, fb = f64(a), f64(b)
    both = np.isfinite(fa) & np.isfinite(fb)
    fa, fb = fa[both], fb[both]
    d = fb - fa
    n = int(both.sum())
    l2 = math.sqrt((d * d).sum())
    na, nb = math.sqrt((fa * fa).sum()), math.sqrt((fb * fb).sum())
    rel = l2 / na if na > 0 else (math.inf if l2 > 0 else 0.0)
    if na * nb > 0:
        cosine = float(np.dot(fa, fb)) / (na * nb)
    else:
        cosine = 1.0 if na == nb else math.nan  # results.PairMetrics.cosine's convention
    return {
        "numel": n, "l2": l2, "norm_old": na, "norm_new": nb, "rel_l2": rel, "nmse": rel * rel,
        "cosine": cosine, "rmse": l2 / math.sqrt(n) if n else 0.0,
        "max_abs": float(np.abs(d).max()) if n else 0.0,
        "mean_abs_diff": float(np.abs(d).mean()) if n else 0.0,
        "changed_fraction": float((np.abs(d) > epsilon).sum() / n) if n else 0.0,
    }


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    raw = lambda t: t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()  # noqa: E731
    return raw(a) == raw(b)


def close(actual, expected, rtol, atol=0.0, what=""):
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, equal_nan=True, err_msg=what)


def check_side(s: torchdiff.TensorStats, t: torch.Tensor, rtol: float, name: str = "") -> None:
    r = ref_side(t)
    assert s.shape == tuple(t.shape), name
    assert s.dtype == str(t.dtype).replace("torch.", ""), name
    for k in ("numel", "nbytes", "nan_count", "inf_count"):
        assert getattr(s, k) == r[k], (name, k, getattr(s, k), r[k])
    assert s.zero_fraction == pytest.approx(r["zero_fraction"], abs=1e-12), name
    d = s.to_dict()
    assert set(d) == {"shape", "dtype", "numel", "nbytes", "mean", "std", "min", "max", "mean_abs", "rms",
                      "zero_fraction", "nan_count", "inf_count"}
    if math.isnan(r["mean"]):
        for k in ("mean", "std", "min", "max", "mean_abs", "rms"):
            assert math.isnan(getattr(s, k)), (name, k, getattr(s, k))
        return
    # min and max are values of the tensor: exact.
    assert s.min == r["min"] and s.max == r["max"], (name, s.min, s.max, r["min"], r["max"])
    # A sum's error scales with Σ|x|, so the mean is judged against mean_abs.
    close(s.mean, r["mean"], rtol, atol=rtol * r["mean_abs"], what=f"{name} mean")
    close(s.mean_abs, r["mean_abs"], rtol, what=f"{name} mean_abs")
    close(s.rms, r["rms"], rtol, what=f"{name} rms")
    # std relative to itself (catches E[x²]−E[x]² cancellation), plus the floor a
    # constant tensor leaves: its row mean is rounded, |δ| ≲ 2^-24·|mean| per sum step.
    close(s.std, r["std"], rtol, atol=rtol / 20 * abs(r["mean"]), what=f"{name} std")


def check_pair(m: torchdiff.PairMetrics, a: torch.Tensor, b: torch.Tensor, rtol: float,
               epsilon: float = 0.0, name: str = "") -> None:
    r = ref_pair(a, b, epsilon)
    assert m.numel == r["numel"], name
    for k in ("l2", "rmse", "max_abs", "mean_abs_diff", "norm_old", "norm_new"):
        close(getattr(m, k), r[k], rtol, what=f"{name} {k}")
    for k in ("rel_l2", "nmse"):
        if math.isinf(r[k]):
            assert math.isinf(getattr(m, k)), (name, k)
        else:
            close(getattr(m, k), r[k], 2 * rtol, what=f"{name} {k}")
    na, nb = r["norm_old"], r["norm_new"]
    if na > 0 and nb > 0:
        # cosine = (‖A‖²+‖B‖²−‖Δ‖²)/(2‖A‖‖B‖): the error of the squared norms, relative
        # to ‖A‖‖B‖, grows with the norm ratio.
        close(m.cosine, r["cosine"], 0, atol=rtol * (na / nb + nb / na), what=f"{name} cosine")
        assert -1.0 <= m.cosine <= 1.0
    else:
        assert m.cosine == r["cosine"] or (math.isnan(m.cosine) and math.isnan(r["cosine"])), name
    assert m.changed_fraction == pytest.approx(r["changed_fraction"], abs=1e-12), name
    assert m.equal == same_bytes(a, b), name
    assert set(m.to_dict()) == {"equal", "l2", "rel_l2", "nmse", "cosine", "rmse", "max_abs", "mean_abs_diff",
                                "changed_fraction"}


# ---- data -----------------------------------------------------------------------------


def make(shape, dtype, seed: int, scale: float = 1.0, zeros: float = 0.1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    if dtype.is_floating_point:
        x = torch.randn(n, generator=g, dtype=torch.float64) * scale
        x[torch.rand(n, generator=g) < zeros] = 0
        x = x.to(torch.float32).to(dtype) if dtype not in (torch.float64, torch.float32) else x.to(dtype)
    elif dtype == torch.bool:
        x = torch.rand(n, generator=g) < 0.5
    else:
        info = torch.iinfo(dtype)
        lim = 10**9 if dtype == torch.int64 else 10**6
        x = torch.randint(max(info.min, -lim), min(info.max, lim) + 1, (n,), generator=g, dtype=torch.int64).to(dtype)
    return x.reshape(shape)


def perturb(x: torch.Tensor, seed: int, frac: float = 0.5) -> torch.Tensor:
    """A changed copy: noise on floats, new values or flips on a share of the rest."""
    g = torch.Generator().manual_seed(seed + 1)
    flat = x.reshape(-1)
    if x.dtype.is_floating_point:
        noise = torch.randn(flat.numel(), generator=g, dtype=torch.float64) * (0.1 if x.element_size() == 1 else 0.01)
        y = (f64_t(flat) + noise).to(torch.float32).to(x.dtype)
    elif x.dtype == torch.bool:
        y = flat ^ (torch.rand(flat.numel(), generator=g) < frac)
    else:
        other = make((flat.numel(),), x.dtype, seed + 2)
        y = torch.where(torch.rand(flat.numel(), generator=g) < frac, other, flat)
    return y.reshape(x.shape)


def f64_t(t: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(f64(t))


def run(old: dict, new: dict, engine: Engine | None = None, epsilon: float = 0.0):
    engine = engine or Engine("cpu", epsilon)
    diffs = engine.run(pair(from_object(old), from_object(new)))
    return {d.name: d for d in diffs}


# ---- per dtype and shape ------------------------------------------------------------

# 0-d, empty, tiny, odd; then around the row length (65536) and the CPU block (4 rows).
SHAPES = [(), (0,), (4, 0), (1,), (7,), (3, 5), (ROW - 1,), (ROW,), (ROW + 1,), (200003,), (CPU_BLOCK + 1,)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)) or "scalar")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_stats_and_metrics_match_numpy(dtype, shape):
    seed = zlib.crc32(repr((str(dtype), shape)).encode()) % 10_000
    a = make(shape, dtype, seed)
    b = perturb(a, seed)
    d = run({"t": a, "same": a}, {"t": b, "same": a.clone()})
    rtol = rtol_for(dtype)
    t, same = d["t"], d["same"]
    check_side(t.old, a, rtol, "old")
    check_side(t.new, b, rtol, "new")
    check_pair(t.metrics, a, b, rtol, name="pair")
    differs = not torch.equal(f64_t(a), f64_t(b))
    assert t.status == ("changed" if differs else "unchanged")
    assert same.status == "unchanged" and same.metrics.equal
    assert same.metrics.l2 == 0 and same.metrics.max_abs == 0 and same.metrics.changed_fraction == 0
    if a.numel():
        assert same.metrics.cosine == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("old_dtype,new_dtype", [
    (torch.float32, torch.bfloat16), (torch.float32, torch.float16), (torch.float64, torch.float32),
    (torch.float32, torch.int8), (torch.bfloat16, F8E4 or torch.float16), (torch.int64, torch.int32),
])
def test_retyped_pairs_are_measured_upcast(old_dtype, new_dtype):
    a = make((ROW + 3,), old_dtype, 3, scale=2.0)
    b = a.to(torch.float32).to(new_dtype)
    d = run({"w": a}, {"w": b})["w"]
    assert d.status == "retyped"
    check_side(d.old, a, rtol_for(old_dtype))
    check_side(d.new, b, rtol_for(new_dtype))
    check_pair(d.metrics, a, b, rtol_for(old_dtype, new_dtype))
    assert not d.metrics.equal


def test_reshaped_added_removed_have_side_stats_only():
    a, b = make((4, 6), torch.float32, 1), make((6, 4), torch.float32, 2)
    d = run({"w": a, "gone": a}, {"w": b, "new": b})
    assert d["w"].status == "reshaped" and d["w"].metrics is None
    check_side(d["w"].old, a, RTOL_F32)
    check_side(d["w"].new, b, RTOL_F32)
    assert d["gone"].status == "removed" and d["gone"].new is None
    check_side(d["gone"].old, a, RTOL_F32)
    assert d["new"].status == "added" and d["new"].old is None
    check_side(d["new"].new, b, RTOL_F32)


def test_huge_float32_values_do_not_overflow_the_figures():
    # Squares of 1e30 overflow float32; the engine must fall back to float64, not report inf.
    a = make((ROW + 5,), torch.float32, 4, scale=1e30)
    b = perturb(a, 4)
    d = run({"w": a}, {"w": b})["w"]
    check_side(d.old, a, RTOL_F32)
    check_pair(d.metrics, a, b, RTOL_F32)
    assert math.isfinite(d.old.rms) and math.isfinite(d.metrics.l2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [1e-12, 1e-20, 1e-24, 1e-40])
def test_tiny_values_do_not_underflow_the_figures(dtype, scale):
    """Adam's exp_avg_sq holds values like 1e-20, whose float32 squares underflow."""
    g = torch.Generator().manual_seed(5)
    a = (torch.rand(ROW + 9, generator=g, dtype=torch.float64) * scale).to(dtype)
    b = (f64_t(a) * 1.1).to(dtype)
    d = run({"v": a, "neg": a}, {"v": b, "neg": -a})
    check_side(d["v"].old, a, RTOL_F32)
    check_side(d["v"].new, b, RTOL_F32)
    check_pair(d["v"].metrics, a, b, RTOL_F32)
    assert d["neg"].metrics.cosine == pytest.approx(-1.0, abs=1e-6)


# ---- NaN / Inf ----------------------------------------------------------------------

NONFINITE_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64] + ([F8E5] if F8E5 else [])
BOUNDARIES = [0, ROW - 1, ROW, 2 * ROW - 1, 2 * ROW, 3 * ROW - 1, 3 * ROW, 200002]


@pytest.mark.parametrize("engine_kw", [{}, {"row": 7, "block": 20}], ids=["default", "row7"])
@pytest.mark.parametrize("dtype", NONFINITE_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_nonfinite_at_chunk_boundaries_are_counted_and_excluded(dtype, engine_kw):
    n = 200003 if not engine_kw else 2003
    bounds = [i for i in BOUNDARIES if i < n] if not engine_kw else [0, 6, 7, 13, 14, 20, 21, 2002]
    a = make((n,), dtype, 7)
    b = perturb(a, 7)
    specials = [math.nan, math.inf, -math.inf]
    for j, i in enumerate(bounds):
        a[i] = specials[j % 3]
    b[bounds[1]] = math.nan  # b: non-finite at one shared and one other position
    b[bounds[3] + 1] = math.inf
    d = run({"w": a}, {"w": b}, Engine("cpu", **engine_kw))["w"]
    rtol = rtol_for(dtype)
    check_side(d.old, a, rtol)
    check_side(d.new, b, rtol)
    assert d.old.nan_count == 3 and d.old.inf_count == 5
    assert d.new.nan_count == 1 and d.new.inf_count == 1
    assert all(math.isfinite(getattr(d.old, k)) for k in ("mean", "std", "min", "max", "rms", "mean_abs"))
    check_pair(d.metrics, a, b, rtol)
    assert d.status == "changed"


@pytest.mark.skipif(F8E4 is None, reason="no float8_e4m3fn in this torch")
def test_float8_e4m3fn_nan_is_counted():
    a = make((100,), F8E4, 8)
    a[[0, 50, 99]] = math.nan
    d = run({"w": a}, {"w": a.clone()})["w"]
    check_side(d.old, a, RTOL_F32)
    assert d.old.nan_count == 3 and d.status == "unchanged" and d.metrics.equal


@pytest.mark.parametrize("old,new", [
    ([math.nan, 1.0, 2.0], [1.0, math.nan, 2.0]),  # a NaN that moved, same count
    ([math.inf, 1.0], [-math.inf, 1.0]),  # +inf became -inf at the same place
    ([math.inf, 1.0], [math.nan, 1.0]),
    ([math.nan, math.nan], [math.nan, 3.0]),
])
def test_moved_or_changed_nonfinite_values_are_a_change(old, new):
    d = run({"w": torch.tensor(old)}, {"w": torch.tensor(new)})["w"]
    assert d.status == "changed"


def test_identical_nonfinite_tensors_are_unchanged():
    a = torch.tensor([math.nan, math.inf, -math.inf, 0.0, 1.5])
    d = run({"w": a}, {"w": a.clone()})["w"]
    assert d.status == "unchanged" and d.metrics.equal
    assert d.old.nan_count == 1 and d.old.inf_count == 2
    assert d.old.mean == 0.75 and d.old.max == 1.5 and d.old.min == 0.0


def test_all_nan_tensor_has_nan_moments():
    a = torch.full((10,), math.nan)
    d = run({"w": a}, {"w": torch.ones(10)})["w"]
    assert d.old.nan_count == 10 and math.isnan(d.old.mean) and math.isnan(d.old.std)
    assert d.new.mean == 1.0 and d.metrics.numel == 0 and d.status == "changed"


# ---- zero tensors and conventions ---------------------------------------------------


def test_zero_tensors_and_cosine_conventions():
    z, o = torch.zeros(5), torch.ones(5)
    d = run({"zz": z, "zo": z, "oz": o, "oo": o}, {"zz": z.clone(), "zo": o, "oz": z, "oo": -o})
    zz, zo, oz, oo = d["zz"].metrics, d["zo"].metrics, d["oz"].metrics, d["oo"].metrics
    assert d["zz"].status == "unchanged" and zz.equal and zz.rel_l2 == 0.0 and zz.cosine == 1.0
    assert d["zz"].old.zero_fraction == 1.0 and d["zz"].old.std == 0.0 and d["zz"].old.rms == 0.0
    # ‖A‖ = 0 < ‖Δ‖: rel_l2 = nmse = inf; cosine with one zero side is undefined (nan).
    assert zo.rel_l2 == math.inf and zo.nmse == math.inf and math.isnan(zo.cosine)
    assert zo.l2 == pytest.approx(math.sqrt(5)) and zo.changed_fraction == 1.0
    assert oz.rel_l2 == pytest.approx(1.0) and math.isnan(oz.cosine)
    assert oo.cosine == pytest.approx(-1.0) and oo.rel_l2 == pytest.approx(2.0)
    report = torchdiff.compare({"w": z}, {"w": o}, device="cpu")
    item = json.loads(report.to_json())[0]
    assert item["rel_l2"] == "Infinity" and item["cosine"] == "NaN"


def test_empty_and_scalar_tensors():
    d = run({"e": torch.zeros(0, 3), "s": torch.tensor(3.0)}, {"e": torch.zeros(0, 3), "s": torch.tensor(4.0)})
    e, s = d["e"], d["s"]
    assert e.status == "unchanged" and e.old.numel == 0 and math.isnan(e.old.mean) and e.old.zero_fraction == 0.0
    assert e.metrics.numel == 0 and e.metrics.rmse == 0.0 and e.metrics.changed_fraction == 0.0
    assert s.status == "changed" and s.old.shape == () and s.old.std == 0.0
    assert (s.metrics.l2, s.metrics.rel_l2, s.metrics.cosine) == (1.0, pytest.approx(1 / 3), 1.0)


# ---- cancellation ---------------------------------------------------------------------


@pytest.mark.parametrize("engine_kw", [{}, {"row": 1000, "block": 3000}], ids=["default", "row1000"])
@pytest.mark.parametrize("dtype,mean,std", [
    (torch.float32, 1.0, 1e-4), (torch.float32, -300.0, 1e-3), (torch.float64, 1e4, 1e-6),
    (torch.bfloat16, 1.0, 1e-2), (torch.float16, 1.0, 1e-3),
])
def test_layernorm_like_tensors_keep_their_std(dtype, mean, std, engine_kw):
    """|mean| ≫ std: E[x²] − E[x]² would cancel to noise; the engine must not."""
    g = torch.Generator().manual_seed(11)
    a = (mean + std * torch.randn(200003, generator=g, dtype=torch.float64)).to(dtype)
    b = (f64_t(a) + std * 0.1 * torch.randn(200003, generator=g, dtype=torch.float64)).to(dtype)
    d = run({"ln": a}, {"ln": b}, Engine("cpu", **engine_kw))["ln"]
    r = ref_side(a)
    assert r["std"] > 0
    # A naive E[x²]−E[x]² in float32 is off by ≫ 100 % here (its error ≈ 2^-24·mean²
    # exceeds std²). The engine centres each row on its rounded mean and merges rows
    # with Chan's formula; with u the accumulator's unit roundoff, κ = |mean|/std and
    # n elements, the rounded row means cost ≲ 20·u·κ/√n (their error against the
    # between-row spread) plus (2u·κ)² (the centring offset, squared) in relative std:
    # 4e-5 for mean 1, std 1e-4 in float32, where the naive formula's error is > 1.
    u, rtol = (2.0**-24, 1e-5) if rtol_for(dtype) == RTOL_F32 else (2.0**-53, 1e-10)
    kappa = abs(mean) / std
    bound = rtol + 20 * u * kappa / math.sqrt(a.numel()) + (2 * u * kappa) ** 2
    assert bound < 1e-2
    close(d.old.std, r["std"], bound, what="std")
    close(d.new.std, ref_side(b)["std"], bound, what="std new")
    check_side(d.old, a, rtol_for(dtype))
    check_pair(d.metrics, a, b, rtol_for(dtype))


# ---- epsilon ---------------------------------------------------------------------------


def test_epsilon_thresholds_changed_count_and_status():
    a = torch.zeros(6)
    b = torch.tensor([0.0, 0.25, 0.5, 1.0, -0.5, -2.0])
    for eps, changed, status in [(0.0, 5, "changed"), (0.5, 2, "changed"), (1.0, 1, "changed"), (2.0, 0, "unchanged")]:
        d = run({"w": a}, {"w": b}, epsilon=eps)["w"]
        assert d.metrics.changed_count == changed, eps
        assert d.status == status, eps
        assert d.metrics.max_abs == 2.0 and not d.metrics.equal
        check_pair(d.metrics, a, b, RTOL_F32, epsilon=eps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("eps", [1e-3, 0.1, 1e-7])
def test_epsilon_not_representable_in_the_compute_dtype(dtype, eps):
    """|Δ| > ε is decided on the real ε: a change of exactly float32(ε) > ε counts."""
    delta = torch.tensor([eps], dtype=dtype)  # rounded: may be just above or below ε
    a = torch.zeros(3, dtype=dtype)
    b = torch.cat([delta, torch.zeros(2, dtype=dtype)])
    d = run({"w": a}, {"w": b}, epsilon=eps)["w"]
    above = float(delta) > eps
    assert d.metrics.changed_count == int(above)
    assert d.status == ("changed" if above else "unchanged")


def test_epsilon_through_compare_and_validation():
    a, b = {"w": torch.zeros(4)}, {"w": torch.full((4,), 1e-4)}
    assert torchdiff.compare(a, b, device="cpu").has_differences
    report = torchdiff.compare(a, b, device="cpu", epsilon=1e-3)
    assert not report.has_differences and json.loads(report.to_json()) == []
    with pytest.raises(torchdiff.UsageError, match="epsilon"):
        torchdiff.compare(a, b, epsilon=-1)
    with pytest.raises(torchdiff.UsageError, match="--epsilon must be a number"):
        torchdiff.compare(a, b, epsilon="abc")


# ---- invariants (hypothesis) ---------------------------------------------------------

HYP = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def checkpoints(draw, max_small=10, max_large=2, large=(100, 3000), nonfinite=True):
    """(old, new) dicts: many small and a few larger tensors of mixed dtypes; some
    unchanged, some only on one side, some reshaped, some with NaN/Inf."""
    seed = draw(st.integers(0, 2**31 - 1))
    sizes = draw(st.lists(st.integers(0, 40), max_size=max_small))
    sizes += draw(st.lists(st.integers(*large), max_size=max_large))
    old, new = {}, {}
    for i, n in enumerate(sizes):
        dtype = draw(st.sampled_from(DTYPES))
        shape = (n // 4, 4) if n % 4 == 0 and n else (n,)
        a = make(shape, dtype, seed + i)
        kind = draw(st.sampled_from(["changed", "changed", "same", "added", "removed", "reshaped"]))
        if nonfinite and dtype.is_floating_point and n and draw(st.booleans()):
            a.view(-1)[draw(st.integers(0, n - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        name = f"layers.{i}.w"
        if kind == "same":
            old[name], new[name] = a, a.clone()
        elif kind == "added":
            new[name] = a
        elif kind == "removed":
            old[name] = a
        elif kind == "reshaped":
            old[name], new[name] = a, a.reshape(-1, 1)
        else:
            old[name], new[name] = a, perturb(a, seed + i)
    return old, new


def check_against_reference(diffs: dict, old: dict, new: dict) -> None:
    assert set(diffs) == set(old) | set(new)
    for name, d in diffs.items():
        a, b = old.get(name), new.get(name)
        if a is not None:
            check_side(d.old, a, rtol_for(a.dtype), name)
        if b is not None:
            check_side(d.new, b, rtol_for(b.dtype), name)
        if a is not None and b is not None and a.shape == b.shape:
            check_pair(d.metrics, a, b, rtol_for(a.dtype, b.dtype), name=name)


ENGINES = [dict(row=7, block=20), dict(row=3, block=1000), dict(row=64, block=64), dict(row=100, block=7)]


@HYP
@given(checkpoints())
def test_chunking_does_not_change_results(pair_):
    old, new = pair_
    default = run(old, new)
    check_against_reference(default, old, new)
    for kw in ENGINES:
        chunked = run(old, new, Engine("cpu", **kw))
        check_against_reference(chunked, old, new)
        for name, d in default.items():
            c = chunked[name]
            assert c.status == d.status, (kw, name)
            for side in ("old", "new"):
                x, y = getattr(d, side), getattr(c, side)
                if x is not None:
                    assert (x.numel, x.zero_count, x.nan_count, x.inf_count) == (
                        y.numel, y.zero_count, y.nan_count, y.inf_count)
                    assert (x.min, x.max) == (y.min, y.max) or (math.isnan(x.min) and math.isnan(y.min))
            if d.metrics is not None:
                assert (d.metrics.changed_count, d.metrics.equal, d.metrics.numel) == (
                    c.metrics.changed_count, c.metrics.equal, c.metrics.numel)


@HYP
@given(checkpoints(max_large=1, large=(100, 500)))
def test_compare_with_itself_reports_nothing(pair_):
    old, _ = pair_
    copy = {k: v.clone() for k, v in old.items()}
    report = torchdiff.compare(old, copy, device="cpu")
    assert not report.has_differences
    assert all(d.status == "unchanged" and d.metrics.equal for d in report)
    assert json.loads(report.to_json()) == []
    assert report.comparison.counts()["unchanged"] == len(old)


finite_floats = st.floats(-1e6, 1e6, allow_nan=False, width=32)
vectors = st.lists(finite_floats, min_size=1, max_size=60)


# Normal float32 magnitudes (or 0), so that c·x stays normal for c in [1e-3, 1e3]:
# a subnormal product is rounded off the direction of x (or to 0).
normal_floats = st.one_of(st.just(0.0), st.builds(lambda m, neg: -m if neg else m,
                                                  st.floats(2.0**-100, 2.0**20, width=32), st.booleans()))


@HYP
@given(st.lists(normal_floats, min_size=1, max_size=60), st.floats(1e-3, 1e3),
       st.sampled_from([torch.float32, torch.float64]))
def test_cosine_of_a_tensor_with_itself_and_its_multiples(values, scale, dtype):
    x = torch.tensor(values, dtype=dtype)
    d = run({"x": x, "s": x, "n": x}, {"x": x.clone(), "s": x * scale, "n": -x})
    assert d["x"].metrics.cosine == pytest.approx(1.0, abs=1e-12)
    if torch.count_nonzero(x):
        # cosine comes from (‖A‖²+‖B‖²−‖Δ‖²)/(2‖A‖‖B‖): its error grows with the norm
        # ratio (check_pair); scale up to 1e3 means up to 1e3·rtol.
        assert d["s"].metrics.cosine == pytest.approx(1.0, abs=rtol_for(dtype) * (scale + 1 / scale))
        assert d["n"].metrics.cosine == pytest.approx(-1.0, abs=1e-6)
    else:
        assert d["x"].metrics.cosine == 1.0  # both sides zero: 1 by convention


@HYP
@given(st.integers(1, 60).flatmap(lambda n: st.tuples(
    st.lists(finite_floats, min_size=n, max_size=n), st.lists(finite_floats, min_size=n, max_size=n))),
    st.sampled_from([torch.float32, torch.float64]))
def test_pair_metric_symmetries(pair_values, dtype):
    a, b = (torch.tensor(v, dtype=dtype) for v in pair_values)
    ab = run({"w": a}, {"w": b})["w"].metrics
    ba = run({"w": b}, {"w": a})["w"].metrics
    # Symmetric figures.
    for k in ("l2", "max_abs", "mean_abs_diff", "rmse", "changed_fraction"):
        assert getattr(ab, k) == pytest.approx(getattr(ba, k), rel=1e-6, abs=0), k
    assert (ab.cosine == pytest.approx(ba.cosine, abs=1e-6)) or (math.isnan(ab.cosine) and math.isnan(ba.cosine))
    # rel_l2 is not symmetric, but rel_l2(a,b)·‖a‖ = ‖Δ‖ = rel_l2(b,a)·‖b‖.
    if ab.norm_old > 0 and ba.norm_old > 0:
        assert ab.rel_l2 * ab.norm_old == pytest.approx(ba.rel_l2 * ba.norm_old, rel=1e-5)
        # Triangle inequality: ‖Δ‖ ≥ |‖B‖ − ‖A‖|, so rel_l2 ≥ |‖B‖/‖A‖ − 1|, up to the rounding
        # of ‖Δ‖² summed in the dtype (relative: a=[0.5], b=[2049] gives ‖Δ‖² = 2048.5² rounded in float32)
        bound = abs(ab.norm_new / ab.norm_old - 1)
        assert ab.rel_l2 >= bound * (1 - 1e-6) - 1e-5
    assert ab.nmse == pytest.approx(ab.rel_l2**2) or ab.nmse == ab.rel_l2**2
    assert ab.rel_l2 >= 0 and ba.rel_l2 >= 0


# ---- runs: small tensors read as views of the mapped file ----------------------------------


@HYP
@given(st.lists(st.tuples(st.integers(1, 40), st.sampled_from([torch.float32, torch.bfloat16, torch.float64,
                                                               torch.int32, torch.float16]),
                          st.sampled_from(["same", "changed", "retyped", "removed", "added"])),
                min_size=1, max_size=30),
       st.randoms(use_true_random=False), st.sampled_from([8, 64, 4096]))
def test_small_tensors_of_mapped_files_match_numpy(tmp_path_factory, specs, rng, block):
    """Whole small tensors adjacent in both files are reduced as row views of the
    mappings (engine runs): files written in different orders, of mixed dtypes and
    lengths, with tensors only one side holds, and runs cut across blocks (``block``)
    give every figure the float64 reference gives."""
    from safetensors.torch import save_file

    old, new = {}, {}
    for k, (n, dtype, what) in enumerate(specs):
        a = make((n,), dtype, k)
        if what != "added":
            old[f"t{k}"] = a
        if what == "same":
            new[f"t{k}"] = a.clone()
        elif what == "changed":
            new[f"t{k}"] = perturb(a, k)
        elif what == "retyped":
            new[f"t{k}"] = perturb(a, k).to(torch.float64 if dtype != torch.float64 else torch.float32)
        elif what == "added":
            new[f"t{k}"] = a
    names = list(new)
    rng.shuffle(names)  # the new file's names (and so its byte order) differ from the old's
    new = {name: new[name] for name in names}
    tmp = tmp_path_factory.mktemp("runs")
    save_file(old, str(tmp / "a.safetensors"))
    save_file(new, str(tmp / "b.safetensors"))
    with torchdiff.load(str(tmp / "a.safetensors")) as a_ckpt, torchdiff.load(str(tmp / "b.safetensors")) as b_ckpt:
        diffs = {d.name: d for d in Engine("cpu", block=block).run(pair(a_ckpt, b_ckpt))}
    assert set(diffs) == set(old) | set(new)
    for name, d in diffs.items():
        if name in old:
            check_side(d.old, old[name], rtol_for(old[name].dtype), name)
        if name in new:
            check_side(d.new, new[name], rtol_for(new[name].dtype), name)
        if name in old and name in new:
            check_pair(d.metrics, old[name], new[name], rtol_for(old[name].dtype, new[name].dtype), name=name)
            assert d.status == ("retyped" if old[name].dtype != new[name].dtype else
                                "unchanged" if torch.equal(old[name], new[name]) else "changed"), name


# ---- regressions: complex real views, constants, ⟨A,B⟩ cancellation, float64 range -------


def ref_real_view(t: torch.Tensor) -> torch.Tensor:
    """The float64 values torchdiff measures: a complex tensor's real view (2·numel)."""
    return torch.view_as_real(t).reshape(-1).to(torch.float64) if t.is_complex() else f64_t(t)


@pytest.mark.parametrize("source", ["memory", "safetensors", "pt"])
@pytest.mark.parametrize("shape", [(8, 8), (ROW + 3,), (3, ROW // 2 + 1)], ids=["8x8", "row+3", "3xhalfrow"])
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128], ids=["complex64", "complex128"])
def test_complex_tensors_are_measured_on_their_whole_real_view(dtype, shape, source, tmp_path):
    """Every figure of a complex tensor covers all 2·numel values of its real view (the
    engine once cut rows by numel and measured only the first half); numel and params
    stay the tensor's element count. One tensor holds a NaN part (the exact path)."""
    if source == "safetensors" and dtype == torch.complex128:
        pytest.skip("safetensors has no complex128")
    g = torch.Generator().manual_seed(3)
    a = torch.randn(shape, dtype=dtype, generator=g)
    b = a + 0.1 * torch.randn(shape, dtype=dtype, generator=g)
    a_nan = a.clone().reshape(-1)
    a_nan[5] = complex(math.nan, 1.0)
    old, new = {"w": a, "n": a_nan.reshape(shape)}, {"w": b, "n": b.clone()}
    if source == "memory":
        diffs = run(old, new)
    else:
        save = save_file if source == "safetensors" else (lambda sd, p: torch.save(sd, p))
        save(old, str(tmp_path / "a")), save(new, str(tmp_path / "b"))
        fmt = "safetensors" if source == "safetensors" else "torch"
        with torchdiff.load(str(tmp_path / "a"), format=fmt) as x, torchdiff.load(str(tmp_path / "b"), format=fmt) as y:
            diffs = {d.name: d for d in Engine("cpu").run(pair(x, y))}
    rtol = RTOL_F64 if dtype == torch.complex128 else RTOL_F32
    for name in ("w", "n"):
        d, A, B = diffs[name], ref_real_view(old[name]), ref_real_view(new[name])
        assert d.status == "changed" and d.params == d.old.numel == a.numel()
        assert d.old.values == 2 * a.numel() and d.old.nan_count == int(torch.isnan(A).sum())
        fin = A[torch.isfinite(A)].numpy()
        close(d.old.mean, fin.mean(), rtol, atol=rtol * np.abs(fin).mean(), what=f"{name} mean")
        close(d.old.std, fin.std(), rtol, what=f"{name} std")
        close(d.old.rms, math.sqrt((fin * fin).mean()), rtol, what=f"{name} rms")
        close(d.old.mean_abs, np.abs(fin).mean(), rtol, what=f"{name} mean_abs")
        assert (d.old.min, d.old.max) == (fin.min(), fin.max())
        both = torch.isfinite(A) & torch.isfinite(B)
        fa, fb = A[both].numpy(), B[both].numpy()
        m = d.metrics
        assert m.numel == fa.size == 2 * a.numel() - (name == "n")
        close(m.l2, np.linalg.norm(fb - fa), rtol, what=f"{name} l2")
        close(m.rel_l2, np.linalg.norm(fb - fa) / np.linalg.norm(fa), 2 * rtol, what=f"{name} rel_l2")
        close(m.cosine, fa @ fb / np.linalg.norm(fa) / np.linalg.norm(fb), rtol, what=f"{name} cosine")
        close(m.max_abs, np.abs(fb - fa).max(), rtol, what=f"{name} max_abs")
        assert m.changed_fraction == 1.0


def test_complex_zero_fraction_and_norm_count_real_values():
    """zero_fraction, finite_count and norm count the real view's values (2·numel)."""
    x = torch.tensor([1 + 0j, 0j, complex(math.nan, 2.0), 3j], dtype=torch.complex64)
    s = torchdiff.inspect({"x": x})["x"].new
    assert (s.numel, s.values, s.zero_count, s.nan_count, s.finite_count) == (4, 8, 4, 1, 7)
    assert s.zero_fraction == 0.5
    assert s.norm == pytest.approx(math.sqrt(1 + 4 + 9), rel=1e-12)
    fig = torchdiff.compare({"x": x}, {"x": x * 2}).comparison.figures
    item = fig.items([0])[0]
    assert item["old"]["zero_fraction"] == 0.5 and item["old"]["numel"] == 4


def test_complex_against_real_of_one_shape_is_reshaped_and_cross_layer_groups_by_real_view():
    """A complex and a real tensor of one shape have real views of different shapes:
    reshaped (no pair figures), and --cross-layer groups tensors by their real view (a
    complex and a real [8, 8] weight in one group crashed torch.stack)."""
    g = torch.Generator().manual_seed(0)
    old = {"layers.0.c.weight": torch.randn(8, 8, dtype=torch.complex64, generator=g),
           "layers.1.c.weight": torch.randn(8, 8, generator=g), "mixed": torch.randn(8, 8, generator=g)}
    new = {k: v + 0.1 for k, v in old.items()}
    new["mixed"] = torch.randn(8, 8, dtype=torch.complex64, generator=g)
    report = torchdiff.compare(old, new, similarity_matrix=True, cross_layer=True)
    assert report["mixed"].status == "reshaped" and report["mixed"].metrics is None
    assert report["layers.0.c.weight"].status == "changed"


@pytest.mark.parametrize("engine_kw", [{}, {"row": 7, "block": 20}], ids=["default", "row7"])
@pytest.mark.parametrize("value", [0.3, -7.1, 1e-3, 65504.0, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64],
                         ids=["float32", "float16", "bfloat16", "float64"])
@pytest.mark.parametrize("n", [3, 64, 1001])
def test_constant_tensor_figures_are_its_value(dtype, value, n, engine_kw):
    """A constant tensor's mean, min, max, mean_abs and rms are its stored value exactly,
    std is 0 (float32 row sums once put the mean of torch.full((64,), 0.3) below its min),
    also with a NaN beside it (the exact path)."""
    x = torch.full((n,), value, dtype=dtype)
    v = float(x[0].to(torch.float64))
    with_nan = x.clone()
    with_nan[1] = math.nan
    diffs = run({"c": x, "n": with_nan}, {"c": x, "n": with_nan}, Engine("cpu", **engine_kw))
    for name in ("c", "n"):
        s = diffs[name].old
        assert s.mean == s.min == s.max == v, (name, s.mean, v)
        assert s.std == 0.0 and s.mean_abs == s.rms == abs(v), (name, s.std, s.mean_abs, s.rms)


@HYP
@given(st.lists(st.floats(-1e3, 1e3, width=32), min_size=1, max_size=300),
       st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_mean_is_within_min_and_max(values, dtype):
    x = torch.tensor(values, dtype=torch.float32).to(dtype)
    s = run({"x": x}, {"x": x}, Engine("cpu", row=16, block=64))["x"].old
    assert s.min <= s.mean <= s.max and s.mean_abs <= max(abs(s.min), abs(s.max)) and s.rms >= abs(s.mean) * (1 - 1e-15)


@pytest.mark.parametrize("dtype,big", [(torch.float32, 1e6), (torch.float32, 3e4), (torch.float16, 6e4),
                                       (torch.bfloat16, 1e6), (torch.float32, 1e12)])
def test_cosine_does_not_cancel_when_the_norms_differ(dtype, big, tmp_path):
    """⟨A,B⟩ is summed directly where the norms would cancel: randn(4096) against a copy
    with one element set to 1e6 gave cosine 0.006468 for 0.004186 when ⟨A,B⟩ was
    (‖A‖² + ‖B‖² − ‖Δ‖²)/2 from float32 row sums. The layer's group figures too."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4096, generator=g).to(dtype)
    b = a.clone()
    b[0] = big
    fa, fb = f64(a), f64(b)
    cos = float(fa @ fb) / np.linalg.norm(fa) / np.linalg.norm(fb)
    save_file({"layer.w": a}, str(tmp_path / "a.safetensors"))
    save_file({"layer.w": b}, str(tmp_path / "b.safetensors"))
    files = (str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"))
    for old, new in (({"layer.w": a}, {"layer.w": b}), files):
        report = torchdiff.compare(old, new)
        assert report["layer.w"].metrics.cosine == pytest.approx(cos, abs=1e-6)
        fig = report.comparison.figures
        assert float(fig.cosine()[0]) == pytest.approx(cos, abs=1e-6)
        (layer,) = GroupSums().update(fig, "layer").compute().values()
        assert layer.cosine == pytest.approx(cos, abs=1e-6)
        assert layer.rotation == pytest.approx(1 - cos, abs=1e-6)


@pytest.mark.parametrize("scale", [1e-2, 1e-4, 1e-5])
@pytest.mark.parametrize("source", ["memory", "safetensors"])
def test_small_rotations_keep_their_digits(scale, source, tmp_path):
    """Nearly equal tensors (a fine-tuning step): 1 − cos, a tensor's and a group's
    (rotation), to 1e-4 relative. A directly summed float32 ⟨A,B⟩ alone errs by ~3e-8 in
    cos, more than 1 − cos = 5e-11 itself: the engine keeps the norm identity there."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(1000, 1000, generator=g)
    b = a + scale * torch.randn(1000, 1000, generator=g)
    fa, fb = f64(a), f64(b)
    na, nb = np.linalg.norm(fa), np.linalg.norm(fb)
    rot = ((np.linalg.norm(fb - fa) ** 2) - (na - nb) ** 2) / (2 * na * nb)  # float64: exact to ~1e-12 here
    old, new = {"layer.w": a}, {"layer.w": b}
    if source == "safetensors":
        save_file(old, str(tmp_path / "a.safetensors")), save_file(new, str(tmp_path / "b.safetensors"))
        old, new = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    report = torchdiff.compare(old, new)
    assert 1 - report["layer.w"].metrics.cosine == pytest.approx(rot, rel=1e-4)
    (layer,) = GroupSums().update(report.comparison.figures, "layer").compute().values()
    assert layer.rotation == pytest.approx(rot, rel=1e-4)
    assert 1 - layer.cosine == pytest.approx(rot, rel=1e-4)


def test_float64_values_near_the_end_of_its_range(capsys, tmp_path):
    """float64 values of 1e200 (squares beyond float64): std, rms, l2 and rel_l2 are
    finite and right (computed with a power-of-two scale), no NumPy warning reaches
    stderr, and the cosine, whose ⟨A,B⟩ is beyond float64, is NaN in text and JSON alike
    (text said cosine=1 from min(1.0, nan)). Values of 1e-200 (squares below float64)
    likewise."""
    import warnings

    from torchdiff.cli import main

    g = torch.Generator().manual_seed(0)
    a = torch.randn(20, 20, dtype=torch.float64, generator=g)
    a[0, 0] = 1e200
    b = a.clone()
    b[3, 3] += 1.0
    tiny = torch.randn(50, dtype=torch.float64, generator=g) * 1e-200
    old, new = {"w": a, "tiny": tiny}, {"w": b, "tiny": tiny * 1.5}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = torchdiff.compare(old, new, stats=True)
    d = report["w"]
    x = f64(a) / 1e200  # the reference, scaled by hand
    close(d.old.std, x.std() * 1e200, 1e-12)
    close(d.old.rms, math.sqrt((x * x).mean()) * 1e200, 1e-12)
    close(d.old.mean, x.mean() * 1e200, 1e-12)
    assert d.metrics.l2 == 1.0 and d.metrics.max_abs == 1.0
    close(d.metrics.rel_l2, 1.0 / (np.linalg.norm(x) * 1e200), 1e-12)
    assert math.isnan(d.metrics.cosine) and math.isnan(float(report.comparison.figures.cosine()[0]))
    t = report["tiny"]  # squares of 1e-200 underflow: scaled as well
    y = f64(tiny) * 1e200
    close(t.old.std, y.std() * 1e-200, 1e-12)
    close(t.metrics.rel_l2, 0.5, 1e-12)
    assert math.isnan(t.metrics.cosine)  # ‖A‖‖B‖ ≈ 1e-398 underflows float64: undefined
    save_file(old, str(tmp_path / "a.safetensors"))
    save_file(new, str(tmp_path / "b.safetensors"))
    capsys.readouterr()
    main([str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--stats", "-o", "json"])
    out, err = capsys.readouterr()
    assert err == ""
    item = next(i for i in json.loads(out) if i["path"] == "w")
    assert item["cosine"] == "NaN" and item["old"]["std"] == d.old.std and item["old"]["rms"] == d.old.rms
    main([str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")])
    out, err = capsys.readouterr()
    assert err == "" and "cosine=nan" in out and "cosine=1" not in out


# ---- CUDA (skipped without a GPU) ------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
class TestCuda:
    @pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
    def test_cuda_engine_matches_reference(self, dtype):
        a = make((3, ROW + 1), dtype, 21)
        b = perturb(a, 21)
        d = run({"w": a}, {"w": b}, Engine("cuda"))["w"]
        check_side(d.old, a, rtol_for(dtype))
        check_pair(d.metrics, a, b, rtol_for(dtype))


@pytest.mark.parametrize("dtype, base", [(torch.int64, 2**62), (torch.uint64, 2**63 + 4)])
def test_64_bit_integers_that_differ_below_float64_resolution_are_changed(dtype, base):
    """2**62 + 1 against 2**62 + 2: Δ rounds to 0 in float64, the bytes differ. Changed
    (exit 1, differs() True), and the line says why the figures read 0."""
    old = {"i": torch.tensor([base + 1, 7], dtype=dtype)}
    new = {"i": torch.tensor([base + 2, 7], dtype=dtype)}
    report = torchdiff.compare(old, new, device="cpu")
    assert report["i"].status == "changed" and torchdiff.differs(old, new)
    assert "integers differ below float64's resolution" in str(report)
    assert torchdiff.compare(old, old, device="cpu")["i"].status == "unchanged"


def test_cosine_of_identical_values_is_exactly_one():
    """A = B gives cosine 1 exactly, per tensor and per group: ⟨A,A⟩/(‖A‖‖A‖) rounds to
    0.9999999999999999 for some vectors (‖A‖ = √⟨A,A⟩ rounded), which read as "moved"
    beside unchanged tensors."""
    g = torch.Generator().manual_seed(0)
    rounded = 0
    for _ in range(20):
        x = torch.randn(int(torch.randint(1, 50, (1,), generator=g)), generator=g)
        report = torchdiff.compare({"w": x, "v": torch.ones(2)}, {"w": x.clone(), "v": torch.zeros(2)}, device="cpu")
        fig = report.figures
        row = fig.index("w")
        rounded += fig.dot[row] / (fig.norm_old[row] * fig.norm_new[row]) != 1.0
        assert fig.cosine()[row] == 1.0
        assert next(d for d in report if d.name == "w").metrics.cosine == 1.0
        assert torchdiff.figures.group(fig, lambda name: name, np.ones(2, dtype=bool))["w"].cosine == 1.0
    assert rounded  # the rounding this guards against happened


@pytest.mark.parametrize("shape", [(1000, 37), (70000,), (3,)])
def test_a_side_all_zero_makes_the_difference_the_other_side_exactly(shape):
    """new = 0 (pruned): Δ = −A, so rel_l2 = ‖Δ‖/‖A‖ is 1 exactly and ‖Δ‖ = ‖A‖ (it read
    0.9999999922592469 on a 1000 × 37 randn: two row sums of the same values); old = 0:
    ‖Δ‖ = ‖B‖. Against float64 NumPy."""
    torch.manual_seed(0)
    x = torch.randn(shape)
    ref = float(np.linalg.norm(x.double().numpy().ravel()))
    fig = torchdiff.compare({"w": x}, {"w": torch.zeros(shape)}, device="cpu").figures
    assert fig.rel_l2()[0] == 1.0 and fig.l2[0] == fig.norm_old[0]
    assert fig.l2[0] == pytest.approx(ref, rel=1e-6)
    fig = torchdiff.compare({"w": torch.zeros(shape)}, {"w": x}, device="cpu").figures
    assert fig.l2[0] == fig.norm_new[0] == pytest.approx(ref, rel=1e-6)
