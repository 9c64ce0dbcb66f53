"""The naming module's answers, pinned per naming family (issue 11: one table for one fact)."""

import pytest

from torchdiff import names as N

# name, role (no dtype context), module_type, layer
TABLE = [
    # Hugging Face llama / mistral / qwen2
    ("model.embed_tokens.weight", "parameter", "embedding", "model.embed_tokens"),
    ("model.layers.0.self_attn.q_proj.weight", "parameter", "attn_q", "model.layers.0"),
    ("model.layers.0.self_attn.k_proj.weight", "parameter", "attn_k", "model.layers.0"),
    ("model.layers.0.self_attn.v_proj.weight", "parameter", "attn_v", "model.layers.0"),
    ("model.layers.0.self_attn.o_proj.weight", "parameter", "attn_o", "model.layers.0"),
    ("model.layers.11.mlp.gate_proj.weight", "parameter", "mlp_gate", "model.layers.11"),
    ("model.layers.11.mlp.up_proj.weight", "parameter", "mlp_up", "model.layers.11"),
    ("model.layers.11.mlp.down_proj.weight", "parameter", "mlp_down", "model.layers.11"),
    ("model.layers.3.input_layernorm.weight", "parameter", "norm", "model.layers.3"),
    ("model.layers.3.self_attn.rotary_emb.inv_freq", "buffer", "other", "model.layers.3"),
    ("model.norm.weight", "parameter", "norm", "model.norm"),
    ("lm_head.weight", "parameter", "head", "lm_head"),
    ("model.layers.0.mlp.gate_up_proj.weight", "parameter", "mlp_gate_up", "model.layers.0"),
    ("model.layers.0.self_attn.qkv_proj.weight", "parameter", "attn_qkv", "model.layers.0"),
    # Hugging Face GPT-2 and nanoGPT
    ("transformer.wte.weight", "parameter", "embedding", "transformer.wte"),
    ("transformer.h.2.attn.c_attn.weight", "parameter", "attn_qkv", "transformer.h.2"),
    ("transformer.h.2.attn.c_proj.weight", "parameter", "attn_o", "transformer.h.2"),
    ("transformer.h.2.mlp.c_fc.weight", "parameter", "mlp_up", "transformer.h.2"),
    ("transformer.h.2.mlp.c_proj.weight", "parameter", "mlp_down", "transformer.h.2"),
    ("transformer.h.2.ln_1.weight", "parameter", "norm", "transformer.h.2"),
    ("transformer.ln_f.bias", "parameter", "norm", "transformer.ln_f"),
    ("h.0.attn.masked_bias", "buffer", "attn_qkv" if False else "other", "h.0"),
    # BERT
    ("bert.embeddings.word_embeddings.weight", "parameter", "embedding", "bert.embeddings.word_embeddings"),
    ("bert.embeddings.position_ids", "buffer", "embedding", "bert.embeddings"),
    ("bert.encoder.layer.5.attention.self.query.weight", "parameter", "attn_q", "bert.encoder.layer.5"),
    ("bert.encoder.layer.5.attention.output.dense.weight", "parameter", "attn_o", "bert.encoder.layer.5"),
    ("bert.encoder.layer.5.intermediate.dense.weight", "parameter", "mlp_up", "bert.encoder.layer.5"),
    ("bert.encoder.layer.5.output.dense.weight", "parameter", "mlp_down", "bert.encoder.layer.5"),
    ("bert.encoder.layer.5.output.LayerNorm.weight", "parameter", "norm", "bert.encoder.layer.5"),
    ("classifier.weight", "parameter", "head", "classifier"),
    # timm
    ("blocks.7.attn.qkv.weight", "parameter", "attn_qkv", "blocks.7"),
    ("blocks.7.attn.proj.weight", "parameter", "other", "blocks.7"),
    ("blocks.7.mlp.fc1.weight", "parameter", "mlp_up", "blocks.7"),
    ("blocks.7.mlp.fc2.weight", "parameter", "mlp_down", "blocks.7"),
    ("blocks.7.norm1.weight", "parameter", "norm", "blocks.7"),
    ("cls_token", "parameter", "embedding", "cls_token"),
    ("patch_embed.proj.weight", "parameter", "embedding", "patch_embed.proj"),
    ("bn1.running_mean", "buffer", "norm", "bn1"),
    ("bn1.num_batches_tracked", "counter", "norm", "bn1"),
    # Lightning .ckpt, flattened
    ("state_dict.model.fc1.weight", "parameter", "mlp_up", "state_dict.model.fc1"),
    ("optimizer_states.0.state.3.exp_avg", "optimizer_state", "other", "optimizer_states.0"),
    ("optimizer_states.0.state.3.step", "optimizer_state", "other", "optimizer_states.0"),
    # torch training checkpoints
    ("optimizer.state.0.exp_avg_sq", "optimizer_state", "other", "optimizer.state.0"),
    ("optimizer.state.0.step", "optimizer_state", "other", "optimizer.state.0"),
    ("state.4.momentum_buffer", "optimizer_state", "other", "state.4"),
    ("encoder.norm_stats.exp_avg", "parameter", "norm", "encoder.norm_stats"),
    # DCP / FSDP get_state_dict
    ("optim.state.model.layers.0.attn.wq.weight.exp_avg", "optimizer_state", "attn_q", "optim.state.model.layers.0"),
    ("optim.state.model.layers.0.attn.wq.weight.step", "optimizer_state", "attn_q", "optim.state.model.layers.0"),
    # GGUF (llama.cpp)
    ("token_embd.weight", "parameter", "embedding", "token_embd"),
    ("blk.7.attn_q.weight", "parameter", "attn_q", "blk.7"),
    ("blk.7.attn_k.weight", "parameter", "attn_k", "blk.7"),
    ("blk.7.attn_v.weight", "parameter", "attn_v", "blk.7"),
    ("blk.7.attn_output.weight", "parameter", "attn_o", "blk.7"),
    ("blk.7.ffn_gate.weight", "parameter", "mlp_gate", "blk.7"),
    ("blk.7.ffn_up.weight", "parameter", "mlp_up", "blk.7"),
    ("blk.7.ffn_down.weight", "parameter", "mlp_down", "blk.7"),
    ("blk.7.attn_norm.weight", "parameter", "norm", "blk.7"),
    ("output_norm.weight", "parameter", "norm", "output_norm"),
    ("output.weight", "parameter", "head", "output"),
    # Megatron-core
    ("decoder.layers.3.self_attention.linear_qkv.weight", "parameter", "attn_qkv", "decoder.layers.3"),
    ("decoder.layers.3.self_attention.linear_proj.weight", "parameter", "attn_o", "decoder.layers.3"),
    ("decoder.layers.3.mlp.linear_fc1.weight", "parameter", "mlp_gate_up", "decoder.layers.3"),
    ("decoder.layers.3.mlp.linear_fc2.weight", "parameter", "mlp_down", "decoder.layers.3"),
    ("decoder.final_layernorm.weight", "parameter", "norm", "decoder.final_layernorm"),
    ("embedding.word_embeddings.weight", "parameter", "embedding", "embedding.word_embeddings"),
    # quantization companions
    ("fc.weight_scale", "quant_companion", "other", "fc"),
    ("model.layers.0.mlp.down_proj.SCB", "quant_companion", "mlp_down", "model.layers.0"),
    ("model.layers.0.mlp.down_proj.qzeros", "quant_companion", "mlp_down", "model.layers.0"),
    # torch.nn.LSTM, MultiheadAttention
    ("lstm.weight_hh_l1", "parameter", "other", "lstm.l1"),
    ("attn.in_proj_weight", "parameter", "attn_qkv", "attn"),
    # slash-separated names (TensorFlow BERT, Keras, Flax/JAX saved to .npz): "/" splits, and a
    # numbered component (layer_3, TransformerBlock_0) is a block as "3" is in a dotted name
    ("bert/encoder/layer_3/attention/self/query/kernel", "parameter", "attn_q", "bert/encoder/layer_3"),
    ("bert/encoder/layer_3/output/LayerNorm/gamma", "parameter", "norm", "bert/encoder/layer_3"),
    ("params/TransformerBlock_0/Attention_0/query/kernel", "parameter", "attn_q", "params/TransformerBlock_0"),
    ("params/layers/2/mlp/wi/kernel", "parameter", "mlp_up", "params/layers/2"),
    ("dense_1/kernel:0", "parameter", "other", "dense_1"),
    ("params/embed/embedding", "parameter", "embedding", "params/embed"),
    # ... but a dotted name keeps its rules: blocks_3 is a module, not block 3
    ("blocks_3.attn.qkv.weight", "parameter", "attn_qkv", "blocks_3.attn.qkv"),
]


