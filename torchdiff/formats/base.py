"""The lazy checkpoint every reader returns."""

from __future__ import annotations

import functools
import hashlib
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch

from torchdiff.errors import CorruptFileError, TooLargeError, UnknownTensorError

# torch dtype -> short name used in reports (and safetensors' names for reference).
_DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "float64",
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.int64: "int64",
    torch.int32: "int32",
    torch.int16: "int16",
    torch.int8: "int8",
    torch.uint8: "uint8",
    torch.bool: "bool",
    torch.complex64: "complex64",
    torch.complex128: "complex128",
}
for _name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu",
              "uint16", "uint32", "uint64"):
    _dt = getattr(torch, _name, None)
    if _dt is not None:
        _DTYPE_NAMES[_dt] = _name


def dtype_name(dtype: torch.dtype) -> str:
    name = _DTYPE_NAMES.get(dtype)  # (not .get(dtype, str(...)): that formats the fallback on every call)
    return name if name is not None else str(dtype).replace("torch.", "")


@dataclass(eq=False, slots=True)
class TensorHandle:
    """One tensor of a checkpoint, not yet read.

    Attributes:
        name: the (flattened) tensor name.
        shape: its shape.
        dtype: the torch dtype ``materialize()`` returns.
        storage_dtype: how the file stores it (``"float32"``, ``"bfloat16"``, ``"Q4_K"``...).
        nbytes: bytes the file spends on it (quantized blocks and scales included).
        materialize: returns the tensor on the CPU; for mmap-backed formats a view
            into the mapped file (no copy).
        mapped: True when ``materialize()`` returns a view of a file mapping, so that
            the engine may drop its pages once processed (never true for anonymous memory).
        source: the file the tensor is read from ("" for tensors in memory), for messages.
        span: ``(base, begin, end)`` when the tensor's bytes are ``base[begin:end]`` of a
            uint8 view of a mapped file (safetensors): the engine reads runs of adjacent
            small tensors as one slice, without materialising each.
        tied_to: the name of the tensor this one shares its values with (tied weights:
            the same elements of one storage in a pickle or a live module (a transpose
            too), a
            duplicate that safetensors' ``save_model`` dropped, or ``tie_word_embeddings``
            in a neighbouring config.json); None when not tied. A tied tensor is the
            same parameter as its target: counted once.
        storage_key: identity of the storage the file holds this tensor in (tensors of
            one storage share it); None when the tensor has its own bytes.
        storage_nbytes: bytes of that whole storage as the file holds it (a saved slice
            ``b[:10]`` of a 100,000-float storage stores all 400,000 bytes).
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    materialize: Callable[[], torch.Tensor]
    storage_dtype: str = ""
    mapped: bool = False
    source: str = ""
    span: tuple[torch.Tensor, int, int] | None = None
    tied_to: str | None = None
    storage_key: Any = None
    storage_nbytes: int | None = None
    numel: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.storage_dtype:
            self.storage_dtype = dtype_name(self.dtype)
        self.numel = math.prod(self.shape)


@dataclass(eq=False)
class Checkpoint:
    """A checkpoint: tensor handles by name plus non-tensor metadata.

    ``metadata`` holds scalar leaves of training checkpoints (lr, epoch, loss, config
    values) by dotted name; ``info`` holds format-level facts (safetensors
    ``__metadata__``, GGUF key/values) that are shown but not diffed as training state.
    ``files`` holds the state (:func:`file_state`) of every file read, taken when it
    was opened, for :func:`check_unchanged`.
    """

    name: str
    format: str
    tensors: dict[str, TensorHandle]
    metadata: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    _closers: list[Callable[[], None]] = field(default_factory=list, repr=False)
    files: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)
    #: tied names the file does not hold -> the held tensor they share values with
    #: (``lm_head.weight -> transformer.wte.weight`` in an HF safetensors file); names
    #: held and tied carry ``TensorHandle.tied_to`` instead.
    ties: dict[str, str] = field(default_factory=dict)

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def __getitem__(self, name: str) -> torch.Tensor:
        handle = self.tensors.get(name) if isinstance(name, str) else None
        if handle is None:
            import difflib

            close = difflib.get_close_matches(str(name), list(self.tensors), n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise UnknownTensorError(f"{name!r} is not a tensor of {self.name} ({len(self.tensors)} tensors{hint})")
        return handle.materialize()

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def keys(self):
        return self.tensors.keys()

    @property
    def nbytes(self) -> int:
        return sum(h.nbytes for h in self.tensors.values())

    @property
    def params(self) -> int:
        """Parameters, each tied tensor counted once."""
        return sum(h.numel for h in self.tensors.values() if h.tied_to is None)

    @property
    def stored_nbytes(self) -> int:
        """Bytes the file holds for its tensors: each storage once, whole (see
        :func:`stored_bytes`)."""
        return sum(stored_bytes(self.tensors.values()).values())

    def close(self) -> None:
        while self._closers:
            self._closers.pop()()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def stored_bytes(handles, names=None) -> dict[str, int]:
    """Bytes each handle stands for in the file, so that the sum is what the file holds:
    the first handle of a storage carries the whole storage, the others (tied weights,
    views of one storage) 0. Keyed by ``names`` (one per handle) or the handles' names."""
    out: dict[str, int] = {}
    seen: set = set()
    handles = list(handles)
    for name, h in zip(names if names is not None else [h.name for h in handles], handles):
        if h.storage_key is None:
            out[name] = 0 if h.tied_to is not None else h.nbytes
        elif h.storage_key in seen:
            out[name] = 0
        else:
            seen.add(h.storage_key)
            out[name] = h.storage_nbytes if h.storage_nbytes is not None else h.nbytes
    return out


