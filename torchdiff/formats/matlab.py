"""MATLAB ``.mat`` files: v5/v6/v7 through scipy.io, v7.3 (HDF5) through h5py.

v5 (what ``save`` writes by default, and ``scipy.io.savemat``): the variable headers
(name, class, dimensions, complex/logical flags) are parsed at load time, decompressing
only the first bytes of compressed variables. A numeric or sparse array becomes a
tensor named by its variable, read on ``materialize()`` by handing scipy that one
variable's bytes; its dtype follows the MATLAB class (``double`` -> float64,
``single`` -> float32, ``logical`` -> bool, complex -> complex128/complex64, complex
integers -> complex128; a sparse matrix is returned dense). A 1x1 numeric array is a
MATLAB scalar and goes to ``metadata``; so do strings (char arrays). Structs and cell
arrays are read at load time and flattened with dots (``net.layers.0.W``: struct
fields by name, struct-array and cell elements by their 0-based MATLAB linear index);
their numeric leaves keep the dtype scipy gives (the storage type). Shapes are
MATLAB's (row vectors are ``(1, n)``). v4 files are read whole at load time.

v7.3 (``save -v7.3``): an HDF5 file. Every numeric dataset becomes a tensor named by
its HDF5 path with dots (``/net/W`` -> ``net.W``), read on ``materialize()``.
MATLAB writes column-major arrays, so HDF5 holds every array transposed: a MATLAB
``3x5`` matrix is a ``(5, 3)`` tensor here. The stored shape is kept as is; compare
v7.3 files with v7.3 files. Cell arrays (datasets of object references) are
followed into ``#refs#`` and named ``cell.0``, ``cell.1``... (stored order, which is
MATLAB's linear order); ``char`` datasets and 1x1 numerics go to ``metadata``;
sparse matrices and MATLAB objects (``string``, ``table``, function handles) are
listed in ``metadata`` as not read.

scipy and h5py are imported only here (the ``mat`` extra).
"""

from __future__ import annotations

import io
import math
import os
import struct
import warnings
import zlib
from typing import Any, Callable

import torch

from torchdiff.errors import (
    CorruptFileError, MissingDependencyError, TooLargeError, TorchDiffError, UnknownFormatError,
)
from torchdiff.formats.base import Checkpoint, TensorHandle, check_memory, is_scalar_leaf, tensor_handle
from torchdiff.formats.numpy import describe_dtype, torch_dtype

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"

# MAT v5 data types and array classes (MATLAB "MAT-File Format", 1999-2023, unchanged).
_MI_INT8, _MI_INT32, _MI_UINT32, _MI_MATRIX, _MI_COMPRESSED, _MI_UTF8 = 1, 5, 6, 14, 15, 16
_MX_CELL, _MX_STRUCT, _MX_OBJECT, _MX_CHAR, _MX_SPARSE = 1, 2, 3, 4, 5
_MX_FUNCTION, _MX_OPAQUE = 16, 17
_NUMERIC_CLASSES: dict[int, str] = {
    6: "float64", 7: "float32", 8: "int8", 9: "uint8", 10: "int16", 11: "uint16",
    12: "int32", 13: "uint32", 14: "int64", 15: "uint64",
}
_CLASS_NAMES: dict[int, str] = {
    1: "cell", 2: "struct", 3: "object", 4: "char", 5: "sparse", 6: "double", 7: "single",
    8: "int8", 9: "uint8", 10: "int16", 11: "uint16", 12: "int32", 13: "uint32", 14: "int64",
    15: "uint64", 16: "function_handle", 17: "opaque",
}
# MATLAB class attribute (v7.3) -> numpy dtype name.
_H5_CLASSES = {"double": "float64", "single": "float32", "logical": "bool",
               **{n: n for n in ("int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64")}}
_HEADER_LIMIT = 1 << 16  # bytes of decompressed variable header we are willing to parse

# What scipy's and h5py's parsers raise on bad bytes.
_READ_ERRORS = (
    ValueError, TypeError, KeyError, IndexError, AttributeError, OSError, EOFError, OverflowError,
    MemoryError, NotImplementedError, UnicodeDecodeError, AssertionError, RuntimeError, zlib.error,
    struct.error, RecursionError,
)


def _missing(path: str, package: str, what: str) -> MissingDependencyError:
    return MissingDependencyError(
        f"{path}: reading {what} needs {package}, which is not installed (pip install torchdiff[mat])"
    )


