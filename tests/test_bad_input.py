"""Inputs torchdiff must refuse: one ``torchdiff: error: ...`` line on stderr, exit 2,
no traceback; through the API, a TorchDiffError subclass with a message that names
the file and the problem."""

from __future__ import annotations

import os
import pickle
import shlex
import struct
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import torchdiff
from torchdiff.cli import main


def cli_error(capsys, *argv) -> str:
    """Run main(argv); assert exit 2, nothing on stdout, one error line on stderr; return it."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("torchdiff: error: "), err
    assert "Traceback" not in err and "internal error" not in err, err
    return err.rstrip("\n")


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.safetensors"
    save_file({"w": torch.randn(100), "b": torch.randn(10)}, str(path))
    return path


def load_all(path, **kw):
    """Open a checkpoint and read every tensor's values (errors may come at either step)."""
    with torchdiff.load(path, **kw) as ckpt:
        for h in ckpt.tensors.values():
            h.materialize()


# ---- missing, directories ---------------------------------------------------------------


def test_missing_file(capsys, good, tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(torchdiff.InputNotFoundError, match=r"nope\.safetensors: no such file or directory$"):
        torchdiff.load(missing)
    with pytest.raises(torchdiff.InputNotFoundError, match=r"nope\.safetensors: no such file or directory$"):
        torchdiff.compare(good, missing)
    assert cli_error(capsys, good, missing) == f"torchdiff: error: {missing}: no such file or directory"
    assert cli_error(capsys, missing, good) == f"torchdiff: error: {missing}: no such file or directory"
    assert cli_error(capsys, "inspect", missing) == f"torchdiff: error: {missing}: no such file or directory"


@pytest.mark.parametrize("target", ["nowhere.pt", "loop"])
def test_a_link_to_nothing_says_so_without_a_hub_lookup(capsys, good, tmp_path, monkeypatch, target):
    """A dangling symbolic link, or a loop of links, was "no such file or directory" after
    a Hugging Face Hub lookup of its name (seconds); it names the link and its target, in
    every command, and never asks the Hub."""
    from torchdiff.formats import hub

    monkeypatch.setattr(hub, "resolve_source", lambda *a, **k: pytest.fail("a link is no Hub id"))
    link = tmp_path / "link.pt"
    os.symlink(tmp_path / target, link)
    if target == "loop":
        os.symlink(link, tmp_path / "loop")
    said = f"torchdiff: error: {link}: a symbolic link to {str(tmp_path / target)!r}, which does not exist (or the links loop)"
    monkeypatch.chdir(tmp_path)
    for argv in ([good, link], [link, good], ["inspect", link], ["series", good, link, good], ["hash", link],
                 ["link.pt", good]):
        err = cli_error(capsys, *argv)
        assert err == said.replace(str(link), "link.pt") if argv[0] == "link.pt" else err == said, err
    with pytest.raises(torchdiff.InputNotFoundError, match="a symbolic link to"):
        torchdiff.compare(link, good)


def test_a_reader_refused_by_the_system_is_one_error(good, tmp_path, monkeypatch):
    """A file the system refuses mid-read (PermissionError, EIO) gave the Python API a raw
    OSError from the pickle, NumPy, MATLAB and GGUF readers: it is a CorruptFileError
    naming the file, as for safetensors."""
    from torchdiff.formats import torch_pickle

    path = tmp_path / "refused.pt"
    torch.save({"w": torch.ones(2)}, path)

    def refuse(p, *a, **k):
        raise PermissionError(13, "Permission denied", str(p))

    monkeypatch.setattr(torch_pickle, "load", refuse)
    with pytest.raises(torchdiff.CorruptFileError, match=rf"^{path}: cannot read \(Permission denied\)$"):
        torchdiff.compare(path, good)


def test_directory_where_a_file_is_expected(capsys, good, tmp_path):
    d = tmp_path / "dir"
    d.mkdir()
    save_file({"w": torch.ones(1)}, str(d / "a.safetensors"))
    save_file({"w": torch.ones(1)}, str(d / "b.safetensors"))
    with pytest.raises(torchdiff.InputNotFoundError, match=r"dir: is a directory \(use -r"):
        torchdiff.load(d, format="safetensors")
    assert str(d) in cli_error(capsys, d, good)
    assert str(d) in cli_error(capsys, good, d)
    err = cli_error(capsys, good, d, "--format", "safetensors")
    assert err == f"torchdiff: error: {d}: is a directory (use -r to compare directories file by file)"
    err = cli_error(capsys, "-r", d, good)
    assert err == "torchdiff: error: -r compares two directories, or two files; got a directory and a file"
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    err = cli_error(capsys, "-r", empty, d)
    assert f"{empty}: no checkpoint files found" in err


# ---- truncated, empty, unknown ---------------------------------------------------------------


@pytest.mark.parametrize("keep", [0, 4, 8, 20, 0.5, -1])
def test_truncated_safetensors(capsys, good, tmp_path, keep):
    data = good.read_bytes()
    cut = keep if isinstance(keep, int) and keep >= 0 else (int(len(data) * keep) if keep > 0 else len(data) - 1)
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[:cut])
    with pytest.raises(torchdiff.CorruptFileError, match=r"cut\.safetensors: not a valid safetensors file \(.+\)"):
        load_all(bad)
    assert "cut.safetensors: not a valid safetensors file" in cli_error(capsys, good, bad)


