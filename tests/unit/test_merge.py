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
