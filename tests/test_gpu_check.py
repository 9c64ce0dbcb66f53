"""scripts/gpu_check, the prepared GPU run (issue 14), smoke-tested here without a GPU:
its torchrun step on gloo/CPU, and the JSON comparison it relies on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from json_close import differences  # noqa: E402


def test_json_close_finds_what_differs():
    a = [{"type": "tensor_changed", "path": "w", "old": {"shape": [2, 3], "mean": 1.0}, "l2": 0.5}]
    assert differences(a, json.loads(json.dumps(a)), 1e-9) == []
    close = [{**a[0], "l2": 0.5 * (1 + 1e-7)}]
    assert differences(a, close, 1e-6) == [] and differences(a, close, 1e-9) == ["$[0].l2: 0.5 != 0.50000005"]
    assert differences(a, [{**a[0], "type": "tensor_unchanged"}], 1e-3) == [
        "$[0].type: 'tensor_changed' != 'tensor_unchanged'"]
    assert differences(a, [{**a[0], "old": {"shape": [3, 2], "mean": 1.0}}], 1e-3) == [
        "$[0].old.shape[0]: 2 != 3", "$[0].old.shape[1]: 3 != 2"]
    assert differences(a, a + a, 1e-3) == ["$: 1 items != 2"]
    assert differences([{"n": 3}], [{"n": 3.5}], 0.1) == ["$[0].n: 3 != 3.5"]


def test_gpu_check_torchrun_step_on_the_cpu(tmp_path):
    """With TORCHDIFF_GPU_CHECK_DEVICE=cpu the script runs its torchrun step on gloo (1 and
    2 ranks, --all, JSON against one CPU process) and skips the CUDA steps."""
    env = {**os.environ, "TORCHDIFF_GPU_CHECK_DEVICE": "cpu", "PYTHON": sys.executable}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([str(ROOT / "scripts" / "gpu_check")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "torchrun --nproc-per-node 2 --device cpu: same JSON as one CPU process" in proc.stdout
    assert "gpu_check: all steps passed" in proc.stdout
