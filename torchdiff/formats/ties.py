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
    config.json beside ``path``. Never fails: a config it cannot read is ignored."""
    metadata = (ckpt.info or {}).get("metadata") or {}
    for dropped, kept in metadata.items():
        if dropped not in ckpt.tensors and kept in ckpt.tensors and _looks_like_tensor_name(dropped):
            ckpt.ties[dropped] = kept
    if not tie_word_embeddings(path):
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


def tie_word_embeddings(path: str) -> bool:
    """Whether a config.json in ``path``'s directory (or ``path`` itself, a directory)
    says the word embeddings are tied: ``tie_word_embeddings`` (true when absent, as in
    transformers) of the config, or of its ``text_config``."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    config_path = os.path.join(folder, "config.json")
    try:
        if os.path.getsize(config_path) > _CONFIG_BYTES:
            return False
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    if not isinstance(config, dict) or "model_type" not in config and "architectures" not in config:
        return False  # not a transformers config
    value = config.get("tie_word_embeddings")
    if value is None and isinstance(config.get("text_config"), dict):
        value = config["text_config"].get("tie_word_embeddings")
    return True if value is None else value is True
