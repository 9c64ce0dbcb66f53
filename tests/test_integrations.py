"""The adapters against the real frameworks (each test skips when its framework is absent),
and the promise that ``import torchdiff`` imports none of them."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import torchdiff
from torchdiff.errors import MissingDependencyError, UsageError

FRAMEWORKS = ("lightning", "pytorch_lightning", "transformers", "mlflow", "pandas")


from helpers import memory_logger, one_thread  # noqa: E402,F401 - one_thread is autouse: training here runs on one thread


def test_import_torchdiff_imports_no_framework():
    code = textwrap.dedent(f"""
        import sys
        import torchdiff, torchdiff.callbacks, torchdiff.integrations
        import torchdiff.integrations.lightning, torchdiff.integrations.transformers, torchdiff.integrations.mlflow
        print([m for m in sys.modules if m.split(".")[0] in {FRAMEWORKS!r}])
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("module, attribute, blocked", [
    ("lightning", "TorchDiffCallback", ("lightning", "lightning.pytorch", "pytorch_lightning")),
    ("lightning", "PLTorchDiffCallback", ("pytorch_lightning",)),
    ("transformers", "TorchDiffCallback", ("transformers",)),
])
def test_missing_framework_is_a_clear_error(monkeypatch, module, attribute, blocked):
    import importlib

    mod = importlib.import_module(f"torchdiff.integrations.{module}")
    for name in blocked:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(mod.__dict__, attribute, raising=False)
    if module == "lightning":
        monkeypatch.setattr(mod, "_CLASSES", {})
    else:
        monkeypatch.setattr(mod, "_CLASS", [])
    with pytest.raises(MissingDependencyError, match="pip install"):
        getattr(mod, attribute)


def test_missing_mlflow_is_a_clear_error(monkeypatch):
    from torchdiff.integrations import mlflow as td_mlflow

    monkeypatch.setitem(sys.modules, "mlflow", None)
    report = torchdiff.compare({"w": torch.zeros(2)}, {"w": torch.ones(2)})
    with pytest.raises(MissingDependencyError, match=r"pip install mlflow"):
        td_mlflow.log_report(report)


# ---- Lightning ------------------------------------------------------------------------


def _lightning():
    try:
        import lightning.pytorch as pl
    except ImportError:
        pl = pytest.importorskip("pytorch_lightning")
    return pl


def _lightning_module(pl):
    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Module()


def _loader():
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 4, generator=g), torch.randn(64, 1, generator=g))
    return torch.utils.data.DataLoader(data, batch_size=8)


def _fit(pl, callbacks, logger, steps=20, accumulate=1):
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, callbacks=callbacks, logger=logger,
                         accumulate_grad_batches=accumulate, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    module = _lightning_module(pl)
    trainer.fit(module, _loader())
    return trainer, module


