"""The GGUF reader, on files written by gguf.GGUFWriter."""

from __future__ import annotations

import sys
import warnings

import gguf
import numpy as np
import pytest
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import quantize
from hypothesis import given, settings
from hypothesis import strategies as st

import torchdiff
from torchdiff.errors import CorruptFileError, MissingDependencyError, TorchDiffError, UnknownFormatError
from torchdiff.formats import load
from torchdiff.formats.gguf import PLAIN_STORAGE

Q = GGMLQuantizationType


def _write(path, tensors: dict, kv: dict | None = None, arch: str = "llama") -> None:
    """tensors: name -> float array, or (raw array, GGML type) for quantized/raw data."""
    writer = gguf.GGUFWriter(str(path), arch=arch)
    for key, value in (kv or {}).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_array(key, value)
    for name, value in tensors.items():
        if isinstance(value, tuple):
            writer.add_tensor(name, value[0], raw_dtype=value[1])
        else:
            writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _assert_values(tensor: torch.Tensor, expected: np.ndarray, atol: float | np.ndarray = 0.0) -> None:
    assert tuple(tensor.shape) == expected.shape
    error = np.abs(tensor.to(torch.float64).numpy() - expected.astype(np.float64))
    assert np.all(error <= atol), f"max error {error.max()} over the bound"


def _quiet(handle) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return handle.materialize()


def q8_0_bound(x: np.ndarray) -> np.ndarray:
    """Largest |dequantize(quantize(x)) - x| that Q8_0 allows, per element.

    Q8_0 cuts each row into blocks of 32, takes d = max|x|/127, stores q = round(x/d) in
    int8 and d as float16. With d16 = fp16(d), |d16 - d| <= 2**-11 * d (round to nearest,
    normal range), so |x - q*d16| <= |x - q*d| + |q|*|d - d16| <= d/2 + 127 * 2**-11 * d.
    A little slack covers the float32 arithmetic of the quantizer.
    """
    blocks = x.astype(np.float64).reshape(-1, 32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / 127
    bound = d * (0.5 + 127 * 2.0**-11) * (1 + 1e-5) + 1e-12
    return np.broadcast_to(bound, blocks.shape).reshape(x.shape)


def test_plain_and_quantized_tensors(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 64)).astype(np.float32)
    tensors = {
        "token_embd.weight": w,
        "blk.0.attn_q.weight": w.astype(np.float16),
        "blk.0.ffn_up.weight": (quantize(w, Q.Q8_0), Q.Q8_0),
        "blk.0.ffn_down.weight": (quantize(w, Q.BF16), Q.BF16),
        "blk.0.attn_norm.weight": rng.standard_normal(64).astype(np.float64),
        "ids8": np.arange(-5, 5, dtype=np.int8),
        "ids16": np.arange(6, dtype=np.int16).reshape(2, 3),
        "ids32": np.arange(6, dtype=np.int32).reshape(3, 2),
        "ids64": np.arange(4, dtype=np.int64),
    }
    path = tmp_path / "tiny.gguf"
    _write(path, tensors)
    with load(path) as ck:
        assert ck.format == "gguf"
        assert list(ck) == list(tensors)
        expected_types = {
            # plain types under torch's names (so F32 against float32 is not "retyped"), quantized under GGML's
            "token_embd.weight": ("float32", torch.float32), "blk.0.attn_q.weight": ("float16", torch.float16),
            "blk.0.ffn_up.weight": ("Q8_0", torch.float32), "blk.0.ffn_down.weight": ("bfloat16", torch.bfloat16),
            "blk.0.attn_norm.weight": ("float64", torch.float64), "ids8": ("int8", torch.int8),
            "ids16": ("int16", torch.int16), "ids32": ("int32", torch.int32), "ids64": ("int64", torch.int64),
        }
        for name, (storage, dtype) in expected_types.items():
            handle = ck.tensors[name]
            assert (handle.storage_dtype, handle.dtype) == (storage, dtype), name
            assert handle.mapped == (storage != "Q8_0"), name
            tensor = _quiet(handle)
            assert tensor.dtype == dtype and tensor.device.type == "cpu"
        # numpy/torch order: a (4, 64) array is GGUF [64, 4], reported as (4, 64)
        assert ck.tensors["blk.0.ffn_up.weight"].shape == (4, 64)
        assert ck.tensors["ids16"].shape == (2, 3)
        # real bytes in the file: Q8_0 spends 34 bytes per 32 values
        assert ck.tensors["blk.0.ffn_up.weight"].nbytes == 4 * 64 // 32 * 34
        assert ck.tensors["token_embd.weight"].nbytes == 4 * 64 * 4
        assert ck.tensors["blk.0.ffn_down.weight"].nbytes == 4 * 64 * 2

        _assert_values(ck["token_embd.weight"], w)
        _assert_values(ck["blk.0.attn_q.weight"], w.astype(np.float16))
        _assert_values(ck["blk.0.attn_norm.weight"], tensors["blk.0.attn_norm.weight"])
        bf16 = torch.from_numpy(w).to(torch.bfloat16)
        assert torch.equal(ck["blk.0.ffn_down.weight"], bf16)
        _assert_values(ck["blk.0.ffn_up.weight"], w, atol=q8_0_bound(w))
        for name in ("ids8", "ids16", "ids32", "ids64"):
            _assert_values(ck[name], tensors[name])


