"""--quantization-analysis: storage bits, compression and the precision a quantization cost.

Definitions (docs/analyses/quantization_analysis.md): A = old values, B = new values
after dequantization, Δ = B − A, all over the positions where both are finite.

- bits per weight = 8 · bytes / params; compression = bytes_new / bytes_old, with the
  real bytes of each side: a weight's scale and zero-point companions count in it.
- SQNR_dB = 20 · log10(‖A‖ / ‖Δ‖) (+inf when Δ = 0); rel_l2 = ‖Δ‖/‖A‖;
  cosine = ⟨A,B⟩/(‖A‖‖B‖); max_err_over_rms = max|Δ| / rms(A); p95_abs_err = the
  nearest-rank 95th percentile of |Δ| (the ⌈0.95·n⌉-th smallest).
- totals pool the sums: SQNR = 10 · log10(Σ‖A‖² / Σ‖Δ‖²) over every measured tensor.
- precision_loss from the total SQNR: ≥ 40 dB minimal, 30–40 low, 20–30 moderate,
  < 20 high; ``none`` when Δ = 0 everywhere; ``not_quantized`` when no tensor was
  quantized (the SQNR then measures an ordinary change, and is still reported);
  ``unknown`` when quantized weights were found but none could be dequantized.

Schemes detected (``prepare`` works on headers only; values are dequantized lazily,
in the engine's single pass):

- int8 / uint8 / int16 / float8 weight ``W`` with a scale companion ``W_scale``,
  ``W.scale``, ``W_scale_inv`` (``weight_scale``, ``weight_scale_inv`` for
  ``*.weight``), optional zero point ``W_zero_point`` / ``W.zero_point`` / ``W_zp``:
  B = (q − zero_point) · scale, the scale broadcast per tensor (one value), per channel
  (one per output row, or any shape broadcastable to W) or per block (⌈dim/block⌉ per
  dim, the last block partial, e.g. 128×128 fp8 blocks: ``dequant.block_size``);
- bitsandbytes int8 ``W`` + ``<module>.SCB`` (per-row absmax): B = q · SCB / 127;
- GPTQ / AWQ ``<module>.qweight`` (int32 words of packed 2/4/8-bit codes) +
  ``scales``, ``qzeros`` (+ GPTQ ``g_idx``): unpacked into ``<module>.weight``
  (``dequant._packed``); bits per weight count the packed words and companions;
- plain casts (float32 → float16 / bfloat16 / float8): compared as stored;
- GGUF block types (Q4_K, Q8_0...): the reader's handles already dequantize, and
  report the real bytes;
- fake quantization: a float tensor whose new values take ≤ 256 distinct levels where
  the old took more.

Tensors that cannot be dequantized (no scale companion, a scale shape that fits no
layout, a packed layout not unpacked) are listed with the reason and left out of the
precision figures; their bytes still count, and they count as quantized tensors.

The analysis covers the tensors in ``--scope`` (trainable parameters by default), as the
global and layer figures do, plus quantization companions that were not folded into a
weight (GPTQ ``qzeros``/``scales``, bitsandbytes 4-bit ``absmax``...: the weights'
storage, so their bytes count whatever the scope). Optimizer state, buffers, counters and
training state (a saved RNG state) are left out of every figure, bytes included, and a
note counts them per role: in a training checkpoint, Adam's ``exp_avg_sq`` would
otherwise rank as the most sensitive tensor and pull the pooled SQNR down.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from torchdiff.dequant import (  # noqa: F401 - fit_scale: public here since 0.1
    LOOKED_FOR, Detected, dequantize_checkpoint, fit_scale)
from torchdiff.errors import UsageError
from torchdiff.formats.base import Checkpoint
from torchdiff.names import QUANT_COMPANION, ROLES, SCOPES
from torchdiff.results import ADDED, OLD_ALL_ZERO, REMOVED, RESHAPED, AnalysisResult, Table
from torchdiff.units import count, counted

NAME = "quantization_analysis"
FLAG = "quantization_analysis"
#: It transforms the two checkpoints of a pair (dequantization): no series form.
PAIR_ONLY = True
OPTIONS: dict[str, tuple[Any, str]] = {
    "quantization_top_k": (10, "with --quantization-analysis: how many most sensitive tensors (lowest SQNR) to list"),
}

#: SQNR thresholds of the precision_loss label, highest first; below the last: "high".
THRESHOLDS_DB: tuple[tuple[float, str], ...] = ((40.0, "minimal"), (30.0, "low"), (20.0, "moderate"))
HIGH = "high"
THRESHOLDS_TEXT = "precision_loss from SQNR: " + ", ".join(
    [f"≥ {THRESHOLDS_DB[0][0]:g} dB {THRESHOLDS_DB[0][1]}"]
    + [f"{lo:g}–{hi:g} {label}" for (hi, _), (lo, label) in zip(THRESHOLDS_DB, THRESHOLDS_DB[1:])]
    + [f"< {THRESHOLDS_DB[-1][0]:g} {HIGH}"])

#: A float tensor whose values take at most this many distinct levels (8 bits) is fake-quantized.
FAKE_QUANT_LEVELS = 256
_LEVEL_SAMPLE = 4096

_STATE = "found"  # per-run state key: what prepare() found

# GGUF's names of plain types -> torch's.
_CANONICAL = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
              "I8": "int8", "I16": "int16", "I32": "int32", "I64": "int64"}
_FLOAT_NAMES = {"float64", "float32", "float16", "bfloat16"}
_INT_NAMES = {"int8", "uint8", "int16", "int32", "int64", "uint16", "uint32", "uint64", "bool"}


def storage_kind(storage: str) -> str:
    """``float``, ``int`` (integers and bool) or ``block`` (GGUF and other block types)."""
    storage = _CANONICAL.get(storage, storage)
    if storage in _FLOAT_NAMES or storage.startswith("float8"):
        return "float"
    if storage in _INT_NAMES:
        return "int"
    return "block"


NOT_QUANTIZED = "not_quantized"
#: precision_loss when quantized weights were found and none could be measured.
UNKNOWN = "unknown"


def precision_loss(sqnr_db: float, lossless: bool = False) -> str:
    """The label of an SQNR (dB); ``none`` when the error is exactly zero."""
    if lossless:
        return "none"
    if math.isnan(sqnr_db):
        return UNKNOWN
    for threshold, label in THRESHOLDS_DB:
        if sqnr_db >= threshold:
            return label
    return HIGH


def sqnr_db(signal_sq: float, noise_sq: float) -> float:
    """10 · log10(Σ‖A‖² / Σ‖Δ‖²) = 20 · log10(‖A‖/‖Δ‖)."""
    if noise_sq <= 0:
        return math.inf
    if signal_sq <= 0:
        return -math.inf
    return 10.0 * math.log10(signal_sq / noise_sq)


def validate(options) -> None:
    k = options.get("quantization_top_k", 10)
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise UsageError(f"--quantization-top-k must be a whole number ≥ 0, got {k!r}")


# ---- prepare: detect companions, wrap weights with dequantizing handles (torchdiff/dequant.py) ----


def prepare(old: Checkpoint, new: Checkpoint, options, state: dict) -> tuple[Checkpoint, Checkpoint]:
    old, found_old = dequantize_checkpoint(old)
    new, found_new = dequantize_checkpoint(new)
    state[_STATE] = {"old": found_old, "new": found_new}
    return old, new


# ---- the hook: figures that need the values ------------------------------------------


def p95_abs(delta: torch.Tensor) -> float:
    """Nearest-rank 95th percentile of |Δ|: the ⌈0.95·n⌉-th smallest value.

    ``delta`` is scratch: on the CPU it is partially sorted in place (numpy's
    introselect is ~10× faster than torch.kthvalue there).
    """
    flat = delta.reshape(-1)
    n = flat.numel()
    if n == 0:
        return math.nan
    k = (95 * n + 99) // 100
    if flat.device.type == "cpu":
        values = flat.numpy()
        values.partition(k - 1)
        return float(values[k - 1])
    return float(torch.kthvalue(flat, k).values)


def distinct_levels(x: torch.Tensor, cap: int = FAKE_QUANT_LEVELS) -> int | None:
    """Number of distinct values if it is ≤ cap, else None (a cheap sample first)."""
    flat = x.reshape(-1)
    if torch.unique(flat[:_LEVEL_SAMPLE]).numel() > cap:
        return None
    n = torch.unique(flat).numel()
    return n if n <= cap else None


_CHUNK = 1 << 22  # elements: above this, p95 is selected in slices (bounded temporaries)
_DIGIT = 16  # bits of |Δ|'s bit pattern fixed per histogram pass


def p95_abs_pair(old: torch.Tensor, new: torch.Tensor, chunk: int = _CHUNK) -> float:
    """p95 |Δ| (nearest rank) over the positions where both sides are finite, Δ = new − old.

    A pair of at most ``chunk`` elements: |Δ| in one buffer, then ``p95_abs``. A larger
    pair is never held whole: |Δ| ≥ 0, so the order of its values is the order of their
    IEEE bit patterns read as integers, and the k-th smallest is found digit by digit
    (radix select): a histogram of the top 16 bits over slices of ``chunk`` elements
    picks the bin holding the k-th value, the next pass counts the next 16 bits inside
    that bin, and so on until every bit is fixed (2 passes for float32, 4 for float64).
    The result is the same value ``p95_abs`` returns; only slices are ever allocated.
    """
    a, b = old.reshape(-1), new.reshape(-1)
    if a.numel() <= chunk:
        delta = (b - a).abs_()
        if not bool(torch.isfinite(delta).all()):
            delta = delta[torch.isfinite(a) & torch.isfinite(b)]
        return p95_abs(delta)
    dtype = torch.promote_types(a.dtype, b.dtype)
    if dtype not in (torch.float32, torch.float64):  # the engine hands float32 or float64
        a, b, dtype = a.float(), b.float(), torch.float32
    bits_dtype, width = (torch.int32, 32) if dtype == torch.float32 else (torch.int64, 64)

    def slices():
        for start in range(0, a.numel(), chunk):
            x, y = a[start:start + chunk], b[start:start + chunk]
            d = (y - x).to(dtype).abs_()
            ok = torch.isfinite(x) & torch.isfinite(y)
            if not bool(ok.all()):
                d = d[ok]
            yield d.view(bits_dtype)

    n = sum(int(bits.numel()) for bits in slices())
    if n == 0:
        return math.nan
    k = (95 * n + 99) // 100  # the k-th smallest, 1-based
    prefix, fixed = 0, 0  # the top ``fixed`` bits of the answer found so far
    while fixed < width:
        shift = width - fixed - _DIGIT
        counts = torch.zeros(1 << _DIGIT, dtype=torch.int64, device=a.device)
        for bits in slices():
            if fixed:
                bits = bits[(bits >> (shift + _DIGIT)) == prefix]
            counts += torch.bincount(((bits >> shift) & ((1 << _DIGIT) - 1)).long(), minlength=1 << _DIGIT)
        cumulative = torch.cumsum(counts, 0)
        digit = int(torch.searchsorted(cumulative, torch.tensor([k], device=a.device)))
        k -= int(cumulative[digit - 1]) if digit else 0
        prefix, fixed = (prefix << _DIGIT) | digit, fixed + _DIGIT
    return float(torch.tensor([prefix], dtype=bits_dtype).view(dtype))


class PrecisionHook:
    """p95 |Δ| for every float pair of equal shape; distinct levels for same-dtype pairs."""

    name = NAME

    def wants(self, pair) -> bool:
        return pair.kind == "common" and pair.old.dtype.is_floating_point and pair.new.dtype.is_floating_point

    def __call__(self, pair, old: torch.Tensor, new: torch.Tensor) -> dict[str, Any]:
        out: dict[str, Any] = {"p95_abs_err": p95_abs_pair(old, new)}
        same = _CANONICAL.get(pair.old.storage_dtype, pair.old.storage_dtype) == _CANONICAL.get(
            pair.new.storage_dtype, pair.new.storage_dtype)
        if same and new.numel() > FAKE_QUANT_LEVELS:
            levels = distinct_levels(new)
            if levels is not None and distinct_levels(old) is None:
                out["levels"] = levels
        return out


def hooks(options, state: dict) -> list:
    return [PrecisionHook()]


# ---- analyze ------------------------------------------------------------------------------


def _bits(nbytes: int, params: int) -> float:
    return 8.0 * nbytes / params if params else math.nan


def _ratio(a: float, b: float) -> float:
    if b:
        return a / b
    return math.nan if not a else math.inf


def _list(names: list[str], limit: int = 5) -> str:
    """Names for a text note; JSON carries the full list."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {count(len(names) - limit)} more" if len(names) > limit else "")


