"""Shared test fixtures.

Public to every test file: ``fixtures_dir`` (the third-party checkpoints in
../shared/fixtures/diffai; tests that use it are skipped when it is absent).

``write_safetensors`` / ``write_pt`` are small conveniences of the core suite
(test_metrics/readers/cli/bad_input); other test files should not rely on them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def _find_fixtures() -> Path | None:
    candidates = []
    if os.environ.get("TORCHDIFF_FIXTURES_DIR"):
        candidates.append(Path(os.environ["TORCHDIFF_FIXTURES_DIR"]))
    # The repo's parent holds shared/ (…/main and …/shared side by side); a copy of
    # the tree may also carry shared/ inside the repo root.
    candidates += [REPO_ROOT.parent / "shared" / "fixtures" / "diffai", REPO_ROOT / "shared" / "fixtures" / "diffai"]
    for c in candidates:
        if c.is_dir():
            return c
    return None


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The diffai fixture checkpoints (read-only); skips the test when absent."""
    found = _find_fixtures()
    if found is None:
        pytest.skip("../shared/fixtures/diffai not found (set TORCHDIFF_FIXTURES_DIR)")
    return found


@pytest.fixture
def write_safetensors(tmp_path):
    """``write_safetensors(name, tensors, metadata=None) -> Path`` under tmp_path."""
    from safetensors.torch import save_file

    def write(name: str, tensors: dict, metadata: dict | None = None) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
        return path

    return write


@pytest.fixture
def write_pt(tmp_path):
    """``write_pt(name, obj, legacy=False) -> Path``: torch.save under tmp_path."""
    import torch

    def write(name: str, obj, legacy: bool = False) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(obj, str(path), _use_new_zipfile_serialization=not legacy)
        return path

    return write


@pytest.fixture(autouse=True)
def terminal_width(monkeypatch):
    """Text output wraps to the terminal (COLUMNS): every test sees 120 columns, so that
    golden files and README lines do not depend on the shell running the suite."""
    monkeypatch.setenv("COLUMNS", "120")
