"""Per-record steps of `honed prepare`: parse (with a field mapping), template + tokenize, split. Pure
functions over one record, so each is unit-tested on hand-made data and run unchanged inside Ray Data.

A record is a dict with `kind` and its fields:
  text         {"kind": "text", "text"}                       continued pre-training: loss on every token
  instruction  {"kind": "instruction", "prompt", "response"}  rendered as a system/user/assistant chat
  chat         {"kind": "chat", "messages": [{role, content}]} multi-turn; loss on assistant turns
  preference   {"kind": "preference", "messages": [...], "chosen", "rejected"}   a question (the turns up to
               a user turn; a `prompt` string becomes one user turn) and two answers to it, for DPO; the chosen
               conversation doubles as an instruction example (SFT on a preference set trains on `chosen`)
plus an optional `group` (records of one group never straddle train and validation; a preference record's
default group is its question, so pairs sharing a question stay on one side).

Every record ends in exactly one state: `kept` (train or val), `dropped` (a filter said no, with a reason)
or `quarantined` (the record itself is broken, with a reason); the manifest counts reconcile from these. A kept
text document longer than the length limit is one record, trained on as several windows (`token_windows`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

from honed.generation import chat_messages

KEPT, DROPPED, QUARANTINED = "kept", "dropped", "quarantined"
ROLES = ("system", "user", "assistant")
DEFAULT_FIELDS = {"text": "text", "prompt": "prompt", "response": "response", "messages": "messages",
                  "group": "group", "chosen": "chosen", "rejected": "rejected"}


class BadRecord(ValueError):
    """A record that cannot be used as it is; `reason` is its quarantine label."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def parse_record(raw: str, fields: dict[str, str] | None = None, fmt: str = "auto") -> dict:
    """One JSON object → a record. `fields` maps honed names (text, prompt, response, messages, group) to the
    input's column names; `fmt` forces a kind (`text`, `instruction`, `chat`) or picks one per record."""
    fields = DEFAULT_FIELDS | (fields or {})
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, TypeError) as err:
        raise BadRecord("malformed_json", str(err)) from None
    if not isinstance(obj, dict):
        raise BadRecord("not_an_object", f"expected a JSON object, got {type(obj).__name__}")
    kind = fmt if fmt != "auto" else _detect_kind(obj, fields)
    if kind == "preference":
        record = {"kind": kind, "messages": _question(obj, fields)}
        for name in ("chosen", "rejected"):
            record[name] = _answer(obj, fields[name])
    elif kind == "chat":
        record = {"kind": kind, "messages": _messages(obj, fields["messages"])}
    else:
        names = ("prompt", "response") if kind == "instruction" else ("text",)
        record = {"kind": kind}
        for name in names:
            column = fields[name]
            if column not in obj:
                raise BadRecord("missing_field", f"'{column}' is missing; {kind} records need "
                                + " and ".join(f"'{fields[n]}'" for n in names))
            if not isinstance(obj[column], str):
                raise BadRecord("wrong_type", f"'{column}' must be a string, got {type(obj[column]).__name__}")
            record[name] = obj[column]
    group = obj.get(fields["group"])
    record["group"] = str(group) if group is not None else None
    return record


def _detect_kind(obj: dict, fields: dict[str, str]) -> str:
    if fields["chosen"] in obj or fields["rejected"] in obj:
        return "preference"
    if fields["messages"] in obj:
        return "chat"
    if fields["prompt"] in obj or fields["response"] in obj:
        return "instruction"
    if fields["text"] in obj:
        return "text"
    wanted = ", ".join(f"'{fields[n]}'" for n in ("text", "prompt", "response", "messages"))
    raise BadRecord("missing_field", f"none of {wanted} is present; records need text, prompt + response, "
                                     f"or messages (map other column names with `fields`)")


