"""PyTorch pickles (.pt .pth .bin .ckpt): ``torch.load(weights_only=True)``, never code.

Zip-format files are memory-mapped (``mmap=True``) so tensors are views of the file;
legacy (pre-zip) files cannot be mapped and are read into memory. Nested training
checkpoints are flattened with dotted names; scalar leaves become metadata.

Tensors sharing a storage are marked (``TensorHandle.storage_key``/``storage_nbytes``),
and two names viewing the same elements of one storage (the same offset, shape and
strides, or a transpose) are tied
(``tied_to``): GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``.

Objects of classes torch's weights-only unpickler does not allow (a whole pickled
``nn.Module``, ``argparse.Namespace`` hyper-parameters, a Lightning ``AttributeDict``,
a YOLO model) are read as inert *records* (``Record``): torch's own unpickler builds them
from classes of ours, registered under the pickle's global names with
``torch.serialization.safe_globals``, which store the arguments and state they are given
and run nothing. numpy arrays and scalars are built by numpy's own data-only
reconstructors. Tensors inside records are compared like any other; a module's
parameters and buffers take their ``state_dict`` names. Names in ``os``, ``sys`` and
``posix`` stay refused (torch blocks them). docs/SECURITY.md, "Pickles".
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import struct
import sys
import warnings
import zipfile

import torch

from torchdiff.errors import CorruptFileError, UnsafeCheckpointError
from torchdiff.formats.base import Checkpoint, Record, flatten, mark_shared, tensor_handle

# Messages of torch's weights-only unpickler that mean "this needs code to load".
_UNSAFE_MARKERS = ("GLOBAL", "Unsupported global", "Unsupported class", "is blocked", "not an allowed global")


def _torch_load(path: str, mmap: bool):
    # torch logs, while unpickling a DTensor's device mesh, that no process group exists:
    # expected when reading a checkpoint, and not the user's business.
    mesh_log = logging.getLogger("torch.distributed.device_mesh")
    level = mesh_log.level
    mesh_log.setLevel(logging.ERROR)
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as e:
            # torch.save(model.state_dict()) under FSDP2 / tensor parallelism holds
            # DTensors; torch allows their classes once torch.distributed.tensor is imported.
            if _DTENSOR_MARKER not in str(e) or not _import_dtensor():
                raise
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    finally:
        mesh_log.setLevel(level)


_DTENSOR_MARKER = "must be imported to load DTensors"


def _import_dtensor() -> bool:
    try:
        import torch.distributed.tensor  # noqa: F401 - registers DTensor with the weights-only loader
    except (ImportError, RuntimeError):
        return False
    return True


def local_shards(tensors: dict) -> dict[str, dict]:
    """Replace each DTensor of ``tensors`` (in place) by the shard this file holds (its
    local tensor: one rank's ``torch.save``); what each was, by name."""
    found = {}
    for name, t in list(tensors.items()):
        local = getattr(t, "_local_tensor", None)
        if local is None or not hasattr(t, "placements"):
            continue
        found[name] = {"global_shape": list(t.shape), "local_shape": list(local.shape),
                       "placements": [repr(p) for p in t.placements], "mesh_shape": list(t.device_mesh.shape)}
        tensors[name] = local
    return found


#: numpy's data-only reconstructors (the allowlist torch's documentation gives for
#: checkpoints holding numpy values), under their numpy 1 and numpy 2 module names.
def _numpy_globals() -> list:
    import numpy as np

    multiarray = (np._core if hasattr(np, "_core") else np.core).multiarray
    found: list = [np.ndarray, np.dtype]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        found += [(multiarray._reconstruct, f"{module}._reconstruct"), (multiarray.scalar, f"{module}.scalar")]
    found += [(dt, f"numpy.dtypes.{dt.__name__}") for dt in vars(getattr(np, "dtypes", object)).values()
              if isinstance(dt, type) and issubclass(dt, np.dtype)]
    return found


#: Record classes made so far, by global name (one class per name, reused across loads).
_RECORDS: dict[str, type] = {}
_MAX_TRIES = 16
_RECORDS_MODULE = "torchdiff.records"


def _record_class(name: str) -> type:
    cls = _RECORDS.get(name)
    if cls is None:
        cls = _RECORDS[name] = type(name.rpartition(".")[2] or name, (Record,), {"global_name": name})
        cls.__module__, cls.__qualname__ = _RECORDS_MODULE, name
    return cls


def _load_with_records(path: str, mmap: bool) -> tuple[object, list[str]]:
    """``torch.load(weights_only=True)``, with every global torch does not allow read as
    an inert record (a dict or list subclass as a plain dict or list); (object, the
    global names read as records). Raises what torch raises for anything else."""
    try:
        return _torch_load(path, mmap), []
    except pickle.UnpicklingError as e:
        if not mmap or not any(marker in str(e) for marker in _UNSAFE_MARKERS):
            raise
    numpy_globals = _numpy_globals()
    real = {f"{g.__module__}.{g.__qualname__}" if isinstance(g, type) else g[1] for g in numpy_globals}
    names = [n for n in torch.serialization.get_unsafe_globals_in_checkpoint(path)
             if n.split(".")[0] not in ("os", "sys", "posix", "nt", "builtins") and n not in real]
    as_type: dict[str, object] = {n: _record_class(n) for n in names}
    for _ in range(_MAX_TRIES):
        allowed = numpy_globals + [(t, n) for n, t in as_type.items()]
        try:
            with torch.serialization.safe_globals(allowed):
                return _torch_load(path, mmap), sorted(as_type)
        except pickle.UnpicklingError as e:  # a record filled like a dict or a list: be one
            m = re.search(r"Can only (SETITEMS?|append|extend)\b.*but got <class '([^']+)'>", str(e))
            name = m[2].removeprefix(_RECORDS_MODULE + ".") if m else None
            if name not in as_type or as_type[name] in (dict, list):
                raise
            as_type[name] = dict if m[1].startswith("SETITEM") else list
    raise pickle.UnpicklingError("Unsupported global: too many record classes")


def load(path: str, unsafe: bool = False) -> Checkpoint:
    try:
        mapped = zipfile.is_zipfile(path)
    except zipfile.BadZipFile as e:  # is_zipfile lets some malformed end records through
        raise CorruptFileError(
            f"{path}: not a readable PyTorch checkpoint (BadZipFile: {_first_line(str(e))})"
        ) from None
    if mapped:
        _check_members(path, unsafe)
    else:
        with open(path, "rb") as f:
            head = f.read(4)
        if head == b"PK\x03\x04":  # a zip's first entry, but no central directory at the end
            raise CorruptFileError(f"{path}: truncated or damaged PyTorch checkpoint (a zip archive without its "
                                   "central directory; copy or download it again)")
        if head[:1] != b"\x80":
            raise CorruptFileError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a pickle)")
    try:
        with warnings.catch_warnings():
            # torch warns on stderr about the pickle protocol of odd files; the
            # outcome (a checkpoint or one error line) is what the user gets.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            # torch's own deprecations, raised while it rebuilds quantized tensors: not
            # about the file, and nothing the user can act on.
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
            warnings.filterwarnings("ignore", message="torch.quantize_per_tensor, torch.quantize_per_channel")
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            records: list[str] = []
            if unsafe:
                obj = torch.load(path, map_location="cpu", weights_only=False, mmap=mapped)
            else:
                obj, records = _load_with_records(path, mmap=mapped)
    except pickle.UnpicklingError as e:
        text = str(e)
        if any(marker in text for marker in _UNSAFE_MARKERS):
            found = _GLOBAL.search(text)  # the callable the pickle names, not torch's advice to developers
            detail = (f"it calls {found.group(1)}" if found
                      else _first_line_with(text, "Unsupported") or "needs code")
            raise UnsafeCheckpointError(
                f"{path}: refused, the pickle would run code to load ({detail}); "
                "torchdiff loads weights only (--unsafe-pickle overrides, for files you trust)"
            ) from None
        raise CorruptFileError(f"{path}: not a readable PyTorch checkpoint ({_reason(text)})") from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, KeyError,
            IndexError, TypeError, AttributeError, UnicodeDecodeError, MemoryError,
            OverflowError, AssertionError, struct.error, RecursionError) as e:
        raise CorruptFileError(f"{path}: not a readable PyTorch checkpoint ({_load_error(e, mapped)})") from None
    try:
        tensors, metadata = flatten(obj)
    except CorruptFileError as e:  # names that collide: said with the file's path
        raise CorruptFileError(f"{path}: {e}") from None
    except RecursionError:
        raise CorruptFileError(f"{path}: objects nested deeper than {sys.getrecursionlimit()} levels; "
                               "not read") from None
    dtensors = local_shards(tensors)
    handles = {name: tensor_handle(name, t, mapped=mapped) for name, t in tensors.items()}
    # torch.save writes each storage once, whole; tensors of one storage (tied weights, a
    # slice of a bigger tensor) are views of it. mark_shared records that identity, so
    # bytes count each stored storage once and tied weights count once.
    mark_shared(handles, tensors, key_prefix=path)
    info: dict = {}
    if records:
        info["records"] = records
    if dtensors:
        info["dtensors"] = dtensors
    return Checkpoint(name=path, format="torch", tensors=handles, metadata=metadata, info=info)


