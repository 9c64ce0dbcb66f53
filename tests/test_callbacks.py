"""CheckpointMonitor: figures against a float64 NumPy reference from state_dicts saved
during a real training run; no host sync between reports; keep modes; options."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch
from torch import nn

import torchdiff
from torchdiff.analyses import ANALYSES
from torchdiff.callbacks import (
    STATS_ANALYSES, CheckpointMonitor, MonitorRecord, history_records, record_of, to_pandas,
)
from torchdiff.errors import DeviceError, TorchDiffError, UsageError

STEPS, EVERY = 300, 50
REL = 2e-6  # float32 Δ = b − a before float64 accumulation: relative error ~1e-7


class Net(nn.Module):
    """Embedding (tied with the output layer), two numbered blocks with BatchNorm, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 12)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(12, 24), nn.BatchNorm1d(24), nn.ReLU(), nn.Linear(24, 12)) for _ in range(2)
        )
        self.head = nn.Linear(12, 16, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens).mean(1)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


from helpers import one_thread  # noqa: E402,F401 - autouse: training here runs on one thread

#: Names of Net's parameters as its state_dict lists them (the tied head.weight too).
PARAMETERS = {n for n, _ in Net().named_parameters(remove_duplicate=False)}


def _layer(name: str) -> str:
    """The layer of a name, written out for this model (independent of torchdiff.layers)."""
    parts = name.split(".")
    if parts[0] == "blocks":
        return ".".join(parts[:2])
    return parts[0]


