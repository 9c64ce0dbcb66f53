"""How sizes and counts read in text: the one home of these formats (a leaf module)."""

from __future__ import annotations

import math

_UNITS = (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3))


def human_bytes(nbytes: float, signed: bool = False) -> str:
    """Bytes in B, KB, MB, GB or TB (powers of 1000, as disks and docs/ use them), with 3–4
    significant digits: ``76,840 -> "76.84 KB"``, ``60 -> "60 B"``, ``1.2e9 -> "1.2 GB"``."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, (int, float)) or not math.isfinite(nbytes):
        return str(nbytes)
    sign = "-" if nbytes < 0 else ("+" if signed and nbytes > 0 else "")
    a = abs(nbytes)
    for unit, size in _UNITS:
        if a >= size:
            value = a / size
            text = f"{value:.4g}" if value < 1000 else f"{value:,.0f}"
            return f"{sign}{text} {unit}"
    return f"{sign}{a:,.0f} B" if a == int(a) else f"{sign}{a:.3g} B"


def count(n: int) -> str:
    """A count with thousands separators: ``172288 -> "172,288"``."""
    return f"{n:,}"
