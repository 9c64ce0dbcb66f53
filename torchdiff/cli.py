"""The command line: a Fire component behind an argv normaliser.

``main(argv) -> int`` normalises argv first (flags in any position, hyphen or
underscore spellings, boolean flags that never swallow a path, every path passed to
Fire as a string literal, unknown flags rejected with a suggestion), then lets Fire
dispatch to :class:`TorchDiffCLI`. Exit codes: 0 ran, 1 differences (with
--exit-code/--quiet/--brief) or a --fail-on-anomaly finding, 2 usage error or
unreadable input.
"""

from __future__ import annotations

import difflib
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

EXIT_OK, EXIT_DIFFERENT, EXIT_ERROR = 0, 1, 2

COMMANDS = ("compare", "inspect", "series", "hash", "verify")

# Core flags: name -> (default, help). Booleans take no value.
CORE_FLAGS: dict[str, tuple[Any, str]] = {
    "all": (False, "run every analysis"),
    "output": ("text", "text | json | yaml | markdown | github (hash: the manifest file, -o)"),
    "top": (0, "text: print at most N tensor lines and N rows of each table of tensors or layers (0: all)"),
    "epsilon": (0.0, "|Δ| ≤ E counts as unchanged"),
    "ignore_keys_regex": (None, "skip tensors (and metadata keys) whose name matches REGEX"),
    "path": (None, "only tensors whose name contains this substring"),
    "format": (None, "force the input format: safetensors | torch | numpy | matlab | gguf | sharded | dcp"),
    "recursive": (False, "compare two directories file by file (-r)"),
    "device": ("auto", "auto | cpu | cuda | cuda:N"),
    "map": ("auto", "pair tensors across formats: auto | none | a family | a YAML rule file (docs/MAPPING.md)"),
    "map_heads": (None, "HEADS,KV_HEADS for mapping rules the metadata does not give them to"),
    "quiet": (False, "print nothing; exit 1 when the checkpoints differ (-q)"),
    "brief": (False, "print one line saying whether they differ; exit 1 when they do"),
    "exit_code": (False, "exit 1 when the checkpoints differ"),
    "no_color": (False, "no colour even on a terminal (also NO_COLOR=1)"),
    "verbose": (False, "device, threads and timing on stderr; tracebacks on errors"),
    "version": (False, "print the version and exit"),
    "dist_timeout": (300.0, "under torchrun: seconds a rank waits for the others at an exchange"),
    "unsafe_pickle": (False, "load pickles with weights_only=False: RUNS CODE from the file; only for files you trust"),
    "raw": (False, "compare stored values: int8/fp8 weights with scale companions are not dequantized"),
    "revision": (None, "branch, tag or commit of a Hugging Face Hub id given as OLD/NEW (gpt2, org/name)"),
    "scope": ("params", "what global, layer and summary figures cover: params | model | all"),
    "common_only": (False, "series: compare only the tensors every checkpoint holds (else refused)"),
    "policy": (None, "check the rules of a YAML policy file (compare, series); exit 1 when one fails"),
    "cast": (None, "hash: also record each float tensor's fingerprint cast to DTYPE[,DTYPE] (for --allow-cast)"),
    "allow_cast": (False, "verify: accept a float dtype cast whose values equal the expected ones after the cast"),
    "tolerance": (None, "verify: accept tensors within rel_l2=X (bound and estimate from the manifest figures)"),
    "shards": (False, "verify: reassemble tensor-parallel pieces (rank-suffixed names or one file per rank)"),
    "report": (None, "also write a self-contained HTML report to FILE (docs/REPORT.md)"),
    "plots": (None, "also write each chart as PNG and SVG into DIR (needs matplotlib)"),
    "spectra": (0, "with --report/--plots: singular values of Δ for the top K changed matrices"),
    "help": (False, "this help (-h)"),
}
# Flags only some commands take (the others refuse them).
COMMAND_FLAGS = {"policy": ("compare", "series"), "cast": ("hash",), "allow_cast": ("verify",),
                 "tolerance": ("verify",), "shards": ("verify",)}
SHORT = {"-r": "recursive", "-q": "quiet", "-h": "help", "-o": "output"}


def _flag_table() -> dict[str, tuple[Any, str]]:
    from torchdiff.analyses import ANALYSES, options_defaults

    table = dict(CORE_FLAGS)
    for module in ANALYSES.values():
        doc = (module.__doc__ or "").strip().splitlines()[0]
        table[module.FLAG] = (False, doc.split(":", 1)[-1].strip())
    table.update(options_defaults())
    return table


@dataclass
class Parsed:
    command: str
    positionals: list[str]
    flags: dict[str, Any]
    argv: list[str] | None = None
    policy: Any = None  # the loaded --policy (torchdiff.policy.Policy)


def _usage(message: str):
    """A UsageError (imported here: the CLI module stays cheap to import)."""
    from torchdiff.errors import UsageError

    return UsageError(message)


