"""Efficiency figures a user can trust (honed.train.efficiency): model FLOPs per token by method against numbers
worked out by hand on the tiny model, MFU above 100 % reported as a measurement error, the GPU datasheet
table, the peak's sources in order (config, datasheet, measured) and a measured peak of the right magnitude."""

from types import SimpleNamespace

import pytest
import torch

from honed.config import ConfigError, MethodConfig, TrainConfig, load_config
from honed.train.efficiency import (
    FLOPS_CONVENTIONS, MatmulParams, Meter, datasheet_peak_flops, device_peak_flops, efficiency_report,
    flops_per_token, format_report, matmul_params, measure_peak_flops, peak_key, remember_peak, remembered_peak,
    row_cost, tensor_mb,
)
from honed.train.methods import build_model, count_params

CPU = torch.device("cpu")
# The tiny Llama (honed.models.make_tiny_model): hidden 64, MLP 128, 2 layers, 4 heads of 16, 2 key/value heads,
# embeddings tied to the output head.
HIDDEN, MLP, LAYERS, KV = 64, 128, 2, 32
LINEAR_SHAPES = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, KV), "v_proj": (HIDDEN, KV),
                 "o_proj": (HIDDEN, HIDDEN), "gate_proj": (HIDDEN, MLP), "up_proj": (HIDDEN, MLP),
                 "down_proj": (MLP, HIDDEN)}
LAYER_WEIGHTS = sum(i * o for i, o in LINEAR_SHAPES.values()) + 2 * HIDDEN  # + two RMSNorm weights
BODY = LAYERS * LAYER_WEIGHTS + HIDDEN  # + the final norm


def vocab(path: str) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path).vocab_size


def counts(model) -> MatmulParams:
    trainable, total = count_params(model)
    return matmul_params(model, total, trainable)


def test_full_fine_tuning_counts_6n_per_token_and_the_head_at_labelled_tokens(tiny_model):
    head = vocab(tiny_model) * HIDDEN
    params = counts(build_model(MethodConfig(name="full"), tiny_model, "auto", CPU))
    assert params == MatmulParams(body=BODY, body_trained=BODY, head=head, head_trained=head)
    assert flops_per_token("full", params) == (6 * BODY, 6 * head)


def test_lora_counts_4n_plus_the_adapters_weight_gradients(tiny_model):
    spec = MethodConfig(name="lora", lora={"r": 4, "target_modules": ["q_proj", "v_proj"]})
    params = counts(build_model(spec, tiny_model, "auto", CPU))
    adapters = LAYERS * 4 * ((HIDDEN + HIDDEN) + (HIDDEN + KV))  # A (in x r) + B (r x out) per adapted matrix
    head = vocab(tiny_model) * HIDDEN
    assert params == MatmulParams(body=BODY + adapters, body_trained=adapters, head=head, head_trained=0)
    # forward 2·N, backward through every weight 2·N, weight gradients of the adapters only; the frozen head 4·N
    assert flops_per_token("lora", params) == (4 * (BODY + adapters) + 2 * adapters, 4 * head)
    # dpo adds the reference model's forward
    assert flops_per_token("dpo", params) == (6 * (BODY + adapters) + 2 * adapters, 6 * head)


@pytest.mark.parametrize("name", ["ia3", "prefix", "qlora"])
def test_other_peft_methods_count_their_trained_part_once(tiny_model, name):
    model = build_model(MethodConfig(name=name), tiny_model, "auto", CPU)
    trainable, total = count_params(model)
    params = matmul_params(model, total, trainable)
    head = vocab(tiny_model) * HIDDEN
    assert (params.head, params.head_trained) == (head, 0)
    assert params.body == total - head and params.body_trained == trainable > 0
    assert flops_per_token(name, params) == (4 * params.body + 2 * trainable, 4 * head)
    assert FLOPS_CONVENTIONS[name].startswith("4·N + 2·N_trained per token")