def test_key_values_go_to_info(tmp_path):
    vocab = [f"tok{i}" for i in range(1000)]
    path = tmp_path / "kv.gguf"
    _write(path, {"w": np.ones((2, 32), np.float32)}, kv={
        "general.name": "tiny-llama",
        "llama.block_count": 2,
        "llama.rope.freq_base": 10000.0,
        "general.flag": True,
        "llama.rope.dimension_sections": [16, 24, 24, 0],
        "tokenizer.ggml.tokens": vocab,
        "tokenizer.ggml.scores": [float(i) for i in range(1000)],
    })
    kv = load(path).info["gguf"]
    assert kv["general.architecture"] == "llama"
    assert kv["general.name"] == "tiny-llama"
    assert kv["llama.block_count"] == 2
    assert kv["llama.rope.freq_base"] == 10000.0
    assert kv["general.flag"] is True
    assert kv["llama.rope.dimension_sections"] == [16, 24, 24, 0]
    assert kv["tokenizer.ggml.tokens"] == {"type": "array", "element_type": "STRING", "length": 1000}
    assert kv["tokenizer.ggml.scores"] == {"type": "array", "element_type": "FLOAT32", "length": 1000}
    assert kv["GGUF.tensor_count"] == 1


def test_type_the_installed_gguf_cannot_dequantize(tmp_path):
    block, size = GGML_QUANT_SIZES[Q.Q8_1]
    path = tmp_path / "q81.gguf"
    _write(path, {"odd": (np.zeros((2, size), np.uint8), Q.Q8_1), "fine": np.ones(4, np.float32)})
    ck = load(path)
    handle = ck.tensors["odd"]
    assert (handle.shape, handle.storage_dtype, handle.nbytes) == ((2, block), "Q8_1", 2 * size)
    message = r"q81\.gguf: tensor 'odd' is stored as Q8_1, which the installed gguf cannot dequantize"
    with pytest.raises(UnknownFormatError, match=message):
        handle.materialize()
    _assert_values(ck["fine"], np.ones(4))


def test_missing_gguf(tmp_path, monkeypatch):
    path = tmp_path / "m.gguf"
    _write(path, {"w": np.ones(4, np.float32)})
    monkeypatch.setitem(sys.modules, "gguf", None)
    message = r"m\.gguf: reading GGUF files needs the gguf package.*pip install torchdiff\[gguf\]"
    with pytest.raises(MissingDependencyError, match=message):
        load(path)


def test_not_gguf(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"GGML-ish but not GGUF")
    with pytest.raises(CorruptFileError, match=r"x\.gguf: not a GGUF file"):
        load(path)


def test_truncated_files_raise_torchdiff_errors(tmp_path):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    path = tmp_path / "full.gguf"
    _write(path, {"a": w, "b": (quantize(w, Q.Q8_0), Q.Q8_0), "c": w.astype(np.float16)},
           kv={"general.name": "x", "tokenizer.ggml.tokens": ["a", "b", "c"]})
    data = path.read_bytes()
    reader = gguf.GGUFReader(str(path))
    last = max(reader.tensors, key=lambda t: t.data_offset)
    cuts = {0, 2, 4, 7, 12, 20, 30, 60, reader.data_offset - 3, reader.data_offset + 10, len(data) // 2,
            last.data_offset + last.n_bytes // 2, last.data_offset + last.n_bytes - 1}
    del reader
    for cut in sorted(cuts):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(TorchDiffError):
            with load(bad) as ck:
                for handle in ck.tensors.values():
                    handle.materialize()


def test_truncated_message(tmp_path):
    path = tmp_path / "t.gguf"
    _write(path, {"w": np.ones((4, 32), np.float32)})
    path.write_bytes(path.read_bytes()[:-100])
    message = r"t\.gguf: not a readable GGUF file \(.*\) \(the file may be truncated"
    with pytest.raises(CorruptFileError, match=message):
        load(path)


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 4),
    blocks=st.integers(1, 4),
    scale=st.sampled_from([1e-2, 1.0, 1e2]),
    seed=st.integers(0, 2**32 - 1),
)
def test_q8_0_within_derived_bound(tmp_path_factory, rows, blocks, scale, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, 32 * blocks)) * scale).astype(np.float32)
    x.reshape(-1, 32)[:, 0] = scale  # every block's max|x| >= scale: d stays in fp16's normal range
    path = tmp_path_factory.mktemp("q8") / "q.gguf"
    _write(path, {"x": (quantize(x, Q.Q8_0), Q.Q8_0), "ref": x})
    ck = load(path)
    assert ck.tensors["x"].shape == x.shape
    _assert_values(ck["x"], x, atol=q8_0_bound(x))
    _assert_values(ck["ref"], x)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(garbage=st.binary(min_size=0, max_size=200))
