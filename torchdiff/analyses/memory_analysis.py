"""--memory-analysis: exact bytes per side, dtype and layer; estimates for inference, training, other dtypes.

Exact: bytes per side, per dtype and per layer, the largest tensors, the delta.
Estimates, labelled: inference, Adam training, a what-if table for other dtypes and
the common GPU sizes each fits.

Exact figures are the bytes the files spend on each tensor (``TensorStats.nbytes``;
quantized blocks and scales included). Optimizer state (Adam moments, step counters)
is counted apart from the model. Estimates are labelled as such, each with its
formula: docs/analyses/memory_analysis.md. Text gives sizes in B/KB/MB/GB (powers of
1000, ``units.human_bytes``); JSON gives bytes (the tables' ``MB`` columns: 10^6
bytes). A device of N GB has N·2^30 bytes (as sold: an "80 GB" card holds 80 GiB).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

from torchdiff.analyses.layer_impact import natural_key
from torchdiff.figures import Comparison, stored_nbytes, tied_side
from torchdiff.names import PARAMETER, TRAINING_STATE, is_float_storage, is_optimizer_state, kind, layer_of, parts
from torchdiff.results import AnalysisResult, Table
from torchdiff.units import count, human_bytes, number

NAME = "memory_analysis"
FLAG = "memory_analysis"
OPTIONS: dict = {}

INFERENCE_OVERHEAD = 0.20       # inference ≈ weights × (1 + 0.20): activations, CUDA context, allocator slack
ADAM_MOMENT_BYTES = 4           # Adam keeps two moments per parameter, in fp32 (or the weight dtype if wider)
MASTER_BYTES = 4                # mixed precision: an fp32 master copy of weights narrower than fp32
INT4_GROUP = 128                # int4 what-if: one fp16 scale per 128 weights (GPTQ/AWQ-style groups)
WHAT_IF_BYTES: tuple[tuple[str, float], ...] = (
    ("float32", 4.0), ("bfloat16", 2.0), ("float16", 2.0), ("int8", 1.0), ("int4", 0.5 + 2.0 / INT4_GROUP),
)
DEVICES_GB = (8, 16, 24, 40, 80)
GIB = 1 << 30
LARGEST = 5                     # rows of the largest-tensors table
OPTIMIZER_ROW = "(optimizer state)"
TRAINING_ROW = "(training state)"  # RNG states, 0-d losses (names.TRAINING_STATE)


def _is_parameter(name: str, s, role: str) -> bool:
    """A tensor an optimizer trains: role ``parameter`` (names.role: not a buffer such as
    BatchNorm's running statistics or rotary ``inv_freq``, not a counter, not a
    quantization scale), float, or an integer weight of ≥ 2 dimensions (quantized
    weights: int8, uint8 packs)."""
    if role != PARAMETER:
        return False
    if is_float_storage(s.dtype):
        return True
    nd = len(s.shape)
    leaf = name.rsplit(".", 1)[-1].lower()
    if leaf == "bias" or leaf.endswith("_bias") or "mask" in leaf:
        return False  # integer "bias"/mask tensors are attention masks (HF GPT-2 attn.bias), not weights
    return s.dtype.startswith(("int", "uint")) and nd >= 2 and kind(name, nd) in ("weight", "embedding")


def _layer_order(layer: str) -> tuple:
    """Rows of the per-layer table: layers in natural order (``layers.2`` before
    ``layers.10``), then the optimizer-state and training-state rows."""
    return layer in (OPTIMIZER_ROW, TRAINING_ROW), natural_key(layer)


def _side(comp: Comparison, side: str) -> dict[str, Any] | None:
    """Exact byte counts of one side."""
    # Bytes as the file holds them: each storage once (tied weights, slices of a larger
    # saved storage: figures.stored_nbytes); parameters of a tied tensor count once.
    fig = comp.figures
    held = getattr(fig, side).present.tolist()
    stored = {name: (int(n), bool(t)) for name, n, t, here in zip(fig.names, stored_nbytes(fig, side).tolist(),
                                                                tied_side(fig, side).tolist(), held) if here}
    training = {d.name for d in comp.diffs if d.role == TRAINING_STATE}  # an RNG state, a 0-d loss: not the model
    tensors = [(d.name, getattr(d, side), d.role) for d in comp.diffs if getattr(d, side) is not None]
    if not tensors and side == "old" and comp.mode == "inspect":
        return None
    by_dtype: dict[str, dict[str, int]] = defaultdict(lambda: {"tensors": 0, "params": 0, "bytes": 0})
    by_layer: Counter = Counter()
    by_slot: Counter = Counter()
    model_bytes = optimizer_bytes = training_bytes = float_params = float_bytes = other_bytes = 0
    optimizer_tensors = quantized = 0
    for name, s, role in tensors:
        nbytes, is_tied = stored[name]
        e = by_dtype[s.dtype]
        e["tensors"] += 1
        e["params"] += 0 if is_tied else s.numel
        e["bytes"] += nbytes
        if name in training:
            training_bytes += nbytes
            by_layer[TRAINING_ROW] += nbytes
            continue
        if is_optimizer_state(name):
            optimizer_bytes += nbytes
            optimizer_tensors += 1
            by_layer[OPTIMIZER_ROW] += nbytes
            by_slot[parts(name)[-1] if parts(name) else name] += nbytes
            continue
        model_bytes += nbytes
        by_layer[layer_of(name)] += nbytes
        if is_tied:
            continue
        if _is_parameter(name, s, role):
            float_params += s.numel
            float_bytes += nbytes
            quantized += not is_float_storage(s.dtype)
        else:
            other_bytes += nbytes
    total = model_bytes + optimizer_bytes + training_bytes
    # a tied copy (lm_head.weight tied to the embedding) holds no bytes of its own: the
    # dtype and layer rows count it 0, so it is no "largest tensor" either
    largest = sorted(((n, s) for n, s, _ in tensors if not stored[n][1]), key=lambda t: (-t[1].nbytes, t[0]))[:LARGEST]
    return {
        "bytes": total, "model_bytes": model_bytes, "optimizer_bytes": optimizer_bytes,
        "training_state_bytes": training_bytes,
        "optimizer_tensors": optimizer_tensors, "optimizer_bytes_by_slot": dict(by_slot),
        "float_params": float_params, "float_bytes": float_bytes, "non_float_bytes": other_bytes,
        "integer_weight_tensors": quantized,
        "bytes_by_dtype": {k: dict(v) for k, v in sorted(by_dtype.items())},
        "bytes_by_layer": {k: by_layer[k] for k in sorted(by_layer, key=_layer_order)},
        "largest": [{"path": n, "shape": list(s.shape), "dtype": s.dtype, "bytes": s.nbytes} for n, s in largest],
    }


def _estimates(info: dict[str, Any]) -> dict[str, Any]:
    """Inference and Adam-training estimates of one side, with their formulas."""
    # the model as loaded: its tensors' bytes, a tied copy once even where the files store
    # it again (a tied embedding in two .bin shards); equal to model_bytes otherwise
    weights = info["float_bytes"] + info["non_float_bytes"]
    p = info["float_params"]
    w = info["float_bytes"] / p if p else 0.0  # stored bytes per float parameter
    master = MASTER_BYTES if 0 < w < MASTER_BYTES else 0.0
    moments = 2 * max(ADAM_MOMENT_BYTES, w)
    per_param = w + w + master + moments
    training = p * per_param + info["non_float_bytes"]
    inference = weights * (1 + INFERENCE_OVERHEAD)
    parts_text = (f"weights {number(w)} + grads {number(w)}" + (f" + fp32 master {number(master)}" if master else "")
                  + f" + Adam moments {number(moments)}")
    return {
        "inference_weights_bytes": weights,
        "inference_bytes": inference,
        "inference_formula": f"model weights × {1 + INFERENCE_OVERHEAD:g} ({INFERENCE_OVERHEAD:.0%} allowance for "
                             "activations, CUDA context and allocator; depends on batch and sequence length)",
        "training_bytes": training,
        "training_bytes_per_param": per_param,
        "training_formula": f"{count(p)} params × {number(per_param)} B ({parts_text})"
                            + (f" + {human_bytes(info['non_float_bytes'])} of other tensors as stored"
                               if info["non_float_bytes"] else "")
                            + "; activations not included",
    }


def _fits(nbytes: float) -> list[int]:
    return [g for g in DEVICES_GB if nbytes <= g * GIB]


def _what_if(info: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for dtype, per in WHAT_IF_BYTES:
        weights = info["float_params"] * per + info["non_float_bytes"]
        inference = weights * (1 + INFERENCE_OVERHEAD)
        trainable = dtype in ("float32", "bfloat16", "float16")
        training = None
        if trainable:
            master = MASTER_BYTES if per < MASTER_BYTES else 0.0
            training = info["float_params"] * (2 * per + master + 2 * ADAM_MOMENT_BYTES) + info["non_float_bytes"]
        rows.append({"dtype": dtype, "bytes_per_param": per, "weights_bytes": weights, "inference_bytes": inference,
                     "inference_fits_gb": _fits(inference), "training_bytes": training,
                     "training_fits_gb": _fits(training) if training is not None else None})
    return rows


def _gb_list(values: list[int] | None) -> str:
    if values is None:
        return "n/a"
    return ", ".join(str(v) for v in values) if values else "none"


def analyze(comparison: Comparison, options, state: dict) -> AnalysisResult:
    inspect = comparison.mode == "inspect"
    new = _side(comparison, "new")
    old = None if inspect else _side(comparison, "old")
    est = _estimates(new)
    what_if = _what_if(new)
    headline: dict[str, Any] = {}
    if inspect:
        headline["size"] = human_bytes(new["bytes"])
    else:
        headline.update(old=human_bytes(old["bytes"]), new=human_bytes(new["bytes"]),
                        delta=human_bytes(new["bytes"] - old["bytes"], signed=True))
    if new["optimizer_bytes"] or (old and old["optimizer_bytes"]):
        headline["model"] = human_bytes(new["model_bytes"])
        headline["optimizer"] = human_bytes(new["optimizer_bytes"])
    headline["inference_est"] = human_bytes(est["inference_bytes"])
    headline["training_est"] = human_bytes(est["training_bytes"])
    data: dict[str, Any] = {"sides": {"new": {**new, "estimates": est}}, "what_if": what_if,
                            "devices_gb": list(DEVICES_GB),
                            "assumptions": {"inference_overhead": INFERENCE_OVERHEAD,
                                            "adam_moment_bytes": ADAM_MOMENT_BYTES, "master_bytes": MASTER_BYTES,
                                            "int4_group": INT4_GROUP, "mb": 1e6, "gb_device": GIB}}
    if old is not None:
        data["sides"] = {"old": {**old, "estimates": _estimates(old)}, **data["sides"]}
        data["old_bytes"], data["new_bytes"] = old["bytes"], new["bytes"]
        data["delta_bytes"] = new["bytes"] - old["bytes"]
    else:
        data["new_bytes"] = new["bytes"]

    # column names that say they hold bytes: text prints them in B/KB/MB/GB, JSON as numbers
    sides = [("bytes_old", old), ("bytes_new", new)] if old is not None else [("bytes", new)]
    dtypes = sorted({t for _, info in sides for t in info["bytes_by_dtype"]})
    layers = sorted({k for _, info in sides for k in info["bytes_by_layer"]}, key=_layer_order)
    heads = tuple(label for label, _ in sides)
    tables = [
        Table("Bytes by dtype", ("dtype",) + heads,
              tuple((t,) + tuple(info["bytes_by_dtype"].get(t, {}).get("bytes", 0) for _, info in sides)
                    for t in dtypes)),
        Table("Bytes by layer", ("layer",) + heads,
              tuple((g,) + tuple(info["bytes_by_layer"].get(g, 0) for _, info in sides) for g in layers)),
        Table("Largest tensors", ("tensor", "shape", "dtype", "bytes"),
              tuple((e["path"], str(e["shape"]), e["dtype"], e["bytes"]) for e in new["largest"])),
        Table("Estimates", ("estimate", "MB", "formula"),
              (("inference", est["inference_bytes"] / 1e6, est["inference_formula"]),
               ("Adam training", est["training_bytes"] / 1e6, est["training_formula"]))),
        Table("What if", ("dtype", "bytes/param", "weights MB", "inference MB", "inference fits (GB)",
                          "training MB", "training fits (GB)"),
              tuple((r["dtype"], r["bytes_per_param"], r["weights_bytes"] / 1e6, r["inference_bytes"] / 1e6,
                     _gb_list(r["inference_fits_gb"]),
                     r["training_bytes"] / 1e6 if r["training_bytes"] is not None else "n/a",
                     _gb_list(r["training_fits_gb"])) for r in what_if)),
    ]
    notes = ["exact: bytes stored in the file" + ("s" if not inspect else "")
             + "; estimates (inference, training, what-if) are labelled with their formulas"
             + (" and describe the new side" if not inspect else "")]
    if new["optimizer_tensors"]:
        slots = ", ".join(f"{k} {human_bytes(v)}" for k, v in sorted(new["optimizer_bytes_by_slot"].items()))
        # against the model it trains; a file of optimizer state alone (a Trainer's optimizer.pt) has none
        ratio = (f" = {number(new['optimizer_bytes'] / (4 * new['float_params']))}× the fp32 size of the model's "
                 f"float parameters ({slots})" if new["float_params"]
                 else f" ({slots}); no model parameters beside it to compare it with")
        notes.append(f"optimizer state found: {count(new['optimizer_tensors'])} tensors, "
                     f"{human_bytes(new['optimizer_bytes'])}{ratio}; not part of the model bytes or the estimates")
    if new["integer_weight_tensors"]:
        notes.append(f"{count(new['integer_weight_tensors'])} integer weight tensors (≥ 2-D) are counted as "
                     "quantized parameters in the estimates and the what-if table")
    notes.append(f"what-if: parameters at the given bytes/param, other tensors (buffers, counters, scales) as stored; "
                 f"int4 = 4 bits + one fp16 scale per {INT4_GROUP} weights; training n/a for int8/int4 "
                 "(not trained with Adam directly)")
    notes.append(f"fits: estimate ≤ N·2^30 bytes for N in {', '.join(str(g) for g in DEVICES_GB)} GB; "
                 "leave room for the framework and other processes")
    return AnalysisResult(NAME, headline, data, tuple(tables), tuple(notes))
