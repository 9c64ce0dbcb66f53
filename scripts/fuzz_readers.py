#!/usr/bin/env python
"""Fuzz torchdiff's readers for longer than the test suite does.

    .venv/bin/python scripts/fuzz_readers.py READER [--seconds N] [--workdir DIR] [--fallback]
    .venv/bin/python scripts/fuzz_readers.py all --seconds 60      # every reader, one after another

READER is a seed name of tests/hostile_files.py (safetensors, torch_zip, torch_legacy,
npy, npz, npz_compressed, gguf, mat, mat_compressed, sharded). Each input is written to
a file and read completely (every tensor materialised); a TorchDiffError is the expected
refusal, anything else is a finding.

With atheris installed (pip install atheris), libFuzzer drives coverage-guided mutation
of the seed file (torchdiff, gguf, zipfile and numpy's format module instrumented); a
finding stops the run and leaves ``crash-*`` in the work directory. Without atheris (or
with --fallback), a loop applies random edits to the seed (tests/hostile_files.py
``random_ops``) in a child process; a Python exception or a native crash (the child
dies by a signal) is saved under ``DIR/findings``, and the loop goes on.

Every run ends with one summary line: reader, engine, seconds, executions, findings.
docs/SECURITY.md records the runs made.
"""

from __future__ import annotations

import argparse
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

# The seed names (tests/hostile_files.py SEEDS), here so that torchdiff is not imported
# before atheris instruments it.
READERS = ["safetensors", "torch_zip", "torch_legacy", "npy", "npz", "npz_compressed", "gguf", "mat",
           "mat_compressed", "sharded"]


def have_atheris() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


# ---- one input --------------------------------------------------------------------------------


class Target:
    """Writes an input where its reader will find it and reads it completely."""

    def __init__(self, reader: str, workdir: Path):
        from hostile_files import SEEDS, write_seed

        self.reader = reader
        self.format = SEEDS[reader][1]
        self.dir = workdir / "target"
        self.seed = write_seed(reader, self.dir)  # for sharded: the index, beside real shards
        self.seed_bytes = self.seed.read_bytes()
        self.path = self.dir / ("input_" + self.seed.name if reader != "sharded" else self.seed.name)

    def run(self, data: bytes) -> None:
        """Raises anything but TorchDiffError."""
        import torchdiff

        self.path.write_bytes(data)
        try:
            with torchdiff.load(self.path, format=self.format) as ckpt:
                for handle in ckpt.tensors.values():
                    handle.materialize()
        except torchdiff.TorchDiffError as e:
            message = str(e)
            if str(self.path) not in message or "\n" in message:
                raise AssertionError(f"a refusal that does not name the file in one line: {message!r}") from None


# ---- atheris (libFuzzer) ------------------------------------------------------------------------


def run_atheris(reader: str, seconds: int, workdir: Path, extra: list[str]) -> None:
    import atheris

    with atheris.instrument_imports(include=["torchdiff", "gguf"]):
        import gguf  # noqa: F401
        import torchdiff  # noqa: F401
        import torchdiff.formats.gguf  # noqa: F401
        import torchdiff.formats.matlab  # noqa: F401
        import torchdiff.formats.numpy  # noqa: F401
        import torchdiff.formats.safetensors  # noqa: F401
        import torchdiff.formats.sharded  # noqa: F401
        import torchdiff.formats.torch_pickle  # noqa: F401

    target = Target(reader, workdir)
    corpus = workdir / "corpus"
    corpus.mkdir(exist_ok=True)
    (corpus / "seed").write_bytes(target.seed_bytes)

    def one_input(data: bytes) -> None:
        target.run(data)

    argv = [sys.argv[0], str(corpus), f"-max_total_time={seconds}", "-print_final_stats=1",
            f"-artifact_prefix={workdir}/", "-max_len=8192", "-timeout=20", "-rss_limit_mb=4096", *extra]
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


# ---- fallback: random edits in a supervised child -----------------------------------------------