@pytest.mark.parametrize("name, role, module_type, layer", TABLE, ids=[t[0] for t in TABLE])
def test_name_table(name, role, module_type, layer):
    assert (N.role(name), N.module_type(name), N.layer_of(name)) == (role, module_type, layer)


# name, storage dtype, ndim, role: where the dtype or ndim decides (training state beside its negatives)
TYPED_TABLE = [
    # RNG states saved as tensors: torch.get_rng_state() is uint8 [5056]
    ("rng", "uint8", 1, "training_state"),
    ("rng_state", "uint8", 1, "training_state"),
    ("cpu_rng_state", "uint8", 1, "training_state"),
    ("cuda_rng_state", "uint8", 1, "training_state"),
    ("torch_rng_state", "uint8", 1, "training_state"),
    ("rng_states.cuda.0", "uint8", 1, "training_state"),
    ("extra_state.rng", "int64", 1, "training_state"),
    # accelerate's save_state (random_states_0.pkl): named after the seeding call
    ("torch_manual_seed", "uint8", 1, "training_state"),
    ("torch_cuda_manual_seed.0", "uint8", 1, "training_state"),
    ("numpy_random_seed.1", "uint32", 1, "training_state"),
    ("random_states_0.pkl:xm_seed", "int64", 0, "training_state"),  # -r: after its file
    ("seed_embedding.weight", "float32", 2, "parameter"),
    ("cpu", "uint8", 1, "parameter"),  # HF Trainer's rng_state.pth keys: the name alone does not say rng
    ("cuda", "uint8", 1, "parameter"),
    ("strong.weight", "float32", 2, "parameter"),
    # losses and metrics saved as 0-d tensors (nanoGPT, Lightning callbacks)
    ("best_val_loss", "float32", 0, "training_state"),
    ("val_loss", "float32", 0, "training_state"),
    ("loss", "float32", 0, "training_state"),
    ("best_loss", "float64", 0, "training_state"),
    ("train_loss", "bfloat16", 0, "training_state"),
    ("callbacks.ModelCheckpoint.best_model_score", "float32", 0, "training_state"),
    # everything under a Lightning checkpoint's callbacks: ModelCheckpoint's scores, keyed by file path
    ("callbacks.ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min'}.best_k_models./ckpt/ep=1.ckpt",
     "float32", 0, "training_state"),
    ("callbacks.ModelCheckpoint{'monitor': 'val_loss'}.kth_value", "float32", 0, "training_state"),
    ("ep1.ckpt:callbacks.ModelCheckpoint.current_score", "float32", 0, "training_state"),  # -r
    ("state_dict.callbacks.weight", "float32", 2, "parameter"),  # a module named callbacks inside the model
    ("ep1.ckpt:state_dict.net.weight", "float32", 2, "parameter"),
    ("best_val_loss", "float32", 1, "parameter"),  # not 0-d: not a saved metric
    ("loss", None, None, "parameter"),  # ndim unknown: the name alone does not decide
    ("logit_scale", "float32", 0, "parameter"),  # CLIP's learned temperature
    ("loss_fn.weight", "float32", 1, "parameter"),  # class weights of a loss module: leaf weight
    ("criterion.weight", "float32", 1, "parameter"),
    ("loss_fn.weight", "float32", 0, "parameter"),
    ("model.head.loss_scale", "float32", 0, "parameter"),
]


