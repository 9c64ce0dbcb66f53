"""Adapters for training frameworks and trackers, one module each.

- ``torchdiff.integrations.lightning``: ``TorchDiffCallback`` (PyTorch Lightning).
- ``torchdiff.integrations.transformers``: ``TorchDiffCallback`` (Hugging Face Trainer).
- ``torchdiff.integrations.mlflow``: ``log_report(report)``.

Nothing here is imported by ``import torchdiff``, and each module imports its
framework only when one of its names is used.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Iterable, Mapping

from torchdiff.errors import UsageError
from torchdiff.units import counted


def monitor_group(model: Any, options: dict[str, Any]) -> Any:
    """The process group an adapter's monitor runs on (docs/DISTRIBUTED.md, section 7).

    ``options["process_group"]`` when the user gave one; else, when torch.distributed is
    initialised and the model's parameters are DTensors (FSDP2 ``fully_shard``, tensor
    parallel), the default group: then every rank creates the monitor and takes part in
    each comparison (its collectives), and only global rank zero logs. None otherwise (one
    process; or DDP, where every rank holds the whole model and rank zero monitors alone).

    Raises:
        UsageError: the model is wrapped in FSDP1 (``FullyShardedDataParallel``), whose
            flat parameters are neither whole tensors nor DTensors.
    """
    if options.get("process_group") is not None:
        return options["process_group"]
    try:
        import torch.distributed as dist
    except ImportError:  # a torch built without torch.distributed
        return None
    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        FullyShardedDataParallel = None  # noqa: N806
    if FullyShardedDataParallel is not None and any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise UsageError("the torchdiff callback does not support FSDP1 (FullyShardedDataParallel: flat parameters); "
                         "use FSDP2 (fully_shard: Lightning's ModelParallelStrategy, or fsdp_version 2 in the HF "
                         "Trainer's fsdp_config), whose parameters are DTensors")
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return None
    if any(isinstance(p, DTensor) for p in model.parameters()):
        return dist.group.WORLD
    return None


def monitor_options(every: int, reference: str, analyses: Iterable[str], keep: str, device: Any,
                    **options: Any) -> dict[str, Any]:
    """The CheckpointMonitor options an adapter was given, with ``every`` checked."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise UsageError(f"every must be a positive int, got {every!r}")
    return dict(every=every, reference=reference, analyses=tuple(analyses), keep=keep, device=device, **options)


def finite_figures(scalars: Mapping[str, float], where: str) -> dict[str, float]:
    """The figures of ``scalars`` a tracker can store: NaN and ±∞ (the rel_l2 of a tensor
    or layer whose reference is all zero — a LayerNorm bias at the first report — or
    its norm change) are left out with a warning that names each, as
    ``torchdiff.integrations.mlflow.log_report`` does: MLflow stores ∞ as the largest
    double, and one such point flattens a TensorBoard or W&B chart."""
    dropped = {k: float(v) for k, v in scalars.items() if not math.isfinite(float(v))}
    if dropped:
        listed = ", ".join(f"{k}={v}" for k, v in dropped.items())
        warnings.warn(f"torchdiff: {counted(len(dropped), 'figure')} not logged to {where}, NaN or infinity (an infinite "
                      f"rel_l2 means the reference was all zero): {listed}", UserWarning, stacklevel=3)
    return {k: float(v) for k, v in scalars.items() if k not in dropped}
