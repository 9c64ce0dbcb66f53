"""Sweep of PyTorch pickle checkpoints and whole training checkpoints: files written by
torch.save (zip and legacy) from real optimizers after real steps, compared through the
CLI and the API, every figure against a float64 recomputation."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import torchdiff
from helpers import run  # noqa: E402 - tests/ is on sys.path


class Net(nn.Module):
    """Embedding, two residual MLP blocks, BatchNorm, a head tied to the embedding."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
                                     for _ in range(2)])
        self.bn = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x):
        h = self.embed(x).mean(1)
        for block in self.layers:
            h = h + block(h)
        return self.head(self.bn(h))


def training_run(tmp_path, make_opt, saves=2, steps=4, ema_first=False):
    """Paths of ``saves`` training checkpoints, ``steps`` optimizer steps apart (StepLR
    halving the lr every 3 steps, an EMA copy, GradScaler and RNG state)."""
    torch.manual_seed(1)
    model = Net()
    ema = copy.deepcopy(model)
    opt = make_opt(model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu")
    x, y = torch.randint(0, 50, (8, 5)), torch.randint(0, 50, (8,))
    paths, step = [], 0
    for k in range(saves):
        for _ in range(steps):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), model.parameters()):
                    pe.mul_(0.9).add_(p, alpha=0.1)
        ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict(),
                "scaler": scaler.state_dict(), "epoch": k, "step": step, "loss": loss.item(),
                "rng_state": torch.get_rng_state(), "ema": ema.state_dict()}
        if ema_first:
            ckpt = {"ema": ckpt.pop("ema"), **ckpt}
        paths.append(tmp_path / f"ckpt_{k}.pt")
        torch.save(ckpt, paths[-1])
    return paths


def model_params(state: dict) -> list[str]:
    """The names model.parameters() yields, in order (buffers and the tied head left out)."""
    return [k for k in state if not k.startswith("bn.running") and "num_batches" not in k and k != "head.weight"]


def layer(name: str) -> str:
    parts = name.split(".")
    return "model." + (".".join(parts[:2]) if parts[0] == "layers" else parts[0])


# ---- readers --------------------------------------------------------------------------


def test_legacy_pickle_of_a_dtype_it_cannot_record_is_one_clear_line(tmp_path, capsys):
    """torch.save(_use_new_zipfile_serialization=False) writes uint16/32/64 and float8
    storages without a dtype, and torch cannot load them back (AttributeError): said as
    such, with the fix, exit 2."""
    for dtype in (torch.uint16, torch.float8_e4m3fn):
        path = tmp_path / f"legacy_{str(dtype)[6:]}.pt"
        torch.save({"w": torch.ones(4).to(dtype)}, path, _use_new_zipfile_serialization=False)
        with pytest.raises(AttributeError, match="UntypedStorage"):  # torch's own reader fails too
            torch.load(path, weights_only=True)
        code, out, err = run(capsys, path, path)
        assert code == 2 and out == ""
        assert err.count("\n") == 1 and "Traceback" not in err
        assert err.startswith(f"torchdiff: error: {path}: not a readable PyTorch checkpoint (a legacy (non-zip) "
                              "torch.save file holding a storage without a dtype")
        assert "save it with torch.save's default zip format" in err


