"""torchdiff: compare PyTorch checkpoints and analyse the change.

>>> import torchdiff
>>> report = torchdiff.compare("old.safetensors", "new.safetensors", stats=True)  # doctest: +SKIP
>>> print(report)  # doctest: +SKIP
"""

from torchdiff.api import compare, differs, inspect, load
from torchdiff.callbacks import CheckpointMonitor
from torchdiff.errors import (
    CorruptFileError,
    DeviceError,
    InputNotFoundError,
    MissingDependencyError,
    PolicyError,
    TooLargeError,
    TorchDiffError,
    UnknownFormatError,
    UnknownTensorError,
    UnsafeCheckpointError,
    UsageError,
)
from torchdiff.figures import Comparison, Figures, GroupFigures, GroupSums
from torchdiff.manifest import fingerprint, verify
from torchdiff.report import Report, SeriesReport
from torchdiff.results import AnalysisResult, PairMetrics, TensorDiff, TensorStats
from torchdiff.series import compare_series

__version__ = "0.1.0"

__all__ = [
    "AnalysisResult",
    "CheckpointMonitor",
    "Comparison",
    "CorruptFileError",
    "DeviceError",
    "Figures",
    "GroupFigures",
    "GroupSums",
    "InputNotFoundError",
    "MissingDependencyError",
    "PairMetrics",
    "PolicyError",
    "Report",
    "SeriesReport",
    "TensorDiff",
    "TensorStats",
    "TooLargeError",
    "TorchDiffError",
    "UnknownFormatError",
    "UnknownTensorError",
    "UnsafeCheckpointError",
    "UsageError",
    "__version__",
    "compare",
    "compare_series",
    "differs",
    "fingerprint",
    "inspect",
    "load",
    "verify",
]
