"""Names -> pairs: common, only-old, only-new, reshaped, retyped. No tensor maths."""

from __future__ import annotations

import itertools
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping

from torchdiff.errors import UsageError
from torchdiff.formats.base import Checkpoint, TensorHandle, stored_bytes
from torchdiff.names import PARAMETER, roles_over


@dataclass(eq=False, slots=True)
class Pair:
    """One name's two sides (None where a side lacks it). Compared by identity, and not
    frozen: a frozen dataclass sets each field through ``object.__setattr__``, which made
    building 20,000 pairs 2.7 × slower (8 ms against 3 ms)."""

    name: str
    old: TensorHandle | None
    new: TensorHandle | None
    role: str = PARAMETER  # torchdiff.names.ROLES, decided with both checkpoints as context

    @property
    def kind(self) -> str:
        """``common`` (same shape), ``reshaped``, ``added`` or ``removed``."""
        if self.old is None:
            return "added"
        if self.new is None:
            return "removed"
        if self.old.shape != self.new.shape:
            return "reshaped"
        return "common"

    @property
    def retyped(self) -> bool:
        return (
            self.old is not None
            and self.new is not None
            and self.old.storage_dtype != self.new.storage_dtype
        )


def compile_filters(ignore_keys_regex: str | None, path: str | None):
    """A predicate on names from --ignore-keys-regex and --path (substring)."""
    try:
        ignore = re.compile(ignore_keys_regex) if ignore_keys_regex else None
    except re.error as e:
        raise UsageError(f"--ignore-keys-regex {ignore_keys_regex!r} is not a valid regex ({e})") from None

    def keep(name: str) -> bool:
        if ignore is not None and ignore.search(name):
            return False
        if path and path not in name:
            return False
        return True

    return keep


#: Prefixes one side's names may carry and the other's not: the key a training
#: checkpoint holds the model's state under (DCP's and nanoGPT's ``model``, Lightning's
#: ``state_dict``, with ``model`` below it when the LightningModule keeps its network
#: in ``self.model``; the PyTorch tutorials' ``model_state_dict``). DeepSpeed's
#: ``module`` key and DDP's ``module.`` are wrapper segments (below).
CONTAINER_PREFIXES = ("model.", "state_dict.", "state_dict.model.", "model_state_dict.")


def dropped_prefix(old_names, new_names) -> tuple[str, str]:
    """(prefix to drop from old's names, from new's): at most one side drops one.

    A prefix P of :data:`CONTAINER_PREFIXES` is dropped from side A when dropping it
    from A's names pairs more names than keeping it (the names renamed as
    :func:`drop_prefix` renames them), counted with wrapper segments aside
    (:func:`_unwrapped`): nanoGPT's ``model._orig_mod.`` and a DDP model saved under
    ``model`` drop ``model.`` here, then the wrapper segment. The other side may have
    names starting with P of its own (an HF ``LlamaForCausalLM``'s ``model.layers...``
    against a nanoGPT checkpoint's ``model._orig_mod.model.layers...``). Names of A
    without P (``optim.state...``) stay as they are; so does a name whose stripped form
    A already holds.
    """
    names = (list(old_names), list(new_names))
    key = _unwrapped(names)
    keys = ({key(n) for n in names[0]}, {key(n) for n in names[1]})
    best = (len(keys[0] & keys[1]), "", "")
    for prefix in CONTAINER_PREFIXES:
        for a in (0, 1):
            found = len({key(n) for n in _stripped(names[a], _without_prefix(prefix))} & keys[1 - a])
            if found > best[0]:
                best = (found, prefix, "") if a == 0 else (found, "", prefix)
    return best[1], best[2]


def _unwrapped(names: tuple[list[str], list[str]]) -> Callable[[str], str]:
    """A name without its :data:`WRAPPER_SEGMENTS` components, for counting pairs; the
    identity when no name of either side has one (one substring search a side)."""
    texts = ["\n" + "\n".join(n) for n in names]
    if not any(f"\n{s}." in t or f".{s}." in t for s in WRAPPER_SEGMENTS for t in texts):
        return lambda n: n
    segments = set(WRAPPER_SEGMENTS)
    return lambda n: _strip_segments(n, segments)


