"""safetensors and torch readers: dtypes round-trip, metadata, nested training
checkpoints, tied and non-contiguous tensors, legacy pickles, third-party fixtures."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import torchdiff
from torchdiff.formats import detect_format, dtype_name

OPTIONAL = ["float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "uint16", "uint32", "uint64"]
ROUND_TRIP_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                     torch.int16, torch.int8, torch.uint8, torch.bool]
ROUND_TRIP_DTYPES += [getattr(torch, n) for n in OPTIONAL if hasattr(torch, n)]
SHAPES = [(), (0,), (1,), (2, 3), (4, 0, 2), (129,)]


def sample(dtype: torch.dtype, shape, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    if dtype.is_floating_point:
        x = (torch.randn(n, generator=g) * 3).to(dtype)
    elif dtype == torch.bool:
        x = torch.rand(n, generator=g) < 0.5
    else:
        x = torch.randint(0, 100, (n,), generator=g).to(dtype)
    return x.reshape(shape)


def raw(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_same_tensor(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and tuple(got.shape) == tuple(want.shape)
    assert raw(got) == raw(want)


def tensors_for_round_trip() -> dict[str, torch.Tensor]:
    out = {}
    for i, dtype in enumerate(ROUND_TRIP_DTYPES):
        for j, shape in enumerate(SHAPES):
            out[f"{dtype_name(dtype)}.s{j}"] = sample(dtype, shape, seed=10 * i + j)
    return out


def check_round_trip(ckpt, tensors) -> None:
    assert set(ckpt.tensors) == set(tensors)
    for name, want in tensors.items():
        h = ckpt.tensors[name]
        assert h.shape == tuple(want.shape), name
        assert h.dtype == want.dtype and h.storage_dtype == dtype_name(want.dtype), name
        assert h.nbytes == want.numel() * want.element_size(), name
        assert_same_tensor(h.materialize(), want)


# ---- safetensors ------------------------------------------------------------------------


def test_safetensors_every_dtype_round_trips(write_safetensors):
    tensors = tensors_for_round_trip()
    path = write_safetensors("all.safetensors", tensors, metadata={"format": "pt", "note": "x"})
    with torchdiff.load(path) as ckpt:
        assert ckpt.format == "safetensors"
        check_round_trip(ckpt, tensors)
        assert ckpt.info["metadata"] == {"format": "pt", "note": "x"}
        assert all(h.mapped for h in ckpt.tensors.values())
    # And the engine measures every one of them (nothing skipped for its dtype).
    report = torchdiff.compare(path, path, device="cpu")
    assert len(report) == len(tensors) and all(d.status == "unchanged" and d.metrics.equal for d in report)
    for d in report:
        t = tensors[d.name]
        assert d.old.dtype == dtype_name(t.dtype) and d.old.numel == t.numel()
        if t.numel():
            assert d.old.max == pytest.approx(float(t.to(torch.float64).max()))


def test_safetensors_metadata_without_dunder_metadata(write_safetensors):
    path = write_safetensors("m.safetensors", {"w": torch.ones(2)})
    with torchdiff.load(path) as ckpt:
        assert ckpt.info["metadata"] == {} and ckpt.metadata == {}


def test_safetensors_without_extension_is_sniffed(write_safetensors, tmp_path):
    path = write_safetensors("weights", {"w": torch.arange(4.0)})
    assert detect_format(str(path)) == "safetensors"
    with torchdiff.load(path) as ckpt:
        assert_same_tensor(ckpt["w"], torch.arange(4.0))


# ---- torch pickles ----------------------------------------------------------------------


# Dtypes newer than the legacy (pre-zip) format: torch writes them but cannot read
# them back (no typed storage class), with or without weights_only.
NOT_LEGACY = {getattr(torch, n) for n in OPTIONAL if hasattr(torch, n)}


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_torch_every_dtype_round_trips(write_pt, legacy):
    tensors = tensors_for_round_trip()
    tensors["complex"] = torch.randn(3, dtype=torch.complex64)
    if legacy:
        tensors = {k: v for k, v in tensors.items() if v.dtype not in NOT_LEGACY}
    path = write_pt("all.pt", tensors, legacy=legacy)
    with torchdiff.load(path) as ckpt:
        assert ckpt.format == "torch"
        check_round_trip(ckpt, tensors)
        # Zip files are memory-mapped; legacy pickles cannot be, and are read into memory.
        assert all(h.mapped is (not legacy) for h in ckpt.tensors.values())


def _as_saved_from_cuda(path) -> None:
    """Rewrite a CPU-saved torch file as torch writes it from cuda:0: the storages'
    location tag in the pickle says ``cuda:0`` (the bytes are the same)."""
    import zipfile

    cpu, cuda = b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0"  # BINUNICODE, protocol 2
    if not zipfile.is_zipfile(path):
        blob = path.read_bytes()
        assert cpu in blob
        path.write_bytes(blob.replace(cpu, cuda))
        return
    with zipfile.ZipFile(path) as z:
        members = [(info, z.read(info.filename)) for info in z.infolist()]
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        for info, data in members:
            if info.filename.endswith("data.pkl"):
                assert cpu in data
                data = data.replace(cpu, cuda)
            z.writestr(info, data)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_checkpoint_saved_from_cuda_reads_on_a_cpu_machine(write_pt, legacy):
    """torch.load without map_location refuses a CUDA-saved file where CUDA is absent;
    torchdiff reads it onto the CPU, with the same values."""
    tensors = {"w": torch.randn(4, 4), "b": torch.arange(4.0)}
    path = write_pt("from_cuda.pt", tensors, legacy=legacy)
    _as_saved_from_cuda(path)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)
    with torchdiff.load(path) as ckpt:
        for name, expected in tensors.items():
            got = ckpt[name]
            assert got.device.type == "cpu" and torch.equal(got, expected), name
    report = torchdiff.compare(path, write_pt("cpu.pt", {"w": tensors["w"] + 1, "b": tensors["b"]}), device="cpu")
    assert [d.status for d in report] == ["changed", "unchanged"]


@pytest.mark.parametrize("ext", [".pt", ".pth", ".bin", ".ckpt", ""])
def test_torch_extensions_and_sniffing(write_pt, ext):
    path = write_pt(f"model{ext}", {"w": torch.ones(3)})
    assert detect_format(str(path)) == "torch"
    with torchdiff.load(path) as ckpt:
        assert list(ckpt.tensors) == ["w"]


def training_checkpoint(lr: float, epoch: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model(torch.randn(5, 3)).pow(2).sum().backward()
    opt.step()
    return {
        "model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch, "lr": lr,
        "loss": 0.25, "config": {"hidden": 4, "act": "relu", "dropout": None, "sizes": [3, 4, 2]},
    }


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_nested_training_checkpoint_is_flattened(write_pt, legacy):
    obj = training_checkpoint(1e-3, 3)
    path = write_pt("ckpt.ckpt", obj, legacy=legacy)
    with torchdiff.load(path) as ckpt:
        names = set(ckpt.tensors)
        assert {"model.0.weight", "model.0.bias", "model.2.weight", "model.2.bias"} <= names
        assert {"optimizer.state.0.exp_avg", "optimizer.state.0.exp_avg_sq", "optimizer.state.3.exp_avg"} <= names
        assert_same_tensor(ckpt["model.2.weight"], obj["model"]["2.weight"])
        assert_same_tensor(ckpt["optimizer.state.1.exp_avg_sq"], obj["optimizer"]["state"][1]["exp_avg_sq"])
        md = ckpt.metadata
        assert md["epoch"] == 3 and md["lr"] == 1e-3 and md["loss"] == 0.25
        assert md["config.hidden"] == 4 and md["config.act"] == "relu" and md["config.dropout"] is None
        assert md["config.sizes"] == [3, 4, 2]
        assert md["optimizer.param_groups.0.lr"] == 1e-3
        assert not any(isinstance(v, torch.Tensor) for v in md.values())


@pytest.mark.skipif(not NOT_LEGACY, reason="no float8/uint16+ dtypes in this torch")
def test_legacy_pickle_with_a_new_dtype_is_refused_cleanly(write_pt):
    dtype = sorted(NOT_LEGACY, key=str)[0]
    path = write_pt("new_dtype.pt", {"w": torch.zeros(3, dtype=dtype)}, legacy=True)
    with pytest.raises(torchdiff.CorruptFileError, match=r"new_dtype\.pt: not a readable PyTorch checkpoint"):
        torchdiff.load(path)


def test_metadata_changes_are_diffed_and_shown(write_pt):
    old = write_pt("old.pt", training_checkpoint(1e-3, 3))
    changed = training_checkpoint(1e-3, 4)  # same seed and step: the same tensors
    changed["lr"] = changed["optimizer"]["param_groups"][0]["lr"] = 5e-4
    new = write_pt("new.pt", changed)
    report = torchdiff.compare(old, new, device="cpu")
    changed = {m.key: (m.old, m.new) for m in report.comparison.metadata_diffs}
    assert changed["lr"] == (0.001, 0.0005) and changed["epoch"] == (3, 4)
    assert changed["optimizer.param_groups.0.lr"] == (0.001, 0.0005)
    assert "loss" not in changed and "config.hidden" not in changed
    text = str(report)
    lines = text.splitlines()
    assert "  ~ lr: 0.001->0.0005" in lines
    assert "  ~ epoch: 3->4" in lines
    assert "metadata value" in lines[-1]
    items = json.loads(report.to_json())
    lr = [i for i in items if i["path"] == "lr"]
    assert lr == [{"type": "metadata_changed", "path": "lr", "old": 0.001, "new": 0.0005}]
    # Same tensors: only metadata differs, and that is a difference.
    assert report.comparison.counts()["changed"] == 0
    assert report.has_differences


def test_metadata_added_and_removed(write_pt):
    old = write_pt("old.pt", {"w": torch.ones(2), "step": 10, "note": "a"})
    new = write_pt("new.pt", {"w": torch.ones(2), "step": 10, "best": 0.5})
    report = torchdiff.compare(old, new, device="cpu")
    status = {m.key: m.status for m in report.comparison.metadata_diffs}
    assert status == {"note": "removed", "best": "added"}
    lines = str(report).splitlines()
    assert "  - note: a" in lines and "  + best: 0.5" in lines


def test_tied_weights_load_under_both_names(write_pt):
    w = torch.randn(5, 3)
    path = write_pt("tied.pt", {"embed.weight": w, "lm_head.weight": w, "view": w[1:3]})
    with torchdiff.load(path) as ckpt:
        assert_same_tensor(ckpt["embed.weight"], w)
        assert_same_tensor(ckpt["lm_head.weight"], w)
        assert_same_tensor(ckpt["view"].contiguous(), w[1:3].contiguous())
    untied = write_pt("untied.pt", {"embed.weight": w, "lm_head.weight": w.clone(), "view": w[1:3].clone()})
    report = torchdiff.compare(path, untied, device="cpu")
    assert not report.has_differences
    assert all(d.metrics.equal for d in report)


def test_non_contiguous_tensors(write_pt):
    x = torch.arange(60, dtype=torch.float32).reshape(6, 10) / 7
    tensors = {
        "transposed": x.t(),
        "strided": x[1:, ::3],
        "expanded": x[0].expand(4, 10),
        "offset": x[2:4],
    }
    assert not all(t.is_contiguous() for t in tensors.values())
    path = write_pt("nc.pt", tensors)
    with torchdiff.load(path) as ckpt:
        for name, t in tensors.items():
            assert torch.equal(ckpt[name], t), name
    report = torchdiff.compare(path, {k: v.contiguous() for k, v in tensors.items()}, device="cpu")
    assert not report.has_differences
    for d in report:
        ref = tensors[d.name].contiguous().numpy().astype(np.float64)
        assert d.old.mean == pytest.approx(ref.mean(), rel=1e-6)
        assert d.old.std == pytest.approx(ref.std(), rel=1e-5)
        assert (d.old.min, d.old.max) == (ref.min(), ref.max())


@pytest.mark.parametrize("legacy", [False, True])
def test_a_transposed_tensor_with_nan_or_a_narrow_spread_has_its_own_figures(write_pt, legacy):
    """A transposed weight saved as is: the engine reads a contiguous copy of the mapped
    values. Releasing the file's pages (madvise) must not drop that copy's pages: the
    exact path (NaN, a narrow spread) re-read them as zeros (nan=0, mean 0.488 for
    1000 ± 1e-4, and a copy compared unequal to itself)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(128, 128, generator=g)
    w[3, 5] = math.nan
    narrow = 1000 + 1e-4 * torch.randn(256, 128, generator=g)
    tensors = {"w": w.t(), "narrow": narrow.t()}
    path = write_pt("t.pt", tensors, legacy=legacy)
    report = torchdiff.inspect(path, device="cpu")
    for name, t in tensors.items():
        ref = t.contiguous().double()
        finite = ref[torch.isfinite(ref)]
        s = report[name].new
        assert s.nan_count == int(torch.isnan(ref).sum())
        assert s.mean == pytest.approx(float(finite.mean()), rel=1e-9)
        assert s.std == pytest.approx(float(finite.std(unbiased=False)), rel=1e-6)
        assert (s.min, s.max) == (float(finite.min()), float(finite.max()))
    same = torchdiff.compare(path, {k: v.contiguous() for k, v in tensors.items()}, device="cpu")
    assert [d.status for d in same] == ["unchanged", "unchanged"]


