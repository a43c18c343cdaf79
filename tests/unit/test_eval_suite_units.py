"""The eval suite's parts without Ray: ROUGE-L, the forgetting gate, the bias probe on the tiny model, the
decontamination check on hand-made shards, the report and plots, and the config and CLI errors."""

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from honed.cli import main
from honed.config import ConfigError, EvalConfig, GateSettings, load_config
from honed.eval.bias import check_probe, load_probes, pair_gaps, summarize, variants
from honed.eval.contamination import contamination_check, eval_file_items, row_text
from honed.eval.evaluate import comparison_table, lcs_length, rouge_l
from honed.eval.gate import describe, failure_reason, gate_checks
from honed.eval.report import write_report


# ------------------------------------------------------------------------------------------------ ROUGE-L
def test_lcs_length_by_hand():
    assert lcs_length(["a", "b", "c", "d", "e"], ["a", "c", "e", "x"]) == 3
    assert lcs_length(["a", "b"], ["b", "a"]) == 1
    assert lcs_length([], ["a"]) == 0


@pytest.mark.parametrize("prediction, reference, expected", [
    ("the cat sat on the mat", "the cat on a mat", 2 * (4 / 6) * (4 / 5) / (4 / 6 + 4 / 5)),  # LCS: the cat on mat
    ("Type 2 diabetes mellitus.", "type 2  diabetes mellitus", 1.0),   # normalised like exact match
    ("mellitus diabetes 2 type", "type 2 diabetes mellitus", 2 * 0.25 * 0.25 / 0.5),  # order matters: LCS 1
    ("E11", "Chapter 4", 0.0),
    ("", "", 1.0),
    ("", "x", 0.0),
])
def test_rouge_l_hand_computed(prediction, reference, expected):
    assert rouge_l(prediction, reference) == pytest.approx(expected)


def test_comparison_table_has_absolute_and_relative_change():
    table = comparison_table({"base": {"ppl/kjv": 80.0, "exact_match": 0.0},
                              "tuned": {"ppl/kjv": 88.0, "exact_match": 0.25}})
    assert "| ppl/kjv | 80.0000 | 88.0000 | +8.0000 | +10.00% |" in table
    assert "| exact_match | 0.0000 | 0.2500 | +0.2500 | — |" in table  # no relative change from 0
    assert "| metric | base |" in comparison_table({"base": {"ppl/kjv": 80.0}})


# --------------------------------------------------------------------------------------------------- gate
SCORES = {"base": {"ppl/kjv": 80.0, "loss/icd10": 4.0, "token_f1": 0.10, "rouge_l": 0.2},
          "tuned": {"ppl/kjv": 86.0, "loss/icd10": 1.0, "token_f1": 0.45, "rouge_l": 0.5}}


def gate(**kw) -> GateSettings:
    """The change alone decides (intervals: see the tests after these)."""
    return GateSettings(**({"enabled": True, "require_interval": False} | kw))


def test_gate_passes_within_limits():
    result = gate_checks(SCORES, ["icd10"], ["kjv"], gate(max_general_ppl_increase=0.10, min_domain_gain=0.2))
    assert result["passed"] and [c["name"] for c in result["checks"]] == ["general_ppl/kjv", "domain_token_f1"]
    ppl, f1 = result["checks"]
    assert ppl["change"] == pytest.approx(0.075) and ppl["relative"] and ppl["limit"] == 0.10
    assert f1["change"] == pytest.approx(0.35) and f1["op"] == ">="
    assert failure_reason(result) is None


def test_gate_fails_on_forgetting_and_on_a_small_domain_gain():
    result = gate_checks(SCORES, ["icd10"], ["kjv"], gate(max_general_ppl_increase=0.05, domain_metric="rouge_l",
                                                          min_domain_gain=0.5))
    assert not result["passed"] and [c["passed"] for c in result["checks"]] == [False, False]
    assert describe(result["checks"][0]) == "general_ppl/kjv: change +7.50% > limit +5.00%"
    assert describe(result["checks"][1]) == "domain_rouge_l: change +0.3000 < limit +0.5000"
    assert failure_reason(result).startswith("forgetting gate failed: general_ppl/kjv")


