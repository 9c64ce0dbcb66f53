"""torch.distributed.checkpoint (DCP) directories: FSDP/FSDP2, torchtitan ``step-N/``,
Lightning's FSDP strategy, verl, Megatron-core ``torch_dist``.

Layout (torch's ``FileSystemWriter``): ``.metadata``, a pickled
``torch.distributed.checkpoint.metadata.Metadata``, and data files
``__{rank}_{n}.distcp``. ``Metadata.state_dict_metadata`` maps each flattened name to a
``TensorStorageMetadata`` (dtype, global shape, chunks: offsets and sizes in the
global tensor) or a ``BytesStorageMetadata`` (any other object, torch.save'd);
``Metadata.storage_data`` maps ``MetadataIndex(name, chunk offsets)`` to a
``_StorageInfo(relative_path, offset, length)``: the byte range of one chunk in one
data file. In torch's default ``torch_save`` serialization each range holds a whole
``torch.save`` archive of that chunk (of the object, for bytes entries).

How it is read here:

- ``.metadata`` goes through a restricted unpickler that resolves only DCP's own
  metadata classes, torch.Size, dtypes and layouts, and plain containers
  (:data:`ALLOWED`); any other global is refused before anything is built, so no
  payload can run. ``--unsafe-pickle`` does not widen this list. No process group is
  needed.
- Everything the metadata claims is checked when the directory is opened: shapes,
  chunk boxes inside the tensor, chunks that tile it exactly (no overlap, no gap), one
  storage entry per chunk, data files inside the directory and present, byte ranges
  inside their files.
- A chunk's values are read when its tensor is materialised: ``torch.load`` with
  ``weights_only=True`` and ``map_location="meta"`` on the chunk's byte range reads the
  archive's small pickle and tells where its one storage record lies, and the values
  are a zero-copy view of a private (copy-on-write) mapping of the data file. A tensor
  stored as one chunk (any single-process save) is therefore mapped like a
  safetensors tensor; a tensor split over several chunks (an FSDP save) is assembled
  into one buffer, only when materialised.
- ``BytesStorageMetadata`` entries (step, lr, param_groups, RNG and dataloader state)
  are decoded with ``torch.load(weights_only=True)`` and flattened into metadata
  values; raw ``bytes`` inside them (a pickled dataloader state) become
  ``<bytes: N sha256:...>``; what does not decode safely is listed as
  ``<opaque bytes: N sha256:...>`` (hashed, so that other content of one length differs).
- Beside the DCP files: Lightning's ``meta.pt`` (weights-only) and Megatron-core's
  ``metadata.json`` / ``common.pt`` (weights-only; Megatron's common.pt usually needs
  code and is then only named) go to ``info``; Megatron's ``mcore_data`` (tensors it
  reformulated on save) is named in ``info``, the tensors are compared as stored.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import mmap
import os
import pickle
import struct
import warnings
import zipfile
from typing import Any

import numpy as np
import torch

from torchdiff.errors import (
    CorruptFileError, InputNotFoundError, MissingDependencyError, UnsafeCheckpointError, UsageError,
)
from torchdiff.formats.base import (
    Checkpoint, TensorHandle, check_memory, check_unchanged, file_state, flatten, tensor_handle, watch,
)

METADATA = ".metadata"
DATA_SUFFIX = ".distcp"
#: DCP metadata versions this reader understands (``Metadata.version``; None before torch 2.4).
READ_VERSIONS = ("1",)
#: Bytes entries larger than this are listed, not decoded.
MAX_DECODED_BYTES = 64 << 20

_DCP_MODULE = "torch.distributed.checkpoint.metadata"
_OLD_SHARD_MODULE = "torch.distributed._shard.sharded_tensor.metadata"  # torch 2.0-2.1 pickles
_PATH_CLASSES = ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")
_ALLOWED: dict[tuple[str, str], Any] | None = None


def _path_text(*parts: Any) -> str:
    """What a pickled pathlib path (``StorageMeta.checkpoint_id``) becomes: its text."""
    return os.path.join(*[str(p) for p in parts]) if parts else ""


def allowed_globals() -> dict[tuple[str, str], Any]:
    """(module, name) -> object: everything a ``.metadata`` pickle may name."""
    global _ALLOWED
    if _ALLOWED is not None:
        return _ALLOWED
    try:
        from torch.distributed.checkpoint import filesystem as fs
        from torch.distributed.checkpoint import metadata as md
    except ImportError as e:  # a torch built without torch.distributed
        raise MissingDependencyError(
            f"reading a DCP checkpoint needs torch.distributed, absent from this torch build ({e})"
        ) from None
    allowed: dict[tuple[str, str], Any] = {}
    for name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                 "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"):
        if hasattr(md, name):
            allowed[(_DCP_MODULE, name)] = getattr(md, name)
    allowed[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = fs._StorageInfo
    # torch 2.0-2.1 pickled TensorProperties from its sharded-tensor module; same state layout.
    allowed[(_OLD_SHARD_MODULE, "TensorProperties")] = md.TensorProperties
    allowed[(_OLD_SHARD_MODULE, "MEM_FORMAT_ENCODING")] = md._MEM_FORMAT_ENCODING
    allowed[("torch", "Size")] = torch.Size
    for name in dir(torch):
        value = getattr(torch, name, None)
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            allowed[("torch", name)] = value
    allowed[("torch.serialization", "_get_layout")] = _layout
    allowed[("collections", "OrderedDict")] = __import__("collections").OrderedDict
    for module in ("pathlib", "pathlib._local"):
        for name in _PATH_CLASSES:
            allowed[(module, name)] = _path_text
    _ALLOWED = allowed
    return allowed


def _layout(name: str) -> torch.layout:
    """``torch.serialization._get_layout`` for the layouts torch has, nothing else."""
    value = getattr(torch, str(name).removeprefix("torch."), None) if isinstance(name, str) else None
    if not isinstance(value, torch.layout):
        raise pickle.UnpicklingError(f"unknown layout {name!r}")
    return value


class _Refused(pickle.UnpicklingError):
    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.module, self.name = module, name


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        found = allowed_globals().get((module, name))
        if found is None:
            raise _Refused(module, name)
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not part of DCP metadata")


def read_metadata(path: str) -> Any:
    """The ``Metadata`` of the ``.metadata`` file ``path``, through the restricted unpickler."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise InputNotFoundError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        # A lying BYTEARRAY8 length makes CPython's unpickler fail to allocate and print a
        # stray "SystemError: deallocated bytearray" line on stderr; the failure itself is
        # reported below, as one line.
        with contextlib.redirect_stderr(io.StringIO()):
            found = _MetadataUnpickler(io.BytesIO(raw)).load()
    except _Refused as e:
        if e.module.startswith("torch.distributed"):
            why = (f"names {e.module}.{e.name}, which this torch {torch.__version__} does not allow in DCP "
                   "metadata (written by another torch version, or a custom planner)")
        else:
            why = f"names {e.module}.{e.name}, not one of DCP's metadata classes"
        raise UnsafeCheckpointError(
            f"{path}: refused, the DCP metadata pickle {why}; torchdiff loads it with a restricted unpickler "
            "that never runs code (--unsafe-pickle does not apply to DCP metadata)"
        ) from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, IndexError, KeyError,
            RecursionError, MemoryError, OverflowError, UnicodeDecodeError, struct.error, RuntimeError) as e:
        detail = (str(e).strip().splitlines() or ["unreadable"])[0][:200]
        raise CorruptFileError(
            f"{path}: not a readable DCP .metadata pickle ({type(e).__name__}: {detail}) "
            "(truncated, or not written by torch.distributed.checkpoint)"
        ) from None
    if not isinstance(found, Metadata):
        raise CorruptFileError(f"{path}: not DCP metadata (the pickle holds a {type(found).__name__}, not a Metadata)")
    version = getattr(found, "version", None)
    if version is not None and str(version).split(".")[0] not in READ_VERSIONS:
        raise CorruptFileError(
            f"{path}: DCP metadata version {str(version)[:40]!r}, which torchdiff does not read (it reads "
            f"{', '.join(v + '.x' for v in READ_VERSIONS)}, as torch {torch.__version__} writes; "
            "convert it with a torch that reads it: torch.distributed.checkpoint.format_utils.dcp_to_torch_save)"
        )
    return found


