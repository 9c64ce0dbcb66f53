"""Bounded fuzzing of every reader: mutations of a small valid file (bit flips, bytes
set, inserted, deleted, lying integers, truncation, duplicated stretches) and random
bytes behind each format's magic. Whatever the bytes, the outcome is a checkpoint
or one TorchDiffError naming the file: never another exception, never a crash.

Each reader gets 100 mutated files and 33 random ones here (a few seconds in all); scripts/fuzz_readers.py runs
the same readers for as long as asked (atheris/libFuzzer when installed), and
docs/SECURITY.md records those runs.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torchdiff

from hostile_files import (
    INTERESTING, OP_KINDS, SEEDS, apply_ops, only_torchdiff_errors, read_all, require, write_seed,
)

EXAMPLES = 100

ops_strategy = st.lists(
    st.tuples(
        st.sampled_from(OP_KINDS),
        st.floats(0, 1, allow_nan=False, exclude_max=True),
        st.one_of(st.integers(0, 1 << 16), st.sampled_from(INTERESTING), st.binary(min_size=1, max_size=32)),
    ),
    min_size=1,
    max_size=6,
)

# The magic each reader looks for first; random bytes behind it reach the parser.
MAGIC = {
    "safetensors": b"\x40\x00\x00\x00\x00\x00\x00\x00{",
    "torch_zip": b"PK\x03\x04",
    "torch_legacy": b"\x80\x02",
    "npy": b"\x93NUMPY\x01\x00",
    "npz": b"PK\x03\x04",
    "npz_compressed": b"PK\x03\x04",
    "gguf": b"GGUF\x03\x00\x00\x00",
    "mat": b"MATLAB 5.0 MAT-file".ljust(116, b" ") + bytes(8) + b"\x00\x01IM",
    "mat_compressed": b"MATLAB 5.0 MAT-file".ljust(116, b" ") + bytes(8) + b"\x00\x01IM\x0f\x00\x00\x00",
    "sharded": b'{"weight_map": {"a": "',
}


_SEEDS: dict[str, bytes] = {}


def seed(kind: str, root) -> bytes:
    """The seed file's bytes (written once per session)."""
    if kind not in _SEEDS:
        _SEEDS[kind] = write_seed(kind, root / "seeds" / kind).read_bytes()
    return _SEEDS[kind]


@pytest.fixture
def target(tmp_path):
    """Where each example is written: the sharded index beside real shards."""
    root = tmp_path / "fuzz"
    write_seed("sharded", root)
    return root


def check(path, fmt: str, reference=None) -> None:
    """Read every tensor; if that works, run it through the engine against ``reference`` too."""
    only_torchdiff_errors(lambda: read_all(path, fmt), path)
    if reference is not None:
        only_torchdiff_errors(lambda: torchdiff.compare(path, reference, device="cpu", format=fmt), path)


@pytest.mark.parametrize("kind", sorted(SEEDS))
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=ops_strategy)
def test_mutated_file(target, kind, ops):
    require(kind)
    data, fmt = seed(kind, target), SEEDS[kind][1]
    path = target / SEEDS[kind][0]
    path.write_bytes(apply_ops(data, ops))
    reference = target / ("reference_" + SEEDS[kind][0])
    if not reference.exists() and kind != "sharded":
        reference.write_bytes(data)
    check(path, fmt, reference if kind != "sharded" else None)


@pytest.mark.parametrize("kind", sorted(SEEDS))
@settings(max_examples=EXAMPLES // 3, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=st.binary(max_size=400))
def test_random_bytes_behind_the_magic(target, kind, body):
    require(kind)
    path = target / SEEDS[kind][0]
    path.write_bytes(MAGIC[kind] + body)
    check(path, SEEDS[kind][1])


def test_long_fuzzer_runs_and_knows_every_reader(tmp_path):
    """scripts/fuzz_readers.py (its fallback loop, which needs no atheris) runs and reports."""
    script = Path(__file__).resolve().parent.parent / "scripts" / "fuzz_readers.py"
    sys.path.insert(0, str(script.parent))
    try:
        import fuzz_readers
    finally:
        sys.path.remove(str(script.parent))
    assert fuzz_readers.READERS == list(SEEDS)
    argv = [sys.executable, str(script), "npy", "--seconds", "3", "--fallback", "--workdir", str(tmp_path)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"^npy: random-edits, \d+ s, [1-9]\d* executions, 0 finding\(s\)$", proc.stdout, re.M), proc.stdout
