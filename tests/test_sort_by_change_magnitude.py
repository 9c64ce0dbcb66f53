"""--sort-by-change-magnitude: order by a float64 NumPy reference, in text, JSON and YAML.

Golden text output: tests/golden/stats_sort_by_change_magnitude.txt; regenerate with
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
from torchdiff.analyses import sort_by_change_magnitude as sbcm
from torchdiff.cli import main

from helpers import check_golden
KEYS = ["rel_l2", "l2", "max_abs", "nmse", "cosine"]


def ref_key(a: np.ndarray, b: np.ndarray, key: str) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    d = b - a
    return {"l2": np.linalg.norm(d), "rel_l2": np.linalg.norm(d) / np.linalg.norm(a),
            "nmse": (np.linalg.norm(d) / np.linalg.norm(a)) ** 2, "max_abs": np.abs(d).max(),
            "cosine": a @ b / (np.linalg.norm(a) * np.linalg.norm(b))}[key]


def pair(seed: int = 0):
    """Tensors whose keys disagree: big tensors with small relative change and vice versa."""
    rng = np.random.default_rng(seed)
    old, new = {}, {}
    for i, (shape, scale, step) in enumerate([((64, 64), 1.0, 0.05), ((8,), 0.01, 0.004), ((32, 4), 0.5, 0.2),
                                              ((16, 16), 2.0, 0.01), ((3,), 1.0, 0.9), ((128,), 0.1, 0.001)]):
        a = (rng.standard_normal(shape) * scale).astype(np.float32)
        b = a + (rng.standard_normal(shape) * step).astype(np.float32)
        if i == 2:
            b = b * np.float32(-1)  # a flipped tensor: the lowest cosine
        old[f"t{i}"], new[f"t{i}"] = a, b
    return old, new


def names_by_ref(old, new, key):
    most_first = sorted(old, key=lambda n: (ref_key(old[n], new[n], key), n) if key == "cosine"
                        else (-ref_key(old[n], new[n], key), n))
    return most_first


def t(sd):
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}


@pytest.mark.parametrize("key", KEYS)
def test_order_matches_the_reference_for_every_key(key):
    old, new = pair()
    report = torchdiff.compare(t(old), t(new), sort_by_change_magnitude=True, sort_key=key)
    assert [d.name for d in report] == names_by_ref(old, new, key)
    assert report.analysis("sort_by_change_magnitude").headline == {
        "sort_key": key, "order": "smallest first" if key == "cosine" else "largest first"}


def test_ties_are_broken_by_name():
    a = torch.ones(4)
    old = {"zeta": a, "alpha": a, "mid": a}
    new = {"zeta": a * 2, "alpha": a * 2, "mid": a * 3}
    report = torchdiff.compare(old, new, sort_by_change_magnitude=True)
    assert [d.name for d in report] == ["mid", "alpha", "zeta"]


def test_structural_changes_follow_by_parameter_count_then_unchanged():
    old = {"changed": torch.ones(5), "removed": torch.ones(100), "reshaped": torch.ones(2, 25),
           "same_b": torch.ones(3), "same_a": torch.ones(3)}
    new = {"changed": torch.full((5,), 2.0), "reshaped": torch.ones(5, 10, 2), "same_b": torch.ones(3),
           "same_a": torch.ones(3), "added": torch.ones(10)}
    report = torchdiff.compare(old, new, sort_by_change_magnitude=True)
    assert [d.name for d in report] == ["changed", "removed", "reshaped", "added", "same_a", "same_b"]


def test_zero_initialised_tensors_follow_the_measured_ones_by_l2():
    # rel_l2 = ∞ and cosine = NaN for a tensor that was all zero: no relative change to rank
    old = {"from_zero": torch.zeros(4), "bigger_from_zero": torch.zeros(4), "small": torch.ones(4)}
    new = {"from_zero": torch.ones(4), "bigger_from_zero": torch.full((4,), 3.0),
           "small": torch.tensor([1.0, 1.0, 1.0, 1.1])}
    for key in ("rel_l2", "cosine", "nmse"):
        report = torchdiff.compare(old, new, sort_by_change_magnitude=True, sort_key=key)
        assert [d.name for d in report] == ["small", "bigger_from_zero", "from_zero"]
    report = torchdiff.compare(old, new, sort_by_change_magnitude=True, sort_key="l2")
    assert [d.name for d in report] == ["bigger_from_zero", "from_zero", "small"]


def test_an_undefined_cosine_counts_as_most_changed():
    old = {"to_zero": torch.ones(4), "small": torch.ones(4)}
    new = {"to_zero": torch.zeros(4), "small": torch.tensor([1.0, 1.0, 1.0, 1.1])}
    report = torchdiff.compare(old, new, sort_by_change_magnitude=True, sort_key="cosine")
    assert [d.name for d in report][0] == "to_zero"


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 8), key=st.sampled_from(KEYS),
       data=st.data())
def test_order_is_a_permutation_with_monotone_keys(seed, n, key, data):
    rng = np.random.default_rng(seed)
    old, new = {}, {}
    for i in range(n):
        a = rng.standard_normal(data.draw(st.integers(1, 40))).astype(np.float32)
        kind = data.draw(st.sampled_from(["changed", "same", "added", "removed"]))
        if kind != "added":
            old[f"n{i}"] = torch.from_numpy(a)
        if kind == "changed":
            new[f"n{i}"] = torch.from_numpy(a + rng.standard_normal(a.shape).astype(np.float32))
        elif kind in ("same", "added"):
            new[f"n{i}"] = torch.from_numpy(a.copy())
    report = torchdiff.compare(old, new, sort_by_change_magnitude=True, sort_key=key)
    ordered = list(report)
    assert sorted(d.name for d in ordered) == sorted(set(old) | set(new))
    changed = [d for d in ordered if d.status == "changed"]
    assert ordered[: len(changed)] == changed
    values = [getattr(d.metrics, key) for d in changed]
    sign = 1 if key == "cosine" else -1
    assert all(sign * x <= sign * y or math.isnan(x) for x, y in zip(values, values[1:]))


def test_unknown_key_is_refused_before_any_io():
    with pytest.raises(torchdiff.UsageError, match=r"--sort-key 'cos' is not a sort key \(choose from cosine, "
                                                   r"l2, max_abs, nmse, rel_l2; did you mean cosine\?\)"):
        torchdiff.compare("missing-old.pt", "missing-new.pt", sort_by_change_magnitude=True, sort_key="cos")


def files(tmp_path: Path) -> tuple[Path, Path]:
    old, new = pair(1)
    paths = tmp_path / "checkpoint_old.safetensors", tmp_path / "checkpoint_new.safetensors"
    save_file(t(old), paths[0])
    save_file(t(new), paths[1])
    return paths


def text_names(text: str) -> list[str]:
    return [line.split(":")[0][4:] for line in text.splitlines() if line.startswith("  ~ ")]


@pytest.mark.parametrize("key", ["rel_l2", "cosine", "max_abs"])
def test_text_json_and_yaml_share_the_order(tmp_path, capsys, key):
    old_path, new_path = files(tmp_path)
    old, new = pair(1)
    expected = names_by_ref(old, new, key)
    argv = [str(old_path), str(new_path), "--sort-by-change-magnitude", "--sort-key", key]
    assert main(argv + ["--no-color"]) == 0
    assert text_names(capsys.readouterr().out) == expected
    assert main(argv + ["--output", "json"]) == 0
    items = json.loads(capsys.readouterr().out)
    assert [i["path"] for i in items if i["type"] == "tensor_changed"] == expected
    assert items[-1] == {"type": "sort_by_change_magnitude", "path": "",
                         "sort_key": key, "order": "smallest first" if key == "cosine" else "largest first"}
    assert main(argv + ["--output", "yaml"]) == 0
    assert [i["path"] for i in yaml.safe_load(capsys.readouterr().out) if i["type"] == "tensor_changed"] == expected


def test_sort_key_alone_switches_sorting_on(tmp_path, capsys):
    old_path, new_path = files(tmp_path)
    old, new = pair(1)
    assert main([str(old_path), str(new_path), "--sort-key", "max_abs", "--no-color"]) == 0
    text = capsys.readouterr().out
    assert text_names(text) == names_by_ref(old, new, "max_abs")
    assert "sort_by_change_magnitude: sort_key=max_abs, order=largest first" in text
    assert main([str(old_path), str(new_path), "--no-color"]) == 0
    assert "sort_by_change_magnitude" not in capsys.readouterr().out


def test_cli_rejects_an_unknown_key(tmp_path, capsys):
    old_path, new_path = files(tmp_path)
    assert main([str(old_path), str(new_path), "--sort-by-change-magnitude", "--sort-key", "L2"]) == 2
    assert "torchdiff: error: --sort-key 'L2' is not a sort key" in capsys.readouterr().err


def test_golden_stats_sort_by_change_magnitude(tmp_path, capsys):
    old_path, new_path = files(tmp_path)
    assert main([str(old_path), str(new_path), "--stats", "--sort-by-change-magnitude", "--no-color"]) == 0
    text = capsys.readouterr().out
    old, new = pair(1)
    assert text_names(text) == names_by_ref(old, new, "rel_l2")
    check_golden("stats_sort_by_change_magnitude.txt", text)


def test_every_key_is_documented_in_the_option_help():
    assert sbcm.sort_keys == sorted(KEYS)
    assert all(k in sbcm.OPTIONS["sort_key"][1] for k in KEYS)