def test_an_untied_input_embedding_is_a_lookup_not_a_matmul():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=100, hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    params = counts(model)
    assert params == MatmulParams(body=BODY, body_trained=BODY, head=100 * HIDDEN, head_trained=100 * HIDDEN)
    with pytest.raises(ValueError, match="no FLOPs convention for method 'rlhf'; methods: full, lora"):
        flops_per_token("rlhf", params)


def test_row_cost_weighs_the_head_and_causal_attention_against_a_token_through_the_body(tiny_model):
    """Balancing a global batch across ranks (honed.train.collate.rank_split) by these weights: a labelled token
    adds the head's FLOPs, an example of n tokens ~n²/2 query-key pairs of 4 FLOPs per attention width (4 heads
    of 16) and layer forward, 3 times that with the backward."""
    spec = MethodConfig(name="lora", lora={"r": 4, "target_modules": ["q_proj", "v_proj"]})
    model = build_model(spec, tiny_model, "auto", CPU)
    params = counts(model)
    body, head = flops_per_token("lora", params)
    pair = 4 * LAYERS * HIDDEN  # attention width 4 x 16 = HIDDEN
    trained = row_cost(model, "lora", params)
    assert trained.labelled == pytest.approx(head / body)
    assert trained.squared == pytest.approx(3 * pair / 2 / body)
    forward = row_cost(model, "lora", params, training=False)  # validation: forward passes only
    assert forward.labelled == pytest.approx(params.head / params.body)
    assert forward.squared == pytest.approx(pair / 2 / (2 * params.body))
    dpo = row_cost(model, "dpo", params)  # + the reference model's forward
    assert dpo.squared == pytest.approx(4 * pair / 2 / flops_per_token("dpo", params)[0])
    no_heads = SimpleNamespace(config=SimpleNamespace(hidden_size=HIDDEN))  # a config naming no layers or heads
    assert row_cost(no_heads, "lora", params) == (pytest.approx(head / body), 0.0)  # the head's part only


def meters(seconds=(3.0, 4.0)):
    return [{"warmup": 2, "steps": 6, "seconds": seconds[0], "tokens": 1000, "real_tokens": 800, "loss_tokens": 300},
            {"warmup": 2, "steps": 6, "seconds": seconds[1], "tokens": 1000, "real_tokens": 600, "loss_tokens": 200}]


def report(peak=1e10, source="config (efficiency.peak_flops)", method="lora", runs=None, **params):
    p = MatmulParams(**({"body": 900_000, "body_trained": 10_000, "head": 100_000} | params))
    return efficiency_report(runs or meters(), params=p, total_params=1_000_000, trainable_params=10_000,
                             peak_flops=peak, peak_flops_source=source, memory_mb=[100.0, 250.55],
                             memory_kind="cpu_max_rss", method=method, world_size=2)


def test_efficiency_report_on_hand_made_numbers():
    r = report()
    assert r["measured_steps"] == 4
    assert r["step_time_s"] == 1.0  # the slowest worker's 4 s is the run's time
    assert (r["tokens_per_s"], r["nonpad_tokens_per_s"]) == (500.0, 350.0)  # 2000 / 4, 1400 / 4
    assert r["padding_fraction"] == 0.3 and r["labelled_tokens"] == 500
    # lora: 4·900k + 2·10k per non-pad token; the frozen head 4·100k per labelled token
    assert (r["flops_per_token"], r["flops_per_labelled_token"]) == (3_620_000, 400_000)
    model_flops = 3_620_000 * 1400 + 400_000 * 500
    assert r["model_flops_per_s"] == model_flops / 4
    assert r["mfu"] == pytest.approx(model_flops / 4 / (1e10 * 2), abs=1e-4) == pytest.approx(0.0659, abs=1e-4)
    assert "mfu_error" not in r
    assert r["flops_convention"] == FLOPS_CONVENTIONS["lora"]
    assert r["peak_memory_mb"] == 250.6 and r["peak_memory_mb_per_worker"] == [100.0, 250.6]
    assert r["trainable_fraction"] == 0.01
    line = format_report(r)
    assert "MFU 6.6% at 4·N + 2·N_trained FLOPs/token of 10.0 GFLOP/s per worker (config" in line
    # full fine-tuning of the same weights: 6·N
    full = report(method="full", body_trained=900_000, head_trained=100_000)
    assert (full["flops_per_token"], full["flops_per_labelled_token"]) == (5_400_000, 600_000)
    assert "at 6·N FLOPs/token" in format_report(full)


