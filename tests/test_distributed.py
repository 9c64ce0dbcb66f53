"""torchdiff on torch.distributed (docs/DISTRIBUTED.md): CPU, gloo, loopback only.

The reference is always the single-process run of the same command in this process:
the N-rank output must hold the same items in the same order, identical counts,
shapes and statuses, and floats within 1e-9 relative (JSON), and the same text and
YAML. Launches are real ``python -m torch.distributed.run`` processes; each launch
runs a list of commands (tests/dist_worker.py) so that process start-up is paid once.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from torchdiff import cli, formats
from torchdiff.distributed import assign
from torchdiff.engine import Engine
from torchdiff.pairing import compile_filters, pair

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "dist_worker.py"
TIMEOUT = 240

dist = pytest.importorskip("torch.distributed")
pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


# ---- inputs ----------------------------------------------------------------------------


def _odd_state(seed: int, row: int = 65536) -> dict[str, torch.Tensor]:
    """Every path of the engine: exact (NaN, Inf, empty, underflow), rows split into
    full rows + remainder (``row`` = the engine's row length), many small tensors,
    integer and bf16 storage."""
    g = torch.Generator().manual_seed(seed)
    s = {f"blocks.{i}.bias": torch.randn(7 + i % 5, generator=g) for i in range(60)}
    s["big.weight"] = torch.randn(4 * row + 17, generator=g)
    s["full_rows.weight"] = torch.randn(4, row, generator=g)
    s["nan.weight"] = torch.randn(50, generator=g)
    s["nan.weight"][3] = math.nan
    s["inf.weight"] = torch.randn(50, generator=g)
    s["inf.weight"][5] = math.inf
    s["empty"] = torch.zeros(0, 3)
    s["tiny.exp_avg_sq"] = torch.rand(40, generator=g) * 1e-30
    s["bf16.weight"] = torch.randn(33, 9, generator=g).to(torch.bfloat16)
    s["int.buffer"] = torch.randint(0, 100, (17,), generator=g)
    s["same.weight"] = torch.ones(64)
    return s


def _write_sharded(directory: Path, state: dict[str, torch.Tensor], n_shards: int) -> str:
    """Shards model-0000i-of-0000n.safetensors and model.safetensors.index.json, split
    as transformers' save_pretrained does (tests/test_formats_sharded.py)."""
    directory.mkdir(parents=True, exist_ok=True)
    names = list(state)
    weight_map = {}
    for i in range(n_shards):
        shard = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file({n: state[n].contiguous() for n in names[i::n_shards]}, str(directory / shard),
                  metadata={"format": "pt"})
        weight_map.update({n: shard for n in names[i::n_shards]})
    index = {"metadata": {"total_size": sum(t.nbytes for t in state.values())},
             "weight_map": dict(sorted(weight_map.items()))}
    path = directory / "model.safetensors.index.json"
    path.write_text(json.dumps(index, indent=2) + "\n")
    return str(path)


def _hf_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = {"model.embed_tokens.weight": torch.randn(64, 32, generator=g)}
    for i in range(3):
        p = f"model.layers.{i}."
        for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
            s[p + f"self_attn.{m}.weight"] = torch.randn(32, 32, generator=g)
        s[p + "mlp.up_proj.weight"] = torch.randn(96, 32, generator=g)
        s[p + "mlp.down_proj.weight"] = torch.randn(32, 96, generator=g)
        s[p + "input_layernorm.weight"] = torch.ones(32)
    s["lm_head.weight"] = torch.randn(64, 32, generator=g)
    return s


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist")
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import make_checkpoints
    finally:
        sys.path.pop(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            make_checkpoints.main(str(root / "demo"), steps=200, every=100)  # the README demo's checkpoints
    finally:
        torch.set_num_threads(threads)
    a, b = _odd_state(0), _odd_state(0)
    for k, v in b.items():
        if v.is_floating_point() and k != "same.weight":
            b[k] = v + (0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1))).to(v.dtype)
    b["added.weight"] = torch.ones(3)
    del b["blocks.0.bias"]
    b["blocks.1.bias"] = torch.zeros(2, 4)
    save_file(a, str(root / "odd_a.safetensors"))
    save_file(b, str(root / "odd_b.safetensors"))
    c = {k: (v + (0.02 * torch.randn(v.shape, generator=torch.Generator().manual_seed(3))).to(v.dtype))
         if v.is_floating_point() and k not in ("same.weight", "tiny.exp_avg_sq") else v.clone() for k, v in b.items()}
    c["inf.weight"][7] = -math.inf
    save_file(c, str(root / "odd_c.safetensors"))
    g = torch.Generator().manual_seed(4)
    full = {f"layer.{i}.weight": torch.randn(8, 6, generator=g) for i in range(4)}
    full["bias"] = torch.randn(6, generator=g)
    save_file(full, str(root / "tp_full.safetensors"))
    for r in range(2):  # tensor-parallel rank files: weights split along dim 0, the bias replicated
        part = {k: v[4 * r:4 * r + 4].clone() for k, v in full.items() if k != "bias"}
        part["bias"] = full["bias"] + (0.5 if r == 1 else 0.0)  # rank 1's replica differs
        save_file(part, str(root / f"tp{r}.safetensors"))
    old, new = _hf_state(0), _hf_state(0)
    for k in new:
        if "layers.1" in k or "lm_head" in k:
            new[k] = new[k] + 0.05 * torch.randn(new[k].shape, generator=torch.Generator().manual_seed(2))
    _write_sharded(root / "hf_old", old, 3)
    _write_sharded(root / "hf_new", new, 3)
    return root


