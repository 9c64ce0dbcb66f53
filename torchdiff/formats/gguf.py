"""GGUF files (llama.cpp): the header parsed here, values through the gguf package.

``_parse_header`` walks the key/values and tensor infos (GGUFReader took 4.6 s for a
150,000-token vocabulary; it remains the reader for big-endian and old-version files,
and the reference in tests) and the file is mapped; no tensor bytes are read at load
time; ``gguf.quants.dequantize`` decodes quantized types. Names are the file's (``blk.0.attn_q.weight``).
GGUF lists dimensions innermost first (``ne[0]`` is the row length); handles report
the numpy/torch order the reader's arrays use, i.e. the GGUF dimensions reversed: a
``[4096, 11008]`` GGUF tensor is ``(11008, 4096)`` here.

``storage_dtype`` is the GGML type name of a quantized type (``Q8_0``, ``Q4_K``...) and
torch's name of a plain one (F32 ``float32``, F16 ``float16``, BF16 ``bfloat16``, F64,
I8, I16, I32, I64: :data:`PLAIN_STORAGE`), so that an F32 GGUF tensor and a float32
safetensors tensor of equal values compare as unchanged, not retyped, whether or not a
name mapping pairs them; ``nbytes`` is the bytes the file spends on the tensor, block
scales included. Plain types keep their natural torch dtype and materialise as views of
the copy-on-write file mapping (``mapped=True``). Quantized
types report ``torch.float32`` and materialise by ``gguf.quants.dequantize`` into
memory; a type the installed gguf cannot dequantize is listed but raises on
``materialize()``.

Key/value metadata goes to ``Checkpoint.info["gguf"]``; arrays longer than
``MAX_ARRAY_ITEMS`` (the tokenizer's vocabulary, merges, scores) are recorded as
``{"type": "array", "element_type": ..., "length": n}`` instead of their contents. The
same key/values are ``Checkpoint.metadata``, compared between two GGUF files (a summarised
array as ``<array: n TYPE sha256:...>`` of its stored bytes); the header's counts
(``GGUF.tensor_count``, ``GGUF.kv_count``) are left out.

gguf is imported only here (the ``gguf`` extra).
"""

from __future__ import annotations

import hashlib
import mmap
import struct
from typing import Any, Callable

import torch

from torchdiff.errors import CorruptFileError, MissingDependencyError, UnknownFormatError
from torchdiff.formats.base import Checkpoint, TensorHandle

MAX_ARRAY_ITEMS = 64

# GGML type name -> torch dtype, for the types stored as plain numbers.
_PLAIN_DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
}

# What GGUFReader raises on bad bytes (short reads, bad enums, impossible shapes).
_READ_ERRORS = (
    ValueError, KeyError, IndexError, OSError, OverflowError, TypeError, UnicodeDecodeError,
    MemoryError, AssertionError, struct.error, RecursionError, AttributeError,
)


def load(path: str) -> Checkpoint:
    """Open a GGUF file lazily (header only; tensor bytes mapped, read on demand)."""
    try:
        import gguf
        from gguf.constants import GGUFValueType
        from gguf.quants import dequantize
    except ImportError:
        raise MissingDependencyError(
            f"{path}: reading GGUF files needs the gguf package, which is not installed "
            "(pip install torchdiff[gguf])"
        ) from None
    with open(path, "rb") as f:
        head = f.read(4)
        if head != b"GGUF":
            raise CorruptFileError(
                f"{path}: not a GGUF file (it does not start with the GGUF magic; the file may be empty or truncated)"
            )
        try:
            header = _parse_header(f, gguf)
        except (ValueError, struct.error) as e:
            raise CorruptFileError(
                f"{path}: not a readable GGUF file ({e}) (the file may be truncated or damaged; re-download it)"
            ) from None
    try:
        if header is not None:
            kv, infos, data_start, digests = header
            tensors = _fast_handles(path, infos, data_start, gguf, dequantize)
        else:  # big-endian or an old version: the gguf package's own reader
            # mode "c": a private copy-on-write mapping, so torch gets writable arrays without a copy.
            reader = gguf.GGUFReader(path, mode="c")
            tensors = _handles(path, reader, dequantize)
            kv = _key_values(reader, GGUFValueType)
            digests = {key: hashlib.sha256(b"".join(bytes(p) for p in reader.fields[key].parts[3:])).hexdigest()[:16]
                       for key, v in kv.items() if isinstance(v, dict)}
    except _READ_ERRORS as e:
        raise CorruptFileError(
            f"{path}: not a readable GGUF file ({type(e).__name__}: {_first_line(e)}) "
            "(the file may be truncated, or newer than the installed gguf: re-download it or pip install -U gguf)"
        ) from None
    return Checkpoint(name=path, format="gguf", tensors=tensors, metadata=_metadata(kv, digests), info={"gguf": kv})