def _without_prefix(prefix: str) -> Callable[[str], str]:
    return lambda n: n[len(prefix):] if n.startswith(prefix) else n


#: Formats whose names carry the top-level key the state was saved under (DCP's
#: ``model.``; a PyTorch training checkpoint flattened: ``state_dict.fc.weight``): only
#: when one side is one of these is a prefix of CONTAINER_PREFIXES dropped, so that a
#: re-prefixed state_dict elsewhere is still reported by the architecture analysis as
#: renames (wrapper segments, below, are dropped between any formats).
PREFIXED_FORMATS = ("dcp", "torch")


#: Name segments a wrapper adds to every name of the model it wraps when that is saved,
#: each with who adds it: ``module`` (``nn.DataParallel``, ``DistributedDataParallel``),
#: ``_orig_mod`` (``torch.compile``'s OptimizedModule). A state_dict saved through a
#: wrapper and one saved without it name the same tensors differently
#: (``module._orig_mod.fc.weight`` against ``fc.weight``; nanoGPT's
#: ``model._orig_mod.transformer.wte.weight``).
WRAPPER_SEGMENTS = {"module": "nn.DataParallel / DistributedDataParallel", "_orig_mod": "torch.compile"}


@dataclass(frozen=True)
class Dropped:
    """What pairing dropped from names: the container prefix (:func:`dropped_prefix`)
    and the wrapper segments (:func:`dropped_wrappers`) of each side."""

    old_prefix: str = ""
    new_prefix: str = ""
    old_wrappers: tuple[str, ...] = ()
    new_wrappers: tuple[str, ...] = ()
    #: each side's names pairing changed: paired name -> the name the file stores
    stored: tuple[Mapping[str, str], Mapping[str, str]] = field(default_factory=lambda: ({}, {}))
    #: (old name, new name) of two one-array ``.npy`` files, paired under the old name
    single: tuple[str, str] | None = None

    def __bool__(self) -> bool:
        return bool(self.old_prefix or self.new_prefix or self.old_wrappers or self.new_wrappers or self.single)