def _snapshot(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def _train_step(model, optimizer, generator) -> None:
    tokens = torch.randint(0, 16, (32, 6), generator=generator)
    target = tokens[:, 0]
    loss = nn.functional.cross_entropy(model(tokens), target)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Train a few hundred steps with four monitors watching; keep state_dicts at report steps."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = Net()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    calls = []
    monitors = {
        "previous": CheckpointMonitor(model, every=EVERY, on_report=lambda s, r: calls.append((s, r))),
        "initial": CheckpointMonitor(model, every=EVERY, reference="initial"),
        "device": CheckpointMonitor(model, every=EVERY, keep="device"),
        "stats": CheckpointMonitor(model, every=EVERY, keep="stats",
                                   save_dir=tmp_path_factory.mktemp("saved")),
    }
    saved = {0: _snapshot(model)}
    for step in range(1, STEPS + 1):
        _train_step(model, optimizer, g)
        for m in monitors.values():
            m.step()
        if step % EVERY == 0:
            saved[step] = _snapshot(model)
    return model, monitors, saved, calls


def _reference_figures(a: dict[str, np.ndarray], b: dict[str, np.ndarray]):
    """Global, per-layer and per-tensor (l2, norm_old, norm_new, dot) in float64 NumPy."""
    per_tensor = {}
    for name in a:
        x, y = a[name].astype(np.float64).ravel(), b[name].astype(np.float64).ravel()
        per_tensor[name] = (np.linalg.norm(y - x), np.linalg.norm(x), np.linalg.norm(y), float(x @ y))
    # The default scope: trainable parameters (BatchNorm's running statistics are buffers).
    # head.weight is embed.weight (tied): one parameter, counted once, under embed.
    floats = [n for n in a if a[n].dtype.kind == "f" and n in PARAMETERS and n != "head.weight"]

    def group(names):
        l2 = math.sqrt(sum(per_tensor[n][0] ** 2 for n in names))
        old = math.sqrt(sum(per_tensor[n][1] ** 2 for n in names))
        new = math.sqrt(sum(per_tensor[n][2] ** 2 for n in names))
        dot = sum(per_tensor[n][3] for n in names)
        return {"rel_l2": l2 / old, "cosine": dot / (old * new), "norm_old": old, "norm_new": new, "l2": l2}

    layers = {}
    for n in floats:
        layers.setdefault(_layer(n), []).append(n)
    return group(floats), {k: group(v) for k, v in layers.items()}, per_tensor


def _close(actual: float, expected: float, rel: float = REL) -> bool:
    return math.isclose(actual, expected, rel_tol=rel, abs_tol=1e-12)


def test_history_previous_matches_numpy(run):
    _, monitors, saved, _ = run
    history = monitors["previous"].history
    assert [(r.step, r.reference_step) for r in history] == [(s, s - EVERY) for s in range(EVERY, STEPS + 1, EVERY)]
    for r in history:
        total, layers, per_tensor = _reference_figures(saved[r.reference_step], saved[r.step])
        assert isinstance(r, MonitorRecord) and r.exact
        assert _close(r.total.rel_l2, total["rel_l2"]), (r.step, r.total.rel_l2, total["rel_l2"])
        assert _close(r.total.l2, total["l2"])
        assert _close(r.total.norm_old, total["norm_old"]) and _close(r.total.norm_new, total["norm_new"])
        assert _close(1 - r.total.cosine, 1 - total["cosine"], 1e-3)
        assert set(r.layers) == set(layers) == {"embed", "blocks.0", "blocks.1"}
        for name, f in r.layers.items():
            assert _close(f.rel_l2, layers[name]["rel_l2"]), (r.step, name)
        for name, f in r.tensors.items():
            l2, old, _, _ = per_tensor[name]
            assert _close(f.rel_l2, l2 / old if old else math.inf), (r.step, name)
        # the integer buffer is in the report and the per-tensor figures, not in the totals
        assert "blocks.0.1.num_batches_tracked" in r.tensors
        assert r.tensors["blocks.0.1.num_batches_tracked"].l2 == EVERY
        assert r.counts["changed"] == len(saved[0])


def test_history_initial_matches_numpy(run):
    _, monitors, saved, _ = run
    history = monitors["initial"].history
    assert [r.reference_step for r in history] == [0] * (STEPS // EVERY)
    for r in history:
        total, layers, _ = _reference_figures(saved[0], saved[r.step])
        assert _close(r.total.rel_l2, total["rel_l2"])
        for name, f in r.layers.items():
            assert _close(f.rel_l2, layers[name]["rel_l2"])
    # distance from the start grows while the per-interval update shrinks
    assert history[-1].total.rel_l2 > history[0].total.rel_l2
    prev = monitors["previous"].history
    assert prev[-1].total.rel_l2 < prev[0].total.rel_l2


def test_keep_device_on_cpu_equals_keep_cpu(run):
    _, monitors, _, _ = run
    for a, b in zip(monitors["previous"].history, monitors["device"].history):
        assert a.total == b.total and a.layers == b.layers


def test_keep_stats_has_only_statistics(run):
    _, monitors, saved, _ = run
    stats_history = monitors["stats"].history
    for r, exact in zip(stats_history, monitors["previous"].history):
        assert not r.exact
        assert math.isnan(r.total.rel_l2) and math.isnan(r.total.cosine)
        total, layers, _ = _reference_figures(saved[r.reference_step], saved[r.step])
        assert _close(r.total.norm_old, total["norm_old"], 1e-6) and _close(r.total.norm_new, total["norm_new"], 1e-6)
        assert abs(r.total.norm_change - (total["norm_new"] / total["norm_old"] - 1)) < 1e-7
        assert r.total.rel_l2_lower_bound <= exact.total.rel_l2 + 1e-12
        for name, f in r.layers.items():
            assert _close(f.norm_new, layers[name]["norm_new"], 1e-6)
        scalars = r.scalars()
        assert "torchdiff/global_rel_l2" not in scalars and "torchdiff/param_norm_change" in scalars
        assert any(k.startswith("torchdiff/layer_norm_change/") for k in scalars)
    report = monitors["stats"].last_report
    assert report.stats and all(d.metrics is None for d in report)
    assert "mean=" in str(report)  # the --stats text form: the figures it has
    json.loads(report.to_json())
    assert monitors["stats"].memory_bytes() == 0


def test_on_report_gets_step_and_the_engine_report(run):
    _, monitors, saved, calls = run
    assert [s for s, _ in calls] == list(range(EVERY, STEPS + 1, EVERY))
    step, report = calls[-1]
    assert isinstance(report, torchdiff.Report) and report is monitors["previous"].last_report
    assert report.comparison.old_name == f"step {STEPS - EVERY}" and report.comparison.new_name == f"step {STEPS}"
    # the same figures as torchdiff.compare on the saved state_dicts (the CLI's pipeline)
    old = {k: torch.from_numpy(v) for k, v in saved[STEPS - EVERY].items()}
    new = {k: torch.from_numpy(v) for k, v in saved[STEPS].items()}
    for side in (old, new):  # numpy copies lose the tie the live module has (head = embed): restore it
        side["head.weight"] = side["embed.weight"]
    direct = torchdiff.compare(old, new, device="cpu")
    assert report.scalars() == direct.scalars()
    items = json.loads(report.to_json())
    assert {i["path"] for i in items if i["type"] == "tensor_changed"} == set(saved[0])


def test_saved_states_match_the_run(run):
    _, monitors, saved, _ = run
    stats = monitors["stats"]
    assert sorted(stats.saved) == list(range(0, STEPS + 1, EVERY))
    loaded = torchdiff.load(stats.saved[STEPS])
    # a tied weight is saved once, its other name recorded as safetensors' save_model does
    assert "head.weight" not in loaded and loaded.ties == {"head.weight": "embed.weight"}
    for name, value in saved[STEPS].items():
        np.testing.assert_array_equal(loaded[loaded.ties.get(name, name)].numpy(), value)


def test_series_report(run, monkeypatch):
    _, monitors, _, _ = run
    with pytest.raises(UsageError, match="save_dir"):
        monitors["previous"].series_report()
    monkeypatch.setitem(sys.modules, "torchdiff.series", None)
    monkeypatch.delattr(torchdiff, "series", raising=False)
    with pytest.raises(TorchDiffError, match="needs torchdiff.series"):
        monitors["stats"].series_report()


def test_series_report_with_series_module(run):
    pytest.importorskip("torchdiff.series")
    _, monitors, _, _ = run
    result = monitors["stats"].series_report(analyses=["convergence_analysis"])
    assert result is not None
    assert str(result)
    # the saved files' series measures what the monitor measured: the tied head once
    conv = result.analysis("convergence_analysis").data["per_step"]
    history = monitors["previous"].history
    assert [s["update_norm"] for s in conv] == pytest.approx([r.total.l2 for r in history], rel=1e-5)


def test_tied_weights_share_one_snapshot_buffer():
    model = Net()
    monitor = CheckpointMonitor(model, every=1)
    sd = model.state_dict()
    unique = {v.data_ptr(): v for v in sd.values()}
    assert monitor.memory_bytes() == sum(v.numel() * v.element_size() for v in unique.values())
    assert monitor.memory_bytes() < sum(v.numel() * v.element_size() for v in sd.values())


def test_rows_and_pandas(run):
    _, monitors, _, _ = run
    report = monitors["previous"].last_report
    rows = report.records()
    assert len(rows) == len(report) and rows[0]["name"] == "embed.weight" and rows[0]["layer"] == "embed"
    assert rows[0]["rel_l2"] == report.comparison.diffs[0].metrics.rel_l2
    layers = report.records("layer")
    assert {r["layer"] for r in layers} == {"embed", "blocks.0", "blocks.1"}
    hist = history_records(monitors["previous"].history, "layer")
    assert len(hist) == 3 * (STEPS // EVERY) and set(hist[0]) >= {"step", "layer", "rel_l2", "cosine"}
    with pytest.raises(UsageError):
        history_records([], "bogus")
    pd = pytest.importorskip("pandas")
    frame = to_pandas(report)
    assert isinstance(frame, pd.DataFrame) and list(frame["name"]) == [r["name"] for r in rows]
    steps = to_pandas(monitors["previous"].history, level="global")
    assert list(steps["step"]) == list(range(EVERY, STEPS + 1, EVERY))


def test_no_host_sync_between_reports(monkeypatch):
    """Between report steps the monitor touches no tensor: no .item(), .cpu(), .tolist(),
    .numpy(), .to(), cuda.synchronize(), not even state_dict()."""
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    monitor = CheckpointMonitor(model, every=10)
    counts: dict[str, int] = {}

    def counting(name, original):
        def wrapper(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return original(*args, **kwargs)
        return wrapper

    targets = [(torch.Tensor, n) for n in ("item", "cpu", "tolist", "numpy", "to", "copy_", "__bool__")]
    targets += [(torch.cuda, "synchronize"), (torch.cuda.Event, "synchronize"), (torch.cuda.Stream, "synchronize")]
    for owner, name in targets:
        monkeypatch.setattr(owner, name, counting(name, getattr(owner, name)))
    monkeypatch.setattr(model, "state_dict", counting("state_dict", model.state_dict))
    reports = 0
    for step in range(1, 31):
        _train_step(model, optimizer, g)
        counts.clear()
        result = monitor.step()
        if step % 10:
            assert result is None and counts == {}, (step, counts)
        else:
            assert result is not None and counts.get("state_dict") == 1
            reports += 1
    assert reports == 3 and len(monitor.history) == 3


def test_call_with_step_reports_once_per_multiple():
    model = nn.Linear(3, 2)
    monitor = CheckpointMonitor(model, every=4)
    seen = []
    for global_step in [0, 0, 1, 1, 2, 3, 4, 4, 4, 5, 8, 8, 9, 12]:  # gradient accumulation repeats a step
        with torch.no_grad():
            model.weight.add_(0.01)
        if monitor(global_step) is not None:
            seen.append(global_step)
    assert seen == [4, 8, 12]
    assert [r.reference_step for r in monitor.history] == [0, 4, 8]
    assert monitor() is None and monitor.step_count == 13
    report = monitor.report()  # forced
    assert monitor.history[-1].step == 13 and report is monitor.last_report


def test_compare_does_not_record_or_advance():
    model = nn.Linear(3, 2)
    monitor = CheckpointMonitor(model, every=100)
    with torch.no_grad():
        model.weight.mul_(2)
    report = monitor.compare()
    assert monitor.history == [] and monitor.reference_step == 0
    assert report.comparison.counts()["changed"] == 1  # only the weight moved


def test_unchanged_model_and_epsilon():
    model = nn.Linear(3, 2)
    monitor = CheckpointMonitor(model, every=1)
    monitor.step()
    r = monitor.history[-1]
    assert r.counts["unchanged"] == 2 and r.total.rel_l2 == 0.0 and not monitor.last_report.has_differences
    with torch.no_grad():
        model.bias.add_(1e-4)
    quiet = CheckpointMonitor(model, every=1, epsilon=1e-3)
    with torch.no_grad():
        model.bias.add_(1e-4)
    quiet.step()
    assert quiet.history[-1].counts["unchanged"] == 2


def test_tensor_history_off_keeps_layers_and_total():
    model = Net()
    monitor = CheckpointMonitor(model, every=1, tensor_history=False)
    with torch.no_grad():
        model.head.weight.add_(0.1)
    monitor.step()
    r = monitor.history[-1]
    assert r.tensors == {} and r.total.rel_l2 > 0 and set(r.layers) == {"embed", "blocks.0", "blocks.1"}


def test_include_buffers_false_and_layer_pattern():
    model = Net()
    monitor = CheckpointMonitor(model, every=1, include_buffers=False)
    monitor.step()
    names = set(monitor.history[-1].tensors)
    assert names == {n for n, _ in model.named_parameters()}  # named_parameters drops the tied duplicate
    if "layer_impact" in ANALYSES:
        grouped = CheckpointMonitor(model, every=1, layer_pattern=r"^(embed|blocks|head)")
        grouped.step()
        assert set(grouped.history[-1].layers) == {"embed", "blocks"}


def test_analyses_run_in_the_monitor():
    wanted = [n for n in ("anomaly_detection", "layer_impact", "change_summary") if n in ANALYSES]
    if not wanted:
        pytest.skip("no analyses available yet")
    model = Net()
    monitor = CheckpointMonitor(model, every=1, analyses=wanted)
    with torch.no_grad():
        model.blocks[0][0].weight.mul_(1e4)  # something to find
    report = monitor.step()
    assert {a.name for a in report.analyses} == set(wanted)
    assert any(k.startswith(f"torchdiff/{wanted[0]}/") for k in monitor.history[-1].scalars())


class LayerNormNet(nn.Module):
    """A fresh model with a LayerNorm: its weight is all ones (constant) and its bias all
    zeros (all_zero) until the first optimizer step."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.norm = nn.LayerNorm(32)
        self.out = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.norm(self.inp(x))))


def _train(model: nn.Module, monitor: CheckpointMonitor, steps: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(steps):
        x, y = torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        monitor.step()


@pytest.mark.parametrize("keep", ["cpu", "stats"])
def test_monitor_counts_anomalies_of_the_new_state_only(keep):
    """Issue 18: a fresh LayerNorm logged findings=2 at the first report, though only the
    reference (step 0) held the initial ones and zeros; the trained state has no finding."""
    torch.manual_seed(0)
    model = LayerNormNet()
    monitor = CheckpointMonitor(model, every=5, keep=keep, analyses=["anomaly_detection"])
    _train(model, monitor, 5)
    a = monitor.last_report.analysis("anomaly_detection")
    w, b = model.norm.weight.detach().numpy(), model.norm.bias.detach().numpy()
    assert w.min() != w.max() and np.any(b != 0)  # the new state: neither constant nor zero
    assert dict(a.headline) == {"anomaly_type": "none", "severity": "none", "affected": [], "findings": 0}
    assert monitor.history[-1].scalars()["torchdiff/anomaly_detection/findings"] == 0
    if keep == "cpu":  # both sides compared: the reference's findings are listed, side "old", not counted
        assert {(f["type"], f["tensor"], f["side"], f["severity"]) for f in a.data["anomalies"]} == {
            ("all_zero", "norm.bias", "old", "info"), ("constant", "norm.weight", "old", "info")}
        assert a.data["old_only"] == 2


@pytest.mark.parametrize("keep", ["cpu", "stats"])
def test_monitor_fresh_layernorm_in_the_new_state_is_informative(keep):
    """Before any step the new state itself shows the LayerNorm's initial values: two
    findings, counted, of severity info (usual at initialisation), below any gate but info."""
    torch.manual_seed(0)
    model = LayerNormNet()
    monitor = CheckpointMonitor(model, every=1, keep=keep, analyses=["anomaly_detection"], fail_on_anomaly="low")
    a = monitor.report().analysis("anomaly_detection")
    assert dict(a.headline) == {"anomaly_type": "all_zero", "severity": "info", "affected": ["norm.bias"],
                                "findings": 2}
    side = "both" if keep == "cpu" else "new"
    assert {(f["type"], f["tensor"], f["side"], f["severity"]) for f in a.data["anomalies"]} == {
        ("all_zero", "norm.bias", side, "info"), ("constant", "norm.weight", side, "info")}
    assert a.data["severity_counts"]["info"] == 2 and not a.failed


def test_stats_mode_runs_one_checkpoint_analyses_only():
    model = nn.Linear(3, 2)
    allowed = [n for n in STATS_ANALYSES if n in ANALYSES]
    monitor = CheckpointMonitor(model, every=1, keep="stats", analyses=allowed)
    report = monitor.step()
    assert {a.name for a in report.analyses} <= set(allowed)
    refused = [n for n in ANALYSES if n not in STATS_ANALYSES]
    if refused:
        with pytest.raises(UsageError, match=f"keep='stats' keeps no values: {refused[0]}"):
            CheckpointMonitor(model, keep="stats", analyses=[refused[0]])


@pytest.mark.parametrize("kwargs, message", [
    ({"every": 0}, "every must be a positive int"),
    ({"every": 2.5}, "every must be a positive int"),
    ({"reference": "last"}, "reference must be one of previous, initial"),
    ({"keep": "disk"}, "keep must be one of cpu, device, stats"),
    ({"analyses": ["bogus"]}, "unknown analysis 'bogus'"),
    ({"on_report": 3}, "on_report must be a callable"),
    ({"recursive": True}, "option 'recursive' is for files"),
    ({"bogus_option": 1}, "unknown option 'bogus_option'"),
    ({"process_group": True, "save_dir": "unused"}, "save_dir= with process_group=: each rank holds only"),
    ({"process_group": True, "keep": "stats"}, "process_group= needs keep='cpu' or 'device'"),
])
def test_bad_options_raise_before_any_copy(kwargs, message):
    with pytest.raises(UsageError, match=message):
        CheckpointMonitor(nn.Linear(2, 2), **kwargs)


def test_monitor_keeps_the_training_loops_thread_count():
    torch.set_num_threads(1)
    CheckpointMonitor(nn.Linear(2, 2))
    assert torch.get_num_threads() == 1


def test_bad_model_and_device():
    with pytest.raises(UsageError, match="watches an nn.Module"):
        CheckpointMonitor({"w": torch.zeros(2)})
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError):
            CheckpointMonitor(nn.Linear(2, 2), device="cuda")


def test_record_of_a_plain_compare():
    old = {"a.w": torch.ones(4), "a.b": torch.zeros(2), "c.w": torch.ones(3)}
    new = {"a.w": torch.full((4,), 2.0), "a.b": torch.zeros(2), "c.w": torch.ones(3)}
    record = record_of(7, 3, torchdiff.compare(old, new))
    assert record.total.rel_l2 == pytest.approx(2 / math.sqrt(7))
    assert record.layers["a"].rel_l2 == pytest.approx(1.0) and record.layers["c"].rel_l2 == 0.0
    assert json.dumps(record.to_dict())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
class TestCuda:
    @pytest.mark.parametrize("keep", ["cpu", "device", "stats"])
    def test_cuda_model_figures_match_cpu(self, keep):
        torch.manual_seed(0)
        model = Net().cuda()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(0)
        monitor = CheckpointMonitor(model, every=5, keep=keep)
        saved = {0: _snapshot(model)}
        for step in range(1, 16):
            tokens = torch.randint(0, 16, (32, 6), generator=g).cuda()
            loss = nn.functional.cross_entropy(model(tokens), tokens[:, 0])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            monitor.step()
            if step % 5 == 0:
                saved[step] = _snapshot(model)
        for r in monitor.history:
            total, _, _ = _reference_figures(saved[r.reference_step], saved[r.step])
            if keep == "stats":
                assert _close(r.total.norm_new, total["norm_new"], 1e-5)
            else:
                assert _close(r.total.rel_l2, total["rel_l2"], 1e-5)
        if keep == "cpu":
            assert all(t.is_pinned() for t in monitor._snapshot.values())
        if keep == "device":
            assert all(t.is_cuda for t in monitor._snapshot.values())


def test_report_rows_and_dataframe():
    import math

    g = torch.Generator().manual_seed(3)
    old = {"a.0.w": torch.randn(4, 3, generator=g), "a.1.w": torch.randn(5, generator=g)}
    new = {"a.0.w": old["a.0.w"] * 2, "a.1.w": old["a.1.w"].clone()}
    report = torchdiff.compare(old, new, device="cpu")
    rows = report.records()
    assert [r["name"] for r in rows] == ["a.0.w", "a.1.w"]
    assert [r["status"] for r in rows] == ["changed", "unchanged"]
    assert math.isclose(rows[0]["rel_l2"], 1.0, rel_tol=1e-6)  # ‖2A − A‖/‖A‖
    layers = {r["layer"]: r for r in report.records("layer")}
    assert set(layers) == {"a.0", "a.1"}
    pd = pytest.importorskip("pandas")
    frame = report.to_pandas()
    assert isinstance(frame, pd.DataFrame) and list(frame["name"]) == ["a.0.w", "a.1.w"]


def test_wrapped_models_are_watched_under_their_own_names():
    """torch.compile's OptimizedModule and DataParallel add ``_orig_mod.`` / ``module.`` to
    every state_dict name: the monitor watches the model inside, so its figure names do
    not change when compile or DDP is turned on."""
    model = nn.Linear(3, 2)
    for wrapped in (torch.compile(model), nn.DataParallel(model), nn.DataParallel(torch.compile(model))):
        monitor = CheckpointMonitor(wrapped, every=1)
        with torch.no_grad():
            model.weight.add_(0.5)
        report = monitor.step()
        assert [d.name for d in report] == ["weight", "bias"]
        assert set(monitor.history[-1].tensors) == {"weight", "bias"}


# ---- found by the training-loop sweep ---------------------------------------------------


@pytest.mark.parametrize("analyses, options, refused", [
    (["anomaly_detection"], {}, "anomaly_detection reads"),
    (["change_summary", "layer_impact"], {}, "change_summary reads"),
    (["quantization_analysis"], {}, "quantization_analysis reads"),
    (["similarity_matrix"], {"cross_layer": True}, "similarity_matrix reads"),
])
def test_process_group_refuses_whole_tensor_analyses_at_construction(analyses, options, refused):
    """With process_group=, the analyses that read whole tensors through engine hooks
    failed at the first report step (hours into a run, on every rank), not at
    construction as every other bad option does."""
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))  # two weights of one shape: cross-layer work
    with pytest.raises(UsageError, match=f"process_group=: {refused} whole tensors, which a rank does not hold"):
        CheckpointMonitor(model, process_group=object(), analyses=analyses, **options)
    # those that work on shards are accepted (no collective at construction)
    CheckpointMonitor(model, process_group=object(), analyses=["layer_impact", "stats", "similarity_matrix"])


def test_compiled_blocks_inside_the_model_keep_their_names():
    """torch.compile(block) inside a model (per-block compile, as torchtitan does) adds
    ``_orig_mod.`` to the names below the block: the monitor reported
    ``h.0._orig_mod.q.weight``, other names than the same model uncompiled. An
    activation-checkpointed block kept ``_checkpoint_wrapped_module.`` with
    ``include_buffers=False`` (named_parameters) only."""
    torch.manual_seed(0)
    model = Net()
    plain = [d.name for d in CheckpointMonitor(model, every=1).step()]
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model.blocks[0] = torch.compile(model.blocks[0])
    model.blocks[1] = nn.DataParallel(checkpoint_wrapper(model.blocks[1]))
    for include_buffers in (True, False):
        monitor = CheckpointMonitor(model, every=1, include_buffers=include_buffers)
        assert any("_orig_mod" in k for k in model.state_dict())
        with torch.no_grad():
            model.blocks[0]._orig_mod[0].weight.add_(0.5)
        report = monitor.step()
        names = [d.name for d in report]
        assert names == (plain if include_buffers else [n for n in plain if n in PARAMETERS and n != "head.weight"])
        assert set(monitor.history[-1].layers) == {"embed", "blocks.0", "blocks.1"}
        assert monitor.history[-1].tensors["blocks.0.0.weight"].l2 > 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(worker: str, out, *args: str) -> list[dict]:
    """Run tests/<worker> on 2 gloo ranks (as tests/test_distributed.py does); each rank's JSON."""
    import os
    import subprocess
    from pathlib import Path

    here = Path(__file__).parent
    env = dict(os.environ, PYTHONPATH=str(here.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), str(here / worker), str(out), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=out.parent)
    results = []
    for r in (0, 1):
        path = Path(f"{out}.r{r}")
        assert path.exists(), proc.stderr[-3000:]
        results.append(json.loads(path.read_text()))
    return results


@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="torch.distributed with gloo is not available")
def test_fsdp2_tied_weights_count_once(tmp_path):
    """Under fully_shard the monitor re-wraps each name's local shard as its own DTensor:
    the tie (embedding = output layer) was lost, the shared weight counted twice in the
    global figures (here ‖θ‖ 10.5 for 7.8) and reported as a layer of
    its own (``head``). It counts once, under ``embed``, as without a process group."""
    res = _torchrun("dist_fsdp_worker.py", tmp_path / "ties", "ties")
    for r in res:
        assert "error" not in r, r["error"]
        assert r["ties"]["tied"]
        assert r["ties"]["state_dict_tied"] == ["head.weight"], "compare() of two sharded state_dicts"
    states = {int(s): {k: np.array(v) for k, v in sd.items()} for s, sd in res[0]["ties"]["states"].items()}
    assert res[0]["ties"]["memory_bytes"] + res[1]["ties"]["memory_bytes"] == 4 * sum(
        v.size for k, v in states[0].items() if k != "head.weight"), "the shared weight is snapshotted once"
    assert res[0]["ties"]["history"] == res[1]["ties"]["history"], "every rank gets the same figures"
    params = [k for k in states[0] if k != "head.weight"]  # head.weight is embed.weight
    for keep in ("cpu", "device"):
        history = res[0]["ties"]["history"][keep]
        assert [(h["step"], h["reference_step"]) for h in history] == [(2, 0), (4, 2)]
        for h in history:
            a, b = states[h["reference_step"]], states[h["step"]]
            x = np.concatenate([a[k] for k in params])
            y = np.concatenate([b[k] for k in params])
            np.testing.assert_allclose([h["total"]["norm_old"], h["total"]["norm_new"], h["total"]["l2"]],
                                       [np.linalg.norm(x), np.linalg.norm(y), np.linalg.norm(y - x)], rtol=2e-5)
            assert set(h["layers"]) == {"embed", "blocks.0", "blocks.1", "norm"}
            assert h["tied"] == ["head.weight"]
            assert h["counts"]["changed"] == len(states[0])
