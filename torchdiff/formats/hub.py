"""Hugging Face Hub ids as inputs: ``torchdiff gpt2 ./my-finetune``.

A name that is not an existing path and looks like a Hub model id (``gpt2``,
``openai-community/gpt2``) resolves the way ``from_pretrained`` does, through
huggingface_hub's ``snapshot_download`` (the ``hub`` extra; transformers installs it):

- offline (``HF_HUB_OFFLINE=1``, or ``local_files_only=True``): from the local cache
  (``$HF_HUB_CACHE``, by default ``~/.cache/huggingface/hub``), never the network;
- online: a download of the weights only: ``*.safetensors`` and their index, else
  ``pytorch_model*.bin`` and its index, plus ``config.json`` (a few hundred bytes, which
  says whether the embeddings are tied); no optimizer state, no tokenizer;
- ``revision``: a branch, tag or commit (``--revision``), default ``main``.

The snapshot folder is then read as a directory checkpoint (formats/sharded.py). A path
that exists always wins over a Hub id: ``./gpt2`` or a folder named ``gpt2`` is read
from disk; and ``runs/chekpoint-10``, whose ``runs`` is a local folder, is a mistyped
path, reported missing without a Hub lookup.
"""

from __future__ import annotations

import os
import re

from torchdiff.errors import InputNotFoundError, MissingDependencyError

#: What is fetched, in transformers' order of preference: safetensors, else .bin.
WEIGHT_PATTERNS: tuple[tuple[str, ...], ...] = (
    ("*.safetensors", "*.safetensors.index.json", "config.json"),
    ("pytorch_model*.bin", "pytorch_model.bin.index.json", "config.json"),
)
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")
_FILE_EXTENSIONS = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".npy", ".npz", ".mat", ".gguf", ".json")


def looks_like_hub_id(name: str) -> bool:
    """Whether ``name`` (not an existing path) reads as a Hub model id: ``name`` or
    ``org/name`` of letters, digits and ``._-``, not a checkpoint file name, not ``..``.
    ``org/name`` where ``org`` is a local directory is a path with a typo
    (``runs/chekpoint-10``), not an id: it is reported missing, not looked up."""
    if os.path.exists(name) or not _ID.match(name) or ".." in name or name.endswith("."):
        return False
    if "/" in name and os.path.isdir(name.split("/", 1)[0]):
        return False
    return not name.lower().endswith(_FILE_EXTENSIONS)


def offline() -> bool:
    """``HF_HUB_OFFLINE`` set to a true value (as huggingface_hub reads it)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve(repo_id: str, revision: str | None = None, local_files_only: bool | None = None) -> str:
    """The local snapshot folder of ``repo_id``'s weights (downloaded if needed and allowed).

    Raises:
        MissingDependencyError: huggingface_hub is not installed.
        InputNotFoundError: neither a path nor a model found on the Hub or in the cache.
    """
    try:
        import huggingface_hub
    except ImportError:
        raise MissingDependencyError(
            f"{repo_id}: no such file or directory, and reading it as a Hugging Face Hub id needs "
            "huggingface_hub (pip install 'torchdiff[hub]')"
        ) from None
    local = offline() if local_files_only is None else local_files_only
    where = "the local cache (offline: HF_HUB_OFFLINE is set)" if local else "the Hugging Face Hub"
    last: Exception | None = None
    for patterns in WEIGHT_PATTERNS:
        try:
            folder = huggingface_hub.snapshot_download(
                repo_id, revision=revision, allow_patterns=list(patterns), local_files_only=local)
        except Exception as e:  # noqa: BLE001 - the library's errors (HTTP, offline cache miss, bad id) vary by version
            last = e
            continue
        if _has_weights(folder):
            return folder
    detail = type(last).__name__ if last is not None else "no weight files (*.safetensors, pytorch_model*.bin)"
    at = f" at revision {revision!r}" if revision else ""
    raise InputNotFoundError(
        f"{repo_id}: no such file or directory, and no model {repo_id!r}{at} in {where} ({detail})"
    )


def _has_weights(folder: str) -> bool:
    try:
        names = os.listdir(folder)
    except OSError:
        return False
    return any(n.endswith((".safetensors", ".bin")) for n in names)


def resolve_source(source, revision: str | None = None):
    """``source`` unchanged unless it is a string naming no existing path that looks like
    a Hub id; then its local snapshot folder."""
    if isinstance(source, str) and looks_like_hub_id(source):
        return resolve(source, revision)
    return source


__all__ = ["WEIGHT_PATTERNS", "looks_like_hub_id", "offline", "resolve", "resolve_source"]