def _coerce(name: str, raw: str, default: Any) -> Any:
    if isinstance(default, bool):
        low = raw.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise _usage(f"--{name.replace('_', '-')} takes no value (got {raw!r})")
    if isinstance(default, float):
        try:
            return float(raw)
        except ValueError:
            raise _usage(f"--{name.replace('_', '-')} must be a number, got {raw!r}") from None
    if isinstance(default, int):
        try:
            return int(raw)
        except ValueError:
            raise _usage(f"--{name.replace('_', '-')} must be a whole number, got {raw!r}") from None
    return raw


def parse_argv(argv: list[str]) -> Parsed:
    """Split argv into a command, positional paths and typed flags (no Fire yet)."""
    table = _flag_table()
    positionals: list[str] = []
    flags: dict[str, Any] = {}
    i = 0
    only_paths = False
    while i < len(argv):
        token = argv[i]
        i += 1
        if only_paths or not token.startswith("-") or token == "-":
            positionals.append(token)
            continue
        if token == "--":
            only_paths = True
            continue
        if token in SHORT:
            name, value = SHORT[token], None
        elif token.startswith("--"):
            name, _, value = token[2:].partition("=")
            name = name.replace("-", "_")
            value = value if "=" in token else None
        else:
            raise _usage(f"unknown flag {token}" + _suggest(token.lstrip("-"), table))
        if name not in table:
            raise _usage(f"unknown flag --{name.replace('_', '-')}" + _suggest(name, table))
        default = table[name][0]
        if isinstance(default, bool):
            flags[name] = True if value is None else _coerce(name, value, default)
        else:
            if value is None:
                if i >= len(argv):
                    raise _usage(f"--{name.replace('_', '-')} needs a value")
                value = argv[i]
                i += 1
            flags[name] = _coerce(name, value, default)
    command = "compare"
    if positionals and positionals[0] in COMMANDS[1:]:
        command = positionals.pop(0)
    elif positionals[:1] == ["compare"] and not os.path.lexists("compare"):  # the default command, named
        positionals.pop(0)
    return Parsed(command, positionals, flags, list(argv))


def _suggest(name: str, table: dict) -> str:
    name = name.replace("-", "_")
    prefixed = sorted(f for f in table if f.startswith(name)) if len(name) >= 3 else []
    close = prefixed[:1] or difflib.get_close_matches(name, list(table), n=1, cutoff=0.6)
    return f" (did you mean --{close[0].replace('_', '-')}?)" if close else " (see torchdiff --help)"


@dataclass
class Outcome:
    """What a command produced: the text to print and the exit code."""

    text: str | None
    exit_code: int = EXIT_OK

    def __str__(self) -> str:
        return self.text or ""


