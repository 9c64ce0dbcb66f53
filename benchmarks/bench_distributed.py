"""torchrun scaling and gather overhead (issue 12). Ratios against a baseline measured
in the same run; no timed asserts.

Row 1, scaling: a GPT-2-shaped fp32 safetensors pair (``--blocks`` × ``--width``; the
issue's target is 48 × 1024, about 2.6 GB a side), compared under
``torchrun --nproc-per-node 1`` and ``--nproc-per-node 2``, each rank on 1 thread.
Time = rank 0's wall time from the start of ``api.compare`` to the rendered JSON (the
process start-up and ``import torch`` of torchrun are not in it); median of ``--runs``.

Row 2, gather overhead: 20,000 small tensors (``--small``), 2 ranks: the exchange
(status round + gathers, after the slower rank finished) plus rank 0's merge, per
tensor; the single-process engine time per tensor of the same pair for scale.

Inputs are generated (seeded) under benchmarks/data/ (git-ignored) and read once
first, so they are in the page cache. Usage:

    .venv/bin/python benchmarks/bench_distributed.py                 # 12 x 768 (~0.5 GB a side)
    .venv/bin/python benchmarks/bench_distributed.py --blocks 48 --width 1024
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DATA = os.path.join(HERE, "data")


def _worker(old: str, new: str) -> None:
    """One rank: join gloo, compare on 1 thread, rank 0 prints its timings as JSON."""
    import torch

    torch.set_num_threads(1)
    import torch.distributed as dist

    from torchdiff import api, distributed
    from torchdiff.render import render

    ctx = distributed.init_from_env("cpu", 1800)
    distributed._ACTIVE = ctx
    dist.barrier()
    started = time.perf_counter()
    report = api.compare(old, new, device="cpu")
    text = render(report, "json") if report is not None else ""
    wall = time.perf_counter() - started
    distributed._ACTIVE = None
    if ctx.rank == 0:
        print(json.dumps({"wall": wall, "bytes": len(text), **distributed.TIMINGS}))
    dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(nproc: int, old: str, new: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(_port()), os.path.abspath(__file__), "--worker", old, new]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _make(path: str, state_fn) -> None:
    if os.path.exists(path):
        return
    from safetensors.torch import save_file

    os.makedirs(DATA, exist_ok=True)
    save_file(state_fn(), path + ".tmp")
    os.replace(path + ".tmp", path)


def _warm(*paths: str) -> None:
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=12)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--small", type=int, default=20000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    sys.path.insert(0, HERE)
    from bench_engine import gpt2_state

    import torch

    big = [os.path.join(DATA, f"dist_{args.blocks}x{args.width}_{s}.safetensors") for s in (0, 1)]
    for seed, path in enumerate(big):
        _make(path, lambda seed=seed: gpt2_state(args.blocks, args.width, 50257, seed))
    small = [os.path.join(DATA, f"dist_small{args.small}_{s}.safetensors") for s in (0, 1)]
    for seed, path in enumerate(small):
        g = torch.Generator().manual_seed(seed)
        _make(path, lambda g=g: {f"t.{i}": torch.randn(64 + i % 7, generator=g) for i in range(args.small)})
    _warm(*big, *small)
    size = os.path.getsize(big[0]) / 1e9
    print(f"load: {os.getloadavg()}; torch {torch.__version__}; cores {os.cpu_count()}")

    one = [_launch(1, *big) for _ in range(args.runs)]
    two = [_launch(2, *big) for _ in range(args.runs)]
    t1 = statistics.median(r["wall"] for r in one)
    t2 = statistics.median(r["wall"] for r in two)
    print(f"row 1 scaling, {args.blocks} x {args.width} fp32 pair, {size:.2f} GB a side:")
    print(f"  1 rank x 1 thread : {t1:.3f} s")
    print(f"  2 ranks x 1 thread: {t2:.3f} s (exchange {statistics.median(r['exchange'] for r in two):.3f} s, "
          f"merge {statistics.median(r['merge'] for r in two):.3f} s)")
    print(f"  ratio 2 ranks / 1 rank: {t2 / t1:.2f} (issue target <= 0.6)")

    sm = [_launch(2, *small) for _ in range(args.runs)]
    overhead = statistics.median((r["exchange"] + r["merge"]) for r in sm)
    from torchdiff import api

    torch.set_num_threads(1)
    runs = []
    for _ in range(args.runs):
        t = time.perf_counter()
        api.compare(*small, device="cpu")
        runs.append(time.perf_counter() - t)
    single = statistics.median(runs)
    print(f"row 2 gather overhead, {args.small} small tensors, 2 ranks:")
    print(f"  exchange + merge: {overhead:.3f} s = {overhead / args.small * 1e6:.1f} us a tensor "
          f"(exchange {statistics.median(r['exchange'] for r in sm):.3f} s, merge "
          f"{statistics.median(r['merge'] for r in sm):.3f} s)")
    print(f"  single-process compare of the pair, 1 thread: {single:.3f} s = "
          f"{single / args.small * 1e6:.1f} us a tensor; overhead = {overhead / single:.2f} x of it")
    print(f"  2-rank compare wall (rank 0): {statistics.median(r['wall'] for r in sm):.3f} s")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], sys.argv[3])
    else:
        main()