# ---- launching ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def _launch(jobs: list[tuple], out: Path, cwds=None, nodes: int = 1, nproc: int = 2, timeout: float = 120):
    """Run ``jobs`` (name, argv[, (rank, seconds it stalls first)]) under torchrun; one
    launch per node; collectives time out after ``timeout`` s. Returns, per job,
    {rank: {"code", "stdout", "stderr"}}."""
    out.mkdir(parents=True, exist_ok=True)
    spec = out / "jobs.json"
    spec.write_text(json.dumps([[str(out / job[0]), job[1], job[2] if len(job) > 2 else None] for job in jobs]))
    port = _free_port()
    procs = []
    for node in range(nodes):
        if nodes == 1:
            launch = ["--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1", "--master-port", str(port)]
        else:
            launch = ["--nnodes", str(nodes), "--node-rank", str(node), "--nproc-per-node", str(nproc),
                      "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}"]
        cmd = [sys.executable, "-m", "torch.distributed.run", *launch, str(WORKER), str(spec)]
        env = {**_env(), "TORCHDIFF_TEST_TIMEOUT": str(timeout)}
        procs.append(subprocess.Popen(cmd, cwd=(cwds or [None] * nodes)[node], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=TIMEOUT))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a torchrun launch hung")
    results = {}
    for name, *_ in jobs:
        results[name] = {}
        for r in range(nodes * nproc):
            f = out / f"{name}.r{r}"
            assert f.exists(), f"rank {r} wrote no result for {name}; torchrun said:\n" + "\n".join(
                e[-3000:] for _, e in logs)
            results[name][r] = json.loads(f.read_text())
    return results


def _single(argv: list[str], cwd: Path | None = None) -> dict:
    """The same command in this process, undistributed."""
    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    here = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(argv)
    finally:
        os.chdir(here)
        torch.set_num_threads(threads)
    return {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}


def _close(a, b, where="") -> None:
    """Same structure; equal strings, ints and bools; floats within 1e-9 relative."""
    assert type(a) is type(b) or (isinstance(a, (int, float)) and isinstance(b, (int, float))
                                 and not isinstance(a, bool)), f"{where}: {a!r} vs {b!r}"
    if isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} vs {list(b)}"
        for k in a:
            _close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), f"{where}: {len(a)} items vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        if math.isnan(a):
            assert math.isnan(b), f"{where}: {a} vs {b}"
        else:
            assert a == b or abs(a - b) <= 1e-9 * max(abs(a), abs(b)), f"{where}: {a!r} vs {b!r}"
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


# ---- one node, two processes -------------------------------------------------------------