def _stored(storage: str, fmt: str) -> str:
    """A storage type as a scheme name: ``float32``, ``GGUF Q4_K``."""
    storage = _CANONICAL.get(storage, storage)
    return f"GGUF {storage}" if storage_kind(storage) == "block" and fmt == "gguf" else storage


#: Marks a quantized storage both sides hold alike (``GGUF Q4_0 (both sides)``): no
#: quantization step lies between them, so their change is no quantization error.
BOTH_SIDES = " (both sides)"


def _pair_scheme(d, det_old: Detected | None, det_new: Detected | None, extras: dict,
                 formats: tuple[str, str]) -> tuple[str, bool]:
    """(scheme, step): the tensor's scheme label, and whether a quantization step (a
    change of storage, or a fake-quant grid) lies between the sides."""
    so, sn = _stored(d.old.dtype, formats[0]), _stored(d.new.dtype, formats[1])
    if det_new is not None:
        if det_old is not None and det_old.scheme != det_new.scheme:
            return f"{det_old.scheme} → {det_new.scheme}", True
        return (det_new.scheme + BOTH_SIDES, False) if det_old is not None else (det_new.scheme, True)
    if det_old is not None:
        return f"{det_old.scheme} → {sn}", True
    if so != sn:
        block = storage_kind(d.old.dtype) == "block" or storage_kind(d.new.dtype) == "block"
        return (sn if block and storage_kind(d.old.dtype) == "float" else f"{'' if block else 'cast '}{so} → {sn}"), True
    if storage_kind(d.old.dtype) == "block":  # one GGUF block type on both sides
        return so + BOTH_SIDES, False
    levels = extras.get("levels")
    if levels is not None and d.is_difference:
        return f"fake-quant {max(1, math.ceil(math.log2(levels)))}-bit grid (stored {sn})", True
    return "none", False


