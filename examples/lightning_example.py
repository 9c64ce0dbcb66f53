"""PyTorch Lightning training with torchdiff's TorchDiffCallback.

    python examples/lightning_example.py [--steps 100] [--every 25] [--log-dir DIR]

The callback snapshots the model when training starts and, every ``--every``
optimizer steps, compares it with the previous snapshot through torchdiff's engine;
the figures (update rel_l2 of the whole model and of each layer, counts, anomaly
findings) go to ``pl_module.log_dict``, so to every logger of the Trainer — here a
CSVLogger whose metrics.csv is printed at the end.
"""

from __future__ import annotations

import argparse
import csv
import glob
import os
import sys
import tempfile

import torch
from torch import nn

try:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger
except ImportError:  # the older package name
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger

from torchdiff.analyses import ANALYSES
from torchdiff.integrations import lightning as torchdiff_lightning


class Regressor(pl.LightningModule):
    """A small MLP with BatchNorm (its running statistics are compared too)."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def make_data(n: int = 512, seed: int = 0) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x @ torch.randn(8, 1, generator=g)).tanh() + 0.05 * torch.randn(n, 1, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=True,
                                       generator=g)


def run(steps: int = 100, every: int = 25, log_dir: str | None = None, seed: int = 0):
    """Train; return (callback, path of the CSV metrics)."""
    pl.seed_everything(seed, verbose=False)
    log_dir = log_dir or tempfile.mkdtemp(prefix="torchdiff_lightning_")
    callback_cls = (torchdiff_lightning.TorchDiffCallback if pl.__name__.startswith("lightning")
                    else torchdiff_lightning.PLTorchDiffCallback)
    analyses = [n for n in ("anomaly_detection",) if n in ANALYSES]
    callback = callback_cls(every=every, analyses=analyses)
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, callbacks=[callback], logger=CSVLogger(log_dir, name="run"),
        log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(Regressor(), make_data(seed=seed))
    metrics = sorted(glob.glob(os.path.join(log_dir, "run", "**", "metrics.csv"), recursive=True))
    return callback, metrics[-1] if metrics else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--log-dir", default=None)
    args = parser.parse_args(argv)
    callback, metrics_csv = run(args.steps, args.every, args.log_dir)
    for r in callback.history:
        print(f"step {r.step:>4} vs {r.reference_step:>4}: update rel_l2={r.total.rel_l2:.4f}, "
              + ", ".join(f"{name} {f.rel_l2:.4f}" for name, f in r.layers.items()))
    if metrics_csv:
        with open(metrics_csv, newline="") as f:
            rows = [row for row in csv.DictReader(f) if row.get("torchdiff/global_rel_l2")]
        print(f"\n{metrics_csv}: {len(rows)} rows with torchdiff figures, e.g. "
              f"step {rows[-1]['step']} torchdiff/global_rel_l2={float(rows[-1]['torchdiff/global_rel_l2']):.4f}"
              if rows else f"\n{metrics_csv}: no torchdiff figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