JOBS = {
    "train_json": ["demo/train_step_100.pt", "demo/train_step_200.pt", "--all", "-o", "json"],
    "train_yaml": ["demo/train_step_100.pt", "demo/train_step_200.pt", "--all", "-o", "yaml"],
    "train_text": ["demo/train_step_100.pt", "demo/train_step_200.pt", "--all", "--no-color"],
    "int8_json": ["demo/step_000.safetensors", "demo/step_200_int8.safetensors", "--all", "-o", "json"],
    "odd_json": ["odd_a.safetensors", "odd_b.safetensors", "--all", "-o", "json"],
    "odd_text": ["odd_a.safetensors", "odd_b.safetensors", "--all", "--no-color"],
    "hf_json": ["hf_old", "hf_new", "--all", "-o", "json"],
    "hf_yaml": ["hf_old/model.safetensors.index.json", "hf_new", "--all", "-o", "yaml"],
    "hf_text": ["hf_old", "hf_new", "--all", "--no-color", "--epsilon", "1e-3"],
    "inspect_json": ["inspect", "demo/train_step_200.pt", "--all", "-o", "json"],
    "series_json": ["series", "demo/step_000.safetensors", "demo/step_100.safetensors",
                    "demo/step_200.safetensors", "--all", "-o", "json"],
    "series_text": ["series", "demo/step_000.safetensors", "demo/step_100.safetensors",
                    "demo/step_200.safetensors", "--all", "--no-color"],
    "series_base_json": ["series", "demo/step_100.safetensors", "demo/step_200.safetensors",
                         "demo/step_200_int8.safetensors",
                         "--base", "demo/step_000.safetensors", "--similarity-matrix", "--cross-layer",
                         "--convergence-analysis", "--common-only", "-o", "json"],
    "series_adam_json": ["series", "demo/train_step_100.pt", "demo/train_step_200.pt", "--all", "--scope", "all",
                         "-o", "json"],
    "series_odd_json": ["series", "odd_a.safetensors", "odd_b.safetensors", "odd_c.safetensors", "--common-only",
                        "--all", "-o", "json"],
    "series_hf_yaml": ["series", "hf_old", "hf_new", "hf_old", "--all", "-o", "yaml"],
    "series_missing": ["series", "demo/step_000.safetensors", "demo/nothing_here.safetensors",
                       "demo/step_100.safetensors"],
    "hash_stdout": ["hash", "hf_old"],
    "hash_cast_stdout": ["hash", "demo/train_step_200.pt", "--cast", "bfloat16"],
    "hash_file": ["hash", "odd_a.safetensors", "-o", "manifest_2p.json"],  # checked in test_hash_file
    "verify_same": ["verify", "manifest_2p.json", "odd_a.safetensors"],
    "verify_differ_json": ["verify", "manifest_2p.json", "odd_c.safetensors", "--tolerance", "rel_l2=0.5",
                           "-o", "json"],
    "verify_two_checkpoints": ["verify", "hf_old", "hf_new"],
    "verify_shards": ["verify", "tp_full.safetensors", "tp0.safetensors", "tp1.safetensors", "--shards"],
    "brief_same": ["demo/step_000.safetensors", "demo/step_000.safetensors", "--brief"],
    "brief_differ": ["demo/step_000.safetensors", "demo/step_200.safetensors", "--brief"],
    "exit_code": ["hf_old", "hf_new", "--exit-code", "-o", "json"],
    "missing": ["demo/step_000.safetensors", "demo/nothing_here.safetensors"],
}


@pytest.fixture(scope="module")
def two_ranks(data):
    return _launch([(name, argv) for name, argv in JOBS.items()], data / "out_2p", cwds=[data])


@pytest.mark.parametrize("name", [n for n in JOBS if n != "hash_file"])
def test_two_ranks_equal_one_process(two_ranks, data, name):
    single = _single(JOBS[name], cwd=data)
    ranks = two_ranks[name]
    assert {r: ranks[r]["code"] for r in ranks} == {0: single["code"], 1: single["code"]}, "every rank, one exit code"
    assert ranks[1]["stdout"] == "", "exactly one output: rank 0's"
    out = ranks[0]["stdout"]
    if "json" in name:
        _close(json.loads(single["stdout"]), json.loads(out))
    else:
        assert out == single["stdout"]
    if single["code"] == 2:
        assert ranks[1]["stderr"] == ""
        line = ranks[0]["stderr"].strip()
        assert line.count("\n") == 0 and line.startswith("torchdiff: error: rank 0 of 2")
        assert "nothing_here.safetensors" in line


