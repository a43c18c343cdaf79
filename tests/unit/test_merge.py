"""Merging a LoRA adapter: the merged HF directory computes the adapter's logits and loads with plain
transformers; a mismatch beyond the tolerance is refused."""

import json

import pytest
import torch


@pytest.fixture
def random_adapter(tiny_model, tmp_path):
    """A LoRA adapter with non-zero B (peft's init would make it a no-op) plus its honed.json."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                  init_lora_weights=False, task_type="CAUSAL_LM"))
    path = tmp_path / "adapter"
    peft_model.save_pretrained(path)
    (path / "honed.json").write_text(json.dumps({"template": {"system_prompt": "Be brief."}}))
    return str(path)


def test_merge_matches_adapter_logits_and_reloads(tiny_model, random_adapter, tmp_path):
    from transformers import AutoModelForCausalLM

    from honed.config import MergeConfig
    from honed.merge import merge

    out = tmp_path / "merged"
    report = merge(MergeConfig(model={"name_or_path": tiny_model}, adapter=random_adapter, output_dir=str(out)))
    assert report["max_abs_logit_diff"] <= 1e-4  # tiny logits: far below the 1e-3 default
    assert json.loads((out / "merge.json").read_text())["tolerance"] == 1e-3
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert (merged(ids).logits - base(ids).logits).abs().max() > 1e-3  # the adapter changed something


def test_merge_refuses_beyond_tolerance(tiny_model, random_adapter, tmp_path):
    from honed.config import MergeConfig
    from honed.merge import MergeMismatch, merge

    cfg = MergeConfig(model={"name_or_path": tiny_model}, adapter=random_adapter,
                      output_dir=str(tmp_path / "m"), tolerance=1e-30)
    try:
        merge(cfg)
    except MergeMismatch as err:
        assert "tolerance" in str(err)
    else:  # fp32 merge can be bit-exact; then the reported difference must be exactly zero
        assert json.loads((tmp_path / "m" / "merge.json").read_text())["max_abs_logit_diff"] == 0.0


def test_merge_needs_an_adapter_dir(tiny_model, tmp_path):
    from honed.config import MergeConfig
    from honed.merge import merge

    with pytest.raises(FileNotFoundError, match="not an adapter directory"):
        merge(MergeConfig(model={"name_or_path": tiny_model}, adapter=str(tmp_path), output_dir=str(tmp_path / "o")))


def test_unknown_model_path_is_refused(tmp_path):
    from honed.models import resolve_model

    with pytest.raises(FileNotFoundError, match="neither a builtin"):
        resolve_model(str(tmp_path / "nope"))


def test_merge_in_bf16_states_a_bound_relative_to_the_logits(tiny_model, random_adapter, tmp_path):
    """In half precision the merged model rounds W + BA where the adapter rounds W and BA apart: the stated bound
    is a share of the largest logit, and the measured difference is inside it but no longer zero."""
    from honed.config import MergeConfig
    from honed.merge import REL_TOLERANCE, merge

    report = merge(MergeConfig(model={"name_or_path": tiny_model, "dtype": "bfloat16"}, adapter=random_adapter,
                               output_dir=str(tmp_path / "m")))
    print("bf16 merge:", {k: report[k] for k in ("max_abs_logit_diff", "max_abs_logit", "tolerance")})
    assert report["dtype"] == "bfloat16"
    assert report["tolerance"] == pytest.approx(REL_TOLERANCE[torch.bfloat16] * max(report["max_abs_logit"], 1),
                                                rel=1e-3)
    assert report["max_abs_logit_diff"] <= report["tolerance"]


def test_qlora_merges_into_the_dequantized_base_and_matches_the_4bit_model(tiny_model, tmp_path):
    """A QLoRA adapter is checked against the 4-bit base it was trained on: the merged (dequantized) model's
    logits equal the 4-bit model + adapter's within the stated bound, and the merged model is a plain model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from honed.config import MergeConfig, MethodConfig
    from honed.merge import merge
    from honed.train.methods import load_4bit

    method = MethodConfig(name="qlora")
    torch.manual_seed(0)
    base = load_4bit(tiny_model, method.quant, torch.float32, torch.device("cpu"))
    adapter = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                              init_lora_weights=False, task_type="CAUSAL_LM"))
    path = tmp_path / "qlora"
    adapter.save_pretrained(path)
    (path / "honed.json").write_text(json.dumps({"method": method.model_dump()}))
    report = merge(MergeConfig(model={"name_or_path": tiny_model}, adapter=str(path), output_dir=str(tmp_path / "m")))
    print("qlora merge:", {k: report[k] for k in ("max_abs_logit_diff", "max_abs_logit", "tolerance")})
    assert report["reference"] == "4-bit base + adapter"
    assert report["max_abs_logit_diff"] <= report["tolerance"]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert not any("4bit" in type(p).__name__ for p in merged.parameters())
    # the adapter on the original full-precision base (what merging into it would give) is not the model trained
    from peft import PeftModel

    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        on_4bit = adapter.eval()(input_ids=ids).logits
        on_full = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), path).eval()(
            input_ids=ids).logits
    assert (on_full - on_4bit).abs().max() > 10 * report["max_abs_logit_diff"]
