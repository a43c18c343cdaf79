"""honed.serve.packed: a CPU replica's linear layers with oneDNN-prepacked weights compute what torch's linear
computes (to float rounding; the same greedy tokens), leave the output projection alone, release the plain weights,
and stay unpacked where they cannot be packed or the packed product does not check out."""

import pytest
import torch
from torch import nn

from honed.generation import generate
from honed.serve.head import RowsLastHead, rows_last_head
from honed.serve.packed import PackedLinear, check, pack_linears

PROMPTS = ["Code E11", "Which chapter contains code E11.9 and why is that so", "hello"]


def load(path, dtype="float32"):
    from honed.models import load_model

    model, tok = load_model(path, dtype, "cpu")
    return model.eval(), tok


def linears(model) -> list[str]:
    return [name for name, m in model.named_modules() if type(m) is nn.Linear]


def test_packed_layers_give_the_logits_and_tokens_of_torchs_linear(tiny_model):
    plain, tok = load(tiny_model)
    packed, _ = load(tiny_model)
    before = linears(packed)
    assert pack_linears(packed) == len(before) - 1  # every linear but the output projection
    assert linears(packed) == ["lm_head"]
    assert sum(isinstance(m, PackedLinear) for m in packed.modules()) == len(before) - 1
    ids = torch.randint(3, 400, (3, 9))
    with torch.inference_mode():
        want, got = plain(input_ids=ids).logits, packed(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
    assert [c.text for c in generate(packed, tok, PROMPTS, 12)] == [c.text for c in generate(plain, tok, PROMPTS, 12)]


def test_the_plain_weights_are_released_and_not_in_the_state_dict(tiny_model):
    model, _ = load(tiny_model)
    keys = set(model.state_dict())
    pack_linears(model)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, PackedLinear) and not hasattr(layer, "weight")
    assert "model.layers.0.self_attn.q_proj.weight" not in set(model.state_dict())
    assert set(model.state_dict()) == keys - {k for k in keys if k.endswith("_proj.weight")}


def test_a_wrapped_output_projection_is_left_alone(tiny_model):
    model, _ = load(tiny_model)
    rows_last_head(model)
    pack_linears(model)
    head = model.get_output_embeddings()
    assert isinstance(head, RowsLastHead) and type(head.head) is nn.Linear
    assert head.weight is model.get_input_embeddings().weight  # still tied


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_bf16_is_packed_and_other_dtypes_are_not(tiny_model, dtype):
    model, _ = load(tiny_model, dtype)
    n = pack_linears(model)
    assert (n > 0) == (dtype == "bfloat16")


def test_a_product_that_does_not_check_out_leaves_the_model_unpacked(tiny_model, caplog):
    model, _ = load(tiny_model)
    with torch.no_grad():  # NaN never matches; the first layer of each shape is the one checked
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    assert check(model.model.layers[0].mlp.down_proj) is not None
    assert pack_linears(model) == 0
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
    assert "serving keeps torch's linear" in caplog.text and "down_proj" in caplog.text
