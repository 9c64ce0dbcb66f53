"""torch.distributed.checkpoint (DCP) directories (torchdiff/formats/dcp.py).

Every input is written by the real writer: ``torch.distributed.checkpoint.save`` in
this process (no process group), and once under a 2-rank gloo torchrun with FSDP2
(``fully_shard``) and Adam (tests/dcp_fsdp_worker.py). Hostile inputs are real DCP
directories whose ``.metadata`` was edited (loaded and re-pickled by the test, which
trusts its own files) or whose data files were cut or removed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import torchdiff
from torchdiff import formats
from torchdiff.cli import main
from torchdiff.formats import dcp as dcp_reader
from torchdiff.formats.base import bytes_text
from torchdiff.pairing import dropped_prefix

from helpers import one_thread  # noqa: F401 - autouse fixture
from hostile_files import INTERESTING, OP_KINDS, apply_ops, only_torchdiff_errors, read_all

dist_cp = pytest.importorskip("torch.distributed.checkpoint")

HERE = Path(__file__).resolve().parent


def dcp_save(state: dict, path: Path) -> Path:
    """torch.distributed.checkpoint.save in this process (no process group)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is ... uninitialized, assuming ... a single process"
        dist_cp.save(state, checkpoint_id=str(path))
    return path


def metadata_of(path: Path):
    with open(path / ".metadata", "rb") as f:
        return pickle.load(f)  # the test's own file


def write_metadata(path: Path, md) -> None:
    with open(path / ".metadata", "wb") as f:
        pickle.dump(md, f)


def model_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(50, 16, generator=g),
        "layers.0.attn.weight": torch.randn(16, 16, generator=g).to(torch.bfloat16),
        "layers.0.attn.bias": torch.randn(16, generator=g).to(torch.float16),
        "layers.0.norm.weight": 1 + torch.randn(16, generator=g) / 10,
        "layers.0.mask": torch.rand(4, 4, generator=g) > 0.5,
        "head.weight": torch.randn(7, 16, generator=g, dtype=torch.float64),
        "counts": torch.randint(-100, 100, (9,), generator=g),
        "scale": torch.tensor(1.5 + seed),
        "empty": torch.zeros(0, 3),
    }


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def cli_error(capsys, *argv) -> str:
    code, out, err = cli(capsys, *argv)
    assert code == 2, (code, out, err)
    assert out == "" and err.count("\n") == 1 and err.startswith("torchdiff: error: "), err
    assert "Traceback" not in err, err
    return err


# ---- reading what torch wrote ------------------------------------------------------------------


def test_reads_every_tensor_as_written(tmp_path):
    state = model_state(0)
    path = dcp_save({"model": state, "step": 3, "lr": 0.125, "names": ["a", "b"], "sched": {"gamma": 0.5}},
                    tmp_path / "ck")
    assert formats.detect_format(str(path)) == "dcp"
    with torchdiff.load(path) as ckpt:
        assert ckpt.format == "dcp"
        assert list(ckpt.tensors) == [f"model.{k}" for k in state]
        for name, t in state.items():
            h = ckpt.tensors[f"model.{name}"]
            assert h.shape == tuple(t.shape) and h.dtype == t.dtype and h.numel == t.numel()
            assert h.nbytes == t.numel() * t.element_size()
            got = h.materialize()
            assert got.dtype == t.dtype and torch.equal(got, t), name
        assert ckpt.metadata == {"step": 3, "lr": 0.125, "names": ["a", "b"], "sched.gamma": 0.5}
        assert ckpt.info["dcp"]["data_files"] == 1 and ckpt.info["dcp"]["split_tensors"] == 0
        # One chunk a tensor: a view of the private mapping of the data file, like safetensors.
        assert all(h.mapped for h in ckpt.tensors.values())
        assert ckpt.tensors["model.embed.weight"].source.endswith("__0_0.distcp")


def test_the_metadata_file_itself_and_format_flag(tmp_path):
    path = dcp_save({"w": torch.arange(6.0)}, tmp_path / "ck")
    for where in (path / ".metadata", path):
        with torchdiff.load(where, format="dcp") as ckpt:
            assert torch.equal(ckpt["w"], torch.arange(6.0))
    with torchdiff.load(path / ".metadata") as ckpt:
        assert ckpt.format == "dcp"


def test_a_distcp_file_alone_names_its_directory(capsys, tmp_path):
    path = dcp_save({"w": torch.arange(6.0)}, tmp_path / "ck")
    err = cli_error(capsys, path / "__0_0.distcp", path / "__0_0.distcp")
    assert "one piece of a DCP checkpoint; pass the directory" in err and str(path) in err
    (path / ".metadata").unlink()
    err = cli_error(capsys, path / "__0_0.distcp", path / "__0_0.distcp")
    assert "its directory has no .metadata (the checkpoint is incomplete" in err
    err = cli_error(capsys, path, path)  # the directory alone: no checkpoint it can read
    assert "__0_0.distcp: a .distcp file is one piece of a DCP checkpoint, and its directory has no" in err


def test_write_into_a_mapped_tensor_never_reaches_the_file(tmp_path):
    path = dcp_save({"w": torch.arange(64.0)}, tmp_path / "ck")
    before = (path / "__0_0.distcp").read_bytes()
    with torchdiff.load(path) as ckpt:
        ckpt["w"][0] = 99
    assert (path / "__0_0.distcp").read_bytes() == before
    with torchdiff.load(path) as ckpt:
        assert ckpt["w"][0] == 0


