"""`honed merge`: fold a LoRA adapter into its base and prove the merged model computes the same logits.

    honed merge adapter=runs/train/adapter output_dir=runs/merged

The output is a plain Hugging Face directory (safetensors + tokenizer) that vanilla `transformers` loads;
`merge.json` records the largest |merged − adapter| logit difference on probe prompts and the tolerance.
`adapter` and `output_dir` may be object-storage URIs (the adapter is fetched, the merged model staged locally
and uploaded only once it verified); the base model resolves on the node the merge task runs on.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from honed.artifacts import read_adapter_meta, write_meta
from honed.config import MergeConfig
from honed.generation import render_chat
from honed.models import device_dtype, load_tokenizer, model_dir
from honed.runtime import task_device
from honed.storage import delete_dir, is_uri, local_copy, staged

PROBE_PROMPTS = [
    "What does ICD-10-CM code E11.9 mean?",
    "Which ICD-10-CM chapter contains code J45.909?",
    "In the beginning God created the heaven and the earth.",
]


ABS_TOLERANCE = 1e-3
"""fp32: the default `tolerance` (see MergeConfig.tolerance)."""
REL_TOLERANCE = {torch.bfloat16: 4e-2, torch.float16: 5e-3}
"""bf16/fp16: a share of the largest |logit|. Half-precision weights and activations round every sum to 8 (bf16) or
11 (fp16) mantissa bits, and merging W + BA before rounding differs from rounding W and BA apart: measured on the
tiny test model (random LoRA B, r 4, CPU) max |Δ| / max |logit| = 0.016 in bf16; the bound leaves 2.5x room, fp16
scales it by its 8x finer mantissa. Not yet measured on a GPU."""
QUANTIZED_TOLERANCE = 1e-4
"""QLoRA, fp32 compute: the merged model (dequantized base + BA) against the 4-bit base + adapter it was trained
on, relative to the largest |logit|. bitsandbytes' 4-bit matmul dequantizes each weight to the compute dtype and
multiplies, which is what the merged model does with the dequantized weight, so only the order of the LoRA sum
differs: measured 1.3e-6 on the tiny test model (NF4, double quant, CPU)."""


class MergeMismatch(RuntimeError):
    """The merged model's logits differ from the adapter's by more than the stated tolerance."""


def merge(cfg: MergeConfig) -> dict:
    """Merge in the current process on the task's device (`honed merge` runs it as a Ray task: on the cluster,
    on a GPU with `use_gpu`) in `model.dtype`, save, reload as a user would and compare logits."""
    torch.set_num_threads(1)
    with local_copy(cfg.adapter) as adapter, staged(cfg.output_dir) as out:
        report = merge_into(cfg, str(adapter), out)  # a mismatch raises: nothing is uploaded
        if is_uri(cfg.output_dir):
            delete_dir(cfg.output_dir)  # an earlier merge's files, before the upload
        return report


def merge_into(cfg: MergeConfig, adapter: str, out: Path) -> dict:
    """`merge` with the adapter in the local dir `adapter`, writing the merged model to the local dir `out`."""
    meta = read_adapter_meta(adapter)
    device = task_device(cfg.use_gpu)
    dtype = device_dtype(cfg.model.dtype, device)
    model_path = model_dir(cfg.model)
    tokenizer = load_tokenizer(model_path)
    probes = [render_chat(tokenizer, [{"role": "user", "content": p}], meta.get("template")) for p in PROBE_PROMPTS]
    inputs = tokenizer(probes, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    quantized = meta.get("method", {}).get("name") == "qlora"
    with torch.no_grad():
        if quantized:
            expected, merged = merge_quantized(model_path, adapter, meta["method"]["quant"], dtype, device, inputs)
        else:
            expected, merged = merge_plain(model_path, adapter, dtype, device, inputs)
        in_memory = (merged(**inputs).logits.float() - expected).abs().max().item()
    shutil.rmtree(out, ignore_errors=True)
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    reloaded_diff = reload_difference(out, inputs, expected, dtype, device)
    tolerance = cfg.tolerance or tolerance_for(dtype, float(expected.abs().max()), quantized)
    report = {"adapter": str(cfg.adapter), "base_model": cfg.model.name_or_path, "tolerance": tolerance,
              "dtype": str(dtype).removeprefix("torch."), "device": device.type,
              "reference": "4-bit base + adapter" if quantized else "base + adapter",
              "max_abs_logit": round(float(expected.abs().max()), 4),
              "max_abs_logit_diff": max(in_memory, reloaded_diff), "in_memory_diff": in_memory,
              "reloaded_diff": reloaded_diff, "probe_prompts": PROBE_PROMPTS}
    (out / "merge.json").write_text(json.dumps(report, indent=2))
    if meta:
        write_meta(out, meta | {"merged_from": str(cfg.adapter)})
    if report["max_abs_logit_diff"] > tolerance:
        raise MergeMismatch(f"merged logits differ from adapter logits by {report['max_abs_logit_diff']:.2e} "
                            f"> tolerance {tolerance:.1e}; the merged model in {cfg.output_dir} is not trustworthy")
    return report


def tolerance_for(dtype: torch.dtype, max_abs_logit: float, quantized: bool) -> float:
    """The stated bound for a merge in `dtype` (see ABS_TOLERANCE, REL_TOLERANCE, QUANTIZED_TOLERANCE)."""
    scale = max(max_abs_logit, 1.0)
    if dtype in REL_TOLERANCE:
        return REL_TOLERANCE[dtype] * scale
    return QUANTIZED_TOLERANCE * scale if quantized else ABS_TOLERANCE


def merge_plain(model_path: str, adapter: str, dtype: torch.dtype, device: torch.device, inputs):
    """(logits of base + adapter, the merged model) for LoRA adapters on a base in `dtype`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, device_map={"": device})
    model = PeftModel.from_pretrained(base, adapter).eval()
    return model(**inputs).logits.float(), model.merge_and_unload()


def merge_quantized(model_path: str, adapter: str, quant: dict, dtype: torch.dtype, device: torch.device, inputs):
    """QLoRA: the adapter was trained on 4-bit weights, so the reference is the 4-bit base + adapter and the
    merged model is the dequantized base + BA (merging into the 4-bit layers would quantize BA away)."""
    from peft import PeftModel

    from honed.config import QuantSettings
    from honed.train.methods import load_4bit

    model = PeftModel.from_pretrained(load_4bit(model_path, QuantSettings.model_validate(quant), dtype, device),
                                      adapter).eval()
    expected = model(**inputs).logits.float()
    dequantized = model.unload().dequantize().to(dtype)  # the base's 4-bit weights, as the matmuls saw them
    return expected, PeftModel.from_pretrained(dequantized, adapter).eval().merge_and_unload()


def reload_difference(path: Path, inputs, expected: torch.Tensor, dtype: torch.dtype, device: torch.device) -> float:
    """Load the saved directory with plain transformers, as a user would, and compare logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": device}).eval()
    with torch.no_grad():
        return (model(**inputs).logits.float() - expected).abs().max().item()