def _question(obj: dict, fields: dict[str, str]) -> list[dict]:
    """A preference record's question: `messages` ending with a user turn, or a `prompt` string."""
    if fields["messages"] in obj:
        messages = _messages(obj, fields["messages"], need_assistant=False)
        if messages[-1]["role"] != "user":
            raise BadRecord("bad_messages", f"'{fields['messages']}' of a preference record must end with a user "
                                            f"turn (the answers are `{fields['chosen']}` and `{fields['rejected']}`)")
        return messages
    if fields["prompt"] not in obj:
        raise BadRecord("missing_field", f"preference records need '{fields['prompt']}' (a string) or "
                                         f"'{fields['messages']}' (turns ending with a user turn)")
    if not isinstance(obj[fields["prompt"]], str):
        raise BadRecord("wrong_type", f"'{fields['prompt']}' must be a string, got {type(obj[fields['prompt']]).__name__}")
    return [{"role": "user", "content": obj[fields["prompt"]]}]


def _answer(obj: dict, column: str) -> str:
    """`chosen` / `rejected`: a string, or a one-message list `[{role: assistant, content}]` (the chat form)."""
    if column not in obj:
        raise BadRecord("missing_field", f"'{column}' is missing; preference records need both answers")
    value = obj[column]
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) \
            and value[0].get("role") == "assistant" and isinstance(value[0].get("content"), str):
        return value[0]["content"]
    if not isinstance(value, str):
        raise BadRecord("wrong_type", f"'{column}' must be a string or [{{role: assistant, content: string}}], "
                                      f"got {json.dumps(value)[:200]}")
    return value


def _messages(obj: dict, column: str, need_assistant: bool = True) -> list[dict]:
    if column not in obj:
        raise BadRecord("missing_field", f"'{column}' is missing; chat records need a list of messages")
    messages = obj[column]
    if not isinstance(messages, list) or not messages:
        raise BadRecord("wrong_type", f"'{column}' must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise BadRecord("bad_messages", f"message {i} must be {{role: {'|'.join(ROLES)}, content: string}}, "
                                            f"got {json.dumps(m)[:200]}")
        out.append({"role": m["role"], "content": m["content"]})
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise BadRecord("bad_messages", "no assistant message: nothing to learn from")
    return out


def map_texts(record: dict, fn: Callable[[str], str]) -> dict:
    """The record with `fn` applied to every text it holds (text, prompt, response, message contents)."""
    out = dict(record)
    for name in ("text", "prompt", "response", "chosen", "rejected"):
        if name in out:
            out[name] = fn(out[name])
    if "messages" in out:
        out["messages"] = [{"role": m["role"], "content": fn(m["content"])} for m in out["messages"]]
    return out


def empty_field(record: dict) -> str | None:
    """The name of the first empty text in the record (after cleaning), or None."""
    for name in ("text", "prompt", "response", "chosen", "rejected"):
        if name in record and not record[name]:
            return name
    if record["kind"] == "preference":
        return "prompt" if not any(m["content"] for m in record["messages"] if m["role"] == "user") else None
    if "messages" in record:
        if any(not m["content"] for m in record["messages"] if m["role"] == "assistant"):
            return "response"
    return None


def to_messages(record: dict, system_prompt: str | None, answer: str = "chosen") -> list[dict]:
    """Instruction, chat and preference records (with their `answer`: chosen or rejected) as the conversation
    the template renders (system prompt prepended unless the record brings its own, exactly as at serve time)."""
    if record["kind"] == "preference":
        return chat_messages(record["messages"] + [{"role": "assistant", "content": record[answer]}], system_prompt)
    if record["kind"] == "chat":
        return chat_messages(record["messages"], system_prompt)
    return chat_messages([{"role": "user", "content": record["prompt"]},
                          {"role": "assistant", "content": record["response"]}], system_prompt)


def encode_example(record: dict, tokenizer, system_prompt: str | None, loss_on: str = "response",
                   chat_template: str | None = None) -> dict:
    """Token ids and labels (-100 = no loss). Raw text gets EOS appended and loss everywhere; conversations
    are rendered turn by turn so each assistant turn (with its end-of-turn tokens) is labelled, and with
    `loss_on="response"` nothing else is."""
    if record["kind"] == "text":
        ids = encode_texts([record["text"]], tokenizer)[0]
        return {"input_ids": ids, "labels": list(ids)}
    ids, labels = [], []
    for text, is_response in conversation_pieces(to_messages(record, system_prompt), tokenizer, chat_template):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if (is_response or loss_on == "all") else [-100] * len(piece)
    return {"input_ids": ids, "labels": labels}