class TorchDiffCLI:
    """torchdiff: compare PyTorch checkpoints and analyse the change."""

    def __init__(self, policy: Any = None, argv: list[str] | None = None) -> None:
        self.outcome: Outcome | None = None
        self.policy = policy  # a loaded torchdiff.policy.Policy (--policy)
        self.argv = argv

    def compare(self, old, new, **flags):
        """Compare two checkpoints (files, sharded indexes, or directories with -r)."""
        from torchdiff import api

        options = _api_options(flags, policy=self.policy)
        from torchdiff import distributed

        if ((flags.get("quiet") or flags.get("brief")) and not _wants_analysis(options) and self.policy is None
                and not options.get("histograms") and distributed.active() is None):
            differs = api.differs(str(old), str(new), **options)
            text = f"Checkpoints {old} and {new} differ" if differs and flags.get("brief") else None
            self.outcome = Outcome(text, EXIT_DIFFERENT if differs else EXIT_OK)
            return self.outcome if text else None
        _check_top(flags)
        _warn_inapplicable(flags, "a two-checkpoint compare")
        report = api.compare(str(old), str(new), progress=_progress(flags), **options)
        if report is None:  # a torchrun rank other than 0: it measured its share, rank 0 reports
            self.outcome = Outcome(None)
            return None
        return self._finish(report, flags)

    def inspect(self, file, **flags):
        """One checkpoint: every tensor's statistics, plus memory/anomaly/architecture analyses."""
        from torchdiff import api

        _check_top(flags)
        _warn_inapplicable(flags, "inspect")
        report = api.inspect(str(file), **_api_options(flags))
        if report is None:
            self.outcome = Outcome(None)
            return None
        return self._finish(report, flags, inspect=True)

    def series(self, *checkpoints, **flags):
        """Ordered checkpoints C1 C2 C3 ...: convergence and similarity over the run."""
        from torchdiff import series

        _check_top(flags)
        report = series.compare_series([str(c) for c in checkpoints],
                                       **_api_options(flags, series=True, policy=self.policy))
        if report is None:  # a torchrun rank other than 0: it measured its share, rank 0 reports
            self.outcome = Outcome(None)
            return None
        return self._finish(report, flags)

    def hash(self, checkpoint, **flags):
        """Write a manifest: per-tensor fingerprint and figures (docs/MANIFEST.md)."""
        from torchdiff.manifest import fingerprint

        casts = [c.strip() for c in str(flags["cast"]).split(",") if c.strip()] if flags.get("cast") else []
        _warn_unused(flags, "hash", HASH_FLAGS)
        manifest = fingerprint(str(checkpoint), casts=casts, format=flags.get("format"), path=flags.get("path"),
                               ignore_keys_regex=flags.get("ignore_keys_regex"),
                               unsafe_pickle=bool(flags.get("unsafe_pickle")))
        from torchdiff import distributed
        from torchdiff.manifest import widening

        if distributed.rank() == 0:  # never silent: what the folder holds beside the hashed weights
            for note in manifest.notes:
                print(f"torchdiff: note: {note}", file=sys.stderr)
        for cast, dtypes, n in widening(manifest, casts):  # never silent: a cast that would widen is not recorded
            if distributed.rank() == 0:
                print(f"torchdiff: warning: --cast {cast} not recorded for {n} tensor(s) stored narrower "
                      f"({', '.join(dtypes)}): casts narrow, never widen; hash the {cast} checkpoint with "
                      f"--cast {dtypes[0]} instead", file=sys.stderr)
        target = flags.get("output")
        if target in (None, "text", "json", "-"):
            self.outcome = Outcome(manifest.to_json())
            return self.outcome
        if distributed.rank() == 0:  # under torchrun every rank holds the manifest; rank 0 writes it
            manifest.save(str(target))
        self.outcome = Outcome(None)
        return None

    def verify(self, manifest, *others, **flags):
        """Check a checkpoint (or a second manifest) against a manifest, tensor by tensor."""
        from torchdiff.manifest import verify

        other = [str(o) for o in others] if flags.get("shards") and len(others) > 1 else str(others[0])
        _warn_unused(flags, "verify", VERIFY_FLAGS)
        result = verify(str(manifest), other, allow_cast=bool(flags.get("allow_cast")),
                        tolerance=flags.get("tolerance"), shards=bool(flags.get("shards")),
                        format=flags.get("format"), path=flags.get("path"),
                        ignore_keys_regex=flags.get("ignore_keys_regex"),
                        unsafe_pickle=bool(flags.get("unsafe_pickle")))
        if flags.get("quiet"):
            text = None
        elif flags.get("brief"):  # one line when something differs, as compare's --brief
            text = None if result.ok else f"{manifest} and {' + '.join(map(str, others))} differ"
        else:
            text = result.render(flags.get("output", "text"))
        self.outcome = Outcome(text, result.exit_code)
        return self.outcome if text else None

    def _finish(self, report, flags, inspect: bool = False):
        from torchdiff.render import render
        from torchdiff.render.text import use_color

        if self.policy is not None:
            report = self.policy.apply(report)
        if flags.get("report") or flags.get("plots"):
            _write_pictures(report, flags, self.argv)
        differs = report.has_differences if not inspect else False
        code = EXIT_DIFFERENT if differs and (flags.get("exit_code") or flags.get("quiet") or flags.get("brief")) else EXIT_OK
        if any(a.failed for a in report.analyses):
            code = EXIT_DIFFERENT
        unreadable = report.analysis(api_unreadable()) if hasattr(report, "analysis") else None
        if unreadable is not None:  # -r: the rest was compared, but an input could not be read
            for item in unreadable.data["files"]:
                print(f"torchdiff: error: {item['error']}", file=sys.stderr)
            code = EXIT_ERROR
        if flags.get("quiet"):
            text = None
        elif flags.get("brief"):
            comp = getattr(report, "comparison", None)
            names = f" {comp.old_name} and {comp.new_name}" if comp is not None else ""
            text = f"Checkpoints{names} differ" if differs else None
        else:
            fmt = flags.get("output", "text")
            color = fmt == "text" and use_color(flags.get("no_color", False))
            text = render(report, fmt, color=color, top=flags.get("top") or None)
        self.outcome = Outcome(text, code)
        return self.outcome if text else None


#: Options that only a series uses; given to compare or inspect they would do nothing.
SERIES_ONLY = ("sort", "plateau_threshold", "plateau_steps")
#: Flags about a pair of checkpoints; given to inspect (one checkpoint) they would do nothing.
PAIR_ONLY = ("stats", "epsilon", "map", "map_heads", "brief", "exit_code")


def _warn_inapplicable(flags: dict[str, Any], what: str) -> None:
    """One stderr line per flag that has no effect on ``what`` (never silent)."""
    for name in SERIES_ONLY:
        if name in flags:
            print(f"torchdiff: warning: --{name.replace('_', '-')} applies to a series "
                  f"(torchdiff series C1 C2 C3 ...) and does nothing on {what}", file=sys.stderr)
    for name in PAIR_ONLY if what == "inspect" else ():
        if name in flags:
            print(f"torchdiff: warning: --{name.replace('_', '-')} applies to two checkpoints "
                  f"(torchdiff OLD NEW) and does nothing on {what}", file=sys.stderr)


