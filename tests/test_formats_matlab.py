"""The MATLAB reader: v5 (scipy.io, lazy per variable), v4 (whole file), v7.3 (h5py)."""

from __future__ import annotations

import struct
import sys
import zlib

import h5py
import numpy as np
import pytest
import scipy.io
import scipy.sparse
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from torchdiff.errors import CorruptFileError, MissingDependencyError, TorchDiffError
from torchdiff.formats import load

NUMERIC = [np.float64, np.float32, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.int64]


def _sample(dtype, shape, seed=0):
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind in "iu":
        return rng.integers(0, 100, size=shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def _assert_values(tensor: torch.Tensor, expected: np.ndarray) -> None:
    expected = np.asarray(expected)
    assert tuple(tensor.shape) == expected.shape
    kind = np.complex128 if expected.dtype.kind == "c" else np.float64
    got = tensor.to(torch.complex128 if kind is np.complex128 else torch.float64).numpy()
    np.testing.assert_array_equal(got, expected.astype(kind))


def _read_all(ck):
    return {name: handle.materialize() for name, handle in ck.tensors.items()}


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "compressed"])
def test_v5_numeric_arrays(tmp_path, compressed):
    arrays = {f"w_{np.dtype(d).name}": _sample(d, (3, 4), seed=i) for i, d in enumerate(NUMERIC)}
    arrays["mask"] = np.array([[True, False, True]])
    arrays["z"] = np.array([[1 + 2j, -3j], [0.5, 2]], dtype=np.complex128)
    arrays["zs"] = np.array([1 + 1j, 2], dtype=np.complex64)
    arrays["empty"] = np.zeros((0, 3))
    arrays["row"] = np.arange(5.0)  # a 1-D numpy array is a MATLAB 1x5 row
    path = tmp_path / "model.mat"
    scipy.io.savemat(path, arrays, do_compression=compressed)
    ck = load(path)
    assert ck.format == "matlab"
    assert ck.info["matlab"]["version"] == "5.0"
    assert sorted(ck) == sorted(arrays)
    for name, arr in arrays.items():
        handle = ck.tensors[name]
        expected = np.atleast_2d(arr)
        assert handle.shape == expected.shape
        assert handle.mapped is False
        tensor = handle.materialize()
        assert tensor.dtype == handle.dtype
        _assert_values(tensor, expected)
    assert ck.tensors["mask"].dtype == torch.bool
    assert ck.tensors["z"].dtype == torch.complex128
    assert ck.tensors["zs"].dtype == torch.complex64
    assert ck.tensors["w_float32"].dtype == torch.float32
    assert ck.tensors["w_uint16"].dtype == torch.uint16
    assert ck.tensors["w_float64"].nbytes == 3 * 4 * 8


def test_v5_scalars_strings_structs_cells_sparse(tmp_path):
    path = tmp_path / "net.mat"
    scipy.io.savemat(path, {
        "lr": 0.001,
        "epoch": np.int32(7),
        "name": "resnet",
        "lines": np.array(["ab", "cd"]),
        "net": {"W": np.ones((2, 3), np.float32), "b": np.array([0.5, 1.5]), "depth": 3, "kind": "mlp"},
        "cells": np.array([np.arange(4.0), "text", np.zeros((2, 2))], dtype=object),
        "S": scipy.sparse.csc_matrix(np.diag([1.0, 2.0, 3.0])),
    }, do_compression=True)
    ck = load(path)
    assert ck.metadata["lr"] == 0.001
    assert ck.metadata["epoch"] == 7
    assert ck.metadata["name"] == "resnet"
    assert ck.metadata["lines"] == ["ab", "cd"]
    assert ck.metadata["net.depth"] == 3
    assert ck.metadata["net.kind"] == "mlp"
    assert ck.metadata["cells.1"] == "text"
    assert sorted(ck) == ["S", "cells.0", "cells.2", "net.W", "net.b"]
    _assert_values(ck["net.W"], np.ones((2, 3)))
    _assert_values(ck["net.b"], [[0.5, 1.5]])
    _assert_values(ck["cells.0"], [[0, 1, 2, 3]])
    assert ck.tensors["S"].storage_dtype == "sparse float64"
    _assert_values(ck["S"], np.diag([1.0, 2.0, 3.0]))  # returned dense


