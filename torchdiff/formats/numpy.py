"""NumPy ``.npy`` and ``.npz`` files, through numpy (``allow_pickle=False`` always).

``.npy``: one tensor named by the file stem. Only the header is read at load time;
``materialize()`` maps the data copy-on-write (``mmap_mode="c"``): a private,
writable mapping of the file, so ``torch.from_numpy`` needs neither a copy nor a
"non-writable array" warning, and a stray write lands in private memory, never in
the file.

``.npz``: one tensor per member, named by the member without ``.npy`` (a member named
otherwise that starts with the ``.npy`` magic is an array too, as ``np.load`` reads it;
any other member is a metadata value ``<zip member: N bytes crc32:...>`` from the zip
directory, never unpickled). Every member's header is read at load time. Members stored uncompressed (``np.savez``)
are mapped like ``.npy`` files; compressed members (``np.savez_compressed``) are
decompressed into memory on ``materialize()``.

Arrays of Python objects are refused (loading them means unpickling). Strings,
byte strings, datetimes and timedeltas are metadata values (read at load time);
structured records are one tensor per numeric field (``name.field``). Long double and
raw bytes are refused with the array's name. Big-endian arrays are read and
byte-swapped into memory.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
import tokenize
import zipfile
import zlib
from typing import Any, Callable, NoReturn

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


def _refuse(np_dtype: Any, path: str, name: str) -> NoReturn:
    """The error for an array of ``_kind`` "refused"."""
    if np_dtype.hasobject:
        raise UnsafeCheckpointError(
            f"{path}: refused, array {name!r} holds Python objects (dtype=object), which only a pickle "
            "can load; torchdiff never unpickles (save it as a numeric array)"
        )
    raise UnknownFormatError(
        f"{path}: array {name!r} has dtype {np_dtype.str} ({describe_dtype(np_dtype)}), which torch "
        "cannot hold (convert it to a numeric dtype, or leave it out of the file)"
    )


#: Kinds of arrays read as metadata values, not tensors: strings, bytes, datetimes, timedeltas.
_VALUE_KINDS = "USMm"
#: Elements of such an array listed in full; a larger one is a digest of its bytes.
MAX_VALUE_ELEMENTS = 4096


def _kind(np_dtype: Any) -> str:
    """How an array is read: "tensor", "records" (one tensor per numeric field),
    "value" (a metadata value), or "refused" (``_refuse`` says why)."""
    if np_dtype.hasobject:
        return "refused"
    if np_dtype.fields is not None:
        return "records"
    if np_dtype.subdtype is None and np_dtype.kind in _VALUE_KINDS:
        return "value"
    return "tensor" if torch_dtype(np_dtype) is not None else "refused"


def _fields(np_dtype: Any, prefix: str) -> list[tuple[str, tuple[str, ...], Any]]:
    """(dotted name, field path, field dtype) of every leaf field of a record dtype,
    nested records flattened: ``("st.pos.x", ("pos", "x"), dtype('float32'))``."""
    out = []
    for field in np_dtype.names:
        dtype = np_dtype.fields[field][0]
        name = f"{prefix}.{field}"
        if dtype.fields is not None:
            out += [(n, (field, *path), d) for n, path, d in _fields(dtype, name)]
        else:
            out.append((name, (field,), dtype))
    return out


def _field(arr: Any, path: tuple[str, ...]) -> Any:
    for field in path:
        arr = arr[field]
    return arr


def metadata_value(arr: Any, np: Any) -> Any:
    """An array of strings, bytes, datetimes or timedeltas as a metadata value: its
    elements (a string for a 0-d array, nested lists otherwise; datetimes in ISO form,
    bytes decoded as UTF-8 with escapes); beyond MAX_VALUE_ELEMENTS elements, one line
    naming the count, dtype and shape with the first 16 hex digits of the SHA-256 of
    the array's bytes in C order (``<5000 unicode strings <U1 [5000] sha256:32cf63a50a3bf84a>``)."""
    if arr.size > MAX_VALUE_ELEMENTS:
        digest = hashlib.sha256(np.ascontiguousarray(arr).data).hexdigest()[:16]
        return f"<{arr.size} {describe_dtype(arr.dtype)} {arr.dtype.str} {list(arr.shape)} sha256:{digest}>"
    if arr.dtype.kind == "M":
        arr = np.datetime_as_string(arr)
    elif arr.dtype.kind == "m":
        arr = arr.astype(str)
    elif arr.dtype.kind == "S":
        arr = np.char.decode(arr, "utf-8", "backslashreplace")
    return arr.tolist()


def _to_tensor(arr: Any, np: Any) -> torch.Tensor:
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    elif not arr.flags.c_contiguous and not arr.flags.f_contiguous:  # a field of records
        arr = np.ascontiguousarray(arr)
    return torch.from_numpy(arr)


def _mapped_array(
    path: str, name: str, np: Any, np_dtype: Any, shape: tuple[int, ...], fortran: bool, offset: int
) -> Callable[[], Any]:
    """Reads the array: a copy-on-write mapping of the file at ``offset``."""
    def read() -> Any:
        try:
            return np.memmap(path, dtype=np_dtype, mode="c", offset=offset, shape=shape,
                             order="F" if fortran else "C")
        except _READ_ERRORS as e:
            raise CorruptFileError(
                f"{path}: array {name!r} cannot be mapped ({type(e).__name__}: {_first_line(e)}) "
                "(was the file changed or truncated after it was opened?)"
            ) from None

    return read