#: The flags hash and verify use; any other (an analysis, --stats, --scope...) does nothing there.
#: (--no-color is accepted: neither prints color.)
_FINGERPRINT_FLAGS = {"output", "format", "path", "ignore_keys_regex", "verbose", "help", "version",
                      "dist_timeout", "no_color", "unsafe_pickle"}
HASH_FLAGS = _FINGERPRINT_FLAGS | {"cast"}
VERIFY_FLAGS = _FINGERPRINT_FLAGS | {"allow_cast", "tolerance", "shards", "quiet", "exit_code", "brief"}


def _warn_unused(flags: dict[str, Any], command: str, used: set[str]) -> None:
    """One stderr line per flag given to ``command`` that it does not use (never silent)."""
    for name in flags:
        if name not in used:
            print(f"torchdiff: warning: --{name.replace('_', '-')} does nothing on {command}", file=sys.stderr)


def _check_top(flags: dict[str, Any]) -> None:
    if flags.get("top", 0) < 0:
        raise _usage(f"--top must be a whole number ≥ 0 (0 prints every tensor line), got {flags['top']}")


def api_unreadable() -> str:
    from torchdiff.pipeline import UNREADABLE

    return UNREADABLE


def _api_options(flags: dict[str, Any], series: bool = False, policy: Any = None) -> dict[str, Any]:
    from torchdiff.analyses import ANALYSES

    from torchdiff import distributed

    cli_only = {"all", "output", "quiet", "brief", "exit_code", "no_color", "verbose", "version", "help",
                "policy", "cast", "allow_cast", "tolerance", "shards", "report", "plots", "dist_timeout",
                "top"}
    options = {k: v for k, v in flags.items() if k not in cli_only}
    if distributed.active() is not None:  # each rank on its own GPU (cuda:LOCAL_RANK)
        options["device"] = distributed.engine_device(options.get("device", "auto"))
    if not series and options.pop("common_only", False):
        print("torchdiff: warning: --common-only applies to torchdiff series; ignored", file=sys.stderr)
    if (flags.get("report") or flags.get("plots")) and not series:  # a series report draws no histograms
        from torchdiff.histograms import TOP_K

        options["histograms"] = TOP_K
    if flags.get("all"):
        for module in ANALYSES.values():
            if not (series and getattr(module, "PAIR_ONLY", False)):
                options[module.FLAG] = True
    if policy is not None:  # analyses the policy's rules read (no_anomaly, min_sqnr_db, converging)
        for name in policy.analyses:
            if not (series and getattr(ANALYSES[name], "PAIR_ONLY", False)):
                options[ANALYSES[name].FLAG] = True
    return options


def _write_pictures(report, flags: dict[str, Any], argv: list[str] | None) -> None:
    """--report FILE and --plots DIR (torchdiff.render.html, torchdiff.render.plots)."""
    import shlex

    command = "torchdiff " + shlex.join(argv) if argv is not None else None
    if flags.get("report"):
        from torchdiff.render.html import write_html

        write_html(report, str(flags["report"]), command=command)
        if not flags.get("quiet"):
            print(f"torchdiff: report written to {flags['report']}", file=sys.stderr)
    if flags.get("plots"):
        from torchdiff.render.plots import write_plots

        written = write_plots(report, str(flags["plots"]))
        if not flags.get("quiet"):
            print(f"torchdiff: {len(written)} plots written to {flags['plots']}", file=sys.stderr)


def _check_outputs(parsed: Parsed) -> None:
    """--report/--plots/--spectra checked before any input is read: never a write to an input."""
    report, plots = parsed.flags.get("report"), parsed.flags.get("plots")
    if parsed.flags.get("spectra") and not (report or plots):
        raise _usage("--spectra K draws into --report FILE or --plots DIR; give one of them")
    if parsed.flags.get("spectra", 0) < 0:
        raise _usage("--spectra must be a whole number ≥ 0")
    for flag, target in (("report", report), ("plots", plots)):
        if target is None:
            continue
        target = os.path.abspath(str(target))
        parent = os.path.dirname(target)
        if not os.path.isdir(parent):
            raise _usage(f"--{flag} {target}: folder {parent} does not exist")
        if flag == "report" and os.path.isdir(target):
            raise _usage(f"--report {target}: is a folder (give a file name such as report.html)")
        if flag == "plots" and os.path.exists(target) and not os.path.isdir(target):
            raise _usage(f"--plots {target}: is a file (give a folder)")
        for p in parsed.positionals:
            inp = os.path.abspath(p)
            if inp == target or (os.path.exists(inp) and os.path.exists(target) and os.path.samefile(inp, target)):
                raise _usage(f"--{flag} {target} is an input; torchdiff never writes to its inputs")


