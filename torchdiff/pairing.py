"""Names -> pairs: common, only-old, only-new, reshaped, retyped. No tensor maths."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from torchdiff.errors import UsageError
from torchdiff.formats.base import Checkpoint, TensorHandle, stored_bytes


@dataclass(frozen=True, slots=True)
class Pair:
    name: str
    old: TensorHandle | None
    new: TensorHandle | None

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


def pair(old: Checkpoint, new: Checkpoint, keep=None) -> list[Pair]:
    """Pair tensors by name: old's order first, then names only new has.

    A name one side holds and the other side knows only as tied (``Checkpoint.ties``:
    a duplicate the file dropped) pairs with the tensor it is tied to, marked
    ``tied_to``: tied, not added or removed.
    """
    pairs: list[Pair] = []
    for name, handle in old.tensors.items():
        if keep is None or keep(name):
            pairs.append(Pair(name, handle, new.tensors.get(name) or _tied(new, name)))
    for name, handle in new.tensors.items():
        if name not in old.tensors and (keep is None or keep(name)):
            pairs.append(Pair(name, _tied(old, name), handle))
    return pairs


def _tied(ckpt: Checkpoint, name: str) -> TensorHandle | None:
    """The handle standing for a dropped tied name: its target's, renamed and marked."""
    target = ckpt.ties.get(name)
    handle = ckpt.tensors.get(target) if target is not None else None
    if handle is None:
        return None
    return replace(handle, name=name, tied_to=target, storage_key=None, storage_nbytes=None)


def check_selected(pairs: list[Pair], old: Checkpoint, new: Checkpoint, ignore_keys_regex: str | None,
                   path: str | None) -> None:
    """A filter that selects no tensor is a usage error naming the filter (a typo in a CI
    gate must not pass as "0 tensors")."""
    if pairs or not (ignore_keys_regex or path) or not (old.tensors or new.tensors):
        return
    given = " and ".join(f for f in (f"--path {path!r}" if path else "",
                                     f"--ignore-keys-regex {ignore_keys_regex!r}" if ignore_keys_regex else "") if f)
    total = len(set(old.tensors) | set(new.tensors))
    example = next(iter(new.tensors or old.tensors))
    raise UsageError(f"{given} selects no tensor of the {total} compared (a name looks like {example!r})")


def annotate(pairs: list[Pair], diffs: list) -> list:
    """Diffs with ``extras["tied_to"]`` (``{"old": name|None, "new": name|None}``) for tied
    tensors and ``extras["stored_nbytes"]`` (``{"old": n, "new": n}``) where the bytes the
    file holds for a tensor differ from its own (a storage shared or larger than the
    view): the pieces that count parameters once and bytes as stored."""
    stored = {side: stored_bytes([getattr(p, side) for p in pairs if getattr(p, side) is not None])
              for side in ("old", "new")}
    by_name = {p.name: p for p in pairs}
    out = []
    for d in diffs:  # the engine may return them in another order than the pairs
        p = by_name[d.name]
        extras = {}
        tied = {side: getattr(getattr(p, side), "tied_to", None) for side in ("old", "new")}
        if any(tied.values()):
            extras["tied_to"] = tied
        deq = [side for side in ("old", "new") if _dequantized(getattr(p, side))]
        if deq:
            extras["dequantized"] = deq
        nbytes = {side: stored[side].get(p.name) for side in ("old", "new") if getattr(p, side) is not None}
        if any(n != getattr(p, side).nbytes for side, n in nbytes.items()):
            extras["stored_nbytes"] = nbytes
        out.append(replace(d, extras={**d.extras, **extras}) if extras else d)
    return out


def _dequantized(handle: TensorHandle | None) -> bool:
    """Integer (or float8) codes read as float values (torchdiff.dequant folded a scale in)."""
    return (handle is not None and handle.dtype.is_floating_point
            and handle.storage_dtype.startswith(("int", "uint", "float8")))


def tied(d, side: str) -> bool:
    """Whether a TensorDiff's ``side`` is a tied copy of another tensor (count it once)."""
    return bool((d.extras.get("tied_to") or {}).get(side))


def stored_nbytes(d, side: str) -> int:
    """Bytes the file holds for a TensorDiff's ``side`` (each storage counted once)."""
    found = (d.extras.get("stored_nbytes") or {}).get(side)
    return found if found is not None else getattr(d, side).nbytes


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
