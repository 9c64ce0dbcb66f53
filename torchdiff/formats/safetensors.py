"""safetensors files, through the safetensors package (zero-copy mmap views)."""

from __future__ import annotations

import math

import torch

from torchdiff.errors import CorruptFileError
from torchdiff.formats.base import Checkpoint, TensorHandle

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


def load(path: str) -> Checkpoint:
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(path, framework="pt", device="cpu")
        names = list(handle.keys())
        file_metadata = handle.metadata() or {}
        specs = []
        for name in names:
            view = handle.get_slice(name)
            specs.append((name, tuple(view.get_shape()), view.get_dtype()))
    except SafetensorError as e:
        raise CorruptFileError(f"{path}: not a valid safetensors file ({e})") from None
    except (OSError, ValueError, RuntimeError) as e:
        raise CorruptFileError(f"{path}: not a valid safetensors file ({e})") from None

    def reader(name: str):
        def materialize() -> torch.Tensor:
            try:
                return handle.get_tensor(name)
            except (SafetensorError, OSError, RuntimeError, ValueError) as e:
                raise CorruptFileError(f"{path}: tensor {name!r} cannot be read ({e})") from None

        return materialize

    tensors: dict[str, TensorHandle] = {}
    for name, shape, st_dtype in specs:
        dtype = DTYPES.get(st_dtype)
        if dtype is None:
            raise CorruptFileError(
                f"{path}: tensor {name!r} has dtype {st_dtype}, which this torch cannot hold "
                f"(readable: {', '.join(sorted(DTYPES))})"
            )
        itemsize = torch.empty((), dtype=dtype).element_size()
        tensors[name] = TensorHandle(
            name=name,
            shape=shape,
            dtype=dtype,
            nbytes=math.prod(shape) * itemsize,
            materialize=reader(name),
            mapped=True,
        )
    return Checkpoint(name=path, format="safetensors", tensors=tensors, info={"metadata": dict(file_metadata)})