#: Header pseudo-keys that count what the file holds (the tensors and keys are compared themselves).
_COUNT_KEYS = ("GGUF.tensor_count", "GGUF.kv_count")


def _metadata(kv: dict[str, Any], digests: dict[str, str]) -> dict[str, Any]:
    """The key/values as metadata values, compared like a training checkpoint's (a
    changed ``llama.rope.freq_base``, context length or tokenizer is a difference, not
    an identical file): an array summarised in ``info`` (the tokenizer's vocabulary)
    becomes ``<array: 151936 STRING sha256:16 hex digits>`` of its stored bytes, so that
    two vocabularies of one length but other tokens differ."""
    out: dict[str, Any] = {}
    for key, value in kv.items():
        if key in _COUNT_KEYS:
            continue
        if isinstance(value, dict):
            value = f"<array: {value['length']} {value['element_type']} sha256:{digests.get(key, '?')}>"
        out[key] = value
    return out


# GGUF value type -> bytes, for the fixed-size ones; 8 is STRING, 9 is ARRAY.
_VALUE_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_TYPE_NAMES = {0: "UINT8", 1: "INT8", 2: "UINT16", 3: "INT16", 4: "UINT32", 5: "INT32", 6: "FLOAT32",
               7: "BOOL", 8: "STRING", 9: "ARRAY", 10: "UINT64", 11: "INT64", 12: "FLOAT64"}


