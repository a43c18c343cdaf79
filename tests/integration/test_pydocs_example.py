"""The second worked example through its shipped job files, as README "Your own domain" runs it: the raw CSV from
numpy's docstrings → `honed prepare jobs/prepare_pydocs.yaml` (field mapping, the example's system prompt) →
`honed train jobs/train_pydocs.yaml` (a few steps, registered as `pydocs@1`) → `honed eval jobs/eval_pydocs.yaml`
(the gate on the KJV probe, with intervals). The tiny model stands in for SmolLM2. The prepare job's relative
paths resolve in a scratch working directory, as from the repository root; the run and registry dirs are given
absolute, since the session's Ray workers were started from another directory and Ray tasks read them."""

import csv
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

# ~3-4 min of prepare + train on 2 CPUs; the pieces have fast unit tests (config defaults, chunking, the corpus
# writer), so CI's default set leaves this end-to-end run to `make test-all`.
pytestmark = pytest.mark.slow

from honed.cli import main
from honed.data.docstrings import write_api_corpus
from honed.registry import Registry

ROOT = Path(__file__).resolve().parents[2]
JOB = {stage: str(ROOT / "jobs" / f"{stage}_pydocs.yaml") for stage in ("prepare", "train", "eval", "serve")}


@pytest.fixture(scope="module")
def example(ray_local, tiny_model, tmp_path_factory):
    """Raw file, prepared dataset and a 4-step adapter in one working directory."""
    work = tmp_path_factory.mktemp("pydocs")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        raw = write_api_corpus(work / "runs" / "pydocs" / "raw", ["numpy.linalg", "numpy.fft"])
        runs = work / "runs" / "pydocs"
        assert main(["prepare", JOB["prepare"], f"model.name_or_path={tiny_model}"]) == 0
        assert main(["train", JOB["train"], f"model.name_or_path={tiny_model}", f"output_dir={runs / 'train'}",
                     f"register.registry={runs / 'registry'}", "optim.max_steps=4", "optim.warmup_steps=1",
                     "log_every=2", "checkpoint_every=4", "val_max_examples=8"]) == 0
        yield {"dir": work, "raw": raw, "data": runs / "data", "registry": str(runs / "registry")}


def test_prepare_maps_the_users_columns_and_bakes_in_the_examples_system_prompt(example):
    rows = list(csv.DictReader(open(example["raw"], encoding="utf-8")))
    manifest = json.loads((example["data"] / "manifest.json").read_text())
    counts = manifest["counts"]["by_source"]["numpy_api"]
    assert counts["read"] == len(rows) == counts["train"] + counts["val"] and not counts["quarantined"]
    assert next(s for s in manifest["sources"] if s["name"] == "numpy_api")["fields"]["prompt"] == "question"
    assert manifest["template"]["system_prompt"].startswith("You are a NumPy API assistant.")
    shards = {split: pq.read_table(example["data"] / "shards" / split).to_pylist() for split in ("train", "val")}
    api = {split: [r for r in shards[split] if r["source"] == "numpy_api"] for split in shards}
    assert {r["prompt"] for r in api["train"] + api["val"]} <= {r["question"] for r in rows}
    groups = {split: {r["group"] for r in api[split]} for split in api}
    assert groups["val"] and not groups["val"] & groups["train"]  # held-out functions are unseen in training
    assert {r["source"] for r in shards["val"]} == {"numpy_api", "kjv"} and not any(r["source"] == "kjv"
                                                                                    for r in shards["train"])
    everything = json.dumps(manifest) + json.dumps(shards["train"][:50] + shards["val"][:50])
    assert "ICD-10" not in everything and "medical" not in everything


def test_train_registers_the_adapter_with_the_examples_template(example):
    meta = Registry(example["registry"]).show("pydocs@1")
    assert meta["template"]["system_prompt"].startswith("You are a NumPy API assistant.")
    assert meta["final_metrics"]["step"] == 4 and "val_loss/numpy_api" in meta["final_metrics"]


def test_eval_gate_on_the_general_text_probe_with_intervals(example, tiny_model, monkeypatch):
    monkeypatch.chdir(example["dir"])
    code = main(["eval", JOB["eval"], f"model.name_or_path={tiny_model}", f"registry={example['registry']}",
                 "max_examples=24", "generate_examples=6", "max_new_tokens=6", "bootstrap.resamples=200"])
    result = json.loads((example["dir"] / "runs" / "pydocs" / "eval" / "eval.json").read_text())
    checks = {c["name"]: c for c in result["gate"]["checks"]}
    assert set(checks) == {"general_ppl/kjv", "domain_token_f1"} and result["gate"]["require_interval"]
    assert all(c["interval"] is not None for c in checks.values())
    f1 = checks["domain_token_f1"]
    assert f1["interval"] == result["intervals"]["change"]["token_f1"]["absolute"]
    # four steps on a random model cannot raise token F1 by 0.10 at the interval's lower bound: the gate refuses
    assert f1["interval"][0] < 0.10 and code == 3 and not result["gate"]["passed"]
    assert Registry(example["registry"]).show("pydocs@1")["promotable"] is False
    assert len(result["samples"]["tuned"]) == 6 and {s["source"] for s in result["samples"]["tuned"]} == {"numpy_api"}
    assert result["intervals"]["items"]["token_f1"] == 6 and result["intervals"]["items"]["loss/kjv"] == 24
