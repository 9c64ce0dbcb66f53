"""Every analysis, in every command, renders to valid JSON and YAML that parse back to
the same items (numpy scalars and non-finite floats included)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import save_file

from torchdiff.cli import main


@pytest.fixture
def run(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"layers.0.w": torch.randn(8, 6, generator=g), "layers.0.b": torch.zeros(8),
            "layers.1.w": torch.randn(8, 8, generator=g), "head.w": torch.randn(3, 8, generator=g)}
    paths = []
    for i in range(3):
        path = tmp_path / f"step_{i}.safetensors"
        save_file({k: v + 0.1 * i * torch.ones_like(v) for k, v in base.items()}, str(path))
        paths.append(str(path))
    return paths


@pytest.mark.parametrize("command", ["compare", "inspect", "series"])
def test_all_analyses_round_trip_through_json_and_yaml(run, capsys, command):
    args = {"compare": run[:2], "inspect": ["inspect", run[0]], "series": ["series", *run]}[command]
    assert main([*args, "--all", "--output", "json"]) == 0
    as_json = json.loads(capsys.readouterr().out)
    assert main([*args, "--all", "--output", "yaml"]) == 0
    as_yaml = yaml.safe_load(capsys.readouterr().out)
    assert as_json == as_yaml
    assert all("type" in item and "path" in item for item in as_json)
