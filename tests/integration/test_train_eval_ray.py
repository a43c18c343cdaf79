"""A real 2-worker Ray Train LoRA run on the tiny model, then the eval stage on its adapter."""

import json
from pathlib import Path


def test_two_worker_lora_run_lowers_the_loss(trained):
    history = [json.loads(line) for line in Path(trained["dir"], "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in history] == [6, 12, 18, 24, 30, 36]
    assert history[-1]["loss"] < history[0]["loss"] - 0.3, history
    final = trained["final"]
    assert final["step"] == 36 and "val_loss/icd10" in final and "val_loss/kjv" in final
    assert 0 < final["efficiency"]["trainable_params"] < final["efficiency"]["total_params"]


def test_adapter_is_exported_with_its_metadata(trained, prepared):
    adapter = Path(trained["adapter"])
    assert (adapter / "adapter_model.safetensors").is_file()
    meta = json.loads((adapter / "honed.json").read_text())
    assert meta["base_weights_sha256"] == prepared["manifest"]["model"]["weights_sha256"]
    assert meta["template"]["system_prompt"] == prepared["manifest"]["template"]["system_prompt"]
    assert meta["final_metrics"]["step"] == 36
    checkpoints = [p for p in Path(trained["dir"], "checkpoints", "honed-train").glob("checkpoint_*") if p.is_dir()]
    assert 1 <= len(checkpoints) <= 2  # keep_checkpoints=2


def test_eval_compares_base_and_tuned(trained, prepared, tmp_path):
    from honed.config import EvalConfig
    from honed.eval.evaluate import evaluate

    cfg = EvalConfig(model=trained["config"].model, adapter=trained["adapter"], data_dir=prepared["dir"],
                     output_dir=str(tmp_path), max_examples=40, generate_examples=8, max_new_tokens=8)
    result = evaluate(cfg)
    base, tuned = result["scores"]["base"], result["scores"]["tuned"]
    assert tuned["loss/icd10"] < base["loss/icd10"] - 0.3
    assert set(base) == set(tuned) >= {"ppl/icd10", "ppl/kjv", "exact_match", "token_f1"}
    assert result["probe_sources"] == ["kjv"] and "icd10" in result["domain_sources"]
    assert len(result["samples"]["tuned"]) == 8
    assert "| loss/icd10 |" in (tmp_path / "eval.md").read_text()


def test_training_validation_keeps_every_source_capped(prepared):
    from honed.train.trainer import validation_rows

    rows = validation_rows(Path(prepared["dir"], "shards", "val"), prepared["manifest"], 10)
    sources = [s for s, c in prepared["manifest"]["counts"]["by_source"].items() if c["val"]]
    assert sorted(sources) == ["icd10", "kjv"]
    assert sorted(rows["source"]) == sorted(s for s in sources for _ in range(10))  # 10 rows of each source
    lengths = [len(ids) for ids in rows["input_ids"]]
    assert lengths == sorted(lengths, reverse=True) and lengths == list(rows["num_tokens"])  # longest first


def test_the_run_started_no_preemption_watcher(trained):
    """honed turns Ray Train's preemption watcher off (it only serves ray.train.get_preemption_info, unread here):
    one process fewer started beside the workers' set-up."""
    classes = trained["actor_classes"]
    assert any("RayTrainWorker" in name for name in classes), classes  # the run's actors are listed
    assert not any("PreemptionWatcher" in name for name in classes), classes