def test_outputs_are_not_trivial(two_ranks):
    """The comparisons above compare real reports: every analysis ran."""
    report = json.loads(two_ranks["train_json"][0]["stdout"])
    assert len(report.get("analyses", report)) >= 5 if isinstance(report, dict) else len(report) > 5
    assert json.loads(two_ranks["odd_json"][0]["stdout"])
    assert two_ranks["brief_differ"][0]["code"] == 1 and two_ranks["brief_same"][0]["code"] == 0
    assert two_ranks["exit_code"][0]["code"] == 1 and two_ranks["exit_code"][1]["code"] == 1


def test_hash_file(two_ranks, data):
    """``hash -o FILE`` under torchrun: rank 0 writes the manifest (the single-process
    one, byte for byte), nothing on stdout, exit 0 on both ranks (verify_* above read it)."""
    job = two_ranks["hash_file"]
    assert [job[r]["code"] for r in (0, 1)] == [0, 0] and job[0]["stdout"] == job[1]["stdout"] == ""
    single = _single(["hash", "odd_a.safetensors"], cwd=data)
    assert (data / "manifest_2p.json").read_text() == single["stdout"]


def test_series_and_fingerprints_split_the_work(two_ranks):
    """A series, a manifest and a verify under torchrun are computed by both ranks, each
    its own share of the tensors (their outputs equal the single-process ones: above)."""
    for name in JOBS:
        if name.startswith(("series", "hash", "verify")) and two_ranks[name][0]["code"] in (0, 1):
            t = [two_ranks[name][r]["timings"] for r in (0, 1)]
            assert t[0]["names"] == t[1]["names"] > 1, (name, t)
            assert t[0]["owned"] > 0 and t[1]["owned"] > 0, (name, t)
            assert t[0]["owned"] + t[1]["owned"] == t[0]["names"], (name, t)


# ---- two nodes on one machine; a node with a truncated shard --------------------------------


def test_two_nodes_and_a_failing_rank(data):
    """Two torchrun launches (--nnodes 2, c10d rendezvous on 127.0.0.1). Node directories
    hold the same relative paths; in the second job one node's copy of a shard is
    truncated, so only the rank(s) of that node fail at opening it. In the third, rank 1
    stalls past the collective timeout: rank 0 gives up and names it."""
    nodes = [data / "node0", data / "node1"]
    for n in nodes:
        (n / "hf_old").mkdir(parents=True, exist_ok=True)
        (n / "hf_new").mkdir(parents=True, exist_ok=True)
        for side in ("hf_old", "hf_new"):
            for f in (data / side).iterdir():
                (n / side / f.name).write_bytes(f.read_bytes())
    shard = nodes[1] / "hf_new" / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    jobs = [("ok", [str(data / "hf_old"), str(data / "hf_new"), "--all", "-o", "json"]),
            ("truncated", ["hf_old", "hf_new", "--all", "-o", "json"]),
            ("series_truncated", ["series", "hf_old", "hf_new", "hf_old", "-o", "json"]),
            ("hash_truncated", ["hash", "hf_new", "-o", "never_written.json"]),
            ("stalled", [str(data / "hf_old"), str(data / "hf_new")], (1, 18))]
    res = _launch(jobs, data / "out_2n", cwds=nodes, nodes=2, nproc=1, timeout=15)
    single = _single(jobs[0][1])
    assert [res["ok"][r]["code"] for r in (0, 1)] == [0, 0]
    _close(json.loads(single["stdout"]), json.loads(res["ok"][0]["stdout"]))
    assert res["ok"][1]["stdout"] == ""

    for job in ("truncated", "series_truncated", "hash_truncated"):
        bad = res[job]
        assert [bad[r]["code"] for r in (0, 1)] == [2, 2], "every rank exits 2"
        assert bad[0]["stdout"] == bad[1]["stdout"] == ""
        lines = [ln for r in (0, 1) for ln in bad[r]["stderr"].splitlines() if ln.strip()]
        assert len(lines) == 1, lines
        assert lines[0].startswith("torchdiff: error: rank ") and "of 2" in lines[0]
        assert "model-00002-of-00003.safetensors" in lines[0] and "truncated" in lines[0]
        assert bad[0]["stderr"].strip() == lines[0], "rank 0 prints it"
    assert not any((n / "never_written.json").exists() for n in nodes)

    late = res["stalled"]
    assert [late[r]["code"] for r in (0, 1)] == [2, 2]
    line = late[0]["stderr"].strip()
    assert line.startswith("torchdiff: error: rank 1 of 2 did not reach the exchange of figures"), line
    assert late[1]["stderr"] == "" and late[0]["stdout"] == late[1]["stdout"] == ""


