"""Hugging Face checkpoints as users have them: tiny random models of real families built
by transformers from their configs, saved by ``save_pretrained`` (one file, sharded with
an index, tied and untied heads, BatchNorm buffers), compared through every path.

The truth comes from the models themselves (``sum(p.numel() for p in model.parameters())``,
the config's head counts, the files' own bytes) and from float64 NumPy sums.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import torchdiff
from torchdiff.analyses.layer_impact import natural_key
from torchdiff.cli import main
from torchdiff.names import is_attention, layer_of

transformers = pytest.importorskip("transformers")
ARCH, MEM, LAYERS = "architecture_comparison", "memory_analysis", "layer_impact"


def _llama_config(**kw):
    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
    return transformers.LlamaConfig(**{**base, **kw})


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """Tiny models saved by transformers, and the models themselves."""
    transformers.logging.set_verbosity_error()
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    models = {
        "llama": transformers.LlamaForCausalLM(_llama_config()),
        "llama_tied": transformers.LlamaForCausalLM(_llama_config(tie_word_embeddings=True)),
        "gpt2": transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4,
                                                                     vocab_size=100, n_positions=64)),
        "t5": transformers.T5ForConditionalGeneration(transformers.T5Config(d_model=32, d_ff=64, num_layers=2,
                                                                            num_heads=4, d_kv=8, vocab_size=100)),
        "resnet": transformers.ResNetForImageClassification(transformers.ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=4)),
    }
    for name, model in models.items():
        model.save_pretrained(root / name)
        model.save_pretrained(root / f"{name}_sharded", max_shard_size="20KB")
    # a fine-tune: a few SGD steps in train mode (BatchNorm running statistics and counters move)
    resnet = models["resnet"]
    tuned = type(resnet)(resnet.config)
    tuned.load_state_dict(resnet.state_dict())
    tuned.train()
    opt = torch.optim.SGD(tuned.parameters(), lr=0.1)
    for _ in range(2):
        loss = tuned(pixel_values=torch.randn(4, 3, 32, 32), labels=torch.randint(0, 4, (4,))).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    tuned.save_pretrained(root / "resnet_ft")
    return root, models


def test_norms_are_not_attention_evidence(hf):
    """Llama's post_attention_layernorm counted as attention: the family evidence read
    "10 tensors, e.g. model.layers.0.post_attention_layernorm.weight" for 8 projections."""
    root, models = hf
    model = models["llama"]
    a = torchdiff.inspect(str(root / "llama"), architecture_comparison=True).analysis(ARCH)
    evidence = a.data["new"]["family_evidence"]["transformer"]
    projections = {n: p.numel() for n, p in model.named_parameters() if ".self_attn." in n}
    assert evidence["tensors"] == len(projections) == 8
    assert evidence["share"] == pytest.approx(sum(projections.values()) / _params(model))
    assert not any("norm" in e for e in evidence["examples"])
    for name, attention in [("model.layers.0.post_attention_layernorm.weight", False),
                            ("model.decoder.layers.0.self_attn_layer_norm.bias", False),  # Whisper, BART
                            ("blk.0.attn_norm.weight", False),                            # GGUF
                            ("model.layers.0.self_attn.q_norm.weight", False),            # Qwen3
                            ("model.layers.0.self_attn.q_proj.weight", True),
                            ("bert.encoder.layer.0.attention.output.dense.weight", True),
                            ("attn.in_proj_weight", True)]:
        assert is_attention(name) is attention, name


def test_params_are_the_models_parameters_not_its_buffers(hf):
    """A BatchNorm model: params=1,928 (state_dict values, running statistics and
    num_batches_tracked included) beside inspect's own "1,800 parameters"."""
    root, models = hf
    model = models["resnet"]
    truth = _params(model)
    buffers = {k: v for k, v in model.state_dict().items() if k not in dict(model.named_parameters())}
    assert truth == 1800 and sum(v.numel() for v in buffers.values()) == 128
    for source in (str(root / "resnet"), str(root / "resnet_sharded"), model):
        a = torchdiff.inspect(source, architecture_comparison=True).analysis(ARCH)
        assert a.headline["params"] == truth
        assert a.data["new"]["buffers"] == 128 and a.data["new"]["buffer_tensors"] == len(buffers)
        assert sum(a.data["new"]["params_by_group"].values()) == truth
        assert a.data["new"]["params_by_dtype"] == {"float32": truth}  # no int64 "parameters"
    report = torchdiff.compare(str(root / "resnet"), str(root / "resnet_ft"), architecture_comparison=True)
    a = report.analysis(ARCH)
    assert (a.data["params_old"], a.data["params_new"]) == (truth, truth)
    assert a.headline["loadable"] == "strict"  # buffers are state_dict entries: same names, same shapes
    assert any(n.startswith("buffers and counters") and "128->128 values in 24->24 tensors" in n for n in a.notes)
    assert f"params={truth:,}->{truth:,}" in str(report)


