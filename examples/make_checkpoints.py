"""Make example checkpoints by really training a small model for a few steps.

Writes into OUT_DIR (default examples/data):
  step_000.safetensors ... step_200.safetensors   model weights every 50 steps
  train_step_100.pt, train_step_200.pt            whole training checkpoints:
                                                  model, Adam state, lr, epoch, loss
  step_200_int8.safetensors                       the final model quantized: int8 weights
                                                  with one float32 scale per output row
                                                  (``W_scale``), embedding cast to bf16
The task: a 2-block residual MLP with LayerNorm learns a fixed random teacher.
Seeded, so the files are the same on every run on one machine.
"""

from __future__ import annotations

import os
import sys

import torch
from safetensors.torch import save_file
from torch import nn


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class TinyNet(nn.Module):
    def __init__(self, vocab: int = 64, width: int = 32, blocks: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList(Block(width) for _ in range(blocks))
        self.head = nn.Linear(width, 10)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens).mean(1)
        for block in self.layers:
            x = block(x)
        return self.head(x)


def quantize_int8(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Symmetric per-channel int8 for 2-D weights, a bf16 cast for the embedding."""
    out = {}
    for name, w in state.items():
        w = w.detach()
        if name == "embed.weight":
            out[name] = w.to(torch.bfloat16)
        elif w.ndim == 2:
            scale = w.abs().amax(1) / 127
            out[name] = torch.round(w / scale[:, None]).to(torch.int8)
            out[name + "_scale"] = scale.contiguous()
        else:
            out[name] = w.contiguous()
    return out


def main(out_dir: str = "examples/data", steps: int = 200, every: int = 50) -> None:
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(0)
    model = TinyNet()
    teacher = nn.Linear(64, 10)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=100, gamma=0.5)
    loss = torch.tensor(float("nan"))
    for step in range(steps + 1):
        if step % every == 0:
            state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
            save_file(state, os.path.join(out_dir, f"step_{step:03d}.safetensors"))
            if step and step % 100 == 0:
                torch.save(
                    {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "lr": scheduler.get_last_lr()[0], "epoch": step // 100, "step": step, "loss": float(loss.detach())},
                    os.path.join(out_dir, f"train_step_{step:03d}.pt"),
                )
        if step == steps:
            break
        tokens = torch.randint(0, 64, (32, 8))
        target = teacher(nn.functional.one_hot(tokens, 64).float().mean(1)).argmax(1)
        loss = nn.functional.cross_entropy(model(tokens), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    save_file(quantize_int8(model.state_dict()), os.path.join(out_dir, f"step_{steps:03d}_int8.safetensors"))
    print(f"wrote {out_dir}: step_000..step_{steps:03d}.safetensors, train_step_100.pt, train_step_200.pt, step_200_int8.safetensors "
          f"(final loss {float(loss.detach()):.4f})")


if __name__ == "__main__":
    main(*sys.argv[1:2])
