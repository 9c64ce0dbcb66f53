"""Readers: ``load(path, format=None) -> Checkpoint``.

The format is the one given, else the one the extension names, else the one the
file's first bytes show. Each reader lives in its own module and imports its
optional library only when called.
"""

from __future__ import annotations

import importlib
import os
import stat
from typing import Any, Mapping

import torch

from torchdiff.errors import CorruptFileError, InputNotFoundError, UnknownFormatError, UsageError
from torchdiff.formats.base import (
    Checkpoint, TensorHandle, check_unchanged, dtype_name, file_state, flatten, mark_shared, mark_ties, module_ties,
    stored_bytes, tensor_handle, watch,
)
from torchdiff.formats.ties import config_values, find_ties

# format name -> module (in torchdiff.formats) with a ``load(path) -> Checkpoint``.
_READERS: dict[str, str] = {
    "safetensors": "safetensors",
    "torch": "torch_pickle",
    "numpy": "numpy",
    "matlab": "matlab",
    "gguf": "gguf",
    "sharded": "sharded",
    "dcp": "dcp",
}
format_names = sorted(_READERS)

_EXTENSIONS: dict[str, str] = {
    ".safetensors": "safetensors",
    ".pt": "torch",
    ".pth": "torch",
    ".bin": "torch",
    ".ckpt": "torch",
    ".pkl": "torch",  # torch.save under another name (accelerate's random_states_0.pkl)
    ".npy": "numpy",
    ".npz": "numpy",
    ".mat": "matlab",
    ".gguf": "gguf",
    ".distcp": "dcp",
}
extensions = sorted(_EXTENSIONS)


