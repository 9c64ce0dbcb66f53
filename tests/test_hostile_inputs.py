"""The hostile-input catalogue: files that lie (headers, sizes, offsets, counts), zip
bombs, path traversal, malicious pickles, odd names, and every truncation of a small
valid file of each format.

Every refusal is a TorchDiffError subclass whose message names the file and says what
is wrong, asserted word for word; each case runs within a bounded time and a bounded
peak memory (the files claim gigabytes; reading them may not cost more than a few
megabytes). See docs/SECURITY.md for what is and is not guaranteed.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import struct
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import torchdiff
from torchdiff.cli import main
from torchdiff.formats import base as formats_base

from hostile_files import SEEDS, available, npy_bytes, read_all, require, safetensors_bytes, write_seed, zip_with

F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}

# ---- bounded time and memory ---------------------------------------------------------------


def _peak_rss() -> int | None:
    """Peak resident memory since the last reset (Linux), in bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@pytest.fixture(scope="module", autouse=True)
def _warm_readers(tmp_path_factory):
    """Import every reader's library once, so that a case's memory is its own."""
    root = tmp_path_factory.mktemp("warm")
    for kind, (_, fmt) in SEEDS.items():
        if available(kind):
            read_all(write_seed(kind, root / kind), fmt)


class Bounded:
    """Asserts the block ran in under ``seconds`` and raised the peak RSS by under ``mib``."""

    def __init__(self, seconds: float = 5.0, mib: int = 64):
        self.seconds, self.limit = seconds, mib << 20

    def __enter__(self):
        self.measure = _reset_peak_rss()
        self.before = _peak_rss() if self.measure else None
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc):
        elapsed = time.perf_counter() - self.started
        assert elapsed < self.seconds, f"took {elapsed:.1f} s"
        if self.before is not None:
            grown = _peak_rss() - self.before
            assert grown < self.limit, f"peak memory grew by {grown >> 20} MiB"
        return False


def test_the_bounds_measure_what_they_claim():
    if not _reset_peak_rss():
        pytest.skip("no /proc/self/clear_refs: peak memory is not measured here")
    with pytest.raises(AssertionError, match=r"peak memory grew by \d+ MiB"):
        with Bounded(mib=16):
            np.ones(8_000_000).sum()  # 64 MB, touched
    with pytest.raises(AssertionError, match=r"took \d"):
        with Bounded(seconds=0.01):
            time.sleep(0.05)


def refused(path, error, message, format=None):
    """Reading ``path`` raises ``error`` matching ``message``, bounded, and the message names the file."""
    with Bounded():
        with pytest.raises(error, match=message) as caught:
            read_all(path, format)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)
    return caught.value


def cli_error(capsys, *argv) -> str:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    assert out == "" and err.count("\n") == 1 and err.startswith("torchdiff: error: "), err
    assert "Traceback" not in err and "internal error" not in err, err
    return err.rstrip("\n")


# ---- safetensors: lying headers ---------------------------------------------------------------

ST_READABLE = "BF16, BOOL, C64, F16, F32, F64, F8_E4M3, F8_E4M3FNUZ, F8_E5M2, F8_E5M2FNUZ, F8_E8M0, I16, I32, I64, I8, U16, U32, U64, U8"

