"""The sharded reader: HF index.json + safetensors or .bin shards, and directories."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from torchdiff.errors import CorruptFileError, InputNotFoundError, TorchDiffError, UsageError
from torchdiff.formats import load


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(16, 8, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=g).to(torch.bfloat16),
        "model.layers.0.mlp.up_proj.weight": torch.randn(12, 8, generator=g).to(torch.float16),
        "model.layers.0.input_layernorm.weight": torch.ones(8),
        "model.layers.1.quant.weight": torch.randint(-128, 127, (4, 8), generator=g, dtype=torch.int8),
        "model.layers.1.mask": torch.tensor([True, False, True]),
        "model.scalar": torch.tensor(3.5),
        "model.empty": torch.zeros(0, 4),
        "lm_head.weight": torch.randn(16, 8, generator=g),
    }


def _write_sharded(directory, state, n_shards: int, kind: str = "safetensors") -> str:
    """Split like transformers' save_pretrained: shards model-0000i-of-0000n and an index."""
    names = list(state)
    groups = [names[i::n_shards] for i in range(n_shards)]
    weight_map = {}
    prefix, suffix = ("model", "safetensors") if kind == "safetensors" else ("pytorch_model", "bin")
    for i, group in enumerate(groups, start=1):
        shard = f"{prefix}-{i:05d}-of-{n_shards:05d}.{suffix}"
        part = {n: state[n].contiguous() for n in group}
        if kind == "safetensors":
            save_file(part, str(directory / shard), metadata={"format": "pt"})
        else:
            torch.save(part, directory / shard)
        weight_map.update({n: shard for n in group})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    index_path = directory / f"{prefix}.{suffix}.index.json"
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return str(index_path)


def _assert_same(ck, state) -> None:
    assert sorted(ck) == sorted(state)
    for name, expected in state.items():
        handle = ck.tensors[name]
        assert handle.shape == tuple(expected.shape), name
        assert handle.dtype == expected.dtype, name
        got = handle.materialize()
        assert got.dtype == expected.dtype
        torch.testing.assert_close(got.to(torch.float64), expected.to(torch.float64), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_index_gives_one_checkpoint(tmp_path, kind):
    state = _state()
    index = _write_sharded(tmp_path, state, 3, kind)
    with load(index) as ck:
        assert ck.format == "sharded"
        _assert_same(ck, state)
        info = ck.info["sharded"]
        assert len(info["shards"]) == 3
        assert info["shard_format"] == (["safetensors"] if kind == "safetensors" else ["torch"])
        assert info["index_metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
        assert info["unlisted_tensors"] == 0
        assert list(ck) == sorted(state)  # the index's order
        if kind == "safetensors":
            assert all(h.mapped for h in ck.tensors.values() if h.numel)
            assert ck.info["shard_info"]["model-00001-of-00003.safetensors"]["metadata"] == {"format": "pt"}


def test_directory_with_one_index(tmp_path):
    state = _state(1)
    _write_sharded(tmp_path, state, 2)
    (tmp_path / "config.json").write_text("{}")
    with load(tmp_path) as ck:
        assert ck.format == "sharded"
        _assert_same(ck, state)


def test_directory_with_one_checkpoint_file_is_that_file(tmp_path):
    state = _state(2)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "README.md").write_text("hi")
    ck = load(tmp_path)
    assert ck.format == "safetensors"
    _assert_same(ck, state)


def test_directory_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputNotFoundError, match=r"empty: the directory holds no checkpoint"):
        load(empty)

    two_files = tmp_path / "two_files"
    two_files.mkdir()
    save_file({"a": torch.ones(2)}, str(two_files / "a.safetensors"))
    torch.save({"a": torch.ones(2)}, two_files / "b.bin")
    message = (r"two_files: the directory holds 2 checkpoint files and no index "
               r"\(a\.safetensors, b\.bin\) \(pass the file")
    with pytest.raises(UsageError, match=message):
        load(two_files)

    two_indexes = tmp_path / "two_indexes"
    two_indexes.mkdir()
    _write_sharded(two_indexes, _state(), 2, "safetensors")
    (two_indexes / "other.safetensors.index.json").write_text(
        (two_indexes / "model.safetensors.index.json").read_text())
    message = r"two_indexes: the directory holds 2 checkpoint indexes .*model\.safetensors\.index\.json.*pass the one"
    with pytest.raises(UsageError, match=message):
        load(two_indexes)


