"""--policy: each condition passes and fails on crafted checkpoints with the figure it
measured (against float64 NumPy), series rules, the markdown/github outputs (golden
files), and bad policy files (one exact error line, exit 2)."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import yaml
from helpers import check_golden
from helpers import one_thread  # noqa: F401 - autouse: the demo training here runs on one thread
from safetensors.torch import save_file

import torchdiff
from torchdiff import policy
from torchdiff.cli import main
from helpers import run  # noqa: E402 - tests/ is on sys.path


def _old() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        "embeddings.word.weight": torch.randn(8, 4, generator=g),
        "encoder.layer.0.attn.weight": torch.randn(4, 4, generator=g),
        "encoder.layer.0.attn.bias": torch.randn(4, generator=g),
        "encoder.layer.1.mlp.weight": torch.randn(4, 4, generator=g),
        "head.weight": torch.randn(2, 4, generator=g),
        "head.bias": torch.randn(2, generator=g),
        "bn.running_mean": torch.randn(4, generator=g),
        "gone.weight": torch.randn(3, generator=g),
    }


def _new(old: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(8)
    new = {k: v.clone() for k, v in old.items()}
    new["encoder.layer.0.attn.weight"] += 0.01 * torch.randn(4, 4, generator=g)      # a small step
    new["encoder.layer.0.attn.bias"][:2] += torch.tensor([0.5, -0.25])               # half its elements
    new["encoder.layer.1.mlp.weight"] = 3 * old["encoder.layer.1.mlp.weight"] + 1.0   # a big change
    new["head.weight"] = old["head.weight"].to(torch.bfloat16)                         # retyped
    new["head.bias"] = torch.tensor([float("nan"), 1.0])                               # non-finite
    del new["gone.weight"]                                                             # removed
    new["extra.weight"] = torch.ones(2)                                                # added
    return new


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("policy")
    old = _old()
    new = _new(old)
    save_file(old, d / "old.safetensors")
    save_file(new, d / "new.safetensors")
    return d, old, new


def np_rel_l2(a, b) -> float:
    a, b = a.double().numpy(), b.double().numpy()
    return float(np.linalg.norm(b - a) / np.linalg.norm(a))


def results(pair, text: str) -> dict[str, dict]:
    d, _, _ = pair
    pol = policy.parse(yaml.safe_load(text), "p.yaml")
    report = torchdiff.compare(d / "old.safetensors", d / "new.safetensors", analyses=pol.analyses)
    result = pol.evaluate(report)
    return {r["rule"]: r for r in result.data["results"]}


def test_per_tensor_thresholds_pass_and_fail_with_their_figures(pair):
    _, old, new = pair
    attn = "encoder.layer.0.attn.weight"
    rel = np_rel_l2(old[attn], new[attn])
    diff = (new[attn].double() - old[attn].double()).numpy()
    max_abs = float(np.abs(diff).max())
    a, b = old[attn].double().numpy().ravel(), new[attn].double().numpy().ravel()
    cosine = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    sqnr = 20 * math.log10(np.linalg.norm(a) / np.linalg.norm(b - a))
    bias = "encoder.layer.0.attn.bias"
    text = f"""
rules:
  - {{name: rel pass, select: "{attn}", max_rel_l2: {rel * 1.001}}}
  - {{name: rel fail, select: "{attn}", max_rel_l2: {rel * 0.999}}}
  - {{name: abs pass, select: "{attn}", max_abs: {max_abs * 1.001}}}
  - {{name: abs fail, select: "{attn}", max_abs: {max_abs * 0.999}}}
  - {{name: cos pass, select: "{attn}", min_cosine: {cosine - 1e-9}}}
  - {{name: cos fail, select: "{attn}", min_cosine: {min(cosine + 1e-9, 1.0)}}}
  - {{name: sqnr pass, select: "{attn}", min_sqnr_db: {sqnr - 0.01}}}
  - {{name: sqnr fail, select: "{attn}", min_sqnr_db: {sqnr + 0.01}}}
  - {{name: frac pass, select: "{bias}", max_changed_fraction: 0.5}}
  - {{name: frac fail, select: "{bias}", max_changed_fraction: 0.49}}