@pytest.mark.parametrize("name, dtype, ndim, role", TYPED_TABLE, ids=[f"{t[0]}-{t[1]}-{t[2]}" for t in TYPED_TABLE])
def test_typed_role_table(name, dtype, ndim, role):
    assert N.role(name, dtype, ndim) == role
    if dtype is not None:
        assert N.roles({name: (dtype, ndim)}) == {name: role}


def test_training_state_is_in_scope_all_only():
    assert "training_state" in N.ROLES
    assert [s for s in N.scope_names if N.in_scope("training_state", s)] == ["all"]
    assert N.kind("rng", 1) == "buffer" and N.kind("best_val_loss", 0) == "buffer"  # no optimizer moves them


def test_roles_with_context_find_companions_of_quantized_weights():
    specs = {"fc.weight": ("int8", 2), "fc.weight.scale": ("float32", 1), "logit_scale": ("float32", 0),
             "logit": ("float32", 1), "attn.bias": ("bool", 4), "fc.bias": ("float32", 1)}
    assert N.roles(specs) == {"fc.weight": "parameter", "fc.weight.scale": "quant_companion",
                              "logit_scale": "parameter", "logit": "parameter", "attn.bias": "buffer",
                              "fc.bias": "parameter"}


def test_roles_over_checkpoints_the_newest_holding_a_name_decides():
    old = {"a.weight": ("float32", 2), "a.weight.scale": ("float32", 1),  # old float a: its scale a parameter
           "b.weight": ("int8", 2), "b.weight.scale": ("float32", 1),     # b quantized only in the old file
           "optimizer.state.0.step": ("int64", 0)}
    new = {"a.weight": ("int8", 2), "a.weight.scale": ("float32", 1), "b.weight": ("float32", 2),
           "c.weight": ("int8", 2), "c.weight.scale": ("float32", 1)}
    assert N.roles_over([old, new]) == {
        "a.weight": "parameter", "a.weight.scale": "quant_companion",  # the new side decides
        "b.weight": "parameter", "b.weight.scale": "quant_companion",  # only old holds it: old's context
        "c.weight": "parameter", "c.weight.scale": "quant_companion", "optimizer.state.0.step": "optimizer_state"}
    assert N.roles_over([new, old])["a.weight.scale"] == "parameter"
    assert N.roles_over([old]) == N.roles(old)