def test_random_bytes_after_magic_raise_only_torchdiff_errors(tmp_path_factory, garbage):
    path = tmp_path_factory.mktemp("fuzz") / "f.gguf"
    path.write_bytes(b"GGUF" + garbage)
    try:
        with load(path) as ck:
            for handle in ck.tensors.values():
                handle.materialize()
    except TorchDiffError:
        pass


def test_header_parser_agrees_with_gguf_reader(tmp_path):
    """torchdiff parses GGUF headers itself (GGUFReader took 4.6 s on a 150k vocabulary);
    the gguf package's reader is the reference for names, shapes, types, bytes, values."""
    import gguf

    rng = np.random.default_rng(1)
    arrays = {"tok_embd.weight": rng.standard_normal((16, 64), dtype=np.float32),
              "blk.0.attn_q.weight": rng.standard_normal((64, 64), dtype=np.float32).astype(np.float16),
              "blk.0.ffn_up.weight": rng.standard_normal((32, 64), dtype=np.float32),
              "output_norm.weight": np.ones(64, np.float32)}
    path = tmp_path / "ref.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("general.alignment", 64)
    writer.add_string("general.name", "ref")
    writer.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(300)])
    for name, array in arrays.items():
        if name == "blk.0.ffn_up.weight":
            writer.add_tensor(name, gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    ours = load(path)
    reference = gguf.GGUFReader(str(path))
    assert list(ours.tensors) == [t.name for t in reference.tensors]
    for t in reference.tensors:
        handle = ours.tensors[t.name]
        assert handle.shape == tuple(reversed(t.shape.tolist()))
        assert handle.storage_dtype == PLAIN_STORAGE.get(t.tensor_type.name, t.tensor_type.name)
        assert handle.nbytes == t.n_bytes
        expected = gguf.quants.dequantize(t.data, t.tensor_type)
        np.testing.assert_array_equal(handle.materialize().numpy(), expected.astype(handle.materialize().numpy().dtype))
    kv = ours.info["gguf"]
    assert kv["general.alignment"] == 64 and kv["general.name"] == "ref"
    assert kv["tokenizer.ggml.tokens"] == {"type": "array", "element_type": "STRING", "length": 300}
    assert kv["GGUF.tensor_count"] == len(reference.tensors)


def test_big_endian_header_is_checked_before_gguf_reader(tmp_path):
    """Found by scripts/fuzz_readers.py: a big-endian header whose array length is absurd
    made GGUFReader loop; the header walk refuses it first, within a second."""
    path = tmp_path / "be.gguf"
    path.write_bytes(b'GGUF\x00\x00\x00\x03\x00\x00\x00\xff\x00\x00\x00GGWF\x03\x00\x00\x00\x03\x00\x00\x00\x00\x00\x00\x00\x03\x00\x00\x00\x00\x00\x00\t\x00\x00\x00\x00\x00\x00\x00\x00\x14\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\t\xfd\xff\xff\x00\x00\x00\x00\x00!\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00=\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00')
    with pytest.raises(CorruptFileError, match=r"be\.gguf: not a readable GGUF file \(the array .* runs past the end"):
        load(path)


def test_plain_gguf_tensors_against_safetensors_of_the_same_names(tmp_path):
    """Names that pair directly (no mapping): an F32 tensor equal to a float32 one is
    unchanged, not retyped; an F16 one is float32 -> float16."""
    from safetensors.torch import save_file

    g = np.random.default_rng(0)
    a, b = g.standard_normal((4, 8)).astype(np.float32), g.standard_normal((8,)).astype(np.float32)
    _write(tmp_path / "m.gguf", {"a.weight": a, "b.weight": b.astype(np.float16)})
    save_file({"a.weight": torch.from_numpy(a), "b.weight": torch.from_numpy(b)}, str(tmp_path / "m.safetensors"))
    report = torchdiff.compare(tmp_path / "m.safetensors", tmp_path / "m.gguf", map="none")
    by_name = {d.name: d for d in report}
    assert by_name["a.weight"].status == "unchanged" and by_name["a.weight"].new.dtype == "float32"
    assert by_name["b.weight"].status == "retyped" and by_name["b.weight"].new.dtype == "float16"
    delta = b.astype(np.float16).astype(np.float64) - b.astype(np.float64)
    assert by_name["b.weight"].metrics.l2 == pytest.approx(float(np.linalg.norm(delta)), rel=1e-6)
