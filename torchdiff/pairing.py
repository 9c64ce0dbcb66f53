"""Names -> pairs: common, only-old, only-new, reshaped, retyped. No tensor maths."""

from __future__ import annotations

import re
from dataclasses import dataclass

from torchdiff.errors import UsageError
from torchdiff.formats.base import Checkpoint, TensorHandle
from torchdiff.names import PARAMETER, roles


@dataclass(frozen=True, slots=True)
class Pair:
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


#: Wrapper prefixes one side's names may carry and the other's not: a state_dict saved
#: under ``model`` (DCP, Lightning), or from ``nn.DataParallel`` / DDP (``module.``).
WRAPPER_PREFIXES = ("model.", "module.")


def dropped_prefix(old_names, new_names) -> tuple[str, str]:
    """(prefix to drop from old's names, from new's): at most one side drops one.

    A prefix P of :data:`WRAPPER_PREFIXES` is dropped from side A when the other side
    has no name starting with P and dropping it from A's names pairs more names than
    keeping it. Names of A without P (``optim.state...``) stay as they are; so does a
    name whose stripped form A already holds.
    """
    old_names, new_names = list(old_names), list(new_names)
    old_set, new_set = set(old_names), set(new_names)
    common = len(old_set & new_set)
    best = (common, "", "")
    for prefix in WRAPPER_PREFIXES:
        for a, b_set, a_set, side in ((old_names, new_set, old_set, "old"), (new_names, old_set, new_set, "new")):
            if any(n.startswith(prefix) for n in b_set):
                continue
            stripped = {n[len(prefix):] if n.startswith(prefix) and n[len(prefix):] not in a_set else n for n in a}
            found = len(stripped & b_set)
            if found > best[0]:
                best = (found, prefix, "") if side == "old" else (found, "", prefix)
    return best[1], best[2]


#: Formats whose names carry the top-level key the state was saved under (DCP:
#: ``model.``): only when one side is one of these is a wrapper prefix dropped, so that
#: other comparisons keep pairing names exactly (and the architecture analysis still
#: reports ``module.x -> x`` as renames).
PREFIXED_FORMATS = ("dcp",)


def drop_prefix(old: Checkpoint, new: Checkpoint) -> tuple[Checkpoint, Checkpoint, tuple[str, str]]:
    """Both checkpoints with :func:`dropped_prefix` applied when one side's format is in
    :data:`PREFIXED_FORMATS`, and (prefix dropped from old, from new)."""
    if old.format not in PREFIXED_FORMATS and new.format not in PREFIXED_FORMATS:
        return old, new, ("", "")
    old_prefix, new_prefix = dropped_prefix(old.tensors, new.tensors)
    if old_prefix:
        old = _without(old, old_prefix)
    if new_prefix:
        new = _without(new, new_prefix)
    return old, new, (old_prefix, new_prefix)


def _without(ckpt: Checkpoint, prefix: str) -> Checkpoint:
    """A view of ``ckpt`` (same handles; closing stays with the original) under stripped names."""
    tensors = {}
    for name, handle in ckpt.tensors.items():
        short = name[len(prefix):] if name.startswith(prefix) else name
        tensors[short if short not in ckpt.tensors else name] = handle
    return Checkpoint(name=ckpt.name, format=ckpt.format, tensors=tensors, metadata=ckpt.metadata, info=ckpt.info,
                      files=ckpt.files)


def pair(old: Checkpoint, new: Checkpoint, keep=None) -> list[Pair]:
    """Pair tensors by name: old's order first, then names only new has. Each pair's role
    comes from torchdiff.names.roles over both checkpoints (a side's own dtype first)."""
    specs = {name: (h.storage_dtype, len(h.shape)) for name, h in new.tensors.items()}
    specs.update((name, (h.storage_dtype, len(h.shape))) for name, h in old.tensors.items())
    role_of = roles(specs)
    pairs: list[Pair] = []
    for name, handle in old.tensors.items():
        if keep is None or keep(name):
            pairs.append(Pair(name, handle, new.tensors.get(name), role_of[name]))
    for name, handle in new.tensors.items():
        if name not in old.tensors and (keep is None or keep(name)):
            pairs.append(Pair(name, None, handle, role_of[name]))
    return pairs


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
