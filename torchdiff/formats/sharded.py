"""Hugging Face sharded checkpoints: one logical checkpoint over several files.

An index (``model.safetensors.index.json``, ``pytorch_model.bin.index.json``) maps
each tensor name to the shard file holding it (``weight_map``). Every shard is opened
through :func:`torchdiff.formats.load`, so safetensors shards stay lazy and mapped and
``.bin`` shards go through the weights-only torch reader; the checkpoint's handles are
the shards' own handles, under the index's names and in its order.

A directory is read as: its one ``*.index.json`` (of two, the safetensors one); else,
with no index, ``model.safetensors`` or ``pytorch_model.bin`` when present (a Hugging
Face model or Trainer checkpoint folder), else its one
checkpoint file (``model.safetensors``), returned as that file's checkpoint. Several
indexes or several candidate files are an error that lists them.

Checked: the index is JSON with a ``weight_map`` of names to relative shard paths
inside the index's directory; every shard exists; every tensor is in its shard.
Tensors a shard holds but the index does not list there (an extra tensor, or a second
copy of a tensor the index maps to another shard) are left out, counted in
``info["sharded"]["unlisted_tensors"]`` and named as ``shard:tensor`` in the
``directory`` section's not-read list: said, never silent.
"""

from __future__ import annotations

import json
import os
from typing import Any

from torchdiff.errors import CorruptFileError, InputNotFoundError, UsageError
from torchdiff.formats.base import Checkpoint, TensorHandle

INDEX_SUFFIX = ".index.json"
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def load(path: str) -> Checkpoint:
    """Open a sharded checkpoint from its index, or a directory holding one."""
    if os.path.isdir(path):
        return _load_directory(path)
    return _load_index(path)


def _load_directory(path: str) -> Checkpoint:
    from torchdiff import formats

    entries = sorted(e for e in os.listdir(path) if os.path.isfile(os.path.join(path, e)))
    indexes = [e for e in entries if e.endswith(INDEX_SUFFIX)]
    preferred = [e for e in indexes if e.endswith(".safetensors" + INDEX_SUFFIX)]
    if len(indexes) > 1 and len(preferred) == 1:
        indexes = preferred  # a Hugging Face repo shipping both formats: safetensors first, as transformers does
    if len(indexes) == 1:
        ckpt = _load_index(os.path.join(path, indexes[0]))
        used = set(ckpt.info["sharded"]["shards"]) | {indexes[0]}
        return _not_read(ckpt, path, indexes[0], [e for e in entries if e not in used and _is_checkpoint(e)])
    if len(indexes) > 1:
        raise UsageError(
            f"{path}: the directory holds {len(indexes)} checkpoint indexes ({', '.join(indexes)}) "
            "(pass the one to read, e.g. " + os.path.join(path, indexes[0]) + ")"
        )
    files = [e for e in entries if _is_checkpoint(e)]
    found = files
    if len(files) > 1:
        # A Hugging Face model or Trainer checkpoint folder (weights beside optimizer.pt,
        # training_args.bin, ...): its weights file, in transformers' order of preference.
        for name in HF_WEIGHT_FILES:
            if name in files:
                files = [name]
                break
    if len(files) == 1:
        return _not_read(formats.load(os.path.join(path, files[0])), path, files[0],
                         [e for e in found if e != files[0]])
    if not files:
        raise InputNotFoundError(
            f"{path}: the directory holds no checkpoint (no *{INDEX_SUFFIX} and no file ending in "
            f"{', '.join(formats.extensions)}; use -r to compare two directories file by file)"
        )
    raise UsageError(
        f"{path}: the directory holds {len(files)} checkpoint files and no index ({', '.join(files)}) "
        "(pass the file to read, or use -r to compare two directories file by file)"
    )


def _is_checkpoint(entry: str) -> bool:
    from torchdiff import formats

    return os.path.splitext(entry)[1].lower() in formats.extensions


def _not_read(ckpt: Checkpoint, directory: str, read: str, others: list[str]) -> Checkpoint:
    """``ckpt`` (read from ``read`` in ``directory``) noting what of the directory it did
    not read (``info["directory"]``): other checkpoint files, after the ``shard:tensor``
    entries the index left out (``_load_index``): said, never silent."""
    not_read = ckpt.info.get("directory", {}).get("not_read", []) + others
    if not_read:
        ckpt.info["directory"] = {"path": directory, "read": read, "not_read": not_read}
    return ckpt


