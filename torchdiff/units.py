"""How numbers read in text: the one home of these formats (a leaf module).

The text renderer formats every table cell and headline figure with these, and the
analyses use them for the numbers they write into their own strings (notes, evidence,
rules, headline strings such as ``params=19,210->19,210``), so that a figure reads the
same wherever it is printed. JSON and YAML carry the raw numbers.
"""

from __future__ import annotations

import math
from typing import Any

_UNITS = (("B", 1.0), ("KB", 1e3), ("MB", 1e6), ("GB", 1e9), ("TB", 1e12))


def human_bytes(nbytes: float, signed: bool = False) -> str:
    """Bytes in B, KB, MB, GB or TB (powers of 1000, as disks and docs/ use them), with 3–4
    significant digits: ``76,840 -> "76.84 KB"``, ``60 -> "60 B"``, ``1.2e9 -> "1.2 GB"``;
    the unit is the one its rounded value is under 1000 in (``999,950 -> "1 MB"``, never
    ``"1000 KB"``); ``signed=True`` puts ``+`` before a positive size (a delta)."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, (int, float)) or not math.isfinite(nbytes):
        return str(nbytes)
    sign = "-" if nbytes < 0 else ("+" if signed and nbytes > 0 else "")
    a = abs(nbytes)
    for unit, size in _UNITS:
        value = a / size
        if float(f"{value:.4g}") < 1000:
            break
    if unit == "B" and a == int(a):
        return f"{sign}{a:,.0f} B"
    text = f"{value:.4g}" if float(f"{value:.4g}") < 1000 else f"{value:,.0f}"  # beyond 999 TB: whole TB
    return f"{sign}{text} {unit}"


def count(n: int) -> str:
    """A count with thousands separators: ``172288 -> "172,288"``."""
    return f"{n:,}"


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """A count and its noun, plural unless the count is 1: ``counted(1, "tensor") -> "1 tensor"``,
    ``counted(20000, "tensor") -> "20,000 tensors"``, ``counted(2, "matrix", "matrices")``."""
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"


def number(x: float, signed: bool = False) -> str:
    """A figure for text.

    Whole numbers (ints, and floats that are exactly whole below 10^15: ``0``, ``1``,
    a parameter count) print as integers with thousands separators; other floats with
    at most 4 significant digits (``0.5774``, ``0.5``, ``0.0005``, ``2.085e-05``,
    ``1.235e+04``), and a float that only rounds to a whole number keeps its digits
    (``1.000`` for 0.99999, never ``1``); ``nan``, ``inf``, ``-inf`` as such.
    ``signed=True`` puts ``+`` before a positive figure (a trend, a delta).
    """
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    plus = "+" if signed and x > 0 else ""
    if isinstance(x, int):
        return f"{plus}{x:,}"
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "+inf" if x > 0 and signed else "inf" if x > 0 else "-inf"
    if x == int(x) and abs(x) < 1e15:
        return f"{plus}{int(x):,}"
    a = abs(x)
    text = f"{x:.4g}"
    if 1e-4 <= a < 1e4 and "e" not in text:  # (9999.5 rounds to 1e+04: the exponent form, as above 10^4)
        if text.lstrip("-").isdigit():  # rounds to a whole number but is not one: show that
            text = f"{x:#.4g}"
            text = text[:-1] if text.endswith(".") else text
        return plus + text
    return f"{plus}{x:.3e}"


def stated(value: Any) -> Any:
    """A value as a user stated it (a policy threshold): ``true``/``false``, a float with
    all its digits (``0.99999``, not the 4 significant digits of a measured figure), any
    other value as it is."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.15g}"
    return value
