"""honed.serve.head.RowsLastHead: the decode step's vocabulary projection taken as W·hᵀ gives the logits the model's
own head gives, for one row (doubled inside), a batch of rows, a prefill's last positions and inputs beyond
MAX_ROWS (left to `linear`); tied embeddings stay tied; greedy decoding is unchanged."""

from __future__ import annotations

import pytest
import torch

from honed.serve.head import MAX_ROWS, RowsLastHead, rows_last_head


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model):
    from honed.models import load_model

    model, tokenizer = load_model(tiny_model, "float32", "cpu")
    return model.eval(), tokenizer


@pytest.mark.parametrize("shape", [(1, 1), (2, 1), (8, 1), (3, 5), (MAX_ROWS + 7, 1)])
def test_same_logits_as_linear(shape):
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 1000, bias=False)
    h = torch.randn(*shape, 64)
    with torch.inference_mode():
        got, want = RowsLastHead(head)(h), head(h)
    assert got.shape == want.shape == (*shape, 1000)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bias_is_added():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 40)
    h = torch.randn(4, 1, 16)
    with torch.inference_mode():
        torch.testing.assert_close(RowsLastHead(head)(h), head(h), rtol=1e-5, atol=1e-5)


def test_model_keeps_its_tied_weight_and_greedy_answers(model_and_tokenizer):
    import copy

    from honed.generation import generate

    model, tokenizer = model_and_tokenizer
    prompts = ["The heart pumps", "Diabetes is", "In the beginning"]
    want = generate(model, tokenizer, prompts, max_new_tokens=12)
    patched = copy.deepcopy(model)
    tied = patched.get_output_embeddings().weight is patched.get_input_embeddings().weight
    rows_last_head(patched)
    assert isinstance(patched.get_output_embeddings(), RowsLastHead)
    assert (patched.get_output_embeddings().weight is patched.get_input_embeddings().weight) == tied
    assert generate(patched, tokenizer, prompts, max_new_tokens=12) == want
