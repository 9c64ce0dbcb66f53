"""torchdiff.series: one pass over ordered checkpoints (docs/SERIES.md)."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch

import torchdiff
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import torchdiff.formats as formats
import torchdiff.series as series_mod
from torchdiff.cli import main
from torchdiff.errors import InputNotFoundError, UsageError
from torchdiff.series import SeriesReport, compare_series


def _run(n: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """n state dicts of a tiny model drifting with shrinking steps."""
    g = torch.Generator().manual_seed(seed)
    base = {"a.0.weight": torch.randn(6, 5, generator=g), "a.0.bias": torch.randn(6, generator=g),
            "b.weight": torch.randn(3, 6, generator=g)}
    out = [base]
    for t in range(1, n):
        out.append({k: v + 0.5 ** t * torch.randn(v.shape, generator=g) for k, v in out[-1].items()})
    return out


def _save(tmp_path, states, names=None):
    paths = []
    for i, sd in enumerate(states):
        path = tmp_path / (names[i] if names else f"ckpt_{i}.safetensors")
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
        paths.append(str(path))
    return paths


def _flat(sd) -> np.ndarray:
    return np.concatenate([v.double().numpy().ravel() for v in sd.values()])


# ---- reading once ---------------------------------------------------------------------------

def test_each_file_opened_once_and_each_tensor_read_once(tmp_path, monkeypatch):
    states = _run(4)
    paths = _save(tmp_path, states)
    # a training checkpoint with Adam state in the series too
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
    pt = [str(tmp_path / f"train_{i}.pt") for i in range(3)]
    for p in pt:
        opt.zero_grad()
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "lr": 0.1}, p)

    opened: Counter = Counter()
    reads: Counter = Counter()
    real_load = formats.load

    def counting_load(path, format=None):
        opened[path] += 1
        ckpt = real_load(path, format)
        for name, h in ckpt.tensors.items():
            inner = h.materialize

            def materialize(inner=inner, key=(path, name)):
                reads[key] += 1
                return inner()

            h.materialize = materialize
        return ckpt

    monkeypatch.setattr(formats, "load", counting_load)
    report = compare_series(paths, analyses=["convergence_analysis", "gradient_analysis", "similarity_matrix"],
                            base=paths[0])
    assert dict(opened) == {p: 1 for p in paths}  # the base is one of them: not opened again
    assert set(reads.values()) == {1}
    assert len(reads) == sum(len(s) for s in states)
    assert report.analysis("similarity_matrix").headline["task_vectors"] == 3

    opened.clear()
    reads.clear()
    compare_series(pt, analyses=["convergence_analysis", "gradient_analysis", "similarity_matrix"])
    assert dict(opened) == {p: 1 for p in pt}
    assert set(reads.values()) == {1}


def test_same_file_twice_is_read_once(tmp_path, monkeypatch):
    paths = _save(tmp_path, _run(2))
    opened: Counter = Counter()
    real_load = formats.load
    monkeypatch.setattr(formats, "load", lambda p, f=None: (opened.update([p]), real_load(p, f))[1])
    report = compare_series([paths[0], paths[1], paths[0]])
    assert dict(opened) == {paths[0]: 1, paths[1]: 1}
    sim = report.analysis("similarity_matrix").data
    assert sim["cosine"][0][2] == pytest.approx(1.0)
    assert sim["rel_distance"][0][2] == 0.0


# ---- order ------------------------------------------------------------------------------

def test_sort_natural_orders_by_numbers_in_names(tmp_path):
    states = _run(3)
    names = ["epoch_10.safetensors", "epoch_2.safetensors", "epoch_1.safetensors"]
    paths = _save(tmp_path, [states[2], states[1], states[0]], names)
    given = compare_series(paths)
    assert [p.rsplit("/", 1)[-1] for p in given.checkpoints] == names
    assert given.order == "given"
    natural = compare_series(paths, sort="natural")
    assert [p.rsplit("/", 1)[-1] for p in natural.checkpoints] == names[::-1]
    assert natural.labels == ("epoch_1", "epoch_2", "epoch_10")
    assert natural.order == "natural"
    # in that order the run drifts away from epoch_1 with shrinking steps
    per_step = natural.analysis("convergence_analysis").data["per_step"]
    expected = [np.linalg.norm(_flat(states[t + 1]) - _flat(states[t])) for t in range(2)]
    assert [s["update_norm"] for s in per_step] == pytest.approx(expected, rel=1e-9)


def test_sort_rejects_unknown_value(tmp_path):
    paths = _save(tmp_path, _run(2))
    with pytest.raises(UsageError, match="--sort 'random'"):
        compare_series(paths, sort="random")


# ---- figures --------------------------------------------------------------------------------

@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(2, 5), seed=st.integers(0, 10_000), dtype=st.sampled_from([torch.float32, torch.float64,
                                                                                 torch.bfloat16]))
def test_series_figures_match_numpy(n, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7,), (3, 4), (2, 2, 3)]
    states = [{f"l{k}.w": torch.randn(s, generator=g).to(dtype) for k, s in enumerate(shapes)} for _ in range(n)]
    report = compare_series(states, analyses=["convergence_analysis", "similarity_matrix"])
    x = np.stack([_flat(sd) for sd in states])
    sim = report.analysis("similarity_matrix").data
    norms = np.linalg.norm(x, axis=1)
    cos = (x @ x.T) / np.outer(norms, norms)
    np.testing.assert_allclose(sim["cosine"], cos, rtol=1e-9, atol=1e-12)
    rel = np.linalg.norm(x[None, :, :] - x[:, None, :], axis=2) / norms[:, None]
    np.testing.assert_allclose(sim["rel_distance"], rel, rtol=1e-9, atol=1e-12)
    per_step = report.analysis("convergence_analysis").data["per_step"]
    u = np.linalg.norm(np.diff(x, axis=0), axis=1)
    np.testing.assert_allclose([s["update_norm"] for s in per_step], u, rtol=1e-9)
    np.testing.assert_allclose([s["rel_update"] for s in per_step], u / norms[:-1], rtol=1e-9)


def test_small_workspace_and_batches_give_the_same_figures(monkeypatch):
    states = _run(5, seed=3)
    expected = compare_series(states, base=states[0]).analysis("similarity_matrix").data
    monkeypatch.setattr(series_mod, "WORKSPACE_BYTES", {"cpu": 8 * 6 * 7, "cuda": 8 * 6 * 7})
    monkeypatch.setattr(series_mod, "BATCH_BYTES", 1)
    got = compare_series(states, base=states[0]).analysis("similarity_matrix").data
    np.testing.assert_allclose(got["cosine"], expected["cosine"], rtol=1e-12)
    np.testing.assert_allclose(got["task_vectors"]["cosine"], expected["task_vectors"]["cosine"], rtol=1e-12)
    assert got["task_vectors"]["pairwise_sign_conflict"] == expected["task_vectors"]["pairwise_sign_conflict"]


def test_update_norms_have_no_cancellation_far_from_the_first_checkpoint():
    """Tiny updates after a large drift: exact differences, not ‖a‖² + ‖b‖² − 2⟨a,b⟩."""
    g = torch.Generator().manual_seed(1)
    start = torch.randn(10_000, generator=g, dtype=torch.float64) * 100
    drift = start + 50
    tiny = torch.randn(10_000, generator=g, dtype=torch.float64) * 1e-9
    states = [{"w": start}, {"w": drift}, {"w": drift + tiny}, {"w": drift + 2 * tiny}]
    per_step = compare_series(states).analysis("convergence_analysis").data["per_step"]
    want = float(torch.linalg.vector_norm(tiny))
    assert per_step[2]["update_norm"] == pytest.approx(want, rel=1e-6)
    cos = compare_series(states).analysis("convergence_analysis").data["per_step"][2]["update_cosine"]
    assert cos == pytest.approx(1.0, abs=1e-6)


# ---- steps, inputs and outputs ---------------------------------------------------------------

def test_steps_are_ordinary_comparisons(tmp_path):
    states = _run(3)
    states[2] = dict(states[2])
    states[2]["c.extra"] = torch.ones(2)
    del states[2]["b.weight"]
    run = {"first": states[0], "second": states[0], "third": states[2]}
    # a checkpoint that lacks tensors is refused by default: leaving them out moves every figure
    with pytest.raises(torchdiff.UsageError, match=r"^first: lacks 1 tensor in --scope params other "
                                                   r"checkpoints of the series hold: c.extra \(--common-only"):
        compare_series(run)
    report = compare_series(run, common_only=True)
    assert isinstance(report, SeriesReport)
    assert report.labels == ("first", "second", "third")
    assert not report.steps[0].has_differences
    counts = report.steps[1].comparison.counts()
    assert (counts["added"], counts["removed"], counts["changed"]) == (0, 0, 2)
    assert report.has_differences
    assert any("--common-only: 2 tensors not in every checkpoint" in n for n in report.notes)
    text = str(report)
    assert "first -> second: 2 tensors: 0 changed" in text


def test_nonfinite_values_are_left_out_and_flagged():
    states = _run(4)
    states[3] = {k: v.clone() for k, v in states[3].items()}
    states[3]["a.0.bias"][0] = float("nan")
    report = compare_series(states)
    conv = report.analysis("convergence_analysis")
    assert conv.headline["status"] == "diverging"
    assert "non-finite" in conv.data["reason"]
    assert any("1 element position non-finite" in n for n in report.notes)
    assert all(math.isfinite(v) for v in report.analysis("similarity_matrix").data["cosine"][0])


def test_nonfinite_base_positions_are_left_out():
    states = _run(3)
    base = {k: v.clone() for k, v in states[0].items()}
    base["b.weight"][1, 2] = float("inf")
    report = compare_series(states[1:], base=base)
    tv = report.analysis("similarity_matrix").data["task_vectors"]
    x = np.stack([_flat(s) for s in states[1:]])
    b = _flat(base)
    keep = np.isfinite(b)
    taus = x[:, keep] - b[keep]
    want = taus[0] @ taus[1] / (np.linalg.norm(taus[0]) * np.linalg.norm(taus[1]))
    assert tv["cosine"][0][1] == pytest.approx(want, rel=1e-9)
    assert any("1 element position non-finite" in n for n in report.notes)


def test_one_checkpoint_is_not_a_series(tmp_path):
    paths = _save(tmp_path, _run(1))
    with pytest.raises(UsageError, match="two or more"):
        compare_series(paths)
    with pytest.raises(InputNotFoundError, match="no such file"):
        compare_series([paths[0], str(tmp_path / "missing.safetensors")])


def test_cli_series_text_json_and_errors(tmp_path, capsys):
    paths = _save(tmp_path, _run(4))
    assert main(["series", *paths]) == 0
    out = capsys.readouterr().out
    assert out.startswith("series: 4 checkpoints, order given")
    assert "\nconvergence_analysis: status=" in out
    assert "\nsimilarity_matrix: dimensions=(4,4), mean_similarity=" in out

    assert main(["series", *paths[::-1], "--sort", "natural", "--output", "json", "--gradient-analysis"]) == 0
    items = json.loads(capsys.readouterr().out)
    assert items[0]["type"] == "series" and items[0]["checkpoints"] == paths
    assert [i["type"] for i in items[1:4]] == ["series_step"] * 3
    assert [i["type"] for i in items[4:]] == ["gradient_analysis"]

    assert main(["series", paths[0], paths[0], "--exit-code"]) == 0
    capsys.readouterr()
    assert main(["series", *paths, "--brief"]) == 1
    assert main(["series", paths[0]]) == 2
    assert main(["series", *paths, "--sort", "sideways"]) == 2
    assert "--sort 'sideways'" in capsys.readouterr().err


def test_cli_series_yaml(tmp_path, capsys):
    pytest.importorskip("yaml")
    import yaml

    paths = _save(tmp_path, _run(3))
    assert main(["series", *paths, "--output", "yaml", "--similarity-matrix"]) == 0
    items = yaml.safe_load(capsys.readouterr().out)
    assert items[-1]["type"] == "similarity_matrix"
    assert items[-1]["dimensions"] == [3, 3]


def _training_run(tmp_path, steps: int = 3) -> list:
    """A tied-head model trained with Adam, saved as whole training checkpoints: the
    first before any step (no optimizer state yet), lm_head.weight one storage with
    wte.weight in every file."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    mlp = torch.nn.Linear(4, 4)
    params = list(emb.parameters()) + list(mlp.parameters())
    opt = torch.optim.Adam(params, lr=1e-2)
    paths, states = [], []
    for step in range(steps):
        if step:
            opt.zero_grad()
            x = emb(torch.arange(10))
            head(mlp(x)).logsumexp(1).sum().backward()
            opt.step()
        state = {"wte.weight": emb.weight.detach().clone(), "h.0.mlp.weight": mlp.weight.detach().clone(),
                 "h.0.mlp.bias": mlp.bias.detach().clone()}
        state["lm_head.weight"] = state["wte.weight"]  # one storage, as model.state_dict() saves a tied head
        states.append(state)
        paths.append(tmp_path / f"train_{step}.pt")
        torch.save({"model": state, "optimizer": opt.state_dict(), "step": step}, paths[-1])
    return paths, states