"""
    r = results(pair, text)
    assert r["rel pass"]["measured"] == pytest.approx(rel, rel=1e-6) and r["rel pass"]["passed"]
    assert not r["rel fail"]["passed"] and [o["tensor"] for o in r["rel fail"]["offenders"]] == [attn]
    assert r["rel fail"]["offenders"][0]["figure"] == pytest.approx(rel, rel=1e-6)
    assert r["abs pass"]["measured"] == pytest.approx(max_abs, rel=1e-6) and r["abs pass"]["passed"]
    assert not r["abs fail"]["passed"]
    assert r["cos pass"]["measured"] == pytest.approx(cosine, abs=1e-9) and r["cos pass"]["passed"]
    assert not r["cos fail"]["passed"]
    assert r["sqnr pass"]["measured"] == pytest.approx(sqnr, abs=1e-5) and r["sqnr pass"]["passed"]
    assert not r["sqnr fail"]["passed"]
    assert r["frac pass"]["measured"] == 0.5 and r["frac pass"]["passed"] and not r["frac fail"]["passed"]
    for rule in r.values():
        assert rule["selected"] == 1


def test_tensors_without_a_figure_offend_a_threshold_rule(pair):
    _, old, new = pair
    r = results(pair, 'rules: [{name: all small, select: "*", max_rel_l2: 100}]')["all small"]
    why = {o["tensor"]: o.get("why") for o in r["offenders"]}
    assert why == {"extra.weight": "no figure: added", "gone.weight": "no figure: removed"}
    big = "encoder.layer.1.mlp.weight"
    assert r["measured"] == pytest.approx(np_rel_l2(old[big], new[big]), rel=1e-6)


def test_unchanged_same_dtype_same_shape_nonfinite(pair):
    text = """
rules:
  - {name: frozen emb, select: "embeddings.*", unchanged: true}
  - {name: frozen all, unchanged: true, select: "re:^(embeddings|encoder)\\\\."}
  - {name: must train, select: "encoder.*", unchanged: false}
  - {name: dtypes, same_dtype: true}
  - {name: shapes, select: "re:^(encoder|embeddings)", same_shape: true}
  - {name: shapes all, same_shape: true}
  - {name: finite, no_nonfinite: true}
  - {name: finite enc, select: "encoder.*", no_nonfinite: true}
"""
    r = results(pair, text)
    assert r["frozen emb"]["passed"] and r["frozen emb"]["measured"] == 0
    assert not r["frozen all"]["passed"] and r["frozen all"]["measured"] == 3
    assert sorted(o["tensor"] for o in r["frozen all"]["offenders"]) == [
        "encoder.layer.0.attn.bias", "encoder.layer.0.attn.weight", "encoder.layer.1.mlp.weight"]
    assert r["must train"]["passed"]
    assert not r["dtypes"]["passed"]
    assert [(o["tensor"], o["figure"]) for o in r["dtypes"]["offenders"] if o["figure"]] == [
        ("head.weight", "float32 -> bfloat16")]
    assert r["shapes"]["passed"] and not r["shapes all"]["passed"]
    assert sorted(o["tensor"] for o in r["shapes all"]["offenders"]) == ["extra.weight", "gone.weight"]
    assert not r["finite"]["passed"] and r["finite"]["measured"] == 1
    assert r["finite"]["offenders"] == [{"tensor": "head.bias", "figure": 1, "why": "nan=1, inf=0"}]
    assert r["finite enc"]["passed"]


def test_max_share_is_the_selected_update_energy(pair):
    _, old, new = pair
    energy = {k: float(np.nansum((new[k].double().numpy() - old[k].double().numpy()) ** 2))
              for k in old if k in new and old[k].shape == new[k].shape}  # over positions finite on both sides
    share = energy["encoder.layer.1.mlp.weight"] / sum(energy.values())
    text = f"""
rules:
  - {{name: mlp share ok, select: "layer:encoder.layer.1", max_share: {share + 1e-6}}}
  - {{name: mlp share over, select: "layer:encoder.layer.1", max_share: {share - 1e-6}}}
"""
    r = results(pair, text)
    assert r["mlp share ok"]["measured"] == pytest.approx(share, rel=1e-6) and r["mlp share ok"]["passed"]
    assert not r["mlp share over"]["passed"]
    assert r["mlp share over"]["offenders"][0]["tensor"] == "encoder.layer.1.mlp.weight"


def test_no_anomaly_reads_the_anomaly_detection(pair):
    text = """
