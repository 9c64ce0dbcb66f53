"""TensorBoard and W&B adapters: what they log is read back from the files the real
libraries wrote (TensorBoard's EventAccumulator; the records of an offline W&B run)."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import one_thread  # noqa: F401  (autouse fixture)
from torchdiff import compare
from torchdiff.callbacks import CheckpointMonitor
from torchdiff.integrations import _figures

REPO = Path(__file__).resolve().parent.parent


def states():
    g = torch.Generator().manual_seed(0)
    old = {f"blocks.{i}.fc.weight": torch.randn(12, 8, generator=g) for i in range(3)}
    old["head.weight"] = torch.randn(4, 8, generator=g)
    new = {k: v + (0.05 * (i + 1)) * torch.randn(v.shape, generator=g) for i, (k, v) in enumerate(old.items())}
    return old, new


@pytest.fixture(scope="module")
def report():
    old, new = states()
    return compare(old, new, device="cpu", histograms=2, show_layer_impact=True)


def test_figures_are_the_report_figures(report):
    figs = _figures.scalars(report)
    assert figs["torchdiff/global_rel_l2"] == report.scalars()["torchdiff/global_rel_l2"]
    layers = {r["layer"]: r for r in report.records("layer")}
    assert figs["torchdiff/layer/blocks.2/rel_l2"] == layers["blocks.2"]["rel_l2"]
    old, new = states()
    a, b = old["blocks.2.fc.weight"].double(), new["blocks.2.fc.weight"].double()
    assert math.isclose(figs["torchdiff/layer/blocks.2/rel_l2"], float((b - a).norm() / a.norm()), rel_tol=1e-6)
    hists = {h.tag: h for h in _figures.histograms(report)}
    assert len(hists) == 4  # 2 tensors × (update, values)
    for h in hists.values():
        assert len(h.edges) == len(h.counts) + 1 and h.num == sum(h.counts)
    name = next(t for t in hists if t.startswith("torchdiff/update/")).split("/", 2)[2]
    d = next(x for x in report if x.name == name)
    delta = (new[name] - old[name]).double()
    assert math.isclose(hists[f"torchdiff/update/{name}"].sum_squares, float((delta**2).sum()), rel_tol=1e-6)
    assert math.isclose(hists[f"torchdiff/update/{name}"].sum, float(delta.sum()), rel_tol=1e-4, abs_tol=1e-5)
    assert d.metrics is not None


# ---- TensorBoard -------------------------------------------------------------------------------------

def _accumulator(logdir: Path):
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = ea.EventAccumulator(str(logdir), size_guidance={ea.SCALARS: 0, ea.HISTOGRAMS: 0})
    acc.Reload()
    return acc


def test_tensorboard_events_hold_the_figures(report, tmp_path):
    pytest.importorskip("tensorboard")
    from torchdiff.integrations.tensorboard import log_report

    logged = log_report(report, tmp_path / "tb", step=7)
    acc = _accumulator(tmp_path / "tb")
    tags = acc.Tags()
    assert sorted(tags["scalars"]) == sorted(logged)
    for tag, value in logged.items():
        (event,) = acc.Scalars(tag)
        assert event.step == 7
        assert math.isclose(event.value, value, rel_tol=1e-6, abs_tol=1e-30)  # stored as float32
    hists = {h.tag: h for h in _figures.histograms(report)}
    assert sorted(tags["histograms"]) == sorted(hists)
    for tag, h in hists.items():
        (event,) = acc.Histograms(tag)
        value = event.histogram_value
        assert event.step == 7
        assert [int(c) for c in value.bucket] == h.counts
        np.testing.assert_allclose(value.bucket_limit, h.edges[1:], rtol=1e-12)
        assert value.num == h.num and math.isclose(value.sum_squares, h.sum_squares, rel_tol=1e-12)


def test_tensorboard_monitor_logs_every_report(tmp_path):
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    from torchdiff.integrations.tensorboard import report_logger

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    writer = SummaryWriter(str(tmp_path / "tb"))
    monitor = CheckpointMonitor(model, every=2, histograms=2, on_report=report_logger(writer))
    x, y = torch.randn(32, 6), torch.randn(32, 2)
    for _ in range(6):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        monitor.step()
    writer.close()
    acc = _accumulator(tmp_path / "tb")
    steps = [e.step for e in acc.Scalars("torchdiff/layer/0/rel_l2")]
    assert steps == [2, 4, 6]
    updates = [t for t in acc.Tags()["histograms"] if t.startswith("torchdiff/update/")]
    steps = sorted(e.step for t in updates for e in acc.Histograms(t))
    assert steps == [2, 2, 4, 4, 6, 6]  # the 2 most-changed tensors of each report
    assert math.isclose(acc.Scalars("torchdiff/global_rel_l2")[-1].value,
                        monitor.history[-1].total.rel_l2, rel_tol=1e-6)


# ---- Weights & Biases (offline) ------------------------------------------------------------------------

def wandb_records(run_dir: Path) -> list:
    """The records of an offline run's ``run-*.wandb`` file: W&B's LevelDB-style log
    (a 7-byte ':W&B' header, then 32 KiB blocks of chunks with a 7-byte header
    crc32c/length/type), decoded with wandb's own protobuf ``Record``."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("run-*.wandb")
    raw = path.read_bytes()
    assert raw[:4] == b":W&B"
    block, pos, buf, out = 32768, 7, b"", []
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        pos += 7
        if pos + length > len(raw):  # a chunk still being written
            break
        if kind == 0 and length == 0:  # zero padding to the end of the block
            pos += left - 7
            continue
        buf += raw[pos:pos + length]
        pos += length
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def test_wandb_offline_run_holds_the_figures(report, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from torchdiff.integrations.wandb import log_report

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    run = wandb.init(project="torchdiff-test", dir=str(tmp_path), mode="offline")
    try:
        logged = log_report(report, run, step=3)
    finally:
        run.finish()
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    records = wandb_records(run_dir)
    deadline = time.monotonic() + 60
    while not any(r.WhichOneof("record_type") == "exit" for r in records) and time.monotonic() < deadline:
        time.sleep(0.2)  # finish() can return before wandb-core has written the log out
        records = wandb_records(run_dir)
    history = [r.history for r in records if r.WhichOneof("record_type") == "history"]
    assert len(history) == 1
    items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in history[0].item}
    assert items["_step"] == 3
    for key, value in logged.items():
        assert items[key] == value  # JSON keeps the double
    for h in _figures.histograms(report):
        assert items[f"{h.tag}/_type"] == "histogram"
        assert items[f"{h.tag}/values"] == h.counts
        np.testing.assert_allclose(items[f"{h.tag}/bins"], h.edges, rtol=1e-12)
    assert items["torchdiff/tensors/_type"] == "table-file"
    assert items["torchdiff/tensors/nrows"] == len(report.comparison.diffs)
    table = json.loads((run_dir / "files" / items["torchdiff/tensors/path"]).read_text())
    columns, rows = _figures.table(report)
    assert table["columns"] == columns
    assert [r[0] for r in table["data"]] == [r[0] for r in rows]


def test_wandb_without_a_run_is_a_usage_error(report, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from torchdiff.errors import UsageError
    from torchdiff.integrations.wandb import log_report

    monkeypatch.setattr(wandb, "run", None)
    with pytest.raises(UsageError, match="no active W&B run"):
        log_report(report)


def test_adapters_import_their_framework_only_when_used():
    code = ("import sys, torchdiff.integrations.tensorboard, torchdiff.integrations.wandb; "
            "print(sorted(m for m in ('tensorboard', 'wandb', 'torch.utils.tensorboard') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
