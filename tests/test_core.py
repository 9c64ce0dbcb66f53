"""Issue 11, one columnar core: the figures table, the one aggregation, one Report family,
and a regression test for each bug the redesign fixed. References are float64 NumPy."""

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import torchdiff
from torchdiff.cli import main
from torchdiff.figures import Figures, GroupSums, group
from torchdiff.render import finite_json


def _adam_checkpoint(model, optimizer, steps, gen):
    for _ in range(steps):
        x = torch.randn(8, 4, generator=gen)
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {"model": {k: v.clone() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict()}


@pytest.fixture(scope="module")
def adam_pair(tmp_path_factory):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    d = tmp_path_factory.mktemp("adam")
    t2 = _adam_checkpoint(model, optimizer, 3, gen)
    torch.save(t2, d / "t2.pt")
    import copy
    t5 = copy.deepcopy(_adam_checkpoint(model, optimizer, 3, gen))
    torch.save(t5, d / "t5.pt")
    return d / "t2.pt", d / "t5.pt"


def test_adam_step_counters_do_not_top_the_layer_table(adam_pair, capsys):
    """0.1 said top_layer=optimizer.state.0, share 0.50: Adam's step counters (3 -> 6)
    dominated ‖Δ‖². The default scope is the trainable parameters."""
    a, b = adam_pair
    report = torchdiff.compare(str(a), str(b), show_layer_impact=True)
    impact = report.analysis("layer_impact")
    assert impact.headline["top_layer"] == "model"
    assert impact.headline["top_share"] == pytest.approx(1.0)
    old, new = torch.load(a, weights_only=True)["model"], torch.load(b, weights_only=True)["model"]
    dsq = sum(float(((new[k].double() - old[k].double()) ** 2).sum()) for k in old)
    assert impact.headline["l2"] == pytest.approx(math.sqrt(dsq), rel=1e-6)
    everything = torchdiff.compare(str(a), str(b), show_layer_impact=True, scope="all").analysis("layer_impact")
    assert everything.headline["top_layer"].startswith("optimizer.state")  # the counters, when asked for


def test_roles_come_from_one_place(adam_pair):
    a, b = adam_pair
    report = torchdiff.compare(str(a), str(b))
    roles = {d.name: d.role for d in report}
    assert roles["model.weight"] == "parameter"
    assert roles["optimizer.state.0.exp_avg"] == "optimizer_state"
    assert roles["optimizer.state.0.step"] == "optimizer_state"  # the optimizer's counter: not in --scope model
    # a parameter whose leaf happens to be an optimizer field is still a parameter
    named = torchdiff.compare({"encoder.norm_stats.exp_avg": torch.ones(3)}, {"encoder.norm_stats.exp_avg": torch.ones(3) * 2},
                              change_summary=True)
    assert named["encoder.norm_stats.exp_avg"].role == "parameter"
    assert named.analysis("change_summary").data["tensor_counts"]["changed"] == 1


def test_batchnorm_counters_do_not_drive_the_global_figure():
    """0.1's scalars printed 100/num_batches_tracked as global_rel_l2."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    old = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    for _ in range(5):
        model(torch.randn(16, 3))
    new = model.state_dict()  # only the BatchNorm statistics and counter moved
    scalars = torchdiff.compare(old, new).scalars()
    assert scalars["torchdiff/global_rel_l2"] == 0.0
    model_scope = torchdiff.compare(old, new, scope="model").scalars()
    assert model_scope["torchdiff/global_rel_l2"] > 0


def test_series_runs_pair_analyses_per_step_and_finds_them():
    states = [{"w": torch.full((4, 4), v), "b": torch.zeros(4)} for v in (1.0, 2.0, 3.0)]
    states[2] = {**states[2], "extra": torch.ones(2)}
    report = torchdiff.compare_series(states, architecture_comparison=True, anomaly_detection=True, common_only=True)
    per_step = [step.analysis("architecture_comparison") for step in report]
    assert all(a is not None for a in per_step)
    assert report.analysis("anomaly_detection") is report.steps[0].analysis("anomaly_detection")
    assert not any("transforms a pair" in n for n in report.notes)
    with pytest.raises(torchdiff.UsageError, match="quantization-analysis compares two checkpoints"):
        torchdiff.compare_series(states, quantization_analysis=True)


def test_series_report_has_the_family_surface():
    states = [{"w": torch.full((4,), v)} for v in (1.0, 1.5, 1.75)]
    report = torchdiff.compare_series(states)
    assert [type(s).__name__ for s in report] == ["Report", "Report"]
    rows = report.records("step")
    assert [r["step"] for r in rows] == [0, 1] and rows[0]["global_rel_l2"] == pytest.approx(0.5)
    assert report.scalars()["torchdiff/convergence_analysis/rel_update"] == pytest.approx(0.25 / 1.5)
    assert json.loads(report.to_json())[0]["type"] == "series"


def test_one_scalar_scheme_for_reports_and_the_monitor():
    model = torch.nn.Linear(3, 2)
    monitor = torchdiff.CheckpointMonitor(model, every=1)
    with torch.no_grad():
        model.weight.add_(0.1)
    report = monitor.step()
    record = monitor.history[-1]
    r, m = report.scalars(tensors=False), record.scalars()
    for key in ("torchdiff/global_rel_l2", "torchdiff/global_l2", "torchdiff/global_cosine", "torchdiff/param_norm"):
        assert r[key] == pytest.approx(m[key], rel=1e-12)
    assert not any(k.startswith("torchdiff/update_") for k in list(r) + list(m))


def test_inspect_is_one_sided():
    report = torchdiff.inspect({"w": torch.ones(3), "b": torch.zeros(2)})
    assert {d.status for d in report} == {"present"} and not report.has_differences
    rows = report.records()
    assert set(rows[0]) >= {"name", "mean", "std", "dtype"} and not any(k.startswith(("old_", "new_")) for k in rows[0])
    assert report["w"].new.mean == 1.0


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_tiny_and_huge_weights_have_no_dead_units(tmp_path, capsys, scale):
    """An 8×8 fc.weight of randn·1e-30: float32 row norms underflowed and all 8 rows were
    dead; of randn·1e30, the squares overflowed and all 8 were dead too. A row of zeros
    among them is the one dead row."""
    w = torch.randn(8, 8, generator=torch.Generator().manual_seed(0)) * scale
    for name, weight, dead in (("ok", w, 0), ("one_dead", torch.cat([w[:7], torch.zeros(1, 8)]), 1)):
        path = tmp_path / f"{name}.safetensors"
        save_file({"fc.weight": weight}, str(path))
        main(["inspect", str(path), "-o", "json", "--anomaly-detection"])
        items = json.loads(capsys.readouterr().out)
        anomalies = [i for i in items if i["type"] == "anomaly_detection"][0]["anomalies"]
        found = [a for a in anomalies if a["type"] == "dead_units"]
        assert [a["value"] for a in found] == ([dead / 8] if dead else [])


def test_tiny_low_rank_update_is_found():
    """A rank-1 update of magnitude 1e-25 was hidden: its float32 norm underflowed to 0."""
    g = torch.Generator().manual_seed(0)
    old = {"layers.0.fc.weight": torch.randn(64, 64, generator=g) * 1e-24}
    u, v = torch.randn(64, 1, generator=g), torch.randn(1, 64, generator=g)
    new = {"layers.0.fc.weight": old["layers.0.fc.weight"] + 1e-25 * (u @ v)}
    summary = torchdiff.compare(old, new, change_summary=True)
    low = [p for p in summary.analysis("change_summary").data["pattern_evidence"] if p["pattern"] == "low_rank"]
    assert low and low[0]["tensors"][0]["rank99"] == 1


def test_gained_nan_is_said_beside_the_figures(capsys):
    old = {"w": torch.ones(10)}
    new = {"w": torch.tensor([1.0] * 7 + [math.nan] * 3)}
    d = torchdiff.compare(old, new)["w"]
    assert d.status == "changed" and d.nonfinite_change == {"nan": (0, 3)}
    from torchdiff.render.text import tensor_line

    # the figures cover the positions finite on both sides; the suffix says what they leave out
    assert tensor_line(d, stats=False)[1] == "w: rel_l2=0, max_abs=0, cosine=1, nan=0->3"
    item = torchdiff.compare(old, new).to_dict()[0]
    assert item["nan_count_change"] == [0, 3]


def test_std_keeps_float32_precision_on_a_large_mean():
    """Mean 1, std 1e-6: the row centring lost 4e-5 relative of the std."""
    x = (1 + 1e-6 * torch.randn(300_000, generator=torch.Generator().manual_seed(0))).float()
    d = torchdiff.inspect({"w": x})["w"]
    ref = np.asarray(x, dtype=np.float64)
    assert abs(d.new.std - ref.std()) / ref.std() < 1e-6
    assert d.new.mean == pytest.approx(ref.mean(), rel=1e-12)


# ---- the figures table and the aggregation --------------------------------------------------

finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@st.composite
def state_pairs(draw):
    n = draw(st.integers(1, 6))
    old, new = {}, {}
    for i in range(n):
        size = draw(st.integers(1, 5))
        a = draw(st.lists(finite, min_size=size, max_size=size))
        kind = draw(st.sampled_from(["changed", "same", "added", "removed", "nan"]))
        name = f"blocks.{i % 3}.t{i}"
        if kind != "added":
            old[name] = torch.tensor(a)
        if kind != "removed":
            b = draw(st.lists(finite, min_size=size, max_size=size)) if kind != "same" else a
            t = torch.tensor(b)
            if kind == "nan":
                t[0] = math.nan
            new[name] = t
    return old, new


@settings(max_examples=40, deadline=None)
@given(state_pairs())
def test_items_from_columns_equal_the_objects(pair):
    old, new = pair
    report = torchdiff.compare(old, new)
    fig = report.figures
    rows = [i for i, s in enumerate(fig.status) if s != "unchanged"]
    assert fig.items(rows) == finite_json([fig[i].to_dict() for i in rows])


@settings(max_examples=40, deadline=None)
@given(state_pairs(), st.integers(0, 5))
def test_group_sums_merge_and_match_numpy(pair, cut):
    old, new = pair
    fig = torchdiff.compare(old, new).figures
    layer = [n.rsplit(".", 1)[0] for n in fig.names]
    whole = GroupSums().update(fig, layer).compute()
    halves = np.arange(len(fig)) < cut
    merged = GroupSums().update(fig, layer, halves).merge(GroupSums().update(fig, layer, ~halves)).compute()
    assert set(whole) == set(merged)
    for key in whole:
        a, b = whole[key], merged[key]
        assert (a.tensors, a.params) == (b.tensors, b.params)
        assert a.dsq == pytest.approx(b.dsq, rel=1e-12, abs=1e-300)
    for key, g in whole.items():
        names = [n for n in fig.names if n.rsplit(".", 1)[0] == key]
        both = [n for n in names if n in old and n in new and old[n].shape == new[n].shape]
        fin = [n for n in both if torch.isfinite(old[n]).all() and torch.isfinite(new[n]).all()]
        dsq = sum(float(((new[n].double() - old[n].double()) ** 2).sum()) for n in fin)
        osq = sum(float((old[n].double() ** 2).sum()) for n in fin)
        if len(fin) == len(both):
            assert g.dsq == pytest.approx(dsq, rel=1e-6, abs=1e-9)
            assert g.old_sq == pytest.approx(osq, rel=1e-6, abs=1e-9)
        assert g.tensors == len(names)


def test_group_figures_by_hand():
    # ‖Δ‖² = 9 + 16 = 25, ‖A‖² = 1 + 4 = 5 (hand-computed)
    report = torchdiff.compare({"l.a": torch.tensor([1.0, 0.0]), "l.b": torch.tensor([0.0, 2.0])},
                               {"l.a": torch.tensor([4.0, 0.0]), "l.b": torch.tensor([0.0, -2.0])})
    g = group(report.figures, lambda n: "l")["l"]
    assert (g.dsq, g.old_sq, g.new_sq) == (25.0, 5.0, 20.0)
    assert g.rel_l2 == pytest.approx(math.sqrt(5.0))
    assert g.cosine == pytest.approx((4.0 - 4.0) / math.sqrt(5.0 * 20.0))


def test_report_getitem_and_missing_name():
    report = torchdiff.compare({"w": torch.ones(2)}, {"w": torch.zeros(2)})
    assert report["w"].metrics.l2 == pytest.approx(math.sqrt(2))
    with pytest.raises(KeyError, match="no tensor named 'v'"):
        report["v"]
    assert isinstance(report.figures, Figures)


def test_series_refuses_a_checkpoint_that_lacks_tensors(tmp_path, capsys):
    """0.1 silently left such tensors out of every pair, which moved every figure."""
    paths = []
    for i, names in enumerate((["a", "b"], ["a", "b"], ["a"])):
        paths.append(tmp_path / f"c{i}.safetensors")
        save_file({n: torch.full((3,), float(i + 1)) for n in names}, str(paths[-1]))
    assert main(["series", *map(str, paths)]) == 2
    err = capsys.readouterr().err
    assert err == (f"torchdiff: error: {paths[2]}: lacks 1 tensor in --scope params other checkpoints of the "
                   "series hold: b (--common-only compares the tensors every checkpoint holds)\n")
    assert main(["series", *map(str, paths), "--common-only"]) == 0
    out = capsys.readouterr().out
    assert "note: --common-only: 1 tensor not in every checkpoint left out of every pair: b" in out
    report = torchdiff.compare_series(list(map(str, paths)), common_only=True)
    assert all(d.name == "a" for step in report for d in step)


def test_report_delta_reads_new_minus_old(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"w": torch.arange(4.0)}, str(a))
    save_file({"w": torch.arange(4.0) * 3}, str(b))
    report = torchdiff.compare(str(a), str(b))
    torch.testing.assert_close(report.delta("w"), torch.arange(4.0) * 2)


def test_group_figures_scalars_are_the_column_formulas():
    """GroupFigures.rel_l2 / cosine (rel_of / cosine_of on floats: scalar arithmetic, for speed)
    give the bits of the same formulas on arrays on every edge: zeros, tiny, huge, ∞,
    NaN, negative dots."""
    import itertools

    from torchdiff.figures import GroupFigures, cosine_of, rel_of

    values = [0.0, 1e-300, 1.0, 2.5, 1e300, math.inf, math.nan]

    def same(x, y):
        return (math.isnan(x) and math.isnan(y)) or x == y

    with np.errstate(all="ignore"):
        for dsq, old_sq, new_sq, dot in itertools.product(values, values, values, values + [-1.0, -math.inf]):
            g = GroupFigures(1, 1, 1, 1, dsq, old_sq, new_sq, dot)
            assert same(g.rel_l2, float(rel_of(np.array([dsq]), np.array([old_sq]))[0])), (dsq, old_sq)
            assert same(g.cosine, float(cosine_of(np.array([dot]), np.array([g.norm_old]), np.array([g.norm_new]),
                                                  np.array([dsq]))[0])), (dot, old_sq, new_sq, dsq)


def test_tensor_cosine_is_the_column_cosine_on_every_edge():
    """PairMetrics.cosine (the text lines) and Figures.cosine (JSON, YAML, analyses) agree
    bit for bit on every edge: a NaN or ±inf ⟨A,B⟩ is NaN in both (the text once printed
    cosine=1 from min(1.0, nan)), as are norms whose product leaves float64; no warning."""
    import itertools
    import warnings

    from torchdiff.figures import cosine_of
    from torchdiff.results import PairMetrics

    norms = [0.0, 1e-300, 1e-160, 1.0, 2.5, 1e160, 1e300, math.inf, math.nan]
    dots = [0.0, -1.0, 1.0, 3.0, 1e-300, 1e300, -1e300, math.inf, -math.inf, math.nan]

    def same(x, y):
        return (math.isnan(x) and math.isnan(y)) or x == y

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for dot, a, b in itertools.product(dots, norms, norms):
            m = PairMetrics(numel=1, equal=False, l2=1.0, norm_old=a, norm_new=b, dot=dot, max_abs=1.0,
                            mean_abs_diff=1.0, changed_count=1)
            column = float(cosine_of(np.array([dot]), np.array([a]), np.array([b]))[0])
            assert same(m.cosine, column) and same(m.cosine, cosine_of(dot, a, b)), (dot, a, b, m.cosine, column)
            assert math.isnan(m.cosine) or -1.0 <= m.cosine <= 1.0
            if not math.isfinite(dot):
                assert math.isnan(m.cosine)


def _assembled_pairs(n: int, count: int, seed: int, unrelated: bool = False):
    """``count`` pairs of in-memory tensors of ``n`` values whose ``materialize()`` builds a
    fresh buffer each time (as DCP assembles a tensor split across ranks); the calls counted."""
    from torchdiff.formats.base import TensorHandle
    from torchdiff.pairing import Pair

    g = torch.Generator().manual_seed(seed)
    values, calls, pairs = [], [], []
    for i in range(count):
        a = torch.randn(n, generator=g, dtype=torch.float64).float()
        b = torch.randn(n, generator=g).float() if unrelated else a + 1e-3 * torch.randn(n, generator=g)
        values.append((a, b))
        handles = [TensorHandle(f"t{i}", (n,), torch.float32, 4 * n,
                                (lambda t=t: calls.append(1) or t.clone())) for t in (a, b)]
        pairs.append(Pair(f"t{i}", *handles))
    return pairs, values, calls


def test_an_assembled_tensor_keeps_only_its_short_last_row_until_that_row_comes(monkeypatch):
    """A tensor of 2 full rows and 5 values more: its short row is reduced with the other
    short rows, after every full row. The whole buffer was held until then (every such
    tensor of a DCP checkpoint in memory at once); now only its 5 values are."""
    from torchdiff import engine as E

    n = 2 * E.ROW + 5
    pairs, values, calls = _assembled_pairs(n, 3, seed=8)
    held = []
    fill = E.Engine._fill

    def spy(self, task, which):
        if task.group.length == 5:
            held.extend((side.flat is None, side.tail is not None and side.tail.numel() == 5)
                        for job, _, _ in task.pending for side in (job.a, job.b))
        return fill(self, task, which)

    monkeypatch.setattr(E.Engine, "_fill", spy)
    fig = E.Engine("cpu", workers=1).run(pairs)
    assert held and all(flat_gone and tail for flat_gone, tail in held)
    assert len(calls) == 2 * len(pairs)  # each buffer assembled once: no second read for the short row
    for i, (a, b) in enumerate(values):
        a64, b64 = a.double(), b.double()
        assert fig.l2[i] == pytest.approx(float((b64 - a64).norm()), rel=1e-6)
        assert fig.new.mean[i] == pytest.approx(float(b64.mean()), rel=1e-5, abs=1e-9)
        assert fig.new.max[i] == float(b64.max()) and fig.old.min[i] == float(a64.min())


def test_unrelated_pairs_read_again_for_their_dot_are_let_go_one_by_one(monkeypatch):
    """Two unrelated checkpoints: every pair's ⟨A,B⟩ is summed again on the exact path.
    Each pair's buffers were kept until the end (the whole model in memory); now they are
    dropped after their pair."""
    from torchdiff import engine as E

    pairs, values, calls = _assembled_pairs(1000, 4, seed=9, unrelated=True)
    alive = []
    exact = E.Engine._exact_pair

    def spy(self, i, a, b):
        alive.append(sum(s.flat is not None for s in self._plan_sides))
        return exact(self, i, a, b)

    plan = E.Engine._plan

    def keep_plan(self, p):
        out = plan(self, p)
        self._plan_sides = out.sides.values()
        return out

    monkeypatch.setattr(E.Engine, "_exact_pair", spy)
    monkeypatch.setattr(E.Engine, "_plan", keep_plan)
    fig = E.Engine("cpu", workers=1).run(pairs)
    assert len(alive) >= 2 and max(alive) == 0  # none held from an earlier pair
    for i, (a, b) in enumerate(values):
        a64, b64 = a.double(), b.double()
        assert fig.cosine()[i] == pytest.approx(float(a64 @ b64 / (a64.norm() * b64.norm())), abs=2e-7)


def test_a_model_gone_nan_counts_its_nonfinite_values_among_the_scalars():
    """The figures cover positions finite on both sides: a model whose weights turned NaN
    read global_rel_l2 0 in a tracker, a flat line. ``torchdiff/nonfinite_values`` counts
    them, in Report.scalars() and the monitor's record alike."""
    model = torch.nn.Linear(3, 2)
    monitor = torchdiff.CheckpointMonitor(model, every=1)
    with torch.no_grad():
        model.weight[0, :2] = float("nan")
        model.bias[1] = float("inf")
    report = monitor.step()
    assert report.scalars()["torchdiff/nonfinite_values"] == 3.0
    assert monitor.history[-1].scalars()["torchdiff/nonfinite_values"] == 3.0
    clean = torchdiff.compare({"w": torch.ones(2)}, {"w": torch.full((2,), 2.0)})
    assert clean.scalars()["torchdiff/nonfinite_values"] == 0.0
