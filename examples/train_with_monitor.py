"""A plain PyTorch training loop watched by torchdiff's CheckpointMonitor.

    python examples/train_with_monitor.py [--steps 300] [--every 50] [--keep cpu|device|stats]
                                          [--reference previous|initial] [--save-dir DIR]

Every ``--every`` steps the monitor compares the live weights with its snapshot (the
previous report's, or the initial one) through torchdiff's engine and prints one
line; at the end the history is printed as a table: the update size per interval
(r_t = ‖θ_t − θ_{t−every}‖/‖θ_{t−every}‖), which layer moved most, and whether the
update is shrinking. Between report steps the monitor only counts steps.
"""

from __future__ import annotations

import argparse
import sys

import torch
from tabulate import tabulate
from torch import nn

from torchdiff.analyses import ANALYSES
from torchdiff.callbacks import CheckpointMonitor
from torchdiff.errors import TorchDiffError


class TinyNet(nn.Module):
    """A 2-block residual MLP with LayerNorm over token embeddings (as make_checkpoints.py)."""

    def __init__(self, vocab: int = 64, width: int = 32, blocks: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList(
            nn.ModuleDict({"norm": nn.LayerNorm(width), "fc1": nn.Linear(width, 4 * width),
                           "fc2": nn.Linear(4 * width, width)})
            for _ in range(blocks)
        )
        self.head = nn.Linear(width, 10)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens).mean(1)
        for block in self.layers:
            x = x + block["fc2"](torch.relu(block["fc1"](block["norm"](x))))
        return self.head(x)


def train(steps: int = 300, every: int = 50, keep: str = "cpu", reference: str = "previous",
          save_dir: str | None = None, seed: int = 0, quiet: bool = False) -> CheckpointMonitor:
    """Train TinyNet on a fixed random teacher; return the monitor (its history holds the figures)."""
    torch.manual_seed(seed)
    model = TinyNet()
    teacher = nn.Linear(64, 10)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    wanted = ["anomaly_detection"] if "anomaly_detection" in ANALYSES else []

    def on_report(step: int, report) -> None:
        if quiet:
            return
        record = monitor.history[-1]
        figure = (f"rel_l2={record.total.rel_l2:.4f} cosine={record.total.cosine:.6f}" if record.exact
                  else f"norm_change={record.total.norm_change:+.4f}")
        anomalies = report.analysis("anomaly_detection")
        found = f", anomalies={anomalies.headline.get('findings', 0)}" if anomalies is not None else ""
        loss = last["loss"].item()  # a host sync, but only on report steps
        print(f"step {step:>5} vs {record.reference_step:>5}: {figure}, loss={loss:.4f}{found}")

    monitor = CheckpointMonitor(model, every=every, reference=reference, keep=keep, analyses=wanted,
                                on_report=on_report, save_dir=save_dir)
    last: dict[str, torch.Tensor] = {}
    for _ in range(steps):
        tokens = torch.randint(0, 64, (32, 8))
        target = teacher(nn.functional.one_hot(tokens, 64).float().mean(1)).argmax(1)
        loss = nn.functional.cross_entropy(model(tokens), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        last["loss"] = loss.detach()
        monitor.step()
    return monitor


def summary(monitor: CheckpointMonitor) -> str:
    """The history as a table: one row per report."""
    rows = []
    for r in monitor.history:
        top = max(r.layers.items(), key=lambda kv: kv[1].rel_l2 if r.exact else abs(kv[1].norm_change))
        rows.append((r.step, r.reference_step, r.total.rel_l2 if r.exact else "n/a",
                     r.total.cosine if r.exact else "n/a", r.total.norm_change, top[0]))
    return tabulate(rows, headers=("step", "vs", "rel_l2", "cosine", "norm change", "layer moving most"),
                    floatfmt=".5f")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--keep", choices=("cpu", "device", "stats"), default="cpu")
    parser.add_argument("--reference", choices=("previous", "initial"), default="previous")
    parser.add_argument("--save-dir", default=None, help="also write the states at report steps here")
    args = parser.parse_args(argv)
    monitor = train(args.steps, args.every, args.keep, args.reference, args.save_dir)
    print()
    print(summary(monitor))
    exact = [r.total.rel_l2 for r in monitor.history if r.exact]
    if args.reference == "previous" and len(exact) >= 2:
        trend = "shrinking" if exact[-1] < exact[0] else "not shrinking"
        print(f"\nupdate size per {args.every} steps: {exact[0]:.4f} -> {exact[-1]:.4f} ({trend})")
    if args.save_dir:
        try:
            series = monitor.series_report()
        except TorchDiffError as e:  # torchdiff.series may be absent in this version
            print(f"\nseries report unavailable: {e}")
        else:
            print()
            print(series)
    return 0


if __name__ == "__main__":
    sys.exit(main())
