"""The comparison pipeline shared by every entry point (api, series, the monitor):
options resolved and validated before any I/O, checkpoints opened, pairs measured by
the engine, analyses run, the Report built.

Layer: above analyses and report, below api, series, callbacks and cli
(docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Callable

from torchdiff import formats, mapping
from torchdiff.analyses import ANALYSES, FLAGS, analysis_names, options_defaults
from torchdiff.engine import Engine
from torchdiff.dequant import dequantize_pair, dequantized_result
from torchdiff.errors import CorruptFileError, InputNotFoundError, TorchDiffError, UsageError
from torchdiff.figures import Comparison, without_gc
from torchdiff.formats.base import Checkpoint
from torchdiff.names import check_scope
from torchdiff.pairing import (
    WRAPPER_SEGMENTS, Dropped, annotate, check_selected, compile_filters, drop_prefix, pair, pair_metadata,
)
from torchdiff.report import Report
from torchdiff.results import AnalysisResult, MetadataDiff, Table
from torchdiff.status import PRESENT

#: Options every comparison takes, with defaults (analysis options come from their modules).
CORE_OPTIONS: dict[str, Any] = {
    "epsilon": 0.0,
    "ignore_keys_regex": None,
    "path": None,
    "format": None,
    "recursive": False,
    "device": "auto",
    "unsafe_pickle": False,
    "scope": "params",
    "map": "auto",
    "map_heads": None,
    "histograms": 0,  # value histograms of the top-k changed tensors (torchdiff.histograms)
    "spectra": 0,  # singular values of Δ for the top-k changed matrices (torchdiff.spectra)
    "process_group": None,  # torch.distributed group: tensors are DTensors sharded over it (docs/DISTRIBUTED.md)
    "raw": False,  # compare stored values: no dequantization of int8/fp8 weights with scale companions
    "revision": None,  # a Hugging Face Hub id's branch, tag or commit (formats/hub.py)
}

#: The item naming the files of a -r comparison that could not be read.
UNREADABLE = "unreadable_files"


class Options(dict):
    """Resolved options: a dict that also reads as attributes (``options.sort_key``)."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


def make_options(analyses: tuple[str, ...] | list[str] = (), **kwargs: Any) -> Options:
    """Resolve and validate options before any I/O.

    ``analyses`` lists analysis names; analysis flags (``quantization_analysis=True``,
    ``show_layer_impact=True``, ``stats=True``) may be passed as keywords too.
    """
    extra = options_defaults()
    options = Options(CORE_OPTIONS)
    options.update({k: default for k, (default, _) in extra.items()})
    chosen: list[str] = []
    for name in analyses:
        if name in FLAGS:
            name = FLAGS[name]
        if name not in ANALYSES:
            raise UsageError(f"unknown analysis {name!r} (available: {', '.join(analysis_names)})")
        chosen.append(name)
    for key, value in kwargs.items():
        if key in FLAGS or key in ANALYSES:
            if value:
                chosen.append(FLAGS.get(key, key))
        elif key in options:
            options[key] = value
        else:
            raise UsageError(unknown_option(key, list(options) + list(FLAGS) + list(ANALYSES)))
    for name, module in ANALYSES.items():  # an option such as --fail-on-anomaly switches its analysis on
        if any(options.get(o) not in (None, False) for o in getattr(module, "ENABLED_BY", ())):
            chosen.append(name)
    options["analyses"] = tuple(n for n in analysis_names if n in chosen)
    try:
        options["epsilon"] = float(options["epsilon"])
    except (TypeError, ValueError):
        raise UsageError(f"--epsilon must be a number, got {options['epsilon']!r}") from None
    if options["epsilon"] < 0:
        raise UsageError("--epsilon must be ≥ 0")
    compile_filters(options["ignore_keys_regex"], options["path"])
    check_scope(options["scope"])
    options["map"] = mapping.resolve(options["map"])  # a rule file is read and checked here
    options["map_heads"] = mapping.parse_heads(options["map_heads"])
    from torchdiff.histograms import validate

    options["histograms"] = validate(options["histograms"], "histograms")
    options["spectra"] = validate(options["spectra"], "spectra")
    if options["format"] is not None and options["format"] not in formats.format_names:
        raise UsageError(f"unknown --format {options['format']!r} (choose from {', '.join(formats.format_names)})")
    for name in options["analyses"]:
        validate = getattr(ANALYSES[name], "validate", None)
        if validate is not None:
            validate(options)
    return options