rules:
  - {name: no critical, no_anomaly: critical}
  - {name: encoder healthy, select: "encoder.*", no_anomaly: critical}
"""
    r = results(pair, text)
    assert not r["no critical"]["passed"]
    assert [(o["tensor"], o["why"]) for o in r["no critical"]["offenders"]] == [("head.bias", "nan_inf, critical")]
    assert r["encoder healthy"]["passed"] and r["encoder healthy"]["measured"] == 0
    # evaluated on a report that did not run the analysis: a failure, never a silent pass
    d, _, _ = pair
    pol = policy.parse(yaml.safe_load("rules: [{name: h, no_anomaly: info}]"))
    res = pol.evaluate(torchdiff.compare(d / "old.safetensors", d / "new.safetensors")).data["results"][0]
    assert (res["passed"], res["measured"]) == (False, "anomaly_detection did not run")


def test_role_selector(pair):
    r = results(pair, 'rules: [{name: buffers frozen, select: "role:buffer", unchanged: true}]')["buffers frozen"]
    assert r["selected"] == 1 and r["passed"]
    # torchdiff.names.roles with the checkpoint as context: W_scale beside an int8 W
    w = torch.randn(4, 4)
    scale = w.abs().amax(1) / 127
    report = torchdiff.compare({"fc.weight": w, "fc.bias": torch.zeros(4)},
                               {"fc.weight": torch.round(w / scale[:, None]).to(torch.int8),
                                "fc.weight_scale": scale, "fc.bias": torch.zeros(4)}, raw=True)
    pol = policy.parse(yaml.safe_load("rules: [{name: c, select: 'role:quant_companion', same_shape: true},"
                                      " {name: p, select: 'role:parameter', exclude: 'fc.weight', unchanged: true}]"))
    res = {r["rule"]: r for r in pol.evaluate(report).data["results"]}
    assert res["c"]["selected"] == 1 and res["c"]["offenders"] == [
        {"tensor": "fc.weight_scale", "figure": None, "why": "added"}]
    assert res["p"]["selected"] == 1 and res["p"]["passed"]
    # the report's own role column says the same (names.roles_over: one rule for compare,
    # series and policies; the newest checkpoint holding a name decides)
    assert {d.name: d.role for d in report}["fc.weight_scale"] == "quant_companion"


def _adam_checkpoint(model, opt, steps, g) -> dict:
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(8, 4, generator=g)).pow(2).sum().backward()
        opt.step()
    return {"model": {k: v.clone() for k, v in model.state_dict().items()},
            "optimizer": copy.deepcopy(opt.state_dict()), "epoch": steps}


def test_max_share_counts_the_model_not_optimizer_state(tmp_path):
    """Two Adam training checkpoints: the step counters (3 -> 6) and the moment estimates
    moved far more than the weights. The share is that of --show-layer-impact: the
    tensors in --scope (parameters by default), against float64 NumPy."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    t3 = _adam_checkpoint(model, opt, 3, g)
    t6 = _adam_checkpoint(model, opt, 3, g)
    torch.save(t3, tmp_path / "t3.pt")
    torch.save(t6, tmp_path / "t6.pt")
    energy = {k: float(((t6["model"][k].double() - t3["model"][k].double()) ** 2).sum()) for k in ("weight", "bias")}
    share = energy["weight"] / sum(energy.values())
    pol = policy.parse(yaml.safe_load(f"rules: [{{name: w, select: '*.weight', max_share: {share - 1e-6}}},"
                                      f" {{name: w ok, select: '*.weight', max_share: {share + 1e-6}}},"
                                      f" {{name: opt, select: 'role:optimizer_state', max_share: 0}}]"))
    report = torchdiff.compare(tmp_path / "t3.pt", tmp_path / "t6.pt", show_layer_impact=True)
    res = {r["rule"]: r for r in pol.evaluate(report).data["results"]}
    assert res["w"]["measured"] == pytest.approx(share, rel=1e-6) and not res["w"]["passed"]
    assert res["w"]["offenders"][0]["tensor"] == "model.weight"
    assert res["w"]["offenders"][0]["figure"] == pytest.approx(share, rel=1e-6)
    assert res["w ok"]["passed"]
    # optimizer state is outside the default scope: selected, but no share of the model's update
    assert res["opt"]["selected"] > 0 and res["opt"]["measured"] == 0.0 and res["opt"]["passed"]