def load(path: str) -> Checkpoint:
    """Open a MATLAB ``.mat`` file lazily (variable headers only)."""
    with open(path, "rb") as f:
        head = f.read(2048 + 8)
    if any(head[o:o + 8] == _HDF5_SIGNATURE for o in (0, 512, 1024, 2048)):
        return _load_hdf5(path)
    if not head:
        raise CorruptFileError(f"{path}: not a MATLAB file (the file is empty)")
    try:
        import numpy as np
        import scipy.io
    except ImportError:
        raise _missing(path, "scipy", "MATLAB v5 .mat files") from None
    # The version test scipy applies: a zero in the first 4 bytes means v4; else the
    # version word at 124 (major 1 = v5, 2 = v7.3) and the endian mark at 126.
    if 0 in head[:4]:
        return _load_eager(path, np, scipy.io)
    if len(head) < 128:
        raise CorruptFileError(
            f"{path}: not a MATLAB file ({len(head)} bytes, shorter than a MAT-file header; "
            "the file may be truncated)"
        )
    major = head[125] if head[126:127] == b"I" else head[124]
    if major == 1:
        return _load_v5(path, head[:128], "<" if head[126:128] == b"IM" else ">", np, scipy.io)
    if major == 2:
        raise CorruptFileError(
            f"{path}: a MATLAB v7.3 header without the HDF5 data behind it (the file may be truncated "
            "or damaged; re-save or re-download it)"
        )
    raise CorruptFileError(
        f"{path}: not a MATLAB file (unknown MAT-file version {major} in the header; "
        "the file may be damaged)"
    )


# --------------------------------------------------------------------------- v5


class _Short(Exception):
    """The buffer ends inside the variable header."""


def _tag(buf: bytes, offset: int, endian: str) -> tuple[int, int, int, int]:
    """(type, nbytes, data start, next element) of the data element at offset."""
    if offset + 8 > len(buf):
        raise _Short
    first, second = struct.unpack_from(endian + "II", buf, offset)
    if first >> 16:  # small data element: type and size in 4 bytes, data in the next 4
        return first & 0xFFFF, first >> 16, offset + 4, offset + 8
    return first, second, offset + 8, offset + 8 + (second + 7) // 8 * 8


def _parse_matrix_header(buf: bytes, endian: str) -> dict[str, Any]:
    """Name, class, flags and dims of the miMATRIX element at the start of buf."""
    mtype, _, offset, _ = _tag(buf, 0, endian)
    if mtype != _MI_MATRIX:
        raise ValueError(f"expected a matrix element (type 14), found type {mtype}")
    t, n, data, offset = _tag(buf, offset, endian)
    if t != _MI_UINT32 or n < 8:
        raise ValueError("the array flags are missing")
    if data + 8 > len(buf):
        raise _Short
    flags, _nzmax = struct.unpack_from(endian + "II", buf, data)
    mclass = flags & 0xFF
    dims: tuple[int, ...] = ()
    t, n, data, after = _tag(buf, offset, endian)
    if t in (_MI_INT32, _MI_UINT32):  # dimensions (absent for opaque objects)
        if n % 4:
            raise ValueError("the dimensions are not a whole number of int32s")
        if data + n > len(buf):
            raise _Short
        dims = struct.unpack_from(f"{endian}{n // 4}i", buf, data)
        if any(d < 0 for d in dims):
            raise ValueError(f"negative dimensions {dims}")
        t, n, data, after = _tag(buf, after, endian)
    if t not in (_MI_INT8, _MI_UTF8):
        raise ValueError(f"expected the array name (type 1), found type {t}")
    if data + n > len(buf):
        raise _Short
    return {
        "name": bytes(buf[data:data + n]).decode("latin1"),
        "mclass": mclass,
        "complex": bool(flags >> 11 & 1),
        "global": bool(flags >> 10 & 1),
        "logical": bool(flags >> 9 & 1),
        "dims": tuple(int(d) for d in dims),
    }


def _read_compressed_header(f: Any, nbytes: int, endian: str) -> dict[str, Any]:
    inflater = zlib.decompressobj()
    out = b""
    remaining = nbytes
    while True:
        try:
            return _parse_matrix_header(out, endian)
        except (_Short, struct.error):
            pass
        if len(out) >= _HEADER_LIMIT:
            raise ValueError("the variable header does not end")
        if inflater.unconsumed_tail:
            chunk = inflater.unconsumed_tail
        else:
            if remaining <= 0:
                raise ValueError("the compressed variable ends inside its header")
            chunk = f.read(min(4096, remaining))
            if not chunk:
                raise ValueError("the file ends inside a compressed variable")
            remaining -= len(chunk)
        out += inflater.decompress(chunk, _HEADER_LIMIT - len(out))


