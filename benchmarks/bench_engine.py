"""Engine benchmark: torchdiff against the one-pass mmap floor and diffai-python.

Generates its inputs (seeded, GPT-2-shaped) under benchmarks/data/ (git-ignored),
then measures every row in this run, each timed figure the median of --runs fresh
processes, and prints one table. Usage:

    .venv/bin/python benchmarks/bench_engine.py            # full (about 7 GB of disk)
    .venv/bin/python benchmarks/bench_engine.py --quick    # small smoke run
    .venv/bin/python benchmarks/bench_engine.py --rows 1,2,3

diffai-python is measured when importable (``pip install diffai-python``; scripts/bench
installs it into .venv). Rows (issue 7):
 1 floor: one pass over each input through mmap, summed as int64, fresh process
 2 compare() in-process, full figure set, GPT-2-small fp32 and bf16 safetensors
 3 diffai.diff_paths on the fp32 pair, in-process
 4 the same model as .pt (zip) files
 5 20,000 small tensors (~80 MB a side)
 6 48 blocks of width 1024 (~2.6 GB a side) fp32
 7 whole-process CLI wall time (500 MB pair, tiny pair) and torch import time
 8 peak RSS of compare() on two torch.distributed.checkpoint (DCP) directories against
   the same weights as safetensors, and with every weight in 2 chunks as FSDP saves it
   (--dcp-mb MB a side, default 128; issue 13's target
   is 2 x 2 GB within 1.3x: --dcp-mb 2048)
 9 compare() on the fp32 pair with 2 threads against 1 thread (issue 14)
10 compare() on the fp32, bf16 and small pairs (small: with to_dict) while one core is
   busy: the row starts a busy-looping process, measures, and stops it; against the quiet
   times of rows 2 and 5 (target <= 1.6x)
11 where row 5's time goes: compare() and to_dict() on the small pair, each stage timed
   (open both files, pair, the engine's plan, reductions and assembly, the report, the
   JSON items), beside two floors measured in the same process: json.loads of both
   headers and the engine's block reductions alone (one thread, no bookkeeping)
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data")
PY = sys.executable


def gpt2_state(blocks: int, width: int, vocab: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=0.02):
        return torch.randn(*shape, generator=g) * scale

    sd = {"wte.weight": randn(vocab, width), "wpe.weight": randn(1024, width, scale=0.01)}
    for i in range(blocks):
        p = f"h.{i}."
        sd[p + "ln_1.weight"] = 1 + randn(width, scale=0.05)
        sd[p + "ln_1.bias"] = randn(width)
        sd[p + "attn.c_attn.weight"] = randn(width, 3 * width)
        sd[p + "attn.c_attn.bias"] = randn(3 * width)
        sd[p + "attn.c_proj.weight"] = randn(width, width)
        sd[p + "attn.c_proj.bias"] = randn(width)
        sd[p + "ln_2.weight"] = 1 + randn(width, scale=0.05)
        sd[p + "ln_2.bias"] = randn(width)
        sd[p + "mlp.c_fc.weight"] = randn(width, 4 * width)
        sd[p + "mlp.c_fc.bias"] = randn(4 * width)
        sd[p + "mlp.c_proj.weight"] = randn(4 * width, width)
        sd[p + "mlp.c_proj.bias"] = randn(width)
    sd["ln_f.weight"] = 1 + randn(width, scale=0.05)
    sd["ln_f.bias"] = randn(width)
    return sd


def perturbed(sd, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    return {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in sd.items()}


def small_state(n: int, size: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    return {f"block.{i}.param": torch.randn(size, generator=g) for i in range(n)}


def generate(quick: bool) -> dict[str, tuple[str, str]]:
    """Write the input pairs once; return {label: (old, new)}."""
    import torch
    from safetensors.torch import save_file

    os.makedirs(DATA, exist_ok=True)
    tag = "quick" if quick else "full"
    pairs = {
        "fp32": (f"{tag}_gpt2_a.safetensors", f"{tag}_gpt2_b.safetensors"),
        "bf16": (f"{tag}_gpt2_bf16_a.safetensors", f"{tag}_gpt2_bf16_b.safetensors"),
        "pt": (f"{tag}_gpt2_a.pt", f"{tag}_gpt2_b.pt"),
        "small": (f"{tag}_small_a.safetensors", f"{tag}_small_b.safetensors"),
        "large": (f"{tag}_large_a.safetensors", f"{tag}_large_b.safetensors"),
        "tiny": (f"{tag}_tiny_a.safetensors", f"{tag}_tiny_b.safetensors"),
    }
    pairs = {k: (os.path.join(DATA, a), os.path.join(DATA, b)) for k, (a, b) in pairs.items()}
    if all(os.path.exists(p) for ab in pairs.values() for p in ab):
        return pairs
    blocks, width, vocab = (2, 256, 5000) if quick else (12, 768, 50257)
    a = gpt2_state(blocks, width, vocab, 0)
    b = perturbed(a, 1)
    save_file(a, pairs["fp32"][0])
    save_file(b, pairs["fp32"][1])
    save_file({k: v.bfloat16() for k, v in a.items()}, pairs["bf16"][0])
    save_file({k: v.bfloat16() for k, v in b.items()}, pairs["bf16"][1])
    torch.save(a, pairs["pt"][0])
    torch.save(b, pairs["pt"][1])
    del a, b
    n_small = 2000 if quick else 20000
    a = small_state(n_small, 1000, 2)
    save_file(a, pairs["small"][0])
    save_file(perturbed(a, 3), pairs["small"][1])
    del a
    blocks, width, vocab = (4, 384, 5000) if quick else (48, 1024, 50257)
    a = gpt2_state(blocks, width, vocab, 4)
    save_file(a, pairs["large"][0])
    b = perturbed(a, 5)
    del a
    save_file(b, pairs["large"][1])
    del b
    a = {"w": torch.randn(16, 16), "b": torch.randn(16)}
    save_file(a, pairs["tiny"][0])
    save_file(perturbed(a, 6), pairs["tiny"][1])
    return pairs


def generate_dcp(mb: int) -> dict[str, tuple[str, str]]:
    """Two checkpoints of ``mb`` MB a side (fp32 [1024, 1024] weights and their biases),
    each written by torch.distributed.checkpoint.save (no process group), again with every
    weight in two row chunks (the layout of a 2-rank FSDP save), and as safetensors."""
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    base = os.path.join(DATA, f"dcp_{mb}mb")
    pairs = {"dcp": (base + "_a", base + "_b"), "dcp_split": (base + "_split_a", base + "_split_b"),
             "dcp_st": (base + "_a.safetensors", base + "_b.safetensors")}
    if all(os.path.exists(p) for ab in pairs.values() for p in ab):
        return pairs
    n = max(1, mb // 4)
    for i, side in enumerate("ab"):
        g = torch.Generator().manual_seed(10 + i)
        sd = {}
        for k in range(n):
            sd[f"layers.{k}.weight"] = torch.randn(1024, 1024, generator=g)
            sd[f"layers.{k}.bias"] = torch.randn(1024, generator=g)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save({"model": sd}, checkpoint_id=pairs["dcp"][i])
            # The layout of a 2-rank FSDP save: each weight in two row chunks.
            halves = {}
            for k, v in sd.items():
                if v.ndim == 2:
                    halves[f"{k}.__half0"], halves[f"{k}.__half1"] = v[:512].clone(), v[512:].clone()
                else:
                    halves[k] = v
            dcp.save({"model": halves}, checkpoint_id=pairs["dcp_split"][i])
        _join_halves(pairs["dcp_split"][i])
        save_file({f"model.{k}": v for k, v in sd.items()}, pairs["dcp_st"][i])
        del sd, halves
    return pairs


def _join_halves(path: str) -> None:
    """Rewrite a DCP directory's metadata so that ``X.__half0`` / ``X.__half1`` (rows
    0-511 and 512-1023) become two chunks of one tensor ``X`` (this benchmark's own file)."""
    import pickle

    import torch
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorStorageMetadata

    with open(os.path.join(path, ".metadata"), "rb") as f:
        md = pickle.load(f)
    for name in [n for n in md.state_dict_metadata if n.endswith(".__half0")]:
        whole = name[: -len(".__half0")]
        entry = md.state_dict_metadata.pop(name)
        md.state_dict_metadata.pop(whole + ".__half1")
        chunks = []
        for h in range(2):
            offset = torch.Size([512 * h, 0])
            chunks.append(ChunkStorageMetadata(offsets=offset, sizes=torch.Size([512, 1024])))
            md.storage_data[MetadataIndex(whole, offset)] = md.storage_data.pop(
                MetadataIndex(f"{whole}.__half{h}", [0, 0]))
        md.state_dict_metadata[whole] = TensorStorageMetadata(entry.properties, torch.Size([1024, 1024]), chunks)
    with open(os.path.join(path, ".metadata"), "wb") as f:
        pickle.dump(md, f)


# ---- measurements, each in a fresh process -------------------------------------

_FLOOR = r"""
import json, mmap, os, resource, sys, time
import torch
paths = sys.argv[1:]
t = time.perf_counter()
total = 0
for p in paths:
    with open(p, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        n = len(mm) // 8
        x = torch.frombuffer(mm, dtype=torch.int64, count=n)
        total += int(x.sum())
        del x
        mm.close()
print(json.dumps({"seconds": time.perf_counter() - t}))
"""

# Peak RSS of the measuring process: VmHWM, which exec resets. (ru_maxrss is carried
# over fork and exec on Linux: a child of this script would report at least this
# script's own peak, e.g. after it generated the inputs.)
_PEAK = r"""
def peak_rss_mb():
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
"""

_TORCHDIFF = _PEAK + r"""
import json, resource, sys, time, warnings
warnings.simplefilter("ignore")
import torch
import torchdiff
a, b = sys.argv[1:3]
if len(sys.argv) > 3:  # torch's intra-op threads (the engine's worker count)
    torch.set_num_threads(int(sys.argv[3]))
t = time.perf_counter()
report = torchdiff.compare(a, b, stats=True, device="cpu")
seconds = time.perf_counter() - t
items = report.to_dict()  # the JSON items, from the figures table's columns
with_dict = time.perf_counter() - t
assert len(report) > 0 and len(items) > 0
print(json.dumps({"seconds": seconds, "with_dict": with_dict, "rss_mb": peak_rss_mb()}))
"""

_DIFFAI = _PEAK + r"""
import json, resource, sys, time
import diffai
a, b = sys.argv[1:3]
t = time.perf_counter()
out = diffai.diff_paths(a, b)
seconds = time.perf_counter() - t
print(json.dumps({"seconds": seconds, "rss_mb": peak_rss_mb(), "items": len(out)}))
"""

_STAGES = r"""
import collections, functools, json, sys, time, warnings
warnings.simplefilter("ignore")
import torch
import torchdiff
from torchdiff import engine as E, pipeline
from torchdiff.formats import safetensors as S

spent = collections.defaultdict(float)

def timed(owner, name, label):
    func = getattr(owner, name)

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return func(*args, **kwargs)
        finally:
            spent[label] += time.perf_counter() - t

    setattr(owner, name, wrapper)

timed(pipeline, "open_checkpoint", "open")
timed(pipeline, "pair", "pair")
timed(pipeline, "build_report", "report")
timed(E.Engine, "_plan", "plan")
timed(E.Engine, "_reduce", "reduce")
timed(E.Engine, "_finish", "assemble")
a, b = sys.argv[1:3]
t = time.perf_counter()
report = torchdiff.compare(a, b, stats=True, device="cpu")
spent["compare"] = time.perf_counter() - t
t = time.perf_counter()
items = report.to_dict()  # kept, as in row 5: freeing 60,000 dicts is not part of to_dict
spent["to_dict"] = time.perf_counter() - t
result = dict(spent)  # what follows is not part of the run (and not added to it)
import gc
gc.disable()  # as during compare()
t = time.perf_counter()
for path in (a, b):
    S.read_header(path)
result["floor_json"] = time.perf_counter() - t
with torchdiff.load(a) as old, torchdiff.load(b) as new:
    from torchdiff.pairing import pair
    engine = E.Engine("cpu", workers=1)
    plan = engine._plan(pair(old, new))
    blocks = list(engine._blocks(plan.groups))
    torch.set_num_threads(1)
    t = time.perf_counter()
    for task in blocks:
        engine._block(task)
    result["floor_blocks"] = time.perf_counter() - t
print(json.dumps(result))
"""

_IMPORT_TORCH = r"""
import json, time
t = time.perf_counter()
import torch
print(json.dumps({"seconds": time.perf_counter() - t}))
"""


def _run(code: str, *args: str) -> dict:
    out = subprocess.run([PY, "-c", code, *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_of(runs: int, code: str, *args: str) -> dict:
    results = [_run(code, *args) for _ in range(runs)]
    return {k: statistics.median(r[k] for r in results) for k in results[0] if isinstance(results[0][k], (int, float))}


def wall(runs: int, argv: list[str]) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(argv, capture_output=True, check=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def size(*paths: str) -> int:
    return sum(sum(os.path.getsize(os.path.join(p, f)) for f in os.listdir(p)) if os.path.isdir(p)
               else os.path.getsize(p) for p in paths)


def warm(*paths: str) -> None:
    """Read the files once so every row measures from the page cache, like the floor."""
    paths = tuple(os.path.join(p, f) for p in paths if os.path.isdir(p) for f in os.listdir(p)) + tuple(
        p for p in paths if not os.path.isdir(p))
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    runs = 3
    rows = None
    dcp_mb = 128
    for i, a in enumerate(argv):
        if a == "--runs":
            runs = int(argv[i + 1])
        if a == "--dcp-mb":
            dcp_mb = int(argv[i + 1])
        if a == "--rows":
            rows = {int(x) for x in argv[i + 1].split(",")}
    want = (lambda r: rows is None or r in rows)
    load = os.getloadavg()
    pairs = generate(quick)
    if want(8):
        pairs.update(generate_dcp(dcp_mb))
    for ab in pairs.values():
        warm(*ab)
    try:
        import diffai  # noqa: F401

        have_diffai = True
    except ImportError:
        have_diffai = False

    import torch

    table: list[tuple[str, str]] = []
    figures: dict[str, float] = {}

    def floor(label: str) -> float:
        key = f"floor_{label}"
        if key not in figures:
            figures[key] = median_of(runs, _FLOOR, *pairs[label])["seconds"]
        return figures[key]

    def td(label: str) -> dict:
        key = f"td_{label}"
        if key not in figures:
            figures[key] = median_of(runs, _TORCHDIFF, *pairs[label])
        return figures[key]

    def gbs(label: str, seconds: float) -> float:
        return size(*pairs[label]) / seconds / 1e9

    if want(1):
        for label in ("fp32", "bf16", "pt", "small", "large"):
            s = floor(label)
            table.append((f"1 floor {label} ({size(*pairs[label]) / 1e9:.2f} GB)", f"{s:.3f} s, {gbs(label, s):.1f} GB/s"))
    if want(2):
        for label in ("fp32", "bf16"):
            r = td(label)
            frac = floor(label) / r["seconds"]
            table.append((f"2 torchdiff {label}", f"{r['seconds']:.3f} s, {gbs(label, r['seconds']):.2f} GB/s, "
                                                 f"{frac:.0%} of floor, peak RSS {r['rss_mb']:.0f} MB"))
    if want(3):
        if have_diffai:
            d = median_of(runs, _DIFFAI, *pairs["fp32"])
            r = td("fp32")
            table.append(("3 diffai-python fp32", f"{d['seconds']:.3f} s, peak RSS {d['rss_mb']:.0f} MB; "
                                                   f"torchdiff is {d['seconds'] / r['seconds']:.1f}x faster"))
        else:
            table.append(("3 diffai-python fp32", "not installed (pip install diffai-python)"))
    if want(4):
        r = td("pt")
        s = td("fp32")
        table.append(("4 torchdiff .pt (zip)", f"{r['seconds']:.3f} s, {gbs('pt', r['seconds']):.2f} GB/s, "
                                               f"{gbs('pt', r['seconds']) / gbs('fp32', s['seconds']):.0%} of safetensors GB/s"))
    if want(5):  # compare() plus to_dict() (issue 11), against row 2's compare()
        r = td("small")
        s = td("fp32")
        ratio = gbs("small", r["with_dict"]) / gbs("fp32", s["seconds"])
        table.append(("5 torchdiff small tensors, compare + to_dict",
                      f"{r['with_dict']:.3f} s (compare {r['seconds']:.3f} s), {gbs('small', r['with_dict']):.2f} GB/s, "
                      f"{ratio:.0%} of row 2's GB/s"))
    if want(6):
        r = td("large")
        s = td("fp32")
        linear = (r["seconds"] / s["seconds"]) / (size(*pairs["large"]) / size(*pairs["fp32"]))
        table.append(("6 torchdiff large", f"{r['seconds']:.3f} s, {floor('large') / r['seconds']:.0%} of floor, "
                                           f"time/bytes vs row 2 = {linear:.2f} (1.00 = linear), "
                                           f"peak RSS {r['rss_mb']:.0f} MB = {r['rss_mb'] / s['rss_mb']:.2f}x row 2"))
    if want(7):
        cli = [os.path.join(os.path.dirname(PY), "torchdiff")]
        big = wall(runs, cli + [*pairs["fp32"], "--stats"])
        tiny = wall(runs, cli + [*pairs["tiny"], "--stats"])
        imp = median_of(runs, _IMPORT_TORCH)["seconds"]
        table.append(("7 CLI wall time", f"500 MB pair {big:.2f} s; tiny pair {tiny:.2f} s; import torch {imp:.2f} s"))

    if want(8):
        r, s, x = td("dcp"), td("dcp_st"), td("dcp_split")
        table.append((f"8 DCP vs safetensors ({size(*pairs['dcp']) / 2e9:.2f} GB a side)",
                      f"peak RSS {r['rss_mb']:.0f} MB vs {s['rss_mb']:.0f} MB = {r['rss_mb'] / s['rss_mb']:.2f}x "
                      f"(target <= 1.3x); {r['seconds']:.2f} s vs {s['seconds']:.2f} s; weights in 2 chunks "
                      f"(FSDP's layout): {x['rss_mb']:.0f} MB = {x['rss_mb'] / s['rss_mb']:.2f}x, {x['seconds']:.2f} s"))

    if want(9):
        one = median_of(runs, _TORCHDIFF, *pairs["fp32"], "1")["seconds"]
        two = median_of(runs, _TORCHDIFF, *pairs["fp32"], "2")["seconds"]
        table.append(("9 fp32 pair, 2 threads vs 1", f"1 thread {one:.3f} s, 2 threads {two:.3f} s: "
                                                      f"{one / two:.2f}x faster with 2"))
    if want(10):
        labels = ("fp32", "bf16", "small")
        quiet = {label: td(label) for label in labels}
        busy_proc = subprocess.Popen([PY, "-c", "while True: pass"])
        try:
            time.sleep(0.5)
            busy = {label: median_of(runs, _TORCHDIFF, *pairs[label]) for label in labels}
        finally:
            busy_proc.kill()
            busy_proc.wait()
        for label in labels:
            key = "with_dict" if label == "small" else "seconds"
            q, b = quiet[label][key], busy[label][key]
            table.append((f"10 {label} pair, one core busy", f"{b:.3f} s against {q:.3f} s quiet: "
                                                           f"{b / q:.2f}x (target <= 1.6x)"))

    if want(11):
        r = median_of(runs, _STAGES, *pairs["small"])
        total = r["compare"] + r["to_dict"]
        stages = ("open", "pair", "plan", "reduce", "assemble", "report", "to_dict")
        rest = total - sum(r.get(k, 0.0) for k in stages)
        table.append(("11 small pair, where the time goes",
                      ", ".join(f"{k} {r.get(k, 0.0):.3f} s" for k in stages) + f", other {rest:.3f} s "
                      f"(total {total:.3f} s); floors: json.loads of both headers {r['floor_json']:.3f} s, "
                      f"block reductions alone {r['floor_blocks']:.3f} s"))

    from tabulate import tabulate

    print(f"torchdiff engine benchmark ({'quick' if quick else 'full'}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {runs} fresh processes, load average at start "
          f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}")
    print(tabulate(table, headers=["row", "result"], tablefmt="github"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