def test_legacy_and_zip_files_give_the_same_report(tmp_path, capsys):
    """Every dtype the legacy format records, shared storages (a tie, a slice, a column, a
    transpose), 0-d and empty tensors, nested containers, int and tuple keys: the legacy
    file reads as the zip file does, under every analysis, and memory counts each stored
    storage once (the sum of the distinct storages' bytes)."""
    def contents(seed):
        g = torch.Generator().manual_seed(seed)
        base = torch.randn(64, 32, generator=g)
        return {"f32": torch.randn(8, 8, generator=g), "zero_d": torch.tensor(3.5 + seed), "empty": torch.empty(0, 4),
                "bool": torch.rand(10, generator=g) > 0.5, "i8": torch.randint(-128, 127, (10,), generator=g,
                                                                              dtype=torch.int8),
                "i64": torch.randint(-1000, 1000, (10,), generator=g), "c64": torch.randn(6, generator=g,
                                                                                       dtype=torch.complex64),
                "f16": torch.randn(10, generator=g).half(), "bf16": torch.randn(10, generator=g).bfloat16(),
                "big": base, "tied": base, "slice": base[8:16], "col": base[:, 3], "tr": base.t(),
                "nested": {"list": [torch.randn(3, generator=g), (torch.randn(2, generator=g),)]},
                5: torch.randn(3, generator=g), (1, "x"): torch.randn(3, generator=g), "cfg": {"lr": 0.1 * (seed + 1)}}
    outs = {}
    for kind, legacy in (("zip", False), ("legacy", True)):
        paths = [tmp_path / f"{kind}_{s}.pt" for s in (0, 1)]
        for s, p in enumerate(paths):
            torch.save(contents(s), p, _use_new_zipfile_serialization=not legacy)
        code, out, err = run(capsys, *paths, "--all", "--output", "json")
        assert code == 0 and err == ""
        outs[kind] = out.replace(f"{kind}_", "X_")
    assert outs["zip"] == outs["legacy"]
    items = json.loads(outs["zip"])
    memory = next(i for i in items if i["type"] == "memory_analysis")
    storages = {}
    for t in contents(0).values():
        if isinstance(t, torch.Tensor):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    nested = contents(0)["nested"]["list"]
    storages.update({id(t): t.untyped_storage().nbytes() for t in (nested[0], nested[1][0])})
    assert memory["old_bytes"] == sum(storages.values())


def test_unsafe_pickle_is_refused_in_one_line_and_read_with_the_flag(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "call": _Calls()}, path)
    code, out, err = run(capsys, path, path)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "refused, the pickle would run code to load (it calls print)" in err
    code, out, err = run(capsys, path, path, "--unsafe-pickle")
    assert code == 0 and "--unsafe-pickle loads pickles with weights_only=False" in err


class _Calls:
    def __reduce__(self):
        return (print, ("ran",))


# ---- gradient analysis ----------------------------------------------------------------


def adam_reference(old_path, new_path):
    """Per layer, in float64 from the saved tensors: (n, Σv̂, Σm̂², Σd², ‖θ_new‖², ‖Δθ‖², ‖θ_old‖²)."""
    old, new = torch.load(old_path, weights_only=True), torch.load(new_path, weights_only=True)
    group = new["optimizer"]["param_groups"][0]
    (b1, b2), eps = group["betas"], group["eps"]
    acc = {}
    for i, name in enumerate(model_params(new["model"])):
        state = new["optimizer"]["state"][i]
        t = float(state["step"])
        m = state["exp_avg"].double() / (1 - b1 ** t)
        v = state["exp_avg_sq"].double() / (1 - b2 ** t)
        d = m / (v.sqrt() + eps)
        w_new, w_old = new["model"][name].double(), old["model"][name].double()
        a = acc.setdefault(layer(name), np.zeros(7))
        a += [m.numel(), v.sum(), (m * m).sum(), (d * d).sum(), (w_new ** 2).sum(), ((w_new - w_old) ** 2).sum(),
              (w_old ** 2).sum()]
    return acc, group["lr"]