def test_memory_training_estimate_gives_buffers_no_gradients_or_moments(hf):
    """Adam training estimate: 16 B for each parameter, buffers and counters as stored
    (it counted BatchNorm's running statistics as 120 more parameters)."""
    root, models = hf
    model = models["resnet"]
    params = dict(model.named_parameters())
    buffer_bytes = sum(v.numel() * v.element_size() for k, v in model.state_dict().items() if k not in params)
    side = torchdiff.inspect(str(root / "resnet"), memory_analysis=True).analysis(MEM).data["sides"]["new"]
    assert side["float_params"] == _params(model)
    assert side["non_float_bytes"] == buffer_bytes == 480 + 64
    assert side["estimates"]["training_bytes"] == 16 * _params(model) + buffer_bytes
    assert side["model_bytes"] == 4 * _params(model) + buffer_bytes


def test_optimizer_state_alone_has_no_ratio_to_a_model(tmp_path):
    """A Trainer's optimizer.pt read on its own: "= 0× the fp32 size of the model's float
    parameters" (a division by no parameters, printed as a figure)."""
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    a = torchdiff.inspect(str(tmp_path / "optimizer.pt"), memory_analysis=True).analysis(MEM)
    (note,) = [n for n in a.notes if n.startswith("optimizer state found")]
    assert "×" not in note and "no model parameters beside it to compare it with" in note
    assert note.startswith("optimizer state found: 6 tensors, 296 B (exp_avg 144 B, exp_avg_sq 144 B, step 8 B)")


def _split_bin(model, folder, first):
    """``model``'s state_dict in two ``.bin`` shards with an index; ``first`` names the
    keys of shard 1. torch.save writes a storage whole into each shard that holds one of
    its names, so a tied pair split across shards is stored twice."""
    folder.mkdir()
    sd = model.state_dict()
    shards = {"pytorch_model-00001-of-00002.bin": {k: v for k, v in sd.items() if k in first},
              "pytorch_model-00002-of-00002.bin": {k: v for k, v in sd.items() if k not in first}}
    for file, part in shards.items():
        torch.save(part, folder / file)
    weight_map = {k: file for file, part in shards.items() for k in part}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model.config.save_pretrained(folder)


def test_memory_inference_counts_a_tied_weight_once_when_the_shards_store_it_twice(hf, tmp_path):
    root, models = hf
    model = models["gpt2"]
    _split_bin(model, tmp_path / "bin", first={k for k in model.state_dict() if k != "lm_head.weight"})
    report = torchdiff.compare(str(root / "gpt2"), str(tmp_path / "bin"), memory_analysis=True,
                               architecture_comparison=True)
    new = report.analysis(MEM).data["sides"]["new"]
    embedding = model.transformer.wte.weight
    stored = 4 * _params(model) + embedding.numel() * 4  # the files hold wte twice: exact bytes say so
    assert new["model_bytes"] == stored
    assert new["float_params"] == _params(model)
    assert new["estimates"]["inference_bytes"] == pytest.approx(1.2 * 4 * _params(model))  # loaded once
    assert report.analysis(ARCH).data["params_new"] == _params(model)


