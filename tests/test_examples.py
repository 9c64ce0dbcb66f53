"""Every example under examples/ runs (in-process, through its ``main(argv)``); those whose
framework is absent are skipped."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from torchdiff.analyses import ANALYSES

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


from helpers import one_thread  # noqa: E402,F401 - autouse: training here runs on one thread


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def checkpoints(tmp_path):
    """Small safetensors files: base, a trained-looking change, a broken one, a reshaped one."""
    g = torch.Generator().manual_seed(0)
    base = {"fc1.weight": torch.randn(16, 8, generator=g), "fc1.bias": torch.zeros(16),
            "fc2.weight": torch.randn(4, 16, generator=g), "fc2.bias": torch.zeros(4)}
    tuned = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    broken = dict(tuned, **{"fc1.weight": tuned["fc1.weight"].clone().index_fill_(0, torch.tensor([0]), float("nan"))})
    reshaped = dict(tuned, **{"fc2.weight": torch.randn(5, 16, generator=g), "fc2.bias": torch.zeros(5)})
    paths = {}
    for name, state in (("base", base), ("tuned", tuned), ("broken", broken), ("reshaped", reshaped)):
        paths[name] = str(tmp_path / f"{name}.safetensors")
        save_file(state, paths[name])
    return paths


def test_train_with_monitor(capsys, tmp_path):
    example = load_example("train_with_monitor")
    assert example.main(["--steps", "100", "--every", "25"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["25", "50", "75", "100"]
    assert "rel_l2=" in lines[0] and "layer moving most" in out
    assert "update size per 25 steps" in out
    monitor = example.train(steps=40, every=20, keep="stats", quiet=True)
    assert [r.step for r in monitor.history] == [20, 40] and not monitor.history[0].exact


def test_train_with_monitor_series(capsys, tmp_path):
    example = load_example("train_with_monitor")
    assert example.main(["--steps", "60", "--every", "20", "--save-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"step_{s:08d}.safetensors" for s in (0, 20, 40, 60)]
    assert "series" in out  # a series report, or the reason it is unavailable


def test_ci_check(checkpoints, tmp_path, capsys):
    ci = load_example("ci_check")
    assert ci.main([checkpoints["base"], checkpoints["base"]]) == 0
    assert ci.main([checkpoints["base"], checkpoints["tuned"]]) == 0
    assert ci.main([checkpoints["base"], checkpoints["tuned"], "--fail-on-any-change"]) == 1
    assert ci.main([checkpoints["base"], checkpoints["tuned"], "--max-rel-l2", "1e-6"]) == 1
    assert ci.main([checkpoints["base"], checkpoints["tuned"], "--max-rel-l2", "0.5"]) == 0
    assert ci.main([checkpoints["base"], checkpoints["reshaped"]]) == 1
    assert ci.main([checkpoints["base"], checkpoints["reshaped"], "--allow-architecture-change"]) == 0
    assert ci.main([checkpoints["base"], str(tmp_path / "missing.safetensors")]) == 2
    assert ci.main(["--max-rel-l2", "x", "a", "b"]) == 2
    out = capsys.readouterr().out
    assert "FAIL architecture: fc2.weight reshaped ([4, 16] -> [5, 16])" in out
    assert "FAIL drift: global rel_l2" in out
    report_json = tmp_path / "diff.json"
    code = ci.main([checkpoints["base"], checkpoints["broken"], "--json", str(report_json)])
    items = json.loads(report_json.read_text())
    assert any(i["type"] == "tensor_changed" and i["path"] == "fc1.weight" for i in items)
    if "anomaly_detection" in ANALYSES:
        assert code == 1 and "FAIL anomalies" in capsys.readouterr().out
        assert ci.main([checkpoints["base"], checkpoints["broken"], "--fail-on-anomaly", "none"]) == 0


def test_lightning_example(tmp_path, capsys):
    try:
        import lightning.pytorch  # noqa: F401
    except ImportError:
        pytest.importorskip("pytorch_lightning")
    example = load_example("lightning_example")
    assert example.main(["--steps", "20", "--every", "10", "--log-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "step   10 vs    0: update rel_l2=" in out and "step   20 vs   10" in out
    assert "2 rows with torchdiff figures" in out


def test_mlflow_example(checkpoints, tmp_path_factory, monkeypatch, capsys):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracking = tmp_path_factory.getbasetemp() / "mlflow_example"
    example = load_example("mlflow_example")
    try:
        assert example.main([checkpoints["base"], checkpoints["tuned"], "--tracking-dir", str(tracking)]) == 0
        out = capsys.readouterr().out
        assert "comparison run with" in out and "training run with 3 monitor reports" in out
        runs = mlflow.search_runs(experiment_names=["torchdiff-example"], output_format="list")
        by_name = {r.info.run_name: r for r in runs}
        comparison = by_name["model_comparison"]
        analyses = [n for n in ("change_summary", "anomaly_detection") if n in ANALYSES]
        # the seed's metric: len(diff_data), the JSON list (4 changed tensors + one item per analysis)
        assert comparison.data.metrics["total_changes"] == 4 + len(analyses)
        assert comparison.data.metrics["stats_changes"] == 4
        assert comparison.data.metrics["torchdiff/changed"] == 4
        client = mlflow.tracking.MlflowClient()
        assert {a.path for a in client.list_artifacts(comparison.info.run_id)} == {
            "model_comparison.json", "torchdiff.json"}
        training = by_name["training_with_monitor"]
        assert len(client.get_metric_history(training.info.run_id, "torchdiff/global_rel_l2")) == 3
    finally:
        mlflow.set_tracking_uri(None)