def test_a_complex_tensor_saved_with_its_conjugate_bit(write_pt):
    """torch.save(z.conj()) keeps the lazy conjugate: measured as its resolved values
    (view_as_real refused it: an internal error)."""
    z = torch.complex(torch.arange(4.0), torch.arange(4.0) + 1)
    report = torchdiff.compare(write_pt("c.pt", {"z": z.conj()}), {"z": z.conj().resolve_conj()}, device="cpu")
    assert report["z"].status == "unchanged"
    assert report["z"].old.mean == pytest.approx(float(torch.view_as_real(z.conj().resolve_conj()).double().mean()))


@pytest.mark.parametrize("obj, name", [
    ({"a.b": torch.ones(2), "a": {"b": torch.zeros(2)}}, "a.b"),
    ({0: torch.ones(2), "0": torch.zeros(2)}, "0"),
])
def test_names_that_collide_after_flattening_refuse_the_file(write_pt, obj, name):
    """Two tensors under one dotted name: one hid the other (a changed tensor compared as
    unchanged, exit 0). One clear line, exit 2."""
    path = write_pt("c.pt", obj)
    with pytest.raises(torchdiff.CorruptFileError, match=rf"c\.pt: two tensors flatten to the name '{name}'"):
        torchdiff.load(path)


def test_a_0d_numpy_array_stays_0d(write_pt):
    """np.ascontiguousarray made a 0-d array shape [1]: 'reshaped' against the torch scalar."""
    path = write_pt("n.pt", {"scale": np.array(2.5, dtype=np.float32), "w": torch.ones(2)})
    report = torchdiff.compare(path, {"scale": torch.tensor(2.5), "w": torch.ones(2)}, device="cpu")
    assert report["scale"].old.shape == () and report["scale"].status == "unchanged"