def test_untied_head_is_an_architecture_change(hf, tmp_path):
    """tie_word_embeddings true -> false: params grew by vocab × hidden and no change said why."""
    root, models = hf
    tied = models["llama_tied"]
    untied = transformers.LlamaForCausalLM(_llama_config(tie_word_embeddings=False))
    untied.load_state_dict(tied.state_dict())
    untied.save_pretrained(tmp_path / "untied")
    entry = {"path": "lm_head.weight", "tied_to": "model.embed_tokens.weight"}
    report = torchdiff.compare(str(root / "llama_tied"), str(tmp_path / "untied"), architecture_comparison=True)
    a = report.analysis(ARCH)
    assert a.data["untied"] == [entry] and a.data["tied"] == []
    assert a.data["params_delta"] == _params(untied) - _params(tied) == 100 * 32
    assert "untied    1        lm_head.weight (was tied to model.embed_tokens.weight)" in str(report)
    back = torchdiff.compare(str(tmp_path / "untied"), str(root / "llama_tied"), architecture_comparison=True)
    assert back.analysis(ARCH).data["tied"] == [entry] and back.analysis(ARCH).data["untied"] == []
    same = torchdiff.compare(str(root / "llama_tied"), tied, architecture_comparison=True).analysis(ARCH)
    assert same.data["tied"] == same.data["untied"] == []  # tied on both sides: no change


@pytest.mark.parametrize("name, heads, kv_heads", [("llama", 4, 2), ("t5", 4, None), ("gpt2", 4, None)])
def test_heads_from_the_config_json_beside_the_weights(hf, name, heads, kv_heads):
    """"heads: not inferable ... the file holds no head-count value" with config.json right there."""
    root, _ = hf
    config = json.loads((root / name / "config.json").read_text())
    for source in (root / name, root / f"{name}_sharded", root / name / "model.safetensors"):
        hp = torchdiff.inspect(str(source), architecture_comparison=True).analysis(ARCH).data["new"]
        assert hp["hyperparameters"].get("heads") == heads
        assert hp["hyperparameters"].get("kv_heads") == kv_heads
        key = next(k for k in ("num_attention_heads", "num_heads", "n_head") if k in config)
        assert hp["hyperparameter_notes"]["heads"] == f"config.json {key} = {config[key]}"


def test_a_head_count_change_shows_in_the_hyperparameters(hf, tmp_path):
    root, _ = hf
    torch.manual_seed(1)
    other = transformers.LlamaForCausalLM(_llama_config(num_attention_heads=8, num_key_value_heads=8))
    other.save_pretrained(tmp_path / "h8")  # same shapes: only the config tells
    report = torchdiff.compare(str(root / "llama"), str(tmp_path / "h8"), architecture_comparison=True)
    table = str(report)[str(report).index("Hyperparameters"):]
    assert table.splitlines()[6].split()[:3] == ["heads", "4", "8"]
    assert table.splitlines()[7].split()[:3] == ["kv_heads", "2", "8"]


def test_layer_tables_in_natural_order(hf, tmp_path):
    """A layer added (12 blocks): Bytes by layer listed model.layers.11 after model.norm and
    model.layers.10 before model.layers.2."""
    root, models = hf
    torch.manual_seed(2)
    deep = transformers.LlamaForCausalLM(_llama_config(num_hidden_layers=12))
    deep.save_pretrained(tmp_path / "deep")
    shallow = transformers.LlamaForCausalLM(_llama_config(num_hidden_layers=11))
    shallow.save_pretrained(tmp_path / "shallow")
    report = torchdiff.compare(str(tmp_path / "shallow"), str(tmp_path / "deep"), memory_analysis=True,
                               architecture_comparison=True)
    layers = {layer_of(n) for n, _ in deep.named_parameters()}
    expected = sorted(layers, key=natural_key)
    assert expected[:4] == ["lm_head", "model.embed_tokens", "model.layers.0", "model.layers.1"]
    mem = report.analysis(MEM)
    assert list(mem.data["sides"]["new"]["bytes_by_layer"]) == expected
    table = next(t for t in mem.tables if t.title == "Bytes by layer")
    assert [r[0] for r in table.rows] == expected
    arch = report.analysis(ARCH)
    assert list(arch.data["new"]["params_by_group"]) == expected
    # exact bytes per layer against the tensors' own
    for layer, nbytes in mem.data["sides"]["new"]["bytes_by_layer"].items():
        assert nbytes == sum(p.numel() * 4 for n, p in deep.named_parameters() if layer_of(n) == layer)


