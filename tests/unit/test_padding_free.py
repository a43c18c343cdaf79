"""Padding-free batches (honed.train.attention): one flattened row per micro-batch, attention per example.

What must hold: the flattened row gives the padded batch's loss and gradients; no token of one example sees
another example; packed rows are cut at their position-id restarts with the padding tail dropped; a model
switched to `honed_varlen` behaves as `sdpa` on every call without boundaries (masks, left padding). The kernel
a model loads with follows `model.attn_implementation` (`choose_kernel`, a function of the device type, the
compute dtype and whether flash-attn is installed), and padding-free batches fall back to `honed_varlen` only
where that kernel does not read the boundaries. tests/gpu/test_gpu_train.py runs the CUDA side."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from honed.config import ConfigError, MethodConfig, TrainConfig, load_config
from honed.train.attention import BOUNDARY_KEYS, IMPLEMENTATION, choose_kernel, flatten, reads_boundaries, use_varlen
from honed.train.collate import collate
from honed.train.losses import causal_lm_loss, row_losses

CPU = torch.device("cpu")


def examples(lengths, seed=0, prompt=2):
    rng = np.random.default_rng(seed)
    ids = [rng.integers(5, 200, size=n) for n in lengths]
    labels = [np.where(np.arange(n) >= prompt, x, -100) for x, n in zip(ids, lengths)]
    return {"input_ids": np.array(ids + [None], dtype=object)[:-1], "labels": np.array(labels + [None], dtype=object)[:-1]}


def load(path, varlen: bool, kernel: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=kernel)
    if varlen:
        use_varlen(model)
    return model


def loss_and_grads(model, inputs):
    model.zero_grad()
    loss, n = causal_lm_loss(model, inputs)
    loss.backward()
    return loss.item(), n, [p.grad.clone() for p in model.parameters() if p.requires_grad]


def test_flatten_lays_examples_end_to_end():
    batch = examples([4, 6, 3])
    row, b = flatten(batch["input_ids"], batch["labels"])
    assert row["input_ids"].shape == (1, 13)
    assert b["cu_seq_lens_q"].tolist() == [0, 4, 10, 13] and b["max_length_q"] == 6
    assert row["position_ids"][0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 0, 1, 2]
    assert row["input_ids"][0, 4:10].tolist() == batch["input_ids"][1].tolist()
    # each example's first token is never a target (in the padded batch nothing predicts it)
    assert row["labels"][0, [0, 4, 10]].tolist() == [-100, -100, -100]


def test_flatten_cuts_packed_rows_and_drops_their_padding():
    # two packed rows of width 8: [a a a b b | pad pad pad] and [c c c c c c c | pad]
    ids = [np.array([1, 2, 3, 4, 5, 0, 0, 0]), np.array([6, 7, 8, 9, 10, 11, 12, 0])]
    labels = [np.array([-100, 2, 3, 4, 5, -100, -100, -100]), np.array([6, 7, 8, 9, 10, 11, 12, -100])]
    positions = [np.array([0, 1, 2, 0, 1, 0, 1, 2]), np.array([0, 1, 2, 3, 4, 5, 6, 0])]
    row, b = flatten(ids, labels, positions, [5, 7])
    assert row["input_ids"][0].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    assert b["cu_seq_lens_q"].tolist() == [0, 3, 5, 12]
    assert row["labels"][0].tolist() == [-100, 2, 3, -100, 5, -100, 7, 8, 9, 10, 11, 12]
    assert row["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3, 4, 5, 6]


def test_collate_flat_counts_only_real_tokens():
    batch = examples([5, 9, 2])
    flat = collate(batch, 0, CPU, flat=True)
    padded = collate(batch, 0, CPU)
    assert flat["n_tokens"] == padded["n_tokens"] == 16
    assert flat["input_ids"].numel() == 16 and padded["input_ids"].numel() == 27


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_flattened_row_gives_the_padded_batch_loss_and_gradients(tiny_model, kernel):
    batch = examples([7, 12, 5, 9, 3])
    base = load(tiny_model, varlen=False, kernel=kernel)
    loss_p, n_p, grads_p = loss_and_grads(base, collate(batch, 0, CPU))
    flat_model = load(tiny_model, varlen=True, kernel=kernel)
    assert flat_model.config._attn_implementation == IMPLEMENTATION
    loss_f, n_f, grads_f = loss_and_grads(flat_model, collate(batch, 0, CPU, flat=True))
    assert n_f == n_p
    assert loss_f == pytest.approx(loss_p, abs=1e-5)
    assert max(float((a - b).abs().max()) for a, b in zip(grads_p, grads_f)) < 1e-5


def test_packed_rows_flattened_equal_each_example_alone(tiny_model):
    """Two examples packed into one row score exactly as each alone: nothing leaks across the boundary."""
    batch = examples([6, 9], seed=3)
    model = load(tiny_model, varlen=True)
    ids = [np.concatenate([batch["input_ids"][0], batch["input_ids"][1], [0, 0]])]
    labels = [np.concatenate([batch["labels"][0], batch["labels"][1], [-100, -100]])]
    positions = [np.concatenate([np.arange(6), np.arange(9), np.arange(2)])]
    packed = {"input_ids": ids, "labels": labels, "position_ids": positions, "num_tokens": [15]}
    with torch.no_grad():
        loss_packed, n_packed = causal_lm_loss(model, collate(packed, 0, CPU, flat=True))
        alone = [causal_lm_loss(model, collate({k: v[i:i + 1] for k, v in batch.items()}, 0, CPU)) for i in (0, 1)]
    total = sum(float(loss) * n for loss, n in alone)
    assert n_packed == sum(n for _, n in alone)
    assert float(loss_packed) == pytest.approx(total / n_packed, abs=1e-5)


def test_changing_one_example_leaves_the_others_logits(tiny_model):
    model = load(tiny_model, varlen=True)
    batch = examples([5, 8, 6], seed=1)
    changed = {k: v.copy() for k, v in batch.items()}
    changed["input_ids"][0] = changed["input_ids"][0][::-1].copy()

    def logits(b):
        inputs = collate(b, 0, CPU, flat=True)
        with torch.no_grad():
            return model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"], use_cache=False,
                         **{k: inputs[k] for k in BOUNDARY_KEYS}).logits[0]

    a, b = logits(batch), logits(changed)
    assert not torch.allclose(a[:5], b[:5])
    torch.testing.assert_close(a[5:], b[5:], rtol=0, atol=1e-6)


def test_varlen_model_without_boundaries_is_sdpa(tiny_model):
    """Left padding with a mask (generation, evaluation), and per-row validation losses, are unchanged."""
    sdpa, varlen = load(tiny_model, varlen=False), load(tiny_model, varlen=True)
    ids = torch.tensor([[0, 0, 11, 12, 13], [21, 22, 23, 24, 25]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        torch.testing.assert_close(varlen(input_ids=ids, attention_mask=mask).logits,
                                   sdpa(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=1e-6)
        batch = collate(examples([4, 7]), 0, CPU)
        got, expected = row_losses(varlen, batch), row_losses(sdpa, batch)
        assert [n for _, n in got] == [n for _, n in expected]
        assert [s for s, _ in got] == pytest.approx([s for s, _ in expected], abs=1e-5)


def test_flattened_row_scores_each_example_as_its_padded_row(tiny_model):
    """Validation scores a padding-free run's rows flattened, as it trains: each example's loss sum and labelled
    tokens are the padded batch's for its row; packed rows (several examples a row) are scored a row each."""
    from honed.train.losses import lm_row_scores

    sdpa, varlen = load(tiny_model, varlen=False), load(tiny_model, varlen=True)
    batch = examples([4, 9, 6, 2], seed=3)
    with torch.no_grad():
        flat, padded = row_losses(varlen, collate(batch, 0, CPU, flat=True)), row_losses(sdpa, collate(batch, 0, CPU))
        assert [n for _, n in flat] == [n for _, n in padded] == [2, 7, 4, 0]
        assert [s for s, _ in flat] == pytest.approx([s for s, _ in padded], abs=1e-5)
        rows = dict(batch) | {"source": np.array(["a", "b", "a", "c"]), "_weight": np.ones(4)}
        scores = lm_row_scores(varlen, rows, 0, CPU, flat=True)
        assert [(src, v["tokens"]) for src, _, v in scores] == [("a", 2), ("b", 7), ("a", 4), ("c", 0)]
        packed = {"input_ids": np.array([[5, 6, 7, 8, 9, 0], [11, 12, 13, 14, 15, 16]]),
                  "labels": np.array([[-100, 6, 7, -100, 9, -100], [-100, 12, 13, 14, 15, 16]]),
                  "position_ids": np.array([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]), "num_tokens": np.array([5, 6]),
                  "source": np.array(["a", "b"]), "_weight": np.ones(2)}
        assert [v["tokens"] for _, _, v in lm_row_scores(varlen, packed, 0, CPU, flat=True)] == [3, 5]


