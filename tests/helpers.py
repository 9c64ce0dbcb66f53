"""Helpers shared by several test files (imported by name: tests/ is on sys.path)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).parent / "golden"
UPDATE_GOLDEN = os.environ.get("TORCHDIFF_UPDATE_GOLDEN") == "1"


def run(capsys, *argv) -> tuple[int, str, str]:
    """``torchdiff ARGV`` in-process (torchdiff.cli.main): (exit code, stdout, stderr) of
    this call alone (what was captured before it is dropped)."""
    from torchdiff.cli import main

    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def check_golden(name: str, text: str) -> None:
    """Compare ``text`` with tests/golden/NAME; TORCHDIFF_UPDATE_GOLDEN=1 rewrites it."""
    path = GOLDEN / name
    if UPDATE_GOLDEN:
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with TORCHDIFF_UPDATE_GOLDEN=1 to write it"
    assert text == path.read_text(), f"{name} differs from its golden output (TORCHDIFF_UPDATE_GOLDEN=1 refreshes it)"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models train far faster on one thread (and do not fight a busy machine).
    Autouse in every module that imports it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def figure_rows(report, ratios: bool = False) -> list[dict]:
    """Every TensorDiff of ``report`` as plain lists (shape, side stats, pair metrics;
    with ``ratios`` also rel_l2 and cosine), to compare runs figure by figure."""
    rows = []
    for d in report:
        row = {"name": d.name, "status": d.status}
        for side in ("old", "new"):
            s = getattr(d, side)
            row[side] = None if s is None else [list(s.shape), s.numel, s.mean, s.std, s.min, s.max, s.mean_abs,
                                                s.rms, s.zero_count, s.nan_count, s.inf_count]
        m = d.metrics
        row["metrics"] = None if m is None else [m.numel, m.equal, m.l2, m.norm_old, m.norm_new, m.max_abs,
                                                 m.mean_abs_diff, m.changed_count] + ([m.rel_l2, m.cosine] if ratios else [])
        rows.append(row)
    return rows


def memory_logger(pl):
    """A Lightning logger (of the ``lightning`` or ``pytorch_lightning`` package ``pl``
    belongs to) that keeps every ``log_metrics`` call in ``.rows``."""
    from_pkg = pl.__name__.split(".")[0]
    Logger = (__import__(f"{from_pkg}.pytorch.loggers", fromlist=["Logger"]) if from_pkg == "lightning"
              else __import__("pytorch_lightning.loggers", fromlist=["Logger"])).Logger

    class MemoryLogger(Logger):
        def __init__(self):
            super().__init__()
            self.rows = []

        @property
        def name(self):
            return "memory"

        @property
        def version(self):
            return 0

        def log_hyperparams(self, params, *args, **kwargs):
            pass

        def log_metrics(self, metrics, step=None):
            self.rows.append((step, dict(metrics)))

    return MemoryLogger()
