"""DPO pieces without Ray: the loss against hand-computed values, pair log-probabilities against a brute-force
computation, the reference model (adapter off, or a frozen SFT copy), preference records and configs."""

import json
import math

import numpy as np
import pytest
import torch

from honed.train.dpo import (
    DPOObjective,
    collate_pairs,
    object_column,
    pair_logps,
    pair_metrics,
    pair_stats,
    preference_loss,
)

column = object_column


def t(*values):
    return torch.tensor(values, dtype=torch.float64)




# ------------------------------------------------------------------------------------------------ the loss
def test_sigmoid_loss_and_rewards_match_a_hand_computation():
    # Δ = (-2 - -2.5) - (-3 - -2.5) = 1.0; β = 0.5 → loss = log(1 + e^-0.5)
    losses, chosen, rejected = preference_loss(t(-2.0), t(-3.0), t(-2.5), t(-2.5), beta=0.5)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-0.5)), abs=1e-12)  # 0.474077
    assert chosen.item() == pytest.approx(0.25) and rejected.item() == pytest.approx(-0.25)


def test_label_smoothing_mixes_in_the_flipped_preference():
    losses, _, _ = preference_loss(t(-2.0), t(-3.0), t(-2.5), t(-2.5), beta=0.5, label_smoothing=0.1)
    expected = 0.9 * math.log1p(math.exp(-0.5)) + 0.1 * math.log1p(math.exp(0.5))
    assert losses.item() == pytest.approx(expected, abs=1e-12)  # 0.524077


def test_ipo_and_hinge_losses():
    # Δ = 1.0: IPO's target is 1/(2β) = 1 at β = 0.5 → 0; at β = 0.25 the target is 2 → (1 - 2)² = 1
    assert preference_loss(t(-2.0), t(-3.0), t(-2.5), t(-2.5), beta=0.5, loss="ipo")[0].item() == pytest.approx(0.0)
    assert preference_loss(t(-2.0), t(-3.0), t(-2.5), t(-2.5), beta=0.25, loss="ipo")[0].item() == pytest.approx(1.0)
    assert preference_loss(t(-2.0), t(-3.0), t(-2.5), t(-2.5), beta=0.5, loss="hinge")[0].item() == pytest.approx(0.5)
    assert preference_loss(t(-2.0), t(-3.0), t(-2.5), t(-2.5), beta=4.0, loss="hinge")[0].item() == 0.0
    with pytest.raises(ValueError, match="sigmoid, ipo or hinge"):
        preference_loss(t(0.0), t(0.0), t(0.0), t(0.0), beta=0.1, loss="kto")


def test_loss_gradient_raises_chosen_and_lowers_rejected():
    pol_c, pol_r = t(-2.0).requires_grad_(), t(-3.0).requires_grad_()
    losses, _, _ = preference_loss(pol_c, pol_r, t(-2.5), t(-2.5), beta=0.5)
    losses.sum().backward()
    assert pol_c.grad.item() < 0 < pol_r.grad.item()  # descending the loss raises log π(chosen)


def test_reward_metrics_over_a_batch():
    sums = pair_stats(t(1.0, -1.0, 0.5, 0.0), t(0.0, 0.0, 0.0, 0.0))  # a tie counts as wrong
    metrics = pair_metrics(sums)
    assert metrics == {"reward_accuracy": 0.5, "reward_margin": 0.125, "chosen_reward": 0.125, "rejected_reward": 0.0}
    assert set(pair_metrics(sums, prefix="val_", suffix="/icd")) == {
        "val_reward_accuracy/icd", "val_reward_margin/icd", "val_chosen_reward/icd", "val_rejected_reward/icd"}


# ------------------------------------------------------------------------------- log-probs and reference
def pairs_batch(tokenizer, n=3):
    """Hand-made pairs: a shared prompt (no labels) and two different answers (labelled)."""
    rows = {"input_ids": [], "labels": [], "rejected_input_ids": [], "rejected_labels": [], "source": []}
    for i in range(n):
        prompt = tokenizer(f"question {i} about code E1{i}", add_special_tokens=False)["input_ids"]
        for key, answer in (("", f"the right answer {i}"), ("rejected_", f"a wrong one {'x' * i}")):
            ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
            rows[f"{key}input_ids"].append(np.array(prompt + ids))
            rows[f"{key}labels"].append(np.array([-100] * len(prompt) + ids))
        rows["source"].append("pairs")
    return {k: column(v) for k, v in rows.items()} | {"_weight": np.ones(n)}


def brute_force_logp(model, ids, labels) -> float:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double().log_softmax(-1)
    return sum(float(logits[p - 1, ids[p]]) for p in range(1, len(ids)) if labels[p] != -100)


