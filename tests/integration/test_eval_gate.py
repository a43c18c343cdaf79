"""`honed eval --gate` on the trained adapter as a registry version (in-process CLI, local Ray): a failing gate exits 3
and marks the version not promotable, a passing one marks it promotable; eval.md and the plots hold the run's
numbers. And a merged model equal to the base scores exactly like it."""

import json
import shutil
from pathlib import Path

import pytest

from honed.cli import main
from honed.registry import Registry

SMALL = ["max_examples=16", "generate_examples=4", "max_new_tokens=8", "batch_size=8"]


@pytest.fixture
def registry(trained, tmp_path) -> str:
    """A copy of the session's registry: the gate writes `promotable`, other tests keep theirs."""
    return str(shutil.copytree(trained["registry"], tmp_path / "registry"))


def run_eval(trained, prepared, out: Path, *args: str) -> tuple[int, dict, str]:
    code = main(["eval", f"model.name_or_path={trained['config'].model.name_or_path}", f"data_dir={prepared['dir']}",
                 f"output_dir={out}", *SMALL, *args])
    return code, json.loads((out / "eval.json").read_text()), (out / "eval.md").read_text()


def test_failing_gate_exits_3_and_marks_the_version_not_promotable(trained, prepared, registry, tmp_path, capsys):
    out = tmp_path / "eval"
    code, result, md = run_eval(trained, prepared, out, f"registry={registry}", "adapter=tuned@1",
                                "gate.domain_metric=loss", "gate.min_domain_gain=100", "--gate")
    assert code == 3
    assert "forgetting gate failed: domain_loss/icd10" in capsys.readouterr().err
    gate = result["gate"]
    assert gate["passed"] is False and result["tuned"]["ref"] == "tuned@1"
    checks = {c["name"]: c for c in gate["checks"]}
    assert {"general_ppl/kjv", "domain_loss/icd10"} <= set(checks)
    assert checks["domain_loss/icd10"]["passed"] is False and checks["domain_loss/icd10"]["limit"] == -100
    base, tuned = result["scores"]["base"], result["scores"]["tuned"]
    ppl = checks["general_ppl/kjv"]
    assert ppl["change"] == pytest.approx(tuned["ppl/kjv"] / base["ppl/kjv"] - 1, abs=1e-6)
    # the default limit, which the whole interval of the change must clear (gate.require_interval: true)
    low, high = ppl["interval"]
    assert low <= ppl["change"] <= high and ppl["passed"] == (ppl["change"] <= 0.10 and high <= 0.10)
    assert ppl["interval"] == result["intervals"]["change"]["ppl/kjv"]["relative"]
    meta = Registry(registry).show("tuned@1")
    assert meta["promotable"] is False and "domain_loss/icd10" in meta["promotable_reason"]
    assert Registry(registry).list()[0]["promotable"] is False

    # the report holds this run's numbers
    for metric in ("loss/icd10", "ppl/kjv", "exact_match", "token_f1", "rouge_l"):
        assert f"| {metric} | {base[metric]:.4f} | {tuned[metric]:.4f} | {tuned[metric] - base[metric]:+.4f} |" in md
    assert "## Forgetting gate: FAILED" in md and "`tuned@1` marked promotable = false" in md
    intervals = result["intervals"]
    for metric in ("loss/icd10", "ppl/kjv", "token_f1"):
        (b_low, b_high), (t_low, t_high) = intervals["models"]["base"][metric], intervals["models"]["tuned"][metric]
        c_low, c_high = intervals["change"][metric]["absolute"]
        assert b_low <= base[metric] <= b_high and t_low <= tuned[metric] <= t_high
        assert (f"| [{b_low:.4f}, {b_high:.4f}] | [{t_low:.4f}, {t_high:.4f}] | [{c_low:+.4f}, {c_high:+.4f}] |"
                in next(line for line in md.splitlines() if line.startswith(f"| {metric} |")))
    assert intervals["items"]["loss/icd10"] == 16 and intervals["items"]["token_f1"] == len(result["samples"]["base"])
    bias = result["bias"]
    assert bias["pairs"] == 38 and set(bias["categories"]) >= {"gender", "nationality", "religion"}
    for category, e in bias["categories"].items():
        assert (f"| {category} | {e['pairs']} | {e['base']['mean_abs_gap']:.4f} | {e['base']['mean_signed_gap']:+.4f} "
                f"| {e['tuned']['mean_abs_gap']:.4f} | {e['tuned']['mean_signed_gap']:+.4f} | {e['shift']:.4f} |") in md
    d = result["decontamination"]
    assert d["ngram"] == prepared["manifest"]["decontamination"]["ngram"] == 13
    assert d["checked"] == prepared["manifest"]["shards"]["val_rows"]
    assert d["train_rows"] == prepared["manifest"]["shards"]["train_rows"]
    assert f"{d['contaminated']} of {d['checked']} eval items" in md
    for plot in ("task_metrics", "perplexity", "bias_probe"):
        assert (out / "plots" / f"{plot}.png").read_bytes()[:4] == b"\x89PNG"
        assert f"(plots/{plot}.png)" in md


def test_passing_gate_marks_the_latest_version_promotable(trained, prepared, registry, tmp_path):
    Registry(registry).set_promotable("tuned@1", False, "an earlier failed gate")
    code, result, md = run_eval(trained, prepared, tmp_path / "eval", f"registry={registry}", "adapter=tuned",
                                "gate.enabled=true", "gate.max_general_ppl_increase=100", "gate.domain_metric=rouge_l",
                                "gate.min_domain_gain=-1")
    assert code == 0 and result["gate"]["passed"] is True and result["tuned"]["ref"] == "tuned@1"
    meta = Registry(registry).show("tuned@1")
    assert meta["promotable"] is True and meta["promotable_reason"] == "forgetting gate passed"
    assert "## Forgetting gate: PASSED" in md and "`tuned@1` marked promotable = true" in md


def test_merged_model_equal_to_the_base_scores_like_it(trained, prepared, tmp_path):
    from honed.config import EvalConfig
    from honed.eval.evaluate import evaluate

    tiny = trained["config"].model.name_or_path
    cfg = EvalConfig.model_validate({"model": {"name_or_path": tiny}, "merged": tiny, "data_dir": prepared["dir"],
                                     "output_dir": str(tmp_path), "max_examples": 8, "generate_examples": 2,
                                     "max_new_tokens": 4, "decontamination": False,
                                     "gate": {"enabled": True, "max_general_ppl_increase": 0.0}})
    result = evaluate(cfg)
    assert result["tuned"]["kind"] == "merged" and result["scores"]["tuned"] == result["scores"]["base"]
    assert result["gate"]["passed"] and all(c["change"] == 0 for c in result["gate"]["checks"])
    assert all(e["shift"] == 0 for e in result["bias"]["categories"].values()) and result["bias"]["flagged"] == []
    assert result["decontamination"] is None and "## Decontamination" not in (tmp_path / "eval.md").read_text()
