"""The one error family torchdiff raises.

The CLI catches :class:`TorchDiffError` once, prints ``torchdiff: error: <message>``
on stderr and exits with :attr:`TorchDiffError.exit_code` (2 for every subclass).
"""

from __future__ import annotations


class TorchDiffError(Exception):
    """Base class: bad usage or an input that cannot be read."""

    exit_code = 2


class UsageError(TorchDiffError):
    """A flag, option or argument that does not make sense."""


class UnknownTensorError(UsageError, KeyError):
    """A name that is not a tensor of a report or a checkpoint: a UsageError (the package's
    error family) that is also a KeyError (what ``mapping[name]`` raises)."""

    __str__ = Exception.__str__  # the message as written, not KeyError's repr of it


class InputNotFoundError(TorchDiffError):
    """A path that does not exist or is of the wrong kind (file vs directory)."""


class UnknownFormatError(TorchDiffError):
    """A file whose format torchdiff cannot tell or does not read."""


class CorruptFileError(TorchDiffError):
    """A file that claims a format but whose bytes do not hold up."""


class UnsafeCheckpointError(TorchDiffError):
    """A pickle that would need to run code to load; torchdiff never runs it."""


class TooLargeError(TorchDiffError):
    """An input that would take more memory to decode than the machine has (a zip bomb,
    or a machine too small for the file)."""


class MissingDependencyError(TorchDiffError):
    """An optional library (scipy, h5py, gguf, PyYAML) needed for this input is absent."""


class DeviceError(TorchDiffError):
    """A device that was asked for is not available."""


class PolicyError(UsageError):
    """A --policy file that cannot be used: not YAML, an unknown key, a bad regex, a wrong type."""
