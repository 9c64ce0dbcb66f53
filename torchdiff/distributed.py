"""torchdiff on torch.distributed: ``torchrun ... -m torchdiff OLD NEW`` and
``torchdiff.compare(..., process_group=pg)`` inside a training job.

Nothing here schedules or talks on its own: the process group is torch's (gloo on the
CPU, NCCL on CUDA), and every exchange is a torch collective on fixed-layout int64,
float64 or uint8 tensors. No Python object is pickled between ranks.

A torchrun run (docs/DISTRIBUTED.md):

1. every rank opens both checkpoints (headers and indexes only) and pairs the tensors;
2. :func:`assign` gives every pair to one rank, balanced by bytes (deterministic);
3. each rank measures its pairs (``Engine.measure``): row partials with global ids,
   plus the figures that need values (exact path, byte equality, hook extras);
4. a status round (all_gather of a fixed header), then the payloads are gathered on
   rank 0, which merges them in rank order (``Engine.merge``), runs the analyses and
   renders; the others print nothing;
5. a final round agrees on one exit code, which every rank returns.

``series`` splits tensor names the same way (``grouped_owners``: a layer's tensors on one
rank) and gathers every step's partials plus its Gram sums in one exchange
(``gather_parts``); ``hash``/``verify`` compute each owned tensor's manifest record and
all-gather the records as JSON text (``exchange_json``).

Any failure on any rank turns the next round into a failure round: the failing rank's
one-line message travels to rank 0 as UTF-8 bytes, rank 0 prints it naming the rank,
and every rank exits 2. A collective that fails (a rank died, or did not arrive within
``--dist-timeout``) is reported with the ranks that did not reach it.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from torchdiff import reductions as R
from torchdiff.errors import TorchDiffError

DEFAULT_TIMEOUT = 300.0
_TORCH_DTYPES = {np.dtype(np.float64): torch.float64, np.dtype(np.int64): torch.int64,
                 np.dtype(np.uint8): torch.uint8}
_HEADER = 12  # int64 slots of a status round
_ACTIVE: "Context | None" = None
#: Seconds of the last :func:`run` on this rank: measure (own pairs), exchange (status
#: round + gathers, waiting for the slowest rank included), merge (rank 0).
TIMINGS: dict[str, float] = {}


class RankFailed(TorchDiffError):
    """A rank failed (or went missing); every rank raises this with the same code."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Context:
    """One process's place in a process group."""

    group: Any
    rank: int
    world: int
    device: torch.device  # where collective tensors live (cpu for gloo, cuda:N for NCCL)
    owns_group: bool = False
    phase: int = 0
    failed: tuple[int, str] | None = None

    @property
    def backend(self) -> str:
        import torch.distributed as dist

        return dist.get_backend(self.group)


# ---- launch ------------------------------------------------------------------------


def launched() -> bool:
    """True under torchrun (or any launcher that sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def active() -> Context | None:
    return _ACTIVE


def rank() -> int:
    return _ACTIVE.rank if _ACTIVE is not None else 0


def init_from_env(device: str = "auto", timeout: float = DEFAULT_TIMEOUT) -> Context:
    """Join the process group torchrun describes: NCCL when the engine runs on CUDA
    (each rank on ``cuda:LOCAL_RANK``), gloo otherwise; collectives time out after
    ``timeout`` seconds."""
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = str(device).startswith("cuda") or (str(device) == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(local)
    backend = "nccl" if cuda else "gloo"
    kwargs: dict[str, Any] = {}
    if cuda:
        kwargs["device_id"] = torch.device("cuda", local)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout), **kwargs)
    return Context(None, dist.get_rank(), dist.get_world_size(),
                   torch.device("cuda", local) if cuda else torch.device("cpu"), owns_group=True)


def from_group(group: Any) -> Context:
    """A Context over an existing process group (inside a training job)."""
    import torch.distributed as dist

    if group is True:
        group = dist.group.WORLD
    backend = dist.get_backend(group)
    dev = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    return Context(group, dist.get_rank(group), dist.get_world_size(group), dev)


def engine_device(device: str) -> str:
    """The engine's device on this rank: ``cuda`` means ``cuda:LOCAL_RANK``."""
    if str(device) in ("cuda", "auto") and torch.cuda.is_available():
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device


