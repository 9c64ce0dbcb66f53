"""Nothing passes silently (issue 18): a filter that selects nothing, a file without
tensors, pickle contents torchdiff cannot show, -r over files it cannot all read, and
flags that do nothing on the command given."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import torchdiff
from torchdiff.errors import CorruptFileError, UsageError
from helpers import run  # noqa: E402 - tests/ is on sys.path


@pytest.fixture
def pair(tmp_path):
    old, new = tmp_path / "old.safetensors", tmp_path / "new.safetensors"
    save_file({"fc.weight": torch.ones(3, 2), "fc.bias": torch.zeros(3)}, str(old))
    save_file({"fc.weight": torch.full((3, 2), 2.0), "fc.bias": torch.zeros(3)}, str(new))
    return old, new


# ---- filters -----------------------------------------------------------------------------


@pytest.mark.parametrize("flag, value, named", [
    ("--path", "nothing_matches", "--path 'nothing_matches'"),
    ("--ignore-keys-regex", "fc", "--ignore-keys-regex 'fc'"),
])
@pytest.mark.parametrize("extra", [(), ("--exit-code",), ("--quiet",), ("--brief",)])
def test_a_filter_selecting_no_tensor_is_a_usage_error(capsys, pair, flag, value, named, extra):
    code, out, err = run(capsys, *pair, flag, value, *extra)
    assert code == 2 and out == ""
    assert err.startswith(f"torchdiff: error: {named} selects no tensor of the 2 compared")


def test_a_filter_selecting_some_tensors_still_runs(capsys, pair):
    code, out, _ = run(capsys, *pair, "--path", "weight", "--exit-code")
    assert code == 1 and "fc.weight" in out and "fc.bias" not in out


def test_api_raises_usage_error_for_an_empty_selection(pair):
    with pytest.raises(UsageError, match=r"--path 'zzz' selects no tensor"):
        torchdiff.compare(*pair, path="zzz")


# ---- files without tensors ----------------------------------------------------------------


def test_a_file_with_no_tensors_is_an_error(capsys, tmp_path, pair):
    empty = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "lr": 0.1}, empty)
    code, out, err = run(capsys, empty, pair[0])
    assert code == 2 and out == ""
    assert f"{empty}: no tensors found (the file holds 2 non-tensor values" in err
    with pytest.raises(CorruptFileError, match="no tensors found"):
        torchdiff.inspect(str(empty))


class _Net(torch.nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.fc = torch.nn.Linear(2, 3)
        with torch.no_grad():
            self.fc.weight.fill_(scale)
            self.fc.bias.zero_()


def test_a_pickled_module_is_read_as_its_state_dict(capsys, tmp_path):
    old, new = tmp_path / "old.pt", tmp_path / "new.pt"
    torch.save(_Net(1.0), old)
    torch.save(_Net(2.0), new)
    code, out, err = run(capsys, old, new, "--unsafe-pickle", "-o", "json")
    assert code == 0, err
    items = json.loads(out)
    assert [(i["type"], i["path"]) for i in items] == [("tensor_changed", "fc.weight")]
    assert items[0]["rel_l2"] == pytest.approx(1.0)  # ‖2·1 − 1‖ / ‖1‖


def test_pickle_numpy_arrays_become_tensors_and_namespaces_metadata(tmp_path):
    def write(path, scale, lr):
        torch.save({"weights": {"w": np.full((2, 3), scale, np.float32)}, "args": argparse.Namespace(lr=lr, depth=2),
                    "step": np.int64(5), "other": object.__new__(_Opaque)}, path)

    old, new = tmp_path / "old.pt", tmp_path / "new.pt"
    write(old, 1.0, 0.1)
    write(new, 3.0, 0.2)
    report = torchdiff.compare(str(old), str(new), unsafe_pickle=True)
    (d,) = list(report)
    assert (d.name, d.status, d.new.shape, d.new.dtype) == ("weights.w", "changed", (2, 3), "float32")
    assert d.metrics.rel_l2 == pytest.approx(2.0)
    meta = report.comparison.new_metadata
    assert meta["args.lr"] == 0.2 and meta["args.depth"] == 2 and meta["step"] == 5
    assert meta["other"] == "<_Opaque>"  # what cannot be shown is listed, by its type
    assert [(m.key, m.old, m.new) for m in report.comparison.metadata_diffs] == [("args.lr", 0.1, 0.2)]


class _Opaque:
    pass


# ---- -r ---------------------------------------------------------------------------------------


class _NeedsCode:
    """What only running code can unpickle: a call into ``os`` (refused even as a record)."""

    def __reduce__(self):
        return (os.system, ("true",))


def _trainer_dir(root: Path, scale: float, needs_code: bool = True) -> Path:
    root.mkdir()
    save_file({"w": torch.full((4,), scale)}, str(root / "model.safetensors"))
    # rng_state.pth as the HF Trainer writes it (numpy's RNG state: read by numpy's own
    # reconstructors), here with something only code can load unless asked not to.
    rng = {"python": 1, "numpy": np.random.RandomState(0).get_state(), "cpu": torch.zeros(3, dtype=torch.uint8)}
    if needs_code:
        rng["hook"] = _NeedsCode()
    torch.save(rng, root / "rng_state.pth")
    return root


def test_recursive_reads_the_hf_trainers_rng_state(capsys, tmp_path):
    """numpy's RNG state in rng_state.pth loads weights-only: every file of the folder is compared."""
    old = _trainer_dir(tmp_path / "checkpoint-1", 1.0, needs_code=False)
    new = _trainer_dir(tmp_path / "checkpoint-2", 2.0, needs_code=False)
    code, out, err = run(capsys, "-r", old, new, "-o", "json")
    assert code == 0 and err == ""
    assert [i["path"] for i in json.loads(out)] == ["model.safetensors:w"]  # rng_state.pth: read, and equal
    with torchdiff.load(old / "rng_state.pth") as ckpt:
        state = np.random.RandomState(0).get_state()
        assert torch.equal(ckpt["numpy.1"], torch.from_numpy(state[1])) and ckpt.metadata["numpy.0"] == "MT19937"