def module_ties(module: torch.nn.Module, rename: Callable[[str], str] | None = None) -> dict[str, str]:
    """``{name: the first name of the same Parameter or buffer}`` for what ``module``
    registers under two names (tied weights), decided from its objects, not from storages:
    it holds for FSDP2's DTensors too, whose storages show nothing shared. ``rename``: the
    names as the caller keys them."""
    first: dict[int, str] = {}
    ties: dict[str, str] = {}
    for key, value in [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]:
        key = rename(key) if rename is not None else key
        target = first.setdefault(id(value), key)
        if target != key:
            ties[key] = target
    return ties


def mark_ties(handles: Mapping[str, TensorHandle], ties: Mapping[str, str]) -> None:
    """Set ``tied_to`` from ``ties`` (``module_ties``) on the handles held with their
    target, where nothing else marked them."""
    for name, target in ties.items():
        handle = handles.get(name)
        if handle is not None and handle.tied_to is None and target in handles:
            handle.tied_to = target


def mark_shared(handles: dict[str, TensorHandle], tensors: Mapping[str, torch.Tensor], key_prefix: Any = None,
                storages: bool = True) -> None:
    """Set ``tied_to`` (and, with ``storages``, ``storage_key``/``storage_nbytes``) on
    handles of in-memory or mapped tensors: two tensors of one dtype viewing the same
    elements of one storage (the same offset, shape and strides, or a transpose or
    permutation of them: ``_elements``) are tied; the first name in order is the target. A DTensor
    (an FSDP2 or tensor-parallel state_dict) is seen through this rank's shard: two
    DTensors whose shards view the same elements are tied."""
    first: dict[tuple, str] = {}
    for name, t in tensors.items():
        handle = handles.get(name)
        if handle is None or t.layout != torch.strided or t.is_sparse or t.is_quantized:
            continue  # bytes of their own (values and indices; codes, scales and zero points): handle.nbytes
        local = _local_shard(t)
        try:
            storage = local.untyped_storage()
            ptr = storage.data_ptr()
        except (RuntimeError, NotImplementedError):
            continue
        if storages and local is t:
            handle.storage_key = (key_prefix, ptr, storage.nbytes()) if ptr else (key_prefix, "empty", name)
            handle.storage_nbytes = storage.nbytes()
        if not ptr or local.numel() == 0:
            continue
        view = (ptr, local.storage_offset(), _elements(local), t.dtype)
        if view in first:
            handle.tied_to = first[view]
        else:
            first[view] = name