def test_lightning_callback_logs_each_report_once():
    pl = _lightning()
    from torchdiff.integrations import lightning as td_lightning

    cls = td_lightning.TorchDiffCallback if pl.__name__.startswith("lightning") else td_lightning.PLTorchDiffCallback
    assert issubclass(cls, pl.Callback)
    states = {}

    class Capture(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            # the first batch of each optimizer step: BatchNorm statistics move on later batches
            states.setdefault(trainer.global_step, {k: v.clone() for k, v in pl_module.state_dict().items()})

    reports = []
    callback = cls(every=5, on_report=lambda step, report: reports.append(step))
    logger = memory_logger(pl)
    trainer, module = _fit(pl, [callback, Capture()], logger, steps=20, accumulate=2)
    history = callback.history
    assert [(r.step, r.reference_step) for r in history] == [(5, 0), (10, 5), (15, 10), (20, 15)]
    assert reports == [5, 10, 15, 20]
    logged = [(step, m) for step, m in logger.rows if "torchdiff/global_rel_l2" in m]
    assert [step for step, _ in logged] == [5, 10, 15, 20]  # once per report, at its step
    for (step, metrics), record in zip(logged, history):
        assert metrics == pytest.approx(record.scalars())
    # the figures are the engine's on the states at those steps
    direct = torchdiff.compare(states[15], states[20], device="cpu")
    assert history[-1].total.l2 == pytest.approx(math.sqrt(sum(
        d.metrics.l2**2 for d in direct
        if d.metrics is not None and d.role == "parameter" and d.new.dtype.startswith("float"))))
    assert float(trainer.callback_metrics["torchdiff/global_rel_l2"]) == pytest.approx(history[-1].total.rel_l2)
    assert "torchdiff/layer_rel_l2/net.0" in history[-1].scalars()


def test_lightning_log_dict_mode():
    pl = _lightning()
    from torchdiff.integrations import lightning as td_lightning

    cls = td_lightning.TorchDiffCallback if pl.__name__.startswith("lightning") else td_lightning.PLTorchDiffCallback
    callback = cls(every=4, log_with="log_dict")
    trainer, _ = _fit(pl, [callback], memory_logger(pl), steps=8)
    assert [r.step for r in callback.history] == [4, 8]
    assert trainer.logged_metrics["torchdiff/global_rel_l2"] == pytest.approx(callback.history[-1].total.rel_l2)
    with pytest.raises(UsageError, match="log_with"):
        cls(log_with="print")
    with pytest.raises(UsageError, match="every"):
        cls(every=0)


# ---- transformers -----------------------------------------------------------------------


class _HFNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 1)

    def forward(self, x, labels=None):
        out = self.fc2(torch.relu(self.fc1(x)))
        return {"loss": nn.functional.mse_loss(out, labels), "logits": out}


class _HFData(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(64, 4, generator=g), torch.randn(64, 1, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def test_transformers_callback(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from torchdiff.integrations.transformers import TorchDiffCallback, add_callback

    assert issubclass(TorchDiffCallback, TrainerCallback)
    torch.manual_seed(0)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=10, per_device_train_batch_size=8,
                             save_strategy="steps", save_steps=4, logging_steps=1000, report_to=[], use_cpu=True,
                             disable_tqdm=True, learning_rate=0.05, seed=0)
    trainer = Trainer(model=_HFNet(), args=args, train_dataset=_HFData())
    callback = add_callback(trainer, every=5)
    assert trainer.callback_handler.callbacks[0] is callback
    trainer.train()
    history = callback.history
    assert [(r.step, r.reference_step) for r in history] == [(5, 0), (10, 5)]
    logged = [e for e in trainer.state.log_history if "torchdiff/global_rel_l2" in e]
    assert [e["step"] for e in logged] == [5, 10]
    assert logged[-1]["torchdiff/global_rel_l2"] == pytest.approx(history[-1].total.rel_l2)
    # the default key set: the global update, the top layer, findings; no counts of added tensors
    keys = {k for k in logged[-1] if k.startswith("torchdiff/")}
    assert keys == {"torchdiff/global_rel_l2", "torchdiff/global_cosine", "torchdiff/top_layer_rel_l2"}
    layers = {k: v for k, v in history[-1].scalars().items() if k.startswith("torchdiff/layer_rel_l2/")}
    assert logged[-1]["torchdiff/top_layer_rel_l2"] == max(layers.values())
    # a torchdiff.json in every checkpoint; at a report step it is that report
    for step in (4, 8, 10):
        items = json.loads((tmp_path / f"checkpoint-{step}" / "torchdiff.json").read_text())
        assert any(i["type"] == "tensor_changed" for i in items)
    assert (tmp_path / "checkpoint-10" / "torchdiff.json").read_text() == callback.last_report.to_json()
    # the saved checkpoint's weights are the state the last report compared
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "checkpoint-10" / "model.safetensors"))
    live = {d.name: d.new for d in callback.last_report.comparison.diffs}
    for name, tensor in saved.items():
        assert live[name].mean == pytest.approx(tensor.double().mean().item(), rel=1e-5, abs=1e-8)


# ---- MLflow -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory):
    mlflow = pytest.importorskip("mlflow")
    root = tmp_path_factory.mktemp("mlflow")
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    mlflow.create_experiment("torchdiff-tests", artifact_location=(root / "artifacts").as_uri())
    mlflow.set_experiment("torchdiff-tests")
    yield mlflow, root
    mlflow.set_tracking_uri(None)


