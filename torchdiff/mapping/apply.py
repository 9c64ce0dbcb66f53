"""``apply_mapping(old, new, mapping) -> (old, new, MappingReport)``: two Checkpoints whose
tensor names pair through a rule set, before ``pairing.pair``.

One side (the *source*: the family the rules match) has its tensors renamed and, where a
rule says so, transformed; the other side (the *target*) keeps its layout. Pair names
(``TensorDiff.name``, JSON ``path``) are always the old side's names, so that the old
file's names stay the reference:

- old is the source: a mapped tensor keeps its own name; the new side's tensor it pairs
  with is renamed to it (JSON ``path_new`` keeps the new name);
- new is the source: its mapped tensor takes the old name it pairs with.

A piece of a split tensor is named ``fused_name[a:b]`` (rows a..b; ``[:, a:b]`` along
dim 1; ``[q]``/``[k]``/``[v]`` for Megatron's grouped layout); tensors joined by a
concat are named ``a+b+c``. Nothing is read here: new handles materialise lazily, one
rule application at a time, when the engine asks for them. A rule whose target names
are not all on the other side is not applied: its tensors keep their names and show as
added or removed, and the report counts them unmapped.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from torchdiff.formats.base import Checkpoint, TensorHandle
from torchdiff.mapping import transforms as T
from torchdiff.mapping.rules import MappingError, Rule, RuleSet, builtins
from torchdiff.units import counted

CONFIG_MAX_BYTES = 1 << 20


@dataclass
class MappingReport:
    """What a mapping did: its name and evidence, and coverage."""

    name: str
    description: str
    source_side: str  # "old" or "new"
    families: tuple[str, str]  # (old family, new family)
    evidence: list[str]
    mapped: int = 0
    transformed: int = 0
    unmapped_old: list[str] = field(default_factory=list)
    unmapped_new: list[str] = field(default_factory=list)
    transforms: dict[str, int] = field(default_factory=dict)
    tied: list[dict[str, str]] = field(default_factory=list)
    pairs: list[dict[str, Any]] = field(default_factory=list)  # {path, path_new, transforms[, tied]}
    rule_file: str = ""
    header_keys: dict[str, int] = field(default_factory=dict)  # side -> format header key/values not compared

    def renamed(self) -> dict[str, str]:
        """Pair name (old side's) -> the new side's name, where they differ."""
        return {p["path"]: p["path_new"] for p in self.pairs if p["path_new"] != p["path"]}

    def to_result(self):
        """The report as an AnalysisResult named ``mapping`` (a JSON item, a text section)."""
        from torchdiff.results import AnalysisResult, Table

        headline = {
            "name": self.name,
            "families": f"{self.families[0]}->{self.families[1]}",
            "mapped": self.mapped,
            "unmapped_old": len(self.unmapped_old),
            "unmapped_new": len(self.unmapped_new),
            "transformed": self.transformed,
        }
        if self.tied:
            headline["tied"] = len(self.tied)
        data = {
            "description": self.description,
            "rule_file": self.rule_file,
            "source_side": self.source_side,
            "evidence": list(self.evidence),
            "transforms": dict(self.transforms),
            "unmapped_old_names": list(self.unmapped_old),
            "unmapped_new_names": list(self.unmapped_new),
            "tied_names": list(self.tied),
            "pairs": list(self.pairs),
            "header_keys_not_compared": dict(self.header_keys),
        }
        tables = []
        if self.transforms:
            tables.append(Table("Transforms", ("transform", "tensors"),
                                tuple(sorted(self.transforms.items()))))
        notes = [f"evidence: {e}" for e in self.evidence]
        for side, n in self.header_keys.items():
            notes.append(f"{n} GGUF key/value{'s' if n != 1 else ''} of the {side} side not compared: the other "
                         "side is of another format and holds none (two GGUF files compare them)")
        for t in self.tied:
            notes.append(f"tied: {t['head']} is absent on the {t['missing_on']} side; compared with its "
                         f"embedding {t['embedding']}")
        for side, names in (("old", self.unmapped_old), ("new", self.unmapped_new)):
            if names:
                shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
                notes.append(f"unmapped on the {side} side (shown as {'removed' if side == 'old' else 'added'}): {shown}")
        return AnalysisResult("mapping", headline, data, tuple(tables), tuple(notes))


# ---- metadata ------------------------------------------------------------------------------


def checkpoint_meta(ckpt: Checkpoint) -> dict[str, Any]:
    """What rules may read about one checkpoint: GGUF key/values as they are, and the
    ``config.json`` beside the file as ``config.<key>`` (one level of nesting:
    ``config.text_config.<key>``)."""
    meta: dict[str, Any] = {}
    gguf_kv = ckpt.info.get("gguf") if isinstance(ckpt.info, dict) else None
    if isinstance(gguf_kv, dict):
        meta.update(gguf_kv)
    config = _config(ckpt.name)
    for key, value in config.items():
        if isinstance(value, dict):
            for k, v in value.items():
                if not isinstance(v, (dict, list)):
                    meta[f"config.{key}.{k}"] = v
        elif not isinstance(value, list):
            meta[f"config.{key}"] = value
    return meta


def _config(name: str) -> dict[str, Any]:
    if not isinstance(name, str) or not name or not os.path.exists(name):
        return {}
    folder = name if os.path.isdir(name) else os.path.dirname(os.path.abspath(name))
    path = os.path.join(folder, "config.json")
    try:
        if not os.path.isfile(path) or os.path.getsize(path) > CONFIG_MAX_BYTES:
            return {}
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return {}  # a config.json we cannot read is no evidence; the rules then need heads from elsewhere
    return data if isinstance(data, dict) else {}


_REF = re.compile(r"\{([^{}]+)\}")


def _lookup(meta: dict[str, Any], ref: Any, rule: Rule, kind: str, key: str, path: str) -> int:
    """A head count: a number as written, else the first metadata key present."""
    refs = ref if isinstance(ref, list) else [ref]
    tried = []
    for r in refs:
        if isinstance(r, int):
            return r
        expanded = _REF.sub(lambda m: str(meta.get(m.group(1), "{" + m.group(1) + "}")), r)
        tried.append(expanded)
        value = meta.get(expanded)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    raise MappingError(f"{path}: {rule.label()}: {kind} {key} not found in the metadata (looked for "
                       f"{', '.join(tried)}; pass --map-heads HEADS,KV_HEADS)")


def _when(rule: Rule, meta: dict[str, Any]) -> bool:
    return all(meta.get(key) in allowed for key, allowed in rule.when)


# ---- applying one rule set ------------------------------------------------------------------


@dataclass
class _Output:
    target: str
    sources: tuple[str, ...]
    rule: Rule | None
    params: tuple[dict, ...]
    index: int
    count: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    label: str  # piece label for a split ("0:32", "q"), "" for a whole tensor
    target_shapes: tuple = ()  # shapes of the other side's tensors this rule application pairs with


@dataclass
class _Plan:
    rules: RuleSet
    source_is_old: bool
    outputs: list[_Output]
    consumed: set[str]
    source: Checkpoint
    target: Checkpoint
    tied: list[tuple[str, str, str]]  # (head, embedding, side missing the head: "source"/"target")
    evidence: list[str]


def _plan(rs: RuleSet, source: Checkpoint, target: Checkpoint, source_is_old: bool,
          heads: tuple[int, int] | None) -> _Plan:
    meta = checkpoint_meta(source)
    for k, v in checkpoint_meta(target).items():
        meta.setdefault(k, v)
    if heads is not None:
        meta["map.heads"], meta["map.kv_heads"] = heads
    src_names = list(source.tensors)
    tgt = target.tensors
    generated: dict[str, str] = {}
    if rs.names == "gguf":
        from torchdiff.mapping.gguf_names import gguf_names

        try:
            generated = gguf_names(src_names, list(tgt), meta)
        except T.Misfit as e:
            raise MappingError(f"{rs.where()}: {e}") from None
    # rename function of the rules, for the cycle check (names only, whether applied or not)
    first_name: dict[str, str] = {}
    matched: list[tuple[str, Rule, re.Match]] = []
    for name in src_names:
        for rule in rs.rules:
            m = rule.pattern.fullmatch(name)
            if m is not None and _when(rule, meta):
                matched.append((name, rule, m))
                if rule.names:
                    first_name[name] = m.expand(rule.names[0]) if len(rule.names) == 1 else ""
                break
    _check_cycles(first_name, rs.where())
    outputs: list[_Output] = []
    consumed: set[str] = set()
    rule_of = {name: (rule, m) for name, rule, m in matched}
    for name in src_names:
        if name in consumed:
            continue
        if name in rule_of:
            rule, m = rule_of[name]
            targets = [m.expand(t) for t in rule.names] if rule.names else [generated.get(name, name)]
            sources = [name] + [m.expand(w) for w in rule.with_]
            if any(s not in source.tensors or (s in consumed) for s in sources):
                continue
            if not all(t in tgt for t in targets):
                continue
            outs = _bind(rule, rs, sources, targets, source, target, meta)
            outputs += outs
            consumed.update(sources)
        elif name in generated and generated[name] in tgt and generated[name] != name:
            h = source.tensors[name]
            outputs.append(_Output(generated[name], (name,), None, (), 0, 1, h.shape, h.dtype, ""))
            consumed.add(name)
    seen: dict[str, str] = {}
    for o in outputs:
        if o.target in seen:
            raise MappingError(f"{rs.where()}: {seen[o.target]} and {'+'.join(o.sources)} both map to {o.target} "
                               "(one tensor of the other side can pair with one tensor only)")
        seen[o.target] = "+".join(o.sources)
    tied = []
    if rs.tied is not None:
        head, emb = rs.tied
        produced = {o.target for o in outputs} | {n for n in src_names if n not in consumed}
        if head in tgt and emb in tgt and head not in produced and emb in produced:
            tied.append((head, emb, "source"))
        elif head in produced and emb in produced and head not in tgt and emb in tgt:
            tied.append((head, emb, "target"))
    return _Plan(rs, source_is_old, outputs, consumed, source, target, tied, [])


def _check_cycles(first_name: dict[str, str], path: str) -> None:
    for start in first_name:
        seen = [start]
        name = first_name[start]
        while name and name != seen[-1] and name in first_name:
            if name == start:
                raise MappingError(f"{path}: the rules form a cycle: {' -> '.join(seen + [start])} "
                                   "(each rule's output is another rule's input; rename each tensor once)")
            if name in seen:
                break
            seen.append(name)
            name = first_name[name]


def _bind(rule: Rule, rs: RuleSet, sources: list[str], targets: list[str], source: Checkpoint,
          target: Checkpoint, meta: dict[str, Any]) -> list[_Output]:
    """The outputs of one rule application: bound parameters, shapes checked."""
    shapes = [source.tensors[s].shape for s in sources]
    dtype = source.tensors[sources[0]].dtype
    for s in sources[1:]:
        dtype = torch.promote_types(dtype, source.tensors[s].dtype)
    target_shapes = [target.tensors[t].shape for t in targets]
    bound = []
    labels = [""] * len(targets)
    for t in rule.transforms:
        params = dict(t.params)
        for key in T.HEAD_PARAMS:
            if key in params:
                params[key] = _lookup(meta, params[key], rule, t.kind, key, rs.where())
        try:
            before = shapes
            shapes = T.shapes_of(t, shapes, params, target_shapes)
        except T.Misfit as e:
            raise MappingError(f"{rs.where()}: {rule.label()} does not fit {' + '.join(sources)} "
                               f"(shape {' + '.join(str(list(s)) for s in before)}): {e}") from None
        if t.kind == "dtype":
            dtype = T._DTYPES[params["dtype"]]
        if t.kind == "split":
            labels = _split_labels(before[0], params, shapes)
        elif t.kind == "megatron_qkv":
            labels = ["q", "k", "v"]
        bound.append(params)
    if len(shapes) != len(targets):
        raise MappingError(f"{rs.where()}: {rule.label()}: the transforms produce {counted(len(shapes), 'tensor')} for "
                           f"{counted(len(targets), 'name')}")
    return [_Output(tname, tuple(sources), rule, tuple(bound), i, len(targets), tuple(shape), dtype, labels[i],
                    tuple(target_shapes))
            for i, (tname, shape) in enumerate(zip(targets, shapes))]


def _split_labels(shape, params: dict, outs) -> list[str]:
    dim = params.get("dim", 0) % len(shape)
    if params.get("groups", 1) != 1:
        return [f"part {i + 1}/{len(outs)}" for i in range(len(outs))]
    labels, start = [], 0
    for o in outs:
        stop = start + o[dim]
        labels.append(", ".join([":"] * dim + [f"{start}:{stop}"]))
        start = stop
    return labels


def _handle(out: _Output, key: str, source: Checkpoint) -> TensorHandle:
    """A lazy handle for one output: materialises its sources and runs the rule."""
    srcs = [source.tensors[s] for s in out.sources]
    if out.rule is None or not out.rule.transforms:
        return _renamed(srcs[0], key)
    rule, params, index, target_shapes = out.rule, out.params, out.index, out.target_shapes

    def materialize() -> torch.Tensor:
        tensors = [h.materialize() for h in srcs]
        for t, p in zip(rule.transforms, params):
            tensors = T.apply(t, tensors, p, target_shapes)
        return tensors[index]

    numel = math.prod(out.shape)
    total = sum(h.numel for h in srcs) or 1
    nbytes = round(sum(h.nbytes for h in srcs) * numel / total)
    storages = {h.storage_dtype for h in srcs}
    storage = storages.pop() if len(storages) == 1 else "mixed"
    return TensorHandle(name=key, shape=out.shape, dtype=out.dtype, nbytes=nbytes, materialize=materialize,
                        storage_dtype=storage, mapped=False,
                        source=srcs[0].source)


def _build(plan: _Plan) -> tuple[Checkpoint, Checkpoint, MappingReport]:
    rs, source, target, old_is_source = plan.rules, plan.source, plan.target, plan.source_is_old
    src_t: dict[str, TensorHandle] = {}
    key_of: dict[str, str] = {}  # target-namespace name -> pair key
    source_name: dict[str, str] = {}  # target-namespace name -> the source's own name (with piece label)
    pairs: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    transformed = 0
    by_source: dict[str, list[_Output]] = {}
    for out in plan.outputs:
        by_source.setdefault(out.sources[0], []).append(out)
    as_is: dict[str, str] = {}  # source name -> its pair key, for tensors kept or renamed, not transformed
    for name in source.tensors:
        if name not in by_source:
            if name not in plan.consumed:  # no rule: the name as it is
                src_t[name] = source.tensors[name]
                as_is[name] = name
                key_of.setdefault(name, name)
                source_name.setdefault(name, name)
            continue
        for out in by_source[name]:
            desc = "+".join(out.sources) + (f"[{out.label}]" if out.label else "")
            key = desc if old_is_source else out.target
            if key in src_t:
                raise MappingError(f"{rs.where()}: two tensors would both be compared as {key!r} "
                                   f"(a rule renames {desc!r} onto a name already there)")
            src_t[key] = _handle(out, key, source)
            key_of[out.target], source_name[out.target] = key, desc
            steps = out.rule.transforms if out.rule else ()
            if not steps and len(out.sources) == 1:
                as_is[name] = key
            if steps:
                transformed += 1
            if out.index == 0:
                for t in steps:
                    counts[t.kind] = counts.get(t.kind, 0) + 1
            old_name, new_name = (key, out.target) if old_is_source else (out.target, desc)
            pairs.append({"path": old_name, "path_new": new_name,
                          "transforms": [t.describe(p) for t, p in zip(steps, out.params)]})
    tgt_t: dict[str, TensorHandle] = {}
    for name, h in target.tensors.items():
        key = key_of.get(name, name) if old_is_source else name
        if key in tgt_t:
            raise MappingError(f"{rs.where()}: two tensors would both be compared as {key!r}")
        tgt_t[key] = _renamed(h, key) if key != name else h
    _retie(src_t, as_is)
    _retie(tgt_t, {name: (key_of.get(name, name) if old_is_source else name) for name in target.tensors})
    tied_report = []
    for head, emb, missing in plan.tied:
        if missing == "source":  # the source has no head: its embedding stands in
            key = head
            src_t[key] = _stand_in(src_t[key_of[emb]], key, key_of[emb])
            lacking, stand_in = ("old" if old_is_source else "new"), source_name[emb]
            new_name = head if old_is_source else stand_in
        else:  # the target has no head: its embedding stands in
            key = key_of[head]
            emb_key = key_of.get(emb, emb) if old_is_source else emb
            tgt_t[key] = _stand_in(tgt_t[emb_key], key, emb_key)
            lacking, stand_in = ("new" if old_is_source else "old"), emb
            new_name = emb if old_is_source else source_name[head]
        pairs.append({"path": key, "path_new": new_name, "transforms": [], "tied": f"{lacking} side: {stand_in}"})
        tied_report.append({"head": head, "embedding": stand_in, "missing_on": lacking})
    new_source, new_target = _with(source, src_t), _with(target, tgt_t)
    old_ckpt, new_ckpt = (new_source, new_target) if old_is_source else (new_target, new_source)
    old_ckpt, new_ckpt, header_keys = _header_keys_apart(old_ckpt, new_ckpt)
    report = MappingReport(
        name=rs.name, description=rs.description, source_side="old" if old_is_source else "new",
        families=(rs.source, rs.target) if old_is_source else (rs.target, rs.source),
        evidence=list(plan.evidence),
        mapped=sum(1 for n in old_ckpt.tensors if n in new_ckpt.tensors),
        transformed=transformed,
        unmapped_old=[n for n in old_ckpt.tensors if n not in new_ckpt.tensors],
        unmapped_new=[n for n in new_ckpt.tensors if n not in old_ckpt.tensors],
        transforms=counts, tied=tied_report,
        pairs=[p for p in pairs if p["path"] != p["path_new"] or p["transforms"] or p.get("tied")],
        rule_file="" if rs.builtin else rs.path,
        header_keys=header_keys,
    )
    return old_ckpt, new_ckpt, report


def _header_keys_apart(old: Checkpoint, new: Checkpoint) -> tuple[Checkpoint, Checkpoint, dict[str, int]]:
    """The two sides without the GGUF header key/values (``info["gguf"]``, which the
    reader also gives as metadata: ``general.architecture``, ``llama.context_length``...)
    when only one side is a GGUF file: the other family keeps its hyper-parameters
    elsewhere (a config.json), so they have no counterpart and would read as added or
    removed values. Returns how many each side left out (``{"new": 9}``), which the
    mapping section says."""
    sides = {"old": old, "new": new}
    held = {side: c.info.get("gguf") if isinstance(c.info, dict) else None for side, c in sides.items()}
    if bool(held["old"]) == bool(held["new"]):
        return old, new, {}
    side = "old" if held["old"] else "new"
    ckpt = sides[side]
    kept = {k: v for k, v in ckpt.metadata.items() if k not in held[side]}
    sides[side] = Checkpoint(name=ckpt.name, format=ckpt.format, tensors=ckpt.tensors, metadata=kept,
                             info=ckpt.info, _closers=[], files=ckpt.files, ties=ckpt.ties)
    left_out = len(ckpt.metadata) - len(kept)
    return sides["old"], sides["new"], ({side: left_out} if left_out else {})


def _renamed(h: TensorHandle, key: str) -> TensorHandle:
    """The same tensor under another name: values, bytes, storage identity and tie kept
    (``tied_to`` still names the side's old name; :func:`_retie` renames it)."""
    return replace(h, name=key)


def _retie(tensors: dict[str, TensorHandle], renamed: dict[str, str]) -> None:
    """Point each tied handle's ``tied_to`` at its target's pair key, so that a tied
    weight still counts once after renaming; a tie whose target was transformed or not
    kept is dropped (the copy is then a tensor of its own)."""
    for key, h in tensors.items():
        if h.tied_to is not None:
            target = renamed.get(h.tied_to)
            tensors[key] = replace(h, tied_to=target if target in tensors and target != key else None)


def _stand_in(h: TensorHandle, key: str, target: str) -> TensorHandle:
    """A tied head held as its embedding's values (rules' ``tied``): the embedding's
    tensor under the head's name, marked ``tied_to`` it, so that it counts once, as
    ``pairing.tied_handle`` holds a head a file dropped."""
    return replace(h, name=key, tied_to=target, storage_key=None, storage_nbytes=None, span=None)


def _held_ties(ckpt: Checkpoint) -> Checkpoint:
    """The target side with the tied names its file dropped (``Checkpoint.ties``: an HF
    safetensors file without ``lm_head.weight``, config.json ``tie_word_embeddings``)
    held as their target's values, marked ``tied_to``, as pairing holds them: the other
    side's ``output.weight`` then maps to ``lm_head.weight`` like any rule target."""
    if not ckpt.ties:
        return ckpt
    from torchdiff.pairing import tied_handle

    tensors = dict(ckpt.tensors)
    for name in ckpt.ties:
        held = tied_handle(ckpt, name)
        if held is not None and name not in tensors:
            tensors[name] = held
    return _with(ckpt, tensors)


def _with(ckpt: Checkpoint, tensors: dict[str, TensorHandle]) -> Checkpoint:
    return Checkpoint(name=ckpt.name, format=ckpt.format, tensors=tensors, metadata=ckpt.metadata, info=ckpt.info,
                      _closers=[], files=ckpt.files)


# ---- choosing and applying a mapping --------------------------------------------------------


class _Facts:
    """One side's shapes, and which name each detect entry found, computed once per run
    (auto tries every family in both directions)."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.shapes = {n: h.shape for n, h in ckpt.tensors.items()}
        self._found: dict[str, str | None] = {}

    def find(self, entry) -> str | None:
        key = entry.describe()
        if key not in self._found:
            self._found[key] = entry.find(self.shapes)
        return self._found[key]


def _detected(entries, facts: _Facts) -> list[str] | None:
    """Evidence lines when every entry matches a name of the side; None when one does not."""
    found = []
    for entry in entries:
        name = facts.find(entry)
        if name is None:
            return None
        found.append(f"{name} {list(facts.shapes[name])}" if entry.shape is not None else name)
    return found


def _matched(old: Checkpoint, new: Checkpoint) -> int:
    """Tensors that pair by name with equal shapes."""
    return sum(1 for n, h in old.tensors.items() if n in new.tensors and new.tensors[n].shape == h.shape)


def _try(rs: RuleSet, old: Checkpoint, new: Checkpoint, old_is_source: bool, heads, *, require_detect: bool,
         facts: tuple[_Facts, _Facts] | None = None):
    """(old, new, report) through ``rs`` in one direction; None when detection fails."""
    source, target = (old, new) if old_is_source else (new, old)
    if facts is None:
        facts = (_Facts(old), _Facts(new))
    f_source, f_target = facts if old_is_source else facts[::-1]
    ev_s = _detected(rs.detect_source, f_source)
    ev_t = _detected(rs.detect_target, f_target) if ev_s is not None else None
    if require_detect:
        if ev_s is None or ev_t is None or not (rs.detect_source or rs.detect_target):
            return None
        if rs.names == "gguf" and not isinstance(checkpoint_meta(source).get("general.architecture"), str):
            return None  # blk.N names without GGUF metadata: not a GGUF file
    plan = _plan(rs, source, _held_ties(target), old_is_source, heads)
    side_s, side_t = ("old", "new") if old_is_source else ("new", "old")
    if ev_s:
        plan.evidence.append(f"{side_s} is {rs.source}: " + "; ".join(ev_s))
    if ev_t:
        plan.evidence.append(f"{side_t} is {rs.target}: " + "; ".join(ev_t))
    elif rs.names == "gguf":
        plan.evidence.append(f"{side_t} is {_family(target)} (torchdiff.names.family)")
    example = next((o for o in plan.outputs if o.rule is not None and o.rule.transforms), None) or next(
        iter(plan.outputs), None)
    if example is not None:
        src, tgt = "+".join(example.sources), example.target
        plan.evidence.append(f"for example {src if old_is_source else tgt} <-> {tgt if old_is_source else src}")
    arch = checkpoint_meta(source).get("general.architecture") if rs.names == "gguf" else None
    if arch is not None:
        from torchdiff.mapping.gguf_names import arch_count

        plan.evidence.append(f"names from gguf.get_tensor_name_map({arch!r}) ({arch_count()} architectures known)")
    return _build(plan)


def _family(ckpt: Checkpoint) -> str:
    from torchdiff.names import family

    return family(ckpt.tensors, {n: h.shape for n, h in ckpt.tensors.items()})


def apply_mapping(old: Checkpoint, new: Checkpoint, mapping: Any = "auto", *,
                  heads: tuple[int, int] | None = None) -> tuple[Checkpoint, Checkpoint, MappingReport | None]:
    """Pair two checkpoints' tensors through a mapping.

    Args:
        old, new: the opened checkpoints.
        mapping: ``"none"``; ``"auto"`` (a built-in family whose detection holds on the
            two sides, in either direction, and under which more tensors pair by name and
            shape than without); or a RuleSet (``load_rules(path)``), applied in the
            direction its ``detect`` section supports, else the one under which more
            tensors pair.
        heads: (heads, kv_heads) for rules whose head counts the metadata does not give.

    Returns:
        (old, new, report): the checkpoints with renamed and transformed handles, and the
        MappingReport; the inputs unchanged and None when no mapping applies (auto).
    """
    if mapping is None or mapping == "none":
        return old, new, None
    if isinstance(mapping, RuleSet):
        if mapping.names == "gguf" and not any(isinstance(checkpoint_meta(c).get("general.architecture"), str)
                                               for c in (old, new)):
            raise MappingError(f"{mapping.where()}: neither {old.name} nor {new.name} is a GGUF file with a "
                               "general.architecture key, from which these rules take gguf's name table "
                               "(compare a GGUF file, or use --map none)")
        baseline = _matched(old, new)
        got = None
        for old_is_source in (True, False):
            got = _try(mapping, old, new, old_is_source, heads, require_detect=True)
            if got is not None:
                break
        if got is None:  # no detect section, or it holds in neither direction: the better direction
            tries = [_try(mapping, old, new, s, heads, require_detect=False) for s in (True, False)]
            got = max(tries, key=lambda t: (_matched(t[0], t[1]), t[2].source_side == "old"))
            got[2].evidence.append(f"rules matched on the {got[2].source_side} side, where more tensors pair")
        got[2].evidence.append(f"{_matched(got[0], got[1])} tensors pair by name and shape through it, "
                               f"{baseline} without")
        return got
    if mapping != "auto":
        raise MappingError(f"--map {mapping!r}: use auto, none or a rule file")
    facts = (_Facts(old), _Facts(new))
    if facts[0].shapes == facts[1].shapes:
        return old, new, None  # the same names and shapes: one family
    baseline = _matched(old, new)
    best, best_score, rejected = None, baseline, []
    for rs in builtins():
        for old_is_source in (True, False):
            try:
                got = _try(rs, old, new, old_is_source, heads, require_detect=True, facts=facts)
            except MappingError as e:
                rejected.append(f"{rs.name}: {e}")
                continue
            if got is None:
                continue
            score = _matched(got[0], got[1])
            if score > best_score:
                best, best_score = got, score
    if best is None:
        if not rejected:
            return old, new, None
        unmapped_old = [n for n in old.tensors if n not in new.tensors]
        return old, new, MappingReport(  # a family was recognised but does not fit: say so
            name="none", description="no mapping applied", source_side="",
            families=(_family(old), _family(new)), evidence=[f"not used: {r}" for r in rejected],
            mapped=len(old.tensors) - len(unmapped_old), unmapped_old=unmapped_old,
            unmapped_new=[n for n in new.tensors if n not in old.tensors])
    best[2].evidence.append(f"{best_score} tensors pair by name and shape through it, {baseline} without")
    best[2].evidence += [f"not used: {r}" for r in rejected]
    return best