def test_flattened_row_with_a_lora_adapter(tiny_model):
    from peft import LoraConfig, get_peft_model

    batch = examples([8, 3, 10], seed=2)
    results = []
    for varlen in (False, True):
        torch.manual_seed(1)
        model = get_peft_model(load(tiny_model, varlen=False), LoraConfig(r=4, target_modules="all-linear",
                                                                           lora_dropout=0.0))
        if varlen:
            use_varlen(model)
        results.append(loss_and_grads(model, collate(batch, 0, CPU, flat=varlen)))
    (loss_p, _, grads_p), (loss_f, _, grads_f) = results
    assert loss_f == pytest.approx(loss_p, abs=1e-5)
    assert max(float((a - b).abs().max()) for a, b in zip(grads_p, grads_f)) < 1e-5


def test_padding_free_config_errors():
    from honed.config import TrainConfig

    auto = {name: TrainConfig.model_validate({"method": {"name": name}}).optim.padding_free
            for name in ("full", "lora", "qlora", "ia3", "prefix", "dpo")}
    assert auto == {"full": True, "lora": True, "qlora": True, "ia3": True, "prefix": False, "dpo": False}
    assert TrainConfig.model_validate({"optim": {"compile": True}}).optim.padding_free is False  # auto, compiled
    assert not TrainConfig.model_validate({"optim": {"padding_free": False}}).optim.padding_free
    for method in ("prefix", "dpo"):
        with pytest.raises(ValueError, match=f"padding_free cannot be used with method {method}"):
            TrainConfig.model_validate({"method": {"name": method}, "optim": {"padding_free": True}})
    assert not TrainConfig.model_validate({"method": {"name": "prefix"},
                                           "optim": {"padding_free": False}}).optim.padding_free