def test_callback_keys_choose_the_logged_figures():
    from torchdiff.integrations.transformers import select_scalars

    figures = {"torchdiff/changed": 3.0, "torchdiff/added": 0.0, "torchdiff/global_l2": 2.0,
               "torchdiff/global_rel_l2": 0.5, "torchdiff/global_cosine": 0.9, "torchdiff/param_norm": 4.0,
               "torchdiff/layer_rel_l2/a": 0.1, "torchdiff/layer_rel_l2/b": 0.7,
               "torchdiff/anomaly_detection/findings": 2.0, "torchdiff/anomaly_detection/critical": 0.0}
    assert select_scalars(figures) == {"torchdiff/global_rel_l2": 0.5, "torchdiff/global_cosine": 0.9,
                                       "torchdiff/top_layer_rel_l2": 0.7, "torchdiff/anomaly_detection/findings": 2.0}
    assert select_scalars(figures, "all") == figures
    assert select_scalars(figures, ["counts", "torchdiff/param_norm"]) == {
        "torchdiff/changed": 3.0, "torchdiff/added": 0.0, "torchdiff/param_norm": 4.0}
    assert set(select_scalars(figures, ["layers"])) == {"torchdiff/layer_rel_l2/a", "torchdiff/layer_rel_l2/b"}
    with pytest.raises(ValueError, match=r"unknown keys \['globl'\]"):
        select_scalars(figures, ["globl"])


def test_metric_names_are_sanitised():
    from torchdiff.integrations.mlflow import metric_name, metrics_of

    assert metric_name("torchdiff/rel_l2/layers[0].w (old)") == "torchdiff/rel_l2/layers_0_.w _old_"
    assert len(metric_name("x" * 400)) == 250
    out = metrics_of({"a[b]": 1.0, "a(b)": 2.0, "nan": math.nan, "inf": math.inf, "ok/1": 3})
    assert out == {"a_b_": 1.0, "a_b__2": 2.0, "ok/1": 3.0}


def test_log_report(mlflow_store):
    mlflow, root = mlflow_store
    from torchdiff.integrations.mlflow import log_report

    old = {"layers.0.w": torch.ones(4), "layers.0.b[x]": torch.zeros(2), "head": torch.ones(3)}
    new = {"layers.0.w": torch.full((4,), 2.0), "layers.0.b[x]": torch.ones(2), "head": torch.ones(3)}
    report = torchdiff.compare(old, new)
    with mlflow.start_run() as run:
        with pytest.warns(UserWarning, match=r"1 figure not logged to MLflow, which cannot store NaN or "
                                             r"infinity .*: torchdiff/rel_l2/layers\.0\.b\[x\]=inf"):
            logged = log_report(report, step=7)
    client = mlflow.tracking.MlflowClient()
    data = client.get_run(run.info.run_id).data
    assert data.tags["torchdiff.dropped_metrics"] == "torchdiff/rel_l2/layers.0.b[x]=inf"
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    assert data.metrics["torchdiff/global_rel_l2"] == pytest.approx(report.scalars()["torchdiff/global_rel_l2"])
    assert data.metrics["torchdiff/total_changes"] == len(report.to_dict())
    assert "torchdiff/rel_l2/layers.0.b_x_" not in data.metrics  # rel_l2 of a zero tensor is ∞: left out
    assert set(logged) <= set(data.metrics)
    history = client.get_metric_history(run.info.run_id, "torchdiff/global_rel_l2")
    assert [m.step for m in history] == [7]
    path = client.download_artifacts(run.info.run_id, "torchdiff.json", str(root / "download"))
    assert json.loads(open(path).read()) == json.loads(report.to_json())


