"""Per-tensor access (torchdiff.access: the pieces behind ``report[name]`` and
``report.delta(name)``), the typed-package marker, and the set-up scripts (issue 18)."""

from __future__ import annotations

import configparser
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import torchdiff
from torchdiff.access import delta, tensor_diff
from torchdiff.errors import UsageError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def files(tmp_path):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 4, generator=g)
    b = torch.randn(6, 4, generator=g)
    old, new = tmp_path / "old.safetensors", tmp_path / "new.safetensors"
    save_file({"head.weight": w, "gone": torch.ones(2)}, str(old))
    save_file({"head.weight": b, "added": torch.ones(3)}, str(new))
    return old, new, w, b


def test_tensor_diff_by_name(files):
    old, new, _, _ = files
    report = torchdiff.compare(str(old), str(new))
    d = tensor_diff(report, "head.weight")
    assert d.name == "head.weight" and d.status == "changed"
    with pytest.raises(KeyError, match=r"'head.weigth' is not a tensor of this report \(3 tensors; did you mean "
                                       r"'head.weight'\?\)"):
        tensor_diff(report, "head.weigth")


def test_delta_reads_new_minus_old(files):
    old, new, w, b = files
    report = torchdiff.compare(str(old), str(new))
    got = delta(report, "head.weight")
    np.testing.assert_array_equal(got.numpy(), (b - w).numpy())
    assert float(got.double().norm()) == pytest.approx(tensor_diff(report, "head.weight").metrics.l2, rel=1e-6)
    with pytest.raises(UsageError, match="'added' is added: Δ needs the tensor on both sides"):
        delta(report, "added")


def test_delta_of_in_memory_sources():
    old = {"w": torch.zeros(3)}
    new = {"w": torch.tensor([1.0, 2.0, 3.0])}
    report = torchdiff.compare(old, new)
    with pytest.raises(torchdiff.InputNotFoundError, match="pass old= and new="):
        delta(report, "w")
    assert delta(report, "w", old, new).tolist() == [1.0, 2.0, 3.0]


def test_delta_dequantizes_like_compare(tmp_path):
    w = torch.tensor([[0.5, -1.0], [0.25, 2.0]])
    scale = torch.tensor([0.01, 0.02])
    q = torch.round(w / scale[:, None]).to(torch.int8)
    save_file({"fc.weight": w}, str(tmp_path / "a.safetensors"))
    save_file({"fc.weight": q, "fc.weight_scale": scale}, str(tmp_path / "b.safetensors"))
    report = torchdiff.compare(str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"))
    expected = q.double() * scale.double()[:, None] - w.double()
    np.testing.assert_allclose(delta(report, "fc.weight").numpy(), expected.numpy(), atol=1e-7)
    raw = delta(report, "fc.weight", raw=True)
    np.testing.assert_allclose(raw.numpy(), (q.float() - w).numpy())


def test_py_typed_ships():
    assert (ROOT / "torchdiff" / "py.typed").is_file()
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert "py.typed" in cfg["options.package_data"]["torchdiff"].split()


def test_demo_installs_only_the_cli_extras_and_test_everything():
    setup = (ROOT / "scripts" / "setup").read_text()
    demo = (ROOT / "scripts" / "demo").read_text()
    test = (ROOT / "scripts" / "test").read_text()
    assert "EXTRAS=${1:-mat,gguf,hub,train,report,test}" in setup
    assert "./scripts/setup mat,gguf\n" in demo and "train" not in demo.split("./scripts/setup", 1)[1].split("\n")[0]
    assert "./scripts/setup\n" in test  # the default: every extra the tests need
    out = subprocess.run(["bash", "-n", str(ROOT / "scripts" / "setup")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_readme_quick_start_puts_torchdiff_on_path():
    readme = (ROOT / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "source .venv/bin/activate" in quick
    examples = [line for line in readme.splitlines() if line.startswith("$ torchdiff ")]
    demo_files = {"step_000.safetensors", "step_200.safetensors", "step_200_int8.safetensors", "train_step_100.pt"}
    for line in examples:  # every example that uses a demo file names it where the demo writes it
        for f in demo_files:
            if f in line:
                assert f"examples/data/{f}" in line, line
    assert os.access(ROOT / "scripts" / "demo", os.X_OK)