@pytest.mark.parametrize("ema_first", [False, True], ids=["model_first", "ema_first"])
def test_adam_figures_from_a_real_training_checkpoint(tmp_path, ema_first):
    """AdamW with amsgrad, after real steps: the state is mapped to the model's parameters
    (not to the EMA copy, even when the EMA comes first in the file, with the same shapes),
    and every figure equals the float64 recomputation."""
    paths = training_run(tmp_path, lambda p: torch.optim.AdamW(p, lr=1e-2, amsgrad=True), ema_first=ema_first)
    result = torchdiff.compare(*paths, gradient_analysis=True).analysis("gradient_analysis")
    assert result.headline["source"] == "adam_state"
    ref, lr = adam_reference(*paths)
    rows = {r["layer"]: r for r in result.data["per_layer"]}
    assert set(rows) == set(ref)  # model.*, never ema.*
    for name, (n, vhat, mhat2, d2, w2, u2, w2_old) in ref.items():
        row = rows[name]
        assert row["params"] == n
        assert row["grad_rms"] == pytest.approx(math.sqrt(vhat / n), rel=1e-9)
        assert row["snr"] == pytest.approx(math.sqrt(mhat2 / vhat), rel=1e-9)
        assert row["step_rms"] == pytest.approx(lr * math.sqrt(d2 / n), rel=1e-9)
        assert row["update_ratio"] == pytest.approx(lr * math.sqrt(d2) / math.sqrt(w2), rel=1e-6)
        assert row["observed_update_ratio"] == pytest.approx(math.sqrt(u2 / w2_old), rel=1e-6)
    total = np.sum(list(ref.values()), axis=0)
    assert result.headline["norm"] == pytest.approx(math.sqrt(total[1]), rel=1e-9)
    assert any("amsgrad" in n for n in result.notes)