def _scan_v5(path: str, endian: str) -> list[dict[str, Any]]:
    size = os.path.getsize(path)
    records = []
    with open(path, "rb") as f:
        pos = 128
        while pos < size:
            f.seek(pos)
            tag = f.read(8)
            index = len(records)
            try:
                if len(tag) < 8:
                    if not tag.strip(b"\x00"):
                        break  # zero padding after the last variable
                    raise ValueError(f"{size - pos} stray bytes after the last variable")
                mtype, nbytes = struct.unpack(endian + "II", tag)
                end = pos + 8 + nbytes
                if nbytes == 0:
                    raise ValueError("an empty data element")
                if end > size:
                    raise ValueError(f"it needs {nbytes} bytes, the file holds {size - pos - 8}")
                if mtype == _MI_COMPRESSED:
                    record = _read_compressed_header(f, nbytes, endian)
                elif mtype == _MI_MATRIX:
                    f.seek(pos)
                    record = _parse_matrix_header(f.read(min(8 + nbytes, _HEADER_LIMIT)), endian)
                else:
                    raise ValueError(f"unexpected data element type {mtype} at the top level")
            except (_Short, *_READ_ERRORS) as e:
                reason = str(e) if not isinstance(e, _Short) else "its header is cut short"
                raise CorruptFileError(
                    f"{path}: variable #{index + 1} (at byte {pos}) is unreadable: {reason} "
                    "(the file may be truncated; re-save or re-download it)"
                ) from None
            record.update(pos=pos, end=end, compressed=mtype == _MI_COMPRESSED)
            records.append(record)
            pos = end
    return records


class _HoldsObjects(Exception):
    """The variable holds MATLAB objects or function handles somewhere inside."""


_NUMERIC_MI = frozenset({1, 2, 3, 4, 5, 6, 7, 9, 12, 13})  # the data types scipy decodes as numbers
_TEXT_MI = _NUMERIC_MI | {16, 17, 18}  # ... and as characters
_NAME_MI = frozenset({_MI_INT8, _MI_UTF8})
_MAX_DIMS = 32


def _check_element(buf: bytes, offset: int, stop: int, endian: str, allowed: frozenset, what: str) -> int:
    if offset + 8 > stop:
        raise ValueError(f"the {what} is missing")
    t, n, data, after = _tag(buf, offset, endian)
    if data == offset + 4 and n > 4:
        raise ValueError(f"a small data element of {n} bytes in the {what}")
    if data + n > stop:
        raise ValueError(f"the {what} runs past its array")
    if t not in allowed:
        raise ValueError(f"data type {t} in the {what}")
    return min(after, stop)


