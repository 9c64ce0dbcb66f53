"""The NumPy reader: .npy (mapped) and .npz (stored members mapped, compressed ones decompressed)."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from torchdiff.errors import CorruptFileError, TorchDiffError, UnknownFormatError, UnsafeCheckpointError
from torchdiff.formats import load
from torchdiff.formats.numpy import load as load_numpy

DTYPES = [np.float16, np.float32, np.float64, np.int8, np.uint8, np.int16, np.int32, np.int64,
          np.uint16, np.bool_, np.complex64, np.complex128]
SHAPES = [(), (0,), (3, 0), (5,), (2, 3, 4)]


def _sample(dtype, shape, seed=0):
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(max(info.min, -1000), min(info.max, 1000), size=shape, endpoint=True).astype(dtype)
    if dtype.kind == "c":
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    return (rng.standard_normal(shape) * 10).astype(dtype)


def _assert_values(tensor: torch.Tensor, expected: np.ndarray) -> None:
    """Compare against a float64 (complex128 for complex) reference, exactly."""
    assert tuple(tensor.shape) == expected.shape
    if expected.dtype.kind == "c":
        reference, got = expected.astype(np.complex128), tensor.to(torch.complex128).numpy()
    else:
        reference, got = expected.astype(np.float64), tensor.to(torch.float64).numpy()
    np.testing.assert_array_equal(got, reference)


def _materialize_quietly(handle) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's "non-writable array" warning
        return handle.materialize()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_npy_round_trip(tmp_path, dtype, shape):
    arr = _sample(dtype, shape)
    path = tmp_path / "layer.weight.npy"
    np.save(path, arr)
    ck = load(path)
    assert ck.format == "numpy"
    assert list(ck) == ["layer.weight"]  # the file stem
    handle = ck.tensors["layer.weight"]
    assert handle.shape == shape
    assert handle.nbytes == arr.nbytes
    assert handle.mapped == (arr.size > 0)
    tensor = _materialize_quietly(handle)
    assert tensor.dtype == handle.dtype
    assert tensor.device.type == "cpu"
    _assert_values(tensor, arr)


@pytest.mark.parametrize("compressed", [False, True], ids=["stored", "compressed"])
def test_npz_round_trip(tmp_path, compressed):
    arrays = {f"a_{np.dtype(d).name}": _sample(d, (3, 4), seed=i) for i, d in enumerate(DTYPES)}
    arrays["scalar"] = np.float32(2.5)
    arrays["empty"] = np.zeros((0, 7), np.float16)
    arrays["block.0.weight"] = _sample(np.float32, (8,), seed=99)
    path = tmp_path / "arrays.npz"
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    with load(path) as ck:
        assert sorted(ck) == sorted(arrays)
        assert ck.info["numpy"]["archive"] == "npz"
        for name, arr in arrays.items():
            handle = ck.tensors[name]
            assert handle.shape == np.shape(arr)
            assert handle.mapped == (not compressed and np.size(arr) > 0)
            _assert_values(_materialize_quietly(handle), np.asarray(arr))


def test_npy_is_lazy_and_mapped_copy_on_write(tmp_path):
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    path = tmp_path / "w.npy"
    np.save(path, arr)
    before = path.read_bytes()
    ck = load(path)
    tensor = ck["w"]
    tensor.mul_(0)  # a write lands in private pages, never in the file
    assert path.read_bytes() == before
    _assert_values(load(path)["w"], arr)


def test_fortran_order_and_big_endian(tmp_path):
    arr = np.asfortranarray(np.arange(24, dtype=np.float64).reshape(2, 3, 4))
    np.save(tmp_path / "f.npy", arr)
    _assert_values(load(tmp_path / "f.npy")["f"], arr)

    big = np.arange(10, dtype=">i4")
    np.save(tmp_path / "big.npy", big)
    handle = load(tmp_path / "big.npy").tensors["big"]
    assert handle.dtype == torch.int32
    assert handle.mapped is False  # byte-swapped into memory
    _assert_values(_materialize_quietly(handle), big)


def test_extension_less_file_is_sniffed(tmp_path):
    path = tmp_path / "weights"
    with open(path, "wb") as f:
        np.save(f, np.ones(3, np.float32))
    ck = load(path)
    assert ck.format == "numpy" and list(ck) == ["weights"]


def test_object_arrays_are_refused(tmp_path):
    obj = np.array([{"a": 1}, None], dtype=object)
    np.save(tmp_path / "obj.npy", obj, allow_pickle=True)
    with pytest.raises(UnsafeCheckpointError, match=r"array 'obj' holds Python objects .*never unpickles"):
        load(tmp_path / "obj.npy")
    np.savez(tmp_path / "obj.npz", fine=np.ones(2), bad=obj)
    with pytest.raises(UnsafeCheckpointError, match=r"obj\.npz: refused, array 'bad' holds Python objects"):
        load(tmp_path / "obj.npz")


@pytest.mark.parametrize(
    "arr, words",
    [
        (np.zeros(2, dtype="V4"), "raw or structured records"),
        (np.zeros(2, dtype=np.longdouble), "extended-precision floats"),
    ],
    ids=["void", "longdouble"],
)
def test_unsupported_dtypes_name_the_array(tmp_path, arr, words):
    if arr.dtype.kind == "f" and arr.dtype.itemsize == 8:
        pytest.skip("long double is double on this platform")
    np.savez(tmp_path / "mixed.npz", weights=np.ones(3), labels=arr)
    message = rf"mixed\.npz: array 'labels' has dtype .*\({words}\), which torch cannot hold"
    with pytest.raises(UnknownFormatError, match=message):
        load(tmp_path / "mixed.npz")
    np.save(tmp_path / "labels.npy", arr)
    with pytest.raises(UnknownFormatError, match=r"array 'labels'"):
        load(tmp_path / "labels.npy")


LABELS = {
    "names": (np.array(["cat", "dog"]), ["cat", "dog"]),
    "grid": (np.array([["a", "b"], ["c", "d"]]), [["a", "b"], ["c", "d"]]),
    "title": (np.array("run 7"), "run 7"),
    "raw": (np.array([b"x\xff", b"y"]), ["x\\xff", "y"]),
    "when": (np.array(["2020-01-01", "2021-06-30"], dtype="datetime64[D]"), ["2020-01-01", "2021-06-30"]),
    "took": (np.array([90, 5], dtype="timedelta64[s]"), ["90 seconds", "5 seconds"]),
}


@pytest.mark.parametrize("compressed", [False, True], ids=["stored", "compressed"])
def test_strings_and_datetimes_are_metadata_values(tmp_path, compressed):
    save = np.savez_compressed if compressed else np.savez
    save(tmp_path / "a.npz", w=np.arange(3.0), **{k: arr for k, (arr, _) in LABELS.items()})
    with load(tmp_path / "a.npz") as ck:
        assert list(ck) == ["w"]
        assert ck.metadata == {k: value for k, (_, value) in LABELS.items()}
    np.save(tmp_path / "names.npy", LABELS["names"][0])
    with load(tmp_path / "names.npy") as ck:
        assert not ck.tensors and ck.metadata == {"names": ["cat", "dog"]}


def test_changed_labels_are_reported_beside_the_tensors(tmp_path, capsys):
    from torchdiff.cli import main

    np.savez(tmp_path / "a.npz", w=np.ones(3), classes=np.array(["cat", "dog"]))
    np.savez(tmp_path / "b.npz", w=np.ones(3), classes=np.array(["cat", "eel"]))
    assert main([str(tmp_path / "a.npz"), str(tmp_path / "b.npz")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "1 tensor: 0 changed, 0 added, 0 removed, 1 unchanged; 1 metadata value differs"
    assert "  ~ classes: ['cat', 'dog']->['cat', 'eel']" in out
    np.save(tmp_path / "only.npy", np.array(["x"]))
    assert main([str(tmp_path / "only.npy"), str(tmp_path / "only.npy")]) == 2
    assert "only.npy: no tensors found (the file holds 1 non-tensor value;" in capsys.readouterr().err


def test_a_long_string_array_is_a_digest_of_its_bytes(tmp_path):
    from torchdiff.formats.numpy import MAX_VALUE_ELEMENTS

    big = np.array([f"t{i}" for i in range(MAX_VALUE_ELEMENTS + 1)])
    other = big.copy()
    other[-1] = "changed"
    np.savez(tmp_path / "a.npz", s=big)
    np.savez(tmp_path / "b.npz", s=other)
    import hashlib

    with load(tmp_path / "a.npz") as a, load(tmp_path / "b.npz") as b:
        digest = hashlib.sha256(big.tobytes()).hexdigest()[:16]
        n = MAX_VALUE_ELEMENTS + 1
        assert a.metadata["s"] == f"<{n} unicode strings {big.dtype.str} [{n}] sha256:{digest}>"
        assert b.metadata["s"] != a.metadata["s"]
    np.savez(tmp_path / "c.npz", s=big[:MAX_VALUE_ELEMENTS])  # at the bound: listed in full
    with load(tmp_path / "c.npz") as c:
        assert c.metadata["s"] == big[:MAX_VALUE_ELEMENTS].tolist()


RECORDS = np.dtype([("pos", [("x", "<f4"), ("y", ">f8")]), ("id", "<i8"), ("v", "<f4", (2,)), ("tag", "<U3")])
PACKED = np.dtype([("a", "i1"), ("b", "<f4")])  # b at byte 1: misaligned for a float32 view


def _records(dtype, n, seed):
    rng = np.random.default_rng(seed)
    arr = np.zeros(n, dtype=dtype)
    for name in dtype.names:
        field = arr[name]
        if field.dtype.names:
            for sub in field.dtype.names:
                arr[name][sub] = rng.standard_normal(n)
        elif field.dtype.kind == "U":
            arr[name] = [f"r{i}" for i in range(n)]
        elif field.dtype.kind in "iu":
            arr[name] = rng.integers(-100, 100, size=field.shape)
        else:
            arr[name] = rng.standard_normal(field.shape)
    return arr


@pytest.mark.parametrize("kind", ["npy", "npz", "npz_compressed"])
def test_records_are_one_tensor_per_numeric_field(tmp_path, kind):
    arr = _records(RECORDS, 5, 0)
    packed = _records(PACKED, 4, 1)
    if kind == "npy":
        np.save(tmp_path / "rec.npy", arr)
        path = tmp_path / "rec.npy"
    else:
        (np.savez_compressed if kind == "npz_compressed" else np.savez)(tmp_path / "f.npz", rec=arr, p=packed)
        path = tmp_path / "f.npz"
    with load(path) as ck:
        expected = {"rec.pos.x": arr["pos"]["x"], "rec.pos.y": arr["pos"]["y"], "rec.id": arr["id"],
                    "rec.v": arr["v"]}
        if kind != "npy":
            expected.update({"p.a": packed["a"], "p.b": packed["b"]})
        assert sorted(ck) == sorted(expected)
        for name, values in expected.items():
            _assert_values(_materialize_quietly(ck.tensors[name]), values)
            assert ck.tensors[name].nbytes == values.size * values.dtype.itemsize
        assert ck.metadata == {"rec.tag": [f"r{i}" for i in range(5)]}


def test_records_holding_objects_are_refused(tmp_path):
    arr = np.zeros(2, dtype=[("w", "f4"), ("o", object)])
    np.save(tmp_path / "r.npy", arr, allow_pickle=True)
    with pytest.raises(UnsafeCheckpointError, match=r"array 'r' holds Python objects"):
        load(tmp_path / "r.npy")


def _truncations(data: bytes) -> list[int]:
    return sorted({0, 3, 7, 9, 20, len(data) // 2, len(data) - 9, len(data) - 1})


@pytest.mark.parametrize("kind", ["npy", "npz", "npz_compressed"])
def test_truncated_files_raise_torchdiff_errors(tmp_path, kind):
    arrays = {"a": np.arange(64, dtype=np.float32), "b": np.ones((4, 4))}
    path = tmp_path / f"full.{kind[:3]}"
    if kind == "npy":
        np.save(path, arrays["a"])
    else:
        (np.savez_compressed if kind.endswith("compressed") else np.savez)(path, **arrays)
    data = path.read_bytes()
    for cut in _truncations(data):
        bad = tmp_path / f"cut{cut}.{kind[:3]}"
        bad.write_bytes(data[:cut])
        with pytest.raises(TorchDiffError):
            with load(bad) as ck:
                for handle in ck.tensors.values():
                    handle.materialize()


def test_truncated_data_message(tmp_path):
    path = tmp_path / "t.npy"
    np.save(path, np.zeros(100, np.float64))
    path.write_bytes(path.read_bytes()[:-8])
    message = r"t\.npy: array 't' is truncated: its header promises 800 bytes of data, the file holds 792"
    with pytest.raises(CorruptFileError, match=message):
        load_numpy(str(path))


def test_not_numpy(tmp_path):
    path = tmp_path / "x.npy"
    path.write_bytes(b"hello world, not numpy")
    with pytest.raises(CorruptFileError, match=r"x\.npy: not a NumPy file"):
        load(path)


@settings(max_examples=30, deadline=None)
@given(
    arr=hnp.arrays(
        dtype=st.sampled_from([np.float16, np.float32, np.float64, np.int8, np.uint8, np.int64, np.bool_]),
        shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6),
    ),
    fortran=st.booleans(),
    compressed=st.booleans(),
)
def test_round_trip_property(tmp_path_factory, arr, fortran, compressed):
    if fortran:
        arr = np.asfortranarray(arr)
    directory = tmp_path_factory.mktemp("prop")
    np.save(directory / "x.npy", arr)
    (np.savez_compressed if compressed else np.savez)(directory / "x.npz", x=arr)
    for path in (directory / "x.npy", directory / "x.npz"):
        with load(path) as ck:
            tensor = _materialize_quietly(ck.tensors["x"])
            assert tensor.shape == arr.shape
            if arr.dtype.kind == "f":
                torch.testing.assert_close(tensor.double(), torch.from_numpy(arr.astype(np.float64)),
                                           rtol=0, atol=0, equal_nan=True)
            else:
                _assert_values(tensor, arr)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(garbage=st.binary(min_size=0, max_size=300))
def test_random_bytes_raise_only_torchdiff_errors(tmp_path_factory, garbage):
    directory = tmp_path_factory.mktemp("fuzz")
    for name, data in (("a.npy", b"\x93NUMPY" + garbage), ("b.npz", b"PK\x03\x04" + garbage), ("c.npy", garbage)):
        path = directory / name
        path.write_bytes(data)
        try:
            with load(path) as ck:
                for handle in ck.tensors.values():
                    handle.materialize()
        except TorchDiffError:
            pass
    assert os.path.isdir(directory)


def test_two_npy_files_pair_their_one_array_each(tmp_path):
    """``torchdiff before.npy after.npy``: each array is named by its file's stem, so the
    names never matched (1 removed, 1 added, exit 0). One array a side pairs, under
    the old name, and the pairing section says so; float64 reference."""
    import torchdiff

    old = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    new = old * 1.25 + 0.5
    np.save(tmp_path / "before.npy", old)
    np.save(tmp_path / "after.npy", new)
    report = torchdiff.compare(tmp_path / "before.npy", tmp_path / "after.npy")
    assert [d.name for d in report] == ["before"] and report["before"].status == "changed"
    want = np.linalg.norm(new.astype(np.float64) - old) / np.linalg.norm(old.astype(np.float64))
    assert report["before"].metrics.rel_l2 == pytest.approx(want, rel=1e-6)
    pairing = report.analysis("pairing")
    assert pairing.data == {"old_name": "before", "new_name": "after"}
    # an .npz keeps its names: members are named by the writer
    np.savez(tmp_path / "a.npz", w=old)
    np.savez(tmp_path / "b.npz", v=new)
    assert {d.status for d in torchdiff.compare(tmp_path / "a.npz", tmp_path / "b.npz")} == {"added", "removed"}
