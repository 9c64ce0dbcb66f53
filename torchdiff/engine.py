"""The diff engine: walks the pairs, streams their values through reused row blocks
on the device, and writes the merged partials into the Figures table.

How it is fast (see docs/ENGINE.md):
- every tensor is cut into *rows*: full rows of ``row`` elements plus one remainder
  row; small tensors are one row each. Rows of equal length (and the same compute
  dtype) are grouped, so 20,000 biases of width 768 are a few [k, 768] blocks, not
  20,000 rounds of Python;
- a block holds at most ``block`` elements a side (sized to stay in cache); all
  reductions run along dim 1 of the block (reductions.py), every per-side and
  per-pair figure from the same cache-resident data;
- float32 sources on the CPU are reduced in place (zero copy from the mmap); other
  dtypes are upcast by ``copy_``/``cat`` into reused workspace buffers;
- pages of memory-mapped inputs are released (madvise DONTNEED) once their rows are
  done, so resident memory does not grow with the file size;
- partials stay on the device until the end: one host synchronisation per run.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

import numpy as np
import torch

from torchdiff import reductions as R
from torchdiff.errors import CorruptFileError, DeviceError
from torchdiff.formats.base import TensorHandle
from torchdiff.pairing import Pair
from torchdiff.figures import Figures, by_norms
from torchdiff.status import ADDED, CHANGED, REMOVED, RESHAPED, RETYPED, UNCHANGED
from torchdiff.units import counted

ROW = 65536
_MATERIALIZE = threading.RLock()
CPU_BLOCK = 262144
CUDA_BLOCK = 1 << 24
_RELEASE_MIN_BYTES = 16 << 20


class Hook(Protocol):
    """Per-tensor access for analyses that need values beyond the engine's figures.

    ``wants(pair)`` says whether to call it for a pair; ``__call__(pair, old, new)``
    receives the whole tensors (upcast to float32/float64, on the engine's device,
    ``None`` for a missing side) and returns a small JSON-able result, stored in
    ``TensorDiff.extras[hook.name]``.
    """

    name: str

    def wants(self, pair: Pair) -> bool: ...

    def __call__(self, pair: Pair, old: torch.Tensor | None, new: torch.Tensor | None) -> Any: ...


def use_all_cores() -> int:
    """Set torch's intra-op threads to the cores this process may run on."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    if torch.get_num_threads() < cores:
        torch.set_num_threads(cores)
    return torch.get_num_threads()


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` = CUDA when available, else CPU; ``cuda[:N]`` must exist."""
    if device is None or str(device) == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(str(device))
    except (RuntimeError, ValueError):
        raise DeviceError(f"unknown --device {device!r} (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {device}: CUDA is not available on this machine (use --device cpu or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {device}: only {counted(torch.cuda.device_count(), 'CUDA device')} here")
    elif dev.type != "cpu":
        raise DeviceError(f"--device {device}: torchdiff runs on cpu or cuda")
    return dev


@dataclass(eq=False, slots=True)
class _Side:
    """One side of one tensor being measured."""

    handle: TensorHandle
    flat: torch.Tensor | None = None
    released: int = 0  # elements [0, released) of a mapped tensor already dropped from RSS
    done: int = 0  # elements already reduced
    copied: bool = False  # flat is a copy of the mapped values (a transposed view): not the file's pages
    #: an in-memory tensor's last, short row, kept apart once its full rows are reduced
    #: (elements [tail_from, numel)), so that the whole buffer is not held until the group
    #: of short rows comes (docs/ENGINE.md, "Memory")
    tail: torch.Tensor | None = None
    tail_from: int = 0

    @property
    def mapped(self) -> bool:
        """Whether the values read are the file's mapped pages, which madvise(DONTNEED)
        drops and the file gives back. A copy (``reshape`` of a non-contiguous view, a
        resolved conjugate) is ordinary memory: dropping its pages would zero it."""
        return self.handle.mapped and not self.copied

    def release(self, upto: int, min_bytes: int = 0) -> None:
        """madvise(DONTNEED) elements [released, upto) of a file-mapped tensor."""
        span = self.releasable(upto, min_bytes)
        if span is not None:
            _drop_pages(*span)

    def releasable(self, upto: int, min_bytes: int = 0) -> tuple[int, int] | None:
        """(address, bytes) of elements [released, upto) of a file-mapped tensor, now
        counted as released; None when there is nothing (or less than ``min_bytes``)."""
        if _madvise is None or not self.mapped or upto <= self.released:
            return None
        if self.flat is not None:
            size, start = self.flat.element_size(), self.flat.data_ptr()
        elif self.handle.span is not None:
            base, begin, end = self.handle.span
            size, start = (end - begin) // max(1, _values(self.handle)), base.data_ptr() + begin
        else:
            return None
        if (upto - self.released) * size < min_bytes:
            return None
        span = (start + self.released * size, (upto - self.released) * size)
        self.released = upto
        return span

    def view(self) -> torch.Tensor:
        if self.flat is None:
            with _MATERIALIZE:  # workers share sides; readers may seek a shared file
                return self._materialize()
        return self.flat

    def _materialize(self) -> torch.Tensor:
        if self.flat is None:
            t = self.handle.materialize()
            if tuple(t.shape) != tuple(self.handle.shape):
                where = f"{self.handle.source}: " if self.handle.source else ""
                raise CorruptFileError(
                    f"{where}tensor {self.handle.name!r}: header says shape {list(self.handle.shape)}, "
                    f"data has {list(t.shape)}"
                )
            stored = t.untyped_storage().data_ptr()  # the reader's memory (the file's pages when mapped)
            if t.is_conj():  # torch.save(z.conj()): the conjugate bit resolved (a copy)
                t = t.resolve_conj()
            if t.is_complex():
                t = torch.view_as_real(t)
            flat = t.reshape(-1)
            self.copied = flat.untyped_storage().data_ptr() != stored
            self.flat = flat
        return self.flat


@dataclass(eq=False, slots=True)
class _Job:
    """Rows to reduce: one side (slot) or a pair of sides of equal shape."""

    numel: int
    dtype: torch.dtype
    a: _Side
    a_slot: int
    b: _Side | None = None
    b_slot: int = -1
    pair_index: int = -1


@dataclass(eq=False, slots=True)
class _Run:
    """Whole tensors of one length, adjacent in one mapped file on each side, one storage
    dtype a side (a safetensors file's biases and norms, in file order): its rows are
    views of the mapping, and the pass does no per-tensor Python for them."""

    length: int
    a: tuple[torch.Tensor, int, torch.dtype]  # (mapping, first byte, dtype)
    a_slots: np.ndarray
    b: tuple[torch.Tensor, int, torch.dtype] | None = None
    b_slots: np.ndarray | None = None
    pairs: np.ndarray | None = None

    def rows(self, which: str, start: int, n: int) -> torch.Tensor:
        """Rows [start, start + n) of side ``which``, flat: a view of the mapping."""
        base, begin, dtype = self.a if which == "a" else self.b
        size = self.length * dtype.itemsize
        return _run_view(base, begin + start * size, begin + (start + n) * size, dtype)

    def span(self, which: str, start: int, n: int) -> tuple[int, int]:
        """(address, bytes) of rows [start, start + n) of side ``which`` in the mapping."""
        base, begin, dtype = self.a if which == "a" else self.b
        size = self.length * dtype.itemsize
        return base.data_ptr() + begin + start * size, n * size


@dataclass
class _Group:
    length: int
    paired: bool
    dtype: torch.dtype
    entries: list[tuple[_Job, int, int]] = field(default_factory=list)  # (job, first element, rows)
    runs: list[_Run] = field(default_factory=list)


@dataclass(eq=False, slots=True)
class _Task:
    """One block: rows of ``pending`` (job, first element, rows) then of ``pieces``
    (run, first row, rows); ``k`` rows in all."""

    group: _Group
    pending: list
    pieces: list
    k: int

    def ids(self, which: str) -> np.ndarray:
        """Slot of each row's side ``which`` ("a", "b"), or its pair ("pair")."""
        parts = []
        if self.pending:
            attr = {"a": "a_slot", "b": "b_slot", "pair": "pair_index"}[which]
            parts.append(np.repeat([getattr(job, attr) for job, _, _ in self.pending],
                                   [n for _, _, n in self.pending]))
        for run, start, n in self.pieces:
            ids = run.a_slots if which == "a" else run.b_slots if which == "b" else run.pairs
            parts.append(ids[start : start + n])
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


class _Plan:
    """The pairs as the pass sees them, gathered in one loop: the handle of every side
    slot (slots count old then new, in pair order), each pair's slots, kind, compute
    dtype and whether its storage dtype changed. ``_Side`` objects are made only for
    sides that need one (rows cut from a larger tensor, the exact path)."""

    def __init__(self, pairs: list[Pair]):
        handles: list[TensorHandle] = []
        a_slots, b_slots, kinds, dtypes, retyped, cplx = [], [], [], [], [], []
        compute = _compute_dtype
        for p in pairs:
            old, new = p.old, p.new
            a_slots.append(len(handles) if old is not None else -1)
            if old is not None:
                handles.append(old)
            b_slots.append(len(handles) if new is not None else -1)
            if new is not None:
                handles.append(new)
            kind = p.kind
            if kind == "common":
                cplx.append(old.dtype.is_complex)
                if cplx[-1] != new.dtype.is_complex:
                    kind = "reshaped"  # real views of different shapes: [..., 2] against [...]
            else:
                cplx.append(False)
            kinds.append(kind)
            retyped.append(p.retyped)
            dtypes.append(compute(old.dtype, new.dtype) if old is not None and new is not None
                          else compute((old or new).dtype))
        self.handles = handles
        self.a_slots = np.array(a_slots, dtype=np.int64)
        self.b_slots = np.array(b_slots, dtype=np.int64)
        self.kinds = kinds
        self.dtypes = dtypes
        self.retyped = np.array(retyped, dtype=bool)
        self.complex = np.array(cplx, dtype=bool)  # common pairs of complex tensors
        self.sides: dict[int, _Side] = {}
        self.exact_slots: set[int] = {s for s, h in enumerate(handles) if h.numel == 0}
        self.groups: list[_Group] = []

    def side(self, slot: int) -> _Side:
        side = self.sides.get(slot)
        if side is None:
            side = self.sides[slot] = _Side(self.handles[slot])
        return side


class Engine:
    """Measures a list of pairs into a Figures table.

    Args:
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        epsilon: |Δ| ≤ epsilon counts as unchanged.
        block: elements a side per block (default: cache-sized on CPU, 16 M on CUDA).
        row: length of the rows large tensors are cut into.
        workers: threads reducing whole blocks on the CPU (default: torch's intra-op
            thread count when the engine is made); torch runs single-threaded inside each.
    """

    def __init__(self, device: str | torch.device = "auto", epsilon: float = 0.0,
                 block: int | None = None, row: int = ROW, workers: int | None = None):
        self.device = resolve_device(device)
        self.epsilon = float(epsilon)
        self.block = block or (CUDA_BLOCK if self.device.type == "cuda" else CPU_BLOCK)
        self.row = row
        self.workers = workers or max(1, torch.get_num_threads())
        self._local = threading.local()
        self._stages: dict[tuple, list] = {}

    # ---- public -------------------------------------------------------------

    def run(self, pairs: list[Pair], hooks: Iterable[Hook] = (),
            progress: Callable[[int], None] | None = None) -> Figures:
        """Measure every pair: the Figures table, one row per pair, in order (also a
        sequence of TensorDiff views)."""
        if self.device.type == "cuda":  # streams and events below are those of this device
            with torch.cuda.device(self.device):
                return self._run(pairs, hooks, progress)
        return self._run(pairs, hooks, progress)

    def _run(self, pairs, hooks, progress) -> Figures:
        plan = self._plan(pairs)
        rows = self._reduce(plan.groups, progress)
        fig = self._finish(pairs, plan, rows)
        hooks = list(hooks)
        if hooks:
            self._run_hooks(pairs, fig, hooks)
        return fig

    def _finish(self, pairs, plan: _Plan, rows) -> Figures:
        """Merge row partials per tensor (Chan's update, rows in array order) and assemble."""
        side_rows, side_ids, side_lengths, pair_rows, pair_ids = rows
        merged_side = R.merge_side(side_rows, side_lengths, side_ids, len(plan.handles))
        merged_pair = R.merge_pair(pair_rows, pair_ids, len(pairs))
        return self._assemble(pairs, plan, merged_side, merged_pair)

    # ---- partial figures of some pairs (torch.distributed: torchdiff/distributed.py) ----

    def measure(self, pairs: list[Pair], owned: Iterable[int], hooks: Iterable[Hook] = (),
                progress: Callable[[int], None] | None = None) -> Partials:
        """Measure only the pairs ``owned`` (indices into ``pairs``); returns their row
        partials and value-derived figures under GLOBAL pair and slot ids, for
        :meth:`merge` on another process. Reads only the owned tensors' values."""
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):
                return self._measure(pairs, list(owned), list(hooks), progress)
        return self._measure(pairs, list(owned), list(hooks), progress)

    def _measure(self, pairs, owned, hooks, progress) -> Partials:
        sub = [pairs[i] for i in owned]
        plan = self._plan(sub)
        rows = self._reduce(plan.groups, progress)
        record = _Values(record=True)
        self._values = record
        try:
            diffs = self._finish(sub, plan, rows)
        finally:
            self._values = None
        if hooks:
            self._run_hooks(sub, diffs, hooks)
        first = global_slots(pairs)
        pair_map = np.asarray(owned, dtype=np.int64)
        slot_map = np.asarray([s for i in owned for s in _slots_of(pairs[i], first[i])], dtype=np.int64)
        side_rows, side_ids, side_lengths, pair_rows, pair_ids = rows
        return Partials(
            side_rows=side_rows, side_ids=slot_map[side_ids], side_lengths=side_lengths,
            pair_rows=pair_rows, pair_ids=pair_map[pair_ids],
            exact_side={int(slot_map[k]): v for k, v in record.exact_side.items()},
            exact_pair={int(pair_map[k]): v for k, v in record.exact_pair.items()},
            same_nonfinite={int(pair_map[k]): v for k, v in record.same_nonfinite.items()},
            equal={int(pair_map[k]): v for k, v in record.equal.items()},
            extras={int(pair_map[k]): v for k, v in diffs.extras.items() if v},
        )

    def merge(self, pairs: list[Pair], parts: list[Partials]) -> Figures:
        """TensorDiffs of all ``pairs`` from the Partials of processes that measured
        disjoint subsets. Rows are merged in the order of ``parts`` (rank order); all
        rows of one tensor come from one part, in that part's order, so every figure is
        the one a single process computes (docs/DISTRIBUTED.md). Value-derived figures
        (exact path, byte equality) are looked up, not recomputed."""
        plan = _Plan(pairs)

        def cat(name, width=None):
            arrays = [getattr(p, name) for p in parts]
            return np.concatenate(arrays) if arrays else np.zeros((0, width) if width else 0)

        rows = (cat("side_rows", R.SIDE_WIDTH), cat("side_ids").astype(np.int64), cat("side_lengths"),
                cat("pair_rows", R.PAIR_WIDTH), cat("pair_ids").astype(np.int64))
        known = _Values(lookup=True)
        for p in parts:
            known.exact_side.update(p.exact_side)
            known.exact_pair.update(p.exact_pair)
            known.same_nonfinite.update(p.same_nonfinite)
            known.equal.update(p.equal)
        self._values = known
        try:
            fig = self._finish(pairs, plan, rows)
        finally:
            self._values = None
        for p in parts:
            fig.extras.update(p.extras)
        return fig

    # Figures only the values give. Normally computed here; when measuring for another
    # process they are recorded, and when merging they are looked up (global ids).
    _values: "_Values | None" = None

    def _exact_side(self, slot: int, side: _Side) -> R.SideTotals:
        v = self._values
        if v is not None and v.lookup and slot in v.exact_side:
            return v.exact_side[slot]
        t = R.exact_side(side.view())
        if v is not None and v.record:
            v.exact_side[slot] = t
        return t

    def _exact_pair(self, i: int, a: _Side, b: _Side) -> R.PairTotals:
        v = self._values
        if v is not None and v.lookup and i in v.exact_pair:
            return v.exact_pair[i]
        t = R.exact_pair(a.view(), b.view(), self.epsilon)
        if v is not None and v.record:
            v.exact_pair[i] = t
        return t

    def _same_nonfinite(self, i: int, a: _Side, b: _Side) -> bool:
        v = self._values
        if v is not None and v.lookup and i in v.same_nonfinite:
            return v.same_nonfinite[i]
        same = _same_nonfinite(a.view(), b.view())
        if v is not None and v.record:
            v.same_nonfinite[i] = same
        return same

    def _equal(self, i: int, a: _Side, b: _Side) -> bool:
        v = self._values
        if v is not None and v.lookup and i in v.equal:
            return v.equal[i]
        same = _sides_bytes_equal(a, b)
        if v is not None and v.record:
            v.equal[i] = same
        return same


    # ---- planning -------------------------------------------------------------

    def _plan(self, pairs: list[Pair]) -> _Plan:
        """Cut every tensor into rows and group the rows by (length, paired, dtype). Pairs
        of whole small tensors with a byte span in a mapped file on each side join runs
        (``_Run``); the rest are jobs, cut into rows one by one."""
        plan = _Plan(pairs)
        groups: dict[tuple, _Group] = {}

        def group_of(length: int, paired: bool, dtype: torch.dtype) -> _Group:
            group = groups.get((length, paired, dtype))
            if group is None:
                group = groups[(length, paired, dtype)] = _Group(length, paired, dtype)
            return group

        handles, row = plan.handles, self.row
        jobs: list[_Job] = []
        small: list[int] = []
        for i, (kind, a_slot, b_slot) in enumerate(zip(plan.kinds, plan.a_slots.tolist(), plan.b_slots.tolist())):
            if kind == "common":
                old, new = handles[a_slot], handles[b_slot]
                if 0 < _values(old) <= row and old.span is not None and new.span is not None:
                    small.append(i)
                else:
                    jobs.append(_Job(_values(old), plan.dtypes[i], plan.side(a_slot), a_slot,
                                     plan.side(b_slot), b_slot, i))
            else:
                for slot in (a_slot, b_slot):
                    if slot >= 0:
                        h = handles[slot]
                        jobs.append(_Job(_values(h), _compute_dtype(h.dtype), plan.side(slot), slot))
        for job in jobs:
            if job.numel == 0:  # the exact path (plan.exact_slots)
                continue
            full, rest = divmod(job.numel, row)
            if job.numel <= row:
                full, rest = 0, job.numel
            for length, first, nrows in ((row, 0, full), (rest, full * row, 1)):
                if nrows and length:
                    group_of(length, job.b is not None, job.dtype).entries.append((job, first, nrows))
        for group in groups.values():
            if group.length < row:  # small tensors: file order, so runs of them are adjacent
                group.entries.sort(key=_file_position)
        if small:
            for run, dtype in _runs(plan, np.array(small, dtype=np.int64)):
                group_of(run.length, True, dtype).runs.append(run)
        # Full-row groups first: every tensor's rows then come in the same order (full rows
        # ascending, then its remainder) whatever other tensors are planned with it, so its
        # merged figures do not depend on how pairs are split between processes.
        plan.groups = sorted(groups.values(), key=lambda g: g.length != row)
        return plan

    # ---- the pass over the data ------------------------------------------------

    def _reduce(self, groups: list[_Group], progress):
        side_parts: list[torch.Tensor] = []
        side_ids: list[np.ndarray] = []
        side_lengths: list[np.ndarray] = []
        pair_parts: list[torch.Tensor] = []
        pair_ids: list[np.ndarray] = []
        for task, block in self._map(self._blocks(groups)):
            group, k = task.group, task.k
            lengths = np.full(k, group.length, dtype=np.float64)
            if group.paired:
                side_parts += [block[:, : R.SIDE_WIDTH], block[:, R.SIDE_WIDTH : 2 * R.SIDE_WIDTH]]
                pair_parts.append(block[:, 2 * R.SIDE_WIDTH :])
                side_ids += [task.ids("a"), task.ids("b")]
                side_lengths += [lengths, lengths]
                pair_ids.append(task.ids("pair"))
            else:
                side_parts.append(block)
                side_ids.append(task.ids("a"))
                side_lengths.append(lengths)
            self._release(task)
            if progress is not None:
                progress(k * group.length * (2 if group.paired else 1))

        def gather(parts, width):
            if not parts:
                return np.zeros((0, width))
            return torch.cat(parts).cpu().numpy()  # the one host synchronisation

        def ids_of(chunks):
            return np.concatenate(chunks).astype(np.int64) if chunks else np.zeros(0, dtype=np.int64)

        return (
            gather(side_parts, R.SIDE_WIDTH), ids_of(side_ids),
            np.concatenate(side_lengths) if side_lengths else np.zeros(0),
            gather(pair_parts, R.PAIR_WIDTH), ids_of(pair_ids),
        )

    def _blocks(self, groups: list[_Group]):
        """The blocks of the pass, in order, each with k·L ≤ block: a group's job rows,
        then its runs' rows."""
        for group in groups:
            L = group.length
            k_max = max(1, self.block // L)
            pending: list[tuple[_Job, int, int]] = []
            pieces: list[tuple[_Run, int, int]] = []
            rows = 0
            for job, first, nrows in group.entries:
                while nrows:
                    take = min(nrows, k_max - rows)
                    pending.append((job, first, take))
                    rows += take
                    first, nrows = first + take * L, nrows - take
                    if rows == k_max:
                        yield _Task(group, pending, pieces, rows)
                        pending, pieces, rows = [], [], 0
            for run in group.runs:
                start, count = 0, len(run.a_slots)
                while start < count:
                    take = min(count - start, k_max - rows)
                    pieces.append((run, start, take))
                    rows += take
                    start += take
                    if rows == k_max:
                        yield _Task(group, pending, pieces, rows)
                        pending, pieces, rows = [], [], 0
            if rows:
                yield _Task(group, pending, pieces, rows)

    def _map(self, blocks):
        """(task, its [k, width] float64 partials) for every block, in order. On the CPU
        with several workers, whole blocks go to a pool of threads, each reducing its
        block with single-threaded torch ops (docs/ENGINE.md, "Threads"): a core taken by
        another process then slows one worker, not every reduction."""
        workers = self.workers if self.device.type == "cpu" else 1
        if workers <= 1:
            with torch_threads(1 if self.device.type == "cpu" else None):
                for task in blocks:
                    yield task, self._block(task)
            return
        window: collections.deque = collections.deque()
        with torch_threads(1), ThreadPoolExecutor(workers, thread_name_prefix="torchdiff",
                                                   initializer=torch.set_num_threads, initargs=(1,)) as pool:
            try:
                for task in blocks:
                    window.append((task, pool.submit(self._block, task)))
                    if len(window) >= 2 * workers:
                        task_, future = window.popleft()
                        yield task_, future.result()
                while window:
                    task_, future = window.popleft()
                    yield task_, future.result()
            finally:
                for _, future in window:
                    future.cancel()

    def _block(self, task: _Task) -> torch.Tensor:
        """Reduce one block: its side (and pair) partials as one [k, width] float64 tensor."""
        group, k = task.group, task.k
        L = group.length
        a = self._fill(task, "a")
        work = self._buffer("work", k * L, group.dtype).view(k, L)
        parts = R.side_rows(a, work)
        if group.paired:
            b = self._fill(task, "b")
            delta = self._buffer("delta", k * L, group.dtype).view(k, L)
            parts += R.side_rows(b, work)
            parts += R.pair_rows(a, b, self.epsilon, work, delta)
        return torch.stack(parts, 1).to(torch.float64)

    def _fill(self, task: _Task, which: str) -> torch.Tensor:
        """The [k, L] block of side ``which`` for the task's rows, on the device."""
        k, L, dtype = task.k, task.group.length, task.group.dtype
        slices = _slices(task.pending, L, which) + [run.rows(which, start, n) for run, start, n in task.pieces]
        if all(sl.device == self.device for sl in slices):
            # Values already where the reductions run (CPU files, or live CUDA tensors).
            if len(slices) == 1 and slices[0].dtype == dtype and slices[0].is_contiguous():
                return slices[0].view(k, L)  # zero copy
            out = self._buffer(which, k * L, dtype)
            if len(slices) == 1:
                out.copy_(slices[0])
            else:
                _cat(slices, out)
            return out.view(k, L)
        if self.device.type == "cpu":  # live CUDA tensors measured on the CPU
            out = self._buffer(which, k * L, dtype)
            start = 0
            for sl in slices:
                out[start : start + sl.numel()].copy_(sl)
                start += sl.numel()
            return out.view(k, L)
        # CUDA: gather into a pinned stage (double-buffered), then copy asynchronously,
        # so the host fills the next block while the device reduces this one.
        stage, event_slot = self._stage(which, dtype)
        staged = stage[: k * L]
        if len(slices) == 1:
            staged.copy_(slices[0])
        else:
            _cat(slices, staged)
        out = self._buffer(which, k * L, dtype)
        out.copy_(staged, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        event_slot[0] = event
        return out.view(k, L)

    def _buffer(self, name: str, n: int, dtype: torch.dtype) -> torch.Tensor:
        """A reused scratch buffer of this thread (each worker has its own)."""
        workspace = self._local.__dict__.setdefault("workspace", {})
        key = (name, dtype)
        buf = workspace.get(key)
        if buf is None or buf.numel() < n:
            buf = torch.empty(max(n, self.block), dtype=dtype, device=self.device)
            workspace[key] = buf
        return buf[:n]

    def _stage(self, which: str, dtype: torch.dtype):
        """The next of two pinned host buffers, once the copy that last read it is done."""
        key = (which, dtype)
        if key not in self._stages:
            self._stages[key] = [
                (torch.empty(max(self.block, self.row), dtype=dtype, pin_memory=True), [None]) for _ in range(2)
            ]
        stages = self._stages[key]
        stages.append(stages.pop(0))  # alternate between the two
        stage, event_slot = stages[0]
        if event_slot[0] is not None:
            event_slot[0].synchronize()
        return stage, event_slot

    def _release(self, task: _Task) -> None:
        """Drop the mapped pages of rows already reduced, in chunks of at least
        ``_RELEASE_MIN_BYTES`` (madvise is a syscall with a TLB flush: not per block).
        A tensor assembled in memory (DCP chunks, a legacy pickle) is dropped once all its
        rows are reduced; the exact path, if it needs it, reads it again. A run's rows
        are released with the block that reduced them."""
        L = task.group.length
        spans = []
        if _madvise is not None:
            for run, start, n in task.pieces:
                spans.append(run.span("a", start, n))
                if run.b is not None:
                    spans.append(run.span("b", start, n))
        for job, first, n in task.pending:
            end = first + n * L
            # The last rows of this tensor in this group: release what is left of it now.
            last = end == job.numel or end == job.numel // self.row * self.row
            for side in (job.a, job.b):
                if side is None:
                    continue
                side.done += n * L
                h = side.handle
                if not side.mapped:  # in memory (or a copy of mapped values): dropped once reduced
                    if side.done >= job.numel and (h.span is None or side.copied):
                        side.flat = side.tail = None
                    elif (end == side.done == job.numel // self.row * self.row and side.flat is not None
                          and (h.span is None or side.copied)):
                        # full rows done, the short last row still to come: keep only that row
                        side.tail_from, side.tail = end, side.flat[end:].clone()
                        side.flat = None
                    continue
                if _madvise is None:
                    continue
                if first == 0 and end == job.numel and h.span is not None and side.released == 0:
                    base, begin, stop = h.span  # a whole small tensor: its bytes in the file
                    spans.append((base.data_ptr() + begin, stop - begin))
                    side.released = end
                    continue
                span = side.releasable(end, 0 if last else _RELEASE_MIN_BYTES)
                if span is not None:
                    spans.append(span)
        # Adjacent small tensors (a run of one file) are released by one call, not one each.
        spans.sort()
        start, size = None, 0
        for address, nbytes in spans:
            if start is not None and address == start + size:
                size += nbytes
                continue
            if start is not None:
                _drop_pages(start, size)
            start, size = address, nbytes
        if start is not None:
            _drop_pages(start, size)

    # ---- results ---------------------------------------------------------------

    def _assemble(self, pairs, plan: _Plan, ms, mp) -> Figures:
        """Merged partials -> the Figures table. Figures are derived for all tensors at
        once (NumPy, float64) and written into the columns; tensors whose partials cannot
        be trusted take the exact path, one at a time."""
        handles = plan.handles
        f32 = np.array([_compute_dtype(h.dtype) is torch.float32 for h in handles], dtype=bool)
        exact = _exact_sides(ms, f32)
        exact[list(plan.exact_slots)] = True
        count = ms["count"]
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            # A constant tensor (min = max): its figures are that value, exactly (the
            # float32 row sums would round the mean off it, outside [min, max]).
            lo, hi = ms["min"], ms["max"]
            const = (count > 0) & (lo == hi)
            mean = np.where(const, lo, np.minimum(np.maximum(ms["mean"], lo), hi))
            m2 = np.where(const, 0.0, ms["m2"])
            sumsq = m2 + count * mean ** 2
            cols = {
                "mean": mean, "std": np.sqrt(m2 / count), "min": lo, "max": hi,
                "mean_abs": np.where(const, np.abs(lo), ms["sum_abs"] / count),
                "rms": np.where(const, np.abs(lo), np.sqrt(sumsq / count)), "zero_count": np.rint(ms["zero"]),
            }
        n_pairs = len(pairs)
        fig = Figures([p.name for p in pairs], [_STATUS[k] for k in plan.kinds], [p.role for p in pairs])
        a_slots, b_slots = plan.a_slots, plan.b_slots
        for side_cols, slots in ((fig.old, a_slots), (fig.new, b_slots)):
            rows = np.flatnonzero(slots >= 0)
            src = slots[rows]
            side_cols.present[rows] = True
            for name in ("mean", "std", "min", "max", "mean_abs", "rms", "zero_count"):
                getattr(side_cols, name)[rows] = cols[name][src]
            held = [handles[s] for s in src.tolist()]
            shapes = [tuple(h.shape) for h in held]
            dtypes = [h.storage_dtype for h in held]
            if len(held) == n_pairs:
                side_cols.shape, side_cols.dtype = shapes, dtypes
            else:
                for i, shape, dtype in zip(rows.tolist(), shapes, dtypes):
                    side_cols.shape[i], side_cols.dtype[i] = shape, dtype
            side_cols.numel[rows] = [h.numel for h in held]
            side_cols.nbytes[rows] = [h.nbytes for h in held]
            for j in np.flatnonzero(exact[src]).tolist():
                i, s_ = int(rows[j]), int(src[j])
                t = self._exact_side(s_, plan.side(s_))
                for name in ("mean", "std", "min", "max", "mean_abs", "rms", "zero_count", "nan_count",
                             "inf_count"):
                    getattr(side_cols, name)[i] = getattr(t, name)
        common = np.array([k == "common" for k in plan.kinds], dtype=bool)
        if not common.any():
            return self._released(plan, fig)
        # The fast figures, for every common pair at once (float64, from the merged partials).
        rows = np.flatnonzero(common)
        a, b = a_slots[rows], b_slots[rows]
        n = fig.old.numel[rows] * np.where(plan.complex[rows], 2, 1)  # values: a complex tensor's real view
        nonfinite = (fig.old.nan_count[rows] + fig.old.inf_count[rows] + fig.new.nan_count[rows]
                     + fig.new.inf_count[rows]) > 0
        f32_pair = np.array([d is torch.float32 for d in plan.dtypes], dtype=bool)[rows]
        dsq, dmax = mp["dsq"][rows], mp["dmax"][rows]
        with np.errstate(invalid="ignore"):
            underflow = (dmax > 0) & (dsq < np.where(f32_pair, _TINY_MEAN_SQUARE, _TINY_MEAN_SQUARE_F64) * n)
        slow = (nonfinite | exact[a] | exact[b] | (n == 0) | ~np.isfinite(dsq)
                | ~np.isfinite(mp["dsum_abs"][rows]) | underflow)
        d2, d_max, d_abs = dsq.copy(), dmax.copy(), mp["dsum_abs"][rows].copy()
        dot = np.full(rows.size, np.nan)  # ⟨A,B⟩ summed only on the exact path (below, and where ill-conditioned)
        changed = np.rint(mp["changed"][rows])
        sq_old, sq_new = sumsq[a].copy(), sumsq[b].copy()
        # The exact path's sums may be in units of powers of two (reductions.PairTotals).
        scale, scale_old, scale_new = np.ones(rows.size), np.ones(rows.size), np.ones(rows.size)
        # Tensors whose partials cannot be trusted: float64 with masks, one at a time.
        for j in np.flatnonzero(slow).tolist():
            i = int(rows[j])
            t = self._exact_pair(i, plan.side(int(a[j])), plan.side(int(b[j])))
            n[j], d2[j], d_max[j], d_abs[j], changed[j] = t.count, t.dsq, t.dmax, t.dsum_abs, t.changed
            sq_old[j], sq_new[j], dot[j] = t.sumsq_old, t.sumsq_new, t.dot
            scale[j], scale_old[j], scale_new[j] = t.scale, t.scale_old, t.scale_new
        # A side all zero (pruned, zero-initialised): Δ is the other side, so ‖Δ‖² is that
        # side's ‖·‖² exactly; two float32 row sums of the same values differ in their last
        # bits, and a zeroed tensor read rel_l2 = 0.99999999 (docs/METRICS.md).
        with np.errstate(invalid="ignore"):
            zero_new = ~slow & (fig.new.min[rows] == 0) & (fig.new.max[rows] == 0)
            zero_old = ~slow & (fig.old.min[rows] == 0) & (fig.old.max[rows] == 0)
        d2 = np.where(zero_new, sq_old, np.where(zero_old, sq_new, d2))
        same_nonfinite = ((fig.old.nan_count[rows] == fig.new.nan_count[rows])
                          & (fig.old.inf_count[rows] == fig.new.inf_count[rows]))
        for j in np.flatnonzero(same_nonfinite & nonfinite).tolist():
            same_nonfinite[j] = self._same_nonfinite(int(rows[j]), plan.side(int(a[j])), plan.side(int(b[j])))
        retyped = plan.retyped[rows]
        equal = np.zeros(rows.size, dtype=bool)
        for j in np.flatnonzero((d_max == 0) & same_nonfinite & ~retyped).tolist():
            equal[j] = self._equal(int(rows[j]), plan.side(int(a[j])), plan.side(int(b[j])))
        fig.measured[rows] = True
        fig.equal[rows] = equal
        fig.count[rows] = n
        fig.changed_count[rows] = changed
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            # Figures beyond float64's range (values near 1e308) are ±inf: an ⟨A,B⟩ that
            # overflows makes the cosine NaN (docs/METRICS.md, "Numerics").
            fig.l2[rows] = scale * np.sqrt(np.maximum(d2, 0.0))
            fig.norm_old[rows] = scale_old * np.sqrt(np.maximum(sq_old, 0.0))
            fig.norm_new[rows] = scale_new * np.sqrt(np.maximum(sq_new, 0.0))
            # ⟨A,B⟩: from the norms, (‖A‖² + ‖B‖² − ‖Δ‖²)/2, where that is the better
            # conditioned (nearly equal tensors: 1 − cos keeps its digits), else summed
            # directly (reductions.pair_rows; the norms would cancel when they differ by
            # orders of magnitude). figures.by_norms weighs the two error bounds.
            derived = (scale_old * scale_old * sq_old + scale_new * scale_new * sq_new - scale * scale * d2) / 2
            direct = ~by_norms(fig.l2[rows], fig.norm_old[rows], fig.norm_new[rows])
            fig.dot[rows] = np.where(direct, scale_old * scale_new * dot, derived)
            fig.max_abs[rows] = np.where(n > 0, d_max, 0.0)
            fig.mean_abs_diff[rows] = np.where(n > 0, scale * (d_abs / np.maximum(n, 1)), 0.0)
        # Block rows carry no ⟨A,B⟩ (reductions.pair_rows): where the derived one is ill-
        # conditioned, the pair is read again on the exact path, which sums it directly.
        for j in np.flatnonzero(direct & ~slow).tolist():
            sides = plan.side(int(a[j])), plan.side(int(b[j]))
            t = self._exact_pair(int(rows[j]), *sides)
            fig.dot[int(rows[j])] = t.scale_old * t.scale_new * t.dot
            _let_go(*sides)  # nothing else reads them: two unrelated checkpoints are every pair
        # Integers beyond 2**53 (int64, uint64) differ by less than float64 resolves: bytes
        # that differ where Δ rounded to 0 are a change of at least 1, not "unchanged".
        below_resolution = ~equal & (d_max == 0) & same_nonfinite & ~retyped & (self.epsilon < 1)
        for j in np.flatnonzero(below_resolution).tolist():  # rare: bytes differ where Δ is 0
            dtype = handles[int(a[j])].dtype
            below_resolution[j] = not (dtype.is_floating_point or dtype.is_complex)
        unchanged = (equal | ((d_max <= self.epsilon) & same_nonfinite)) & ~below_resolution
        for j in np.flatnonzero(below_resolution).tolist():  # said on the tensor line
            fig.extras.setdefault(int(rows[j]), {})["below_float64_resolution"] = True
        status = fig.status
        for i, code in zip(rows.tolist(), np.where(retyped, 2, np.where(unchanged, 1, 0)).tolist()):
            status[i] = (CHANGED, UNCHANGED, RETYPED)[code]
        return self._released(plan, fig)

    @staticmethod
    def _released(plan: _Plan, fig: Figures) -> Figures:
        _let_go(*plan.sides.values())
        return fig

    def _run_hooks(self, pairs, fig: Figures, hooks) -> Figures:
        """Each hook that wants a pair gets its whole values. On the CPU torch runs
        single-threaded here, as in the pass (docs/ENGINE.md, "Threads"): the hooks' small
        factorisations (a 768 × 64 QR) took 0.4 ms on one thread and 34 ms on two while
        another process kept a core busy."""
        with torch_threads(1 if self.device.type == "cpu" else None):
            return self._hooks_pass(pairs, fig, hooks)

    def _hooks_pass(self, pairs, fig: Figures, hooks) -> Figures:
        for i, p in enumerate(pairs):
            wanted = [h for h in hooks if h.wants(p)]
            if not wanted:
                continue
            dtype = R.compute_dtype(*[h.dtype for h in (p.old, p.new) if h is not None])
            old = self._full(p.old, dtype)
            new = self._full(p.new, dtype)
            extras = fig.extras.setdefault(i, {})
            for h in wanted:
                extras[h.name] = h(p, old, new)
            del old, new
            for handle in (p.old, p.new):
                if handle is not None and handle.mapped:  # drop the pages the hooks touched again
                    side = _Side(handle)
                    side.release(side.view().numel())  # (nothing when the values were a copy)
        return fig

    def _full(self, handle: TensorHandle | None, dtype: torch.dtype) -> torch.Tensor | None:
        if handle is None:
            return None
        t = handle.materialize()
        if t.is_conj():
            t = t.resolve_conj()
        if t.is_complex():
            t = torch.view_as_real(t)
        return t.to(device=self.device, dtype=dtype)


@contextlib.contextmanager
def torch_threads(n: int | None):
    """torch's intra-op thread count set to ``n`` for the pass, then restored (None:
    unchanged). Every reduction of a block is then single-threaded, so a row's partials
    never depend on how many threads ran or which rows shared its block."""
    threads = torch.get_num_threads()
    if n is None or n == threads:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class _Values:
    """Value-derived figures by id: recorded by the process that read the values, looked
    up by the one that merges (Engine.measure / Engine.merge)."""

    record: bool = False
    lookup: bool = False
    exact_side: dict = field(default_factory=dict)
    exact_pair: dict = field(default_factory=dict)
    same_nonfinite: dict = field(default_factory=dict)
    equal: dict = field(default_factory=dict)


@dataclass
class Partials:
    """What one process measured of some pairs, under global ids: row partials (the
    engine's fixed layout, reductions.py), exact-path totals and byte/non-finite
    equality of the tensors whose values it read, and hook extras (JSON-able)."""

    side_rows: np.ndarray
    side_ids: np.ndarray
    side_lengths: np.ndarray
    pair_rows: np.ndarray
    pair_ids: np.ndarray
    exact_side: dict[int, R.SideTotals]
    exact_pair: dict[int, R.PairTotals]
    same_nonfinite: dict[int, bool]
    equal: dict[int, bool]
    extras: dict[int, dict]


_STATUS = {"common": CHANGED, "added": ADDED, "removed": REMOVED, "reshaped": RESHAPED}


@functools.lru_cache(maxsize=None)
def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return R.compute_dtype(*dtypes)


def _runs(plan: _Plan, small: np.ndarray):
    """(run, compute dtype) for the pairs ``small`` (indices into the plan's pairs), whose
    sides are whole small tensors with a byte span each: sorted by (length, dtypes,
    mappings, position in the old file), cut wherever a tensor does not follow the one
    before it in both files."""
    handles = plan.handles
    olds = [handles[s] for s in plan.a_slots[small].tolist()]
    news = [handles[s] for s in plan.b_slots[small].tolist()]
    a_spans = [h.span for h in olds]
    b_spans = [h.span for h in news]
    # What a run shares: both storage dtypes (so the compute dtype) and both mappings.
    shared = [(h.dtype, g.dtype, id(x[0]), id(y[0])) for h, g, x, y in zip(olds, news, a_spans, b_spans)]
    codes = {k: i for i, k in enumerate(dict.fromkeys(shared))}
    key = np.array([codes[k] for k in shared], dtype=np.int64)
    length = np.array([_values(h) for h in olds], dtype=np.int64)
    a_begin, a_end = (np.array([x[k] for x in a_spans], dtype=np.int64) for k in (1, 2))
    b_begin, b_end = (np.array([y[k] for y in b_spans], dtype=np.int64) for k in (1, 2))
    order = np.lexsort([a_begin, key, length])
    cut = np.ones(order.size, dtype=bool)
    o, p = order[1:], order[:-1]
    cut[1:] = ((length[o] != length[p]) | (key[o] != key[p]) | (a_begin[o] != a_end[p])
               | (b_begin[o] != b_end[p]))
    bounds = np.flatnonzero(cut).tolist() + [order.size]
    for start, stop in zip(bounds[:-1], bounds[1:]):
        members = order[start:stop]
        first = int(members[0])
        old, new = olds[first], news[first]
        ids = small[members]
        yield _Run(int(length[first]), (old.span[0], old.span[1], _read_dtype(old.dtype)), plan.a_slots[ids],
                   (new.span[0], new.span[1], _read_dtype(new.dtype)), plan.b_slots[ids], ids), plan.dtypes[int(ids[0])]


# A complex tensor is measured as its real view (docs/METRICS.md): 2·numel values of
# the real dtype; its bytes in a file are read as that dtype.
_REAL_VIEW = {torch.complex64: torch.float32, torch.complex128: torch.float64, torch.complex32: torch.float16}


def _values(h: TensorHandle) -> int:
    """The values the engine measures of a tensor: numel, 2·numel for a complex one."""
    return 2 * h.numel if h.dtype.is_complex else h.numel


def _read_dtype(dtype: torch.dtype) -> torch.dtype:
    return _REAL_VIEW.get(dtype, dtype)


def global_slots(pairs: list[Pair]) -> list[int]:
    """The first side slot of each pair (slots count old then new, in pair order)."""
    first, slot = [], 0
    for p in pairs:
        first.append(slot)
        slot += (p.old is not None) + (p.new is not None)
    return first


def _slots_of(p: Pair, first: int) -> list[int]:
    return list(range(first, first + (p.old is not None) + (p.new is not None)))


def _file_position(entry) -> tuple:
    span = entry[0].a.handle.span
    return (0, id(span[0]), span[1]) if span is not None else (1, 0, 0)


def _let_go(*sides: _Side) -> None:
    """Sides read whole (the exact path) dropped: a mapping's pages released, an
    assembled buffer freed (read again if needed again)."""
    for side in sides:
        if side.flat is not None:
            side.release(side.flat.numel())
        side.flat = side.tail = None


def _slices(pending, L: int, which: str) -> list[torch.Tensor]:
    """The flat slices of side ``which`` for the pending rows. Whole small tensors whose
    bytes are adjacent in one mapped file (``TensorHandle.span``) and share a dtype are
    read as one slice, without materialising each tensor."""
    out: list[torch.Tensor] = []
    run: list | None = None  # [base, begin, end, dtype]
    for job, first, n in pending:
        side = job.a if which == "a" else job.b
        h = side.handle
        if h.span is not None and side.flat is None and first == 0 and n * L == _values(h):
            base, begin, end = h.span
            dtype = _read_dtype(h.dtype)
            if run is not None and run[0] is base and run[2] == begin and run[3] == dtype:
                run[2] = end
                continue
            if run is not None:
                out.append(_run_view(*run))
            run = [base, begin, end, dtype]
            continue
        if run is not None:
            out.append(_run_view(*run))
            run = None
        tail = side.tail
        if tail is not None and first >= side.tail_from:  # the short last row, kept apart (Engine._release)
            out.append(tail[first - side.tail_from : first - side.tail_from + n * L])
        else:
            out.append(side.view()[first : first + n * L])
    if run is not None:
        out.append(_run_view(*run))
    return out


def _run_view(base: torch.Tensor, begin: int, end: int, dtype: torch.dtype) -> torch.Tensor:
    raw = base[begin:end]
    try:
        return raw.view(dtype)
    except RuntimeError:  # misaligned for a dtype view
        return raw.clone().view(dtype)


def _cat(slices: list[torch.Tensor], out: torch.Tensor) -> None:
    """Concatenate ``slices`` into ``out``, upcasting. ``torch.cat`` cannot promote some
    dtype mixes (float8 with anything, uint16/32/64 with signed integers), so a block
    mixing dtypes is filled slice by slice when cat refuses."""
    if len({s.dtype for s in slices}) == 1:
        torch.cat(slices, out=out)
        return
    try:
        torch.cat(slices, out=out)
        return
    except RuntimeError:
        pass
    pos = 0
    for s in slices:
        out[pos : pos + s.numel()].copy_(s)
        pos += s.numel()


def _same_nonfinite(a: torch.Tensor, b: torch.Tensor) -> bool:
    """NaN at the same positions, and ±Inf at the same positions with the same signs."""
    a, b = a.reshape(-1).to(torch.float64), b.reshape(-1).to(torch.float64)
    if not torch.equal(torch.isnan(a), torch.isnan(b)):
        return False
    return torch.equal(torch.where(torch.isinf(a), a, 0.0), torch.where(torch.isinf(b), b, 0.0))


# Below this mean square, float32 squares (normal down to 2^-126) lose precision:
# such tensors (tiny values, e.g. Adam's exp_avg_sq) are measured in float64.
_TINY_MEAN_SQUARE = 2.0**-100
# The same for float64 (normal down to 2^-1022): below it, the exact path scales the values.
_TINY_MEAN_SQUARE_F64 = 2.0**-960
# A float32 row is centred on its float32 row mean, off the true mean by δ ≈ 2⁻²⁴·|mean|·log₂L;
# that adds L·δ² to its squared deviations, a relative error of about (δ/std)² in the variance.
# Tensors with std < NARROW·|mean| (e.g. mean 1, std 1e-6) are measured in float64 instead.
NARROW = 1e-3


def _exact_sides(ms: dict, f32: np.ndarray) -> np.ndarray:
    """Slots whose merged partials cannot be trusted: non-finite, empty, or (float32)
    a mean square deviation so small that float32 squares underflowed, or a spread so
    narrow beside the mean (std < NARROW · |mean|) that centring each row on its float32
    mean costs float32 precision (docs/METRICS.md, "Numerics")."""
    with np.errstate(invalid="ignore", over="ignore"):
        finite = np.isfinite(ms["m2"] + ms["count"] * ms["mean"] ** 2)  # Σx² too (float64 near 1e154)
        for k in ("mean", "m2", "min", "max", "sum_abs"):
            finite &= np.isfinite(ms[k])
        spread = ms["max"] > ms["min"]
        tiny = np.where(f32, _TINY_MEAN_SQUARE, _TINY_MEAN_SQUARE_F64) * ms["count"]
        underflow = spread & (ms["m2"] < tiny)
        largest = np.maximum(np.abs(ms["min"]), np.abs(ms["max"]))
        underflow |= ~f32 & (largest > 0) & (largest * largest < tiny)  # float64 squares of x
        narrow = f32 & spread & (ms["m2"] < (NARROW * ms["mean"]) ** 2 * ms["count"])
    return ~finite | (ms["count"] <= 0) | underflow | narrow


def _sides_bytes_equal(a: _Side, b: _Side) -> bool:
    """Bytes identical; straight from the file mappings when both sides have a span."""
    ha, hb = a.handle, b.handle
    if ha.span is not None and hb.span is not None and a.flat is None and b.flat is None:
        if ha.dtype != hb.dtype or ha.shape != hb.shape:
            return False
        base_a, begin_a, end_a = ha.span
        base_b, begin_b, end_b = hb.span
        return torch.equal(base_a[begin_a:end_a], base_b[begin_b:end_b])
    return bytes_equal(a.view(), b.view())


def bytes_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    try:
        return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
    except RuntimeError:
        return bool(torch.equal(a, b))


# ---- page release (Linux) -----------------------------------------------------

_MADV_DONTNEED = 4
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
try:
    _madvise = ctypes.CDLL(None, use_errno=True).madvise if sys.platform.startswith("linux") else None
    if _madvise is not None:
        _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _madvise.restype = ctypes.c_int
except (OSError, AttributeError):
    _madvise = None


def _drop_pages(address: int, nbytes: int) -> None:
    """madvise(DONTNEED) the whole pages inside [address, address + nbytes).

    Only called on views of read-only file mappings, where dropped pages are read
    back from the page cache if touched again; never on anonymous memory.
    """
    start = -(-address // _PAGE) * _PAGE
    end = (address + nbytes) // _PAGE * _PAGE
    if end > start:
        _madvise(start, end - start, _MADV_DONTNEED)
