"""Training building blocks without Ray: QLoRA numerics, the peft methods and their optimizer groups, the
generated DeepSpeed config, config validation (and the CLI refusing before Ray starts), and the loop's
pure helpers (row slicing, early stopping); efficiency accounting is tests/unit/test_efficiency.py."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from honed.config import ConfigError, EarlyStopping, MethodConfig, OptimConfig, TrainConfig, load_config
from honed.train.backends import deep_merge, deepspeed_config, model_hidden_size, zero_buckets
from honed.train.batching import length_grouped
from honed.train.collate import RowCost, collate, rank_rows, row_costs, row_tokens
from honed.train.losses import causal_lm_loss
from honed.train.validation import should_stop
from honed.train.methods import (
    FastDropout,
    build_model,
    count_params,
    make_optimizer,
    param_groups,
    peft_config,
)

CPU = torch.device("cpu")
# The tiny Llama: 2 layers x (q, k, v, o, gate, up, down); lm_head is tied to the embeddings and never quantized.
LINEARS_PER_LAYER, LAYERS = 7, 2


def method(name: str, **settings) -> MethodConfig:
    return MethodConfig(name=name, **settings)


def optim(**settings) -> OptimConfig:
    return OptimConfig(**settings)


def trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def fixed_batch(seed: int = 0) -> dict:
    """Three right-padded rows of different lengths; the first 5 tokens of each are prompt (no loss)."""
    rng = np.random.default_rng(seed)
    ids = [rng.integers(3, 500, n) for n in (20, 13, 17)]
    labels = [np.where(np.arange(len(x)) < 5, -100, x) for x in ids]
    return collate({"input_ids": ragged(ids), "labels": ragged(labels)}, pad_id=0, device=CPU)


def ragged(rows: list[np.ndarray]) -> np.ndarray:
    """A 1-D object array of variable-length rows, as Ray Data's numpy batches hold them."""
    return np.array(rows + [None], dtype=object)[:-1]


