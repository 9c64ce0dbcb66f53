"""GGUF tensor names from gguf-py's maintained table, not a hand-written one.

``gguf.get_tensor_name_map(arch, n_blocks)`` is the table llama.cpp's own converter
(convert_hf_to_gguf.py) uses to name tensors: it knows the Hugging Face names of every
architecture llama.cpp supports. Given the GGUF file's ``general.architecture`` and
``<arch>.block_count``, every name on the Hugging Face side is looked up in it; the
result maps GGUF names to the Hugging Face names actually present. gguf is imported
only here, and only when a GGUF file meets a checkpoint of another family.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

from torchdiff.errors import MissingDependencyError
from torchdiff.mapping.transforms import Misfit

_BLOCK = re.compile(r"^blk\.(\d+)\.")


def gguf_names(source_names: Iterable[str], target_names: Iterable[str], meta: dict[str, Any]) -> dict[str, str]:
    """GGUF name -> Hugging Face name, for the names of ``target_names`` the table knows."""
    try:
        import gguf
    except ImportError:
        raise MissingDependencyError("mapping GGUF names needs the gguf package (pip install torchdiff[gguf])") from None
    arch_name = meta.get("general.architecture")
    if not isinstance(arch_name, str):
        raise Misfit("the GGUF file has no general.architecture key, so gguf's name table cannot be chosen")
    arches = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}
    if arch_name not in arches:
        raise Misfit(f"general.architecture {arch_name!r} is not an architecture the installed gguf knows "
                     "(pip install -U gguf)")
    blocks = meta.get(f"{arch_name}.block_count")
    if not isinstance(blocks, int) or blocks < 0:
        found = [int(m.group(1)) for m in map(_BLOCK.match, source_names) if m]
        blocks = max(found) + 1 if found else 0
    table = gguf.get_tensor_name_map(arches[arch_name], blocks)
    out: dict[str, str] = {}
    for name in target_names:
        mapped = table.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is not None:
            out.setdefault(mapped, name)
    return out


def arch_count() -> int:
    """How many architectures the installed gguf's table covers (for the docs and output)."""
    import gguf

    return len(gguf.MODEL_ARCH_NAMES)