def test_bytes_entries_decode_or_are_listed_as_opaque(tmp_path):
    path = dcp_save({"w": torch.ones(2), "epoch": 4, "rng": torch.get_rng_state(),
                     "loader": {"seen": 10, "order": [3, 1, 2]}, "odd": _Custom(5)}, tmp_path / "ck")
    with torchdiff.load(path) as ckpt:
        assert ckpt.metadata["epoch"] == 4
        assert ckpt.metadata["loader.seen"] == 10 and ckpt.metadata["loader.order"] == [3, 1, 2]
        assert ckpt.metadata["odd"].startswith("<opaque bytes: ") and ckpt.info["dcp"]["opaque_bytes"] == ["odd"]
        assert ckpt.tensors["rng"].dtype == torch.uint8  # DCP stores the RNG state as a tensor


class _Custom:
    """An object torch.load(weights_only=True) refuses: DCP stores it as bytes."""

    def __init__(self, value):
        self.value = value


def test_bytes_values_and_opaque_entries_compare_by_content(capsys, tmp_path):
    """torchtitan saves its dataloader state as pickled bytes (``{"dp_rank_0":
    pickle.dumps(state)}``), and an object weights-only loading refuses is opaque: two
    such values of one length but other bytes are a difference. (They read ``<bytes>``
    and ``<opaque bytes: N>`` on both sides, so a moved dataloader compared equal.)"""
    def save(name, pos, odd):
        return dcp_save({"w": torch.ones(2), "dataloader": {"dp_rank_0": pickle.dumps({"pos": pos})},
                         "blobs": [b"ab", bytearray(b"cd")], "odd": _Custom(odd)}, tmp_path / name)

    def sha(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()[:16]

    a, same, b = save("a", 1, 5), save("same", 1, 5), save("b", 2, 6)
    blob = pickle.dumps({"pos": 1})
    with torchdiff.load(a) as ckpt:
        assert ckpt.metadata["dataloader.dp_rank_0"] == f"<bytes: {len(blob)} sha256:{sha(blob)}>"
        assert ckpt.metadata["blobs"] == [f"<bytes: 2 sha256:{sha(b'ab')}>", f"<bytearray: 2 sha256:{sha(b'cd')}>"]
        assert re.fullmatch(r"<opaque bytes: \d+ sha256:[0-9a-f]{16}>", ckpt.metadata["odd"])
        assert ckpt.info["dcp"]["opaque_bytes"] == ["odd"]
    assert not torchdiff.differs(a, same)  # the same objects in another directory: equal
    code, out, err = cli(capsys, a, b, "-o", "json")
    changed = {i["path"]: (i["old"], i["new"]) for i in json.loads(out) if i["type"] == "metadata_changed"}
    assert set(changed) == {"dataloader.dp_rank_0", "odd"}, changed
    old, new = changed["odd"]
    assert old.split(" sha256:")[0] == new.split(" sha256:")[0] and old != new  # one length, other bytes

    dcp_reader.MAX_DECODED_BYTES = 0  # every bytes entry too large to decode: listed, by content still
    try:
        assert not torchdiff.differs(a, same)
        with torchdiff.load(a) as ckpt, torchdiff.load(b) as other:
            assert ckpt.info["dcp"]["opaque_bytes"] == ["dataloader.dp_rank_0", "blobs", "odd"]
            assert {k for k, v in ckpt.metadata.items() if v != other.metadata[k]} == {"dataloader.dp_rank_0", "odd"}
    finally:
        dcp_reader.MAX_DECODED_BYTES = 64 << 20


# ---- the same figures as safetensors ------------------------------------------------------------


def figures(report) -> dict[str, tuple]:
    """Every per-tensor figure, NaN (an empty tensor's mean) compared as equal to NaN."""
    def same_nan(row):
        return None if row is None else {k: "nan" if isinstance(v, float) and v != v else v for k, v in row.items()}

    out = {}
    for d in report:
        m = d.metrics
        out[d.name] = (d.status, same_nan(d.old and d.old.to_dict()), same_nan(d.new and d.new.to_dict()),
                       same_nan(m and m.to_dict()))
    return out


def test_figures_equal_safetensors_of_the_same_weights(tmp_path):
    a, b = model_state(0), model_state(1)
    b["layers.0.norm.weight"] = a["layers.0.norm.weight"].clone()  # one unchanged tensor
    dcp_save(a, tmp_path / "a")
    dcp_save(b, tmp_path / "b")
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    got = figures(torchdiff.compare(tmp_path / "a", tmp_path / "b"))
    want = figures(torchdiff.compare(tmp_path / "a.safetensors", tmp_path / "b.safetensors"))
    assert got == want
    assert got["layers.0.norm.weight"][0] == "unchanged" and got["embed.weight"][0] == "changed"
    # and against an independent float64 reference (the engine sums float32 rows: docs/METRICS.md)
    old, new = a["embed.weight"].double(), b["embed.weight"].double()
    m = got["embed.weight"][3]
    assert m["rel_l2"] == pytest.approx(float((new - old).norm() / old.norm()), rel=1e-6)
    assert m["cosine"] == pytest.approx(float((old * new).sum() / old.norm() / new.norm()), rel=1e-6)


@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=st.lists(st.integers(0, 70), min_size=0, max_size=3),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int32]),
       pad=st.integers(0, 9))
