"""Hugging Face Hub ids as inputs (issue 18), offline against a cache laid out as
huggingface_hub lays it out (its own ``repo_folder_name``, blobs + snapshots + refs) and
recognised by huggingface_hub's own ``scan_cache_dir`` and ``snapshot_download``."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import save_file

import torchdiff
from torchdiff.cli import main
from torchdiff.formats import hub

huggingface_hub = pytest.importorskip("huggingface_hub")
REPO = "torchdiff-tests/tiny"


def _add_snapshot(cache, repo: str, commit: str, files: dict[str, bytes], refs: tuple[str, ...]) -> None:
    """One revision of ``repo`` in ``cache``: blobs by sha256, a snapshot of relative
    symlinks to them, and the refs naming the commit."""
    from huggingface_hub.file_download import repo_folder_name

    root = cache / repo_folder_name(repo_id=repo, repo_type="model")
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, data in files.items():
        digest = hashlib.sha256(data).hexdigest()
        (root / "blobs" / digest).write_bytes(data)
        os.symlink(os.path.join("..", "..", "blobs", digest), snap / name)
    for ref in refs:
        (root / "refs" / ref).write_text(commit)


def _safetensors_bytes(tmp_path, tensors) -> bytes:
    path = tmp_path / "tmp.safetensors"
    save_file(tensors, str(path))
    return path.read_bytes()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    config = json.dumps({"model_type": "gpt2", "tie_word_embeddings": True}).encode()
    main_weights = {"transformer.wte.weight": torch.ones(4, 2), "transformer.h.0.w": torch.ones(3)}
    v1_weights = {"transformer.wte.weight": torch.full((4, 2), 2.0), "transformer.h.0.w": torch.ones(3)}
    _add_snapshot(cache, REPO, "a" * 40, {"model.safetensors": _safetensors_bytes(tmp_path, main_weights),
                                          "config.json": config, "optimizer.pt": b"not fetched"}, ("main",))
    _add_snapshot(cache, REPO, "b" * 40, {"model.safetensors": _safetensors_bytes(tmp_path, v1_weights),
                                          "config.json": config}, ("v1",))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    local = tmp_path / "local.safetensors"
    save_file({"transformer.wte.weight": torch.ones(4, 2), "transformer.h.0.w": torch.full((3,), 1.5),
               "lm_head.weight": torch.ones(4, 2)}, str(local))
    monkeypatch.chdir(tmp_path)
    return cache, local


def test_the_cache_is_huggingface_hubs_own_layout(cache):
    info = huggingface_hub.scan_cache_dir(cache[0])
    (repo,) = info.repos
    assert repo.repo_id == REPO and {r.commit_hash for r in repo.revisions} == {"a" * 40, "b" * 40}
    folder = huggingface_hub.snapshot_download(REPO, local_files_only=True)
    assert folder.endswith("a" * 40)


@pytest.mark.parametrize("name, hub_id", [
    ("gpt2", True), ("openai-community/gpt2", True), ("model.safetensors", False), ("a/b/c", False),
    ("../x", False), ("/abs/path", False), ("-x", False), ("org/name.bin", False),
])
def test_what_looks_like_a_hub_id(name, hub_id):
    assert hub.looks_like_hub_id(name) is hub_id


def test_compare_a_hub_id_offline(cache, capsys):
    _, local = cache
    code = main([REPO, str(local), "-o", "json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    items = {i["path"]: i for i in json.loads(out)}
    assert set(items) == {"transformer.h.0.w"}  # lm_head.weight is tied to wte (config.json), not "added"
    assert items["transformer.h.0.w"]["rel_l2"] == pytest.approx(0.5)


def test_revision(cache):
    _, local = cache
    report = torchdiff.compare(REPO, str(local), revision="v1")
    wte = {d.name: d for d in report}["transformer.wte.weight"]
    assert wte.old.mean == 2.0 and wte.status == "changed"


def test_an_existing_path_wins(cache, tmp_path):
    _, local = cache
    folder = tmp_path / REPO
    folder.mkdir(parents=True)
    save_file({"x": torch.zeros(2)}, str(folder / "model.safetensors"))
    report = torchdiff.inspect(REPO)
    assert [d.name for d in report] == ["x"]


def test_an_unknown_id_offline_is_one_error(cache, capsys):
    code = main(["nobody/nothing", str(cache[1])])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("torchdiff: error: nobody/nothing: no such file or directory, and no model "
                          "'nobody/nothing' in the local cache (offline: HF_HUB_OFFLINE is set)")


def test_online_downloads_only_weights(monkeypatch, tmp_path):
    calls = []

    def fake(repo_id, revision=None, allow_patterns=None, local_files_only=False):
        calls.append((repo_id, revision, tuple(allow_patterns), local_files_only))
        folder = tmp_path / "snap"
        folder.mkdir(exist_ok=True)
        if "*.safetensors" not in allow_patterns:  # the .bin fallback
            torch.save({"w": torch.ones(1)}, folder / "pytorch_model.bin")
        return str(folder)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    folder = hub.resolve("org/model", revision="v2")
    assert os.listdir(folder) == ["pytorch_model.bin"]
    assert calls == [
        ("org/model", "v2", ("*.safetensors", "*.safetensors.index.json", "config.json"), False),
        ("org/model", "v2", ("pytorch_model*.bin", "pytorch_model.bin.index.json", "config.json"), False),
    ]
    for _, _, patterns, _ in calls:  # never optimizer state or tokenizer files
        assert not any("optimizer" in p or "tokenizer" in p or p == "*" for p in patterns)


def test_a_hub_snapshots_other_cached_files_are_not_reported(cache):
    """The snapshot folder may hold files the cache kept from elsewhere (here optimizer.pt):
    the Hub reader chose the weights, so no directory section lists what it did not read."""
    _, local = cache
    assert torchdiff.compare(REPO, str(local)).analysis("directory") is None
    assert torchdiff.inspect(REPO).analysis("directory") is None
    folder = huggingface_hub.snapshot_download(REPO, local_files_only=True)
    assert torchdiff.inspect(folder).analysis("directory").data["new"]["not_read"] == ["optimizer.pt"]
