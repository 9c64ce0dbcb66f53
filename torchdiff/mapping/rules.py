r"""The rule language: YAML files of ``regex -> name`` rules with ordered transforms.

A rule file (docs/MAPPING.md has the full grammar)::

    mapping: hf-gpt2-nanogpt          # its name, shown in the output
    description: ...
    source: hf-gpt2                   # the family whose tensor names the rules match
    target: nanogpt                   # the family the rules rename them into
    detect:                           # evidence: every entry must match a name on its side
      source: [{match: '...c_attn\.weight$', shape: [d, 3*d]}]
      target: [{match: '...c_attn\.weight$', shape: [3*d, d]}]
    names: gguf                       # optional: names generated from gguf's table
    rules:                            # first match wins; a name no rule matches keeps its name
      - match: '^(?:transformer\.)?h\.(\d+)\.attn\.c_attn\.weight$'
        name: 'transformer.h.\1.attn.c_attn.weight'     # or a list, for a split
        with: []                      # more source tensors (templates), for a concat
        when: {general.architecture: [llama]}            # metadata conditions
        transforms: [transpose]
    tied: {head: lm_head.weight, embedding: transformer.wte.weight}   # in target names

Every error is a MappingError (a UsageError: one line, exit 2) naming the file, the
rule and what to fix. PyYAML is imported only when a file is read.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from torchdiff.errors import MissingDependencyError, UsageError
from torchdiff.mapping.transforms import HEAD_PARAMS, KINDS, Transform, dtype_names
from torchdiff.units import counted

RULES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rules")
GENERATORS = ("gguf",)
_TOP_KEYS = {"mapping", "description", "source", "target", "detect", "names", "rules", "tied", "heads"}
_RULE_KEYS = {"match", "name", "with", "when", "transforms"}


class MappingError(UsageError):
    """A rule file that cannot be used, or a mapping that does not fit the tensors."""


@dataclass(frozen=True)
class Detect:
    pattern: re.Pattern
    shape: tuple | None = None  # e.g. ("d", (3, "d")): a symbol, or (factor, symbol); "_" any; ints exact

    def describe(self) -> str:
        text = self.pattern.pattern
        if self.shape is not None:
            text += " shape [" + ", ".join(_shape_term(t) for t in self.shape) + "]"
        return text

    def find(self, shapes: dict[str, tuple[int, ...]]) -> str | None:
        """The first name (in order) this entry matches, shape included; None if none."""
        for name, shape in shapes.items():
            if self.pattern.search(name) and (self.shape is None or match_shape(self.shape, shape)):
                return name
        return None


def _shape_term(t: Any) -> str:
    if isinstance(t, tuple):
        return f"{t[0]}*{t[1]}"
    return str(t)


def match_shape(pattern: tuple, shape: tuple[int, ...]) -> bool:
    """``pattern`` against a shape: ints exact, ``_`` anything, a symbol binds once
    (``d``), ``k*d`` is k times the symbol's value."""
    if len(pattern) != len(shape):
        return False
    bound: dict[str, int] = {}
    pending = []
    for term, size in zip(pattern, shape):
        if term == "_":
            continue
        if isinstance(term, int):
            if term != size:
                return False
        elif isinstance(term, tuple):
            pending.append((term, size))
        elif bound.setdefault(term, size) != size:
            return False
    for (factor, symbol), size in pending:
        if symbol not in bound:
            if size % factor:
                return False
            bound[symbol] = size // factor
        if factor * bound[symbol] != size:
            return False
    return True


@dataclass(frozen=True)
class Rule:
    index: int  # 1-based, for messages
    pattern: re.Pattern
    names: tuple[str, ...] | None  # target templates; None: the generator's name, else the same name
    with_: tuple[str, ...]
    when: tuple[tuple[str, tuple], ...]
    transforms: tuple[Transform, ...]

    def label(self) -> str:
        return f"rule {self.index} ('{self.pattern.pattern}')"


@dataclass(frozen=True)
class RuleSet:
    """A parsed, validated rule file."""

    name: str
    path: str
    description: str = ""
    source: str = "source"
    target: str = "target"
    detect_source: tuple[Detect, ...] = ()
    detect_target: tuple[Detect, ...] = ()
    names: str | None = None
    rules: tuple[Rule, ...] = ()
    tied: tuple[str, str] | None = None  # (head, embedding) in target names
    builtin: bool = False

    def where(self) -> str:
        """How error messages name the rule set: the file a user wrote, or ``--map NAME``
        for a built-in family (not the path it is installed at)."""
        return f"--map {self.name}" if self.builtin else self.path


def _fail(path: str, what: str) -> MappingError:
    return MappingError(f"{path}: {what}")