# ---- checks on what the metadata claims ---------------------------------------------


def _ints(value: Any) -> tuple[int, ...] | None:
    if not isinstance(value, (tuple, list)) or not all(type(v) is int and v >= 0 for v in value):
        return None
    return tuple(value)


class _Chunk:
    __slots__ = ("offsets", "sizes", "file", "begin", "length")

    def __init__(self, offsets: tuple[int, ...], sizes: tuple[int, ...], file: str, begin: int, length: int):
        self.offsets, self.sizes, self.file, self.begin, self.length = offsets, sizes, file, begin, length


def _check_tiling(where: str, shape: tuple[int, ...], chunks: list[_Chunk]) -> None:
    """Chunks inside the tensor that cover it exactly once."""
    for c in chunks:
        if len(c.offsets) != len(shape) or len(c.sizes) != len(shape):
            raise CorruptFileError(f"{where}: a chunk has offsets {list(c.offsets)} and sizes {list(c.sizes)} "
                                   f"for a tensor of {len(shape)} dimensions")
        if any(o + s > d for o, s, d in zip(c.offsets, c.sizes, shape)):
            raise CorruptFileError(f"{where}: chunk at offsets {list(c.offsets)} of sizes {list(c.sizes)} "
                                   f"lies outside the tensor's shape {list(shape)}")
    total = sum(math.prod(c.sizes) for c in chunks)
    if total != math.prod(shape):
        raise CorruptFileError(f"{where}: its chunks hold {total} elements, its shape {list(shape)} "
                               f"{math.prod(shape)} (chunks missing or overlapping)")
    if len(chunks) > 1 and shape:
        lo = np.array([c.offsets for c in chunks], dtype=np.int64)
        hi = lo + np.array([c.sizes for c in chunks], dtype=np.int64)
        nonempty = np.all(hi > lo, axis=1)
        lo, hi = lo[nonempty], hi[nonempty]
        for start in range(0, len(lo), 512):  # every pair of boxes, 512 rows at a time (bounded memory)
            meet = np.all(np.maximum(lo[start:start + 512, None], lo[None]) <
                          np.minimum(hi[start:start + 512, None], hi[None]), axis=2)
            meet[np.arange(meet.shape[0]), np.arange(start, start + meet.shape[0])] = False  # a box with itself
            if meet.any():
                raise CorruptFileError(f"{where}: two of its chunks overlap (the metadata is inconsistent)")


