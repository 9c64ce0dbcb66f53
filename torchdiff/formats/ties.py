"""Tied weights a file does not show by storage: dropped duplicates and config.json.

Three sources tell that two names are one tensor:

1. shared storage (PyTorch pickles, live modules): ``formats.base.mark_shared`` sets
   ``TensorHandle.tied_to`` when two names view the same bytes;
2. safetensors' ``save_model`` drops all but one name of each group of tied tensors and
   records each dropped name in ``__metadata__`` as ``{dropped: kept}``;
3. Hugging Face's ``save_pretrained`` drops the output embedding (``lm_head.weight``)
   when ``tie_word_embeddings`` is true in the model's config.json (true unless the
   config says false: transformers' default), without recording it.

``find_ties`` turns (2) and (3) into ``Checkpoint.ties`` (a dropped name -> the held
tensor it shares values with), and for (3) also marks a held ``lm_head.weight`` as tied
when the config says so. Pairing uses ``ties`` so that a name held on one side and tied
on the other is paired with its target, never reported as added or removed.

The same config.json says what the shapes cannot: its scalar values (and those of its
``text_config``, as ``text_config.KEY``) are kept in ``Checkpoint.info["config"]``, where
--architecture-comparison reads the attention and key/value head counts.
"""

from __future__ import annotations

import json
import os

from torchdiff.formats.base import Checkpoint

#: Output-embedding names save_pretrained drops when the embeddings are tied.
OUTPUT_EMBEDDINGS = ("lm_head.weight", "cls.predictions.decoder.weight", "output.weight")
#: Input-embedding names, most specific first (GPT-2, Llama/Mistral, BERT, T5/BART, GPT-NeoX).
INPUT_EMBEDDINGS = (
    "transformer.wte.weight", "model.embed_tokens.weight", "embed_tokens.weight", "wte.weight",
    "bert.embeddings.word_embeddings.weight", "embeddings.word_embeddings.weight", "word_embeddings.weight",
    "model.decoder.embed_tokens.weight", "model.shared.weight", "shared.weight", "gpt_neox.embed_in.weight",
    "tok_embeddings.weight", "token_embd.weight",
)
_CONFIG_BYTES = 1 << 20  # a config.json larger than this is not a model config


def find_ties(ckpt: Checkpoint, path: str) -> None:
    """Fill ``ckpt.ties`` (and ``tied_to`` of held tensors) from the file's metadata and a
    config.json beside ``path``, and keep that config's values in ``ckpt.info["config"]``.
    Never fails: a config it cannot read is ignored."""
    metadata = (ckpt.info or {}).get("metadata") or {}
    for dropped, kept in metadata.items():
        if dropped not in ckpt.tensors and kept in ckpt.tensors and _looks_like_tensor_name(dropped):
            ckpt.ties[dropped] = kept
    config = read_config(path)
    if config is None:
        return
    ckpt.info["config"] = config_values(config)
    if not tie_word_embeddings(config):
        return
    target = next((n for n in INPUT_EMBEDDINGS if n in ckpt.tensors), None)
    if target is None:
        return
    for name in OUTPUT_EMBEDDINGS:
        if name == target:
            continue
        held = ckpt.tensors.get(name)
        if held is None:
            ckpt.ties.setdefault(name, target)
            return
        if held.tied_to is None and tuple(held.shape) == tuple(ckpt.tensors[target].shape):
            held.tied_to = target  # saved twice (pytorch_model.bin without shared storage): still one parameter
        return


def _looks_like_tensor_name(key: str) -> bool:
    return key not in ("format",) and "." in key


def read_config(path: str) -> dict | None:
    """The transformers config.json in ``path``'s directory (or in ``path``, a directory),
    else None: no such file, larger than 1 MiB, not JSON, or not a transformers config
    (neither ``model_type`` nor ``architectures``)."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    config_path = os.path.join(folder, "config.json")
    try:
        if os.path.getsize(config_path) > _CONFIG_BYTES:
            return None
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(config, dict) or "model_type" not in config and "architectures" not in config:
        return None  # not a transformers config
    return config


def config_values(config: dict) -> dict:
    """The config's scalar values (numbers, strings, booleans), then its ``text_config``'s
    as ``text_config.KEY``: what a model's shapes may not tell (head counts)."""
    def scalars(d: dict, prefix: str = "") -> dict:
        return {prefix + str(k): v for k, v in d.items() if isinstance(v, (int, float, str, bool))}

    out = scalars(config)
    if isinstance(config.get("text_config"), dict):
        out.update(scalars(config["text_config"], "text_config."))
    return out


def tie_word_embeddings(config: dict) -> bool:
    """Whether a transformers config says the word embeddings are tied:
    ``tie_word_embeddings`` (true when absent, as in transformers) of the config, or of
    its ``text_config``."""
    value = config.get("tie_word_embeddings")
    if value is None and isinstance(config.get("text_config"), dict):
        value = config["text_config"].get("tie_word_embeddings")
    return True if value is None else value is True
