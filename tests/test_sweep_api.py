"""The Python API as research scripts and notebooks use it: the Report family's surface
(membership, names, analyses, len, repr), errors in the package's family, ``load`` of
paths and objects, and the figures of one report checked against float64 references
and against each other (records, JSON, pandas, text)."""

from __future__ import annotations

import copy
import json
import math
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import torchdiff
from torchdiff.errors import UsageError


class TiedCNN(nn.Module):
    """A BatchNorm CNN whose head shares its weight with the embedding."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)
        self.emb = nn.Embedding(4, 4)
        self.head = nn.Linear(4, 4, bias=False)
        self.head.weight = self.emb.weight


@pytest.fixture
def models():
    torch.manual_seed(0)
    old = TiedCNN()
    new = copy.deepcopy(old)
    new.bn(torch.randn(4, 8, 3, 3))  # running statistics and the batch counter move
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return old, new


@pytest.fixture
def files(tmp_path):
    g = torch.Generator().manual_seed(1)
    a = {"fc.weight": torch.randn(5, 4, generator=g), "fc.bias": torch.randn(5, generator=g)}
    b = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in a.items()}
    old, new = tmp_path / "old.safetensors", tmp_path / "new.pt"
    save_file(a, str(old))
    torch.save(b, str(new))
    return old, new, a, b


# ---- names: membership, lookup, errors ----------------------------------------------------------

def test_report_membership_is_by_tensor_name(files):
    old, new, _, _ = files
    report = torchdiff.compare(old, new)
    assert "fc.weight" in report and "fc.bias" in report
    assert "fc.weigth" not in report and 0 not in report and ["fc.weight"] not in report


def test_missing_tensor_is_a_usage_error_and_a_key_error(files):
    old, new, _, _ = files
    report = torchdiff.compare(old, new)
    for lookup in (lambda: report["fc.weigth"], lambda: report.delta("fc.weigth", *files[2:])):
        with pytest.raises(UsageError, match=r"tensor.*this report \(2 tensors; did you mean 'fc.weight'"):
            lookup()
        with pytest.raises(KeyError):  # still what ``mapping[name]`` raises
            lookup()
    with pytest.raises(UsageError) as e:
        report["fc.weigth"]
    assert str(e.value) == "no tensor named 'fc.weigth' in this report (2 tensors; did you mean 'fc.weight'?)"
    with pytest.raises(UsageError, match=r"^a Report is indexed by tensor name, got int 0 \(list\(report\)\[i\]"):
        report[0]


def test_analysis_by_name_flag_or_misspelling(files):
    old, new, a, b = files
    report = torchdiff.compare(old, new, show_layer_impact=True)
    result = report.analysis("layer_impact")
    assert result is not None and report.analysis("show_layer_impact") is result
    assert report.analysis("anomaly_detection") is None  # an analysis that did not run
    assert report.analysis("mapping") is None  # a side item that did not occur
    with pytest.raises(UsageError, match=r"^no analysis named 'layer_impactt' \(did you mean 'layer_impact'\?\)$"):
        report.analysis("layer_impactt")
    # the figure it holds, against float64
    d2 = sum(float(((b[k].double() - a[k].double()) ** 2).sum()) for k in a)
    assert result.headline["l2"] == pytest.approx(math.sqrt(d2), rel=1e-6)


def test_series_len_is_its_steps(files):
    old, new, a, _ = files
    series = torchdiff.compare_series([old, new, a])
    assert len(series) == len(list(series)) == len(series.steps) == 2
    assert len(series.checkpoints) == 3


# ---- keywords ------------------------------------------------------------------------------------

def test_misspelt_keyword_suggests_the_entry_points_own_names(files):
    old, new, _, _ = files
    with pytest.raises(UsageError, match=r"^unknown option 'stats'$"):  # differs has no analyses
        torchdiff.differs(old, new, stats=True)
    with pytest.raises(UsageError, match=r"^unknown option 'epsilonn' \(did you mean 'epsilon'\?\)$"):
        torchdiff.differs(old, new, epsilonn=0.1)
    with pytest.raises(UsageError, match=r"^unknown option 'stat' \(did you mean 'stats'\?\)$"):
        torchdiff.compare(old, new, stat=True)
    with pytest.raises(UsageError, match=r"^unknown option 'layer_patern' \(did you mean 'layer_pattern'\?\)$"):
        torchdiff.inspect(old, layer_patern="x")
    with pytest.raises(UsageError, match=r"^unknown option 'fromat' \(did you mean 'format'\?\)$"):
        torchdiff.load(old, fromat="safetensors")


# ---- load ----------------------------------------------------------------------------------------

def test_load_paths_and_objects(files, models):
    old, new, a, b = files
    with torchdiff.load(old) as ckpt:
        assert sorted(ckpt) == sorted(a) and torch.equal(ckpt["fc.weight"], a["fc.weight"])
    assert torch.equal(torchdiff.load(new, format="torch")["fc.bias"], b["fc.bias"])
    view = torchdiff.load(a)  # a state_dict: a view, as compare reads it
    assert sorted(view) == sorted(a) and torch.equal(view["fc.bias"], a["fc.bias"])
    module = torchdiff.load(models[0])
    assert torch.equal(module["bn.running_var"], models[0].bn.running_var)
    with pytest.raises(UsageError, match="pass a path, a state_dict or an nn.Module"):
        torchdiff.load(3)


# ---- notebooks -----------------------------------------------------------------------------------

def test_repr_is_one_line_and_ipython_shows_the_text(files):
    old, new, a, _ = files
    report = torchdiff.compare(old, new)
    assert repr(report) == f"<Report compare {str(old)!r} -> {str(new)!r}: 2 tensors: 2 changed>"
    assert repr(torchdiff.inspect(a)) == "<Report inspect '<memory>': 2 tensors: 2 present>"
    assert repr(torchdiff.compare_series([a, a, a])) == "<SeriesReport 3 checkpoints, 2 steps, order given>"

    shown = []

    class Printer:
        text = staticmethod(shown.append)

    report._repr_pretty_(Printer, False)
    assert shown == [str(report)]


# ---- one report, every view: float64 references and agreement ----------------------------------

def test_views_of_one_report_agree_with_float64(models, recwarn):
    old, new = models
    warnings.simplefilter("always")
    report = torchdiff.compare(old, new, stats=True, show_layer_impact=True, scope="model")
    sd_old, sd_new = old.state_dict(), new.state_dict()
    records = {r["name"]: r for r in report.records()}
    items = {i["path"]: i for i in report.to_dict() if i["type"].startswith("tensor_")}
    frame = report.to_pandas().set_index("name")
    assert [d.name for d in report] == list(records) == list(frame.index)
    for name, r in records.items():
        a, b = sd_old[name].double(), sd_new[name].double()
        l2 = float((b - a).norm())
        assert r["l2"] == pytest.approx(l2, rel=1e-6, abs=1e-12) and report[name].metrics.l2 == r["l2"]
        assert items[name]["l2"] == r["l2"] == frame.loc[name, "l2"]
        if float(a.norm()) > 0:
            assert r["rel_l2"] == pytest.approx(l2 / float(a.norm()), rel=1e-6)
        delta = report.delta(name, old, new)  # formed in float32 as the engine forms it
        assert torch.equal(delta, sd_new[name].float() - sd_old[name].float())
        torch.testing.assert_close(delta.double(), b - a, rtol=1e-7, atol=1e-9)
    assert json.loads(report.to_json()) == report.to_dict()
    # global figures: scope "model" (parameters and buffers), float values only (the
    # integer batch counter is left out, as layer_impact's note says), the tied weight once
    keep = [k for k in sd_old if k != "head.weight" and sd_old[k].is_floating_point()]
    a = torch.cat([sd_old[k].double().flatten() for k in keep])
    b = torch.cat([sd_new[k].double().flatten() for k in keep])
    scalars = report.scalars()
    assert scalars["torchdiff/global_l2"] == pytest.approx(float((b - a).norm()), rel=1e-6)
    assert scalars["torchdiff/global_cosine"] == pytest.approx(float(a @ b / (a.norm() * b.norm())), rel=1e-9)
    layers = {r["layer"]: r for r in report.records("layer")}
    for layer, r in layers.items():
        assert scalars[f"torchdiff/layer_rel_l2/{layer}"] == r["rel_l2"]
    assert report.analysis("layer_impact").headline["l2"] == pytest.approx(scalars["torchdiff/global_l2"])
    assert str(report).count("\n  ~ ") == sum(r["status"] != "unchanged" for r in records.values())
    assert not [w for w in recwarn if "torchdiff" in (w.filename or "")]


def test_scalars_share_one_naming_scheme(files):
    old, new, a, b = files
    report = torchdiff.compare(old, new)
    series = torchdiff.compare_series([a, b])
    monitor_keys = set()
    model = nn.Linear(4, 5)
    monitor = torchdiff.CheckpointMonitor(model, every=1, reference="previous")
    with torch.no_grad():
        model.weight.add_(1.0)
    monitor.step()
    monitor_keys = set(monitor.history[-1].scalars())
    assert {"torchdiff/global_rel_l2", "torchdiff/global_cosine", "torchdiff/changed"} <= monitor_keys
    step_keys = set(series.steps[0].scalars(tensors=False))
    assert set(report.scalars(tensors=False)) == step_keys
    assert {k for k in series.scalars() if k.count("/") == 1} == {k for k in step_keys if k.count("/") == 1}
    assert {k.split("/")[1] for k in series.scalars() if k not in step_keys} == {
        a.name for a in series.series_analyses}
    assert {k.split("/")[1] for k in monitor_keys if k.count("/") == 2} <= {"layer_rel_l2", "rel_l2"}
    assert series.scalars()["torchdiff/global_rel_l2"] == report.scalars()["torchdiff/global_rel_l2"]
    assert np.isfinite(report.scalars()["torchdiff/global_rel_l2"])


def test_a_checkpoint_indexed_by_a_missing_name_names_the_closest(tmp_path):
    """``torchdiff.load(p)["nope"]`` raised a bare KeyError: it is the report's
    UnknownTensorError (a UsageError and a KeyError) with the closest names."""
    from safetensors.torch import save_file

    path = tmp_path / "a.safetensors"
    save_file({"fc.weight": torch.ones(2, 2), "fc.bias": torch.zeros(2)}, str(path))
    with torchdiff.load(path) as ckpt:
        assert torch.equal(ckpt["fc.bias"], torch.zeros(2))
        with pytest.raises(torchdiff.UnknownTensorError, match=r"'fc.weigth' is not a tensor of .*a\.safetensors "
                                                               r"\(2 tensors; did you mean 'fc.weight'"):
            ckpt["fc.weigth"]
        with pytest.raises(KeyError):
            ckpt["nope"]
        with pytest.raises(torchdiff.UsageError):
            ckpt[0]


def test_monitor_record_analysis_looks_up_as_a_report_does():
    """MonitorRecord.analysis kept its own loop: a typo gave a silent None there."""
    from torchdiff.callbacks import CheckpointMonitor

    model = torch.nn.Linear(4, 4)
    monitor = CheckpointMonitor(model, every=1, analyses=("anomaly_detection",))
    with torch.no_grad():
        model.weight.add_(1.0)
    monitor.step()
    record = monitor.history[-1]
    assert record.analysis("anomaly_detection") is not None
    assert record.analysis("change_summary") is None  # did not run
    with pytest.raises(torchdiff.UsageError, match="did you mean 'anomaly_detection'"):
        record.analysis("anomaly_detectoin")
