"""Checkpoints with known truth for the issue-4 analyses (architecture, memory,
anomalies, change summary).

A small transformer (4 blocks: attention q/k/v/o, two LayerNorms, a 2-layer MLP) is
really trained: ``pretrained()`` after a few Adam steps on one task, ``finetuned()``
after a few more on another, so (pretrained, finetuned) is a clean fine-tune pair.
Every injected defect starts from a copy of these. Built once per session (cached);
callers get fresh copies and may modify them.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import nn

VOCAB, HIDDEN, HEADS, INTERMEDIATE, BLOCKS, CLASSES, SEQ = 48, 32, 4, 64, 4, 10, 6


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(HIDDEN, HIDDEN)
        self.k_proj = nn.Linear(HIDDEN, HIDDEN)
        self.v_proj = nn.Linear(HIDDEN, HIDDEN)
        self.o_proj = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        split = lambda y: y.view(b, t, HEADS, HIDDEN // HEADS).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(HIDDEN // HEADS), -1)
        return self.o_proj((att @ v).transpose(1, 2).reshape(b, t, HIDDEN))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(HIDDEN)
        self.attn = Attention()
        self.norm2 = nn.LayerNorm(HIDDEN)
        self.mlp = nn.Sequential()
        self.mlp.fc1 = nn.Linear(HIDDEN, INTERMEDIATE)
        self.mlp.act = nn.GELU()
        self.mlp.fc2 = nn.Linear(INTERMEDIATE, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList(Block() for _ in range(BLOCKS))
        self.norm_f = nn.LayerNorm(HIDDEN)
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.layers:
            x = block(x)
        return self.head(self.norm_f(x).mean(1))


def _train(model: nn.Module, optimizer, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(VOCAB, CLASSES, generator=g)
    for _ in range(steps):
        tokens = torch.randint(0, VOCAB, (16, SEQ), generator=g)
        target = teacher[tokens].sum(1).argmax(1)
        loss = nn.functional.cross_entropy(model(tokens), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _copy(sd: dict) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


@lru_cache(maxsize=1)
def _run() -> tuple[dict, dict, dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add contention
    try:
        return _train_all()
    finally:
        torch.set_num_threads(threads)


def _train_all() -> tuple[dict, dict, dict]:
    torch.manual_seed(0)
    model = TinyTransformer()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    _train(model, optimizer, steps=30, seed=1)
    pre = _copy(model.state_dict())
    fine_opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    _train(model, fine_opt, steps=10, seed=2)
    fine = _copy(model.state_dict())
    opt_state = fine_opt.state_dict()
    opt = {"state": {i: _copy(s) for i, s in opt_state["state"].items()}, "param_groups": opt_state["param_groups"]}
    return pre, fine, opt


def pretrained() -> dict[str, torch.Tensor]:
    return _copy(_run()[0])


def finetuned() -> dict[str, torch.Tensor]:
    return _copy(_run()[1])


def training_checkpoint() -> dict:
    """A whole training checkpoint: model, Adam state (exp_avg, exp_avg_sq, step per parameter), step."""
    _, fine, opt = _run()
    return {"model": _copy(fine), "optimizer": {"state": {i: _copy(s) for i, s in opt["state"].items()},
                                                "param_groups": [dict(g) for g in opt["param_groups"]]},
            "step": 10, "lr": 1e-3}


def lora_merge(sd: dict[str, torch.Tensor], name: str, rank: int, seed: int = 0, scale: float = 0.05) -> dict:
    """``sd`` with W += B A merged into ``name`` (B: [out, rank], A: [rank, in])."""
    out = _copy(sd)
    w = out[name]
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(w.shape[0], rank, generator=g) * scale
    a = torch.randn(rank, w.shape[1], generator=g) * scale
    out[name] = w + b @ a
    return out