def randomize_(params, seed: int, scale: float = 0.05) -> None:
    """Non-zero LoRA weights: with peft's B = 0 init the gradient of every A would be exactly 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * scale)


# ------------------------------------------------------------------------------------------ 1. QLoRA
def test_qlora_gradients_match_fp32_lora_on_the_dequantized_weights(tiny_model):
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    spec = method("qlora", lora={"dropout": 0.0}, quant={"quant_type": "nf4", "double_quant": True})
    qlora = build_model(spec, tiny_model, "auto", CPU)
    qlora.train()

    # The base really is 4-bit: every linear layer (hidden 64 / 128 in-features: each row is a whole number
    # of 64-value blocks) is a Linear4bit holding packed NF4 with double-quantized block constants.
    quantized = {n.removesuffix(".base_layer"): m for n, m in qlora.get_base_model().named_modules()
                 if isinstance(m, bnb.nn.Linear4bit)}
    assert len(quantized) == LINEARS_PER_LAYER * LAYERS
    for name, module in quantized.items():
        w, state = module.weight, module.weight.quant_state
        assert w.dtype == torch.uint8 and state is not None, name
        assert state.quant_type == "nf4" and state.nested, name  # nested = double quant
        assert tuple(state.shape) == (module.out_features, module.in_features)
        assert w.numel() * 2 == state.shape.numel()  # two 4-bit values per byte
        assert state.shape.numel() % state.blocksize == 0
        assert module.compute_dtype == torch.float32  # `auto` on CPU
    randomize_(trainable(qlora).values(), seed=1)

    # The reference: the same architecture in fp32 whose linear weights ARE the dequantized 4-bit weights.
    reference = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    reference.config.use_cache = False
    quant_error = 0.0
    with torch.no_grad():
        for name, module in quantized.items():
            target = reference.get_submodule(name)
            dequantized = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
            quant_error = max(quant_error, float((target.weight - dequantized).abs().max()))
            target.weight.copy_(dequantized)
    # NF4 moves the weights visibly (std-0.1 init, 16 levels per block): the comparison below is not vacuous.
    assert 1e-3 < quant_error < 0.1
    reference = get_peft_model(reference, peft_config(spec))
    reference.train()
    adapter = get_peft_model_state_dict(qlora)
    set_peft_model_state_dict(reference, adapter)
    ref_params = trainable(reference)
    assert ref_params.keys() == trainable(qlora).keys()
    for name, p in trainable(qlora).items():
        assert torch.equal(ref_params[name], p)
    # 4-bit weights count as their unpacked number of values: totals agree with the fp32 model.
    assert count_params(qlora) == count_params(reference)

    batch = fixed_batch()
    q_loss, q_n = causal_lm_loss(qlora, batch)
    q_loss.backward()
    r_loss, r_n = causal_lm_loss(reference, batch)
    r_loss.backward()

    # Tolerance: on CPU bitsandbytes' 4-bit matmul dequantizes the block to the fp32 compute dtype and calls
    # the same dense matmul, so this is bit-exact today (max |Δ| = 0 for the loss and all 56 gradients).
    # rtol 1e-4 / atol 1e-6 leaves room for a fused 4-bit GEMM (the optional `kernels` package, or GPU
    # kernels) summing in a different order — ~1e-7 relative in fp32 — while a wrong scale, a missed
    # module or gradients flowing through the original instead of the quantized weights is off by >1e-3.
    assert q_n == r_n == sum(n - 5 for n in (20, 13, 17))  # every labelled token, padding excluded
    torch.testing.assert_close(q_loss, r_loss, rtol=1e-5, atol=1e-6)
    grads_q = {n: p.grad for n, p in trainable(qlora).items()}
    grads_r = {n: p.grad for n, p in ref_params.items()}
    assert all(g is not None and g.abs().max() > 1e-4 for g in grads_q.values())
    for name, grad in grads_q.items():
        torch.testing.assert_close(grad, grads_r[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    assert all(p.grad is None for n, p in qlora.named_parameters() if not p.requires_grad)

    # Sensitivity check: the fp32 model on the ORIGINAL (unquantized) weights gives a different loss.
    original = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                              peft_config(spec))
    set_peft_model_state_dict(original, adapter)
    original.config.use_cache = False
    with torch.no_grad():
        o_loss, _ = causal_lm_loss(original.train(), batch)
    assert abs(float(o_loss) - float(q_loss)) > 1e-4


# ------------------------------------------------------------------------- 2. methods, groups, optimizers
@pytest.mark.parametrize("name, settings, markers, count", [
    ("lora", {}, {"lora_A", "lora_B"}, 2 * LINEARS_PER_LAYER * LAYERS),
    ("lora", {"lora": {"use_dora": True}}, {"lora_A", "lora_B", "lora_magnitude_vector"},
     3 * LINEARS_PER_LAYER * LAYERS),
    ("prefix", {}, {"prompt_encoder"}, 1),
    ("ia3", {}, {"ia3_l"}, 3 * LAYERS),  # peft's Llama defaults: k_proj, v_proj, down_proj
])
def test_peft_methods_train_only_their_own_parameters(tiny_model, name, settings, markers, count):
    model = build_model(method(name, **settings), tiny_model, "auto", CPU)
    params = trainable(model)
    assert len(params) == count
    found = set()
    for pname in params:
        hit = {m for m in markers if m in pname}
        assert len(hit) == 1, f"{pname} is trainable but is none of {sorted(markers)}"
        found |= hit
    assert found == markers
    n_trainable, total = count_params(model)
    assert n_trainable == sum(p.numel() for p in params.values())
    assert 0 < n_trainable < total / 2


def test_full_method_trains_every_weight_in_fp32(tiny_model):
    model = build_model(method("full"), tiny_model, "auto", CPU)
    assert all(p.requires_grad and p.dtype == torch.float32 for p in model.parameters())
    n_trainable, total = count_params(model)
    assert n_trainable == total == sum(p.numel() for p in model.parameters())


def test_rslora_scales_by_alpha_over_sqrt_r(tiny_model):
    def scaling(use_rslora):
        model = build_model(method("lora", lora={"r": 4, "alpha": 8, "use_rslora": use_rslora}), tiny_model,
                            "auto", CPU)
        values = [m.scaling["default"] for m in model.modules() if hasattr(m, "lora_A") and m.lora_A]
        assert len(values) == LINEARS_PER_LAYER * LAYERS
        return values

    assert scaling(False) == pytest.approx([8 / 4] * LINEARS_PER_LAYER * LAYERS)
    assert scaling(True) == pytest.approx([8 / 4 ** 0.5] * LINEARS_PER_LAYER * LAYERS)


def group_of(groups: list[dict]) -> dict[int, tuple[float, float]]:
    return {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}


def test_param_groups_adapter_lr_and_decay_on_matrices_only(tiny_model):
    spec = method("lora", lora={"use_dora": True, "lr": 1e-3})
    model = build_model(spec, tiny_model, "auto", CPU)
    groups = param_groups(model, spec, optim(lr=2e-3, weight_decay=0.1))
    where = group_of(groups)
    params = trainable(model)
    assert len(where) == len(params)  # every trainable weight exactly once, nothing frozen
    for name, p in params.items():
        if "lora_A" in name or "lora_B" in name:
            assert p.ndim == 2 and where[id(p)] == (1e-3, 0.1), name
        else:  # DoRA magnitudes: optim.lr, no decay
            assert "lora_magnitude_vector" in name and p.ndim == 1 and where[id(p)] == (2e-3, 0.0), name
    # lora.lr unset: everything at optim.lr
    plain = param_groups(model, method("lora", lora={"use_dora": True}), optim(lr=2e-3, weight_decay=0.1))
    assert {lr for lr, _ in group_of(plain).values()} == {2e-3}


def test_param_groups_full_method_decays_matrices_not_norms(tiny_model):
    model = build_model(method("full"), tiny_model, "auto", CPU)
    where = group_of(param_groups(model, method("full"), optim(lr=5e-4, weight_decay=0.01)))
    for name, p in model.named_parameters():
        expected = 0.01 if p.ndim >= 2 else 0.0
        assert where[id(p)] == (5e-4, expected), name
    assert any("norm" in n for n, p in model.named_parameters() if where[id(p)][1] == 0.0)


def test_param_groups_no_decay_on_ia3_scale_vectors(tiny_model):
    spec = method("ia3")
    model = build_model(spec, tiny_model, "auto", CPU)
    where = group_of(param_groups(model, spec, optim(weight_decay=0.1)))
    for name, p in trainable(model).items():
        assert where[id(p)][1] == 0.0, f"{name} {tuple(p.shape)} gets weight decay"


@pytest.mark.parametrize("name, cls", [
    ("adamw", "torch.optim.adamw.AdamW"),
    ("adamw_8bit", "bitsandbytes.optim.adamw.AdamW8bit"),
    ("paged_adamw_8bit", "bitsandbytes.optim.adamw.PagedAdamW8bit"),
    ("paged_adamw_32bit", "bitsandbytes.optim.adamw.PagedAdamW32bit"),
])
def test_make_optimizer_builds_the_named_class_and_steps_on_cpu(tiny_model, name, cls):
    spec = method("lora", lora={"dropout": 0.0, "lr": 5e-3})
    model = build_model(spec, tiny_model, "auto", CPU)
    params = trainable(model)
    randomize_(params.values(), seed=2)
    settings = optim(optimizer=name, lr=2e-3, weight_decay=0.01, betas=(0.8, 0.95))
    opt = make_optimizer(settings, param_groups(model, spec, settings))
    assert f"{type(opt).__module__}.{type(opt).__qualname__}" == cls
    assert {g["lr"] for g in opt.param_groups} == {5e-3}  # the group's lr wins over the default
    assert all(tuple(g["betas"]) == (0.8, 0.95) for g in opt.param_groups)

    batch = fixed_batch(seed=3)
    before = {n: p.detach().clone() for n, p in params.items()}
    first = None
    for _ in range(3):
        loss, _ = causal_lm_loss(model, batch)
        first = float(loss) if first is None else first
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    after, _ = causal_lm_loss(model, batch)
    assert all(torch.isfinite(p).all() and not torch.equal(p, before[n]) for n, p in params.items())
    assert all(torch.equal(p, p) for p in model.parameters())  # no NaN anywhere
    assert float(after) < first
    assert len(opt.state) == len(params)


def test_torch_adamw_runs_fused_and_matches_the_reference_implementation(tiny_model):
    """The fused kernel is picked for CPU/CUDA float parameters and steps like the for-loop AdamW."""
    spec = method("full")
    settings = optim(lr=1e-2, weight_decay=0.1)
    models = [build_model(spec, tiny_model, "auto", CPU) for _ in range(2)]
    fused = make_optimizer(settings, param_groups(models[0], spec, settings))
    assert all(g["fused"] for g in fused.param_groups)
    reference = torch.optim.AdamW(param_groups(models[1], spec, settings), lr=1e-2, foreach=False)
    batch = fixed_batch(seed=4)
    for _ in range(3):
        for model, opt in zip(models, (fused, reference)):
            loss, _ = causal_lm_loss(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


# --------------------------------------------------------------------------------------- dropout, masks
def test_fast_dropout_rate_scale_gradient_and_reproducibility():
    drop = FastDropout(0.1)
    x = torch.randn(400, 500, requires_grad=True)
    torch.manual_seed(7)
    y = drop(x)
    kept = y != 0
    assert abs(1 - kept.float().mean().item() - 0.1) < 0.005  # 200k draws: 5 sigma is ~0.0034
    torch.testing.assert_close(y[kept], x[kept] / 0.9)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, kept.float() / 0.9)  # backward masks with the forward's mask
    torch.manual_seed(7)
    assert torch.equal(drop(x), y)  # the torch seed fixes the mask
    assert not torch.equal(drop(x), y)  # and the next call draws a new one
    drop.eval()
    assert drop(x) is x or torch.equal(drop(x), x)


def test_lora_dropout_is_swapped_on_cpu_only_when_it_drops(tiny_model):
    with_dropout = build_model(method("lora", lora={"dropout": 0.05}), tiny_model, "auto", CPU)
    drops = [m for m in with_dropout.modules() if isinstance(m, torch.nn.Dropout) and m.p == 0.05]
    assert len(drops) == LINEARS_PER_LAYER * LAYERS and all(isinstance(m, FastDropout) for m in drops)
    without = build_model(method("lora", lora={"dropout": 0.0}), tiny_model, "auto", CPU)
    assert not any(isinstance(m, FastDropout) for m in without.modules())


def test_right_padded_batch_loses_the_mask_without_changing_a_loss(tiny_model):
    """Causal attention already hides the trailing padding from every scored token: dropping the mask of a
    right-padded batch gives the same losses; a left-padded batch keeps its mask and its losses."""
    from honed.train.losses import row_losses

    model = build_model(method("full"), tiny_model, "auto", CPU).eval()
    batch = fixed_batch(seed=5)
    assert int(batch["attention_mask"].sum()) < batch["attention_mask"].numel()  # there is padding
    with torch.no_grad():
        padded = row_losses(model, batch)
        alone = [row_losses(model, {k: v[i:i + 1, :n] for k, v in batch.items() if k != "n_tokens"})[0]
                 for i, n in enumerate(batch["attention_mask"].sum(1).tolist())]
    for (s, n), (s1, n1) in zip(padded, alone):
        assert n == n1 and s == pytest.approx(s1, rel=1e-5)

    left = {k: torch.flip(v, dims=[1]) for k, v in batch.items() if k != "n_tokens"}  # padding first
    left["labels"] = torch.flip(batch["labels"], dims=[1])
    with torch.no_grad():
        with_mask = row_losses(model, left)
        without = row_losses(model, {k: v for k, v in left.items() if k != "attention_mask"})
    assert with_mask != without  # the mask mattered here, so it was kept


# ------------------------------------------------------------------------------------ 3. DeepSpeed config
def ds_method(**deepspeed) -> MethodConfig:
    return method("full", deepspeed=deepspeed)


def test_deepspeed_config_stage_batch_and_clipping():
    cfg = deepspeed_config(ds_method(zero_stage=2), optim(batch_size=4, grad_accum_steps=3, grad_clip=0.5, lr=1e-4,
                                                          weight_decay=0.02, betas=(0.9, 0.95)),
                           torch.float32, world_size=5, use_gpu=False)
    assert cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 3
    assert cfg["train_batch_size"] == 4 * 3 * 5
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["zero_optimization"] == {"stage": 2}  # no offload blocks, no stage-3 keys
    assert cfg["optimizer"] == {"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.95], "weight_decay": 0.02,
                                                            "torch_adam": True}}
    assert cfg["bf16"] == {"enabled": False} and cfg["fp16"]["enabled"] is False
    # grad_clip null = no clipping, which DeepSpeed spells 0
    assert deepspeed_config(ds_method(zero_stage=1), optim(grad_clip=None), torch.float32, 1, False)[
        "gradient_clipping"] == 0.0


@pytest.mark.parametrize("dtype, bf16, fp16", [(torch.bfloat16, True, False), (torch.float16, False, True),
                                                (torch.float32, False, False)])
def test_deepspeed_config_precision_follows_dtype(dtype, bf16, fp16):
    cfg = deepspeed_config(ds_method(zero_stage=1), optim(), dtype, 1, True)
    assert cfg["bf16"]["enabled"] is bf16
    assert cfg["fp16"]["enabled"] is fp16
    assert cfg["fp16"]["loss_scale"] == 0  # dynamic loss scaling


@pytest.mark.parametrize("use_gpu", [False, True])
def test_deepspeed_config_offload_blocks_and_cpu_adam(use_gpu):
    cfg = deepspeed_config(ds_method(zero_stage=3, offload_optimizer=True, offload_params=True), optim(),
                           torch.bfloat16, 2, use_gpu)
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": use_gpu}
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": use_gpu}
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert "torch_adam" not in cfg["optimizer"]["params"]  # offloaded states: DeepSpeed's CPU Adam

    only_opt = deepspeed_config(ds_method(zero_stage=2, offload_optimizer=True), optim(), torch.float32, 1, use_gpu)
    assert "offload_param" not in only_opt["zero_optimization"]
    assert "stage3_gather_16bit_weights_on_model_save" not in only_opt["zero_optimization"]
    assert "torch_adam" not in only_opt["optimizer"]["params"]
    on_device = deepspeed_config(ds_method(zero_stage=3), optim(), torch.float32, 1, use_gpu)
    assert on_device["optimizer"]["params"]["torch_adam"] is True
    assert "offload_optimizer" not in on_device["zero_optimization"]


def test_deepspeed_buckets_are_sized_to_the_model(tmp_path):
    # DeepSpeed's own 5e8-element buckets are 2 GB apiece in fp32, whatever the model: sized from hidden_size
    zero3 = deepspeed_config(ds_method(zero_stage=3), optim(), torch.float32, 2, False, hidden_size=1024)
    assert zero3["zero_optimization"] == {"stage": 3, "reduce_bucket_size": 1024 ** 2,
                                          "stage3_prefetch_bucket_size": int(0.9 * 1024 ** 2),
                                          "stage3_param_persistence_threshold": 10240,
                                          "stage3_max_live_parameters": 12 * 1024 ** 2,
                                          "stage3_max_reuse_distance": 12 * 1024 ** 2,
                                          "stage3_gather_16bit_weights_on_model_save": True}
    assert zero_buckets(2, 64) == {"reduce_bucket_size": 4096, "allgather_bucket_size": 4096}
    assert zero_buckets(2, None) == {}  # no model at hand: DeepSpeed's defaults
    raw = ds_method(zero_stage=3, config={"zero_optimization": {"reduce_bucket_size": 5e7}})
    assert deepspeed_config(raw, optim(), torch.float32, 1, False, 1024)["zero_optimization"][
        "reduce_bucket_size"] == 5e7  # the user's value wins
    (tmp_path / "config.json").write_text('{"text_config": {"hidden_size": 96}}')
    assert model_hidden_size(str(tmp_path)) == 96


def test_deepspeed_raw_config_merges_recursively_over_the_generated_one():
    raw = {"zero_optimization": {"reduce_bucket_size": 5e7, "stage3_gather_16bit_weights_on_model_save": False},
           "optimizer": {"params": {"eps": 1e-6, "lr": 3e-5}}, "gradient_clipping": 2.0,
           "activation_checkpointing": {"partition_activations": True}}
    spec = ds_method(zero_stage=3, offload_optimizer=True, config=raw)
    cfg = deepspeed_config(spec, optim(lr=1e-4), torch.bfloat16, 2, True)
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_optimizer"]["device"] == "cpu"  # generated nested keys kept
    assert zero["reduce_bucket_size"] == 5e7  # raw nested key added
    assert zero["stage3_gather_16bit_weights_on_model_save"] is False  # raw nested key wins
    assert cfg["optimizer"]["type"] == "AdamW"
    assert cfg["optimizer"]["params"]["eps"] == 1e-6 and cfg["optimizer"]["params"]["lr"] == 3e-5
    assert cfg["optimizer"]["params"]["betas"] == [0.9, 0.999]
    assert cfg["gradient_clipping"] == 2.0
    assert cfg["activation_checkpointing"] == {"partition_activations": True}
    assert cfg["train_batch_size"] == 8 * 1 * 2
    assert spec.deepspeed.config == raw  # the method config is not mutated


def test_deep_merge_does_not_mutate_and_replaces_non_dicts():
    base = {"a": {"b": 1, "c": {"d": 2}}, "e": [1]}
    merged = deep_merge(base, {"a": {"c": {"x": 3}}, "e": {"now": "a dict"}})
    assert merged == {"a": {"b": 1, "c": {"d": 2, "x": 3}}, "e": {"now": "a dict"}}
    assert base == {"a": {"b": 1, "c": {"d": 2}}, "e": [1]}
    assert deep_merge(base, {"a": 5}) == {"a": 5, "e": [1]}


# ----------------------------------------------------------------------------- 4. bad configs fail early
BAD_CONFIGS = {
    "unknown method": (["method.name=dora"], ["method.name = 'dora'", "'full', 'lora', 'qlora', 'prefix', 'ia3' or 'dpo'"]),
    "lora rank 0": (["method.lora.r=0"], ["method.lora.r = 0", "greater than 0"]),
    "zero stage 4": (["method.name=full", "method.deepspeed.zero_stage=4"],
                     ["method.deepspeed.zero_stage = 4", "0, 1, 2 or 3"]),
    "quant with full": (["method.name=full", "method.quant.quant_type=nf4"],
                        ["'quant' settings apply to method qlora, not 'full'"]),
    "deepspeed with qlora": (["method.name=qlora", "method.deepspeed.zero_stage=2"],
                             ["'deepspeed' settings apply to method full / lora, not 'qlora'"]),
    "offload params below stage 3": (
        ["method.name=full", "method.deepspeed.zero_stage=2", "method.deepspeed.offload_params=true"],
        ["method.deepspeed", "offload_params needs zero_stage 3 (got 2)"]),
    "offload optimizer without zero": (["method.name=full", "method.deepspeed.offload_optimizer=true"],
                                       ["method.deepspeed", "offload_optimizer needs zero_stage 1, 2 or 3 (got None)"]),
    "offload optimizer at stage 0": (
        ["method.name=full", "method.deepspeed.zero_stage=0", "method.deepspeed.offload_optimizer=true"],
        ["offload_optimizer needs zero_stage 1, 2 or 3 (got 0)"]),
    "batch size in raw config": (
        ["method.name=full", "method.deepspeed.zero_stage=2",
         "method.deepspeed.config={train_batch_size: 64, gradient_accumulation_steps: 2}"],
        ["method.deepspeed", "config may not set ['gradient_accumulation_steps', 'train_batch_size']",
         "optim.batch_size"]),
    "raw config without deepspeed": (["method.deepspeed.config={zero_optimization: {reduce_bucket_size: 1}}"],
                                     ["config is given but zero_stage is null"]),
    "prefix with checkpointing": (["method.name=prefix", "method.activation_checkpointing=true"],
                                  ["prefix tuning cannot use activation_checkpointing"]),
    "float16 on cpu": (["model.dtype=float16"], ["model.dtype float16 needs scaling.use_gpu: true"]),
    "bnb optimizer with deepspeed": (
        ["method.name=full", "method.deepspeed.zero_stage=2", "optim.optimizer=paged_adamw_8bit"],
        ["optim.optimizer 'paged_adamw_8bit' cannot be combined with DeepSpeed", "use adamw"]),
    "checkpoint metric not val": (["checkpoint_metric=loss"],
                                  ["checkpoint_metric 'loss' is not a validation metric", "val_loss/<source>"]),
    "early stopping metric not val": (["early_stopping.metric=tokens_per_s"],
                                      ["early_stopping.metric 'tokens_per_s' is not a validation metric"]),
    "unknown deepspeed key": (["method.name=full", "method.deepspeed.stage=2"],
                              ["method.deepspeed.stage: unknown key", "zero_stage"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_train_configs_fail_at_load_naming_key_and_allowed(case):
    overrides, expected = BAD_CONFIGS[case]
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, None, overrides)
    for text in expected:
        assert text in str(err.value), f"{text!r} not in {err.value}"


@pytest.mark.parametrize("overrides", [
    ["method.name=full", "method.deepspeed.zero_stage=3", "method.deepspeed.offload_params=true",
     "method.deepspeed.offload_optimizer=true", "method.deepspeed.config={zero_optimization: {sub_group_size: 1}}"],
    ["method.name=lora", "method.deepspeed.zero_stage=0"],
    ["method.name=qlora", "method.quant.quant_type=fp4", "optim.optimizer=paged_adamw_8bit"],
    ["model.dtype=float16", "scaling.use_gpu=true"],
    ["checkpoint_metric=val_loss/icd10", "early_stopping.patience=2"],
    ["method.name=ia3", "method.activation_checkpointing=true"],
])
def test_neighbouring_good_configs_still_load(overrides):
    assert load_config(TrainConfig, None, overrides) is not None


def test_checkpoint_metric_must_be_val_loss_or_a_source():
    with pytest.raises(ConfigError, match="not a validation metric"):
        load_config(TrainConfig, None, ["checkpoint_metric=val_lossy"])


def honed_script() -> str:
    script = Path(sys.executable).with_name("honed")
    found = str(script) if script.is_file() else shutil.which("honed")
    if not found:
        pytest.skip("the `honed` console script is not installed")
    return found


@pytest.mark.parametrize("yaml_text, message", [
    ("method:\n  name: qlora\n  deepspeed:\n    zero_stage: 2\n",
     "'deepspeed' settings apply to method full / lora, not 'qlora'"),
    ("method:\n  name: full\n  deepspeed:\n    zero_stage: 1\n    offload_params: true\n",
     "offload_params needs zero_stage 3 (got 1)"),
])
def test_honed_train_cli_exits_before_ray_on_bad_config(tmp_path, yaml_text, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml_text)
    # A stand-in `ray` first on the path: importing it leaves a marker and fails, so a CLI that touched Ray
    # before validating would be caught even if it swallowed the error.
    fake = tmp_path / "fake" / "ray"
    fake.mkdir(parents=True)
    marker = tmp_path / "ray_was_imported"
    fake.joinpath("__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\nraise ImportError('fake ray')\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(fake.parent), "HOME": str(tmp_path)}
    proc = subprocess.run([honed_script(), "train", str(bad)], capture_output=True, text=True, timeout=60, env=env,
                          check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert f"invalid TrainConfig in {bad}" in proc.stderr and message in proc.stderr
    assert not marker.exists(), "honed train imported ray before rejecting the config"
    assert "Started a local Ray instance" not in out and "ray.init" not in out.lower()


def test_cli_main_never_reaches_init_ray_on_bad_config(monkeypatch, own_output, tmp_path):
    import honed.runtime
    from honed.cli import main

    monkeypatch.setattr(honed.runtime, "init_ray", lambda *a, **k: pytest.fail("init_ray called"))
    for overrides, expected in BAD_CONFIGS.values():
        assert main(["train", *overrides, f"data_dir={tmp_path}"]) == 2
        err = own_output().err
        assert err.startswith("honed train: invalid TrainConfig")
        assert all(text in err for text in expected)


# --------------------------------------------------------------------------------------- 5. loop helpers
@pytest.mark.parametrize("n", [1, 2, 5, 8, 9, 16, 17])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_rank_rows_cover_every_row_once_balanced_by_tokens(n, world):
    lengths = np.random.default_rng(n * 10 + world).integers(20, 1024, n)
    batch = {"input_ids": ragged([np.full(k, i) for i, k in enumerate(lengths)]),
             "source": np.array([f"s{i}" for i in range(n)])}
    seen, loads = [], []
    for rank in range(world):
        rows = rank_rows(batch, rank, world)
        assert set(rows) == {"input_ids", "source", "_weight"}
        assert len(rows["input_ids"]) == len(rows["source"]) == len(rows["_weight"]) >= 1
        if rows["_weight"].sum() == 0:  # a rank without rows: one zero-weight stand-in row
            assert len(rows["_weight"]) == 1 and rows["input_ids"][0] is batch["input_ids"][0]
            loads.append(0)
            continue
        assert np.all(rows["_weight"] == 1)
        ids = [int(x[0]) for x in rows["input_ids"]]
        assert ids == sorted(ids)  # batch order kept inside a rank
        assert list(rows["source"]) == [f"s{i}" for i in ids]  # columns stay aligned
        seen.extend(ids)
        loads.append(sum(len(x) for x in rows["input_ids"]))
    assert sorted(seen) == list(range(n))  # each row exactly once
    # longest-first to the least-loaded rank: no rank carries more than the lightest plus one row
    assert max(loads) - min(loads) <= max(lengths)
    assert max(loads) <= max(sum(lengths) / world + max(lengths) * (world - 1) / world, max(lengths))


def test_rank_rows_balance_a_mixed_length_batch_that_slices_would_not():
    lengths = [1024, 900, 30, 25, 40, 35, 28, 22]  # long examples arrive together
    batch = {"input_ids": ragged([np.zeros(k) for k in lengths]), "labels": ragged([np.zeros(k) for k in lengths])}
    loads = [sum(len(x) for x in rank_rows(batch, r, 2)["input_ids"]) for r in range(2)]
    assert sorted(loads) == [1049, 1055]  # contiguous halves: 1,979 and 125
    pairs = {"input_ids": ragged([np.zeros(10), np.zeros(10)]), "rejected_input_ids": ragged([np.zeros(500), None])}
    assert row_tokens(pairs).tolist() == [510, 10]  # a preference pair counts both answers
    packed = {"input_ids": np.zeros((4, 64), dtype=np.int64), "num_tokens": np.array([64, 10, 60, 12])}
    assert [rank_rows(packed, r, 2)["num_tokens"].tolist() for r in range(2)] == [[64, 10], [60, 12]]


def test_row_costs_add_labelled_tokens_and_squared_example_lengths():
    cost = RowCost(labelled=0.5, squared=0.01)
    labels = [np.r_[-100, -100, 1, 2], np.full(10, -100), np.arange(6)]  # 2, 0 and 5 labelled (the first: never)
    rows = {"input_ids": ragged([np.zeros(4), np.zeros(10), np.zeros(6)]), "labels": ragged(labels)}
    assert row_costs(rows).tolist() == row_tokens(rows).tolist() == [4, 10, 6]  # no weights: tokens alone
    assert row_costs(rows, cost).tolist() == pytest.approx([4 + 1 + 0.16, 10 + 0 + 1.0, 6 + 2.5 + 0.36])
    pairs = {"input_ids": ragged([np.zeros(10), np.zeros(10)]), "labels": ragged([np.ones(10), np.ones(10)]),
             "rejected_input_ids": ragged([np.zeros(20), None]), "rejected_labels": ragged([np.ones(20), None])}
    assert row_costs(pairs, cost).tolist() == pytest.approx([30 + 0.5 * 28 + 0.01 * 500, 10 + 0.5 * 9 + 0.01 * 100])
    # packed rows: each example the positions restart for, up to num_tokens (the padding tail is no example)
    packed = {"input_ids": np.zeros((2, 8), dtype=np.int64), "labels": np.full((2, 8), -100),
              "position_ids": np.array([[0, 1, 2, 0, 1, 0, 0, 0], [0, 1, 2, 3, 4, 5, 0, 0]]),
              "num_tokens": np.array([5, 6])}
    assert row_costs(packed, RowCost(squared=1.0)).tolist() == [5 + 9 + 4, 6 + 36]


def test_rank_rows_balance_compute_not_just_tokens():
    """A fully labelled 600-token window costs more than 600 tokens of prompts (the output head at every token,
    attention's quadratic part): balanced by tokens it shares a rank with a 100-token row, by compute it runs
    alone beside the three others."""
    cost = RowCost(labelled=0.25, squared=2.3e-4)
    lengths = [600, 400, 300, 100]
    batch = {"input_ids": ragged([np.full(n, i) for i, n in enumerate(lengths)]),
             "labels": ragged([np.arange(600), *(np.full(n, -100) for n in lengths[1:])])}
    by_tokens = [rank_rows(batch, r, 2)["input_ids"] for r in range(2)]
    by_cost = [rank_rows(batch, r, 2, cost)["input_ids"] for r in range(2)]
    assert [[int(x[0]) for x in part] for part in by_tokens] == [[0, 3], [1, 2]]  # 700 tokens each
    assert [[int(x[0]) for x in part] for part in by_cost] == [[0], [1, 2, 3]]
    costs = row_costs(batch, cost)
    slowest = [max(costs[[int(x[0]) for x in part]].sum() for part in split) for split in (by_tokens, by_cost)]
    assert slowest[1] < slowest[0] * 0.95  # the step waits for its slowest rank


def stream(lengths: list[int], batch: int) -> list[dict]:
    """Global batches as Ray Data hands them: ragged token rows plus a per-row id column."""
    rows = [np.full(n, i, dtype=np.int64) for i, n in enumerate(lengths)]
    return [{"input_ids": ragged(rows[j:j + batch]), "labels": ragged(rows[j:j + batch]),
             "row": np.arange(j, min(j + batch, len(rows)))} for j in range(0, len(rows), batch)]


def padded_width(batches) -> int:
    return sum(len(b["input_ids"]) * max(len(x) for x in b["input_ids"]) for b in batches)


def test_length_grouping_reorders_rows_without_losing_or_repeating_any():
    lengths = np.random.default_rng(0).integers(5, 200, 8 * 19).tolist()
    plain = stream(lengths, 8)
    grouped = list(length_grouped(iter(stream(lengths, 8)), 4, seed=(0, 0)))
    assert [len(b["row"]) for b in grouped] == [len(b["row"]) for b in plain]  # same batch sizes, same count
    assert sorted(int(r) for b in grouped for r in b["row"]) == list(range(len(lengths)))
    for b in grouped:  # every row keeps its own tokens and labels
        assert all(len(x) == lengths[r] and (x == r).all() for x, r in zip(b["input_ids"], b["row"]))
        assert all((y == x).all() for x, y in zip(b["input_ids"], b["labels"]))
    # rows never leave their window of 4 batches (32 rows), and padding shrinks
    for w in range(0, len(grouped), 4):
        window_rows = {int(r) for b in grouped[w:w + 4] for r in b["row"]}
        assert window_rows == set(range(w * 8, min((w + 4) * 8, len(lengths))))
    assert padded_width(grouped) < 0.8 * padded_width(plain)
    assert collate(grouped[0], pad_id=0, device=CPU)["input_ids"].shape[0] == 8


def test_length_grouping_is_deterministic_resumable_and_off_at_one():
    lengths = np.random.default_rng(1).integers(5, 90, 6 * 12).tolist()
    first = [b["row"].tolist() for b in length_grouped(iter(stream(lengths, 6)), 3, seed=(0, 1))]
    again = [b["row"].tolist() for b in length_grouped(iter(stream(lengths, 6)), 3, seed=(0, 1))]
    assert first == again  # a resumed run skipping k batches skips the same rows
    other_epoch = [b["row"].tolist() for b in length_grouped(iter(stream(lengths, 6)), 3, seed=(0, 2))]
    assert sorted(map(sorted, other_epoch)) == sorted(map(sorted, first)) and other_epoch != first
    off = [b["row"].tolist() for b in length_grouped(iter(stream(lengths, 6)), 1, seed=(0, 1))]
    assert off == [b["row"].tolist() for b in stream(lengths, 6)]
    packed = [{"input_ids": np.zeros((2, 16), dtype=np.int64), "position_ids": np.zeros((2, 16)), "row": np.arange(2)}]
    assert list(length_grouped(iter(packed), 8, seed=(0, 0))) == packed  # packed rows pass through


def test_live_log_creates_the_output_dir_it_writes_into(tmp_path):
    """With storage_path elsewhere, nothing has created output_dir when the first step is logged."""
    from honed.train.loop import live_log

    path = tmp_path / "out" / "run" / "progress.jsonl"
    live_log(str(path), {"step": 1, "loss": 2.5})
    live_log(str(path), {"event": "resumed", "step": 1})
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [(x.get("event"), x["step"]) for x in lines] == [(None, 1), ("resumed", 1)]


def test_rank_rows_rank_without_rows_gets_one_zero_weight_row():
    batch = {"input_ids": np.array([7, 8]), "labels": np.array([1, 2])}
    parts = [rank_rows(batch, r, 4) for r in range(4)]
    assert [p["_weight"].tolist() for p in parts] == [[1.0], [1.0], [0.0], [0.0]]
    assert [p["input_ids"].tolist() for p in parts] == [[7], [8], [7], [7]]
    # rows of equal length split evenly
    even = [rank_rows({"x": np.arange(8)}, r, 4)["x"].tolist() for r in range(4)]
    assert even == [[0, 4], [1, 5], [2, 6], [3, 7]]


def hist(*values, metric="val_loss"):
    return [{metric: v, "step": i} for i, v in enumerate(values)]


@pytest.mark.parametrize("values, patience, min_delta, stop", [
    ((3.0, 2.0, 1.5, 1.2, 1.0), 2, 0.0, False),  # improving
    ((1.0, 0.99, 0.98), 1, 0.05, True),  # improving, but by less than min_delta
    ((1.0, 0.9), 2, 0.0, False),  # too few validations to judge
    ((1.0, 1.1, 1.2), 2, 0.0, True),  # getting worse for `patience` validations
    ((1.0, 1.1, 0.95), 2, 0.0, False),  # noisy: a dip below the best inside the window
    ((1.0, 0.8, 0.9, 0.85, 0.79), 3, 0.0, False),  # noisy, new best at the end
    ((1.0, 0.8, 0.9, 0.85, 0.79), 3, 0.02, True),  # same, but 0.01 is below min_delta
    ((1.0, 0.8, 0.9, 0.85, 0.81), 2, 0.0, True),  # noisy, never back to the best
    ((1.0, 1.0, 1.0), 2, 0.01, True),  # flat
])
def test_should_stop_patience_and_min_delta(values, patience, min_delta, stop):
    early = EarlyStopping(metric="val_loss", patience=patience, min_delta=min_delta)
    assert should_stop(hist(*values), early) is stop


def test_should_stop_reads_only_its_metric_and_is_off_without_config():
    early = EarlyStopping(metric="val_loss/icd10", patience=1, min_delta=0.0)
    history = [{"val_loss/icd10": 1.0}, {"loss": 0.1}, {"loss": 0.05}, {"val_loss/icd10": 1.2, "val_loss": 0.1}]
    assert should_stop(history, early) is True  # training-loss entries neither count nor reset patience
    assert should_stop(history[:3], early) is False
    assert should_stop(hist(1.0, 2.0, 3.0), None) is False


def test_should_stop_on_exactly_flat_metric_with_zero_min_delta():
    assert should_stop(hist(1.0, 1.0, 1.0), EarlyStopping(metric="val_loss", patience=2, min_delta=0.0)) is True


BIG_ALLOCATIONS = """
import json, sys, torch
from honed.train.efficiency import rss_anon_mb
from honed.train.methods import big_allocations_mapped

torch.ones(4 << 20)  # a 16 MB buffer freed at once: glibc's dynamic rule now serves smaller ones from its heap
with big_allocations_mapped(enabled=sys.argv[1] == "on"):
    before = rss_anon_mb()
    layers, kept = [], []
    for _ in range(64):  # 64 x 4 MB, as ZeRO-3 gathers layer after layer, each leaving its partition behind
        layers.append(torch.ones(1 << 20))
        kept.append(torch.ones(1 << 12))
    held = rss_anon_mb()
    del layers
    returned = held - rss_anon_mb()  # read right around the free: other threads' allocations stay out
print(json.dumps({"added": held - before, "returned": returned}))
"""


def in_fresh_process(code: str, *args: str, timeout: float = 120) -> str:
    """`python -c CODE ARGS` in a process of its own: the last line it printed."""
    run = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout.strip().splitlines()[-1]


def big_allocations(mapped: str) -> dict:
    return json.loads(in_fresh_process(BIG_ALLOCATIONS, mapped))


def test_big_allocations_go_back_to_the_os_when_freed_while_a_model_loads():
    """Each in a process of its own: in a long test session glibc served part of the 256 MB from large free
    chunks earlier tests had left in its heap, which stay there when freed (it failed at 196 of 228 MB)."""
    mapped = big_allocations("on")
    assert mapped["added"] > 200 and mapped["returned"] > 0.9 * mapped["added"], mapped  # each buffer unmapped
    heap = big_allocations("off")  # glibc's own rule, as on a C library without mallopt (a no-op there)
    assert heap["added"] > 200 and heap["returned"] < 0.5 * heap["added"], heap  # kept in the heap


def test_a_dataset_without_validation_rows_is_refused_before_training(tmp_path):
    from honed.artifacts import write_manifest
    from honed.config import TrainConfig
    from honed.train.plan import plan_run

    write_manifest(tmp_path, {"counts": {"total": {"train": 64, "val": 0}, "by_source": {"a": {"train": 64, "val": 0}}},
                              "shards": {"train_rows": 64, "val_rows": 0, "packed": True}})
    cfg = TrainConfig.model_validate({"data_dir": str(tmp_path), "output_dir": str(tmp_path / "run")})
    with pytest.raises(ValueError, match="has no validation rows.*data.val_fraction"):
        plan_run(cfg)


# ----------------------------------------------------------------------------------------- bitsandbytes kept out
def test_needs_bitsandbytes_for_a_4bit_base_or_a_bitsandbytes_optimizer():
    from honed.train.methods import needs_bitsandbytes

    for name in ("full", "lora", "dpo", "prefix", "ia3"):
        assert not needs_bitsandbytes(MethodConfig(name=name), OptimConfig())
        assert needs_bitsandbytes(MethodConfig(name=name), OptimConfig(optimizer="paged_adamw_8bit"))
    assert needs_bitsandbytes(MethodConfig(name="qlora"), OptimConfig())


BUILD_LORA = """
import sys, torch
from honed.config import MethodConfig
from honed.train.methods import bitsandbytes_loaded, build_model, keep_bitsandbytes_out
if sys.argv[2] == "keep_out":
    keep_bitsandbytes_out()
model = build_model(MethodConfig(name="lora"), sys.argv[1], "auto", torch.device("cpu"))
from peft.import_utils import is_bnb_available
trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
print(bitsandbytes_loaded(), is_bnb_available(), trainable > 0)
"""


def test_a_lora_model_builds_without_bitsandbytes_once_it_is_kept_out(tiny_model):
    """A fresh process each: peft imports bitsandbytes when installed (the control), unless it was kept out; the
    LoRA model builds either way, with trainable adapter weights."""
    assert in_fresh_process(BUILD_LORA, tiny_model, "as_installed", timeout=300).split() == ["True", "True", "True"]
    assert in_fresh_process(BUILD_LORA, tiny_model, "keep_out", timeout=300).split() == ["False", "False", "True"]