def test_optimizer_and_training_rows_come_after_the_layers(tmp_path):
    model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(11)])
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    path = tmp_path / "train.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "rng_state": torch.get_rng_state()},
               path)
    rows = list(torchdiff.inspect(str(path), memory_analysis=True).analysis(MEM)
                .data["sides"]["new"]["bytes_by_layer"])
    assert rows == [f"model.{i}" for i in range(11)] + ["(optimizer state)", "(training state)"]


def test_blocks_of_slash_separated_names_are_one_stack(tmp_path):
    """TensorFlow BERT names saved to .npz: each block was its own stack in blocks_by_stack."""
    arrays = {f"bert/encoder/layer_{i}/{part}/kernel": np.zeros((8, 8), np.float32)
              for i in range(3) for part in ("attention/self/query", "intermediate/dense")}
    arrays["bert/embeddings/word_embeddings"] = np.zeros((50, 8), np.float32)
    np.savez(tmp_path / "tf.npz", **arrays)
    a = torchdiff.inspect(str(tmp_path / "tf.npz"), architecture_comparison=True).analysis(ARCH)
    assert a.data["new"]["blocks"] == 3
    assert a.data["new"]["blocks_by_stack"] == {"bert/encoder": 3}


@pytest.mark.parametrize("name", ["gpt2", "t5", "llama_tied"])
def test_tied_models_against_their_files_count_every_parameter_once(hf, name):
    """A live module (tied heads held by Parameter identity) against its own safetensors
    (tied heads dropped by save_pretrained): parameters as transformers counts them,
    bytes as the file holds them, layer figures against float64 sums."""
    root, models = hf
    model = models[name]
    tuned = type(model)(model.config)
    tuned.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=g))
    report = torchdiff.compare(str(root / name), tuned, architecture_comparison=True, memory_analysis=True,
                               show_layer_impact=True)
    arch, mem, li = report.analysis(ARCH), report.analysis(MEM), report.analysis(LAYERS)
    assert arch.data["params_old"] == arch.data["params_new"] == _params(model)
    assert arch.headline["loadable"] == "strict"
    file_bytes = sum(int(np.prod(s)) * 4 for s in _shapes(root / name / "model.safetensors").values())
    assert mem.data["sides"]["old"]["model_bytes"] == file_bytes == 4 * _params(model)
    old = {n: p.detach().double() for n, p in model.named_parameters()}  # each Parameter once
    new = dict(tuned.named_parameters())
    sums: dict[str, list[float]] = {}
    for n, a in old.items():
        d = new[n].detach().double() - a
        s = sums.setdefault(layer_of(n), [0.0, 0.0])
        s[0] += float((d * d).sum())
        s[1] += float((a * a).sum())
    total = sum(s[0] for s in sums.values())
    rows = {r["layer"]: r for r in li.tables[0].records()}
    assert set(rows) == set(sums)
    for layer, (dsq, asq) in sums.items():
        assert rows[layer]["l2"] == pytest.approx(np.sqrt(dsq), rel=1e-6)
        assert rows[layer]["rel_l2"] == pytest.approx(np.sqrt(dsq / asq), rel=1e-6)
        assert rows[layer]["share"] == pytest.approx(dsq / total, rel=1e-6)


