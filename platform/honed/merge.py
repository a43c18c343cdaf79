"""`honed merge`: fold a LoRA adapter into its base and prove the merged model computes the same logits.

    honed merge adapter=runs/train/adapter output_dir=runs/merged

The output is a plain Hugging Face directory (safetensors + tokenizer) that vanilla `transformers` loads;
`merge.json` records the largest |merged − adapter| logit difference on probe prompts and the tolerance.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from honed.config import MergeConfig
from honed.generation import render_chat
from honed.models import load_model, resolve_model
from honed.artifacts import read_adapter_meta, write_meta

PROBE_PROMPTS = [
    "What does ICD-10-CM code E11.9 mean?",
    "Which ICD-10-CM chapter contains code J45.909?",
    "In the beginning God created the heaven and the earth.",
]


class MergeMismatch(RuntimeError):
    """The merged model's logits differ from the adapter's by more than the stated tolerance."""


def merge(cfg: MergeConfig) -> dict:
    """Merge in the current process (call through a Ray task to run on a cluster node)."""
    torch.set_num_threads(1)
    meta = read_adapter_meta(cfg.adapter)
    model_path = resolve_model(cfg.model.name_or_path)
    model, tokenizer = load_model(model_path, "float32")  # merge in fp32 so the check is meaningful
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, cfg.adapter).eval()
    probes = [render_chat(tokenizer, [{"role": "user", "content": p}], meta.get("template")) for p in PROBE_PROMPTS]
    inputs = tokenizer(probes, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        expected = peft_model(**inputs).logits
        merged = peft_model.merge_and_unload()
        in_memory = (merged(**inputs).logits - expected).abs().max().item()
    out = Path(cfg.output_dir)
    shutil.rmtree(out, ignore_errors=True)
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    reloaded_diff = reload_difference(out, inputs, expected)
    report = {"adapter": str(cfg.adapter), "base_model": cfg.model.name_or_path, "tolerance": cfg.tolerance,
              "max_abs_logit_diff": max(in_memory, reloaded_diff), "in_memory_diff": in_memory,
              "reloaded_diff": reloaded_diff, "probe_prompts": PROBE_PROMPTS}
    (out / "merge.json").write_text(json.dumps(report, indent=2))
    if meta:
        write_meta(out, meta | {"merged_from": str(cfg.adapter)})
    if report["max_abs_logit_diff"] > cfg.tolerance:
        raise MergeMismatch(f"merged logits differ from adapter logits by {report['max_abs_logit_diff']:.2e} "
                            f"> tolerance {cfg.tolerance:.1e}; the merged model in {out} is not trustworthy")
    return report


def reload_difference(path: Path, inputs, expected: torch.Tensor) -> float:
    """Load the saved directory with plain transformers, as a user would, and compare logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return (model(**inputs).logits - expected).abs().max().item()