def test_layer_selector_follows_the_layer_pattern(tmp_path):
    a = {"stage1.conv.weight": torch.ones(3), "stage2.conv.weight": torch.ones(3)}
    b = {"stage1.conv.weight": torch.full((3,), 2.0), "stage2.conv.weight": torch.ones(3)}
    pol = policy.parse(yaml.safe_load("rules: [{name: s2 frozen, select: 'layer:stage2', unchanged: true}]"))
    res = pol.evaluate(torchdiff.compare(a, b, layer_pattern=r"^stage\d+")).data["results"][0]
    assert res["selected"] == 1 and res["passed"]
    res = pol.evaluate(torchdiff.compare(a, b)).data["results"][0]  # default layers: the module prefix
    assert res["selected"] == 0


def test_selector_matching_nothing_fails_unless_allowed(pair):
    r = results(pair, """
rules:
  - {name: typo, select: "embedding.*", unchanged: true}
  - {name: optional, select: "lora_*", unchanged: false, allow_empty: true}
""")
    assert r["typo"]["passed"] is False and r["typo"]["measured"] == "no tensor selected"
    assert r["optional"]["passed"] is True and r["optional"]["selected"] == 0


def test_cli_exit_codes_and_json_item(pair, capsys, tmp_path):
    d, _, _ = pair
    good = tmp_path / "good.yaml"
    good.write_text('rules:\n  - name: emb frozen\n    select: "embeddings.*"\n    unchanged: true\n')
    bad = tmp_path / "bad.yaml"
    bad.write_text('rules:\n  - name: all frozen\n    unchanged: true\n')
    code, out, _ = run(capsys, d / "old.safetensors", d / "new.safetensors", "--policy", good)
    assert code == 0 and "policy: status=pass, rules=1, failed=0" in out
    code, out, _ = run(capsys, d / "old.safetensors", d / "new.safetensors", "--policy", bad, "-o", "json")
    items = json.loads(out)
    assert code == 1
    pol = [i for i in items if i["type"] == "policy"]
    assert len(pol) == 1 and pol[0]["status"] == "fail" and pol[0]["failed_rules"] == ["all frozen"]
    code, out, _ = run(capsys, "--quiet", d / "old.safetensors", d / "new.safetensors", "--policy", bad)
    assert (code, out) == (1, "")


# ---- series ------------------------------------------------------------------------------------

def _series(d, steps):
    """Checkpoints θ_t = w + (s_1 + ... + s_t)·u, u a fixed random direction: parallel updates."""
    d.mkdir(exist_ok=True)
    g = torch.Generator().manual_seed(11)
    w, u = torch.randn(64, 64, generator=g), torch.randn(64, 64, generator=g)
    paths = []
    for t, c in enumerate([0.0] + list(np.cumsum(steps))):
        save_file({"layers.0.weight": w + float(c) * u, "layers.0.bias": torch.zeros(64)}, d / f"c{t}.safetensors")
        paths.append(d / f"c{t}.safetensors")
    return paths


def test_series_converging_and_per_step_rules(tmp_path, capsys):
    pol = tmp_path / "p.yaml"
    pol.write_text("rules:\n  - {name: settles, converging: true}\n"
                   "  - {name: steps, select: 'layers.*.weight', max_rel_l2: 0.05}\n"
                   "  - {name: bias frozen, select: '*.bias', unchanged: true}\n")
    shrinking = _series(tmp_path / "s", [0.08, 0.04, 0.02, 0.01])
    code, out, _ = run(capsys, "series", *shrinking, "--policy", pol, "-o", "json")
    res = {r["rule"]: r for r in [i for i in json.loads(out) if i["type"] == "policy"][0]["results"]}
    assert res["settles"]["measured"] == "converging" and res["settles"]["passed"]
    assert res["bias frozen"]["passed"]
    steps = res["steps"]
    assert not steps["passed"] and {o["step"] for o in steps["offenders"]} == {"c0 -> c1"}
    assert code == 1
    growing = _series(tmp_path / "g", [0.01, 0.02, 0.04, 0.08])
    code, out, _ = run(capsys, "series", *growing, "--policy", pol, "-o", "json")
    res = {r["rule"]: r for r in [i for i in json.loads(out) if i["type"] == "policy"][0]["results"]}
    assert not res["settles"]["passed"] and res["settles"]["measured"] != "converging"


