"""torchdiff never modifies its inputs, survives Ctrl-C and a concurrent run, and
refuses to report figures from a file that changed while it was being read.

- every CLI command (compare, inspect, series, -q, errors, Ctrl-C) leaves every input
  byte-for-byte and timestamp-for-timestamp unchanged, and creates no file beside them;
- during a run, every input is open read-only and mapped private (checked in
  /proc/self), and a write into a mapped tensor never reaches the file;
- two torchdiff processes on the same files at once both succeed, with the same output;
- a file replaced, rewritten or truncated during a run is a CorruptFileError
  ("changed while being read"), never garbage figures, never SIGBUS.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import torchdiff
from torchdiff import engine as engine_module
from torchdiff.cli import main

from hostile_files import SEEDS, available, read_all, require, write_seed

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
CHANGED = ("changed while being read ({how}); the figures would mix old and new contents "
           "(rerun once nothing is writing to the file)")


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file under root: (sha256, size, mtime, ctime, inode, mode)."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            st = path.stat()
            out[str(path)] = (hashlib.sha256(path.read_bytes()).hexdigest(), st.st_size, st.st_mtime_ns,
                              st.st_ctime_ns, st.st_ino, st.st_mode)
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """One small checkpoint of every format, a changed twin of the safetensors one, an
    HDF5 (MATLAB v7.3) file, a corrupt file and a malicious pickle, all in one directory."""
    root = tmp_path_factory.mktemp("inputs")
    paths = {kind: write_seed(kind, root / kind) for kind in SEEDS if available(kind)}
    twin = root / "twin" / "seed.safetensors"
    twin.parent.mkdir()
    save_file({"layer.0.weight": torch.ones(2, 3), "codes": torch.tensor([1, 2, 3], dtype=torch.int8)}, str(twin))
    paths["twin"] = twin
    try:
        import h5py
    except ImportError:
        pass
    else:
        with h5py.File(root / "v73.mat", "w") as f:
            f.create_dataset("W", data=np.arange(6.0).reshape(3, 2))
        paths["hdf5"] = root / "v73.mat"
    paths["corrupt"] = root / "corrupt.safetensors"
    paths["corrupt"].write_bytes(paths["safetensors"].read_bytes()[:-5])
    paths["evil"] = root / "evil.pt"
    torch.save({"payload": _Evil(root / "PWNED")}, paths["evil"])
    return paths


class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _commands(p: dict[str, Path]) -> list[tuple[list, int]]:
    """(argv, expected exit code) for every command, on every format."""
    runs = []
    for kind in [k for k in [*SEEDS, "hdf5"] if k in p]:
        f = str(p[kind])
        runs += [([f, f], 0), (["inspect", f, "--all"], 0)]
    s, t = str(p["safetensors"]), str(p["twin"])
    runs += [
        ([s, t], 0), ([s, t, "--all", "-o", "json"], 0), ([s, t, "--stats", "-o", "yaml"], 0),
        (["-q", s, t], 1), (["--brief", s, t], 1), ([s, t, "--exit-code"], 1),
        (["series", s, t, s, "--all", "--common-only"], 0), (["series", *[str(p["torch_zip"])] * 3], 0),
        ([str(p["npz"]), str(p["npz_compressed"]), "--all"], 0),
        *([([str(p["mat"]), str(p["mat_compressed"])], 0)] if "mat" in p else []),
        ([s, str(p["corrupt"])], 2), (["inspect", str(p["corrupt"])], 2), (["series", s, str(p["corrupt"]), t], 2),
        ([s, str(p["evil"])], 2), ([s, t, "--no-such-flag"], 2), ([s, t, "--epsilon", "x"], 2),
    ]
    return runs


def test_every_command_leaves_inputs_untouched(capsys, inputs):
    root = inputs["safetensors"].parent.parent
    before = snapshot(root)
    for argv, code in _commands(inputs):
        assert main(argv) == code, (argv, capsys.readouterr())
        capsys.readouterr()
    assert snapshot(root) == before  # same files, same bytes, same times: nothing written, nothing added
    assert not (root / "PWNED").exists()


@pytest.mark.parametrize("where", ["side_rows", "pair_rows"])
def test_ctrl_c_mid_run_leaves_inputs_untouched(capsys, inputs, monkeypatch, where):
    """KeyboardInterrupt raised inside the engine's pass: exit 130, one line, nothing written."""
    root = inputs["safetensors"].parent.parent
    before = snapshot(root)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine_module.R, where, interrupt)
    s, t = str(inputs["safetensors"]), str(inputs["twin"])
    argvs = [[s, t], [str(inputs["torch_zip"]), str(inputs["torch_zip"])], ["series", s, t, s, "--common-only"],
             [str(inputs["npz_compressed"]), str(inputs["npz"])]]
    if "gguf" in inputs:
        argvs.append([str(inputs["gguf"]), str(inputs["gguf"])])
    if where == "side_rows" and "mat" in inputs:
        argvs.append(["inspect", str(inputs["mat"])])
    for argv in argvs:
        assert main(argv) == 130, argv
        out, err = capsys.readouterr()
        assert out == "" and err == "torchdiff: interrupted\n", (argv, err)
    assert snapshot(root) == before