def test_sqlite_tracking_unless_configured(mlflow_store, tmp_path, monkeypatch):
    mlflow, _ = mlflow_store
    from torchdiff.integrations.mlflow import sqlite_tracking

    before = mlflow.get_tracking_uri()
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", before)
        assert sqlite_tracking(str(tmp_path / "x.db")) == before  # a configured store is kept
        monkeypatch.delenv("MLFLOW_TRACKING_URI")
        uri = sqlite_tracking(str(tmp_path / "x.db"))
        assert uri == f"sqlite:///{tmp_path / 'x.db'}" and mlflow.get_tracking_uri() == uri
    finally:
        mlflow.set_tracking_uri(before)


def test_report_logger_with_a_monitor(mlflow_store):
    mlflow, root = mlflow_store
    from torchdiff.callbacks import CheckpointMonitor
    from torchdiff.integrations.mlflow import report_logger

    model = nn.Linear(3, 2)
    with mlflow.start_run() as run:
        monitor = CheckpointMonitor(model, every=2)
        monitor.on_report = report_logger(artifact_dir="td", monitor=monitor)
        for _ in range(4):
            with torch.no_grad():
                model.weight.mul_(1.1)
            monitor.step()
    client = mlflow.tracking.MlflowClient()
    history = client.get_metric_history(run.info.run_id, "torchdiff/global_rel_l2")
    points = sorted((m.step, m.value) for m in history)
    assert [s for s, _ in points] == [r.step for r in monitor.history] == [2, 4]
    assert [v for _, v in points] == pytest.approx([r.total.rel_l2 for r in monitor.history])
    assert {a.path for a in client.list_artifacts(run.info.run_id, "td")} == {
        "td/step_00000002.json", "td/step_00000004.json"}