# ---- outputs -------------------------------------------------------------------------------------

POLICY_TEXT = """rules:
  - name: embeddings frozen
    select: "embeddings.*"
    unchanged: true
  - name: small steps
    select: "encoder.layer.*"
    max_rel_l2: 0.05
  - name: healthy
    no_anomaly: critical
  - name: head dtype
    select: "head.*"
    same_dtype: true
"""


@pytest.mark.parametrize("fmt", ["markdown", "github", "text"])
def test_outputs_golden(pair, capsys, monkeypatch, fmt):
    d, _, _ = pair
    monkeypatch.chdir(d)
    monkeypatch.setenv("NO_COLOR", "1")
    (d / "policy.yaml").write_text(POLICY_TEXT)
    code, out, err = run(capsys, "old.safetensors", "new.safetensors", "--policy", "policy.yaml", "--output", fmt)
    assert code == 1 and err == ""
    check_golden(f"policy_{fmt}.{'md' if fmt == 'markdown' else 'txt'}", out)


def test_github_escapes_workflow_command_values():
    from torchdiff.render.github import command

    assert command("error", "a: b, c", "50% done\nnext") == "::error title=a%3A b%2C c::50%25 done%0Anext"


def test_github_annotates_the_anomalies_that_fail_the_gate(tmp_path, capsys):
    """--fail-on-anomaly high fails the job: each finding at or above high is an error
    annotation, and the notice says the gate's verdict (it said nothing before)."""
    save_file({"fc.weight": torch.randn(4, 4)}, str(tmp_path / "a.safetensors"))
    save_file({"fc.weight": torch.full((4, 4), 0.5)}, str(tmp_path / "b.safetensors"))  # constant: high
    code, out, _ = run(capsys, tmp_path / "a.safetensors", tmp_path / "b.safetensors", "-o", "github",
                       "--fail-on-anomaly", "high")
    lines = out.splitlines()
    assert code == 1 and lines[0].startswith("::error title=torchdiff anomaly%3A constant::fc.weight: ")
    assert lines[0].endswith("severity high")
    assert lines[-1].endswith("; --fail-on-anomaly high: 1 finding at or above -> failed")
    code, out, _ = run(capsys, tmp_path / "a.safetensors", tmp_path / "b.safetensors", "-o", "github",
                       "--anomaly-detection")
    assert code == 0 and not out.startswith("::error")  # without the gate: critical findings only


def test_markdown_tables_show_names_as_text_not_markup(tmp_path, capsys):
    """A tensor named ``*x*`` or ``<b>`` is shown as it is in every table of the markdown
    output (the analyses' tables in <details> formatted it)."""
    names = ("*x*.weight", "<b>y</b>.weight")
    save_file({n: torch.randn(4, 4) for n in names}, str(tmp_path / "a.safetensors"))
    save_file({n: torch.full((4, 4), 0.5) for n in names}, str(tmp_path / "b.safetensors"))
    _, out, _ = run(capsys, tmp_path / "a.safetensors", tmp_path / "b.safetensors", "-o", "markdown",
                    "--anomaly-detection")
    details = out.split("<details>", 1)[1]
    assert "| \\*x\\*.weight |" in details and "| \\<b\\>y\\</b\\>.weight |" in details
    assert "<b>y" not in details.replace("`<b>y</b>.weight`", "")


# ---- bad policy files ------------------------------------------------------------------------------

