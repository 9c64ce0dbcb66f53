"""Manifests: per-tensor fingerprints that travel instead of the checkpoint.

``fingerprint(source) -> Manifest`` records, for every tensor of a checkpoint (any format
``torchdiff.formats.load`` reads, a state_dict of live CPU or CUDA tensors, an
``nn.Module``): its name, dtype, shape, byte length, the xxh3-128 hash of its bytes
(chosen by benchmarks/bench_hash.py), and the figures a tolerant comparison needs
(norm, sum, min, max, non-finite counts, and a fixed sample of values).
``verify(manifest, other) -> Verification`` checks a checkpoint (or a second manifest)
against it. Definitions, bounds and the file layout: docs/MANIFEST.md.
"""

from __future__ import annotations

import json
import math
import os
import re
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import torch

from torchdiff.errors import CorruptFileError, MissingDependencyError, UsageError
from torchdiff.units import counted

MANIFEST_FORMAT = "torchdiff-manifest"
MANIFEST_VERSION = 1
HASH_NAME = "xxh3_128"
SAMPLES = 64                 # values kept per tensor for the rel_l2 estimate
_BLOCK = 64                  # figures: per-block sums in the tensor's float type, float64 across blocks
_CHUNK = 1 << 22             # elements upcast at a time for narrow floats (16 MB of float32)
ROUNDING = 1e-5              # relative rounding allowance of norm and sum (float32 accumulation)
_PHI = 0.6180339887498949    # 1/golden ratio: the sample positions' Weyl sequence
CAST_DTYPES = ("float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2")
TOLERANCE_KEYS = ("rel_l2",)
_RANK_SUFFIX = re.compile(r"^(?P<base>.+?)[._-](?:rank|tp|mp)[_-]?(?P<rank>\d+)$")


def _xxh3():
    try:
        import xxhash
    except ImportError:
        raise MissingDependencyError("fingerprints need the xxhash package (pip install xxhash)") from None
    return xxhash.xxh3_128


