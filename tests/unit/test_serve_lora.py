"""The serving LoRA path (honed.serve.lora.MultiLora) against peft: rows of different adapters in one batch
give the logits each adapter gives alone under peft; unloading restores the base; what it cannot apply
exactly is refused."""

import json

import pytest
import torch

from honed.serve.lora import AdapterNotServable, MultiLora

ADAPTERS = {  # name → LoraConfig kwargs: different ranks, targets, rsLoRA
    "qv4": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "all8": {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
    "mlp2rs": {"r": 2, "lora_alpha": 4, "target_modules": ["up_proj", "down_proj"], "use_rslora": True},
}


@pytest.fixture
def two_threads():
    """Two torch threads, as a replica may run: the adapter products of few rows then drop to one."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    from honed.models import load_model

    work = tmp_path_factory.mktemp("lora")
    dirs = {}
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        model, _ = load_model(tiny_model, "float32", "cpu")
        torch.manual_seed(i)
        get_peft_model(model, LoraConfig(init_lora_weights=False, **kw)).save_pretrained(work / name)
        dirs[name] = str(work / name)
    return tiny_model, dirs


def peft_logits(base_path: str, adapter_dir: str | None, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel

    from honed.models import load_model

    model, _ = load_model(base_path, "float32", "cpu")
    if adapter_dir:
        model = PeftModel.from_pretrained(model, adapter_dir)
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.mark.parametrize("packed", [False, True], ids=["linear", "packed"])
@pytest.mark.parametrize("tokens", [7, 1], ids=["prefill", "decode"])
def test_mixed_rows_match_each_adapter_alone_under_peft(setup, tokens, packed, two_threads):
    from honed.models import load_model
    from honed.serve.packed import pack_linears

    base_path, dirs = setup
    model, _ = load_model(base_path, "float32", "cpu")
    if packed:  # the serving replica's CPU layers (honed.serve.packed)
        assert pack_linears(model) > 0
    lora = MultiLora(model.eval())
    for name, path in dirs.items():
        lora.load(name, path)
    torch.manual_seed(0)
    ids = torch.randint(3, 400, (5, tokens))  # 1 token a row: the all-slots + mask path; more: per-row gather
    names = ["qv4", "base", "all8", "mlp2rs", "qv4"]
    lora.select(names, "base")
    with torch.no_grad():
        mixed = model(input_ids=ids).logits
    for row, name in enumerate(names):
        alone = peft_logits(base_path, dirs.get(name), ids[row:row + 1])[0]
        assert torch.allclose(mixed[row], alone, atol=1e-5), (name, (mixed[row] - alone).abs().max())
    # all rows on one adapter: the two-matmul path
    lora.select(["all8"] * 2, "base")
    with torch.no_grad():
        uniform = model(input_ids=ids[:2]).logits
    assert torch.allclose(uniform, peft_logits(base_path, dirs["all8"], ids[:2]), atol=1e-5)


def test_unload_frees_the_slot_and_restores_the_base(setup):
    from honed.models import load_model

    base_path, dirs = setup
    model, _ = load_model(base_path, "float32", "cpu")
    lora = MultiLora(model.eval())
    ids = torch.randint(3, 400, (1, 6))
    lora.load("all8", dirs["all8"])
    lora.load("qv4", dirs["qv4"])
    lora.unload("all8")
    lora.select(["qv4", "base"], "base")
    with torch.no_grad():
        out = model(input_ids=ids.repeat(2, 1)).logits
    assert torch.allclose(out[1], peft_logits(base_path, None, ids)[0], atol=1e-6)
    assert torch.allclose(out[0], peft_logits(base_path, dirs["qv4"], ids)[0], atol=1e-5)
    lora.load("mlp2rs", dirs["mlp2rs"])  # takes the freed slot
    assert sorted(lora.slots.values()) == [1, 2]
    with pytest.raises(KeyError):
        lora.select(["all8"], "base")


@pytest.mark.parametrize("change, reason", [
    ({"use_dora": True}, "DoRA"), ({"modules_to_save": ["lm_head"]}, "saves whole modules"),
    ({"bias": "lora_only"}, "trains biases"), ({"peft_type": "IA3"}, "not LoRA"),
    ({"rank_pattern": {"q_proj": 2}}, "patterns"),
])
def test_what_cannot_be_applied_exactly_is_refused(setup, tmp_path, change, reason):
    import shutil

    from honed.models import load_model

    base_path, dirs = setup
    shutil.copytree(dirs["qv4"], tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text()) | change
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    model, _ = load_model(base_path, "float32", "cpu")
    lora = MultiLora(model)
    with pytest.raises(AdapterNotServable, match=reason):
        lora.load("a", str(tmp_path / "a"))
    assert not lora.slots and "merged" in str(pytest.raises(AdapterNotServable, lora.load, "a", str(tmp_path / "a")).value)


def test_adapter_of_another_shape_is_refused_before_anything_changes(setup, tmp_path):
    from safetensors.torch import load_file, save_file

    from honed.models import load_model

    base_path, dirs = setup
    import shutil

    shutil.copytree(dirs["qv4"], tmp_path / "a")
    weights = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    key = next(k for k in weights if "lora_A" in k)
    weights[key] = torch.zeros(4, 999)
    save_file(weights, str(tmp_path / "a" / "adapter_model.safetensors"))
    model, _ = load_model(base_path, "float32", "cpu")
    lora = MultiLora(model)
    with pytest.raises(AdapterNotServable, match="does not fit"):
        lora.load("a", str(tmp_path / "a"))
    assert not lora.slots and not lora.layers


@pytest.mark.parametrize("rows, tokens, inside", [(8, 1, 1), (32, 256, 2)], ids=["decode", "long-prefill"])
def test_small_adapter_products_run_on_one_thread_and_the_count_comes_back(setup, two_threads, monkeypatch, rows,
                                                                          tokens, inside):
    from honed.models import load_model
    from honed.serve.lora import MultiLoraLinear

    base_path, dirs = setup
    model, _ = load_model(base_path, "float32", "cpu")
    lora = MultiLora(model.eval())
    lora.load("all8", dirs["all8"])
    seen = []
    original = MultiLoraLinear._add_lora

    def spy(self, *args):
        seen.append(torch.get_num_threads())
        return original(self, *args)

    monkeypatch.setattr(MultiLoraLinear, "_add_lora", spy)
    lora.select(["all8"] * rows, "base")
    with torch.no_grad():
        model(input_ids=torch.randint(3, 400, (rows, tokens)))
    # 8 rows x 1 token x 64-128 inputs x rank 8: under 10 k multiply-adds; 32 x 256 tokens: over SMALL_PRODUCT
    assert seen and set(seen) == {inside}
    assert torch.get_num_threads() == 2


def test_a_slot_reused_after_the_stacks_regrew_decodes_its_new_adapter(setup):
    """The one-adapter path keeps each slot's transposed views of the stacks; a larger-rank adapter reallocates
    the stacks, and a slot freed and filled again afterwards must be read from the new ones, not the old."""
    from honed.models import load_model

    base_path, dirs = setup
    model, _ = load_model(base_path, "float32", "cpu")
    lora = MultiLora(model.eval())
    ids = torch.randint(3, 400, (2, 5))
    lora.load("qv4", dirs["qv4"])  # slot 1: rank 4 on q and v
    lora.select(["qv4"] * 2, "base")
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, peft_logits(base_path, dirs["qv4"], ids), atol=1e-5)
    lora.load("all8", dirs["all8"])  # slot 2, rank 8: q and v's stacks are padded to it, in new tensors
    lora.unload("qv4")
    lora.load("all8-again", dirs["all8"])  # slot 1 again
    assert lora.slots == {"all8": 2, "all8-again": 1}
    lora.select(["all8-again"] * 2, "base")
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, peft_logits(base_path, dirs["all8"], ids), atol=1e-5)