BAD = [
    ("rules: [", "not valid YAML (line 1, column 9: expected the node content, but found '<stream end>')"),
    ("- a\n- b\n", "a policy is a mapping with a 'rules' list (got a list)"),
    ("rule: []\n", "unknown key 'rule' (did you mean 'rules'?)"),
    ("rules: []\n", "'rules' must be a non-empty list of rules (got a list)"),
    ("rules:\n  - name: a\n    max_rel: 0.1\n", "rule 1: unknown key 'max_rel' (did you mean 'max_rel_l2'?)"),
    ("rules:\n  - max_abs: 1\n", "rule 1: 'name' must be a non-empty string"),
    ("rules:\n  - {name: a, select: 're:(', max_abs: 1}\n",
     "rule 1 ('a'): select 're:(' is not a valid regex (missing ), unterminated subpattern at position 0)"),
    ("rules:\n  - {name: a, max_rel_l2: abc}\n", "rule 1 ('a'): max_rel_l2 must be a number, got 'abc'"),
    ("rules:\n  - {name: a, max_rel_l2: -1}\n", "rule 1 ('a'): max_rel_l2 must be ≥ 0, got -1"),
    ("rules:\n  - {name: a, min_cosine: 2}\n", "rule 1 ('a'): min_cosine must be between -1 and 1, got 2"),
    ("rules:\n  - {name: a, unchanged: yes please}\n", "rule 1 ('a'): unchanged must be true or false, got 'yes please'"),
    ("rules:\n  - {name: a, no_nonfinite: false}\n",
     "rule 1 ('a'): no_nonfinite takes only true (got False; remove the rule to turn it off)"),
    ("rules:\n  - {name: a, no_anomaly: severe}\n",
     "rule 1 ('a'): no_anomaly must be one of info, low, medium, high, critical, got 'severe'"),
    ("rules:\n  - {name: a, max_abs: 1, max_rel_l2: 1}\n",
     "rule 1 ('a'): give exactly one condition (found: max_abs, max_rel_l2; conditions: unchanged, max_rel_l2, "
     "max_abs, min_cosine, min_sqnr_db, max_changed_fraction, no_nonfinite, same_dtype, same_shape, max_share, "
     "no_anomaly, converging)"),
    ("rules:\n  - {name: a, converging: true}\n", "rule 1 ('a'): converging needs a series of checkpoints "
                                                  "(torchdiff series ...)"),
    ("rules:\n  - {name: a, select: 'role:weights', unchanged: true}\n",
     "rule 1 ('a'): select 'role:weights': unknown role (roles: parameter, buffer, counter, optimizer_state, "
     "quant_companion, training_state)"),
    ("rules:\n  - {name: a, max_abs: 1}\n  - {name: a, max_abs: 2}\n",
     "rule 2: the name 'a' is used by an earlier rule"),
]