# ---- reading chunks ------------------------------------------------------------------


class _RangeFile(io.RawIOBase):
    """A read-only, seekable file over bytes [begin, begin + length) of a buffer."""

    def __init__(self, buffer: memoryview, begin: int, length: int):
        super().__init__()
        self._buf, self._begin, self._length, self._pos = buffer, begin, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._length}[whence]
        if base + pos < 0:
            raise ValueError("negative seek position")
        self._pos = base + pos
        return self._pos

    def readinto(self, out: Any) -> int:
        n = max(0, min(len(out), self._length - self._pos))
        start = self._begin + self._pos
        out[:n] = self._buf[start:start + n]
        self._pos += n
        return n


class _Files:
    """Private (copy-on-write) mappings of the data files, opened on first use."""

    def __init__(self) -> None:
        self.maps: dict[str, mmap.mmap] = {}
        self.bases: dict[str, torch.Tensor] = {}

    def base(self, path: str) -> torch.Tensor:
        base = self.bases.get(path)
        if base is None:
            with open(path, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            self.maps[path] = mm
            base = self.bases[path] = torch.frombuffer(mm, dtype=torch.uint8)
        return base

    def range(self, path: str, begin: int, length: int) -> _RangeFile:
        self.base(path)
        return _RangeFile(memoryview(self.maps[path]), begin, length)

    def drop_pages(self, path: str, begin: int, length: int) -> None:
        """Release the whole pages of bytes [begin, begin + length) from this process's
        memory (MADV_DONTNEED: a private mapping never written reads them back from the
        file if touched again)."""
        mm = self.maps.get(path)
        if mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = -(-begin // mmap.PAGESIZE) * mmap.PAGESIZE
        end = (begin + length) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > start:
            mm.madvise(mmap.MADV_DONTNEED, start, end - start)

    def close(self) -> None:
        self.bases.clear()
        self.maps.clear()  # the mappings close once no tensor views them


def _load_range(files: _Files, c: _Chunk, map_location: str | None) -> Any:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        return torch.load(files.range(c.file, c.begin, c.length), weights_only=True, map_location=map_location)


_LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, KeyError,
                IndexError, TypeError, AttributeError, UnicodeDecodeError, MemoryError, OverflowError, AssertionError,
                struct.error)


def _read_chunk(files: _Files, c: _Chunk, name: str, dtype: torch.dtype) -> torch.Tensor:
    """The chunk's values: a view of the mapped data file."""
    where = f"{c.file}: tensor {name!r}, chunk at offsets {list(c.offsets)} (bytes {c.begin}..{c.begin + c.length})"
    meta = _load_chunk(files, c, "meta", where)
    if not isinstance(meta, torch.Tensor):
        raise CorruptFileError(f"{where} holds a {type(meta).__name__}, not a tensor")
    if tuple(meta.shape) != c.sizes or meta.dtype != dtype:
        raise CorruptFileError(f"{where} holds a {dtype_text(meta.dtype)} tensor of shape {list(meta.shape)}; "
                               f"the metadata says {dtype_text(dtype)} {list(c.sizes)}")
    record = getattr(meta.untyped_storage(), "_checkpoint_offset", None)
    itemsize = meta.element_size()
    nbytes = meta.untyped_storage().nbytes()
    if not isinstance(record, int) or not meta.is_contiguous():
        # A torch without record offsets, or a strided chunk: read the range itself.
        return _load_chunk(files, c, "cpu", where).contiguous()
    start = record + meta.storage_offset() * itemsize
    if record < 0 or record + nbytes > c.length or start + meta.numel() * itemsize > c.length:
        raise CorruptFileError(f"{where}: its data record runs past the chunk's byte range")
    if meta.numel() == 0:
        return torch.empty(c.sizes, dtype=dtype)
    files.base(c.file)
    # A view of the mapping, aligned or not: torch.save aligns records within its archive,
    # not the archive within the data file, and torch reads unaligned CPU data correctly.
    return torch.frombuffer(files.maps[c.file], dtype=dtype, count=meta.numel(), offset=c.begin + start).view(c.sizes)


def _load_chunk(files: _Files, c: _Chunk, map_location: str, where: str) -> Any:
    try:
        return _load_range(files, c, map_location)
    except _LOAD_ERRORS as e:
        if _safetensors_blob(files, c):
            raise CorruptFileError(
                f"{where} holds a safetensors file, not a torch.save archive: the checkpoint was written with "
                "FileSystemWriter(serialization_format=SerializationFormat.SAFETENSORS), whose byte ranges do not "
                "locate the tensors (torch's FileSystemReader cannot read it either); save it with the default "
                "torch_save format, or use torch's Hugging Face storage writer"
            ) from None
        detail = (str(e).strip().splitlines() or ["unreadable"])[0][:160]
        raise CorruptFileError(f"{where} is not a torch.save archive of a tensor ({type(e).__name__}: {detail}) "
                               "(the file is damaged or the metadata lies)") from None


def _safetensors_blob(files: _Files, c: _Chunk) -> bool:
    """Whether the chunk's byte range starts a safetensors file (an 8-byte header length,
    then a JSON header with ``__metadata__``): what DCP's SAFETENSORS serialization writes
    after a rank's bytes entries, at the offset it records for every tensor."""
    try:
        base = files.base(c.file)
        if c.begin + 9 > base.numel():
            return False
        (size,) = struct.unpack("<Q", base[c.begin:c.begin + 8].numpy().tobytes())
        head = base[c.begin + 8:min(c.begin + 8 + size, c.begin + 8 + 4096, base.numel())].numpy().tobytes()
    except (OSError, ValueError):
        return False
    return head.startswith(b"{") and b'"__metadata__"' in head


def dtype_text(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---- the checkpoint ------------------------------------------------------------------


def _directory_of(path: str) -> str:
    if os.path.isdir(path):
        return path
    name = os.path.basename(path)
    if name == METADATA:
        return os.path.dirname(path) or "."
    if name.endswith(DATA_SUFFIX):
        parent = os.path.dirname(path) or "."
        if not os.path.isfile(os.path.join(parent, METADATA)):
            raise CorruptFileError(
                f"{path}: a {DATA_SUFFIX} file is one piece of a DCP checkpoint, and its directory has no {METADATA} "
                "(the checkpoint is incomplete: copy its .metadata too)"
            )
        raise UsageError(
            f"{path}: a {DATA_SUFFIX} file is one piece of a DCP checkpoint; pass the directory that holds it "
            f"and its {METADATA} ({parent})"
        )
    raise UsageError(f"{path}: not a DCP checkpoint (pass the directory holding {METADATA})")


def load(path: str) -> Checkpoint:
    directory = _directory_of(path)
    meta_path = os.path.join(directory, METADATA)
    try:
        return _load(path, directory)
    except (AttributeError, TypeError, ValueError, KeyError, IndexError, OverflowError, RuntimeError,
            RecursionError) as e:  # objects the metadata built without the state they need
        detail = (str(e).strip().splitlines() or ["unreadable"])[0][:200]
        raise CorruptFileError(
            f"{meta_path}: inconsistent DCP metadata ({type(e).__name__}: {detail}) "
            "(truncated or edited; re-copy the checkpoint)"
        ) from None


def _load(path: str, directory: str) -> Checkpoint:
    meta_path = os.path.join(directory, METADATA)
    if not os.path.isfile(meta_path):
        raise InputNotFoundError(f"{directory}: no {METADATA} file, so not a DCP checkpoint directory")
    files: dict[str, tuple[int, ...]] = {meta_path: file_state(meta_path)}
    md = read_metadata(meta_path)
    sdm, storage = md.state_dict_metadata, md.storage_data
    if not isinstance(sdm, dict) or not isinstance(storage, dict):
        raise CorruptFileError(f"{meta_path}: DCP metadata without a state_dict_metadata and storage_data map")
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    ranges: dict[tuple[str, tuple[int, ...] | None], tuple[str, int, int]] = {}
    sizes: dict[str, int] = {}
    for index, info in storage.items():
        fqn, offset = getattr(index, "fqn", None), getattr(index, "offset", None)
        if not isinstance(fqn, str) or not isinstance(info, _StorageInfo):
            raise CorruptFileError(f"{meta_path}: a storage_data entry is not a (MetadataIndex, _StorageInfo) pair")
        rel, begin, length = info.relative_path, info.offset, info.length
        if getattr(info, "transform_descriptors", None):
            raise CorruptFileError(
                f"{meta_path}: {fqn!r} is stored through stream transforms {list(info.transform_descriptors)!r} "
                "(a compressing extension); torchdiff reads plain DCP only"
            )
        if not isinstance(rel, str) or not rel or os.path.isabs(rel) or ".." in rel.replace("\\", "/").split("/"):
            raise CorruptFileError(f"{meta_path}: {fqn!r} is stored in {rel!r}, outside the checkpoint's directory")
        if type(begin) is not int or type(length) is not int or begin < 0 or length < 0:
            raise CorruptFileError(f"{meta_path}: {fqn!r} has byte range offset={begin!r} length={length!r}")
        file = os.path.join(directory, rel)
        if file not in sizes:
            if not os.path.isfile(file):
                raise CorruptFileError(
                    f"{meta_path}: {fqn!r} is stored in {rel}, which does not exist "
                    "(a data file is missing: copy the whole checkpoint directory)"
                )
            files[file] = file_state(file)
            sizes[file] = files[file][0]
        if begin + length > sizes[file]:
            raise CorruptFileError(
                f"{file}: {fqn!r} is stored at bytes {begin}..{begin + length}, past the end of the "
                f"{sizes[file]}-byte file (truncated, or the metadata lies)"
            )
        key = (fqn, None if offset is None else _ints(offset))
        ranges[key] = (file, begin, length)

    shared = _Files()
    tensors: dict[str, TensorHandle] = {}
    metadata: dict[str, Any] = {}
    opaque: list[str] = []
    split = 0
    for fqn, entry in sdm.items():
        if not isinstance(fqn, str):
            raise CorruptFileError(f"{meta_path}: a state_dict_metadata key is a {type(fqn).__name__}, not a name")
        if isinstance(entry, BytesStorageMetadata):
            found = ranges.get((fqn, None))
            if found is None:
                raise CorruptFileError(f"{meta_path}: {fqn!r} has no storage entry (the metadata is inconsistent)")
            _decode_bytes(shared, fqn, found, tensors, metadata, opaque)
            continue
        if not isinstance(entry, TensorStorageMetadata):
            raise CorruptFileError(f"{meta_path}: {fqn!r} is described by a {type(entry).__name__}")
        handle = _tensor(meta_path, shared, fqn, entry, ranges, files)
        split += len(handle.chunks) > 1
        tensors[fqn] = handle.handle
    info: dict[str, Any] = {"dcp": {
        "version": getattr(md, "version", None), "data_files": len(sizes), "split_tensors": split,
    }}
    if opaque:
        info["dcp"]["opaque_bytes"] = opaque
    mcore = getattr(md, "mcore_data", None)
    if isinstance(mcore, dict):  # Megatron: tensors stored N-D-reformulated, with their original global shape
        shapes = {str(k): _ints(v.get("nd_reformulated_orig_global_shape")) for k, v in mcore.items()
                  if isinstance(v, dict) and "nd_reformulated_orig_global_shape" in v}
        if shapes:
            info.setdefault("megatron", {})["reformulated"] = {
                k: list(v) if v is not None else None for k, v in list(shapes.items())[:1000]}
    _companions(directory, metadata, info, files)
    return Checkpoint(name=path, format="dcp", tensors=tensors, metadata=metadata, info=info,
                      _closers=[shared.close], files=files)


class _Tensor:
    def __init__(self, handle: TensorHandle, chunks: list[_Chunk]):
        self.handle, self.chunks = handle, chunks


def _tensor(meta_path: str, shared: _Files, fqn: str, entry: Any, ranges: dict,
            states: dict[str, tuple[int, ...]]) -> _Tensor:
    shape = _ints(entry.size)
    dtype = getattr(entry.properties, "dtype", None)
    if shape is None:
        raise CorruptFileError(f"{meta_path}: tensor {fqn!r} has size {entry.size!r}, not non-negative integers")
    if not isinstance(dtype, torch.dtype):
        raise CorruptFileError(f"{meta_path}: tensor {fqn!r} has dtype {dtype!r}")
    if not isinstance(entry.chunks, list) or not entry.chunks:
        raise CorruptFileError(f"{meta_path}: tensor {fqn!r} has no chunks")
    chunks: list[_Chunk] = []
    for c in entry.chunks:
        offsets, sizes = _ints(getattr(c, "offsets", None)), _ints(getattr(c, "sizes", None))
        if offsets is None or sizes is None:
            raise CorruptFileError(f"{meta_path}: tensor {fqn!r} has a chunk without integer offsets and sizes")
        found = ranges.get((fqn, offsets))
        if found is None:
            raise CorruptFileError(f"{meta_path}: tensor {fqn!r}, chunk at offsets {list(offsets)}, has no storage "
                                   "entry (the metadata is inconsistent)")
        chunks.append(_Chunk(offsets, sizes, *found))
    _check_tiling(f"{meta_path}: tensor {fqn!r}", shape, chunks)
    chunks.sort(key=lambda c: c.offsets)
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = math.prod(shape)
    whole = len(chunks) == 1

    chunk_files = sorted({c.file for c in chunks})

    def materialize() -> torch.Tensor:
        if whole:
            return _read_chunk(shared, chunks[0], fqn, dtype)
        check_unchanged({f: states[f] for f in chunk_files})
        check_memory(meta_path, f"tensor {fqn!r}", numel * itemsize, "assemble")
        out = torch.empty(shape, dtype=dtype)
        for c in chunks:
            piece = _read_chunk(shared, c, fqn, dtype)
            view = out
            for dim, (o, s) in enumerate(zip(c.offsets, c.sizes)):
                view = view.narrow(dim, o, s)
            view.copy_(piece)
            del piece, view
            shared.drop_pages(c.file, c.begin, c.length)  # copied: the mapped pages are not needed again
        return out

    handle = TensorHandle(name=fqn, shape=shape, dtype=dtype, nbytes=numel * itemsize, materialize=materialize,
                          mapped=whole)
    if len(chunk_files) == 1:
        watch(handle, chunk_files[0], states[chunk_files[0]])
    else:  # several files: materialize() checks each of them
        watch(handle, os.path.dirname(meta_path) or ".", None)
    return _Tensor(handle, chunks)


def _decode_bytes(shared: _Files, fqn: str, found: tuple[str, int, int], tensors: dict, metadata: dict,
                  opaque: list[str]) -> None:
    """A bytes entry as metadata values (and tensors, where it holds some), or opaque.

    Raw ``bytes`` inside it (torchtitan's dataloader state is ``pickle.dumps``'d) and an
    opaque entry are written with their length and the start of their SHA-256, so that
    two of one length but other content differ."""
    file, begin, length = found
    value: Any = None
    ok = False
    if length <= MAX_DECODED_BYTES:
        try:
            value = _load_range(shared, _Chunk((), (), file, begin, length), "cpu")
            ok = True
        except Exception:  # noqa: BLE001 - anything torch.load raises means "not decodable safely"
            ok = False
    if not ok:
        metadata[fqn] = f"<opaque bytes: {length} sha256:{_archive_digest(shared, file, begin, length)}>"
        opaque.append(fqn)
        return
    found_tensors, found_meta = flatten(value, fqn)
    if isinstance(value, torch.Tensor) and value.ndim == 0:
        found_tensors, found_meta = {}, {fqn: value.item()}
    for name, t in found_tensors.items():
        tensors[name] = tensor_handle(name, t)
    metadata.update(found_meta)


def _archive_digest(shared: _Files, file: str, begin: int, length: int) -> str:
    """16 hex digits of the SHA-256 of an opaque entry's content: its torch.save archive's
    pickle and data records (not the records that name the torch version that wrote it),
    else, when the range is not such an archive (or holds compressed members, which are
    never inflated here), of its bytes."""
    try:
        digest = hashlib.sha256()
        with zipfile.ZipFile(shared.range(file, begin, length)) as archive:
            members = sorted((m for m in archive.infolist()
                              if m.filename.partition("/")[2] == "data.pkl"
                              or m.filename.partition("/")[2].startswith("data/")), key=lambda m: m.filename)
            if not members or any(m.compress_type != zipfile.ZIP_STORED for m in members):
                raise ValueError("not a torch.save archive")
            for member in members:
                digest.update(f"{member.filename.partition('/')[2]}:{member.file_size}:".encode())
                with archive.open(member) as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        digest.update(block)
        return digest.hexdigest()[:16]
    except Exception:  # noqa: BLE001 - any damage: the range's own bytes below
        pass
    digest = hashlib.sha256()
    try:
        with open(file, "rb") as f:
            f.seek(begin)
            left = length
            while left > 0:
                block = f.read(min(left, 1 << 24))
                if not block:
                    break  # cut short since opening: the file-state check reports it when values are read
                digest.update(block)
                left -= len(block)
    except OSError as e:
        raise CorruptFileError(f"{file}: cannot be read ({e.strerror or e})") from None
    return digest.hexdigest()[:16]


def _companions(directory: str, metadata: dict, info: dict, files: dict) -> None:
    """Lightning's meta.pt, Megatron's metadata.json and common.pt, when present."""
    meta_pt = os.path.join(directory, "meta.pt")
    if os.path.isfile(meta_pt):  # Lightning (Fabric / Trainer FSDP, sharded state dict)
        values = _weights_only(meta_pt, info, "lightning")
        if values is not None:
            for key, value in values.items():
                metadata.setdefault(key, value)
            info["lightning"] = {"meta.pt": sorted(values)}
            files[meta_pt] = file_state(meta_pt)
    mcore_json = os.path.join(directory, "metadata.json")
    if os.path.isfile(mcore_json):
        try:
            with open(mcore_json, "rb") as f:
                found = json.loads(f.read(1 << 20).decode("utf-8"))
        except (OSError, ValueError, UnicodeDecodeError, RecursionError):
            found = None
        if isinstance(found, dict) and "sharded_backend" in found:
            info.setdefault("megatron", {})["metadata.json"] = found
            common = os.path.join(directory, "common.pt")
            if os.path.isfile(common):
                values = _weights_only(common, info, "megatron")
                if values is not None:
                    for key, value in values.items():
                        metadata.setdefault(f"common.{key}", value)
                    files[common] = file_state(common)


def _weights_only(path: str, info: dict, family: str) -> dict[str, Any] | None:
    """Scalar values of a small torch.save'd side file, or None (and a note) if it needs code."""
    from torchdiff.errors import TorchDiffError
    from torchdiff.formats import torch_pickle

    try:
        ckpt = torch_pickle.load(path)
    except TorchDiffError as e:
        info.setdefault(family, {})["not_read"] = f"{os.path.basename(path)}: {str(e)[len(path) + 2:][:200]}"
        return None
    values = dict(ckpt.metadata)
    if ckpt.info.get("records"):  # said in the report's records section, as for a file given directly
        info["records"] = sorted(set(info.get("records", [])) | set(ckpt.info["records"]))
    for name, handle in ckpt.tensors.items():
        values[name] = f"<tensor {list(handle.shape)} {handle.storage_dtype}>"
    ckpt.close()
    return values


def is_dcp_directory(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, METADATA))