def _parse_header(f: Any, gguf: Any):
    """Parse a little-endian GGUF v2/v3 header: (key/values, tensor infos, data start).

    Every length is checked against the file's size before it is used (GGUFReader reads
    past the end of a short file as empty arrays, so a damaged array length made it
    loop 2**40 times). Returns None for a big-endian file once checked: GGUFReader
    decodes it. Why not GGUFReader always: it builds a NumPy view per vocabulary
    entry, 4.6 s for a 150,000-token tokenizer on every load; this walk takes ~0.1 s.
    GGUFReader stays the reference (tests/test_formats_gguf.py).
    """
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        size = len(mm)
        if size < 24:
            raise ValueError(f"{size} bytes, shorter than a GGUF header")
        version = struct.unpack_from("<I", mm, 4)[0]
        endian = ">" if version & 0xFFFF == 0 else "<"
        version, tensor_count, kv_count = struct.unpack_from(endian + "IQQ", mm, 4)
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version}; torchdiff reads versions 2 and 3")
        u32, u64 = struct.Struct(endian + "I"), struct.Struct(endian + "Q")

        def need(offset: int, n: int, what: str) -> int:
            if offset + n > size:
                raise ValueError(f"the {what} at byte {offset} runs past the end of the file")
            return offset + n

        def string(offset: int, what: str) -> tuple[str, int]:
            need(offset, 8, what)
            end = need(offset + 8, u64.unpack_from(mm, offset)[0], what)
            return bytes(mm[offset + 8:end]).decode("utf-8", "replace"), end

        def value(offset: int, kind: int, key: str, depth: int, keep: bool) -> tuple[Any, int]:
            if kind in _VALUE_SIZES:
                end = need(offset, _VALUE_SIZES[kind], f"value of {key!r}")
                return (struct.unpack_from(endian + _FORMATS[kind], mm, offset)[0] if keep else None), end
            if kind == _STRING:
                text, end = string(offset, f"value of {key!r}")
                return (text if keep else None), end
            if kind == _ARRAY and depth < 8:
                need(offset, 12, f"array {key!r}")
                item, count = u32.unpack_from(mm, offset)[0], u64.unpack_from(mm, offset + 4)[0]
                offset += 12
                short = keep and count <= MAX_ARRAY_ITEMS and item != _ARRAY
                summary = {"type": "array", "element_type": _TYPE_NAMES.get(item, "UNKNOWN"), "length": count}
                if item in _VALUE_SIZES:
                    end = need(offset, count * _VALUE_SIZES[item], f"array {key!r} ({count} items)")
                    if short:
                        return list(struct.unpack_from(f"{endian}{count}{_FORMATS[item]}", mm, offset)), end
                    return summary, end
                if item == _STRING and not short:  # the tokenizer's vocabulary: keep this loop tight
                    read_length = u64.unpack_from
                    for _ in range(count):
                        if offset + 8 > size:
                            break
                        offset += 8 + read_length(mm, offset)[0]
                    return summary, need(offset, 0, f"array {key!r} ({count} strings)")
                items = []
                for _ in range(count):  # each item takes >= 8 bytes, so this ends at the file's end
                    got, offset = value(offset, item, key, depth + 1, short)
                    items.append(got)
                return (items if short else summary), offset
            raise ValueError(f"unknown value type {kind} for key {key!r}")

        # GGUFReader's pseudo-keys first, as it lists them.
        kv: dict[str, Any] = {"GGUF.version": version, "GGUF.tensor_count": tensor_count, "GGUF.kv_count": kv_count}
        digests: dict[str, str] = {}  # summarised arrays -> SHA-256 of their stored bytes
        offset = 24
        for _ in range(kv_count):  # each entry takes >= 12 bytes
            key, end = string(offset, "key")
            need(end, 4, f"type of {key!r}")
            kv[key], offset = value(end + 4, u32.unpack_from(mm, end)[0], key, 0, True)
            if isinstance(kv[key], dict):
                digests[key] = hashlib.sha256(mm[end + 4:offset]).hexdigest()[:16]
        infos = []
        for _ in range(tensor_count):  # each entry takes >= 24 bytes
            name, end = string(offset, "tensor name")
            need(end, 4, f"tensor {name!r}")
            n_dims = u32.unpack_from(mm, end)[0]
            if n_dims > 8:
                raise ValueError(f"tensor {name!r} has {n_dims} dimensions (GGML allows at most 4)")
            need(end + 4, 8 * n_dims + 12, f"tensor {name!r}")
            dims = struct.unpack_from(f"{endian}{n_dims}Q", mm, end + 4)
            type_id, data_offset = struct.unpack_from(endian + "IQ", mm, end + 4 + 8 * n_dims)
            infos.append((name, dims, type_id, data_offset))
            offset = end + 16 + 8 * n_dims
        alignment = kv.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"general.alignment {alignment!r} is not a power of two")
        data_start = -(-offset // alignment) * alignment
        for name, dims, type_id, data_offset in infos:
            try:
                qtype = gguf.GGMLQuantizationType(type_id)
            except ValueError:
                raise ValueError(f"tensor {name!r} has unknown GGML type {type_id}") from None
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            numel = 1
            for d in dims:
                numel *= d
            if dims and dims[0] % block:
                raise ValueError(f"tensor {name!r}: row of {dims[0]} is not a multiple of {qtype.name}'s block {block}")
            need(data_start + data_offset, numel // block * type_size, f"data of tensor {name!r}")
        if endian == ">":
            return None  # checked; a big-endian file's values are decoded by GGUFReader
        return kv, infos, data_start, digests


def _fast_handles(path: str, infos, data_start: int, gguf: Any, dequantize: Callable) -> dict[str, TensorHandle]:
    import numpy as np

    data = np.memmap(path, dtype=np.uint8, mode="c") if infos else None
    tensors: dict[str, TensorHandle] = {}
    for name, dims, type_id, offset in infos:
        qtype = gguf.GGMLQuantizationType(type_id)
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        shape = tuple(int(d) for d in reversed(dims))
        numel = 1
        for d in dims:
            numel *= d
        nbytes = numel // block * type_size
        plain = _PLAIN_DTYPES.get(qtype.name)
        begin = data_start + offset

        def raw(begin=begin, nbytes=nbytes, shape=shape, qtype=qtype, block=block, type_size=type_size):
            chunk = data[begin:begin + nbytes]
            if _PLAIN_DTYPES.get(qtype.name) is not None:
                return chunk.view(_NUMPY_DTYPES[qtype.name]).reshape(shape)
            rows = shape[:-1] + ((shape[-1] // block * type_size),) if shape else (nbytes,)
            return chunk.reshape(rows)

        info = _Info(name, qtype, raw)
        tensors[name] = TensorHandle(
            name=name, shape=shape, dtype=plain if plain is not None else torch.float32, nbytes=nbytes,
            materialize=_reader(path, info, shape, plain, False, dequantize),
            storage_dtype=PLAIN_STORAGE.get(qtype.name, qtype.name), mapped=plain is not None,
        )
    return tensors


#: GGML's names of plain storage types -> torch's (``storage_dtype``).
PLAIN_STORAGE = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                 "I8": "int8", "I16": "int16", "I32": "int32", "I64": "int64"}

_NUMPY_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "F64": "<f8", "I8": "i1", "I16": "<i2", "I32": "<i4",
                 "I64": "<i8"}


class _Info:
    """The part of GGUFReader's ReaderTensor that ``_reader`` uses."""

    def __init__(self, name: str, tensor_type: Any, raw: Callable) -> None:
        self.name, self.tensor_type, self._raw = name, tensor_type, raw

    @property
    def data(self):
        return self._raw()


def _handles(path: str, reader: Any, dequantize: Callable) -> dict[str, TensorHandle]:
    swapped = reader.byte_order == "S"
    tensors: dict[str, TensorHandle] = {}
    for t in reader.tensors:
        type_name = t.tensor_type.name
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        plain = _PLAIN_DTYPES.get(type_name)
        tensors[t.name] = TensorHandle(
            name=t.name,
            shape=shape,
            dtype=plain if plain is not None else torch.float32,
            nbytes=int(t.n_bytes),
            materialize=_reader(path, t, shape, plain, swapped, dequantize),
            storage_dtype=PLAIN_STORAGE.get(type_name, type_name),
            mapped=plain is not None and not swapped,
        )
    return tensors


def _reader(
    path: str, t: Any, shape: tuple[int, ...], plain: torch.dtype | None, swapped: bool, dequantize: Callable
) -> Callable[[], torch.Tensor]:
    name, type_name = t.name, t.tensor_type.name

    def materialize() -> torch.Tensor:
        data = t.data  # a view of the file mapping: numbers for plain types, raw bytes otherwise
        if swapped and (plain is None or plain == torch.bfloat16):
            raise UnknownFormatError(
                f"{path}: tensor {name!r} is {type_name} in a big-endian GGUF file, which torchdiff does not "
                "decode (convert the file to little-endian)"
            )
        try:
            if plain == torch.bfloat16:
                tensor = torch.from_numpy(data).view(torch.bfloat16)
            elif plain is not None:
                if not data.dtype.isnative:
                    data = data.astype(data.dtype.newbyteorder("="))
                tensor = torch.from_numpy(data)
            else:
                tensor = torch.from_numpy(dequantize(data, t.tensor_type))
        except NotImplementedError:
            raise UnknownFormatError(
                f"{path}: tensor {name!r} is stored as {type_name}, which the installed gguf cannot "
                "dequantize (pip install -U gguf)"
            ) from None
        except _READ_ERRORS as e:
            raise CorruptFileError(
                f"{path}: tensor {name!r} ({type_name}) cannot be decoded ({type(e).__name__}: {_first_line(e)}) "
                "(re-download or re-convert the file)"
            ) from None
        if tuple(tensor.shape) != shape:
            raise CorruptFileError(
                f"{path}: tensor {name!r} ({type_name}) decodes to shape {tuple(tensor.shape)}, its header says "
                f"{shape} (re-download or re-convert the file)"
            )
        return tensor

    return materialize


def _key_values(reader: Any, value_type: Any) -> dict[str, Any]:
    kv: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if not field.types:
            continue
        main = field.types[0]
        if main == value_type.ARRAY:
            element = field.types[-1] if len(field.types) > 1 else None
            length = len(field.data)
            if length > MAX_ARRAY_ITEMS or element in (None, value_type.ARRAY):
                kv[key] = {
                    "type": "array",
                    "element_type": element.name if element is not None else "UNKNOWN",
                    "length": length,
                }
            else:
                kv[key] = [_value(field.parts[i], element, value_type) for i in field.data]
        else:
            kv[key] = _value(field.parts[-1], main, value_type)
    return kv


def _value(part: Any, kind: Any, value_type: Any) -> Any:
    if kind == value_type.STRING:
        return bytes(part).decode("utf-8", "replace")
    return part.tolist()[0]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else "unreadable")[:200]
