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
    proc = subprocess.run([str(BIN / "honed"), "demo", f"run_dir={run}", "serve.port=8123"],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    summary = json.loads((run / "summary.json").read_text())
    base, tuned = summary["scores"]["base"], summary["scores"]["tuned"]
    assert tuned["loss/icd10"] < base["loss/icd10"]
    assert tuned["exact_match"] > base["exact_match"]
    assert summary["merge"]["max_abs_logit_diff"] <= summary["merge"]["tolerance"]
    assert summary["served_answers"]["icd10"] and summary["served_answers"]["icd10-merged"]
    assert summary["registered"].startswith("icd10@") and (run / "registry" / "icd10").is_dir()
    for artifact in ("data/manifest.json", "train/metrics.jsonl", "train/adapter/adapter_model.safetensors",
                     "merged/model.safetensors", "eval/eval.md", "report.md"):
        assert (run / artifact).is_file(), artifact