def sniff(path: str) -> str | None:
    """The format shown by the file's first bytes, or None."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04"):
        # A zip: torch's format, or numpy's .npz.
        import zipfile

        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError):
            return None
        if any(n.endswith("data.pkl") for n in names):
            return "torch"
        if names and all(n.endswith(".npy") for n in names):
            return "numpy"
        return None
    if head.startswith(b"\x93NUMPY"):
        return "numpy"
    if head.startswith(b"GGUF"):
        return "gguf"
    if head.startswith(b"MATLAB") or head.startswith(b"\x89HDF\r\n\x1a\n"):
        return "matlab"
    if head[:1] == b"\x80":  # a pickle protocol opcode: legacy torch.save
        return "torch"
    if len(head) >= 9 and head[8:9] == b"{":  # u64 header length then JSON
        return "safetensors"
    return None


def detect_format(path: str) -> str:
    if os.path.isdir(path):
        # torch.distributed.checkpoint (FSDP, torchtitan, Lightning, Megatron torch_dist)
        return "dcp" if os.path.isfile(os.path.join(path, ".metadata")) else "sharded"
    name = os.path.basename(path)
    if name == ".metadata":
        return "dcp"
    if name.endswith(".index.json"):
        return "sharded"
    ext = os.path.splitext(name)[1].lower()
    if ext in _EXTENSIONS:
        return _EXTENSIONS[ext]
    found = sniff(path)
    if found is None:
        raise UnknownFormatError(
            f"{path}: unknown checkpoint format (extensions read: {', '.join(extensions)}; "
            f"or pass --format {'|'.join(format_names)})"
        )
    return found


_SPECIAL_FILES = ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                  (stat.S_ISBLK, "a block device"))


def _check_regular(path: str) -> None:
    """A checkpoint is a regular file or a directory: a named pipe with no writer would
    block the first read forever (and none can be mapped), a device never ends."""
    mode = os.stat(path).st_mode
    for test, what in _SPECIAL_FILES:
        if test(mode):
            raise UnknownFormatError(f"{path}: is {what}, not a checkpoint file (torchdiff reads regular files "
                                     "and directories)")


def check_exists(path: Any) -> None:
    """InputNotFoundError unless ``path`` exists, naming what is wrong: a missing path, or a
    symbolic link that points nowhere (or into a loop of links)."""
    if os.path.exists(path):
        return
    name = os.fspath(path)
    if os.path.islink(name):
        raise InputNotFoundError(f"{name}: a symbolic link to {os.readlink(name)!r}, which does not exist "
                                 "(or the links loop)")
    raise InputNotFoundError(f"{name}: no such file or directory")


def load(path: Any, format: str | None = None, *, unsafe_pickle: bool = False) -> Checkpoint:
    """Open a checkpoint lazily (headers only; tensor bytes are read on demand).

    The state of each file read is kept in ``Checkpoint.files`` (see ``check_unchanged``),
    and every tensor's ``materialize()`` first checks that its file has not changed.

    Args:
        path: a file, a sharded checkpoint's ``*.index.json``, or a directory holding one;
            a torch.distributed.checkpoint directory (holding ``.metadata``), or that file.
        format: one of ``format_names``; None to detect it.
        unsafe_pickle: load a PyTorch pickle with ``weights_only=False`` (runs code from
            the file: only for files the user trusts).

    Raises:
        TorchDiffError: missing path, unknown format, corrupt or unsafe file.
    """
    path = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
    if format is not None and format not in _READERS:
        raise UsageError(f"unknown --format {format!r} (choose from {', '.join(format_names)})")
    check_exists(path)
    _check_regular(path)
    if os.path.isdir(path) and format not in (None, "sharded", "dcp"):
        raise InputNotFoundError(f"{path}: is a directory (use -r to compare directories file by file)")
    fmt = format or detect_format(path)
    module = importlib.import_module(f"torchdiff.formats.{_READERS[fmt]}")
    state = file_state(path) if os.path.isfile(path) else None  # before the first byte is read
    try:
        ckpt = module.load(path, unsafe=True) if unsafe_pickle and fmt == "torch" else module.load(path)
    except OSError as e:  # refused or vanished while read (PermissionError, EIO): one line, whatever the reader
        where = e.filename if isinstance(e.filename, str) else path
        raise CorruptFileError(f"{where}: cannot read ({e.strerror or e})") from None
    if state is not None:
        ckpt.files.setdefault(path, state)
    find_ties(ckpt, path)  # dropped duplicates (safetensors metadata), tie_word_embeddings in config.json
    for handle in ckpt.tensors.values():
        if not handle.source:  # a sharded checkpoint's handles were watched by their shard's load
            watch(handle, path, state)
    return ckpt


def from_object(obj: Any, name: str = "<memory>") -> Checkpoint:
    """A Checkpoint over an in-memory state_dict, nested training dict, or nn.Module."""
    if isinstance(obj, Checkpoint):
        return obj
    module = None
    if isinstance(obj, torch.nn.Module):
        module, obj = obj, obj.state_dict(keep_vars=False)
        fmt = "module"
    elif isinstance(obj, Mapping):
        fmt = "state_dict"
    else:
        raise UsageError(f"cannot compare a {type(obj).__name__}: pass a path, a state_dict or an nn.Module")
    tensors, metadata = flatten(obj)
    tensors = {k: v.detach() for k, v in tensors.items()}
    handles = {k: tensor_handle(k, v) for k, v in tensors.items()}
    mark_shared(handles, tensors, storages=False)  # tied weights: the same elements of one storage
    info = {}
    if module is not None:  # and the same Parameter under two names (FSDP2's DTensors show no shared storage)
        mark_ties(handles, module_ties(module))
        config = getattr(module, "config", None)  # a transformers model: what its shapes do not say (head counts)
        if callable(getattr(config, "to_dict", None)):
            info["config"] = config_values(config.to_dict())
    return Checkpoint(name=name, format=fmt, tensors=handles, metadata=metadata, info=info)


__all__ = [
    "Checkpoint",
    "TensorHandle",
    "check_exists",
    "check_unchanged",
    "dtype_name",
    "detect_format",
    "extensions",
    "format_names",
    "from_object",
    "load",
    "sniff",
]