def test_sgd_with_momentum_implied_gradient_is_the_gradient(tmp_path):
    """SGD with momentum 0.9 on a loss of constant gradient c: once the buffer has built
    up, Δθ = −lr·k·c/(1−μ); ĝ must be c (it was c/(1−μ) = 10 c), and the note says which
    optimizer and why."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(40, 30))
    c = torch.randn(40, 30)
    opt = torch.optim.SGD([w], lr=0.01, momentum=0.9)
    saves = {}
    for step in range(1, 241):
        opt.zero_grad()
        (w * c).sum().backward()
        opt.step()
        if step in (200, 240):
            saves[step] = {"model": {"w": w.detach().clone()}, "optimizer": copy.deepcopy(opt.state_dict()),
                           "step": step}
    result = torchdiff.compare(saves[200], saves[240], gradient_analysis=True).analysis("gradient_analysis")
    assert result.headline["source"] == "sgd_implied" and result.headline["steps_between"] == 40
    c64 = c.double()
    assert result.headline["norm"] == pytest.approx(float(c64.norm()), rel=1e-4)
    row = result.data["per_layer"][0]
    assert row["grad_rms"] == pytest.approx(float(c64.pow(2).mean().sqrt()), rel=1e-4)
    assert any("SGD with momentum μ=0.9" in n and "state field momentum_buffer" in n for n in result.notes)


@pytest.mark.parametrize("make_opt, name, field", [
    (lambda p: torch.optim.RMSprop(p, lr=1e-3), "RMSprop", "square_avg"),
    (lambda p: torch.optim.Adagrad(p, lr=1e-2), "Adagrad", "sum"),
], ids=["rmsprop", "adagrad"])
def test_adaptive_optimizer_updates_are_not_called_gradients(tmp_path, make_opt, name, field):
    """RMSprop and Adagrad divide each step by their own gradient statistics: −Δθ/lr is no
    gradient (it read 20× the gradient for RMSprop). Update statistics, with the reason;
    --lr still forces ĝ, labelled a scaled update."""
    paths = training_run(tmp_path, make_opt)
    result = torchdiff.compare(*paths, gradient_analysis=True).analysis("gradient_analysis")
    assert result.headline["source"] == "update_statistics"
    old, new = (torch.load(p, weights_only=True)["model"] for p in paths)
    names = [k for k in model_params(new)]
    delta = math.sqrt(sum(float(((new[k].double() - old[k].double()) ** 2).sum()) for k in names))
    ema_old, ema_new = (torch.load(p, weights_only=True)["ema"] for p in paths)
    delta_ema = sum(float(((ema_new[k].double() - ema_old[k].double()) ** 2).sum()) for k in names)
    assert result.headline["norm"] == pytest.approx(math.sqrt(delta ** 2 + delta_ema), rel=1e-6)
    assert any(f"hold {name} optimizer state (state field {field})" in n for n in result.notes)
    forced = torchdiff.compare(*paths, gradient_analysis=True, lr=1e-3).analysis("gradient_analysis")
    assert forced.headline["source"] == "sgd_implied"
    assert any("a scaled update, not the gradient" in n for n in forced.notes)


def test_a_learning_rate_schedule_between_checkpoints_is_said(tmp_path):
    """StepLR halved the lr between the checkpoints: ĝ divides by the old lr, and a note
    says the lr changed (from the param groups' lr, 0.05 -> 0.025)."""
    paths = training_run(tmp_path, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    result = torchdiff.compare(*paths, gradient_analysis=True).analysis("gradient_analysis")
    assert result.headline["lr"] == 0.05
    assert any(n.startswith("lr changed between the checkpoints (0.05 -> 0.025)") for n in result.notes)


# ---- convergence ------------------------------------------------------------------------


def test_pair_convergence_leaves_optimizer_state_out_whatever_scope(tmp_path):
    """--scope all once put Adam's step counters (4 -> 8) and moments into the pair's
    rel_update (0.31 instead of 0.027); a series never did. Now both measure the weights:
    sqrt(Σ‖Δθ‖²/Σ‖θ‖²) over float parameters and buffers (model and EMA, the tied head
    once), in float64."""
    paths = training_run(tmp_path, lambda p: torch.optim.Adam(p, lr=1e-2))
    pair = torchdiff.compare(*paths, convergence_analysis=True, scope="all").analysis("convergence_analysis")
    series = torchdiff.compare_series(paths, analyses=["convergence_analysis"], scope="all")
    old, new = (torch.load(p, weights_only=True) for p in paths)
    u2 = w2 = 0.0
    for root in ("model", "ema"):
        for k, v in old[root].items():
            if v.is_floating_point() and k != "head.weight":
                u2 += float(((new[root][k].double() - v.double()) ** 2).sum())
                w2 += float((v.double() ** 2).sum())
    assert pair.headline["rel_update"] == pytest.approx(math.sqrt(u2 / w2), rel=1e-6)
    assert series.analysis("convergence_analysis").headline["rel_update"] == pytest.approx(
        pair.headline["rel_update"], rel=1e-6)
    assert not any(r["layer"].startswith("optimizer") for r in pair.data["per_layer"])


def test_inspect_convergence_says_it_needs_two_checkpoints(tmp_path, capsys):
    paths = training_run(tmp_path, lambda p: torch.optim.Adam(p, lr=1e-2), saves=1)
    code, out, _ = run(capsys, "inspect", paths[0], "--convergence-analysis")
    assert code == 0
    assert "convergence_analysis: status=undetermined\n  note: convergence needs two checkpoints" in out


def test_no_projection_from_a_two_point_fit():
    """Three checkpoints give two steps, and a line through two points has R² = 1
    whatever they are: no intervals_to_plateau from it. Four checkpoints whose ln r_t
    falls on a line give one (three points, R² = 1)."""
    g = torch.Generator().manual_seed(0)
    theta = [torch.randn(1000, generator=g, dtype=torch.float64)]
    for r in (0.1, 0.03, 0.009):
        step = torch.randn(1000, generator=g, dtype=torch.float64)
        theta.append(theta[-1] + step * (r * theta[-1].norm() / step.norm()))
    ckpts = [{"w": t.float()} for t in theta]
    three = torchdiff.compare_series(ckpts[:3], analyses=["convergence_analysis"]).analysis("convergence_analysis")
    assert three.headline["status"] == "converging"
    assert "intervals_to_plateau" not in three.data
    assert not any(n.startswith("projection") for n in three.notes)
    four = torchdiff.compare_series(ckpts, analyses=["convergence_analysis"]).analysis("convergence_analysis")
    rs = [0.1, 0.03, 0.009]
    slope = np.polyfit(np.arange(3), np.log(rs), 1)[0]
    assert four.data["intervals_to_plateau"] == math.ceil((math.log(1e-3) - math.log(four.headline["rel_update"]))
                                                          / slope)
