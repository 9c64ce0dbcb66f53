"""``import torchdiff`` stays cheap: no optional libraries, no CUDA initialisation."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ["scipy", "h5py", "gguf", "yaml", "tqdm", "lightning", "pytorch_lightning", "transformers", "mlflow",
         "pandas", "tensorboard", "wandb", "matplotlib"]

# torch itself may import some of these (torch.hub imports tqdm when installed):
# what counts is what importing torchdiff adds on top of torch.
PROBE = f"""
import json, sys
import torch
baseline = set(sys.modules)
import torchdiff
heavy = {HEAVY!r}
print(json.dumps({{
    "loaded": sorted(m for m in heavy if m in sys.modules and m not in baseline),
    "cuda_initialized": torch.cuda.is_initialized(),
    "public": sorted(torchdiff.__all__),
}}))
"""


def test_import_is_cheap():
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    found = json.loads(proc.stdout)
    assert found["loaded"] == []
    assert found["cuda_initialized"] is False
    for name in ("compare", "inspect", "load", "Report", "TorchDiffError", "__version__"):
        assert name in found["public"]
