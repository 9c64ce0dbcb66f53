"""--architecture-comparison: renames, parameter counts, blocks, hyper-parameters, family, loadability.

Added / removed / renamed / reshaped / retyped tensors, parameter counts per side,
dtype and layer group, blocks, hyper-parameters read off shapes, the family with
its evidence, and whether new loads into old's state_dict.

Everything here is read off names, shapes and dtypes, except renames: a tensor only
in old and one only in new are a rename when shape, dtype and a hash of their raw
bytes agree. Only such candidates (same shape and dtype on the other side) are
hashed, by this analysis' hook, in the engine's pass. Optimizer state is counted
apart and is not part of the architecture. Rules: docs/analyses/architecture_comparison.md.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from typing import Any

import numpy as np
import torch

from torchdiff.analyses.layer_impact import natural_key
from torchdiff.figures import Comparison, tied_side
from torchdiff.names import (
    BUFFER, COUNTER, QUANT_COMPANION, TRAINING_STATE, block_index, block_stack, is_attention, is_float_storage,
    is_optimizer_state, is_position_embedding, is_quantized_storage, is_recurrent, kind, layer_of, parts,
)
from torchdiff.results import ADDED, REMOVED, RESHAPED, AnalysisResult, Table
from torchdiff.units import count, counted

NAME = "architecture_comparison"
FLAG = "architecture_comparison"
OPTIONS: dict = {}

PRESENT_SHARE = 0.05     # a family's evidence counts when its tensors hold ≥ 5% of the parameters
CONV_MAX_KERNEL = 32     # a 3-5-D weight is a convolution kernel when every spatial dim is ≤ 32
TABLE_ROWS = 20          # rows of the renamed table in text (JSON lists them all)
#: Keys (the last dotted component) whose integer value is the attention head count, and
#: the key/value head count: in the file's metadata (GGUF key/values), a config.json beside it.
HEAD_KEYS = ("num_attention_heads", "n_head", "n_heads", "num_heads", "nhead", "num_attention_head",
             "encoder_attention_heads", "head_count")
KV_HEAD_KEYS = ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "head_count_kv", "multi_query_group_num")
_CANDIDATES = "candidates"  # per-run state key, set by prepare()
_VALUES = "values"  # per-run state key, set by prepare(): what each side's files say beside the tensors


# ---- renames: candidates from the headers, hashes in the engine's pass ------------------


def prepare(old, new, options, state: dict):
    """Record the names worth hashing: only-old and only-new tensors whose (shape, dtype)
    also occurs among the other side's unmatched names; and each side's values beside
    its tensors (a config.json: head counts). Checkpoints pass unchanged."""
    state[_VALUES] = {"old": _file_values(old), "new": _file_values(new)}
    only_old = {n: h for n, h in old.tensors.items() if n not in new.tensors}
    only_new = {n: h for n, h in new.tensors.items() if n not in old.tensors}
    sig_old = {(tuple(h.shape), h.storage_dtype) for h in only_old.values()}
    sig_new = {(tuple(h.shape), h.storage_dtype) for h in only_new.values()}
    both = sig_old & sig_new
    state[_CANDIDATES] = frozenset(
        [n for n, h in only_old.items() if (tuple(h.shape), h.storage_dtype) in both]
        + [n for n, h in only_new.items() if (tuple(h.shape), h.storage_dtype) in both]
    )
    return old, new


def _file_values(ckpt) -> list[tuple[str, dict]]:
    """(source, values) found beside the tensors: the config.json next to the file
    (``info["config"]``, formats/ties.py), or a transformers model's own ``config``
    (formats.from_object). A GGUF file's key/values are its metadata."""
    config = ckpt.info.get("config") if isinstance(ckpt.info, dict) else None
    label = "model.config" if ckpt.format == "module" else "config.json"
    return [(label, config)] if isinstance(config, dict) else []


