"""Training on a CUDA GPU: the attention kernel `model.attn_implementation: auto` picks, padding-free batches against
padded ones under that kernel, bf16 losses against fp32, and the datasheet peak against a measured matmul.

    .venv/bin/python -m pytest -m gpu tests/gpu -q     # skipped where torch sees no CUDA device

The CPU side of the same code (kernel choice as a pure function, padding-free = padded in fp32, the FLOPs count)
is tests/unit/test_padding_free.py and tests/unit/test_efficiency.py."""

import numpy as np
import pytest
import torch

from honed.config import MethodConfig
from honed.train.attention import IMPLEMENTATION, use_varlen
from honed.train.collate import collate
from honed.train.dpo import object_column
from honed.train.efficiency import datasheet_peak_flops, device_peak_flops, measure_peak_flops
from honed.train.losses import causal_lm_loss, row_losses
from honed.train.methods import build_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
GPU = torch.device("cuda")


def flash_installed() -> bool:
    from transformers.utils import is_flash_attn_2_available

    return is_flash_attn_2_available()


def examples(lengths, seed=0, prompt=2):
    rng = np.random.default_rng(seed)
    ids = [rng.integers(5, 200, size=n) for n in lengths]
    labels = [np.where(np.arange(n) >= prompt, x, -100) for x, n in zip(ids, lengths)]
    return {"input_ids": object_column(ids), "labels": object_column(labels)}


def load(path, kernel: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=kernel,
                                                device_map={"": GPU})


def loss_and_grads(model, inputs, dtype):
    """Loss and flattened gradient of one micro-batch, fp32 master weights under autocast to `dtype`."""
    model.zero_grad()
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        loss, _ = causal_lm_loss(model, inputs)
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])


def test_auto_picks_flash_attention_2_where_installed_else_sdpa(tiny_model):
    expected = "flash_attention_2" if flash_installed() else "sdpa"
    lora = build_model(MethodConfig(name="lora"), tiny_model, "auto", GPU)  # bf16 on GPU
    assert lora.get_base_model().config._attn_implementation == expected
    # full fine-tuning keeps fp32 master weights but computes in bf16 under autocast: the same kernel
    assert build_model(MethodConfig(name="full"), tiny_model, "auto", GPU).config._attn_implementation == expected
    # fp32 compute: flash-attn has no kernel for it
    fp32 = build_model(MethodConfig(name="lora"), tiny_model, "float32", GPU)
    assert fp32.get_base_model().config._attn_implementation == "sdpa"
    # padding-free batches: flash attention reads the boundaries itself, sdpa falls back per example
    assert use_varlen(lora) == ("flash_attention_2" if flash_installed() else IMPLEMENTATION)


@pytest.mark.parametrize("kernel, dtype, loss_tol, grad_cos", [
    ("sdpa", torch.float32, 1e-4, 0.99999),  # flattened rows run honed_varlen (per-example SDPA)
    ("sdpa", torch.bfloat16, 2e-2, 0.999),
    ("flash_attention_2", torch.bfloat16, 2e-2, 0.999),  # flattened rows run flash's variable-length kernel
])
def test_padding_free_equals_padded_on_cuda(tiny_model, kernel, dtype, loss_tol, grad_cos):
    if kernel == "flash_attention_2" and not flash_installed():
        pytest.skip("flash-attn is not installed")
    batch = examples([7, 12, 5, 9, 3, 31])
    padded_loss, padded_grads = loss_and_grads(load(tiny_model, kernel), collate(batch, 0, GPU), dtype)
    flat_model = load(tiny_model, kernel)
    assert use_varlen(flat_model) == (kernel if kernel.startswith("flash") else IMPLEMENTATION)
    flat_loss, flat_grads = loss_and_grads(flat_model, collate(batch, 0, GPU, flat=True), dtype)
    assert flat_loss == pytest.approx(padded_loss, rel=loss_tol)
    assert float(torch.nn.functional.cosine_similarity(flat_grads, padded_grads, dim=0)) > grad_cos


def test_validation_scores_each_example_of_a_flattened_row_on_cuda(tiny_model):
    """A padding-free run validates on flattened rows: per example, on the GPU, the padded batch's figures."""
    batch = examples([7, 12, 5, 9])
    with torch.no_grad():
        padded = row_losses(load(tiny_model, "sdpa"), collate(batch, 0, GPU))
        flat_model = load(tiny_model, "sdpa")
        use_varlen(flat_model)
        flat = row_losses(flat_model, collate(batch, 0, GPU, flat=True))
    assert [n for _, n in flat] == [n for _, n in padded] == [5, 10, 3, 7]
    assert [s for s, _ in flat] == pytest.approx([s for s, _ in padded], rel=1e-4)


def test_bf16_losses_track_fp32_and_fall(tiny_model):
    """bf16 autocast gives the fp32 loss to ~1 %, and 30 full fine-tuning steps on one batch bring it down."""
    batch = collate(examples([20, 33, 17, 40], seed=4), 0, GPU)
    model = load(tiny_model, "sdpa")
    fp32, _ = loss_and_grads(model, batch, torch.float32)
    bf16, _ = loss_and_grads(model, batch, torch.bfloat16)
    assert bf16 == pytest.approx(fp32, rel=2e-2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss, _ = loss_and_grads(model, batch, torch.bfloat16)
        optimizer.step()
        losses.append(loss)
    assert all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0], losses


def test_datasheet_peak_bounds_a_measured_matmul():
    name = torch.cuda.get_device_name(GPU)
    sheet = datasheet_peak_flops(name, torch.bfloat16)
    if sheet is None:
        pytest.skip(f"{name} is not in honed.train.efficiency.GPU_DATASHEET")
    measured = measure_peak_flops(GPU, torch.bfloat16)
    # a large bf16 matmul reaches 50-90 % of the datasheet's dense figure, never more
    assert 0.3 * sheet < measured <= 1.05 * sheet, (name, measured, sheet)
    assert device_peak_flops(GPU, torch.bfloat16, None) == (sheet, f"datasheet {name}, dense bfloat16")
