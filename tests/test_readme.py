"""README.md stays true: every `$ torchdiff ...` example whose files the demo makes runs,
exits 0, and prints every output line the README shows for it (the README elides lines
with `...`; numbers must match, as the demo checkpoints are seeded)."""

from __future__ import annotations

import os
import re
import shlex
import sys

import pytest

from torchdiff.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def examples() -> list[tuple[str, list[str]]]:
    lines = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read().splitlines()
    found = []
    for i, line in enumerate(lines):
        if not line.startswith("$ torchdiff "):
            continue
        shown = []
        for following in lines[i + 1:]:
            if following.startswith(("$", "```")):
                break
            shown.append(following)
        found.append((line[2:], shown))
    return found


def braces(word: str) -> list[str]:
    """The shell's brace expansion of one word (``step_{000,050}.pt``), as bash does it."""
    found = re.search(r"\{([^{}]*,[^{}]*)\}", word)
    if found is None:
        return [word]
    return [x for part in found.group(1).split(",")
            for x in braces(word[:found.start()] + part + word[found.end():])]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        import make_checkpoints
        import make_llama_gguf
    finally:
        sys.path.pop(0)
    out = tmp_path_factory.mktemp("demo")
    make_checkpoints.main(str(out))
    make_llama_gguf.main(str(out))  # the HF + GGUF pair of "Comparing across formats"
    return out


@pytest.mark.parametrize("command, shown", examples(), ids=[c for c, _ in examples()])
def test_readme_example(command, shown, demo_dir, capsys, monkeypatch):
    # The README names files where ./scripts/demo writes them (examples/data/); the
    # fixture's folder holds the same files.
    argv = [a.removeprefix("examples/data/") for word in shlex.split(command.split(";")[0].split("#")[0])[1:]
            for a in braces(word)]
    files = [a for a in argv if re.search(r"\.(safetensors|pt|gguf)$", a)]
    if not all((demo_dir / f).exists() for f in files):
        pytest.skip("an illustration with files the demo does not make")
    monkeypatch.chdir(demo_dir)
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "120")
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    for line in shown:
        if line.strip() in ("", "...") or line.strip().startswith("..."):
            continue
        assert line.rstrip() in [o.rstrip() for o in out], f"README shows a line the command does not print: {line!r}"
