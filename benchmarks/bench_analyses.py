"""How each analysis scales with the number of tensors: N and 10·N small tensors.

A checkpoint of many tensors (an MoE model's experts: 100,000 and more) must cost each
analysis time in proportion to the tensors, not to their square. For every analysis,
this run times ``torchdiff.compare(a, b, analyses=[name])`` plus its text on a generated
pair of N tensors and on one of 10·N (half 1-D ``blocks.{i}.param``, one role of many
members; half 2-D ``layers.{i}.mlp.up_proj.weight``), and prints the ratio of the two
times beside the same ratio for the plain comparison (no analysis) measured in this run.
Linear work gives about 10; a part quadratic in the tensors, 100 and more.

    .venv/bin/python benchmarks/bench_analyses.py            # N = 2,000
    .venv/bin/python benchmarks/bench_analyses.py --tensors 500 --runs 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torchdiff  # noqa: E402
from torchdiff.pipeline import analysis_names  # noqa: E402


def write_pair(folder: str, n: int) -> tuple[str, str]:
    g = torch.Generator().manual_seed(n)
    a = {}
    for i in range(n // 2):
        a[f"blocks.{i}.param"] = torch.randn(100, generator=g)
        a[f"layers.{i}.mlp.up_proj.weight"] = torch.randn(8, 16, generator=g)
    b = {k: v + 1e-2 * torch.randn(v.shape, generator=g) for k, v in a.items()}
    paths = os.path.join(folder, f"a{n}.safetensors"), os.path.join(folder, f"b{n}.safetensors")
    save_file(a, paths[0])
    save_file(b, paths[1])
    return paths


def seconds(pair: tuple[str, str], analyses: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        str(torchdiff.compare(*pair, analyses=analyses, device="cpu"))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=2000, help="N (the larger pair holds 10·N)")
    parser.add_argument("--runs", type=int, default=3, help="median of this many runs a figure")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as folder:
        small, large = write_pair(folder, args.tensors), write_pair(folder, 10 * args.tensors)
        rows = [("(none: the comparison)", [])] + [(name, [name]) for name in analysis_names]
        print(f"torchdiff analyses against the tensor count: N = {args.tensors:,} and {10 * args.tensors:,} tensors, "
              f"median of {args.runs}, {torch.get_num_threads()} threads, "
              f"load average {os.getloadavg()[0]:.2f}")
        print(f"| analysis | N: s | 10·N: s | ratio (linear ≈ 10) |\n|---|---|---|---|")
        for label, analyses in rows:
            t1, t10 = seconds(small, analyses, args.runs), seconds(large, analyses, args.runs)
            print(f"| {label} | {t1:.3f} | {t10:.3f} | {t10 / t1:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
