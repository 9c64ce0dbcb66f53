"""Text tables of many tensors: torchdiff's simple_table against tabulate, same cells.

`torchdiff inspect` prints one row per tensor (10 columns). On a checkpoint of 100,000
tensors (an MoE model's experts) that is 1,000,000 cells. Measured in this run, on the
cells inspect formats for a generated safetensors file of --tensors tensors:

1. tabulate(cells, tablefmt="simple", disable_numparse=True), the reference and the
   baseline (it detects a type for every cell even with number parsing off);
2. torchdiff.render.text.simple_table on the same cells (the lines must be identical);
3. the whole `torchdiff inspect FILE` in a fresh process (wall time, median of --runs).

    .venv/bin/python benchmarks/bench_text.py --tensors 100000 --runs 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from safetensors.torch import save_file
from tabulate import tabulate

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torchdiff  # noqa: E402
from torchdiff.render.text import _shape, num, printable, simple_table  # noqa: E402


def cells_of(path: str) -> tuple[list[str], list[list[str]]]:
    """The header and cells `torchdiff inspect` formats for ``path``."""
    fig = torchdiff.inspect(path).figures
    s = fig.new
    cols = [getattr(s, f).tolist() for f in ("numel", "mean", "std", "min", "max", "nan_count", "inf_count")]
    rows = [[printable(n), _shape(shape), dtype, *map(num, values)]
            for n, shape, dtype, *values in zip(fig.names, s.shape, s.dtype, *cols)]
    return ["name", "shape", "dtype", "params", "mean", "std", "min", "max", "nan", "inf"], rows


def best(func, runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        func()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tensors", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "many.safetensors")
        g = torch.Generator().manual_seed(0)
        save_file({f"layer.{i}.w": torch.randn(4, generator=g) for i in range(args.tensors)}, path)
        headers, rows = cells_of(path)
        reference = tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True).splitlines()
        assert simple_table(headers, rows) == reference, "simple_table differs from tabulate"
        base = best(lambda: tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True), args.runs)
        fast = best(lambda: simple_table(headers, rows), args.runs)
        cli = os.path.join(os.path.dirname(sys.executable), "torchdiff")
        walls = []
        for _ in range(args.runs):
            t = time.perf_counter()
            subprocess.run([cli, "inspect", path], check=True, stdout=subprocess.DEVNULL)
            walls.append(time.perf_counter() - t)
    cells = len(rows) * len(headers)
    print(f"{args.tensors:,} tensors, {cells:,} cells, load average {os.getloadavg()[0]:.2f}")
    print(f"tabulate (baseline)      {base:.3f} s")
    print(f"simple_table (same text) {fast:.3f} s  = {base / fast:.1f}x faster")
    print(f"torchdiff inspect, whole process: {statistics.median(walls):.2f} s (median of {args.runs})")


if __name__ == "__main__":
    main()
