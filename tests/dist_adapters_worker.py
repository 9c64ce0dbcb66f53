"""One rank of the adapters-under-FSDP2 test (tests/test_distributed.py), 2 gloo ranks.

1. Lightning, for real: ``Trainer(strategy=ModelParallelStrategy(...))`` on the CPU, the
   LightningModule's ``configure_model`` applying ``fully_shard`` (FSDP2), with
   ``TorchDiffCallback``. (Lightning's ``FSDPStrategy`` is FSDP1 and needs a GPU.)
2. The HF Trainer callback, its hooks driven as the Trainer drives them (the Trainer's
   FSDP needs a GPU: on the CPU accelerate leaves the model unsharded), on a
   ``fully_shard`` model, with the Trainer's own ``TrainerState``/``TrainerControl``.
3. The HF callback with a plain (DDP-like, replicated) model: rank zero monitors alone.

The reference is always the FULL state_dicts at each step, gathered here by the test
(``full_tensor()``), never by torchdiff, and compared in one process. At every step
each rank's ``control.should_log`` is all-gathered: the Trainer's log step is a
collective, so the ranks must agree. Writes ``OUT.rRANK`` (JSON).
"""

import json
import os
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch import nn

from helpers import figure_rows, memory_logger  # tests/ is sys.path[0] when this file runs

out = sys.argv[1]
mode = sys.argv[2] if len(sys.argv) > 2 else "all"  # "lightning_ddp": only that run (tests/test_integrations.py)
torch.set_num_threads(1)
if mode == "lightning_ddp":  # a rank left waiting on the other fails in a minute, not at the test's timeout
    from datetime import timedelta

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
else:
    dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
result = {}


def full(module):
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            for k, v in module.state_dict().items()}


def record_of(record):
    return {"step": record.step, "reference_step": record.reference_step, "rel_l2": record.total.rel_l2,
            "l2": record.total.l2, "layers": {k: v.rel_l2 for k, v in record.layers.items()},
            "figures": figure_rows(record.report)}


def agreed(flag: bool) -> list[bool]:
    """Every rank's flag (as the Trainer's log step is a collective, they must agree)."""
    t = torch.tensor([int(flag)])
    got = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(got, t)
    return [bool(g.item()) for g in got]


def states_json(states):
    return {str(s): {k: v.double().reshape(-1).tolist() for k, v in sd.items()} for s, sd in states.items()}


# ---- 0. Lightning, DDP: rank zero monitors, every rank can use the figures ------------------
def lightning_ddp(log_with: str) -> dict:
    """A real Trainer with strategy="ddp" on 2 CPU ranks, EarlyStopping on the figure the
    docs name; what each rank has in ``trainer.callback_metrics`` and its loggers."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import EarlyStopping

    from torchdiff.integrations.lightning import TorchDiffCallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 4, generator=g), torch.randn(32, 1, generator=g))
    callback = TorchDiffCallback(every=2, log_with=log_with)
    stop = EarlyStopping(monitor="torchdiff/global_rel_l2", check_on_train_epoch_end=True, patience=100)
    logger = memory_logger(pl)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(accelerator="cpu", devices=world, strategy="ddp", max_epochs=2, logger=logger,
                         callbacks=[callback, stop], enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=8))
    return {
        "global_step": trainer.global_step,
        "has_monitor": callback.monitor is not None,
        "history": [(r.step, r.reference_step, r.total.rel_l2) for r in callback.history],
        "callback_metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("torchdiff/")},
        "best_score": float(stop.best_score),
        "logged": [s for s, m in logger.rows if "torchdiff/global_rel_l2" in m],
    }


def write_result(teardown: bool = True) -> None:
    """This rank's results to ``<out>.r<rank>``; then the process group torn down."""
    with open(f"{out}.r{rank}", "w") as f:
        json.dump(result, f, default=str)
    if teardown:
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - Lightning may have torn the group down already
            pass


if mode == "lightning_ddp":
    for log_with in ("loggers", "log_dict"):
        try:
            result[log_with] = lightning_ddp(log_with)
        except Exception:  # noqa: BLE001
            import traceback

            result[log_with] = {"error": traceback.format_exc()}
            write_result(teardown=False)
            os._exit(1)  # at once: the other rank's collective fails instead of waiting
    write_result()
    sys.exit(0)


