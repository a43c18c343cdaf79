"""Per-record steps of `honed prepare`: parse, clean, template + tokenize, split. Pure functions over one
record, so each is unit-tested on hand-made data and run unchanged inside Ray Data.

Every record ends in exactly one state: `kept` (train or val), `dropped` (a filter said no, with a reason)
or `quarantined` (the record itself is broken, with a reason); the manifest counts reconcile from these.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata

KEPT, DROPPED, QUARANTINED = "kept", "dropped", "quarantined"

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SPACES = re.compile(r"[ \t\u00a0]+")


class BadRecord(ValueError):
    """A record that cannot be used as it is; `reason` is its quarantine label."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def parse_record(raw: str) -> dict:
    """One JSON object with either `prompt` + `response` (instruction pair) or `text` (raw text)."""
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, TypeError) as err:
        raise BadRecord("malformed_json", str(err)) from None
    if not isinstance(obj, dict):
        raise BadRecord("not_an_object", f"expected a JSON object, got {type(obj).__name__}")
    fields = ("prompt", "response") if ("prompt" in obj or "response" in obj) else ("text",)
    for field in fields:
        if field not in obj:
            raise BadRecord("missing_field", f"'{field}' is missing; records need prompt+response or text")
        if not isinstance(obj[field], str):
            raise BadRecord("wrong_type", f"'{field}' must be a string, got {type(obj[field]).__name__}")
    group = obj.get("group")
    return {field: obj[field] for field in fields} | {"group": str(group) if group is not None else None}


def clean_text(text: str) -> str:
    """NFC-normalise, drop control characters, collapse runs of spaces, strip line ends."""
    text = _CONTROL.sub("", unicodedata.normalize("NFC", text))
    lines = (_SPACES.sub(" ", line).strip() for line in text.splitlines())
    return "\n".join(line for line in lines if line)


def to_messages(record: dict, system_prompt: str | None) -> list[dict]:
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return system + [
        {"role": "user", "content": record["prompt"]},
        {"role": "assistant", "content": record["response"]},
    ]


def encode_example(record: dict, tokenizer, system_prompt: str | None, loss_on: str = "response") -> dict:
    """Token ids and labels (-100 = no loss) for an instruction pair (chat template) or raw text (+ EOS)."""
    if "text" in record:
        ids = tokenizer(record["text"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return {"input_ids": ids, "labels": list(ids)}
    messages = to_messages(record, system_prompt)
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template does not render the prompt as a prefix of the conversation")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = prompt_ids + tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    n_masked = len(prompt_ids) if loss_on == "response" else 0
    return {"input_ids": ids, "labels": [-100] * n_masked + ids[n_masked:]}


def assign_split(seed: int, source: str, group: str, val_fraction: float) -> str:
    """Deterministic, order-free split by group: the same group always lands on the same side."""
    digest = hashlib.sha256(f"{seed}:{source}:{group}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


def group_key(record: dict) -> str:
    if record.get("group"):
        return record["group"]
    body = record.get("text") or record["prompt"]
    return hashlib.sha256(body.encode()).hexdigest()[:16]
