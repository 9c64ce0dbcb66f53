"""--similarity-matrix: task vectors, cross-layer matrices, series matrices, text and JSON forms."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import torchdiff
from torchdiff.analyses import similarity_matrix as sim
from torchdiff.analyses._training import SHADES
from torchdiff.cli import main
from torchdiff.series import compare_series


def _flat(sd) -> np.ndarray:
    return np.concatenate([v.double().numpy().ravel() for v in sd.values()])


def _model(seed: int, blocks: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {"embed.weight": torch.randn(20, 8, generator=g)}
    for b in range(blocks):
        sd[f"layers.{b}.fc.weight"] = torch.randn(16, 8, generator=g)
        sd[f"layers.{b}.fc.bias"] = torch.randn(16, generator=g)
        sd[f"layers.{b}.out.weight"] = torch.randn(8, 16, generator=g)
    sd["head.weight"] = torch.randn(3, 8, generator=g)
    return sd


@pytest.fixture
def finetunes(tmp_path):
    """A base and two fine-tunes that share part of their update, plus a sparse one."""
    base = _model(0)
    g = torch.Generator().manual_seed(1)
    shared = {k: 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    ft1 = {k: v + shared[k] + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    ft2 = {k: v + shared[k] + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    ft3 = {k: v.clone() for k, v in base.items()}
    ft3["head.weight"] += 0.1  # a task vector that is zero almost everywhere
    paths = {}
    for name, sd in (("base", base), ("ft1", ft1), ("ft2", ft2), ("ft3", ft3)):
        paths[name] = str(tmp_path / f"{name}.safetensors")
        save_file(sd, paths[name])
    return paths, {"base": base, "ft1": ft1, "ft2": ft2, "ft3": ft3}


def test_task_vectors_against_numpy(finetunes):
    paths, sds = finetunes
    report = compare_series([paths["ft1"], paths["ft2"], paths["ft3"]], analyses=["similarity_matrix"],
                            base=paths["base"])
    result = report.analysis("similarity_matrix")
    b = _flat(sds["base"])
    taus = [_flat(sds[k]) - b for k in ("ft1", "ft2", "ft3")]
    cos = np.array([[t @ u / (np.linalg.norm(t) * np.linalg.norm(u)) for u in taus] for t in taus])
    tv = result.data["task_vectors"]
    np.testing.assert_allclose(tv["cosine"], cos, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(tv["norm"], [np.linalg.norm(t) for t in taus], rtol=1e-9)
    for i in range(3):
        for j in range(3):
            both = (taus[i] != 0) & (taus[j] != 0)
            want = np.mean(np.sign(taus[i][both]) != np.sign(taus[j][both]))
            assert tv["pairwise_sign_conflict"][i][j] == pytest.approx(want, abs=1e-12)
    stack = np.stack(taus)
    multi = (stack != 0).sum(0) >= 2
    conflict = (stack > 0).any(0) & (stack < 0).any(0) & multi
    assert result.headline["sign_conflict_rate"] == pytest.approx(conflict.sum() / multi.sum(), abs=1e-12)
    assert result.headline["task_vectors"] == 3
    assert result.headline["mean_task_cosine"] == pytest.approx(cos[~np.eye(3, dtype=bool)].mean(), rel=1e-9)
    text = str(report)
    assert "Task vector cosine" in text and "Pairwise sign conflict" in text


def test_base_inside_the_series_has_no_task_vector(finetunes):
    paths, _ = finetunes
    result = compare_series([paths["base"], paths["ft1"], paths["ft2"]], base=paths["base"]).analysis(
        "similarity_matrix")
    assert result.headline["task_vectors"] == 2
    assert any("no task vector for base" in n for n in result.notes)


def test_series_matrices_and_outlier(finetunes):
    paths, sds = finetunes
    g = torch.Generator().manual_seed(5)
    stranger = {k: torch.randn(v.shape, generator=g) for k, v in sds["base"].items()}
    states = [sds["base"], sds["ft1"], sds["ft2"], sds["ft3"], stranger]
    result = compare_series(states, analyses=["similarity_matrix"]).analysis("similarity_matrix")
    x = np.stack([_flat(s) for s in states])
    norms = np.linalg.norm(x, axis=1)
    np.testing.assert_allclose(result.data["cosine"], x @ x.T / np.outer(norms, norms), rtol=1e-9, atol=1e-12)
    assert result.headline["outliers"] == ["#4"]
    assert result.headline["dimensions"] == "(5,5)"
    assert result.to_dict()["dimensions"] == [5, 5]
    layers = {row["layer"]: row for row in result.data["per_layer"]}
    assert set(layers) == {"embed", "layers.0", "layers.1", "layers.2", "head"}
    a, b = (np.concatenate([s[k].double().numpy().ravel() for k in ("layers.1.fc.weight", "layers.1.fc.bias",
                                                                       "layers.1.out.weight")]) for s in states[:2])
    assert layers["layers.1"]["cosine"][0][1] == pytest.approx(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)),
                                                               rel=1e-9)


def test_permuted_layer_found_by_the_cross_layer_matrix():
    old = _model(3)
    new = {k: v.clone() for k, v in old.items()}
    for suffix in ("fc.weight", "fc.bias", "out.weight"):  # blocks 0 and 1 swapped
        new[f"layers.0.{suffix}"], new[f"layers.1.{suffix}"] = old[f"layers.1.{suffix}"], old[f"layers.0.{suffix}"]
    g = torch.Generator().manual_seed(9)
    new = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in new.items()}
    report = torchdiff.compare(old, new, similarity_matrix=True, cross_layer=True)
    result = report.analysis("similarity_matrix")
    moved = {(m["old"], m["new"]) for m in result.data["moved"]}
    assert moved == {(f"layers.{a}.{s}", f"layers.{b}.{s}") for a, b in ((0, 1), (1, 0))
                     for s in ("fc.weight", "fc.bias", "out.weight")}
    assert result.headline["moved"] == 6
    group = next(gr for gr in result.data["cross_layer"] if gr["names"][0] == "layers.0.fc.weight")
    ow = np.stack([old[n].double().numpy().ravel() for n in group["names"]])
    nw = np.stack([new[n].double().numpy().ravel() for n in group["names"]])
    want = (ow / np.linalg.norm(ow, axis=1, keepdims=True)) @ (nw / np.linalg.norm(nw, axis=1, keepdims=True)).T
    np.testing.assert_allclose(group["cosine"], want, atol=1e-5)
    text = str(report)
    assert "Cross layer cosine" in text and "Moved" in text
    assert any(ch in text for ch in SHADES)


def test_pair_diagonal_is_the_engine_cosine_and_outliers(tmp_path):
    g = torch.Generator().manual_seed(0)
    old = {f"t{i}": torch.randn(50, generator=g) for i in range(8)}
    new = {k: v + 0.01 * torch.randn(50, generator=g) for k, v in old.items()}
    new["t5"] = old["t5"] + 2.0 * torch.randn(50, generator=g)
    report = torchdiff.compare(old, new, similarity_matrix=True)
    result = report.analysis("similarity_matrix")
    engine = {d.name: d.metrics.cosine for d in report.comparison.diffs}
    assert {row["path"]: row["cosine"] for row in result.data["diagonal"]} == engine
    assert result.headline["outliers"] == ["t5"]
    assert result.headline["mean_similarity"] == pytest.approx(np.mean(list(engine.values())))
    assert result.headline["dimensions"] == "(8,8)"


def test_cli_pair_and_series_forms(finetunes, capsys):
    paths, _ = finetunes
    assert main([paths["base"], paths["ft1"], "--cross-layer"]) == 0  # --cross-layer switches the analysis on
    out = capsys.readouterr().out
    assert "\nsimilarity_matrix: dimensions=(11,11), mean_similarity=" in out
    assert "cross_layer_groups=3" in out
    assert main(["series", paths["ft1"], paths["ft2"], paths["ft3"], "--base", paths["base"], "--output", "json"]) == 0
    items = json.loads(capsys.readouterr().out)
    simi = next(i for i in items if i["type"] == "similarity_matrix")
    assert len(simi["cosine"]) == 3 and len(simi["rel_distance"][0]) == 3
    assert simi["task_vectors"]["base"] == paths["base"]
    assert "cosine_heatmap" in simi and isinstance(simi["per_layer"][0]["cosine"], list)
    assert main(["series", paths["ft1"], paths["ft2"], "--similarity-matrix"]) == 0
    out = capsys.readouterr().out
    assert "\nsimilarity_matrix: dimensions=(2,2), mean_similarity=" in out
    assert "Cosine heatmap" in out and "note: heatmap shades on" in out


@settings(max_examples=20, deadline=None)
@given(n=st.integers(2, 6), seed=st.integers(0, 10_000))
def test_series_cosine_is_symmetric_with_unit_diagonal(n, seed):
    g = torch.Generator().manual_seed(seed)
    states = [{"a": torch.randn(9, generator=g), "b.w": torch.randn(2, 3, generator=g)} for _ in range(n)]
    result = compare_series(states, analyses=["similarity_matrix"]).analysis("similarity_matrix")
    cos = np.array(result.data["cosine"])
    np.testing.assert_allclose(cos, cos.T, atol=1e-12)
    np.testing.assert_allclose(np.diag(cos), 1.0)
    assert np.all(cos <= 1.0) and np.all(cos >= -1.0)
    assert math.isclose(result.headline["min_similarity"], cos[~np.eye(n, dtype=bool)].min())


def test_shading_levels():
    lo, hi = 0.0, 1.0
    assert [sim.shade(v, lo, hi, 1) for v in (0.0, 0.3, 0.5, 0.7, 1.0)] == list("·░▒▓█")
    assert sim.shade(math.nan, lo, hi) == "??"


def test_lowest_cosine_lists_measured_tensors_before_zero_initialised_ones():
    """Above 40 tensors the table shows the 20 lowest cosines: zero-initialised biases
    (cosine undefined) came first as nan/inf and hid the tensors that rotated most."""
    g = torch.Generator().manual_seed(0)
    old, new = {}, {}
    for i in range(30):
        w = torch.randn(8, 8, generator=g)
        old[f"l{i}.weight"], new[f"l{i}.weight"] = w, w + 0.05 * (i + 1) * torch.randn(8, 8, generator=g)
        old[f"l{i}.bias"], new[f"l{i}.bias"] = torch.zeros(8), 0.01 * torch.randn(8, generator=g)
    report = torchdiff.compare(old, new, similarity_matrix=True)
    result = report.analysis("similarity_matrix")
    lowest = result.data["lowest_cosine"]
    cos = {k: float(old[k].double().flatten() @ new[k].double().flatten()
                    / (old[k].double().norm() * new[k].double().norm())) for k in old if k.endswith("weight")}
    assert lowest == sorted(cos, key=cos.get)[:20]  # float64: the lowest cosines, lowest first, no bias
    text = str(report)
    section = text.split("Lowest cosine", 1)[1].split("note:", 1)[0]
    assert "nan" not in section and "inf" not in section


def test_an_all_zero_checkpoint_has_no_mean_cosine_and_prints_no_warning(tmp_path, capsys):
    states = [{"w": torch.zeros(4)}, {"w": torch.ones(4)}, {"w": torch.tensor([1.0, 2.0, 3.0, 4.0])}]
    paths = []
    for i, s in enumerate(states):
        paths.append(str(tmp_path / f"c{i}.safetensors"))
        save_file(s, paths[-1])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "Mean of empty slice" reached the terminal
        report = compare_series(paths, analyses=["similarity_matrix"])
    data = report.analysis("similarity_matrix").data
    a, b = np.ones(4), np.arange(1.0, 5.0)
    assert math.isnan(data["cosine"][0][1]) and data["cosine"][1][2] == pytest.approx(a @ b / (2 * np.sqrt(30)))
