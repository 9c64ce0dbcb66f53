"""--show-layer-impact against float64 NumPy per-layer references.

Golden text output: tests/golden/stats_show_layer_impact.txt; regenerate with
TORCHDIFF_UPDATE_GOLDEN=1.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import torchdiff
from torchdiff.analyses import layer_impact as li
from torchdiff.cli import main

from helpers import check_golden


def model(rng: np.random.Generator, blocks: int = 4, width: int = 8) -> dict[str, np.ndarray]:
    sd = {"embed.weight": rng.standard_normal((32, width))}
    for i in range(blocks):
        sd |= {f"layers.{i}.attn.weight": rng.standard_normal((width, width)) * 0.3,
               f"layers.{i}.attn.bias": rng.standard_normal(width) * 0.1,
               f"layers.{i}.mlp.weight": rng.standard_normal((4 * width, width)) * 0.2,
               f"layers.{i}.norm.weight": np.ones(width)}
    sd |= {"head.weight": rng.standard_normal((4, width)) * 0.3, "head.bias": np.zeros(4)}
    return {k: v.astype(np.float32) for k, v in sd.items()}


def torch_sd(sd):
    return {k: torch.from_numpy(v) for k, v in sd.items()}


def layer_result(old, new, **kwargs):
    report = torchdiff.compare(torch_sd(old), torch_sd(new), show_layer_impact=True, **kwargs)
    result = report.analysis("layer_impact")
    return report, result, {r["layer"]: r for r in result.tables[0].records()}


def reference(old, new, layer_of) -> dict[str, dict[str, float]]:
    """Per-layer figures in float64 straight from the definitions."""
    groups: dict[str, list[str]] = {}
    for name in old:
        groups.setdefault(layer_of(name), []).append(name)
    total = sum(np.sum((new[n].astype(np.float64) - old[n].astype(np.float64)) ** 2) for n in old)
    out = {}
    for layer, names in groups.items():
        a = np.concatenate([old[n].astype(np.float64).ravel() for n in names])
        b = np.concatenate([new[n].astype(np.float64).ravel() for n in names])
        d = b - a
        with np.errstate(invalid="ignore", divide="ignore"):  # 0/0 where nothing changed: NaN, skipped
            out[layer] = {"l2": np.linalg.norm(d), "rel_l2": np.linalg.norm(d) / np.linalg.norm(a),
                          "share": d @ d / total, "rotation": 1 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b)),
                          "params": a.size}
    return out


def test_one_trained_block_ranks_first_with_all_the_share():
    rng = np.random.default_rng(0)
    old = model(rng)
    new = {k: v.copy() for k, v in old.items()}
    for k in new:
        if k.startswith("layers.2."):
            new[k] = (new[k] + rng.standard_normal(new[k].shape) * 0.05).astype(np.float32)
    _, result, by_layer = layer_result(old, new)
    assert result.headline["top_layer"] == "layers.2"
    assert result.headline["top_share"] == pytest.approx(1.0, abs=1e-12)
    assert by_layer["layers.2"]["rank"] == 1 and by_layer["layers.2"]["bar"] == "█" * li.BAR_WIDTH
    assert all(r["share"] == 0 for name, r in by_layer.items() if name != "layers.2")
    assert result.data["ranking"][0] == "layers.2"


def test_mostly_one_block_trained_is_about_100_percent():
    rng = np.random.default_rng(1)
    old = model(rng)
    new = {k: (v + rng.standard_normal(v.shape) * (0.05 if k.startswith("layers.1.") else 1e-4)).astype(np.float32)
           for k, v in old.items()}
    _, result, by_layer = layer_result(old, new)
    ref = reference(old, new, torchdiff.names.layer_of)
    assert result.headline["top_layer"] == "layers.1" and by_layer["layers.1"]["rank"] == 1
    assert 0.99 < by_layer["layers.1"]["share"] == pytest.approx(ref["layers.1"]["share"], rel=1e-5)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), blocks=st.integers(1, 5), scales=st.lists(st.floats(0.0, 1.0), min_size=8,
                                                                                    max_size=8))
def test_figures_match_the_float64_reference(seed, blocks, scales):
    rng = np.random.default_rng(seed)
    old = model(rng, blocks=blocks)
    new = {k: (v * (1 + scales[i % 8]) + rng.standard_normal(v.shape) * scales[(i + 3) % 8]).astype(np.float32)
           for i, (k, v) in enumerate(old.items())}
    _, result, by_layer = layer_result(old, new)
    ref = reference(old, new, torchdiff.names.layer_of)
    assert set(by_layer) == set(ref)
    # The engine sums float32 rows and merges in float64: relative error ≲ n·2^-24 on sums of squares.
    for layer, r in ref.items():
        row = by_layer[layer]
        assert row["params"] == r["params"]
        assert row["l2"] == pytest.approx(r["l2"], rel=1e-5, abs=1e-9)
        if math.isfinite(r["rel_l2"]):
            assert row["rel_l2"] == pytest.approx(r["rel_l2"], rel=1e-5, abs=1e-9)
        if np.isfinite(r["share"]):
            assert row["share"] == pytest.approx(r["share"], rel=1e-4, abs=1e-9)
        if np.isfinite(r["rotation"]):
            assert row["rotation"] == pytest.approx(r["rotation"], rel=1e-3, abs=1e-6)
    total = sum(r["share"] for r in by_layer.values())
    assert total == pytest.approx(1.0, abs=1e-9) or total == 0
    ranks = sorted(by_layer.values(), key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == list(range(1, len(ranks) + 1))
    assert all(x["l2"] >= y["l2"] for x, y in zip(ranks, ranks[1:]))


def test_pure_rescaling_has_no_rotation():
    rng = np.random.default_rng(2)
    old = model(rng, blocks=2)
    new = {k: (v * 2).astype(np.float32) for k, v in old.items()}
    _, _, by_layer = layer_result(old, new)
    assert all(r["rotation"] == pytest.approx(0.0, abs=1e-6) for r in by_layer.values())
    assert by_layer["layers.0"]["rel_l2"] == pytest.approx(1.0, rel=1e-6)


def test_layer_pattern_overrides_the_grouping():
    rng = np.random.default_rng(3)
    old = model(rng, blocks=3)
    new = {k: (v + 0.01).astype(np.float32) for k, v in old.items()}
    _, result, by_layer = layer_result(old, new, layer_pattern=r"\.(attn|mlp|norm)\.")
    assert {"attn", "mlp", "norm"} <= set(by_layer)
    assert by_layer["attn"]["params"] == 3 * (8 * 8 + 8)
    with pytest.raises(torchdiff.UsageError, match="--layer-pattern"):
        torchdiff.compare({}, {}, show_layer_impact=True, layer_pattern="(")


def test_added_and_removed_tensors_count_in_params_only():
    rng = np.random.default_rng(4)
    old = model(rng, blocks=2)
    new = {k: v.copy() for k, v in old.items()}
    new["layers.1.extra.weight"] = np.ones((3, 3), dtype=np.float32)
    del new["layers.0.attn.bias"]
    new["layers.1.mlp.weight"] = new["layers.1.mlp.weight"] + np.float32(0.1)
    _, result, by_layer = layer_result(old, new)
    assert by_layer["layers.1"]["params"] == 8 * 8 + 8 + 32 * 8 + 8 + 9
    assert by_layer["layers.0"]["tensors"] == 4
    assert ("counted in tensors and params, not in the figures: added: layers.1 (1); removed: layers.0 (1)"
            in result.notes)
    assert result.headline["top_share"] == 1.0


def test_integer_counters_are_named_as_not_floating_point_not_as_added():
    """--scope model: BatchNorm's num_batches_tracked is on both sides with one shape, but
    int64: it counts in tensors and params, and the note gives that reason, not "added,
    removed or reshaped"."""
    g = torch.Generator().manual_seed(5)
    old = {"bn1.weight": torch.ones(4), "bn1.running_mean": torch.zeros(4), "bn1.num_batches_tracked": torch.tensor(3),
           "fc.weight": torch.randn(2, 4, generator=g), "only_old.weight": torch.ones(2),
           "conv.weight": torch.ones(3, 3)}
    new = {k: v + 1 for k, v in old.items() if k != "only_old.weight"} | {"conv.weight": torch.ones(9)}
    report = torchdiff.compare(old, new, show_layer_impact=True, scope="model")
    result = report.analysis("layer_impact")
    by_layer = {r["layer"]: r for r in result.tables[0].records()}
    assert (by_layer["bn1"]["tensors"], by_layer["bn1"]["params"]) == (3, 9)
    # ‖Δ_bn1‖² sums the two float tensors only: 4 + 4 (every value + 1)
    assert by_layer["bn1"]["l2"] == pytest.approx(math.sqrt(8), rel=1e-12)
    assert ("counted in tensors and params, not in the figures: removed: only_old (1); reshaped: conv (1); "
            "not floating point (integer/bool values): bn1 (1)") in result.notes
    assert not any(n.startswith("added, removed or reshaped") for n in result.notes)
    params = torchdiff.compare(old, new, show_layer_impact=True).analysis("layer_impact")  # scope params
    assert not any("not floating point" in n for n in params.notes)
    assert ("scope params: 2 tensors of other roles (buffer 1, counter 1) not in the figures; "
            "--scope all includes them") in params.notes