def _check_matrix(buf: bytes, offset: int, stop: int, endian: str, depth: int = 0) -> int:
    """Walk one miMATRIX element (recursively) and return where it ends.

    scipy's compiled reader indexes its tables with the data type codes it reads and
    trusts structure sizes, so damaged bytes can crash the interpreter instead of
    raising. Every element scipy will decode is checked here first.
    """
    if depth > 64:
        raise ValueError("arrays nested more than 64 deep")
    if offset + 8 > stop:
        raise ValueError("a nested array is missing")
    mtype, nbytes = struct.unpack_from(endian + "II", buf, offset)
    if mtype != _MI_MATRIX:
        raise ValueError(f"data type {mtype} where an array was expected")
    end = offset + 8 + nbytes
    if end > stop:
        raise ValueError("a nested array runs past its parent")
    if nbytes == 0:
        return end
    o = offset + 8
    if o + 16 > end:
        raise ValueError("the array flags are missing")
    flags = struct.unpack_from(endian + "I", buf, o + 8)[0]
    o += 16
    mclass, is_complex = flags & 0xFF, bool(flags >> 11 & 1)
    if mclass in (_MX_FUNCTION, _MX_OPAQUE):
        raise _HoldsObjects
    dims_at = o
    o = _check_element(buf, o, end, endian, frozenset({_MI_INT32, _MI_UINT32}), "dimensions")
    t, n, data, _ = _tag(buf, dims_at, endian)
    if n % 4 or not 2 <= n // 4 <= _MAX_DIMS:  # MATLAB arrays have 2 to 32 dimensions
        raise ValueError(f"{n} bytes of dimensions")
    dims = struct.unpack_from(f"{endian}{n // 4}i", buf, data)
    if any(d < 0 for d in dims):
        raise ValueError(f"negative dimensions {dims}")
    numel = math.prod(dims)
    o = _check_element(buf, o, end, endian, _NAME_MI, "array name")
    if mclass in _NUMERIC_CLASSES:
        o = _check_element(buf, o, end, endian, _NUMERIC_MI, "numeric data")
        if is_complex:
            o = _check_element(buf, o, end, endian, _NUMERIC_MI, "imaginary part")
    elif mclass == _MX_SPARSE:
        if len(dims) != 2:
            raise ValueError(f"a sparse array with {len(dims)} dimensions")
        for part in ("row indices", "column pointers", "values") + (("imaginary values",) if is_complex else ()):
            o = _check_element(buf, o, end, endian, _NUMERIC_MI, f"sparse {part}")
    elif mclass == _MX_CHAR:
        o = _check_element(buf, o, end, endian, _TEXT_MI, "characters")
    elif mclass == _MX_CELL:
        for _ in range(numel):
            o = _check_matrix(buf, o, end, endian, depth + 1)
    elif mclass in (_MX_STRUCT, _MX_OBJECT):
        if mclass == _MX_OBJECT:
            o = _check_element(buf, o, end, endian, _NAME_MI, "class name")
        length_at = o
        o = _check_element(buf, o, end, endian, frozenset({_MI_INT32, _MI_UINT32}), "field name length")
        t, n, data, _ = _tag(buf, length_at, endian)
        name_length = struct.unpack_from(endian + "i", buf, data)[0] if n == 4 else 0
        if name_length <= 0:
            raise ValueError("a struct with no valid field name length")
        names_at = o
        o = _check_element(buf, o, end, endian, _NAME_MI, "field names")
        n_fields = _tag(buf, names_at, endian)[1] // name_length
        for _ in range(numel * n_fields if n_fields else 0):
            o = _check_matrix(buf, o, end, endian, depth + 1)
    else:
        raise ValueError(f"unknown array class {mclass}")
    return end


def _load_v5(path: str, header: bytes, endian: str, np: Any, sio: Any) -> Checkpoint:
    # A one-variable MAT file = the header (subsystem offset cleared) + the variable's bytes.
    header = header[:116] + b"\x00" * 8 + header[124:128]
    records = _scan_v5(path, endian)
    tensors: dict[str, TensorHandle] = {}
    metadata: dict[str, Any] = {}
    info: dict[str, Any] = {
        "version": "5.0",
        "header": header[:116].rstrip(b" \x00").decode("latin1", "replace"),
    }
    globals_: list[str] = []
    for record in records:
        name = record["name"]
        if not name:  # MATLAB's function workspace, not a variable
            info.setdefault("skipped", []).append("__function_workspace__")
            continue
        if record["global"]:
            globals_.append(name)
        tensors.pop(name, None)  # a later variable of the same name replaces the earlier one
        metadata.pop(name, None)
        mclass, dims = record["mclass"], record["dims"]
        numel = math.prod(dims)
        if mclass == _MX_SPARSE or (mclass in _NUMERIC_CLASSES and numel != 1):
            dtype, np_dtype = _class_dtype(record, np, path)
            tensors[name] = TensorHandle(
                name=name,
                shape=dims,
                dtype=dtype,
                nbytes=numel * np_dtype.itemsize,
                materialize=_v5_reader(path, header, endian, record, np, sio, np_dtype),
                storage_dtype=("sparse " if mclass == _MX_SPARSE else "") + str(np_dtype),
            )
            continue
        if mclass in (_MX_FUNCTION, _MX_OPAQUE):
            metadata[name] = f"<{_CLASS_NAMES[mclass]}, not read>"
            continue
        try:
            value = _read_v5_variable(path, header, endian, record, sio)
        except _HoldsObjects:
            metadata[name] = f"<{_CLASS_NAMES.get(mclass, mclass)} holding MATLAB objects, not read>"
            continue
        if mclass in _NUMERIC_CLASSES:
            _, np_dtype = _class_dtype(record, np, path)
            value = np.asarray(value).astype(np_dtype)
        _convert(value, name, tensors, metadata, np, path)
    if globals_:
        info["globals"] = globals_
    return Checkpoint(name=path, format="matlab", tensors=tensors, metadata=metadata, info={"matlab": info})