def load_rules(path: str, *, builtin: bool = False) -> RuleSet:
    """Read and validate a rule file; raise MappingError with one line saying what is wrong."""
    try:
        import yaml
    except ImportError:
        raise MissingDependencyError(f"{path}: reading a rule file needs PyYAML (pip install pyyaml)") from None
    if not os.path.isfile(path):
        raise MappingError(f"--map {path}: no such rule file (use auto, none, or a YAML rule file; "
                           f"built-in families: {', '.join(builtin_names())})")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or "unreadable"
        raise _fail(path, f"not a valid YAML rule file ({problem}{where})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise _fail(path, f"cannot read the rule file ({e})") from None
    return parse_rules(data, path, builtin=builtin)


def parse_rules(data: Any, path: str = "<rules>", *, builtin: bool = False) -> RuleSet:
    if not isinstance(data, dict):
        raise _fail(path, "a rule file is a YAML mapping with a 'rules' list (see docs/MAPPING.md)")
    unknown = sorted(set(map(str, data)) - _TOP_KEYS)
    if unknown:
        raise _fail(path, f"unknown key {unknown[0]!r} (allowed: {', '.join(sorted(_TOP_KEYS))})")
    name = data.get("mapping") or os.path.splitext(os.path.basename(path))[0]
    names = data.get("names")
    if names is not None and names not in GENERATORS:
        raise _fail(path, f"names: {names!r} is not a name generator (known: {', '.join(GENERATORS)})")
    rules_data = data.get("rules")
    if rules_data is None:
        rules_data = []
    if not isinstance(rules_data, list):
        raise _fail(path, "'rules' must be a list of rules")
    if not rules_data and names is None:
        raise _fail(path, "the rule file has no rules")
    detect = data.get("detect") or {}
    if not isinstance(detect, dict) or set(map(str, detect)) - {"source", "target"}:
        raise _fail(path, "detect: a mapping with 'source' and/or 'target' lists")
    tied = data.get("tied")
    if tied is not None:
        if not isinstance(tied, dict) or set(tied) != {"head", "embedding"}:
            raise _fail(path, "tied: a mapping {head: NAME, embedding: NAME} (target names)")
        tied = (str(tied["head"]), str(tied["embedding"]))
    rules = tuple(_rule(r, i + 1, path) for i, r in enumerate(rules_data))
    return RuleSet(
        name=str(name), path=path, description=str(data.get("description") or ""),
        source=str(data.get("source") or "source"), target=str(data.get("target") or "target"),
        detect_source=tuple(_detect(e, path, "source") for e in _list(detect.get("source"), path, "detect.source")),
        detect_target=tuple(_detect(e, path, "target") for e in _list(detect.get("target"), path, "detect.target")),
        names=names, rules=rules, tied=tied, builtin=builtin,
    )


def _list(value: Any, path: str, what: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _fail(path, f"{what} must be a list")
    return value


def _regex(text: Any, path: str, where: str) -> re.Pattern:
    if not isinstance(text, str) or not text:
        raise _fail(path, f"{where}: 'match' must be a non-empty regex string")
    try:
        return re.compile(text)
    except re.error as e:
        raise _fail(path, f"{where}: bad regex '{text}' ({e})") from None


def _detect(entry: Any, path: str, side: str) -> Detect:
    where = f"detect.{side}"
    if isinstance(entry, str):
        return Detect(_regex(entry, path, where))
    if not isinstance(entry, dict) or "match" not in entry or set(entry) - {"match", "shape"}:
        raise _fail(path, f"{where}: each entry is a regex or {{match: REGEX, shape: [...]}}")
    shape = entry.get("shape")
    if shape is not None:
        shape = tuple(_shape_pattern(t, path, where) for t in _list(shape, path, f"{where} shape"))
    return Detect(_regex(entry["match"], path, where), shape)


_TERM = re.compile(r"^(?:(\d+)\s*\*\s*)?([A-Za-z_]\w*)$")


def _shape_pattern(term: Any, path: str, where: str) -> Any:
    if isinstance(term, int) and not isinstance(term, bool) and term >= 0:
        return term
    m = _TERM.match(str(term).strip()) if isinstance(term, str) else None
    if m is None:
        raise _fail(path, f"{where}: shape term {term!r} is not an integer, a symbol, k*symbol or _")
    if m.group(1):
        return (int(m.group(1)), m.group(2))
    return m.group(2)


def _rule(data: Any, index: int, path: str) -> Rule:
    where = f"rule {index}"
    if not isinstance(data, dict):
        raise _fail(path, f"{where}: a rule is a mapping with 'match' (and 'name', 'transforms')")
    unknown = sorted(set(map(str, data)) - _RULE_KEYS)
    if unknown:
        raise _fail(path, f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(_RULE_KEYS))})")
    pattern = _regex(data.get("match"), path, where)
    where = f"rule {index} ('{pattern.pattern}')"
    names = data.get("name")
    if names is not None:
        names = (names,) if isinstance(names, str) else names
        if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) and n for n in names):
            raise _fail(path, f"{where}: 'name' is a template string or a list of them")
        names = tuple(names)
        for n in names:
            _check_template(pattern, n, path, where)
    with_ = data.get("with") or []
    if not isinstance(with_, list) or not all(isinstance(n, str) and n for n in with_):
        raise _fail(path, f"{where}: 'with' is a list of name templates")
    for n in with_:
        _check_template(pattern, n, path, where)
    when = data.get("when") or {}
    if not isinstance(when, dict):
        raise _fail(path, f"{where}: 'when' is a mapping {{metadata key: [allowed values]}}")
    when_t = tuple((str(k), tuple(v) if isinstance(v, list) else (v,)) for k, v in when.items())
    transforms = tuple(_transform(t, path, where) for t in _list(data.get("transforms"), path, f"{where} transforms"))
    inputs = 1 + len(with_)
    for t in transforms:  # arity: how many tensors flow between the steps
        arity = KINDS[t.kind][2]
        if arity == "n:1":
            inputs = 1
        elif arity.startswith("1:"):
            if inputs != 1:
                raise _fail(path, f"{where}: {t.kind} takes one tensor, but {inputs} reach it (concat them first)")
            if arity == "1:3":
                inputs = 3
            elif arity == "1:n":
                sizes = t.params.get("sizes")
                inputs = len(sizes) if sizes is not None else (len(names) if names else 1)
    outputs = len(names) if names else 1
    if inputs != outputs:
        raise _fail(path, f"{where}: the transforms produce {counted(inputs, 'tensor')} but 'name' lists {outputs}")
    return Rule(index, pattern, names, tuple(with_), when_t, transforms)