@pytest.fixture(scope="module")
def tiny(tiny_model):
    from honed.models import load_tokenizer

    return tiny_model, load_tokenizer(tiny_model)


def lora_dpo_model(path, adapter=None, r=4):
    from honed.config import MethodConfig
    from honed.train.methods import build_model

    method = MethodConfig.model_validate({"name": "dpo", "dpo": {"adapter": adapter}} if adapter
                                         else {"name": "dpo", "lora": {"r": r, "dropout": 0.0}})
    torch.manual_seed(0)
    return build_model(method, path, "float32", torch.device("cpu")), method


def test_pair_logps_equal_a_per_sequence_brute_force(tiny):
    from transformers import AutoModelForCausalLM

    path, tokenizer = tiny
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    batch = pairs_batch(tokenizer)
    chosen, rejected = pair_logps(model, collate_pairs(batch, tokenizer.pad_token_id, torch.device("cpu")))
    for i in range(3):
        assert chosen[i].item() == pytest.approx(brute_force_logp(model, batch["input_ids"][i], batch["labels"][i]),
                                                 abs=1e-4)
        assert rejected[i].item() == pytest.approx(
            brute_force_logp(model, batch["rejected_input_ids"][i], batch["rejected_labels"][i]), abs=1e-4)
    mean_c, _ = pair_logps(model, collate_pairs(batch, tokenizer.pad_token_id, torch.device("cpu")), average=True)
    n0 = int((np.asarray(batch["labels"][0]) != -100).sum())
    assert mean_c[0].item() == pytest.approx(chosen[0].item() / n0, abs=1e-5)


def test_fresh_adapter_starts_at_the_reference_then_moves_away(tiny):
    path, tokenizer = tiny
    model, method = lora_dpo_model(path)
    objective = DPOObjective(method.dpo, model)
    inputs = collate_pairs(pairs_batch(tokenizer), tokenizer.pad_token_id, torch.device("cpu"))
    loss, pairs, sums = objective.loss(model, inputs)
    assert pairs == 3 and objective.units(inputs) == 3
    assert loss.item() / pairs == pytest.approx(math.log(2), abs=1e-6)  # LoRA B = 0: policy == reference
    assert sums["margin"] == pytest.approx(0.0, abs=1e-6)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(5):
        loss, _, sums = objective.loss(model, inputs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < math.log(2) - 0.05 and sums["correct"] == 3 and sums["margin"] > 0
    ref_c, _ = objective.reference.logps(inputs, average=False)
    with model.disable_adapter(), torch.no_grad():
        base_c, _ = pair_logps(model, inputs)
    assert torch.allclose(ref_c, base_c)  # the reference is still the base, adapter off
    assert model.training  # the reference pass put the model back in training mode


def test_sft_adapter_is_the_reference_and_only_its_trained_copy_is_saved(tiny, tmp_path):
    from peft import get_peft_model

    from honed.train.methods import load_base, peft_config

    path, tokenizer = tiny
    _, method = lora_dpo_model(path)
    sft = get_peft_model(load_base(method, path, "float32", torch.device("cpu")), peft_config(method))
    with torch.no_grad():
        for name, p in sft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)  # an SFT adapter that changes the model
    sft.save_pretrained(tmp_path / "sft")

    model, method = lora_dpo_model(path, adapter=str(tmp_path / "sft"))
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".reference." in n)
    assert any(p.requires_grad for n, p in model.named_parameters() if ".default." in n)
    objective = DPOObjective(method.dpo, model)
    inputs = collate_pairs(pairs_batch(tokenizer), tokenizer.pad_token_id, torch.device("cpu"))
    loss, pairs, _ = objective.loss(model, inputs)
    assert loss.item() / pairs == pytest.approx(math.log(2), abs=1e-5)  # starts at the SFT model = the reference
    ref_c, _ = objective.reference.logps(inputs, average=False)
    with model.disable_adapter(), torch.no_grad():
        base_c, _ = pair_logps(model, inputs)
    assert (ref_c - base_c).abs().max() > 1e-3  # the reference is the SFT model, not the base

    loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    ref_after, _ = objective.reference.logps(inputs, average=False)
    assert torch.equal(ref_c, ref_after)  # training moves the policy only

    from honed.config import TrainConfig
    from honed.train.backends import TorchBackend

    backend = type("B", (), {"model": model, "cfg": TrainConfig(method=method)})()
    TorchBackend.artifact(backend, str(tmp_path / "ckpt"), 0)
    saved = sorted(p.name for p in (tmp_path / "ckpt" / "adapter").iterdir())
    assert saved == ["README.md", "adapter_config.json", "adapter_model.safetensors"], saved


