"""`optim.compile` (honed.train.methods.compile_decoder): the decoder stack compiled in place by inductor.

What must hold: a compiled model gives the eager model's loss and gradients on padded batches of changing
shapes (dynamic shapes, no recompiling per length), for full weights and for LoRA; parameter names and state
dicts are unchanged (checkpoints and exports read the same keys); adapters leave FastDropout for nn.Dropout;
the config refuses the combinations the compiled graph cannot hold."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from honed.config import TrainConfig
from honed.train.collate import collate
from honed.train.losses import causal_lm_loss
from honed.train.methods import FastDropout, build_model, compile_decoder

CPU = torch.device("cpu")


def batch(lengths, seed):
    rng = np.random.default_rng(seed)
    ids = [rng.integers(5, 200, size=n) for n in lengths]
    labels = [np.where(np.arange(n) >= 2, x, -100) for x, n in zip(ids, lengths)]
    rows = {"input_ids": np.array(ids + [None], dtype=object)[:-1],
            "labels": np.array(labels + [None], dtype=object)[:-1]}
    return collate(rows, 0, CPU)


def method(name: str, dropout: float = 0.0):
    from honed.config import MethodConfig

    lora = {"lora": {"r": 4, "alpha": 8, "dropout": dropout, "target_modules": "all-linear"}} if name == "lora" else {}
    return MethodConfig(name=name, **lora)


def loss_and_grads(model, inputs) -> tuple[float, dict[str, torch.Tensor]]:
    loss, _ = causal_lm_loss(model, inputs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


@pytest.mark.parametrize("name", ["full", "lora"])
def test_compiled_decoder_matches_eager_over_changing_shapes(tiny_model, name):
    torch.manual_seed(0)
    model = build_model(method(name), tiny_model, "float32", CPU)
    model.train()
    batches = [batch([7, 11, 5], 1), batch([13, 4], 2), batch([9, 9, 3, 6], 3)]  # three shapes
    eager = [loss_and_grads(model, b) for b in batches]
    keys = list(model.state_dict())
    torch._dynamo.utils.counters.clear()
    decoder = compile_decoder(model)
    compiled = [loss_and_grads(model, b) for b in batches]
    assert list(model.state_dict()) == keys  # in place: no `_orig_mod.` in any checkpoint key
    assert decoder._compiled_call_impl is not None
    for (loss_e, grads_e), (loss_c, grads_c) in zip(eager, compiled):
        assert loss_c == pytest.approx(loss_e, abs=1e-5)
        assert grads_c.keys() == grads_e.keys()
        for key, grad in grads_e.items():
            torch.testing.assert_close(grads_c[key], grad, atol=1e-5, rtol=1e-4, msg=key)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert frames <= 4, f"{frames} graphs compiled for three batch shapes: dynamic shapes were not used"


def test_compiled_adapters_use_torch_dropout(tiny_model):
    model = build_model(method("lora", dropout=0.1), tiny_model, "float32", CPU)
    assert any(isinstance(m, FastDropout) for m in model.modules())  # honed's CPU default
    compile_decoder(model)
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.p == 0.1]
    assert drops and not any(isinstance(m, FastDropout) for m in drops)


BASE = {"name": "t", "data_dir": "d", "output_dir": "o"}


@pytest.mark.parametrize("changes, message", [
    ({"method": {"name": "qlora"}}, "method qlora (compiled: full, lora)"),
    ({"method": {"name": "full", "deepspeed": {"zero_stage": 2}}}, "set method.deepspeed.zero_stage: null"),
    ({"optim": {"compile": True, "padding_free": True}}, "optim.padding_free"),
    ({"method": {"name": "lora", "activation_checkpointing": True}}, "method.activation_checkpointing"),
])
def test_config_refuses_what_a_compiled_graph_cannot_hold(changes, message):
    raw = BASE | {"optim": {"compile": True}} | changes
    with pytest.raises(ValueError, match="optim.compile cannot be combined with") as err:
        TrainConfig.model_validate(raw)
    assert message in str(err.value)


def test_config_accepts_compile_for_full_and_lora():
    for name in ("full", "lora"):
        cfg = TrainConfig.model_validate(BASE | {"method": {"name": name}, "optim": {"compile": True}})
        assert cfg.optim.compile and cfg.optim.padding_free is False  # padding-free defaults to off when compiled