# ---- in-process pieces: split, measure, merge -----------------------------------------------


def test_assign_is_greedy_by_bytes():
    assert assign([5, 1, 1, 1, 1, 1], 2) == [0, 1, 1, 1, 1, 1]
    assert assign([3, 3, 2, 2, 2], 2) == [0, 1, 0, 1, 0]
    assert assign([], 3) == []
    assert assign([1, 1], 4) == [0, 1]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 4), st.integers(0, 2**32 - 1), st.integers(0, 3))
def test_merge_of_any_split_is_the_single_run(world, seed, which):
    """Engine.measure on disjoint subsets + Engine.merge (in any rank order) gives
    exactly the figures of Engine.run, for tensors of every engine path."""
    state = _odd_state(which, row=256)
    other = {k: (v + 0.5 * torch.randn(v.shape, generator=torch.Generator().manual_seed(seed))).to(v.dtype)
             if v.is_floating_point() and k != "same.weight" else v.clone() for k, v in state.items()}
    rng = np.random.default_rng(seed)
    pairs = pair(formats.from_object(state), formats.from_object(other), compile_filters(None, None))
    engine = Engine("cpu", epsilon=[0.0, 1e-3][seed % 2], block=1024, row=256)
    ref = engine.run(pairs)
    owner = rng.integers(0, world, len(pairs))
    parts = [engine.measure(pairs, [i for i in range(len(pairs)) if owner[i] == r]) for r in rng.permutation(world)]
    got = engine.merge(pairs, parts)
    assert [repr(d) for d in got] == [repr(d) for d in ref]


def test_partials_travel_as_arrays():
    """The encoding round-trips every figure (ids, exact totals, flags, extras)."""
    from torchdiff.distributed import _decode, _encode

    state = _odd_state(0, row=256)
    other = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    pairs = pair(formats.from_object(state), formats.from_object(other), compile_filters(None, None))
    part = Engine("cpu").measure(pairs, range(0, len(pairs), 2))
    part.extras = {0: {"h": {"x": [1.5, float("nan")], "n": 3}}}
    arrays = _encode(part)
    assert all(isinstance(a, np.ndarray) and a.ndim == 1 and a.dtype in (np.float64, np.int64, np.uint8)
               for a in arrays)
    back = _decode(arrays)
    assert np.array_equal(back.side_rows, part.side_rows, equal_nan=True)
    assert np.array_equal(back.pair_ids, part.pair_ids)
    assert repr(sorted(back.exact_side.items())) == repr(sorted(part.exact_side.items()))
    assert repr(sorted(back.exact_pair.items())) == repr(sorted(part.exact_pair.items()))
    assert back.equal == part.equal and back.same_nonfinite == part.same_nonfinite
    assert back.extras[0]["h"]["n"] == 3 and math.isnan(back.extras[0]["h"]["x"][1])
    assert part.exact_side, "the odd state has exact-path tensors"


# ---- inside training: FSDP2 fully_shard on 2 gloo ranks ------------------------------------


def _f64_reference(old: np.ndarray, new: np.ndarray) -> dict:
    d = new - old
    side = lambda x: [x.mean(), x.std(), x.min(), x.max(), np.abs(x).mean(), np.sqrt((x * x).mean())]  # noqa: E731
    return {"old": side(old), "new": side(new),
            "pair": [np.sqrt((d * d).sum()), np.sqrt((old * old).sum()), np.sqrt((new * new).sum()),
                     np.abs(d).max(), np.abs(d).mean(), int((d != 0).sum())]}