def test_gate_loss_must_fall_per_domain_source():
    passed = gate_checks(SCORES, ["icd10"], [], gate(max_general_ppl_increase=None, domain_metric="loss",
                                                     min_domain_gain=3.0))
    assert passed["passed"] and passed["checks"][0]["change"] == -3.0  # exactly at the limit passes
    failed = gate_checks(SCORES, ["icd10"], [], gate(max_general_ppl_increase=None, domain_metric="loss",
                                                     min_domain_gain=3.5))
    assert not failed["passed"] and failed["checks"][0]["limit"] == -3.5


def test_gate_fails_closed_on_what_it_did_not_measure():
    no_probe = gate_checks(SCORES, ["icd10"], [], gate(min_domain_gain=None))
    assert not no_probe["passed"] and "no eval_only" in no_probe["checks"][0]["note"]
    no_metric = gate_checks(SCORES, ["icd10"], ["kjv"], gate(domain_metric="exact_match"))
    assert [c["passed"] for c in no_metric["checks"]] == [True, False]
    assert "exact_match was not measured" in describe(no_metric["checks"][1])
    nan = {"base": dict(SCORES["base"]), "tuned": dict(SCORES["tuned"], **{"ppl/kjv": math.nan})}
    assert not gate_checks(nan, ["icd10"], ["kjv"], gate(min_domain_gain=None))["passed"]


def test_gate_check_switched_off_is_not_run():
    result = gate_checks(SCORES, ["icd10"], ["kjv"], gate(max_general_ppl_increase=None, min_domain_gain=0.0))
    assert [c["name"] for c in result["checks"]] == ["domain_token_f1"]


# SCORES' changes: ppl/kjv +7.5 %, token_f1 +0.35, loss/icd10 -3.0; intervals around them
CHANGES = {"ppl/kjv": {"absolute": [2.0, 10.0], "relative": [0.025, 0.125]},
           "token_f1": {"absolute": [0.15, 0.55]}, "loss/icd10": {"absolute": [-3.5, -2.5]}}


def test_required_interval_must_clear_the_limit_not_only_the_change():
    settings = gate(require_interval=True, max_general_ppl_increase=0.10, min_domain_gain=0.2)
    result = gate_checks(SCORES, ["icd10"], ["kjv"], settings, CHANGES)
    ppl, f1 = result["checks"]
    # both changes clear their limits (+7.5 % ≤ 10 %, +0.35 ≥ 0.2), neither interval does
    assert not ppl["passed"] and not f1["passed"] and result["require_interval"]
    assert ppl["interval"] == [0.025, 0.125] and f1["interval"] == [0.15, 0.55]
    assert describe(ppl) == ("general_ppl/kjv: change +7.50% (CI +2.50% to +12.50%), upper bound +12.50% > "
                             "limit +10.00%")
    assert describe(f1) == "domain_token_f1: change +0.3500 (CI +0.1500 to +0.5500), lower bound +0.1500 < limit +0.2000"
    # the same figures with the mean alone pass
    assert gate_checks(SCORES, ["icd10"], ["kjv"], gate(max_general_ppl_increase=0.10, min_domain_gain=0.2),
                       CHANGES)["passed"]


def test_required_interval_passes_when_the_whole_interval_clears():
    settings = gate(require_interval=True, max_general_ppl_increase=0.15, min_domain_gain=0.1)
    result = gate_checks(SCORES, ["icd10"], ["kjv"], settings, CHANGES)
    assert result["passed"], [describe(c) for c in result["checks"]]
    assert describe(result["checks"][1]) == ("domain_token_f1: change +0.3500 (CI +0.1500 to +0.5500), lower bound "
                                             "+0.1500 ≥ limit +0.1000")
    loss = gate_checks(SCORES, ["icd10"], [], gate(require_interval=True, max_general_ppl_increase=None,
                                                   domain_metric="loss", min_domain_gain=2.5), CHANGES)
    assert loss["passed"] and loss["checks"][0]["interval"] == [-3.5, -2.5]  # upper bound −2.5 ≤ −2.5
    tighter = gate_checks(SCORES, ["icd10"], [], gate(require_interval=True, max_general_ppl_increase=None,
                                                      domain_metric="loss", min_domain_gain=2.6), CHANGES)
    assert not tighter["passed"]


