"""Sweep of CI gates (--policy) and manifests (hash/verify) on transformers-shaped files:
each test pins a bug found in the sweep, against float64 NumPy or the file as written."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from helpers import run  # tests/ is on sys.path
from safetensors.torch import save_file

import torchdiff
from torchdiff import policy
from torchdiff.manifest import Manifest


def _llama_like() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    sd = {}
    for i in range(2):
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[f"model.layers.{i}.self_attn.{p}.weight"] = torch.randn(16, 16, generator=g) * 0.1
        sd[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(16)
    sd["model.norm.weight"] = torch.ones(16)
    return sd


def _lora_merged(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Only q/v projections move, by a rank-2 update (a merged LoRA)."""
    g = torch.Generator().manual_seed(4)
    out = {}
    for k, v in sd.items():
        if k.endswith(("q_proj.weight", "v_proj.weight")):
            out[k] = v + (torch.randn(16, 2, generator=g) @ torch.randn(2, 16, generator=g)) * 1e-3
        else:
            out[k] = v.clone()
    return out


def _write(tmp_path, text: str):
    p = tmp_path / "gate.yaml"
    p.write_text(text)
    return p


def _policy_item(out: str) -> dict:
    return next(i for i in json.loads(out) if i.get("type") == "policy")


def test_threshold_shown_with_its_digits(tmp_path, capsys):
    """min_cosine 0.99999 printed as '1.000' beside a measured 0.9999 read as 'fails 1'."""
    old = _llama_like()
    save_file(old, tmp_path / "a.safetensors")
    save_file(_lora_merged(old), tmp_path / "b.safetensors")
    gate = _write(tmp_path, "rules:\n  - {name: cos, select: 're:q_proj', min_cosine: 0.99999}\n")
    code, out, _ = run(capsys, tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--policy", gate)
    row = next(line for line in out.splitlines() if line.lstrip().startswith("cos "))
    assert "0.99999" in row.split() and "1.000" not in row.split()
    code, out, _ = run(capsys, tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--policy", gate,
                       "--output", "json")
    assert _policy_item(out)["results"][0]["threshold"] == 0.99999  # JSON keeps the number


def test_max_share_offenders_are_tensors_that_moved(tmp_path, capsys):
    """A layer's unchanged norm was listed as an offender of max_share ('its own share' 0)."""
    old = _llama_like()
    new = _lora_merged(old)
    save_file(old, tmp_path / "a.safetensors")
    save_file(new, tmp_path / "b.safetensors")
    gate = _write(tmp_path, "rules:\n  - {name: share, select: 'layer:model.layers.0', max_share: 0.1}\n")
    code, out, _ = run(capsys, tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--policy", gate,
                       "--output", "json")
    r = _policy_item(out)["results"][0]
    dsq = {k: float(np.sum((new[k].double() - old[k].double()).numpy() ** 2)) for k in old}
    layer0 = [k for k in old if k.startswith("model.layers.0.")]
    assert code == 1 and not r["passed"]
    assert r["measured"] == pytest.approx(sum(dsq[k] for k in layer0) / sum(dsq.values()), rel=1e-6)
    names = [o["tensor"] for o in r["offenders"]]
    assert set(names) == {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight"}
    for o in r["offenders"]:
        assert o["figure"] == pytest.approx(dsq[o["tensor"]] / sum(dsq.values()), rel=1e-6)


def test_unchanged_offender_says_retyped(tmp_path, capsys):
    """A bf16 copy of all-ones norms offended `unchanged: true` with figure 0 and no reason."""
    old = _llama_like()
    save_file(old, tmp_path / "a.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in old.items()}, tmp_path / "b.safetensors")
    gate = _write(tmp_path, "rules:\n  - {name: norms, select: 're:(?i)norm', unchanged: true}\n")
    code, out, _ = run(capsys, tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--policy", gate,
                       "--output", "json")
    offenders = _policy_item(out)["results"][0]["offenders"]
    assert code == 1 and len(offenders) == 3
    assert all(o["figure"] == 0 and o["why"] == "retyped float32 -> bfloat16" for o in offenders)


@pytest.mark.parametrize("text, message", [
    ("rules:\n  - {name: a, select: [], max_abs: 1}\n",
     "rule 1 ('a'): select is an empty list (give a pattern, or remove select)"),
    ("rules:\n  - {name: a, exclude: [], unchanged: true}\n",
     "rule 1 ('a'): exclude is an empty list (give a pattern, or remove exclude)"),
    ("rules:\n  - name: a\n    select: 're:q_proj'\n    select: '*'\n    max_abs: 1\n",
     "not valid YAML (line 4, column 5: the key 'select' is given twice in one mapping)"),
])
def test_silently_widened_selection_is_an_error(tmp_path, capsys, text, message):
    """`select: []` selected every tensor, and a second `select:` silently replaced the first."""
    gate = _write(tmp_path, text)
    with pytest.raises(torchdiff.PolicyError):
        policy.load(gate)
    code, out, err = run(capsys, "a.safetensors", "b.safetensors", "--policy", gate)
    assert (code, out) == (2, "") and err == f"torchdiff: error: {gate}: {message}\n"


def test_yaml_merge_key_still_allowed(tmp_path):
    """The duplicate-key check leaves YAML's `<<: *anchor` overrides alone."""
    gate = _write(tmp_path, "rules:\n  - &r {name: a, max_abs: 1}\n  - <<: *r\n    name: b\n")
    assert [(r.name, r.value) for r in policy.load(gate).rules] == [("a", 1.0), ("b", 1.0)]


# ---- manifests ------------------------------------------------------------------------------

@pytest.fixture
def hashed(tmp_path):
    sd = _llama_like()
    save_file(sd, tmp_path / "a.safetensors")
    m = torchdiff.fingerprint(tmp_path / "a.safetensors")
    return tmp_path, m.to_dict()


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["tensors"][0].update(norm=-1.0), "has norm -1.0 and sum"),
    (lambda d: d["tensors"][0].update(norm="NaN"), "has norm nan and sum"),
    (lambda d: d["tensors"][0].update(sample=[1.0, 2.0, 3.0]), "has 3 sampled values where its 16 values give 16 positions"),
    (lambda d: d["tensors"][0].update(dtype="float99"), "has dtype 'float99', which torch does not know"),
    (lambda d: d["tensors"][0].update(nan_count=-2), "has nan_count -2 and inf_count 0 for 16 values"),
    (lambda d: d["tensors"][0].update(name=None), "a tensor record's name is None, not a string"),
    (lambda d: d.update(sample_count=7), "manifest sample_count 7 is not supported (this torchdiff samples 64"),
])
def test_edited_manifest_is_refused(hashed, capsys, edit, message):
    """Edited figures passed verify (hash equal) or fed the tolerance wrong numbers; a
    sample_count other than 64 compared samples at different positions."""
    tmp_path, d = hashed
    edit(d)
    (tmp_path / "m.json").write_text(json.dumps(d))
    code, out, err = run(capsys, "verify", tmp_path / "m.json", tmp_path / "a.safetensors")
    assert (code, out) == (2, "") and err.count("\n") == 1
    assert err.startswith(f"torchdiff: error: {tmp_path / 'm.json'}: ") and message in err