def test_a_training_run_whose_first_checkpoint_has_no_optimizer_state(tmp_path):
    """Optimizer state is out of the series figures: a first checkpoint saved before any
    step is no reason to refuse the run (the per-step comparisons show the state added).
    The tied head counts once: float64 reference over the model's own tensors."""
    paths, states = _training_run(tmp_path)
    report = compare_series([str(p) for p in paths], analyses=["convergence_analysis"])
    added = report.steps[0].comparison.counts()["added"]
    assert added > 0  # optimizer state appears at the first step
    names = ("wte.weight", "h.0.mlp.weight", "h.0.mlp.bias")
    u2 = sum(float(((states[2][k].double() - states[1][k].double()) ** 2).sum()) for k in names)
    o2 = sum(float((states[1][k].double() ** 2).sum()) for k in names)
    conv = report.analysis("convergence_analysis")
    assert conv.headline["rel_update"] == pytest.approx(math.sqrt(u2 / o2), rel=1e-6)
    assert any("tied to another tensor" in n and "model.lm_head.weight" in n for n in report.notes)


def test_a_step_counts_a_tied_weight_once_as_a_pair_comparison_does(tmp_path):
    """Each step of a series is the comparison of its two checkpoints: a tied head
    (one storage with wte.weight) counts once in the step's global figures, its change
    summary and its layer impact, as ``torchdiff.compare`` of the same two files says
    (float64 reference over the model's own tensors)."""
    paths, states = _training_run(tmp_path, steps=4)
    paths, states = [str(p) for p in paths[1:]], states[1:]  # each with its optimizer state
    analyses = ["change_summary", "layer_impact"]
    report = compare_series(paths, analyses=analyses, scope="model")
    names = ("wte.weight", "h.0.mlp.weight", "h.0.mlp.bias")
    for t, step in enumerate(report.steps):
        pair = torchdiff.compare(paths[t], paths[t + 1], analyses=analyses, scope="model")
        d2 = sum(float(((states[t + 1][k].double() - states[t][k].double()) ** 2).sum()) for k in names)
        o2 = sum(float((states[t][k].double() ** 2).sum()) for k in names)
        assert step.scalars()["torchdiff/global_rel_l2"] == pytest.approx(math.sqrt(d2 / o2), rel=1e-6)
        assert step.scalars() == pytest.approx(pair.scalars(), rel=1e-12, nan_ok=True)
        layers = set(step.analysis("layer_impact").data["ranking"])
        assert "lm_head" not in layers