# ---- 1. Lightning, ModelParallelStrategy (FSDP2) ------------------------------------------
try:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import ModelParallelStrategy

    from torchdiff.integrations.lightning import TorchDiffCallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(16, 33), nn.ReLU(), nn.LayerNorm(33), nn.Linear(33, 7))

        def configure_model(self):
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for layer in (self.net[0], self.net[3]):
                fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

        def training_step(self, batch, batch_idx):
            return self.net(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)


    states: dict[int, dict] = {}

    class Capture(pl.Callback):  # full state_dicts, for the reference (a collective: every rank)
        def on_train_start(self, trainer, pl_module):
            states[trainer.global_step] = full(pl_module)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            states[trainer.global_step] = full(pl_module)

    reports = []
    callback = TorchDiffCallback(every=2, analyses=("show_layer_impact",), keep_reports=True,
                                 on_report=lambda step, report: reports.append(step))
    logger = memory_logger(pl)
    pl.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 16, generator=g)), batch_size=8)
    trainer = pl.Trainer(accelerator="cpu", devices=world, max_steps=4, logger=logger,
                         strategy=ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1),
                         callbacks=[callback, Capture()], enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(Module(), data)
    result["lightning"] = {
        "sharded": callback.sharded,
        "dtensors": [type(p).__name__ for p in callback.monitor.model.parameters()],
        "history": [record_of(r) for r in callback.history],
        "on_report": reports,
        "logged": [(s, {k: v for k, v in m.items() if k.startswith("torchdiff/")}) for s, m in logger.rows
                   if any(k.startswith("torchdiff/") for k in m)],
        "callback_metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("torchdiff/")},
        "scalars": callback.history[-1].scalars() if callback.history else None,
        "memory_bytes": callback.monitor.memory_bytes(),
        "states": states_json(states),
    }
except ImportError as e:
    result["lightning"] = {"skipped": str(e)}
except Exception:  # noqa: BLE001
    import traceback

    result["lightning"] = {"error": traceback.format_exc()}


# ---- 2. and 3. the HF Trainer callback's hooks, FSDP2 and DDP-like -------------------------
def drive_hf(sharded: bool, save_dir: str):
    from transformers import TrainerControl, TrainerState

    from torchdiff.integrations.transformers import TorchDiffCallback

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 5))
    if sharded:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    from torch.distributed.tensor import DTensor

    local_bytes = sum(v.to_local().nbytes if isinstance(v, DTensor) else v.nbytes for v in model.state_dict().values())
    reports = []
    cb = TorchDiffCallback(every=2, keys="all", analyses=("show_layer_impact",), keep_reports=True,
                           on_report=lambda step, report: reports.append(step))
    args = SimpleNamespace(output_dir=save_dir)
    state = TrainerState(is_world_process_zero=rank == 0, is_local_process_zero=rank == 0)
    control = TrainerControl()
    cb.on_train_begin(args, state, control, model=model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(10 + (rank if not sharded else 0))
    states = {0: full(model)}
    should_log, logs_seen = [], []
    for step in range(1, 6):
        x = torch.randn(6, 12, generator=g)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        if not sharded:  # DDP: gradients averaged, replicas stay equal
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
        opt.step()
        state.global_step = step
        control = cb.on_step_end(args, state, control) or control
        states[step] = full(model)
        flags = agreed(bool(control.should_log))
        should_log.append(flags)
        if all(flags):  # the Trainer's log step: all-gathers the loss, then on_log
            logs = {"loss": float(loss)}
            state.log_history.append({**logs, "step": step})
            cb.on_log(args, state, control, logs=logs)
            logs_seen.append((step, {k: v for k, v in logs.items() if k.startswith("torchdiff/")}))
            control.should_log = False
        if step == 3:  # a checkpoint off the every=2 grid: compared, not recorded
            folder = os.path.join(save_dir, "checkpoint-3")
            if rank == 0:
                os.makedirs(folder, exist_ok=True)
            dist.barrier()
            cb.on_save(args, state, control)
    out = {"sharded": cb.sharded, "has_monitor": cb.monitor is not None, "should_log": should_log,
           "logs": logs_seen, "on_report": reports,
           "history": [record_of(r) for r in cb.history],
           "log_history": [{k: v for k, v in e.items() if k.startswith("torchdiff/") or k == "step"}
                           for e in state.log_history]}
    out["states"] = states_json(states) if rank == 0 else None
    if cb.monitor is not None:
        out["memory_bytes"] = cb.monitor.memory_bytes()
        out["local_bytes"] = local_bytes
    return out


try:
    import transformers  # noqa: F401

    base = os.path.dirname(out)
    result["hf_fsdp2"] = drive_hf(True, os.path.join(base, "hf_fsdp2"))
    result["hf_ddp"] = drive_hf(False, os.path.join(base, "hf_ddp"))
except ImportError as e:
    result["hf_fsdp2"] = result["hf_ddp"] = {"skipped": str(e)}
except Exception:  # noqa: BLE001
    import traceback

    result["hf_fsdp2"] = {"error": traceback.format_exc()}

write_result()