@pytest.mark.parametrize("requested, device, dtype, flash_attn, kernel", [
    ("auto", "cuda", torch.bfloat16, True, "flash_attention_2"),
    ("auto", "cuda", torch.float16, True, "flash_attention_2"),
    ("auto", "cuda", torch.bfloat16, False, "sdpa"),  # flash-attn not installed
    ("auto", "cuda", torch.float32, True, "sdpa"),  # flash-attn has no fp32 kernel
    ("auto", "cpu", torch.float32, True, "sdpa"),
    ("auto", "cpu", torch.bfloat16, False, "sdpa"),
    ("sdpa", "cuda", torch.bfloat16, True, "sdpa"),
    ("eager", "cpu", torch.float32, False, "eager"),
    ("flash_attention_2", "cuda", torch.bfloat16, True, "flash_attention_2"),
])
def test_kernel_choice(requested, device, dtype, flash_attn, kernel):
    assert choose_kernel(requested, device, dtype, flash_attn) == kernel


@pytest.mark.parametrize("device, dtype, flash_attn, why", [
    ("cpu", torch.bfloat16, True, "device cpu, flash-attn installed, dtype bfloat16"),
    ("cuda", torch.bfloat16, False, "device cuda, flash-attn not installed, dtype bfloat16"),
    ("cuda", torch.float32, True, "device cuda, flash-attn installed, dtype float32"),
])
def test_flash_attention_where_it_cannot_run_is_an_error_not_a_fallback(device, dtype, flash_attn, why):
    with pytest.raises(ValueError, match=f"'flash_attention_2' needs a CUDA device.*here: {why}. Use auto"):
        choose_kernel("flash_attention_2", device, dtype, flash_attn)


def test_attn_implementation_errors_name_the_allowed_values():
    assert TrainConfig().model.attn_implementation == "auto"
    with pytest.raises(ConfigError, match="model.attn_implementation = 'flash': Input should be 'auto', 'sdpa', "
                                          "'eager' or 'flash_attention_2'"):
        load_config(TrainConfig, None, ["model.attn_implementation=flash"])
    with pytest.raises(ValueError, match="'flash' is not allowed; use one of auto, sdpa, eager, flash_attention_2"):
        choose_kernel("flash", "cpu", torch.float32, False)


def test_padding_free_falls_back_per_example_only_where_the_kernel_ignores_boundaries(tiny_model):
    from honed.train.methods import build_model

    assert [reads_boundaries(k) for k in ("flash_attention_2", "sdpa", "eager")] == [True, False, False]
    auto = build_model(MethodConfig(name="lora"), tiny_model, "auto", CPU)  # on CPU: sdpa
    assert auto.get_base_model().config._attn_implementation == "sdpa"
    assert use_varlen(auto) == IMPLEMENTATION
    eager = build_model(MethodConfig(name="full"), tiny_model, "auto", CPU, attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"
    assert use_varlen(eager) == IMPLEMENTATION
    # a model on flash attention (set here by hand: no CUDA) keeps it: its kernel reads the boundaries itself
    flash = load(tiny_model, varlen=False)
    flash.config._attn_implementation = "flash_attention_2"
    assert use_varlen(flash) == "flash_attention_2" and flash.config._attn_implementation == "flash_attention_2"
    with pytest.raises(ValueError, match="'flash_attention_2' needs a CUDA device"):
        build_model(MethodConfig(name="full"), tiny_model, "auto", CPU, attn_implementation="flash_attention_2")


def test_serving_and_eval_loading_takes_the_same_choice(tiny_model):
    from honed.models import load_model

    assert load_model(tiny_model)[0].config._attn_implementation == "sdpa"  # auto on CPU
    assert load_model(tiny_model, attn_implementation="eager")[0].config._attn_implementation == "eager"
