"""--convergence-analysis on real training runs and on series with known behaviour."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

import torchdiff
from torchdiff.analyses import convergence_analysis as conv
from torchdiff.cli import main
from torchdiff.errors import UsageError
from torchdiff.series import compare_series


def train(lr: float, decay: float, steps: int = 300, every: int = 25, seed: int = 0) -> list[dict]:
    """Adam on a synthetic regression task (a random linear teacher); state dicts every ``every`` steps."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))
    teacher = nn.Linear(16, 4)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, decay)
    snaps = []
    for step in range(steps + 1):
        if step % every == 0:
            snaps.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        if step == steps:
            break
        x = torch.randn(64, 16)
        loss = ((model(x) - teacher(x).detach()) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return snaps


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    snaps = train(lr=3e-3, decay=0.99)
    root = tmp_path_factory.mktemp("good")
    paths = []
    for i, sd in enumerate(snaps):
        path = root / f"step_{i * 25}.safetensors"
        save_file(sd, str(path))
        paths.append(str(path))
    return snaps, paths


def _flat(sd) -> np.ndarray:
    return np.concatenate([v.double().numpy().ravel() for v in sd.values()])


def test_real_run_with_lr_decay_is_converging(good_run):
    snaps, paths = good_run
    result = compare_series(paths, analyses=["convergence_analysis"], sort="natural").analysis("convergence_analysis")
    assert result.headline["status"] == "converging"
    x = np.stack([_flat(sd) for sd in snaps])
    u = np.linalg.norm(np.diff(x, axis=0), axis=1)
    r = u / np.linalg.norm(x[:-1], axis=1)
    per_step = result.data["per_step"]
    np.testing.assert_allclose([s["update_norm"] for s in per_step], u, rtol=1e-9)
    np.testing.assert_allclose([s["rel_update"] for s in per_step], r, rtol=1e-9)
    # update norms shrink: the last quarter's updates are far smaller than the first quarter's
    q = len(u) // 4
    assert u[-q:].max() < u[:q].min()
    slope = np.polyfit(np.arange(len(r)), np.log(r), 1)[0]
    assert result.headline["trend"] == pytest.approx(slope, rel=1e-9)
    assert result.headline["trend"] < conv.CONVERGE_TREND
    d = np.diff(x, axis=0)
    cos = [d[t - 1] @ d[t] / (np.linalg.norm(d[t - 1]) * np.linalg.norm(d[t])) for t in range(1, len(d))]
    np.testing.assert_allclose([s["update_cosine"] for s in per_step[1:]], cos, rtol=1e-7, atol=1e-9)
    assert result.headline["drift"] == pytest.approx(np.linalg.norm(x[-1] - x[0]) / np.linalg.norm(x[0]), rel=1e-9)
    layers = {row["layer"]: row for row in result.data["per_layer"]}
    assert set(layers) == {"0", "2", "4"}
    w0 = np.concatenate([snaps[0][k].double().numpy().ravel() for k in ("0.weight", "0.bias")])
    w1 = np.concatenate([snaps[1][k].double().numpy().ravel() for k in ("0.weight", "0.bias")])
    assert layers["0"]["rel_update"][0] == pytest.approx(np.linalg.norm(w1 - w0) / np.linalg.norm(w0), rel=1e-9)


def test_text_form_shows_status_with_its_rule(good_run, capsys):
    _, paths = good_run
    assert main(["series", *paths, "--convergence-analysis", "--sort", "natural"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("convergence_analysis:"))
    assert line.startswith("convergence_analysis: status=converging, rel_update=")
    assert ", trend=" in line
    assert "note: status converging: recent trend " in out
    assert "rules (first match): diverging if non-finite values, max r_t > 1 or" in out
    assert "Per step" in out and "Per layer" in out


def test_projection_states_its_assumptions(good_run):
    _, paths = good_run
    result = compare_series(paths, analyses=["convergence_analysis"], sort="natural").analysis("convergence_analysis")
    if "intervals_to_plateau" in result.data:
        assert any("assuming ln r_t keeps falling linearly" in n for n in result.notes)
    else:
        assert not any("projection" in n for n in result.notes)


def test_lr_far_too_high_is_flagged():
    snaps = train(lr=1.0, decay=1.0, steps=200)
    result = compare_series(snaps, analyses=["convergence_analysis"]).analysis("convergence_analysis")
    assert result.headline["status"] in ("diverging", "oscillating")


def test_oscillation_is_flagged():
    g = torch.Generator().manual_seed(0)
    centre = torch.randn(200, generator=g)
    kick = torch.randn(200, generator=g) * 0.1
    states = [{"w": centre + (-1) ** t * kick} for t in range(6)]
    result = compare_series(states, analyses=["convergence_analysis"]).analysis("convergence_analysis")
    assert result.headline["status"] == "oscillating"
    assert result.headline["update_cosine"] == pytest.approx(-1.0, abs=1e-9)


def test_plateau_and_its_threshold_option():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1000, generator=g, dtype=torch.float64)
    states = [{"w": w + 1e-5 * t * torch.randn(1000, generator=g, dtype=torch.float64)} for t in range(5)]
    result = compare_series(states, analyses=["convergence_analysis"]).analysis("convergence_analysis")
    assert result.headline["status"] == "plateaued"
    looser = compare_series(states, analyses=["convergence_analysis"], plateau_threshold=1e-9)
    assert looser.analysis("convergence_analysis").headline["status"] != "plateaued"


def test_constant_relative_updates_are_steady():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(500, generator=g, dtype=torch.float64)
    states = [w]
    for _ in range(5):
        states.append(states[-1] + 0.01 * torch.randn(500, generator=g, dtype=torch.float64))
    result = compare_series([{"w": s} for s in states], analyses=["convergence_analysis"])
    assert result.analysis("convergence_analysis").headline["status"] == "steady"


def test_exploding_norm_is_diverging():
    w = torch.ones(10)
    states = [{"w": w * 4.0 ** t} for t in range(4)]
    result = compare_series(states, analyses=["convergence_analysis"]).analysis("convergence_analysis")
    assert result.headline["status"] == "diverging"


def test_two_checkpoints_pair_mode_reports_r_and_needs_three_for_a_trend(good_run):
    snaps, paths = good_run
    report = torchdiff.compare(paths[0], paths[1], convergence_analysis=True)
    result = report.analysis("convergence_analysis")
    x0, x1 = _flat(snaps[0]), _flat(snaps[1])
    assert result.headline["rel_update"] == pytest.approx(np.linalg.norm(x1 - x0) / np.linalg.norm(x0), rel=1e-6)
    assert result.headline["status"] == "undetermined"
    assert "trend" not in result.headline
    assert any("needs ≥ 3 checkpoints" in n for n in result.notes)
    two = compare_series(paths[:2], analyses=["convergence_analysis"]).analysis("convergence_analysis")
    assert two.headline["status"] == "undetermined"
    assert math.isnan(two.headline["trend"])


def test_pair_mode_ignores_optimizer_state_and_flags_nan():
    model = nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    old = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "optimizer": opt.state_dict()}
    new = {"model": {k: v + 1.0 for k, v in model.state_dict().items()}, "optimizer": opt.state_dict()}
    result = torchdiff.compare(old, new, convergence_analysis=True).analysis("convergence_analysis")
    assert {row["layer"] for row in result.data["per_layer"]} == {"model"}
    bad = {"model": {k: v.clone() for k, v in new["model"].items()}}
    bad["model"]["weight"][0, 0] = float("nan")
    result = torchdiff.compare({"model": old["model"]}, bad, convergence_analysis=True).analysis("convergence_analysis")
    assert result.headline["status"] == "diverging"


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(-3, 3), min_size=8, max_size=8), st.integers(3, 6))
def test_successive_update_cosine_by_polarisation(values, n):
    rng = np.random.default_rng(abs(hash(tuple(values))) % 2**32)
    x = rng.normal(size=(n, 8)) + np.asarray(values)
    nsq = (x * x).sum(1)
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(2)
    fig = conv.figures(nsq, d2)
    d = np.diff(x, axis=0)
    for t in range(1, n - 1):
        want = d[t - 1] @ d[t] / (np.linalg.norm(d[t - 1]) * np.linalg.norm(d[t]))
        assert fig["update_cosine"][t] == pytest.approx(want, abs=1e-9)


def test_bad_options_are_usage_errors(capsys, tmp_path):
    with pytest.raises(UsageError, match="--plateau-threshold must be > 0"):
        torchdiff.compare({"w": torch.ones(2)}, {"w": torch.ones(2)}, convergence_analysis=True, plateau_threshold=-1.0)
    with pytest.raises(UsageError, match="--plateau-steps"):
        compare_series([{"w": torch.ones(2)}] * 3, analyses=["convergence_analysis"], plateau_steps=0)
    path = tmp_path / "a.safetensors"
    save_file({"w": torch.ones(2)}, str(path))
    assert main(["series", str(path), str(path), "--convergence-analysis", "--plateau-threshold", "x"]) == 2
    assert "must be a number" in capsys.readouterr().err