def share_cores() -> int:
    """Split this machine's cores between the ranks on it (LOCAL_WORLD_SIZE)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    per = max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    torch.set_num_threads(per)
    return per


# ---- work split --------------------------------------------------------------------


def assign(sizes: list[int], world: int) -> list[int]:
    """The rank of each unit: largest first, each to the least-loaded rank (ties: the
    lower rank; equal sizes: the lower index first). Deterministic, so every rank
    computes the same split without talking."""
    owner = [0] * len(sizes)
    load = [0] * world
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += sizes[i]
    return owner


def colocation_keys(hook, pair) -> list:
    """Keys of pairs a stateful hook must see in one process: similarity_matrix's
    cross-layer groups, gradient_analysis's (exp_avg, exp_avg_sq, step) of one parameter."""
    keys = []
    colocate = getattr(hook, "colocate", None)
    if colocate is not None:
        key = colocate(pair)
        return [key] if key is not None else []
    member = getattr(hook, "member", None)
    if isinstance(member, dict) and pair.name in member:
        keys.append((hook.name, "group", member[pair.name]))
    index = getattr(hook, "index", None)
    if isinstance(index, dict):
        for side, table in index.items():
            entry = table.get(pair.name) if isinstance(table, dict) else None
            if entry is not None:
                keys.append((hook.name, side, getattr(entry[0], "key", id(entry[0]))))
    return keys


def owners(pairs, hooks, world: int) -> list[int]:
    """The rank that measures each pair: pairs a stateful hook needs together form one
    unit; units are balanced by bytes (both sides)."""
    keys = [[key for h in hooks for key in colocation_keys(h, p)] for p in pairs]
    return grouped_owners(keys, [_nbytes(p) for p in pairs], world)


