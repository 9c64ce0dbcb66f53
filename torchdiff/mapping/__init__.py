"""Cross-format pairing: rule files that rename and re-lay tensors so that a Hugging
Face checkpoint, its GGUF conversion, a fused-projection export or a nanoGPT copy pair
tensor by tensor (docs/MAPPING.md).

``resolve(option)`` turns ``--map auto|none|FILE`` into what ``apply_mapping`` takes;
``apply_mapping(old, new, mapping)`` returns the two Checkpoints with renamed, lazily
transformed handles and a MappingReport. PyYAML and gguf are imported only when used.
"""

from __future__ import annotations

from typing import Any

from torchdiff.mapping.apply import MappingReport, apply_mapping, checkpoint_meta
from torchdiff.mapping.rules import MappingError, RuleSet, builtin, builtin_names, load_rules, parse_rules

__all__ = ["MappingError", "MappingReport", "RuleSet", "apply_mapping", "builtin", "builtin_names",
           "checkpoint_meta", "load_rules", "parse_rules", "resolve", "parse_heads"]


def resolve(option: Any) -> Any:
    """``--map``: ``auto`` (default), ``none``, a built-in family's name, or a rule file."""
    if option is None:
        return "auto"
    if isinstance(option, RuleSet):
        return option
    text = str(option)
    if text in ("auto", "none"):
        return text
    if text in builtin_names():
        return builtin(text)
    return load_rules(text)


def parse_heads(value: Any) -> tuple[int, int] | None:
    """``--map-heads HEADS[,KV_HEADS]`` -> (heads, kv_heads)."""
    if value is None or value == "":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        parts = [value]
    elif isinstance(value, (tuple, list)):
        parts = list(value)
    else:
        parts = [p.strip() for p in str(value).split(",")]
    try:
        nums = [int(p) for p in parts]
    except (TypeError, ValueError):
        nums = []
    if len(nums) not in (1, 2) or any(n <= 0 for n in nums):
        raise MappingError(f"--map-heads {value!r}: give HEADS or HEADS,KV_HEADS (positive whole numbers)")
    return (nums[0], nums[-1] if len(nums) == 2 else nums[0])
