"""The real thing: the embedded SmolLM2-135M-Instruct, converted from GGUF, through the whole demo."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def test_builtin_model_converts_once_and_loads(tmp_path, monkeypatch):
    import torch

    from honed.models import load_model, resolve_model

    monkeypatch.setenv("HONED_CACHE", str(tmp_path))
    path = resolve_model("smollm2-135m-instruct")
    assert Path(path, "model.safetensors").is_file() and path.startswith(str(tmp_path))
    assert resolve_model("smollm2-135m-instruct") == path  # cached
    model, tok = load_model(path)
    assert model.config.num_hidden_layers == 30 and tok.eos_token == "<|im_end|>"
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_demo_end_to_end(tmp_path):
    run = tmp_path / "demo"
    proc = subprocess.run([str(BIN / "honed"), "demo", "--with-dpo", f"run_dir={run}", "serve.port=8123"],
                          capture_output=True, text=True, timeout=2700)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    summary = json.loads((run / "summary.json").read_text())
    base, tuned = summary["scores"]["base"], summary["scores"]["tuned"]
    assert tuned["loss/icd10"] < base["loss/icd10"]
    assert tuned["exact_match"] > base["exact_match"]
    assert summary["merge"]["max_abs_logit_diff"] <= summary["merge"]["tolerance"]
    assert summary["served_answers"]["icd10"] and summary["served_answers"]["icd10-merged"]
    assert summary["registered"].startswith("icd10@") and (run / "registry" / "icd10").is_dir()
    for artifact in ("data/manifest.json", "train/metrics.jsonl", "train/adapter/adapter_model.safetensors",
                     "merged/model.safetensors", "eval/eval.md", "report.md", "pairs/manifest.json",
                     "dpo/adapter/adapter_model.safetensors", "dpo/preference.json"):
        assert (run / artifact).is_file(), artifact
    # SFT → DPO on the real model: above chance against its reference (the SFT adapter) on training and on
    # held-out pairs; the held-out preference accuracy of base / SFT / DPO is reported (SFT learned the domain)
    dpo = summary["dpo"]
    assert dpo["registered"].startswith("icd10-dpo@") and summary["served_answers"]["icd10-dpo"]
    final = dpo["final_train_metrics"]
    assert final["reward_accuracy"] > 0.5 and final["val_reward_accuracy"] > 0.5 and final["val_reward_margin"] > 0
    preference = dpo["preference"]
    assert preference["sft"]["preference_accuracy"] > preference["base"]["preference_accuracy"], preference
    assert {scores["pairs"] for scores in preference.values()} == {summary_pairs(run)}


def summary_pairs(run: Path) -> int:
    """Held-out pairs scored: the demo's eval_pairs, or all of them when fewer were held out."""
    import pyarrow.parquet as pq

    rejected = pq.read_table(run / "pairs" / "shards" / "val", columns=["rejected_input_ids"]).column(0).to_pylist()
    return min(120, sum(1 for r in rejected if r))
