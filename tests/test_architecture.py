"""The layer contract of docs/ARCHITECTURE.md, enforced: no import cycle in torchdiff/,
lazy imports inside functions included (import-linter reads every import statement)."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_layers_contract_is_kept():
    exe = shutil.which("lint-imports", path=os.path.dirname(sys.executable)) or shutil.which("lint-imports")
    assert exe, "import-linter is a test dependency (pip install -e '.[test]')"
    proc = subprocess.run([exe, "setup.cfg"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "1 kept, 0 broken" in proc.stdout


def test_every_module_is_in_a_layer():
    """A new module must be placed in the contract, or the contract says nothing about it."""
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    layers = {m.strip() for line in cfg["importlinter:contract:layers"]["layers"].split("\n")
              for m in line.split("|") if m.strip()}
    top = set()
    for name in os.listdir(os.path.join(ROOT, "torchdiff")):
        stem, ext = os.path.splitext(name)
        if name.startswith("_") or name == "py.typed":
            continue
        if ext == ".py" or os.path.isdir(os.path.join(ROOT, "torchdiff", name)) and name != "__pycache__":
            top.add(f"torchdiff.{stem}")
    assert top - layers == set()


@pytest.mark.parametrize("entry", ["compare", "inspect", "compare_series"])
def test_public_entry_points_name_every_option(entry):
    """compare(), inspect() and compare_series() list every option as a keyword-only
    parameter (an editor completes them); the set equals what the options registry takes."""
    import inspect as pyinspect

    import torchdiff
    from torchdiff.analyses import FLAGS, options_defaults
    from torchdiff.pipeline import CORE_OPTIONS

    params = pyinspect.signature(getattr(torchdiff, entry)).parameters
    keyword_only = {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY}
    expected = set(CORE_OPTIONS) | set(FLAGS) | set(options_defaults()) | {"analyses", "progress"}
    assert keyword_only == expected


def test_unknown_keyword_is_a_usage_error_with_the_closest_name():
    import torch

    import torchdiff

    with pytest.raises(torchdiff.UsageError, match=r"unknown option 'layer_patern' \(did you mean 'layer_pattern'\?\)"):
        torchdiff.compare({"w": torch.ones(2)}, {"w": torch.ones(2)}, layer_patern="x")
    with pytest.raises(torchdiff.UsageError, match=r"unknown option 'epsilonn' \(did you mean 'epsilon'\?\)"):
        torchdiff.compare_series([{"w": torch.ones(2)}] * 2, epsilonn=1)


def test_public_api_exports():
    import torchdiff

    for name in ("CheckpointMonitor", "compare_series", "differs", "load", "compare", "inspect", "Report",
                 "SeriesReport", "Figures", "GroupSums"):
        assert name in torchdiff.__all__ and hasattr(torchdiff, name)