def _check_members(path: str, unsafe: bool = False) -> None:
    """Refuse compressed members before torch's zip reader sees them.

    torch.save stores every member uncompressed and torchdiff maps the tensor data, so
    compressed tensor data cannot be read, and torch's reader allocates a compressed
    member's declared size before inflating it: a member declaring more bytes than the
    whole file is refused (a zip bomb), never allocated.
    """
    size = os.path.getsize(path)
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, OverflowError, struct.error,
            NotImplementedError, UnicodeDecodeError) as e:
        raise CorruptFileError(
            f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {_first_line(str(e))})"
        ) from None
    for info in members:
        if info.compress_type == zipfile.ZIP_STORED:
            continue
        if info.file_size > size:
            raise CorruptFileError(
                f"{path}: not a readable PyTorch checkpoint (member {info.filename!r} would inflate to "
                f"{info.file_size} bytes, more than the whole {size}-byte file; torch.save never compresses: "
                "a zip bomb?)"
            )
        if info.filename.split("/")[1:2] == ["data"]:
            raise CorruptFileError(
                f"{path}: not a readable PyTorch checkpoint (tensor data {info.filename!r} is compressed; "
                "torch.save stores it uncompressed, which torchdiff maps: re-save the file with torch.save)"
            )
    _check_archive_kind(path, [info.filename for info in members], unsafe)