def dropped_wrappers(old_names, new_names) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(wrapper segments to drop from old's names, from new's), from :data:`WRAPPER_SEGMENTS`.

    Segments are dropped from side A when some name of A has each as a component (not
    the last), no name of the other side has it, and dropping them pairs more names than
    keeping them. Both sides choose together, among their candidate sets (``module``,
    ``_orig_mod``, both; none): the choice that pairs most, the fewest segments on a tie
    — so a DDP checkpoint (``module.fc.weight``) pairs with a ``torch.compile``d one
    (``_orig_mod.fc.weight``). A name whose stripped form A already holds (or that
    another name of A strips to) keeps its name. Names without any segment cost one
    substring search a side.
    """
    names = (list(old_names), list(new_names))
    joined = ["\n" + "\n".join(n) for n in names]
    has = [{s for s in WRAPPER_SEGMENTS if f"\n{s}." in text or f".{s}." in text} for text in joined]
    candidates = [[s for s in WRAPPER_SEGMENTS if s in has[a] and s not in has[1 - a]] for a in (0, 1)]
    if not any(candidates):
        return (), ()
    choices: list[list[tuple[tuple[str, ...], set[str]]]] = []  # a side's (segments dropped, names then)
    for a in (0, 1):
        choices.append([((), set(names[a]))] + [
            (segments, set(_stripped(names[a], lambda n, drop=set(segments): _strip_segments(n, drop))))
            for k in range(1, len(candidates[a]) + 1) for segments in itertools.combinations(candidates[a], k)])
    best = (len(choices[0][0][1] & choices[1][0][1]), 0, (), ())
    for old_segments, old_set in choices[0]:
        for new_segments, new_set in choices[1]:
            found = len(old_set & new_set)
            fewer = -(len(old_segments) + len(new_segments))
            if (found, fewer) > best[:2]:
                best = (found, fewer, old_segments, new_segments)
    return best[2], best[3]


def _strip_segments(name: str, segments: set[str]) -> str:
    parts = name.split(".")
    return ".".join([p for p in parts[:-1] if p not in segments] + parts[-1:])


def _stripped(names: list[str], rename: Callable[[str], str]) -> list[str]:
    """``rename`` of each name, where that neither meets a name already held nor merges
    two names (those keep their own)."""
    short = [rename(n) for n in names]
    held = set(names)
    counts = Counter(short)
    return [s_ if s_ == n or (s_ not in held and counts[s_] == 1) else n for n, s_ in zip(names, short)]


def drop_prefix(old: Checkpoint, new: Checkpoint) -> tuple[Checkpoint, Checkpoint, Dropped]:
    """Both checkpoints under the names they pair by, and what was dropped: the prefix of
    :func:`dropped_prefix` when one side's format is in :data:`PREFIXED_FORMATS`, then the
    wrapper segments of :func:`dropped_wrappers` (any format). The checkpoints returned
    are views (same handles; closing stays with the originals)."""
    old_prefix = new_prefix = ""
    stored: tuple[dict[str, str], dict[str, str]] = ({}, {})
    single = None
    if _one_array(old) and _one_array(new) and set(old.tensors) != set(new.tensors):
        # before.npy against after.npy: each name is its file's stem, not the array's own
        single = (next(iter(old.tensors)), next(iter(new.tensors)))
        new = _renamed(new, lambda n: single[0], stored[1])
        return old, new, Dropped(stored=stored, single=single)
    _, _, found = paired_names(old.tensors, new.tensors,
                               prefixes=old.format in PREFIXED_FORMATS or new.format in PREFIXED_FORMATS)
    old_prefix, new_prefix, old_wrappers, new_wrappers = (found.old_prefix, found.new_prefix, found.old_wrappers,
                                                          found.new_wrappers)
    if old_prefix:
        old = _renamed(old, _without_prefix(old_prefix), stored[0])
    if new_prefix:
        new = _renamed(new, _without_prefix(new_prefix), stored[1])
    if old_wrappers:
        old = _renamed(old, lambda n: _strip_segments(n, set(old_wrappers)), stored[0])
    if new_wrappers:
        new = _renamed(new, lambda n: _strip_segments(n, set(new_wrappers)), stored[1])
    return old, new, Dropped(old_prefix, new_prefix, old_wrappers, new_wrappers, stored)


def paired_names(old_names, new_names, prefixes: bool = True) -> tuple[dict[str, str], dict[str, str], Dropped]:
    """Each side's names -> the names they pair by, and what was dropped: the container
    prefix of :func:`dropped_prefix` (with ``prefixes``), then the wrapper segments of
    :func:`dropped_wrappers`. The one rule of :func:`drop_prefix` (compare) and of
    ``torchdiff verify`` (manifests: names only)."""
    names = (list(old_names), list(new_names))
    maps = [{n: n for n in ns} for ns in names]
    prefix = dropped_prefix(*names) if prefixes else ("", "")
    for a in (0, 1):
        if prefix[a]:
            maps[a] = dict(zip(names[a], _stripped(names[a], _without_prefix(prefix[a]))))
    current = (list(maps[0].values()), list(maps[1].values()))
    wrappers = dropped_wrappers(*current)
    for a in (0, 1):
        if wrappers[a]:
            segments = set(wrappers[a])
            maps[a] = dict(zip(names[a], _stripped(current[a], lambda n: _strip_segments(n, segments))))
    return maps[0], maps[1], Dropped(prefix[0], prefix[1], wrappers[0], wrappers[1])


def _one_array(ckpt: Checkpoint) -> bool:
    """A ``.npy`` file: one array, named by the file's stem (formats/numpy.py)."""
    return ckpt.format == "numpy" and (ckpt.info.get("numpy") or {}).get("archive") == "npy" and len(ckpt) == 1


def _renamed(ckpt: Checkpoint, rename: Callable[[str], str], stored: dict[str, str]) -> Checkpoint:
    """A view of ``ckpt`` (same handles; closing stays with the original) with its names
    renamed (:func:`_stripped`); tied names it does not hold follow the same rule.
    ``stored`` (new name -> the name the file stores) is updated."""
    names = dict(zip(ckpt.tensors, _stripped(list(ckpt.tensors), rename)))
    for name, short in names.items():
        if short != name:
            stored[short] = stored.pop(name, name)
    tensors = {names[name]: handle for name, handle in ckpt.tensors.items()}
    ties = {}
    for dropped, target in ckpt.ties.items():
        short = rename(dropped)
        ties[short if short not in tensors else dropped] = names.get(target, target)
    return Checkpoint(name=ckpt.name, format=ckpt.format, tensors=tensors, metadata=ckpt.metadata, info=ckpt.info,
                      files=ckpt.files, ties=ties)