def _elements(t: torch.Tensor) -> tuple[tuple[int, int], ...]:
    """Which elements of its storage (from its offset) ``t`` views, whatever their order
    and shape: its (size, stride) pairs by stride, size-1 dimensions left out, and a
    dimension merged into the next when that one steps over it whole (stride = size ×
    stride). A transpose, a permutation or a flattening of a tensor views the same
    elements, so it is the same parameter."""
    dims: list[tuple[int, int]] = []
    for size, stride in sorted(((size, stride) for size, stride in zip(t.shape, t.stride()) if size != 1),
                               key=lambda d: (d[1], d[0])):
        if dims and stride == dims[-1][0] * dims[-1][1]:
            dims[-1] = (dims[-1][0] * size, dims[-1][1])
        else:
            dims.append((size, stride))
    return tuple(dims)


def _local_shard(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (no communication); any other tensor itself."""
    to_local = getattr(t, "to_local", None)
    if to_local is not None and hasattr(t, "placements"):
        return to_local()
    return t


def file_state(path: str) -> tuple[int, ...]:
    """What tells a file's contents changed: (size, mtime, inode, device). Not ctime,
    which a chmod or a hard link elsewhere changes too."""
    st = os.stat(path)
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


def _changed(path: str, state: tuple[int, ...]) -> str | None:
    """How ``path`` differs from ``state`` (None when it does not)."""
    try:
        now = file_state(path)
    except OSError:
        return "it was removed"
    if now[2:] != state[2:]:
        return "it was replaced by another file"
    if now[0] != state[0]:
        return f"its size went from {state[0]} to {now[0]} bytes"
    if now != state:
        return "it was modified"
    return None


def check_unchanged(files: Mapping[str, tuple[int, ...]]) -> None:
    """Raise CorruptFileError if a file changed since its state was taken.

    Figures computed from a file that changed underneath would mix old and new bytes.
    """
    for path, state in files.items():
        how = _changed(path, state)
        if how is not None:
            raise _changed_error(path, how)


def _changed_error(path: str, how: str) -> CorruptFileError:
    return CorruptFileError(
        f"{path}: changed while being read ({how}); the figures would mix old and new "
        "contents (rerun once nothing is writing to the file)"
    )


def available_memory() -> int | None:
    """Bytes this process can still allocate without swapping, as far as Linux tells
    (MemAvailable, capped by a cgroup v2 limit); None elsewhere."""
    try:
        with open("/proc/meminfo", "rb") as f:
            found = [line for line in f.read().splitlines() if line.startswith(b"MemAvailable:")]
        available = int(found[0].split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        return None
    try:
        with open("/sys/fs/cgroup/memory.max", "rb") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current", "rb") as f:
            current = int(f.read().strip())
        if limit != b"max":
            available = min(available, max(int(limit) - current, 0))
    except (OSError, ValueError):
        pass
    return available


def check_memory(path: str, what: str, nbytes: int, verb: str) -> None:
    """Refuse to decode ``nbytes`` into memory when the machine does not have them:
    a compressed member may legitimately inflate 1000-fold (or lie about it), and one
    clear error beats the out-of-memory killer."""
    available = available_memory()
    if available is not None and nbytes > available:
        raise TooLargeError(
            f"{path}: {what} would {verb} to {_human(nbytes)}, more than the {_human(available)} of memory "
            "available (a zip bomb, or a machine too small for it)"
        )


def _human(nbytes: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{nbytes} bytes"


# What a reader's materialize() may raise on bytes it did not expect (bugs aside).
_READ_ERRORS = (RuntimeError, ValueError, TypeError, OverflowError, OSError, EOFError, IndexError, KeyError)


class FileGuard:
    """What every read of one file's tensors checks first, shared by its handles.

    With ``state`` (the file's state when opened), a file truncated, rewritten or
    replaced since raises CorruptFileError instead of handing out values mixed from two
    versions, or a view of a mapping whose pages are gone (touching a mapping past the
    end of a truncated file kills the process with SIGBUS). The check narrows that
    window; it cannot close it: see docs/SECURITY.md. Every failure of the read names
    the file and the tensor.
    """

    __slots__ = ("path", "state")

    def __init__(self, path: str, state: tuple[int, ...] | None):
        self.path, self.state = path, state

    def read(self, name: str, read: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
        """``read(*args)``, the values of tensor ``name``, after the check."""
        if self.state is not None:
            how = _changed(self.path, self.state)
            if how is not None:
                raise _changed_error(self.path, how)
        try:
            return read(*args)
        except _READ_ERRORS as e:
            text = str(e).strip()
            detail = (text.splitlines()[0] if text else "unreadable")[:200]
            raise CorruptFileError(
                f"{self.path}: tensor {name!r} cannot be read ({type(e).__name__}: {detail})") from None


def watch(handle: TensorHandle, path: str, state: tuple[int, ...] | None) -> None:
    """Make ``handle.materialize()`` go through a :class:`FileGuard` of ``path`` (readers
    of many tensors build their handles with one guard instead: formats/safetensors.py)."""
    handle.materialize = functools.partial(FileGuard(path, state).read, handle.name, handle.materialize)
    handle.source = path


def tensor_handle(name: str, tensor: torch.Tensor, mapped: bool = False) -> TensorHandle:
    """A handle for a tensor already in memory (or already a view of a mapping).

    A sparse tensor is compared as its dense values (storage dtype ``sparse <dtype>``,
    bytes as stored: values and indices); a tensor of torch's quantized dtypes
    (``torch.ao`` models: ``quint8``, ``qint8``, ``qint32``) as its dequantized values
    (float32, marked dequantized; bytes: the codes plus scales and zero points)."""
    if tensor.layout != torch.strided:
        return TensorHandle(
            name=name, shape=tuple(tensor.shape), dtype=tensor.dtype, nbytes=_sparse_nbytes(tensor),
            materialize=tensor.to_dense, storage_dtype="sparse " + dtype_name(tensor.dtype),
        )
    if tensor.is_quantized:
        return TensorHandle(
            name=name, shape=tuple(tensor.shape), dtype=torch.float32, nbytes=_quantized_nbytes(tensor),
            materialize=tensor.dequantize, storage_dtype=dtype_name(tensor.dtype),
        )
    return TensorHandle(
        name=name,
        shape=tuple(tensor.shape),
        dtype=tensor.dtype,
        nbytes=tensor.numel() * tensor.element_size(),
        materialize=lambda: tensor,
        mapped=mapped,
    )


def _sparse_nbytes(t: torch.Tensor) -> int:
    """Bytes a sparse tensor holds: its values and its index tensors."""
    if t.layout == torch.sparse_coo:
        parts = (t._values(), t._indices())
    elif t.layout in (torch.sparse_csr, torch.sparse_bsr):
        parts = (t.values(), t.crow_indices(), t.col_indices())
    else:  # sparse_csc, sparse_bsc
        parts = (t.values(), t.ccol_indices(), t.row_indices())
    return sum(p.numel() * p.element_size() for p in parts)


#: torch.ao's sub-byte quantized dtypes: bits a code (element_size() says 1 byte).
_PACKED_QUANT_BITS = {dt: b for dt, b in ((getattr(torch, "quint4x2", None), 4), (getattr(torch, "quint2x4", None), 2))
                      if dt is not None}


def _quantized_nbytes(t: torch.Tensor) -> int:
    """Bytes a quantized tensor holds: its integer codes, plus its scales and zero points
    (one each per tensor, or per channel)."""
    bits = _PACKED_QUANT_BITS.get(t.dtype, 8 * t.element_size())  # quint4x2: two codes a byte
    codes = -(-t.numel() * bits // 8)
    if t.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric,
                       torch.per_channel_affine_float_qparams):
        params = t.q_per_channel_scales(), t.q_per_channel_zero_points()
        return codes + sum(p.numel() * p.element_size() for p in params)
    return codes + 16  # one float64 scale, one int64 zero point


class Record:
    """An object of a class torchdiff does not import, read from a pickle as data: the
    arguments it was made with (``args``) and the state it was given (``state``), under
    the pickle's name for its class (``global_name``). Building one runs nothing
    (formats/torch_pickle.py)."""

    global_name = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> "Record":
        self = object.__new__(cls)
        self.args, self.state = args, None
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<{self.global_name}>"


def _flatten_record(rec: Record, prefix: str, tensors: dict, metadata: dict, path: dict[int, str]) -> None:
    """A record's tensors and values: a pickled ``nn.Module`` as its ``state_dict`` would
    name them (parameters, persistent buffers, submodules), other state as a mapping, else
    its arguments; a record of scalars is one metadata value, ``Name(arg, ...)``."""
    state = rec.state
    if (isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], Mapping)
            and (state[0] is None or isinstance(state[0], Mapping))):  # (__dict__, slots)
        state = {**(state[0] or {}), **state[1]}
    join = (lambda name: f"{prefix}.{name}" if prefix else str(name))
    if isinstance(state, Mapping) and ("_parameters" in state or "_modules" in state):
        skip = set(state.get("_non_persistent_buffers_set") or ())
        for key in ("_parameters", "_buffers"):
            for name, value in (state.get(key) or {}).items():
                if value is not None and name not in skip:
                    flatten(value, join(name), tensors, metadata, path)
        for name, module in (state.get("_modules") or {}).items():
            if module is not None:
                flatten(module, join(name), tensors, metadata, path)
    elif state is not None:
        flatten(state if isinstance(state, (Mapping, list, tuple)) else [state], prefix, tensors, metadata, path)
    elif rec.args and all(is_scalar_leaf(a) for a in rec.args):
        metadata[prefix or "value"] = f"{rec.global_name}({', '.join(map(repr, rec.args))})"
    elif rec.args:
        flatten(list(rec.args), prefix, tensors, metadata, path)
    else:
        metadata[prefix or "value"] = f"<{rec.global_name}>"


def is_scalar_leaf(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def bytes_text(data: bytes | bytearray) -> str:
    """``<bytes: N sha256:16 hex digits>``: a raw bytes value (a pickled dataloader state,
    a tokenizer blob) as a metadata value, so that two of one length but other content
    differ; the bytes are never unpickled."""
    return f"<{type(data).__name__}: {len(data)} sha256:{hashlib.sha256(data).hexdigest()[:16]}>"


def flatten(
    obj: Any, prefix: str = "", tensors: dict | None = None, metadata: dict | None = None,
    _path: dict[int, str] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten nested dicts/lists of tensors into dotted names.

    Tensors go to ``tensors``; scalar leaves (and short lists of scalars) go to
    ``metadata``; anything else is recorded by its type name in ``metadata``. A container
    that holds itself, directly or deeper (a pickle may: a record's parent pointer, a dict
    stored under its own key), is flattened once: where it recurs, ``metadata`` says
    ``<cycle: same object as NAME>``. (``_path``: the containers being flattened, by id.)
    """
    tensors = {} if tensors is None else tensors
    metadata = {} if metadata is None else metadata
    if isinstance(obj, torch.Tensor):
        if obj.requires_grad:  # a pickled nn.Parameter: its values
            obj = obj.detach()
        if obj.is_nested:  # a nested tensor: its components, each a tensor (prefix.0, prefix.1, ...)
            for i, part in enumerate(obj.unbind()):
                flatten(part, f"{prefix}.{i}" if prefix else str(i), tensors, metadata, _path)
            return tensors, metadata
        if obj.is_meta:  # shape and dtype only (a model built on the meta device): no values to compare
            metadata[prefix or "tensor"] = f"<meta tensor {list(obj.shape)} {dtype_name(obj.dtype)}: no values stored>"
        else:  # a bare tensor, 0-d included, is the file's one tensor ("tensor")
            _put(tensors, prefix or "tensor", obj)
        return tensors, metadata
    if is_scalar_leaf(obj):
        metadata[prefix or "value"] = obj
        return tensors, metadata
    if isinstance(obj, torch.dtype):  # torch.ao's packed params record their dtype: its name
        metadata[prefix or "value"] = dtype_name(obj)
        return tensors, metadata
    if isinstance(obj, (bytes, bytearray)):
        metadata[prefix or "value"] = bytes_text(obj)
        return tensors, metadata
    _path = {} if _path is None else _path
    if id(obj) in _path:
        metadata[prefix or "value"] = f"<cycle: same object as {_path[id(obj)] or 'the whole file'}>"
        return tensors, metadata
    _path[id(obj)] = prefix
    try:
        _flatten_container(obj, prefix, tensors, metadata, _path)
    finally:
        del _path[id(obj)]
    return tensors, metadata


def _put(tensors: dict, name: str, value: torch.Tensor) -> None:
    """One tensor under its dotted name; two under one name (a key ``"a.b"`` beside a nested
    ``a`` → ``b``, a key ``0`` beside ``"0"``) is refused: one would hide the other."""
    if name in tensors:
        raise CorruptFileError(f"two tensors flatten to the name {name!r} (a key with dots beside nested keys, "
                               "or 0 beside '0'); not read, since one would hide the other")
    tensors[name] = value


def _flatten_container(obj: Any, prefix: str, tensors: dict, metadata: dict, path: dict[int, str]) -> None:
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            flatten(value, f"{prefix}.{key}" if prefix else str(key), tensors, metadata, path)
    elif isinstance(obj, (list, tuple)):
        module = _packed_module(prefix, obj)
        if module is not None:  # torch.ao LinearPackedParams: (weight, bias) as a quantized Linear's own names
            for leaf, value in zip(("weight", "bias"), obj):
                if value is not None:
                    flatten(value, f"{module}.{leaf}" if module else leaf, tensors, metadata, path)
        elif obj and all(is_scalar_leaf(v) or isinstance(v, (bytes, bytearray)) for v in obj):
            metadata[prefix] = [bytes_text(v) if isinstance(v, (bytes, bytearray)) else v for v in obj]
        elif not obj:
            metadata[prefix] = []
        else:
            for i, value in enumerate(obj):
                flatten(value, f"{prefix}.{i}" if prefix else str(i), tensors, metadata, path)
    elif isinstance(obj, Record):  # an object of a class torch does not allow, read as data
        _flatten_record(obj, prefix, tensors, metadata, path)
    elif isinstance(obj, torch.nn.Module):  # a pickled module (--unsafe-pickle): its state_dict
        flatten(obj.state_dict(), prefix, tensors, metadata, path)
    elif _is_namespace(obj):  # argparse.Namespace / SimpleNamespace: its values are metadata
        flatten(dict(vars(obj)), prefix, tensors, metadata, path)
    else:
        item = getattr(obj, "item", None)
        array = _numpy_tensor(obj)
        if array is not None:
            if array.ndim == 0 and not prefix:
                metadata["value"] = array.item()
            else:
                _put(tensors, prefix or "tensor", array)
        elif callable(item) and getattr(obj, "shape", None) == ():
            metadata[prefix] = item()
        else:
            # Kept as a visible placeholder: what was skipped is listed, never dropped silently.
            metadata[prefix or "value"] = f"<{type(obj).__name__}>"


#: Where a torch.ao quantized Linear (static or dynamic) saves its weight and bias: one
#: tuple ``(qint8 weight, float bias or None)`` under ``<module>._packed_params._packed_params``.
PACKED_PARAMS = "_packed_params._packed_params"


def _packed_module(prefix: str, obj: Any) -> str | None:
    """The module name of a torch.ao packed (weight, bias) tuple at ``prefix``, whose
    tensors are then named ``<module>.weight`` and ``<module>.bias``, the float Linear's
    names (so that a quantized model pairs with its float original); None otherwise."""
    if not (prefix == PACKED_PARAMS or prefix.endswith("." + PACKED_PARAMS)):
        return None
    if not (isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], torch.Tensor)
            and (obj[1] is None or isinstance(obj[1], torch.Tensor))):
        return None
    return prefix[: -len(PACKED_PARAMS)].rstrip(".")


def _is_namespace(obj: Any) -> bool:
    import argparse
    import types

    return isinstance(obj, (argparse.Namespace, types.SimpleNamespace))


def _numpy_tensor(obj: Any) -> torch.Tensor | None:
    """A numpy array of a numeric or bool dtype as a tensor (shares its memory); else None."""
    if type(obj).__module__ != "numpy" or getattr(obj, "ndim", None) is None or not hasattr(obj, "dtype"):
        return None
    import numpy as np

    if not isinstance(obj, np.ndarray) or obj.dtype.kind not in "biufc":
        return None
    try:
        return torch.from_numpy(np.require(obj, requirements="C"))  # ascontiguousarray made a 0-d array [1]
    except (TypeError, ValueError):  # a dtype torch lacks (uint16 in old torch, float128)
        return None