def test_nonfinite_values_with_finite_positions_unchanged_are_not_no_change():
    """Tensors that gained NaN/Inf, their finite positions unchanged: ‖Δ‖ = 0 over the
    positions finite on both sides (docs/METRICS.md), so every share is 0, but the tensors
    changed: the note says so and names the counts, never "no tensor changed"."""
    old = {"layers.0.w": torch.ones(4, 16), "layers.1.w": torch.ones(8), "layers.2.w": torch.ones(3)}
    new = {k: v.clone() for k, v in old.items()}
    new["layers.0.w"][1] = float("nan")
    new["layers.1.w"][0] = float("inf")
    result = torchdiff.compare(old, new, show_layer_impact=True).analysis("layer_impact")
    assert result.headline == {"top_layer": "none", "top_share": 0.0, "l2": 0.0}
    assert "no tensor changed: every share is 0" not in result.notes
    assert ("every share is 0: ‖Δ‖ = 0 over the positions finite on both sides, yet tensors differ; NaN/Inf counts "
            "changed: layers.0.w (nan 0->16), layers.1.w (inf 0->1)") in result.notes
    # A retyped tensor with equal values: no NaN/Inf, named with its status.
    cast = torchdiff.compare(old, {**old, "layers.2.w": torch.ones(3, dtype=torch.float16)}, show_layer_impact=True)
    assert ("every share is 0: ‖Δ‖ = 0 over the positions finite on both sides, yet tensors differ; otherwise: "
            "layers.2.w (retyped)") in cast.analysis("layer_impact").notes
    same = torchdiff.compare(old, old, show_layer_impact=True).analysis("layer_impact")
    assert "no tensor changed: every share is 0" in same.notes