class _HashHook:
    name = NAME

    def __init__(self, candidates: frozenset) -> None:
        self.candidates = candidates

    def wants(self, pair) -> bool:
        return pair.name in self.candidates and pair.kind in ("added", "removed")

    def __call__(self, pair, old, new) -> dict[str, str]:
        handle = pair.old if pair.old is not None else pair.new
        return {"hash": content_hash(handle.materialize())}


def content_hash(t: torch.Tensor) -> str:
    """blake2b-128 of the tensor's raw bytes (C order), on the CPU."""
    raw = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.blake2b(memoryview(raw), digest_size=16).hexdigest()


def hooks(options, state: dict) -> list:
    candidates = state.get(_CANDIDATES) or frozenset()
    return [_HashHook(candidates)] if candidates else []


def _prefix_rule(old: str, new: str) -> tuple[str, str]:
    """(old prefix, new prefix) around the longest common dotted suffix."""
    a, b = old.split("."), new.split(".")
    k = 0
    while k < min(len(a), len(b)) and a[-1 - k] == b[-1 - k]:
        k += 1
    return ".".join(a[: len(a) - k]), ".".join(b[: len(b) - k])


def _apply_rule(name: str, rule: tuple[str, str]) -> str | None:
    src, dst = rule
    if src:
        if not name.startswith(src + "."):
            return None
        rest = name[len(src) + 1:]
    else:
        rest = name
    return f"{dst}.{rest}" if dst else rest