def test_required_interval_fails_closed_when_unmeasured_or_nan():
    settings = gate(require_interval=True, max_general_ppl_increase=None, min_domain_gain=0.1)
    unmeasured = gate_checks(SCORES, ["icd10"], ["kjv"], settings, {})
    assert not unmeasured["passed"] and unmeasured["checks"][0]["interval"] is None
    assert "no confidence interval was measured for token_f1" in describe(unmeasured["checks"][0])
    nan = gate_checks(SCORES, ["icd10"], ["kjv"], settings, {"token_f1": {"absolute": [math.nan, math.nan]}})
    assert not nan["passed"]
    below = gate_checks(SCORES, ["icd10"], ["kjv"], gate(require_interval=True, max_general_ppl_increase=None,
                                                         min_domain_gain=0.4), CHANGES)
    assert describe(below["checks"][0]).endswith("change +0.3500 < limit +0.4000")  # the change itself fails first


def test_the_gate_requires_intervals_by_default():
    assert GateSettings().require_interval is True
    assert EvalConfig().generate_examples == 200 and EvalConfig().bootstrap.resamples == 1000


# ------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("overrides, message", [
    (["adapter=a", "merged=b"], "set `adapter` or `merged`, not both"),
    (["registry=r"], "`registry` needs `adapter` set to a ref"),
    (["registry=r", "adapter=../x"], "adapter name '../x' is not allowed"),
    (["registry=r", "adapter=x@0"], "the version must be an integer ≥ 1 or 'latest'"),
    (["gate.enabled=true"], "the gate (--gate, gate.enabled) compares a tuned model with the base"),
    (["gate.domain_metric=bleu"], ("gate.domain_metric = 'bleu': Input should be 'token_f1', 'exact_match', "
                                  "'rouge_l' or 'loss'")),
    (["gate.max_general_ppl_increase=-0.1"], "gate.max_general_ppl_increase = -0.1: Input should be greater than"),
    (["gate.min_domain_gain=nan"], "gate.min_domain_gain = 'nan': Input should be a finite number"),
    (["gate.max_ppl=1"], "gate.max_ppl: unknown key; allowed here: enabled, max_general_ppl_increase, domain_metric"),
    (["adapter=a", "gate.enabled=true", "generate_examples=0"], "set generate_examples > 0, or use domain_metric loss"),
    (["adapter=a", "gate.enabled=true", "gate.max_general_ppl_increase=null", "gate.min_domain_gain=null"],
     "the gate has no check"),
    (["bias.max_shift=0"], "bias.max_shift = 0: Input should be greater than 0"),
])
def test_bad_eval_config_is_named(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(EvalConfig, None, overrides)
    assert message in str(err.value)


def test_cli_refuses_a_gate_without_a_tuned_model(capsys, tmp_path):
    assert main(["eval", f"data_dir={tmp_path}", "--gate"]) == 2
    assert "the gate (--gate, gate.enabled) compares a tuned model with the base" in capsys.readouterr().err


def test_cli_names_an_unknown_registry_ref_before_ray(capsys, tmp_path):
    assert main(["eval", f"registry={tmp_path / 'reg'}", "adapter=icd10@2", "--gate"]) == 1
    assert "no adapter named 'icd10' in the registry" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- bias probe
def test_shipped_probe_set_covers_the_categories():
    pairs = load_probes()
    per_category = {c: sum(p["category"] == c for p in pairs) for c in {p["category"] for p in pairs}}
    assert {"gender", "nationality", "religion"} <= set(per_category)
    assert all(8 <= n <= 12 for n in per_category.values()), per_category
    for pair in pairs:
        (a, rest_a), (b, rest_b) = variants(pair)
        assert rest_a == rest_b and a != b and a.endswith(pair["terms"][0])


@pytest.mark.parametrize("line, message", [
    ("{not json", "not JSON"),
    ('{"category": "x", "template": "The {term} patient.", "terms": ["a", "b"], "extra": 1}', "expected a JSON"),
    ('{"category": "x", "template": "No term here.", "terms": ["a", "b"]}', "must hold '{term}' once"),
    ('{"category": "x", "template": "The patient is {term}", "terms": ["a", "b"]}', "followed by the scored words"),
    ('{"category": "x", "template": "The {term} patient.", "terms": ["a", "a"]}', "two different non-empty"),
    ('{"category": "", "template": "The {term} patient.", "terms": ["a", "b"]}', "category must be"),
])
def test_bad_probe_lines_are_named(line, message):
    with pytest.raises(ValueError, match="probes.jsonl:3") as err:
        check_probe(line, "probes.jsonl:3")
    assert message in str(err.value)


def test_missing_probe_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="bias.path: no probe file at"):
        load_probes(str(tmp_path / "none.jsonl"))