def test_safetensors_header_lies_about_its_length(capsys, good, tmp_path):
    data = good.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    bad = tmp_path / "lie.safetensors"
    bad.write_bytes(struct.pack("<Q", n + 1000) + data[8:])
    with pytest.raises(torchdiff.CorruptFileError, match=r"lie\.safetensors: not a valid safetensors file"):
        load_all(bad)
    bad.write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(torchdiff.CorruptFileError, match=r"lie\.safetensors: not a valid safetensors file"):
        load_all(bad)


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.99])
def test_truncated_torch_zip(capsys, tmp_path, fraction):
    full = tmp_path / "full.pt"
    torch.save({"w": torch.randn(200)}, full)
    data = full.read_bytes()
    bad = tmp_path / "cut.pt"
    bad.write_bytes(data[: int(len(data) * fraction)])
    # cut before the end: the zip's central directory is gone, and the message says truncated
    with pytest.raises(torchdiff.CorruptFileError, match=r"cut\.pt: truncated or damaged PyTorch checkpoint "
                                                         r"\(a zip archive without its central directory; copy"):
        load_all(bad)
    assert "cut.pt: truncated or damaged PyTorch checkpoint" in cli_error(capsys, full, bad)


def test_truncated_legacy_pickle(capsys, tmp_path):
    full = tmp_path / "legacy.pt"
    torch.save({"w": torch.randn(200)}, full, _use_new_zipfile_serialization=False)
    bad = tmp_path / "cut.pt"
    bad.write_bytes(full.read_bytes()[:-50])
    with pytest.raises(torchdiff.CorruptFileError, match=r"cut\.pt: not a readable PyTorch checkpoint \(.+\)"):
        load_all(bad)
    cli_error(capsys, full, bad)


@pytest.mark.parametrize("name,error,message", [
    ("empty.safetensors", torchdiff.CorruptFileError, r"empty\.safetensors: not a valid safetensors file"),
    ("empty.pt", torchdiff.CorruptFileError, r"empty\.pt: not a PyTorch checkpoint"),
    ("empty", torchdiff.UnknownFormatError, r"empty: unknown checkpoint format \(extensions read: .*--format"),
])
def test_empty_file(capsys, good, tmp_path, name, error, message):
    bad = tmp_path / name
    bad.write_bytes(b"")
    with pytest.raises(error, match=message):
        load_all(bad)
    cli_error(capsys, bad, good)


@pytest.mark.parametrize("name,content", [
    ("notes.txt", b"hello, not a checkpoint\n"),
    ("model.onnx", bytes(range(256))),
    ("config.json", b'{"hidden": 4}'),
])
def test_unknown_extension(capsys, good, tmp_path, name, content):
    bad = tmp_path / name
    bad.write_bytes(content)
    stem = name.replace(".", r"\.")
    with pytest.raises(torchdiff.UnknownFormatError, match=rf"{stem}: unknown checkpoint format"):
        torchdiff.load(bad)
    err = cli_error(capsys, good, bad)
    assert "unknown checkpoint format" in err and "--format" in err


def test_not_torch_fixture_files(capsys, fixtures_dir):
    m1, m2 = fixtures_dir / "model1.pt", fixtures_dir / "model2.pt"
    with pytest.raises(torchdiff.CorruptFileError, match=r"model1\.pt: not a PyTorch checkpoint"):
        torchdiff.load(m1)
    err = cli_error(capsys, m1, m2)
    assert err == f"torchdiff: error: {m1}: not a PyTorch checkpoint (neither a zip archive nor a pickle)"
    cli_error(capsys, "inspect", m2)
    cli_error(capsys, m1, m2, "--format", "safetensors")