def test_hugging_face_folders_read_their_weights(tmp_path):
    """A repo shipping both formats reads the safetensors ones (as transformers does); a
    Trainer checkpoint folder reads model.safetensors, not optimizer.pt or training_args.bin."""
    both = tmp_path / "both"
    both.mkdir()
    state = _state()
    _write_sharded(both, state, 2, "safetensors")
    _write_sharded(both, {k: v * 0 for k, v in state.items()}, 2, "bin")
    ck = load(both)
    assert ck.info["sharded"]["index"] == "model.safetensors.index.json"
    _assert_same(ck, state)

    trainer = tmp_path / "checkpoint-500"
    trainer.mkdir()
    small = _state(2)
    save_file({k: v.contiguous() for k, v in small.items()}, str(trainer / "model.safetensors"))
    torch.save({"state": {}, "param_groups": []}, trainer / "optimizer.pt")
    torch.save({"lr": 1.0}, trainer / "training_args.bin")
    ck = load(trainer)
    assert ck.format == "safetensors"
    _assert_same(ck, small)


def test_missing_shard(tmp_path):
    index = _write_sharded(tmp_path, _state(), 3)
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(
        CorruptFileError,
        match=r"model\.safetensors\.index\.json: tensor '.+' \(and \d+ more\) maps to shard "
              r"'model-00002-of-00003\.safetensors', which does not exist",
    ):
        load(index)


def test_tensor_missing_from_its_shard(tmp_path):
    index = _write_sharded(tmp_path, _state(), 2)
    data = json.loads(open(index).read())
    data["weight_map"]["model.layers.9.ghost.weight"] = "model-00001-of-00002.safetensors"
    open(index, "w").write(json.dumps(data))
    with pytest.raises(
        CorruptFileError,
        match=re.escape("model.safetensors.index.json: tensor 'model.layers.9.ghost.weight' is not in its shard "
                        "'model-00001-of-00002.safetensors'"),
    ):
        load(index)


def test_unlisted_tensors_are_counted_not_loaded(tmp_path):
    save_file({"a": torch.ones(2), "extra": torch.zeros(3)}, str(tmp_path / "s1.safetensors"))
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "s1.safetensors"}}))
    ck = load(tmp_path / "m.safetensors.index.json")
    assert list(ck) == ["a"]
    assert ck.info["sharded"]["unlisted_tensors"] == 1


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"weight_map": {"a": "s1.safe', r"not a valid JSON index"),
        ("", r"not a valid JSON index"),
        ('{"metadata": {}}', r'no "weight_map" object in the index'),
        ("[1, 2]", r'no "weight_map" object in the index'),
        ('{"weight_map": {"a": 3}}', r"tensor 'a' maps to 3, not a shard file name"),
        ('{"weight_map": {"a": "../elsewhere.safetensors"}}',
         r"tensor 'a' maps to shard '\.\./elsewhere\.safetensors', outside the index's directory"),
        ('{"weight_map": {"a": "/abs/x.safetensors"}}', r"tensor 'a' maps to shard '/abs/x\.safetensors', outside"),
        ('{"weight_map": {"a": "other.safetensors.index.json"}}',
         r"tensor 'a' maps to 'other\.safetensors\.index\.json', another index, not a shard"),
    ],
    ids=["truncated", "empty", "no_map", "list", "not_str", "dotdot", "absolute", "index"],
)
def test_bad_indexes(tmp_path, content, message):
    path = tmp_path / "model.safetensors.index.json"
    path.write_text(content)
    with pytest.raises(CorruptFileError, match=r"model\.safetensors\.index\.json: " + message):
        load(path)


def test_truncated_shard_raises(tmp_path):
    index = _write_sharded(tmp_path, _state(), 2)
    shard = tmp_path / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    for cut in (0, 5, 50, len(data) // 2, len(data) - 1):
        shard.write_bytes(data[:cut])
        with pytest.raises(TorchDiffError):
            with load(index) as ck:
                for handle in ck.tensors.values():
                    handle.materialize()


@settings(max_examples=30, deadline=None)
@given(
    n_shards=st.integers(1, 5),
    kind=st.sampled_from(["safetensors", "bin"]),
    seed=st.integers(0, 1000),
)
def test_any_split_reads_back_the_same(tmp_path_factory, n_shards, kind, seed):
    state = _state(seed)
    index = _write_sharded(tmp_path_factory.mktemp("split"), state, n_shards, kind)
    with load(index) as ck:
        _assert_same(ck, state)
        assert len(ck.info["sharded"]["shards"]) == min(n_shards, len(state))
        assert np.isclose(ck.nbytes, sum(t.numel() * t.element_size() for t in state.values()))