@pytest.mark.parametrize("text, message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_policy_file_is_one_line_exit_2(pair, capsys, tmp_path, text, message):
    d, _, _ = pair
    p = tmp_path / "p.yaml"
    p.write_text(text)
    code, out, err = run(capsys, d / "old.safetensors", d / "new.safetensors", "--policy", p)
    assert (code, out) == (2, "")
    assert err == f"torchdiff: error: {p}: {message}\n"
    with pytest.raises(torchdiff.PolicyError):
        policy.load(p)


def test_missing_policy_file_and_policy_on_inspect(pair, capsys, tmp_path):
    d, _, _ = pair
    code, _, err = run(capsys, d / "old.safetensors", d / "new.safetensors", "--policy", tmp_path / "nope.yaml")
    assert code == 2 and err == f"torchdiff: error: {tmp_path / 'nope.yaml'}: no such policy file\n"
    code, _, err = run(capsys, "inspect", d / "old.safetensors", "--policy", tmp_path / "nope.yaml")
    assert code == 2 and err == "torchdiff: error: --policy works with compare and series, not inspect\n"


def test_yaml_text_numbers_are_accepted():
    pol = policy.parse(yaml.safe_load("rules: [{name: a, max_rel_l2: 1e-3}]"))  # PyYAML reads 1e-3 as text
    assert pol.rules[0].value == 1e-3


# ---- the documented policies and the README's CI job --------------------------------------------

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def test_documented_policies_parse():
    import re as _re

    text = (ROOT / "docs" / "POLICY.md").read_text()
    blocks = [b for b in _re.findall(r"```yaml\n(.*?)```", text, _re.S) if b.lstrip().startswith("rules:")]
    assert len(blocks) >= 4  # the schema and the three worked examples
    for b in blocks:
        policy.parse(yaml.safe_load(b), "POLICY.md", series=True)
    for path in sorted((ROOT / "examples" / "policies").glob("*.yaml")):
        policy.load(path)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    import sys

    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import make_checkpoints
    finally:
        sys.path.pop(0)
    out = tmp_path_factory.mktemp("demo")
    make_checkpoints.main(str(out), steps=4, every=2)  # the demo's files, 4 training steps instead of 200
    return out


def test_readme_ci_job_on_the_demo_checkpoints(demo, capsys, tmp_path):
    """The README's job, on the demo's files after 4 steps (step_004 for step_200)."""
    policies = ROOT / "examples" / "policies"
    code, out, _ = run(capsys, demo / "step_004.safetensors", demo / "step_004_int8.safetensors",
                       "--policy", policies / "int8_export.yaml", "--output", "github")
    assert code == 0 and out.splitlines()[-1].startswith("::notice title=torchdiff::")
    assert out.rstrip().endswith("policy pass (5 of 5 rules pass)")
    code, out, _ = run(capsys, demo / "step_002.safetensors", demo / "step_004.safetensors",
                       "--policy", policies / "training_step.yaml", "--output", "markdown")
    assert "### Policy: " in out and code == (1 if "**FAIL**" in out else 0)
    code, out, _ = run(capsys, demo / "step_002.safetensors", demo / "step_004.safetensors",
                       "--policy", policies / "int8_export.yaml")  # a training step is no int8 export
    assert code == 1 and "policy: status=fail, rules=5, failed=2" in out
    code, _, _ = run(capsys, "hash", demo / "step_004.safetensors", "--cast", "bfloat16", "-o", tmp_path / "m.json")
    assert code == 0
    code, out, _ = run(capsys, "verify", tmp_path / "m.json", demo / "step_004.safetensors")
    assert code == 0 and out.strip() == "verify: 15 tensors: 15 bitwise equal, 0 accepted, 0 mismatching -> OK"


def test_markdown_and_github_for_inspect_and_series(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    paths = [p.name for p in _series(tmp_path, [0.02, 0.01])]
    code, out, _ = run(capsys, "inspect", paths[0], "--output", "markdown")
    assert code == 0 and out.splitlines()[:3] == ["## torchdiff inspect: `c0.safetensors`", "",
                                                  "2 tensors, 4,160 parameters, 16,640 bytes"]
    code, out, _ = run(capsys, "inspect", paths[0], "--output", "github")
    assert out == "::notice title=torchdiff::c0.safetensors: 2 tensors, 4,160 parameters, 16,640 bytes\n"
    code, out, _ = run(capsys, "series", *paths, "--output", "github")
    assert out == ("::notice title=torchdiff::c0 → c1: 2 tensors: 1 changed, 0 added, 0 removed, 1 unchanged; "
                   "c1 → c2: 2 tensors: 1 changed, 0 added, 0 removed, 1 unchanged\n")
    code, out, _ = run(capsys, "series", *paths, "--output", "markdown")
    assert out.startswith("## torchdiff series: 3 checkpoints\n\n- c0 → c1: 2 tensors: 1 changed")


def test_zero_initialised_tensor_offends_relative_rules_with_the_reason():
    """A tensor whose old side is all zero has rel_l2 = ∞ (cosine undefined) by
    definition: a relative rule lists it with the reason and the rule that can gate it;
    max_abs measures it."""
    old = {"a.bias": torch.zeros(4), "b.weight": torch.ones(3)}
    new = {"a.bias": torch.full((4,), 0.25), "b.weight": torch.ones(3) * 1.01}
    pol = policy.parse(yaml.safe_load('rules: [{name: rel, max_rel_l2: 0.05}, {name: abs, max_abs: 0.3}]'), "p.yaml")
    r = {x["rule"]: x for x in pol.evaluate(torchdiff.compare(old, new)).data["results"]}
    assert not r["rel"]["passed"] and [o["tensor"] for o in r["rel"]["offenders"]] == ["a.bias"]
    assert r["rel"]["offenders"][0]["figure"] == math.inf
    assert r["rel"]["offenders"][0]["why"].startswith("old side all zero (zero-initialised)")
    assert r["abs"]["passed"] and r["abs"]["measured"] == pytest.approx(0.25)