# ---- found by the training-loop sweep ---------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="torch.distributed with gloo is not available")
def test_lightning_ddp_figures_reach_every_rank(tmp_path):
    """Lightning DDP on 2 gloo ranks with EarlyStopping(monitor="torchdiff/global_rel_l2"),
    as docs/CALLBACKS.md suggests: only rank zero had the figures in
    trainer.callback_metrics, so rank 1's EarlyStopping raised "Early stopping conditioned
    on metric `torchdiff/global_rel_l2` which is not available" and the job died. Rank zero
    still monitors alone (one snapshot) and broadcasts its figures at its report steps."""
    pytest.importorskip("lightning")
    import os
    from pathlib import Path

    here = Path(__file__).parent
    env = dict(os.environ, PYTHONPATH=str(here.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), str(here / "dist_adapters_worker.py"), str(out), "lightning_ddp"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert all(Path(f"{out}.r{r}").exists() for r in (0, 1)), proc.stderr[-3000:]
    res = [json.loads(Path(f"{out}.r{r}").read_text()) for r in (0, 1)]
    for log_with in ("loggers", "log_dict"):
        zero, one = res[0].get(log_with, {"error": "not run"}), res[1].get(log_with, {"error": "not run"})
        assert "error" not in zero and "error" not in one, (zero.get("error"), one.get("error"))
        assert zero["has_monitor"] and not one["has_monitor"] and one["history"] == []
        assert zero["global_step"] == one["global_step"] == 4
        assert [(s, r) for s, r, _ in zero["history"]] == [(2, 0), (4, 2)]
        rel_l2 = zero["history"][-1][2]
        for r in (zero, one):
            assert r["callback_metrics"]["torchdiff/global_rel_l2"] == pytest.approx(rel_l2, rel=1e-6)
            assert r["best_score"] == pytest.approx(min(h[2] for h in zero["history"]), rel=1e-6)
        if log_with == "loggers":
            assert zero["logged"] == [2, 4] and one["logged"] == [], "rank zero logs, once a report"


class _ZeroInitHead(nn.Module):
    """A zero-initialised output layer (DiT's final layer, a fresh head): its rel_l2 at the
    first report is ∞ (‖Δ‖/‖A‖ with ‖A‖ = 0), as is a LayerNorm bias's."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x):
        return self.head(self.norm(self.body(x)))


def test_lightning_loggers_get_finite_figures_only():
    """The layer and tensor rel_l2 of a zero-initialised layer or bias is ∞ at the first
    report: the callback sent it to every Lightning logger, and MLFlowLogger stores it as
    1.8e308 (what torchdiff.integrations.mlflow refuses to log). The loggers get the
    finite figures, a warning names the others; callback_metrics keeps every figure."""
    pl = _lightning()
    from torchdiff.integrations import lightning as td_lightning

    cls = td_lightning.TorchDiffCallback if pl.__name__.startswith("lightning") else td_lightning.PLTorchDiffCallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _ZeroInitHead()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    for log_with in ("loggers", "log_dict"):
        callback = cls(every=2, log_tensors=True, log_with=log_with)
        logger = memory_logger(pl)
        pl.seed_everything(0, verbose=False)
        trainer = pl.Trainer(max_steps=4, accelerator="cpu", devices=1, callbacks=[callback], logger=logger,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             log_every_n_steps=1)
        with pytest.warns(UserWarning, match=r"figures? not logged to the Lightning loggers, NaN or infinity .*"
                                             r"torchdiff/layer_rel_l2/net\.head=inf"):
            trainer.fit(Module(), _loader())
        first = callback.history[0].scalars(tensors=True)
        assert first["torchdiff/layer_rel_l2/net.head"] == first["torchdiff/rel_l2/net.norm.bias"] == math.inf
        rows = [m for _, m in logger.rows if any(k.startswith("torchdiff/") for k in m)]
        assert rows and all(math.isfinite(v) for m in rows for k, v in m.items() if k.startswith("torchdiff/"))
        assert "torchdiff/global_rel_l2" in rows[0] and "torchdiff/layer_rel_l2/net.body" in rows[0]
        assert "torchdiff/layer_rel_l2/net.head" not in rows[0]
        if log_with == "loggers":
            assert [s for s, m in logger.rows if "torchdiff/global_rel_l2" in m] == [2, 4]


def test_transformers_log_line_gets_finite_figures_only():
    """The HF log line (and so MLflow/W&B/TensorBoard reporters and trainer_state.json,
    which wrote ``Infinity``) got ∞ for a zero-initialised layer; the default
    ``top_layer_rel_l2`` was ∞ too, where the project's "most changed" rule skips a layer
    whose reference is all zero (docs/METRICS.md)."""
    pytest.importorskip("transformers")
    from transformers import TrainerControl, TrainerState

    from torchdiff.integrations.transformers import TorchDiffCallback, select_scalars

    import warnings

    lines = {}
    for keys in ("all", ("global", "top_layer")):
        torch.manual_seed(0)
        model = _ZeroInitHead()
        cb = TorchDiffCallback(every=1, keys=keys, log_tensors=keys == "all")
        state, control = TrainerState(), TrainerControl()
        cb.on_train_begin(None, state, control, model=model)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
        state.global_step = 1
        if keys == "all":
            with pytest.warns(UserWarning, match=r"4 figures not logged to the Trainer's logs, NaN or "
                                                 r"infinity .*: torchdiff/layer_rel_l2/head=inf, "
                                                 r"torchdiff/rel_l2/norm.bias=inf"):
                cb.on_step_end(None, state, control)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # the default line has nothing to leave out
                cb.on_step_end(None, state, control)
        assert control.should_log
        logs = {"loss": 1.0}
        cb.on_log(None, state, control, logs=logs)
        lines[keys] = logs
        assert all(math.isfinite(v) for v in logs.values()), logs
        figures = cb.history[-1].scalars(tensors=True)
        assert figures["torchdiff/layer_rel_l2/head"] == math.inf
    finite_layers = [v for k, v in cb.history[-1].scalars().items()
                     if k.startswith("torchdiff/layer_rel_l2/") and math.isfinite(v)]
    assert lines[("global", "top_layer")]["torchdiff/top_layer_rel_l2"] == max(finite_layers)
    assert "torchdiff/layer_rel_l2/body" in lines["all"] and "torchdiff/rel_l2/norm.bias" not in lines["all"]
    only_zero = {"torchdiff/layer_rel_l2/a": math.inf, "torchdiff/layer_rel_l2/b": math.nan}
    assert select_scalars(only_zero, ["top_layer"]) == {"torchdiff/top_layer_rel_l2": math.inf}