def _read_index(path: str) -> tuple[dict[str, str], dict[str, Any]]:
    try:
        with open(path, "rb") as f:
            index = json.loads(f.read().decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise CorruptFileError(
            f"{path}: not a valid JSON index ({type(e).__name__}: {str(e)[:200]}) "
            "(the file may be truncated; re-download it)"
        ) from None
    except OSError as e:
        raise InputNotFoundError(f"{path}: cannot be read ({e.strerror or e})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CorruptFileError(
            f'{path}: no "weight_map" object in the index (a sharded checkpoint index maps each tensor '
            'name to its shard file: {"weight_map": {"name": "model-00001-of-00002.safetensors"}})'
        )
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise CorruptFileError(
                f"{path}: tensor {name!r} maps to {shard!r}, not a shard file name (fix the index)"
            )
        parts = shard.replace("\\", "/").split("/")
        if os.path.isabs(shard) or ".." in parts:
            raise CorruptFileError(
                f"{path}: tensor {name!r} maps to shard {shard!r}, outside the index's directory "
                "(shards must sit beside the index; fix the index)"
            )
        if shard.endswith(INDEX_SUFFIX):
            raise CorruptFileError(
                f"{path}: tensor {name!r} maps to {shard!r}, another index, not a shard (fix the index)"
            )
    metadata = index.get("metadata")
    return weight_map, metadata if isinstance(metadata, dict) else {}


def _load_index(path: str) -> Checkpoint:
    from torchdiff import formats

    weight_map, index_metadata = _read_index(path)
    base = os.path.dirname(path)
    first_tensor: dict[str, str] = {}
    for name, shard in weight_map.items():
        first_tensor.setdefault(shard, name)

    shards: dict[str, Checkpoint] = {}
    try:
        for shard, name in first_tensor.items():
            shard_path = os.path.join(base, shard)
            if not os.path.isfile(shard_path):
                missing = sum(1 for s in weight_map.values() if s == shard)
                raise CorruptFileError(
                    f"{path}: tensor {name!r} (and {missing - 1} more) maps to shard {shard!r}, which does not "
                    f"exist ({shard_path if shard_path.isprintable() else repr(shard_path)}) "
                    "(download the missing shard, or fix the index)"
                )
            shards[shard] = formats.load(shard_path)

        tensors: dict[str, TensorHandle] = {}
        for name, shard in weight_map.items():
            handle = shards[shard].tensors.get(name)
            if handle is None:
                raise CorruptFileError(
                    f"{path}: tensor {name!r} is not in its shard {shard!r} "
                    "(the index and the shards disagree; re-download them together)"
                )
            tensors[name] = handle
    except BaseException:
        for checkpoint in shards.values():
            checkpoint.close()
        raise

    metadata: dict[str, Any] = {}
    unlisted = [f"{shard}:{n}" for shard, checkpoint in shards.items() for n in checkpoint.tensors
                if weight_map.get(n) != shard]
    shard_info: dict[str, Any] = {}
    for shard, checkpoint in shards.items():
        for key, value in checkpoint.metadata.items():
            metadata.setdefault(key, value)
        if any(checkpoint.info.values()):
            shard_info[shard] = checkpoint.info
    info: dict[str, Any] = {
        "sharded": {
            "index": os.path.basename(path),
            "shards": list(shards),
            "shard_format": sorted({c.format for c in shards.values()}),
            "index_metadata": index_metadata,
            "unlisted_tensors": len(unlisted),
        }
    }
    if shard_info:
        info["shard_info"] = shard_info
    closers = [checkpoint.close for checkpoint in shards.values()]
    files = {f: state for checkpoint in shards.values() for f, state in checkpoint.files.items()}
    ckpt = Checkpoint(name=path, format="sharded", tensors=tensors, metadata=metadata, info=info, _closers=closers,
                      files=files)
    return _not_read(ckpt, base or ".", os.path.basename(path), unlisted)