def _check_template(pattern: re.Pattern, template: str, path: str, where: str) -> None:
    for ref in re.findall(r"\\(\d+)|\\g<(\w+)>", template):
        ref = ref[0] or ref[1]
        if ref.isdigit():
            if int(ref) > pattern.groups:
                raise _fail(path, f"{where}: name '{template}' refers to group \\{ref}, the regex has {pattern.groups}")
        elif ref not in pattern.groupindex:
            raise _fail(path, f"{where}: name '{template}' refers to group {ref!r}, which the regex does not define")


def _transform(item: Any, path: str, where: str) -> Transform:
    if isinstance(item, str):
        kind, params = item, {}
    elif isinstance(item, dict) and len(item) == 1:
        kind, params = next(iter(item.items()))
        if kind == "reshape" and isinstance(params, list):
            params = {"shape": params}
        elif kind == "dtype" and isinstance(params, str):
            params = {"dtype": params}
        params = params if params is not None else {}
    else:
        raise _fail(path, f"{where}: a transform is a name or {{name: {{parameters}}}}, got {item!r}")
    if kind not in KINDS:
        raise _fail(path, f"{where}: unknown transform {kind!r} (known: {', '.join(sorted(KINDS))})")
    if not isinstance(params, dict):
        raise _fail(path, f"{where}: {kind} takes a mapping of parameters, got {params!r}")
    allowed, required, _ = KINDS[kind]
    extra = sorted(set(params) - allowed)
    if extra:
        raise _fail(path, f"{where}: {kind} has no parameter {extra[0]!r} (it takes: {', '.join(sorted(allowed))})")
    missing = sorted(required - set(params))
    if missing:
        raise _fail(path, f"{where}: {kind} needs {missing[0]!r}")
    for key in HEAD_PARAMS:
        if key in params:
            v = params[key]
            ok = (_positive_int(v) or (isinstance(v, str) and v)
                  or (isinstance(v, list) and v and all(isinstance(x, str) or _positive_int(x) for x in v)))
            if not ok:
                raise _fail(path, f"{where}: {kind} {key} is a positive number, a metadata key or a list of them")
    if "dim" in params and not _int(params["dim"]):
        raise _fail(path, f"{where}: {kind} dim must be an integer")
    if "groups" in params and not _positive_int(params["groups"]):
        raise _fail(path, f"{where}: {kind} groups must be a positive integer")
    if "sizes" in params and not (isinstance(params["sizes"], list) and params["sizes"]
                                  and all(_positive_int(s) for s in params["sizes"])):
        raise _fail(path, f"{where}: split sizes must be a list of positive integers")
    if "dims" in params and not (isinstance(params["dims"], list) and len(params["dims"]) == 2
                                 and all(_int(d) for d in params["dims"])):
        raise _fail(path, f"{where}: transpose dims must be two integers")
    if kind == "reshape" and not (isinstance(params["shape"], list)
                                  and all(_int(d) and (d >= 0 or d == -1) for d in params["shape"])):
        raise _fail(path, f"{where}: reshape takes a list of sizes (one may be -1)")
    if kind == "dtype" and params["dtype"] not in dtype_names:
        raise _fail(path, f"{where}: dtype {params['dtype']!r} is not one of {', '.join(dtype_names)}")
    return Transform(kind, dict(params))


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _positive_int(v: Any) -> bool:
    return _int(v) and v > 0


# ---- built-in families ----------------------------------------------------------------


def builtin_names() -> list[str]:
    """The built-in families, by file name (torchdiff/mapping/rules/*.yaml)."""
    try:
        return sorted(os.path.splitext(f)[0] for f in os.listdir(RULES_DIR) if f.endswith(".yaml"))
    except OSError:
        return []


_CACHE: dict[str, RuleSet] = {}


def builtin(name: str) -> RuleSet:
    if name not in _CACHE:
        _CACHE[name] = load_rules(os.path.join(RULES_DIR, f"{name}.yaml"), builtin=True)
    return _CACHE[name]


def builtins() -> list[RuleSet]:
    return [builtin(n) for n in builtin_names()]
