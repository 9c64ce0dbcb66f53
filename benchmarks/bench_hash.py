"""Fingerprint benchmark: which hash ``torchdiff hash`` uses, measured against the mmap floor.

Writes one seeded float32 safetensors file (default 384 MB) under benchmarks/data/
(git-ignored), reads it once to warm the page cache, then times, in this run and on the
same mapped bytes, each a median of --runs passes:

  floor       one pass over the mapping, summed as int64 (bench_engine.py row 1's floor)
  xxh3_128    xxhash.xxh3_128 (package ``xxhash``), one call per tensor on its mapped bytes
  blake3      blake3.blake3 (package ``blake3``), single-threaded, the same way
  blake3 mt   blake3.blake3(max_threads=AUTO): the Rust crate's own threads
  blake2b     hashlib.blake2b(digest_size=16), the standard library's fastest
  manifest    torchdiff.fingerprint(path): the chosen hash plus the figures (norm,
              sum, min, max) of every tensor, i.e. what ``torchdiff hash`` costs
  verify      torchdiff.verify(manifest, path) on the same file: equal tensors are
              only hashed (their figures are the manifest's), i.e. ``torchdiff verify``

and prints GB/s and the share of the floor for each. The chosen hash must reach
≥ 50 % of the floor (docs/MANIFEST.md records the run). Usage:

    .venv/bin/python benchmarks/bench_hash.py [--mb 384] [--runs 3]
"""

from __future__ import annotations

import hashlib
import mmap
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data")


def make(mb: int) -> str:
    import torch
    from safetensors.torch import save_file

    path = os.path.join(DATA, f"hash_{mb}mb.safetensors")
    if os.path.exists(path):
        return path
    os.makedirs(DATA, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    per = 4 * 1024 * 1024  # 16 MB tensors, plus a few small ones
    tensors = {f"layers.{i}.weight": torch.randn(per, generator=g) for i in range(max(1, mb // 16))}
    for i in range(64):
        tensors[f"layers.{i}.bias"] = torch.randn(1024, generator=g)
    save_file(tensors, path)
    return path


def spans(path: str):
    """(mapping, [(begin, end)]) of every tensor's bytes in a safetensors file."""
    import json
    import struct

    f = open(path, "rb")
    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    (n,) = struct.unpack("<Q", mm[:8])
    header = json.loads(mm[8:8 + n])
    base = 8 + n
    out = [(base + v["data_offsets"][0], base + v["data_offsets"][1])
           for k, v in header.items() if k != "__metadata__"]
    return f, mm, out


def timed(runs: int, fn) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv: list[str]) -> int:
    mb, runs = 384, 3
    for i, a in enumerate(argv):
        if a == "--mb":
            mb = int(argv[i + 1])
        if a == "--runs":
            runs = int(argv[i + 1])
    import torch
    from tabulate import tabulate

    path = make(mb)
    size = os.path.getsize(path)
    f, mm, regions = spans(path)
    view = memoryview(mm)
    with open(path, "rb") as g:  # warm the page cache
        while g.read(1 << 24):
            pass

    def floor():
        x = torch.frombuffer(mm, dtype=torch.int64, count=len(mm) // 8)
        int(x.sum())

    def per_tensor(make_hasher):
        def run():
            for b, e in regions:
                h = make_hasher()
                h.update(view[b:e])
                h.digest()
        return run

    rows: list[tuple[str, float]] = [("floor (mmap, int64 sum)", timed(runs, floor))]
    try:
        import xxhash

        rows.append(("xxh3_128 (xxhash)", timed(runs, per_tensor(xxhash.xxh3_128))))
    except ImportError:
        rows.append(("xxh3_128 (xxhash)", float("nan")))
    try:
        import blake3

        rows.append(("blake3 (blake3, 1 thread)", timed(runs, per_tensor(blake3.blake3))))
        rows.append(("blake3 (blake3, max_threads=AUTO)",
                     timed(runs, per_tensor(lambda: blake3.blake3(max_threads=blake3.blake3.AUTO)))))
    except ImportError:
        rows.append(("blake3", float("nan")))
    rows.append(("blake2b-128 (hashlib)", timed(runs, per_tensor(lambda: hashlib.blake2b(digest_size=16)))))

    import torchdiff

    manifest = torchdiff.fingerprint(path)
    rows.append(("torchdiff.fingerprint (hash + figures)", timed(runs, lambda: torchdiff.fingerprint(path))))
    rows.append(("torchdiff.verify (all equal: hash only)", timed(runs, lambda: torchdiff.verify(manifest, path))))
    view.release()
    mm.close()
    f.close()
    floor_s = rows[0][1]
    table = [(name, f"{s:.3f}", f"{size / s / 1e9:.2f}", f"{floor_s / s:.0%}") for name, s in rows]
    print(f"fingerprint benchmark: {size / 1e6:.0f} MB safetensors from the page cache, torch "
          f"{torch.__version__}, {torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs, median of {runs}")
    print(tabulate(table, headers=["row", "seconds", "GB/s", "of floor"], tablefmt="github"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
