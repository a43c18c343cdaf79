"""Packing and the pipeline's array steps on hand-made data: rows are full, positions restart per example,
attention stays inside each example (the packed forward equals each example run alone), and the dedup
edges and stage counts come out right."""

import numpy as np
import pytest
import torch

from honed.data.corpus_dedup import mark_duplicates, star_edges
from honed.data.manifest import stage_counts
from honed.data.shards import pack_examples


def examples(lengths: list[int]) -> dict[str, np.ndarray]:
    ids = [list(range(1 + 100 * i, 1 + 100 * i + n)) for i, n in enumerate(lengths)]
    labels = [[-100] * (n // 2) + x[n // 2:] for x, n in zip(ids, lengths)]
    return {"input_ids": np.array(ids, dtype=object), "labels": np.array(labels, dtype=object)}


def test_packing_fills_rows_and_restarts_positions():
    lengths = [7, 3, 5, 2, 6, 1, 8]
    packed = pack_examples(examples(lengths), seq_len=10, pad_id=0).to_pydict()
    assert all(len(r) == 10 for key in ("input_ids", "labels", "position_ids") for r in packed[key])
    assert sum(packed["num_tokens"]) == sum(lengths) and sum(packed["num_examples"]) == len(lengths)
    assert len(packed["input_ids"]) == 4          # 32 tokens in rows of 10: best fit needs exactly 4
    for ids, labels, pos, used in zip(packed["input_ids"], packed["labels"], packed["position_ids"],
                                      packed["num_tokens"]):
        assert ids[used:] == [0] * (10 - used) and labels[used:] == [-100] * (10 - used)
        starts = [i for i, p in enumerate(pos) if p == 0]
        segments = [ids[a:b] for a, b in zip(starts, starts[1:] + [10])]
        for seg in segments[: len(segments) - (used < 10)]:   # every real segment is one whole example
            assert seg == list(range(seg[0], seg[0] + len(seg))) and (seg[0] - 1) % 100 == 0


def test_packing_is_deterministic_and_keeps_every_token():
    batch = examples([5, 5, 4, 9, 1, 3])
    a, b = pack_examples(batch, 12, 0).to_pydict(), pack_examples(batch, 12, 0).to_pydict()
    assert a == b
    tokens = sorted(t for row, used in zip(a["input_ids"], a["num_tokens"]) for t in row[:used])
    assert tokens == sorted(t for x in batch["input_ids"] for t in x)


def test_packed_forward_matches_each_example_alone(tiny_model):
    """Position ids restarting per example make transformers build a block-diagonal causal mask: the
    logits of a packed row equal those of each example run on its own."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    vocab = model.config.vocab_size
    seqs = [torch.randint(3, vocab, (n,)).tolist() for n in (9, 4, 6)]
    batch = {"input_ids": np.array(seqs, dtype=object), "labels": np.array(seqs, dtype=object)}
    packed = pack_examples(batch, seq_len=24, pad_id=0).to_pydict()
    assert len(packed["input_ids"]) == 1
    ids = torch.tensor(packed["input_ids"])
    with torch.no_grad():
        logits = model(input_ids=ids, position_ids=torch.tensor(packed["position_ids"]), use_cache=False).logits[0]
        start = 0
        for seq in sorted(seqs, key=len, reverse=True):          # best-fit-decreasing order
            alone = model(input_ids=torch.tensor([seq])).logits[0]
            torch.testing.assert_close(logits[start:start + len(seq)], alone, atol=1e-5, rtol=1e-4)
            start += len(seq)
        mixed = model(input_ids=ids, use_cache=False).logits[0]  # without restarts attention leaks across
        assert (mixed[9:13] - logits[9:13]).abs().max() > 1e-3


def test_star_edges_link_each_bucket_member_to_its_smallest_id():
    block = {"key": np.array([5, 7, 5, 5, 9, 7]), "id": np.array([30, 2, 10, 20, 1, 4])}
    edges = star_edges(block)
    assert sorted(zip(edges["id"].tolist(), edges["rep"].tolist())) == [(4, 2), (20, 10), (30, 10)]
    empty = star_edges({"key": np.array([], dtype=np.int64), "id": np.array([], dtype=np.int64)})
    assert len(empty["id"]) == 0


def test_mark_duplicates_only_touches_kept_rows():
    table = {"id": np.array([3, 8], dtype=np.int64), "reason": np.array([0, 1], dtype=np.int8)}
    batch = {"id": np.array([1, 3, 8, 9]), "status": np.array(["kept", "kept", "quarantined", "kept"], dtype=object),
             "reason": np.array(["", "", "malformed_json", ""], dtype=object)}
    out = mark_duplicates(batch, table)
    assert out["status"].tolist() == ["kept", "dropped", "quarantined", "kept"]
    assert out["reason"].tolist() == ["", "exact_duplicate", "malformed_json", ""]
    none = mark_duplicates(batch, {"id": np.array([], dtype=np.int64), "reason": np.array([], dtype=np.int8)})
    assert none["status"].tolist() == batch["status"].tolist()


def test_stage_counts_chain_in_to_out():
    rows = [
        {"source": "a", "status": "kept", "reason": "", "split": "train", "count()": 50},
        {"source": "a", "status": "quarantined", "reason": "not_utf8", "split": "", "count()": 2},
        {"source": "a", "status": "quarantined", "reason": "malformed_json", "split": "", "count()": 3},
        {"source": "a", "status": "dropped", "reason": "quality_symbol_ratio", "split": "", "count()": 4},
        {"source": "b", "status": "dropped", "reason": "near_duplicate", "split": "", "count()": 6},
        {"source": "b", "status": "dropped", "reason": "too_long", "split": "", "count()": 1},
    ]
    stages = {s["stage"]: s for s in stage_counts(rows)}
    assert stages["read"]["in"] == 66 and stages["read"]["out"] == 64
    assert stages["parse"]["removed"] == {"malformed_json": 3}
    assert stages["filter"]["removed"] == {"quality_symbol_ratio": 4}
    assert stages["template"]["removed"] == {"too_long": 1}
    assert stages["dedup"]["in"] == 56 and stages["dedup"]["out"] == 50
    assert stages["mix"]["out"] == 50
    chain = stage_counts(rows)
    assert all(a["out"] == b["in"] for a, b in zip(chain, chain[1:]))


@pytest.mark.parametrize("seq_len", [4, 6])
def test_an_example_longer_than_a_row_gets_its_own_overlong_row_never_split(seq_len):
    packed = pack_examples(examples([3, 3]), seq_len=seq_len, pad_id=0).to_pydict()
    assert sum(packed["num_examples"]) == 2
