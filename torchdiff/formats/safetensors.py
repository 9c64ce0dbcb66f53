"""safetensors files: the header is parsed and validated here, the data is one
read-only (copy-on-write) memory map, and each tensor is a zero-copy view of it.

Why not ``safetensors.safe_open``: it costs about 45 µs per tensor to open (0.9 s for
a file of 20,000 tensors, benchmarks/bench_engine.py row 5) and another 13 µs per
``get_tensor``; opening here costs under 3 µs per tensor (header parsed, checked a column
at a time, one lazy handle each: 0.05 s for 20,000 tensors). The safetensors
package stays the reference: tests check that every file it writes reads back here
with the same names, shapes, dtypes, values and metadata, and that what it refuses is
refused here too (tests/test_readers.py).

Validation follows the format's rules: an 8-byte little-endian header length within
the file, a JSON object header, known dtypes, non-negative integer shapes, offsets
within the data region, each byte span equal to numel × itemsize, spans that neither
overlap nor leave gaps, and ``__metadata__`` a map of strings.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import mmap
import os
import struct

import torch

from torchdiff.errors import CorruptFileError
from torchdiff.formats.base import Checkpoint, FileGuard, TensorHandle, dtype_name, file_state

# safetensors dtype string -> torch dtype; newer dtypes only where this torch has them.
DTYPES: dict[str, torch.dtype] = {
    k: v
    for k, v in {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
        "F8_E5M2": getattr(torch, "float8_e5m2", None),
        "F8_E4M3FNUZ": getattr(torch, "float8_e4m3fnuz", None),
        "F8_E5M2FNUZ": getattr(torch, "float8_e5m2fnuz", None),
        "F8_E8M0": getattr(torch, "float8_e8m0fnu", None),
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U64": getattr(torch, "uint64", None),
        "U32": getattr(torch, "uint32", None),
        "U16": getattr(torch, "uint16", None),
        "U8": torch.uint8,
        "BOOL": torch.bool,
        "C64": torch.complex64,
    }.items()
    if v is not None
}
_ITEMSIZE = {k: torch.empty((), dtype=v).element_size() for k, v in DTYPES.items()}
_STORAGE_NAMES = {k: dtype_name(v) for k, v in DTYPES.items()}

MAX_HEADER_BYTES = 100_000_000  # the format's own limit


def _bad(path: str, what: str) -> CorruptFileError:
    return CorruptFileError(f"{path}: not a valid safetensors file ({what})")


def read_header(path: str) -> tuple[int, dict, int]:
    """(header length, parsed header, data region length), validated."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _bad(path, f"{size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise _bad(path, f"header length {n} runs past the end of the {size}-byte file; truncated?")
        if n > MAX_HEADER_BYTES:
            raise _bad(path, f"header of {n} bytes exceeds the format's {MAX_HEADER_BYTES}-byte limit")
        raw = f.read(n)
    if len(raw) != n:
        raise _bad(path, "the file shrank while being read")
    try:
        header = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise _bad(path, "header is not UTF-8") from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise _bad(path, f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise _bad(path, "header is not a JSON object")
    return n, header, size - 8 - n


def _spec(path: str, name: str, spec: object, data_len: int) -> tuple[str, tuple[int, ...], int, int]:
    if not isinstance(spec, dict):
        raise _bad(path, f"entry {name!r} is not an object")
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if not isinstance(dtype, str):
        raise _bad(path, f"tensor {name!r} has no dtype")
    if dtype not in DTYPES:
        raise CorruptFileError(
            f"{path}: tensor {name!r} has dtype {dtype}, which this torch cannot hold "
            f"(readable: {', '.join(sorted(DTYPES))})"
        )
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 1 << 63 for d in shape):
        raise _bad(path, f"tensor {name!r} has shape {shape!r}, not a list of non-negative integers below 2**63")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
        raise _bad(path, f"tensor {name!r} has data_offsets {offsets!r}")
    begin, end = offsets
    if end > data_len:
        raise _bad(path, f"tensor {name!r} ends at byte {end} of a {data_len}-byte data region; truncated?")
    expected = math.prod(shape) * _ITEMSIZE[dtype]
    if end - begin != expected:
        raise _bad(path, f"tensor {name!r}: shape {shape} of {dtype} needs {expected} bytes, "
                         f"its offsets span {end - begin}")
    return dtype, tuple(shape), begin, end


def _fast_specs(header: dict, data_len: int):
    """(names, dtypes, shapes, begins, ends) of a valid header, checked a column at a
    time (20,000 entries in a few ms); None when any check fails, and then ``_spec``,
    entry by entry, finds the one that is wrong and says what is wrong with it."""
    try:
        values = list(header.values())
        dtypes = [v["dtype"] for v in values]
        shapes = [v["shape"] for v in values]
        offsets = [v["data_offsets"] for v in values]
        if (set(map(type, values)) - {dict} or set(map(type, offsets)) - {list}
                or set(map(len, offsets)) - {2} or set(map(type, shapes)) - {list}
                or set(dtypes) - _ITEMSIZE.keys()):
            return None
        dims = list(itertools.chain.from_iterable(shapes))
        begins = [o[0] for o in offsets]
        ends = [o[1] for o in offsets]
        if set(map(type, dims)) - {int} or set(map(type, begins)) - {int} or set(map(type, ends)) - {int}:
            return None
        if dims and not (0 <= min(dims) and max(dims) < 1 << 63):
            return None
        spans = [e - b for b, e in zip(begins, ends)]
        if spans != [math.prod(sh) * _ITEMSIZE[dt] for sh, dt in zip(shapes, dtypes)]:
            return None
        if begins and not (0 <= min(begins) and min(spans) >= 0 and max(ends) <= data_len):
            return None
    except (KeyError, TypeError, IndexError):
        return None
    return list(header), dtypes, shapes, begins, ends


def _check_layout(path: str, names, begins, ends, data_len: int) -> None:
    """The spans cover the data region exactly: no overlap, no gap, nothing after."""
    position = 0
    for begin, end, name in sorted(zip(begins, ends, names)):
        if begin != position:
            what = "overlaps the tensor before it" if begin < position else f"leaves a gap at byte {position}"
            raise _bad(path, f"tensor {name!r} {what}")
        position = end
    if position != data_len:
        raise _bad(path, f"{data_len - position} bytes after the last tensor")


def load(path: str) -> Checkpoint:
    """The checkpoint of one file; its handles read through one FileGuard (base.py)
    holding the file's state from before the header was read."""
    try:
        state = file_state(path)
        n, header, data_len = read_header(path)
    except OSError as e:
        raise CorruptFileError(f"{path}: cannot read ({e.strerror or e})") from None
    file_metadata = header.pop("__metadata__", None) or {}
    if not isinstance(file_metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in file_metadata.items()):
        raise _bad(path, "__metadata__ is not a map of strings")
    columns = _fast_specs(header, data_len)
    if columns is None:  # something is wrong: find the entry and say what
        specs = [(name, *_spec(path, name, spec, data_len)) for name, spec in header.items()]
        columns = tuple(list(c) for c in zip(*specs)) if specs else ([], [], [], [], [])
    names, dtypes, shapes, begins, ends = columns
    _check_layout(path, names, begins, ends, data_len)

    data = _map(path, 8 + n, data_len)
    mapped = data_len > 0
    read = FileGuard(path, state).read
    partial = functools.partial
    tensors: dict[str, TensorHandle] = {}
    for name, st_dtype, shape, begin, end in zip(names, dtypes, shapes, begins, ends):
        dtype = DTYPES[st_dtype]
        shape = tuple(shape)
        # Positional: name, shape, dtype, nbytes, materialize, storage_dtype, mapped, source, span.
        tensors[name] = TensorHandle(
            name, shape, dtype, end - begin, partial(read, name, _view, data, begin, end, dtype, shape),
            _STORAGE_NAMES[st_dtype], mapped, path, (data, begin, end) if mapped and not dtype.is_complex else None,
        )
    return Checkpoint(name=path, format="safetensors", tensors=tensors, info={"metadata": dict(file_metadata)},
                      files={path: state})


def _view(data: torch.Tensor, begin: int, end: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Tensor bytes ``data[begin:end]`` as ``dtype`` and ``shape``: a view of the mapping
    (a copy of these bytes when they are misaligned for a dtype view)."""
    raw = data[begin:end]
    try:
        return raw.view(dtype).reshape(shape)
    except RuntimeError:
        return raw.clone().view(dtype).reshape(shape)


def _map(path: str, offset: int, length: int) -> torch.Tensor:
    """The data region as a uint8 tensor over a private (copy-on-write) mapping:
    nothing torchdiff does can write to the file."""
    if length == 0:
        return torch.empty(0, dtype=torch.uint8)
    try:
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except (OSError, ValueError) as e:
        raise CorruptFileError(f"{path}: cannot map ({e})") from None
    return torch.frombuffer(mm, dtype=torch.uint8, count=length, offset=offset)
