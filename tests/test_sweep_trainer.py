"""Hugging Face Trainer checkpoint folders and sharded checkpoints, as fine-tuning users
meet them: ``checkpoint-N/`` folders written by a real ``transformers.Trainer`` run (a
tiny random GPT-2 on random tokens), ``save_pretrained`` with a small ``max_shard_size``,
and the ways an index and its shards disagree.

The truth comes from float64 NumPy over the files' own tensors, and from the files
transformers wrote.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file, save_file

from torchdiff.cli import main
from torchdiff.formats import load

transformers = pytest.importorskip("transformers")
TRAINER_FILES = ["optimizer.pt", "rng_state.pth", "scheduler.pt", "training_args.bin"]
INDEX = "model.safetensors.index.json"


class _Tokens(torch.utils.data.Dataset):
    """Random token rows, the same on every run."""

    def __len__(self):
        return 32

    def __getitem__(self, i):
        ids = torch.randint(0, 100, (16,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A Trainer run's checkpoint-2/ and checkpoint-4/, and the final model saved sharded."""
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("trainer")
    config = transformers.GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    args = transformers.TrainingArguments(
        output_dir=str(root / "out"), max_steps=4, save_steps=2, per_device_train_batch_size=4,
        learning_rate=1e-3, report_to=[], use_cpu=True, disable_tqdm=True)
    transformers.Trainer(model=model, args=args, train_dataset=_Tokens()).train()
    model.save_pretrained(root / "sharded", max_shard_size="50KB")
    return root


def _cli_json(capsys, *argv):
    code = main([*argv, "-o", "json"])
    out = capsys.readouterr()
    return code, json.loads(out.out), out.err


def _directory(records):
    return next(r for r in records if r["type"] == "directory")


def test_trainer_folders_compare_the_weights_and_name_what_was_not_read(runs, capsys):
    old, new = runs / "out" / "checkpoint-2", runs / "out" / "checkpoint-4"
    assert {p.name for p in old.iterdir()} >= {"model.safetensors", *TRAINER_FILES}
    code, records, err = _cli_json(capsys, str(old), str(new))
    assert (code, err) == (0, "")
    a, b = load_numpy(str(old / "model.safetensors")), load_numpy(str(new / "model.safetensors"))
    tensors = {r["path"]: r for r in records if r["type"].startswith("tensor")}
    assert set(tensors) == set(a)
    for name, r in tensors.items():
        x, y = a[name].astype(np.float64), b[name].astype(np.float64)
        d = y - x
        assert r["rel_l2"] == pytest.approx(np.linalg.norm(d) / np.linalg.norm(x), rel=1e-6)
        assert r["max_abs"] == pytest.approx(np.abs(d).max(), rel=1e-6)
        assert r["cosine"] == pytest.approx((x * y).sum() / np.linalg.norm(x) / np.linalg.norm(y), rel=1e-6)
    section = _directory(records)
    assert section["old"] == {"path": str(old), "read": "model.safetensors", "not_read": TRAINER_FILES}
    assert section["new"]["not_read"] == TRAINER_FILES


def test_every_command_says_what_a_trainer_folder_held_beside_the_weights(runs, capsys):
    """A series, inspect and hash said nothing of optimizer.pt and the other Trainer files
    (a pair said it); inspect said "compared". Each now names them, and a comparison says
    where the optimizer state --gradient-analysis reads is."""
    from helpers import run

    folders = sorted((runs / "out").glob("checkpoint-*"))
    assert len(folders) >= 2
    not_read = f"not read: {', '.join(TRAINER_FILES)}"
    code, out, err = run(capsys, "series", *folders)
    assert code == 0, err
    assert all(f"{f}: compared model.safetensors; {not_read}" in " ".join(out.split()) for f in folders)
    code, out, _ = run(capsys, "inspect", folders[0])
    assert code == 0 and f"{folders[0]}: read model.safetensors; {not_read}" in " ".join(out.split())
    code, out, _ = run(capsys, folders[0], folders[1], "--gradient-analysis")
    assert "the optimizer state --gradient-analysis reads is in optimizer.pt" in " ".join(out.split())
    code, out, err = run(capsys, "hash", folders[0])
    assert code == 0 and err == f"torchdiff: note: {folders[0]}: hashed model.safetensors; {not_read}\n"