def _wants_analysis(options: dict[str, Any]) -> bool:
    from torchdiff.analyses import ANALYSES, FLAGS

    enabling = [o for m in ANALYSES.values() for o in getattr(m, "ENABLED_BY", ())]  # e.g. --fail-on-anomaly
    return (any(options.get(flag) for flag in FLAGS if flag != "stats")
            or any(options.get(o) not in (None, False) for o in enabling))


def _progress(flags: dict[str, Any]):
    """A tqdm bar on stderr, only for text output on a terminal."""
    from torchdiff import distributed

    if flags.get("output", "text") != "text" or flags.get("quiet") or not sys.stderr.isatty() or distributed.rank():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    bar = tqdm(unit="el", unit_scale=True, file=sys.stderr, leave=False, mininterval=0.5, delay=1.0)
    return bar.update


_PLACEHOLDERS = {"fail_on_anomaly": "SEVERITY", "output": "FORMAT", "epsilon": "E", "path": "SUBSTRING",
                 "map": "auto|none|FILE", "map_heads": "Q,KV", "policy": "FILE", "cast": "DTYPE",
                 "tolerance": "rel_l2=X", "report": "FILE", "plots": "DIR", "spectra": "K", "top": "N"}


#: ``torchdiff COMMAND --help`` (README.md "Usage", docs/SERIES.md, docs/MANIFEST.md): the
#: usage lines, what the command does, its arguments, the flags it uses (names of the one
#: flag table; (name, text) or (name, text, placeholder) where the table's words are about
#: a pair of checkpoints), examples and its exit codes. A flag given that the command does
#: not use is warned about or refused (_warn_inapplicable, _warn_unused, COMMAND_FLAGS).
COMMAND_HELP: dict[str, dict[str, Any]] = {
    "inspect": {
        "usage": ["torchdiff inspect FILE [flags]"],
        "about": "One checkpoint: a table of every tensor (shape, dtype, parameters, mean, std, min, max, NaN and "
                 "Inf counts), then totals (trainable parameters apart from buffers, optimizer and training "
                 "state). Nothing is compared: exit 0 unless --fail-on-anomaly trips.",
        "arguments": [("FILE", "a checkpoint file, a sharded Hugging Face checkpoint (index.json or a folder), "
                               "or a Hugging Face Hub id (gpt2, org/name; a path that exists wins)")],
        "analyses": ["anomaly_detection", "architecture_comparison", "gradient_analysis", "memory_analysis",
                     "quantization_analysis",
                     ("all", "every analysis (those that need two checkpoints say so in a note)")],
        "flags": ["fail_on_anomaly", ("output", "text | json | yaml | markdown | github"), "top", "path",
                  "ignore_keys_regex", "format", "scope", "device",
                  ("raw", "the stored values: int8/fp8 weights with scale companions are not dequantized"),
                  ("revision", "branch, tag or commit of a Hugging Face Hub id given as FILE"), "unsafe_pickle",
                  "report", "plots", "no_color", "verbose", "dist_timeout"],
        "examples": ["torchdiff inspect model.safetensors --memory-analysis",
                     "torchdiff inspect step_000.safetensors --anomaly-detection --fail-on-anomaly high",
                     "torchdiff inspect train_step_200.pt --gradient-analysis -o json",
                     "torchdiff inspect model.safetensors --anomaly-detection --report r.html"],
        "exit": "0 ran; 1 a finding at or above --fail-on-anomaly's severity; 2 bad usage or unreadable input "
                "(missing, corrupt or truncated file, unknown format, a pickle that needs code).",
    },
    "series": {
        "usage": ["torchdiff series C1 C2 C3 ... [flags]"],
        "about": "Ordered checkpoints, each file read once: the series analyses over the whole run, and every "
                 "other analysis flag on each consecutive pair (as torchdiff C_t C_t+1). With no analysis "
                 "flag: convergence and similarity. Details: docs/SERIES.md.",
        "arguments": [("C1 C2 C3 ...", "two or more checkpoints in training order (files, sharded checkpoints, "
                                       "folders or Hub ids)")],
        "analyses": ["convergence_analysis", "gradient_analysis", "similarity_matrix",
                     ("all", "every analysis: the series ones, and the pair ones on each step")],
        "flags": ["sort", ("base", "a base checkpoint for task vectors τ_i = θ_i − θ_base (switches on "
                                   "--similarity-matrix)"),
                  ("lr", "learning rate for ĝ = −Δθ/lr when the checkpoints record none (switches on "
                         "--gradient-analysis)"),
                  "plateau_threshold", "plateau_steps", "common_only", "policy", "fail_on_anomaly",
                  ("output", "text | json | yaml | markdown | github"),
                  ("quiet", "print nothing; exit 1 when some step differs"),
                  ("brief", "print one line when some step differs; exit 1 then"),
                  ("exit_code", "exit 1 when some step differs"), "report", "plots", "path", "ignore_keys_regex",
                  "epsilon", "scope", "format", "device", "raw", "unsafe_pickle", "no_color", "verbose",
                  "dist_timeout"],
        "examples": ["torchdiff series step_000.safetensors step_050.safetensors step_100.safetensors "
                     "--convergence-analysis",
                     "torchdiff series epoch_2.pt epoch_10.pt epoch_1.pt --sort natural -o json",
                     "torchdiff series c1.pt c2.pt c3.pt --similarity-matrix --base c0.pt --report series.html",
                     "torchdiff series c1.pt c2.pt c3.pt --common-only"],
        "exit": "0 ran; 1 some step differs with --exit-code, --quiet or --brief, a failed --policy rule, or a "
                "finding at --fail-on-anomaly's severity; 2 bad usage or unreadable input (also a checkpoint "
                "lacking a tensor in --scope that the others hold, without --common-only).",
    },
    "hash": {
        "usage": ["torchdiff hash CKPT [-o MANIFEST] [--cast DTYPE[,DTYPE]]"],
        "about": "Write a manifest of per-tensor fingerprints (name, dtype, shape, bytes, the xxh3-128 hash of "
                 "its bytes, norm, sum, min, max, a fixed sample of values) that travel instead of the file; "
                 "torchdiff verify checks a checkpoint against it. Details: docs/MANIFEST.md.",
        "arguments": [("CKPT", "a checkpoint in any format torchdiff reads (file, sharded checkpoint, folder)")],
        "analyses": [],
        "flags": [("output", "write the manifest to the file MANIFEST (default: print it as JSON)", "MANIFEST"),
                  ("cast", "also record each float tensor's hash cast to DTYPE (for verify --allow-cast)",
                   "DTYPE[,DTYPE]"),
                  "path", "ignore_keys_regex", "format", "unsafe_pickle", "verbose", "dist_timeout"],
        "examples": ["torchdiff hash model.safetensors -o model.manifest.json",
                     "torchdiff hash step_200.safetensors --cast bfloat16 -o step_200.manifest.json",
                     "torchdiff hash train.pt --ignore-keys-regex '^optimizer\\.' -o model.manifest.json"],
        "exit": "0 written; 2 bad usage or unreadable input.",
    },
    "verify": {
        "usage": ["torchdiff verify MANIFEST CKPT|MANIFEST [flags]",
                  "torchdiff verify MANIFEST RANK0 RANK1 ... --shards"],
        "about": "Check a checkpoint (or a second manifest) against a manifest written by torchdiff hash, tensor "
                 "by tensor: one line per tensor that is missing, extra, reshaped, retyped or holds other "
                 "bytes, with a lower bound and an estimate of its rel_l2. Details: docs/MANIFEST.md.",
        "arguments": [("MANIFEST", "the expected tensors (torchdiff hash -o MANIFEST)"),
                      ("CKPT|MANIFEST", "the checkpoint to check, or another manifest"),
                      ("RANK0 RANK1 ...", "with --shards: the tensor-parallel pieces, one file per rank")],
        "analyses": [],
        "flags": ["allow_cast", "tolerance", "shards", ("output", "text | json | yaml"),
                  ("quiet", "print nothing; the exit code says whether every tensor matched"),
                  ("brief", "print one line when a tensor differs (the exit code is 1 then)"), "path",
                  "ignore_keys_regex", "format", "unsafe_pickle", "verbose", "dist_timeout"],
        "examples": ["torchdiff verify model.manifest.json model.safetensors",
                     "torchdiff verify step_200.manifest.json step_200_bf16.safetensors --allow-cast",
                     "torchdiff verify m.json b.safetensors --tolerance rel_l2=1e-3",
                     "torchdiff verify m.json r0.safetensors r1.safetensors --shards"],
        "exit": "0 every tensor equal or accepted; 1 a tensor missing, extra, reshaped, retyped or with other "
                "bytes; 2 bad usage or an unreadable manifest or checkpoint.",
    },
}


