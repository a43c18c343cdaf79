"""What only a GPU can tell about the large-model path (`pytest -m gpu`; skipped without CUDA): ZeRO-3 builds the
model partitioned on the device, and merge / the export check run on the GPU in bf16 within their stated bounds.
No Ray: the per-worker code runs in this process with a torch.distributed group of one."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda")


@pytest.fixture
def process_group(tmp_path):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("nccl", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_zero3_builds_the_model_partitioned_on_the_gpu(tiny_model, process_group):
    pytest.importorskip("deepspeed")
    from honed.config import TrainConfig
    from honed.train.backends import run_deepspeed_config
    from honed.train.efficiency import held_params
    from honed.train.methods import build_model, count_params, sharded_loading

    cfg = TrainConfig(model={"name_or_path": tiny_model}, method={"name": "full", "deepspeed": {"zero_stage": 3}},
                      scaling={"use_gpu": True})
    ds_config = run_deepspeed_config(cfg, CUDA)
    keep = sharded_loading(ds_config)
    model = build_model(cfg.method, tiny_model, cfg.model.dtype, CUDA)
    assert keep is not None and ds_config["bf16"]["enabled"]
    assert all(hasattr(p, "ds_tensor") for p in model.parameters())  # created partitioned, never whole
    assert held_params(model) >= count_params(model)[1]  # one rank holds every partition (plus padding)
    assert {p.ds_tensor.dtype for p in model.parameters()} == {torch.bfloat16}


def test_merge_on_the_gpu_in_bf16_within_its_bound(tiny_model, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from honed.config import MergeConfig
    from honed.merge import merge

    torch.manual_seed(0)
    adapter = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM"))
    adapter.save_pretrained(tmp_path / "adapter")
    (tmp_path / "adapter" / "honed.json").write_text(json.dumps({}))
    report = merge(MergeConfig(model={"name_or_path": tiny_model}, adapter=str(tmp_path / "adapter"),
                               output_dir=str(tmp_path / "merged"), use_gpu=True))
    print("gpu bf16 merge:", {k: report[k] for k in ("max_abs_logit_diff", "max_abs_logit", "tolerance")})
    assert report["device"] == "cuda" and report["dtype"] == "bfloat16"
    assert report["max_abs_logit_diff"] <= report["tolerance"]


def test_the_loops_sums_are_all_reduced_on_the_gpu_under_nccl(process_group):
    """Ray Train gives GPU workers an NCCL-only process group, which has no CPU transport: the loop's sums (each
    step's objective share, validation) must be reduced on the GPU."""
    import torch.distributed as dist

    from honed.train.validation import collective_device

    assert collective_device() == torch.device("cuda", torch.cuda.current_device())
    sums = torch.tensor([1.5, 2.0], dtype=torch.float64, device=collective_device())
    dist.all_reduce(sums)
    assert sums.tolist() == [1.5, 2.0]