def _broken(runs, tmp_path, change) -> str:
    """A copy of the real sharded save, with ``change(folder, first_shard_name)`` applied."""
    folder = tmp_path / "broken"
    shutil.copytree(runs / "sharded", folder)
    shards = sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))
    change(folder, shards)
    return str(folder)


def _add_to_shard(folder, shard, tensors):
    state = load_file(str(folder / shard))
    state.update(tensors)
    save_file(state, str(folder / shard), metadata={"format": "pt"})


def test_a_tensor_the_index_does_not_list_is_named_not_passed_over(runs, tmp_path, capsys):
    # Regression: a shard holding an extra tensor compared as "28 unchanged" and said nothing.
    folder = _broken(runs, tmp_path, lambda f, s: _add_to_shard(f, s[0], {"extra.weight": torch.ones(3)}))
    code, records, err = _cli_json(capsys, str(runs / "sharded"), folder)
    assert (code, err) == (0, "")
    shard = sorted(set(json.loads((runs / "sharded" / INDEX).read_text())["weight_map"].values()))[0]
    assert _directory(records)["new"] == {"path": folder, "read": INDEX, "not_read": [f"{shard}:extra.weight"]}
    assert load(folder).info["sharded"]["unlisted_tensors"] == 1


def test_a_second_copy_in_another_shard_is_named_and_the_index_copy_compared(runs, tmp_path, capsys):
    # Regression: the same tensor in two shards (different values) passed in silence.
    weight_map = json.loads((runs / "sharded" / INDEX).read_text())["weight_map"]
    name = next(iter(weight_map))
    listed = weight_map[name]

    def duplicate(folder, shards):
        other = next(s for s in shards if s != listed)
        _add_to_shard(folder, other, {name: load_file(str(folder / listed))[name] + 1})

    folder = _broken(runs, tmp_path, duplicate)
    code, records, _ = _cli_json(capsys, str(runs / "sharded"), folder)
    assert code == 0 and not [r for r in records if r["type"].startswith("tensor")]  # the index's copy: equal
    (entry,) = _directory(records)["new"]["not_read"]
    assert entry.endswith(f":{name}") and not entry.startswith(listed)
    # the index file itself, not the folder: the same entry, under the index's directory
    code, records, _ = _cli_json(capsys, str(runs / "sharded" / INDEX), f"{folder}/{INDEX}")
    assert _directory(records)["new"]["not_read"] == [entry]


def _remove_shard(folder, shards):
    (folder / shards[1]).unlink()


def _drop_listed_tensor(folder, shards):
    state = load_file(str(folder / shards[0]))
    state.pop(sorted(state)[0])
    save_file(state, str(folder / shards[0]), metadata={"format": "pt"})


def _write_index(content):
    return lambda folder, shards: (folder / INDEX).write_text(content)


def _weight_map(value):
    def change(folder, shards):
        index = json.loads((folder / INDEX).read_text())
        index["weight_map"] = value
        (folder / INDEX).write_text(json.dumps(index))
    return change


@pytest.mark.parametrize("change, message", [
    (_remove_shard, "which does not exist"),
    (_drop_listed_tensor, "is not in its shard"),
    (_write_index('{"weight_map": {"a": '), "not a valid JSON index"),
    (_weight_map(["a", "b"]), 'no "weight_map" object in the index'),
    (_weight_map("model.safetensors"), 'no "weight_map" object in the index'),
    (_weight_map({"transformer.wte.weight": 1}), "maps to 1, not a shard file name"),
], ids=["missing-shard", "tensor-not-in-shard", "not-json", "weight-map-list", "weight-map-str", "shard-not-str"])
def test_a_broken_sharded_checkpoint_is_one_line_and_exit_2(runs, tmp_path, capsys, change, message):
    folder = _broken(runs, tmp_path, change)
    assert main([str(runs / "sharded"), folder]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("torchdiff: error: ") and message in err
    assert "Traceback" not in err