def test_a_trainer_folder_says_which_files_it_did_not_read(capsys, tmp_path):
    """Without -r a Trainer checkpoint folder is its weights file; the other checkpoint
    files it holds are named, not passed over in silence."""
    old = _trainer_dir(tmp_path / "checkpoint-1", 1.0, needs_code=False)
    new = _trainer_dir(tmp_path / "checkpoint-2", 2.0, needs_code=False)
    torch.save({"state": {}, "param_groups": []}, old / "optimizer.pt")
    code, out, err = run(capsys, old, new, "-o", "json")
    assert code == 0 and err == ""
    items = json.loads(out)
    assert [i["path"] for i in items if i["type"].startswith("tensor")] == ["w"]
    (directory,) = [i for i in items if i["type"] == "directory"]
    assert directory["not_read"] == 2
    assert directory["old"] == {"path": str(old), "read": "model.safetensors", "not_read": ["optimizer.pt", "rng_state.pth"]}
    assert directory["new"]["not_read"] == ["rng_state.pth"]
    code, out, err = run(capsys, old, new)
    text = " ".join(out.split())
    assert f"note: {old}: compared model.safetensors; not read: optimizer.pt, rng_state.pth (-r compares" in text
    (tmp_path / "single").mkdir()
    save_file({"w": torch.ones(4)}, str(tmp_path / "single" / "model.safetensors"))
    code, out, err = run(capsys, tmp_path / "single", new / "model.safetensors", "-o", "json")
    assert not any(i["type"] == "directory" for i in json.loads(out))  # nothing else there: nothing to say


def test_recursive_passes_unsafe_pickle_to_every_file(capsys, tmp_path):
    old = _trainer_dir(tmp_path / "checkpoint-1", 1.0)
    new = _trainer_dir(tmp_path / "checkpoint-2", 2.0)
    code, out, err = run(capsys, "-r", old, new, "--unsafe-pickle", "-o", "json")
    assert code == 0, err
    paths = [i["path"] for i in json.loads(out)]
    assert paths == ["model.safetensors:w"]  # rng_state.pth was read (and equal on both sides)


def test_recursive_reports_an_unreadable_file_and_compares_the_rest(capsys, tmp_path):
    old = _trainer_dir(tmp_path / "checkpoint-1", 1.0)
    new = _trainer_dir(tmp_path / "checkpoint-2", 2.0)
    code, out, err = run(capsys, "-r", old, new)
    assert code == 2
    assert "  ~ model.safetensors:w: rel_l2=1, max_abs=1, cosine=1" in out
    assert "unreadable_files: files=2" in out
    assert err.count("rng_state.pth: refused, the pickle would run code") == 2
    code, out, err = run(capsys, "-r", old, new, "-o", "json")
    items = json.loads(out)
    (unreadable,) = [i for i in items if i["type"] == "unreadable_files"]
    assert [(f["side"], f["path"]) for f in unreadable["files"]] == [("old", "rng_state.pth"), ("new", "rng_state.pth")]
    assert code == 2


@pytest.mark.parametrize("flag", ["--quiet", "--brief"])
def test_recursive_quiet_still_exits_2_on_an_unreadable_file(capsys, tmp_path, flag):
    old = _trainer_dir(tmp_path / "checkpoint-1", 1.0)
    new = _trainer_dir(tmp_path / "checkpoint-2", 2.0)
    code, out, err = run(capsys, "-r", old, new, flag)
    assert code == 2 and out == "" and "rng_state.pth: refused" in err


def test_recursive_passes_format_to_every_file(capsys, tmp_path):
    for name, scale in (("a", 1.0), ("b", 2.0)):
        (tmp_path / name).mkdir()
        torch.save({"w": torch.full((2,), scale)}, tmp_path / name / "x.pt")
    code, out, err = run(capsys, "-r", tmp_path / "a", tmp_path / "b", "--format", "safetensors")
    assert code == 2  # forced format reaches the files: a .pt is not safetensors
    assert "x.pt" in err and "safetensors" in err


# ---- inapplicable flags -----------------------------------------------------------------------


@pytest.mark.parametrize("flags, named", [(("--sort", "natural"), "--sort"), (("--plateau-steps", "3"), "--plateau-steps")])
def test_series_only_flags_warn_on_a_two_file_compare(capsys, pair, flags, named):
    code, out, err = run(capsys, *pair, *flags)
    assert code == 0 and "1 changed" in out
    assert err == (f"torchdiff: warning: {named} applies to a series (torchdiff series C1 C2 C3 ...) and does "
                   "nothing on a two-checkpoint compare\n")


def test_no_warning_without_them(capsys, pair):
    assert run(capsys, *pair)[2] == ""


# ---- help and suggestions -----------------------------------------------------------------


def test_help_lists_short_flags(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    assert "  -o, --output FORMAT" in out and "  -r, --recursive" in out and "  -q, --quiet" in out


def test_help_fits_the_terminal(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    out = run(capsys, "--help")[1]
    assert max(len(line) for line in out.splitlines()) <= 100


def test_a_prefix_suggests_the_flag_it_starts(capsys, pair):
    code, _, err = run(capsys, *pair, "--anomaly")
    assert code == 2 and "unknown flag --anomaly (did you mean --anomaly-detection?)" in err