def test_fsdp2_monitor_equals_full_recomputation(tmp_path):
    """CheckpointMonitor(process_group=...) under fully_shard: each rank snapshots its
    local shards (1/N of the bytes) and both ranks get the same report, whose figures
    are those of float64 NumPy on the full state_dicts (gathered by the test only) and
    of single-process torchdiff on them, to the engine's float32 accumulation precision
    (tests/test_metrics.py's rtol)."""
    port = _free_port()
    out = tmp_path / "fsdp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), str(Path(__file__).parent / "dist_fsdp_worker.py"), str(out)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    res = [json.loads(Path(f"{out}.r{r}").read_text()) for r in (0, 1)]
    for r in res:
        assert "error" not in r, r.get("error", "") + proc.stderr[-2000:]
        assert r["how"] == "fully_shard", r["how"]
        assert r["monitor_bytes"] == r["local_bytes"] < r["full_bytes"]
    assert res[0]["monitor_bytes"] + res[1]["monitor_bytes"] == res[0]["full_bytes"], "snapshots are 1/N each"
    assert res[0]["monitor"] == res[1]["monitor"], "every rank gets the same report"
    rtol = 2e-5
    for mon, ref, selfcmp in zip(res[0]["monitor"], res[0]["reference"], res[0]["self"]):
        name = mon["name"]
        assert (mon["name"], mon["status"]) == (ref["name"], ref["status"]) == (name, "changed")
        assert selfcmp["status"] == "unchanged" and selfcmp["metrics"][1] is True, "a state equals itself"
        assert mon["old"][:2] == ref["old"][:2] and mon["new"][:2] == ref["new"][:2], "shape and numel"
        assert mon["old"][8:] == ref["old"][8:] and mon["new"][8:] == ref["new"][8:], "zero, NaN, Inf counts"
        old, new = (np.array(v) for v in res[0]["values"][name])
        f = _f64_reference(old, new)
        for side in ("old", "new"):
            got = mon[side][2:8]
            for k, (g, e) in enumerate(zip(got, f[side])):
                np.testing.assert_allclose(g, e, rtol=rtol, atol=rtol * f[side][4], err_msg=f"{name} {side} {k}")
            np.testing.assert_allclose(got, ref[side][2:8], rtol=rtol, atol=rtol * f[side][4])
        m = mon["metrics"]
        assert m[0] == ref["metrics"][0] == old.size and m[7] == f["pair"][5]
        np.testing.assert_allclose([m[2], m[3], m[4], m[5], m[6]], f["pair"][:5], rtol=rtol, err_msg=name)
    # Shard(0), Replicate and a plain tensor: each counted once
    for got, ref in zip(res[0]["mixed"], res[0]["mixed_reference"]):
        assert (got["name"], got["status"], got["new"][:2], got["new"][8:]) == \
            (ref["name"], ref["status"], ref["new"][:2], ref["new"][8:])
        np.testing.assert_allclose(got["new"][2:8] + got["metrics"][2:7], ref["new"][2:8] + ref["metrics"][2:7],
                                   rtol=rtol, atol=1e-7, err_msg=got["name"])
    assert res[0]["mixed"] == res[1]["mixed"]
    # the dot product as the engine keeps it (summed where the norms would cancel): float64 cosine
    outlier = next(r for r in res[0]["mixed"] if r["name"] == "o")
    assert outlier["metrics"][9] == pytest.approx(res[0]["outlier_cosine"], rel=1e-4)
    assert res[0]["mismatch"] == res[1]["mismatch"] and res[0]["mismatch"].startswith("rank 1 of 2: w: the two sides")


# ---- the Lightning and HF Trainer adapters under FSDP2 (2 gloo ranks) ----------------------


def _near(a, b, rtol: float = 2e-5, atol: float = 1e-7, where: str = "") -> None:
    """Same structure, equal non-floats, floats within the sharded path's float32
    accumulation precision (tests/test_metrics.py's rtol)."""
    if isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} vs {list(b)}"
        for k in a:
            _near(a[k], b[k], rtol, atol, f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: {len(a)} vs {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b)):
            _near(x, y, rtol, atol, f"{where}[{i}]")
    elif isinstance(a, float) and not isinstance(b, bool):
        if math.isnan(a) or math.isinf(a):
            assert repr(a) == repr(float(b)), f"{where}: {a} vs {b}"
        else:
            assert abs(a - b) <= rtol * max(abs(a), abs(b)) + atol, f"{where}: {a!r} vs {b!r}"
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def _states(js: dict) -> dict[int, dict[str, torch.Tensor]]:
    """The full float32 state_dicts the worker gathered (float64 lists: exact)."""
    return {int(s): {k: torch.tensor(v, dtype=torch.float64).float() for k, v in sd.items()} for s, sd in js.items()}


