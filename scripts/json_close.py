"""Compare two torchdiff JSON outputs: the same structure (items in the same order, the
same keys, strings, counts, shapes and statuses), floats within a relative tolerance.

    python scripts/json_close.py A.json B.json [RTOL]      # exit 0 equal, 1 not (the first 20 differences)
"""

from __future__ import annotations

import json
import math
import sys


def differences(a, b, rtol: float, path: str = "$") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        if list(a) != list(b):
            return [f"{path}: keys {list(a)} != {list(b)}"]
        return [d for k in a for d in differences(a[k], b[k], rtol, f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} items != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, rtol, f"{path}[{i}]")]
    if isinstance(a, float) or isinstance(b, float):
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) \
                and not isinstance(b, bool) and math.isclose(a, b, rel_tol=rtol, abs_tol=1e-12):
            return []
        return [f"{path}: {a!r} != {b!r}"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def main(argv: list[str]) -> int:
    with open(argv[0]) as f:
        a = json.load(f)
    with open(argv[1]) as f:
        b = json.load(f)
    found = differences(a, b, float(argv[2]) if len(argv) > 2 else 1e-9)
    for line in found[:20]:
        print(line)
    if found:
        print(f"{len(found)} differences between {argv[0]} and {argv[1]}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