def find_renames(comp: Comparison) -> tuple[list[tuple[str, str]], list[str], Counter]:
    """(renames as (old, new), ambiguous names left unmatched, prefix rules with counts)."""
    groups: dict[tuple, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
    for d in comp.diffs:
        h = (d.extras.get(NAME) or {}).get("hash") if d.status in (ADDED, REMOVED) else None
        if h is None:
            continue
        side = d.old if d.status == REMOVED else d.new
        key = (tuple(side.shape), side.dtype, h)
        groups[key][0 if d.status == REMOVED else 1].append(d.name)
    renames: list[tuple[str, str]] = []
    ambiguous: list[tuple[list[str], list[str]]] = []
    for olds, news in groups.values():
        if not olds or not news:
            continue
        if len(olds) == 1 and len(news) == 1:
            renames.append((olds[0], news[0]))
        else:
            ambiguous.append((olds, news))
    rules = Counter(_prefix_rule(a, b) for a, b in renames)
    left: list[str] = []
    for olds, news in ambiguous:  # identical tensors (e.g. zero biases): match by the learnt prefix rules
        free = set(news)
        for o in olds:
            target = next((t for t, _ in ((_apply_rule(o, r), c) for r, c in rules.most_common())
                           if t is not None and t in free), None)
            if target is None:
                left.append(o)
                continue
            free.discard(target)
            renames.append((o, target))
        left += sorted(free)
    renames.sort()
    return renames, left, rules


# ---- one side: counts, blocks, family, hyper-parameters -----------------------------------


def _model_tensors(comp: Comparison, side: str) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
    """One side's model tensors as (parameters, buffers): the state_dict a module would
    load, less optimizer and training-loop state (an RNG state, a 0-d loss) and
    quantization parameters (a QuantStub's q.scale is no attention); a tied tensor once.
    Buffers are the entries no optimizer moves (names.role ``buffer`` / ``counter``:
    BatchNorm running statistics, ``num_batches_tracked``, rotary ``inv_freq``), so that
    ``params`` is what ``sum(p.numel() for p in model.parameters())`` counts."""
    copies = tied_side(comp.figures, side)
    params, buffers = [], []
    for d, copy in zip(comp.diffs, copies.tolist()):
        s = getattr(d, side)
        if (s is not None and not is_optimizer_state(d.name) and d.role not in (TRAINING_STATE, QUANT_COMPANION)
                and not copy):
            (buffers if d.role in (BUFFER, COUNTER) else params).append((d.name, s))
    return params, buffers


def describe(tensors: list[tuple[str, Any]], sources: list[tuple[str, dict]],
             buffers: list[tuple[str, Any]] = ()) -> dict[str, Any]:
    """Family, blocks, hyper-parameters and counts of one side's parameters (``tensors``);
    its ``buffers`` are counted apart (``buffers``, ``buffer_tensors``). ``sources``:
    (label, values) beside the tensors, first match wins (the file's ``metadata``, GGUF
    key/values included, then a config.json): head counts."""
    params = sum(s.numel for _, s in tensors)
    by_dtype: Counter = Counter()
    by_group: Counter = Counter()
    stacks: dict[str, set] = defaultdict(set)
    for name, s in tensors:
        by_dtype[s.dtype] += s.numel
        layer = layer_of(name)
        by_group[layer] += s.numel
        idx = block_index(layer)
        if idx is not None:
            stacks[block_stack(layer)].add(idx)
    info: dict[str, Any] = {
        "tensors": len(tensors), "params": params,
        "buffers": sum(s.numel for _, s in buffers), "buffer_tensors": len(buffers),
        "params_by_dtype": dict(sorted(by_dtype.items())),
        "params_by_group": dict(sorted(by_group.items(), key=lambda kv: natural_key(kv[0]))),
        "blocks": sum(len(v) for v in stacks.values()),
        "blocks_by_stack": {k: len(v) for k, v in sorted(stacks.items())},
    }
    info.update(_family(tensors, params))
    info["hyperparameters"], info["hyperparameter_notes"] = _hyperparameters(tensors, sources, info["family"])
    return info


def _family(tensors, params: int) -> dict[str, Any]:
    evidence: dict[str, dict[str, Any]] = {}

    def add(cls: str, name: str, numel: int) -> None:
        e = evidence.setdefault(cls, {"tensors": 0, "params": 0, "examples": []})
        e["tensors"] += 1
        e["params"] += numel
        if len(e["examples"]) < 3:
            e["examples"].append(name)

    matrices = 0
    for name, s in tensors:
        if not (is_float_storage(s.dtype) or is_quantized_storage(s.dtype)):  # torch.ao qint8 weights count
            continue
        nd = len(s.shape)
        if is_recurrent(name):
            add("rnn", name, s.numel)
        elif is_attention(name):
            add("transformer", name, s.numel)
        elif 3 <= nd <= 5 and parts(name)[-1] == "weight" and all(k <= CONV_MAX_KERNEL for k in s.shape[2:]):
            add("cnn", name, s.numel)
        elif nd == 2 and kind(name, nd) == "weight":
            matrices += 1
    for e in evidence.values():
        e["share"] = e["params"] / params if params else 0.0
    present = sorted(c for c, e in evidence.items() if e["share"] >= PRESENT_SHARE)
    if len(present) > 1:
        family = "mixed"
    elif present:
        family = present[0]
    elif evidence:
        family = max(evidence, key=lambda c: evidence[c]["params"])
    elif matrices:
        family = "mlp"
    else:
        family = "unknown"
    labels = {"transformer": "attention", "cnn": "convolution", "rnn": "recurrent"}
    reasons = [f"{labels[c]} tensors hold {e['share']:.1%} of the parameters ({count(e['tensors'])} tensors, "
               f"e.g. {e['examples'][0]})" for c, e in sorted(evidence.items())]
    absent = [labels[c] for c in labels if c not in evidence]
    if absent:
        reasons.append(f"no {' / '.join(absent)} tensors")
    if family == "mlp":
        reasons.append(f"{count(matrices)} weight matrices")
    if family == "mixed":
        reasons.append(f"more than one family holds ≥ {PRESENT_SHARE:.0%} of the parameters: {', '.join(present)}")
    if family == "unknown":
        reasons.append("no weight matrix: the names and shapes do not show a family")
    return {"family": family, "family_evidence": evidence, "family_reason": "; ".join(reasons)}


def _lookup(sources: list[tuple[str, dict]], keys: tuple[str, ...]) -> tuple[int, str] | None:
    """(value, evidence) of the first key (by its last dotted component) in ``keys`` with
    a positive integer value, in the sources in order; else None."""
    for label, values in sources:
        for key, value in values.items():
            if (str(key).rsplit(".", 1)[-1] in keys and isinstance(value, int) and not isinstance(value, bool)
                    and value > 0):
                return value, f"{label} {key} = {value}"
    return None


def _hyperparameters(tensors, sources: list[tuple[str, dict]], family: str) -> tuple[dict[str, Any], dict[str, str]]:
    hp: dict[str, Any] = {}
    why: dict[str, str] = {}
    embeds = [(n, s) for n, s in tensors if kind(n, len(s.shape)) == "embedding" and not is_position_embedding(n)]
    if embeds:
        n, s = max(embeds, key=lambda e: e[1].shape[0])
        hp["vocab"], hp["hidden"] = int(s.shape[0]), int(s.shape[1])
        why["vocab"] = why["hidden"] = f"token embedding {n} {list(s.shape)}"
    else:
        norms = Counter(s.shape[0] for n, s in tensors if kind(n, len(s.shape)) == "norm")
        if norms:
            hidden, n_hidden = norms.most_common(1)[0]
            hp["hidden"] = int(hidden)
            why["hidden"] = (f"most common length of {count(sum(norms.values()))} norm parameters "
                             f"({count(n_hidden)} of length {hidden})")
        why["vocab"] = "no token embedding in the file"
    hidden = hp.get("hidden")
    if hidden is not None:
        other = Counter()
        for n, s in tensors:
            if (len(s.shape) == 2 and kind(n, 2) == "weight" and not is_attention(n)
                    and block_index(layer_of(n)) is not None and hidden in s.shape):
                o = s.shape[1] if s.shape[0] == hidden else s.shape[0]
                if o != hidden:
                    other[o] += 1
        if other:
            size, n_size = other.most_common(1)[0]
            hp["intermediate"] = int(size)
            why["intermediate"] = (f"{count(n_size)} non-attention block matrices are [{size}, {hidden}] "
                                   f"or [{hidden}, {size}]")
        else:
            why["intermediate"] = "no [hidden, other] matrix in the blocks"
    for name, keys in (("heads", HEAD_KEYS), ("kv_heads", KV_HEAD_KEYS)):
        found = _lookup(sources, keys)
        if found is not None:
            hp[name], why[name] = found
    if "heads" not in hp:
        rel = [(n, s) for n, s in tensors if "relative_attention_bias" in n and len(s.shape) == 2]
        if rel:
            n, s = rel[0]
            hp["heads"] = int(s.shape[1])
            why["heads"] = f"relative position bias {n} {list(s.shape)} is [buckets, heads]"
        elif family in ("transformer", "mixed"):
            why["heads"] = ("not inferable: q/k/v projections are [heads·head_dim, hidden] whatever the split, "
                            "and the file holds no head-count value")
    rnn = [(n, s) for n, s in tensors if parts(n)[-1].startswith("weight_hh_l")]
    if rnn:
        n, s = rnn[0]
        gates = s.shape[0] // s.shape[1] if s.shape[1] else 0
        hp["rnn_hidden"] = int(s.shape[1])
        hp["rnn_layers"] = len({parts(x)[-1].split("_l")[-1] for x, _ in rnn})
        cell = {4: "lstm", 3: "gru", 1: "rnn"}.get(gates)
        if cell:
            hp["rnn_cell"] = cell
        why["rnn_hidden"] = f"{n} {list(s.shape)} is [{gates}·hidden, hidden]"
    return hp, why


def _tie_changes(comp: Comparison) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(tied, untied): tensors held on both sides that are a tied copy on one side only.
    ``untied``: tied on old, a tensor of its own on new (``tie_word_embeddings`` true ->
    false, a head saved apart): new has that many more parameters though no name was
    added. ``tied``: the reverse. Each as ``{"path", "tied_to"}``."""
    fig = comp.figures
    old, new = tied_side(fig, "old"), tied_side(fig, "new")
    tied, untied = [], []
    for i in np.flatnonzero((old != new) & fig.old.present & fig.new.present):
        side = "new" if new[i] else "old"
        entry = {"path": fig.names[i], "tied_to": fig.extras[i]["tied_to"][side]}
        (tied if side == "new" else untied).append(entry)
    return tied, untied


def _buffer_notes(old_info: dict[str, Any] | None, new_info: dict[str, Any]) -> list[str]:
    """The note that says buffers are not in ``params``, when a side holds any."""
    sides = [i for i in (old_info, new_info) if i is not None]
    if not any(i["buffer_tensors"] for i in sides):
        return []
    values = _arrow(old_info["buffers"], new_info["buffers"]) if old_info else count(new_info["buffers"])
    tensors = (_arrow(old_info["buffer_tensors"], new_info["buffer_tensors"]) if old_info
               else count(new_info["buffer_tensors"]))
    return [f"buffers and counters (BatchNorm running statistics, num_batches_tracked, inv_freq...): {values} values "
            f"in {tensors} tensors, not in params (as model.parameters())"
            + ("; in the state_dict, so in loadability" if old_info else "")]


def _loadable(old_names: set, new_names: set, reshaped: set) -> tuple[str, dict[str, list[str]]]:
    """How new's tensors load into a module whose state_dict is old's (load_state_dict rules)."""
    missing = sorted(old_names - new_names)
    unexpected = sorted(new_names - old_names)
    common = old_names & new_names
    detail = {"missing": missing, "unexpected": unexpected, "shape_mismatch": sorted(reshaped & common)}
    if detail["shape_mismatch"] or not common:
        return "incompatible", detail
    if missing or unexpected:
        return "partial", detail
    return "strict", detail


def _arrow(a: Any, b: Any) -> str:
    """``old->new`` for a headline; counts with thousands separators (``19,210->19,210``)."""
    def text(x: Any) -> str:
        return count(x) if isinstance(x, int) and not isinstance(x, bool) else str(x)
    return f"{text(a)}->{text(b)}"


def analyze(comparison: Comparison, options, state: dict) -> AnalysisResult:
    inspect = comparison.mode == "inspect"
    new_params, new_buffers = _model_tensors(comparison, "new")
    values = state.get(_VALUES) or {}
    new_info = describe(new_params, [("metadata", dict(comparison.new_metadata))] + values.get("new", []),
                        new_buffers)
    optimizer_new = sum(1 for d in comparison.diffs if d.new is not None and is_optimizer_state(d.name))
    notes: list[str] = [f"family evidence: {new_info['family_reason']}"]
    if inspect:
        headline = {"family": new_info["family"], "params": new_info["params"], "blocks": new_info["blocks"]}
        data = {"new": new_info}
        tables = [
            Table("Hyperparameters", ("name", "value", "evidence"),
                  tuple((k, v, new_info["hyperparameter_notes"].get(k, ""))
                        for k, v in new_info["hyperparameters"].items())),
            Table("Parameters by dtype", ("dtype", "params"), tuple(new_info["params_by_dtype"].items())),
            Table("Parameter groups", ("group", "params"), tuple(new_info["params_by_group"].items())),
        ]
        notes += [f"{k}: {v}" for k, v in new_info["hyperparameter_notes"].items()
                  if k not in new_info["hyperparameters"]]
        notes.append("loadability needs two checkpoints")
        notes += _buffer_notes(None, new_info)
        if optimizer_new:
            notes.append(f"{count(optimizer_new)} optimizer-state tensors are not counted in the architecture")
        return AnalysisResult(NAME, headline, data, tuple(tables), tuple(notes), text_keys={"family": ""})

    old_params, old_buffers = _model_tensors(comparison, "old")
    old_info = describe(old_params, [("metadata", dict(comparison.old_metadata))] + values.get("old", []),
                        old_buffers)
    renames, ambiguous, rules = find_renames(comparison)
    renamed_old = {a for a, _ in renames}
    renamed_new = {b for _, b in renames}
    model = [d for d in comparison.diffs if not is_optimizer_state(d.name) and d.role != TRAINING_STATE]
    added = [d.name for d in model if d.status == ADDED and d.name not in renamed_new]
    removed = [d.name for d in model if d.status == REMOVED and d.name not in renamed_old]
    reshaped = [d for d in model if d.status == RESHAPED]
    retyped = [d for d in model if d.old is not None and d.new is not None and d.old.dtype != d.new.dtype]
    tied, untied = _tie_changes(comparison)
    # Loadability is about the names the files store: where pairing dropped a prefix or a
    # wrapper segment (a `pairing` section), those names differ, and each such pair is a
    # rename (old's stored name -> new's).
    stored_old, stored_new = comparison.stored_names
    old_names = {stored_old.get(d.name, d.name) for d in model if d.old is not None}
    new_names = {stored_new.get(d.name, d.name) for d in model if d.new is not None}
    reshaped_names = {stored_old.get(d.name, d.name) for d in reshaped}
    paired = [(stored_old.get(d.name, d.name), stored_new.get(d.name, d.name)) for d in model
              if d.old is not None and d.new is not None]
    by_pairing = sorted((a, b) for a, b in paired if a != b)
    pairing_rules = Counter(_prefix_rule(a, b) for a, b in by_pairing)
    by_content = renames
    renames = sorted(renames + by_pairing)
    rules = rules + pairing_rules
    loadable, load_detail = _loadable(old_names, new_names, reshaped_names)
    headline: dict[str, Any] = {
        "family": _arrow(old_info["family"], new_info["family"]),
        "params": _arrow(old_info["params"], new_info["params"]),
        "blocks": _arrow(old_info["blocks"], new_info["blocks"]),
        "loadable": loadable,
    }
    data: dict[str, Any] = {
        "old": old_info, "new": new_info,
        "params_old": old_info["params"], "params_new": new_info["params"],
        "params_delta": new_info["params"] - old_info["params"],
        "added": added, "removed": removed,
        "renames": [{"old": a, "new": b} for a, b in renames],
        "reshaped": [{"path": d.name, "old": list(d.old.shape), "new": list(d.new.shape)} for d in reshaped],
        "retyped": [{"path": d.name, "old": d.old.dtype, "new": d.new.dtype} for d in retyped],
        "tied": tied, "untied": untied,
        "loadable_detail": load_detail,
    }
    if renames:
        mapping = dict((b, a) for a, b in renames)
        mapped_new = {mapping.get(n, n) for n in new_names}
        after, after_detail = _loadable(old_names, mapped_new, reshaped_names)
        headline["renamed"] = len(renames)
        headline["loadable_after_renames"] = after
        data["loadable_after_renames_detail"] = after_detail
        data["rename_rules"] = [{"old_prefix": o, "new_prefix": n, "count": c} for (o, n), c in rules.most_common()]
        for (o, n), c in rules.most_common(3):
            why = ("the files' own names; pairing dropped the difference, see pairing"
                   if (o, n) in pairing_rules else "same shape, dtype and content hash")
            notes.append(f"rename rule: {o + '.' if o else '(no prefix)'} -> {n + '.' if n else '(no prefix)'} "
                         f"for {count(c)} tensors ({why})")
    if ambiguous:
        notes.append(f"{count(len(ambiguous))} identical-content tensors could not be matched to one name: "
                     + ", ".join(ambiguous[:5]) + (" ..." if len(ambiguous) > 5 else ""))
        data["rename_ambiguous"] = ambiguous
    if retyped:
        notes.append(f"{counted(len(retyped), 'tensor')} changed dtype; load_state_dict casts "
                     f"{'it' if len(retyped) == 1 else 'them'} to the module's dtype")
    notes += [f"{k}: {v}" for k, v in new_info["hyperparameter_notes"].items()
              if k not in new_info["hyperparameters"] and k not in old_info["hyperparameters"]]
    notes += _buffer_notes(old_info, new_info)
    if load_detail["missing"] or load_detail["unexpected"] or load_detail["shape_mismatch"]:
        notes.append(f"load_state_dict(new) into old's model: {count(len(load_detail['missing']))} missing, "
                     f"{count(len(load_detail['unexpected']))} unexpected, "
                     f"{count(len(load_detail['shape_mismatch']))} "
                     "size mismatches (lists in JSON: loadable_detail)")
    n_opt_old = sum(1 for d in comparison.diffs if d.old is not None and is_optimizer_state(d.name))
    if n_opt_old or optimizer_new:
        notes.append(f"optimizer-state tensors ({_arrow(n_opt_old, optimizer_new)}) are not counted in the "
                     "architecture")

    changes = (
        ("added", len(added), ", ".join(added[:3])),
        ("removed", len(removed), ", ".join(removed[:3])),
        ("renamed", len(renames), ", ".join(f"{a} -> {b}" for a, b in renames[:2])),
        ("reshaped", len(reshaped),
         ", ".join(f"{d.name} {list(d.old.shape)}->{list(d.new.shape)}" for d in reshaped[:2])),
        ("retyped", len(retyped), ", ".join(f"{d.name} {d.old.dtype}->{d.new.dtype}" for d in retyped[:2])),
        ("untied", len(untied), ", ".join(f"{e['path']} (was tied to {e['tied_to']})" for e in untied[:2])),
        ("tied", len(tied), ", ".join(f"{e['path']} (now tied to {e['tied_to']})" for e in tied[:2])),
    )
    hp_keys = list(dict.fromkeys(list(old_info["hyperparameters"]) + list(new_info["hyperparameters"])))
    hp_rows = tuple((k, old_info["hyperparameters"].get(k, "-"), new_info["hyperparameters"].get(k, "-"),
                     new_info["hyperparameter_notes"].get(k) or old_info["hyperparameter_notes"].get(k, ""))
                    for k in hp_keys)
    dtypes = sorted(set(old_info["params_by_dtype"]) | set(new_info["params_by_dtype"]))
    back = {b: a for a, b in by_content}  # tensors renamed (same content) are grouped under their old names
    new_groups: Counter = Counter()
    for name, s in new_params:
        new_groups[layer_of(back.get(name, name))] += s.numel
    old_groups = old_info["params_by_group"]
    groups = sorted(set(old_groups) | set(new_groups), key=natural_key)
    tables = [
        Table("Tensor changes", ("change", "count", "examples"), tuple(r for r in changes if r[1])),
        Table("Hyperparameters", ("name", "old", "new", "evidence"), hp_rows),
        Table("Parameters by dtype", ("dtype", "old", "new"),
              tuple((t, old_info["params_by_dtype"].get(t, 0), new_info["params_by_dtype"].get(t, 0)) for t in dtypes)),
        Table("Changed parameter groups", ("group", "old", "new", "delta"),
              tuple((g, old_groups.get(g, 0), new_groups.get(g, 0), new_groups.get(g, 0) - old_groups.get(g, 0))
                    for g in groups if old_groups.get(g, 0) != new_groups.get(g, 0))),
        Table("Renames", ("old", "new"), tuple(renames[:TABLE_ROWS])),
    ]
    if len(renames) > TABLE_ROWS:
        notes.append(f"renames table shows {TABLE_ROWS} of {count(len(renames))} (all in JSON: renames)")
    if old_info["family"] != new_info["family"]:
        notes.insert(0, f"old family evidence: {old_info['family_reason']}")
    return AnalysisResult(NAME, headline, data, tuple(tables), tuple(notes), text_keys={"family": ""})