def test_a_nested_tensor_is_compared_component_by_component(write_pt):
    """torch.nested (strided layout): each component a tensor, NAME.0, NAME.1 (an internal
    error before: nested tensors have no sizes)."""
    parts = [torch.arange(12.0).reshape(3, 4), torch.ones(5, 4)]
    path = write_pt("n.pt", {"nt": torch.nested.nested_tensor(parts)})
    changed = [parts[0], parts[1] * 2]
    report = torchdiff.compare(path, {"nt.0": changed[0], "nt.1": changed[1]}, device="cpu")
    assert [(d.name, d.status) for d in report] == [("nt.0", "unchanged"), ("nt.1", "changed")]


def test_sub_byte_quantized_codes_count_their_packed_bytes(write_pt):
    """quint4x2 holds two codes a byte (its storage: 64 bytes for 128 codes), though
    element_size() says 1: the bytes are the storage's, plus the scale and zero point."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.quantize_per_tensor(torch.rand(8, 16), 0.1, 0, torch.quint4x2)
    assert q.untyped_storage().nbytes() == 64
    with torchdiff.load(write_pt("q.pt", {"q": q})) as ckpt:
        assert ckpt.tensors["q"].nbytes == 64 + 16


def test_top_level_tensor_and_list_of_tensors(write_pt):
    t = torch.arange(3.0)
    with torchdiff.load(write_pt("t.pt", t)) as ckpt:
        assert list(ckpt.tensors) == ["tensor"]
    with torchdiff.load(write_pt("s.pt", torch.tensor(2.5))) as ckpt:  # a bare 0-d tensor is a tensor too
        assert list(ckpt.tensors) == ["tensor"] and ckpt["tensor"].item() == 2.5
    with torchdiff.load(write_pt("l.pt", [t, {"a": t}])) as ckpt:
        assert set(ckpt.tensors) == {"0", "1.a"}


def test_in_memory_sources_match_files(write_pt, write_safetensors):
    sd = {"a": torch.randn(4, 4), "b": torch.arange(5)}
    module = torch.nn.Linear(2, 2)
    r1 = torchdiff.compare(write_pt("a.pt", sd), write_safetensors("a.safetensors", sd), device="cpu")
    assert not r1.has_differences and len(r1) == 2
    r2 = torchdiff.compare(module, dict(module.state_dict()), device="cpu")
    assert not r2.has_differences and {d.name for d in r2} == {"weight", "bias"}
    with pytest.raises(torchdiff.UsageError, match="cannot compare a list"):
        torchdiff.compare([1, 2], sd)


# ---- the third-party fixtures -------------------------------------------------------------

FIXTURE_TENSORS = {
    # name: tensors it must hold (from ../shared/fixtures/diffai/metadata.json)
    "simple_base": 6, "simple_modified": 6, "checkpoint_epoch_0": 6, "checkpoint_epoch_10": 6,
    "checkpoint_epoch_50": 6, "model_fp32": 6, "model_quantized": 6, "normal_model": 6, "anomalous_model": 6,
    "small_model": 2, "large_model": 10, "transformer": 15,
}
NOT_TORCH = {"model1.pt", "model2.pt"}


def test_every_fixture_file_loads_or_is_refused(fixtures_dir):
    seen = 0
    for path in sorted(fixtures_dir.iterdir()):
        seen += 1
        if path.name in NOT_TORCH:
            with pytest.raises(torchdiff.CorruptFileError, match=r"model\d\.pt: not a PyTorch checkpoint"):
                torchdiff.load(path)
        elif path.suffix in (".json", ".md"):
            with pytest.raises(torchdiff.UnknownFormatError, match="unknown checkpoint format"):
                torchdiff.load(path)
        else:
            with torchdiff.load(path) as ckpt:
                assert len(ckpt) > 0, path.name
                stem = path.stem
                if stem in FIXTURE_TENSORS:
                    assert len(ckpt) == FIXTURE_TENSORS[stem], path.name
                for h in ckpt.tensors.values():
                    assert tuple(h.materialize().shape) == h.shape
    assert seen >= 29


@pytest.mark.parametrize("stem", sorted(FIXTURE_TENSORS))
def test_fixture_pt_and_safetensors_hold_the_same_tensors(fixtures_dir, stem):
    report = torchdiff.compare(fixtures_dir / f"{stem}.pt", fixtures_dir / f"{stem}.safetensors", device="cpu")
    assert len(report) == FIXTURE_TENSORS[stem]
    assert not report.has_differences


def test_fixture_counts_match_the_authors_description(fixtures_dir):
    desc = json.loads((fixtures_dir / "metadata.json").read_text())["models"]
    for name in ("simple_base", "transformer"):
        with torchdiff.load(fixtures_dir / f"{name}.safetensors") as ckpt:
            assert ckpt.params == desc[name]["parameters"]
    with torchdiff.load(fixtures_dir / "small_model.pt") as ckpt:
        assert ckpt.params == 55


def test_legacy_gpt2_fixture(fixtures_dir):
    path = fixtures_dir / "tiny_gpt2_real.bin"
    with torchdiff.load(path) as ckpt:
        assert len(ckpt) == 33
        assert not any(h.mapped for h in ckpt.tensors.values())
        assert ckpt.tensors["transformer.wte.weight"].shape == (50257, 2)
        masks = [h for h in ckpt.tensors.values() if h.dtype == torch.uint8]
        assert masks and all(h.storage_dtype == "uint8" for h in masks)
    report = torchdiff.inspect(path, device="cpu")
    mask = next(d for d in report if d.name == "transformer.h.0.attn.bias")
    assert mask.new.min == 0.0 and mask.new.max == 1.0 and mask.new.dtype == "uint8"


# ---- objects of classes torch's weights-only loader does not allow: read as records ----


class AttributeDict(dict):
    """Stands for Lightning's AttributeDict: a dict subclass in saved hyper-parameters."""


