"""Adapters for training frameworks and trackers, one module each.

- ``torchdiff.integrations.lightning``: ``TorchDiffCallback`` (PyTorch Lightning).
- ``torchdiff.integrations.transformers``: ``TorchDiffCallback`` (Hugging Face Trainer).
- ``torchdiff.integrations.mlflow``: ``log_report(report)``.

Nothing here is imported by ``import torchdiff``, and each module imports its
framework only when one of its names is used.
"""

from __future__ import annotations

from typing import Any, Iterable

from torchdiff.errors import UsageError


def monitor_options(every: int, reference: str, analyses: Iterable[str], keep: str, device: Any,
                    **options: Any) -> dict[str, Any]:
    """The CheckpointMonitor options an adapter was given, with ``every`` checked."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise UsageError(f"every must be a positive int, got {every!r}")
    return dict(every=every, reference=reference, analyses=tuple(analyses), keep=keep, device=device, **options)