def _unmeasured_scheme(stored: tuple[str, str], why: str) -> str:
    """The Schemes row of a paired tensor without precision figures: its storage on
    each side and why (``int8 → float32 (not dequantized)``, ``int64 (integer)``)."""
    so, sn = stored
    return f"{so if so == sn else f'{so} → {sn}'} ({why})"


def covered_roles(scope: str) -> frozenset[str]:
    """The roles the analysis measures: those of ``scope`` plus quantization companions
    (unfolded companions are the storage of their weights)."""
    return SCOPES[scope] | {QUANT_COMPANION}


def _split_scope(comparison) -> tuple[list, str | None]:
    """The diffs the analysis covers, and a note counting the others per role (or None)."""
    roles = covered_roles(comparison.scope)
    covered = [d for d in comparison.diffs if d.role in roles]
    left = [d.role for d in comparison.diffs if d.role not in roles]
    if not left:
        return covered, None
    by_role = ", ".join(f"{r.replace('_', ' ')} {count(left.count(r))}" for r in ROLES if r in left)
    return covered, (f"scope {comparison.scope}: {counted(len(left), 'tensor')} of other roles ({by_role}) left out of "
                     "every figure, bytes included; --scope all includes them")


def _storage_only(comparison, found: dict[str, Detected]) -> AnalysisResult:
    """One checkpoint (inspect): bits per weight and the schemes its tensors in scope are stored in."""
    diffs, scope_note = _split_scope(comparison)
    groups: dict[str, list] = {}  # scheme -> [(params, bytes)]
    quantized = 0
    for d in diffs:
        det = found.get(d.name)
        scheme = det.scheme if det is not None else _stored(d.new.dtype, comparison.new_format)
        quantized += det is not None or storage_kind(d.new.dtype) == "block"
        params = det.params if det is not None and det.params else d.new.numel  # packed words: the weights they hold
        groups.setdefault(scheme, []).append((params, d.new.nbytes))
    params = sum(p for s in groups.values() for p, _ in s)
    nbytes = sum(d.new.nbytes for d in diffs)
    rows = tuple((scheme, len(s), sum(p for p, _ in s), sum(b for _, b in s),
                  _bits(sum(b for _, b in s), sum(p for p, _ in s))) for scheme, s in groups.items())
    notes = [f"not dequantized: {n}: {det.error}" for n, det in found.items() if det.error]
    if scope_note:
        notes.append(scope_note)
    headline = {"bits_per_weight": _bits(nbytes, params), "quantized_tensors": quantized}
    return AnalysisResult(NAME, headline, {"bytes": nbytes, "params": params,
                                           "companions": {n: list(det.companions) for n, det in found.items()}},
                          tables=(Table("Storage", ("scheme", "tensors", "params", "bytes", "bits_per_weight"), rows),),
                          notes=tuple(notes))