def _class_dtype(record: dict[str, Any], np: Any, path: str) -> tuple[torch.dtype, Any]:
    mclass = record["mclass"]
    if record["logical"]:
        np_dtype = np.dtype(bool)
    elif record["complex"]:
        np_dtype = np.dtype(np.complex64 if mclass == 7 else np.complex128)
    else:
        np_dtype = np.dtype(_NUMERIC_CLASSES.get(mclass, "float64"))
    dtype = torch_dtype(np_dtype)
    if dtype is None:
        raise UnknownFormatError(
            f"{path}: variable {record['name']!r} is {_CLASS_NAMES.get(mclass, mclass)}, which this torch "
            "cannot hold (upgrade torch, or save it as double)"
        )
    return dtype, np_dtype


def _read_v5_variable(path: str, header: bytes, endian: str, record: dict[str, Any], sio: Any) -> Any:
    """One variable, handed to scipy as a one-variable file after a structural check.

    Raises _HoldsObjects when it holds MATLAB objects or function handles.
    """
    name = record["name"]
    try:
        with open(path, "rb") as f:
            f.seek(record["pos"])
            raw = f.read(record["end"] - record["pos"])
        if len(raw) != record["end"] - record["pos"]:
            raise ValueError("the file ends inside the variable")
        # Decompress here, so that scipy parses plain bytes that were checked.
        element = _inflate(raw, endian, path, name) if record["compressed"] else raw
        del raw
        end = _check_matrix(element, 0, len(element), endian)
        stream = io.BytesIO()
        stream.write(header)
        stream.write(memoryview(element)[:end])
        del element
        stream.seek(0)
        with warnings.catch_warnings():
            # scipy warns and returns "Read error: ..." for an unreadable variable; we raise instead.
            warnings.simplefilter("ignore")
            value = sio.loadmat(stream)[name]
    except (_HoldsObjects, TooLargeError):
        raise
    except Exception as e:  # scipy's MatReadError, ValueError, TypeError, zlib.error... on bad bytes
        raise CorruptFileError(
            f"{path}: variable {name!r} is unreadable ({type(e).__name__}: {_first_line(e)}) "
            "(re-save or re-download the file)"
        ) from None
    if isinstance(value, str) and value.startswith("Read error"):
        raise CorruptFileError(f"{path}: variable {name!r} is unreadable ({value}) (re-save or re-download the file)")
    return value


def _inflate(raw: bytes, endian: str, path: str, name: str) -> bytes:
    """A compressed variable's matrix element, inflated no further than the size its
    tag declares, and only when that fits in memory (a zip bomb is refused, not run)."""
    inflater = zlib.decompressobj()
    head = inflater.decompress(memoryview(raw)[8:], 8)
    if len(head) < 8:
        raise ValueError("the compressed variable holds no array")
    declared = 8 + struct.unpack_from(endian + "I", head, 4)[0]
    check_memory(path, f"variable {name!r}", declared, "decompress")
    element = head + inflater.decompress(inflater.unconsumed_tail, declared - 8)
    rest = inflater.decompress(inflater.unconsumed_tail, 64)  # padding at most; reaching the end checks adler32
    if inflater.unconsumed_tail or len(rest) >= 64:
        raise ValueError(f"the compressed variable holds more than the {declared} bytes its array declares")
    if not inflater.eof:
        raise ValueError("the compressed variable is cut short")
    return element


def _v5_reader(
    path: str, header: bytes, endian: str, record: dict[str, Any], np: Any, sio: Any, np_dtype: Any
) -> Callable[[], torch.Tensor]:
    def materialize() -> torch.Tensor:
        try:
            value = _read_v5_variable(path, header, endian, record, sio)
        except _HoldsObjects:  # a numeric or sparse class cannot hold objects: the bytes lie
            raise CorruptFileError(
                f"{path}: variable {record['name']!r} is unreadable (an object inside a numeric array) "
                "(re-save or re-download the file)"
            ) from None
        if _is_sparse(value):
            value = _dense(value, path, record["name"])
        arr = np.asarray(value)
        if tuple(arr.shape) != record["dims"] or arr.dtype.kind not in "biufc":
            raise CorruptFileError(
                f"{path}: variable {record['name']!r} holds {arr.dtype} {tuple(arr.shape)}, its header "
                f"says {np_dtype} {record['dims']} (re-save or re-download the file)"
            )
        if arr.dtype != np_dtype:
            arr = arr.astype(np_dtype)
        elif not arr.dtype.isnative:
            arr = arr.astype(arr.dtype.newbyteorder("="))
        return torch.from_numpy(arr)

    return materialize


