"""NumPy ``.npy`` and ``.npz`` files, through numpy (``allow_pickle=False`` always).

``.npy``: one tensor named by the file stem. Only the header is read at load time;
``materialize()`` maps the data copy-on-write (``mmap_mode="c"``): a private,
writable mapping of the file, so ``torch.from_numpy`` needs neither a copy nor a
"non-writable array" warning, and a stray write lands in private memory, never in
the file.

``.npz``: one tensor per member, named by the member without ``.npy``. Every
member's header is read at load time. Members stored uncompressed (``np.savez``)
are mapped like ``.npy`` files; compressed members (``np.savez_compressed``) are
decompressed into memory on ``materialize()``.

Arrays of Python objects are refused (loading them means unpickling); dtypes torch
cannot hold (strings, datetimes, structured records, long double) are refused with
the array's name. Big-endian arrays are read and byte-swapped into memory.
"""

from __future__ import annotations

import math
import os
import struct
import tokenize
import zipfile
import zlib
from typing import Any, Callable

import torch

from torchdiff.errors import CorruptFileError, MissingDependencyError, UnknownFormatError, UnsafeCheckpointError
from torchdiff.formats.base import Checkpoint, TensorHandle, check_memory

# (numpy dtype kind, itemsize) -> torch dtype; unsigned wide ints only where this torch has them.
_TORCH_DTYPES: dict[tuple[str, int], torch.dtype] = {
    k: v
    for k, v in {
        ("b", 1): torch.bool,
        ("u", 1): torch.uint8,
        ("u", 2): getattr(torch, "uint16", None),
        ("u", 4): getattr(torch, "uint32", None),
        ("u", 8): getattr(torch, "uint64", None),
        ("i", 1): torch.int8,
        ("i", 2): torch.int16,
        ("i", 4): torch.int32,
        ("i", 8): torch.int64,
        ("f", 2): torch.float16,
        ("f", 4): torch.float32,
        ("f", 8): torch.float64,
        ("c", 8): torch.complex64,
        ("c", 16): torch.complex128,
    }.items()
    if v is not None
}

_KIND_NAMES = {
    "U": "unicode strings",
    "S": "byte strings",
    "O": "Python objects",
    "V": "raw or structured records",
    "M": "datetimes",
    "m": "timedeltas",
}

# Exceptions numpy's header parser and zipfile raise on bad bytes.
_READ_ERRORS = (
    ValueError, EOFError, OSError, SyntaxError, TypeError, KeyError, IndexError, OverflowError,
    UnicodeDecodeError, MemoryError, RecursionError, zipfile.BadZipFile, zlib.error, struct.error,
    RuntimeError, NotImplementedError, tokenize.TokenError,
)


def torch_dtype(np_dtype: Any) -> torch.dtype | None:
    """The torch dtype holding a numpy dtype's values exactly, or None."""
    if np_dtype.fields is not None or np_dtype.subdtype is not None:
        return None
    return _TORCH_DTYPES.get((np_dtype.kind, np_dtype.itemsize))


def describe_dtype(np_dtype: Any) -> str:
    """A few words on what a numpy dtype holds, for error messages."""
    if np_dtype.fields is not None:
        return "structured records"
    if np_dtype.subdtype is not None:
        return "sub-arrays"
    if np_dtype.kind in _KIND_NAMES:
        return _KIND_NAMES[np_dtype.kind]
    if np_dtype.kind == "f" and np_dtype.itemsize > 8:
        return "extended-precision floats"
    if np_dtype.kind == "c" and np_dtype.itemsize > 16:
        return "extended-precision complex numbers"
    return f"{np_dtype.kind}{np_dtype.itemsize} values"


def _import_numpy(path: str):
    try:
        import numpy as np
        import numpy.lib.format as npy_format
    except ImportError:
        raise MissingDependencyError(f"{path}: reading NumPy files needs numpy (pip install numpy)") from None
    return np, npy_format


def _read_header(fp: Any, npy_format: Any, path: str, name: str) -> tuple[tuple[int, ...], bool, Any]:
    """(shape, fortran_order, dtype) from an .npy header at fp's position; fp ends at the data."""
    try:
        version = npy_format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = npy_format.read_array_header_1_0(fp)
        elif version in ((2, 0), (3, 0)):
            # 3.0 differs from 2.0 only by utf-8 field names in structured dtypes, refused below.
            shape, fortran, dtype = npy_format.read_array_header_2_0(fp)
        else:
            raise ValueError(f"unknown .npy format version {version[0]}.{version[1]}")
    except _READ_ERRORS as e:
        raise CorruptFileError(
            f"{path}: array {name!r} has no valid .npy header ({type(e).__name__}: {_first_line(e)}) "
            "(the file may be truncated; re-save or re-download it)"
        ) from None
    if any(int(d) < 0 for d in shape):
        raise CorruptFileError(
            f"{path}: array {name!r} has a negative dimension in its header {tuple(shape)} "
            "(re-save or re-download the file)"
        )
    return tuple(int(d) for d in shape), bool(fortran), dtype


