"""CUDA benchmark and correctness check: torchdiff --device cuda against the CPU path
and against the measured pinned host->device bandwidth.

Run on a machine with an NVIDIA GPU:

    .venv/bin/python benchmarks/bench_gpu.py              # 2 x ~5 GB bf16 pair
    .venv/bin/python benchmarks/bench_gpu.py --gb 0.5     # smaller

It writes a seeded bf16 pair (about --gb GB a side) under benchmarks/data/, then:
 1. measures pinned host->device bandwidth (copy of a 1 GiB pinned buffer, median of 5);
 2. runs torchdiff.compare(device="cuda") and device="cpu" on the pair (median of 3
    in-process runs after one warm-up) and checks every figure of every tensor on the
    two paths against each other (relative tolerance 1e-5 on moments and norms);
 3. prints GB/s of input for both, and CUDA's fraction of the H2D bandwidth.
Exit status 1 when a figure disagrees; 2 when there is no CUDA device.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data")


def make_pair(gb: float) -> tuple[str, str]:
    import torch
    from safetensors.torch import save_file

    os.makedirs(DATA, exist_ok=True)
    width = 4096
    rows = 11008
    per_tensor = width * rows * 2  # bf16 bytes
    n = max(1, int(gb * 1e9 // per_tensor))
    paths = (os.path.join(DATA, f"gpu_{gb:g}gb_a.safetensors"), os.path.join(DATA, f"gpu_{gb:g}gb_b.safetensors"))
    if all(os.path.exists(p) for p in paths):
        return paths
    g = torch.Generator().manual_seed(0)
    a = {f"layers.{i}.mlp.weight": (torch.randn(rows, width, generator=g) * 0.02).bfloat16() for i in range(n)}
    a["norm.weight"] = (1 + 0.01 * torch.randn(width, generator=g)).bfloat16()
    save_file(a, paths[0])
    b = {k: (v.float() + 1e-3 * torch.randn(v.shape, generator=g)).bfloat16() for k, v in a.items()}
    del a
    save_file(b, paths[1])
    return paths


def h2d_bandwidth() -> float:
    import torch

    n = 1 << 30
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(5):
        torch.cuda.synchronize()
        t = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return n / statistics.median(times) / 1e9


def timed(a: str, b: str, device: str):
    import torchdiff

    torchdiff.compare(a, b, stats=True, device=device)  # warm-up: CUDA context, kernels
    times, report = [], None
    for _ in range(3):
        t = time.perf_counter()
        report = torchdiff.compare(a, b, stats=True, device=device)
        times.append(time.perf_counter() - t)
    return statistics.median(times), report


def close(x: float, y: float, rtol: float = 1e-5, atol: float = 1e-9) -> bool:
    if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
        return True
    return abs(x - y) <= atol + rtol * max(abs(x), abs(y))


def main(argv: list[str]) -> int:
    import torch

    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here", file=sys.stderr)
        return 2
    gb = float(argv[argv.index("--gb") + 1]) if "--gb" in argv else 5.0
    a, b = make_pair(gb)
    size = os.path.getsize(a) + os.path.getsize(b)
    for p in (a, b):
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass
    bw = h2d_bandwidth()
    t_cpu, cpu = timed(a, b, "cpu")
    t_gpu, gpu = timed(a, b, "cuda")
    bad = []
    for dc, dg in zip(cpu, gpu):
        assert dc.name == dg.name and dc.status == dg.status, (dc.name, dg.name)
        for side in ("old", "new"):
            sc, sg = getattr(dc, side), getattr(dg, side)
            for f in ("mean", "std", "min", "max", "mean_abs", "rms"):
                if not close(getattr(sc, f), getattr(sg, f)):
                    bad.append(f"{dc.name} {side}.{f}: cpu={getattr(sc, f)!r} cuda={getattr(sg, f)!r}")
        for f in ("l2", "rel_l2", "cosine", "max_abs", "mean_abs_diff"):
            if not close(getattr(dc.metrics, f), getattr(dg.metrics, f)):
                bad.append(f"{dc.name} {f}: cpu={getattr(dc.metrics, f)!r} cuda={getattr(dg.metrics, f)!r}")
    print(f"card: {torch.cuda.get_device_name()}, torch {torch.__version__}, input {size / 1e9:.2f} GB")
    print(f"pinned host->device bandwidth: {bw:.1f} GB/s")
    print(f"cpu : {t_cpu:.3f} s, {size / t_cpu / 1e9:.2f} GB/s")
    print(f"cuda: {t_gpu:.3f} s, {size / t_gpu / 1e9:.2f} GB/s = {size / t_gpu / 1e9 / bw:.0%} of H2D bandwidth")
    print(f"figures checked: {len(cpu)} tensors, {len(bad)} disagreements")
    for line in bad[:20]:
        print("  " + line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