def _tensor_reader(read: Callable[[], Any], np: Any, field: tuple[str, ...] = ()) -> Callable[[], torch.Tensor]:
    """materialize(): the array ``read()`` returns (or its ``field`` of records) as a tensor."""
    return lambda: _to_tensor(_field(read(), field), np)


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
    kind = _kind(np_dtype)
    if kind == "refused":
        _refuse(np_dtype, path, name)
    needed = math.prod(shape) * np_dtype.itemsize
    if offset + needed > size:
        raise _truncated(path, name, needed, size - offset)
    tensors: dict[str, TensorHandle] = {}
    metadata: dict[str, Any] = {}
    _add(tensors, metadata, path, name, shape, np_dtype,
         _mapped_array(path, name, np, np_dtype, shape, fortran, offset), np, mapped=True)
    return Checkpoint(name=path, format="numpy", tensors=tensors, metadata=metadata,
                      info={"numpy": {"archive": "npy"}})


def _add(tensors: dict[str, TensorHandle], metadata: dict[str, Any], path: str, name: str,
         shape: tuple[int, ...], np_dtype: Any, read: Callable[[], Any], np: Any, mapped: bool) -> None:
    """Array ``name`` (read by ``read()``) as a tensor, one tensor per numeric field of
    records (``name.field``), or a metadata value (strings, datetimes: read now)."""
    kind = _kind(np_dtype)
    if kind == "value":
        metadata[name] = metadata_value(read(), np)
    elif kind == "tensor":
        tensors[name] = _handle(name, shape, torch_dtype(np_dtype), np_dtype, _tensor_reader(read, np), mapped)
    else:  # records: every leaf field, in order; a sub-array field adds its dimensions
        values = None
        for field_name, path, dtype in _fields(np_dtype, name):
            base, extra = (dtype.subdtype if dtype.subdtype is not None else (dtype, ()))
            if _kind(base) == "value":
                if values is None:
                    values = read()
                metadata[field_name] = metadata_value(_field(values, path), np)
            elif _kind(base) == "tensor":
                tensors[field_name] = _handle(field_name, shape + tuple(extra), torch_dtype(base), base,
                                              _tensor_reader(read, np, path), mapped=False)
            else:
                raise UnknownFormatError(
                    f"{path}: array {name!r}: field {field_name!r} has dtype {base.str} ({describe_dtype(base)}), "
                    "which torch cannot hold (convert it to a numeric dtype, or leave it out of the file)")


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
    metadata: dict[str, Any] = {}
    skipped: list[str] = []
    named: dict[str, str] = {}  # array name -> its member
    compressed = 0
    try:
        with open(path, "rb") as raw:
            _check_layout(raw, archive.infolist(), path, size)
            for info in archive.infolist():
                if info.filename.endswith("/"):  # not is_dir(), which fails on an empty name
                    continue
                if not info.filename.endswith(".npy") and not _is_npy(archive, info):
                    skipped.append(info.filename)
                    metadata[info.filename] = _member_text(info)
                    continue
                name = info.filename[: -len(".npy")] if info.filename.endswith(".npy") else info.filename
                if name in named:
                    raise CorruptFileError(
                        f"{path}: the archive holds two arrays named {name!r} ({named[name]!r} and "
                        f"{info.filename!r}); one would hide the other (re-save the file)"
                    )
                named[name] = info.filename
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
                if _kind(np_dtype) == "refused":
                    _refuse(np_dtype, path, name)
                needed = math.prod(shape) * np_dtype.itemsize
                if header_len + needed > info.file_size:
                    raise _truncated(path, name, needed, info.file_size - header_len)
                stored = info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x1
                if stored:
                    offset = _member_data_offset(raw, info, path) + header_len
                    if offset + needed > size:
                        raise _truncated(path, name, needed, size - offset)
                    read = _mapped_array(path, name, np, np_dtype, shape, fortran, offset)
                else:
                    compressed += 1
                    read = _archive_array(archive, info, path, name, npy_format)
                _add(tensors, metadata, path, name, shape, np_dtype, read, np, mapped=stored)
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
    return Checkpoint(name=path, format="numpy", tensors=tensors, metadata=metadata, info={"numpy": info_out},
                      _closers=closers)


def _is_npy(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bool:
    """A member named without ``.npy`` that holds an array all the same: numpy's
    ``np.load`` reads any member starting with the ``.npy`` magic as an array."""
    try:
        with archive.open(info) as member:
            return member.read(6) == b"\x93NUMPY"
    except _READ_ERRORS:
        return False  # unreadable: kept as a member that is not an array, named in the metadata


def _member_text(info: zipfile.ZipInfo) -> str:
    """A member that is not an array (a README, a pickle: never unpickled) as a metadata
    value, from the zip directory alone: its size and CRC-32, so that a change shows."""
    return f"<zip member: {info.file_size} bytes crc32:{info.CRC:08x}>"


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


def _archive_array(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: str, name: str, npy_format: Any
) -> Callable[[], Any]:
    """Reads the array: a compressed member, decompressed into memory on each call."""
    def read() -> Any:
        check_memory(path, f"array {name!r}", info.file_size, "decompress")
        try:
            with archive.open(info) as member:
                return npy_format.read_array(member, allow_pickle=False)
        except _READ_ERRORS as e:
            raise CorruptFileError(
                f"{path}: array {name!r} cannot be decompressed ({type(e).__name__}: {_first_line(e)}) "
                "(re-save or re-download the file)"
            ) from None

    return read


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
