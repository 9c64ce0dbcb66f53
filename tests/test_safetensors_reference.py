"""torchdiff parses safetensors headers itself (for speed: docs/FORMATS.md); the
safetensors package is the reference. Whatever it writes reads back identically, and
whatever it refuses to open, torchdiff refuses too."""

from __future__ import annotations

import glob
import os
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from torchdiff.errors import TorchDiffError
from torchdiff.formats import safetensors as reader

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8,
          torch.int16, torch.int32, torch.int64, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2]


def assert_same_as_library(path: str) -> None:
    ours = reader.load(path)
    with safe_open(path, framework="pt") as ref:
        assert sorted(ours.tensors) == sorted(ref.keys())
        assert ours.info["metadata"] == (ref.metadata() or {})
        for name in ref.keys():
            expected = ref.get_tensor(name)
            got = ours.tensors[name].materialize()
            assert got.dtype == expected.dtype and got.shape == expected.shape, name
            assert torch.equal(got.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8)), name


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shapes=st.lists(st.lists(st.integers(0, 5), max_size=3), min_size=0, max_size=6),
       dtypes=st.lists(st.sampled_from(DTYPES), min_size=6, max_size=6),
       meta=st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2))
def test_files_the_library_writes_read_back_identically(tmp_path, shapes, dtypes, meta):
    g = torch.Generator().manual_seed(len(shapes))
    state = {}
    for i, shape in enumerate(shapes):
        x = torch.randn(shape, generator=g) * 10
        state[f"t.{i}"] = x.to(dtypes[i])
    path = str(tmp_path / "x.safetensors")
    save_file(state, path, metadata=meta or None)
    assert_same_as_library(path)
    assert_columns_agree_with_entries(path)


def assert_columns_agree_with_entries(path: str) -> None:
    """A valid header takes the column-at-a-time checks, and they give what the
    entry-by-entry checks give."""
    _, header, data_len = reader.read_header(path)
    header.pop("__metadata__", None)
    columns = reader._fast_specs(header, data_len)
    assert columns is not None
    names, dtypes, shapes, begins, ends = columns
    for i, (name, spec) in enumerate(header.items()):
        assert (names[i], dtypes[i], tuple(shapes[i]), begins[i], ends[i]) == (name, *reader._spec(path, name, spec, data_len))


def test_fixture_files_read_back_identically(fixtures_dir):
    paths = sorted(glob.glob(os.path.join(fixtures_dir, "*.safetensors")))
    assert paths
    for path in paths:
        assert_same_as_library(path)


def _library_opens(path: str) -> bool:
    try:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                f.get_tensor(name)
        return True
    except (SafetensorError, Exception):  # noqa: BLE001 - any refusal by the reference
        return False


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_what_the_library_refuses_is_refused(tmp_path, data):
    path = str(tmp_path / "m.safetensors")
    save_file({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.int8)}, path)
    blob = bytearray(open(path, "rb").read())
    (n,) = struct.unpack("<Q", blob[:8])
    # Mutate a byte of the header (the part whose validation torchdiff does itself).
    pos = data.draw(st.integers(0, 8 + n - 1))
    blob[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.sampled_from([len(blob), len(blob) - 1, 8 + n]))
    with open(path, "wb") as f:
        f.write(bytes(blob[:cut]))
    if _library_opens(path):
        assert_same_as_library(path)
    else:
        with pytest.raises(TorchDiffError):
            ours = reader.load(path)
            for h in ours.tensors.values():
                h.materialize()


@pytest.mark.parametrize("header, message", [
    (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}', "needs 8 bytes"),
    (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
     "overlaps"),
    (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', "gap at byte 0"),
    (b'{"a":{"dtype":"F99","shape":[1],"data_offsets":[0,4]}}', "dtype F99"),
    (b'{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}', "not a list of non-negative"),
    (b'[1,2]', "not a JSON object"),
    (b'{"__metadata__":{"k":1}}', "map of strings"),
])
def test_lying_headers_are_refused_with_a_reason(tmp_path, header, message):
    path = tmp_path / "lie.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(TorchDiffError, match=message):
        reader.load(str(path))
    assert not _library_opens(str(path))


@pytest.mark.parametrize("entry, message", [
    ('{"dtype":"F32","shape":[true],"data_offsets":[0,4]}', "not a list of non-negative"),  # bool is no int
    ('{"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}', "not a list of non-negative"),
    ('{"dtype":"F32","shape":[9223372036854775808],"data_offsets":[0,4]}', "not a list of non-negative"),
    ('{"dtype":"F32","shape":[1],"data_offsets":[0,4.0]}', "data_offsets"),
    ('{"dtype":"F32","shape":[1],"data_offsets":[0,4,8]}', "data_offsets"),
    ('{"dtype":"F32","shape":[1],"data_offsets":[4,0]}', "data_offsets"),
    ('{"dtype":"F32","shape":{},"data_offsets":[0,4]}', "not a list of non-negative"),
    ('{"dtype":1,"shape":[1],"data_offsets":[0,4]}', "has no dtype"),
    ('[1]', "is not an object"),
])
def test_one_bad_entry_among_good_ones_is_named(tmp_path, entry, message):
    """The column-at-a-time checks let nothing through: one bad entry among 50 good ones
    is found entry by entry and named."""
    good = ",".join(f'"g{i}":{{"dtype":"F32","shape":[1],"data_offsets":[{4 * i},{4 * i + 4}]}}' for i in range(50))
    header = f'{{{good},"bad":{entry}}}'.encode()
    path = tmp_path / "one_bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 204)
    with pytest.raises(TorchDiffError, match=message):
        reader.load(str(path))
    _, parsed, data_len = reader.read_header(str(path))
    assert reader._fast_specs(parsed, data_len) is None


def test_header_length_past_the_end_is_refused(tmp_path):
    path = tmp_path / "long.safetensors"
    path.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(TorchDiffError, match="runs past the end"):
        reader.load(str(path))


def test_views_do_not_write_through_to_the_file(tmp_path):
    path = str(tmp_path / "w.safetensors")
    save_file({"a": torch.zeros(4)}, path)
    before = open(path, "rb").read()
    t = reader.load(path).tensors["a"].materialize()
    t += 1  # a private copy-on-write mapping: the file must not change
    assert open(path, "rb").read() == before
