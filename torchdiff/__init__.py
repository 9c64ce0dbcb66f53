"""torchdiff: compare PyTorch checkpoints and analyse the change.

>>> import torchdiff
>>> report = torchdiff.compare("old.safetensors", "new.safetensors", stats=True)  # doctest: +SKIP
>>> print(report)  # doctest: +SKIP
"""

from torchdiff.api import compare, inspect, load
from torchdiff.errors import (
    CorruptFileError,
    DeviceError,
    InputNotFoundError,
    MissingDependencyError,
    PolicyError,
    TooLargeError,
    TorchDiffError,
    UnknownFormatError,
    UnsafeCheckpointError,
    UsageError,
)
from torchdiff.manifest import fingerprint, verify
from torchdiff.results import AnalysisResult, Comparison, PairMetrics, Report, TensorDiff, TensorStats

__version__ = "0.1.0"

__all__ = [
    "AnalysisResult",
    "Comparison",
    "CorruptFileError",
    "DeviceError",
    "InputNotFoundError",
    "MissingDependencyError",
    "PairMetrics",
    "PolicyError",
    "Report",
    "TensorDiff",
    "TensorStats",
    "TooLargeError",
    "TorchDiffError",
    "UnknownFormatError",
    "UnsafeCheckpointError",
    "UsageError",
    "__version__",
    "compare",
    "fingerprint",
    "inspect",
    "load",
    "verify",
]