def _check_archive_kind(path: str, names: list[str], unsafe: bool) -> None:
    """Zip archives torch writes that are not torch.save checkpoints, said as such."""
    inner = {n.split("/", 1)[1] for n in names if "/" in n}
    if "archive_format" in inner or any(n.startswith("models/") for n in inner):
        raise CorruptFileError(f"{path}: a torch.export archive (.pt2, torch.export.save), not a torch.save "
                               "checkpoint; torchdiff does not read it (save the model's state_dict)")
    if not unsafe and "data.pkl" in inner and "constants.pkl" in inner and any(n.startswith("code/") for n in inner):
        raise UnsafeCheckpointError(f"{path}: a TorchScript archive (torch.jit.save): its weights load only by "
                                    "running its code; --unsafe-pickle reads it, for files you trust (or save "
                                    "the model's state_dict)")


def _load_error(e: BaseException, mapped: bool) -> str:
    """Why torch.load failed, in one line.

    The legacy (non-zip) format records each storage's dtype by its typed-storage
    class; dtypes that have none (uint16/32/64, the float8 types) are written as an
    untyped storage, and torch cannot read them back (it asks that storage for a dtype):
    said as such, with the fix, rather than as torch's AttributeError.
    """
    if not mapped and isinstance(e, AttributeError) and "UntypedStorage" in str(e) and "dtype" in str(e):
        return ("a legacy (non-zip) torch.save file holding a storage without a dtype: the legacy format cannot "
                "record uint16/uint32/uint64 or float8 tensors, and torch cannot read them back; save it with "
                "torch.save's default zip format")
    return f"{type(e).__name__}: {_first_line(str(e))}"


def _first_line(text: str) -> str:
    """The first line of an error, cut at a word boundary near 200 characters."""
    line = text.strip().splitlines()[0] if text.strip() else "unreadable"
    return line if len(line) <= 200 else line[:200].rsplit(" ", 1)[0] + " …"


#: pickle opcodes torch's weights-only unpickler does not know, and what writes them
_OPCODES = {"149": "a FRAME of pickle protocol 4 or 5 (torch.save(..., pickle_protocol=4))"}


def _reason(text: str) -> str:
    """What torch's weights-only unpickler objected to (the line after its boilerplate)."""
    found = re.search(r"Unsupported operand (\d+)", text)
    if found and found.group(1) in _OPCODES:
        return (f"{_OPCODES[found.group(1)]}, which torch's weights-only loader does not read; "
                "--unsafe-pickle reads it, for files you trust")
    lines = [line.strip() for line in text.splitlines()]
    for i, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            rest = [line.split("WeightsUnpickler error:", 1)[1].strip()] + lines[i + 1 :]
            found = next((r for r in rest if r), None)
            if found:
                return found[:200]
    return _first_line(text)


_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def _first_line_with(text: str, word: str) -> str | None:
    """The first line holding ``word``, cut at a word boundary near 200 characters."""
    for line in text.splitlines():
        if word in line:
            line = line.strip()
            return line if len(line) <= 200 else line[:200].rsplit(" ", 1)[0] + " …"
    return None