def _check_records(history: list[dict], states: dict, shapes: dict) -> None:
    """Each report's figures against a single-process torchdiff run on the full
    state_dicts, and its global rel_l2 against float64 NumPy."""
    import torchdiff

    assert history, "no report"
    for rec in history:
        old = {k: v.reshape(shapes[k]) for k, v in states[rec["reference_step"]].items()}
        new = {k: v.reshape(shapes[k]) for k, v in states[rec["step"]].items()}
        ref = torchdiff.compare(old, new, analyses=("show_layer_impact",))
        got = {row["name"]: row for row in rec["figures"]}
        assert list(got) == [d.name for d in ref], "same items, same order"
        for d in ref:
            row = got[d.name]
            assert row["status"] == d.status == "changed", d.name
            for side in ("old", "new"):
                s = getattr(d, side)
                assert row[side][:2] == [list(s.shape), s.numel] and row[side][8:] == [s.zero_count, 0, 0], d.name
                _near(row[side][2:8], [s.mean, s.std, s.min, s.max, s.mean_abs, s.rms], atol=2e-5 * s.mean_abs,
                      where=f"{d.name}.{side}")
            m = d.metrics
            assert row["metrics"][0] == m.numel and row["metrics"][7] == m.changed_count, d.name
            _near(row["metrics"][2:7], [m.l2, m.norm_old, m.norm_new, m.max_abs, m.mean_abs_diff], where=d.name)
        a = np.concatenate([old[k].double().numpy().ravel() for k in old])
        b = np.concatenate([new[k].double().numpy().ravel() for k in new])
        np.testing.assert_allclose(rec["rel_l2"], np.linalg.norm(b - a) / np.linalg.norm(a), rtol=2e-5)