@pytest.mark.parametrize("name, param", [
    ("optimizer.state.3.exp_avg", ("optimizer.state.3", "exp_avg")),
    ("state.0.step", ("state.0", "step")),
    ("optim.state.model.fc.weight.exp_avg", ("model.fc.weight", "exp_avg")),
    ("optim.state.fc.weight.exp_avg_sq", ("fc.weight", "exp_avg_sq")),
    ("encoder.norm_stats.exp_avg", None),
    ("model.state.weight", None),
])
def test_optimizer_param(name, param):
    assert N.optimizer_param(name) == param


@pytest.mark.parametrize("dtype, is_float", [
    ("float32", True), ("bfloat16", True), ("float8_e4m3fn", True), ("complex64", True), ("Q4_K", True),
    ("IQ2_XXS", True), ("F16", True), ("BF16", True), ("int8", False), ("uint8", False), ("bool", False),
    ("I32", False), ("sparse float64", True), ("torch.float16", True), ("object", False),
])
def test_float_storage_one_answer(dtype, is_float):
    assert N.is_float_storage(dtype) is is_float


@pytest.mark.parametrize("names, shapes, family", [
    (["token_embd.weight", "blk.0.attn_q.weight", "output.weight"], None, "gguf"),
    (["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "lm_head.weight"], None, "hf"),
    (["decoder.layers.0.self_attention.linear_qkv.weight", "embedding.word_embeddings.weight"], None, "megatron"),
    (["blocks.0.attn.qkv.weight", "patch_embed.proj.weight", "cls_token"], None, "timm"),
    (["state_dict.model.fc.weight", "optimizer_states.0.state.0.exp_avg"], None, "lightning"),
    (["transformer.h.0.attn.c_attn.weight"], {"transformer.h.0.attn.c_attn.weight": (8, 24)}, "hf"),
    (["transformer.h.0.attn.c_attn.weight"], {"transformer.h.0.attn.c_attn.weight": (24, 8)}, "nanogpt"),
    (["fc1.weight", "fc2.bias"], None, "torch"),
])
def test_family(names, shapes, family):
    assert N.family(names, shapes) == family


def test_scope_rejects_unknown_names_with_the_choices():
    with pytest.raises(N.UsageError, match=r"unknown --scope 'param' \(choose from params, model, all\)"):
        N.check_scope("param")


def test_a_torch_ao_modules_output_qparams_are_companions():
    """A quantized Linear or QuantStub saves its output's scale and zero point beside its
    weights: quantization parameters, not trained ones; a norm's own 1-D ``scale``
    (no zero point beside it) stays a parameter."""
    specs = {"q.scale": ("float32", 1), "q.zero_point": ("int64", 1), "fc1.scale": ("float32", 0),
             "fc1.zero_point": ("int64", 0), "fc1.weight": ("qint8", 2), "norm.scale": ("float32", 1)}
    assert N.roles(specs) == {"q.scale": "quant_companion", "q.zero_point": "quant_companion",
                              "fc1.scale": "quant_companion", "fc1.zero_point": "quant_companion",
                              "fc1.weight": "parameter", "norm.scale": "parameter"}


@pytest.mark.parametrize("layer, index", [("h.3", 3), ("model.layers.12", 12), ("blk.7", 7), ("conv_1", None),
                                          ("bert/encoder/layer_3", 3), ("params/layers/2", 2), ("dense_1", None),
                                          ("transformer.ln_f", None)])
def test_block_index(layer, index):
    assert N.block_index(layer) == index


@pytest.mark.parametrize("name, expected", [
    ("layers.3.fc1.weight", "layers.*.fc1.weight"),
    ("blocks_3.fc1.weight", "blocks_3.fc1.weight"),
    ("params/layers_3/mlp/kernel", "params/layers_*/mlp/kernel"),
    ("bert/encoder/layer_11/attention/self/query/kernel", "bert/encoder/layer_*/attention/self/query/kernel"),
])
def test_pattern_puts_a_star_where_the_block_number_is(name, expected):
    assert N.pattern(name) == expected


@pytest.mark.parametrize("component, averaged", [
    ("ema", True), ("model_ema", True), ("state_dict_ema", True), ("EMA", True), ("swa_model", True),
    ("averaged_model", True), ("shadow", True), ("ema_decay_params", True),
    ("model", False), ("schema", False), ("cinema_head", False), ("swap", False), ("layers", False),
])
def test_averaged_copy_components(component, averaged):
    """EMA / SWA copies (timm's ``state_dict_ema``, ``swa_model``): the one rule the
    gradient analysis asks before mapping optimizer state to parameter names."""
    assert N.is_averaged_copy(component) is averaged
