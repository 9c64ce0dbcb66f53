"""Small valid checkpoints of every format, and a way to read one completely.

Shared by the hostile-input tests (tests/test_hostile_inputs.py, test_fuzz.py,
test_input_safety.py) and the long fuzzer (scripts/fuzz_readers.py): each seed is a
few hundred bytes, so that every truncation of it can be tried and every mutation is
cheap to read.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import torchdiff

# seed name -> (file name, --format); every reader is covered, the torch one twice.
SEEDS: dict[str, tuple[str, str]] = {
    "safetensors": ("seed.safetensors", "safetensors"),
    "torch_zip": ("seed.pt", "torch"),
    "torch_legacy": ("seed_legacy.pt", "torch"),
    "npy": ("seed.npy", "numpy"),
    "npz": ("seed.npz", "numpy"),
    "npz_compressed": ("seed_compressed.npz", "numpy"),
    "gguf": ("seed.gguf", "gguf"),
    "mat": ("seed.mat", "matlab"),
    "mat_compressed": ("seed_compressed.mat", "matlab"),
    "sharded": ("model.safetensors.index.json", "sharded"),
}


# Seeds that need an optional library (the gguf and mat extras).
_LIBRARIES = {"gguf": "gguf", "mat": "scipy", "mat_compressed": "scipy"}


def available(kind: str) -> bool:
    """Whether the library that writes and reads seed ``kind`` is installed."""
    import importlib.util

    library = _LIBRARIES.get(kind)
    return library is None or importlib.util.find_spec(library) is not None


def require(kind: str) -> None:
    """Skip the calling test when seed ``kind``'s library is not installed."""
    if not available(kind):
        import pytest

        pytest.skip(f"{_LIBRARIES[kind]} is not installed")


def _tensors() -> dict[str, torch.Tensor]:
    return {
        "layer.0.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3) / 7,
        "layer.0.bias": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
        "codes": torch.tensor([1, -3, 5], dtype=torch.int8),
    }


def npy_bytes(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array, allow_pickle=False)
    return out.getvalue()


def write_seed(kind: str, directory: Path) -> Path:
    """Write the seed ``kind`` (a key of SEEDS) under ``directory``; return its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / SEEDS[kind][0]
    tensors = _tensors()
    if kind == "safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(path), metadata={"format": "pt"})
    elif kind == "torch_zip":
        torch.save({"model": tensors, "step": 3, "lr": 0.1}, path)
    elif kind == "torch_legacy":
        torch.save({"model": tensors, "step": 3}, path, _use_new_zipfile_serialization=False)
    elif kind == "npy":
        np.save(path, np.arange(5, dtype=np.float32))
    elif kind in ("npz", "npz_compressed"):
        save = np.savez_compressed if kind == "npz_compressed" else np.savez
        save(path, w=np.arange(6, dtype=np.float32).reshape(2, 3), b=np.array([1, 2], dtype=np.int16))
    elif kind == "gguf":
        import gguf

        writer = gguf.GGUFWriter(str(path), "llama")
        writer.add_uint32("llama.block_count", 1)
        writer.add_array("tokenizer.ggml.tokens", ["a", "b"])
        writer.add_tensor("blk.0.w", np.arange(8, dtype=np.float32))
        writer.add_tensor("blk.0.h", np.arange(4, dtype=np.float16))
        q8 = gguf.quants.quantize(np.linspace(-1, 1, 32, dtype=np.float32).reshape(1, 32),
                                  gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor("blk.0.q", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    elif kind in ("mat", "mat_compressed"):
        import scipy.io

        scipy.io.savemat(path, {"W": np.arange(6.0).reshape(2, 3), "lr": 0.1, "name": "net"},
                         do_compression=kind == "mat_compressed")
    elif kind == "sharded":
        from safetensors.torch import save_file

        names = list(tensors)
        save_file({n: tensors[n] for n in names[:2]}, str(directory / "model-00001-of-00002.safetensors"))
        save_file({n: tensors[n] for n in names[2:]}, str(directory / "model-00002-of-00002.safetensors"))
        weight_map = {n: f"model-0000{1 if i < 2 else 2}-of-00002.safetensors" for i, n in enumerate(names)}
        path.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    else:
        raise KeyError(kind)
    return path


def read_all(path: os.PathLike | str, format: str | None = None) -> int:
    """Open a checkpoint and read every tensor's values; the number of tensors read."""
    with torchdiff.load(path, format=format) as ckpt:
        for handle in ckpt.tensors.values():
            handle.materialize()
        return len(ckpt.tensors)


def only_torchdiff_errors(read: Callable[[], object], path: os.PathLike | str) -> None:
    """Run ``read``; any failure must be a one-line TorchDiffError that names ``path``."""
    try:
        read()
    except torchdiff.TorchDiffError as e:
        message = str(e)
        assert str(path) in message, message
        assert "\n" not in message, message


def zip_with(members: list[tuple[str, bytes, int]]) -> bytes:
    """A zip archive of (name, data, compression) members, in memory."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, data, compression in members:
            archive.writestr(name, data, compress_type=compression)
    return out.getvalue()


def safetensors_bytes(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors file from a header (a dict, or raw JSON bytes) and a data region."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


# ---- mutations (the hypothesis fuzz tests and scripts/fuzz_readers.py) ---------------------------

# Integers that make lengths, counts and offsets lie: zero, one, sign and width edges.
INTERESTING = [0, 1, 2, 7, 8, 255, 256, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 2**32, 2**40,
               2**62, 2**63 - 1, 2**63, 2**64 - 1]

# One edit: (kind, position as a fraction of the length, argument).
Op = tuple[str, float, object]
OP_KINDS = ("flip", "set", "insert", "delete", "int", "truncate", "copy")


def apply_ops(data: bytes, ops: list[Op]) -> bytes:
    """``data`` after the edits ``ops`` (each position a fraction of the current length)."""
    buf = bytearray(data)
    for kind, where, arg in ops:
        at = min(int(where * len(buf)), max(len(buf) - 1, 0))
        raw = bytes(arg) if isinstance(arg, (bytes, bytearray)) else None
        n = int.from_bytes(raw[:8], "little") if raw is not None else int(arg)
        if kind == "flip" and buf:
            buf[at] ^= 1 << (n % 8)
        elif kind == "set" and buf:
            buf[at] = n % 256
        elif kind == "insert":
            buf[at:at] = raw if raw is not None else bytes([n % 256]) * 4
        elif kind == "delete":
            del buf[at:at + 1 + n % 16]
        elif kind == "int":  # an interesting integer (or the one given), little-endian, 4 or 8 bytes wide
            value = INTERESTING[n % len(INTERESTING)] if n < 1 << 16 else n
            width = 8 if value >= 2**32 or n % 2 else 4
            buf[at:at + width] = (value % 2 ** (8 * width)).to_bytes(width, "little")
        elif kind == "truncate":
            del buf[at:]
        elif kind == "copy" and buf:  # repeat a stretch elsewhere (duplicated entries, overlaps)
            start = n % len(buf)
            buf[at:at] = buf[start:start + 32]
    return bytes(buf)


def random_ops(rng, n: int | None = None) -> list[Op]:
    """``n`` (default 1 to 6) random edits, drawn from ``rng`` (a random.Random)."""
    ops = []
    for _ in range(n if n is not None else rng.randint(1, 6)):
        kind = rng.choice(OP_KINDS)
        arg: object = rng.randrange(1 << 16)
        if kind == "insert" and rng.random() < 0.5:
            arg = rng.randbytes(rng.randint(1, 64))
        ops.append((kind, rng.random(), arg))
    return ops