# ------------------------------------------------------------- v4 and fallback


def _load_eager(path: str, np: Any, sio: Any) -> Checkpoint:
    """Anything scipy reads that is not v5 (that is, v4): the whole file at once."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            contents = sio.loadmat(path)
        version = sio.matlab.matfile_version(path)
    except TorchDiffError:
        raise
    except Exception as e:  # scipy raises MatReadError, ValueError, TypeError... on bad bytes
        raise CorruptFileError(
            f"{path}: not a readable MATLAB file ({type(e).__name__}: {_first_line(e)}) "
            "(the file may be truncated; re-save or re-download it)"
        ) from None
    tensors: dict[str, TensorHandle] = {}
    metadata: dict[str, Any] = {}
    for name, value in contents.items():
        if name.startswith("__") and name.endswith("__"):
            continue
        _convert(value, name, tensors, metadata, np, path)
    info = {"version": "4" if version[0] == 0 else f"{version[0]}.{version[1]}"}
    return Checkpoint(name=path, format="matlab", tensors=tensors, metadata=metadata, info={"matlab": info})


def _convert(value: Any, name: str, tensors: dict, metadata: dict, np: Any, path: str, depth: int = 0) -> None:
    """Flatten a value scipy returned into tensors (numeric arrays) and metadata (the rest)."""
    if depth > 64:
        metadata[name] = "<nested too deep, not read>"
        return
    if _is_sparse(value):
        value = _dense(value, path, name)
    if isinstance(value, np.ndarray):
        if value.dtype.names is not None:  # struct (or object) array
            elements = value.ravel(order="F")
            for i, element in enumerate(elements):
                prefix = name if elements.size == 1 else f"{name}.{i}"
                for field in value.dtype.names:
                    _convert(element[field], f"{prefix}.{field}", tensors, metadata, np, path, depth + 1)
            if elements.size == 0:
                metadata[name] = []
            return
        if value.dtype.kind == "O":  # cell array
            elements = value.ravel(order="F")
            for i, element in enumerate(elements):
                _convert(element, f"{name}.{i}", tensors, metadata, np, path, depth + 1)
            if elements.size == 0:
                metadata[name] = []
            return
        if value.dtype.kind in "US":  # char array: one string per row
            rows = [str(s) for s in value.ravel()]
            metadata[name] = rows[0] if len(rows) == 1 else ("" if not rows else rows)
            return
        dtype = torch_dtype(value.dtype)
        if dtype is None:
            metadata[name] = f"<{describe_dtype(value.dtype)}, not read>"
            return
        if value.size == 1:
            metadata[name] = _scalar(value.reshape(()).item())
            return
        if not value.dtype.isnative:
            value = value.astype(value.dtype.newbyteorder("="))
        tensors[name] = tensor_handle(name, torch.from_numpy(value))
        return
    if is_scalar_leaf(value):
        metadata[name] = value
    elif isinstance(value, bytes):
        metadata[name] = value.decode("latin1")
    else:
        metadata[name] = f"<{type(value).__name__}>"


def _is_sparse(value: Any) -> bool:
    return hasattr(value, "toarray") and hasattr(value, "nnz")


def _dense(value: Any, path: str, name: str) -> Any:
    """A scipy sparse matrix as a dense array, built with bounds-checked numpy indexing.

    scipy's reader builds the matrix without checking it, and its compiled
    ``toarray`` reads and writes wherever damaged index arrays point; its own
    ``check_format`` skips the column pointers when the last one says "empty".
    """
    import numpy as np

    try:
        rows_n, cols_n = (int(d) for d in value.shape)
        fmt = getattr(value, "format", "")
        if fmt in ("csc", "csr"):
            pointers = np.asarray(value.indptr, dtype=np.int64)
            indices = np.asarray(value.indices, dtype=np.int64)
            data = np.asarray(value.data)
            major = cols_n if fmt == "csc" else rows_n
            if len(pointers) != major + 1 or pointers[0] != 0 or np.any(np.diff(pointers) < 0):
                raise ValueError("the column pointers are not an increasing run from 0")
            nnz = int(pointers[-1])
            if nnz > len(indices) or nnz > len(data):
                raise ValueError(f"{nnz} entries announced, {min(len(indices), len(data))} stored")
            minor = np.asarray(indices[:nnz])
            spans = np.repeat(np.arange(major, dtype=np.int64), np.diff(pointers))
            rows, cols = (minor, spans) if fmt == "csc" else (spans, minor)
            data = data[:nnz]
        elif fmt == "coo":
            rows, cols = np.asarray(value.row, dtype=np.int64), np.asarray(value.col, dtype=np.int64)
            data = np.asarray(value.data)
            if not len(rows) == len(cols) == len(data):
                raise ValueError("row, column and value counts differ")
        else:
            raise ValueError(f"unexpected sparse format {fmt!r}")
        if len(rows) and (rows.min() < 0 or rows.max() >= rows_n or cols.min() < 0 or cols.max() >= cols_n):
            raise ValueError(f"an index outside the {rows_n}x{cols_n} matrix")
        dense = np.zeros((rows_n, cols_n), dtype=data.dtype)
        np.add.at(dense, (rows, cols), data)  # duplicates add up, as in scipy
        return dense
    except Exception as e:  # ValueError, IndexError, MemoryError... on a damaged matrix
        raise CorruptFileError(
            f"{path}: sparse matrix {name!r} is damaged ({type(e).__name__}: {_first_line(e)}) "
            "(re-save or re-download the file)"
        ) from None


def _scalar(value: Any) -> Any:
    if isinstance(value, complex):
        return str(value)
    if isinstance(value, bytes):
        return value.decode("latin1")
    return value


# ------------------------------------------------------------------------ v7.3


def _load_hdf5(path: str) -> Checkpoint:
    try:
        import h5py
        import numpy as np
    except ImportError:
        raise _missing(path, "h5py", "MATLAB v7.3 (HDF5) .mat files") from None
    try:
        h5 = h5py.File(path, "r")
    except _READ_ERRORS as e:
        raise CorruptFileError(
            f"{path}: not a readable HDF5 / MATLAB v7.3 file ({type(e).__name__}: {_first_line(e)}) "
            "(the file may be truncated; re-save or re-download it)"
        ) from None
    tensors: dict[str, TensorHandle] = {}
    metadata: dict[str, Any] = {}
    try:
        walker = _HDF5Walker(path, h5, h5py, np, tensors, metadata)
        walker.visit(h5, "", 0)
    except TorchDiffError:
        h5.close()
        raise
    except _READ_ERRORS as e:
        h5.close()
        raise CorruptFileError(
            f"{path}: unreadable HDF5 / MATLAB v7.3 structure ({type(e).__name__}: {_first_line(e)}) "
            "(the file may be truncated; re-save or re-download it)"
        ) from None
    with open(path, "rb") as f:
        userblock = f.read(116)
    info: dict[str, Any] = {"version": "7.3" if userblock.startswith(b"MATLAB") else "hdf5"}
    if userblock.startswith(b"MATLAB"):
        info["header"] = userblock.rstrip(b" \x00").decode("latin1", "replace")
    return Checkpoint(
        name=path, format="matlab", tensors=tensors, metadata=metadata, info={"matlab": info}, _closers=[h5.close]
    )


def _attr_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("latin1")
    if hasattr(value, "tobytes") and getattr(value, "dtype", None) is not None and value.dtype.kind == "S":
        return value.tobytes().decode("latin1").rstrip("\x00")
    return str(value)


class _HDF5Walker:
    def __init__(self, path: str, h5: Any, h5py: Any, np: Any, tensors: dict, metadata: dict) -> None:
        self.path, self.h5, self.h5py, self.np = path, h5, h5py, np
        self.tensors, self.metadata = tensors, metadata
        self.seen: dict[Any, str] = {}  # object id -> the name it was read under

    def visit(self, obj: Any, name: str, depth: int) -> None:
        if depth > 64:
            self.metadata[name] = "<nested too deep, not read>"
            return
        if obj.id in self.seen:  # a reference to an object already read (or a cycle)
            self.metadata[name] = f"<same object as {self.seen[obj.id] or 'the root'}>"
            return
        self.seen[obj.id] = name
        if isinstance(obj, self.h5py.Group):
            if "MATLAB_sparse" in obj.attrs:
                self.metadata[name] = "<sparse, not read>"
                return
            for key in obj:
                if depth == 0 and key in ("#refs#", "#subsystem#"):
                    continue
                self.visit(obj[key], f"{name}.{key}" if name else key, depth + 1)
        elif isinstance(obj, self.h5py.Dataset):
            self.dataset(obj, name, depth)

    def dataset(self, ds: Any, name: str, depth: int) -> None:
        np = self.np
        mclass = _attr_text(ds.attrs.get("MATLAB_class"))
        if "MATLAB_object_decode" in ds.attrs:
            self.metadata[name] = f"<{mclass or 'object'} object, not read>"
            return
        if ds.attrs.get("MATLAB_empty", 0):
            self.empty(ds, name, mclass)
            return
        if self.h5py.check_dtype(ref=ds.dtype) is not None:  # cell array: references into #refs#
            refs = ds[()]
            for i, ref in enumerate(np.asarray(refs).ravel()):
                if ref:
                    self.visit(self.h5[ref], f"{name}.{i}", depth + 1)
            return
        if mclass == "char":
            self.metadata[name] = _matlab_chars(ds[()], np)
            return
        if self.h5py.check_string_dtype(ds.dtype) is not None or ds.dtype.kind in "SU":
            self.metadata[name] = _strings(ds[()], np) if ds.size <= 4096 else f"<{ds.size} strings, not read>"
            return
        names = ds.dtype.names
        if names is not None and set(names) == {"real", "imag"}:
            part = ds.dtype["real"]
            np_dtype = np.dtype(np.complex64 if part.itemsize <= 4 else np.complex128)
        elif names is None and ds.dtype.kind in "biuf":
            np_dtype = np.dtype(bool) if mclass == "logical" else ds.dtype.newbyteorder("=")
        else:
            self.metadata[name] = f"<{mclass or describe_dtype(ds.dtype)}, not read>"
            return
        dtype = torch_dtype(np_dtype)
        if dtype is None:
            self.metadata[name] = f"<{describe_dtype(np_dtype)}, not read>"
            return
        shape = tuple(int(d) for d in ds.shape)
        if shape == () or (mclass and math.prod(shape) == 1):
            self.metadata[name] = _scalar(self.read(ds, name, np_dtype).reshape(()).item())
            return
        self.tensors[name] = TensorHandle(
            name=name,
            shape=shape,
            dtype=dtype,
            nbytes=math.prod(shape) * np_dtype.itemsize,
            materialize=lambda: torch.from_numpy(self.read(ds, name, np_dtype)),
        )

    def read(self, ds: Any, name: str, np_dtype: Any) -> Any:
        np = self.np
        try:
            arr = ds[()]
        except _READ_ERRORS as e:
            raise CorruptFileError(
                f"{self.path}: dataset {name!r} is unreadable ({type(e).__name__}: {_first_line(e)}) "
                "(re-save or re-download the file)"
            ) from None
        arr = np.asarray(arr)
        if arr.dtype.names is not None:
            arr = arr["real"] + 1j * arr["imag"]
        return np.ascontiguousarray(arr, dtype=np_dtype)

    def empty(self, ds: Any, name: str, mclass: str) -> None:
        """MATLAB writes an empty array as its dimensions, flagged MATLAB_empty."""
        np = self.np
        if mclass == "char":
            self.metadata[name] = ""
            return
        if mclass in ("cell", "struct"):
            self.metadata[name] = []
            return
        dims = tuple(int(d) for d in np.asarray(ds[()]).ravel())
        shape = tuple(reversed(dims))  # stored (transposed) order, like every other v7.3 array
        np_dtype = np.dtype(_H5_CLASSES.get(mclass, "float64"))
        dtype = torch_dtype(np_dtype) or torch.float64
        self.tensors[name] = tensor_handle(name, torch.empty(shape, dtype=dtype))


def _matlab_chars(arr: Any, np: Any) -> Any:
    """MATLAB char data (uint16 code units, stored transposed) -> str or list of str."""
    arr = np.atleast_2d(np.asarray(arr)).T  # back to MATLAB's rows x cols
    rows = ["".join(chr(int(c)) for c in row).encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            for row in arr]
    return rows[0] if len(rows) == 1 else rows


def _strings(value: Any, np: Any) -> Any:
    items = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in np.asarray(value).ravel()]
    return items[0] if np.ndim(value) == 0 or len(items) == 1 else items


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else "unreadable")[:200]