# ---- records ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class TensorRecord:
    """One tensor of a manifest. Figures are float64, over the finite values
    (``nan_count``/``inf_count`` count the rest); ``min``/``max`` are None when there
    are no finite values. ``sample`` holds the values at ``sample_positions(numel)``;
    ``casts`` maps a dtype name to the hash of the tensor cast to it (``--cast``)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    hash: str
    norm: float
    sum: float
    min: float | None
    max: float | None
    nan_count: int = 0
    inf_count: int = 0
    sample: tuple[float, ...] = ()
    casts: Mapping[str, str] = field(default_factory=dict)
    storage_dtype: str = ""
    #: the tensor this one shares its values with in the checkpoint (tied weights)
    tied_to: str | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name, "dtype": self.dtype, "shape": list(self.shape), "nbytes": self.nbytes,
            "hash": self.hash, "norm": self.norm, "sum": self.sum, "min": self.min, "max": self.max,
            "nan_count": self.nan_count, "inf_count": self.inf_count, "sample": list(self.sample),
        }
        if self.casts:
            d["casts"] = dict(self.casts)
        if self.storage_dtype and self.storage_dtype != self.dtype:
            d["storage_dtype"] = self.storage_dtype
        if self.tied_to is not None:
            d["tied_to"] = self.tied_to
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str, sample_count: int = SAMPLES) -> "TensorRecord":
        try:
            record = cls(
                name=str(d["name"]), dtype=str(d["dtype"]), shape=tuple(int(s) for s in d["shape"]),
                nbytes=int(d["nbytes"]), hash=str(d["hash"]), norm=_float(d["norm"]), sum=_float(d["sum"]),
                min=None if d.get("min") is None else _float(d["min"]),
                max=None if d.get("max") is None else _float(d["max"]),
                nan_count=int(d.get("nan_count", 0)), inf_count=int(d.get("inf_count", 0)),
                sample=tuple(_float(v) for v in d.get("sample", ())),
                casts={str(k): str(v) for k, v in dict(d.get("casts", {})).items()},
                storage_dtype=str(d.get("storage_dtype", "")),
                tied_to=None if d.get("tied_to") is None else str(d["tied_to"]),
            )
        except KeyError as e:
            name = d.get("name") if isinstance(d, Mapping) else None
            what = f"tensor record {name!r}" if isinstance(name, str) else "a tensor record"
            raise CorruptFileError(f"{where}: {what} is malformed (no {e.args[0]!r} field)") from None
        except (TypeError, ValueError) as e:
            raise CorruptFileError(f"{where}: a tensor record is malformed ({type(e).__name__}: {e})") from None
        if not isinstance(d["name"], str):
            raise CorruptFileError(f"{where}: a tensor record's name is {d['name']!r}, not a string")
        problem = _inconsistency(record, sample_count)
        if problem:
            raise CorruptFileError(f"{where}: tensor record {record.name!r} {problem} "
                                   "(the manifest was edited or damaged: write it again with torchdiff hash)")
        return record


def _inconsistency(r: TensorRecord, sample_count: int) -> str | None:
    """What makes a record impossible for ``fingerprint`` to have written, or None: a
    negative dimension, an unknown dtype, a norm or sum that is not a finite norm or sum,
    non-finite counts above the values, or a sample of another length than its positions
    (none at all is allowed: the estimate is then unknown, and no tolerance accepts it).
    verify measures distances from the figures and the sample, so an edited record is
    refused rather than measured. (A changed hash, shape or byte count needs no check:
    it shows as a mismatch.)"""
    if any(s < 0 for s in r.shape):
        return f"has shape {list(r.shape)}: a dimension below 0"
    dt = getattr(torch, r.dtype, None)
    if not isinstance(dt, torch.dtype):
        return f"has dtype {r.dtype!r}, which torch does not know"
    if not (math.isfinite(r.norm) and r.norm >= 0 and math.isfinite(r.sum)):
        return f"has norm {r.norm!r} and sum {r.sum!r}: a norm is finite and ≥ 0, a sum finite"
    values = r.numel * (2 if dt.is_complex else 1)  # complex tensors are sampled as (real, imag) pairs
    if min(r.nan_count, r.inf_count) < 0 or r.nan_count + r.inf_count > values:
        return f"has nan_count {r.nan_count} and inf_count {r.inf_count} for {values} values"
    kept = len(sample_positions(values, sample_count))
    if r.sample and len(r.sample) != kept:
        return f"has {len(r.sample)} sampled values where its {values} values give {kept} positions"
    return None


def _float(v: Any) -> float:
    if isinstance(v, str):  # the JSON spellings of non-finite floats (torchdiff.render.finite_json)
        spelled = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}.get(v)
        if spelled is None:
            raise ValueError(f"{v!r} is not a number")
        return spelled
    return float(v)


@dataclass(frozen=True, slots=True)
class Manifest:
    """What ``fingerprint`` returns: records by name, in checkpoint order."""

    tensors: Mapping[str, TensorRecord]
    source: str = "<memory>"
    hash_name: str = HASH_NAME
    sample_count: int = SAMPLES
    #: what the source held that the manifest does not cover (a Trainer folder's
    #: optimizer.pt, tensors a sharded index does not list); not saved with the manifest
    notes: tuple[str, ...] = field(default=(), compare=False)

    def __iter__(self) -> Iterator[TensorRecord]:
        return iter(self.tensors.values())

    def __len__(self) -> int:
        return len(self.tensors)

    def __getitem__(self, name: str) -> TensorRecord:
        return self.tensors[name]

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def to_dict(self) -> dict[str, Any]:
        from torchdiff.render import finite_json

        return finite_json({
            "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "hash": self.hash_name,
            "sample_count": self.sample_count, "source": self.source,
            "tensors": [r.to_dict() for r in self.tensors.values()],
        })

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False, ensure_ascii=False)

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Manifest":
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            from torchdiff.errors import InputNotFoundError

            raise InputNotFoundError(f"{path}: no such file or directory") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptFileError(f"{path}: not a torchdiff manifest ({type(e).__name__}: {e})") from None
        return cls.from_dict(data, path)

    @classmethod
    def from_dict(cls, data: Any, where: str = "<manifest>") -> "Manifest":
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            raise CorruptFileError(f"{where}: not a torchdiff manifest (no \"format\": \"{MANIFEST_FORMAT}\")")
        if data.get("version") != MANIFEST_VERSION:
            raise CorruptFileError(f"{where}: manifest version {data.get('version')!r} is not supported "
                                   f"(this torchdiff reads version {MANIFEST_VERSION})")
        if data.get("hash") != HASH_NAME:
            raise CorruptFileError(f"{where}: manifest hash {data.get('hash')!r} is not supported ({HASH_NAME})")
        sample_count = data.get("sample_count", SAMPLES)
        if sample_count != SAMPLES:  # the checked side is sampled at SAMPLES positions: others would not align
            raise CorruptFileError(f"{where}: manifest sample_count {sample_count!r} is not supported "
                                   f"(this torchdiff samples {SAMPLES} positions per tensor)")
        records = data.get("tensors")
        if not isinstance(records, list):
            raise CorruptFileError(f"{where}: manifest has no \"tensors\" list")
        tensors = {}
        for d in records:
            if not isinstance(d, dict):
                raise CorruptFileError(f"{where}: a tensor record is not an object")
            r = TensorRecord.from_dict(d, where, sample_count)
            if r.name in tensors:  # a second record must not silently replace (or hide) the first
                raise CorruptFileError(f"{where}: two records for tensor {r.name!r}")
            tensors[r.name] = r
        return cls(tensors=tensors, source=str(data.get("source", where)), sample_count=sample_count)


def is_manifest(path: Any) -> bool:
    """True for a path to a manifest file: a ``.json`` file other than a sharded
    checkpoint's ``*.index.json``, or a file whose first bytes name the format."""
    if not isinstance(path, (str, os.PathLike)):
        return False
    path = os.fspath(path)
    if not os.path.isfile(path) or path.endswith(".index.json"):
        return False
    if path.endswith(".json"):
        return True
    with open(path, "rb") as f:
        head = f.read(256)
    return head.lstrip().startswith(b"{") and MANIFEST_FORMAT.encode() in head


# ---- fingerprinting ----------------------------------------------------------------------------

def sample_positions(numel: int, count: int = SAMPLES) -> list[int]:
    """Flat positions of the kept values: every position when ``numel ≤ count``, else
    ``floor(frac((j + 0.5)·φ⁻¹)·numel)`` for j < count (a Weyl sequence), deduplicated, sorted."""
    if numel <= count:
        return list(range(numel))
    return sorted({min(numel - 1, int(math.fmod((j + 0.5) * _PHI, 1.0) * numel)) for j in range(count)})