@pytest.mark.parametrize("source, reason", [
    ("config (efficiency.peak_flops)", "efficiency.peak_flops is below what this device sustained"),
    ("datasheet NVIDIA H100 80GB HBM3, dense bfloat16", "the datasheet figure does not fit this device"),
    ("measured 2048² matmul (float32, 1 thread(s), best of 3)", "busy with something else while it was measured"),
])
def test_mfu_above_100_percent_is_a_measurement_error_not_a_figure(source, reason):
    r = report(peak=1e8, source=source)  # 0.66e9 FLOP/s per worker sustained against a 0.1e9 peak
    assert r["mfu"] is None
    assert r["mfu_error"].startswith("measurement error: 658% of the peak") and reason in r["mfu_error"]
    line = format_report(r)
    assert "MFU not reported (measurement error: 658% of the peak" in line and "MFU 6" not in line


def test_nothing_measured_gives_no_mfu_and_no_division_by_zero():
    idle = report(runs=[{"warmup": 2, "steps": 2, "seconds": 0.0, "tokens": 0, "real_tokens": 0, "loss_tokens": 0}])
    assert idle["step_time_s"] is None and idle["tokens_per_s"] == 0.0 and idle["padding_fraction"] is None
    assert idle["mfu"] is None and "no optimizer step was measured" in idle["mfu_error"]
    assert "MFU not reported (no optimizer step" in format_report(idle)


def test_meter_excludes_warmup_steps_and_round_trips():
    meter = Meter(warmup=2)
    for seconds, tokens, real, labelled in [(9.0, 999, 999, 999), (8.0, 888, 888, 888),
                                            (1.0, 100, 80, 40), (2.0, 120, 90, 50)]:
        meter.add(seconds, tokens, real, labelled)
    state = meter.state()
    assert state == {"warmup": 2, "steps": 4, "seconds": 3.0, "tokens": 220, "real_tokens": 170, "loss_tokens": 90}
    again = Meter()
    again.restore(state)
    again.add(1.0, 10, 10, 10)  # a restored meter keeps counting past its warm-up
    assert again.steps == 5 and again.tokens == 230
    assert meter.state() == state  # state() is a copy


@pytest.mark.parametrize("name, dtype, tf32, peak", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, False, 989.4e12),  # SXM
    ("NVIDIA H100 PCIe", torch.bfloat16, False, 756e12),
    ("NVIDIA H100 NVL", torch.float16, False, 835.5e12),
    ("NVIDIA H200", torch.bfloat16, False, 989.4e12),
    ("NVIDIA GH200 480GB", torch.bfloat16, False, 989.4e12),
    ("NVIDIA A100-SXM4-80GB", torch.bfloat16, False, 312e12),
    ("NVIDIA A100-PCIE-40GB", torch.float32, True, 156e12),
    ("NVIDIA A100 80GB PCIe", torch.float32, False, 19.5e12),
    ("NVIDIA L4", torch.bfloat16, False, 121e12),
    ("NVIDIA L40S", torch.bfloat16, False, 362.05e12),  # not the L4's row
    ("NVIDIA A10G", torch.bfloat16, False, 125e12),
    ("AMD Instinct MI300X", torch.bfloat16, False, 1307.4e12),
    ("NVIDIA GeForce RTX 4090", torch.bfloat16, False, None),  # not in the table: measured instead
    ("NVIDIA A100-SXM4-40GB", torch.float64, False, None),
])
def test_datasheet_lookup(name, dtype, tf32, peak):
    assert datasheet_peak_flops(name, dtype, tf32) == peak