SAFETENSORS_CASES = [
    ("length_past_end", safetensors_bytes({"w": F32_2}, bytes(8), length=10**6),
     torchdiff.CorruptFileError,
     r"not a valid safetensors file \(header length 1000000 runs past the end of the 77-byte file; truncated\?\)$"),
    ("length_2_63", safetensors_bytes(b"", length=2**63), torchdiff.CorruptFileError,
     r"not a valid safetensors file \(header length 9223372036854775808 runs past the end of the 8-byte file"),
    ("shorter_than_length_field", b"\x10\x00\x00", torchdiff.CorruptFileError,
     r"not a valid safetensors file \(3 bytes, shorter than the 8-byte header length\)$"),
    ("overlapping_offsets",
     safetensors_bytes({"a": F32_2, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12)),
     torchdiff.CorruptFileError, r"not a valid safetensors file \(tensor 'b' overlaps the tensor before it\)$"),
    ("offsets_past_data", safetensors_bytes({"a": F32_2}, bytes(4)), torchdiff.CorruptFileError,
     r"not a valid safetensors file \(tensor 'a' ends at byte 8 of a 4-byte data region; truncated\?\)$"),
    ("offsets_reversed", safetensors_bytes({"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}, bytes(8)),
     torchdiff.CorruptFileError, r"not a valid safetensors file \(tensor 'a' has data_offsets \[8, 0\]\)$"),
    ("offsets_leave_gap", safetensors_bytes({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8)),
     torchdiff.CorruptFileError, r"not a valid safetensors file \(tensor 'a' leaves a gap at byte 0\)$"),
    ("bytes_after_last", safetensors_bytes({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(8)),
     torchdiff.CorruptFileError, r"not a valid safetensors file \(4 bytes after the last tensor\)$"),
    ("shape_disagrees_with_span", safetensors_bytes({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
                                                    bytes(8)),
     torchdiff.CorruptFileError,
     r"not a valid safetensors file \(tensor 'a': shape \[3\] of F32 needs 12 bytes, its offsets span 8\)$"),
    ("shape_product_overflows", safetensors_bytes({"a": {"dtype": "F32", "shape": [2**62, 2**62],
                                                         "data_offsets": [0, 8]}}, bytes(8)),
     torchdiff.CorruptFileError,
     r"not a valid safetensors file \(tensor 'a': shape \[4611686018427387904, 4611686018427387904\] of F32 needs "
     r"85070591730234615865843651857942052864 bytes, its offsets span 8\)$"),
    ("dimension_2_63_times_zero", safetensors_bytes({"a": {"dtype": "F32", "shape": [0, 2**63],
                                                           "data_offsets": [0, 0]}}),
     torchdiff.CorruptFileError,
     r"not a valid safetensors file \(tensor 'a' has shape \[0, 9223372036854775808\], "
     r"not a list of non-negative integers below 2\*\*63\)$"),
    ("negative_dimension", safetensors_bytes({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 8]}}, bytes(8)),
     torchdiff.CorruptFileError,
     r"not a valid safetensors file \(tensor 'a' has shape \[-1\], not a list of non-negative integers"),
    ("unknown_dtype", safetensors_bytes({"a": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
     torchdiff.CorruptFileError,
     rf"tensor 'a' has dtype F33, which this torch cannot hold \(readable: {ST_READABLE}\)$"),
    ("dtype_torch_lacks", safetensors_bytes({"a": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}, bytes(1)),
     torchdiff.CorruptFileError, r"tensor 'a' has dtype F4, which this torch cannot hold"),
    ("dtype_not_a_string", safetensors_bytes({"a": {"dtype": 7, "shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
     torchdiff.CorruptFileError, r"not a valid safetensors file \(tensor 'a' has no dtype\)$"),
    ("non_utf8_name", safetensors_bytes(b'{"a\xff":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', bytes(8)),
     torchdiff.CorruptFileError, r"not a valid safetensors file \(header is not UTF-8\)$"),
    ("header_not_json", safetensors_bytes(b"{not json", bytes(8)), torchdiff.CorruptFileError,
     r"not a valid safetensors file \(header is not JSON: Expecting property name enclosed in double quotes"),
    ("header_a_list", safetensors_bytes(b"[1, 2]"), torchdiff.CorruptFileError,
     r"not a valid safetensors file \(header is not a JSON object\)$"),
    ("header_nested_100k_deep", safetensors_bytes(b"[" * 100_000 + b"]" * 100_000), torchdiff.CorruptFileError,
     r"not a valid safetensors file \(header is not JSON: maximum recursion depth exceeded"),
    ("entry_not_an_object", safetensors_bytes({"a": [1, 2]}), torchdiff.CorruptFileError,
     r"not a valid safetensors file \(entry 'a' is not an object\)$"),
    ("metadata_not_strings", safetensors_bytes({"__metadata__": {"x": 1}}), torchdiff.CorruptFileError,
     r"not a valid safetensors file \(__metadata__ is not a map of strings\)$"),
]


@pytest.mark.parametrize("name,data,error,message", SAFETENSORS_CASES, ids=[c[0] for c in SAFETENSORS_CASES])
def test_safetensors_lying_header(capsys, tmp_path, name, data, error, message):
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(data)
    refused(path, error, re.escape(str(path)) + ": " + message.lstrip("^"))
    assert cli_error(capsys, path, path).startswith(f"torchdiff: error: {path}: ")


def test_safetensors_header_of_hundreds_of_megabytes_is_refused_unread(tmp_path):
    """A 300 MB header (a sparse file: no disk spent) is over the format's 100 MB limit:
    refused from its length field, before a byte of it is read or allocated."""
    path = tmp_path / "huge_header.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 300_000_000) + b"{")
        f.truncate(8 + 300_000_000)
    refused(path, torchdiff.CorruptFileError,
            r"not a valid safetensors file \(header of 300000000 bytes exceeds the format's 100000000-byte limit\)$")


def test_safetensors_header_claiming_hundreds_of_megabytes_in_a_small_file(tmp_path):
    path = tmp_path / "claims.safetensors"
    path.write_bytes(safetensors_bytes({"w": F32_2}, bytes(8), length=500_000_000))
    refused(path, torchdiff.CorruptFileError, r"header length 500000000 runs past the end of the 77-byte file")


def test_safetensors_the_library_refuses_what_we_refuse(tmp_path):
    """The safetensors package (the format's reference) refuses each lying header too."""
    from safetensors import SafetensorError, safe_open

    for name, data, _, _ in SAFETENSORS_CASES:
        if name == "dtype_torch_lacks":  # the library reads F4 its own way; this torch has no dtype for it
            continue
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        with pytest.raises((SafetensorError, OSError, ValueError, RuntimeError, TypeError)):
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    f.get_tensor(key)


# ---- names: NUL, unicode, dots, slashes, very long ---------------------------------------------

ODD_NAMES = [
    "a\x00b",  # NUL inside a name
    "层.权重",
    "ünïcödé.wëight",
    "emoji.🙂.bias",
    "model.layers.0.self_attn.q_proj.weight",
    "a/b/../../etc/passwd",
    "/absolute/name",
    "..",
    "",
    "line\nbreak  ~ fake: rel_l2=0.0",
    "\x1b[2Jescape",
    "rtl\u202eoverride",
    "x" * 10_000,
]


def test_odd_names_work_end_to_end(capsys, tmp_path):
    from safetensors.torch import save_file

    old = {name: torch.full((2,), float(i)) for i, name in enumerate(ODD_NAMES)}
    new = {name: t + (i % 2) for i, (name, t) in enumerate(old.items())}
    a, b = tmp_path / "old.safetensors", tmp_path / "new.safetensors"
    save_file(old, str(a))
    save_file(new, str(b))
    assert main([str(a), str(b), "-o", "json"]) == 0
    items = json.loads(capsys.readouterr().out)
    assert sorted(i["path"] for i in items) == sorted(n for i, n in enumerate(ODD_NAMES) if i % 2)
    # text: one line per changed tensor, control characters escaped, nothing else on the terminal
    assert main([str(a), str(b), "--no-color"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    changed = [n for i, n in enumerate(ODD_NAMES) if i % 2]
    assert len(lines) == len(changed) + 2, out  # the summary line before and after the tensor lines
    assert "\x1b" not in out and "\x00" not in out and "\u202e" not in out
    assert "  ~ line\\nbreak  ~ fake: rel_l2=0.0: rel_l2=" in out
    assert "  ~ rtl\\u202eoverride: " in out
    assert lines[0] == lines[-1] == f"{len(ODD_NAMES)} tensors: {len(changed)} changed, 0 added, 0 removed, " \
                                    f"{len(ODD_NAMES) - len(changed)} unchanged"
    # inspect: every name, once
    assert main(["inspect", str(a), "-o", "json"]) == 0
    assert sorted(i["path"] for i in json.loads(capsys.readouterr().out)) == sorted(ODD_NAMES)


def test_odd_names_in_torch_and_npz_files(capsys, tmp_path):
    names = ["层.w", "a.b.c", "x" * 1000, "slash/in/name"]
    pt = tmp_path / "odd.pt"
    torch.save({n: torch.ones(2) for n in names}, pt)
    assert sorted(torchdiff.load(pt).tensors) == sorted(names)
    npz = tmp_path / "odd.npz"
    np.savez(npz, **{n: np.ones(2, dtype=np.float32) for n in names})
    assert sorted(torchdiff.load(npz).tensors) == sorted(names)
    assert main([str(pt), str(npz), "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


@pytest.mark.slow
def test_100k_tiny_tensors_end_to_end(capsys, tmp_path):
    """100,000 tensors in one safetensors file: every one measured and reported."""
    from safetensors.torch import save_file

    n = 100_000
    values = torch.arange(n * 2, dtype=torch.float32).reshape(n, 2)
    save_file({f"blk.{i}.w": values[i].clone() for i in range(n)}, str(tmp_path / "a.safetensors"))
    values[::3] += 1
    save_file({f"blk.{i}.w": values[i].clone() for i in range(n)}, str(tmp_path / "b.safetensors"))
    # Its speed is a benchmark row (benchmarks/bench_engine.py), not a timed assertion here.
    assert main([str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "-o", "json"]) == 0
    items = json.loads(capsys.readouterr().out)
    assert len(items) == len(range(0, n, 3))
    assert {i["path"] for i in items} == {f"blk.{i}.w" for i in range(0, n, 3)}


# ---- npy / npz: lying shapes, bombs, traversal ----------------------------------------------------


def _npy_with_header(header: str, data: bytes = b"") -> bytes:
    text = header.encode("latin1")
    pad = -(10 + len(text) + 1) % 64
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text) + pad + 1) + text + b" " * pad + b"\n" + data


NPY_CASES = [
    ("shape_lies", _npy_with_header("{'descr': '<f8', 'fortran_order': False, 'shape': (1000000,), }", bytes(80)),
     torchdiff.CorruptFileError,
     r"array 'shape_lies' is truncated: its header promises 8000000 bytes of data, the file holds 80 "
     r"\(re-save or re-download the file\)$"),
    ("shape_2_62_squared", _npy_with_header("{'descr': '<f4', 'fortran_order': False, 'shape': (4611686018427387904, "
                                            "4611686018427387904), }", bytes(8)),
     torchdiff.CorruptFileError,
     r"array 'shape_2_62_squared' is truncated: its header promises 85070591730234615865843651857942052864 bytes"),
    ("negative_dimension", _npy_with_header("{'descr': '<f4', 'fortran_order': False, 'shape': (-5,), }"),
     torchdiff.CorruptFileError,
     r"array 'negative_dimension' has (a negative dimension in its header|no valid \.npy header)"),
    ("header_20kb", b"\x93NUMPY\x02\x00" + struct.pack("<I", 20_000) + b" " * 20_000, torchdiff.CorruptFileError,
     r"array 'header_20kb' has no valid \.npy header \(ValueError: Header info length \(20000\) is large"),
    ("header_length_past_end", b"\x93NUMPY\x01\x00\xff\xff{'descr'", torchdiff.CorruptFileError,
     r"array 'header_length_past_end' has no valid \.npy header \(ValueError: EOF: reading array header"),
    ("header_code", _npy_with_header("{'descr': __import__('os').system('touch PWNED'), 'fortran_order': False, "
                                     "'shape': (1,), }"),
     torchdiff.CorruptFileError,
     r"array 'header_code' has no valid \.npy header \(ValueError: malformed node or string on line 1: "),
    ("object_dtype", _npy_with_header("{'descr': '|O', 'fortran_order': False, 'shape': (1,), }", bytes(8)),
     torchdiff.UnsafeCheckpointError,
     r"refused, array 'object_dtype' holds Python objects \(dtype=object\), which only a pickle can load"),
]


@pytest.mark.parametrize("name,data,error,message", NPY_CASES, ids=[c[0] for c in NPY_CASES])
def test_npy_lying_header(capsys, tmp_path, monkeypatch, name, data, error, message):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / f"{name}.npy"
    path.write_bytes(data)
    refused(path, error, re.escape(str(path)) + ": " + message)
    cli_error(capsys, path, path)
    assert not (tmp_path / "PWNED").exists()


def _stored_then_deflated(name: str, data: bytes) -> bytes:
    return zip_with([(name, data, zipfile.ZIP_DEFLATED)])


def _overlapping_members() -> bytes:
    """One deflated member listed twice in the central directory (a non-recursive zip bomb)."""
    data = _stored_then_deflated("a.npy", npy_bytes(np.zeros(1000)))
    directory, end = data.index(b"PK\x01\x02"), data.index(b"PK\x05\x06")
    entry = data[directory:end]
    record = bytearray(data[end:])
    struct.pack_into("<HHI", record, 8, 2, 2, 2 * len(entry))
    return data[:directory] + entry + entry.replace(b"a.npy", b"b.npy") + bytes(record)


def _declared_size_lie() -> bytes:
    """A deflated member whose directory entries claim 1 GB uncompressed."""
    data = bytearray(_stored_then_deflated("a.npy", npy_bytes(np.zeros(1000))))
    struct.pack_into("<I", data, 22, 10**9)  # the local header
    struct.pack_into("<I", data, data.index(b"PK\x01\x02") + 24, 10**9)  # the central directory
    return bytes(data)


NPZ_CASES = [
    ("overlapping_members", _overlapping_members(), torchdiff.CorruptFileError,
     r"zip members 'a\.npy' and 'b\.npy' overlap \(a damaged archive, or a zip bomb\)$"),
    ("declared_size_lie", _declared_size_lie(), torchdiff.CorruptFileError,
     r"zip member 'a\.npy' declares 1000000000 bytes from \d+ compressed bytes, more than deflate can produce "
     r"\(a damaged archive, or a zip bomb\)$"),
    ("member_shape_lies", zip_with([("w.npy", npy_bytes(np.zeros(4))[:-32].replace(b"(4,)", b"(9,)"),
                                     zipfile.ZIP_STORED)]),
     torchdiff.CorruptFileError,
     r"array 'w' is truncated: its header promises 72 bytes of data, the file holds 0 "),
    ("object_member", zip_with([("o.npy", _npy_with_header("{'descr': '|O', 'fortran_order': False, 'shape': (1,), }",
                                                           bytes(8)), zipfile.ZIP_STORED)]),
     torchdiff.UnsafeCheckpointError, r"refused, array 'o' holds Python objects"),
]


@pytest.mark.parametrize("name,data,error,message", NPZ_CASES, ids=[c[0] for c in NPZ_CASES])
def test_npz_lying_archive(capsys, tmp_path, name, data, error, message):
    path = tmp_path / f"{name}.npz"
    path.write_bytes(data)
    refused(path, error, re.escape(str(path)) + ": " + message)
    cli_error(capsys, path, path)


def test_npz_found_by_fuzzing(tmp_path):
    """Two archives the fuzzers turned up: a first byte missing (zipfile then computes
    negative member offsets) and a member with an empty name (zipfile's is_dir fails)."""
    seed = write_seed("npz", tmp_path / "seed").read_bytes()
    shifted = tmp_path / "shifted.npz"
    shifted.write_bytes(seed[1:])
    refused(shifted, torchdiff.CorruptFileError,
            re.escape(str(shifted)) + r": zip member 'w\.npy' has no local header where the directory points "
            r"\(re-save or re-download the file\)$")
    data = bytearray(zip_with([("w.npy", npy_bytes(np.ones(2)), zipfile.ZIP_DEFLATED),
                               ("?", b"x", zipfile.ZIP_DEFLATED)]))
    entry = data.rindex(b"PK\x01\x02")  # the second member's directory entry: drop its one-letter name
    struct.pack_into("<H", data, entry + 28, 0)
    del data[entry + 46]
    end = data.index(b"PK\x05\x06")
    struct.pack_into("<I", data, end + 12, struct.unpack_from("<I", data, end + 12)[0] - 1)
    unnamed = tmp_path / "unnamed.npz"
    unnamed.write_bytes(bytes(data))
    with torchdiff.load(unnamed) as ckpt:
        assert list(ckpt.tensors) == ["w"] and ckpt.info["numpy"]["skipped_members"] == [""]


def test_npz_bomb_that_would_not_fit_in_memory(capsys, tmp_path, monkeypatch):
    """A real bomb (zeros inflate 1000-fold) is read when it fits in memory, and refused
    with TooLargeError, before inflating, when it does not."""
    path = tmp_path / "bomb.npz"
    np.savez_compressed(path, z=np.zeros(4_000_000))  # 32 MB of zeros in ~31 kB
    assert path.stat().st_size < 64_000
    assert read_all(path) == 1
    monkeypatch.setattr(formats_base, "available_memory", lambda: 8 << 20)
    refused(path, torchdiff.TooLargeError,
            re.escape(str(path)) + r": array 'z' would decompress to 30\.5 MiB, more than the 8\.0 MiB of memory "
            r"available \(a zip bomb, or a machine too small for it\)$")
    err = cli_error(capsys, "inspect", path)
    assert "would decompress to 30.5 MiB" in err


def test_zip_path_traversal_names_write_nothing(capsys, tmp_path, monkeypatch):
    """Member names are tensor names; nothing is ever extracted, so '../' goes nowhere."""
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    npz = work / "trav.npz"
    npz.write_bytes(zip_with([("../../escaped.npy", npy_bytes(np.ones(3)), zipfile.ZIP_STORED),
                              ("/abs/olute.npy", npy_bytes(np.ones(3)), zipfile.ZIP_DEFLATED)]))
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    assert main(["inspect", str(npz), "-o", "json"]) == 0
    assert sorted(i["path"] for i in json.loads(capsys.readouterr().out)) == ["../../escaped", "/abs/olute"]
    pt = work / "trav.pt"
    torch.save({"w": torch.ones(2)}, pt)
    with zipfile.ZipFile(pt, "a") as archive:
        archive.writestr("../../escaped.pkl", b"x")
    refused(pt, torchdiff.CorruptFileError,
            re.escape(str(pt)) + r": not a readable PyTorch checkpoint \(RuntimeError: .*file in archive is not in a "
            r"subdirectory trav/: \.\./\.\./escaped\.pkl\)$")
    assert set(str(p) for p in tmp_path.rglob("*")) == set(before) | {str(pt)}
    assert not list(tmp_path.rglob("escaped*")) and not Path("/abs/olute.npy").exists()


# ---- sharded indexes ------------------------------------------------------------------------------


@pytest.mark.parametrize("shard,message", [
    ("../outside.safetensors", r"tensor 'w' maps to shard '\.\./outside\.safetensors', outside the index's directory "
                               r"\(shards must sit beside the index; fix the index\)$"),
    ("/etc/passwd", r"tensor 'w' maps to shard '/etc/passwd', outside the index's directory"),
    ("new\nline.safetensors", r"tensor 'w' \(and 0 more\) maps to shard 'new\\nline\.safetensors', which does not "
                              r"exist \('.*/new\\nline\.safetensors'\) "
                              r"\(download the missing shard, or fix the index\)$"),
    ("other.index.json", r"tensor 'w' maps to 'other\.index\.json', another index, not a shard \(fix the index\)$"),
])
def test_sharded_index_pointing_elsewhere(capsys, tmp_path, shard, message):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": shard}}))
    refused(index, torchdiff.CorruptFileError, re.escape(str(index)) + ": " + message)
    cli_error(capsys, index, index)


# ---- PyTorch zips and pickles --------------------------------------------------------------------


def _recompressed(src: Path, members=None, padding: dict[str, int] | None = None) -> bytes:
    """The torch zip ``src`` with ``members`` (default all) deflated; ``padding`` appends bytes to a member."""
    out = io.BytesIO()
    with zipfile.ZipFile(src) as archive, zipfile.ZipFile(out, "w") as dst:
        for info in archive.infolist():
            data = archive.read(info.filename) + b"\x00" * (padding or {}).get(info.filename.split("/", 1)[1], 0)
            deflate = members is None or info.filename.split("/", 1)[1] in members
            dst.writestr(info.filename, data, zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED)
    return out.getvalue()


def test_torch_zip_bomb_is_refused_before_inflating(tmp_path):
    src = tmp_path / "bomb.pt"
    torch.save({"w": torch.zeros(4_000_000)}, src)  # 16 MB of zeros
    bomb = tmp_path / "bombed.pt"
    bomb.write_bytes(_recompressed(src))
    assert bomb.stat().st_size < 100_000
    refused(bomb, torchdiff.CorruptFileError,
            re.escape(str(bomb)) + r": not a readable PyTorch checkpoint \(member 'bomb/data/0' would inflate to "
            r"16000000 bytes, more than the whole \d+-byte file; torch\.save never compresses: a zip bomb\?\)$")


def test_torch_pickle_bomb_is_refused_before_inflating(tmp_path):
    """data.pkl deflated with 8 MB of padding: torch's reader would allocate all of it."""
    src = tmp_path / "pkl.pt"
    torch.save({"w": torch.ones(3)}, src)
    bomb = tmp_path / "pklbomb.pt"
    bomb.write_bytes(_recompressed(src, members={"data.pkl"}, padding={"data.pkl": 8_000_000}))
    refused(bomb, torchdiff.CorruptFileError,
            r"member 'pkl/data\.pkl' would inflate to \d+ bytes, more than the whole \d+-byte file")


def test_torch_compressed_tensor_data_is_refused_with_the_fix(tmp_path):
    src = tmp_path / "noise.pt"
    torch.save({"w": torch.randn(1000)}, src)  # incompressible: deflated it stays ~4 kB
    path = tmp_path / "deflated.pt"
    path.write_bytes(_recompressed(src))
    refused(path, torchdiff.CorruptFileError,
            re.escape(str(path)) + r": not a readable PyTorch checkpoint \(tensor data 'noise/data/0' is compressed; "
            r"torch\.save stores it uncompressed, which torchdiff maps: re-save the file with torch\.save\)$")
    # a deflated data.pkl alone (small, no bomb) still reads
    ok = tmp_path / "pkl_deflated.pt"
    ok.write_bytes(_recompressed(src, members={"data.pkl"}))
    assert read_all(ok) == 1


def _torch_zip_with_pickle(tmp_path: Path, edit) -> Path:
    """A torch zip whose data.pkl bytes went through ``edit``."""
    src = tmp_path / "src.pt"
    torch.save({"w": torch.arange(1000.0)}, src)
    out = tmp_path / "edited.pt"
    with zipfile.ZipFile(src) as archive, zipfile.ZipFile(out, "w") as dst:
        for info in archive.infolist():
            data = archive.read(info.filename)
            dst.writestr(info.filename, edit(data) if info.filename.endswith("data.pkl") else data)
    return out


def _int(n: int) -> bytes:
    return b"\x8a\x08" + struct.pack("<q", n)  # LONG1, 8 bytes


TORCH_PICKLE_LIES = [
    ("shape_beyond_storage", lambda p: p.replace(b"K\x00M\xe8\x03\x85", b"K\x00" + _int(2**51) + b"\x85"),
     r"not a readable PyTorch checkpoint \(RuntimeError: Trying to resize storage that is not resizable\)$"),
    ("offset_beyond_storage", lambda p: p.replace(b"QK\x00", b"Q" + _int(999)),
     r"not a readable PyTorch checkpoint \(RuntimeError: Trying to resize storage that is not resizable\)$"),
    ("negative_stride", lambda p: p.replace(b"K\x01\x85", _int(-1) + b"\x85"),
     r"not a readable PyTorch checkpoint \(RuntimeError: Storage size calculation overflowed"),
    ("negative_shape", lambda p: p.replace(b"K\x00M\xe8\x03\x85", b"K\x00" + _int(-5) + b"\x85"),
     r"not a readable PyTorch checkpoint \(RuntimeError: "),
    ("storage_key_traversal", lambda p: p.replace(b"X\x01\x00\x00\x000", b"X\x09\x00\x00\x00../../../"),
     r"not a readable PyTorch checkpoint \(RuntimeError: PytorchStreamReader failed locating file "
     r"data/\.\./\.\./\.\./"),
]


@pytest.mark.parametrize("name,edit,message", TORCH_PICKLE_LIES, ids=[c[0] for c in TORCH_PICKLE_LIES])
def test_torch_zip_with_lying_pickle(tmp_path, name, edit, message):
    path = _torch_zip_with_pickle(tmp_path, edit)
    assert path.read_bytes() != (tmp_path / "src.pt").read_bytes()
    refused(path, torchdiff.CorruptFileError, re.escape(str(path)) + ": " + message)


@pytest.mark.parametrize("numel,message", [
    (2000, r"storage has wrong byte size"),
    (2**51, r".*DefaultCPUAllocator: can't allocate memory: you tried to allocate 9007199254740992 bytes"),
])
def test_legacy_pickle_lying_storage_size(tmp_path, numel, message):
    """torch reserves what a legacy file declares before reading it (docs/SECURITY.md:
    reserved, not touched): the load fails, and resident memory stays small."""
    src = tmp_path / "legacy.pt"
    torch.save({"w": torch.arange(1000.0)}, src, _use_new_zipfile_serialization=False)
    data = src.read_bytes()
    path = tmp_path / "lying_legacy.pt"
    path.write_bytes(data.replace(b"cpuq\x06M\xe8\x03", b"cpuq\x06" + _int(numel), 1))
    refused(path, torchdiff.CorruptFileError,
            re.escape(str(path)) + r": not a readable PyTorch checkpoint \(RuntimeError: " + message)


class Evil:
    """Unpickling this runs a shell command that creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_unsafe_pickle_runs_only_with_the_flag_and_warns(capsys, tmp_path, legacy):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "payload": Evil(marker)}, evil, _use_new_zipfile_serialization=not legacy)
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(2)}, good)
    # without the flag: refused by every command, and the payload never runs
    with pytest.raises(torchdiff.UnsafeCheckpointError,
                       match=re.escape(str(evil)) + r": refused, the pickle would run code to load \(.*system.*\); "
                       r"torchdiff loads weights only \(--unsafe-pickle overrides, for files you trust\)$"):
        read_all(evil)
    for argv in ((good, evil), (evil, good), ("inspect", evil), ("series", good, evil, good), ("-q", good, evil)):
        err = cli_error(capsys, *argv)
        assert "refused, the pickle would run code" in err
    assert not marker.exists()
    # with the flag: the warning comes first on stderr, then the code runs (the payload is live)
    assert main(["--unsafe-pickle", str(good), str(evil), "-o", "json"]) == 0
    out, err = capsys.readouterr()
    assert err == ("torchdiff: warning: --unsafe-pickle loads pickles with weights_only=False; "
                   "a malicious file can run code\n")
    assert marker.exists()
    assert [i["path"] for i in json.loads(out)] == ["payload"]  # os.system's return value, as metadata


def test_unsafe_pickle_flag_appears_in_help(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    text = " ".join(out.split())  # the help wraps to the terminal
    assert "--unsafe-pickle" in out and "RUNS CODE from the file; only for files you trust" in text


# ---- GGUF: absurd counts ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_seed(tmp_path_factory) -> bytes:
    require("gguf")
    return write_seed("gguf", tmp_path_factory.mktemp("gguf")).read_bytes()


def _tensor_info(data: bytes, name: bytes) -> int:
    """Offset of the n_dims field of tensor ``name``'s info."""
    return data.index(name) + len(name)


GGUF_CASES = [
    ("tensor_count_2_60", lambda d: d[:8] + struct.pack("<Q", 2**60) + d[16:],
     r"not a readable GGUF file \(the tensor name at byte \d+ runs past the end of the file\) \(the file may be "
     r"truncated"),
    ("kv_count_2_60", lambda d: d[:16] + struct.pack("<Q", 2**60) + d[24:],
     r"not a readable GGUF file \(the key at byte \d+ runs past the end of the file\) \(the file may be truncated or "
     r"damaged; re-download it\)$"),
    ("array_length_2_40", lambda d: d.replace(b"\x08\x00\x00\x00\x02\x00\x00\x00\x00\x00\x00\x00",
                                              b"\x08\x00\x00\x00" + struct.pack("<Q", 2**40), 1),
     r"not a readable GGUF file \(the array 'tokenizer\.ggml\.tokens' \(1099511627776 strings\) at byte \d+ runs past "
     r"the end of the file\) \(the file may be truncated or damaged; re-download it\)$"),
    ("string_length_2_60", lambda d: d.replace(b"\x01\x00\x00\x00\x00\x00\x00\x00a",
                                               struct.pack("<Q", 2**60) + b"a", 1),
     r"not a readable GGUF file \(the value of 'tokenizer\.ggml\.tokens' at byte \d+ runs past the end of "
     r"the file\)"),
    ("n_dims_2_31", lambda d: d[:_tensor_info(d, b"blk.0.w")] + struct.pack("<I", 2**31)
     + d[_tensor_info(d, b"blk.0.w") + 4:],
     r"not a readable GGUF file \(tensor 'blk\.0\.w' has 2147483648 dimensions \(GGML allows at most 4\)\)"),
    ("dimension_2_62", lambda d: d[:_tensor_info(d, b"blk.0.w") + 4] + struct.pack("<Q", 2**62)
     + d[_tensor_info(d, b"blk.0.w") + 12:],
     r"not a readable GGUF file \(the data of tensor 'blk\.0\.w' at byte \d+ runs past the end of the file\)"),
    ("unknown_type", lambda d: d[:_tensor_info(d, b"blk.0.w") + 12] + struct.pack("<I", 999)
     + d[_tensor_info(d, b"blk.0.w") + 16:],
     r"not a readable GGUF file \(tensor 'blk\.0\.w' has unknown GGML type 999\)"),
    ("offset_2_62", lambda d: d[:_tensor_info(d, b"blk.0.w") + 16] + struct.pack("<Q", 2**62)
     + d[_tensor_info(d, b"blk.0.w") + 24:],
     r"not a readable GGUF file \(the data of tensor 'blk\.0\.w' at byte \d+ runs past the end of the file\)"),
]


@pytest.mark.parametrize("name,edit,message", GGUF_CASES, ids=[c[0] for c in GGUF_CASES])
def test_gguf_absurd_counts(capsys, tmp_path, gguf_seed, name, edit, message):
    data = edit(gguf_seed)
    assert data != gguf_seed and len(data) >= len(gguf_seed)
    path = tmp_path / f"{name}.gguf"
    path.write_bytes(data)
    refused(path, torchdiff.CorruptFileError, re.escape(str(path)) + ": " + message)
    cli_error(capsys, "inspect", path)


# ---- truncation at every offset -----------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(SEEDS))
def test_every_truncation_is_a_torchdiff_error(tmp_path, kind):
    """Every prefix of a small valid file either reads the same values (trailing padding)
    or raises a TorchDiffError naming the file; never another exception, never a crash.

    MAT v5 files have no directory: a cut between two variables is a valid file with
    fewer variables (docs/SECURITY.md), so there the tensors read are a subset."""
    require(kind)
    seed = write_seed(kind, tmp_path / "seed")
    fmt = SEEDS[kind][1]
    with torchdiff.load(seed, format=fmt) as ckpt:
        full = {n: h.materialize().clone() for n, h in ckpt.tensors.items()}
    data = seed.read_bytes()
    cut = seed if kind == "sharded" else seed.parent / ("cut_" + seed.name)  # sharded: cut the index
    loaded = []
    with Bounded(seconds=30):
        for offset in range(len(data)):
            cut.write_bytes(data[:offset])
            try:
                with torchdiff.load(cut, format=fmt) as ckpt:
                    got = {n: h.materialize() for n, h in ckpt.tensors.items()}
                if kind.startswith("mat"):
                    assert got.keys() <= full.keys()
                else:
                    assert got.keys() == full.keys()
                for n, t in got.items():
                    assert torch.equal(t, full[n]), (offset, n)
                loaded.append(offset)
            except torchdiff.TorchDiffError as e:
                assert str(cut) in str(e) and "\n" not in str(e), (offset, str(e))
    if not kind.startswith("mat"):
        assert all(offset >= len(data) - 64 for offset in loaded), loaded  # only padding may go
