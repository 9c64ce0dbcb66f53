"""Compare two checkpoints and log the result to MLflow, then log a monitored training run.

    python examples/mlflow_example.py [OLD NEW] [--tracking-dir DIR]

``log_model_diff`` logs the JSON list that ``torchdiff OLD NEW --output json`` prints
(``report.to_dict()``, no subprocess needed) with a few counts, then torchdiff's own
figures with ``torchdiff.integrations.mlflow.log_report``. ``log_training`` shows the
monitor side: a training loop whose reports are logged as they happen. Each run is
opened with ``with mlflow.start_run()``, so it ends FINISHED.

Without OLD NEW, two checkpoints of examples/make_checkpoints.py are used (made if
absent). MLflow's tracking URI is $MLFLOW_TRACKING_URI if set, else a SQLite store in
``--tracking-dir`` (default ./mlruns_torchdiff).
"""

from __future__ import annotations

import argparse
import os
import sys

import mlflow
import torch

import torchdiff
from torchdiff.analyses import ANALYSES
from torchdiff.callbacks import CheckpointMonitor
from torchdiff.integrations.mlflow import log_report, report_logger

HERE = os.path.dirname(os.path.abspath(__file__))


def log_model_diff(model1_path: str, model2_path: str) -> dict[str, float]:
    """Compare, then log the JSON and the change counts to a new run."""
    analyses = [n for n in ("change_summary", "anomaly_detection") if n in ANALYSES]
    report = torchdiff.compare(model1_path, model2_path, analyses=analyses, stats=True)
    diff_data = report.to_dict()  # what `torchdiff OLD NEW --output json` prints
    with mlflow.start_run(run_name="model_comparison"):
        mlflow.log_dict(diff_data, "model_comparison.json")
        mlflow.log_metric("total_changes", len(diff_data))
        mlflow.log_metric("stats_changes", len([d for d in diff_data if d["type"] == "tensor_changed"]))
        mlflow.log_metric("shape_changes", len([d for d in diff_data if d["type"] == "tensor_reshaped"]))
        # torchdiff's figures: global and per-tensor rel_l2, counts, the analyses' headlines
        return log_report(report, artifact_file="torchdiff.json")


def log_training(steps: int = 60, every: int = 20) -> int:
    """A small training run whose monitor reports go to MLflow as they happen."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with mlflow.start_run(run_name="training_with_monitor"):
        monitor = CheckpointMonitor(model, every=every)
        monitor.on_report = report_logger(artifact_dir="torchdiff", monitor=monitor)
        for _ in range(steps):
            x = torch.randn(32, 8)
            loss = torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True).tanh())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            monitor.step()
    return len(monitor.history)


def default_checkpoints() -> tuple[str, str]:
    data = os.path.join(HERE, "data")
    old, new = os.path.join(data, "step_000.safetensors"), os.path.join(data, "step_200.safetensors")
    if not (os.path.exists(old) and os.path.exists(new)):
        sys.path.insert(0, HERE)
        import make_checkpoints

        make_checkpoints.main(data)
    return old, new


def setup_tracking(tracking_dir: str) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    tracking_dir = os.path.abspath(tracking_dir)
    os.makedirs(tracking_dir, exist_ok=True)
    uri = f"sqlite:///{os.path.join(tracking_dir, 'mlflow.db')}"
    mlflow.set_tracking_uri(uri)
    name = "torchdiff-example"
    if mlflow.get_experiment_by_name(name) is None:
        mlflow.create_experiment(name, artifact_location=f"file://{os.path.join(tracking_dir, 'artifacts')}")
    mlflow.set_experiment(name)
    return uri


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", help="OLD NEW (default: two example checkpoints)")
    parser.add_argument("--tracking-dir", default="mlruns_torchdiff")
    args = parser.parse_args(argv)
    if len(args.paths) not in (0, 2):
        parser.error("give OLD and NEW, or nothing")
    old, new = args.paths if args.paths else default_checkpoints()
    uri = setup_tracking(args.tracking_dir)
    metrics = log_model_diff(old, new)
    reports = log_training()
    print(f"MLflow at {uri}: comparison run with {len(metrics)} torchdiff metrics "
          f"(global_rel_l2={metrics.get('torchdiff/global_rel_l2', float('nan')):.4f}); "
          f"training run with {reports} monitor reports")
    return 0


if __name__ == "__main__":
    sys.exit(main())