def _flag_label(name: str, default: Any, placeholder: str | None = None) -> str:
    """``--map-heads Q,KV``, ``-o, --output FORMAT``: a flag as the help lists it."""
    placeholder = placeholder or _PLACEHOLDERS.get(name, name.upper().split("_")[-1])
    value = "" if isinstance(default, bool) else " " + placeholder
    flag = f"--{name.replace('_', '-')}{value}"
    short = {n: f for f, n in SHORT.items()}
    return f"{short[name]}, {flag}" if name in short else flag


def _help_entry(left: str, text: str, width: int, column: int = 34) -> list[str]:
    import textwrap

    left = f"  {left}"
    wrapped = textwrap.wrap(text, max(width - column, 30)) or [""]
    if len(left) >= column:
        return [left] + [" " * column + w for w in wrapped]
    return [left.ljust(column) + wrapped[0]] + [" " * column + w for w in wrapped[1:]]


def command_help(command: str, width: int | None = None) -> str:
    """``torchdiff COMMAND --help``: that command's usage, arguments, flags (one line of
    text each, from the one flag table), examples and exit codes (``COMMAND_HELP``)."""
    import shutil
    import textwrap

    width = width or min(shutil.get_terminal_size((100, 24)).columns, 100)
    table = _flag_table()
    spec = COMMAND_HELP[command]
    usage = spec["usage"]
    lines = [f"usage: {usage[0]}"] + [f"       {u}" for u in usage[1:]] + [""]
    lines += textwrap.wrap(spec["about"], width) + ["", "Arguments:"]
    for name, text in spec["arguments"]:
        lines += _help_entry(name, text, width)
    for title, key in (("Analyses", "analyses"), ("Options", "flags")):
        if not spec[key]:
            continue
        lines += ["", f"{title}:"]
        for entry in spec[key]:
            name, text, placeholder = (*entry, None)[:3] if isinstance(entry, tuple) else (entry, None, None)
            text = (text or table[name][1]).removeprefix(f"{command}: ")  # "verify: accept ..." in verify's help
            lines += _help_entry(_flag_label(name, table[name][0], placeholder), text, width)
    lines += _help_entry("-h, --help", "this help", width)
    lines += ["", "Examples:"] + [f"  {e}" for e in spec["examples"]] + [""]
    lines += textwrap.wrap(f"Exit codes: {spec['exit']}", width)
    lines += ["", "torchdiff --help: every flag, and the other commands."]
    return "\n".join(lines)


