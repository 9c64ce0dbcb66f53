"""The lazy checkpoint every reader returns."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch

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
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


@dataclass(eq=False)
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
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    materialize: Callable[[], torch.Tensor]
    storage_dtype: str = ""
    mapped: bool = False

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
    """

    name: str
    format: str
    tensors: dict[str, TensorHandle]
    metadata: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    _closers: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name].materialize()

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def keys(self):
        return self.tensors.keys()

    @property
    def nbytes(self) -> int:
        return sum(h.nbytes for h in self.tensors.values())

    @property
    def params(self) -> int:
        return sum(h.numel for h in self.tensors.values())

    def close(self) -> None:
        while self._closers:
            self._closers.pop()()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def tensor_handle(name: str, tensor: torch.Tensor, mapped: bool = False) -> TensorHandle:
    """A handle for a tensor already in memory (or already a view of a mapping)."""
    return TensorHandle(
        name=name,
        shape=tuple(tensor.shape),
        dtype=tensor.dtype,
        nbytes=tensor.numel() * tensor.element_size(),
        materialize=lambda: tensor,
        mapped=mapped,
    )


def is_scalar_leaf(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def flatten(
    obj: Any, prefix: str = "", tensors: dict | None = None, metadata: dict | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten nested dicts/lists of tensors into dotted names.

    Tensors go to ``tensors``; scalar leaves (and short lists of scalars) go to
    ``metadata``; anything else is recorded by its type name in ``metadata``.
    """
    tensors = {} if tensors is None else tensors
    metadata = {} if metadata is None else metadata
    if isinstance(obj, torch.Tensor):
        if obj.ndim == 0 and not prefix:
            metadata["value"] = obj.item()
        else:
            tensors[prefix or "tensor"] = obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            flatten(value, f"{prefix}.{key}" if prefix else str(key), tensors, metadata)
    elif isinstance(obj, (list, tuple)):
        if obj and all(is_scalar_leaf(v) for v in obj):
            metadata[prefix] = list(obj)
        elif not obj:
            metadata[prefix] = []
        else:
            for i, value in enumerate(obj):
                flatten(value, f"{prefix}.{i}" if prefix else str(i), tensors, metadata)
    elif is_scalar_leaf(obj):
        metadata[prefix or "value"] = obj
    else:
        item = getattr(obj, "item", None)
        if callable(item) and getattr(obj, "shape", None) == ():
            metadata[prefix] = item()
        else:
            metadata[prefix] = f"<{type(obj).__name__}>"
    return tensors, metadata