def pair(old: Checkpoint, new: Checkpoint, keep=None) -> list[Pair]:
    """Pair tensors by name: old's order first, then names only new has. Each pair's role
    comes from torchdiff.names.roles_over (the new side decides, else the old).

    A name one side holds and the other side knows only as tied (``Checkpoint.ties``:
    a duplicate the file dropped) pairs with the tensor it is tied to, marked
    ``tied_to``: tied, not added or removed.
    """
    role_of = roles_over([{name: (h.storage_dtype, len(h.shape)) for name, h in c.tensors.items()}
                          for c in (old, new)])
    implied = implied_ties(old, new)
    pairs: list[Pair] = []
    for name, handle in old.tensors.items():
        if keep is None or keep(name):
            pairs.append(Pair(name, handle, new.tensors.get(name) or tied_handle(new, name, implied[1]), role_of[name]))
    for name, handle in new.tensors.items():
        if name not in old.tensors and (keep is None or keep(name)):
            pairs.append(Pair(name, tied_handle(old, name, implied[0]), handle, role_of[name]))
    return pairs


def implied_ties(old: Checkpoint, new: Checkpoint) -> tuple[dict[str, str], dict[str, str]]:
    """Ties one side shows and the other side's file dropped: (old's, new's), each
    dropped name -> the held tensor it is tied to.

    A name X that one side holds as a tied copy of T (one storage in a ``.bin`` or
    ``.pt``: ``TensorHandle.tied_to``) and that the other side lacks while holding T is
    the duplicate the other file's writer dropped: ``save_pretrained`` writes each tied
    weight once (``lm_head.weight``, BERT's ``cls.predictions.decoder.weight`` and
    ``.bias``, T5's ``encoder.embed_tokens.weight``, Whisper's ``proj_out.weight``),
    whatever config.json says. X then pairs with the other side's T, tied, as a
    dropped name recorded in the file does (``Checkpoint.ties``).

    Only where the other side is a file that names each storage once (safetensors: no
    handle shares a storage, so its writer dropped the duplicates) and its T has X's
    shape and storage dtype; a pickle or a state_dict in memory keeps every name of a
    shared storage, so a name missing there was removed."""
    out: tuple[dict[str, str], dict[str, str]] = ({}, {})
    for a, (this, other) in enumerate(((old, new), (new, old))):
        tied = [(name, h) for name, h in this.tensors.items() if h.tied_to is not None]
        if not tied or any(h.storage_key is not None for h in other.tensors.values()):
            continue
        current = {h.name: name for name, h in this.tensors.items()}  # stored -> paired name (drop_prefix)
        for name, h in tied:
            target = current.get(h.tied_to, h.tied_to)
            held = other.tensors.get(target)
            if (held is not None and name not in other.tensors and name not in other.ties
                    and tuple(held.shape) == tuple(h.shape) and held.storage_dtype == h.storage_dtype):
                out[1 - a][name] = target
    return out


def tied_handle(ckpt: Checkpoint, name: str, implied: Mapping[str, str] | None = None) -> TensorHandle | None:
    """The handle standing for a dropped tied name: its target's, renamed and marked."""
    target = ckpt.ties.get(name)
    if target is None and implied:
        target = implied.get(name)
    handle = ckpt.tensors.get(target) if target is not None else None
    if handle is None:
        return None
    return replace(handle, name=name, tied_to=target, storage_key=None, storage_nbytes=None)


