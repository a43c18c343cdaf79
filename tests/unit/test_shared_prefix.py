"""Validation rows that open alike score their common prefix once (honed.train.shared_prefix).

What must hold: the largest group of rows sharing an opening is found, its prefix cut before any member's first
scored position; the rows' losses and token counts equal the whole rows' (with and without a LoRA adapter, rows
of other openings mixed in, in any order); models that cannot take a prefix (attention other than honed_varlen,
prefix tuning) score whole rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import honed.train.losses as losses
from honed.train.attention import use_varlen
from honed.train.shared_prefix import MIN_PREFIX, find_shared_prefix, prefixed_inputs, shares_prefixes

CPU = torch.device("cpu")


def column(values) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = [np.asarray(v) for v in values]
    return out


def batch(prefix_len=12, members=(20, 15, 30, 9), others=(18, 25, 11), prompt=3, seed=0) -> dict:
    """Rows opening with one `prefix_len`-token prefix then `prompt` unscored tokens, and rows of their own."""
    rng = np.random.default_rng(seed)
    prefix = rng.integers(5, 200, size=prefix_len)
    ids = [np.concatenate([prefix, rng.integers(5, 200, size=n)]) for n in members]
    labels = [np.where(np.arange(len(x)) >= prefix_len + prompt, x, -100) for x in ids]
    for n in others:
        x = rng.integers(5, 200, size=n)
        ids.append(x)
        labels.append(np.where(np.arange(n) >= 2, x, -100))
    order = rng.permutation(len(ids))
    return {"input_ids": column([ids[i] for i in order]), "labels": column([labels[i] for i in order]),
            "source": np.array([("shared" if i < len(members) else "own") for i in order]),
            "_weight": np.ones(len(ids))}


def load(path, lora: bool = False, varlen: bool = True):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    if lora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.05)  # a trained adapter, not the identity peft starts from
    if varlen:
        use_varlen(model)
    return model.eval()


def test_the_largest_group_and_its_prefix_are_found():
    rows = batch()
    prefix = find_shared_prefix(rows["input_ids"], rows["labels"])
    assert prefix is not None and prefix.length == 12
    assert sorted(rows["source"][prefix.members]) == ["shared"] * 4
    assert prefix.tokens.tolist() == rows["input_ids"][prefix.members[0]][:12].tolist()


def test_the_prefix_stops_before_the_first_scored_position():
    # 20 identical tokens, but one member's labels start at 10: position 9 predicts token 10, so 9 tokens are shared
    same = np.arange(5, 25)
    ids = [np.concatenate([same, [30 + i, 31]]) for i in range(3)]
    labels = [np.where(np.arange(22) >= start, x, -100) for x, start in zip(ids, (21, 10, 15))]
    prefix = find_shared_prefix(column(ids), column(labels))
    assert prefix.length == 9


def test_every_member_keeps_a_token_of_its_own():
    same = np.arange(5, 25)
    ids = [same, np.concatenate([same, [40, 41]])]
    labels = [np.full(20, -100), np.full(22, -100)]
    assert find_shared_prefix(column(ids), column(labels)).length == 19


@pytest.mark.parametrize("why, rows", [
    ("one row", batch(members=(20,), others=(18, 25))),
    ("too short", batch(prefix_len=MIN_PREFIX - 1, prompt=0)),
    ("nothing shared", batch(members=(), others=(18, 25, 30))),
])
def test_no_prefix_when_too_little_is_shared(why, rows):
    assert find_shared_prefix(rows["input_ids"], rows["labels"]) is None, why


def test_rows_scored_from_their_first_token_are_left_out():
    # plain text windows (the forgetting probe's) are labelled from token 0: nothing of theirs can be shared
    rows = batch()
    members = find_shared_prefix(rows["input_ids"], rows["labels"]).members
    rows["labels"][members[0]] = rows["input_ids"][members[0]].copy()
    prefix = find_shared_prefix(rows["input_ids"], rows["labels"])
    assert prefix.members == members[1:] and prefix.length == 12
    for i in members[1:]:
        rows["labels"][i] = rows["input_ids"][i].copy()
    assert find_shared_prefix(rows["input_ids"], rows["labels"]) is None


@pytest.mark.parametrize("lora", [False, True])
def test_row_scores_equal_the_whole_rows(tiny_model, monkeypatch, lora):
    model = load(tiny_model, lora=lora)
    rows = batch()
    assert prefixed_inputs(model, rows, CPU) is not None  # the shared path is the one taken
    shared = losses.lm_row_scores(model, rows, 0, CPU, flat=True)
    monkeypatch.setattr(losses, "prefixed_inputs", lambda *a: None)
    whole = losses.lm_row_scores(model, rows, 0, CPU, flat=True)
    assert [s[0] for s in shared] == [w[0] for w in whole]
    assert [s[2]["tokens"] for s in shared] == [w[2]["tokens"] for w in whole]
    np.testing.assert_allclose([s[2]["loss"] for s in shared], [w[2]["loss"] for w in whole], rtol=1e-5)


def test_a_changed_prefix_token_changes_the_members_scores(tiny_model):
    """The members really attend to the prefix: a different prefix gives different losses."""
    model = load(tiny_model)
    rows = batch()
    before = losses.lm_row_scores(model, rows, 0, CPU, flat=True)
    prefix = find_shared_prefix(rows["input_ids"], rows["labels"])
    for i in prefix.members:
        rows["input_ids"][i] = rows["input_ids"][i].copy()
        rows["input_ids"][i][5] = 201
    after = losses.lm_row_scores(model, rows, 0, CPU, flat=True)
    for i, (b, a) in enumerate(zip(before, after)):
        assert (b[2]["loss"] != a[2]["loss"]) == (i in prefix.members)


def test_models_that_cannot_take_a_prefix_score_whole_rows(tiny_model):
    import peft

    assert shares_prefixes(load(tiny_model))
    assert not shares_prefixes(load(tiny_model, varlen=False))  # sdpa: the boundaries are not read
    tuned = peft.get_peft_model(load(tiny_model, varlen=False),
                                peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    use_varlen(tuned)
    assert not shares_prefixes(tuned)
    assert prefixed_inputs(tuned, batch(), CPU) is None