def open_checkpoint(source: Any, options: Options) -> Checkpoint:
    """A Checkpoint from a path, a state_dict, an nn.Module, or a Checkpoint."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if options.get("recursive") and os.path.isdir(path):
            return load_directory(path, options)
        ckpt = _load(path, options)
        if not ckpt.tensors:
            ckpt.close()
            n = len(ckpt.metadata)
            what = f"{n} non-tensor value{'s' if n != 1 else ''}" if n else "nothing"
            raise CorruptFileError(f"{path}: no tensors found (the file holds {what}; "
                                   "a checkpoint to compare holds tensors)")
        return ckpt
    return formats.from_object(source)


def _load(path: str, options: Options) -> Checkpoint:
    if options.get("unsafe_pickle"):
        return formats.load(path, options.get("format"), unsafe_pickle=True)
    return formats.load(path, options.get("format"))


def load_directory(root: str, options: Options) -> Checkpoint:
    """Every checkpoint file under ``root`` as one Checkpoint; names ``relpath:tensor``.

    Every option reaches each file (``format``, ``unsafe_pickle``). A file that cannot be
    read does not stop the others: its error is kept in ``info["unreadable"]``
    (relpath -> message), reported as an item, and the CLI exits 2.
    """
    tensors, metadata, closers, files, unreadable = {}, {}, [], {}, {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for filename in sorted(filenames):
            ext = os.path.splitext(filename)[1].lower()
            if ext not in formats.extensions:
                continue
            full = os.path.join(dirpath, filename)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            try:
                ckpt = _load(full, options)
            except TorchDiffError as e:
                unreadable[rel] = str(e)
                continue
            closers.append(ckpt.close)
            files.update(ckpt.files)
            for name, handle in ckpt.tensors.items():
                tensors[f"{rel}:{name}"] = handle
            for key, value in ckpt.metadata.items():
                metadata[f"{rel}:{key}"] = value
    if not tensors and not metadata:
        for close in closers:
            close()
        if unreadable:
            raise CorruptFileError(next(iter(unreadable.values())))
        raise InputNotFoundError(f"{root}: no checkpoint files found (extensions read: {', '.join(formats.extensions)})")
    return Checkpoint(name=root, format="directory", tensors=tensors, metadata=metadata, _closers=closers,
                      files=files, info={"unreadable": unreadable} if unreadable else {})


def resolve(source: Any, options: Options) -> Any:
    """A Hugging Face Hub id (a string that is no existing path: ``gpt2``, ``org/name``)
    as its local snapshot folder; anything else unchanged (formats/hub.py)."""
    if isinstance(source, str) and not os.path.lexists(source):  # a broken link is a path, not an id
        from torchdiff.formats import hub

        return hub.resolve_source(source, options.get("revision"))
    return source


def resolved(ckpt: Checkpoint, source: Any, path: Any) -> Checkpoint:
    """``ckpt``, opened from ``path`` (``resolve(source)``). A Hub id's snapshot folder
    holds the files the Hub reader chose to fetch (formats/hub.py), plus whatever else the
    cache kept: the folder's other files are not the user's to be told about."""
    if path is not source:
        ckpt.info.pop("directory", None)
    return ckpt


def check_paths(old: Any, new: Any, options: Options) -> None:
    """Missing paths and file/directory mix-ups, before reading anything."""
    for side in (old, new):
        if isinstance(side, (str, os.PathLike)):
            formats.check_exists(side)
    if options.get("recursive"):
        kinds = [os.path.isdir(s) for s in (old, new) if isinstance(s, (str, os.PathLike))]
        if len(kinds) == 2 and kinds[0] != kinds[1]:
            raise InputNotFoundError("-r compares two directories, or two files; got a directory and a file")


@contextlib.contextmanager
def opened(old: Any, new: Any, options: Options):
    """Both checkpoints, opened after checking the paths, closed however the block ends."""
    given = old, new
    old, new = resolve(old, options), resolve(new, options)
    check_paths(old, new, options)
    old_ckpt = open_checkpoint(old, options)
    try:
        new_ckpt = open_checkpoint(new, options)
    except BaseException:
        old_ckpt.close()
        raise
    for source, path, ckpt in zip(given, (old, new), (old_ckpt, new_ckpt)):
        resolved(ckpt, source, path)
    try:
        yield old_ckpt, new_ckpt
    finally:
        old_ckpt.close()
        new_ckpt.close()


@without_gc
def compare_checkpoints(old: Checkpoint, new: Checkpoint, options: Options, engine: Engine,
                        progress=None, mode: str = "pair") -> Report:
    """The pipeline on two opened checkpoints: prepare, pair, measure, analyse.

    Each analysis gets its own ``state`` dict for this run (what its ``prepare`` found,
    read by its ``hooks`` and ``analyze``).

    Raises CorruptFileError if an input file changed while it was being read.
    """
    files = {**old.files, **new.files}
    unreadable = _unreadable(old, new)
    # int8/fp8 weights with scale companions, GPTQ/AWQ packed codes, compare as the values
    # they stand for; --raw compares the stored codes (a note says which are packed words)
    old, new = dequantize_pair(old, new, options, raw=bool(options.get("raw")))
    mapped = None
    dropped = Dropped()
    if mode == "pair":  # a container prefix or wrapper segment only one side has (docs/FORMATS.md)
        old, new, dropped = drop_prefix(old, new)
    if mode == "pair":  # cross-format pairing (docs/MAPPING.md): lazy handles under the old side's names
        old, new, mapped = mapping.apply_mapping(old, new, options.get("map", "auto"), heads=options.get("map_heads"))
    modules = [ANALYSES[name] for name in options.analyses]
    state: dict[str, dict] = {name: {} for name in options.analyses}
    for name, module in zip(options.analyses, modules):
        prepare = getattr(module, "prepare", None)
        if prepare is not None:
            old, new = prepare(old, new, options, state[name])
    keep = compile_filters(options.ignore_keys_regex, options.path)
    pairs = pair(old, new, keep)
    check_selected(pairs, old, new, options.ignore_keys_regex, options.path)
    hooks = [h for name, module in zip(options.analyses, modules)
             for h in (getattr(module, "hooks", None) or _no_hooks)(options, state[name]) or []]
    formats.check_unchanged(files)
    from torchdiff import distributed

    ctx = distributed.active()
    if options.get("process_group") is not None:  # inside training: each rank reduces its local shards
        figures = distributed.run_sharded(distributed.from_group(options.process_group), engine, pairs, hooks=hooks)
    elif ctx is not None:  # under torchrun: this rank measures its share; rank 0 gets every pair's figures
        figures = distributed.run(ctx, engine, pairs, hooks=hooks, progress=_checking(files, progress))
    else:
        figures = engine.run(pairs, hooks=hooks, progress=_checking(files, progress))
    if figures is not None:  # ties and dequantization marks (pairing.annotate)
        figures = annotate(pairs, figures)
    if figures is not None and (options.get("histograms") or options.get("spectra")):  # --report / --plots
        from torchdiff.histograms import add_pictures

        add_pictures(engine, pairs, figures, histograms=options.histograms, spectra=options.spectra,
                     inspect=mode == "inspect")
    formats.check_unchanged(files)  # every value is read: figures from a file that changed are not reported
    if figures is None:  # a torchrun rank other than 0
        return None
    if mode == "inspect":  # one checkpoint: every tensor is present, not "added"
        figures.status[:] = [PRESENT] * len(figures.status)
    metadata_diffs = tuple(MetadataDiff(k, s, a, b) for k, s, a, b in pair_metadata(old.metadata, new.metadata, keep))
    comparison = Comparison(
        old_name=old.name, new_name=new.name, old_format=old.format, new_format=new.format,
        figures=figures, metadata_diffs=metadata_diffs if mode == "pair" else (),
        old_metadata=dict(old.metadata), new_metadata=dict(new.metadata),
        device=str(engine.device), epsilon=options.epsilon, mode=mode, scope=options.scope,
        layer_pattern=options.get("layer_pattern"), stored_names=dropped.stored,
    )
    report = build_report(comparison, options, state)
    if mapped is not None:  # the mapping's own section comes first
        report = dataclasses.replace(report, analyses=(mapped.to_result(),) + report.analyses)
    extra = tuple(r for r in (_directory_result(old, new, mode), _records_result(old, new), _dtensor_result(old, new),
                              dequantized_result(options), unreadable) if r is not None)
    if dropped:
        extra = (pairing_result(old, new, dropped),) + extra
    if extra:  # what pairing dropped, what was dequantized, what could not be read: before the analyses
        report = dataclasses.replace(report, analyses=extra + report.analyses)
    return report

def pairing_result(old: Checkpoint, new: Checkpoint, dropped: Dropped) -> AnalysisResult:
    """What pairing dropped, as a section named ``pairing`` (a text section, a JSON item)."""
    headline: dict[str, str] = {}
    data: dict[str, object] = {}
    notes = []
    if dropped.single:
        headline.update(paired=f"{dropped.single[1]} -> {dropped.single[0]}")
        data.update(old_name=dropped.single[0], new_name=dropped.single[1])
        notes.append(f"one array a side (.npy, each named by its file): the new side's {dropped.single[1]!r} "
                     f"compared with the old side's {dropped.single[0]!r}, under that name")
    # each side that lost a prefix or wrapper segments: a note each; the headline names both
    # (``side=old, new``) when both did (a series step between two renamed checkpoints)
    prefixes = [(side, prefix, name) for side, prefix, name in (("old", dropped.old_prefix, old.name),
                                                               ("new", dropped.new_prefix, new.name)) if prefix]
    if prefixes:
        headline.update(dropped_prefix=", ".join(dict.fromkeys(p for _, p, _ in prefixes)),
                        side=", ".join(side for side, _, _ in prefixes))
        data.update(old_prefix=dropped.old_prefix, new_prefix=dropped.new_prefix)
        notes += [f"paired names with the prefix {prefix!r} dropped from the {side} side ({name})"
                  for side, prefix, name in prefixes]
    wrapped = [(side, ", ".join(f"{s}." for s in segments), segments, name)
               for side, segments, name in (("old", dropped.old_wrappers, old.name),
                                            ("new", dropped.new_wrappers, new.name)) if segments]
    if wrapped:
        headline.update(dropped_wrapper=", ".join(dict.fromkeys(shown for _, shown, _, _ in wrapped)),
                        wrapper_side=", ".join(side for side, _, _, _ in wrapped))
    for side, shown, segments, name in wrapped:
        data[f"{side}_wrappers"] = [f"{s}." for s in segments]
        made_by = " and ".join(WRAPPER_SEGMENTS[s] for s in segments)
        notes.append(f"paired names with {shown} dropped from the {side} side ({name}): the names "
                     f"{made_by} gives a model it wraps")
    return AnalysisResult(name="pairing", headline=headline, data=data, notes=tuple(notes))


def _records_result(old: Checkpoint, new: Checkpoint) -> AnalysisResult | None:
    """The classes a pickle named that torch does not allow, read as inert records
    (formats/torch_pickle.py), as a section named ``records``: said, never silent."""
    found = {side: ckpt.info.get("records") or [] for side, ckpt in (("old", old), ("new", new))}
    if not any(found.values()):
        return None
    notes = dict.fromkeys(  # one note per file (a file compared with itself: one)
        f"{ckpt.name}: objects of {len(found[side])} {'class' if len(found[side]) == 1 else 'classes'} torch's "
        f"weights-only loader does not allow ({', '.join(found[side])}) were read as data (their tensors and "
        "values are compared; no code from the file ran)" for side, ckpt in (("old", old), ("new", new)) if found[side])
    return AnalysisResult("records", {"classes": len(set(found["old"]) | set(found["new"]))}, found, notes=tuple(notes))


def directory_notes(checkpoints, verb: str = "compared", advice: bool = True) -> tuple[str, ...]:
    """One note per checkpoint directory read through one weights file (or index) while
    it holds other checkpoint files (a Trainer folder's optimizer.pt, rng_state.pth) or
    tensors its index does not list: what was read and what was not, and (``advice``) how
    to compare the rest. Shared by a pair, ``inspect`` (``verb`` "read"), a series and
    ``hash`` (``verb`` "hashed")."""
    notes = []
    for ckpt in checkpoints:
        d = ckpt.info.get("directory")
        if not d:
            continue
        hint = " (-r compares every file of two directories)" if advice else ""
        if advice and any(os.path.basename(f) == "optimizer.pt" for f in d["not_read"]):
            hint = (" (-r compares every file of two directories; the optimizer state --gradient-analysis reads is "
                    "in optimizer.pt: compare those two files)")
        notes.append(f"{d['path']}: {verb} {d['read']}; not read: {', '.join(d['not_read'])}{hint}")
    return tuple(dict.fromkeys(notes))


def _directory_result(old: Checkpoint, new: Checkpoint, mode: str = "pair") -> AnalysisResult | None:
    """:func:`directory_notes` of a pair (or of inspect's one checkpoint) as a section
    named ``directory``."""
    found = {side: ckpt.info.get("directory") for side, ckpt in (("old", old), ("new", new))}
    found = {side: d for side, d in found.items() if d}
    if not found:
        return None
    notes = directory_notes((old, new), "read" if mode == "inspect" else "compared")
    not_read = sorted({f for d in found.values() for f in d["not_read"]})
    return AnalysisResult("directory", {"not_read": len(not_read)}, found, notes=notes)


def _dtensor_result(old: Checkpoint, new: Checkpoint) -> AnalysisResult | None:
    """DTensors a PyTorch pickle held (one rank's ``torch.save`` under FSDP2 or tensor
    parallelism), compared as the shard the file holds, as a section named ``dtensors``."""
    found = {side: ckpt.info.get("dtensors") or {} for side, ckpt in (("old", old), ("new", new))}
    if not any(found.values()):
        return None
    notes = []
    for side, ckpt in (("old", old), ("new", new)):
        held = found[side]
        if not held:
            continue
        sharded = [n for n, d in held.items() if d["local_shape"] != d["global_shape"]]
        if sharded:
            first = held[sharded[0]]
            notes.append(f"{ckpt.name}: {_count(len(held), 'DTensor')}, {len(sharded)} of them a shard of a larger "
                         f"tensor (e.g. {sharded[0]}: {first['local_shape']} of "
                         f"{first['global_shape']}): compared as the shard this file holds; compare "
                         "a gathered state_dict or a DCP checkpoint for whole tensors")
        else:
            notes.append(f"{ckpt.name}: {_count(len(held), 'DTensor')}, each whole in this file: compared as their "
                         "values")
    notes = list(dict.fromkeys(notes))
    names = set(found["old"]) | set(found["new"])
    shards = {n for held in found.values() for n, d in held.items() if d["local_shape"] != d["global_shape"]}
    return AnalysisResult("dtensors", {"dtensors": len(names), "shards": len(shards)}, found, notes=tuple(notes))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _unreadable(old: Checkpoint, new: Checkpoint) -> AnalysisResult | None:
    """The files of a -r comparison that could not be read, as one item (the CLI exits 2)."""
    found = [(side, rel, message) for side, ckpt in (("old", old), ("new", new))
             for rel, message in ckpt.info.get("unreadable", {}).items()]
    if not found:
        return None
    return AnalysisResult(UNREADABLE, {"files": len(found)},
                          {"files": [{"side": s, "path": r, "error": m} for s, r, m in found]},
                          tables=(Table("Unreadable files", ("side", "file", "error"), tuple(found)),))


def _no_hooks(options, state) -> list:
    return []


def _checking(files: dict[str, tuple[int, ...]], progress: Callable[[int], None] | None):
    """``progress``, then a check that no input changed since it was opened: after every
    block, so that a file truncated underneath is noticed before the next block reads
    its mapping (which would kill the process with SIGBUS)."""
    if not files:
        return progress

    def step(done: int) -> None:
        if progress is not None:
            progress(done)
        formats.check_unchanged(files)

    return step


def build_report(comparison: Comparison, options: Options, state: dict[str, dict] | None = None) -> Report:
    results: list[AnalysisResult] = []
    order = None
    state = state if state is not None else {}
    for name in options.analyses:
        module = ANALYSES[name]
        ordering = getattr(module, "order", None)
        if ordering is not None:
            order = tuple(ordering(comparison, options))
        result = module.analyze(comparison, options, state.setdefault(name, {}))
        if result is not None:
            results.append(result)
    return Report(comparison, tuple(results), order=order, stats="stats" in options.analyses)


def unknown_option(key: str, known: list[str]) -> str:
    """The message for an unknown keyword, with the closest known name."""
    import difflib

    close = difflib.get_close_matches(key, sorted(set(known)), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown option {key!r}{hint}"