def check_selected(pairs: list, old: Checkpoint, new: Checkpoint, ignore_keys_regex: str | None,
                   path: str | None, *more: Checkpoint) -> None:
    """A filter that selects no tensor is a usage error naming the filter (a typo in a CI
    gate must not pass as "0 tensors"); ``more``: further checkpoints (a series)."""
    checkpoints = (old, new, *more)
    if pairs or not (ignore_keys_regex or path) or not any(c.tensors for c in checkpoints):
        return
    given = " and ".join(f for f in (f"--path {path!r}" if path else "",
                                     f"--ignore-keys-regex {ignore_keys_regex!r}" if ignore_keys_regex else "") if f)
    total = len(set().union(*(c.tensors for c in checkpoints)))
    example = next(iter(next(c.tensors for c in reversed(checkpoints) if c.tensors)))
    raise UsageError(f"{given} selects no tensor of the {total} compared (a name looks like {example!r})")


def annotate(pairs: list[Pair], diffs: list) -> list:
    """Diffs with ``extras["tied_to"]`` (``{"old": name|None, "new": name|None}``) for tied
    tensors, ``extras["dequantized"]`` (the sides read as dequantized codes) and
    ``extras["stored_nbytes"]`` (``{"old": n, "new": n}``) where the bytes the file holds
    for a tensor differ from its own (a storage shared or larger than the view): the
    pieces that count parameters once and bytes as stored. Diffs without any of these
    are returned as they are (one cheap pass over the handles)."""
    special = []
    for p in pairs:  # the common case (nothing tied, shared or dequantized) in one tight pass
        for h in (p.old, p.new):
            if h is not None and (h.tied_to is not None or h.storage_key is not None
                                  or (h.storage_dtype.startswith(_CODES) and h.dtype.is_floating_point)):
                special.append(p)
                break
    if not special:
        return diffs
    stored = {}
    for side in ("old", "new"):
        held = [(p.name, getattr(p, side)) for p in pairs if getattr(p, side) is not None]
        if any(h.storage_key is not None or h.tied_to is not None for _, h in held):
            stored[side] = stored_bytes([h for _, h in held], [n for n, _ in held])  # pair names: -r prefixes them
    found: dict[str, dict] = {}
    for p in special:
        extras = {}
        tied_to = {"old": getattr(p.old, "tied_to", None), "new": getattr(p.new, "tied_to", None)}
        if tied_to["old"] or tied_to["new"]:
            extras["tied_to"] = tied_to
        deq = [side for side in ("old", "new") if _dequantized(getattr(p, side))]
        if deq:
            extras["dequantized"] = deq
        nbytes = {side: stored[side][p.name] for side in stored if getattr(p, side) is not None}
        if any(n != getattr(p, side).nbytes for side, n in nbytes.items()):
            extras["stored_nbytes"] = {side: nbytes.get(side, getattr(p, side).nbytes)
                                       for side in ("old", "new") if getattr(p, side) is not None}
        if extras:
            found[p.name] = extras
    if not found:
        return diffs
    names = getattr(diffs, "names", None)
    if names is not None and isinstance(getattr(diffs, "extras", None), dict):  # the columnar Figures: in place
        rows = {n: i for i, n in enumerate(names)}
        for name, extra in found.items():
            diffs.extras.setdefault(rows[name], {}).update(extra)
        return diffs
    # a list of TensorDiffs, maybe in another order than the pairs: match by name
    return [replace(d, extras={**d.extras, **found[d.name]}) if d.name in found else d for d in diffs]


_CODES = ("int", "uint", "float8", "qint", "quint")  # storage dtypes of quantization codes (qint: torch.ao)


def _dequantized(handle: TensorHandle | None) -> bool:
    """Integer (or float8) codes read as float values (torchdiff.dequant folded a scale in)."""
    return (handle is not None and handle.dtype.is_floating_point
            and handle.storage_dtype.startswith(_CODES))


def pair_metadata(old: dict, new: dict, keep=None) -> list[tuple[str, str, object, object]]:
    """(key, status, old, new) for non-tensor values that differ."""
    out = []
    for key in list(old) + [k for k in new if k not in old]:
        if keep is not None and not keep(key):
            continue
        if key not in new:
            out.append((key, "removed", old[key], None))
        elif key not in old:
            out.append((key, "added", None, new[key]))
        elif not _same(old[key], new[key]):
            out.append((key, "changed", old[key], new[key]))
    return out


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True  # both NaN
    try:
        return bool(a == b) and type(a) is type(b)
    except Exception:  # noqa: BLE001 - exotic __eq__; compare by text
        return repr(a) == repr(b)