def test_a_filter_that_selects_nothing_is_a_usage_error(tmp_path):
    """As for a pair: a typo in a CI gate's --path must not pass as a series of 0 tensors."""
    paths, _ = _training_run(tmp_path)
    with pytest.raises(UsageError, match=r"^--path 'nomatch' selects no tensor of the \d+ compared"):
        compare_series([str(p) for p in paths], path="nomatch")


def test_series_figures_leave_optimizer_state_out_whatever_the_scope(tmp_path):
    """--scope all: the per-step comparisons cover the optimizer state, the series figures
    (the model's trajectory) do not, and the first checkpoint, saved before the optimizer
    made any state, is not refused for lacking it."""
    paths = [str(p) for p in _training_run(tmp_path)[0]]
    every = compare_series(paths, scope="all", analyses=["convergence_analysis"])
    model = compare_series(paths, scope="model", analyses=["convergence_analysis"])
    assert every.analysis("convergence_analysis").headline == model.analysis("convergence_analysis").headline
    assert every.steps[1].comparison.scope == "all"


# ---- names: the pair comparison's container prefixes and wrapper segments ----------------------

def _model(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"fc.weight": torch.randn(8, 6, generator=g), "fc.bias": torch.randn(8, generator=g),
            "out.weight": torch.randn(3, 8, generator=g)}