def test_figures_equal_safetensors_any_shape_and_alignment(tmp_path_factory, shape, dtype, pad):
    """Any shape and dtype; ``pad`` bytes of a bytes entry before the tensor shift its data
    to any alignment in the .distcp file."""
    tmp = tmp_path_factory.mktemp("h")
    g = torch.Generator().manual_seed(len(shape) * 100 + pad)
    x = (torch.randn(shape, generator=g) * 100).to(dtype)
    y = (torch.randn(shape, generator=g) * 100).to(dtype)
    for side, t in (("a", x), ("b", y)):
        dcp_save({"pad": "p" * pad, "t": t}, tmp / side)
        save_file({"t": t}, str(tmp / f"{side}.safetensors"))
    with torchdiff.load(tmp / "a") as ckpt:
        assert torch.equal(ckpt["t"], x)
    assert figures(torchdiff.compare(tmp / "a", tmp / "b")) == figures(
        torchdiff.compare(tmp / "a.safetensors", tmp / "b.safetensors"))


def split_into_chunks(path: Path, name: str, parts: list[str], shape: tuple[int, ...], offsets: list[tuple]):
    """Rewrite the metadata so that tensors ``parts`` become chunks (at ``offsets``) of one
    tensor ``name`` of ``shape``: the layout of a sharded save, from single-process files."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorStorageMetadata

    md = metadata_of(path)
    props = md.state_dict_metadata[parts[0]].properties
    chunks = []
    for part, offset in zip(parts, offsets):
        sizes = md.state_dict_metadata.pop(part).size
        chunks.append(ChunkStorageMetadata(offsets=torch.Size(offset), sizes=sizes))
        old_index = MetadataIndex(part, [0] * len(sizes))
        md.storage_data[MetadataIndex(name, offset)] = md.storage_data.pop(old_index)
    md.state_dict_metadata[name] = TensorStorageMetadata(properties=props, size=torch.Size(shape), chunks=chunks)
    write_metadata(path, md)


def test_a_tensor_in_chunks_is_assembled(tmp_path):
    w = torch.randn(6, 5)
    path = dcp_save({"p1": w[4:].clone(), "p0": w[:4, :2].clone(), "p2": w[:4, 2:].clone()}, tmp_path / "ck")
    split_into_chunks(path, "w", ["p0", "p1", "p2"], (6, 5), [(0, 0), (4, 0), (0, 2)])
    with torchdiff.load(path) as ckpt:
        h = ckpt.tensors["w"]
        assert not h.mapped and h.shape == (6, 5)
        assert torch.equal(h.materialize(), w)
        assert ckpt.info["dcp"]["split_tensors"] == 1


def test_the_command_line_compares_two_directories(capsys, tmp_path):
    dcp_save({"model": {"w": torch.ones(4)}, "step": 1}, tmp_path / "a")
    dcp_save({"model": {"w": torch.tensor([1.0, 1, 1, 2])}, "step": 2}, tmp_path / "b")
    code, out, err = cli(capsys, tmp_path / "a", tmp_path / "b")
    assert code == 0 and err == "", err
    assert "~ model.w: rel_l2=0.5" in out and "~ step: 1->2" in out
    code, out, err = cli(capsys, tmp_path / "a", tmp_path / "b", "--format", "dcp", "-o", "json")
    assert code == 0 and json.loads(out)[0]["path"] == "model.w"


# ---- DCP against safetensors: the model. prefix --------------------------------------------------


def test_dcp_against_safetensors_drops_the_model_prefix_and_says_so(capsys, tmp_path):
    a, b = model_state(0), model_state(1)
    dcp_save({"model": a, "optim": {"state": {"embed.weight": {"exp_avg": torch.ones(50, 16)}}}}, tmp_path / "a")
    save_file(b, str(tmp_path / "b.safetensors"))
    report = torchdiff.compare(tmp_path / "a", tmp_path / "b.safetensors")
    by_name = {d.name: d for d in report}
    assert by_name["embed.weight"].status == "changed" and by_name["optim.state.embed.weight.exp_avg"].status == "removed"
    assert sum(d.status == "changed" for d in report) == len(a) - 1  # all but the empty tensor
    pairing = report.analysis("pairing")
    assert pairing.headline == {"dropped_prefix": "model.", "side": "old"}
    assert pairing.notes == (f"paired names with the prefix 'model.' dropped from the old side ({tmp_path / 'a'})",)
    code, out, err = cli(capsys, tmp_path / "b.safetensors", tmp_path / "a")
    assert "pairing: dropped_prefix=model., side=new" in out
    assert "  note: paired names with the prefix 'model.' dropped from the new side" in out
    code, out, err = cli(capsys, tmp_path / "b.safetensors", tmp_path / "a", "-o", "json")
    item = next(i for i in json.loads(out) if i["type"] == "pairing")
    assert item == {"type": "pairing", "path": "", "dropped_prefix": "model.", "side": "new", "old_prefix": "",
                    "new_prefix": "model.",
                    "notes": [f"paired names with the prefix 'model.' dropped from the new side ({tmp_path / 'a'})"]}


@pytest.mark.parametrize("old,new,want", [
    (["model.a", "model.b", "optim.state.a.exp_avg"], ["a", "b"], ("model.", "")),
    (["a", "b"], ["state_dict.a", "state_dict.b"], ("", "state_dict.")),
    (["a", "b"], ["module.a", "module.b"], ("", "")),  # a wrapper segment: pairing.dropped_wrappers
    (["model.a"], ["model.a"], ("", "")),  # already paired
    (["model.a", "a"], ["a"], ("", "")),  # dropping would collide: nothing gained
    (["model.a"], ["model.b", "a"], ("model.", "")),  # pairs more, though the other side has a model.b
    # nanoGPT's model._orig_mod. against an HF model whose own names start with model.
    (["model._orig_mod.model.l.w", "model._orig_mod.lm_head.w"], ["model.l.w", "lm_head.w"], ("model.", "")),
    (["model.module.a.w", "model.module.b.w"], ["a.w", "b.w"], ("model.", "")),  # DDP under "model"
    (["x", "y"], ["a", "b"], ("", "")),
    ([], [], ("", "")),
])
def test_dropped_prefix(old, new, want):
    assert dropped_prefix(old, new) == want


# ---- training state: FSDP2 under torchrun ---------------------------------------------------------


needs_gloo = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """Two Adam steps of an FSDP2 transformer-like model (uneven shards, a bf16 projection,
    a tied head; tests/dcp_fsdp_worker.py) on 2 gloo ranks, each saved as DCP with
    torchtitan's extra state (every rank its shards) and, gathered by rank 0, as
    safetensors under the same names."""
    out = tmp_path_factory.mktemp("fsdp")
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()), str(HERE / "dcp_fsdp_worker.py"), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    assert "sharded with fully_shard" in proc.stdout, proc.stdout  # FSDP2 itself ran on CPU/gloo
    return out


FSDP_PARAMS = ["embed.weight", "block.norm.weight", "block.norm.bias", "block.q.weight", "block.q.bias",
               "block.k.weight", "block.k.bias", "block.v.weight", "block.v.bias", "block.o.weight", "block.o.bias",
               "block.up.weight", "block.up.bias", "block.down.weight", "block.down.bias", "norm_out.weight",
               "norm_out.bias"]


@needs_gloo
def test_fsdp2_shards_read_and_match_safetensors(fsdp_run):
    with torchdiff.load(fsdp_run / "dcp_1") as ckpt, torchdiff.load(fsdp_run / "full_1.safetensors") as full:
        assert ckpt.info["dcp"]["data_files"] == 2
        assert ckpt.info["dcp"]["split_tensors"] >= 40  # weights and moments, split across the 2 ranks
        assert set(ckpt.tensors) - set(full.tensors) == {"rng"}
        for name in full.tensors:
            assert torch.equal(ckpt[name], full[name]), name
        # 37 embedding rows on 2 ranks: chunks of 19 and 18 rows; the tied head stored twice
        chunks = metadata_of(fsdp_run / "dcp_1").state_dict_metadata["model.embed.weight"].chunks
        assert [(list(c.offsets), list(c.sizes)) for c in chunks] == [([0, 0], [19, 12]), ([19, 0], [18, 12])]
        assert torch.equal(ckpt["model.head.weight"], ckpt["model.embed.weight"])
        assert ckpt.tensors["model.block.up.weight"].dtype == torch.bfloat16
        assert ckpt.tensors["optim.state.block.up.weight.exp_avg"].dtype == torch.bfloat16
        assert ckpt.metadata["optim.param_groups.0.lr"] == 0.01
        assert ckpt.metadata["optim.param_groups.0.params"] == FSDP_PARAMS
        # torchtitan's extra state: values, a tensor, and every rank's dataloader bytes
        assert ckpt.metadata["train_state.step"] == 1 and ckpt.metadata["lr_scheduler._last_lr"] == [0.01]
        assert ckpt.tensors["rng"].dtype == torch.uint8
        for rank in (0, 1):
            blob = pickle.dumps({"sample": 4 + rank, "epoch": 0})
            assert ckpt.metadata[f"dataloader.dp_rank_{rank}"] == bytes_text(blob)
    got = figures(torchdiff.compare(fsdp_run / "dcp_1", fsdp_run / "dcp_2"))
    want = figures(torchdiff.compare(fsdp_run / "full_1.safetensors", fsdp_run / "full_2.safetensors"))
    assert got.pop("rng")[0] == "unchanged"
    assert got == want


@needs_gloo
def test_fsdp2_figures_against_float64(fsdp_run, capsys):
    """Every figure of ``torchdiff dcp_1 dcp_2 -o json`` against float64 sums over the
    gathered tensors; ``dcp_1 model_2.safetensors`` pairs the names without ``model.``;
    and the metadata lines name the dataloader state that moved."""
    code, out, err = cli(capsys, fsdp_run / "dcp_1", fsdp_run / "dcp_2", "-o", "json")
    assert code == 0, err
    items = json.loads(out)
    with torchdiff.load(fsdp_run / "full_1.safetensors") as a, torchdiff.load(fsdp_run / "full_2.safetensors") as b:
        old = {k: a[k].double().clone() for k in a.tensors}
        new = {k: b[k].double().clone() for k in b.tensors}
    checked = 0
    for item in items:
        if item["type"] != "tensor_changed" or item["path"] not in old:
            continue
        x, y = old[item["path"]].reshape(-1), new[item["path"]].reshape(-1)
        d = y - x
        want = {("l2",): d.norm(), ("rel_l2",): d.norm() / x.norm(), ("cosine",): x @ y / (x.norm() * y.norm()),
                ("max_abs",): d.abs().max(), ("mean_abs_diff",): d.abs().mean()}
        for side, t in (("old", x), ("new", y)):
            want |= {(side, "mean"): t.mean(), (side, "std"): t.std(correction=0), (side, "min"): t.min(),
                     (side, "max"): t.max(), (side, "rms"): t.square().mean().sqrt(),
                     (side, "mean_abs"): t.abs().mean()}
        for key, value in want.items():
            got = item[key[0]] if len(key) == 1 else item[key[0]][key[1]]
            # a mean near 0 is a float32 sum's cancellation: within 1e-6 of the mean |x|
            tol = 1e-6 * float(want[(key[0], "mean_abs")]) if key[-1] == "mean" else 0.0
            assert got == pytest.approx(float(value), rel=2e-6, abs=tol), (item["path"], key)
        checked += 1
    assert checked == len(old)  # every weight, moment and step moved
    changed = {i["path"] for i in items if i["type"] == "metadata_changed"}
    assert {"dataloader.dp_rank_0", "dataloader.dp_rank_1", "train_state.step"} <= changed
    report = torchdiff.compare(fsdp_run / "dcp_1", fsdp_run / "model_2.safetensors")
    assert report.analysis("pairing").headline == {"dropped_prefix": "model.", "side": "old"}
    by_name = {d.name: d for d in report}
    assert {n for n, d in by_name.items() if d.status == "changed"} == {
        k.removeprefix("model.") for k in old if k.startswith("model.")}
    x, y = old["model.block.up.weight"].reshape(-1), new["model.block.up.weight"].reshape(-1)  # bf16
    assert by_name["block.up.weight"].metrics.rel_l2 == pytest.approx(float((y - x).norm() / x.norm()), rel=2e-6)


@needs_gloo
def test_fsdp2_gradient_analysis_from_dcp_adam_moments(fsdp_run):
    report = torchdiff.compare(fsdp_run / "dcp_1", fsdp_run / "dcp_2", analyses=["gradient_analysis"])
    result = report.analysis("gradient_analysis")
    assert result.headline["source"] == "adam_state"
    assert [row["layer"] for row in result.data["per_layer"]] == [
        "model.embed", "model.block.norm", "model.block.q", "model.block.k", "model.block.v", "model.block.o",
        "model.block.up", "model.block.down", "model.norm_out"]
    # From the gathered moments of step 2 (docs/analyses/gradient_analysis.md), in float64:
    # grad_rms = √(Σv̂/n), step_rms = lr·rms(m̂/(√v̂+ε)), m̂ = exp_avg/(1−β1^t), v̂ = exp_avg_sq/(1−β2^t),
    # lr the param group's at save time (the scheduler halved it after step 1)
    with torchdiff.load(fsdp_run / "dcp_2") as ckpt:
        lr = ckpt.metadata["optim.param_groups.0.lr"]
    assert lr == 0.005
    with torchdiff.load(fsdp_run / "full_2.safetensors") as full:
        vhat_sum, steps, n = 0.0, [], 0
        for name in full.tensors:
            if name.endswith(".exp_avg_sq"):
                t = full[name.replace("exp_avg_sq", "step")].item()
                vhat = full[name].double() / (1 - 0.999**t)
                mhat = full[name.replace("exp_avg_sq", "exp_avg")].double() / (1 - 0.9**t)
                vhat_sum += float(vhat.sum())
                steps.append((lr * mhat / (vhat.sqrt() + 1e-8)).reshape(-1))
                n += vhat.numel()
    assert result.headline["grad_rms"] == pytest.approx(math.sqrt(vhat_sum / n), rel=1e-9)
    assert result.headline["step_rms"] == pytest.approx(float(torch.cat(steps).square().mean().sqrt()), rel=1e-6)


@needs_gloo
@pytest.mark.slow
def test_fsdp2_compare_under_torchrun_equals_one_process(fsdp_run, capsys):
    """``torchrun --nproc-per-node 2 -m torchdiff dcp_1 dcp_2 --all -o json``: each rank
    reads the chunks of the tensors it owns; rank 0 prints the one-process JSON."""
    code, single, err = cli(capsys, fsdp_run / "dcp_1", fsdp_run / "dcp_2", "--all", "-o", "json")
    assert code == 0, err
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()), "-m", "torchdiff", str(fsdp_run / "dcp_1"), str(fsdp_run / "dcp_2"),
            "--all", "-o", "json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout) == json.loads(single)


# ---- Lightning and Megatron layouts ----------------------------------------------------------------


def test_lightning_fsdp_layout(tmp_path):
    """Lightning's FSDP strategy (state_dict_type="sharded") writes the model and optimizer
    state through torch.distributed.checkpoint.save into the checkpoint directory and the
    rest with torch.save into meta.pt (lightning.fabric.strategies.fsdp). That layout,
    written here with the same two calls (Lightning's FSDP needs a process group)."""
    path = dcp_save({"model": model_state(0), "optimizer_0": {"state": {}}}, tmp_path / "epoch=0-step=5.ckpt")
    torch.save({"epoch": 0, "global_step": 5, "loops": {"fit_loop": {"epoch_progress": {"total": 1}}}},
               path / "meta.pt")
    with torchdiff.load(path) as ckpt:
        assert ckpt.format == "dcp" and "model.embed.weight" in ckpt.tensors
        assert ckpt.metadata["global_step"] == 5 and ckpt.metadata["loops.fit_loop.epoch_progress.total"] == 1
        assert str(path / "meta.pt") in ckpt.files


def test_megatron_torch_dist_layout(tmp_path):
    """Megatron-core's torch_dist: DCP plus metadata.json and common.pt (whose argparse
    Namespace is read as a record: its values join the metadata, and the report says
    so). Laid out by hand here (no Megatron install)."""
    import argparse

    path = dcp_save({"decoder.layers.mlp.linear_fc1.weight": torch.randn(2, 8, 4)}, tmp_path / "iter_0000010")
    (path / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                                                    "common_backend": "torch", "common_backend_version": 1}))
    torch.save({"args": argparse.Namespace(lr=0.1), "iteration": 10}, path / "common.pt")
    with torchdiff.load(path) as ckpt:
        assert ckpt.info["megatron"]["metadata.json"]["sharded_backend"] == "torch_dist"
        assert "not_read" not in ckpt.info["megatron"]
        assert ckpt.metadata["common.args.lr"] == 0.1 and ckpt.metadata["common.iteration"] == 10
        assert ckpt.info["records"] == ["argparse.Namespace"]
        assert ckpt.tensors["decoder.layers.mlp.linear_fc1.weight"].shape == (2, 8, 4)
    md = metadata_of(path)  # what Megatron's save planner adds to the Metadata it pickles
    md.mcore_data = {"decoder.layers.mlp.linear_fc1.weight": {"nd_reformulated_orig_global_shape": (2, 32)},
                     "other": {}}
    write_metadata(path, md)
    torch.save({"iteration": 10, "checkpoint_version": 3.0}, path / "common.pt")
    with torchdiff.load(path) as ckpt:
        assert ckpt.metadata["common.iteration"] == 10
        assert ckpt.info["megatron"]["reformulated"] == {"decoder.layers.mlp.linear_fc1.weight": [2, 32]}
        assert ckpt.tensors["decoder.layers.mlp.linear_fc1.weight"].shape == (2, 8, 4)  # as stored
    torch.save({"iteration": 10, "hook": _SystemCall()}, path / "common.pt")  # os.system stays refused
    with torchdiff.load(path) as ckpt:
        assert ckpt.info["megatron"]["not_read"].startswith("common.pt: refused, the pickle would run code")
        assert "common.iteration" not in ckpt.metadata


