"""The LM loss in chunks of positions: the same per-token losses and gradients as one whole-vocabulary
projection, with at most LOGIT_BUDGET logits alive at once."""

import numpy as np
import pytest
import torch

from honed.train import losses
from honed.train.collate import collate


def batch(tokenizer, n: int = 3, length: int = 40) -> dict:
    rng = np.random.default_rng(0)
    rows = [rng.integers(5, len(tokenizer), size=length - 7 * i).tolist() for i in range(n)]
    return {"input_ids": rows, "labels": [[-100] * 3 + r[3:] for r in rows]}


@pytest.mark.parametrize("flat", [False, True])
def test_chunked_loss_equals_the_whole_projection(tiny_model, monkeypatch, flat):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from honed.train.attention import use_varlen

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    if flat:
        use_varlen(model)
    inputs = collate(batch(tokenizer), tokenizer.pad_token_id, torch.device("cpu"), flat=flat)

    def run():
        model.zero_grad()
        token_losses, rows = losses.scored_token_losses(model, inputs)
        token_losses.sum().backward()
        return token_losses.detach(), rows, {n: p.grad.clone() for n, p in model.named_parameters()}

    whole, rows, grads = run()
    vocab = model.get_output_embeddings().out_features
    monkeypatch.setattr(losses, "LOGIT_BUDGET", vocab * 7)  # 7 positions a chunk: many chunks, a ragged last one
    calls = []
    original = losses._head_cross_entropy
    monkeypatch.setattr(losses, "_head_cross_entropy", lambda *a: calls.append(a[1].shape[0]) or original(*a))
    chunked, chunk_rows, chunk_grads = run()
    assert max(calls) == 7 and len(calls) >= 2 * (whole.numel() // 7)  # forward + recompute in backward
    assert torch.equal(rows, chunk_rows)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(chunk_grads[name], grad, rtol=0, atol=1e-5, msg=name)
    assert model.get_output_embeddings().forward.__func__ is type(model.get_output_embeddings()).forward  # restored


def test_models_that_transform_their_logits_are_scored_whole(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.config.final_logit_softcapping = 30.0
    with losses.hidden_states_out(model) as head:
        assert head is None
    model.config.final_logit_softcapping = None
    with losses.hidden_states_out(model) as head:
        assert head is model.get_output_embeddings()
        assert model(input_ids=torch.tensor([[5, 6, 7]])).logits.shape[-1] == model.config.hidden_size
    assert model(input_ids=torch.tensor([[5, 6, 7]])).logits.shape[-1] == model.config.vocab_size