def _bytes_of(t: torch.Tensor):
    """The tensor's values as contiguous little-endian bytes (a numpy uint8 array)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return b""
    return t.view(torch.uint8).numpy()


def _figures(t: torch.Tensor) -> dict[str, Any]:
    """norm, sum, min, max over the finite values, and the non-finite counts."""
    x = t.detach().reshape(-1)
    if x.device.type != "cpu":
        x = x.cpu()
    if x.dtype == torch.bool:
        x = x.to(torch.uint8)
    if x.is_complex():
        x = torch.view_as_real(x).reshape(-1)
    n = x.numel()
    if n == 0:
        return {"norm": 0.0, "sum": 0.0, "min": None, "max": None, "nan_count": 0, "inf_count": 0}
    if not x.is_floating_point():
        xd = x.to(torch.float64) if n <= _CHUNK else None
        if xd is None:  # integers: exact in float64 up to 2**53, chunked
            s = sq = 0.0
            for i in range(0, n, _CHUNK):
                c = x[i:i + _CHUNK].to(torch.float64)
                s += float(c.sum())
                sq += float(c.dot(c))
            mn, mx = torch.aminmax(x)
            return {"norm": math.sqrt(sq), "sum": s, "min": float(mn), "max": float(mx), "nan_count": 0, "inf_count": 0}
        return {"norm": float(torch.linalg.vector_norm(xd)), "sum": float(xd.sum()), "min": float(xd.min()),
                "max": float(xd.max()), "nan_count": 0, "inf_count": 0}
    out = _float_figures(x)
    if out is not None:
        return out
    # Some value is non-finite (or a block sum overflowed): the slow path over a mask.
    finite = torch.isfinite(x)
    nan = int(torch.isnan(x).sum())
    inf = n - nan - int(finite.sum())
    kept = x[finite]
    if kept.numel() == 0:
        return {"norm": 0.0, "sum": 0.0, "min": None, "max": None, "nan_count": nan, "inf_count": inf}
    kd = kept.to(torch.float64)
    return {"norm": float(torch.linalg.vector_norm(kd)), "sum": float(kd.sum()), "min": float(kd.min()),
            "max": float(kd.max()), "nan_count": nan, "inf_count": inf}


def _float_figures(x: torch.Tensor) -> dict[str, Any] | None:
    """The fast path, in NumPy on the tensor's own memory (float32 for narrower floats,
    upcast a chunk at a time): Σx and Σx² per block of ``_BLOCK`` (64) elements in the
    tensor's float type, the blocks summed in float64; min and max exact. A block of 64
    accumulated in any order errs by at most 63·u of its Σ|x| (u = 2⁻²⁴ for float32), so
    ‖x‖ errs by < 2e-6 relative and Σx by < 4e-6·Σ|x| ≤ 4e-6·√n·‖x‖: within ROUNDING.
    None when the sum is not finite (a non-finite value, or an overflow): the caller's
    masked path."""
    import numpy as np

    n = x.numel()
    native = x.dtype in (torch.float32, torch.float64)
    step = n if native else _CHUNK
    s = sq = 0.0
    mn, mx = math.inf, -math.inf
    for i in range(0, n, step):
        c = x[i:i + step]
        a = (c if native else c.to(torch.float32)).numpy()
        full = (a.size // _BLOCK) * _BLOCK
        with np.errstate(invalid="ignore", over="ignore"):  # inf - inf, an overflow: None below, no warning
            if full:
                rows = a[:full].reshape(-1, _BLOCK)
                s += float(np.einsum("ij->i", rows).sum(dtype=np.float64))
                sq += float(np.einsum("ij,ij->i", rows, rows).sum(dtype=np.float64))
            if full < a.size:
                tail = a[full:].astype(np.float64)
                s += float(tail.sum())
                sq += float(tail @ tail)
        mn, mx = min(mn, float(a.min())), max(mx, float(a.max()))
    if not (math.isfinite(s) and math.isfinite(sq) and math.isfinite(mn) and math.isfinite(mx)):
        return None
    return {"norm": math.sqrt(sq), "sum": s, "min": mn, "max": mx, "nan_count": 0, "inf_count": 0}


def _sample(t: torch.Tensor, count: int) -> tuple[float, ...]:
    x = t.detach().reshape(-1)
    if x.is_complex():
        x = torch.view_as_real(x).reshape(-1)
    positions = sample_positions(x.numel(), count)
    if not positions:
        return ()
    picked = x[torch.tensor(positions, dtype=torch.long, device=x.device)]
    return tuple(float(v) for v in picked.to(torch.float64).cpu().tolist())


def _torch_dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise UsageError(f"--cast {name!r} is not a dtype (choose from {', '.join(CAST_DTYPES)})")
    return dt


def record(name: str, tensor: torch.Tensor, *, casts: Sequence[str] = (), span: Any = None,
           storage_dtype: str = "", count: int = SAMPLES, expected: TensorRecord | None = None) -> TensorRecord:
    """The record of one tensor. ``span`` = (uint8 base, begin, end) hashes those mapped
    bytes directly (they are the tensor's bytes). With ``expected``, a tensor whose dtype,
    shape and hash equal it reuses its figures (equal bytes, equal figures) instead of
    computing them: verify reads each equal tensor once, at hash speed."""
    from torchdiff.formats.base import dtype_name

    h = _xxh3()
    digest = h(span[0][span[1]:span[2]].numpy()).hexdigest() if span is not None else h(_bytes_of(tensor)).hexdigest()
    dtype = dtype_name(tensor.dtype)
    if (expected is not None and expected.hash == digest and expected.dtype == dtype
            and expected.shape == tuple(tensor.shape)):
        return expected
    if expected is not None:  # casts only matter when the dtypes differ
        casts = [c for c in casts if c == expected.dtype]
    cast_hashes = {}
    if tensor.is_floating_point():
        for c in casts:
            dt = _torch_dtype(c)
            if dt != tensor.dtype and _WIDTH.get(c, 0) <= _WIDTH.get(dtype, 0):  # casts narrow, never widen
                cast_hashes[c] = h(_bytes_of(tensor.to(dt))).hexdigest()
    nbytes = tensor.numel() * tensor.element_size()
    return TensorRecord(name=name, dtype=dtype, shape=tuple(tensor.shape), nbytes=nbytes, hash=digest,
                        sample=_sample(tensor, count), casts=cast_hashes,
                        storage_dtype=storage_dtype if storage_dtype and storage_dtype != dtype else "",
                        **_figures(tensor))


def fingerprint(source: Any, *, casts: Sequence[str] = (), format: str | None = None, path: str | None = None,
                ignore_keys_regex: str | None = None, unsafe_pickle: bool = False) -> Manifest:
    """The manifest of a checkpoint: one record per tensor.

    Args:
        source: a path (any format ``torchdiff.load`` reads, sharded included), a
            state_dict (nested dicts flattened with dots), an ``nn.Module``, or a Checkpoint.
            Live CUDA tensors are copied to the host one at a time for hashing.
        casts: dtype names (``"bfloat16"``...): also record the hash of each floating
            tensor cast to them, so that ``verify(..., allow_cast=True)`` can accept a
            copy cast to that dtype without the original at hand.
        format: force the reader (``torchdiff.formats.format_names``).
        path, ignore_keys_regex: only the tensors whose name holds ``path`` and does not
            match ``ignore_keys_regex`` (as compare's ``--path``/``--ignore-keys-regex``;
            selecting none is a UsageError).
        unsafe_pickle: read a PyTorch pickle with ``weights_only=False`` (runs code from
            the file: only for files the user trusts), as compare's ``--unsafe-pickle``.

    Returns:
        A Manifest; ``.save(path)`` writes it as JSON (docs/MANIFEST.md).

    Example:
        >>> import torch, torchdiff
        >>> m = torchdiff.fingerprint({"w": torch.ones(3)})
        >>> m["w"].norm, m["w"].sum, len(m["w"].hash)
        (1.7320508075688772, 3.0, 32)
    """
    return _fingerprint(source, casts, (format, unsafe_pickle), None, (ignore_keys_regex, path))


#: How checkpoint paths are read: (``format``, ``unsafe_pickle``) of ``torchdiff.formats.load``.
Reader = tuple


def _load(path: Any, reader: Reader):
    from torchdiff import formats

    format, unsafe_pickle = reader
    return formats.load(os.fspath(path), format, unsafe_pickle=unsafe_pickle)


Filters = tuple  # (ignore_keys_regex, path): compare's name filters


def _kept(manifest: Manifest, filters: Filters) -> Manifest:
    """The records whose names the filters keep."""
    if not any(filters):
        return manifest
    from torchdiff.pairing import compile_filters

    keep = compile_filters(*filters)
    return dataclasses.replace(manifest, tensors={n: r for n, r in manifest.tensors.items() if keep(n)})


def _fingerprint(source: Any, casts: Sequence[str], reader: Reader, expected: Manifest | None,
                 filters: Filters = (None, None), require: bool = True) -> Manifest:
    from torchdiff import formats

    for c in casts:
        if c not in CAST_DTYPES:
            raise UsageError(f"--cast {c!r} is not a float dtype (choose from {', '.join(CAST_DTYPES)})")
    if isinstance(source, (str, os.PathLike)):
        ckpt = _load(source, reader)
        label = os.fspath(source)
    else:
        ckpt = formats.from_object(source)
        label = ckpt.name
    try:
        manifest = _fingerprint_checkpoint(ckpt, label, casts, expected, filters, require)
    finally:
        ckpt.close()
    from torchdiff.pipeline import directory_notes

    notes = directory_notes([ckpt], "hashed", advice=False)
    return dataclasses.replace(manifest, notes=notes) if notes else manifest


def _fingerprint_checkpoint(ckpt, label: str, casts: Sequence[str], expected: Manifest | None = None,
                            filters: Filters = (None, None), require: bool = True) -> Manifest:
    def one(name: str) -> tuple[TensorRecord, list[Finding]]:
        handle = ckpt.tensors[name]
        t = handle.materialize()
        span = handle.span if handle.span is not None and handle.dtype == t.dtype else None
        return record(name, t, casts=casts, span=span, storage_dtype=handle.storage_dtype,
                      expected=expected.tensors.get(name) if expected is not None else None), []

    names = list(ckpt.tensors)
    if any(filters):
        from torchdiff.pairing import check_selected, compile_filters

        keep = compile_filters(*filters)
        names = [n for n in names if keep(n)]
        if require:  # selecting nothing is a usage error (hash); verify checks it on the manifest
            check_selected(names, ckpt, ckpt, *filters)
    records, _ = _per_tensor(names, [ckpt.tensors[n].nbytes for n in names], one)
    for name, r in records.items():  # tied weights (one storage in a pickle, a live module): said, for verify
        tied_to = ckpt.tensors[name].tied_to
        if tied_to is not None:
            records[name] = dataclasses.replace(r, tied_to=tied_to)
    return Manifest(tensors=records, source=label)


def _per_tensor(names: list[str], sizes: list[int], one) -> tuple[dict[str, TensorRecord], list[Finding]]:
    """``one(name) -> (record, findings)`` for every name, in order.

    Under ``torchrun -m torchdiff`` (docs/DISTRIBUTED.md, "hash and verify") each rank
    computes the names it owns (``distributed.assign``: balanced by bytes; it reads only
    those tensors), and the records travel to every rank as JSON text (all_gather of
    uint8; floats round-trip exactly), so every rank returns the same manifest."""
    from torchdiff import distributed

    ctx = distributed.active()
    if ctx is None:
        records: dict[str, TensorRecord] = {}
        findings: list[Finding] = []
        for name in names:
            records[name], more = one(name)
            findings += more
        return records, findings
    owner = distributed.assign(sizes, ctx.world)
    mine = [name for name, o in zip(names, owner) if o == ctx.rank]
    distributed.TIMINGS.clear()
    distributed.TIMINGS.update(names=len(names), owned=len(mine))

    def work():
        out = {}
        for name in mine:
            r, more = one(name)
            out[name] = [r.to_dict(), [[f.name, f.kind, f.detail] for f in more]]
        return out

    got: dict[str, list] = {}
    for part in distributed.exchange_json(ctx, distributed.share(ctx, work, "exchange of fingerprints"),
                                          "gather of fingerprints"):
        got.update(part)
    records, findings = {}, []
    for name in names:
        d, more = got[name]
        records[name] = TensorRecord.from_dict(d, "<rank>")
        findings += [Finding(*f) for f in more]
    return records, findings


# ---- verification ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Finding:
    """One tensor that is not bitwise equal to its manifest record.

    ``kind``: ``bytes`` (same dtype and shape, other bytes), ``dtype``, ``shape``,
    ``missing`` (in the manifest only), ``extra`` (in the checked side only),
    ``nonfinite``. ``accepted``: passed by ``allow_cast`` or ``tolerance`` (``reason`` says which).
    """

    name: str
    kind: str
    detail: str
    figures: Mapping[str, Any] = field(default_factory=dict)
    accepted: bool = False
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"type": "verify_mismatch" if not self.accepted else "verify_accepted", "path": self.name,
                "kind": self.kind, "detail": self.detail, "accepted": self.accepted, "reason": self.reason,
                **self.figures}


@dataclass(frozen=True, slots=True)
class Verification:
    """What ``verify`` found: ``ok`` when every tensor is bitwise equal or accepted."""

    expected: str
    checked: str
    tensors: int
    equal: int
    findings: tuple[Finding, ...]

    @property
    def mismatches(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if not f.accepted)

    @property
    def accepted(self) -> int:
        """Tensors accepted (cast, tolerance, tied), not counting the note on paired names."""
        return sum(1 for f in self.findings if f.accepted and f.kind != "paired")

    @property
    def ok(self) -> bool:
        return not self.mismatches

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def __bool__(self) -> bool:
        return self.ok

    def to_dict(self) -> list[dict[str, Any]]:
        from torchdiff.render import finite_json

        head = {"type": "verify", "path": "", "manifest": self.expected, "checked": self.checked,
                "tensors": self.tensors, "equal": self.equal, "accepted": self.accepted,
                "mismatches": len(self.mismatches), "ok": self.ok}
        return finite_json([head] + [f.to_dict() for f in self.findings])

    def render(self, fmt: str = "text") -> str:
        if fmt == "json":
            return json.dumps(self.to_dict(), indent=2, allow_nan=False, ensure_ascii=False)
        if fmt == "yaml":
            import yaml

            return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)
        if fmt != "text":
            raise UsageError(f"unknown --output {fmt!r} for verify (choose from json, text, yaml)")
        from torchdiff.render.text import printable

        lines = []
        for f in self.findings:
            mark = "=" if f.accepted else "!"
            why = f" [accepted: {f.reason}]" if f.accepted else ""
            lines.append(f"  {mark} {printable(f.name)}: {f.kind}: {printable(f.detail)}{why}")
        summary = (f"verify: {counted(self.tensors, 'tensor')}: {self.equal} bitwise equal, {self.accepted} accepted, "
                   f"{len(self.mismatches)} mismatching")
        lines.append(summary + (" -> OK" if self.ok else " -> FAILED"))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render("text")


def parse_tolerance(value: Any) -> dict[str, float]:
    """``"rel_l2=1e-3"`` (or a dict, or a bare number meaning rel_l2) -> {"rel_l2": 1e-3}."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        items = [("rel_l2", value)]
    else:
        items = []
        for part in str(value).split(","):
            key, eq, num = part.strip().partition("=")
            if not eq:
                raise UsageError(f"--tolerance takes KEY=VALUE (e.g. rel_l2=1e-3), got {part.strip()!r}")
            items.append((key.strip(), num.strip()))
    out = {}
    for key, num in items:
        if key not in TOLERANCE_KEYS:
            raise UsageError(f"--tolerance {key!r} is not supported (choose from {', '.join(TOLERANCE_KEYS)})")
        try:
            out[key] = float(num)
        except (TypeError, ValueError):
            raise UsageError(f"--tolerance {key} must be a number, got {num!r}") from None
        if not out[key] >= 0:
            raise UsageError(f"--tolerance {key} must be ≥ 0")
    return out


def verify(manifest: Any, other: Any, *, allow_cast: bool = False, tolerance: Any = None,
           shards: bool = False, format: str | None = None, path: str | None = None,
           ignore_keys_regex: str | None = None, unsafe_pickle: bool = False) -> Verification:
    """Check ``other`` against ``manifest``, tensor by tensor.

    Args:
        manifest: a Manifest, a manifest file, or anything ``fingerprint`` takes.
        other: the same (a second manifest, a checkpoint path, a state_dict), or with
            ``shards`` a list of rank files.
        allow_cast: accept a tensor of another float dtype when its values equal the
            expected ones after the cast (see docs/MANIFEST.md for which side is cast).
        tolerance: ``{"rel_l2": X}`` or ``"rel_l2=X"``: accept a tensor whose bytes differ
            when both its proven lower bound and its sampled estimate of rel_l2 are ≤ X.
        shards: reassemble tensor-parallel pieces (names with a rank suffix such as
            ``.rank1``/``_tp1``, or one file per rank) along the dimension the
            manifest's shape shows, before fingerprinting.
        format: force the reader for checkpoint paths.
        path, ignore_keys_regex: check only the tensors whose name (on either side, as
            it stands there) holds ``path`` and does not match ``ignore_keys_regex``
            (``--ignore-keys-regex '^optimizer[.]'``: the model of a training checkpoint).
        unsafe_pickle: read PyTorch pickles with ``weights_only=False`` (only for files the
            user trusts).

    Returns:
        A Verification: ``.ok``, ``.findings`` (each tensor that differs, how, and the
        figures), ``str()`` for text, ``.to_dict()`` for JSON.
    """
    tol = parse_tolerance(tolerance)
    filters = (ignore_keys_regex, path)
    reader = (format, unsafe_pickle)
    recorded = _as_manifest(manifest, reader=reader)
    expected = _kept(recorded, filters)
    if any(filters) and not expected.tensors:
        from torchdiff.pairing import check_selected

        check_selected([], recorded, recorded, *filters)
    want_casts = sorted({r.dtype for r in expected if r.dtype in CAST_DTYPES}) if allow_cast else []
    notes: list[Finding] = []
    if shards:
        got, notes = _fingerprint_shards(other, expected, want_casts, reader)
        got = _kept(got, filters)
    else:
        got = _as_manifest(other, casts=want_casts, reader=reader, expected=expected, filters=filters)
    result = compare_manifests(expected, got, allow_cast=allow_cast, tolerance=tol)
    # a manifest file is named by its path (its "source" is the checkpoint it was written from)
    for field_name, given in (("expected", manifest), ("checked", other)):
        if isinstance(given, (str, os.PathLike)) and is_manifest(given):
            result = dataclasses.replace(result, **{field_name: os.fspath(given)})
    if notes:
        result = Verification(result.expected, result.checked, result.tensors, result.equal,
                              result.findings + tuple(notes))
    return result


def _as_manifest(source: Any, casts: Sequence[str] = (), reader: Reader = (None, False),
                 expected: Manifest | None = None, filters: Filters = (None, None)) -> Manifest:
    if isinstance(source, Manifest):
        return _kept(source, filters)
    if isinstance(source, Mapping) and source.get("format") == MANIFEST_FORMAT:
        return _kept(Manifest.from_dict(source), filters)
    if is_manifest(source):
        return _kept(Manifest.load(source), filters)
    # a checkpoint: only the tensors kept are read (that something is selected is checked
    # on the manifest's side: none kept here leaves every expected tensor missing)
    return _fingerprint(source, casts, reader, expected, filters, require=False)


def compare_manifests(expected: Manifest, got: Manifest, *, allow_cast: bool = False,
                      tolerance: Mapping[str, float] | None = None) -> Verification:
    """Record by record; see ``verify``."""
    tol = dict(tolerance or {})
    findings: list[Finding] = []
    checked, paired = _paired(expected, got)
    if paired:
        findings.append(paired)
    tied = _tie_groups(expected.tensors.values(), checked.values())
    equal = 0
    for name, a in expected.tensors.items():
        b = checked.get(name)
        held = None
        if b is None:  # a tied weight the checked side holds once, under another name of its tie
            held = next((m for m in tied.get(name, ()) if m in checked), None)
            b = checked.get(held) if held is not None else None
        if b is None:
            findings.append(Finding(name, "missing", f"in the manifest ({a.dtype} {list(a.shape)}), "
                                                     f"not in {got.source}"))
            continue
        if a.dtype == b.dtype and a.shape == b.shape and a.hash == b.hash:
            if held is None:
                equal += 1
            else:
                findings.append(Finding(name, "tied", f"held once in {got.source}, as {held}, the weight it is "
                                                      "tied to", accepted=True, reason=f"tied to {held}"))
            continue
        findings.append(_compare_record(a, b, allow_cast, tol))
    for name, b in checked.items():
        if name not in expected.tensors:
            held = next((m for m in tied.get(name, ()) if m in expected.tensors), None)
            if held is not None:
                findings.append(Finding(name, "tied", f"a tied copy of {held} in {got.source}, which the manifest "
                                                      "records once", accepted=True, reason=f"tied to {held}"))
                continue
            findings.append(Finding(name, "extra", f"in {got.source} ({b.dtype} {list(b.shape)}), not in the manifest"))
    return Verification(expected=expected.source, checked=got.source, tensors=len(expected.tensors),
                        equal=equal, findings=tuple(findings))


def _paired(expected: Manifest, got: Manifest) -> tuple[dict[str, TensorRecord], Finding | None]:
    """The checked side's records under the names they pair by with the manifest's, as
    compare pairs names (pairing.paired_names: a container prefix such as DCP's
    ``model.``, wrapper segments such as ``module.`` and ``_orig_mod.``), and a finding
    (accepted) that says what was dropped."""
    from torchdiff.pairing import paired_names

    old_map, new_map, dropped = paired_names(expected.tensors, got.tensors)
    if old_map and any(k != v for k, v in old_map.items()):  # the manifest's side would be renamed: keep its names
        inverse = {v: k for k, v in old_map.items()}
        new_map = {k: inverse.get(v, v) for k, v in new_map.items()}
    checked = {}
    for name, r in got.tensors.items():
        short = new_map.get(name, name)
        target = new_map.get(r.tied_to, r.tied_to) if r.tied_to is not None else None
        checked[short] = dataclasses.replace(r, name=short, tied_to=target) if (short, target) != (name, r.tied_to) \
            else r
    if not dropped:
        return checked, None
    what = [f"the prefix {p!r}" for p in (dropped.old_prefix, dropped.new_prefix) if p]
    what += [", ".join(f"{s}." for s in w) for w in (dropped.old_wrappers, dropped.new_wrappers) if w]
    return checked, Finding("(names)", "paired", f"names paired as compare pairs them: {' and '.join(what)} "
                                                 "dropped", accepted=True, reason="names paired")


def _tie_groups(*sides) -> dict[str, tuple[str, ...]]:
    """name -> the other names of its tie (``tied_to`` of either side's records, joined)."""
    parent: dict[str, str] = {}

    def root(n: str) -> str:
        while parent.get(n, n) != n:
            n = parent[n]
        return n

    for records in sides:
        for r in records:
            if r.tied_to is not None:
                parent[root(r.name)] = root(r.tied_to)
    groups: dict[str, list[str]] = {}
    for n in list(parent):
        for m in (n, parent[n]):
            groups.setdefault(root(m), [])
            if m not in groups[root(m)]:
                groups[root(m)].append(m)
    return {n: tuple(m for m in sorted(members) if m != n) for members in groups.values() for n in members}


def _compare_record(a: TensorRecord, b: TensorRecord, allow_cast: bool, tol: Mapping[str, float]) -> Finding:
    if a.shape != b.shape:
        return Finding(a.name, "shape", f"{list(a.shape)} -> {list(b.shape)}",
                       {"shape_expected": list(a.shape), "shape_got": list(b.shape)})
    figs = distance(a, b)
    shown = _figures_text(a, b, figs)
    if (a.nan_count, a.inf_count) != (b.nan_count, b.inf_count):
        return Finding(a.name, "nonfinite", f"nan {a.nan_count}->{b.nan_count}, inf {a.inf_count}->{b.inf_count}; "
                                            + shown, figs)
    kind = "bytes"
    detail = "bytes differ; " + shown
    if a.dtype != b.dtype:
        kind, detail = "dtype", f"{a.dtype} -> {b.dtype}; " + shown
        if allow_cast:
            how = _cast_matches(a, b)
            if how is True:
                return Finding(a.name, "dtype", detail, figs, accepted=True,
                               reason=f"--allow-cast: equal after the cast to {_narrower(a, b)}")
            detail += f"; --allow-cast: {how}"
    limit = tol.get("rel_l2")  # values within the tolerance, whatever dtype holds them
    if limit is not None:
        if figs["rel_l2_lower"] <= limit and figs["rel_l2_estimate"] <= limit:
            return Finding(a.name, kind, detail, figs, accepted=True,
                           reason=f"--tolerance rel_l2={limit:g}: lower bound and estimate ≤ {limit:g}")
        detail += f"; over --tolerance rel_l2={limit:g}"
    return Finding(a.name, kind, detail, figs)


_WIDTH = {"float64": 64, "float32": 32, "float16": 16, "bfloat16": 16, "float8_e4m3fn": 8, "float8_e5m2": 8}


def _narrower(a: TensorRecord, b: TensorRecord) -> str:
    return b.dtype if _WIDTH.get(b.dtype, 0) <= _WIDTH.get(a.dtype, 0) else a.dtype


def widening(manifest: Manifest, casts: Sequence[str]) -> list[tuple[str, list[str], int]]:
    """(cast, the narrower dtypes, how many tensors) for each requested cast that was not
    recorded because it would widen a tensor (``hash --cast float32`` of a bfloat16 file)."""
    out = []
    for c in casts:
        narrower = [r.dtype for r in manifest if r.dtype in _WIDTH and c in _WIDTH and _WIDTH[r.dtype] < _WIDTH[c]]
        if narrower:
            out.append((c, sorted(set(narrower)), len(narrower)))
    return out


def _cast_matches(a: TensorRecord, b: TensorRecord) -> bool | str:
    """True when the expected values cast to the checked dtype give the checked bytes
    (the manifest recorded that cast), or the checked values cast to the expected dtype
    give the expected bytes (the checked side recorded it); else why not."""
    if a.dtype not in CAST_DTYPES or b.dtype not in CAST_DTYPES:
        return f"casts are checked between float dtypes only ({a.dtype} -> {b.dtype})"
    if b.dtype in a.casts:  # the expected side is the wider: its cast was recorded
        return True if a.casts[b.dtype] == b.hash else f"the manifest's {b.dtype} fingerprint differs"
    if a.dtype in b.casts:  # the checked side is the wider: cast down to the expected dtype
        return True if b.casts[a.dtype] == a.hash else f"the {b.dtype} values cast to {a.dtype} differ"
    if _WIDTH.get(b.dtype, 0) > _WIDTH.get(a.dtype, 0):  # the checked side is the wider: its cast is missing
        return (f"the checked side has no {a.dtype} fingerprint for this tensor (verify a checkpoint, which is "
                f"cast as it is read, or write the checked manifest with torchdiff hash --cast {a.dtype})")
    return (f"the manifest has no {b.dtype} fingerprint for this tensor "
            f"(write it with torchdiff hash --cast {b.dtype})")


def distance(a: TensorRecord, b: TensorRecord) -> dict[str, float]:
    """How far b is from a, from the records alone (docs/MANIFEST.md, "Tolerance").

    ``rel_l2_lower``: a lower bound of ‖B − A‖/‖A‖: the largest of |‖B‖ − ‖A‖| − s,
    |ΣB − ΣA|/√n − s (s = ROUNDING·max(‖A‖, ‖B‖), the figures' rounding allowance),
    |max B − max A|, |min B − min A| and ‖(B − A) on the sampled positions‖, over ‖A‖.
    ``rel_l2_estimate``: sqrt(n/m · Σ over the m sampled positions of (B − A)²)/‖A‖,
    exact when n ≤ m (every value is sampled).
    """
    n = max(a.numel, 1)
    deltas = [y - x for x, y in zip(a.sample, b.sample) if math.isfinite(x) and math.isfinite(y)]
    m = len(deltas)
    ss = sum(d * d for d in deltas)
    slack = ROUNDING * max(a.norm, b.norm)  # the figures' float32 rounding (_float_figures), docs/MANIFEST.md
    bounds = [abs(b.norm - a.norm) - slack, abs(b.sum - a.sum) / math.sqrt(n) - slack, math.sqrt(ss)]
    if a.max is not None and b.max is not None:
        bounds += [abs(b.max - a.max), abs(b.min - a.min)]
    lower = max(bounds)
    estimate = math.sqrt(n / m * ss) if m else math.inf
    if m == n:
        lower = max(lower, estimate)  # every value sampled: the estimate is the figure
    scale = a.norm
    return {
        "rel_l2_lower": _ratio(lower, scale * (1 + ROUNDING)), "rel_l2_estimate": _ratio(estimate, scale),
        "norm_expected": a.norm, "norm_got": b.norm, "sum_expected": a.sum, "sum_got": b.sum,
        "max_abs_sampled": max((abs(d) for d in deltas), default=0.0), "sampled": m,
    }


def _ratio(x: float, scale: float) -> float:
    if scale > 0:
        return x / scale
    return math.inf if x > 0 else 0.0


def _figures_text(a: TensorRecord, b: TensorRecord, figs: Mapping[str, float]) -> str:
    from torchdiff.render.text import num

    return (f"rel_l2 ≥ {num(figs['rel_l2_lower'])}, ≈ {num(figs['rel_l2_estimate'])} from {figs['sampled']} "
            f"samples; norm {num(a.norm)}->{num(b.norm)}, sum {num(a.sum)}->{num(b.sum)}")


# ---- tensor-parallel shards --------------------------------------------------------------------

def _fingerprint_shards(other: Any, expected: Manifest, casts: Sequence[str], reader: Reader
                        ) -> tuple[Manifest, list[Finding]]:
    """Fingerprint the tensors ``other`` holds in pieces, reassembled to the manifest's shapes."""
    from torchdiff import formats

    sources = list(other) if isinstance(other, (list, tuple)) else [other]
    ckpts = []
    try:
        for s in sources:
            ckpts.append(_load(s, reader) if isinstance(s, (str, os.PathLike)) else formats.from_object(s))
        pieces: dict[str, list[tuple[int, Any]]] = {}
        for rank_file, ckpt in enumerate(ckpts):
            for name, handle in ckpt.tensors.items():
                m = _RANK_SUFFIX.match(name)
                base, rank = (m.group("base"), int(m.group("rank"))) if m and m.group("base") in expected else (name, 0)
                pieces.setdefault(base, []).append((rank_file if len(ckpts) > 1 else rank, handle))
        label = " + ".join(os.fspath(s) if isinstance(s, (str, os.PathLike)) else "<memory>" for s in sources)
        for parts in pieces.values():
            parts.sort(key=lambda p: p[0])

        def one(name: str) -> tuple[TensorRecord, list[Finding]]:
            handles = [h for _, h in pieces[name]]
            if len(handles) == 1:
                t = handles[0].materialize()
                span = handles[0].span if handles[0].span is not None and handles[0].dtype == t.dtype else None
                return record(name, t, casts=casts, span=span, expected=expected.tensors.get(name)), []
            full = expected.tensors[name].shape if name in expected.tensors else None
            tensor, differing = assemble(name, [h.materialize() for h in handles], full)
            return record(name, tensor, casts=casts, expected=expected.tensors.get(name)), [
                Finding(name, "replica", f"replicated on {len(handles)} ranks; rank {r}'s copy differs from rank 0's")
                for r in differing]

        names = list(pieces)
        records, notes = _per_tensor(names, [sum(h.nbytes for _, h in pieces[n]) for n in names], one)
        return Manifest(tensors=records, source=label), notes
    finally:
        for c in ckpts:
            c.close()


def assemble(name: str, pieces: Sequence[torch.Tensor], full_shape: Sequence[int] | None
             ) -> tuple[torch.Tensor, list[int]]:
    """One tensor from its tensor-parallel pieces, in rank order, and the ranks whose
    replica differs from rank 0's.

    Pieces that each have the full shape (from the manifest; without one, pieces of one
    shape and equal values) are replicas: rank 0's is the tensor. Otherwise they are
    concatenated along the one dimension whose sizes add up to the full size while the
    other dimensions match (without a full shape: dimension 0). When no dimension fits,
    the flattened concatenation is returned, and verify reports its shape.
    """
    shapes = [tuple(p.shape) for p in pieces]
    if full_shape is None:
        if len(set(shapes)) == 1 and all(torch.equal(pieces[0], p) for p in pieces[1:]):
            return pieces[0], []
        return torch.cat(list(pieces), 0), []
    full = tuple(full_shape)
    if all(s == full for s in shapes):
        return pieces[0], [r for r, p in enumerate(pieces) if r and not torch.equal(pieces[0], p)]
    for dim in range(len(full)):
        fits = all(len(s) == len(full) and all(s[k] == full[k] for k in range(len(full)) if k != dim)
                   for s in shapes)
        if fits and sum(s[dim] for s in shapes) == full[dim]:
            return torch.cat(list(pieces), dim), []
    return torch.cat([p.reshape(-1) for p in pieces]), []