def test_rows_without_a_rejected_answer_are_refused_by_name(tiny):
    _, tokenizer = tiny
    batch = pairs_batch(tokenizer, n=2)
    batch["rejected_input_ids"][1] = np.array([], dtype=np.int64)
    batch["source"][1] = "kjv"
    with pytest.raises(ValueError, match="rows of source kjv have no rejected answer"):
        collate_pairs(batch, tokenizer.pad_token_id, torch.device("cpu"))


def test_validation_scores_pairs_with_dpo_and_text_rows_with_lm_loss(tiny):
    from honed.train.validation import validation_metrics

    path, tokenizer = tiny
    model, method = lora_dpo_model(path)
    batch = pairs_batch(tokenizer, n=2)
    text_ids = np.array(tokenizer("In the beginning", add_special_tokens=False)["input_ids"])
    empty = np.array([], dtype=np.int64)
    for key, value in (("input_ids", text_ids), ("labels", text_ids), ("rejected_input_ids", empty),
                       ("rejected_labels", empty), ("source", "kjv")):
        batch[key] = column(list(batch[key]) + [value])
    batch["_weight"] = np.ones(3)
    scored = DPOObjective(method.dpo, model).row_scores(model, batch, tokenizer.pad_token_id, torch.device("cpu"))
    sums = {}
    for source, weight, values in scored:
        for k, v in values.items():
            sums.setdefault(source, {})[k] = sums.get(source, {}).get(k, 0.0) + v * weight
    metrics = validation_metrics(sums, ["pairs"])
    assert metrics["val_loss/pairs"] == pytest.approx(math.log(2), abs=1e-5) == metrics["val_loss"]
    assert metrics["val_reward_accuracy/pairs"] == 0.0  # ties at the start
    assert metrics["val_loss/kjv"] > 3  # a token loss of the random tiny model, not a DPO loss


# ------------------------------------------------------------------------------------------------- records
def test_preference_records_parse_in_every_shape():
    from honed.data.records import parse_record

    simple = parse_record(json.dumps({"prompt": "Q?", "chosen": "good", "rejected": "bad", "group": 7}))
    assert simple == {"kind": "preference", "messages": [{"role": "user", "content": "Q?"}], "chosen": "good",
                      "rejected": "bad", "group": "7"}
    chat = parse_record(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                                                 {"role": "user", "content": "Q?"}],
                                    "chosen": [{"role": "assistant", "content": "good"}], "rejected": "bad"}))
    assert len(chat["messages"]) == 3 and chat["chosen"] == "good"
    mapped = parse_record(json.dumps({"q": "Q?", "better": "a", "worse": "b"}),
                          {"prompt": "q", "chosen": "better", "rejected": "worse"})
    assert mapped["kind"] == "preference" and mapped["rejected"] == "b"


@pytest.mark.parametrize("obj, reason, words", [
    ({"prompt": "Q?", "chosen": "good"}, "missing_field", "'rejected' is missing"),
    ({"chosen": "a", "rejected": "b"}, "missing_field", "need 'prompt' \\(a string\\) or 'messages'"),
    ({"prompt": "Q?", "chosen": 3, "rejected": "b"}, "wrong_type", "'chosen' must be a string"),
    ({"prompt": ["Q?"], "chosen": "a", "rejected": "b"}, "wrong_type", "'prompt' must be a string"),
    ({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], "chosen": "a",
      "rejected": "b"}, "bad_messages", "must end with a user turn"),
    ({"messages": [{"role": "judge", "content": "Q"}], "chosen": "a", "rejected": "b"}, "bad_messages", "message 0"),
])
def test_malformed_pairs_name_their_problem(obj, reason, words):
    from honed.data.records import BadRecord, parse_record

    with pytest.raises(BadRecord, match=words) as err:
        parse_record(json.dumps(obj))
    assert err.value.reason == reason


def test_empty_and_identical_answers_are_caught():
    from honed.data.records import empty_field, identical_answers, parse_record

    record = parse_record(json.dumps({"prompt": "Q?", "chosen": "", "rejected": "b"}))
    assert empty_field(record) == "chosen"
    assert empty_field(parse_record(json.dumps({"prompt": "", "chosen": "a", "rejected": "b"}))) == "prompt"
    assert identical_answers(parse_record(json.dumps({"prompt": "Q?", "chosen": "same ", "rejected": "same"})))
    assert not identical_answers(parse_record(json.dumps({"prompt": "Q?", "chosen": "a", "rejected": "b"})))