def child_loop(reader: str, workdir: Path, seconds: float, seed: int) -> None:
    """Mutate and read until time is up; print ``EXECS n`` at the end. A Python finding
    is saved and reported; a native crash kills this process (the parent saves the input)."""
    from hostile_files import apply_ops, random_ops

    target = Target(reader, workdir)
    rng = random.Random(seed)
    findings = workdir / "findings"
    execs = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        data = target.seed_bytes if execs == 0 else apply_ops(target.seed_bytes, random_ops(rng))
        try:
            target.run(data)
        except Exception:  # noqa: BLE001 - every other exception is a finding
            findings.mkdir(exist_ok=True)
            name = findings / f"{reader}-{seed}-{execs}{target.seed.suffix}"
            name.write_bytes(data)
            print(f"FINDING {name}: {traceback.format_exc(limit=3).strip().splitlines()[-1]}", flush=True)
        execs += 1
        if execs % 200 == 0:
            print(f"EXECS {execs}", flush=True)
    print(f"EXECS {execs}", flush=True)


def run_fallback(reader: str, seconds: int, workdir: Path) -> tuple[int, list[str]]:
    """Supervise child loops until ``seconds`` are spent; restart after a native crash."""
    execs, findings = 0, []
    deadline = time.monotonic() + seconds
    round_ = 0
    while (left := deadline - time.monotonic()) > 1:
        round_ += 1
        proc = subprocess.Popen([sys.executable, __file__, reader, "--child", str(left), "--seed", str(round_),
                                 "--workdir", str(workdir)], stdout=subprocess.PIPE, text=True)
        counted = 0
        for line in proc.stdout:
            if line.startswith("EXECS "):
                counted = int(line.split()[1])
            elif line.startswith("FINDING "):
                findings.append(line.strip()[len("FINDING "):])
                print(line.strip(), flush=True)
        proc.wait()
        execs += counted
        if proc.returncode != 0:  # killed by a signal (or an error in the harness itself)
            path = next((workdir / "target").glob("input_*"), None) if reader != "sharded" else \
                workdir / "target" / "model.safetensors.index.json"
            (workdir / "findings").mkdir(exist_ok=True)
            saved = workdir / "findings" / f"{reader}-crash-{round_}{path.suffix}"
            if path is not None and path.exists():
                shutil.copy(path, saved)
            findings.append(f"{saved}: child exited with {proc.returncode}")
            print(f"FINDING {findings[-1]}", flush=True)
    return execs, findings


# ---- main --------------------------------------------------------------------------------------


def fuzz_one(reader: str, seconds: int, workdir: Path, fallback: bool, extra: list[str]) -> str:
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    if not fallback and have_atheris():
        proc = subprocess.run([sys.executable, __file__, reader, "--seconds", str(seconds), "--workdir", str(workdir),
                               "--atheris-child", *extra], capture_output=True, text=True)
        log = proc.stdout + proc.stderr
        (workdir / "libfuzzer.log").write_text(log)
        execs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", log)
        crashes = sorted(p.name for p in workdir.glob("crash-*")) + sorted(p.name for p in workdir.glob("timeout-*"))
        engine = "atheris"
        count = int(execs[-1]) if execs else -1
        found = crashes + ([f"exit {proc.returncode}"] if proc.returncode and not crashes else [])
    else:
        engine = "random-edits"
        count, found = run_fallback(reader, seconds, workdir)
    elapsed = time.monotonic() - started
    line = (f"{reader}: {engine}, {elapsed:.0f} s, {count} executions, "
            f"{len(found)} finding(s){': ' + '; '.join(found) if found else ''}")
    print(line, flush=True)
    return line


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reader", choices=[*READERS, "all"])
    parser.add_argument("--seconds", type=int, default=60, help="per reader")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a fresh temporary directory")
    parser.add_argument("--fallback", action="store_true", help="random edits even when atheris is installed")
    parser.add_argument("--child", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--atheris-child", action="store_true", help=argparse.SUPPRESS)
    args, extra = parser.parse_known_args()
    if args.child is not None:
        child_loop(args.reader, args.workdir, args.child, args.seed)
        return 0
    if args.atheris_child:
        run_atheris(args.reader, args.seconds, args.workdir, extra)
        return 0
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="torchdiff-fuzz-"))
    readers = READERS if args.reader == "all" else [args.reader]
    lines = [fuzz_one(r, args.seconds, workdir / r, args.fallback, extra) for r in readers]
    print("\n".join(["", "summary (work directory: " + str(workdir) + ")", *lines]))
    return 1 if any(" 0 finding" not in line for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
