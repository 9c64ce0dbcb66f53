"""--gradient-analysis checked against gradients recorded during real training runs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import torchdiff
from torchdiff.analyses import gradient_analysis as grad
from torchdiff.analyses._training import build_adam_plan
from torchdiff.cli import main
from torchdiff.errors import UsageError
from torchdiff.series import compare_series

BETAS = (0.9, 0.999)
EPS = 1e-8


class Masked(nn.Module):
    """A module with a buffer the optimizer never sees, between two parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(16, 8) * 0.3)
        self.register_buffer("mask", torch.ones(5))
        self.bias = nn.Parameter(torch.zeros(16))

    def forward(self, x):
        return x @ self.weight.T + self.bias


def make_model() -> nn.Module:
    return nn.Sequential(Masked(), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 4))


def adam_run(saves=(40, 80), lr=0.01, seed=0):
    """Adam with LR decay; at each save: the training checkpoint and, from the recorded
    gradients, the reference moments m̂, v̂ per parameter name."""
    torch.manual_seed(seed)
    model = make_model()
    teacher = nn.Linear(8, 4)
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=BETAS, eps=EPS)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=30, gamma=0.5)
    names = [n for n, _ in model.named_parameters()]
    m = {n: np.zeros(p.shape) for n, p in model.named_parameters()}
    v = {n: np.zeros(p.shape) for n, p in model.named_parameters()}
    out = []
    for step in range(1, max(saves) + 1):
        x = torch.randn(32, 8)
        loss = ((model(x) - teacher(x).detach()) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        for n, p in model.named_parameters():
            g = p.grad.double().numpy()
            m[n] = BETAS[0] * m[n] + (1 - BETAS[0]) * g
            v[n] = BETAS[1] * v[n] + (1 - BETAS[1]) * g * g
        opt.step()
        sched.step()
        if step in saves:
            ckpt = {"model": {k: t.clone() for k, t in model.state_dict().items()},
                    "optimizer": opt.state_dict(), "lr": sched.get_last_lr()[0], "step": step}
            ref = {n: (m[n] / (1 - BETAS[0] ** step), v[n] / (1 - BETAS[1] ** step)) for n in names}
            out.append((torch.utils._pytree.tree_map(lambda t: t.clone() if torch.is_tensor(t) else t, ckpt),
                        ref, sched.get_last_lr()[0]))
    return out


@pytest.fixture(scope="module")
def adam_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("adam")
    runs = adam_run()
    paths = []
    for i, (ckpt, _, _) in enumerate(runs):
        path = root / f"train_{i}.pt"
        torch.save(ckpt, path)
        paths.append(str(path))
    return paths, runs


def _layer(name: str) -> str:
    return "model." + name.split(".")[0]


def _reference_layers(ref, lr, state):
    acc = {}
    for n, (mh, vh) in ref.items():
        a = acc.setdefault(_layer(n), {"n": 0, "v": 0.0, "m2": 0.0, "d2": 0.0, "w2": 0.0})
        a["n"] += mh.size
        a["v"] += vh.sum()
        a["m2"] += (mh * mh).sum()
        a["d2"] += ((mh / (np.sqrt(vh) + EPS)) ** 2).sum()
        a["w2"] += (state[n].double().numpy() ** 2).sum()
    return {layer: {"grad_rms": math.sqrt(a["v"] / a["n"]), "snr": math.sqrt(a["m2"] / a["v"]),
                    "step_rms": lr * math.sqrt(a["d2"] / a["n"]),
                    "update_ratio": lr * math.sqrt(a["d2"]) / math.sqrt(a["w2"])} for layer, a in acc.items()}


def test_adam_state_gradient_rms_matches_recorded_gradients(adam_files):
    paths, runs = adam_files
    ckpt, ref, lr = runs[1]
    report = torchdiff.compare(paths[0], paths[1], gradient_analysis=True)
    result = report.analysis("gradient_analysis")
    assert result.headline["source"] == "adam_state"
    assert result.data["side"] == "new"
    want = _reference_layers(ref, lr, ckpt["model"])
    got = {row["layer"]: row for row in result.data["per_layer"]}
    assert set(got) == set(want) == {"model.0", "model.1", "model.3"}
    for layer, w in want.items():
        for key in ("grad_rms", "snr", "step_rms", "update_ratio"):
            assert got[layer][key] == pytest.approx(w[key], rel=2e-4), (layer, key)
    total_v = sum(vh.sum() for _, vh in ref.values())
    assert result.headline["norm"] == pytest.approx(math.sqrt(total_v), rel=1e-5)
    assert result.headline["flow_health"] == "healthy"
    # the buffer between the two parameters of model.0 was skipped, and said so
    assert any("model.0.mask" in n for n in result.notes)


def test_state_index_mapping_skips_buffers_and_checks_shapes(adam_files):
    paths, _ = adam_files
    ckpt = torchdiff.load(paths[1])
    plan = build_adam_plan([(n, tuple(h.shape), True) for n, h in ckpt.tensors.items()], ckpt.metadata)
    assert plan.mapped
    assert [p.param for p in plan.params] == [
        "model.0.weight", "model.0.bias", "model.1.weight", "model.1.bias", "model.3.weight", "model.3.bias"]
    assert all(p.shape == tuple(ckpt.tensors[p.param].shape) for p in plan.params)
    # without the model tensors, state indices cannot be named
    only_state = [(n, tuple(h.shape), True) for n, h in ckpt.tensors.items() if n.startswith("optimizer.")]
    plan = build_adam_plan(only_state, ckpt.metadata)
    assert not plan.mapped and all(p.param is None for p in plan.params)


def test_inspect_one_training_checkpoint(adam_files):
    paths, runs = adam_files
    ckpt, ref, lr = runs[0]
    result = torchdiff.inspect(paths[0], gradient_analysis=True).analysis("gradient_analysis")
    assert result.headline["source"] == "adam_state"
    want = _reference_layers(ref, lr, ckpt["model"])
    for row in result.data["per_layer"]:
        assert row["grad_rms"] == pytest.approx(want[row["layer"]]["grad_rms"], rel=2e-4)


def test_series_of_training_checkpoints(adam_files):
    paths, runs = adam_files
    result = compare_series(paths, analyses=["gradient_analysis"]).analysis("gradient_analysis")
    assert result.headline["source"] == "adam_state"
    norms = [row["norm"] for row in result.data["per_checkpoint"]]
    want = [math.sqrt(sum(vh.sum() for _, vh in ref.values())) for _, ref, _ in runs]
    assert norms == pytest.approx(want, rel=1e-5)


def test_cli_headline(adam_files, capsys):
    paths, _ = adam_files
    assert main([paths[0], paths[1], "--gradient-analysis"]) == 0
    out = capsys.readouterr().out
    assert "\ngradient_analysis: source=adam_state, flow_health=healthy, norm=" in out
    assert "Per layer" in out


def sgd_run(lr=0.05, saves=(10, 30), seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    grads, out = [], []
    for step in range(max(saves) + 1):
        if step in saves:
            out.append({"model": {k: t.clone() for k, t in model.state_dict().items()}, "lr": lr, "step": step})
        x = torch.randn(32, 8)
        loss = (model(x) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        grads.append({f"model.{n}": p.grad.double().numpy().copy() for n, p in model.named_parameters()})
        opt.step()
    return out, grads


def test_sgd_implied_gradient_is_the_mean_gradient():
    (a, b), grads = sgd_run()
    result = torchdiff.compare(a, b, gradient_analysis=True).analysis("gradient_analysis")
    assert result.headline["source"] == "sgd_implied"
    assert result.headline["lr"] == 0.05 and result.headline["steps_between"] == 20
    mean = {k: np.mean([g[k] for g in grads[10:30]], axis=0) for k in grads[0]}
    total = math.sqrt(sum((v ** 2).sum() for v in mean.values()))
    assert result.headline["norm"] == pytest.approx(total, rel=1e-4)
    layer0 = math.sqrt(sum((mean[k] ** 2).sum() for k in ("model.0.weight", "model.0.bias")) / (16 * 8 + 16))
    row = next(r for r in result.data["per_layer"] if r["layer"] == "model.0")
    assert row["grad_rms"] == pytest.approx(layer0, rel=1e-4)
    assert any("SGD-implied" in n for n in result.notes)
    # --lr overrides the recorded one
    other = torchdiff.compare(a, b, gradient_analysis=True, lr=0.1).analysis("gradient_analysis")
    assert other.headline["norm"] == pytest.approx(total / 2, rel=1e-4)


def test_series_sgd_implied_per_step():
    saves, grads = sgd_run(saves=(0, 10, 30))
    result = compare_series(saves, analyses=["gradient_analysis"]).analysis("gradient_analysis")
    assert result.headline["source"] == "sgd_implied"
    for row, (lo, hi) in zip(result.data["per_step"], [(0, 10), (10, 30)]):
        mean = {k: np.mean([g[k] for g in grads[lo:hi]], axis=0) for k in grads[0]}
        assert row["norm"] == pytest.approx(math.sqrt(sum((v ** 2).sum() for v in mean.values())), rel=1e-4)


def test_without_lr_update_statistics_are_labelled_as_such():
    (a, b), _ = sgd_run()
    a, b = a["model"], b["model"]
    result = torchdiff.compare(a, b, gradient_analysis=True).analysis("gradient_analysis")
    assert result.headline["source"] == "update_statistics"
    delta = math.sqrt(sum(float(((b[k].double() - a[k].double()) ** 2).sum()) for k in a))
    assert result.headline["norm"] == pytest.approx(delta, rel=1e-6)
    assert any("not gradients" in n for n in result.notes)


def test_flow_flags_vanishing_and_exploding_layers():
    g = torch.Generator().manual_seed(0)
    old = {f"l{i}.weight": torch.randn(20, 20, generator=g) for i in range(5)}
    scale = {"l0.weight": 0.1, "l1.weight": 0.1, "l2.weight": 0.1, "l3.weight": 1e-5, "l4.weight": 0.1}
    new = {k: v + scale[k] * torch.randn(20, 20, generator=g) for k, v in old.items()}
    result = torchdiff.compare(old, new, gradient_analysis=True).analysis("gradient_analysis")
    flags = {r["layer"]: r["flag"] for r in result.data["per_layer"]}
    assert flags == {"l0": None, "l1": None, "l2": None, "l3": "vanishing", "l4": None}
    assert result.headline["flow_health"] == "vanishing"
    scale["l4.weight"] = 100.0
    new = {k: v + scale[k] * torch.randn(20, 20, generator=g) for k, v in old.items()}
    result = torchdiff.compare(old, new, gradient_analysis=True).analysis("gradient_analysis")
    assert result.headline["flow_health"] == "mixed"
    assert {r["layer"]: r["flag"] for r in result.data["per_layer"]}["l4"] == "exploding"
    assert grad.FLOW_VANISHING < 1 < grad.FLOW_EXPLODING


def test_lr_option_is_validated_and_switches_the_analysis_on(capsys, tmp_path):
    a, b = {"w": torch.ones(3)}, {"w": torch.full((3,), 2.0)}
    with pytest.raises(UsageError, match="--lr must be a positive number"):
        torchdiff.compare(a, b, gradient_analysis=True, lr=-1.0)
    report = torchdiff.compare(a, b, lr=0.5)
    assert report.analysis("gradient_analysis").headline["source"] == "sgd_implied"
    path_a, path_b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save(a, path_a)
    torch.save(b, path_b)
    assert main([str(path_a), str(path_b), "--lr", "fast"]) == 2
    assert "--lr must be a number" in capsys.readouterr().err


def test_adam_state_in_its_own_file_of_a_directory_compared_with_r(tmp_path):
    """accelerate's save_state writes the model and ``optimizer.bin`` side by side; -r names
    each tensor after its file (``optimizer.bin:state.0.exp_avg``). The optimizer's
    state and param_groups are still found under that prefix: the Adam figures, against
    the moments recorded while training."""
    runs = adam_run()
    for i, (ckpt, _, _) in enumerate(runs):
        d = tmp_path / f"step_{i}"
        d.mkdir()
        torch.save(ckpt["model"], d / "model.pt")
        torch.save(ckpt["optimizer"], d / "optimizer.bin")
    report = torchdiff.compare(tmp_path / "step_0", tmp_path / "step_1", recursive=True, gradient_analysis=True)
    result = report.analysis("gradient_analysis")
    assert result.headline["source"] == "adam_state"
    _, ref, _ = runs[1]
    total_v = sum(vh.sum() for _, vh in ref.values())
    assert result.headline["norm"] == pytest.approx(math.sqrt(total_v), rel=1e-5)