def test_pair_gaps_are_the_continuation_log_likelihood_difference(tiny_model):
    from honed.models import load_model

    model, tokenizer = load_model(tiny_model)
    model.eval()
    pairs = [{"category": "gender", "template": "The {term} patient was diagnosed with diabetes.",
              "terms": ["male", "female"]},
             {"category": "age", "template": "The {term} man fell.", "terms": ["young", "old"]}]
    gaps = pair_gaps(model, tokenizer, pairs, batch_size=3)  # a batch boundary inside a pair

    def mean_ll(context: str, continuation: str) -> float:  # by hand: one unpadded forward per sentence
        prefix = tokenizer(context, add_special_tokens=False)["input_ids"]
        target = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([prefix + target])).logits[0]
        logp = torch.log_softmax(logits.float(), -1)
        return sum(logp[len(prefix) - 1 + i, t].item() for i, t in enumerate(target)) / len(target)

    for pair, gap in zip(pairs, gaps):
        (ca, cont), (cb, _) = variants(pair)
        assert gap == pytest.approx(mean_ll(ca, cont) - mean_ll(cb, cont), abs=1e-4)
    assert any(abs(g) > 1e-3 for g in gaps)  # a random model still tells the terms apart


def test_summarize_means_shift_and_flags():
    pairs = [{"category": "g", "template": "t", "terms": ["a", "b"]}] * 2 + \
            [{"category": "r", "template": "t", "terms": ["a", "b"]}]
    out = summarize(pairs, {"base": [0.1, -0.3, 0.05], "tuned": [0.4, -0.3, 0.06]}, max_shift=0.1)
    g, r = out["categories"]["g"], out["categories"]["r"]
    assert g["base"] == {"mean_abs_gap": 0.2, "mean_signed_gap": -0.1}
    assert g["tuned"] == {"mean_abs_gap": 0.35, "mean_signed_gap": 0.05}
    assert g["shift"] == pytest.approx(0.15) and g["flagged"]
    assert r["shift"] == pytest.approx(0.01) and not r["flagged"]
    assert out["flagged"] == ["g"] and out["pairs"] == 3 and out["detail"][0]["tuned"] == 0.4
    base_only = summarize(pairs, {"base": [0.1, -0.3, 0.05]}, max_shift=0.1)
    assert "shift" not in base_only["categories"]["g"] and base_only["flagged"] == []


# ----------------------------------------------------------------------------------------- decontamination
LEAK = "the patient was started on a low dose of metformin and advised to walk thirty minutes every day"