def _drift(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """n versions of one model's state, each step smaller than the last (float32)."""
    g = torch.Generator().manual_seed(seed + 1)
    out = [_model(seed)]
    for t in range(1, n):
        out.append({k: v + 0.3 ** t * torch.randn(v.shape, generator=g) for k, v in out[-1].items()})
    return out


def _saved(tmp_path, states, kinds):
    """Each state saved as its kind says: ``pt`` ({"model": sd, "epoch": i}, a training
    checkpoint), ``pt+adam`` (the same, with an Adam optimizer's state), ``ddp`` (the bare
    state_dict of a DDP model, every name under ``module.``), ``compiled`` (safetensors of a
    torch.compile'd model: ``_orig_mod.``) or ``st`` (plain safetensors)."""
    paths = []
    for i, (sd, kind) in enumerate(zip(states, kinds)):
        if kind.startswith("pt"):
            path = tmp_path / f"c{i}.pt"
            obj: dict = {"model": {k: v.clone() for k, v in sd.items()}, "epoch": i}
            if kind == "pt+adam":
                params = [torch.nn.Parameter(v.clone()) for v in sd.values()]
                opt = torch.optim.Adam(params, lr=1e-3)
                sum((p * p).sum() for p in params).backward()
                opt.step()
                obj["optimizer"] = opt.state_dict()
            torch.save(obj, path)
        elif kind == "ddp":
            path = tmp_path / f"c{i}.pt"
            torch.save({f"module.{k}": v.clone() for k, v in sd.items()}, path)
        else:
            path = tmp_path / f"c{i}.safetensors"
            prefix = "_orig_mod." if kind == "compiled" else ""
            save_file({prefix + k: v.contiguous() for k, v in sd.items()}, str(path))
        paths.append(str(path))
    return paths


def _check_figures(report, states, names=("fc.weight", "fc.bias", "out.weight")):
    """The series figures against float64 NumPy over the same tensors: per-step update
    norms, rel_update, update cosines, distance from the first checkpoint, the cosine
    and relative-distance matrices; each step's global rel_l2."""
    x = np.stack([np.concatenate([s[k].double().numpy().ravel() for k in names]) for s in states])
    norms = np.linalg.norm(x, axis=1)
    deltas = np.diff(x, axis=0)
    u = np.linalg.norm(deltas, axis=1)
    per_step = report.analysis("convergence_analysis").data["per_step"]
    assert len(per_step) == len(states) - 1
    np.testing.assert_allclose([s["update_norm"] for s in per_step], u, rtol=1e-9)
    np.testing.assert_allclose([s["rel_update"] for s in per_step], u / norms[:-1], rtol=1e-9)
    np.testing.assert_allclose([s["weight_norm"] for s in per_step], norms[1:], rtol=1e-9)
    dist = np.linalg.norm(x[1:] - x[0], axis=1)
    np.testing.assert_allclose([s["distance_from_first"] for s in per_step], dist, rtol=1e-9)
    cos_u = [deltas[t - 1] @ deltas[t] / (u[t - 1] * u[t]) for t in range(1, len(u))]
    np.testing.assert_allclose([s["update_cosine"] for s in per_step][1:], cos_u, rtol=1e-7, atol=1e-9)
    sim = report.analysis("similarity_matrix").data
    np.testing.assert_allclose(sim["cosine"], (x @ x.T) / np.outer(norms, norms), rtol=1e-9, atol=1e-12)
    rel = np.linalg.norm(x[None, :, :] - x[:, None, :], axis=2) / norms[:, None]
    np.testing.assert_allclose(sim["rel_distance"], rel, rtol=1e-9, atol=1e-12)
    for t, step in enumerate(report.steps):
        assert step.scalars()["torchdiff/global_rel_l2"] == pytest.approx(u[t] / norms[t], rel=1e-6)


def _step_names(report) -> list[set[str]]:
    return [{d.name for d in step.comparison.diffs} for step in report.steps]


ANALYSES = ["convergence_analysis", "similarity_matrix"]


def test_series_drops_a_container_prefix_as_a_pair_does(tmp_path, capsys):
    """A training checkpoint ({"model": state_dict}) followed by safetensors exports: the
    series pairs ``model.fc.weight`` with ``fc.weight``, as ``torchdiff OLD NEW`` does, and
    reports the short names; step 0 says so in the pair's own ``pairing`` section."""
    states = _drift(3)
    paths = _saved(tmp_path, states, ["pt", "st", "st"])
    report = compare_series(paths, analyses=ANALYSES)
    _check_figures(report, states)
    assert _step_names(report) == [set(states[0])] * 2
    assert not report.notes
    pair = torchdiff.compare(paths[0], paths[1])
    section = report.steps[0].analysis("pairing")
    assert section is not None and section.to_dict() == pair.analysis("pairing").to_dict()
    assert section.headline == {"dropped_prefix": "model.", "side": "old"}
    assert report.steps[1].analysis("pairing") is None
    assert report.steps[0].scalars() == pytest.approx(pair.scalars(), rel=1e-12, nan_ok=True)
    # the CLI: no refusal, the section under step 0, a JSON item with its step
    assert main(["series", *paths]) == 0
    out = capsys.readouterr().out
    assert "\nc0.pt -> c1.safetensors\n  pairing: dropped_prefix=model., side=old\n" in out
    assert "    note: paired names with the prefix 'model.' dropped from" in out
    assert main(["series", *paths, "--output", "json"]) == 0
    items = json.loads(capsys.readouterr().out)
    pairing = [i for i in items if i["type"] == "pairing"]
    assert len(pairing) == 1 and pairing[0]["step"] == 0
    assert pairing[0]["old_prefix"] == "model." and pairing[0]["new_prefix"] == ""


@pytest.mark.parametrize("kinds", [["ddp", "st", "st"], ["compiled", "st", "compiled"],
                                   ["st", "ddp", "compiled", "st"]])
def test_series_drops_wrapper_segments(tmp_path, kinds):
    """DDP's ``module.`` and torch.compile's ``_orig_mod.``, on any checkpoint of the
    series: every checkpoint under the short names, figures over the same tensors."""
    states = _drift(len(kinds))
    paths = _saved(tmp_path, states, kinds)
    report = compare_series(paths, analyses=ANALYSES)
    _check_figures(report, states)
    assert _step_names(report) == [set(states[0])] * (len(kinds) - 1)
    for t in range(len(kinds) - 1):
        section = report.steps[t].analysis("pairing")
        if kinds[t] == "st" and kinds[t + 1] == "st":
            assert section is None
        else:
            assert section is not None and "dropped_wrapper" in section.headline
    if kinds == ["ddp", "st", "st"]:
        pair = torchdiff.compare(paths[0], paths[1])
        assert report.steps[0].analysis("pairing").to_dict() == pair.analysis("pairing").to_dict()


def test_series_where_every_checkpoint_has_the_prefix_keeps_its_names(tmp_path):
    """Nothing to drop: every file stores ``model.``; the names stay as stored, no
    ``pairing`` section."""
    states = _drift(3)
    paths = _saved(tmp_path, states, ["pt", "pt", "pt"])
    report = compare_series(paths, analyses=ANALYSES)
    _check_figures(report, states)
    assert _step_names(report) == [{f"model.{k}" for k in states[0]}] * 2
    assert all(step.analysis("pairing") is None for step in report.steps)


def test_only_the_first_of_many_has_the_prefix_and_optimizer_state(tmp_path):
    """The first checkpoint a .pt with the model under ``model`` and Adam state, then
    safetensors: model tensors pair under the short names in every step; the optimizer
    state keeps its names, stays optimizer state and out of the series figures, whatever
    --scope."""
    states = _drift(4, seed=5)
    paths = _saved(tmp_path, states, ["pt+adam", "st", "st", "st"])
    for scope in ("params", "all"):
        report = compare_series(paths, analyses=ANALYSES, scope=scope)
        _check_figures(report, states)
        roles = [{d.name: d.role for d in step.comparison.diffs} for step in report.steps]
        assert [{n for n, r in step.items() if r == "parameter"} for step in roles] == [set(states[0])] * 3
        assert {n: r for n, r in roles[0].items() if r != "parameter"} == {
            f"optimizer.state.{i}.{f}": "optimizer_state" for i in range(3) for f in ("step", "exp_avg", "exp_avg_sq")}
        removed = {d.name for d in report.steps[0].comparison.diffs if d.status == "removed"}
        assert removed == {n for n in roles[0] if n.startswith("optimizer.state.")}
        assert [s.analysis("pairing") is not None for s in report.steps] == [True, False, False]


def test_a_prefix_on_middle_checkpoints_is_dropped_on_both_sides_of_their_step(tmp_path):
    """safetensors, .pt, .pt, safetensors: one name per tensor across the series, so the
    step between the two .pt files drops ``model.`` from both sides and says so."""
    states = _drift(4, seed=2)
    paths = _saved(tmp_path, states, ["st", "pt", "pt", "st"])
    report = compare_series(paths, analyses=ANALYSES)
    _check_figures(report, states)
    assert _step_names(report) == [set(states[0])] * 3
    heads = [s.analysis("pairing").headline for s in report.steps]
    assert heads == [{"dropped_prefix": "model.", "side": "new"},
                     {"dropped_prefix": "model.", "side": "old, new"},
                     {"dropped_prefix": "model.", "side": "old"}]
    both = report.steps[1].analysis("pairing")
    assert both.data == {"old_prefix": "model.", "new_prefix": "model."}
    assert both.notes == (f"paired names with the prefix 'model.' dropped from the old side ({paths[1]})",
                          f"paired names with the prefix 'model.' dropped from the new side ({paths[2]})")


def test_a_base_with_the_prefix_pairs_with_the_series(tmp_path):
    """--base: a .pt base (``model.``) with safetensors checkpoints: the task vectors are
    over the same tensors (float64 reference), and a note names what was dropped."""
    states = _drift(4, seed=7)
    paths = _saved(tmp_path, states, ["pt", "st", "st", "st"])
    report = compare_series(paths[1:], analyses=["similarity_matrix"], base=paths[0])
    tv = report.analysis("similarity_matrix").data["task_vectors"]
    names = list(states[0])
    x = np.stack([np.concatenate([s[k].double().numpy().ravel() for k in names]) for s in states])
    taus = x[1:] - x[0]
    tn = np.linalg.norm(taus, axis=1)
    np.testing.assert_allclose(tv["cosine"], (taus @ taus.T) / np.outer(tn, tn), rtol=1e-9, atol=1e-12)
    assert report.notes == (f"the base's names paired with the prefix 'model.' dropped ({paths[0]})",)


@pytest.mark.parametrize("kinds", [["pt", "st"], ["st", "pt"], ["ddp", "st"], ["st", "compiled"]])
def test_two_checkpoint_series_pairs_as_compare(tmp_path, kinds):
    """A series of two is the pair comparison: the same names, figures and section."""
    states = _drift(2, seed=3)
    paths = _saved(tmp_path, states, kinds)
    report = compare_series(paths, analyses=["change_summary"])
    pair = torchdiff.compare(paths[0], paths[1], analyses=["change_summary"])
    assert [d.name for d in report.steps[0].comparison.diffs] == [d.name for d in pair.comparison.diffs]
    assert report.steps[0].analysis("pairing").to_dict() == pair.analysis("pairing").to_dict()
    assert report.steps[0].scalars() == pytest.approx(pair.scalars(), rel=1e-12, nan_ok=True)


def test_a_series_of_int8_checkpoints_measures_the_values_the_codes_stand_for(tmp_path):
    """int8 weights with per-channel scales (a quantized model fine-tuned in steps): the
    series reads them dequantized, as the pair comparison does (it compared the raw codes,
    and the scales were tensors of their own); --raw keeps the codes."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(8, 16, generator=g)
    states, values = [], []
    for step in range(3):
        w = w + 0.05 * torch.randn(8, 16, generator=g)
        scale = w.abs().amax(1, keepdim=True) / 127
        q = torch.round(w / scale).to(torch.int8)
        bias = torch.full((8,), 0.1 * step)
        states.append({"fc.weight": q, "fc.weight_scale": scale, "fc.bias": bias})
        values.append({"fc.weight": (q.float() * scale).double(), "fc.bias": bias.double()})  # float32, as read
    paths = _save(tmp_path, states)
    report = compare_series(paths, analyses=["convergence_analysis", "similarity_matrix"])
    _check_figures(report, values, names=("fc.weight", "fc.bias"))
    assert any(n.startswith("dequantized (int8 per-channel): 1 weight compared as the values") and
               n.endswith(": fc.weight") for n in report.notes)
    raw = compare_series(paths, analyses=["convergence_analysis", "similarity_matrix"], raw=True)
    # --raw: the int8 codes are no float values (left out, and said so), the scales are companions (out of
    # --scope params): the figures are the bias's
    x = np.stack([s["fc.bias"].double().numpy() for s in states])
    per_step = raw.analysis("convergence_analysis").data["per_step"]
    np.testing.assert_allclose([s["update_norm"] for s in per_step], np.linalg.norm(np.diff(x, axis=0), axis=1),
                               rtol=1e-9)
    assert not any(n.startswith("dequantized") for n in raw.notes)
    assert any("left out of the series figures (not floating point): fc.weight" in n for n in raw.notes)