def analyze(comparison, options, state: dict) -> AnalysisResult:
    state = state.get(_STATE) or {"old": {}, "new": {}}
    found_old: dict[str, Detected] = state["old"]
    found_new: dict[str, Detected] = state["new"]
    top_k = int(options.get("quantization_top_k", 10))
    if comparison.mode == "inspect":
        return _storage_only(comparison, found_new)
    diffs, scope_note = _split_scope(comparison)

    rows: list[dict[str, Any]] = []  # measured tensors
    unmeasured_rows: list[tuple[str, int, Any]] = []  # (scheme, params, diff) of paired tensors without precision
    failed: dict[str, list[str]] = {}  # reason -> names
    unmeasured: list[str] = []  # quantized weights (detected, or integer codes against floats) not dequantized
    integer: list[str] = []
    only_old: list[str] = []
    only_new: list[str] = []
    paired_bytes_old = paired_bytes_new = paired_params = 0
    ckpt_bytes_old = ckpt_bytes_new = 0
    for d in diffs:
        if d.old is not None:
            ckpt_bytes_old += d.old.nbytes
        if d.new is not None:
            ckpt_bytes_new += d.new.nbytes
        if d.status == ADDED:
            only_new.append(d.name)
            continue
        if d.status == REMOVED:
            only_old.append(d.name)
            continue
        det_old, det_new = found_old.get(d.name), found_new.get(d.name)
        paired_bytes_old += d.old.nbytes
        paired_bytes_new += d.new.nbytes
        params = det_old.params if det_old is not None and det_old.params else d.old.numel
        paired_params += params
        stored = (_stored(d.old.dtype, comparison.old_format), _stored(d.new.dtype, comparison.new_format))
        errors = [det.error for det in (det_old, det_new) if det is not None and det.error]
        if errors:
            failed.setdefault(errors[0], []).append(d.name)
            unmeasured.append(d.name)
            unmeasured_rows.append((_unmeasured_scheme(stored, "not dequantized"), params, d))
            continue
        if d.status == RESHAPED or d.metrics is None:
            failed.setdefault("shape changed, so values cannot be compared", []).append(d.name)
            unmeasured_rows.append((_unmeasured_scheme(stored, "shape changed"), params, d))
            continue
        kinds = {storage_kind(d.old.dtype) if det_old is None else "float",
                 storage_kind(d.new.dtype) if det_new is None else "float"}
        if kinds == {"int"}:
            integer.append(d.name)
            unmeasured_rows.append((_unmeasured_scheme(stored, "integer"), params, d))
            continue
        if "int" in kinds:
            raw = d.new.dtype if storage_kind(d.new.dtype) == "int" and det_new is None else d.old.dtype
            failed.setdefault(f"{raw} values without a scale companion (looked for {LOOKED_FOR})", []).append(d.name)
            unmeasured.append(d.name)
            unmeasured_rows.append((_unmeasured_scheme(stored, "not dequantized"), params, d))
            continue
        m = d.metrics
        extras = d.extras.get(NAME) or {}
        scheme, step = _pair_scheme(d, det_old, det_new, extras, (comparison.old_format, comparison.new_format))
        # A new side all zero is Δ = −A exactly: ‖Δ‖² = ‖A‖² (the engine's two sums of it
        # differ in the last bits, which would print as a tiny nonzero SQNR).
        noise_sq = m.norm_old**2 if d.new_all_zero else m.l2**2
        rows.append({
            "tensor": d.name,
            "scheme": scheme,
            "_step": step,
            "params": d.old.numel,
            "bytes_old": d.old.nbytes,
            "bytes_new": d.new.nbytes,
            "bits_old": _bits(d.old.nbytes, d.old.numel),
            "bits_new": _bits(d.new.nbytes, d.new.numel),
            "compression": _ratio(d.new.nbytes, d.old.nbytes),
            "sqnr_db": sqnr_db(m.norm_old**2, noise_sq),
            "rel_l2": m.rel_l2,
            "cosine": m.cosine,
            "max_err_over_rms": _ratio(m.max_abs, d.old.rms) if m.max_abs else 0.0,
            "p95_abs_err": extras.get("p95_abs_err", math.nan),
            "_sq": (m.norm_old**2, m.norm_new**2, noise_sq, m.dot),
            "_old_all_zero": d.old_all_zero,
        })

    quantized = [r for r in rows if r["_step"]]  # a quantization step between the sides
    stored_quantized = [r for r in rows if r["scheme"] != "none"]  # steps, and schemes both sides hold
    signal = sum(r["_sq"][0] for r in rows)
    noise = sum(r["_sq"][2] for r in rows)
    total_sqnr = sqnr_db(signal, noise) if rows else math.nan
    label = precision_loss(total_sqnr, lossless=bool(rows) and noise == 0)
    if not quantized and unmeasured:
        # Quantized weights were found and none could be measured: the other tensors'
        # figures say nothing of what the quantization cost (their SQNR, often inf,
        # would read as a lossless quantization).
        label, total_sqnr = UNKNOWN, math.nan
    elif not quantized and noise > 0:
        # Nothing was quantized: the SQNR measures an ordinary change (training, a merge),
        # and a "precision loss" label would misname it.
        label = NOT_QUANTIZED
    q_signal = sum(r["_sq"][0] for r in quantized)
    q_noise = sum(r["_sq"][2] for r in quantized)
    denom = math.sqrt(signal * sum(r["_sq"][1] for r in rows))
    compression = _ratio(paired_bytes_new, paired_bytes_old)
    bits_old = _bits(paired_bytes_old, paired_params)
    bits_new = _bits(paired_bytes_new, paired_params)

    schemes: dict[str, list[dict]] = {}
    for r in rows:
        schemes.setdefault(r["scheme"], []).append(r)
    for scheme, params, d in unmeasured_rows:  # their bytes count in the totals, so they have rows too
        schemes.setdefault(scheme, []).append({"params": params, "bytes_old": d.old.nbytes,
                                               "bytes_new": d.new.nbytes, "_sq": (math.nan,) * 4})
    scheme_rows = []  # quantized schemes by parameter count, then "none"
    for scheme, members in sorted(schemes.items(), key=lambda kv: (kv[0] == "none", -sum(r["params"] for r in kv[1]),
                                                                   kv[0])):
        bo = sum(r["bytes_old"] for r in members)
        bn = sum(r["bytes_new"] for r in members)
        scheme_rows.append((scheme, len(members), sum(r["params"] for r in members), bo, bn, _ratio(bn, bo),
                            _group_sqnr(members)))
    candidates = [r for r in (quantized or rows) if r["_sq"][0] > 0]  # an all-zero old side has no SQNR to rank
    sensitive = sorted(candidates, key=lambda r: (r["sqnr_db"], r["tensor"]))[:top_k]
    columns = ("tensor", "scheme", "bits_old", "bits_new", "compression", "sqnr_db", "rel_l2", "cosine",
               "max_err_over_rms", "p95_abs_err")
    tables = (
        Table("Schemes", ("scheme", "tensors", "params", "bytes_old", "bytes_new", "compression", "sqnr_db"),
              tuple(scheme_rows)),
        Table("Most sensitive", ("rank", "tensor", "scheme", "sqnr_db", "rel_l2", "max_err_over_rms"),
              tuple((i + 1, r["tensor"], r["scheme"], r["sqnr_db"], r["rel_l2"], r["max_err_over_rms"])
                    for i, r in enumerate(sensitive))),
        Table("Tensors", columns, tuple(_tensor_row(r, columns) for r in rows)),
    )

    unquantized = [r["tensor"] for r in rows if r["scheme"] == "none"]
    notes = [THRESHOLDS_TEXT]
    if quantized and unquantized:
        notes.append(f"left unquantized ({count(len(unquantized))}): {_list(unquantized)}")
    if unmeasured and not quantized:
        notes.append(f"precision_loss unknown: {counted(len(unmeasured), 'quantized tensor')} could not be dequantized "
                     f"(reasons below): {_list(unmeasured)}")
    elif unmeasured:
        notes.append(f"precision figures cover the {counted(len(quantized), 'measured quantized tensor')}; "
                     f"{count(len(unmeasured))} more could not be dequantized (reasons below): {_list(unmeasured)}")
    elif rows and not quantized:
        kept = sorted({r["scheme"][: -len(BOTH_SIDES)] for r in rows if r["scheme"].endswith(BOTH_SIDES)})
        if kept:
            notes.append(f"no quantization step between the checkpoints: both sides store {', '.join(kept)}; "
                         "the figures measure the whole change between them, not a quantization error")
        else:
            notes.append("no quantization detected (each tensor keeps its dtype): the figures measure the whole "
                         "change between the checkpoints, not a quantization error")
    for reason, names in failed.items():
        notes.append(f"not dequantized ({count(len(names))}), {reason}: {_list(names)}")
    if integer:
        notes.append(f"integer/bool tensors ({count(len(integer))}) count in bytes, not in precision: {_list(integer)}")
    companions = {n: list(det.companions) for found in (found_old, found_new) for n, det in found.items()}
    n_comp = sum(len(c) for c in companions.values())
    if n_comp:
        notes.append(f"{count(n_comp)} scale/zero-point companion tensors folded into their {count(len(companions))} "
                     "weights (bytes counted in the weight)")
    if only_old or only_new:
        notes.append(f"tensors on one side only (old {count(len(only_old))}, new {count(len(only_new))}) count in the "
                     "checkpoint bytes, not in compression")
    if scope_note:
        notes.append(scope_note)

    headline = {
        "compression": compression,
        "precision_loss": label,
        "sqnr_db": total_sqnr,
        "bits_per_weight_old": bits_old,
        "bits_per_weight_new": bits_new,
        "quantized_tensors": len(stored_quantized) + len(unmeasured),
    }
    data = {
        "precision_loss_thresholds_db": {name: t for t, name in THRESHOLDS_DB},
        "rel_l2": math.sqrt(noise / signal) if signal > 0 else (math.inf if noise else 0.0),
        "cosine": sum(r["_sq"][3] for r in rows) / denom if denom > 0 else math.nan,
        "sqnr_db_quantized": sqnr_db(q_signal, q_noise) if quantized else None,
        "bytes_old": paired_bytes_old,
        "bytes_new": paired_bytes_new,
        "params": paired_params,
        "checkpoint_bytes_old": ckpt_bytes_old,
        "checkpoint_bytes_new": ckpt_bytes_new,
        "checkpoint_compression": _ratio(ckpt_bytes_new, ckpt_bytes_old),
        "unquantized": unquantized,
        "not_dequantized": [{"path": n, "reason": reason} for reason, names in failed.items() for n in names],
        "integer_tensors": integer,
        "companions": companions,
        "only_old": only_old,
        "only_new": only_new,
    }
    return AnalysisResult(NAME, headline, data, tables=tables, notes=tuple(notes))


