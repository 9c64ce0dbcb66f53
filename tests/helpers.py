"""Helpers shared by several test files (imported by name: tests/ is on sys.path)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).parent / "golden"
UPDATE_GOLDEN = os.environ.get("TORCHDIFF_UPDATE_GOLDEN") == "1"


def check_golden(name: str, text: str) -> None:
    """Compare ``text`` with tests/golden/NAME; TORCHDIFF_UPDATE_GOLDEN=1 rewrites it."""
    path = GOLDEN / name
    if UPDATE_GOLDEN:
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with TORCHDIFF_UPDATE_GOLDEN=1 to write it"
    assert text == path.read_text(), f"{name} differs from its golden output (TORCHDIFF_UPDATE_GOLDEN=1 refreshes it)"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models train far faster on one thread (and do not fight a busy machine).
    Autouse in every module that imports it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