def _big_pair(root: Path) -> tuple[Path, Path]:
    root.mkdir(parents=True, exist_ok=True)
    a, b = root / "a.safetensors", root / "b.safetensors"
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1 << 20, generator=g)  # 4 MB: four engine blocks
    save_file({"w": w, "v": w[:1000].clone()}, str(a))
    save_file({"w": w * 1.01, "v": w[:1000].clone()}, str(b))
    return a, b


def _driver(body: str) -> list[str]:
    """``python -c``: a few lines of setup, then the script body."""
    return [PYTHON, "-c", textwrap.dedent(body)]


def test_sigint_to_a_running_process(tmp_path):
    """A real SIGINT to a torchdiff process in the middle of its engine pass (each
    block slowed down, so that the signal lands mid-run): exit 130 with one line."""
    a, b = _big_pair(tmp_path / "in")
    before = snapshot(tmp_path / "in")
    proc = subprocess.Popen(_driver("""
        import itertools, sys, time
        import torchdiff.engine as E
        real, calls = E.R.side_rows, itertools.count()
        def slow(*args, **kwargs):  # called by the engine's worker threads
            if next(calls) == 0:
                print("RUNNING", file=sys.stderr, flush=True)
            time.sleep(0.5)
            return real(*args, **kwargs)
        E.R.side_rows = slow
        from torchdiff.cli import main
        sys.exit(main(sys.argv[1:]))
        """) + [str(a), str(b), "--stats"], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        ready, _, _ = select.select([proc.stderr], [], [], 60)
        assert ready and proc.stderr.readline() == "RUNNING\n"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, (proc.returncode, err)
    assert out == "" and err == "torchdiff: interrupted\n", err
    assert snapshot(tmp_path / "in") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_inputs_are_open_read_only_and_mapped_private(inputs, monkeypatch):
    """Mid-run, /proc/self shows every input descriptor O_RDONLY and every mapping of an
    input private (a write could never reach the file), whatever library opened it."""
    inputs_set = {str(p) for p in inputs.values()} | {str(p) for p in inputs["sharded"].parent.iterdir()}
    seen: list[tuple[str, str]] = []
    real = engine_module.R.side_rows

    def spy(*args, **kwargs):
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
                with open(f"/proc/self/fdinfo/{fd}") as f:
                    flags = next(int(line.split()[1], 8) for line in f if line.startswith("flags:"))
            except (OSError, StopIteration):
                continue
            if target in inputs_set:
                seen.append(("fd", target))
                assert flags & os.O_ACCMODE == os.O_RDONLY, (target, oct(flags))
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].strip() in inputs_set:
                    seen.append(("map", fields[5].strip()))
                    perms = fields[1]
                    assert perms[3] == "p", line  # private: copy-on-write, never written back
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_module.R, "side_rows", spy)
    for kind in [k for k in [*SEEDS, "hdf5"] if k in inputs]:
        torchdiff.compare(inputs[kind], inputs[kind], device="cpu")
    kinds = {k for k, _ in seen}
    assert kinds == {"fd", "map"}, seen  # both were looked at (mappings: safetensors, npy, gguf, torch)
    assert any(path.endswith(".safetensors") for k, path in seen if k == "map")