#: The Tensors columns undefined when the old side is all zero (‖A‖ = 0): the table
#: prints ``n/a`` in them, and OLD_ALL_ZERO in place of sqnr_db (docs/METRICS.md).
_UNDEFINED_AT_OLD_ZERO = ("rel_l2", "cosine", "max_err_over_rms")


def _tensor_row(r: dict[str, Any], columns: tuple[str, ...]) -> tuple:
    """A row of the Tensors table. A tensor whose old side is all zero has no SQNR,
    rel_l2, cosine or error over rms(A) (each divides by ‖A‖ = 0): it reads ``old all
    zero`` and ``n/a`` there, never ``-inf``, ``inf`` or ``nan``; ``p95_abs_err``
    still measures its change."""
    if not r["_old_all_zero"]:
        return tuple(r[c] for c in columns)
    return tuple(OLD_ALL_ZERO if c == "sqnr_db" else "n/a" if c in _UNDEFINED_AT_OLD_ZERO else r[c]
                 for c in columns)


def _group_sqnr(members: list[dict[str, Any]]) -> float | str:
    """The pooled SQNR of a Schemes row; ``old all zero`` when its old side is all zero
    and changed (Σ‖A‖² = 0 < Σ‖Δ‖²), where the formula gives −inf."""
    signal, noise = sum(r["_sq"][0] for r in members), sum(r["_sq"][2] for r in members)
    return OLD_ALL_ZERO if signal == 0 and noise > 0 else sqnr_db(signal, noise)