class Steps(list):
    pass


class CallsOut:
    """A payload that would run a program when unpickled by plain pickle."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import subprocess

        return (subprocess.call, (["touch", self.marker],))


def _small_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    model[1].register_buffer("scratch", torch.ones(3), persistent=False)  # not in state_dict: not compared
    return model


def test_a_whole_pickled_module_reads_as_its_state_dict(write_pt, capsys):
    """torch.save(model) needs the module's classes to load; torchdiff reads it as data,
    under the state_dict's names, with the state_dict's values."""
    from torchdiff.cli import main

    model = _small_model()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    whole = write_pt("whole.pt", model)
    with pytest.raises(Exception, match="Unsupported global"):
        torch.load(whole, weights_only=True)
    with torchdiff.load(whole) as ckpt:
        assert sorted(ckpt.tensors) == sorted(expected)
        for name, value in expected.items():
            assert torch.equal(ckpt[name], value), name
        assert ckpt.info["records"] == ["torch.nn.modules.activation.ReLU", "torch.nn.modules.batchnorm.BatchNorm1d",
                                        "torch.nn.modules.container.Sequential", "torch.nn.modules.linear.Linear"]
    state = write_pt("state.pt", expected)
    report = torchdiff.compare(whole, state)
    assert {d.status for d in report} == {"unchanged"} and len(report) == len(expected)
    assert report.analysis("records").data == {"old": ckpt.info["records"], "new": []}
    assert main([str(whole), str(state)]) == 0
    out = " ".join(capsys.readouterr().out.split())  # the note wraps at the terminal's width
    assert f"note: {whole}: objects of 4 classes torch's weights-only loader does not allow" in out
    assert "no code from the file ran" in out


def test_training_checkpoint_with_namespaces_numpy_paths_and_dict_subclasses(write_pt):
    import argparse
    import pathlib

    model = _small_model()
    ckpt_obj = {
        "model": model, "hparams": argparse.Namespace(lr=1e-3, name="run"), "dir": pathlib.PurePosixPath("/runs/a"),
        "extra": AttributeDict(warmup=10, decay=0.1), "milestones": Steps([tensor for tensor in (torch.ones(2),)]),
        "best": np.float64(0.25), "curve": np.arange(3.0), "epoch": 3,
    }
    path = write_pt("train.ckpt", ckpt_obj)
    with torchdiff.load(path) as ckpt:
        assert sorted(ckpt.tensors) == sorted(["curve", "milestones.0"] + [f"model.{k}" for k in model.state_dict()])
        assert torch.equal(ckpt["curve"], torch.arange(3.0, dtype=torch.float64))
        assert ckpt.metadata == {"hparams.lr": 1e-3, "hparams.name": "run", "dir": "pathlib.PurePosixPath('/', 'runs', 'a')",
                                 "extra.warmup": 10, "extra.decay": 0.1, "best": 0.25, "epoch": 3}
        assert "argparse.Namespace" in ckpt.info["records"]
        assert not any("numpy" in name for name in ckpt.info["records"])  # numpy builds its own values


class Node:
    """An object holding itself (a parent pointer), as some saved trainers do."""


def test_objects_that_hold_themselves_are_read_once(write_pt, capsys):
    """A pickle may hold cycles (a record's parent pointer, a dict under its own key):
    each container is flattened once, and where it recurs the metadata says so."""
    from torchdiff.cli import main

    node = Node()
    node.me, node.w, node.children = node, torch.ones(2), [node]
    state = {"model": {"w": torch.arange(3.0)}, "node": node}
    state["again"] = state
    path = write_pt("cycle.pt", state)
    with torchdiff.load(path) as ckpt:
        assert sorted(ckpt.tensors) == ["model.w", "node.w"]
        assert torch.equal(ckpt["model.w"], torch.arange(3.0)) and torch.equal(ckpt["node.w"], torch.ones(2))
        assert ckpt.metadata == {"node.me": "<cycle: same object as node>",
                                 "node.children.0": "<cycle: same object as node>",
                                 "again": "<cycle: same object as the whole file>"}
    assert main([str(path), str(path)]) == 0
    out = " ".join(capsys.readouterr().out.split())  # the note wraps at the terminal's width
    assert out.count("objects of 1 class torch's weights-only loader does not allow") == 1  # one note per file


def test_objects_nested_past_the_recursion_limit_are_one_error_line(write_pt, capsys):
    import sys

    from torchdiff.cli import main

    limit = sys.getrecursionlimit()
    deep: list = [torch.ones(1)]
    for _ in range(limit + 100):
        deep = [deep, 1]
    sys.setrecursionlimit(10 * limit)  # torch.save recurses too
    try:
        path = write_pt("deep.pt", {"w": torch.ones(2), "deep": deep})
    finally:
        sys.setrecursionlimit(limit)
    assert main([str(path), str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith(f"torchdiff: error: {path}: ")
    assert "internal error" not in err


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_payload_in_a_record_never_runs(write_pt, tmp_path, legacy):
    """A callable the pickle names is a record too: its arguments are kept, it is not called."""
    marker = tmp_path / "PWNED"
    path = write_pt("payload.pt", {"w": torch.ones(2), "payload": CallsOut(marker)}, legacy=legacy)
    if legacy:  # records need the zip format's static list of globals: refused as before
        with pytest.raises(torchdiff.UnsafeCheckpointError, match="refused, the pickle would run code"):
            torchdiff.load(path)
    else:
        with torchdiff.load(path) as ckpt:
            assert list(ckpt.tensors) == ["w"]
            (name,) = ckpt.info["records"]
            assert name in ("subprocess.call", "commands.call")  # pickle protocol 2 writes Python 2's name
            assert ckpt.metadata == {"payload.0": ["touch", str(marker)]}  # its arguments, kept as data
    assert not marker.exists()


# ---- tensors that are not plain strided values: meta, sparse, torch.ao quantized ----------


def test_meta_tensors_are_named_not_compared(write_pt, capsys):
    """A tensor on the meta device has a shape and a dtype but no values: metadata says so."""
    from torchdiff.cli import main

    path = write_pt("meta.pt", {"w": torch.empty(3, 2, device="meta"), "b": torch.ones(2)})
    with torchdiff.load(path) as ckpt:
        assert list(ckpt.tensors) == ["b"]
        assert ckpt.metadata == {"w": "<meta tensor [3, 2] float32: no values stored>"}
    assert main([str(path), str(path)]) == 0


@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_sparse_tensors_compare_as_their_dense_values(write_pt, layout):
    dense_a = torch.tensor([[0.0, 2.0, 0.0], [1.5, 0.0, 0.0]])
    dense_b = torch.tensor([[0.0, 2.5, 0.0], [1.5, 0.0, -1.0]])
    sparse = (lambda t: t.to_sparse()) if layout == "coo" else (lambda t: t.to_sparse_csr())
    a, b = write_pt("a.pt", {"w": sparse(dense_a)}), write_pt("b.pt", {"w": sparse(dense_b)})
    with torchdiff.load(a) as ckpt:
        h = ckpt.tensors["w"]
        assert h.storage_dtype == "sparse float32" and h.shape == (2, 3)
        t = sparse(dense_a)
        parts = (t._values(), t._indices()) if layout == "coo" else (t.values(), t.crow_indices(), t.col_indices())
        assert h.nbytes == sum(p.numel() * p.element_size() for p in parts)
    (d,) = torchdiff.compare(a, b)
    delta = (dense_b - dense_a).double()
    assert d.metrics.l2 == pytest.approx(float(delta.norm())) and d.metrics.max_abs == pytest.approx(1.0)
    assert d.old.zero_fraction == pytest.approx(4 / 6) and d.old.mean == pytest.approx(3.5 / 6)


@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
def test_torch_ao_quantized_tensors_compare_dequantized(write_pt, capsys, per_channel):
    """torch.ao quantized models store quint8/qint8 codes with scales and zero points;
    their values are the dequantized codes, marked dequantized."""
    import warnings

    from torchdiff.cli import main

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if per_channel:
            scales, zeros = torch.tensor([0.02, 0.05, 0.03, 0.04], dtype=torch.float64), torch.tensor([0, 1, -1, 2])
            qa = torch.quantize_per_channel(x, scales, zeros, 0, torch.qint8)
            qb = torch.quantize_per_channel(y, scales, zeros, 0, torch.qint8)
        else:
            qa = torch.quantize_per_tensor(x, 0.05, 3, torch.quint8)
            qb = torch.quantize_per_tensor(y, 0.05, 3, torch.quint8)
        a, b = write_pt("qa.pt", {"w": qa}), write_pt("qb.pt", {"w": qb})
        ref_a, ref_b = qa.dequantize().double(), qb.dequantize().double()
    with torchdiff.load(a) as ckpt:
        h = ckpt.tensors["w"]
        assert h.storage_dtype == ("qint8" if per_channel else "quint8") and h.dtype == torch.float32
        assert h.nbytes == 24 + (4 * 8 + 4 * 8 if per_channel else 16)
    report = torchdiff.compare(a, b)
    (d,) = report
    assert d.old.mean == pytest.approx(float(ref_a.mean()), rel=1e-6)
    assert d.metrics.l2 == pytest.approx(float((ref_b - ref_a).norm()), rel=1e-6)
    assert d.extras.get("dequantized") == ["old", "new"]
    capsys.readouterr()
    assert main([str(a), str(b)]) == 0
    assert capsys.readouterr().err == ""  # torch's own deprecation warnings are not the user's business


def test_a_torch_ao_quantized_model_pairs_with_its_float_original(write_pt):
    """quantize_dynamic's Linear keeps (qint8 weight, bias) in one tuple under
    ``fc._packed_params._packed_params``: read as ``fc.weight`` and ``fc.bias``, the
    float model's names, so the two pair; figures against ``dequantize()`` in float64."""
    import warnings

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        state = quantized.state_dict()
        reference = {"0.weight": quantized[0].weight().dequantize(), "2.weight": quantized[2].weight().dequantize()}
    float_path, q_path = write_pt("float.pt", model.state_dict()), write_pt("dynamic.pt", state)
    report = torchdiff.compare(float_path, q_path)
    by_name = {d.name: d for d in report}
    assert {n for n, d in by_name.items() if d.status != "added"} == {"0.bias", "0.weight", "2.bias", "2.weight"}
    assert {n for n, d in by_name.items() if d.status == "added"} <= {"0.scale", "0.zero_point", "2.scale",
                                                                      "2.zero_point"}  # its activations' qparams
    for name, deq in reference.items():
        d = by_name[name]
        assert d.status == "retyped" and d.new.dtype == "qint8" and d.extras.get("dequantized") == ["new"]
        delta = deq.double() - model.state_dict()[name].double()
        assert d.metrics.l2 == pytest.approx(float(delta.norm()), rel=1e-6)
    assert by_name["0.bias"].status == "unchanged"
    assert {m.key: m.new for m in report.comparison.metadata_diffs}["0._packed_params.dtype"] == "qint8"
    # bytes: the int8 codes plus the scale and zero point (float64, int64), the same in every figure
    one = torchdiff.inspect(q_path, analyses=["memory_analysis"])
    assert {d.name: d for d in one}["0.weight"].new.nbytes == 16 * 8 + 16
    layer0 = one.analysis("memory_analysis").data["sides"]["new"]["bytes_by_layer"]["0"]
    assert layer0 == sum(d.new.nbytes for d in one if d.name.startswith("0."))


_SAVE_DTENSORS = r"""
import os, sys, warnings, torch, torch.distributed as dist
warnings.simplefilter("ignore")
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1")
dist.init_process_group("gloo")
from torch.distributed.tensor import DTensor, Replicate, Shard, init_device_mesh
mesh = init_device_mesh("cpu", (1,))
g = torch.Generator().manual_seed(int(sys.argv[3]))
whole, rows = torch.randn(4, 3, generator=g), torch.randn(2, 3, generator=g)
state = {"model": {
    "whole": DTensor.from_local(whole, mesh, [Replicate()]),
    # rank 0's half of a [4, 3] tensor sharded over 2 ranks, as that rank's torch.save holds it
    "half": DTensor.from_local(rows, mesh, [Shard(0)], run_check=False, shape=torch.Size([4, 3]), stride=(3, 1)),
    "plain": torch.ones(2)}, "step": int(sys.argv[3])}
torch.save(state, sys.argv[1])
torch.save({"whole": whole, "half": rows}, sys.argv[1] + ".ref")
dist.destroy_process_group()
"""


def test_dtensors_a_rank_saved_compare_as_their_local_shards(tmp_path, capsys):
    """torch.save(model.state_dict()) under FSDP2 holds DTensors: read weights-only, each
    compared as the shard the file holds, and a dtensors section says which are shards."""
    import socket
    import subprocess
    import sys

    from torchdiff.cli import main

    paths = []
    for seed in (1, 2):
        with socket.socket() as s_:
            s_.bind(("127.0.0.1", 0))
            port = s_.getsockname()[1]
        path = tmp_path / f"rank0_step{seed}.pt"
        subprocess.run([sys.executable, "-c", _SAVE_DTENSORS, str(path), str(port), str(seed)], check=True)
        paths.append(path)
    refs = [torch.load(str(p) + ".ref") for p in paths]
    with torchdiff.load(paths[0]) as ckpt:
        assert sorted(ckpt.tensors) == ["model.half", "model.plain", "model.whole"]
        assert torch.equal(ckpt["model.half"], refs[0]["half"]) and torch.equal(ckpt["model.whole"], refs[0]["whole"])
        assert ckpt.info["dtensors"]["model.half"] == {"global_shape": [4, 3], "local_shape": [2, 3],
                                                       "placements": ["Shard(dim=0)"], "mesh_shape": [1]}
    report = torchdiff.compare(*paths)
    by_name = {d.name: d for d in report}
    delta = (refs[1]["half"] - refs[0]["half"]).double()
    assert by_name["model.half"].metrics.l2 == pytest.approx(float(delta.norm()), rel=1e-6)
    assert report.analysis("dtensors").headline == {"dtensors": 2, "shards": 1}
    capsys.readouterr()
    assert main([str(paths[0]), str(paths[1])]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    text = " ".join(out.split())
    assert f"note: {paths[0]}: 2 DTensors, 1 of them a shard of a larger tensor (e.g. model.half: [2, 3] of [4, 3])" in text


def test_bytes_in_a_pickle_compare_by_content(tmp_path, capsys):
    """A pickled dataloader state saved as bytes read ``<bytes>``: two states of one
    checkpoint format compared equal. Now its length and a SHA-256 prefix; never unpickled."""
    import hashlib
    import pickle

    from torchdiff.cli import main

    blobs = [pickle.dumps({"pos": 1}), pickle.dumps({"pos": 2})]
    for i, blob in enumerate(blobs):
        torch.save({"w": torch.ones(2), "dl": blob, "pair": [b"x", 3]}, tmp_path / f"p{i}.pt")
    with torchdiff.load(tmp_path / "p0.pt") as ck:
        assert ck.metadata["dl"] == f"<bytes: {len(blobs[0])} sha256:{hashlib.sha256(blobs[0]).hexdigest()[:16]}>"
        assert ck.metadata["pair"] == [f"<bytes: 1 sha256:{hashlib.sha256(b'x').hexdigest()[:16]}>", 3]
    assert main([str(tmp_path / "p0.pt"), str(tmp_path / "p1.pt")]) == 0
    assert "1 metadata value differs" in capsys.readouterr().out