def encode_preference(record: dict, tokenizer, system_prompt: str | None, chat_template: str | None = None) -> dict:
    """A preference pair as two token sequences sharing the question: `input_ids`/`labels` for the chosen
    conversation, `rejected_input_ids`/`rejected_labels` for the rejected one; only the final answer is
    labelled (earlier assistant turns of the question are context, not what is preferred)."""
    out = {}
    for answer, prefix in (("chosen", ""), ("rejected", "rejected_")):
        pieces = conversation_pieces(to_messages(record, system_prompt, answer), tokenizer, chat_template)
        ids, labels = [], []
        for i, (text, _) in enumerate(pieces):
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            labels += piece if i == len(pieces) - 1 else [-100] * len(piece)
        out[f"{prefix}input_ids"], out[f"{prefix}labels"] = ids, labels
    return out


def identical_answers(record: dict) -> bool:
    """A preference pair whose answers are the same text (after cleaning) teaches nothing and is quarantined."""
    return record["kind"] == "preference" and record["chosen"].strip() == record["rejected"].strip()


def encode_texts(texts: list[str], tokenizer) -> list[list[int]]:
    """Raw texts → token ids + EOS, in one batched tokenizer call."""
    if not texts:
        return []
    return [ids + [tokenizer.eos_token_id] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def window_spans(n_tokens: int, size: int, overlap: int) -> list[tuple[int, int, int]]:
    """`(start, end, first_labelled)` of the windows of at most `size` tokens that cover a document of `n_tokens`:
    each starts `size - overlap` after the one before (so it repeats at least `overlap` tokens as context), the
    last ends at the document's end, and `first_labelled` is where the tokens no earlier window holds begin, so
    the labelled parts tile the document exactly once. One window when the document fits."""
    spans, start, labelled = [], 0, 0
    while True:
        end = min(start + size, n_tokens)
        spans.append((start, end, labelled))
        if end == n_tokens:
            return spans
        start, labelled = min(start + size - overlap, n_tokens - size), end


def token_windows(input_ids: list[int], labels: list[int], size: int, overlap: int) -> list[tuple[list, list]]:
    """A long text document's `(input_ids, labels)` cut into windows (see `window_spans`); tokens repeated as
    context carry label -100."""
    return [(list(input_ids[start:end]), [-100] * (labelled - start) + list(labels[labelled:end]))
            for start, end, labelled in window_spans(len(input_ids), size, overlap)]


def conversation_pieces(messages: list[dict], tokenizer, chat_template: str | None) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is_assistant_turn) pieces, up to the last assistant turn."""
    def render(msgs: list[dict], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(msgs, add_generation_prompt=generation_prompt, tokenize=False,
                                             chat_template=chat_template)

    pieces, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, through = render(messages[:i], True), render(messages[:i + 1], False)
        if not (prompt.startswith(done) and through.startswith(prompt)):
            raise ValueError("the chat template does not render a conversation's prefix as a prefix of the "
                             "whole conversation; response-only labels need that (choose another template)")
        pieces += [(prompt[len(done):], False), (through[len(prompt):], True)]
        done = through
    return [(text, flag) for text, flag in pieces if text]


def assign_split(seed: int, source: str, group: str, val_fraction: float) -> str:
    """Deterministic, order-free split by group: the same group always lands on the same side."""
    return "val" if unit_hash(f"{seed}:{source}:{group}") < val_fraction else "train"


def unit_hash(key: str) -> float:
    """A stable pseudo-random number in [0, 1) for a string key."""
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def group_key(record: dict) -> str:
    if record.get("group"):
        return record["group"]
    if record["kind"] in ("chat", "preference"):
        body = "\n".join(m["content"] for m in record["messages"])
    else:
        body = record.get("text") or record["prompt"]
    return hashlib.sha256(body.encode()).hexdigest()[:16]