def _check_dtype(np_dtype: Any, path: str, name: str) -> torch.dtype:
    if np_dtype.hasobject:
        raise UnsafeCheckpointError(
            f"{path}: refused, array {name!r} holds Python objects (dtype=object), which only a pickle "
            "can load; torchdiff never unpickles (save it as a numeric array)"
        )
    dtype = torch_dtype(np_dtype)
    if dtype is None:
        raise UnknownFormatError(
            f"{path}: array {name!r} has dtype {np_dtype.str} ({describe_dtype(np_dtype)}), which torch "
            "cannot hold (convert it to a numeric dtype, or leave it out of the file)"
        )
    return dtype


def _to_tensor(arr: Any, np: Any) -> torch.Tensor:
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return torch.from_numpy(arr)


def _mapped_reader(
    path: str, name: str, np: Any, np_dtype: Any, shape: tuple[int, ...], fortran: bool, offset: int
) -> Callable[[], torch.Tensor]:
    def materialize() -> torch.Tensor:
        try:
            arr = np.memmap(path, dtype=np_dtype, mode="c", offset=offset, shape=shape,
                            order="F" if fortran else "C")
        except _READ_ERRORS as e:
            raise CorruptFileError(
                f"{path}: array {name!r} cannot be mapped ({type(e).__name__}: {_first_line(e)}) "
                "(was the file changed or truncated after it was opened?)"
            ) from None
        return _to_tensor(arr, np)

    return materialize