def test_v5_reads_only_headers_at_load(tmp_path, monkeypatch):
    path = tmp_path / "big.mat"
    scipy.io.savemat(path, {f"w{i}": np.full((4, 4), float(i)) for i in range(5)}, do_compression=True)
    calls = []
    real = scipy.io.loadmat
    monkeypatch.setattr(scipy.io, "loadmat", lambda *a, **k: calls.append(1) or real(*a, **k))
    ck = load(path)
    assert calls == []
    _assert_values(ck["w3"], np.full((4, 4), 3.0))
    assert len(calls) == 1


def test_v4_files(tmp_path):
    path = tmp_path / "old.mat"
    scipy.io.savemat(path, {"a": np.arange(6.0).reshape(2, 3), "s": 2.0}, format="4")
    ck = load(path)
    assert ck.info["matlab"]["version"] == "4"
    _assert_values(ck["a"], np.arange(6.0).reshape(2, 3))
    assert ck.metadata["s"] == 2.0


def _write_v73(path):
    """A file laid out like MATLAB's ``save -v7.3``: a 512-byte userblock, then HDF5."""
    w = np.arange(12.0).reshape(3, 4)  # MATLAB 3x4 -> stored 4x3
    with h5py.File(path, "w", userblock_size=512) as f:
        def put(name, data, cls, **attrs):
            ds = f.create_dataset(name, data=data)
            ds.attrs["MATLAB_class"] = np.bytes_(cls)
            for key, value in attrs.items():
                ds.attrs[key] = value
            return ds

        put("w", w.T, "double")
        put("w32", w.T.astype(np.float32), "single")
        put("mask", np.array([[1], [0], [1]], np.uint8), "logical")
        put("ids", np.array([[3, 1, 2]], np.int8).T, "int8")
        put("lr", np.array([[0.01]]), "double")
        put("title", np.array([[ord(c)] for c in "héllo"], np.uint16), "char")
        put("nothing", np.array([0, 3], np.uint64), "double", MATLAB_empty=np.uint8(1))
        z = np.zeros((2, 2), dtype=[("real", "<f8"), ("imag", "<f8")])
        z["real"], z["imag"] = [[1, 2], [3, 4]], [[0, -1], [1, 0]]
        put("z", z, "double")
        net = f.create_group("net")
        net.attrs["MATLAB_class"] = np.bytes_("struct")
        layer = net.create_dataset("W", data=np.ones((2, 5), np.float32))
        layer.attrs["MATLAB_class"] = np.bytes_("single")
        refs = f.create_group("#refs#")
        a = refs.create_dataset("a", data=np.arange(4.0).reshape(1, 4))
        a.attrs["MATLAB_class"] = np.bytes_("double")
        b = refs.create_dataset("b", data=np.array([[ord(c)] for c in "hi"], np.uint16))
        b.attrs["MATLAB_class"] = np.bytes_("char")
        cell = f.create_dataset("cells", data=np.array([[a.ref], [b.ref]], dtype=h5py.ref_dtype))
        cell.attrs["MATLAB_class"] = np.bytes_("cell")
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: today HDF5 schema 1.00 ."
    with open(path, "r+b") as f:
        f.write(header.ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02" + b"IM")
    return w, z


def test_v73_hdf5(tmp_path):
    path = tmp_path / "model73.mat"
    w, z = _write_v73(path)
    with load(path) as ck:
        assert ck.info["matlab"]["version"] == "7.3"
        assert sorted(ck) == ["cells.0", "ids", "mask", "net.W", "nothing", "w", "w32", "z"]
        assert ck.tensors["w"].shape == (4, 3)  # stored (transposed) shape
        _assert_values(ck["w"], w.T)
        _assert_values(ck["w32"], w.T)
        assert ck.tensors["w32"].dtype == torch.float32
        assert ck.tensors["mask"].dtype == torch.bool
        _assert_values(ck["mask"], [[1], [0], [1]])
        assert ck.tensors["ids"].dtype == torch.int8
        assert ck.tensors["z"].dtype == torch.complex128
        _assert_values(ck["z"], z["real"] + 1j * z["imag"])
        _assert_values(ck["net.W"], np.ones((2, 5)))
        _assert_values(ck["cells.0"], np.arange(4.0).reshape(1, 4))
        assert ck.tensors["nothing"].shape == (3, 0)
        assert ck.metadata["lr"] == 0.01
        assert ck.metadata["title"] == "héllo"
        assert ck.metadata["cells.1"] == "hi"


def test_plain_hdf5_with_mat_extension(tmp_path):
    path = tmp_path / "plain.mat"
    with h5py.File(path, "w") as f:
        f["group/data"] = np.arange(6, dtype=np.int16).reshape(2, 3)
        f["one"] = np.array([1.5])
        f["scalar"] = 3
    ck = load(path)
    assert ck.info["matlab"]["version"] == "hdf5"
    _assert_values(ck["group.data"], np.arange(6).reshape(2, 3))
    _assert_values(ck["one"], [1.5])
    assert ck.metadata["scalar"] == 3
    ck.close()


@pytest.mark.parametrize("module", ["scipy", "h5py"])
def test_missing_dependency(tmp_path, monkeypatch, module):
    path = tmp_path / "m.mat"
    if module == "scipy":
        scipy.io.savemat(path, {"a": np.ones((2, 2))})
        monkeypatch.setitem(sys.modules, "scipy", None)
        monkeypatch.setitem(sys.modules, "scipy.io", None)
    else:
        _write_v73(path)
        monkeypatch.setitem(sys.modules, "h5py", None)
    message = rf"m\.mat: reading .* needs {module}.*pip install torchdiff\[mat\]"
    with pytest.raises(MissingDependencyError, match=message):
        load(path)


@pytest.mark.parametrize("kind", ["v5", "v5_compressed", "v73"])
def test_truncated_files_raise_torchdiff_errors(tmp_path, kind):
    path = tmp_path / "full.mat"
    if kind == "v73":
        _write_v73(path)
    else:
        scipy.io.savemat(path, {"a": np.arange(100.0).reshape(10, 10), "s": "text", "b": np.ones(50, np.float32)},
                         do_compression=kind.endswith("compressed"))
    data = path.read_bytes()
    # (not 128: the 128-byte header alone is a valid v5 file with no variables)
    for cut in sorted({0, 10, 127, 129, 140, 200, len(data) // 2, len(data) - 50, len(data) - 1}):
        bad = tmp_path / f"cut{cut}.mat"
        bad.write_bytes(data[:cut])
        with pytest.raises(TorchDiffError):
            with load(bad) as ck:
                _read_all(ck)


def test_truncated_v5_message(tmp_path):
    path = tmp_path / "t.mat"
    scipy.io.savemat(path, {"a": np.ones((10, 10)), "b": np.ones((10, 10))})
    path.write_bytes(path.read_bytes()[:-100])
    message = r"t\.mat: variable #2 \(at byte \d+\) is unreadable: it needs \d+ bytes, the file holds \d+"
    with pytest.raises(CorruptFileError, match=message):
        load(path)


def test_corrupt_compressed_data_fails_on_materialize(tmp_path):
    path = tmp_path / "c.mat"
    scipy.io.savemat(path, {"a": np.random.default_rng(0).standard_normal((50, 50))}, do_compression=True)
    data = bytearray(path.read_bytes())
    data[-200:-100] = bytes(100)  # zero a stretch of the deflate stream, keep the header
    path.write_bytes(bytes(data))
    ck = load(path)
    with pytest.raises(CorruptFileError, match=r"c\.mat: variable 'a' is unreadable"):
        ck["a"]


@settings(max_examples=30, deadline=None)
@given(
    arr=hnp.arrays(
        dtype=st.sampled_from([np.float64, np.float32, np.int8, np.uint8, np.int32, np.bool_]),
        shape=hnp.array_shapes(min_dims=2, max_dims=3, min_side=0, max_side=5),
        elements={"allow_nan": False},
    ),
    compressed=st.booleans(),
)
def test_round_trip_property(tmp_path_factory, arr, compressed):
    if arr.size == 1:
        arr = np.concatenate([arr.ravel(), arr.ravel()])[None]  # 1x1 is a MATLAB scalar (metadata)
    path = tmp_path_factory.mktemp("prop") / "x.mat"
    scipy.io.savemat(path, {"x": arr}, do_compression=compressed)
    ck = load(path)
    handle = ck.tensors["x"]
    assert handle.shape == arr.shape
    assert handle.dtype == (torch.bool if arr.dtype == np.bool_ else torch.from_numpy(arr[:0]).dtype)
    _assert_values(handle.materialize(), arr)


def test_bad_data_type_is_an_error_not_a_crash(tmp_path):
    # scipy's compiled reader indexes a table with this code unchecked (a segfault before the check)
    path = tmp_path / "a.mat"
    scipy.io.savemat(path, {"a": np.ones((3, 3), np.float32)})
    data = bytearray(path.read_bytes())
    assert struct.unpack_from("<II", data, 176) == (7, 36)  # miSINGLE, 9 floats: the data element's tag
    data[176] = 147
    path.write_bytes(bytes(data))
    ck = load(path)
    message = r"a\.mat: variable 'a' is unreadable \(ValueError: data type 147 in the numeric data\)"
    with pytest.raises(CorruptFileError, match=message):
        ck["a"]


def test_array_without_dimensions_is_an_error_not_a_crash(tmp_path):
    # MATLAB arrays have at least 2 dimensions; scipy crashes on a char array with none
    path = tmp_path / "c.mat"
    scipy.io.savemat(path, {"s": "hello"})
    data = bytearray(path.read_bytes())
    assert struct.unpack_from("<II", data, 152) == (5, 8)  # the dimensions' tag: 2 int32
    struct.pack_into("<I", data, 156, 0)
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match=r"c\.mat: variable .* is unreadable \(ValueError: 0 bytes of dimensions\)"):
        with load(path) as ck:
            _read_all(ck)


@pytest.mark.parametrize(
    "offset, value, message",
    [
        (184, 1000, r"an index outside the 3x3 matrix"),  # a row index
        (220, 0, r"the column pointers are not an increasing run from 0"),  # last pointer: scipy's check passes this
    ],
    ids=["row_index", "column_pointer"],
)
def test_damaged_sparse_is_an_error_not_a_crash(tmp_path, offset, value, message):
    path = tmp_path / "s.mat"
    scipy.io.savemat(path, {"S": scipy.sparse.csc_matrix(np.eye(3))})
    data = bytearray(path.read_bytes())
    assert struct.unpack_from("<3i", data, 184) == (0, 1, 2)  # row indices
    assert struct.unpack_from("<4i", data, 208) == (0, 1, 2, 3)  # column pointers
    struct.pack_into("<i", data, offset, value)
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match=r"s\.mat: sparse matrix 'S' is damaged \(ValueError: " + message):
        load(path)["S"]


def _variables(data: bytes) -> list[bytes]:
    out, pos = [], 128
    while pos < len(data):
        _, n = struct.unpack_from("<II", data, pos)
        out.append(data[pos:pos + 8 + n])
        pos += 8 + n
    return out


@settings(max_examples=30, deadline=None, derandomize=True)
@given(flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6))
def test_damaged_variables_raise_only_torchdiff_errors(tmp_path_factory, flips):
    """Byte flips inside the (decompressed) variables, recompressed: only TorchDiffError, never a crash."""
    directory = tmp_path_factory.mktemp("flip")
    source = directory / "src.mat"
    scipy.io.savemat(source, {
        "a": np.ones((3, 4), np.float32),
        "st": {"x": np.ones((2, 2)), "s": "hey", "c": np.array([np.arange(3), "q"], dtype=object)},
        "S": scipy.sparse.csc_matrix(np.eye(3)),
        "z": np.array([1j, 2]),
    }, do_compression=True)
    data = source.read_bytes()
    payloads = [bytearray(zlib.decompress(v[8:])) for v in _variables(data)]
    for position, value in flips:
        payload = payloads[position % len(payloads)]
        payload[position % len(payload)] = value
    blobs = [zlib.compress(bytes(p)) for p in payloads]
    damaged = directory / "damaged.mat"
    damaged.write_bytes(data[:128] + b"".join(struct.pack("<II", 15, len(b)) + b for b in blobs))
    try:
        with load(damaged) as ck:
            _read_all(ck)
    except TorchDiffError:
        pass


def test_self_referencing_cell_terminates(tmp_path):
    path = tmp_path / "cycle.mat"
    with h5py.File(path, "w") as f:
        cell = f.create_dataset("c", shape=(2,), dtype=h5py.ref_dtype)
        cell[0] = cell.ref
        cell[1] = cell.ref
        cell.attrs["MATLAB_class"] = np.bytes_("cell")
        f["w"] = np.ones((2, 2))
    ck = load(path)
    assert list(ck) == ["w"]
    assert ck.metadata == {"c.0": "<same object as c>", "c.1": "<same object as c>"}