def help_text(width: int | None = None, command: str = "compare") -> str:
    """The --help screen, wrapped to the terminal (``COLUMNS``), 100 columns at most:
    ``command_help`` for inspect, series, hash and verify."""
    import shutil
    import textwrap

    if command in COMMAND_HELP:
        return command_help(command, width)
    width = width or min(shutil.get_terminal_size((100, 24)).columns, 100)
    table = _flag_table()
    from torchdiff.analyses import ANALYSES

    analysis_flags = {m.FLAG for m in ANALYSES.values()}
    lines = [
        "usage: torchdiff OLD NEW [flags]          compare two checkpoints",
        "       torchdiff inspect FILE [flags]     one checkpoint",
        "       torchdiff series C1 C2 C3 ... [flags]  ordered checkpoints",
        "       torchdiff hash CKPT [-o MANIFEST] [--cast DTYPE]   per-tensor fingerprints",
        "       torchdiff verify MANIFEST CKPT|MANIFEST [--allow-cast] [--tolerance rel_l2=X] [--shards]",
        "",
        "OLD and NEW: files, sharded HF checkpoints (index.json or a folder), torch.distributed.checkpoint",
        "folders (DCP, FSDP, Megatron torch_dist), or Hugging Face Hub ids (gpt2, org/name; a path that",
        "exists wins). Formats: safetensors, .pt .pth .bin .ckpt .pkl, .npy .npz, .mat, .gguf, DCP",
        "",
        "Analyses:",
    ]
    for name in sorted(analysis_flags):
        lines += _help_entry(f"--{name.replace('_', '-')}", table[name][1], width)
    lines.append("")
    lines.append("Options:")
    for name, (default, text) in table.items():
        if name in analysis_flags:
            continue
        lines += _help_entry(_flag_label(name, default), text, width)
    lines.append("")
    lines += textwrap.wrap(
        "Exit codes: 0 ran (differences or not); 1 differences found with --exit-code, --quiet or --brief, "
        "a finding at --fail-on-anomaly's severity, a failed --policy rule, or a verify mismatch; "
        "2 bad usage, a bad policy file, or unreadable input.", width)
    lines += ["", "torchdiff inspect|series|hash|verify --help: the flags of one command."]
    return "\n".join(lines)


def _fire_command(parsed: Parsed) -> list[str]:
    """The normalised command for Fire: every value a literal Fire cannot retype."""
    command = [parsed.command] + [repr(p) for p in parsed.positionals]
    for name, value in parsed.flags.items():
        command.append(f"--{name}={value!r}")
    return command