def test_adapters_under_fsdp2(tmp_path):
    """Lightning (a real Trainer with ModelParallelStrategy: fully_shard on CPU/gloo) and
    the HF Trainer callback (its hooks driven with the Trainer's TrainerState and
    TrainerControl: the Trainer's FSDP needs a GPU) on 2 ranks: the monitor runs on every
    rank with the process group (snapshots 1/N each), both ranks get the same figures,
    which equal a single-process run on the full state_dicts; only rank 0 logs and calls
    on_report; every rank asks the Trainer to log at the same steps. With a replicated
    (DDP) model, rank 0 monitors alone and rank 1 still asks to log at the same steps."""
    pytest.importorskip("lightning")
    pytest.importorskip("transformers")
    out = tmp_path / "adapters"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), str(Path(__file__).parent / "dist_adapters_worker.py"), str(out)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path)
    assert all(Path(f"{out}.r{r}").exists() for r in (0, 1)), proc.stderr[-3000:]
    res = [json.loads(Path(f"{out}.r{r}").read_text()) for r in (0, 1)]
    for part in ("lightning", "hf_fsdp2", "hf_ddp"):
        for r in res:
            assert "error" not in r[part] and "skipped" not in r[part], r[part]

    # Lightning, ModelParallelStrategy
    lt = [r["lightning"] for r in res]
    states = _states(lt[0]["states"])
    shapes = {"net.0.weight": (33, 16), "net.0.bias": (33,), "net.2.weight": (33,), "net.2.bias": (33,),
              "net.3.weight": (7, 33), "net.3.bias": (7,)}
    full_bytes = sum(v.nbytes for v in states[0].values())
    for r in lt:
        assert r["sharded"] and set(r["dtensors"]) == {"DTensor"}
        assert [(h["step"], h["reference_step"]) for h in r["history"]] == [(2, 0), (4, 2)]
        assert r["memory_bytes"] < full_bytes
        assert r["callback_metrics"]["torchdiff/global_rel_l2"] == pytest.approx(r["history"][-1]["rel_l2"])
    assert lt[0]["memory_bytes"] + lt[1]["memory_bytes"] == full_bytes, "each rank snapshots its shards"
    assert lt[0]["history"] == lt[1]["history"], "every rank gets the same figures"
    assert lt[0]["on_report"] == [2, 4] and lt[1]["on_report"] == []
    assert [s for s, _ in lt[0]["logged"]] == [2, 4] and lt[1]["logged"] == [], "rank 0 logs, once a report"
    assert lt[0]["logged"][-1][1] == pytest.approx(lt[0]["scalars"])
    _check_records(lt[0]["history"], states, shapes)

    # HF Trainer callback, fully_shard
    hf = [r["hf_fsdp2"] for r in res]
    states = _states(hf[0]["states"])
    shapes = {"0.weight": (20, 12), "0.bias": (20,), "2.weight": (5, 20), "2.bias": (5,)}
    full_bytes = sum(v.nbytes for v in states[0].values())
    for r in hf:
        assert r["sharded"] and r["has_monitor"]
        assert r["memory_bytes"] == r["local_bytes"] < full_bytes
        assert [flags for flags in r["should_log"]] == [[s in (2, 4)] * 2 for s in range(1, 6)], \
            "every rank asks the Trainer to log at the report steps, and only then"
    assert hf[0]["memory_bytes"] + hf[1]["memory_bytes"] == full_bytes
    assert hf[0]["history"] == hf[1]["history"]
    assert hf[0]["on_report"] == [2, 4] and hf[1]["on_report"] == []
    assert [s for s, _ in hf[0]["logs"]] == [2, 4] and all(not logs for _, logs in hf[1]["logs"])
    for (step, logs), rec in zip(hf[0]["logs"], hf[0]["history"]):
        assert logs["torchdiff/global_rel_l2"] == pytest.approx(rec["rel_l2"])
    assert [e for e in hf[1]["log_history"] if len(e) > 1] == [], "rank 1's log history has no figures"
    _check_records(hf[0]["history"], states, shapes)
    # the off-grid save at step 3: compared on every rank, torchdiff.json written by rank 0
    import torchdiff

    saved = json.loads((tmp_path / "hf_fsdp2" / "checkpoint-3" / "torchdiff.json").read_text())
    ref = torchdiff.compare({k: v.reshape(shapes[k]) for k, v in states[2].items()},
                            {k: v.reshape(shapes[k]) for k, v in states[3].items()}, analyses=("show_layer_impact",))
    _near(saved, json.loads(ref.to_json()), rtol=1e-4, atol=1e-6)

    # HF Trainer callback, replicated model (DDP): rank 0 monitors alone
    ddp = [r["hf_ddp"] for r in res]
    assert ddp[0]["has_monitor"] and not ddp[1]["has_monitor"] and not ddp[0]["sharded"]
    assert ddp[0]["should_log"] == ddp[1]["should_log"] == [[s in (2, 4)] * 2 for s in range(1, 6)]
    assert ddp[0]["on_report"] == [2, 4] and ddp[1]["on_report"] == [] and ddp[1]["history"] == []
    _check_records(ddp[0]["history"], _states(ddp[0]["states"]), shapes)


def test_the_cli_leaves_without_an_abort_at_exit(tmp_path):
    """``torchrun -m torchdiff`` on a DCP directory: gloo's worker thread released a
    finished collective's tensors after the caller's wait, which takes the GIL; when the
    process had already reached interpreter exit it aborted ("terminate called without
    an active exception", SIGABRT) after a complete output, in about half the launches
    on this machine (the barrier alone still lost one launch in ~40 under load). The CLI
    now ends with a barrier, frees its group and leaves without interpreter teardown
    (cli.entry): four launches, each exit 0 on both ranks."""
    import warnings

    import torch.distributed.checkpoint as dist_cp

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 8)).pow(2).mean().backward()
    opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dist_cp.save({"model": model.state_dict(), "optim": opt.state_dict()}, checkpoint_id=str(tmp_path / "ck"))
    for _ in range(4):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(_free_port()), "-m", "torchdiff", "inspect", str(tmp_path / "ck")]
        done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=180)
        assert "terminate called" not in done.stderr
        assert done.returncode == 0, done.stderr[-2000:]
        assert "24 tensors" in done.stdout