def test_unedited_manifest_and_no_sample_still_load(hashed):
    """A record without a sample is allowed (its estimate is unknown: no tolerance accepts it)."""
    tmp_path, d = hashed
    assert len(Manifest.from_dict(d)) == len(d["tensors"])
    d["tensors"][0]["sample"] = []
    assert len(Manifest.from_dict(d)) == len(d["tensors"])


def test_paired_names_note_is_not_an_accepted_tensor(tmp_path, capsys):
    """verify of a training checkpoint's manifest (names under 'model.') against its
    weights said '3 tensors: 3 bitwise equal, 1 accepted': the note on dropped prefixes
    was counted as a tensor."""
    sd = {"a.weight": torch.randn(4, 4), "b.weight": torch.randn(4), "c.bias": torch.zeros(4)}
    torch.save({"model": sd}, tmp_path / "train.pt")
    save_file(sd, tmp_path / "w.safetensors")
    torchdiff.fingerprint(tmp_path / "train.pt").save(tmp_path / "m.json")
    code, out, _ = run(capsys, "verify", tmp_path / "m.json", tmp_path / "w.safetensors")
    assert code == 0 and "(names): paired" in out
    assert out.splitlines()[-1] == "verify: 3 tensors: 3 bitwise equal, 0 accepted, 0 mismatching -> OK"
    code, out, _ = run(capsys, "verify", tmp_path / "m.json", tmp_path / "w.safetensors", "--output", "json")
    head = json.loads(out)[0]
    assert (head["equal"], head["accepted"], head["mismatches"]) == (3, 0, 0)


def test_tolerance_figures_against_float64(tmp_path):
    """rel_l2_lower ≤ the float64 rel_l2, and the estimate equals the Weyl-sampled float64 formula."""
    old = _llama_like()
    old["big"] = torch.randn(64, 96, generator=torch.Generator().manual_seed(9))
    new = _lora_merged(old)
    new["big"] = old["big"] + 1e-3 * torch.randn(64, 96, generator=torch.Generator().manual_seed(10))
    v = torchdiff.verify(torchdiff.fingerprint(old), new)
    phi = (math.sqrt(5) - 1) / 2
    for f in v.findings:
        x, y = old[f.name].double().numpy().ravel(), new[f.name].double().numpy().ravel()
        n = x.size
        pos = sorted({min(n - 1, int(math.fmod((j + 0.5) * phi, 1.0) * n)) for j in range(64)})
        est = math.sqrt(n / len(pos) * np.sum((y[pos] - x[pos]) ** 2)) / np.linalg.norm(x)
        true = np.linalg.norm(y - x) / np.linalg.norm(x)
        assert f.figures["rel_l2_lower"] <= true
        assert f.figures["rel_l2_estimate"] == pytest.approx(est, rel=1e-5)  # ‖A‖ within ROUNDING


def test_markdown_and_github_show_the_threshold_with_its_digits(tmp_path, capsys):
    """``min_cosine: 0.99999`` read ``1.000`` in the markdown table and the GitHub
    annotation, beside a measured 0.9999 that failed it."""
    from safetensors.torch import save_file

    from helpers import run

    torch.manual_seed(0)
    w = torch.randn(64, 64)
    save_file({"w": w}, str(tmp_path / "a.safetensors"))
    save_file({"w": w + 0.01 * torch.randn(64, 64)}, str(tmp_path / "b.safetensors"))
    (tmp_path / "gate.yaml").write_text("rules:\n  - name: close\n    min_cosine: 0.99999\n")
    for output, needle in (("markdown", "| 0.99999 |"), ("github", "min_cosine 0.99999 on")):
        code, out, _ = run(capsys, tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--policy",
                           tmp_path / "gate.yaml", "--output", output)
        assert code == 1 and needle in out, out