class _SystemCall:
    def __reduce__(self):
        return (os.system, ("true",))


# ---- hostile input --------------------------------------------------------------------------------


@pytest.fixture
def ck(tmp_path) -> Path:
    return dcp_save({"model": {"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(3)}, "step": 7}, tmp_path / "ck")


class _Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("unsafe", [False, True], ids=["plain", "unsafe-pickle"])
def test_a_payload_in_the_metadata_never_runs(capsys, ck, tmp_path, unsafe):
    marker = tmp_path / "PWNED"
    md = metadata_of(ck)
    md.planner_data = _Payload(marker)
    write_metadata(ck, md)
    with pytest.raises(torchdiff.UnsafeCheckpointError, match=r"names (builtins|io)\.open, not one of DCP's metadata"):
        read_all(ck)
    code, out, err = cli(capsys, ck, ck, *(["--unsafe-pickle"] if unsafe else []))
    assert code == 2 and out == "" and "Traceback" not in err
    err = err.splitlines()[-1]  # after --unsafe-pickle's own warning line
    assert err.startswith("torchdiff: error: ") and "restricted unpickler" in err and "--unsafe-pickle does not apply" in err
    assert not marker.exists()


def test_a_payload_in_a_bytes_entry_never_runs(ck, tmp_path):
    marker = tmp_path / "PWNED"
    path = dcp_save({"w": torch.ones(2), "evil": _Payload(marker)}, tmp_path / "evil")
    assert not marker.exists()
    with torchdiff.load(path) as ckpt:
        assert ckpt.metadata["evil"].startswith("<opaque bytes")
    assert not marker.exists()


def edit_storage(ck: Path, fqn: str, **changes) -> None:
    md = metadata_of(ck)
    for index, info in md.storage_data.items():
        if index.fqn == fqn:
            for k, v in changes.items():
                setattr(info, k, v)
    write_metadata(ck, md)


def test_lying_chunk_offset_past_the_file(capsys, ck):
    size = (ck / "__0_0.distcp").stat().st_size
    edit_storage(ck, "model.w", offset=size - 10)
    err = cli_error(capsys, ck, ck)
    assert f"__0_0.distcp: 'model.w' is stored at bytes {size - 10}.." in err and "past the end" in err


def test_lying_chunk_offset_inside_the_file(capsys, ck):
    md = metadata_of(ck)
    infos = {i.fqn: s for i, s in md.storage_data.items()}
    edit_storage(ck, "model.w", offset=infos["model.b"].offset, length=infos["model.b"].length)
    err = cli_error(capsys, ck, ck)
    assert "tensor 'model.w'" in err and "holds a float32 tensor of shape [3]; the metadata says float32 [3, 4]" in err
    edit_storage(ck, "model.w", offset=infos["model.w"].offset + 1)  # not the start of an archive
    err = cli_error(capsys, ck, ck)
    assert "tensor 'model.w', chunk at offsets [0, 0]" in err and "is not a torch.save archive of a tensor" in err


def test_a_missing_data_file(capsys, ck):
    (ck / "__0_0.distcp").unlink()
    err = cli_error(capsys, ck, ck)
    assert "is stored in __0_0.distcp, which does not exist (a data file is missing" in err


def test_safetensors_serialization_is_named(capsys, tmp_path):
    """FileSystemWriter(serialization_format=SAFETENSORS) writes one safetensors file after
    a rank's bytes entries and records its start as every tensor's offset: torch's own
    FileSystemReader cannot read that back, and the error says what it is (it said the
    file was damaged)."""
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.filesystem import SerializationFormat

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dist_cp.save({"model": {"w": torch.arange(12.0).reshape(3, 4)}, "step": 3},
                     storage_writer=FileSystemWriter(str(tmp_path / "ck"),
                                                     serialization_format=SerializationFormat.SAFETENSORS))
    err = cli_error(capsys, "inspect", tmp_path / "ck")
    assert "tensor 'model.w', chunk at offsets [0, 0]" in err and "holds a safetensors file" in err
    assert "FileSystemWriter(serialization_format=SerializationFormat.SAFETENSORS)" in err


def test_a_data_file_outside_the_directory(capsys, ck):
    edit_storage(ck, "model.w", relative_path="../../etc/passwd")
    assert "outside the checkpoint's directory" in cli_error(capsys, ck, ck)


def test_chunks_that_overlap_or_leave_gaps(capsys, tmp_path):
    w = torch.randn(6, 5)
    path = dcp_save({"p0": w[:4].clone(), "p1": w[2:].clone()}, tmp_path / "ck")
    split_into_chunks(path, "w", ["p0", "p1"], (6, 5), [(0, 0), (2, 0)])
    assert "chunks hold 40 elements, its shape [6, 5] 30" in cli_error(capsys, path, path)
    path = dcp_save({"p0": w[:3].clone(), "p1": w[3:].clone()}, tmp_path / "ck2")
    split_into_chunks(path, "w", ["p0", "p1"], (6, 5), [(0, 0), (4, 0)])
    assert "lies outside the tensor's shape [6, 5]" in cli_error(capsys, path, path)


def test_a_newer_metadata_version(capsys, ck):
    md = metadata_of(ck)
    md.version = "2.0.0"
    write_metadata(ck, md)
    err = cli_error(capsys, ck, ck)
    assert "DCP metadata version '2.0.0', which torchdiff does not read (it reads 1.x" in err
    assert torch.__version__ in err


def test_a_metadata_class_this_torch_does_not_know(capsys, ck):
    raw = (ck / ".metadata").read_bytes()
    (ck / ".metadata").write_bytes(raw.replace(b"TensorStorageMetadata", b"TensorStorageMetadatX"))
    err = cli_error(capsys, ck, ck)
    assert "names torch.distributed.checkpoint.metadata.TensorStorageMetadatX, which this torch" in err
    assert "written by another torch version" in err


def test_not_a_pickle_and_not_metadata(capsys, ck):
    (ck / ".metadata").write_bytes(b"hello")
    assert "not a readable DCP .metadata pickle" in cli_error(capsys, ck, ck)
    (ck / ".metadata").write_bytes(pickle.dumps({"a": [1, 2]}))
    assert "not DCP metadata (the pickle holds a dict, not a Metadata)" in cli_error(capsys, ck, ck)


def test_a_data_file_changed_after_opening(ck):
    with torchdiff.load(ck) as ckpt:
        with open(ck / "__0_0.distcp", "ab") as f:
            f.write(b"x")
        with pytest.raises(torchdiff.CorruptFileError, match="changed while being read"):
            ckpt["model.w"]


def test_every_truncation_of_the_metadata(ck):
    data = (ck / ".metadata").read_bytes()
    for offset in range(len(data)):
        (ck / ".metadata").write_bytes(data[:offset])
        with pytest.raises(torchdiff.TorchDiffError) as caught:
            read_all(ck)
        assert str(ck) in str(caught.value) and "\n" not in str(caught.value)


def test_truncations_of_a_data_file(ck):
    data = (ck / "__0_0.distcp").read_bytes()
    for offset in list(range(0, len(data), 37)) + [len(data) - 1]:
        (ck / "__0_0.distcp").write_bytes(data[:offset])
        with pytest.raises(torchdiff.CorruptFileError) as caught:
            read_all(ck)
        assert "\n" not in str(caught.value)


ops = st.lists(st.tuples(st.sampled_from(OP_KINDS), st.floats(0, 1, allow_nan=False, exclude_max=True),
                         st.one_of(st.integers(0, 1 << 16), st.sampled_from(INTERESTING),
                                   st.binary(min_size=1, max_size=32))), min_size=1, max_size=6)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=ops, which=st.sampled_from([".metadata", "__0_0.distcp"]))
def test_mutated_files_raise_only_torchdiff_errors(tmp_path_factory, edits, which):
    root = tmp_path_factory.mktemp("m")
    path = dcp_save({"model": {"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(3)}, "step": 7}, root / "ck")
    target = path / which
    target.write_bytes(apply_ops(target.read_bytes(), edits))
    only_torchdiff_errors(lambda: read_all(path), path)


def test_allow_list_is_dcp_metadata_only():
    allowed = dcp_reader.allowed_globals()
    modules = {m for m, _ in allowed}
    assert modules <= {"torch", "torch.serialization", "torch.distributed.checkpoint.metadata",
                       "torch.distributed.checkpoint.filesystem", "torch.distributed._shard.sharded_tensor.metadata",
                       "collections", "pathlib", "pathlib._local"}
    assert all(isinstance(v, (torch.dtype, torch.layout, torch.memory_format)) or n == "Size"
               for (m, n), v in allowed.items() if m == "torch")
    assert not any(callable(v) and getattr(v, "__module__", "").startswith(("os", "builtins", "subprocess"))
                   for v in allowed.values())
    np.testing.assert_equal(len([k for k in allowed if k[0] == "torch.distributed.checkpoint.metadata"]), 8)


def test_shutil_copy_of_a_checkpoint_reads_the_same(tmp_path):
    """The metadata's checkpoint_id (the path it was saved at) is only text: a copied or
    moved directory reads from where it is."""
    path = dcp_save({"w": torch.arange(5.0)}, tmp_path / "ck")
    moved = Path(shutil.move(path, tmp_path / "elsewhere"))
    with torchdiff.load(moved) as ckpt:
        assert torch.equal(ckpt["w"], torch.arange(5.0))


def test_no_prefix_is_dropped_between_two_other_formats(tmp_path):
    save_file({"model.w": torch.ones(2)}, str(tmp_path / "a.safetensors"))
    save_file({"w": torch.ones(2)}, str(tmp_path / "b.safetensors"))
    report = torchdiff.compare(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert sorted(d.status for d in report) == ["added", "removed"] and report.analysis("pairing") is None


def test_tiling_check_on_many_chunks():
    """The overlap check compares every pair of chunks (in blocks of 512 rows)."""
    from torchdiff.formats.dcp import _Chunk, _check_tiling

    rows = [_Chunk((i, 0), (1, 4), "f", 0, 0) for i in range(1500)]
    _check_tiling("t", (1500, 4), rows)  # an exact tiling
    overlap = rows[:-1] + [_Chunk((1000, 0), (1, 4), "f", 0, 0)]  # sizes add up; row 1499 missing, 1000 twice
    with pytest.raises(torchdiff.CorruptFileError, match="two of its chunks overlap"):
        _check_tiling("t", (1500, 4), overlap)


def test_fqn_keyed_adam_state_maps_to_parameter_names():
    from torchdiff.analyses._training import build_adam_plan

    tensors = [("model.enc.fc.weight", (4, 3), True), ("model.dec.fc.weight", (4, 3), True),
               ("model.head.weight", (2, 4), True)]
    for fqn, shape in (("enc.fc.weight", (4, 3)), ("dec.fc.weight", (4, 3)), ("fc.weight", (4, 3)),
                       ("head.weight", (2, 4))):
        tensors += [(f"optim.state.{fqn}.exp_avg", shape, True), (f"optim.state.{fqn}.exp_avg_sq", shape, True),
                    (f"optim.state.{fqn}.step", (), True)]
    metadata = {"optim.param_groups.0.lr": 0.5, "optim.param_groups.0.betas": [0.8, 0.9],
                "optim.param_groups.0.params": ["enc.fc.weight", "dec.fc.weight", "fc.weight"]}
    plan = build_adam_plan(tensors, metadata)
    got = {p.key: (p.param, p.lr, p.beta1, p.step) for p in plan.params}
    assert got == {
        "optim.state.enc.fc.weight": ("model.enc.fc.weight", 0.5, 0.8, "optim.state.enc.fc.weight.step"),
        "optim.state.dec.fc.weight": ("model.dec.fc.weight", 0.5, 0.8, "optim.state.dec.fc.weight.step"),
        "optim.state.fc.weight": (None, 0.5, 0.8, "optim.state.fc.weight.step"),  # two candidates: not guessed
        "optim.state.head.weight": ("model.head.weight", None, 0.9, "optim.state.head.weight.step"),  # no group
    }
    assert not plan.mapped and "fc.weight" in plan.notes[0]


def test_fqn_keyed_adam_state_prefers_the_prefix_every_parameter_pairs_through():
    """``norm.weight`` beside ``block.norm.weight``: the suffix fits both model tensors
    (it was left unmapped, and the gradient analysis named a layer optim.state.norm.weight
    with update_ratio=nan); ``model.`` is the prefix the others pair through."""
    from torchdiff.analyses._training import build_adam_plan

    tensors = [("model.norm.weight", (4,), True), ("model.block.norm.weight", (4,), True),
               ("model.block.fc.weight", (4, 4), True)]
    for fqn, shape in (("norm.weight", (4,)), ("block.norm.weight", (4,)), ("block.fc.weight", (4, 4))):
        tensors += [(f"optim.state.{fqn}.exp_avg", shape, True), (f"optim.state.{fqn}.exp_avg_sq", shape, True)]
    plan = build_adam_plan(tensors, {"optim.param_groups.0.lr": 0.1,
                                     "optim.param_groups.0.params": ["norm.weight", "block.norm.weight",
                                                                     "block.fc.weight"]})
    assert {p.key: p.param for p in plan.params} == {
        "optim.state.norm.weight": "model.norm.weight", "optim.state.block.norm.weight": "model.block.norm.weight",
        "optim.state.block.fc.weight": "model.block.fc.weight"}
    assert plan.mapped


def test_flattened_optimizer_state_reads_each_parameters_hyper_parameters():
    """torchtitan saves get_optimizer_state_dict(..., flatten_optimizer_state_dict=True):
    lr, betas and eps under ``optimizer.param_groups.<fqn>.<key>``. They were not read:
    step_rms and update_ratio were NaN, betas and eps the defaults."""
    from torchdiff.analyses._training import build_adam_plan

    tensors = [("model.a.weight", (4, 3), True), ("model.b.weight", (2, 4), True)]
    metadata = {}
    for fqn, shape, lr in (("a.weight", (4, 3), 3e-4), ("b.weight", (2, 4), 1e-3)):
        tensors += [(f"optimizer.state.{fqn}.exp_avg", shape, True), (f"optimizer.state.{fqn}.exp_avg_sq", shape, True)]
        metadata |= {f"optimizer.param_groups.{fqn}.lr": lr, f"optimizer.param_groups.{fqn}.betas": [0.9, 0.95],
                     f"optimizer.param_groups.{fqn}.eps": 1e-6, f"optimizer.state.{fqn}.step": 7.0}
    plan = build_adam_plan(tensors, metadata)
    got = {p.key: (p.param, p.lr, p.beta1, p.beta2, p.eps, p.step_value) for p in plan.params}
    assert got == {"optimizer.state.a.weight": ("model.a.weight", 3e-4, 0.9, 0.95, 1e-6, 7.0),
                   "optimizer.state.b.weight": ("model.b.weight", 1e-3, 0.9, 0.95, 1e-6, 7.0)}