def test_peak_sources_in_order_config_then_measured_after_the_barrier(tmp_path, monkeypatch):
    monkeypatch.setenv("HONED_CACHE", str(tmp_path))
    calls = []
    assert device_peak_flops(CPU, torch.float32, 5e11, lambda: calls.append("barrier")) == \
        (5e11, "config (efficiency.peak_flops)")
    assert calls == []  # nothing measured, no barrier
    torch.set_num_threads(1)
    flops, source = device_peak_flops(CPU, torch.float32, None, lambda: calls.append("barrier"))
    assert calls == ["barrier"]
    assert source == "measured 2048² matmul (float32, 1 thread(s)), the best of this node's runs"
    assert 1e8 < flops < 1e13  # one CPU core: ~1e9-3e11 fp32 FLOP/s


def test_a_node_measures_its_peak_once_and_keeps_the_best(tmp_path, monkeypatch):
    """The next run on the node takes the kept figure without a barrier or a matmul; while any worker lacks one,
    all measure again; a slower measurement (a busy machine) never lowers the figure."""
    monkeypatch.setenv("HONED_CACHE", str(tmp_path))
    torch.set_num_threads(1)
    calls = []
    first, _ = device_peak_flops(CPU, torch.float32, None, lambda: calls.append("barrier"))
    again, source = device_peak_flops(CPU, torch.float32, None, lambda: calls.append("barrier"))
    assert (again, calls) == (first, ["barrier"])  # kept: no second barrier
    assert source.endswith("the best of this node's runs")
    other_worker_lacks_one = lambda have: False  # noqa: E731 - what the all-reduce says then
    remeasured, _ = device_peak_flops(CPU, torch.float32, None, lambda: calls.append("barrier"),
                                      other_worker_lacks_one)
    assert calls == ["barrier", "barrier"] and remeasured >= first
    key = peak_key(CPU, torch.float32)
    assert "1 thread(s)" in key and "float32" in key and torch.__version__ in key
    assert remember_peak(key, 1.0) == remembered_peak(key) >= first  # a slow measurement lowers nothing
    assert remember_peak(key, 1e15) == remembered_peak(key) == 1e15
    torch.set_num_threads(2)
    assert remembered_peak(peak_key(CPU, torch.float32)) is None  # another thread count: its own figure
    torch.set_num_threads(1)
    (tmp_path / "peak_flops.json").write_text("not json")
    assert remembered_peak(key) is None and remember_peak(key, 5.0) == 5.0  # a broken file is replaced


def test_measured_peak_is_of_the_right_magnitude():
    torch.set_num_threads(1)
    assert 1e8 < measure_peak_flops(CPU, torch.float32, size=512, repeats=2) < 1e13


def test_efficiency_config_section_and_the_top_level_peak_flops():
    assert TrainConfig.model_validate({"efficiency": {"peak_flops": 1e12}}).efficiency.peak_flops == 1e12
    assert TrainConfig.model_validate({"peak_flops": 2e12}).efficiency.peak_flops == 2e12  # the older key
    assert TrainConfig().efficiency.peak_flops is None
    with pytest.raises(ValueError, match=r"peak_flops \(150.0\) and efficiency.peak_flops \(100.0\) disagree"):
        TrainConfig.model_validate({"peak_flops": 150.0, "efficiency": {"peak_flops": 100.0}})
    with pytest.raises(ConfigError, match=r"efficiency.peak_flops = -1: Input should be greater than 0"):
        load_config(TrainConfig, None, ["efficiency.peak_flops=-1"])
    with pytest.raises(ConfigError, match=r"efficiency.peak: unknown key; allowed here: peak_flops"):
        load_config(TrainConfig, None, ["efficiency.peak=1"])


def test_tensor_memory_counts_each_storage_once_and_adam_doubles_the_parameters():
    before = tensor_mb()
    weight = torch.nn.Parameter(torch.zeros(512, 1024))  # 2 MB
    views = [weight.data[:10], weight.detach()]  # share its storage: not counted again
    assert tensor_mb() - before == pytest.approx(2.0, abs=0.01)
    weight.grad = torch.ones_like(weight)
    optimizer = torch.optim.AdamW([weight])
    optimizer.step()  # two moments as large as the parameter, and the gradient
    assert tensor_mb() - before == pytest.approx(8.0, abs=0.01)
    assert tensor_mb("meta") == 0
    del views, optimizer