def grouped_owners(keys: list[list], sizes: list[int], world: int) -> list[int]:
    """The rank of each item: items sharing a key form one unit (union-find), units
    (sized by the sum of their items' bytes, in order of their first item) go to ranks
    by :func:`assign`. Deterministic: every rank computes the same owners."""
    parent = list(range(len(sizes)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict = {}
    for i, item_keys in enumerate(keys):
        for key in item_keys:
            j = first.setdefault(key, i)
            ri, rj = find(i), find(j)
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)
    units: dict[int, list[int]] = {}
    for i in range(len(sizes)):
        units.setdefault(find(i), []).append(i)
    roots = sorted(units)
    unit_owner = assign([sum(sizes[i] for i in units[r]) for r in roots], world)
    out = [0] * len(sizes)
    for r, o in zip(roots, unit_owner):
        for i in units[r]:
            out[i] = o
    return out


def _nbytes(p) -> int:
    return sum(h.nbytes for h in (p.old, p.new) if h is not None)


# ---- rounds ------------------------------------------------------------------------


def _store():
    try:
        import torch.distributed.distributed_c10d as c10d

        return c10d._get_default_store()
    except Exception:  # noqa: BLE001 - naming the missing rank is best effort
        return None


def _collective(ctx: Context, what: str, fn: Callable[[], Any]) -> Any:
    """Run a collective; on failure (a peer died, or the timeout passed) raise
    RankFailed naming the ranks that never reached this point."""
    store = _store()
    key = f"torchdiff/{ctx.phase}"
    if store is not None and ctx.group is None:
        try:
            store.set(f"{key}/{ctx.rank}", "1")
        except Exception:  # noqa: BLE001
            store = None
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - gloo/NCCL raise RuntimeError or DistBackendError
        missing = []
        if store is not None and ctx.group is None:
            for r in range(ctx.world):
                try:
                    if not store.check([f"{key}/{r}"]):
                        missing.append(r)
                except Exception:  # noqa: BLE001
                    break
        who = (f"rank {', '.join(map(str, missing))} of {ctx.world} did not reach the {what}"
               if missing else f"a rank of {ctx.world} failed during the {what}")
        first_line = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        ctx.failed = (2, f"{who} (it died, or took longer than the collective timeout; {first_line})")
        raise RankFailed(ctx.failed[1]) from None


def _round(ctx: Context, header: list[int], what: str) -> np.ndarray:
    """All-gather one fixed int64 header per rank. Slot 0 is a failure code: when any
    rank sends one, every rank takes the failure path (message to rank 0, RankFailed)."""
    import torch.distributed as dist

    ctx.phase += 1
    mine = torch.zeros(_HEADER, dtype=torch.int64, device=ctx.device)
    mine[: len(header)] = torch.tensor(header, dtype=torch.int64)
    out = [torch.empty_like(mine) for _ in range(ctx.world)]
    _collective(ctx, what, lambda: dist.all_gather(out, mine, group=ctx.group))
    return torch.stack(out).cpu().numpy()


def _fail_tail(ctx: Context, headers: np.ndarray, message: str) -> RankFailed:
    """Everyone: send this rank's message (empty when it did not fail) to rank 0."""
    failed = [r for r in range(ctx.world) if headers[r, 0] != 0]
    code = int(max(headers[r, 0] for r in failed))
    texts = _gather_arrays(ctx, [np.frombuffer(message.encode("utf-8"), dtype=np.uint8)], "error report",
                           everyone=True)
    line = ""
    if texts is not None:
        r = failed[0]
        text = bytes(texts[r][0]).decode("utf-8", "replace") or "failed"
        more = f" (ranks {', '.join(map(str, failed))} failed)" if len(failed) > 1 else ""
        line = f"rank {r} of {ctx.world}: {text}{more}"
    ctx.failed = (code, line)
    return RankFailed(line, code)


def _gather_arrays(ctx: Context, arrays: list[np.ndarray], what: str,
                   everyone: bool = False) -> list[list[np.ndarray]] | None:
    """Gather 1-D arrays (same dtypes on every rank) on rank 0 (on every rank with
    ``everyone``): sizes first (all_gather of int64), then one padded gather (or
    all_gather) per array. Returns [rank][array] where gathered, else None."""
    import torch.distributed as dist

    ctx.phase += 1
    sizes_t = torch.tensor([a.size for a in arrays], dtype=torch.int64, device=ctx.device)
    all_sizes = [torch.empty_like(sizes_t) for _ in range(ctx.world)]
    _collective(ctx, what, lambda: dist.all_gather(all_sizes, sizes_t, group=ctx.group))
    sizes = torch.stack(all_sizes).cpu().numpy()
    out: list[list[np.ndarray]] = [[] for _ in range(ctx.world)]
    for j, a in enumerate(arrays):
        width = max(1, int(sizes[:, j].max()))
        t = torch.zeros(width, dtype=_TORCH_DTYPES[a.dtype], device=ctx.device)
        if a.size:
            t[: a.size] = torch.from_numpy(np.array(a)).to(ctx.device)
        here = everyone or ctx.rank == 0
        bucket = [torch.empty_like(t) for _ in range(ctx.world)] if here else None
        ctx.phase += 1
        if everyone:
            _collective(ctx, what, lambda: dist.all_gather(bucket, t, group=ctx.group))
        else:
            _collective(ctx, what, lambda: dist.gather(t, bucket, dst=_global_rank(ctx, 0), group=ctx.group))
        if here:
            for r in range(ctx.world):
                out[r].append(bucket[r][: int(sizes[r, j])].cpu().numpy())
    return out if (everyone or ctx.rank == 0) else None


def _global_rank(ctx: Context, group_rank: int) -> int:
    if ctx.group is None:
        return group_rank
    import torch.distributed as dist

    return dist.get_global_rank(ctx.group, group_rank)


def check(ctx: Context, error: TorchDiffError | None, what: str) -> None:
    """A status round: raises RankFailed on every rank if any rank brings an error."""
    from torchdiff.render.text import printable

    code = 0 if error is None else int(getattr(error, "exit_code", 2) or 2)
    headers = _round(ctx, [code], what)
    if headers[:, 0].any():
        raise _fail_tail(ctx, headers, "" if error is None else printable(error))


# ---- the measured pairs, across ranks ------------------------------------------------

_SIDE_FIELDS = [f.name for f in dataclasses.fields(R.SideTotals)]
_PAIR_FIELDS = [f.name for f in dataclasses.fields(R.PairTotals)]


def _encode(part) -> list[np.ndarray]:
    es = sorted(part.exact_side)
    ep = sorted(part.exact_pair)
    sn = sorted(part.same_nonfinite)
    eq = sorted(part.equal)
    f64 = np.concatenate([
        part.side_rows.reshape(-1), part.side_lengths, part.pair_rows.reshape(-1),
        np.array([[getattr(part.exact_side[k], f) for f in _SIDE_FIELDS] for k in es], dtype=np.float64).reshape(-1),
        np.array([[getattr(part.exact_pair[k], f) for f in _PAIR_FIELDS] for k in ep], dtype=np.float64).reshape(-1),
    ]).astype(np.float64)
    i64 = np.concatenate([
        part.side_ids, part.pair_ids, es, ep, sn, [int(part.same_nonfinite[k]) for k in sn],
        eq, [int(part.equal[k]) for k in eq],
    ]).astype(np.int64)
    counts = np.array([len(part.side_ids), len(part.pair_ids), len(es), len(ep), len(sn), len(eq)], dtype=np.int64)
    extras = json.dumps({str(k): v for k, v in part.extras.items()}, separators=(",", ":"), allow_nan=True)
    return [counts, f64, i64, np.frombuffer(extras.encode("utf-8"), dtype=np.uint8)]


def _decode(arrays: list[np.ndarray]):
    from torchdiff.engine import Partials

    counts, f64, i64, raw = arrays
    n_side, n_pair, n_es, n_ep, n_sn, n_eq = (int(c) for c in counts)
    pos = 0

    def take(a, n):
        nonlocal pos
        out = a[pos : pos + n]
        pos += n
        return out

    side_rows = take(f64, n_side * R.SIDE_WIDTH).reshape(n_side, R.SIDE_WIDTH)
    side_lengths = take(f64, n_side)
    pair_rows = take(f64, n_pair * R.PAIR_WIDTH).reshape(n_pair, R.PAIR_WIDTH)
    es_vals = take(f64, n_es * len(_SIDE_FIELDS)).reshape(n_es, len(_SIDE_FIELDS))
    ep_vals = take(f64, n_ep * len(_PAIR_FIELDS)).reshape(n_ep, len(_PAIR_FIELDS))
    pos = 0
    side_ids, pair_ids = take(i64, n_side), take(i64, n_pair)
    es, ep = take(i64, n_es), take(i64, n_ep)
    sn, sn_v = take(i64, n_sn), take(i64, n_sn)
    eq, eq_v = take(i64, n_eq), take(i64, n_eq)
    extras = json.loads(bytes(raw).decode("utf-8")) if raw.size else {}
    return Partials(
        side_rows=side_rows, side_ids=side_ids, side_lengths=side_lengths, pair_rows=pair_rows, pair_ids=pair_ids,
        exact_side={int(k): _totals(R.SideTotals, v) for k, v in zip(es, es_vals)},
        exact_pair={int(k): _totals(R.PairTotals, v) for k, v in zip(ep, ep_vals)},
        same_nonfinite={int(k): bool(v) for k, v in zip(sn, sn_v)},
        equal={int(k): bool(v) for k, v in zip(eq, eq_v)},
        extras={int(k): v for k, v in extras.items()},
    )


def _totals(cls, values: np.ndarray):
    kwargs = {}
    for f, v in zip(dataclasses.fields(cls), values.tolist()):
        kwargs[f.name] = int(v) if f.type in ("int", int) else float(v)
    return cls(**kwargs)


def share(ctx: Context, work: Callable[[], Any], what: str) -> Any:
    """Run this rank's share of the work, then a status round: a failure on any rank
    (its one line) is every rank's RankFailed; otherwise ``work``'s result."""
    error = None
    out = None
    try:
        out = work()
    except TorchDiffError as e:
        error = e
    except MemoryError:
        error = TorchDiffError("out of memory")
    except Exception as e:  # noqa: BLE001 - one line on rank 0, not a hang of the others
        error = TorchDiffError(f"internal error: {type(e).__name__}: {e}")
    check(ctx, error, what)
    return out


def run(ctx: Context, engine, pairs, hooks=(), progress=None):
    """Measure ``pairs`` across the ranks of ``ctx``; the TensorDiffs of all pairs on
    rank 0, None on the others. Every rank must call it with the same pairs."""
    import time

    hooks = list(hooks)
    started = time.perf_counter()
    mine = [i for i, o in enumerate(owners(pairs, hooks, ctx.world)) if o == ctx.rank]
    measured = started

    def work():
        nonlocal measured
        payload = _encode(engine.measure(pairs, mine, hooks, progress))
        measured = time.perf_counter()
        return payload

    payload = share(ctx, work, "exchange of figures")
    gathered = _gather_arrays(ctx, payload, "gather of figures")
    exchanged = time.perf_counter()
    TIMINGS.update(pairs=len(pairs), owned=len(mine), measure=measured - started, exchange=exchanged - measured,
                   merge=0.0)
    if ctx.rank != 0:
        return None
    diffs = engine.merge(pairs, [_decode(g) for g in gathered])
    TIMINGS["merge"] = time.perf_counter() - exchanged
    return diffs


def combine(parts: list[tuple[Any, int, int]]):
    """One Partials from Partials of consecutive pair lists measured one after another
    (a series' batches): each entry is (part, pairs before its list, side slots before
    its list); ids are shifted to those of the concatenated list, rows kept in order."""
    from torchdiff.engine import Partials

    def cat(arrays, width=None, dtype=np.float64):
        if arrays:
            return np.concatenate(arrays)
        return np.zeros((0, width) if width else 0, dtype=dtype)

    out = Partials(
        side_rows=cat([p.side_rows for p, _, _ in parts], R.SIDE_WIDTH),
        side_ids=cat([p.side_ids + s for p, _, s in parts], dtype=np.int64),
        side_lengths=cat([p.side_lengths for p, _, _ in parts]),
        pair_rows=cat([p.pair_rows for p, _, _ in parts], R.PAIR_WIDTH),
        pair_ids=cat([p.pair_ids + n for p, n, _ in parts], dtype=np.int64),
        exact_side={}, exact_pair={}, same_nonfinite={}, equal={}, extras={},
    )
    for p, n, s in parts:
        out.exact_side.update({k + s: v for k, v in p.exact_side.items()})
        out.exact_pair.update({k + n: v for k, v in p.exact_pair.items()})
        out.same_nonfinite.update({k + n: v for k, v in p.same_nonfinite.items()})
        out.equal.update({k + n: v for k, v in p.equal.items()})
        out.extras.update({k + n: v for k, v in p.extras.items()})
    return out


def gather_parts(ctx: Context, parts: list, extra: np.ndarray, what: str) -> list[tuple[list, np.ndarray]] | None:
    """Gather on rank 0, in one exchange, each rank's Partials of several pair lists (a
    series' steps, the same number on every rank) and one float64 array of its own
    figures. Rank 0 gets, per rank in rank order, (its Partials per list, its array);
    the others None."""
    dtypes = (np.int64, np.float64, np.int64, np.uint8)
    encoded = [_encode(p) for p in parts]
    lengths = np.array([a.size for enc in encoded for a in enc], dtype=np.int64)
    arrays = [lengths] + [np.concatenate([enc[j] for enc in encoded]).astype(dt) if encoded else np.zeros(0, dt)
                          for j, dt in enumerate(dtypes)] + [np.asarray(extra, dtype=np.float64).reshape(-1)]
    gathered = _gather_arrays(ctx, arrays, what)
    if gathered is None:
        return None
    out = []
    for got in gathered:
        sizes = got[0].reshape(-1, len(dtypes))
        offsets = np.zeros(len(dtypes), dtype=np.int64)
        decoded = []
        for row in sizes:
            chunk = [got[1 + j][offsets[j]:offsets[j] + row[j]] for j in range(len(dtypes))]
            offsets += row
            decoded.append(_decode(chunk))
        out.append((decoded, got[-1]))
    return out


def exchange_json(ctx: Context, value: Any, what: str) -> list[Any]:
    """Every rank's JSON-able ``value``, on every rank, in rank order: UTF-8 JSON text in
    a uint8 tensor (all_gather), parsed with ``json.loads`` (which runs no code)."""
    text = json.dumps(value, separators=(",", ":"), allow_nan=True).encode("utf-8")
    got = _gather_arrays(ctx, [np.frombuffer(text, dtype=np.uint8)], what, everyone=True)
    return [json.loads(bytes(arrays[0]).decode("utf-8")) for arrays in got]


# ---- the command line ----------------------------------------------------------------


def _flag(argv: list[str], name: str, default: str) -> str:
    """A flag's value read leniently (before the real parse, which may fail)."""
    for i, token in enumerate(argv):
        for spelling in (f"--{name}", f"--{name.replace('-', '_')}"):
            if token == spelling and i + 1 < len(argv):
                return argv[i + 1]
            if token.startswith(spelling + "="):
                return token.split("=", 1)[1]
    return default


def cli_main(argv: list[str], run_local: Callable[[list[str]], tuple[int, str | None]]) -> int:
    """The CLI on one rank: join the group, run, agree on the exit code, leave."""
    import torch.distributed as dist

    me = int(os.environ.get("RANK", "0"))
    try:
        timeout = float(_flag(argv, "dist-timeout", str(DEFAULT_TIMEOUT)))
        if not timeout > 0:
            raise ValueError
    except ValueError:
        if me == 0:
            print("torchdiff: error: --dist-timeout must be a number of seconds > 0", file=sys.stderr)
        return 2
    try:
        ctx = init_from_env(_flag(argv, "device", "auto"), timeout)
    except Exception as e:  # noqa: BLE001
        print(f"torchdiff: error: rank {me}: cannot join the process group ({type(e).__name__}: "
              f"{str(e).strip().splitlines()[0][:300] if str(e).strip() else ''})", file=sys.stderr)
        return 2
    try:
        return run_command(ctx, argv, run_local)
    finally:
        try:
            # A last collective without tensors: gloo's worker thread releases a finished
            # collective's tensors after the caller's wait returns, and that release takes
            # the GIL. Had the process reached interpreter exit first, the thread could not
            # take it and the process aborted ("terminate called without an active
            # exception", after the output was complete). The barrier's round trip lets
            # the release happen while Python still runs.
            dist.barrier()
        except Exception:  # noqa: BLE001
            pass
        ctx.group = None  # the group's last reference: destroying it then joins gloo's threads
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


def run_command(ctx: Context, argv: list[str], run_local: Callable[[list[str]], tuple[int, str | None]]) -> int:
    """One command on every rank of ``ctx`` (already joined): rank 0 prints, every rank
    returns the same exit code."""
    global _ACTIVE
    import contextlib
    import io

    _ACTIVE = ctx
    ctx.failed = None
    try:
        with contextlib.ExitStack() as quiet:
            if ctx.rank != 0:  # one output: rank 0's (other ranks keep stderr only with --verbose)
                quiet.enter_context(contextlib.redirect_stdout(io.StringIO()))
                if "--verbose" not in argv:
                    quiet.enter_context(contextlib.redirect_stderr(io.StringIO()))
            code, line = run_local(argv)
        if ctx.failed is not None:  # the failure was agreed inside the run
            code, line = ctx.failed[0], (f"torchdiff: error: {ctx.failed[1]}" if ctx.rank == 0 else None)
        else:
            code, line = _final(ctx, code, line)
        if ctx.rank == 0 and line:
            print(line, file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        return code
    finally:
        _ACTIVE = None


def _final(ctx: Context, code: int, line: str | None) -> tuple[int, str | None]:
    """Agree on one exit code: a failure anywhere is every rank's exit 2 (the failing
    rank's line printed by rank 0); otherwise the largest code (rank 0's 0 or 1)."""
    failure = code if code >= 2 else 0
    try:
        headers = _round(ctx, [failure, code if failure == 0 else 0], "final agreement")
        if headers[:, 0].any():
            message = (line or "").removeprefix("torchdiff: error: ") if failure else ""
            err = _fail_tail(ctx, headers, message)
            return err.exit_code, f"torchdiff: error: {err}" if ctx.rank == 0 else None
    except RankFailed as e:
        return e.exit_code, f"torchdiff: error: {e}"
    return int(headers[:, 1].max()), None


# ---- inside a training job: DTensors (FSDP2 fully_shard, tensor parallel) ----------------


def local_part(t: torch.Tensor, ctx: Context) -> torch.Tensor | None:
    """The part of ``t`` this rank counts: a DTensor's local shard (``to_local()``, no
    communication) unless the shard is a replica of another rank's (a Replicate mesh
    dimension where this rank's coordinate is not 0); a plain tensor counts on rank 0
    of the group only. None when this rank counts nothing of it."""
    try:
        from torch.distributed.tensor import DTensor, Partial, Replicate
    except ImportError:  # torch without DTensor
        DTensor = None  # noqa: N806
    if DTensor is not None and isinstance(t, DTensor):
        coord = t.device_mesh.get_coordinate()
        if coord is None:  # this rank is not in the tensor's mesh
            return None
        for dim, placement in enumerate(t.placements):
            if isinstance(placement, Partial):
                from torchdiff.errors import UsageError

                raise UsageError("a DTensor with a Partial placement holds unreduced sums; reduce it "
                                 "(redistribute to Shard/Replicate) before comparing")
            if isinstance(placement, Replicate) and coord[dim] != 0:
                return None
        return t.to_local()
    return t if ctx.rank == 0 else None


def _side_values(s) -> list[float]:
    """A TensorStats as mergeable totals: count (finite), mean, M2, min, max, Σ|x|,
    zeros, NaN, Inf."""
    count = s.numel - s.nan_count - s.inf_count
    if count <= 0:
        return [0.0, 0.0, 0.0, math.inf, -math.inf, 0.0, 0.0, float(s.nan_count), float(s.inf_count)]
    return [float(count), s.mean, s.std * s.std * count, s.min, s.max, s.mean_abs * count,
            float(s.zero_count), float(s.nan_count), float(s.inf_count)]


_SIDE_W, _PAIR_W = 9, 10


def run_sharded(ctx: Context, engine, pairs, hooks=()):
    """TensorDiffs of ``pairs`` whose handles hold DTensors (or replicated plain
    tensors), on every rank of ``ctx``: each rank measures its local shards with the
    engine, the per-tensor totals (9 + 9 + 9 float64 a pair) are all-gathered, and each
    rank merges them in rank order (Chan's update for M2; sums, min/max, AND of the
    equality flags). Parameters are never gathered."""
    import torch.distributed as dist

    from torchdiff.errors import UsageError
    from torchdiff.figures import Figures
    from torchdiff.formats.base import tensor_handle
    from torchdiff.pairing import Pair
    from torchdiff.results import TensorDiff
    from torchdiff.status import ADDED, CHANGED, REMOVED, RESHAPED, RETYPED, UNCHANGED

    if list(hooks):
        raise UsageError("with process_group=, analyses that read values through engine hooks "
                         "(anomaly_detection, change_summary, quantization_analysis, similarity_matrix "
                         "cross-layer, gradient_analysis, architecture_comparison renames) are not available: "
                         "their figures need whole tensors (docs/DISTRIBUTED.md)")
    def measure_local():
        local_pairs = []
        for p in pairs:
            sides = []
            for h in (p.old, p.new):
                if h is None:
                    sides.append(None)
                    continue
                part = local_part(h.materialize(), ctx)
                if part is None:
                    part = torch.empty(0, dtype=h.dtype)
                sides.append(tensor_handle(p.name, part.detach().reshape(-1) if part.numel() else part.reshape(0)))
            if p.kind == "common" and sides[0].numel != sides[1].numel:
                raise UsageError(f"{p.name}: the two sides are sharded differently on rank {ctx.rank} "
                                 f"({sides[0].numel} vs {sides[1].numel} local elements); compare tensors with "
                                 "the same placements")
            local_pairs.append(Pair(p.name, *sides, role=p.role))
        return local_pairs, engine.run(local_pairs)

    error = None
    local_pairs = local = None
    try:
        local_pairs, local = measure_local()
    except TorchDiffError as e:  # every rank learns it (no rank left waiting in a collective)
        error = e
    n = len(pairs)
    count = torch.tensor([n], dtype=torch.int64, device=ctx.device)
    check(ctx, error, "measure of local shards")
    mine = np.zeros((n, 2 * _SIDE_W + _PAIR_W), dtype=np.float64)
    for i, (p, d) in enumerate(zip(pairs, local)):
        if d.old is not None:
            mine[i, :_SIDE_W] = _side_values(d.old)
        if d.new is not None:
            mine[i, _SIDE_W:2 * _SIDE_W] = _side_values(d.new)
        m = d.metrics
        if p.kind == "common" and m is not None:
            mine[i, 2 * _SIDE_W:] = [m.numel, m.l2 * m.l2, m.max_abs if m.numel else -math.inf,
                                     m.mean_abs_diff * m.numel, m.changed_count, m.norm_old * m.norm_old,
                                     m.norm_new * m.norm_new, float(m.equal or local_pairs[i].old.numel == 0),
                                     float(d.status == UNCHANGED), m.dot]
        elif p.kind == "common":
            mine[i, 2 * _SIDE_W + 7:2 * _SIDE_W + 9] = 1.0
    ctx.phase += 1
    counts = [torch.empty_like(count) for _ in range(ctx.world)]
    _collective(ctx, "exchange of tensor counts", lambda: dist.all_gather(counts, count, group=ctx.group))
    if len({int(c) for c in counts}) != 1:
        raise UsageError(f"the ranks hold different tensors ({[int(c) for c in counts]} tensors a rank)")
    t = torch.from_numpy(mine).to(ctx.device)
    out = [torch.empty_like(t) for _ in range(ctx.world)]
    ctx.phase += 1
    _collective(ctx, "exchange of figures", lambda: dist.all_gather(out, t, group=ctx.group))
    parts = np.stack([o.cpu().numpy() for o in out])  # [rank, pair, column]

    def side(cols) -> R.SideTotals:
        c, mean, m2, lo, hi, sabs, zero, nan, inf = (cols[:, k] for k in range(_SIDE_W))
        total = c.sum()
        nan_n, inf_n = int(nan.sum()), int(inf.sum())
        if total <= 0:
            return R.SideTotals(0, math.nan, 0.0, math.nan, math.nan, 0.0, 0, nan_n, inf_n)
        mu = min(max(float((c * mean).sum() / total), float(lo.min())), float(hi.max()))  # as the engine
        spread = 0.0
        for r in range(len(c)):  # rank order
            if c[r] > 0:
                spread += m2[r] + c[r] * (mean[r] - mu) ** 2
        return R.SideTotals(int(total), mu, float(spread), float(lo.min()), float(hi.max()), float(sabs.sum()),
                            int(zero.sum()), nan_n, inf_n)

    diffs = []
    for i, p in enumerate(pairs):
        old = _stats(p.old, side(parts[:, i, :_SIDE_W])) if p.old is not None else None
        new = _stats(p.new, side(parts[:, i, _SIDE_W:2 * _SIDE_W])) if p.new is not None else None
        if p.kind != "common":
            status = {"added": ADDED, "removed": REMOVED, "reshaped": RESHAPED}[p.kind]
            diffs.append(TensorDiff(p.name, status, old, new, None, role=p.role))
            continue
        q = parts[:, i, 2 * _SIDE_W:]
        cnt = int(q[:, 0].sum())
        dmax = float(q[:, 2].max())
        totals = R.PairTotals(count=cnt, dsq=float(q[:, 1].sum()), dmax=dmax if cnt else 0.0,
                              dsum_abs=float(q[:, 3].sum()), changed=int(q[:, 4].sum()),
                              sumsq_old=float(q[:, 5].sum()), sumsq_new=float(q[:, 6].sum()),
                              dot=float(q[:, 9].sum()))
        equal = bool(q[:, 7].all()) and not p.retyped
        unchanged = bool(q[:, 8].all())
        status = RETYPED if p.retyped else (UNCHANGED if unchanged else CHANGED)
        diffs.append(TensorDiff(p.name, status, old, new, _metrics(totals, equal), role=p.role))
    return Figures.from_diffs(diffs)


def to_local(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, tuple]]:
    """DTensors -> their local shards, plus what re-wraps them (mesh, placements, global
    shape and stride); plain tensors pass through."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return state, {}
    out, specs = {}, {}
    for k, v in state.items():
        if isinstance(v, DTensor):
            specs[k] = (v.device_mesh, v.placements, v.shape, v.stride())
            out[k] = v.to_local()
        else:
            out[k] = v
    return out, specs


def from_local(state: dict[str, torch.Tensor], specs: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`to_local`, without communication (``run_check=False``)."""
    if not specs:
        return state
    from torch.distributed.tensor import DTensor

    return {k: DTensor.from_local(v, specs[k][0], specs[k][1], run_check=False, shape=specs[k][2],
                                  stride=specs[k][3]) if k in specs else v for k, v in state.items()}


def _stats(h, t: R.SideTotals):
    """TensorStats of a handle (global shape) from merged totals (as the engine derives them)."""
    from torchdiff.results import TensorStats

    return TensorStats(
        shape=tuple(h.shape), dtype=h.storage_dtype, numel=h.numel, nbytes=h.nbytes,
        mean=t.mean, std=t.std, min=t.min, max=t.max, mean_abs=t.mean_abs, rms=t.rms,
        zero_count=t.zero_count, nan_count=t.nan_count, inf_count=t.inf_count,
    )


def _metrics(t: R.PairTotals, equal: bool):
    """PairMetrics from merged totals, with the engine's formulas (docs/METRICS.md)."""
    from torchdiff.results import PairMetrics

    from torchdiff.figures import by_norms

    l2, norm_old, norm_new = math.sqrt(max(t.dsq, 0.0)), math.sqrt(max(t.sumsq_old, 0.0)), math.sqrt(max(t.sumsq_new, 0.0))
    derived = (t.sumsq_old + t.sumsq_new - t.dsq) / 2
    # the engine's choice: the dot derived from the norms where that is better conditioned,
    # else the ranks' dots summed (each rank's its own engine's choice)
    dot = derived if math.isnan(t.dot) or by_norms(l2, norm_old, norm_new) else t.dot
    return PairMetrics(
        numel=t.count, equal=equal, l2=l2, norm_old=norm_old, norm_new=norm_new, dot=dot,
        max_abs=t.dmax if t.count else 0.0, mean_abs_diff=t.dsum_abs / t.count if t.count else 0.0,
        changed_count=t.changed,
    )