# ---- malicious pickles --------------------------------------------------------------------


class Evil:
    """Unpickling this runs a shell command that creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


def write_evil(path, marker, how: str) -> None:
    if how == "zip":
        torch.save({"w": torch.ones(2), "payload": Evil(marker)}, path)
    elif how == "legacy":
        torch.save({"w": torch.ones(2), "payload": Evil(marker)}, path, _use_new_zipfile_serialization=False)
    else:
        with open(path, "wb") as f:
            pickle.dump({"payload": Evil(marker)}, f, protocol=2)


@pytest.mark.parametrize("how", ["zip", "legacy", "raw"])
def test_malicious_pickle_is_refused_never_run(capsys, tmp_path, how):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    write_evil(path, marker, how)
    # The payload is live: the plain pickle module would run it.
    if how == "raw":
        probe = tmp_path / "probe"
        pickle.loads(pickle.dumps(Evil(probe)))
        assert probe.exists()
    with pytest.raises(torchdiff.UnsafeCheckpointError,
                       match=r"evil\.pt: refused, the pickle would run code to load \(.*system.*\)"):
        torchdiff.load(path)
    assert not marker.exists()
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(2)}, good)
    for argv in ((good, path), (path, good), ("inspect", path), ("--stats", "-o", "json", good, path)):
        err = cli_error(capsys, *argv)
        assert "refused, the pickle would run code" in err and "--unsafe-pickle" in err
    assert not marker.exists()


# ---- random bytes (bounded fuzzing) ---------------------------------------------------------

PREFIXES = [
    b"",
    b"\x80\x02",  # a pickle (legacy torch.save)
    b"\x80\x04\x95",
    struct.pack("<Q", 40) + b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}',  # safetensors-like
    struct.pack("<Q", 16) + b"{",
    b"PK\x03\x04",  # a zip
    b"\x93NUMPY",
]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prefix=st.sampled_from(PREFIXES), body=st.binary(max_size=300),
       ext=st.sampled_from([".safetensors", ".pt", ".bin", ""]))
def test_random_bytes_raise_only_torchdiff_errors(tmp_path, prefix, body, ext):
    path = tmp_path / f"fuzz{ext}"
    path.write_bytes(prefix + body)
    try:
        load_all(path)
    except torchdiff.TorchDiffError as e:
        assert str(path) in str(e) and "\n" not in str(e)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_flipped_bytes_in_a_real_file(tmp_path, data):
    """A real safetensors or torch file with a few bytes changed: loads or refuses cleanly."""
    kind = data.draw(st.sampled_from(["safetensors", "pt"]))
    path = tmp_path / f"flip.{kind}"
    tensors = {"a.weight": torch.arange(12.0).reshape(3, 4), "b": torch.ones(3, dtype=torch.bfloat16)}
    if kind == "safetensors":
        save_file(tensors, str(path))
    else:
        torch.save(tensors, path)
    raw = bytearray(path.read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    path.write_bytes(bytes(raw))
    try:
        torchdiff.compare(path, path, device="cpu")
    except torchdiff.TorchDiffError as e:
        assert "\n" not in str(e)


@pytest.mark.parametrize("name,content", [
    # A pickle cut inside an opcode's argument: torch's unpickler raises struct.error.
    ("short.pt", b"\x80\x02M"),
    ("short4.pt", b"\x80\x02X\x01"),
    # A zip64 end locator claiming two disks: zipfile.is_zipfile raises BadZipFile.
    ("multidisk.pt", b"PK\x06\x07" + struct.pack("<LQL", 1, 0, 2) + b"PK\x05\x06" + bytes(18)),
])
def test_malformed_torch_files_found_by_fuzzing(capsys, good, tmp_path, name, content):
    bad = tmp_path / name
    bad.write_bytes(content)
    with pytest.raises(torchdiff.CorruptFileError, match=rf"{name.replace('.', '[.]')}: not a readable PyTorch checkpoint"):
        load_all(bad)
    cli_error(capsys, bad, good)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_plain_pickles_of_any_protocol_fail_in_one_line(capsys, good, tmp_path, protocol):
    """A pickle that is no torch checkpoint: one error line, no torch warning on stderr."""
    bad = tmp_path / "plain.pt"
    bad.write_bytes(pickle.dumps({"x": 1.5, "y": [1, 2]}, protocol=protocol))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # a warning would print on the CLI's stderr
        with pytest.raises(torchdiff.TorchDiffError, match=r"plain\.pt: "):
            load_all(bad)
    assert [str(w.message) for w in caught] == []
    err = cli_error(capsys, bad, good)
    assert "plain.pt" in err and "warning" not in err.lower()
    # The reason torch gave, not its boilerplate about the weights_only default.
    assert "In PyTorch 2.6" not in err


@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_pickle_of_any_protocol_is_never_run(capsys, tmp_path, protocol):
    marker = tmp_path / "PWNED"
    bad = tmp_path / "evil.pt"
    bad.write_bytes(pickle.dumps({"payload": Evil(marker)}, protocol=protocol))
    with pytest.raises((torchdiff.UnsafeCheckpointError, torchdiff.CorruptFileError), match=r"evil\.pt: "):
        load_all(bad)
    cli_error(capsys, bad, bad)
    assert not marker.exists()


class _Pickled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(2, 2)


def test_a_legacy_pickled_module_is_refused_in_one_short_line(tmp_path, capsys):
    """``torch.save(model)`` in the legacy (non-zip) format names the module's class: the
    line says which, whole, without torch's add_safe_globals advice (cut mid-word at 200
    characters before)."""
    path = tmp_path / "module_legacy.pt"
    torch.save(_Pickled(), path, _use_new_zipfile_serialization=False)
    err = cli_error(capsys, path, path)
    assert "\n" not in err.strip() and "add_safe_globals" not in err
    assert f"refused, the pickle would run code to load (it calls {__name__}._Pickled); " in err


def test_torch_archives_that_are_not_checkpoints_are_named(tmp_path, capsys):
    """A TorchScript archive (weights behind code) and a torch.export archive saved under
    .pt: one line that says what the file is; --unsafe-pickle reads the TorchScript one."""
    model = torch.nn.Linear(3, 2)
    torch.jit.save(torch.jit.script(model), tmp_path / "scripted.pt")
    err = cli_error(capsys, "inspect", tmp_path / "scripted.pt")
    assert "a TorchScript archive (torch.jit.save)" in err and "\n" not in err.strip()
    assert main(["inspect", str(tmp_path / "scripted.pt"), "--unsafe-pickle"]) == 0
    capsys.readouterr()
    torch.export.save(torch.export.export(model, (torch.ones(1, 3),)), tmp_path / "exported.pt")
    err = cli_error(capsys, "inspect", tmp_path / "exported.pt")
    assert "a torch.export archive (.pt2, torch.export.save), not a torch.save checkpoint" in err


def test_pickle_protocol_4_says_what_reads_it(tmp_path, capsys):
    """torch's weights-only loader lacks protocol 4's FRAME opcode: the line says so and
    names --unsafe-pickle ('Unsupported operand 149' before)."""
    torch.save({"w": torch.ones(2)}, tmp_path / "p4.pt", pickle_protocol=4)
    try:
        torchdiff.load(tmp_path / "p4.pt").close()
    except torchdiff.CorruptFileError as e:
        assert "pickle protocol 4 or 5" in str(e) and "--unsafe-pickle" in str(e)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_a_named_pipe_or_a_device_is_refused_not_waited_on(tmp_path, good, capsys):
    """A FIFO with no writer blocked the first read forever; a device is no checkpoint.
    Run in a child with a timeout, so that a regression fails instead of hanging."""
    import subprocess
    import sys

    fifo = tmp_path / "p.safetensors"
    os.mkfifo(fifo)
    for argv in ([fifo, good], [good, fifo], ["inspect", fifo], ["hash", fifo]):
        run = subprocess.run([sys.executable, "-m", "torchdiff", *map(str, argv)], capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 2 and run.stdout == ""
        assert run.stderr == (f"torchdiff: error: {fifo}: is a named pipe, not a checkpoint file (torchdiff reads "
                              "regular files and directories)\n")
    if os.path.exists("/dev/null"):
        err = cli_error(capsys, "/dev/null", good, "--format", "safetensors")
        assert err == ("torchdiff: error: /dev/null: is a character device, not a checkpoint file (torchdiff reads "
                       "regular files and directories)")
