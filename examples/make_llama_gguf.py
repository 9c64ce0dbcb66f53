"""Make a tiny llama-style model as a Hugging Face checkpoint and as its GGUF conversion.

Writes into OUT_DIR (default examples/data):
  llama_hf/model.safetensors, llama_hf/config.json   the Hugging Face side (float32)
  llama.gguf                                          the same weights, written by gguf's own
                                                      GGUFWriter the way llama.cpp's converter
                                                      does: gguf-py's names, the Q and K rows
                                                      permuted for GGML's rope, float32 except
                                                      each block's attn_q as Q8_0
The model: 2 blocks, hidden 32, 4 attention heads, 2 key/value heads (grouped-query), an
MLP of 256 and a vocabulary of 64; random weights from a fixed seed. Used by
./scripts/demo for the README's "Comparing across formats" example and by the tests.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}


def llama_state_dict(config: dict = CONFIG, seed: int = 0, lm_head: bool = True) -> dict[str, torch.Tensor]:
    """Hugging Face LlamaForCausalLM names and shapes, random values."""
    g = torch.Generator().manual_seed(seed)
    h, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * hd

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    sd = {"model.embed_tokens.weight": rand(vocab, h)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = 1 + rand(h)
        sd[p + "self_attn.q_proj.weight"] = rand(h, h)
        sd[p + "self_attn.k_proj.weight"] = rand(kv, h)
        sd[p + "self_attn.v_proj.weight"] = rand(kv, h)
        sd[p + "self_attn.o_proj.weight"] = rand(h, h)
        sd[p + "post_attention_layernorm.weight"] = 1 + rand(h)
        sd[p + "mlp.gate_proj.weight"] = rand(inter, h)
        sd[p + "mlp.up_proj.weight"] = rand(inter, h)
        sd[p + "mlp.down_proj.weight"] = rand(h, inter)
    sd["model.norm.weight"] = 1 + rand(h)
    if lm_head:
        sd["lm_head.weight"] = rand(vocab, h)
    return sd


def permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp's LlamaModel.permute (convert_hf_to_gguf.py), as the converter applies it."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def save_hf(folder: str, sd: dict[str, torch.Tensor], config: dict = CONFIG) -> str:
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "model.safetensors")
    save_file({k: v.contiguous() for k, v in sd.items()}, path, metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return path


def save_gguf(path: str, sd: dict[str, torch.Tensor], config: dict = CONFIG,
              types: dict[str, object] | None = None) -> dict[str, np.ndarray]:
    """Write ``sd`` as llama.cpp's converter would: gguf-py's names, Q/K permuted.

    ``types`` maps GGUF tensor names to a GGML type: a name (``"Q8_0"``, quantized with
    ``gguf.quants.quantize``) or raw bytes already in that type (``("Q6_K", bytes_array)``,
    for the K-quants gguf-py cannot quantize). Returns the raw arrays written, by GGUF name.
    """
    import gguf

    types = types or {}
    n_blocks = config["num_hidden_layers"]
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_blocks)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(n_blocks)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    written: dict[str, np.ndarray] = {}
    for hf_name, tensor in sd.items():
        data = tensor.numpy().astype(np.float32)
        if hf_name.endswith("q_proj.weight"):
            data = permute(data, n_head, n_head)
        elif hf_name.endswith("k_proj.weight"):
            data = permute(data, n_head, n_kv)
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        kind = types.get(name)
        if kind is None:
            raw = np.ascontiguousarray(data)
            writer.add_tensor(name, raw)
        else:
            if isinstance(kind, tuple):
                qtype, raw = gguf.GGMLQuantizationType[kind[0]], kind[1]
            else:
                qtype = gguf.GGMLQuantizationType[kind]
                raw = gguf.quants.quantize(data, qtype)
            writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)
        written[name] = raw
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


def main(out_dir: str = "examples/data") -> None:
    sd = llama_state_dict()
    save_hf(os.path.join(out_dir, "llama_hf"), sd)
    types = {f"blk.{i}.attn_q.weight": "Q8_0" for i in range(CONFIG["num_hidden_layers"])}
    save_gguf(os.path.join(out_dir, "llama.gguf"), sd, types=types)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "examples/data")