def test_training_state_is_not_a_layer(tmp_path):
    """An RNG state (torch.get_rng_state(): uint8 [5056]) and nanoGPT's 0-d best_val_loss
    beside the model: role training_state, out of the default scope, so no layer holds
    them and the shares are the model's alone (float64 reference)."""
    g = torch.Generator().manual_seed(6)
    w, b = torch.randn(6, 4, generator=g), torch.randn(6, generator=g)
    w2, b2 = w + 0.1 * torch.randn(6, 4, generator=g), b + 0.1 * torch.randn(6, generator=g)
    rng_old = torch.get_rng_state()
    torch.rand(100)
    rng_new = torch.get_rng_state()
    for path, (ww, bb, rng, loss) in ((tmp_path / "a.pt", (w, b, rng_old, 3.2)),
                                      (tmp_path / "b.pt", (w2, b2, rng_new, 3.1))):
        torch.save({"model": {"fc.weight": ww, "fc.bias": bb}, "rng": rng, "best_val_loss": torch.tensor(loss)}, path)
    report = torchdiff.compare(tmp_path / "a.pt", tmp_path / "b.pt", show_layer_impact=True)
    roles = dict(zip(report.figures.names, report.figures.role))
    assert roles["rng"] == roles["best_val_loss"] == "training_state"
    result = report.analysis("layer_impact")
    by_layer = {r["layer"]: r for r in result.tables[0].records()}
    assert sorted(by_layer) == ["model.fc"]
    assert by_layer["model.fc"]["share"] == 1.0 and by_layer["model.fc"]["params"] == 30
    dsq = float(((w2.double() - w.double()) ** 2).sum() + ((b2.double() - b.double()) ** 2).sum())
    assert result.headline["l2"] == pytest.approx(math.sqrt(dsq), rel=1e-6)
    assert "scope params: 2 tensors of other roles (training state 2) not in the figures; --scope all includes them" \
        in result.notes
    everything = torchdiff.compare(tmp_path / "a.pt", tmp_path / "b.pt", show_layer_impact=True, scope="all")
    rows = {r["layer"]: r for r in everything.analysis("layer_impact").tables[0].records()}
    assert sorted(rows) == ["best_val_loss", "model.fc", "rng"]
    assert "not floating point (integer/bool values): rng (1)" in " ".join(everything.analysis("layer_impact").notes)


def test_bar_resolution():
    assert li.bar(1.0) == "█" * 20
    assert li.bar(0.5) == "█" * 10
    assert li.bar(1 / 160) == "▏"
    assert li.bar(0.0) == "" and li.bar(math.nan) == ""


def test_natural_order_and_no_change():
    sd = {f"layers.{i}.w": torch.ones(2) for i in (10, 2, 1)}
    result = torchdiff.compare(sd, sd, show_layer_impact=True).analysis("layer_impact")
    assert [r[0] for r in result.tables[0].rows] == ["layers.1", "layers.2", "layers.10"]
    assert result.headline["top_layer"] == "none"


def test_inspect_has_no_layer_impact():
    result = torchdiff.inspect({"a.w": torch.ones(2)}, show_layer_impact=True).analysis("layer_impact")
    assert (result.headline, result.tables, result.notes) == ({}, (), ("layer impact needs two checkpoints "
                                                                       "(torchdiff OLD NEW)",))