def _shapes(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_slice(k).get_shape() for k in f.keys()}


def test_cli_outputs_on_hf_folders_are_clean(hf, capsys):
    """Every analysis on a sharded folder against a single-file one: exit 0, nothing on
    stderr, valid JSON with the architecture's new fields."""
    root, _ = hf
    for fmt in ("text", "json", "yaml"):
        assert main([str(root / "resnet_sharded"), str(root / "resnet_ft"), "--all", "-o", fmt]) == 0
        out, err = capsys.readouterr()
        assert err == ""
    assert main([str(root / "llama_sharded"), str(root / "llama"), "--architecture-comparison", "-o", "json"]) == 0
    (item,) = [i for i in json.loads(capsys.readouterr().out) if i["type"] == ARCH]
    assert item["untied"] == item["tied"] == [] and item["loadable"] == "strict"
    assert item["new"]["hyperparameters"]["kv_heads"] == 2
    assert os.path.isfile(root / "llama_sharded" / "model.safetensors.index.json")


def test_a_mistyped_local_path_is_missing_not_a_hub_lookup(tmp_path, monkeypatch, capsys):
    """``runs/chekpoint-10`` beside a local ``runs/`` folder went to the Hugging Face Hub
    (a network round trip, then "no model 'runs/chekpoint-10' in the Hugging Face Hub")."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: calls.append(a) or str(tmp_path))
    (tmp_path / "runs" / "checkpoint-10").mkdir(parents=True)
    torch.save({"w": torch.zeros(2)}, tmp_path / "runs" / "checkpoint-10" / "pytorch_model.bin")
    monkeypatch.chdir(tmp_path)
    assert main(["runs/chekpoint-10", "runs/checkpoint-10"]) == 2
    assert capsys.readouterr().err == "torchdiff: error: runs/chekpoint-10: no such file or directory\n"
    assert calls == []
    from torchdiff.formats import hub

    assert hub.looks_like_hub_id("openai-community/gpt2")  # no local folder of that name: still an id


def test_gguf_head_counts_and_attn_norm(tmp_path):
    """llama.cpp's names and key/values: ``{arch}.attention.head_count`` / ``head_count_kv``
    were not read ("heads: not inferable"), and ``blk.N.attn_norm`` counted as attention."""
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    writer.add_block_count(2)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    shapes = {"attn_q": (32, 32), "attn_k": (16, 32), "attn_norm": (32,), "ffn_up": (64, 32)}
    rng = np.random.default_rng(0)
    for i in range(2):
        for name, shape in shapes.items():
            writer.add_tensor(f"blk.{i}.{name}.weight", rng.random(shape, dtype=np.float32))
    writer.add_tensor("token_embd.weight", rng.random((100, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    a = torchdiff.inspect(str(tmp_path / "m.gguf"), architecture_comparison=True).analysis(ARCH)
    info = a.data["new"]
    assert (info["hyperparameters"]["heads"], info["hyperparameters"]["kv_heads"]) == (4, 2)
    assert info["hyperparameter_notes"]["heads"] == "metadata llama.attention.head_count = 4"
    attention = 2 * (32 * 32 + 16 * 32)
    assert info["family_evidence"]["transformer"]["tensors"] == 4
    assert info["family_evidence"]["transformer"]["share"] == pytest.approx(attention / info["params"])


def test_heads_of_a_live_transformers_model_come_from_its_config():
    """compare(model, model) on nn.Modules: the head counts come from ``model.config``
    (no config.json on disk to read), said as such."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    report = torchdiff.compare(LlamaForCausalLM(cfg), LlamaForCausalLM(cfg), architecture_comparison=True)
    new = report.analysis("architecture_comparison").data["new"]
    assert (new["hyperparameters"]["heads"], new["hyperparameters"]["kv_heads"]) == (4, 2)
    assert new["hyperparameter_notes"]["heads"] == "model.config num_attention_heads = 4"