def test_encoded_pair_shares_its_prompt_and_labels_only_the_final_answer(tiny):
    from honed.data.records import encode_preference, parse_record

    _, tokenizer = tiny
    record = parse_record(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                   {"role": "assistant", "content": "hello"},
                                                   {"role": "user", "content": "What is E11.9?"}],
                                      "chosen": "Type 2 diabetes", "rejected": "Type 1 diabetes"}))
    out = encode_preference(record, tokenizer, "system prompt")
    c, r = out["input_ids"], out["rejected_input_ids"]
    shared = next(i for i, (a, b) in enumerate(zip(c, r)) if a != b)
    assert c[:shared] == r[:shared]
    first_label = next(i for i, y in enumerate(out["labels"]) if y != -100)
    assert all(y == -100 for y in out["labels"][:first_label]) and first_label <= shared
    answer = tokenizer.decode([y for y in out["labels"] if y != -100])
    assert "Type 2 diabetes" in answer and "hello" not in answer  # the earlier assistant turn is context
    assert "Type 1 diabetes" in tokenizer.decode([y for y in out["rejected_labels"] if y != -100])


def test_derived_icd10_pairs_prefer_the_codes_own_description():
    import simple_icd_10_cm as cm

    from honed.data.sources import DERIVED, icd10_pair_records

    records = icd10_pair_records(["4"], max_records=200, seed=1)
    assert len(records) == 200 and "not judged by people" in DERIVED["icd10_pairs"]
    for r in records:
        code = r["group"]
        assert r["chosen"] != r["rejected"]
        if r["prompt"].startswith("What does"):
            assert r["chosen"] == cm.get_description(code) and r["rejected"] != cm.get_description(code)


# ------------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("method, words", [
    ({"name": "dpo", "dpo": {"adapter": "sft"}, "lora": {"r": 8}}, "LoRA settings come from the SFT adapter"),
    ({"name": "dpo", "dpo": {"loss": "ipo", "label_smoothing": 0.1}}, "label_smoothing applies to loss sigmoid"),
    ({"name": "dpo", "deepspeed": {"zero_stage": 2}}, "'deepspeed' settings apply to method"),
    ({"name": "dpo", "dpo": {"loss": "kto"}}, "'sigmoid', 'ipo' or 'hinge'"),
    ({"name": "lora", "dpo": {"beta": 0.2}}, "'dpo' settings apply to method dpo"),
])
def test_bad_dpo_configs_are_named(method, words):
    from honed.config import ConfigError, TrainConfig, load_config

    overrides = [f"method={json.dumps(method)}"]
    with pytest.raises(ConfigError, match=words):
        load_config(TrainConfig, None, overrides)


def test_dpo_needs_unpacked_shards_of_pairs_only():
    from honed.train.plan import check_preference_data

    pairs = {"kinds": {"train": {"prefs": {"preference": 90}}, "val": {"kjv": {"text": 10}}}}
    check_preference_data(pairs, packed=False)
    with pytest.raises(ValueError, match="unpacked shards"):
        check_preference_data(pairs, packed=True)
    mixed = {"kinds": {"train": {"prefs": {"preference": 90}, "icd10": {"instruction": 40}}}}
    with pytest.raises(ValueError, match="icd10: 40 instruction"):
        check_preference_data(mixed, packed=False)
    with pytest.raises(ValueError, match="prepare it again"):
        check_preference_data({}, packed=False)


def test_sft_adapter_must_be_lora_of_the_same_base(tmp_path):
    from honed.train.dpo import check_sft_adapter

    with pytest.raises(ValueError, match="adapter_config.json missing"):
        check_sft_adapter(str(tmp_path))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(ValueError, match="IA3 adapter; DPO continues LoRA adapters only"):
        check_sft_adapter(str(tmp_path))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (tmp_path / "honed.json").write_text(json.dumps({"base_weights_sha256": "a" * 64}))
    assert check_sft_adapter(str(tmp_path), "a" * 64)["peft_type"] == "LORA"
    with pytest.raises(ValueError, match="other base weights"):
        check_sft_adapter(str(tmp_path), "b" * 64)


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "hinge"])
def test_every_loss_variant_learns_a_fixed_batch(tiny, loss):
    path, tokenizer = tiny
    model, method = lora_dpo_model(path)
    objective = DPOObjective(method.dpo.model_copy(update={"loss": loss, "beta": 0.5}), model)
    inputs = collate_pairs(pairs_batch(tokenizer), tokenizer.pad_token_id, torch.device("cpu"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        value, _, sums = objective.loss(model, inputs)
        value.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(value.item())
    assert losses[-1] < losses[0] and sums["margin"] > 0, losses
