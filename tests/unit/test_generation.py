"""The decode loop shared by eval and serving (honed.generation): the tokens of Hugging Face's greedy
`generate`, rows joining a running batch (continuous batching) decode exactly as they would alone, stop
strings, streamed pieces, seeded sampling, and finished rows leaving the cache."""

import pytest
import torch

from honed.generation import BatchDecoder, DecodeJob, decode_steps, generate

PROMPTS = ["Code E11", "Which chapter contains code E11.9 and why is that so", "hello"]


@pytest.fixture(scope="module")
def lm(tiny_model):
    from honed.models import load_model

    model, tok = load_model(tiny_model, "float32", "cpu")
    return model.eval(), tok


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_batched_greedy_equals_hugging_face_generate(lm):
    model, tok = lm
    ours = generate(model, tok, PROMPTS, 12)
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        ref = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)[:, enc["input_ids"].shape[1]:]
    for done, row in zip(ours, ref.tolist()):
        row = row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row
        assert done.text == tok.decode(row, skip_special_tokens=True).strip()
        assert done.completion_tokens <= 12


@pytest.mark.parametrize("first, joiner", [(0, 1), (1, 0), (2, 1)])
def test_a_row_joining_mid_decode_decodes_as_it_would_alone(lm, first, joiner):
    model, tok = lm
    alone = {i: generate(model, tok, [PROMPTS[i]], 10)[0].text for i in (first, joiner)}
    decoder = BatchDecoder(model, tok)
    done = {}
    with torch.inference_mode():
        events = decoder.add([DecodeJob(ids(tok, PROMPTS[first]), 10)], keys=[first])
        for step in range(12):
            if step == 3:  # the running row has 4 tokens and a cache longer or shorter than the joiner's prompt
                events += decoder.add([DecodeJob(ids(tok, PROMPTS[joiner]), 10)], keys=[joiner])
            done |= {key: e["done"].text for key, e in events if "done" in e}
            events = decoder.step()
        done |= {key: e["done"].text for key, e in events if "done" in e}
    assert done == alone


def test_finished_rows_leave_and_unused_cache_columns_go(lm):
    model, tok = lm
    decoder = BatchDecoder(model, tok)
    with torch.inference_mode():
        decoder.add([DecodeJob(ids(tok, PROMPTS[1]), 2), DecodeJob(ids(tok, PROMPTS[2]), 6)])
        width = decoder.mask.shape[1]
        decoder.step()  # the long-prompt row finishes: its padding columns are no one's any more
    assert len(decoder) == 1 and decoder.mask.shape[1] < width
    # the short row's prompt and its first token are cached (its second is the next input)
    assert decoder.mask.shape[1] == decoder.cache.layers[0].keys.shape[2] == len(ids(tok, PROMPTS[2])) + 1


def test_stop_string_cuts_and_streamed_pieces_add_up(lm):
    model, tok = lm
    whole = generate(model, tok, [PROMPTS[1]], 12)[0].text
    stop = whole[4:6]
    pieces, done = [], None
    for (event,) in decode_steps(model, tok, [DecodeJob(ids(tok, PROMPTS[1]), 12, stop=[stop])]):
        if event:
            pieces.append(event["text"])
            done = event.get("done", done)
    assert done.finish_reason == "stop" and done.text == whole[: whole.index(stop)].strip()
    assert "".join(pieces).strip() == done.text  # nothing past the stop string was ever streamed


def test_seeded_sampling_is_reproducible_per_row(lm):
    model, tok = lm
    one = generate(model, tok, ["hello"], 10, temperature=1.2, top_p=0.9, seed=5)[0].text
    jobs = [DecodeJob(ids(tok, "hello"), 10, 1.2, 0.9, seed=5), DecodeJob(ids(tok, PROMPTS[0]), 10, 1.2, seed=6)]
    batched = [e["done"].text for events in decode_steps(model, tok, jobs) for e in events if e and "done" in e]
    assert one in batched  # a row's sample does not depend on the rows beside it
