"""Grouping tensor names into layers (DESIGN.md, --show-layer-impact).

A layer is the first numbered block in the name — ``h.3``, ``layers.12``,
``encoder.layer.5``, ``blk.7``: everything up to and including the first purely
numeric dotted component — else, for torch's recurrent layers, the stacked layer
(``lstm.weight_hh_l1`` -> ``lstm.l1``), else the module prefix (the name without its
last component), else the name itself. ``--layer-pattern REGEX`` overrides: the layer
is the regex's first match (group 1 if it has groups).
"""

from __future__ import annotations

import re
from functools import lru_cache

from torchdiff.errors import UsageError


_RNN_LAYER = re.compile(r"^(?:weight|bias)_(?:ih|hh|hr)_(l\d+)(?:_reverse)?$")


@lru_cache(maxsize=65536)
def _default_layer(name: str) -> str:
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit() and i > 0:
            return ".".join(parts[: i + 1])
    rnn = _RNN_LAYER.match(parts[-1])
    if rnn:  # torch.nn.LSTM/GRU/RNN: weight_ih_l0, bias_hh_l1_reverse -> layer l0, l1
        return ".".join(parts[:-1] + [rnn.group(1)])
    if len(parts) > 1:
        return ".".join(parts[:-1])
    return name


def block_index(layer: str) -> int | None:
    """The block number of a numbered layer name (``h.3`` -> 3), else None."""
    last = layer.rsplit(".", 1)[-1]
    return int(last) if last.isdigit() else None


def compile_pattern(pattern: str | None):
    if not pattern:
        return None
    try:
        return re.compile(pattern)
    except re.error as e:
        raise UsageError(f"--layer-pattern {pattern!r} is not a valid regex ({e})") from None


def layer_of(name: str, pattern: "re.Pattern[str] | str | None" = None) -> str:
    if pattern is None:
        return _default_layer(name)
    if isinstance(pattern, str):
        pattern = compile_pattern(pattern)
    m = pattern.search(name)
    if m is None:
        return _default_layer(name)
    return m.group(1) if m.re.groups else m.group(0)