def make_pair(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(7)
    old = model(rng, blocks=3)
    new = {k: (v + rng.standard_normal(v.shape) * (0.03 if k.startswith("layers.2.") else 0.003)).astype(np.float32)
           for k, v in old.items()}
    paths = tmp_path / "baseline.safetensors", tmp_path / "experiment.safetensors"
    save_file(torch_sd(old), paths[0])
    save_file(torch_sd(new), paths[1])
    return paths


def test_golden_stats_show_layer_impact(tmp_path, capsys):
    old, new = make_pair(tmp_path)
    assert main([str(old), str(new), "--stats", "--show-layer-impact", "--no-color"]) == 0
    text = capsys.readouterr().out
    assert "\nlayer_impact: top_layer=layers.2, top_share=" in text
    check_golden("stats_show_layer_impact.txt", text)


def test_json_and_yaml_carry_the_same_rows(tmp_path, capsys):
    old, new = make_pair(tmp_path)
    report = torchdiff.compare(old, new, show_layer_impact=True)
    rows = report.analysis("layer_impact").tables[0].records()
    assert main([str(old), str(new), "--show-layer-impact", "--output", "json"]) == 0
    (item,) = [i for i in json.loads(capsys.readouterr().out) if i["type"] == "layer_impact"]
    assert item["layers"] == [{k: (v if not isinstance(v, float) else pytest.approx(v)) for k, v in r.items()}
                              for r in rows]
    assert main([str(old), str(new), "--show-layer-impact", "--output", "yaml"]) == 0
    (yitem,) = [i for i in yaml.safe_load(capsys.readouterr().out) if i["type"] == "layer_impact"]
    assert yitem["layers"] == item["layers"]


def test_cli_rejects_a_bad_pattern(tmp_path, capsys):
    old, new = make_pair(tmp_path)
    assert main([str(old), str(new), "--show-layer-impact", "--layer-pattern", "("]) == 2
    assert "--layer-pattern '(' is not a valid regex" in capsys.readouterr().err


def test_tied_weights_count_once_everywhere_layers_are_shown(tmp_path):
    """A GPT-2-style tied head (lm_head.weight and wte.weight one storage in a .pt) and
    Adam state beside the model: layer impact, the layer records, the HTML report's
    layers (without --show-layer-impact) and the global figures give the same layers and
    sums; float64 reference: the tied update counted once, the optimizer left out."""
    from torchdiff.render.html import payload

    g = torch.Generator().manual_seed(3)
    w, m = torch.randn(10, 4, generator=g), torch.randn(4, 4, generator=g)
    w2, m2 = w + 0.1 * torch.randn(10, 4, generator=g), m + 0.1 * torch.randn(4, 4, generator=g)
    for path, (e, h, step) in ((tmp_path / "a.pt", (w, m, 3.0)), (tmp_path / "b.pt", (w2, m2, 6.0))):
        torch.save({"wte.weight": e, "lm_head.weight": e, "h.0.mlp.weight": h,
                    "optimizer.state.0.step": torch.tensor(step),
                    "optimizer.state.0.exp_avg": 100 * step * torch.ones(4, 4)}, path)
    dsq = {"wte": float(((w2.double() - w.double()) ** 2).sum()), "h.0": float(((m2.double() - m.double()) ** 2).sum())}
    total = sum(dsq.values())
    report = torchdiff.compare(tmp_path / "a.pt", tmp_path / "b.pt", show_layer_impact=True)
    a = report.analysis("layer_impact")
    rows = {r[0]: dict(zip(a.tables[0].headers, r)) for r in a.tables[0].rows}
    assert sorted(rows) == ["h.0", "wte"]  # no lm_head row: its values are wte's
    assert a.headline["top_layer"] == "wte"
    for name in rows:
        assert rows[name]["share"] == pytest.approx(dsq[name] / total, rel=1e-5)
        assert rows[name]["l2"] == pytest.approx(math.sqrt(dsq[name]), rel=1e-5)
    assert rows["wte"]["params"] == 40 and rows["wte"]["tensors"] == 1
    assert a.headline["l2"] == pytest.approx(math.sqrt(total), rel=1e-5)
    assert a.headline["l2"] == report.scalars()["torchdiff/global_l2"]
    assert any("lm_head.weight -> wte.weight" in n for n in a.notes)
    records = {r["layer"]: r for r in report.records("layer")}
    html = {r["layer"]: r for r in payload(torchdiff.compare(tmp_path / "a.pt", tmp_path / "b.pt"))["layers"]["rows"]}
    for shown in (records, html):
        assert sorted(shown) == ["h.0", "wte"]
        for name in rows:
            assert shown[name]["share"] == rows[name]["share"] and shown[name]["l2"] == rows[name]["l2"]