@pytest.mark.parametrize("kind", ["safetensors", "torch_zip", "npy", "npz", "gguf"])
def test_a_write_into_a_mapped_tensor_never_reaches_the_file(tmp_path, kind):
    require(kind)
    path = write_seed(kind, tmp_path / kind)
    fmt = SEEDS[kind][1]
    before = snapshot(tmp_path)
    with torchdiff.load(path, format=fmt) as ckpt:
        mapped = [h for h in ckpt.tensors.values() if h.mapped]
        assert mapped
        originals = {h.name: h.materialize().clone() for h in mapped}
        for h in mapped:
            t = h.materialize()
            t.view(-1)[0] = 1 if t.dtype == torch.bool else 99
    assert snapshot(tmp_path) == before
    with torchdiff.load(path, format=fmt) as ckpt:
        for name, t in originals.items():
            assert torch.equal(ckpt.tensors[name].materialize(), t)


def test_two_processes_on_the_same_files_at_once(tmp_path):
    a, b = _big_pair(tmp_path / "in")
    pt = tmp_path / "in" / "c.pt"
    torch.save({"w": torch.ones(1000), "step": 1}, pt)
    before = snapshot(tmp_path / "in")
    torchdiff_cmd = [str(Path(PYTHON).parent / "torchdiff")]
    if not os.path.exists(torchdiff_cmd[0]):
        torchdiff_cmd = [PYTHON, "-m", "torchdiff"]
    argv = [str(a), str(b), "--stats", "--show-layer-impact", "-o", "json"]
    procs = [subprocess.Popen(torchdiff_cmd + argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    procs.append(subprocess.Popen(torchdiff_cmd + ["inspect", str(a), "-o", "json"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err
        assert err == ""
    assert results[0][0] == results[1][0]
    assert [i["path"] for i in json.loads(results[0][0]) if i["type"] == "tensor_changed"] == ["w"]
    assert {i["path"] for i in json.loads(results[2][0])} == {"v", "w"}
    assert snapshot(tmp_path / "in") == before


# ---- a file changed while being read -------------------------------------------------------------


def _on_first_block(monkeypatch, action):
    """Run ``action`` once, after the engine's first block is reduced."""
    real, calls = engine_module.R.side_rows, itertools.count()

    def hooked(*args, **kwargs):  # called by the engine's worker threads: once, atomically
        out = real(*args, **kwargs)
        if next(calls) == 0:
            action()
        return out

    monkeypatch.setattr(engine_module.R, "side_rows", hooked)


def test_file_replaced_mid_run(capsys, tmp_path, monkeypatch):
    """Replaced by rename (how downloads and savers finish): the old inode stays mapped,
    so the figures would describe a file that is no longer there; refused."""
    a, b = _big_pair(tmp_path)
    replacement = tmp_path / "replacement.safetensors"
    save_file({"w": torch.zeros(1 << 20), "v": torch.zeros(1000)}, str(replacement))
    _on_first_block(monkeypatch, lambda: os.replace(replacement, b))
    assert main([str(a), str(b)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"torchdiff: error: {b}: " + CHANGED.format(how="it was replaced by another file") + "\n"


def test_file_rewritten_in_place_mid_run(capsys, tmp_path, monkeypatch):
    a, b = _big_pair(tmp_path)

    def rewrite():
        time.sleep(0.05)  # past the filesystem clock's tick
        with open(b, "r+b") as f:
            f.seek(-8, os.SEEK_END)
            f.write(b"\x00" * 8)

    _on_first_block(monkeypatch, rewrite)
    assert main([str(a), str(b), "-o", "json"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"torchdiff: error: {b}: " + CHANGED.format(how="it was modified") + "\n"


def test_file_removed_mid_run(capsys, tmp_path, monkeypatch):
    a, b = _big_pair(tmp_path)
    _on_first_block(monkeypatch, lambda: os.remove(a))
    assert main(["inspect", str(a)]) == 2
    assert capsys.readouterr().err == f"torchdiff: error: {a}: " + CHANGED.format(how="it was removed") + "\n"


@pytest.mark.parametrize("when", ["after_opening", "between_blocks"])
def test_file_truncated_underneath_is_an_error_not_sigbus(tmp_path, when):
    """Truncating a mapped file and then touching the lost pages kills a process with
    SIGBUS. torchdiff checks its inputs before the engine starts and after every block:
    a truncation in between is reported. (Run in a child process: a regression would
    kill it, not the test session.)"""
    a, b = _big_pair(tmp_path)
    size = a.stat().st_size
    hook = {
        "after_opening": """
            import torchdiff.pipeline as pipeline
            real = pipeline.pair
            def pair(*args, **kwargs):  # the checkpoints are open (and mapped), nothing read yet
                os.truncate(A, 100)
                return real(*args, **kwargs)
            pipeline.pair = pair
            progress = None
            """,
        "between_blocks": """
            calls = []
            def progress(n):
                if not calls:
                    calls.append(n)
                    os.truncate(A, 100)
            """,
    }[when]
    # One worker: with N worker threads up to 2N blocks are in flight when a check runs,
    # and a truncation then can hit one of them (docs/SECURITY.md, "Limits").
    script = "import os, sys\nA = sys.argv[1]\n" + textwrap.dedent(hook) + textwrap.dedent("""
        import torch
        torch.set_num_threads(1)
        import torchdiff
        try:
            torchdiff.compare(A, sys.argv[2], progress=progress, device="cpu")
        except torchdiff.CorruptFileError as e:
            print(e)
        """)
    proc = subprocess.run([PYTHON, "-c", script, str(a), str(b)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stderr)  # -7 would be SIGBUS
    assert proc.stdout == f"{a}: " + CHANGED.format(how=f"its size went from {size} to 100 bytes") + "\n"


def test_quiet_mode_checks_too(capsys, tmp_path, monkeypatch):
    """--quiet compares bytes without the engine's blocks: the inputs are re-checked before it answers."""
    a, b = _big_pair(tmp_path)
    real = torchdiff.api.pair

    def pair_then_replace(*args, **kwargs):
        out = real(*args, **kwargs)
        os.replace(a, tmp_path / "moved.safetensors")
        save_file({"w": torch.zeros(1 << 20), "v": torch.zeros(1000)}, str(a))
        return out

    monkeypatch.setattr(torchdiff.api, "pair", pair_then_replace)
    assert main(["-q", str(a), str(b)]) == 2
    expected = f"torchdiff: error: {a}: " + CHANGED.format(how="it was replaced by another file") + "\n"
    assert capsys.readouterr().err == expected


def test_unchanged_inputs_are_not_flagged(tmp_path):
    """A file read (atime), copied or hard-linked elsewhere meanwhile is not 'changed'."""
    a, b = _big_pair(tmp_path)
    with torchdiff.load(a) as ckpt:
        a.read_bytes()
        os.link(a, tmp_path / "link.safetensors")
        (tmp_path / "link.safetensors").unlink()
        for h in ckpt.tensors.values():
            h.materialize()
    assert read_all(a) == 2