def _empty_reader(shape: tuple[int, ...], dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    return lambda: torch.empty(shape, dtype=dtype)


def _handle(
    name: str, shape: tuple[int, ...], dtype: torch.dtype, np_dtype: Any,
    materialize: Callable[[], torch.Tensor], mapped: bool,
) -> TensorHandle:
    numel = math.prod(shape)
    if numel == 0:
        return TensorHandle(name=name, shape=shape, dtype=dtype, nbytes=0,
                            materialize=_empty_reader(shape, dtype))
    return TensorHandle(
        name=name,
        shape=shape,
        dtype=dtype,
        nbytes=numel * np_dtype.itemsize,
        materialize=materialize,
        mapped=mapped and np_dtype.isnative,
    )


def _truncated(path: str, name: str, needed: int, held: int) -> CorruptFileError:
    return CorruptFileError(
        f"{path}: array {name!r} is truncated: its header promises {needed} bytes of data, "
        f"the file holds {max(held, 0)} (re-save or re-download the file)"
    )


def _load_npy(path: str, np: Any, npy_format: Any) -> Checkpoint:
    name = os.path.splitext(os.path.basename(path))[0]
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        shape, fortran, np_dtype = _read_header(f, npy_format, path, name)
        offset = f.tell()
    dtype = _check_dtype(np_dtype, path, name)
    needed = math.prod(shape) * np_dtype.itemsize
    if offset + needed > size:
        raise _truncated(path, name, needed, size - offset)
    reader = _mapped_reader(path, name, np, np_dtype, shape, fortran, offset)
    handle = _handle(name, shape, dtype, np_dtype, reader, mapped=True)
    return Checkpoint(name=path, format="numpy", tensors={name: handle}, info={"numpy": {"archive": "npy"}})


def _member_data_offset(f: Any, info: zipfile.ZipInfo, path: str) -> int:
    """Where a zip member's (stored or compressed) bytes start: after its local file header."""
    local = b""
    if info.header_offset >= 0:  # zipfile shifts offsets by bytes missing before the archive: < 0 is possible
        f.seek(info.header_offset)
        local = f.read(30)
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        raise CorruptFileError(
            f"{path}: zip member {info.filename!r} has no local header where the directory points "
            "(re-save or re-download the file)"
        )
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_len + extra_len


def _load_npz(path: str, np: Any, npy_format: Any) -> Checkpoint:
    size = os.path.getsize(path)
    try:
        archive = zipfile.ZipFile(path)
    except _READ_ERRORS as e:
        raise CorruptFileError(
            f"{path}: not a readable .npz archive ({type(e).__name__}: {_first_line(e)}) "
            "(the file may be truncated; re-save or re-download it)"
        ) from None
    tensors: dict[str, TensorHandle] = {}
    skipped: list[str] = []
    compressed = 0
    try:
        with open(path, "rb") as raw:
            _check_layout(raw, archive.infolist(), path, size)
            for info in archive.infolist():
                if info.filename.endswith("/"):  # not is_dir(), which fails on an empty name
                    continue
                if not info.filename.endswith(".npy"):
                    skipped.append(info.filename)
                    continue
                name = info.filename[: -len(".npy")]
                try:
                    with archive.open(info) as member:
                        shape, fortran, np_dtype = _read_header(member, npy_format, path, name)
                        header_len = member.tell()
                except CorruptFileError:
                    raise
                except _READ_ERRORS as e:
                    raise CorruptFileError(
                        f"{path}: array {name!r} cannot be read from the archive "
                        f"({type(e).__name__}: {_first_line(e)}) (re-save or re-download the file)"
                    ) from None
                dtype = _check_dtype(np_dtype, path, name)
                needed = math.prod(shape) * np_dtype.itemsize
                if header_len + needed > info.file_size:
                    raise _truncated(path, name, needed, info.file_size - header_len)
                stored = info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x1
                if stored:
                    offset = _member_data_offset(raw, info, path) + header_len
                    if offset + needed > size:
                        raise _truncated(path, name, needed, size - offset)
                    reader = _mapped_reader(path, name, np, np_dtype, shape, fortran, offset)
                else:
                    compressed += 1
                    reader = _archive_reader(archive, info, path, name, np, npy_format)
                tensors[name] = _handle(name, shape, dtype, np_dtype, reader, mapped=stored)
    except BaseException:
        archive.close()
        raise
    closers = []
    if compressed:
        closers.append(archive.close)
    else:
        archive.close()
    info_out: dict[str, Any] = {"archive": "npz", "compressed_members": compressed}
    if skipped:
        info_out["skipped_members"] = skipped
    return Checkpoint(name=path, format="numpy", tensors=tensors, info={"numpy": info_out}, _closers=closers)


# A deflate match copies at most 258 bytes and costs at least 2 bits: no stream inflates more than 1032:1.
_MAX_DEFLATE_RATIO = 1032


def _check_layout(f: Any, members: list[zipfile.ZipInfo], path: str, size: int) -> None:
    """Every member's bytes inside the file and apart from the others' (overlapping
    members are how a small zip inflates to many copies of one stream), and no deflated
    member declaring more bytes than deflate can produce from its compressed size."""
    spans = []
    for info in members:
        start = _member_data_offset(f, info, path)
        end = start + info.compress_size
        if end > size:
            raise CorruptFileError(
                f"{path}: zip member {info.filename!r} runs past the end of the file "
                "(the file may be truncated; re-save or re-download it)"
            )
        if (info.compress_type == zipfile.ZIP_DEFLATED
                and info.file_size > _MAX_DEFLATE_RATIO * info.compress_size + 1024):
            raise CorruptFileError(
                f"{path}: zip member {info.filename!r} declares {info.file_size} bytes from "
                f"{info.compress_size} compressed bytes, more than deflate can produce (a damaged archive, "
                "or a zip bomb)"
            )
        spans.append((info.header_offset, end, info.filename))
    spans.sort()
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise CorruptFileError(
                f"{path}: zip members {first!r} and {second!r} overlap (a damaged archive, or a zip bomb)"
            )


def _archive_reader(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: str, name: str, np: Any, npy_format: Any
) -> Callable[[], torch.Tensor]:
    def materialize() -> torch.Tensor:
        check_memory(path, f"array {name!r}", info.file_size, "decompress")
        try:
            with archive.open(info) as member:
                arr = npy_format.read_array(member, allow_pickle=False)
        except _READ_ERRORS as e:
            raise CorruptFileError(
                f"{path}: array {name!r} cannot be decompressed ({type(e).__name__}: {_first_line(e)}) "
                "(re-save or re-download the file)"
            ) from None
        return _to_tensor(arr, np)

    return materialize


def load(path: str) -> Checkpoint:
    """Open a ``.npy`` or ``.npz`` file lazily (headers only)."""
    np, npy_format = _import_numpy(path)
    with open(path, "rb") as f:
        head = f.read(6)
    if head.startswith(b"PK"):
        return _load_npz(path, np, npy_format)
    if head == b"\x93NUMPY":
        return _load_npy(path, np, npy_format)
    if path.lower().endswith(".npz"):
        return _load_npz(path, np, npy_format)
    raise CorruptFileError(
        f"{path}: not a NumPy file (neither the .npy magic nor a zip archive; "
        "the file may be empty or truncated)"
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else "unreadable")[:200]
