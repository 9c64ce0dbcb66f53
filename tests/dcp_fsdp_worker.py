"""Run under torchrun (2 ranks, gloo, CPU) by tests/test_formats_dcp.py: trains a small
transformer-like model sharded with FSDP2 (``fully_shard``; DTensor-sharded parameters
where fully_shard does not run on CPU) and Adam, and after each of two steps saves

- ``<out>/dcp_<step>``: model + optimizer state from ``get_state_dict`` as
  ``{"model": ..., "optim": ...}``, plus what torchtitan saves beside them (a train
  state, the lr scheduler's state_dict, the RNG state, and each rank's dataloader
  state as pickled bytes under ``dataloader.dp_rank_<rank>``), through
  ``torch.distributed.checkpoint.save`` (each rank writes its own shards);
- ``<out>/full_<step>.safetensors`` (rank 0): the model and optimizer tensors gathered
  into full tensors, under the same names, written with the safetensors library;
- ``<out>/model_<step>.safetensors`` (rank 0): the gathered model alone, under its own
  names (``embed.weight``), as an export writes it.

The model: a token embedding of 37 rows (not divisible by the 2 ranks: chunks of 19 and
18 rows) tied to the output head, q/k/v/o projections, LayerNorms, an MLP whose ``up``
projection is bfloat16 (its own ``fully_shard`` group: FSDP2 wants one dtype a group).

Usage: python -m torch.distributed.run --nproc-per-node 2 ... dcp_fsdp_worker.py OUT
"""

import os
import pickle
import sys
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

warnings.filterwarnings("ignore")

VOCAB, WIDTH, HIDDEN = 37, 12, 21


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.q, self.k, self.v, self.o = (nn.Linear(WIDTH, WIDTH) for _ in range(4))
        self.up = nn.Linear(WIDTH, HIDDEN).to(torch.bfloat16)
        self.down = nn.Linear(HIDDEN, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        att = torch.softmax(self.q(y) @ self.k(y).transpose(-1, -2) / WIDTH**0.5, -1) @ self.v(y)
        x = x + self.o(att)
        return x + self.down(torch.relu(self.up(x.to(torch.bfloat16))).float())


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.block = Block()
        # (not "norm": gradient_analysis maps fqn-keyed Adam state by name suffix, and
        # "norm.weight" would then also match "block.norm.weight")
        self.norm_out = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm_out(self.block(self.embed(tokens))))


def flat(prefix, obj, out):
    if isinstance(obj, dict):
        for k, v in obj.items():
            flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(obj, torch.Tensor):
        out[prefix] = obj.detach().clone().contiguous()


def main() -> None:
    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = TinyLM()
    how = "fully_shard"
    try:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model.block.up)
        fully_shard(model.block)
        fully_shard(model)
    except Exception as e:  # noqa: BLE001 - fall back to DTensor parameters, said in the output
        how = f"distribute_tensor ({type(e).__name__})"
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for module in model.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                setattr(module, name, nn.Parameter(distribute_tensor(p.data, mesh, [Shard(0)])))
        model.head.weight = model.embed.weight
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, VOCAB, (4, 9), generator=g), torch.randint(0, VOCAB, (4, 9), generator=g)
    for step in (1, 2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1)).backward()
        opt.step()
        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optim": osd, "train_state": {"step": step, "tokens_seen": 36 * step},
                 "lr_scheduler": sched.state_dict(), "rng": torch.get_rng_state(),
                 "dataloader": {f"dp_rank_{rank}": pickle.dumps({"sample": 4 * step + rank, "epoch": 0})}}
        dcp.save(state, checkpoint_id=os.path.join(out, f"dcp_{step}"))
        sched.step()
        fmsd, fosd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            from safetensors.torch import save_file

            tensors = {}
            flat("model", fmsd, tensors)
            flat("optim.state", fosd["state"], tensors)
            save_file(tensors, os.path.join(out, f"full_{step}.safetensors"))
            weights = {}
            flat("", fmsd, weights)  # the model alone, as an export names it
            save_file(weights, os.path.join(out, f"model_{step}.safetensors"))
        dist.barrier()
    if rank == 0:
        print(f"sharded with {how}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
