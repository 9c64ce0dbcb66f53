"""Adapters for training frameworks and trackers, one module each.

- ``torchdiff.integrations.lightning``: ``TorchDiffCallback`` (PyTorch Lightning).
- ``torchdiff.integrations.transformers``: ``TorchDiffCallback`` (Hugging Face Trainer).
- ``torchdiff.integrations.mlflow``: ``log_report(report)``.

Nothing here is imported by ``import torchdiff``, and each module imports its
framework only when one of its names is used.
"""