def _check_arity(parsed: Parsed) -> None:
    n = len(parsed.positionals)
    first = str(parsed.positionals[0]) if n else ""
    # a misspelt command (torchdiff insepct FILE) is no file: say so before it is looked up on the Hub
    close = (difflib.get_close_matches(first, COMMANDS, n=1, cutoff=0.7)
             if parsed.command == "compare" and n and not os.path.lexists(first) else [])
    hint = f"{first!r} is no file: did you mean the command {close[0]!r}?" if close else ""
    if parsed.command == "compare" and n != 2:
        raise _usage(f"compare takes two checkpoints, OLD and NEW (got {n})" + (f" ({hint})" if hint else "")
                     + "; see torchdiff --help")
    if hint:
        raise _usage(f"{hint} (see torchdiff --help)")
    if parsed.command == "inspect" and n != 1:
        raise _usage(f"inspect takes one checkpoint (got {n})")
    if parsed.command == "series" and n < 2:
        raise _usage(f"series takes two or more checkpoints (got {n})")
    if parsed.command == "hash" and n != 1:
        raise _usage(f"hash takes one checkpoint (got {n})")
    if parsed.command == "verify" and (n < 2 or n > 2 and not parsed.flags.get("shards")):
        raise _usage(f"verify takes a manifest and one checkpoint or manifest (got {n} paths; "
                     "several rank files need --shards)")
    for flag, commands in COMMAND_FLAGS.items():
        if parsed.flags.get(flag) not in (None, False) and parsed.command not in commands:
            raise _usage(f"--{flag.replace('_', '-')} works with {' and '.join(commands)}, not {parsed.command}")
    if parsed.command == "verify":
        from torchdiff.manifest import parse_tolerance

        parse_tolerance(parsed.flags.get("tolerance"))
    if parsed.flags.get("policy"):  # a bad policy file is an error before any checkpoint is read
        from torchdiff import policy

        parsed.policy = policy.load(parsed.flags["policy"], series=parsed.command == "series")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from torchdiff import distributed

    if distributed.launched():  # under torchrun: every rank runs this, rank 0 prints (docs/DISTRIBUTED.md)
        return distributed.cli_main(argv, _main)
    code, line = _main(argv)
    if line:
        print(line, file=sys.stderr)
    return code


def entry() -> None:
    """The ``torchdiff`` console script and ``python -m torchdiff``: :func:`main`, then
    exit with its code. Under torchrun the process leaves with ``os._exit`` once its
    output is flushed, without interpreter teardown: gloo's worker threads may still
    release a finished collective's tensors, which takes the GIL, and during teardown
    that aborted the process ("terminate called without an active exception", SIGABRT)
    after a complete output (docs/DISTRIBUTED.md)."""
    code = main()
    from torchdiff import distributed

    if distributed.launched():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _main(argv: list[str]) -> tuple[int, str | None]:
    """Run the command; returns the exit code and the error line to print (if any)."""
    verbose = any(a in ("--verbose",) for a in argv)
    from torchdiff.errors import TorchDiffError

    try:
        parsed = parse_argv(argv)
        if parsed.flags.get("help") or not argv:
            print(help_text(command=parsed.command))
            return EXIT_OK, None
        if parsed.flags.get("version"):
            from torchdiff import __version__

            print(f"torchdiff {__version__}")
            return EXIT_OK, None
        _check_arity(parsed)
        _check_outputs(parsed)
        if parsed.command == "series":
            import importlib.util

            if importlib.util.find_spec("torchdiff.series") is None:
                raise _usage("the series command is not available in this version")
        if parsed.flags.get("unsafe_pickle"):
            print("torchdiff: warning: --unsafe-pickle loads pickles with weights_only=False; "
                  "a malicious file can run code", file=sys.stderr)
        return _run(parsed, verbose), None
    except TorchDiffError as e:
        if verbose:
            import traceback

            traceback.print_exc()
        from torchdiff.render.text import printable  # one line, whatever a file's names hold

        return e.exit_code, f"torchdiff: error: {printable(e)}"
    except KeyboardInterrupt:
        return 130, "torchdiff: interrupted"
    except BrokenPipeError:
        return EXIT_OK, None
    except MemoryError:
        return EXIT_ERROR, "torchdiff: error: out of memory"
    except Exception as e:  # noqa: BLE001 - the one place a bug becomes one line, not a traceback
        if verbose:
            raise
        if isinstance(e, OSError) and e.filename is not None:  # the filesystem's refusal that a reader let
            from torchdiff.render.text import printable       # through: an unreadable input, not a bug

            return EXIT_ERROR, f"torchdiff: error: {printable(e.filename)}: cannot read ({e.strerror or e})"
        return EXIT_ERROR, (f"torchdiff: error: internal error: {type(e).__name__}: {e} "
                            "(rerun with --verbose for the traceback)")


def _run(parsed: Parsed, verbose: bool) -> int:
    import fire

    os.environ.setdefault("PAGER", "cat")
    from torchdiff.engine import use_all_cores

    use_all_cores()
    from torchdiff import distributed

    if distributed.active() is not None:
        distributed.share_cores()  # the ranks on one machine split its cores
    cli = TorchDiffCLI(policy=parsed.policy, argv=parsed.argv)
    started = time.perf_counter()
    if verbose:
        import torch

        from torchdiff.engine import resolve_device

        print(f"torchdiff: device={resolve_device(parsed.flags.get('device', 'auto'))}, "
              f"engine workers={torch.get_num_threads()} (one torch thread each on the CPU), "
              f"torch {torch.__version__}", file=sys.stderr)
    try:
        fire.Fire(cli, command=_fire_command(parsed), name="torchdiff")
    except fire.core.FireExit as e:
        return EXIT_ERROR if e.code else EXIT_OK
    if verbose:
        print(f"torchdiff: {time.perf_counter() - started:.3f} s", file=sys.stderr)
    return cli.outcome.exit_code if cli.outcome else EXIT_OK


if __name__ == "__main__":
    entry()