def write_shard(path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_contamination_found_across_streamed_shards(tmp_path):
    blank = {"text": "", "prompt": "", "response": "", "messages": ""}
    write_shard(tmp_path / "train" / "train-00000.parquet", [
        blank | {"text": "an unrelated verse about the heaven and the earth and all that is in them forever"},
        blank | {"prompt": "Summarise the note", "response": "In short " + LEAK.upper() + "!"}])
    write_shard(tmp_path / "train" / "train-00001.parquet", [
        blank | {"messages": json.dumps([{"role": "user", "content": "hello"}])}])
    items = [{"source": "notes", "text": "Note: " + LEAK},
             {"source": "notes", "text": "a different note about insulin pumps and how the patient used them daily"},
             {"source": "icd10", "text": "What does code E11.9 mean?\nType 2 diabetes"}]  # 8 words < 13
    report = contamination_check(items, tmp_path / "train", n=13, batch_rows=1)
    assert (report["checked"], report["contaminated"], report["too_short"], report["train_rows"]) == (3, 1, 1, 3)
    assert report["fraction"] == pytest.approx(1 / 3, abs=1e-4)
    assert report["by_source"] == {"notes": {"checked": 2, "contaminated": 1}, "icd10": {"checked": 1,
                                                                                     "contaminated": 0}}
    assert report["examples"] == [{"source": "notes", "text": "Note: " + LEAK}]
    assert contamination_check(items, tmp_path / "train", n=30)["contaminated"] == 0  # longer than the leak


def test_contamination_in_packed_shards_is_decoded(tmp_path, tiny_model):
    from honed.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_model)
    ids = tokenizer("Chapter one. " + LEAK, add_special_tokens=False)["input_ids"]
    write_shard(tmp_path / "train" / "train-00000.parquet", [{"input_ids": ids, "labels": ids}])
    items = [{"source": "notes", "text": LEAK}]
    assert contamination_check(items, tmp_path / "train", n=13, tokenizer=tokenizer)["contaminated"] == 1
    with pytest.raises(ValueError, match="packed shards"):
        contamination_check(items, tmp_path / "train", n=13)


def test_row_text_and_eval_files(tmp_path):
    assert row_text({"text": "", "prompt": "Q", "response": "A", "messages": ""}) == "Q\nA"
    assert row_text({"messages": json.dumps([{"role": "user", "content": "x"}, {"role": "assistant",
                                                                                "content": "y"}])}) == "x\ny"
    f = tmp_path / "eval.jsonl"
    f.write_text(json.dumps({"prompt": "Q?", "response": "A."}) + "\n{broken\n" + json.dumps({"text": "T"}) + "\n")
    items, missing = eval_file_items([str(f), str(tmp_path / "gone.jsonl")])
    assert [i["text"] for i in items] == ["Q?\nA.", "T"] and missing == [str(tmp_path / "gone.jsonl")]


# -------------------------------------------------------------------------------------------------- report
def test_report_and_plots_hold_the_numbers(tmp_path):
    gate_result = gate_checks(SCORES, ["icd10"], ["kjv"], gate(max_general_ppl_increase=0.05))
    pairs = [{"category": "gender", "template": "The {term} x.", "terms": ["a", "b"]}]
    result = {"scores": {m: s | {"exact_match": 0.1 * (m == "tuned")} for m, s in SCORES.items()},
              "samples": {"base": [{"prompt": "Q|1", "response": "R", "answer": "no"}],
                          "tuned": [{"prompt": "Q|1", "response": "R", "answer": "R"}]},
              "domain_sources": ["icd10"], "probe_sources": ["kjv"], "model": "tiny",
              "tuned": {"kind": "adapter", "path": "/x", "ref": "icd10@2"},
              "gate": gate_result | {"registry": {"ref": "icd10@2", "promotable": False}},
              "bias": summarize(pairs, {"base": [0.125], "tuned": [0.5]}, 0.1),
              "decontamination": {"ngram": 13, "checked": 40, "contaminated": 2, "fraction": 0.05, "too_short": 7,
                                  "train_rows": 900, "examples": [{"source": "kjv", "text": "In the beginning"}],
                                  "missing_files": []}}
    plots = write_report(result, tmp_path)
    assert sorted(p.name for p in plots) == ["bias_probe.png", "perplexity.png", "task_metrics.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)
    md = (tmp_path / "eval.md").read_text()
    assert "vs tuned (base + adapter `icd10@2`)" in md
    assert "| ppl/kjv | 80.0000 | 86.0000 | +6.0000 | +7.50% |" in md
    assert "## Forgetting gate: FAILED" in md and "| general_ppl/kjv | ppl/kjv | 80.0000 | 86.0000 | +7.50% |" in md
    assert "`icd10@2` marked promotable = false" in md
    assert "| gender | 1 | 0.1250 | +0.1250 | 0.5000 | +0.5000 | 0.3750 | **yes** |" in md
    assert "2 of 40 eval items (5.00%) share a word 13-gram with the 900 training rows; 7 items" in md
    assert "| Q\\|1 | R | no | R |" in md
    assert "![task_metrics](plots/task_metrics.png)" in md and "![bias_probe](plots/bias_probe.png)" in md
