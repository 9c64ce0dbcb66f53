"""One rank of the FSDP2 test (tests/test_distributed.py): a small model under
``fully_shard`` on gloo, trained a few steps with a CheckpointMonitor(process_group=...).
The reference is the single-process comparison of the FULL state_dicts before and after
(gathered here by the test with ``full_tensor()``, never by torchdiff). Writes
``OUT.rRANK`` (JSON) with what the test checks."""

import json
import sys
from functools import partial

import torch
import torch.distributed as dist
from torch import nn

import torchdiff
from helpers import figure_rows  # tests/ is sys.path[0] when this file runs
from torchdiff.callbacks import CheckpointMonitor

out = sys.argv[1]
mode = sys.argv[2] if len(sys.argv) > 2 else "all"  # "ties": only the tied-weights run (tests/test_callbacks.py)
torch.set_num_threads(1)
dist.init_process_group("gloo")
rank = dist.get_rank()
result = {"how": None}


def tied_run():
    """A model with tied weights (embedding = output layer) under fully_shard, trained 4
    steps with CheckpointMonitor(process_group=...); the full state_dicts at each step
    for the test's float64 reference."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 6)
            self.blocks = nn.ModuleList(nn.Linear(6, 6) for _ in range(2))
            self.norm = nn.LayerNorm(6)
            self.head = nn.Linear(6, 10, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, tokens):
            x = self.embed(tokens)
            for block in self.blocks:
                x = x + torch.tanh(block(x))
            return self.head(self.norm(x))

    torch.manual_seed(0)
    model = Tied()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)

    def full():
        return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().double().reshape(-1).tolist()
                for k, v in model.state_dict().items()}

    monitors = {keep: CheckpointMonitor(model, every=2, keep=keep, process_group=dist.group.WORLD)
                for keep in ("cpu", "device")}
    opt = torch.optim.AdamW(model.parameters(), lr=5e-2)
    g = torch.Generator().manual_seed(1)
    states = {0: full()}
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    start["head.weight"] = start["embed.weight"]  # one DTensor under both names, as the model holds it
    for step in range(1, 5):
        tokens = torch.randint(0, 10, (4, 5), generator=g)
        loss = nn.functional.cross_entropy(model(tokens).reshape(-1, 10), tokens.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        for m in monitors.values():
            m.step()
        states[step] = full()
    # A state_dict (no module to ask): the tie is seen through the DTensors' local shards.
    report = torchdiff.compare(start, model.state_dict(), process_group=dist.group.WORLD)
    return {
        "tied": model.head.weight is model.embed.weight,
        "state_dict_tied": sorted(d.name for d in report if d.extras.get("tied_to")),
        "states": states if rank == 0 else None,
        "memory_bytes": monitors["cpu"].memory_bytes(),
        "history": {keep: [{"step": r.step, "reference_step": r.reference_step, "total": r.total.to_dict(),
                            "layers": {k: v.to_dict() for k, v in r.layers.items()}, "counts": dict(r.counts),
                            "tied": sorted(d.name for d in m.last_report if d.extras.get("tied_to"))}
                           for r in m.history] for keep, m in monitors.items()},
    }


if mode == "ties":
    try:
        result["ties"] = tied_run()
    except Exception:  # noqa: BLE001
        import traceback

        result["error"] = traceback.format_exc()
    with open(f"{out}.r{rank}", "w") as f:
        json.dump(result, f, default=str)
    dist.destroy_process_group()
    sys.exit(0)

try:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 33), nn.ReLU(), nn.LayerNorm(33), nn.Linear(33, 7))
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    try:
        from torch.distributed.fsdp import fully_shard

        for layer in (model[0], model[3]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        result["how"] = "fully_shard"
    except Exception as e:  # noqa: BLE001 - fall back as the issue allows, and say so
        for name, p in list(model.named_parameters()):
            mod = model.get_submodule(name.rsplit(".", 1)[0])
            setattr(mod, name.rsplit(".", 1)[1], nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)])))
        result["how"] = f"distribute_tensor Shard(0) ({type(e).__name__}: {e})"

    def full():
        return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
                for k, v in model.state_dict().items()}

    before = full()
    local_bytes = sum(v.to_local().nbytes if isinstance(v, DTensor) else v.nbytes for v in model.state_dict().values())
    monitor = CheckpointMonitor(model, every=3, process_group=dist.group.WORLD, analyses=("show_layer_impact",))
    result["monitor_bytes"], result["local_bytes"] = monitor.memory_bytes(), local_bytes
    result["full_bytes"] = sum(v.nbytes for v in before.values())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    report = None
    for _ in range(3):
        x = torch.randn(8, 16, generator=g)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        report = monitor.step() or report
    after = full()
    sharded_report = torchdiff.compare({k: v for k, v in model.state_dict().items()},
                                       {k: v for k, v in model.state_dict().items()}, process_group=dist.group.WORLD)
    reference = torchdiff.compare(before, after, analyses=("show_layer_impact",))

    figures = partial(figure_rows, ratios=True)

    result["values"] = {k: [before[k].double().reshape(-1).tolist(), after[k].double().reshape(-1).tolist()]
                        for k in before}
    result["monitor"] = figures(report)
    result["reference"] = figures(reference)
    result["self"] = figures(sharded_report)
    # Replicate placements and plain tensors count once; a sharding mismatch on one
    # rank is every rank's error (no rank left waiting).
    from torch.distributed.tensor import Replicate

    torch.manual_seed(5)
    a = {"w": torch.randn(7, 5), "r": torch.randn(4), "p": torch.randn(3), "o": torch.randn(4096)}
    b = {k: v * 1.1 for k, v in a.items()}
    b["o"] = a["o"].clone()
    b["o"][0] = 1e6  # one outlier dominates ‖B‖: ⟨A,B⟩ from the norms would cancel

    def dt(s):
        return {"w": distribute_tensor(s["w"], mesh, [Shard(0)]), "r": distribute_tensor(s["r"], mesh, [Replicate()]),
                "p": s["p"], "o": distribute_tensor(s["o"], mesh, [Shard(0)])}

    da, db = dt(a), dt(b)
    result["mixed"] = figures(torchdiff.compare(da, db, process_group=dist.group.WORLD))
    result["mixed_reference"] = figures(torchdiff.compare(a, b))
    x, y = a["o"].double(), b["o"].double()
    result["outlier_cosine"] = float(x @ y / (x.norm() * y.norm()))
    if rank == 1:
        db["w"] = DTensor.from_local(torch.zeros(2, 5), mesh, [Shard(0)], run_check=False, shape=(7, 5), stride=(5, 1))
    try:
        torchdiff.compare(da, db, process_group=dist.group.WORLD)
        result["mismatch"] = None
    except torchdiff.TorchDiffError as e:
        result["mismatch"] = str(e)
except Exception:  # noqa: BLE001
    import traceback

    result["error"] = traceback.format_exc()
with open(f"{out}.r{rank}", "w") as f:
    json.dump(result, f, default=str)
dist.destroy_process_group()
