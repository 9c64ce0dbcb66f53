"""Run under torchrun (2 ranks, gloo, CPU) by tests/test_formats_dcp.py: trains a small
model sharded with FSDP2 (``fully_shard``; DTensor-sharded parameters where fully_shard
does not run on CPU) and Adam, and after each of two steps saves

- ``<out>/dcp_<step>``: model + optimizer state from ``get_state_dict``, through
  ``torch.distributed.checkpoint.save`` (each rank writes its own shards);
- ``<out>/full_<step>.safetensors`` (rank 0): the same values gathered into full tensors,
  under the same names, written with the safetensors library.

Usage: python -m torch.distributed.run --nproc-per-node 2 ... dcp_fsdp_worker.py OUT
"""

import os
import sys
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

warnings.filterwarnings("ignore")


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
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    how = "fully_shard"
    try:
        from torch.distributed.fsdp import fully_shard

        for layer in (model[0], model[2]):
            fully_shard(layer)
        fully_shard(model)
    except Exception as e:  # noqa: BLE001 - fall back to DTensor parameters, said in the output
        how = f"distribute_tensor ({type(e).__name__})"
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for module in (model[0], model[2]):
            for name, p in list(module.named_parameters()):
                setattr(module, name, torch.nn.Parameter(distribute_tensor(p.data, mesh, [Shard(0)])))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 16, generator=g), torch.randn(64, 8, generator=g)
    for step in (1, 2):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=os.path.join(out, f"dcp_{step}"))
        fmsd, fosd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            from safetensors.torch import save_file

            tensors = {}
            flat("model", fmsd, tensors)
            flat("optim.state", fosd["state"], tensors)
            save_file(tensors, os.path.join(out, f"full_{step}.safetensors"))
        dist.barrier()
    if rank == 0:
        print(f"sharded with {how}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
